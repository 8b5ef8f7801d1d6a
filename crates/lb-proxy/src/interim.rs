//! 1xx informational responses (103 Early Hints and the like) relayed from a backend to an
//! HTTP/1.1 client, ahead of the final response.
//!
//! # Why around hyper
//! hyper's client hands 1xx responses to a callback (`hyper::ext::on_informational`), but
//! its server cannot send them: a service returns one response, and a 1xx one is replaced
//! by a 500 (`hyper-1.12.0/src/proto/h1/role.rs`, `Server::encode`: "response with 1xx
//! status code not supported"). So the callback encodes the 1xx head here, and the client
//! socket (`conn::ClientIo`) writes it before any byte hyper writes, waking the connection
//! if it sits waiting for the backend. hyper's HTTP/2 server has no way either: its
//! `H2Stream` keeps h2's `SendResponse` (which has `send_informational`) private and only
//! calls `send_response` with the service's response (`hyper-1.12.0/src/proto/h2/server.rs`,
//! `H2Stream::reply`), so HTTP/2 clients get the final response only.
//!
//! Only HTTP/1.1 clients get them (RFC 9110 §15.2: never to HTTP/1.0), and never `100
//! Continue`, which hyper's server already sends itself when the body is read, nor `101`,
//! which hyper's client treats as the final response.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use http::{HeaderMap, Request, StatusCode};
use tokio::io::AsyncWrite;

/// The 1xx heads waiting for one HTTP/1.1 client connection.
///
/// # Invariants
/// A 1xx is written only before the final response: an attempt arms it
/// ([`Interim::watch`]), the connection's first write after that disarms it (that write is
/// the final response, or the end of the previous one, after which no 1xx may come), and a
/// 1xx from an attempt that was not the last one armed is ignored. Bytes are written only
/// when everything hyper wrote before has been flushed, so they never land inside another
/// message; when that cannot be, they are dropped (1xx are advisory).
#[derive(Debug, Default)]
pub(crate) struct Interim {
    /// Armed or holding bytes: the one check the socket makes on every read and write.
    active: AtomicBool,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    bytes: Vec<u8>,
    armed: bool,
    /// Which attempt may add to `bytes`.
    attempt: u64,
    /// The connection's task (HTTP/1 services run on it), woken when a 1xx arrives.
    waker: Option<Waker>,
}

impl Interim {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Has the 1xx responses to `req`, the request of a new upstream attempt, written to
    /// the client of `owner`'s connection, whose task `waker` wakes.
    pub(crate) fn watch<B, T>(owner: &Arc<T>, waker: &Waker, req: &mut Request<B>)
    where
        T: AsRef<Self> + Send + Sync + 'static,
    {
        let this: &Self = (**owner).as_ref();
        let attempt = {
            let mut inner = this.lock();
            inner.attempt = inner.attempt.wrapping_add(1);
            inner.armed = true;
            inner.bytes.clear();
            if !inner.waker.as_ref().is_some_and(|w| w.will_wake(waker)) {
                inner.waker = Some(waker.clone());
            }
            inner.attempt
        };
        this.active.store(true, Ordering::Release);
        let owner = Arc::clone(owner);
        hyper::ext::on_informational(req, move |resp| {
            (*owner)
                .as_ref()
                .push(attempt, resp.status(), resp.headers());
        });
    }

