//! Turning what happened on the upstream socket into an lb-core [`Outcome`].

use std::error::Error as StdError;
use std::io;

use hyper::body::Incoming;
use hyper::Response;
use lb_core::Outcome;

/// The result of one attempt: the response, the client's error, or the attempt's deadline.
pub(crate) type AttemptResult = Result<
    Result<Response<Incoming>, hyper_util::client::legacy::Error>,
    tokio::time::error::Elapsed,
>;

/// `Err(Elapsed)` ⇒ `TimedOut`; a connect error ⇒ `ConnectTimeout` or `ConnectRefused`; any
/// other client error ⇒ `Reset` (assume the request may have been sent: hyper-util already
/// re-sends, by itself, requests that a stale pooled connection never took); a response ⇒
/// `Response { status }`.
pub(crate) fn classify(result: &AttemptResult) -> Outcome {
    match result {
        Err(_) => Outcome::TimedOut,
        Ok(Ok(resp)) => Outcome::Response {
            status: resp.status().as_u16(),
        },
        Ok(Err(e)) if e.is_connect() => {
            if source_chain(e).any(is_timeout) {
                Outcome::ConnectTimeout
            } else {
                Outcome::ConnectRefused
            }
        }
        Ok(Err(_)) => Outcome::Reset,
    }
}

/// Returns true if and only if the error looks like a kept-alive connection the backend
/// closed just as it was reused: the connection ended before any byte of a response (hyper's
/// "incomplete message"), or broke while the request was being written.
///
/// hyper-util re-sends by itself a request that such a connection never took; this is the
/// other half of the race, where the request was (partly) written. NGINX retries these on a
/// fresh connection without counting a try; so does the proxy, once, for requests that are
/// safe to send twice.
pub(crate) fn is_stale_connection(e: &hyper_util::client::legacy::Error) -> bool {
    !e.is_connect()
        && source_chain(e).any(|s| {
            s.downcast_ref::<hyper::Error>()
                .is_some_and(|h| h.is_incomplete_message() || h.is_canceled())
                || s.downcast_ref::<io::Error>().is_some_and(|io| {
                    matches!(
                        io.kind(),
                        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
                    )
                })
        })
}

fn source_chain<'a>(
    e: &'a (dyn StdError + 'static),
) -> impl Iterator<Item = &'a (dyn StdError + 'static)> {
    let mut next = Some(e);
    std::iter::from_fn(move || {
        let current = next?;
        next = current.source();
        Some(current)
    })
}

fn is_timeout(e: &(dyn StdError + 'static)) -> bool {
    e.downcast_ref::<io::Error>()
        .is_some_and(|io| io.kind() == io::ErrorKind::TimedOut)
        || e.to_string().contains("timed out")
}
