//! The `Prober` trait: check one target once.

use std::fmt;
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio_rustls::TlsConnector;

use crate::error::ProbeError;

/// What a probe dials: the socket address, the authority to name in protocols that carry
/// one (the HTTP `Host` header), and, for an `https://` backend, how to speak TLS.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Target {
    /// Where to connect.
    pub addr: SocketAddr,
    /// `host[:port]` as configured, for the `Host` header.
    pub authority: String,
    /// `Some` for a backend that speaks TLS: every probe completes a verified handshake
    /// before it counts as healthy (and an HTTP probe sends its `GET` inside it).
    pub tls: Option<TlsTarget>,
}

/// How a probe speaks TLS to one target: the connector (its `ClientConfig` holds the trusted
/// roots) and the name sent as SNI, which the server's certificate must match.
///
/// Two `TlsTarget`s are equal if and only if they name the same server and share the same
/// `ClientConfig` (the same `Arc`, not an equal config: `ClientConfig` has no equality). So
/// a reload that builds a new config, with a new CA say, restarts the target's probes, and
/// one that keeps the config leaves them undisturbed.
#[derive(Clone)]
pub struct TlsTarget {
    /// Makes the handshake; verifies the certificate against its config's roots.
    pub connector: TlsConnector,
    /// Sent as SNI and verified against the certificate: the backend URL's host name.
    pub server_name: ServerName<'static>,
}

// === impl TlsTarget ===

impl TlsTarget {
    /// The identity of the connector's config, for equality and hashing.
    fn config_ptr(&self) -> *const rustls::ClientConfig {
        Arc::as_ptr(self.connector.config())
    }
}

impl PartialEq for TlsTarget {
    fn eq(&self, other: &Self) -> bool {
        self.server_name == other.server_name && std::ptr::eq(self.config_ptr(), other.config_ptr())
    }
}

impl Eq for TlsTarget {}

impl Hash for TlsTarget {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.server_name.hash(state);
        self.config_ptr().hash(state);
    }
}

impl fmt::Debug for TlsTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsTarget")
            .field("server_name", &self.server_name)
            .field("config", &self.config_ptr())
            .finish()
    }
}

// === impl Target ===

impl Target {
    /// A plain-TCP target whose authority is its socket address.
    #[must_use]
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            authority: addr.to_string(),
            tls: None,
        }
    }

    /// The same target, naming `authority` in the `Host` header.
    #[must_use]
    pub fn with_authority(mut self, authority: impl Into<String>) -> Self {
        self.authority = authority.into();
        self
    }

    /// The same target over TLS: probes handshake with `connector`, sending `server_name` as
    /// SNI and verifying the certificate against it (SPEC: SNI = the URL's host name).
    #[must_use]
    pub fn with_tls(mut self, connector: TlsConnector, server_name: ServerName<'static>) -> Self {
        self.tls = Some(TlsTarget {
            connector,
            server_name,
        });
        self
    }
}

/// Checks one target once.
///
/// A probe must finish within `timeout` (the scheduler enforces it as well, so a prober that
/// overruns is cut off and reported as [`ProbeError::Timeout`]); network failures are `Err`,
/// never panics. Plug in your own (gRPC health, Redis `PING`, ...) by implementing it:
///
/// ```
/// use std::time::Duration;
/// use lb_health::{ProbeError, Prober, Target};
///
/// /// Healthy if and only if the port accepts within the timeout, like `TcpProber`.
/// struct Accepts;
/// impl Prober for Accepts {
///     async fn probe(&self, target: &Target, timeout: Duration) -> Result<(), ProbeError> {
///         match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(target.addr)).await {
///             Ok(Ok(_)) => Ok(()),
///             Ok(Err(e)) => Err(ProbeError::from_io(e)),
///             Err(_) => Err(ProbeError::Timeout(timeout)),
///         }
///     }
/// }
/// ```
pub trait Prober: Send + Sync + 'static {
    /// Probes `target` once, within `timeout`.
    fn probe(
        &self,
        target: &Target,
        timeout: Duration,
    ) -> impl Future<Output = Result<(), ProbeError>> + Send;
}

#[cfg(test)]
mod tests {
    use std::collections::hash_map::DefaultHasher;

    use super::*;

    fn hash(t: &Target) -> u64 {
        let mut h = DefaultHasher::new();
        t.hash(&mut h);
        h.finish()
    }

    fn connector() -> TlsConnector {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        TlsConnector::from(Arc::new(config))
    }

    #[test]
    fn tls_targets_compare_by_server_name_and_config_identity() {
        let addr: SocketAddr = "127.0.0.1:443".parse().unwrap();
        let name = ServerName::try_from("app.example").unwrap();
        let (one, other) = (connector(), connector());
        let a = Target::new(addr).with_tls(one.clone(), name.clone());
        let same = Target::new(addr).with_tls(one.clone(), name.clone());
        let new_config = Target::new(addr).with_tls(other, name);
        let new_name = Target::new(addr).with_tls(one, ServerName::try_from("b.example").unwrap());
        assert_eq!(a, same, "a clone of the connector is the same config");
        assert_ne!(a, new_config, "an equal but rebuilt config is a change");
        assert_ne!(a, new_name);
        assert_ne!(a, Target::new(addr));
        assert_eq!(hash(&a), hash(&same), "equal targets hash alike");
        assert!(format!("{a:?}").contains("app.example"));
    }
}
