//! Bodies: the request body sent upstream (replayable when small) and the response body sent
//! to the client (which reports to lb-core when it ends).

use std::error::Error as StdError;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use lb_core::Completion;
use tokio::time::{Instant, Sleep};

use crate::phase::Phase;

/// Errors of the bodies the proxy relays: whatever the other side's body failed with.
pub(crate) type BoxError = Box<dyn StdError + Send + Sync>;

/// A fault of the client's own while it sent its request body: never the backend's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ClientFault {
    /// Bad chunk framing, fewer bytes than its `Content-Length`, a reset: 400.
    Malformed,
    /// No byte of the body for `timeouts.body_read`: 408.
    Stalled,
}

impl ClientFault {
    /// A short, stable name for the log.
    pub(crate) const fn as_str(self) -> &'static str {
        match self {
            Self::Malformed => "client_body_malformed",
            Self::Stalled => "client_body_stalled",
        }
    }

    /// What the client gets when no response has started.
    pub(crate) const fn status(self) -> http::StatusCode {
        match self {
            Self::Malformed => http::StatusCode::BAD_REQUEST,
            Self::Stalled => http::StatusCode::REQUEST_TIMEOUT,
        }
    }
}

/// How far the client's body got, shared by the attempt that streams it (which times the
/// backend) and the exchange (which must not blame the backend for the client's fault).
#[derive(Debug)]
pub(crate) struct BodyWatch(
    Mutex<Progress>,
    Mutex<Option<Arc<Wire>>>,
    /// The connection to set idle once the body ends, when its response ended first; and
    /// whether the body is done (ended, failed or dropped).
    Mutex<(Option<Arc<Phase>>, bool)>,
);

/// When an upstream connection's socket last took bytes from hyper.
///
/// # Why the socket, not the body
/// hyper takes the body's frames as fast as its write buffer (some 400 KiB, queued chunks
/// and all) has room, so "handed to hyper" runs far ahead of a backend that reads slowly:
/// the whole body may be in hyper's hands while the backend still has seconds of it to
/// read. What moves only as the backend reads is the socket taking bytes; that is what
/// `timeouts.request` is counted from (as NGINX counts `proxy_read_timeout` from its last
/// write). The kernel's send buffer still lies between the two, so the tail of a body a
/// backend reads slower than that buffer per `timeouts.request` can still time out.
#[derive(Debug)]
pub(crate) struct Wire {
    since: Instant,
    /// Nanoseconds after `since` of the last write, plus one (0: none yet).
    last: std::sync::atomic::AtomicU64,
}

