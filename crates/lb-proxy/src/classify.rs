//! Turning what happened on the upstream socket into an lb-core [`Outcome`].

use std::error::Error as _;
use std::io;

use hyper::body::Incoming;
use hyper::Response;
use lb_core::Outcome;

use crate::upstream::{Lease, SendError};

/// The result of one attempt: the response (and its connection), the failure, or the
/// attempt's deadline.
pub(crate) type AttemptResult =
    Result<Result<(Response<Incoming>, Lease), SendError>, tokio::time::error::Elapsed>;

/// `Err(Elapsed)` ⇒ `TimedOut`; connect failures ⇒ `ConnectRefused`/`ConnectTimeout`; any
/// other failure ⇒ `Reset` (the request may have been sent); a response ⇒ `Response { status }`.
pub(crate) fn classify(result: &AttemptResult) -> Outcome {
    match result {
        Err(_) => Outcome::TimedOut,
        Ok(Ok((resp, _))) => Outcome::Response {
            status: resp.status().as_u16(),
        },
        Ok(Err(SendError::ConnectRefused(_))) => Outcome::ConnectRefused,
        Ok(Err(SendError::ConnectTimeout)) => Outcome::ConnectTimeout,
        Ok(Err(SendError::Failed { .. })) => Outcome::Reset,
    }
}

/// Returns true if and only if the failure looks like a kept-alive connection the backend
/// closed just as it was reused: a pooled connection that ended, or was reset, before any
/// byte of a response. A request such a connection never took is re-sent by the pool itself;
/// this is the other half of the race, where the request was (partly) written. NGINX retries
/// these on a fresh connection without counting a try; so does the proxy, once, for requests
/// that are safe to send twice.
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
