//! One client connection: protocol detection, the request-head and keep-alive timers, and
//! the hyper connection that serves it.
//!
//! # Why our own timers
//! hyper's `header_read_timeout` closes a slow connection without a word, and hyper has no
//! keep-alive idle timeout. SPEC.md wants a 408 when a request head does not arrive within
//! `timeouts.header_read` (as NGINX's `client_header_timeout` and HAProxy's
//! `timeout http-request` answer), and idle keep-alive connections closed after
//! `timeouts.idle`. So the socket is wrapped in [`ClientIo`], which knows the connection's
//! [`Phase`] (told by the service and the response body) and enforces the deadline of the
//! phase it is in:
//!
//! * `Head`: waiting for (the rest of) a request head: `header_read` from accept for the first
//!   request, from its first byte for later ones; expiry writes a 408 and closes;
//! * `Busy`: a request is being served: no deadline here (lb-core's per-attempt timeout rules);
//! * `Idle`: between keep-alive requests: `idle`; expiry closes quietly;
//! * `Free`: HTTP/2 or an upgraded tunnel: no deadline on the socket.
//!
//! HTTP/2 multiplexes, so its deadlines are the connection's, not a read's: the preface and
//! the first request's HEADERS within `header_read` of accept, and no stream open for `idle`
//! at most; either expiry sends GOAWAY and closes.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::{Instant, Sleep};

use crate::phase::{Phase, HEAD, IDLE};
use crate::respond;
use crate::service::Shared;
use crate::validate::HeadCopy;

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The client socket, with the deadline of the connection's phase.
struct ClientIo {
    stream: TcpStream,
    /// Bytes read while detecting the protocol, replayed first.
    prefix: Bytes,
    phase: Arc<Phase>,
    /// The phase word `deadline` was computed for.
    armed: u32,
    /// When the current phase runs out, if it has a limit.
    deadline: Option<Instant>,
    /// The timer, allocated once and set only when a read actually has to wait: most keep-alive
    /// requests then cost one timer update, not one per phase change.
    sleep: Option<Pin<Box<Sleep>>>,
    sleep_at: Option<Instant>,
    header_read: Duration,
    idle: Duration,
    /// What was read of the head in `Head`, to correct hyper's answer to it.
    head: HeadCopy,
    /// Whether hyper has written bytes it has not flushed yet (1xx must not go in between).
    unflushed: bool,
    /// The status of what was written while a head was read (hyper's own answer to a head
    /// it refused), 0 if nothing was: `serve` reports it if hyper says it refused a head.
    refusal: Arc<AtomicU16>,
}

impl ClientIo {
    /// Recomputes the deadline if the phase changed since it was computed.
    fn follow_phase(&mut self) {
        let word = self.phase.load();
        if word == self.armed {
            return;
        }
        self.armed = word;
        self.head.clear();
        // Whatever was written belonged to an earlier head.
        self.refusal.store(0, Ordering::Relaxed);
        self.deadline = match word & 0xff {
            IDLE => Instant::now().checked_add(self.idle),
            HEAD => Instant::now().checked_add(self.header_read),
            _ => None,
        };
    }

    /// Returns true if and only if the deadline has passed; otherwise makes sure the task is
    /// woken when it does.
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(at) = self.deadline else {
            return false;
        };
        if self.sleep_at != Some(at) {
            match &mut self.sleep {
                Some(sleep) => sleep.as_mut().reset(at),
                None => self.sleep = Some(Box::pin(tokio::time::sleep_until(at))),
            }
            self.sleep_at = Some(at);
        }
        self.sleep
            .as_mut()
            .is_some_and(|s| s.as_mut().poll(cx).is_ready())
    }
}

impl ClientIo {
    /// Returns true if and only if `out` is hyper's automatic answer to a head it refused,
    /// and the right answer was sent instead (best effort, as the 408; see [`HeadCopy`]).
    fn corrected(&self, out: &[u8]) -> bool {
        if self.phase.load() & 0xff != HEAD {
            return false;
        }
        if let Some(status) = status_line(out) {
            self.refusal.store(status, Ordering::Relaxed);
        }
        let Some(fix) = self.head.correct(out) else {
            return false;
        };
        self.refusal.store(400, Ordering::Relaxed);
        let _ = self.stream.try_write(fix);
        true
    }
}

