//! Adversarial sequences through lb-core's public API on a virtual
//! clock. Tests marked `#[ignore = "known limitation, see README: ..."]` fail on purpose and
//! document a known limitation; run them with
//! `cargo test -p lb-core --test adversarial -- --ignored`.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::{backends, balancer, Clock};
use lb_core::select::{ConsistentHash, StrategyKind};
use lb_core::{Action, BackendId, Balancer, Completion, Config, Outcome, RequestInfo, RetryConfig};

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
    assert!(
        retries <= 10,
        "{retries} retries in 100 ms, budget 10 per 10 s"
    );
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
#[ignore = "known limitation, see README: least-connections/p2c-ewma give a ramping backend 0 % under sequential traffic (select/least_conn.rs order, select/p2c.rs cost: (in_flight+1)/weight)"]
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
            failures.push(format!(
                "{kind}: ramping backend got {early}/200 at 10 %, {mid}/200 at 55 %"
            ));
        }
    }
    assert!(failures.is_empty(), "{failures:?}");
}

/// The same mechanism without slow start: weighted least-connections with weights 1 and 2
/// and sequential traffic never sends anything to the weight-1 backend (both idle: load
/// 1/1 against 1/2). A healthy backend starved by its weight (issue 9 §1's "least-
/// connections starves a healthy backend", by another road).
#[test]
#[ignore = "known limitation, see README: weighted least-connections starves the lighter backend under sequential traffic (select/least_conn.rs LcTable::order: (in_flight+1)/weight)"]
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

// --- a state machine with many requests open at once ---

use common::Model;
use lb_core::{Event, PassiveConfig, ProbeFailure, ProbeResult};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    /// idempotent, replayable, key, deadline in ms (0: none)
    Start(bool, bool, u64, u16),
    /// request slot, outcome kind
    Outcome(usize, u8),
    Finish(usize, u8),
    Abandon(usize),
    Drop(usize),
    /// request slot, whether the dead pooled connection may have written the request
    Resend(usize, bool),
    Probe(usize, bool),
    /// ms forward (or backward when negative)
    Advance(i16),
    Timer,
    /// membership mask over 6 addresses, weight seed
    Set(u8, u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (any::<bool>(), any::<bool>(), any::<u64>(), 0u16..400).prop_map(|(i, r, k, d)| Op::Start(i, r, k, d)),
        5 => (0usize..16, 0u8..8).prop_map(|(s, o)| Op::Outcome(s, o)),
        1 => (0usize..16, 0u8..3).prop_map(|(s, c)| Op::Finish(s, c)),
        1 => (0usize..16).prop_map(Op::Abandon),
        1 => (0usize..16).prop_map(Op::Drop),
        1 => (0usize..16, any::<bool>()).prop_map(|(s, sent)| Op::Resend(s, sent)),
        2 => (0usize..6, any::<bool>()).prop_map(|(b, ok)| Op::Probe(b, ok)),
        2 => (-2000i16..8000).prop_map(Op::Advance),
        1 => Just(Op::Timer),
        1 => (1u8..64, any::<u8>()).prop_map(|(m, w)| Op::Set(m, w)),
    ]
}

fn outcome(k: u8) -> Outcome {
    match k {
        0 | 1 => Outcome::Response { status: 200 },
        2 => Outcome::Response { status: 503 },
        3 => Outcome::ConnectRefused,
        4 => Outcome::ConnectTimeout,
        5 => Outcome::Reset,
        6 => Outcome::TimedOut,
        _ => Outcome::StaleConnection,
    }
}

