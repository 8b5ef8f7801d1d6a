//! Regression tests for defects found in review (issue 9, "Routing and reload"), through the
//! public API on a virtual clock. Each failed on the code before the fix.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::{backends, balancer, Clock};
use lb_core::select::StrategyKind;
use lb_core::{
    Action, BackendId, Balancer, Completion, Config, Decision, Event, Outcome, ProbeFailure,
    ProbeResult, RequestInfo, RetryReason,
};

/// Runs the timer if it is due, as the proxy's timer task does.
fn drive(lb: &Balancer, now: Instant) {
    if lb.poll_timeout().is_some_and(|t| t <= now) {
        lb.handle_timeout(now);
    }
}

/// One sequential request that succeeds in 1 ms; returns the backend it went to.
fn serve(lb: &Balancer, clock: &mut Clock) -> BackendId {
    drive(lb, clock.now());
    let (mut st, a) = lb.start(RequestInfo::new(true, true), clock.now());
    let Action::Forward { backend, .. } = a else {
        panic!("{a:?}")
    };
    clock.advance(1);
    let a = lb.handle_outcome(&mut st, Outcome::Response { status: 200 }, clock.now());
    assert_eq!(a, Action::Relay);
    lb.finish(st, Completion::Done, clock.now());
    backend
}

/// Sends requests until one goes first to `target`, which answers `outcome` (others: 200).
fn fail_once_on(lb: &Balancer, clock: &mut Clock, target: BackendId, outcome: Outcome) {
    for _ in 0..10_000 {
        let (mut st, mut a) = lb.start(RequestInfo::new(true, true), clock.now());
        let mut hit = false;
        while let Action::Forward { backend, .. } = a {
            clock.advance(1);
            let o = if backend == target && !hit {
                hit = true;
                outcome
            } else {
                Outcome::Response { status: 200 }
            };
            a = lb.handle_outcome(&mut st, o, clock.now());
        }
        lb.finish(st, Completion::Done, clock.now());
        if hit {
            return;
        }
    }
    panic!("{target} got none of 10,000 requests");
}

/// Sequential requests every 10 ms for `secs` seconds; A's picks in the second half.
fn share_of_second_half(lb: &Balancer, clock: &mut Clock, a: BackendId, secs: u64) -> (u32, u32) {
    let n = secs * 100;
    let (mut hits, mut total) = (0, 0);
    for i in 0..n {
        let b = serve(lb, clock);
        clock.advance(9);
        if i >= n / 2 {
            total += 1;
            hits += u32::from(b == a);
        }
    }
    (hits, total)
}

/// SPEC: a backend that failed and then serves well gets its even share back within 10 s.
/// Before, one refused connect or one 503 counted as load forever under least-connections
/// and p2c-ewma: A got 0 of the next 1,000 sequential requests.
#[test]
fn one_failure_does_not_starve_a_backend_under_load_aware_strategies() {
    for kind in [StrategyKind::LeastConnections, StrategyKind::P2cEwma] {
        for outcome in [Outcome::ConnectRefused, Outcome::Response { status: 503 }] {
            let mut clock = Clock::new();
            let config = Config::default().with_rng_seed(Some(3));
            let (lb, ids) = balancer(kind, config, &[1, 1], clock.now());
            fail_once_on(&lb, &mut clock, ids[0], outcome);
            // 1,000 requests over the next 10 s; over the last 5 s A is back to half.
            let (hits, total) = share_of_second_half(&lb, &mut clock, ids[0], 10);
            assert!(
                (200..=300).contains(&hits),
                "{kind} after {outcome}: A got {hits} of the last {total}"
            );
        }
    }
}

/// The same after an ejection and its expiry (before: 0 of the next 10,000). Slow start is
/// off here: a ramp is a deliberate, configured reduction, tested on its own below.
#[test]
fn an_ejected_backend_gets_its_share_back_after_restore() {
    for kind in [StrategyKind::LeastConnections, StrategyKind::P2cEwma] {
        let mut clock = Clock::new();
        let mut config = Config::default().with_rng_seed(Some(5));
        {
            let p = config.passive().with_slow_start(Duration::ZERO);
            config = config.with_passive(p);
        }
        let failures = config.passive().consecutive_failures();
        let (lb, ids) = balancer(kind, config, &[1, 1], clock.now());
        for _ in 0..failures {
            fail_once_on(&lb, &mut clock, ids[0], Outcome::ConnectRefused);
            drive(&lb, clock.now());
        }
        let mut ejected = false;
        while let Some(e) = lb.poll_event() {
            ejected |= matches!(e, Event::Ejected { backend, .. } if backend == ids[0]);
        }
        assert!(ejected, "{kind}: five refused connects eject A");
        // Ten seconds of traffic (A ejected), then ten more once it is back.
        let (hits, _) = share_of_second_half(&lb, &mut clock, ids[0], 10);
        assert!(hits < 10, "{kind}: A ejected, got {hits}");
        let (hits, total) = share_of_second_half(&lb, &mut clock, ids[0], 10);
        assert!(
            (200..=300).contains(&hits),
            "{kind} after restore: A got {hits} of the last {total}"
        );
    }
}

