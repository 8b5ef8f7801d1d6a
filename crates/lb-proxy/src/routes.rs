//! Where requests can go: the balancer, and each backend's address for the HTTP client.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Instant;

use http::header::HeaderName;
use http::uri::{Authority, Scheme};
use http::{HeaderMap, Uri};
use lb_core::{Backend, BackendId, Balancer, RequestState, Weight};

use crate::error::RouteError;
use crate::upstream::PoolKey;

/// One backend as the HTTP client reaches it.
#[derive(Debug, Clone)]
pub struct Target {
    /// `host:port` to connect to (and the `backend` label of metrics).
    pub authority: Authority,
    /// The backend's URL as configured (what `/status` and logs show; lb-core places it by
    /// its normalized [`BackendAddr::identity`]).
    pub url: Arc<str>,
    /// Its connections in the upstream pool.
    pub(crate) key: PoolKey,
}

impl Target {
    /// The name an `https://` backend's certificate is verified for (and its SNI); none
    /// for a plain one.
    #[must_use]
    pub fn server_name(&self) -> Option<&rustls::pki_types::ServerName<'static>> {
        self.key.tls.as_ref()
    }
}

/// What `consistent-hash` hashes (SPEC `--hash-key`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashKey {
    /// The client's IP address (default).
    ClientIp,
    /// The request path.
    Path,
    /// A request header's value (requests without it are placed at random).
    Header(HeaderName),
    /// A cookie's value (requests without it are placed at random).
    Cookie(String),
}

impl FromStr for HashKey {
    type Err = RouteError;

    fn from_str(s: &str) -> Result<Self, RouteError> {
        match s {
            "client-ip" => Ok(Self::ClientIp),
            "path" => Ok(Self::Path),
            _ => {
                if let Some(name) = s.strip_prefix("header:") {
                    HeaderName::from_bytes(name.as_bytes())
                        .map(Self::Header)
                        .map_err(|_| RouteError::HashKey(s.to_owned()))
                } else if let Some(name) = s.strip_prefix("cookie:").filter(|n| !n.is_empty()) {
                    Ok(Self::Cookie(name.to_owned()))
                } else {
                    Err(RouteError::HashKey(s.to_owned()))
                }
            }
        }
    }
}

impl fmt::Display for HashKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ClientIp => f.write_str("client-ip"),
            Self::Path => f.write_str("path"),
            Self::Header(h) => write!(f, "header:{h}"),
            Self::Cookie(c) => write!(f, "cookie:{c}"),
        }
    }
}

impl HashKey {
    /// The request's hash key, if it has the part this key names.
    pub(crate) fn of(&self, uri: &Uri, headers: &HeaderMap, client: SocketAddr) -> Option<u64> {
        match self {
            Self::ClientIp => Some(match client.ip() {
                std::net::IpAddr::V4(ip) => lb_core::stable_hash(&ip.octets()),
                std::net::IpAddr::V6(ip) => lb_core::stable_hash(&ip.octets()),
            }),
            Self::Path => Some(lb_core::stable_hash(uri.path().as_bytes())),
            Self::Header(name) => headers
                .get(name)
                .map(|v| lb_core::stable_hash(v.as_bytes())),
            Self::Cookie(name) => headers
                .get_all(http::header::COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(';'))
                .filter_map(|kv| kv.trim().split_once('='))
                .find(|(k, _)| k == name)
                .map(|(_, v)| lb_core::stable_hash(v.as_bytes())),
        }
    }
}

/// One backend for [`Routes::from_specs`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendSpec {
    /// `http://host:port` or `https://host:port`: where to connect, and (normalized) the
    /// backend's identity.
    pub url: String,
    /// Its weight.
    pub weight: Weight,
    /// For an `https://` backend, the name its certificate is verified for (and its SNI)
    /// when that is not the URL's host: the DNS name an address was found under.
    pub server_name: Option<String>,
    /// Its priority group ([`Backend::with_priority`]): an SRV record's priority.
    pub priority: u16,
}

impl BackendSpec {
    /// A backend reached and verified by its URL alone.
    #[must_use]
    pub const fn new(url: String, weight: Weight) -> Self {
        Self {
            url,
            weight,
            server_name: None,
            priority: 0,
        }
    }
}

/// The routing state one request uses from start to end: swapped whole on reload.
#[derive(Debug)]
pub struct Routes {
    pub(crate) balancer: Arc<Balancer>,
    pub(crate) targets: HashMap<BackendId, Target>,
    pub(crate) hash_key: HashKey,
}

impl Routes {
    /// Puts `backends` (URLs as written, `http://host:port`) into `balancer` and maps each to
    /// its address. The balancer keeps the state of backends it already had.
    ///
    /// # Errors
    /// A URL that is not `http://host:port`, `https://host:port` (or `host:port`), or a
    /// duplicate.
    pub fn new(
        balancer: Arc<Balancer>,
        backends: &[(String, Weight)],
        hash_key: HashKey,
        now: Instant,
    ) -> Result<Self, RouteError> {
        let specs: Vec<BackendSpec> = backends
            .iter()
            .map(|(url, weight)| BackendSpec::new(url.clone(), *weight))
            .collect();
        Self::from_specs(balancer, &specs, hash_key, now)
    }

