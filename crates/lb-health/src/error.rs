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
    /// A TLS target's handshake or session failed: its certificate did not verify (unknown
    /// issuer, wrong name, expired), or the peer does not speak TLS. Holds rustls's reason
    /// (`invalid peer certificate: UnknownIssuer`).
    #[error("tls: {0}")]
    Tls(String),
    /// Any other I/O failure (no route, too many open files, ...).
    #[error("probe failed")]
    Io(#[source] io::Error),
}

impl ProbeError {
    /// Classifies an I/O error from connecting, handshaking, writing or reading: one that
    /// carries a [`rustls::Error`] (as tokio-rustls reports them) is [`ProbeError::Tls`].
    #[must_use]
    pub fn from_io(e: io::Error) -> Self {
        if let Some(tls) = e
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            return Self::Tls(tls.to_string());
        }
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
            // lb-core has no TLS failure of its own; like any other error it counts as one.
            Self::Tls(_) | Self::Io(_) => ProbeFailure::Other,
        }
    }

    /// The `result` label of `lb_health_checks_total` for this failure: one of
    /// [`RESULT_LABELS`](crate::RESULT_LABELS) other than `success`.
    #[must_use]
    pub const fn label(&self) -> &'static str {
        match self {
            Self::Refused => "refused",
            Self::Timeout(_) => "timeout",
            Self::Reset => "reset",
            Self::BadStatus(_) => "bad_status",
            Self::BadResponse(_) => "bad_response",
            Self::Tls(_) => "tls",
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
        // As tokio-rustls reports a handshake that failed verification.
        let cert = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let tls = ProbeError::from_io(io::Error::new(io::ErrorKind::InvalidData, cert));
        assert!(matches!(tls, ProbeError::Tls(_)), "{tls:?}");
        assert_eq!(
            tls.to_string(),
            "tls: invalid peer certificate: UnknownIssuer"
        );
        assert_eq!(tls.label(), "tls");
        assert_eq!(tls.failure(), ProbeFailure::Other);
    }
}
