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
//! * `Busy`: a request is being served: no read deadline here (lb-core's per-attempt timeout
//!   rules);
//! * `Idle`: between keep-alive requests: `idle`; expiry closes quietly;
//! * `Free`: HTTP/2 or an upgraded tunnel: no deadline on the socket.
//!
//! HTTP/2 multiplexes, so its deadlines are the connection's, not a read's: the preface and
//! the first request's HEADERS within `header_read` of accept, and no stream open for `idle`
//! at most; either expiry sends GOAWAY and closes, after a grace of `min(idle, header_read)`
//! for a client that never acknowledges the GOAWAY's PING.
//!
//! # Control-frame floods
//! An HTTP/2 client's PING and SETTINGS frames are counted as they are read, and a client
//! sending far more than keep-alive needs is cut off (see [`crate::flood`]).
//!
//! # Clients that do not read
//! In every phase, a write to the client that makes no progress for `timeouts.idle` resets
//! the connection (NGINX's `send_timeout`): the request ends as the client's departure, never
//! the backend's failure. An HTTP/2 client can stall a response without filling the socket, by
//! granting no flow-control window; so an HTTP/2 connection is closed too when a response
//! body waits for the client (hyper has its data and has not asked for more: see
//! `Outgoing`) and the socket moved no byte either way for `idle`. A stream waiting for its
//! backend, or for its request body, is not the client's stall.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{watch, OwnedSemaphorePermit};
use tokio::time::{Instant, Sleep};

use crate::flood::ControlFrames;
use crate::phase::{Phase, HEAD, IDLE};
use crate::respond;
use crate::service::Shared;
use crate::validate::HeadCopy;

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// A client's connection: the socket, or TLS over it.
enum ClientStream {
    Plain(TcpStream),
    /// Boxed: rustls's state is kilobytes, and plain connections should not carry its size.
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl ClientStream {
    fn socket(&self) -> &TcpStream {
        match self {
            Self::Plain(s) => s,
            Self::Tls(t) => t.get_ref().0,
        }
    }

    fn set_zero_linger(&self) -> io::Result<()> {
        self.socket().set_zero_linger()
    }

    /// Writes what it can of `buf` without waiting (a best-effort answer before closing:
    /// the 408, or a corrected 400). Over TLS, it is encrypted and flushed as far as the
    /// socket takes it.
    fn try_write(&mut self, buf: &[u8]) {
        match self {
            Self::Plain(s) => {
                let _ = s.try_write(buf);
            }
            Self::Tls(t) => {
                let mut cx = Context::from_waker(std::task::Waker::noop());
                let mut t = Pin::new(&mut **t);
                let _ = t.as_mut().poll_write(&mut cx, buf);
                let _ = t.as_mut().poll_flush(&mut cx);
            }
        }
    }
}

impl AsyncRead for ClientStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tls(t) => Pin::new(&mut **t).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Self::Tls(t) => Pin::new(&mut **t).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Self::Tls(t) => Pin::new(&mut **t).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Plain(s) => s.is_write_vectored(),
            Self::Tls(t) => t.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_flush(cx),
            Self::Tls(t) => Pin::new(&mut **t).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tls(t) => Pin::new(&mut **t).poll_shutdown(cx),
        }
    }
}

/// The client socket, with the deadline of the connection's phase.
struct ClientIo {
    stream: ClientStream,
    /// HTTP/2: the client's budget of control frames (see [`ControlFrames`]); it reads the
    /// frames as the client sent them, decrypted when over TLS.
    control: Option<ControlFrames>,
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
    /// The send timeout, armed when a write has to wait and disarmed when one progresses.
    write_sleep: Option<Pin<Box<Sleep>>>,
    write_waiting: bool,
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
    /// Applies the send timeout to the result of a write to the socket.
    fn sent(
        &mut self,
        cx: &mut Context<'_>,
        r: Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        match r {
            Poll::Ready(Ok(n)) if n > 0 => {
                self.unflushed = true;
                self.write_waiting = false;
                self.phase.progressed();
                Poll::Ready(Ok(n))
            }
            Poll::Pending => {
                if !self.write_waiting {
                    self.write_waiting = true;
                    let at = Instant::now().checked_add(self.idle);
                    match (&mut self.write_sleep, at) {
                        (_, None) => {}
                        (Some(sleep), Some(at)) => sleep.as_mut().reset(at),
                        (None, Some(at)) => {
                            self.write_sleep = Some(Box::pin(tokio::time::sleep_until(at)));
                        }
                    }
                }
                let stuck = self
                    .write_sleep
                    .as_mut()
                    .is_some_and(|s| s.as_mut().poll(cx).is_ready());
                if stuck {
                    // Reset rather than close (NGINX's `reset_timedout_connection`): a FIN would
                    // queue behind the unread bytes, which the kernel would keep, and keep
                    // trying to send, for minutes.
                    let _ = self.stream.set_zero_linger();
                    tracing::debug!(target: "lb::conn", "client not reading its response: resetting");
                    return Poll::Ready(Err(io::ErrorKind::TimedOut.into()));
                }
                Poll::Pending
            }
            other => other,
        }
    }

