//! The retry decision, as a pure function of what is known when an attempt fails.
//!
//! [`Balancer::handle_outcome`](crate::Balancer::handle_outcome) does the bookkeeping (counts
//! the outcome against the backend, draws the backoff, picks the next backend, takes a
//! budget token); whether to retry at all is decided here, from values only, so the rules of
//! SPEC.md's "Retries are safe" read top to bottom in one place and are unit-tested without
//! a balancer. The two questions that cost something — is there an untried backend (a pick)
//! and may the budget pay (a token taken) — are asked lazily, in that order, and only when
//! every free check already allows the retry, so a denied retry never spends a token.

use std::time::Instant;

use crate::config::RetryConfig;
use crate::outcome::{Outcome, RequestInfo};

use super::{Decision, Failure, RetryReason, StopReason};

/// What the decision depends on, besides the two lazy questions.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Facts<'a> {
    /// How the attempt just made ended.
    pub(crate) outcome: Outcome,
    /// The request's traits.
    pub(crate) info: &'a RequestInfo,
    /// Attempts made so far, the one that just ended included.
    pub(crate) attempts: usize,
    /// `attempts` and the rest of `[retry]`.
    pub(crate) config: &'a RetryConfig,
    /// When a retry would be sent: now plus the backoff.
    pub(crate) not_before: Instant,
}

/// Relay, retry (and why that is safe) or stop (and why).
///
/// `untried` answers whether a backend this request has not tried is eligible (it may pick
/// one and keep it); `budget` whether the retry budget pays for one more retry (it may take
/// the token). Each is called at most once, `budget` only after `untried` said yes.
pub(crate) fn decide(
    facts: &Facts<'_>,
    untried: impl FnOnce() -> bool,
    budget: impl FnOnce() -> bool,
) -> Decision {
    let Facts {
        outcome,
        info,
        attempts,
        config,
        not_before,
    } = *facts;
    if let Outcome::Response { .. } = outcome {
        // A response head is final, 5xx included.
        return Decision::Relay;
    }
    let sent = outcome.was_sent();
    if sent && !info.idempotent {
        return Decision::Stop(StopReason::NotIdempotent);
    }
    if sent && !info.replayable {
        return Decision::Stop(StopReason::NotReplayable);
    }
    if attempts >= config.attempts as usize {
        return Decision::Stop(StopReason::AttemptsExhausted);
    }
    if info.deadline.is_some_and(|d| not_before >= d) {
        return Decision::Stop(StopReason::Deadline);
    }
    if !untried() {
        return Decision::Stop(StopReason::NoUntriedBackend);
    }
    if !budget() {
        return Decision::Stop(StopReason::BudgetExhausted);
    }
    Decision::Retry(if sent {
        RetryReason::Idempotent
    } else {
        RetryReason::NotSent
    })
}