impl AsyncRead for ClientIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.head.record(&this.prefix[..n]);
            this.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        this.follow_phase();
        if this.phase.interim.is_active() && !this.unflushed {
            // Woken for a backend's 1xx while the final response is awaited.
            this.phase.interim.write_early(cx, &mut this.stream);
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.stream).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before && this.armed & 0xff == IDLE {
                    // The first byte of the next request: its head must now arrive in time.
                    this.phase.set(HEAD);
                    this.follow_phase();
                }
                if this.armed & 0xff == HEAD {
                    this.head.record(&buf.filled()[before..]);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                if !this.expired(cx) {
                    return Poll::Pending;
                }
                if this.armed & 0xff == HEAD {
                    // Best effort: the socket is writable unless the client stopped reading too.
                    let _ = this.stream.try_write(respond::REQUEST_TIMEOUT);
                    tracing::debug!(target: "lb::conn", "request head not received in time: 408");
                }
                // End of stream: hyper closes the connection.
                Poll::Ready(Ok(()))
            }
        }
    }
}

impl AsyncWrite for ClientIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.corrected(buf) {
            return Poll::Ready(Ok(buf.len()));
        }
        let this = &mut *self;
        if this.phase.interim.is_active() {
            ready!(this
                .phase
                .interim
                .poll_before_write(cx, &mut this.stream, this.unflushed))?;
        }
        let r = Pin::new(&mut this.stream).poll_write(cx, buf);
        this.unflushed |= matches!(r, Poll::Ready(Ok(n)) if n > 0);
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if bufs.first().is_some_and(|b| self.corrected(b)) {
            return Poll::Ready(Ok(bufs.iter().map(|b| b.len()).sum()));
        }
        let this = &mut *self;
        if this.phase.interim.is_active() {
            ready!(this
                .phase
                .interim
                .poll_before_write(cx, &mut this.stream, this.unflushed))?;
        }
        let r = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        this.unflushed |= matches!(r, Poll::Ready(Ok(n)) if n > 0);
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.stream).poll_flush(cx);
        // hyper flushes the socket once its own buffer is empty.
        self.unflushed &= !matches!(r, Poll::Ready(Ok(())));
        r
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// The status of `out`, if it begins with an HTTP/1 status line.
fn status_line(out: &[u8]) -> Option<u16> {
    let rest = out
        .strip_prefix(b"HTTP/1.1 ")
        .or_else(|| out.strip_prefix(b"HTTP/1.0 "))?;
    let code = rest.get(..3)?;
    std::str::from_utf8(code).ok()?.parse().ok()
}

/// Reports hyper's own answer to a head it refused (`refusal`), if the connection ended
/// with hyper's parse error, after which hyper writes such an answer (if it can) and closes.
fn report_refusal(shared: &Shared, result: &Result<(), hyper::Error>, refusal: &AtomicU16) {
    let status = refusal.load(Ordering::Relaxed);
    if status != 0 && result.as_ref().is_err_and(hyper::Error::is_parse) {
        shared.observer.refused(status);
    }
}

/// Reads just enough to tell an HTTP/2 prior-knowledge preface from an HTTP/1 request.
async fn sniff_h2(stream: &mut TcpStream) -> io::Result<(bool, Bytes)> {
    let mut buf = BytesMut::with_capacity(H2_PREFACE.len());
    loop {
        if stream.read_buf(&mut buf).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let n = buf.len().min(H2_PREFACE.len());
        if buf[..n] != H2_PREFACE[..n] {
            return Ok((false, buf.freeze()));
        }
        if n == H2_PREFACE.len() {
            return Ok((true, buf.freeze()));
        }
    }
}

/// Resolves when an HTTP/2 connection has had no stream open for too long: until `first`
/// (accept plus `header_read`) if it never opened one, else (or without `first`) `idle`
/// after the last one closed.
async fn h2_expiry(phase: &Phase, first: Option<Instant>, idle: Duration) {
    loop {
        let changed = phase.changed();
        let (open, served) = phase.streams();
        if open > 0 {
            changed.await;
            continue;
        }
        let at = match first {
            Some(first) if !served => Some(first),
            _ => Instant::now().checked_add(idle),
        };
        let Some(at) = at else {
            return std::future::pending().await;
        };
        tokio::select! {
            () = tokio::time::sleep_until(at) => return,
            () = changed => {}
        }
    }
}