    /// As [`Routes::new`], for backends that may carry more than a URL and a weight: a
    /// backend found by DNS (`https://10.0.0.7:443`) verifies its certificate for the
    /// name it was found under.
    ///
    /// # Errors
    /// As [`Routes::new`]; also a `server_name` a certificate cannot be verified for.
    pub fn from_specs(
        balancer: Arc<Balancer>,
        backends: &[BackendSpec],
        hash_key: HashKey,
        now: Instant,
    ) -> Result<Self, RouteError> {
        let mut parsed = Vec::with_capacity(backends.len());
        for b in backends {
            let addr = parse_backend(&b.url)?;
            let mut key = PoolKey::new(&addr.authority, addr.https);
            if let (true, Some(name)) = (addr.https, &b.server_name) {
                key.tls =
                    Some(
                        crate::tls::server_name(name).ok_or_else(|| RouteError::BadUrl {
                            url: b.url.clone(),
                            why: "the host is not a name a certificate can be verified for",
                        })?,
                    );
            }
            parsed.push((addr, key, b));
        }
        // The URL as written for `/status` and logs; the normalized address as the identity,
        // so every instance places keys alike however its config spells a backend.
        let ids = balancer
            .set_backends(
                parsed.iter().map(|(addr, _, b)| {
                    Backend::new(b.url.clone(), b.weight)
                        .with_identity(addr.identity())
                        .with_priority(b.priority)
                }),
                now,
            )
            .map_err(RouteError::Core)?;
        let targets = ids
            .into_iter()
            .zip(parsed)
            .map(|(id, (addr, key, b))| {
                (
                    id,
                    Target {
                        key,
                        authority: addr.authority,
                        url: b.url.as_str().into(),
                    },
                )
            })
            .collect();
        Ok(Self {
            balancer,
            targets,
            hash_key,
        })
    }

    /// The balancer.
    #[must_use]
    pub fn balancer(&self) -> &Arc<Balancer> {
        &self.balancer
    }

    /// Every backend's pool key.
    pub(crate) fn pool_keys(&self) -> impl Iterator<Item = &PoolKey> {
        self.targets.values().map(|t| &t.key)
    }

    /// The backend behind an id.
    #[must_use]
    pub fn target(&self, id: BackendId) -> Option<&Target> {
        self.targets.get(&id)
    }

    /// A request's routing trace with backend addresses:
    /// `127.0.0.1:3031 connect_refused retry_not_sent, 127.0.0.1:3032 status 200 relay`.
    #[must_use]
    pub fn trace<'a>(&'a self, st: &'a RequestState) -> impl fmt::Display + 'a {
        TraceView(self, st)
    }
}

struct TraceView<'a>(&'a Routes, &'a RequestState);

impl fmt::Display for TraceView<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, a) in self.1.attempts().iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            let name = |f: &mut fmt::Formatter<'_>| match self.0.targets.get(&a.backend()) {
                Some(t) => write!(f, "{}", t.authority),
                None => write!(f, "{}", a.backend()),
            };
            name(f)?;
            if self.1.resent() == Some(i) {
                // The pooled connection that died under it, then the one resend.
                write!(f, " {} resend, ", lb_core::Outcome::StaleConnection)?;
                name(f)?;
            }
            match (a.outcome(), a.decision()) {
                (Some(o), Some(d)) => write!(f, " {o} {d}")?,
                _ => f.write_str(" in_flight")?,
            }
        }
        if let Some(fail) = self.1.failure() {
            if !self.1.attempts().is_empty() {
                f.write_str(", ")?;
            }
            write!(f, "-> {}", fail.status())?;
        }
        Ok(())
    }
}

/// Where a backend URL leads: the authority to connect to, and whether over TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendAddr {
    /// `host:port`.
    pub authority: Authority,
    /// An `https://` URL: connect over TLS, verify the certificate for the host.
    pub https: bool,
}

impl BackendAddr {
    /// What makes two backends the same: [`backend_identity`] of its scheme, host and port.
    /// `http://127.0.0.1:3031`, `http://127.0.0.1:3031/`, `127.0.0.1:3031` and
    /// `HTTP://127.0.0.1:3031` are one backend.
    #[must_use]
    pub fn identity(&self) -> String {
        // `parse_backend` checked there is a port.
        backend_identity(
            self.https,
            self.authority.host(),
            self.authority.port_u16().unwrap_or(0),
        )
    }
}

