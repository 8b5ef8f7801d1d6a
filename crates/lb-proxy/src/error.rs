//! Errors of the proxy's setup (requests never fail with an error: they get a response).

/// A route that cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    /// A backend URL that is not `http://host:port`.
    #[error("bad backend URL {url:?}: {why}")]
    BadUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// A `--hash-key` that is not `client-ip`, `path`, `header:NAME` or `cookie:NAME`.
    #[error("bad hash key {0:?} (expected client-ip, path, header:NAME or cookie:NAME)")]
    HashKey(String),
    /// lb-core refused the backend set.
    #[error(transparent)]
    Core(#[from] lb_core::ConfigError),
}

/// The server could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Accepting connections failed for good.
    #[error("accept failed on {addr}")]
    Accept {
        /// The listening address.
        addr: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}