/// After GOAWAY, the streams still open may finish (a drain), but a connection with none
/// open may not linger: hyper waits for the client's PING acknowledgement before it closes,
/// and a client that never sends one is cut off.
async fn h2_expiry_after_goaway<F: Future>(
    conn: Pin<&mut F>,
    phase: &Phase,
    idle: Duration,
) -> Result<(), ()> {
    tokio::select! {
        _ = conn => Ok(()),
        () = h2_expiry(phase, None, idle) => Err(()),
    }
}

/// Serves one client connection until it closes, or until `shutdown` turns true, after
/// which in-flight requests finish and the connection closes (graceful shutdown).
pub(crate) async fn serve(
    shared: Arc<Shared>,
    mut stream: TcpStream,
    peer: SocketAddr,
    mut shutdown: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let config = shared.config;
    let started = Instant::now();
    let sniffed = tokio::select! {
        r = tokio::time::timeout(config.header_read_timeout, sniff_h2(&mut stream)) => r,
        _ = shutdown.wait_for(|s| *s) => return,
    };
    let (h2, prefix) = match sniffed {
        Ok(Ok(found)) => found,
        Ok(Err(_)) => return, // closed before a request: nothing to answer
        Err(_) => {
            let _ = stream.try_write(respond::REQUEST_TIMEOUT);
            return;
        }
    };
    let phase = Arc::new(if h2 { Phase::http2() } else { Phase::http1() });
    let refusal = Arc::new(AtomicU16::new(0));
    let mut io = ClientIo {
        stream,
        prefix,
        phase: Arc::clone(&phase),
        armed: HEAD,
        deadline: None,
        sleep: None,
        sleep_at: None,
        header_read: config.header_read_timeout,
        idle: config.idle_timeout,
        head: HeadCopy::new(config.max_header_bytes),
        unflushed: false,
        refusal: Arc::clone(&refusal),
    };
    if !h2 {
        // The first request's head is due `header_read` after accept, sniffing included.
        io.deadline = started.checked_add(config.header_read_timeout);
    }
    let service = {
        let shared = Arc::clone(&shared);
        let phase = Arc::clone(&phase);
        // Formatted once per connection, not per request.
        let xff = crate::headers::client_value(peer.ip());
        hyper::service::service_fn(move |req| {
            let (shared, phase, xff) = (Arc::clone(&shared), Arc::clone(&phase), xff.clone());
            async move {
                Ok::<_, std::convert::Infallible>(
                    crate::service::handle(shared, req, peer, xff, phase).await,
                )
            }
        })
    };
    let io = TokioIo::new(io);
    if h2 {
        let mut builder = http2::Builder::new(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .max_header_list_size(u32::try_from(config.max_header_bytes).unwrap_or(u32::MAX));
        let conn = builder.serve_connection(io, service);
        tokio::pin!(conn);
        let first = started.checked_add(config.header_read_timeout);
        tokio::select! {
            _ = conn.as_mut() => return,
            _ = shutdown.wait_for(|s| *s) => {}
            () = h2_expiry(&phase, first, config.idle_timeout) => {
                tracing::debug!(target: "lb::conn", %peer, "HTTP/2 connection idle or without a request in time: closing");
            }
        }
        conn.as_mut().graceful_shutdown();
        if h2_expiry_after_goaway(conn.as_mut(), &phase, config.idle_timeout)
            .await
            .is_err()
        {
            tracing::debug!(target: "lb::conn", %peer, "HTTP/2 connection did not close after GOAWAY");
        }
    } else {
        let mut builder = http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .max_header_size(config.max_header_bytes)
            .keep_alive(true);
        let conn = builder.serve_connection(io, service).with_upgrades();
        tokio::pin!(conn);
        tokio::select! {
            r = conn.as_mut() => {
                report_refusal(&shared, &r, &refusal);
                if let Err(e) = r {
                    tracing::debug!(target: "lb::conn", %peer, error = %e, "client connection error");
                }
                return;
            }
            _ = shutdown.wait_for(|s| *s) => conn.as_mut().graceful_shutdown(),
        }
        let r = conn.await;
        report_refusal(&shared, &r, &refusal);
    }
}
