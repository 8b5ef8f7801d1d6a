//! One request's attempts: what the core decided, and why.
//!
//! Whether to retry is decided by a pure function (`decide.rs`), which
//! [`Balancer::handle_outcome`](crate::Balancer::handle_outcome) feeds and carries out; this
//! module holds what flows in and out of it: the per-request [`RequestState`], the
//! [`Action`] to carry out, and the routing trace ([`Attempt`], [`Decision`]) that explains
//! each step without recomputing anything.
//!
//! # The rules (SPEC.md, "Retries are safe")
//! * A request that never left ([`Outcome::was_sent`] false) may always be retried.
//! * One that may have been acted on is retried only if it is idempotent *and* its body can
//!   be replayed; a POST that was sent is never replayed.
//! * Never on a backend this request already tried, never past `attempts`, never past the
//!   retry budget, never past the request's deadline.
//! * A response head, 5xx included, is final: it is relayed as it is.
//! * Giving up maps the last outcome: a timeout is 504, anything else 502. No candidate at
//!   all is 503.

pub(crate) mod backoff;
pub(crate) mod budget;
pub(crate) mod decide;
mod resend;

use std::fmt;
use std::sync::Arc;
use std::time::Instant;

use crate::backend::{BackendId, BackendState};
use crate::config::MAX_ATTEMPTS;
use crate::outcome::{Outcome, RequestInfo};
use crate::rng::Rng;

/// What the caller does next for one request.
///
/// Every `Forward` satisfies `now ≤ not_before < try_deadline`, and `try_deadline` never
/// passes the request's own deadline.
///
/// Unlike the other enums of this crate, `Action` is exhaustive on purpose: a new kind of
/// action would need every caller to do something new, so adding one is a breaking change
/// that the compiler should point out, not a wildcard arm that silently ignores it.
#[must_use]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Send (or send again) to `backend`, no earlier than `not_before`; report
    /// [`Outcome::TimedOut`] if no response head has arrived by `try_deadline`.
    Forward {
        /// Where to send it.
        backend: BackendId,
        /// Do not send before this (the retry backoff).
        not_before: Instant,
        /// Give up waiting for a response head at this time.
        try_deadline: Instant,
    },
    /// The response just reported is final: relay it to the client unchanged (5xx included),
    /// then call [`Balancer::finish`](crate::Balancer::finish).
    Relay,
    /// Stop and answer the client with the failure's status.
    Fail(Failure),
}

/// Why the core answers the client itself.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Failure {
    /// No eligible backend (or none left untried): 503.
    NoBackend,
    /// The last attempt failed to connect or broke before a response: 502.
    BadGateway,
    /// The last attempt got no response head in time: 504.
    GatewayTimeout,
}

impl Failure {
    /// The HTTP status the client gets.
    #[must_use]
    pub const fn status(self) -> u16 {
        match self {
            Self::NoBackend => 503,
            Self::BadGateway => 502,
            Self::GatewayTimeout => 504,
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::NoBackend => "no backend",
            Self::BadGateway => "bad gateway",
            Self::GatewayTimeout => "gateway timeout",
        })
    }
}

/// What the core decided after an attempt's outcome.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Decision {
    /// The response was relayed.
    Relay,
    /// Retried on another backend, and why that was safe.
    Retry(RetryReason),
    /// Not retried, and why.
    Stop(StopReason),
}

/// Why a retry was allowed.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RetryReason {
    /// The request never reached the backend.
    NotSent,
    /// It may have, but it is idempotent and its body was replayable.
    Idempotent,
}

/// Why a retry was denied.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StopReason {
    /// Sent, and not idempotent (a POST is never replayed).
    NotIdempotent,
    /// Sent, idempotent, but its body is gone (larger than the replay buffer).
    NotReplayable,
    /// `attempts` reached.
    AttemptsExhausted,
    /// The retry budget has no token left.
    BudgetExhausted,
    /// Every eligible backend was already tried.
    NoUntriedBackend,
    /// The backoff would end past the request's deadline.
    Deadline,
}