struct Live {
    st: lb_core::RequestState,
    resends: u32,
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Invariants 1, 4, 5, 6 and 9 with up to 16 requests open at once, ejections firing
    /// between picks with no handle_timeout, membership changes (including removing and
    /// re-adding an address) with requests in flight, clock jumps backwards, resends, and
    /// requests ended by finish, abandon or drop. After every step each member's
    /// `active_requests` equals the number of open requests whose attempt is on it.
    #[test]
    fn open_requests_reloads_and_clock_jumps(
        kind in common::kind(),
        seed in any::<u64>(),
        ops in prop::collection::vec(op(), 1..250),
    ) {
        let mut clock = Clock::new();
        clock.ms = 10_000;
        let config = Config::default()
            .with_rng_seed(Some(seed))
            .with_passive(PassiveConfig::default().with_consecutive_failures(2).with_max_ejected_percent(60));
        let attempts = config.retry().attempts() as usize;
        let (rise, fall, threshold) = (config.health().rise(), config.health().fall(), config.passive().panic_threshold_percent());
        let addrs: Vec<String> = (0..6).map(|i| format!("10.9.0.{i}:80")).collect();
        let lb = Balancer::new(config, lb_core::select::AnySelect::new(kind)).unwrap();
        let mut mask = 0b111u8;
        let set = |mask: u8, w: u8| -> Vec<lb_core::Backend> {
            (0..6).filter(|i| mask & (1 << i) != 0)
                .map(|i| lb_core::Backend::new(addrs[i].clone(), lb_core::Weight::new(1 + u32::from((w >> i) & 3)).unwrap()))
                .collect()
        };
        let mut ids = lb.set_backends(set(mask, 0), clock.now()).unwrap();
        let mut by_addr: HashMap<usize, BackendId> = HashMap::new();
        for (k, i) in (0..6).filter(|i| mask & (1 << i) != 0).enumerate() { by_addr.insert(i, ids[k]); }
        let mut model = Model::new(&ids, rise, fall);
        let mut live: Vec<Option<Live>> = (0..16).map(|_| None).collect();
        let mut all_ever: Vec<BackendId> = ids.clone();

        macro_rules! events { () => { while let Some(e) = lb.poll_event() { model.apply(&e); } } }
        macro_rules! check_forward { ($a:expr, $st:expr, $now:expr) => {
            if let Action::Forward { backend, not_before, try_deadline } = $a {
                prop_assert!(model.members.contains(&backend), "removed backend {backend} picked ({kind})");
                prop_assert!(model.up(backend), "probe-down backend {backend} picked ({kind})");
                let eligible = model.eligible();
                let tried: Vec<BackendId> = $st.attempts()[..$st.attempt_count() - 1].iter().map(|a| a.backend()).collect();
                if !model.panic(threshold) && eligible.iter().any(|id| !tried.contains(id)) {
                    prop_assert!(eligible.contains(&backend), "ejected {backend} picked, eligible {eligible:?} ({kind})");
                }
                if !model.panic(threshold) && eligible.iter().any(|id| !tried.contains(id)) {
                    prop_assert!(!tried.contains(&backend), "retry on tried {backend}, eligible {eligible:?} tried {tried:?} ({kind})");
                }
                prop_assert!(not_before >= $now && not_before < try_deadline, "invariant 5 ({kind})");
                if let Some(d) = $st.info().deadline() { prop_assert!(try_deadline <= d); }
                prop_assert!($st.attempt_count() <= attempts, "invariant 4");
            }
        } }

        for op in ops {
            let now = clock.now();
            match op {
                Op::Start(idem, rep, key, dl) => {
                    if let Some(slot) = live.iter().position(Option::is_none) {
                        let mut info = RequestInfo::new(idem, rep).with_hash_key(key);
                        if dl > 0 { info = info.with_deadline(now + Duration::from_millis(u64::from(dl))); }
                        let (st, a) = lb.start(info, now);
                        check_forward!(a, st, now);
                        events!();
                        live[slot] = Some(Live { st, resends: 0 });
                    }
                }
                Op::Outcome(slot, k) => {
                    if let Some(l) = live[slot].as_mut() {
                        let o = outcome(k);
                        let had = l.st.in_flight().is_some() && l.st.last_decision().is_none_or(|d| !matches!(d, lb_core::Decision::Relay));
                        let before = l.st.attempt_count();
                        let a = lb.handle_outcome(&mut l.st, o, now);
                        events!();
                        check_forward!(a, l.st, now);
                        if had && o.was_sent() && !matches!(o, Outcome::Response { .. }) && !(l.st.info().idempotent() && l.st.info().replayable()) {
                            prop_assert!(!matches!(a, Action::Forward { .. }), "sent non-idempotent/non-replayable request replayed after {o}");
                        }
                        if !had { prop_assert_eq!(l.st.attempt_count(), before, "outcome with nothing in flight changed the trace"); }
                        if matches!(a, Action::Fail(_)) { prop_assert!(l.st.in_flight().is_none()); }
                    }
                }
                Op::Finish(slot, c) => {
                    if let Some(l) = live[slot].take() {
                        let c = [Completion::Done, Completion::BackendFailed, Completion::ClientGone][c as usize];
                        lb.finish(l.st, c, now);
                        events!();
                    }
                }
                Op::Abandon(slot) => { if let Some(l) = live[slot].take() { lb.abandon(l.st, now); events!(); } }
                Op::Drop(slot) => { drop(live[slot].take()); }
                Op::Resend(slot, sent) => {
                    if let Some(l) = live[slot].as_mut() {
                        let how = if sent { Outcome::Reset } else { Outcome::StaleConnection };
                        let ok = lb.handle_resend(&mut l.st, how, now);
                        if ok {
                            l.resends += 1;
                            prop_assert!(l.resends <= 1, "two resends for one request");
                            prop_assert!(!sent || (l.st.info().idempotent() && l.st.info().replayable()), "resend of a sent non-idempotent/non-replayable request");
                            prop_assert!(l.st.in_flight().is_some());
                        }
                    }
                }
                Op::Probe(i, ok) => {
                    if let Some(&id) = by_addr.get(&i) {
                        let r = if ok { ProbeResult::Success } else { ProbeResult::Failure(ProbeFailure::TimedOut) };
                        let flip = model.probe(id, ok);
                        lb.handle_probe(id, r, now);
                        let mut seen = None;
                        while let Some(e) = lb.poll_event() {
                            match &e {
                                Event::Down { backend, .. } if *backend == id => seen = Some(false),
                                Event::Up { backend, .. } if *backend == id => seen = Some(true),
                                _ => {}
                            }
                            model.apply(&e);
                        }
                        prop_assert_eq!(seen, flip);
                    }
                }
                Op::Advance(d) => {
                    clock.ms = (clock.ms as i64 + i64::from(d)).max(0) as u64;
                }
                Op::Timer => {
                    lb.handle_timeout(now);
                    events!();
                }
                Op::Set(m, w) => {
                    mask = m;
                    ids = lb.set_backends(set(mask, w), now).unwrap();
                    by_addr.clear();
                    for (k, i) in (0..6).filter(|i| mask & (1 << i) != 0).enumerate() { by_addr.insert(i, ids[k]); }
                    for id in &ids { if !all_ever.contains(id) { all_ever.push(*id); } }
                    model.set_members(&ids);
                    events!();
                }
            }
            // Exact in-flight accounting for current members.
            let status = lb.backends(clock.now());
            for b in &status {
                let open = live.iter().flatten().filter(|l| l.st.in_flight() == Some(b.id)).count() as u32;
                prop_assert_eq!(b.active_requests, open, "active_requests of {} ({})", b.id, kind);
            }
        }
        drop(live);
        for b in lb.backends(clock.now()) {
            prop_assert_eq!(b.active_requests, 0, "in-flight returns to 0");
        }
    }
}

