//! Hostile review (review3): adversarial sequences through lb-core's public API on a virtual
//! clock. Tests marked `#[ignore = "defect: ..."]` fail on the reviewed code and document a
//! defect; run them with `cargo test -p lb-core --test review -- --ignored`.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::{backends, balancer, Clock};
use lb_core::select::{ConsistentHash, StrategyKind};
use lb_core::{
    Action, BackendId, Balancer, Completion, Config, Outcome, RequestInfo, RetryConfig,
};

fn drive<S: lb_core::select::Select>(lb: &Balancer<S>, now: Instant) {
    if lb.poll_timeout().is_some_and(|t| t <= now) {
        lb.handle_timeout(now);
    }
}

fn no_slow_start(config: Config) -> Config {
    let p = config.passive().with_slow_start(Duration::ZERO);
    config.with_passive(p)
}

fn no_ejection(config: Config) -> Config {
    let p = config.passive().with_consecutive_failures(0);
    config.with_passive(p)
}

/// One request at `now` whose first attempt is refused; returns whether the core retried it.
fn refused_once_retried(lb: &Balancer, now: Instant) -> bool {
    let (mut st, a) = lb.start(RequestInfo::new(true, true), now);
    assert!(matches!(a, Action::Forward { .. }), "{a:?}");
    let a = lb.handle_outcome(&mut st, Outcome::ConnectRefused, now);
    let retried = matches!(a, Action::Forward { .. });
    lb.abandon(st, now);
    retried
}

/// SPEC fine print / STYLE invariant 7: over the last 10 s, retries <= budget_percent % of
/// requests + min_retries_per_second x 10. Here the floor is 10 and the percent 0, so no
/// 10 s window may hold more than 10 retries. A request whose `now` was read a few
/// milliseconds before a second boundary (a thread preempted between reading the clock and
/// calling in, or simply an `Instant` earlier than a previous call) is counted against a
/// window that ignores the newer second's retries, and gets a token anyway.
#[test]
#[ignore = "defect: retry budget ignores newer buckets for an earlier `now` (budget.rs withdraw: `s <= sec`), 20 retries in a 10 s window with a budget of 10"]
fn budget_holds_when_now_is_slightly_earlier_than_a_previous_call() {
    let clock = Clock::new();
    let retry = RetryConfig::default()
        .with_budget_percent(0)
        .with_min_retries_per_second(1)
        .with_backoff(Duration::ZERO);
    let config = no_ejection(Config::default().with_retry(retry).with_rng_seed(Some(1)));
    let (lb, _) = balancer(StrategyKind::RoundRobin, config, &[1, 1], clock.now());
    let mut retries = 0;
    // 15.000 s: the floor's 10 tokens are spent.
    for _ in 0..20 {
        retries += u32::from(refused_once_retried(&lb, clock.at(15_000)));
    }
    assert_eq!(retries, 10, "floor of 10 per 10 s");
    // 14.990 s: 10 ms earlier, inside the same 10 s window as everything above.
    for _ in 0..20 {
        retries += u32::from(refused_once_retried(&lb, clock.at(14_990)));
    }
    assert!(
        retries <= 10,
        "{retries} retries within 10 ms, budget allows 10 per 10 s"
    );
}

/// Same root cause, worse: one call with an `Instant` 10 s older than the previous ones
/// resets the ring bucket the newer second lives in, and the whole window's retries are
/// forgotten.
#[test]
#[ignore = "defect: a `now` 10 s older than a previous call wipes the current budget bucket (budget.rs bucket() resets any slot whose sec differs, also to an older sec)"]
fn budget_is_not_reset_by_an_old_instant() {
    let clock = Clock::new();
    let retry = RetryConfig::default()
        .with_budget_percent(0)
        .with_min_retries_per_second(1)
        .with_backoff(Duration::ZERO);
    let config = no_ejection(Config::default().with_retry(retry).with_rng_seed(Some(1)));
    let (lb, _) = balancer(StrategyKind::RoundRobin, config, &[1, 1], clock.now());
    let mut retries = 0;
    for _ in 0..20 {
        retries += u32::from(refused_once_retried(&lb, clock.at(15_000)));
    }
    assert_eq!(retries, 10);
    // One stale request (say a late handle_outcome with the request's start time).
    let (st, _) = lb.start(RequestInfo::new(true, true), clock.at(5_500));
    lb.abandon(st, clock.at(5_500));
    for _ in 0..20 {
        retries += u32::from(refused_once_retried(&lb, clock.at(15_100)));
    }
    assert!(retries <= 10, "{retries} retries in 100 ms, budget 10 per 10 s");
}

