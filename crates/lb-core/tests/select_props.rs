//! Properties of selection through the public `Balancer` API.

mod common;

use std::collections::HashMap;

use common::{balancer, kind, Clock, Model};
use lb_core::select::{smooth_wrr_sequence, StrategyKind};
use lb_core::{
    Action, BackendId, Completion, Config, Event, Outcome, PassiveConfig, ProbeFailure,
    ProbeResult, RequestInfo,
};
use proptest::prelude::*;

fn first_pick(
    lb: &lb_core::Balancer,
    info: RequestInfo,
    now: std::time::Instant,
) -> Option<BackendId> {
    let (st, action) = lb.start(info, now);
    lb.abandon(st, now);
    match action {
        Action::Forward { backend, .. } => Some(backend),
        _ => None,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Round robin over N healthy backends: K·N sequential requests give each exactly K.
    #[test]
    fn round_robin_is_exact(n in 1usize..20, k in 1usize..8) {
        let clock = Clock::new();
        let (lb, ids) = balancer(StrategyKind::RoundRobin, Config::default(), &vec![1; n], clock.now());
        let mut count: HashMap<BackendId, usize> = HashMap::new();
        for _ in 0..k * n {
            let (mut st, a) = lb.start(RequestInfo::new(true, true), clock.now());
            let Action::Forward { backend, .. } = a else { panic!("{a:?}") };
            *count.entry(backend).or_default() += 1;
            prop_assert_eq!(lb.handle_outcome(&mut st, Outcome::Response { status: 200 }, clock.now()), Action::Relay);
            lb.finish(st, Completion::Done, clock.now());
        }
        for id in ids {
            prop_assert_eq!(count.get(&id).copied().unwrap_or(0), k);
        }
    }

    /// Smooth WRR, fixed membership, all healthy: every window of W = Σw consecutive picks
    /// gives backend i exactly wᵢ, and the order is NGINX's.
    #[test]
    fn smooth_wrr_is_exact_in_every_window(weights in prop::collection::vec(1u32..12, 1..10)) {
        let clock = Clock::new();
        let (lb, ids) = balancer(StrategyKind::WeightedRoundRobin, Config::default(), &weights, clock.now());
        let g = weights.iter().fold(0, |g, &w| gcd(g, w));
        let reduced: Vec<u32> = weights.iter().map(|w| w / g).collect();
        let w: usize = reduced.iter().map(|&x| x as usize).sum();
        let picks: Vec<usize> = (0..3 * w)
            .map(|_| {
                let b = first_pick(&lb, RequestInfo::new(true, true), clock.now()).unwrap();
                ids.iter().position(|&id| id == b).unwrap()
            })
            .collect();
        for start in 0..=2 * w {
            let mut c = vec![0u32; weights.len()];
            for &i in &picks[start..start + w] {
                c[i] += 1;
            }
            prop_assert_eq!(&c, &reduced, "window at {}", start);
        }
        let expected: Vec<usize> = nginx(&reduced, w);
        prop_assert_eq!(&picks[..w], &expected[..]);
        prop_assert_eq!(smooth_wrr_sequence(&weights).iter().map(|&i| i as usize).collect::<Vec<_>>(), expected);
    }

    /// Invariant 1: never an ejected or probe-down backend while an eligible one exists;
    /// never a removed id; never a probe-down backend at all (panic mode only overrides
    /// ejections). Random probes, live failures, time and membership changes.
    #[test]
    fn never_picks_an_ineligible_backend(
        kind in kind(),
        seed in any::<u64>(),
        ops in prop::collection::vec((0u8..6, 0usize..8, 0u16..3000), 1..200),
    ) {
        let mut clock = Clock::new();
        let config = Config::default()
            .with_rng_seed(Some(seed))
            .with_passive(PassiveConfig::default().with_consecutive_failures(2).with_max_ejected_percent(60));
        let (rise, fall, threshold) = (config.health().rise(), config.health().fall(), config.passive().panic_threshold_percent());
        let mut weights = vec![1, 2, 3, 1, 1];
        let (lb, mut ids) = balancer(kind, config, &weights, clock.now());
        let mut model = Model::new(&ids, rise, fall);
        for (op, which, arg) in ops {
            match op {
                0 | 1 => {
                    let info = RequestInfo::new(true, true).with_hash_key(u64::from(arg));
                    let (mut st, mut a) = lb.start(info, clock.now());
                    while let Action::Forward { backend, .. } = a {
                        prop_assert!(model.members.contains(&backend), "removed backend {backend} picked");
                        prop_assert!(model.up(backend), "probe-down backend {backend} picked");
                        let eligible = model.eligible();
                        if !model.panic(threshold) && !eligible.is_empty() {
                            let untried: Vec<_> = eligible.iter().filter(|id| !st.attempts()[..st.attempt_count() - 1].iter().any(|x| x.backend() == **id)).collect();
                            if !untried.is_empty() {
                                prop_assert!(eligible.contains(&backend), "ejected {backend} picked, eligible {eligible:?}");
                            }
                        }
                        let outcome = if op == 0 { Outcome::Response { status: 200 } } else { Outcome::ConnectRefused };
                        a = lb.handle_outcome(&mut st, outcome, clock.now());
                        while let Some(e) = lb.poll_event() { model.apply(&e); }
                    }
                    lb.finish(st, Completion::Done, clock.now());
                }
                2 => {
                    let id = ids[which % ids.len()];
                    let ok = arg % 3 == 0;
                    let result = if ok { ProbeResult::Success } else { ProbeResult::Failure(ProbeFailure::Refused) };
                    let flip = model.probe(id, ok);
                    lb.handle_probe(id, result, clock.now());
                    let mut seen = None;
                    while let Some(e) = lb.poll_event() {
                        match e {
                            Event::Down { backend, .. } if backend == id => seen = Some(false),
                            Event::Up { backend, .. } if backend == id => seen = Some(true),
                            _ => {}
                        }
                        model.apply(&e);
                    }
                    prop_assert_eq!(seen, flip, "rise/fall flips exactly at the threshold");
                }
                3 => {
                    clock.advance(u64::from(arg) * 10);
                    lb.handle_timeout(clock.now());
                    while let Some(e) = lb.poll_event() { model.apply(&e); }
                }
                4 => {
                    // Reload: drop one backend or add one back.
                    if weights.len() > 1 && arg % 2 == 0 {
                        weights.remove(which % weights.len());
                    } else if weights.len() < 8 {
                        weights.push(1 + u32::from(arg % 4));
                    }
                    ids = lb.set_backends(common::backends(&weights), clock.now()).unwrap();
                    model.set_members(&ids);
                    while let Some(e) = lb.poll_event() { model.apply(&e); }
                }
                _ => {
                    // The timer fires when the balancer asked.
                    if let Some(t) = lb.poll_timeout() {
                        if t > clock.now() {
                            clock.ms = t.duration_since(clock.epoch).as_millis() as u64 + 1;
                        }
                        lb.handle_timeout(clock.now());
                        while let Some(e) = lb.poll_event() { model.apply(&e); }
                    }
                }
            }
        }
        for b in lb.backends(clock.now()) {
            prop_assert_eq!(b.active_requests, 0, "in-flight returns to 0");
        }
    }

    /// Consistent hash: one key, one backend; removing one of N moves about 1/N of the keys.
    #[test]
    fn consistent_hash_moves_about_one_nth(n in 3usize..25, gone in 0usize..25, seed in any::<u64>()) {
        let gone = gone % n;
        let clock = Clock::new();
        let config = Config::default().with_rng_seed(Some(seed));
        let weights = vec![1; n];
        let (lb, ids) = balancer(StrategyKind::ConsistentHash, config, &weights, clock.now());
        let keys: Vec<u64> = (0..4000u64).map(|k| k.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ seed).collect();
        let before: Vec<BackendId> = keys.iter().map(|&k| first_pick(&lb, RequestInfo::new(true, true).with_hash_key(k), clock.now()).unwrap()).collect();
        for (i, &k) in keys.iter().enumerate().take(200) {
            prop_assert_eq!(first_pick(&lb, RequestInfo::new(true, true).with_hash_key(k), clock.now()), Some(before[i]));
        }
        let mut rest = common::backends(&weights);
        rest.remove(gone);
        lb.set_backends(rest, clock.now()).unwrap();
        let after: Vec<BackendId> = keys.iter().map(|&k| first_pick(&lb, RequestInfo::new(true, true).with_hash_key(k), clock.now()).unwrap()).collect();
        let moved = before.iter().zip(&after).filter(|(b, a)| b != a).count() as f64 / keys.len() as f64;
        let bound = 1.0 / n as f64 + 0.06;
        prop_assert!(moved <= bound, "moved {moved:.3} > {bound:.3} with n={n}");
        prop_assert!(after.iter().all(|a| *a != ids[gone]));
    }
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// NGINX's smooth weighted round robin, straight from ngx_http_upstream_get_peer.
fn nginx(weights: &[u32], picks: usize) -> Vec<usize> {
    let total: i64 = weights.iter().map(|&w| i64::from(w)).sum();
    let mut current = vec![0i64; weights.len()];
    (0..picks)
        .map(|_| {
            let mut best = 0;
            for i in 0..weights.len() {
                current[i] += i64::from(weights[i]);
                if current[i] > current[best] {
                    best = i;
                }
            }
            current[best] -= total;
            best
        })
        .collect()
}

#[test]
fn nginx_example_through_the_balancer() {
    let clock = Clock::new();
    let (lb, ids) = balancer(
        StrategyKind::WeightedRoundRobin,
        Config::default(),
        &[5, 1, 1],
        clock.now(),
    );
    let got: String = (0..7)
        .map(|_| {
            let b = first_pick(&lb, RequestInfo::new(true, true), clock.now()).unwrap();
            ["a", "b", "c"][ids.iter().position(|&i| i == b).unwrap()]
        })
        .collect();
    assert_eq!(got, "aabacaa");
}
