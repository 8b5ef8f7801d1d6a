//! TCP connect probes.

use std::time::Duration;

use tokio::net::TcpStream;

use crate::error::ProbeError;
use crate::prober::{Prober, Target};

/// Healthy if and only if the target accepts a TCP connection within the timeout.
///
/// The connection is closed at once with an RST (`SO_LINGER` 0), as HAProxy closes its
/// checks: neither side keeps a socket in `TIME_WAIT` or a half-closed state for each probe,
/// so thousands of probes leave nothing behind on the backend or here.
#[derive(Debug, Default, Clone, Copy)]
pub struct TcpProber;

impl Prober for TcpProber {
    async fn probe(&self, target: &Target, timeout: Duration) -> Result<(), ProbeError> {
        let stream = connect(target, timeout).await?;
        abort(&stream);
        Ok(())
    }
}

/// Connects within `timeout`, classifying failures.
pub(crate) async fn connect(target: &Target, timeout: Duration) -> Result<TcpStream, ProbeError> {
    match tokio::time::timeout(timeout, TcpStream::connect(target.addr)).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(e)) => Err(ProbeError::from_io(e)),
        Err(_) => Err(ProbeError::Timeout(timeout)),
    }
}

/// Makes the coming close an immediate RST rather than a FIN handshake.
pub(crate) fn abort(stream: &TcpStream) {
    // Best effort: if the option cannot be set the socket still closes, just gracefully.
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
}