/// What the client gets when the request stops after `outcome` for `why`: 504 for a
/// timeout or a deadline, 502 for anything else.
pub(crate) const fn failure(outcome: Outcome, why: StopReason) -> Failure {
    match (outcome, why) {
        (_, StopReason::Deadline) | (Outcome::TimedOut, _) => Failure::GatewayTimeout,
        _ => Failure::BadGateway,
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::time::Duration;

    use super::*;

    #[allow(clippy::disallowed_methods)]
    fn t0() -> Instant {
        Instant::now()
    }

    fn facts<'a>(
        outcome: Outcome,
        info: &'a RequestInfo,
        attempts: usize,
        config: &'a RetryConfig,
        not_before: Instant,
    ) -> Facts<'a> {
        Facts {
            outcome,
            info,
            attempts,
            config,
            not_before,
        }
    }

    #[test]
    fn rules_in_order() {
        let now = t0();
        let config = RetryConfig::default(); // 3 attempts
        let get = RequestInfo::new(true, true);
        let post = RequestInfo::new(false, true);
        let big = RequestInfo::new(true, false);
        let yes = || true;
        let case = |o, info: &RequestInfo, n, untried: bool, budget: bool| {
            decide(&facts(o, info, n, &config, now), || untried, || budget)
        };
        assert_eq!(
            case(Outcome::Response { status: 503 }, &post, 1, true, true),
            Decision::Relay
        );
        assert_eq!(
            case(Outcome::ConnectRefused, &post, 1, true, true),
            Decision::Retry(RetryReason::NotSent)
        );
        assert_eq!(
            case(Outcome::StaleConnection, &big, 1, true, true),
            Decision::Retry(RetryReason::NotSent)
        );
        assert_eq!(
            case(Outcome::Reset, &post, 1, true, true),
            Decision::Stop(StopReason::NotIdempotent)
        );
        assert_eq!(
            case(Outcome::TimedOut, &big, 1, true, true),
            Decision::Stop(StopReason::NotReplayable)
        );
        assert_eq!(
            case(Outcome::Reset, &get, 1, true, true),
            Decision::Retry(RetryReason::Idempotent)
        );
        assert_eq!(
            case(Outcome::Reset, &get, 3, true, true),
            Decision::Stop(StopReason::AttemptsExhausted)
        );
        assert_eq!(
            case(Outcome::Reset, &get, 2, false, true),
            Decision::Stop(StopReason::NoUntriedBackend)
        );
        assert_eq!(
            case(Outcome::Reset, &get, 2, true, false),
            Decision::Stop(StopReason::BudgetExhausted)
        );
        let soon = get.with_deadline(now + Duration::from_millis(5));
        assert_eq!(
            decide(
                &facts(
                    Outcome::ConnectRefused,
                    &soon,
                    1,
                    &config,
                    now + Duration::from_millis(5)
                ),
                yes,
                yes
            ),
            Decision::Stop(StopReason::Deadline)
        );
        assert_eq!(
            decide(
                &facts(
                    Outcome::ConnectRefused,
                    &soon,
                    1,
                    &config,
                    now + Duration::from_millis(4)
                ),
                yes,
                yes
            ),
            Decision::Retry(RetryReason::NotSent)
        );
    }

    #[test]
    fn costly_questions_are_asked_lazily_and_in_order() {
        let now = t0();
        let config = RetryConfig::default();
        let post = RequestInfo::new(false, true);
        let (picks, tokens) = (Cell::new(0), Cell::new(0));
        let untried = |ok: bool| {
            let picks = &picks;
            move || {
                picks.set(picks.get() + 1);
                ok
            }
        };
        let budget = || {
            tokens.set(tokens.get() + 1);
            true
        };
        // Denied for free reasons: neither question is asked.
        decide(
            &facts(Outcome::Reset, &post, 1, &config, now),
            untried(true),
            budget,
        );
        decide(
            &facts(Outcome::ConnectRefused, &post, 3, &config, now),
            untried(true),
            budget,
        );
        assert_eq!((picks.get(), tokens.get()), (0, 0));
        // No untried backend: no token is taken.
        decide(
            &facts(Outcome::ConnectRefused, &post, 1, &config, now),
            untried(false),
            budget,
        );
        assert_eq!((picks.get(), tokens.get()), (1, 0));
        decide(
            &facts(Outcome::ConnectRefused, &post, 1, &config, now),
            untried(true),
            budget,
        );
        assert_eq!((picks.get(), tokens.get()), (2, 1));
    }

    #[test]
    fn stops_map_to_502_or_504() {
        assert_eq!(
            failure(Outcome::TimedOut, StopReason::NoUntriedBackend),
            Failure::GatewayTimeout
        );
        assert_eq!(
            failure(Outcome::ConnectRefused, StopReason::Deadline),
            Failure::GatewayTimeout
        );
        assert_eq!(
            failure(Outcome::Reset, StopReason::NotIdempotent),
            Failure::BadGateway
        );
        assert_eq!(
            failure(Outcome::ConnectTimeout, StopReason::AttemptsExhausted),
            Failure::BadGateway
        );
    }
}