    /// Returns true if and only if `out` is hyper's automatic answer to a head it refused,
    /// and the right answer was sent instead (best effort, as the 408; see [`HeadCopy`]).
    fn corrected(&mut self, out: &[u8]) -> bool {
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
        self.stream.try_write(fix);
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
            if this.prefix.is_empty() {
                // Emptied, it would still hold its buffer for the connection's whole life.
                this.prefix = Bytes::new();
            }
            return this.flood_check(&buf.filled()[buf.filled().len() - n..]);
        }
        this.follow_phase();
        if this.phase.interim.is_active() && !this.unflushed {
            // Woken for a backend's 1xx while the final response is awaited.
            this.phase.interim.write_early(cx, &mut this.stream);
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.stream).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    this.phase.progressed();
                }
                if buf.filled().len() > before && this.armed & 0xff == IDLE {
                    // The first byte of the next request: its head must now arrive in time.
                    this.phase.set(HEAD);
                    this.follow_phase();
                }
                if this.armed & 0xff == HEAD {
                    this.head.record(&buf.filled()[before..]);
                }
                this.flood_check(&buf.filled()[before..])
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                if !this.expired(cx) {
                    return Poll::Pending;
                }
                if this.armed & 0xff == HEAD {
                    // Best effort: the socket is writable unless the client stopped reading too.
                    this.stream.try_write(respond::REQUEST_TIMEOUT);
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
            match this
                .phase
                .interim
                .poll_before_write(cx, &mut this.stream, this.unflushed)
            {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                // A client not reading its 1xx is not reading its response either.
                Poll::Pending => return this.sent(cx, Poll::Pending),
            }
        }
        let r = Pin::new(&mut this.stream).poll_write(cx, buf);
        if let (Poll::Ready(Ok(n)), Some(c)) = (&r, &mut this.control) {
            c.wrote(&buf[..*n]);
        }
        this.sent(cx, r)
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
            match this
                .phase
                .interim
                .poll_before_write(cx, &mut this.stream, this.unflushed)
            {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                // A client not reading its 1xx is not reading its response either.
                Poll::Pending => return this.sent(cx, Poll::Pending),
            }
        }
        let r = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        if let (Poll::Ready(Ok(n)), Some(c)) = (&r, &mut this.control) {
            let mut left = *n;
            for b in bufs {
                let k = left.min(b.len());
                c.wrote(&b[..k]);
                left -= k;
                if left == 0 {
                    break;
                }
            }
        }
        this.sent(cx, r)
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