impl Wire {
    pub(crate) fn new() -> Self {
        Self {
            since: Instant::now(),
            last: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// The socket took some bytes.
    pub(crate) fn wrote(&self) {
        let n = u64::try_from(self.since.elapsed().as_nanos()).unwrap_or(u64::MAX - 1);
        self.last
            .store(n.saturating_add(1), std::sync::atomic::Ordering::Relaxed);
    }

    fn last(&self) -> Option<Instant> {
        match self.last.load(std::sync::atomic::Ordering::Relaxed) {
            0 => None,
            n => self.since.checked_add(Duration::from_nanos(n - 1)),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Progress {
    fault: Option<ClientFault>,
    /// Waiting for the client's next bytes (the backend is not the one holding things up).
    waiting: bool,
    /// When the body last moved: a frame handed on, or the wait for the client ended.
    moved: Instant,
    /// When the last byte was handed on.
    ended: Option<Instant>,
}

impl BodyWatch {
    fn new() -> Self {
        Self(
            Mutex::new(Progress {
                fault: None,
                waiting: false,
                moved: Instant::now(),
                ended: None,
            }),
            Mutex::new(None),
            Mutex::new((None, false)),
        )
    }

    /// The response ended: returns true if and only if the body is still coming (a backend
    /// answered before reading it all), in which case the connection is set idle once it
    /// ends, not now. Until then the bytes arriving on the client connection are this body's,
    /// not the next request's head, and must not start `header_read`.
    pub(crate) fn idle_after(&self, phase: &Arc<Phase>) -> bool {
        let mut pending = self.2.lock().unwrap_or_else(PoisonError::into_inner);
        if pending.1 {
            return false;
        }
        pending.0 = Some(Arc::clone(phase));
        true
    }

    /// Returns true if and only if the body ended, failed or was dropped.
    pub(crate) fn is_done(&self) -> bool {
        self.2.lock().unwrap_or_else(PoisonError::into_inner).1
    }

    /// The body ended (or failed, or was dropped): a connection waiting for it goes idle.
    fn done(&self) {
        let pending = {
            let mut pending = self.2.lock().unwrap_or_else(PoisonError::into_inner);
            pending.1 = true;
            pending.0.take()
        };
        if let Some(phase) = pending {
            phase.idle();
        }
    }

    /// The body is being sent on the connection whose socket writes `wire` records.
    pub(crate) fn sent_on(&self, wire: &Arc<Wire>) {
        *self.1.lock().unwrap_or_else(PoisonError::into_inner) = Some(Arc::clone(wire));
    }

    fn wire(&self) -> Option<Instant> {
        self.1
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .and_then(|w| w.last())
    }

    fn update(&self, f: impl FnOnce(&mut Progress)) {
        f(&mut self.0.lock().unwrap_or_else(PoisonError::into_inner));
    }

    fn get(&self) -> Progress {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The client's fault, if its body failed.
    pub(crate) fn fault(&self) -> Option<ClientFault> {
        self.get().fault
    }

    /// When an attempt sending this body runs out of time, given `timeout` (`timeouts.request`):
    /// `timeout` after the body was fully sent (its last byte written to the socket); while
    /// it is still being sent, `timeout` after the backend last took some of it (the socket
    /// took bytes: a backend that stops reading times out), and never while the body waits
    /// for the client (`body_read` bounds that).
    pub(crate) fn deadline(&self, timeout: Duration) -> Option<Instant> {
        let p = self.get();
        if p.fault.is_some() {
            return None;
        }
        let since = match p.ended {
            Some(at) => at,
            None if p.waiting => Instant::now(),
            None => p.moved,
        };
        let since = self.wire().map_or(since, |w| w.max(since));
        since.checked_add(timeout)
    }
}

/// The client's body with `timeouts.body_read` between its frames; failures are recorded as
/// the client's in its [`BodyWatch`].
#[derive(Debug)]
pub(crate) struct ClientBody {
    body: Incoming,
    watch: Arc<BodyWatch>,
    timeout: Duration,
    /// Allocated once, reset only when a read has to wait after a frame.
    sleep: Pin<Box<Sleep>>,
    armed: bool,
}

impl ClientBody {
    fn new(body: Incoming, watch: Arc<BodyWatch>, timeout: Duration) -> Self {
        Self {
            body,
            watch,
            timeout,
            sleep: Box::pin(tokio::time::sleep(timeout)),
            armed: false,
        }
    }
}

impl Drop for ClientBody {
    fn drop(&mut self) {
        // Nobody reads the rest of it: hyper will not keep the connection for another
        // request, and whatever waits for the body's end must not wait forever.
        self.watch.done();
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.body).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.armed = false;
                this.watch.update(|p| {
                    p.waiting = false;
                    p.moved = Instant::now();
                });
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.watch
                    .update(|p| p.fault = Some(ClientFault::Malformed));
                this.watch.done();
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => {
                this.watch.update(|p| {
                    p.waiting = false;
                    p.ended = Some(Instant::now());
                });
                this.watch.done();
                Poll::Ready(None)
            }
            Poll::Pending => {
                if !this.armed {
                    this.armed = true;
                    // Capped: a timeout "forever" must not overflow the clock.
                    let wait = this.timeout.min(Duration::from_secs(365 * 24 * 3600));
                    this.sleep.as_mut().reset(Instant::now() + wait);
                    this.watch.update(|p| p.waiting = true);
                }
                if this.sleep.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                this.watch.update(|p| p.fault = Some(ClientFault::Stalled));
                this.watch.done();
                Poll::Ready(Some(
                    Err("request body stalled (timeouts.body_read)".into()),
                ))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The client's request body, as read before the first attempt.
///
/// # Why bodies are buffered only up to `replay_buffer`
/// A retry must send the body again, so it must still be there. Bodies with a
/// `Content-Length` up to the replay buffer (64 KiB by default) and requests without a body
/// are read in full first and can be sent any number of times (linkerd's `ReplayBody` with
/// its cap). Anything else streams: the first attempt that polls it takes it, and from then
/// on it cannot be sent again, so lb-core is told it is not replayable. An attempt that never
/// polled it (its connection failed) leaves it in place for the next attempt.
#[derive(Debug)]
pub(crate) enum BodySource {
    Empty,
    Full(Bytes),
    Stream(Arc<Mutex<Option<ClientBody>>>, SizeHint, Arc<BodyWatch>),
}

impl BodySource {
    /// Reads the body when it is small enough to keep; otherwise keeps it as a stream.
    /// Either way no pause between its bytes may exceed `body_read`.
    pub(crate) async fn read(
        body: Incoming,
        content_length: Option<u64>,
        cap: usize,
        body_read: Duration,
    ) -> Result<Self, ClientFault> {
        if body.is_end_stream() {
            return Ok(Self::Empty);
        }
        let watch = Arc::new(BodyWatch::new());
        let body = ClientBody::new(body, Arc::clone(&watch), body_read);
        match content_length {
            Some(n) if n <= cap as u64 => {
                // Boxed, like every rare step of a request (see `Upstream::send`).
                let Ok(collected) = Box::pin(body.collect()).await else {
                    return Err(watch.fault().unwrap_or(ClientFault::Malformed));
                };
                let bytes = collected.to_bytes();
                Ok(if bytes.is_empty() {
                    Self::Empty
                } else {
                    Self::Full(bytes)
                })
            }
            _ => {
                let hint = body.size_hint();
                Ok(Self::Stream(Arc::new(Mutex::new(Some(body))), hint, watch))
            }
        }
    }

    /// Returns true if and only if every attempt can send the whole body.
    pub(crate) const fn replayable(&self) -> bool {
        !matches!(self, Self::Stream(..))
    }

    /// The progress of a streamed body (buffered ones are the client's no more).
    pub(crate) fn watch(&self) -> Option<&Arc<BodyWatch>> {
        match self {
            Self::Stream(_, _, w) => Some(w),
            _ => None,
        }
    }

    /// The client's fault, if its streamed body failed.
    pub(crate) fn fault(&self) -> Option<ClientFault> {
        self.watch().and_then(|w| w.fault())
    }

    /// The body for one attempt.
    pub(crate) fn attempt(&self) -> RequestBody {
        match self {
            Self::Empty => RequestBody::Full(None),
            Self::Full(b) => RequestBody::Full(Some(b.clone())),
            Self::Stream(slot, hint, _) => RequestBody::Stream {
                slot: Arc::clone(slot),
                body: None,
                hint: *hint,
            },
        }
    }
}

/// A buffered body's only frame (then the end).
fn once(b: &mut Option<Bytes>) -> Option<Result<Frame<Bytes>, BoxError>> {
    b.take().map(|b| Ok(Frame::data(b)))
}

/// A buffered body's size.
fn exact(b: &Option<Bytes>) -> SizeHint {
    SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64))
}

/// The body of one upstream attempt.
#[derive(Debug)]
pub(crate) enum RequestBody {
    /// Buffered (or empty): sent whole.
    Full(Option<Bytes>),
    /// Streamed from the client, taken from the shared slot on first poll.
    Stream {
        /// Where the client's body waits until an attempt takes it.
        slot: Arc<Mutex<Option<ClientBody>>>,
        /// The body, once this attempt took it.
        body: Option<ClientBody>,
        /// Its size as announced.
        hint: SizeHint,
    },
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Self::Full(b) => Poll::Ready(once(b)),
            Self::Stream { slot, body, .. } => {
                if body.is_none() {
                    *body = slot.lock().unwrap_or_else(PoisonError::into_inner).take();
                }
                match body {
                    Some(b) => Pin::new(b).poll_frame(cx),
                    None => Poll::Ready(Some(Err(
                        "request body already sent by an earlier attempt".into(),
                    ))),
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Full(b) => b.is_none(),
            Self::Stream { body: Some(b), .. } => b.is_end_stream(),
            Self::Stream { .. } => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Full(b) => exact(b),
            Self::Stream { hint, .. } => *hint,
        }
    }
}

/// What happens when a response body ends: the exchange reports how to lb-core and the log.
pub(crate) trait BodyEnd: Send + std::fmt::Debug {
    /// The body ended (`Done`), broke off (`BackendFailed`) or was dropped early (`ClientGone`).
    fn end(self: Box<Self>, how: Completion);
}

/// The body of a response to the client: the backend's, streamed, or one the proxy made.
/// When it ends (or is dropped), its [`BodyEnd`] runs once.
#[derive(Debug)]
pub(crate) struct ResponseBody {
    inner: Inner,
    /// Boxed: the exchange carries the request's whole routing trace, and this body is moved
    /// several times on its way into hyper; one allocation is cheaper than those copies.
    ending: Option<Box<dyn BodyEnd>>,
}

#[derive(Debug)]
enum Inner {
    Full(Option<Bytes>),
    Upstream(Incoming),
}

impl ResponseBody {
    pub(crate) const fn full(bytes: Bytes) -> Self {
        Self {
            inner: Inner::Full(Some(bytes)),
            ending: None,
        }
    }

    pub(crate) const fn empty() -> Self {
        Self {
            inner: Inner::Full(None),
            ending: None,
        }
    }

    pub(crate) const fn upstream(body: Incoming) -> Self {
        Self {
            inner: Inner::Upstream(body),
            ending: None,
        }
    }

    pub(crate) fn on_end(mut self, ending: Box<dyn BodyEnd>) -> Self {
        self.ending = Some(ending);
        self
    }

    fn end(&mut self, how: Completion) {
        if let Some(ending) = self.ending.take() {
            ending.end(how);
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let polled = match &mut this.inner {
            Inner::Full(b) => Poll::Ready(once(b)),
            Inner::Upstream(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
        };
        match &polled {
            Poll::Ready(None) => this.end(Completion::Done),
            Poll::Ready(Some(Err(_))) => this.end(Completion::BackendFailed),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Full(b) => b.is_none(),
            Inner::Upstream(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Full(b) => exact(b),
            Inner::Upstream(b) => b.size_hint(),
        }
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        // hyper drops a body it never needed to poll (HEAD, 204, 304, Content-Length: 0):
        // that is a complete response. Anything else dropped early is the client leaving.
        let how = if self.is_end_stream() {
            Completion::Done
        } else {
            Completion::ClientGone
        };
        self.end(how);
    }
}