/// Sequential traffic (one request at a time, 1 ms each, every 10 ms) for `ms` from `from`;
/// returns how many went to `target`.
fn sequential_share(lb: &Balancer, clock: &mut Clock, target: BackendId, n: u32) -> u32 {
    let mut hits = 0;
    for _ in 0..n {
        drive(lb, clock.now());
        let (mut st, a) = lb.start(RequestInfo::new(true, true), clock.now());
        let Action::Forward { backend, .. } = a else {
            panic!("{a:?}")
        };
        hits += u32::from(backend == target);
        clock.advance(1);
        assert_eq!(
            lb.handle_outcome(&mut st, Outcome::Response { status: 200 }, clock.now()),
            Action::Relay
        );
        lb.finish(st, Completion::Done, clock.now());
        clock.advance(9);
    }
    hits
}

/// SPEC fine print: "Slow start ramps a returning backend's weight linearly from 10 % to
/// 100 % over `slow_start`", and it "applies to every strategy but consistent-hash". Under
/// least-connections and p2c-ewma with light (sequential) traffic, the ramping backend gets
/// nothing at all for the whole ramp: the load `in_flight + errors + 1` divided by the
/// effective weight makes an idle backend at 10 % (or 55 %) always lose to an idle one at
/// 100 %. The ramp is a cliff at the end, not a ramp; the existing regression test only
/// checks it with requests held in flight.
#[test]
#[ignore = "defect: least-connections/p2c-ewma give a ramping backend 0 % under sequential traffic (select/least_conn.rs order, select/p2c.rs cost: (in_flight+1)/weight)"]
fn slow_start_ramps_under_load_aware_strategies_with_sequential_traffic() {
    let mut failures = Vec::new();
    for kind in [StrategyKind::LeastConnections, StrategyKind::P2cEwma] {
        let mut clock = Clock::new();
        let config = Config::default().with_rng_seed(Some(4));
        let (lb, _) = balancer(kind, config, &[1], clock.now());
        let ids = lb.set_backends(backends(&[1, 1]), clock.now()).unwrap();
        let new = ids[1];
        // First 2 s of a 30 s ramp: at 10 %, 1 in 11 is ~18 of 200.
        let early = sequential_share(&lb, &mut clock, new, 200);
        // Around the middle (15-17 s): at 55 %, 55/155 of 200 is ~71.
        clock.ms = 15_000;
        let mid = sequential_share(&lb, &mut clock, new, 200);
        if !(5..=40).contains(&early) || !(40..=100).contains(&mid) {
            failures.push(format!("{kind}: ramping backend got {early}/200 at 10 %, {mid}/200 at 55 %"));
        }
    }
    assert!(failures.is_empty(), "{failures:?}");
}

/// The same mechanism without slow start: weighted least-connections with weights 1 and 2
/// and sequential traffic never sends anything to the weight-1 backend (both idle: load
/// 1/1 against 1/2). A healthy backend starved by its weight (issue 9 §1's "least-
/// connections starves a healthy backend", by another road).
#[test]
#[ignore = "defect: weighted least-connections starves the lighter backend under sequential traffic (select/least_conn.rs LcTable::order: (in_flight+1)/weight)"]
fn weighted_least_connections_does_not_starve_the_lighter_backend() {
    let mut clock = Clock::new();
    let config = no_slow_start(Config::default().with_rng_seed(Some(4)));
    let (lb, ids) = balancer(StrategyKind::LeastConnections, config, &[1, 2], clock.now());
    let light = sequential_share(&lb, &mut clock, ids[0], 300);
    // Any weighted share: 1/3 of 300 is 100.
    assert!(light >= 50, "weight-1 backend got {light} of 300");
}

/// SPEC: slow start applies to every strategy but consistent-hash. Through `AnySelect` that
/// holds, but `ConsistentHash` used directly as the strategy (it is public and implements
/// `Select`) keeps the trait's default `slow_start() == true`: a new backend shows 10 %, ten
/// ramp steps are scheduled and each rebuilds the Maglev table (issue 9 §1: "at each of the
/// 10 slow-start steps (which consistent hashing ignores)").
#[test]
#[ignore = "defect: ConsistentHash does not override Select::slow_start (select/consistent_hash.rs), only AnySelect does (select/mod.rs)"]
fn consistent_hash_used_directly_has_no_slow_start() {
    let clock = Clock::new();
    let lb = Balancer::new(Config::default(), ConsistentHash).unwrap();
    lb.set_backends(backends(&[1]), clock.now()).unwrap();
    lb.set_backends(backends(&[1, 1]), clock.now()).unwrap();
    lb.handle_timeout(clock.now());
    let st = lb.backends(clock.now());
    assert_eq!(st[1].weight_percent, 100, "no ramp under consistent-hash");
    assert_eq!(lb.poll_timeout(), None, "no slow-start steps scheduled");
}
