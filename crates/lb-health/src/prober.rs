//! The `Prober` trait: check one target once.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use crate::error::ProbeError;

/// What a probe dials: the socket address, and the authority to name in protocols that carry
/// one (the HTTP `Host` header).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Target {
    /// Where to connect.
    pub addr: SocketAddr,
    /// `host[:port]` as configured, for the `Host` header.
    pub authority: String,
}

impl Target {
    /// A target whose authority is its socket address.
    #[must_use]
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            authority: addr.to_string(),
        }
    }

    /// The same target, naming `authority` in the `Host` header.
    #[must_use]
    pub fn with_authority(mut self, authority: impl Into<String>) -> Self {
        self.authority = authority.into();
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