impl ClientIo {
    /// Follows what an HTTP/2 client sent (`new`): past its budget of control frames, the
    /// read fails and hyper closes the connection.
    fn flood_check(&mut self, new: &[u8]) -> Poll<io::Result<()>> {
        let within = self
            .control
            .as_mut()
            .is_none_or(|c| c.feed(new, Instant::now()));
        if within {
            return Poll::Ready(Ok(()));
        }
        tracing::debug!(target: "lb::conn", "HTTP/2 client flooding PING or SETTINGS: closing");
        Poll::Ready(Err(io::ErrorKind::ConnectionAborted.into()))
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

/// The client's side of a tunnel, noting when a byte last went either way.
struct Noted<T> {
    io: T,
    last: Arc<AtomicU64>,
    since: Instant,
}

impl<T> Noted<T> {
    fn note(&self) {
        let nanos = u64::try_from(self.since.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.last.store(nanos, Ordering::Relaxed);
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Noted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.note();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Noted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.note();
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Copies bytes both ways between an upgraded client connection and its backend until either
/// side closes, or until `idle` passes with no byte either way (every byte of a tunnel goes
/// through the client's side, so that side alone is watched).
pub(crate) async fn splice<C, U>(client: C, mut upstream: U, idle: Duration) -> io::Result<()>
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let last = Arc::new(AtomicU64::new(0));
    let since = Instant::now();
    let mut client = Noted {
        io: client,
        last: Arc::clone(&last),
        since,
    };
    let copy = tokio::io::copy_bidirectional(&mut client, &mut upstream);
    tokio::pin!(copy);
    loop {
        let at = since
            .checked_add(Duration::from_nanos(last.load(Ordering::Relaxed)))
            .and_then(|t| t.checked_add(idle));
        let Some(at) = at else {
            return copy.await.map(drop);
        };
        tokio::select! {
            r = copy.as_mut() => return r.map(drop),
            () = tokio::time::sleep_until(at) => {
                let moved = since
                    .checked_add(Duration::from_nanos(last.load(Ordering::Relaxed)))
                    .and_then(|t| t.checked_add(idle))
                    .is_some_and(|t| t > Instant::now());
                if !moved {
                    tracing::debug!(target: "lb::conn", "tunnel idle: closing");
                    return Ok(());
                }
            }
        }
    }
}

/// What the first read takes: a whole request head, mostly, which hyper then parses without
/// a read of its own (a new connection per request costs one `recvfrom` less).
const FIRST_READ: usize = 4096;

/// Reads until it can tell an HTTP/2 prior-knowledge preface from an HTTP/1 request; the
/// bytes read are the connection's first.
async fn sniff_h2<S: AsyncRead + Unpin>(stream: &mut S) -> io::Result<(bool, Bytes)> {
    let mut buf = BytesMut::with_capacity(FIRST_READ);
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

/// Why an HTTP/2 connection is to close.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum H2Expiry {
    /// No stream open for too long: say GOAWAY.
    Quiet,
    /// Streams open, but the socket moved nothing for `idle`: the client is not taking its
    /// responses (no flow-control window), so there is nobody to say GOAWAY to.
    Stalled,
}

/// Resolves when an HTTP/2 connection has had no stream open for too long: until `first`
/// (accept plus `header_read`) if it never opened one, else (or without `first`) `quiet`
/// after the last one closed; or when a response waits for the client's window and the
/// socket moved no byte either way for `idle`.
async fn h2_expiry(phase: &Phase, first: Option<Instant>, quiet: Duration) -> H2Expiry {
    loop {
        let changed = phase.changed();
        let (open, served) = phase.streams();
        if open > 0 {
            if !phase.held() {
                // Waiting for backends (their own timeouts apply) or for request bodies
                // (`body_read`), not for the client to take a response.
                changed.await;
                continue;
            }
            let Some(at) = phase.last_progress().checked_add(phase.idle) else {
                changed.await;
                continue;
            };
            tokio::select! {
                () = tokio::time::sleep_until(at) => {
                    let moved = phase
                        .last_progress()
                        .checked_add(phase.idle)
                        .is_some_and(|at| at > Instant::now());
                    if !moved && phase.held() && phase.streams().0 > 0 {
                        return H2Expiry::Stalled;
                    }
                }
                () = changed => {}
            }
            continue;
        }
        let at = match first {
            Some(first) if !served => Some(first),
            _ => Instant::now().checked_add(quiet),
        };
        let Some(at) = at else {
            return std::future::pending().await;
        };
        tokio::select! {
            () = tokio::time::sleep_until(at) => return H2Expiry::Quiet,
            () = changed => {}
        }
    }
}

/// A response body on its way to an HTTP/2 client. hyper asks a body for data only when the
/// client's flow-control window has room: a body that gave data and is not asked again is
/// waiting for the client, one whose last answer was `Pending` for its backend.
struct Outgoing<B> {
    body: B,
    phase: Arc<Phase>,
    held: bool,
}

impl<B> Outgoing<B> {
    fn new(body: B, phase: Arc<Phase>) -> Self {
        // Not asked for anything yet: the client's window decides when it is.
        phase.hold(true);
        Self {
            body,
            phase,
            held: true,
        }
    }

    fn set_held(&mut self, held: bool) {
        if self.held != held {
            self.held = held;
            self.phase.hold(held);
        }
    }
}

impl<B: Body + Unpin> Body for Outgoing<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.body).poll_frame(cx);
        this.set_held(matches!(r, Poll::Ready(Some(Ok(_)))));
        r
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl<B> Drop for Outgoing<B> {
    fn drop(&mut self) {
        self.set_held(false);
    }
}

/// After GOAWAY, the streams still open may finish (a drain), but a connection with none
/// open may not linger for long: hyper waits for the client's PING acknowledgement before it
/// closes, and a client that never sends one is cut off after `grace`.
async fn h2_expiry_after_goaway<F: Future>(
    conn: Pin<&mut F>,
    phase: &Phase,
    grace: Duration,
) -> Result<(), H2Expiry> {
    tokio::select! {
        _ = conn => Ok(()),
        why = h2_expiry(phase, None, grace) => Err(why),
    }
}

/// Serves one client connection until it closes, or until `shutdown` turns true, after
/// which in-flight requests finish and the connection closes (graceful shutdown).
pub(crate) async fn serve(
    shared: Arc<Shared>,
    stream: TcpStream,
    peer: SocketAddr,
    mut shutdown: watch::Receiver<bool>,
    slot: OwnedSemaphorePermit,
) {
    let _ = stream.set_nodelay(true);
    let config = shared.config;
    let started = Instant::now();
    // A `header_read` too large for the clock is as good as none: a year.
    let due = started
        .checked_add(config.header_read_timeout)
        .or_else(|| started.checked_add(Duration::from_secs(365 * 86_400)))
        .unwrap_or(started);
    let tls = shared.tls.config.load().server.clone();
    let https = tls.is_some();
    // The TLS handshake and the first bytes of the first request are due `header_read`
    // after accept, together.
    let mut stream = match tls {
        None => ClientStream::Plain(stream),
        Some(config) => {
            let mut stream = stream;
            let accept = async move {
                // A TLS record starts with its type (22, a handshake); an HTTP request with
                // a method in capitals. Told apart by a peek, a plain request gets a 400 it
                // can read instead of a TLS alert.
                let mut first = [0u8; 1];
                if matches!(stream.peek(&mut first).await, Ok(1)) && first[0].is_ascii_uppercase() {
                    use tokio::io::AsyncWriteExt;
                    let _ = stream.write_all(respond::PLAIN_HTTP_TO_TLS).await;
                    let _ = stream.shutdown().await;
                    // Closed with the request unread, the socket would reset, and the reset
                    // can overtake the answer: read what the client sent (within the
                    // deadline, and no more than a request head's worth) until it closes.
                    let mut sink = [0u8; 4096];
                    for _ in 0..16 {
                        if !matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {
                            break;
                        }
                    }
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "plain HTTP request to the TLS port: 400",
                    ));
                }
                tokio_rustls::TlsAcceptor::from(config).accept(stream).await
            };
            let done = tokio::select! {
                r = tokio::time::timeout_at(due, accept) => r,
                _ = shutdown.wait_for(|s| *s) => return,
            };
            match done {
                Ok(Ok(tls)) => ClientStream::Tls(Box::new(tls)),
                Ok(Err(e)) => {
                    tracing::debug!(target: "lb::conn", %peer, error = %e, "TLS handshake failed");
                    shared.observer.tls_handshake_failed();
                    return;
                }
                Err(_) => {
                    tracing::debug!(target: "lb::conn", %peer, "TLS handshake not finished within header_read");
                    shared.observer.tls_handshake_failed();
                    return;
                }
            }
        }
    };
    let sniffed = tokio::select! {
        r = tokio::time::timeout_at(due, sniff_h2(&mut stream)) => r,
        _ = shutdown.wait_for(|s| *s) => return,
    };
    let (sniffed_h2, prefix) = match sniffed {
        Ok(Ok(found)) => found,
        Ok(Err(_)) => return, // closed before a request: nothing to answer
        Err(_) => {
            stream.try_write(respond::REQUEST_TIMEOUT);
            return;
        }
    };
    // Over TLS, ALPN says which protocol it is; without ALPN, the first bytes do.
    let h2 = match &stream {
        ClientStream::Tls(t) => match t.get_ref().1.alpn_protocol() {
            Some(b"h2") => true,
            Some(_) => false,
            None => sniffed_h2,
        },
        ClientStream::Plain(_) => sniffed_h2,
    };
    let idle = config.idle_timeout;
    let phase = Arc::new(if h2 {
        Phase::http2(idle, slot)
    } else {
        Phase::http1(idle, slot)
    });
    let refusal = Arc::new(AtomicU16::new(0));
    let mut io = ClientIo {
        stream,
        control: h2.then(|| ControlFrames::new(started)),
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
        write_sleep: None,
        write_waiting: false,
    };
    if !h2 {
        // The first request's head is due `header_read` after accept, the TLS handshake and
        // sniffing included.
        io.deadline = Some(due);
    }
    let handle = {
        let shared = Arc::clone(&shared);
        let phase = Arc::clone(&phase);
        // Formatted once per connection, not per request.
        let xff = crate::headers::client_value(peer.ip());
        move |req| {
            let (shared, phase, xff) = (Arc::clone(&shared), Arc::clone(&phase), xff.clone());
            // Boxed: hyper moves the service's future into place (twice, with the wrapper
            // below), and a request's future is kilobytes of state; a pointer moves for free.
            Box::pin(crate::service::handle(shared, req, peer, xff, https, phase))
        }
    };
    let io = TokioIo::new(io);
    let first = Some(due);
    if h2 {
        // Boxed: an HTTP/2 connection's state is the larger, and every HTTP/1 connection's
        // task would be as large as it (a task is allocated as big as its future's biggest
        // state), idle or not.
        Box::pin(serve_h2(&config, io, handle, &phase, first, shutdown, peer)).await;
    } else {
        serve_h1(&shared, io, handle, &refusal, shutdown, peer).await;
    }
}

/// An HTTP/2 connection until it closes (see [`serve`]).
async fn serve_h2<F>(
    config: &crate::config::ProxyConfig,
    io: TokioIo<ClientIo>,
    handle: impl Fn(hyper::Request<hyper::body::Incoming>) -> F + Send + Sync + 'static,
    phase: &Arc<Phase>,
    first: Option<Instant>,
    mut shutdown: watch::Receiver<bool>,
    peer: SocketAddr,
) where
    F: Future<Output = hyper::Response<crate::body::ResponseBody>> + Send + 'static,
{
    let idle = config.idle_timeout;
    let mut builder = http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(config.max_header_bytes).unwrap_or(u32::MAX));
    let service = {
        let phase = Arc::clone(phase);
        hyper::service::service_fn(move |req| {
            let (response, phase) = (handle(req), Arc::clone(&phase));
            async move {
                Ok::<_, std::convert::Infallible>(
                    response.await.map(|body| Outgoing::new(body, phase)),
                )
            }
        })
    };
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => return,
        _ = shutdown.wait_for(|s| *s) => {}
        why = h2_expiry(phase, first, idle) => {
            if why == H2Expiry::Stalled {
                tracing::debug!(target: "lb::conn", %peer, "HTTP/2 client not taking its responses: closing");
                return;
            }
            tracing::debug!(target: "lb::conn", %peer, "HTTP/2 connection idle or without a request in time: closing");
        }
    }
    conn.as_mut().graceful_shutdown();
    // Short: the client has nothing open, or had `idle` to finish what it had.
    let grace = idle.min(config.header_read_timeout);
    if let Err(why) = h2_expiry_after_goaway(conn.as_mut(), phase, grace).await {
        tracing::debug!(target: "lb::conn", %peer, ?why, "HTTP/2 connection did not close after GOAWAY");
    }
}

/// An HTTP/1 connection until it closes (see [`serve`]).
async fn serve_h1<F>(
    shared: &Shared,
    io: TokioIo<ClientIo>,
    handle: impl Fn(hyper::Request<hyper::body::Incoming>) -> F + Send + Sync + 'static,
    refusal: &AtomicU16,
    mut shutdown: watch::Receiver<bool>,
    peer: SocketAddr,
) where
    F: Future<Output = hyper::Response<crate::body::ResponseBody>> + Send + 'static,
{
    let config = shared.config;
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .max_header_size(config.max_header_bytes)
        .keep_alive(true);
    let service = hyper::service::service_fn(move |req| {
        let response = handle(req);
        async move { Ok::<_, std::convert::Infallible>(response.await) }
    });
    let conn = builder.serve_connection(io, service).with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            report_refusal(shared, &r, refusal);
            if let Err(e) = r {
                tracing::debug!(target: "lb::conn", %peer, error = %e, "client connection error");
            }
            return;
        }
        _ = shutdown.wait_for(|s| *s) => conn.as_mut().graceful_shutdown(),
    }
    let r = conn.await;
    report_refusal(shared, &r, refusal);
}
