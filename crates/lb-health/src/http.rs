//! HTTP `GET` probes.

use std::ops::RangeInclusive;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::error::ProbeError;
use crate::prober::{Prober, Target};
use crate::tcp::connect;

/// Healthy if and only if `GET path` answers with a status in the healthy range (2xx and
/// 3xx by default) within the timeout.
///
/// Speaks HTTP/1.1 with `Connection: close` and reads only the response head, at most
/// `max_head_bytes` (8 KiB by default): a backend that streams an endless body, or answers
/// with garbage, cannot make a probe read more than that.
///
/// For a target with [`Target::tls`] the `GET` goes inside a verified TLS session: a
/// certificate that does not verify fails the probe before any request is sent.
///
/// ```
/// let prober = lb_health::HttpProber::new("/healthz").with_healthy(200..=204);
/// assert_eq!(prober.path(), "/healthz");
/// ```
#[derive(Debug, Clone)]
pub struct HttpProber {
    path: String,
    healthy: RangeInclusive<u16>,
    max_head_bytes: usize,
}

impl HttpProber {
    /// Probes `path` (a leading `/` is added if missing).
    #[must_use]
    pub fn new(path: impl Into<String>) -> Self {
        let mut path = path.into();
        if !path.starts_with('/') {
            path.insert(0, '/');
        }
        Self {
            path,
            healthy: 200..=399,
            max_head_bytes: 8192,
        }
    }

    /// Only statuses in `range` are healthy.
    #[must_use]
    pub fn with_healthy(mut self, range: RangeInclusive<u16>) -> Self {
        self.healthy = range;
        self
    }

    /// The path probed.
    #[must_use]
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Connects (and handshakes, for a TLS target), sends the `GET` and reads the status.
    /// The stream is dropped on return, which closes it with an RST.
    async fn exchange(&self, target: &Target) -> Result<u16, ProbeError> {
        let mut stream = connect(target).await?;
        let request = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: lb-health\r\nAccept: */*\r\nConnection: close\r\n\r\n",
            self.path, target.authority
        );
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(ProbeError::from_io)?;
        // Over TLS the request may still sit in the session's buffer.
        stream.flush().await.map_err(ProbeError::from_io)?;
        let mut buf = vec![0u8; self.max_head_bytes];
        let mut len = 0;
        loop {
            if len == buf.len() {
                break Err(ProbeError::BadResponse("response head too large"));
            }
            let n = stream
                .read(&mut buf[len..])
                .await
                .map_err(ProbeError::from_io)?;
            if n == 0 {
                break Err(ProbeError::Reset);
            }
            len += n;
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut response = httparse::Response::new(&mut headers);
            match response.parse(&buf[..len]) {
                Ok(httparse::Status::Complete(_)) => {
                    break response
                        .code
                        .ok_or(ProbeError::BadResponse("no status code"));
                }
                Ok(httparse::Status::Partial) => {}
                Err(httparse::Error::TooManyHeaders) => {
                    // The status line parsed; that is all a probe needs.
                    break response
                        .code
                        .ok_or(ProbeError::BadResponse("too many headers"));
                }
                Err(_) => break Err(ProbeError::BadResponse("not an HTTP/1.x response")),
            }
        }
    }
}

impl Prober for HttpProber {
    async fn probe(&self, target: &Target, timeout: Duration) -> Result<(), ProbeError> {
        // One bound on connect, handshake and exchange together.
        let status = match tokio::time::timeout(timeout, self.exchange(target)).await {
            Ok(result) => result?,
            Err(_) => return Err(ProbeError::Timeout(timeout)),
        };
        if self.healthy.contains(&status) {
            Ok(())
        } else {
            Err(ProbeError::BadStatus(status))
        }
    }
}
