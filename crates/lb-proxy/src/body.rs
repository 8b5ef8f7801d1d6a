//! Bodies: the request body sent upstream (replayable when small) and the response body sent
//! to the client (which reports to lb-core when it ends).

use std::error::Error as StdError;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use lb_core::Completion;

use crate::service::Exchange;
use crate::upstream::Lease;

/// Errors of the bodies the proxy relays: whatever the other side's body failed with.
pub type BoxError = Box<dyn StdError + Send + Sync>;

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
    Stream(Arc<Mutex<Option<Incoming>>>, SizeHint),
}

impl BodySource {
    /// Reads the body when it is small enough to keep; otherwise keeps it as a stream.
    pub(crate) async fn read(
        body: Incoming,
        content_length: Option<u64>,
        cap: usize,
    ) -> Result<Self, hyper::Error> {
        if body.is_end_stream() {
            return Ok(Self::Empty);
        }
        match content_length {
            Some(n) if n <= cap as u64 => {
                let bytes = body.collect().await?.to_bytes();
                Ok(if bytes.is_empty() {
                    Self::Empty
                } else {
                    Self::Full(bytes)
                })
            }
            _ => {
                let hint = body.size_hint();
                Ok(Self::Stream(Arc::new(Mutex::new(Some(body))), hint))
            }
        }
    }

    /// Returns true if and only if every attempt can send the whole body.
    pub(crate) const fn replayable(&self) -> bool {
        !matches!(self, Self::Stream(..))
    }

    /// The body for one attempt.
    pub(crate) fn attempt(&self) -> RequestBody {
        match self {
            Self::Empty => RequestBody::Full(None),
            Self::Full(b) => RequestBody::Full(Some(b.clone())),
            Self::Stream(slot, hint) => RequestBody::Stream {
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
pub enum RequestBody {
    /// Buffered (or empty): sent whole.
    Full(Option<Bytes>),
    /// Streamed from the client, taken from the shared slot on first poll.
    Stream {
        /// Where the client's body waits until an attempt takes it.
        slot: Arc<Mutex<Option<Incoming>>>,
        /// The body, once this attempt took it.
        body: Option<Incoming>,
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
                    *body = slot
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .take();
                }
                match body {
                    Some(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
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

/// The body of a response to the client: the backend's, streamed, or one the proxy made.
/// When it ends (or is dropped), it tells lb-core how the request finished.
#[derive(Debug)]
pub struct ResponseBody {
    inner: Inner,
    /// Boxed: the exchange carries the request's whole routing trace, and this body is moved
    /// several times on its way into hyper; one allocation is cheaper than those copies.
    exchange: Option<Box<Exchange>>,
    /// The upstream connection, back to the pool once the whole response is through.
    lease: Option<Lease>,
}

#[derive(Debug)]
enum Inner {
    Full(Option<Bytes>),
    Upstream(Incoming),
}

impl ResponseBody {
    pub(crate) fn full(bytes: Bytes) -> Self {
        Self {
            inner: Inner::Full(Some(bytes)),
            exchange: None,
            lease: None,
        }
    }

    pub(crate) fn empty() -> Self {
        Self {
            inner: Inner::Full(None),
            exchange: None,
            lease: None,
        }
    }

    pub(crate) fn upstream(body: Incoming, exchange: Exchange, lease: Lease) -> Self {
        Self {
            inner: Inner::Upstream(body),
            exchange: Some(Box::new(exchange)),
            lease: Some(lease),
        }
    }

    pub(crate) fn with_exchange(mut self, exchange: Exchange) -> Self {
        self.exchange = Some(Box::new(exchange));
        self
    }

    fn end(&mut self, how: Completion) {
        if let Some(lease) = self.lease.take() {
            if how == Completion::Done {
                lease.release();
            }
        }
        if let Some(ex) = self.exchange.take() {
            ex.finish(how);
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
