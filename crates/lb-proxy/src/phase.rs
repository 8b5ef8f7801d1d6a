//! What a client connection is doing, shared by its socket, its service and its response
//! bodies, so that the connection's timers (`conn`) know which deadline applies.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, OwnedSemaphorePermit};
use tokio::time::Instant;

use crate::interim::Interim;

/// The low byte is the state, the rest a generation counter that changes with every
/// transition, so the socket notices a new `Idle` even if it missed the `Busy`. An HTTP/2
/// connection counts its open streams instead.
#[derive(Debug)]
pub(crate) struct Phase {
    word: AtomicU32,
    streams: Option<Streams>,
    /// A backend's 1xx responses waiting to be written to an HTTP/1.1 client.
    pub(crate) interim: Interim,
    /// `timeouts.idle`, which also bounds a tunnel with no bytes either way.
    pub(crate) idle: Duration,
    /// The connection's place under `limits.max_connections`: held by everything that
    /// shares this phase, so a WebSocket tunnel keeps it after hyper lets go of the socket.
    _slot: OwnedSemaphorePermit,
}

impl AsRef<Interim> for Phase {
    fn as_ref(&self) -> &Interim {
        &self.interim
    }
}

/// An HTTP/2 connection's open requests.
#[derive(Debug)]
struct Streams {
    open: AtomicU32,
    served: AtomicBool,
    changed: Notify,
    /// When the socket last moved a byte either way, in nanoseconds after `since`: a stream
    /// open while nothing moves for `idle` is a client that grants no flow-control window.
    progress: AtomicU64,
    since: Instant,
    /// Response bodies that hyper has data of but has not asked for more: waiting for the
    /// client's flow-control window, not for a backend.
    held: AtomicU32,
}

impl Default for Streams {
    fn default() -> Self {
        Self {
            open: AtomicU32::new(0),
            served: AtomicBool::new(false),
            changed: Notify::new(),
            progress: AtomicU64::new(0),
            since: Instant::now(),
            held: AtomicU32::new(0),
        }
    }
}

/// Waiting for (the rest of) a request head.
pub(crate) const HEAD: u32 = 0;
/// A request is being served.
pub(crate) const BUSY: u32 = 1;
/// Between keep-alive requests.
pub(crate) const IDLE: u32 = 2;
/// HTTP/2 or an upgraded tunnel: no deadline on the socket.
pub(crate) const FREE: u32 = 3;

impl Phase {
    /// An HTTP/1 connection, waiting for its first request head.
    pub(crate) fn http1(idle: Duration, slot: OwnedSemaphorePermit) -> Self {
        Self {
            word: AtomicU32::new(HEAD),
            streams: None,
            interim: Interim::default(),
            idle,
            _slot: slot,
        }
    }

    /// An HTTP/2 connection: no socket deadline, streams counted.
    pub(crate) fn http2(idle: Duration, slot: OwnedSemaphorePermit) -> Self {
        Self {
            word: AtomicU32::new(FREE),
            streams: Some(Streams::default()),
            interim: Interim::default(),
            idle,
            _slot: slot,
        }
    }

    /// HTTP/2: the socket just moved bytes.
    pub(crate) fn progressed(&self) {
        if let Some(s) = &self.streams {
            let nanos = u64::try_from(s.since.elapsed().as_nanos()).unwrap_or(u64::MAX);
            s.progress.store(nanos, Ordering::Relaxed);
        }
    }

    /// HTTP/2: a response body now waits for the client (`true`) or no longer (`false`);
    /// called only on changes.
    pub(crate) fn hold(&self, held: bool) {
        if let Some(s) = &self.streams {
            if held {
                if s.held.fetch_add(1, Ordering::AcqRel) == 0 {
                    // The expiry may be parked on the open streams alone.
                    s.changed.notify_one();
                }
            } else {
                let _ = s
                    .held
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
            }
        }
    }

    /// HTTP/2: whether some response body waits for the client.
    pub(crate) fn held(&self) -> bool {
        self.streams
            .as_ref()
            .is_some_and(|s| s.held.load(Ordering::Acquire) > 0)
    }

    /// HTTP/2: when the socket last moved bytes (or the connection began).
    pub(crate) fn last_progress(&self) -> Instant {
        self.streams.as_ref().map_or_else(Instant::now, |s| {
            s.since
                .checked_add(Duration::from_nanos(s.progress.load(Ordering::Relaxed)))
                .unwrap_or_else(Instant::now)
        })
    }

    pub(crate) fn set(&self, state: u32) {
        let _ = self
            .word
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                if v & 0xff == FREE {
                    None // a tunnel or h2 connection stays free
                } else {
                    Some(((v >> 8).wrapping_add(1) << 8) | state)
                }
            });
    }

    /// A request head arrived: the service is working on it.
    pub(crate) fn busy(&self) {
        match &self.streams {
            Some(s) => {
                s.open.fetch_add(1, Ordering::AcqRel);
                s.served.store(true, Ordering::Release);
                s.changed.notify_one();
            }
            None => self.set(BUSY),
        }
    }

    /// The response is complete: the connection waits for the next request. Called exactly
    /// once per `busy`.
    pub(crate) fn idle(&self) {
        match &self.streams {
            Some(s) => {
                let _ = s
                    .open
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
                s.changed.notify_one();
            }
            None => self.set(IDLE),
        }
    }

    /// No more deadlines: the connection became a tunnel.
    pub(crate) fn free(&self) {
        self.word.store(FREE, Ordering::Release);
    }

    /// The phase word (state and generation).
    pub(crate) fn load(&self) -> u32 {
        self.word.load(Ordering::Acquire)
    }

    /// HTTP/2: the number of requests open, and whether there ever was one.
    pub(crate) fn streams(&self) -> (u32, bool) {
        self.streams.as_ref().map_or((0, false), |s| {
            (
                s.open.load(Ordering::Acquire),
                s.served.load(Ordering::Acquire),
            )
        })
    }

    /// HTTP/2: resolves after the next change of the open streams (or at once if one
    /// happened since the last call).
    pub(crate) async fn changed(&self) {
        match &self.streams {
            Some(s) => s.changed.notified().await,
            None => std::future::pending().await,
        }
    }
}
