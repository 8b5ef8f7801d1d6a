//! The one transport resend a request may make besides its attempts (SPEC "Retries are
//! safe"): a kept-alive connection taken from the pool failed before any response byte, so
//! the attempt is sent once more, on a fresh connection to the same backend.

use std::time::Instant;

use crate::balancer::Balancer;
use crate::outcome::Outcome;
use crate::retry::RequestState;
use crate::select::Select;

impl<S: Select> Balancer<S> {
    /// Asks to re-send the attempt in flight on a fresh connection to the same backend, after
    /// its pooled connection failed before any response byte; `failed` says how:
    /// [`Outcome::StaleConnection`] if the request was never written (any request may then
    /// be re-sent), [`Outcome::Reset`] if it may have been (only a request safe to send twice,
    /// idempotent with a replayable body, may). Allowed (and recorded in the routing trace,
    /// `true`) once per request (SPEC: "a request safe to retry (never sent, or idempotent
    /// and replayable) is re-sent once per request"); the resend counts toward neither
    /// `attempts`, the retry budget nor ejection. Any other `failed` is not a dead pooled
    /// connection: `false`.
    pub fn handle_resend(&self, st: &mut RequestState, failed: Outcome, now: Instant) -> bool {
        let _ = now; // the resend is free: no budget, no backoff
        let safe = match failed {
            Outcome::StaleConnection => true,
            Outcome::Reset => st.info.idempotent && st.info.replayable,
            _ => false,
        };
        if !safe
            || st.open.is_none()
            || st.finished
            || st.attempts().last().is_some_and(|a| a.decision.is_some())
            || st.resent.is_some()
        {
            return false;
        }
        // The attempt in flight is the trace's last entry.
        st.resent = st.len.checked_sub(1).and_then(|i| u8::try_from(i).ok());
        st.resent.is_some()
    }
}

#[cfg(test)]
mod tests {
    use crate::select::{AnySelect, StrategyKind};
    use crate::{Action, Backend, Balancer, Config, Outcome, RequestInfo, Weight};

    const MAYBE_SENT: Outcome = Outcome::Reset;
    const NEVER_SENT: Outcome = Outcome::StaleConnection;

    #[allow(clippy::disallowed_methods)]
    fn now() -> std::time::Instant {
        std::time::Instant::now()
    }

    #[test]
    fn one_resend_per_request_and_only_when_safe() {
        let b = Balancer::new(Config::default(), AnySelect::new(StrategyKind::RoundRobin)).unwrap();
        b.set_backends([Backend::new("a", Weight::ONE)], now())
            .unwrap();
        let (mut st, action) = b.start(RequestInfo::new(true, true), now());
        assert!(matches!(action, Action::Forward { .. }));
        assert!(b.handle_resend(&mut st, MAYBE_SENT, now()));
        assert!(
            !b.handle_resend(&mut st, NEVER_SENT, now()),
            "at most one per request"
        );
        assert_eq!(st.resent(), Some(0));
        assert_eq!(st.attempt_count(), 1, "not an attempt");
        assert_eq!(
            b.handle_outcome(&mut st, Outcome::Response { status: 200 }, now()),
            Action::Relay
        );
        assert!(st.to_string().contains("stale_connection resend"), "{st}");
        let (mut post, _) = b.start(RequestInfo::new(false, true), now());
        assert!(
            !b.handle_resend(&mut post, MAYBE_SENT, now()),
            "a POST that may have been sent is never re-sent"
        );
        assert_eq!(post.resent(), None);
        assert!(
            !b.handle_resend(&mut post, Outcome::TimedOut, now()),
            "not a dead pooled connection"
        );
        assert!(
            b.handle_resend(&mut post, NEVER_SENT, now()),
            "a POST never written is re-sent"
        );
        assert_eq!(post.resent(), Some(0));
        assert!(!b.handle_resend(&mut post, NEVER_SENT, now()));
        let (mut stream, _) = b.start(RequestInfo::new(true, false), now());
        assert!(
            !b.handle_resend(&mut stream, MAYBE_SENT, now()),
            "body gone"
        );
        assert!(b.handle_resend(&mut stream, NEVER_SENT, now()));
    }
}
