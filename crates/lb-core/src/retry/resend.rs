//! The one transport resend a request may make besides its attempts (SPEC "Retries are
//! safe"): a kept-alive connection taken from the pool failed before any response byte, so
//! the attempt is sent once more, on a fresh connection to the same backend.

use std::time::Instant;

use crate::balancer::Balancer;
use crate::retry::RequestState;
use crate::select::Select;

impl<S: Select> Balancer<S> {
    /// Asks to re-send the attempt in flight on a fresh connection to the same backend, after
    /// its pooled connection failed before any response byte. Allowed (and recorded in the
    /// routing trace, `true`) once per request, for a request safe to send twice (idempotent
    /// with a replayable body); the resend counts toward neither `attempts`, the retry budget
    /// nor ejection. A request whose connection never took it needs no permission: it was
    /// not sent.
    pub fn handle_resend(&self, st: &mut RequestState, now: Instant) -> bool {
        let _ = now; // the resend is free: no budget, no backoff
        if st.open.is_none()
            || st.finished
            || st.attempts().last().is_some_and(|a| a.decision.is_some())
            || st.resent.is_some()
            || !(st.info.idempotent && st.info.replayable)
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
        assert!(b.handle_resend(&mut st, now()));
        assert!(!b.handle_resend(&mut st, now()), "at most one per request");
        assert_eq!(st.resent(), Some(0));
        assert_eq!(st.attempt_count(), 1, "not an attempt");
        assert_eq!(
            b.handle_outcome(&mut st, Outcome::Response { status: 200 }, now()),
            Action::Relay
        );
        assert!(st.to_string().contains("stale_connection resend"), "{st}");
        let (mut post, _) = b.start(RequestInfo::new(false, true), now());
        assert!(
            !b.handle_resend(&mut post, now()),
            "a POST is never re-sent"
        );
        assert_eq!(post.resent(), None);
    }
}