fn picks_on_two_threads(seed: Option<u64>) -> (Vec<BackendId>, Vec<BackendId>) {
    let clock = Clock::new();
    let config = Config::default().with_rng_seed(seed);
    let (lb, _) = balancer(StrategyKind::Random, config, &[1; 16], clock.now());
    let run = || {
        (0..200)
            .map(|_| {
                let (st, a) = lb.start(RequestInfo::new(true, true), clock.now());
                lb.abandon(st, clock.now());
                match a {
                    Action::Forward { backend, .. } => backend,
                    other => panic!("{other:?}"),
                }
            })
            .collect::<Vec<_>>()
    };
    std::thread::scope(|s| {
        let a = s.spawn(run);
        let b = s.spawn(run);
        (a.join().unwrap(), b.join().unwrap())
    })
}

/// Before, the per-request seed came from the balancer seed, the second and a per-thread
/// stripe counter: two threads drew identical picks, 200 of 200, even with no seed.
#[test]
fn per_request_randomness_differs_across_threads_and_replays_from_the_seed() {
    for seed in [None, Some(11)] {
        let (a, b) = picks_on_two_threads(seed);
        let same = a.iter().zip(&b).filter(|(x, y)| x == y).count();
        // Independent uniform picks over 16 agree about 12.5 times in 200.
        assert!(same < 40, "seed {seed:?}: {same} of 200 picks identical");
    }
    // Reproducible: the same seed and the same inputs on one thread give the same picks.
    let one = |seed| {
        let clock = Clock::new();
        let config = Config::default().with_rng_seed(Some(seed));
        let (lb, ids) = balancer(StrategyKind::Random, config, &[1; 16], clock.now());
        (0..200)
            .map(|_| {
                let (st, a) = lb.start(RequestInfo::new(true, true), clock.now());
                lb.abandon(st, clock.now());
                let Action::Forward { backend, .. } = a else {
                    panic!()
                };
                ids.iter().position(|&i| i == backend).unwrap()
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(one(11), one(11));
    assert_ne!(one(11), one(12));
}

/// SPEC: slow start applies to every strategy but consistent-hash. Before, round robin (the
/// default) ignored it: a backend at 10 % got 50 of 100 picks. Requests are held in flight
/// so the load-aware strategies see the load the ramp weighs.
#[test]
fn slow_start_applies_to_every_strategy_but_consistent_hash() {
    for kind in StrategyKind::ALL {
        let clock = Clock::new();
        let config = Config::default().with_rng_seed(Some(9));
        let (lb, _) = balancer(kind, config, &[1], clock.now());
        let ids = lb.set_backends(backends(&[1, 1]), clock.now()).unwrap();
        let (old, new) = (ids[0], ids[1]);
        let percent = lb.backends(clock.now())[1].weight_percent;
        let mut held = Vec::new();
        let mut got: HashMap<BackendId, u32> = HashMap::new();
        for k in 0..1100u64 {
            let info =
                RequestInfo::new(true, true).with_hash_key(k.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let (st, a) = lb.start(info, clock.now());
            let Action::Forward { backend, .. } = a else {
                panic!("{kind}: {a:?}")
            };
            *got.entry(backend).or_default() += 1;
            held.push(st);
        }
        let share = f64::from(got.get(&new).copied().unwrap_or(0)) / 1100.0;
        assert!(got.contains_key(&old));
        if kind == StrategyKind::ConsistentHash {
            assert_eq!(percent, 100, "{kind}: no ramp");
            assert!(
                (0.4..0.6).contains(&share),
                "{kind}: new backend got {share:.3}"
            );
        } else {
            assert_eq!(percent, 10, "{kind}");
            // 10 % beside 100 %: 1 in 11.
            assert!(
                (0.05..0.14).contains(&share),
                "{kind}: new backend at 10 % got {share:.3}"
            );
        }
        drop(held);
        assert!(lb
            .backends(clock.now())
            .iter()
            .all(|b| b.active_requests == 0));
    }
}

/// A `RequestState` dropped without `finish`/`abandon` (a cancelled future, a panic) gave
/// its in-flight slot back never: active requests only grew.
#[test]
fn dropped_request_state_releases_its_in_flight_slot() {
    for kind in StrategyKind::ALL {
        let mut clock = Clock::new();
        let mut config = Config::default();
        {
            let p = config.passive().with_slow_start(Duration::ZERO);
            config = config.with_passive(p);
        } // the third backend takes its share at once
        let (lb, _) = balancer(kind, config, &[1, 1], clock.now());
        let active = |lb: &Balancer| -> u32 {
            lb.backends(Clock::new().now())
                .iter()
                .map(|b| b.active_requests)
                .sum()
        };
        // Mid-attempt.
        let (st, _) = lb.start(RequestInfo::new(true, true), clock.now());
        assert_eq!(active(&lb), 1);
        drop(st);
        assert_eq!(active(&lb), 0, "{kind}");
        // After a retry, mid-attempt on the second backend.
        let (mut st, _) = lb.start(RequestInfo::new(true, true), clock.now());
        let a = lb.handle_outcome(&mut st, Outcome::ConnectRefused, clock.now());
        assert!(matches!(a, Action::Forward { .. }), "{kind}: {a:?}");
        drop(st);
        assert_eq!(active(&lb), 0, "{kind}");
        // After the response, while the body streams.
        let (mut st, _) = lb.start(RequestInfo::new(true, true), clock.now());
        let _ = lb.handle_outcome(&mut st, Outcome::Response { status: 200 }, clock.now());
        drop(st);
        assert_eq!(active(&lb), 0, "{kind}");
        // Across a reload in between that keeps the backend (and adds one).
        let (st, _) = lb.start(RequestInfo::new(true, true), clock.now());
        clock.advance(5);
        lb.set_backends(backends(&[1, 1, 1]), clock.now()).unwrap();
        lb.handle_timeout(clock.now());
        drop(st);
        assert_eq!(active(&lb), 0, "{kind}: after a reload in between");
        // The balancer still balances: a least-loaded pick is not stuck on a phantom load
        // (once the refused connect above has faded).
        clock.advance(6_000);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..30 {
            seen.insert(serve(&lb, &mut clock));
        }
        assert_eq!(seen.len(), 3, "{kind}: {:?}", lb.backends(clock.now()));
    }
}

/// An ejection on the request path rebuilt the snapshot and the strategy's table inline,
/// under the control lock (0.65 s for Maglev at 10,000 backends). Now the request path only
/// hides the backend; the rebuild is the timer's. Observable: the next picks still choose
/// among the old candidate set (its size is in the trace) but never the ejected backend, and
/// the timer is due at once.
#[test]
fn ejection_defers_the_rebuild_to_the_timer_and_hides_the_backend_at_once() {
    for kind in StrategyKind::ALL {
        let clock = Clock::new();
        let mut config = Config::default().with_rng_seed(Some(1));
        {
            let p = config.passive().with_consecutive_failures(1);
            config = config.with_passive(p);
        }
        let (lb, ids) = balancer(kind, config, &[1, 2, 3, 1], clock.now());
        assert_eq!(lb.poll_timeout(), None);
        let now = clock.now();
        let (mut st, a) = lb.start(RequestInfo::new(true, true).with_hash_key(7), now);
        let Action::Forward { backend: bad, .. } = a else {
            panic!()
        };
        let _ = lb.handle_outcome(&mut st, Outcome::ConnectRefused, now);
        lb.abandon(st, now);
        assert!(matches!(lb.poll_event(), Some(Event::Ejected { backend, .. }) if backend == bad));
        assert_eq!(
            lb.poll_timeout(),
            Some(now),
            "{kind}: rebuild due at once, on the timer"
        );
        for k in 0..200u64 {
            let (st, a) = lb.start(RequestInfo::new(true, true).with_hash_key(k), now);
            let Action::Forward { backend, .. } = a else {
                panic!()
            };
            assert_ne!(
                backend, bad,
                "{kind}: ejected backend picked before the rebuild"
            );
            assert_eq!(
                st.attempts()[0].pick().candidates(),
                4,
                "{kind}: not rebuilt inline"
            );
            lb.abandon(st, now);
        }
        lb.handle_timeout(now);
        let (st, _) = lb.start(RequestInfo::new(true, true), now);
        assert_eq!(
            st.attempts()[0].pick().candidates(),
            3,
            "{kind}: rebuilt by the timer"
        );
        drop(st);
        assert!(ids.contains(&bad));
    }
}

/// Slow start does not apply to consistent hashing, so a reload that adds a backend
/// schedules no ramp steps (before: ten timer turns, each rebuilding the Maglev table).
#[test]
fn consistent_hash_schedules_no_slow_start_steps() {
    let clock = Clock::new();
    let (lb, _) = balancer(
        StrategyKind::ConsistentHash,
        Config::default(),
        &[1, 1],
        clock.now(),
    );
    lb.set_backends(backends(&[1, 1, 1]), clock.now()).unwrap();
    assert_eq!(lb.poll_timeout(), None);
    assert!(lb
        .backends(clock.now())
        .iter()
        .all(|b| b.weight_percent == 100));
    // Under any other strategy the ramp is scheduled.
    let (lb, _) = balancer(
        StrategyKind::Random,
        Config::default(),
        &[1, 1],
        clock.now(),
    );
    lb.set_backends(backends(&[1, 1, 1]), clock.now()).unwrap();
    assert_eq!(
        lb.poll_timeout(),
        Some(clock.now() + Duration::from_secs(3))
    );
}

/// Panic mode said "ignoring ejections" also when the shortfall came from probe-down
/// backends, where it changes nothing. The event now says what it does.
#[test]
fn panic_event_says_whether_it_ignores_ejections() {
    let clock = Clock::new();
    let (lb, ids) = balancer(
        StrategyKind::RoundRobin,
        Config::default(),
        &[1, 1, 1, 1],
        clock.now(),
    );
    for id in &ids[..3] {
        for _ in 0..3 {
            lb.handle_probe(
                *id,
                ProbeResult::Failure(ProbeFailure::Refused),
                clock.now(),
            );
        }
    }
    let panic: Vec<Event> = std::iter::from_fn(|| lb.poll_event())
        .filter(|e| matches!(e, Event::Panic { .. }))
        .collect();
    assert!(
        matches!(
            panic[..],
            [Event::Panic {
                on: true,
                eligible: 1,
                total: 4,
                down: 3,
                ignored: 0,
                ..
            }]
        ),
        "{panic:?}"
    );
    assert_eq!(
        panic[0].to_string(),
        "panic mode on: 1 of 4 backends eligible, 3 down by probes; no ejection to ignore, so nothing changes"
    );

    // Two backends, one ejected: 1 of 2 eligible is below a 60 % threshold, and panic mode
    // does send traffic to the ejected one.
    let mut config = Config::default();
    {
        let p = config.passive().with_consecutive_failures(1);
        config = config.with_passive(p);
    }
    {
        let p = config.passive().with_panic_threshold_percent(60);
        config = config.with_passive(p);
    }
    let (lb, ids) = balancer(StrategyKind::RoundRobin, config, &[1, 1], clock.now());
    let (mut st, _) = lb.start(RequestInfo::new(true, true), clock.now());
    let _ = lb.handle_outcome(&mut st, Outcome::ConnectRefused, clock.now());
    lb.abandon(st, clock.now());
    let events: Vec<Event> = std::iter::from_fn(|| lb.poll_event()).collect();
    let panic = events
        .iter()
        .find(|e| matches!(e, Event::Panic { .. }))
        .unwrap();
    assert_eq!(
        panic.to_string(),
        "panic mode on: 1 of 2 backends eligible (0 down by probes), ignoring 1 ejection"
    );
    let mut seen = std::collections::HashSet::new();
    for _ in 0..4 {
        let (st, a) = lb.start(RequestInfo::new(true, true), clock.now());
        if let Action::Forward { backend, .. } = a {
            seen.insert(backend);
        }
        lb.abandon(st, clock.now());
    }
    assert_eq!(
        seen.len(),
        2,
        "panic mode balances over the ejected one too: {ids:?}"
    );
}

/// The caller gets the decision behind each action directly (before: fished out of the
/// trace by index).
#[test]
fn last_decision_is_the_one_behind_the_action() {
    let clock = Clock::new();
    let (lb, _) = balancer(
        StrategyKind::RoundRobin,
        Config::default(),
        &[1, 1],
        clock.now(),
    );
    let (mut st, _) = lb.start(RequestInfo::new(true, true), clock.now());
    assert_eq!(st.last_decision(), None);
    let a = lb.handle_outcome(&mut st, Outcome::ConnectRefused, clock.now());
    assert!(matches!(a, Action::Forward { .. }));
    assert_eq!(
        st.last_decision(),
        Some(Decision::Retry(RetryReason::NotSent))
    );
    let a = lb.handle_outcome(&mut st, Outcome::Response { status: 200 }, clock.now());
    assert_eq!(a, Action::Relay);
    assert_eq!(st.last_decision(), Some(Decision::Relay));
    lb.finish(st, Completion::Done, clock.now());
}