/// A backend's identity, however its address was written or found: `http://host:port` or
/// `https://host:port` (the scheme is part of it), the host lower-case without a trailing dot,
/// an IP address in its canonical form (`[::1]`, not `[0:0::1]`).
///
/// lb-core places consistent-hash keys by this string (given as
/// [`Backend::with_identity`]), so every lb instance given the same backend, from any
/// config or from DNS, must name it by this one function. A backend found by DNS is
/// `backend_identity(https, &ip.to_string(), port)`.
///
/// ```
/// use lb_proxy::backend_identity;
/// assert_eq!(backend_identity(false, "Api.Example.", 80), "http://api.example:80");
/// assert_eq!(backend_identity(true, "[0:0::1]", 443), "https://[::1]:443");
/// assert_eq!(backend_identity(false, "127.0.0.1", 3031), "http://127.0.0.1:3031");
/// ```
#[must_use]
pub fn backend_identity(https: bool, host: &str, port: u16) -> String {
    let scheme = if https { "https" } else { "http" };
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    match bare.parse::<std::net::IpAddr>() {
        Ok(ip) => format!("{scheme}://{}", SocketAddr::new(ip, port)),
        Err(_) => {
            let host = host.strip_suffix('.').unwrap_or(host);
            format!("{scheme}://{}:{port}", host.to_ascii_lowercase())
        }
    }
}

/// `http://host:port[/]`, `https://host:port[/]` or `host:port` (plain HTTP) → where to
/// connect.
pub fn parse_backend(url: &str) -> Result<BackendAddr, RouteError> {
    let bad = |why: &'static str| RouteError::BadUrl {
        url: url.to_owned(),
        why,
    };
    let uri: Uri = if url.contains("://") {
        url.parse()
    } else {
        format!("http://{url}").parse()
    }
    .map_err(|_| bad("not a URL"))?;
    let https = match uri.scheme() {
        Some(s) if *s == Scheme::HTTP => false,
        Some(s) if *s == Scheme::HTTPS => true,
        _ => return Err(bad("scheme must be http or https")),
    };
    if uri.path_and_query().is_some_and(|pq| pq.as_str() != "/") {
        return Err(bad("a backend URL has no path or query"));
    }
    let authority = uri.authority().ok_or_else(|| bad("no host"))?.clone();
    if authority.host().is_empty() {
        return Err(bad("no host"));
    }
    if authority.as_str().contains('@') {
        return Err(bad("user info is not allowed"));
    }
    if authority.port_u16().is_none() {
        return Err(bad("a port is required (http://host:port)"));
    }
    if https && crate::tls::server_name(authority.host()).is_none() {
        return Err(bad(
            "the host is not a name a certificate can be verified for",
        ));
    }
    Ok(BackendAddr { authority, https })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_urls() {
        assert_eq!(
            parse_backend("http://127.0.0.1:3031")
                .unwrap()
                .authority
                .as_str(),
            "127.0.0.1:3031"
        );
        assert_eq!(
            parse_backend("http://localhost:80/")
                .unwrap()
                .authority
                .as_str(),
            "localhost:80"
        );
        assert_eq!(
            parse_backend("10.0.0.1:8080").unwrap().authority.as_str(),
            "10.0.0.1:8080"
        );
        assert_eq!(
            parse_backend("http://[::1]:9000")
                .unwrap()
                .authority
                .as_str(),
            "[::1]:9000"
        );
        for bad in [
            "ftp://a:1",
            "http://a",
            "http://a:1/x",
            "http://:80",
            "not a url",
            "https://a",
            "http://u@a:1",
        ] {
            assert!(parse_backend(bad).is_err(), "{bad}");
        }
        let one = parse_backend("http://127.0.0.1:3031").unwrap().identity();
        assert_eq!(one, "http://127.0.0.1:3031");
        for same in [
            "http://127.0.0.1:3031/",
            "127.0.0.1:3031",
            "HTTP://127.0.0.1:3031",
            "Http://127.0.0.1:3031/",
        ] {
            assert_eq!(parse_backend(same).unwrap().identity(), one, "{same}");
        }
        assert_eq!(
            parse_backend("http://[0:0::1]:9000").unwrap().identity(),
            parse_backend("[::1]:9000").unwrap().identity()
        );
        assert_eq!(
            parse_backend("http://LocalHost.:80").unwrap().identity(),
            "http://localhost:80"
        );
        let tls = parse_backend("https://Api.Example:8443").unwrap();
        assert!(tls.https);
        assert_eq!(tls.identity(), "https://api.example:8443");
        assert_ne!(
            parse_backend("http://a:1").unwrap().identity(),
            parse_backend("https://a:1").unwrap().identity(),
            "the scheme is part of a backend's identity"
        );
    }

    #[test]
    fn hash_keys() {
        for k in ["client-ip", "path", "header:x-user", "cookie:session"] {
            assert_eq!(k.parse::<HashKey>().unwrap().to_string(), k);
        }
        assert!("cookie:".parse::<HashKey>().is_err());
        assert!("header:bad name".parse::<HashKey>().is_err());
        let mut h = HeaderMap::new();
        h.insert("cookie", "a=1; session=abc".parse().unwrap());
        let peer: SocketAddr = "1.2.3.4:5".parse().unwrap();
        let uri: Uri = "/p".parse().unwrap();
        let key = HashKey::Cookie("session".into());
        assert_eq!(key.of(&uri, &h, peer), Some(lb_core::stable_hash(b"abc")));
        assert_eq!(HashKey::Cookie("none".into()).of(&uri, &h, peer), None);
    }
}