// --- several threads sharing one Balancer ---

/// Four request threads and a control thread (reloads that remove and re-add an address,
/// probes, timers) share one balancer. A retired id (its address removed by a
/// `set_backends` that returned) is never picked afterwards, and every in-flight count
/// returns to exactly 0 once the threads are done, whatever mix of outcomes, finish,
/// abandon and drop they used.
#[test]
fn threads_share_one_balancer_reloading_underneath() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Mutex;
    for kind in StrategyKind::ALL {
        let clock = Clock::new();
        let config = Config::default()
            .with_rng_seed(Some(21))
            .with_passive(PassiveConfig::default().with_consecutive_failures(3));
        let (lb, _) = balancer(kind, config, &[1, 2, 1, 1], clock.now());
        let retired: Mutex<Vec<BackendId>> = Mutex::new(Vec::new());
        let stop = AtomicBool::new(false);
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let (lb, retired, stop) = (&lb, &retired, &stop);
                s.spawn(move || {
                    let mut rng = lb_core::Rng::from_seed(t);
                    let mut held = Vec::new();
                    let mut ms = 0u64;
                    while !stop.load(Ordering::Acquire) || ms < 2_000 {
                        ms += 1;
                        let now = clock.at(ms);
                        let gone: Vec<BackendId> = retired.lock().unwrap().clone();
                        let (mut st, mut a) = lb.start(
                            RequestInfo::new(rng.below(4) != 0, true).with_hash_key(rng.next_u64()),
                            now,
                        );
                        while let Action::Forward { backend, .. } = a {
                            assert!(!gone.contains(&backend), "{kind}: retired {backend} picked");
                            let o = outcome(rng.below(8) as u8);
                            a = lb.handle_outcome(&mut st, o, now);
                        }
                        match rng.below(4) {
                            0 => lb.finish(st, Completion::Done, now),
                            1 => lb.abandon(st, now),
                            2 => drop(st),
                            _ => held.push(st),
                        }
                        if held.len() > 20 {
                            held.clear();
                        }
                    }
                });
            }
            let (lb, retired, stop) = (&lb, &retired, &stop);
            s.spawn(move || {
                for round in 0..200u64 {
                    let now = clock.at(round * 10);
                    let with = round % 2 == 0;
                    let w: &[u32] = if with { &[1, 2, 1, 1, 3] } else { &[1, 2, 1] };
                    let before = lb.backends(now);
                    let ids = lb.set_backends(backends(w), now).unwrap();
                    let mut r = retired.lock().unwrap();
                    for b in before {
                        if !ids.contains(&b.id) {
                            r.push(b.id);
                        }
                    }
                    drop(r);
                    lb.handle_probe(
                        ids[(round % 3) as usize],
                        ProbeResult::Failure(ProbeFailure::Refused),
                        now,
                    );
                    lb.handle_timeout(now);
                    while lb.poll_event().is_some() {}
                    std::thread::yield_now();
                }
                stop.store(true, Ordering::Release);
            });
        });
        for b in lb.backends(clock.now()) {
            assert_eq!(
                b.active_requests, 0,
                "{kind}: {} left {} in flight",
                b.addr, b.active_requests
            );
        }
    }
}