impl Decision {
    /// A short, stable name for logs and metric labels (`retry_not_sent`, `budget_exhausted`, ...).
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Relay => "relay",
            Self::Retry(RetryReason::NotSent) => "retry_not_sent",
            Self::Retry(RetryReason::Idempotent) => "retry_idempotent",
            Self::Stop(StopReason::NotIdempotent) => "not_idempotent",
            Self::Stop(StopReason::NotReplayable) => "not_replayable",
            Self::Stop(StopReason::AttemptsExhausted) => "attempts_exhausted",
            Self::Stop(StopReason::BudgetExhausted) => "budget_exhausted",
            Self::Stop(StopReason::NoUntriedBackend) => "no_untried_backend",
            Self::Stop(StopReason::Deadline) => "deadline",
        }
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How the backend of an attempt was chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PickTrace {
    /// Candidates the strategy chose among (eligible, or the panic set).
    pub(crate) candidates: u32,
    /// Of those, how many were excluded as already tried.
    pub(crate) excluded: u32,
    /// Whether panic mode was on (too few eligible: ejections ignored).
    pub(crate) panic: bool,
}

/// One attempt in a request's routing trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attempt {
    /// The backend it went to.
    pub(crate) backend: BackendId,
    /// How it was chosen.
    pub(crate) pick: PickTrace,
    /// How it ended (`None` while in flight).
    pub(crate) outcome: Option<Outcome>,
    /// What the core decided after it (`None` while in flight).
    pub(crate) decision: Option<Decision>,
}

// === impl PickTrace ===

impl PickTrace {
    /// Candidates the strategy chose among (eligible, or the panic set).
    #[must_use]
    pub const fn candidates(&self) -> u32 {
        self.candidates
    }

    /// Of those, how many were excluded as already tried.
    #[must_use]
    pub const fn excluded(&self) -> u32 {
        self.excluded
    }

    /// Returns true if and only if panic mode was on (too few eligible: ejections ignored).
    #[must_use]
    pub const fn panic(&self) -> bool {
        self.panic
    }
}

// === impl Attempt ===

impl Attempt {
    /// The backend it went to.
    #[must_use]
    pub const fn backend(&self) -> BackendId {
        self.backend
    }

    /// How the backend was chosen.
    #[must_use]
    pub const fn pick(&self) -> PickTrace {
        self.pick
    }

    /// How it ended (`None` while in flight).
    #[must_use]
    pub const fn outcome(&self) -> Option<Outcome> {
        self.outcome
    }

    /// What the core decided after it (`None` while in flight).
    #[must_use]
    pub const fn decision(&self) -> Option<Decision> {
        self.decision
    }

    const EMPTY: Self = Self {
        backend: BackendId(u32::MAX),
        pick: PickTrace {
            candidates: 0,
            excluded: 0,
            panic: false,
        },
        outcome: None,
        decision: None,
    };
}

/// The attempt in flight: what `finish`, `abandon` and the next outcome need. Holding the
/// backend's counters (not only its id) is what lets a dropped [`RequestState`] give its
/// in-flight slot back without the balancer.
#[derive(Debug)]
pub(crate) struct Open {
    pub(crate) state: Arc<BackendState>,
    pub(crate) generation: u64,
    pub(crate) index: usize,
    pub(crate) sent_ns: u64,
}

/// One request's state, owned by the task serving it. Allocation-free: the routing trace
/// lives inline.
///
/// Obtained from [`Balancer::start`](crate::Balancer::start); pass it back to every
/// `handle_outcome`, then to exactly one of `finish` (after `Relay`) or `abandon` (the client
/// left). A `Fail` ends it with nothing in flight.
///
/// It is also a drop guard: dropped with an attempt in flight (a cancelled future, a panic,
/// a forgotten `finish`), it gives the attempt's in-flight slot back, so a backend's
/// `active_requests` always returns to zero. Dropping counts nothing against the backend
/// (as `abandon`); `finish` remains the way to report how a relayed response ended.
#[derive(Debug)]
pub struct RequestState {
    pub(crate) info: RequestInfo,
    pub(crate) rng: Rng,
    pub(crate) attempts: [Attempt; MAX_ATTEMPTS as usize],
    pub(crate) tried: [BackendId; MAX_ATTEMPTS as usize],
    pub(crate) len: usize,
    pub(crate) open: Option<Open>,
    pub(crate) failure: Option<Failure>,
    pub(crate) last: Option<Decision>,
    pub(crate) finished: bool,
    /// The attempt whose pooled connection died and was re-sent (at most one per request).
    pub(crate) resent: Option<u8>,
}

