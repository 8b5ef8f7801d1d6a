//! TCP connect probes, and the connection every probe starts with.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::error::ProbeError;
use crate::prober::{Prober, Target};

/// Healthy if and only if the target accepts a TCP connection within the timeout and, for a
/// target with [`Target::tls`], completes a TLS handshake in which its certificate verifies
/// against the connector's roots and the target's server name.
///
/// The connection is closed at once with an RST (`SO_LINGER` 0), as HAProxy closes its
/// checks: neither side keeps a socket in `TIME_WAIT` or a half-closed state for each probe,
/// so thousands of probes leave nothing behind on the backend or here. (A TLS probe sends no
/// `close_notify`: the RST ends the session as well.)
#[derive(Debug, Default, Clone, Copy)]
pub struct TcpProber;

impl Prober for TcpProber {
    async fn probe(&self, target: &Target, timeout: Duration) -> Result<(), ProbeError> {
        // The timeout covers the connect and the handshake together.
        match tokio::time::timeout(timeout, connect(target)).await {
            Ok(stream) => stream.map(drop),
            Err(_) => Err(ProbeError::Timeout(timeout)),
        }
    }
}

/// A probe's connection: plain TCP, or TLS over TCP. Either way its TCP socket is set to
/// close with an RST when dropped.
pub(crate) enum ProbeStream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// Connects to `target` and, for a TLS target, completes a verified handshake; failures
/// classified. Sets no timeout of its own: the caller bounds the whole probe.
pub(crate) async fn connect(target: &Target) -> Result<ProbeStream, ProbeError> {
    let tcp = TcpStream::connect(target.addr)
        .await
        .map_err(ProbeError::from_io)?;
    // Before the handshake, so that a failed one closes with an RST too.
    abort(&tcp);
    match &target.tls {
        None => Ok(ProbeStream::Plain(tcp)),
        Some(tls) => {
            let stream = tls
                .connector
                .connect(tls.server_name.clone(), tcp)
                .await
                .map_err(ProbeError::from_io)?;
            Ok(ProbeStream::Tls(Box::new(stream)))
        }
    }
}

/// Makes the coming close an immediate RST rather than a FIN handshake.
fn abort(stream: &TcpStream) {
    // Best effort: if the option cannot be set the socket still closes, just gracefully.
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

// === impl ProbeStream ===

impl AsyncRead for ProbeStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ProbeStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_flush(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