    fn push(&self, attempt: u64, status: StatusCode, headers: &HeaderMap) {
        if status == StatusCode::CONTINUE || status == StatusCode::SWITCHING_PROTOCOLS {
            return;
        }
        let mut headers = headers.clone();
        crate::headers::strip_hop_by_hop(&mut headers, false);
        let mut inner = self.lock();
        if !inner.armed || inner.attempt != attempt {
            return;
        }
        let out = &mut inner.bytes;
        out.extend_from_slice(b"HTTP/1.1 ");
        out.extend_from_slice(status.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
        out.extend_from_slice(b"\r\n");
        for (name, value) in &headers {
            out.extend_from_slice(name.as_str().as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
        if let Some(w) = &inner.waker {
            w.wake_by_ref();
        }
    }

    /// Returns true if and only if the socket has something to do for 1xx responses.
    pub(crate) fn is_active(&self) -> bool {
        self.active.load(Ordering::Acquire)
    }

    /// While the final response is awaited (and hyper's own bytes are all out): writes what
    /// arrived so far to `io`. Never waits.
    pub(crate) fn write_early<W: AsyncWrite + Unpin>(&self, cx: &mut Context<'_>, io: &mut W) {
        let mut inner = self.lock();
        let _ = write_out(&mut inner.bytes, cx, io);
    }

    /// Before hyper's first write after the attempt: disarms, and writes what is left to
    /// `io` first (or drops it if `unflushed`). Ready once nothing is left.
    pub(crate) fn poll_before_write<W: AsyncWrite + Unpin>(
        &self,
        cx: &mut Context<'_>,
        io: &mut W,
        unflushed: bool,
    ) -> Poll<io::Result<()>> {
        let mut inner = self.lock();
        inner.armed = false;
        if unflushed {
            inner.bytes.clear();
        }
        let r = write_out(&mut inner.bytes, cx, io);
        if inner.bytes.is_empty() {
            inner.waker = None;
            self.active.store(false, Ordering::Release);
        }
        r
    }
}

/// The waker of the task this is awaited on: for an HTTP/1 service, its connection's.
pub(crate) async fn task_waker() -> Waker {
    std::future::poll_fn(|cx| Poll::Ready(cx.waker().clone())).await
}

fn write_out<W: AsyncWrite + Unpin>(
    bytes: &mut Vec<u8>,
    cx: &mut Context<'_>,
    io: &mut W,
) -> Poll<io::Result<()>> {
    while !bytes.is_empty() {
        match Pin::new(&mut *io).poll_write(cx, bytes) {
            Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
            Poll::Ready(Ok(n)) => {
                bytes.drain(..n);
            }
            Poll::Ready(Err(e)) => {
                bytes.clear();
                return Poll::Ready(Err(e));
            }
            Poll::Pending => return Poll::Pending,
        }
    }
    Poll::Ready(Ok(()))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Owner(Interim);

    impl AsRef<Interim> for Owner {
        fn as_ref(&self) -> &Interim {
            &self.0
        }
    }

    #[test]
    fn heads_are_encoded_in_order_only_for_the_armed_attempt_and_100_is_skipped() {
        let owner = Arc::new(Owner(Interim::default()));
        let i = &owner.0;
        let mut req = Request::new(());
        Interim::watch(&owner, Waker::noop(), &mut req);
        let mut h = HeaderMap::new();
        h.append("link", "</a.css>; rel=preload".parse().unwrap());
        h.append("link", "</b.js>; rel=preload".parse().unwrap());
        h.append("connection", "x-hop".parse().unwrap());
        h.append("x-hop", "1".parse().unwrap());
        i.push(1, StatusCode::CONTINUE, &HeaderMap::new());
        i.push(1, StatusCode::from_u16(103).unwrap(), &h);
        i.push(0, StatusCode::from_u16(103).unwrap(), &h);
        i.push(1, StatusCode::PROCESSING, &HeaderMap::new());
        assert!(i.is_active());
        let mut out = Vec::new();
        let mut cx = Context::from_waker(Waker::noop());
        i.write_early(&mut cx, &mut out);
        i.push(1, StatusCode::PROCESSING, &HeaderMap::new());
        assert!(i.poll_before_write(&mut cx, &mut out, false).is_ready());
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 103 Early Hints\r\nlink: </a.css>; rel=preload\r\nlink: </b.js>; rel=preload\r\n\r\n\
             HTTP/1.1 102 Processing\r\n\r\nHTTP/1.1 102 Processing\r\n\r\n"
        );
        assert!(!i.is_active());
        i.push(1, StatusCode::PROCESSING, &HeaderMap::new());
        assert!(!i.is_active(), "disarmed by the final response");

        Interim::watch(&owner, Waker::noop(), &mut req);
        i.push(2, StatusCode::PROCESSING, &HeaderMap::new());
        let mut out = Vec::new();
        assert!(i.poll_before_write(&mut cx, &mut out, true).is_ready());
        assert!(out.is_empty(), "never inside hyper's unflushed bytes");
        assert!(!i.is_active());
    }
}