// === impl RequestState ===

impl RequestState {
    pub(crate) fn new(info: RequestInfo, rng: Rng) -> Self {
        Self {
            info,
            rng,
            attempts: [Attempt::EMPTY; MAX_ATTEMPTS as usize],
            tried: [BackendId(u32::MAX); MAX_ATTEMPTS as usize],
            len: 0,
            open: None,
            failure: None,
            last: None,
            finished: false,
            resent: None,
        }
    }

    /// The request's traits as given to `start`.
    #[must_use]
    pub const fn info(&self) -> &RequestInfo {
        &self.info
    }

    /// The routing trace: every attempt so far, in order.
    #[must_use]
    pub fn attempts(&self) -> &[Attempt] {
        &self.attempts[..self.len]
    }

    /// Number of attempts made.
    #[must_use]
    pub const fn attempt_count(&self) -> usize {
        self.len
    }

    /// The failure the request ended with, if the core answered it itself.
    #[must_use]
    pub const fn failure(&self) -> Option<Failure> {
        self.failure
    }

    /// The attempt (an index into [`attempts`](Self::attempts)) that was re-sent once on a
    /// fresh connection after its pooled one died, if one was
    /// (see [`Balancer::handle_resend`](crate::Balancer::handle_resend)).
    #[must_use]
    pub fn resent(&self) -> Option<usize> {
        self.resent.map(usize::from)
    }

    /// The decision `handle_outcome` made last (the one behind the [`Action`] it returned),
    /// or `None` before any outcome was reported.
    #[must_use]
    pub const fn last_decision(&self) -> Option<Decision> {
        self.last
    }

    /// The backend of the attempt in flight, if any.
    #[must_use]
    pub fn in_flight(&self) -> Option<BackendId> {
        self.open.as_ref().map(|o| o.state.id)
    }

    pub(crate) fn tried(&self) -> &[BackendId] {
        &self.tried[..self.len]
    }

    pub(crate) fn push(&mut self, backend: BackendId, pick: PickTrace) {
        if self.len < self.attempts.len() {
            self.attempts[self.len] = Attempt {
                backend,
                pick,
                outcome: None,
                decision: None,
            };
            self.tried[self.len] = backend;
            self.len += 1;
        }
    }

    pub(crate) fn record(&mut self, outcome: Outcome, decision: Decision) {
        self.last = Some(decision);
        if let Some(a) = self.len.checked_sub(1).map(|i| &mut self.attempts[i]) {
            a.outcome = Some(outcome);
            a.decision = Some(decision);
        }
    }
}

impl Drop for RequestState {
    fn drop(&mut self) {
        if let Some(open) = self.open.take() {
            open.state.release();
        }
    }
}

/// The trace in one line: `#0 connect_refused retry_not_sent, #1 status 200 relay`.
impl fmt::Display for RequestState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, a) in self.attempts().iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{}", a.backend)?;
            if self.resent() == Some(i) {
                write!(f, " {} resend, {}", Outcome::StaleConnection, a.backend)?;
            }
            match (a.outcome, a.decision) {
                (Some(o), Some(d)) => write!(f, " {o} {d}")?,
                _ => f.write_str(" in_flight")?,
            }
        }
        if let Some(fail) = self.failure {
            if self.len > 0 {
                f.write_str(", ")?;
            }
            write!(f, "-> {}", fail.status())?;
        }
        Ok(())
    }
}
