//! Why a probe failed.

use std::io;
use std::time::Duration;

use lb_core::ProbeFailure;

/// A failed probe, with the reason a log line or a metric label needs.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The backend refused the connection.
    #[error("connection refused")]
    Refused,
    /// No connection, or no answer, within the probe timeout.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The connection broke during the probe.
    #[error("connection reset")]
    Reset,
    /// An HTTP probe got a status outside the healthy range.
    #[error("status {0}")]
    BadStatus(u16),
    /// The answer was not a valid response for the protocol.
    #[error("bad response: {0}")]
    BadResponse(&'static str),
    /// Any other I/O failure (no route, too many open files, ...).
    #[error("probe failed")]
    Io(#[source] io::Error),
}

impl ProbeError {
    /// Classifies an I/O error from connecting, writing or reading.
    #[must_use]
    pub fn from_io(e: io::Error) -> Self {
        match e.kind() {
            io::ErrorKind::ConnectionRefused => Self::Refused,
            io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::UnexpectedEof => Self::Reset,
            _ => Self::Io(e),
        }
    }

    /// The failure as lb-core's rise/fall counting sees it.
    #[must_use]
    pub const fn failure(&self) -> ProbeFailure {
        match self {
            Self::Refused => ProbeFailure::Refused,
            Self::Timeout(_) => ProbeFailure::TimedOut,
            Self::Reset => ProbeFailure::Reset,
            Self::BadStatus(s) => ProbeFailure::BadStatus(*s),
            Self::BadResponse(_) => ProbeFailure::BadResponse,
            Self::Io(_) => ProbeFailure::Other,
        }
    }

    /// The `result` label of `lb_health_checks_total` for this failure.
    #[must_use]
    pub const fn label(&self) -> &'static str {
        match self {
            Self::Refused => "refused",
            Self::Timeout(_) => "timeout",
            Self::Reset => "reset",
            Self::BadStatus(_) => "bad_status",
            Self::BadResponse(_) => "bad_response",
            Self::Io(_) => "error",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_errors_are_classified() {
        let refused = ProbeError::from_io(io::Error::from(io::ErrorKind::ConnectionRefused));
        assert!(matches!(refused, ProbeError::Refused));
        assert_eq!(refused.failure(), ProbeFailure::Refused);
        assert!(matches!(
            ProbeError::from_io(io::ErrorKind::UnexpectedEof.into()),
            ProbeError::Reset
        ));
        let other = ProbeError::from_io(io::Error::other("EMFILE"));
        assert_eq!(other.label(), "error");
        assert_eq!(ProbeError::BadStatus(503).to_string(), "status 503");
    }
}
