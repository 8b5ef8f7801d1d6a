//! Failure classification, in one place: what happened on the upstream socket (a
//! [`SendError`], a timeout, a response) and on the client's body becomes either an lb-core
//! [`Outcome`] charged to the backend, or a fault of the client's own, charged to nobody.

use std::error::Error as _;
use std::io;

use hyper::body::Incoming;
use hyper::Response;
use lb_core::Outcome;

use crate::body::ClientFault;

/// Why an attempt got no response head.
#[derive(Debug)]
pub(crate) enum SendError {
    /// The connection could not be made (refused, unreachable, name not resolved).
    ConnectRefused(io::Error),
    /// The connection did not establish within the connect timeout.
    ConnectTimeout,
    /// The TLS handshake with an `https://` backend failed (its certificate not verified,
    /// or no TLS at all): a failed connect, nothing was sent.
    Tls(io::Error),
    /// The exchange failed after (part of) the request may have been written. `reused`: the
    /// connection came from the pool (so the failure may be a keep-alive race).
    Failed { error: hyper::Error, reused: bool },
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::ConnectRefused(e) => write!(f, "connect failed: {e}"),
            Self::ConnectTimeout => f.write_str("connect timed out"),
            Self::Tls(e) => write!(f, "TLS handshake failed: {e}"),
            Self::Failed { error, reused } => write!(f, "{error} (pooled connection: {reused})"),
        }
    }
}

/// No response head within the attempt's time (`timeouts.request`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct TimedOut;

/// The result of one attempt: the response (and its connection, `L`), the failure, or the
/// attempt's deadline.
pub(crate) type AttemptResult<L> = Result<Result<(Response<Incoming>, L), SendError>, TimedOut>;

/// Whose an attempt's end was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// The backend's: report it to lb-core.
    Backend(Outcome),
    /// The client's own body failed (and no response head came): lb-core only releases the
    /// attempt, as for a client that left; the client gets 400 or 408. The outcome is what
    /// the socket said: the send still counts in `lb_requests_total`, as every send does.
    Client(ClientFault, Outcome),
}

/// An attempt the proxy could not start for a reason of its own (the backend was picked from
/// a backend set newer than this request's routes, or the request could not be built): not
/// sent, so retried, and never the backend's failure.
pub(crate) const NOT_SENT_HERE: Outcome = Outcome::StaleConnection;

/// `TimedOut` ⇒ `TimedOut`; connect failures ⇒ `ConnectRefused`/`ConnectTimeout`; any other
/// failure ⇒ `Reset` (the request may have been sent); a response ⇒ `Response { status }`,
/// but a response framed by a transfer coding lb cannot relay ⇒ `Reset` (see
/// [`relayable_codings`]).
/// A failure while the client's body had failed (`client`) is the client's, whatever the
/// socket said: the backend only saw a request cut short.
pub(crate) fn classify<L>(result: &AttemptResult<L>, client: Option<ClientFault>) -> Verdict {
    let outcome = match result {
        Ok(Ok((resp, _))) if relayable_codings(resp.headers()) => {
            return Verdict::Backend(Outcome::Response {
                status: resp.status().as_u16(),
            })
        }
        Ok(Ok(_)) => Outcome::Reset,
        Err(TimedOut) => Outcome::TimedOut,
        Ok(Err(SendError::ConnectRefused(_) | SendError::Tls(_))) => Outcome::ConnectRefused,
        Ok(Err(SendError::ConnectTimeout)) => Outcome::ConnectTimeout,
        Ok(Err(SendError::Failed { .. })) => Outcome::Reset,
    };
    match client {
        Some(fault) => Verdict::Client(fault, outcome),
        None => Verdict::Backend(outcome),
    }
}

/// Returns true if and only if a backend response's `Transfer-Encoding` (if any) is one
/// `chunked`, the only coding lb can relay.
///
/// # Why
/// hyper takes the chunked framing off and the client gets the body re-framed, but any other
/// coding (`gzip, chunked`, or `gzip` alone, which hyper reads to the connection's end)
/// would stay applied to the bytes while `Transfer-Encoding`, hop-by-hop, is dropped: the
/// client would take gzip for the content. Such a response is the backend's protocol error
/// and the client gets 502, as from NGINX ("upstream sent unknown Transfer-Encoding"); it
/// is an attempt that failed after the request was sent (`Reset`): charged to the backend,
/// and retried only if the request is idempotent.
pub(crate) fn relayable_codings(headers: &http::HeaderMap) -> bool {
    let mut codings = headers
        .get_all(http::header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|c| !c.is_empty());
    match codings.next() {
        None => !headers.contains_key(http::header::TRANSFER_ENCODING),
        Some(first) => first.eq_ignore_ascii_case(b"chunked") && codings.next().is_none(),
    }
}

/// Returns true if and only if the failure looks like a kept-alive connection the backend
/// closed just as it was reused: a pooled connection that ended, or was reset, before any
/// byte of a response. A request such a connection never took is re-sent by the pool itself;
/// this is the other half of the race, where the request was (partly) written. NGINX retries
/// these on a fresh connection without counting a try; so does the proxy, once per request,
/// for requests that are safe to send twice.
pub(crate) fn is_stale_connection(e: &SendError) -> bool {
    let SendError::Failed {
        error,
        reused: true,
    } = e
    else {
        return false;
    };
    error.is_incomplete_message()
        || error.is_canceled()
        || error.is_closed()
        || error
            .source()
            .and_then(|s| s.downcast_ref::<io::Error>())
            .is_some_and(|io| {
                matches!(
                    io.kind(),
                    io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
                )
            })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_one_chunked_coding_is_relayable() {
        let codings = |lines: &[&str]| {
            let mut h = http::HeaderMap::new();
            for l in lines {
                h.append(
                    http::header::TRANSFER_ENCODING,
                    http::HeaderValue::from_str(l).unwrap(),
                );
            }
            relayable_codings(&h)
        };
        assert!(codings(&[]));
        assert!(codings(&["chunked"]));
        assert!(codings(&["Chunked "]));
        for bad in [
            &["gzip, chunked"][..],
            &["gzip", "chunked"],
            &["gzip"],
            &["chunked, chunked"],
            &["chunked", "chunked"],
            &["chunked;x=1"],
            &[""],
        ] {
            assert!(!codings(bad), "{bad:?}");
        }
    }
}