// --- fading failure weight ---

/// One request to `target` (found by sending others elsewhere) answering `o`.
fn hit_with(lb: &Balancer, clock: &mut Clock, target: BackendId, o: Outcome) {
    for _ in 0..100_000 {
        let (mut st, mut a) = lb.start(RequestInfo::new(true, true), clock.now());
        let mut hit = false;
        while let Action::Forward { backend, .. } = a {
            clock.advance(1);
            let out = if backend == target && !hit {
                hit = true;
                o
            } else {
                Outcome::Response { status: 200 }
            };
            a = lb.handle_outcome(&mut st, out, clock.now());
        }
        lb.finish(st, Completion::Done, clock.now());
        if hit {
            return;
        }
        clock.advance(1);
    }
    panic!("never reached {target}");
}

/// SPEC: a backend that failed *and then serves well* gets its even share back within 10 s.
/// A burst of failures (here 30 fast 503s, as a backend restarting would give) must fade
/// as well as a single one does, under both load-aware strategies.
#[test]
fn a_burst_of_failures_fades_within_ten_seconds() {
    let mut failures = Vec::new();
    for kind in [StrategyKind::LeastConnections, StrategyKind::P2cEwma] {
        for o in [Outcome::Response { status: 503 }, Outcome::Reset] {
            let mut clock = Clock::new();
            let config = no_ejection(no_slow_start(Config::default().with_rng_seed(Some(8))));
            let (lb, ids) = balancer(kind, config, &[1, 1], clock.now());
            for _ in 0..30 {
                hit_with(&lb, &mut clock, ids[0], o);
            }
            let start = clock.ms;
            // Seconds 5-10 after the burst: sequential traffic, even share expected.
            let mut hits = 0;
            let mut total = 0;
            while clock.ms < start + 10_000 {
                let at5 = clock.ms >= start + 5_000;
                let h = sequential_share(&lb, &mut clock, ids[0], 1);
                if at5 {
                    hits += h;
                    total += 1;
                }
            }
            if !(total * 35 / 100..=total * 65 / 100).contains(&hits) {
                failures.push(format!(
                    "{kind} after 30x {o}: {hits}/{total} in seconds 5-10"
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{failures:?}");
}

/// ... and a backend that keeps failing (every answer a fast 503, while the other answers
/// 200 in 40 ms) must not be favoured: at most its even share, under concurrent load.
#[test]
fn a_backend_that_keeps_failing_is_not_favoured() {
    let mut failures = Vec::new();
    for kind in [StrategyKind::LeastConnections, StrategyKind::P2cEwma] {
        let mut clock = Clock::new();
        let config = no_ejection(no_slow_start(Config::default().with_rng_seed(Some(8))));
        let (lb, ids) = balancer(kind, config, &[1, 1], clock.now());
        let bad = ids[0];
        // (finish time, request) for the good backend's requests.
        let mut open: Vec<(u64, lb_core::RequestState)> = Vec::new();
        let mut to_bad = 0;
        for _ in 0..3000 {
            clock.advance(5);
            let now = clock.now();
            let mut k = 0;
            while k < open.len() {
                if open[k].0 <= clock.ms {
                    let (_, mut st) = open.swap_remove(k);
                    let _ = lb.handle_outcome(&mut st, Outcome::Response { status: 200 }, now);
                    lb.finish(st, Completion::Done, now);
                } else {
                    k += 1;
                }
            }
            let (mut st, a) = lb.start(RequestInfo::new(true, true), now);
            let Action::Forward { backend, .. } = a else {
                panic!()
            };
            if backend == bad {
                to_bad += 1;
                let a = lb.handle_outcome(&mut st, Outcome::Response { status: 503 }, now);
                assert_eq!(a, Action::Relay);
                lb.finish(st, Completion::Done, now);
            } else {
                open.push((clock.ms + 40, st));
            }
        }
        if to_bad > 1500 {
            failures.push(format!("{kind}: always-503 backend got {to_bad} of 3000"));
        }
    }
    assert!(failures.is_empty(), "{failures:?}");
}

// --- consistent hashing ---

/// About 1/N of keys move when a backend joins (the existing property checks a leave), and
/// a new backend under consistent-hash gets its share at once (no slow start).
#[test]
fn consistent_hash_join_moves_about_one_nth() {
    for n in [3usize, 5, 10, 24] {
        let clock = Clock::new();
        let (lb, _) = balancer(
            StrategyKind::ConsistentHash,
            Config::default(),
            &vec![1; n],
            clock.now(),
        );
        let keys: Vec<u64> = (0..5000u64)
            .map(|k| k.wrapping_mul(0x9e37_79b9_7f4a_7c15))
            .collect();
        let pick = |k: u64| {
            let (st, a) = lb.start(RequestInfo::new(true, true).with_hash_key(k), clock.now());
            lb.abandon(st, clock.now());
            match a {
                Action::Forward { backend, .. } => backend,
                other => panic!("{other:?}"),
            }
        };
        let before: Vec<BackendId> = keys.iter().map(|&k| pick(k)).collect();
        let ids = lb
            .set_backends(backends(&vec![1; n + 1]), clock.now())
            .unwrap();
        let after: Vec<BackendId> = keys.iter().map(|&k| pick(k)).collect();
        let moved = before.iter().zip(&after).filter(|(b, a)| b != a).count();
        let to_new = after.iter().filter(|&&a| a == ids[n]).count();
        // Maglev is not minimally disruptive: a handful of keys may move between old backends.
        assert!(
            moved - to_new <= keys.len() / 100,
            "n={n}: {} keys moved between old backends",
            moved - to_new
        );
        let share = moved as f64 / keys.len() as f64;
        let ideal = 1.0 / (n + 1) as f64;
        assert!(
            (share - ideal).abs() < 0.05,
            "n={n}: moved {share:.3}, ideal {ideal:.3}"
        );
    }
}

/// SPEC fine print: "over the last 10 s, retries <= ... + min_retries_per_second x 10".
/// With a monotonic clock, the window is ten whole-second buckets, so "the last 10 s" at
/// t = 10.0 s forgets retries taken at t = 0.9 s: 20 retries fall inside the 9.1 s from
/// 0.9 s to 10.0 s against a budget of 10. Fixed: 100 ms buckets, and a retry counts the
/// retries of every bucket overlapping `[t - 10 s, t]`, so no 10 s window holds more than
/// the budget (budget.rs, "What it guarantees").
#[test]
fn budget_holds_in_every_sliding_ten_second_window() {
    let clock = Clock::new();
    let retry = RetryConfig::default()
        .with_budget_percent(0)
        .with_min_retries_per_second(1)
        .with_backoff(Duration::ZERO);
    let config = no_ejection(Config::default().with_retry(retry).with_rng_seed(Some(1)));
    let (lb, _) = balancer(StrategyKind::RoundRobin, config, &[1, 1], clock.now());
    let mut times = Vec::new();
    for ms in [900u64, 10_000] {
        for _ in 0..20 {
            if refused_once_retried(&lb, clock.at(ms)) {
                times.push(ms);
            }
        }
    }
    let worst = times
        .iter()
        .map(|&t| times.iter().filter(|&&u| u >= t && u < t + 10_000).count())
        .max()
        .unwrap_or(0);
    assert!(
        worst <= 10,
        "{worst} retries in one 10 s window (at {times:?} ms), budget 10"
    );
}

/// SPEC ("Retries are safe"): when a pooled connection fails before any response byte, "a
/// request safe to retry (never sent, or idempotent and replayable) is re-sent once ... on
/// a fresh connection to the same backend", shown in the routing trace; issue 9 §1: "With
/// one backend, a stale pooled connection must lead to that resend, not to 502
/// `no_untried_backend`". For a POST whose pooled connection died before it was written
/// (`Outcome::StaleConnection`, documented "never sent"), the core offers neither road:
/// `handle_resend` refuses it (it only knows idempotent+replayable), and reporting
/// `StaleConnection` with one backend ends in 502 `no_untried_backend`. Fixed: the caller
/// tells `handle_resend` the request was never written (`StaleConnection`), and any method
/// may then be re-sent once.
#[test]
fn stale_pooled_connection_with_one_backend_is_resent_not_502() {
    let clock = Clock::new();
    let (lb, ids) = balancer(
        StrategyKind::RoundRobin,
        Config::default(),
        &[1],
        clock.now(),
    );
    let (mut st, a) = lb.start(RequestInfo::new(false, true), clock.now());
    assert!(matches!(a, Action::Forward { backend, .. } if backend == ids[0]));
    if lb.handle_resend(&mut st, Outcome::StaleConnection, clock.now()) {
        assert_eq!(st.resent(), Some(0), "the resend, recorded in the trace");
        assert_eq!(
            lb.handle_outcome(&mut st, Outcome::Response { status: 200 }, clock.now()),
            Action::Relay
        );
        assert!(st.to_string().contains("stale_connection resend"), "{st}");
        return;
    }
    let a = lb.handle_outcome(&mut st, Outcome::StaleConnection, clock.now());
    assert!(
        matches!(a, Action::Forward { backend, .. } if backend == ids[0]),
        "{a:?}, trace: {st}"
    );
}

/// Invariant 9: the same seed and the same inputs give identical actions and events, for
/// every strategy, with requests open at once, ejections, probes, reloads and timers.
fn run_script(kind: StrategyKind, seed: u64, script: &[(u8, u64)], clock: Clock) -> Vec<String> {
    let config = Config::default()
        .with_rng_seed(Some(seed))
        .with_passive(PassiveConfig::default().with_consecutive_failures(2));
    let lb = Balancer::new(config, lb_core::select::AnySelect::new(kind)).unwrap();
    let mut ids = lb
        .set_backends(backends(&[1, 2, 3, 1]), clock.now())
        .unwrap();
    let mut log = Vec::new();
    let mut open: Vec<lb_core::RequestState> = Vec::new();
    let mut ms = 0u64;
    for &(op, arg) in script {
        let now = clock.at(ms);
        match op % 7 {
            0 | 1 => {
                let (st, a) =
                    lb.start(RequestInfo::new(arg % 3 != 0, true).with_hash_key(arg), now);
                log.push(format!("start {a:?}"));
                open.push(st);
            }
            2 | 3 if !open.is_empty() => {
                let i = (arg as usize) % open.len();
                let a = lb.handle_outcome(&mut open[i], outcome((arg >> 8) as u8 % 8), now);
                log.push(format!("outcome {a:?} {}", open[i]));
                if !matches!(a, Action::Forward { .. }) {
                    let st = open.swap_remove(i);
                    lb.finish(st, Completion::Done, now);
                }
            }
            4 => ms += arg % 4000,
            5 => {
                lb.handle_timeout(now);
                log.push(format!("timer {:?}", lb.poll_timeout()));
            }
            6 => {
                let id = ids[(arg as usize) % ids.len()];
                lb.handle_probe(
                    id,
                    if arg % 2 == 0 {
                        ProbeResult::Success
                    } else {
                        ProbeResult::Failure(ProbeFailure::Refused)
                    },
                    now,
                );
                if arg % 11 == 0 {
                    let w: Vec<u32> = (0..(2 + arg % 4))
                        .map(|i| 1 + ((arg >> i) & 3) as u32)
                        .collect();
                    ids = lb.set_backends(backends(&w), now).unwrap();
                }
            }
            _ => {}
        }
        while let Some(e) = lb.poll_event() {
            log.push(format!("event {e:?}"));
        }
    }
    log.push(format!("{:?}", lb.backends(clock.at(ms))));
    log
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]
    #[test]
    fn same_seed_same_inputs_same_outputs(
        kind in common::kind(),
        seed in any::<u64>(),
        script in prop::collection::vec((any::<u8>(), any::<u64>()), 1..200),
    ) {
        let clock = Clock::new();
        let a = run_script(kind, seed, &script, clock);
        let b = run_script(kind, seed, &script, clock);
        prop_assert_eq!(a, b);
    }
}

/// SPEC (Dynamic backends): "Consistent hashing is instance-independent: any lb processes
/// given the same backends (in any order, from the config or from DNS) send each key to
/// the same backend". The Maglev fill takes turns in candidate order (the order given to
/// `set_backends`), and when two backends' permutations want the same free slot the first
/// in that order wins, so two instances given the same set in different orders disagree on
/// some keys.
#[test]
#[ignore = "known limitation, see README: Maglev fill turn order follows set_backends order (select/consistent_hash.rs MaglevTable::build), so instances with the same backends in another order route some keys differently"]
fn consistent_hash_order_independent_equal_weights_many_keys() {
    let clock = Clock::new();
    let mut bad = Vec::new();
    for (n, weights) in [
        (5usize, vec![1u32; 5]),
        (8, vec![1; 8]),
        (40, vec![1; 40]),
        (6, vec![2, 1, 2, 1, 2, 1]),
    ] {
        let fwd = backends(&weights);
        let mut rev = fwd.clone();
        rev.reverse();
        let a = Balancer::new(
            Config::default(),
            lb_core::select::AnySelect::new(StrategyKind::ConsistentHash),
        )
        .unwrap();
        let b = Balancer::new(
            Config::default(),
            lb_core::select::AnySelect::new(StrategyKind::ConsistentHash),
        )
        .unwrap();
        a.set_backends(fwd, clock.now()).unwrap();
        b.set_backends(rev, clock.now()).unwrap();
        let addrs = |lb: &Balancer| {
            lb.backends(clock.now())
                .into_iter()
                .map(|s| (s.id, s.addr))
                .collect::<HashMap<_, _>>()
        };
        let (am, bm) = (addrs(&a), addrs(&b));
        let pick = |lb: &Balancer, m: &HashMap<BackendId, String>, k: u64| {
            let (st, act) = lb.start(RequestInfo::new(true, true).with_hash_key(k), clock.now());
            lb.abandon(st, clock.now());
            let Action::Forward { backend, .. } = act else {
                panic!()
            };
            m[&backend].clone()
        };
        let differ = (0..50_000u64)
            .map(|k| k.wrapping_mul(0x2545_f491_4f6c_dd1d) ^ 77)
            .filter(|&k| pick(&a, &am, k) != pick(&b, &bm, k))
            .count();
        if differ > 0 {
            bad.push(format!(
                "n={n} weights {weights:?}: {differ} of 50000 keys differ"
            ));
        }
    }
    assert!(bad.is_empty(), "{bad:?}");
}

/// The same defect inside one instance: a DNS server that rotates its A records (round-robin
/// DNS does, on every answer) makes each `refresh` a `set_backends` of the same set in
/// another order, which rebuilds the Maglev table and moves keys although nothing changed.
#[test]
#[ignore = "known limitation, see README: same backend set in rotated order moves consistent-hash keys (select/consistent_hash.rs MaglevTable::build turn order; balancer/pool.rs candidates in given order)"]
fn consistent_hash_keys_stay_when_dns_rotates_the_same_set() {
    let clock = Clock::new();
    let mut set = backends(&[1; 16]);
    let lb = Balancer::new(
        Config::default(),
        lb_core::select::AnySelect::new(StrategyKind::ConsistentHash),
    )
    .unwrap();
    lb.set_backends(set.clone(), clock.now()).unwrap();
    let pick = |k: u64| {
        let (st, act) = lb.start(RequestInfo::new(true, true).with_hash_key(k), clock.now());
        lb.abandon(st, clock.now());
        let Action::Forward { backend, .. } = act else {
            panic!()
        };
        backend
    };
    let keys: Vec<u64> = (0..50_000u64)
        .map(|k| k.wrapping_mul(0x2545_f491_4f6c_dd1d))
        .collect();
    let before: Vec<BackendId> = keys.iter().map(|&k| pick(k)).collect();
    set.rotate_left(5);
    lb.set_backends(set, clock.now()).unwrap();
    let moved = keys
        .iter()
        .zip(&before)
        .filter(|(&k, &b)| pick(k) != b)
        .count();
    assert_eq!(
        moved, 0,
        "{moved} of 50000 keys moved on a reordered, unchanged set"
    );
}

/// SPEC: a backend that failed and then serves well gets its even share back within 10 s.
/// Least-connections' tournament tree compares a node's children only when an update passes
/// through it. Four backends A B | C D: B holds long requests (streams, websockets), A fails
/// a few times (fast 503s). Once A's penalty has faded, A is as idle as C and D, but the
/// node over A and B still says "B" (computed when A was penalised) and nothing refreshes
/// it while B's requests stay open, so A gets nothing: starved for as long as B's streams
/// last, not 10 s.
#[test]
fn least_connections_faded_backend_is_not_hidden_behind_a_stale_node() {
    let mut clock = Clock::new();
    let config = no_ejection(no_slow_start(Config::default().with_rng_seed(Some(2))));
    let (lb, ids) = balancer(
        StrategyKind::LeastConnections,
        config,
        &[1, 1, 1, 1],
        clock.now(),
    );
    let (a, b) = (ids[0], ids[1]);
    // Forty requests at once spread over the four (about ten each).
    let mut held = Vec::new();
    for _ in 0..40 {
        let (st, act) = lb.start(RequestInfo::new(true, true), clock.now());
        assert!(matches!(act, Action::Forward { .. }));
        held.push(st);
    }
    clock.advance(5);
    // A's all answer 503 at once (a restart, say): its penalty is about 10 requests' worth.
    let (on_a, rest): (Vec<_>, Vec<_>) = held.into_iter().partition(|st| st.in_flight() == Some(a));
    assert!(on_a.len() >= 8, "A got {}", on_a.len());
    for mut st in on_a {
        assert_eq!(
            lb.handle_outcome(&mut st, Outcome::Response { status: 503 }, clock.now()),
            Action::Relay
        );
        lb.finish(st, Completion::Done, clock.now());
    }
    // B keeps three long-lived responses (streams, websockets) open; the rest finish.
    let mut streams = Vec::new();
    for mut st in rest {
        let on = st.in_flight().unwrap();
        let _ = lb.handle_outcome(&mut st, Outcome::Response { status: 200 }, clock.now());
        if on == b && streams.len() < 3 {
            streams.push(st);
        } else {
            lb.finish(st, Completion::Done, clock.now());
        }
    }
    // A minute of sequential traffic; A, C and D are equally idle after ~5 s. Count the
    // picks in seconds 6-10, and in seconds 56-60.
    let start = clock.ms;
    let (mut hits, mut total, mut hits_60) = (0, 0, 0);
    while clock.ms < start + 60_000 {
        if clock.ms >= start + 56_000 {
            hits_60 += sequential_share(&lb, &mut clock, a, 1);
            continue;
        }
        let late = clock.ms >= start + 6_000 && clock.ms < start + 10_000;
        let h = sequential_share(&lb, &mut clock, a, 1);
        if late {
            hits += h;
            total += 1;
        }
    }
    assert!(hits * 5 >= total, "A got {hits} of {total} in seconds 6-10 and {hits_60} of 400 in seconds 56-60 (a third expected)");
    drop(streams);
}

/// SPEC: passive ejection counts "resets"; `Completion::BackendFailed` ("the backend broke
/// off the response body (reset, truncated): counts toward ejection"). But every response
/// head resets the backend's consecutive-failure count first (handle_outcome, `Response`),
/// so a backend that sends a head and then resets every single body never gets past one
/// failure in a row and is never ejected, whatever the threshold.
#[test]
fn backend_that_breaks_every_body_is_ejected() {
    let clock = Clock::new();
    let config = no_slow_start(Config::default().with_rng_seed(Some(1)));
    let (lb, ids) = balancer(StrategyKind::RoundRobin, config, &[1, 1, 1], clock.now());
    let bad = ids[0];
    let mut broken = 0;
    for i in 0..300u64 {
        let now = clock.at(i * 10);
        drive(&lb, now);
        let (mut st, a) = lb.start(RequestInfo::new(true, true), now);
        let Action::Forward { backend, .. } = a else {
            panic!("{a:?}")
        };
        assert_eq!(
            lb.handle_outcome(&mut st, Outcome::Response { status: 200 }, now),
            Action::Relay
        );
        if backend == bad {
            broken += 1;
            lb.finish(st, Completion::BackendFailed, now);
        } else {
            lb.finish(st, Completion::Done, now);
        }
    }
    let ejected = std::iter::from_fn(|| lb.poll_event())
        .any(|e| matches!(e, Event::Ejected { backend, .. } if backend == bad));
    assert!(
        ejected,
        "{broken} broken bodies in a row from {bad}, never ejected (threshold 5)"
    );
}
