//! One request from its head to the end of its response, and its access-log line.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::{Method, Uri};
use lb_core::{Completion, RequestState};

use crate::body::{BodyEnd, BodyWatch, ClientFault};
use crate::clock::now;
use crate::observe::{Completed, Observer};
use crate::phase::Phase;
use crate::routes::Routes;
use crate::upstream::Lease;

/// A request from its head to the end of its response. Ends exactly once: `finish` when the
/// response is complete, or dropped (the client went away, or the task was cancelled),
/// which releases whatever lb-core holds for it and never counts against a backend.
#[derive(Debug)]
pub(crate) struct Exchange {
    pub(crate) routes: Arc<Routes>,
    pub(crate) st: Option<RequestState>,
    pub(crate) phase: Arc<Phase>,
    pub(crate) observer: Arc<dyn Observer>,
    pub(crate) method: Method,
    pub(crate) uri: Uri,
    pub(crate) status: u16,
    pub(crate) started: tokio::time::Instant,
    /// The client's streamed body, whose failure is never the backend's.
    pub(crate) body: Option<Arc<BodyWatch>>,
    /// The proxy answered a fault of the client's own (400, 408).
    pub(crate) fault: Option<ClientFault>,
    ended: bool,
}

impl fmt::Debug for dyn Observer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Observer")
    }
}

impl Exchange {
    /// A request whose head just arrived (the connection is now busy with it).
    pub(crate) fn start(
        routes: Arc<Routes>,
        phase: Arc<Phase>,
        observer: Arc<dyn Observer>,
        method: Method,
        uri: Uri,
    ) -> Self {
        phase.busy();
        Self {
            routes,
            st: None,
            phase,
            observer,
            method,
            uri,
            status: 0,
            started: tokio::time::Instant::now(),
            body: None,
            fault: None,
            ended: false,
        }
    }

    pub(crate) fn finish(mut self, how: Completion) {
        self.end(how);
    }

    fn end(&mut self, how: Completion) {
        if std::mem::replace(&mut self.ended, true) {
            return;
        }
        let elapsed = self.started.elapsed();
        let status = if how == Completion::ClientGone {
            499
        } else {
            self.status
        };
        // A response cut short because the client's own body failed is not the backend's
        // failure; a fault the proxy answered itself releases the attempt as a client that left.
        let fault = self
            .fault
            .or_else(|| self.body.as_ref().and_then(|b| b.fault()));
        let how = match (how, fault) {
            (Completion::BackendFailed, Some(_)) => Completion::ClientGone,
            _ if self.fault.is_some() => Completion::ClientGone,
            _ => how,
        };
        self.observer.completed(&Completed {
            method: &self.method,
            uri: &self.uri,
            status,
            elapsed,
            how,
            routes: &self.routes,
            state: self.st.as_ref(),
        });
        let st = self.st.as_ref();
        let backend = st
            .and_then(|st| st.attempts().last())
            .and_then(|a| self.routes.target(a.backend()));
        tracing::info!(
            target: "lb::access",
            method = %self.method,
            path = %self.uri.path(),
            status,
            backend = %backend.map_or("-", |t| t.authority.as_str()),
            attempts = st.map_or(0, RequestState::attempt_count),
            duration = %Millis(elapsed),
            duration_ms = millis(elapsed),
            trace = %Trace { routes: &self.routes, st, fault: self.fault },
            "request"
        );
        if let Some(st) = self.st.take() {
            self.routes.balancer.finish(st, how, now());
        }
        // A response can end before its request body did (the backend answered early): the
        // connection is idle only once that body is in too.
        if !self
            .body
            .as_ref()
            .is_some_and(|b| b.idle_after(&self.phase))
        {
            self.phase.idle();
        }
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        self.end(Completion::ClientGone);
    }
}

/// The response body ends the exchange, and gives the upstream connection back to the pool
/// once the client has the whole response.
#[derive(Debug)]
pub(crate) struct Ending {
    pub(crate) exchange: Exchange,
    pub(crate) lease: Option<Lease>,
}

impl BodyEnd for Ending {
    fn end(self: Box<Self>, how: Completion) {
        let Self { exchange, lease } = *self;
        if let Some(lease) = lease {
            if how == Completion::Done {
                lease.release();
            } else {
                // Not relayed whole: the backend may still be reading an upload nobody will
                // finish (and holding it, the client's connection slot).
                lease.close();
            }
        }
        exchange.finish(how);
    }
}

/// A duration in milliseconds with at most 3 decimals (whole microseconds): `2.321`.
fn millis(d: Duration) -> f64 {
    // Correctly rounded division: prints as the short decimal, not float noise.
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX) as f64 / 1000.0
}

/// A duration as the access log shows it: `6.613ms`, in whole microseconds like
/// `duration_ms` (integers: a float's exact formatting cost a thousand instructions a line).
struct Millis(Duration);

impl fmt::Display for Millis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let micros = self.0.as_micros();
        write!(f, "{}.{:03}ms", micros / 1000, micros % 1000)
    }
}

/// The routing trace, and the client's fault the request ended with, if any.
struct Trace<'a> {
    routes: &'a Routes,
    st: Option<&'a RequestState>,
    fault: Option<ClientFault>,
}

impl fmt::Display for Trace<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut any = false;
        if let Some(st) = self.st {
            write!(f, "{}", self.routes.trace(st))?;
            any = !st.attempts().is_empty() || st.failure().is_some();
        }
        if let Some(fault) = self.fault {
            if any {
                f.write_str(", ")?;
            }
            write!(f, "{} -> {}", fault.as_str(), fault.status().as_u16())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_have_three_decimals_at_most() {
        assert_eq!(
            millis(Duration::from_nanos(2_320_614_999)).to_string(),
            "2320.614"
        );
        assert_eq!(millis(Duration::from_nanos(2_320_615)).to_string(), "2.32");
        assert_eq!(Millis(Duration::from_micros(6613)).to_string(), "6.613ms");
        assert_eq!(
            Millis(Duration::from_nanos(6_613_999)).to_string(),
            "6.613ms"
        );
        assert_eq!(Millis(Duration::from_micros(5)).to_string(), "0.005ms");
        assert_eq!(Millis(Duration::from_secs(12)).to_string(), "12000.000ms");
    }
}
