//! Properties of the retry state machine, the budget and passive ejection.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::{balancer, kind, Clock};
use lb_core::{
    Action, Completion, Config, Decision, Event, Failure, Outcome, PassiveConfig, RequestInfo,
    RetryConfig, StopReason,
};
use proptest::prelude::*;

fn outcome() -> impl Strategy<Value = Outcome> {
    prop_oneof![
        Just(Outcome::ConnectRefused),
        Just(Outcome::ConnectTimeout),
        Just(Outcome::StaleConnection),
        Just(Outcome::Reset),
        Just(Outcome::TimedOut),
        (200u16..600).prop_map(|status| Outcome::Response { status }),
    ]
}

#[derive(Debug, Clone)]
struct Req {
    idempotent: bool,
    replayable: bool,
    outcomes: Vec<Outcome>,
    gap_ms: u16,
}

fn req() -> impl Strategy<Value = Req> {
    (
        any::<bool>(),
        any::<bool>(),
        prop::collection::vec(outcome(), 1..12),
        0u16..400,
    )
        .prop_map(|(idempotent, replayable, outcomes, gap_ms)| Req {
            idempotent,
            replayable,
            outcomes,
            gap_ms,
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    /// Invariants 3–7 and 10, and "in-flight returns to 0", for any sequence of requests
    /// and outcomes under any strategy.
    #[test]
    fn retry_machine_is_safe_bounded_and_terminates(
        kind in kind(),
        seed in any::<u64>(),
        n in 1usize..7,
        attempts in 1u32..6,
        budget_percent in 0u32..60,
        min_rps in 0u32..3,
        reqs in prop::collection::vec(req(), 1..120),
    ) {
        let mut clock = Clock::new();
        let config = Config::default()
            .with_rng_seed(Some(seed))
            .with_retry(RetryConfig::default().with_attempts(attempts).with_budget_percent(budget_percent).with_min_retries_per_second(min_rps))
            .with_passive(PassiveConfig::default().with_consecutive_failures(0)); // ejection is tested separately
        let (lb, ids) = balancer(kind, config, &vec![1; n], clock.now());
        // ms -> (requests, retries) for the budget check.
        let mut per_ms: BTreeMap<u64, (u64, u64)> = BTreeMap::new();

        for r in reqs {
            clock.advance(u64::from(r.gap_ms));
            let deadline = clock.now() + Duration::from_millis(500);
            let info = RequestInfo::new(r.idempotent, r.replayable).with_hash_key(7).with_deadline(deadline);
            let (mut st, mut action) = lb.start(info, clock.now());
            per_ms.entry(clock.ms).or_default().0 += 1;
            let mut steps = 0;
            let mut last = None;
            let mut outcomes = r.outcomes.iter().cycle();
            let mut tried = BTreeSet::new();
            loop {
                steps += 1;
                prop_assert!(steps <= attempts as usize + 1, "terminates within attempts + 1 actions");
                match action {
                    Action::Forward { backend, not_before, try_deadline } => {
                        prop_assert!(ids.contains(&backend));
                        prop_assert!(tried.insert(backend), "a retry never returns to a tried backend");
                        prop_assert!(clock.now() <= not_before && not_before < try_deadline, "now ≤ not_before < try_deadline");
                        prop_assert!(try_deadline <= deadline, "try_deadline ≤ deadline");
                        if steps > 1 {
                            let t = clock.ms;
                            per_ms.entry(t).or_default().1 += 1;
                            // Invariant 7 (SPEC "over the last 10 s"): when a retry is taken at
                            // t, the retries in [t - 10 s, t], this one included, are at most
                            // percent·(requests in (t - 10 s, t]) + floor·10.
                            let retries: u64 = per_ms.range(t.saturating_sub(10_000)..=t).map(|(_, c)| c.1).sum();
                            let reqs: u64 = per_ms.range(t.saturating_sub(9_999)..=t).map(|(_, c)| c.0).sum();
                            prop_assert!(
                                retries * 100 <= u64::from(budget_percent) * reqs + u64::from(min_rps) * 10 * 100,
                                "at {} ms: {} retries for {} requests", t, retries, reqs
                            );
                            let prev = last.unwrap();
                            let was_response = matches!(prev, Outcome::Response { .. });
                            prop_assert!(!was_response, "a response is never retried");
                            if Outcome::was_sent(prev) {
                                prop_assert!(r.idempotent && r.replayable, "a sent non-idempotent or non-replayable request is never replayed");
                            }
                        }
                        let o = *outcomes.next().unwrap();
                        last = Some(o);
                        action = lb.handle_outcome(&mut st, o, clock.now());
                    }
                    Action::Relay => {
                        let relayed_response = matches!(last, Some(Outcome::Response { .. }));
                        prop_assert!(relayed_response);
                        lb.finish(st, Completion::Done, clock.now());
                        break;
                    }
                    Action::Fail(f) => {
                        match last {
                            None => prop_assert_eq!(f, Failure::NoBackend),
                            Some(Outcome::TimedOut) => prop_assert_eq!(f, Failure::GatewayTimeout),
                            Some(o) => {
                                let deadline_hit = st.attempts().last().unwrap().decision() == Some(Decision::Stop(StopReason::Deadline));
                                let expect = if deadline_hit { Failure::GatewayTimeout } else { Failure::BadGateway };
                                prop_assert_eq!(f, expect, "after {:?}", o);
                            }
                        }
                        prop_assert!(st.attempt_count() <= attempts as usize);
                        lb.abandon(st, clock.now());
                        break;
                    }
                }
            }
        }
        for b in lb.backends(clock.now()) {
            prop_assert_eq!(b.active_requests, 0);
        }
    }

    /// One request's failures can never eject a backend it did not fail on, nor more
    /// backends than it tried, even with the most trigger-happy setting (1 failure ejects).
    /// A replayed POST is impossible, so it cannot take healthy backends out.
    #[test]
    fn one_request_cannot_eject_what_it_did_not_fail_on(
        kind in kind(),
        seed in any::<u64>(),
        n in 2usize..8,
        reqs in prop::collection::vec(req(), 1..80),
    ) {
        let mut clock = Clock::new();
        let config = Config::default()
            .with_rng_seed(Some(seed))
            .with_passive(PassiveConfig::default().with_consecutive_failures(1).with_max_ejected_percent(100))
            .with_retry(RetryConfig::default().with_attempts(5));
        let (lb, _) = balancer(kind, config, &vec![1; n], clock.now());
        for r in reqs {
            clock.advance(u64::from(r.gap_ms) * 100);
            lb.handle_timeout(clock.now());
            while lb.poll_event().is_some() {}
            let (mut st, mut action) = lb.start(RequestInfo::new(r.idempotent, r.replayable), clock.now());
            let mut failed_on = BTreeSet::new();
            let mut outcomes = r.outcomes.iter().cycle();
            while let Action::Forward { backend, .. } = action {
                let o = *outcomes.next().unwrap();
                if o.is_backend_failure() {
                    failed_on.insert(backend);
                }
                action = lb.handle_outcome(&mut st, o, clock.now());
            }
            let mut ejected = BTreeSet::new();
            while let Some(e) = lb.poll_event() {
                if let Event::Ejected { backend, .. } = e {
                    ejected.insert(backend);
                }
            }
            prop_assert!(ejected.is_subset(&failed_on), "ejected {ejected:?}, failed on {failed_on:?}");
            prop_assert!(ejected.len() <= st.attempt_count());
            if !r.idempotent {
                let sent = st.attempts().iter().filter(|a| a.outcome().is_some_and(Outcome::was_sent)).count();
                prop_assert!(sent <= 1, "a POST reaches at most one backend");
            }
            lb.abandon(st, clock.now());
        }
    }

    /// Invariant 9: the same seed and the same inputs give the same actions and events.
    #[test]
    fn deterministic_for_a_seed(kind in kind(), seed in any::<u64>(), reqs in prop::collection::vec(req(), 1..60)) {
        let run = || {
            let mut clock = Clock::new();
            let config = Config::default()
                .with_rng_seed(Some(seed))
                .with_passive(PassiveConfig::default().with_consecutive_failures(2));
            let (lb, ids) = balancer(kind, config, &[1, 2, 3, 1], clock.now());
            let mut log: Vec<String> = Vec::new();
            for r in &reqs {
                clock.advance(u64::from(r.gap_ms));
                let (mut st, mut action) = lb.start(RequestInfo::new(r.idempotent, r.replayable).with_hash_key(u64::from(r.gap_ms)), clock.now());
                let mut outcomes = r.outcomes.iter().cycle();
                while let Action::Forward { backend, not_before, .. } = action {
                    let pos = ids.iter().position(|&i| i == backend);
                    log.push(format!("{pos:?} +{:?}", not_before.duration_since(clock.epoch)));
                    action = lb.handle_outcome(&mut st, *outcomes.next().unwrap(), clock.now());
                }
                log.push(format!("{action:?} {st}"));
                lb.abandon(st, clock.now());
                while let Some(e) = lb.poll_event() {
                    log.push(format!("{e}"));
                }
            }
            log
        };
        let (a, b) = (run(), run());
        prop_assert_eq!(a, b);
    }
}

/// Invariant 10, case by case.
#[test]
fn stop_mapping() {
    let clock = Clock::new();
    let now = clock.now();
    let (empty, _) = balancer(
        lb_core::select::StrategyKind::RoundRobin,
        Config::default(),
        &[],
        now,
    );
    assert_eq!(
        empty.start(RequestInfo::new(true, true), now).1,
        Action::Fail(Failure::NoBackend)
    );

    let config = Config::default().with_retry(RetryConfig::default().with_attempts(1));
    let (lb, _) = balancer(
        lb_core::select::StrategyKind::RoundRobin,
        config,
        &[1, 1],
        now,
    );
    for (outcome, want) in [
        (Outcome::TimedOut, Action::Fail(Failure::GatewayTimeout)),
        (Outcome::ConnectRefused, Action::Fail(Failure::BadGateway)),
        (Outcome::Reset, Action::Fail(Failure::BadGateway)),
        (Outcome::Response { status: 503 }, Action::Relay),
    ] {
        let (mut st, _) = lb.start(RequestInfo::new(true, true), now);
        assert_eq!(
            lb.handle_outcome(&mut st, outcome, now),
            want,
            "{outcome:?}"
        );
        lb.abandon(st, now);
    }
}

/// Budget exhaustion under a storm: every request fails to connect; retries stop at the budget.
#[test]
fn retry_storm_is_capped_by_the_budget() {
    let mut clock = Clock::new();
    let config = Config::default()
        .with_retry(
            RetryConfig::default()
                .with_budget_percent(20)
                .with_min_retries_per_second(0),
        )
        .with_passive(PassiveConfig::default().with_consecutive_failures(0));
    let (lb, _) = balancer(
        lb_core::select::StrategyKind::RoundRobin,
        config,
        &[1, 1, 1],
        clock.now(),
    );
    let (mut retries, mut denied) = (0, 0);
    for _ in 0..1000 {
        clock.advance(5);
        let (mut st, mut action) = lb.start(RequestInfo::new(true, true), clock.now());
        let mut first = true;
        while let Action::Forward { .. } = action {
            if !first {
                retries += 1;
            }
            first = false;
            action = lb.handle_outcome(&mut st, Outcome::ConnectRefused, clock.now());
        }
        if st.attempts().last().unwrap().decision()
            == Some(Decision::Stop(StopReason::BudgetExhausted))
        {
            denied += 1;
        }
        lb.abandon(st, clock.now());
    }
    // 1000 requests over 5 s, all in one window: at most 20% of them retried.
    assert!(retries <= 200, "{retries}");
    assert!(retries >= 190, "the budget is used, not wasted: {retries}");
    assert!(denied > 700);
}
