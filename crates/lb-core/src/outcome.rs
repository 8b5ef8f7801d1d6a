//! What the caller tells the core: a request's traits, each attempt's outcome, each probe's result.
//!
//! These are the only inputs the decisions depend on. They carry no `http` types: the proxy
//! classifies what happened on its sockets into these few cases, and the core never learns
//! which HTTP library was used.

use std::fmt;
use std::time::Instant;

/// What the core needs to know about one client request.
///
/// ```
/// use lb_core::RequestInfo;
/// let get = RequestInfo::new(true, true).with_hash_key(7);
/// assert!(get.idempotent() && get.replayable() && get.hash_key() == Some(7));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestInfo {
    /// GET, HEAD, OPTIONS, PUT, DELETE, TRACE: sending it twice is harmless.
    pub(crate) idempotent: bool,
    /// The body is still available to send again (it fit in the replay buffer, or there is none).
    pub(crate) replayable: bool,
    /// The key `consistent-hash` places the request by (see [`stable_hash`](crate::stable_hash)).
    pub(crate) hash_key: Option<u64>,
    /// An overall limit for the request, if the caller has one; attempts never run past it.
    pub(crate) deadline: Option<Instant>,
}

impl RequestInfo {
    /// A request with no hash key and no overall deadline.
    #[must_use]
    pub const fn new(idempotent: bool, replayable: bool) -> Self {
        Self {
            idempotent,
            replayable,
            hash_key: None,
            deadline: None,
        }
    }

    /// The same request, placed by `key` under `consistent-hash`.
    #[must_use]
    pub const fn with_hash_key(mut self, key: u64) -> Self {
        self.hash_key = Some(key);
        self
    }

    /// The same request, with an overall deadline.
    #[must_use]
    pub const fn with_deadline(mut self, deadline: Instant) -> Self {
        self.deadline = Some(deadline);
        self
    }

    /// Returns true if and only if sending the request twice is harmless (GET, HEAD, PUT, ...).
    #[must_use]
    pub const fn idempotent(&self) -> bool {
        self.idempotent
    }

    /// Returns true if and only if the body can still be sent again.
    #[must_use]
    pub const fn replayable(&self) -> bool {
        self.replayable
    }

    /// The key `consistent-hash` places the request by, if any.
    #[must_use]
    pub const fn hash_key(&self) -> Option<u64> {
        self.hash_key
    }

    /// The request's overall deadline, if any.
    #[must_use]
    pub const fn deadline(&self) -> Option<Instant> {
        self.deadline
    }
}

/// How one attempt ended, as far as the response head.
///
/// Whether the request may have reached the backend decides whether it is safe to retry:
/// [`Outcome::was_sent`] is the line between the two halves of this enum.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The response head arrived. 5xx included: it is relayed, not retried.
    Response {
        /// The status code.
        status: u16,
    },
    /// The connection was refused (or failed to establish for any other reason but time).
    /// Never sent: always safe to retry; counts toward ejection.
    ConnectRefused,
    /// The connection did not establish in time. Never sent; counts toward ejection.
    ConnectTimeout,
    /// A pooled keep-alive connection turned out closed before the request was written.
    /// Never sent, and the ordinary race of keep-alive, not a sign of a bad backend: retried,
    /// but not counted toward ejection.
    StaleConnection,
    /// The connection failed after (part of) the request was written, before a response head.
    /// The backend may have acted on it; counts toward ejection.
    Reset,
    /// No response head before the attempt's `try_deadline`. May have been acted on; counts
    /// toward ejection.
    TimedOut,
}

// === impl Outcome ===

impl Outcome {
    /// Returns true if and only if the backend may have received (and acted on) the request.
    #[must_use]
    pub const fn was_sent(self) -> bool {
        !matches!(
            self,
            Self::ConnectRefused | Self::ConnectTimeout | Self::StaleConnection
        )
    }

    /// Returns true if and only if this outcome counts toward passive ejection (SPEC: refused or
    /// timed-out connects, resets and attempt timeouts; never an HTTP status).
    #[must_use]
    pub const fn is_backend_failure(self) -> bool {
        matches!(
            self,
            Self::ConnectRefused | Self::ConnectTimeout | Self::Reset | Self::TimedOut
        )
    }

    /// A short, stable name for logs and metrics labels.
    #[must_use]
    pub const fn class(self) -> &'static str {
        match self {
            Self::Response { .. } => "response",
            Self::ConnectRefused => "connect_refused",
            Self::ConnectTimeout => "connect_timeout",
            Self::StaleConnection => "stale_connection",
            Self::Reset => "reset",
            Self::TimedOut => "timeout",
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Response { status } => write!(f, "status {status}"),
            other => f.write_str(other.class()),
        }
    }
}

/// How a relayed response ended, reported with [`Balancer::finish`](crate::Balancer::finish).
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Completion {
    /// The whole response reached the client.
    Done,
    /// The backend broke off the response body (reset, truncated): counts toward ejection.
    BackendFailed,
    /// The client went away: never the backend's fault, never counted.
    ClientGone,
}

/// Why an active probe failed.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProbeFailure {
    /// Connection refused.
    Refused,
    /// No connection or no answer within the probe timeout.
    TimedOut,
    /// The connection broke during the probe.
    Reset,
    /// An HTTP probe got a status outside the healthy range.
    BadStatus(u16),
    /// An answer that is not valid for the probe's protocol.
    BadResponse,
    /// Any other failure (e.g. no route, too many open files).
    Other,
}

impl fmt::Display for ProbeFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Refused => f.write_str("connection refused"),
            Self::TimedOut => f.write_str("timed out"),
            Self::Reset => f.write_str("connection reset"),
            Self::BadStatus(s) => write!(f, "status {s}"),
            Self::BadResponse => f.write_str("bad response"),
            Self::Other => f.write_str("probe error"),
        }
    }
}

/// One active probe's result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProbeResult {
    /// The backend answered as a healthy one does.
    Success,
    /// It did not, and why.
    Failure(ProbeFailure),
}

impl ProbeResult {
    /// Returns true if and only if the probe succeeded.
    #[must_use]
    pub const fn is_success(self) -> bool {
        matches!(self, Self::Success)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sent_and_failure_classes() {
        assert!(!Outcome::ConnectRefused.was_sent());
        assert!(!Outcome::StaleConnection.was_sent());
        assert!(Outcome::Reset.was_sent());
        assert!(Outcome::Response { status: 503 }.was_sent());
        assert!(!Outcome::Response { status: 503 }.is_backend_failure());
        assert!(!Outcome::StaleConnection.is_backend_failure());
        assert!(Outcome::TimedOut.is_backend_failure());
        assert_eq!(Outcome::Response { status: 502 }.to_string(), "status 502");
        assert_eq!(ProbeFailure::Refused.to_string(), "connection refused");
    }
}
