//! Consistent hashing is instance-independent (SPEC "Dynamic backends"): balancers given the
//! same backends, in any order, with any ids, written any way but named by the same
//! identity, send every key to the same backend, on the first attempt and on retries. Public
//! API only, on a virtual clock.

mod common;

use std::collections::HashMap;

use common::Clock;
use lb_core::select::{AnySelect, StrategyKind};
use lb_core::{
    Action, Backend, BackendId, Balancer, Config, Outcome, RequestInfo, RetryConfig, Weight,
};
use proptest::prelude::*;

/// Backend `i`: written `spelling`-dependently, identified by its normalized address.
fn backend(i: usize, weight: u32, spelling: usize) -> Backend {
    let identity = format!("http://10.0.{}.{}:80", i / 256, i % 256);
    let written = match spelling % 3 {
        0 => identity.clone(),
        1 => format!("HTTP://10.0.{}.{}:80/", i / 256, i % 256),
        _ => format!("10.0.{}.{}:80", i / 256, i % 256),
    };
    Backend::new(written, Weight::new(weight).unwrap()).with_identity(identity)
}

/// A balancer holding `order` (indices into `weights`), whose ids were shifted by `churn`
/// earlier sets of other backends; and each id's backend index.
fn instance(
    order: &[usize],
    weights: &[u32],
    churn: usize,
    clock: &Clock,
) -> (Balancer, HashMap<BackendId, usize>) {
    // No passive ejection, and a budget for every retry: the refused attempts `placement`
    // reports must change nothing.
    let passive = Config::default().passive().with_consecutive_failures(0);
    let retry = RetryConfig::default()
        .with_budget_percent(100)
        .with_min_retries_per_second(1000);
    let lb = Balancer::new(
        Config::default().with_passive(passive).with_retry(retry),
        AnySelect::new(StrategyKind::ConsistentHash),
    )
    .unwrap();
    for c in 0..churn {
        lb.set_backends([backend(10_000 + c, 1, 0)], clock.now())
            .unwrap();
    }
    let ids = lb
        .set_backends(
            order
                .iter()
                .enumerate()
                .map(|(k, &i)| backend(i, weights[i], k + churn)),
            clock.now(),
        )
        .unwrap();
    (lb, ids.into_iter().zip(order.iter().copied()).collect())
}

/// Where `key` goes: its first attempt and, after that one is refused, its second.
fn placement(
    lb: &Balancer,
    names: &HashMap<BackendId, usize>,
    key: u64,
    clock: &Clock,
) -> [usize; 2] {
    let (mut st, a) = lb.start(RequestInfo::new(true, true).with_hash_key(key), clock.now());
    let Action::Forward { backend: first, .. } = a else {
        panic!("{a:?}")
    };
    let a = lb.handle_outcome(&mut st, Outcome::ConnectRefused, clock.now());
    let Action::Forward {
        backend: second, ..
    } = a
    else {
        panic!("{a:?}")
    };
    lb.abandon(st, clock.now());
    [names[&first], names[&second]]
}

/// Every key's placement by one instance holding `order`.
fn placements(order: &[usize], weights: &[u32], churn: usize, keys: &[u64]) -> Vec<[usize; 2]> {
    let clock = Clock::new();
    let (lb, names) = instance(order, weights, churn, &clock);
    keys.iter()
        .map(|&k| placement(&lb, &names, k, &clock))
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Any order, any earlier churn of ids, any spelling: the same backend for every key,
    /// first attempt and retry alike.
    #[test]
    fn every_order_and_id_assignment_places_keys_alike(
        weights in prop::collection::vec(1u32..5, 2..12),
        shuffle in any::<u64>(),
        churn in 0usize..4,
        seed in any::<u64>(),
    ) {
        let n = weights.len();
        let identity: Vec<usize> = (0..n).collect();
        let mut order = identity.clone();
        let mut s = shuffle;
        for i in (1..n).rev() {
            s = s.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            order.swap(i, (s >> 33) as usize % (i + 1));
        }
        let keys: Vec<u64> = (0..300u64).map(|k| (k ^ seed).wrapping_mul(0x9e37_79b9_7f4a_7c15)).collect();
        prop_assert_eq!(
            placements(&order, &weights, churn, &keys),
            placements(&identity, &weights, 0, &keys)
        );
    }
}

/// Duplicates are detected by identity, and a backend rewritten with the same identity is a
/// new member (its status shows the new spelling) while the old one is never picked again.
#[test]
fn identity_decides_duplicates_and_a_rewritten_backend_is_replaced() {
    let clock = Clock::new();
    let (lb, _) = instance(&[0, 1], &[1, 1], 0, &clock);
    let err = lb
        .set_backends([backend(0, 1, 0), backend(0, 1, 1)], clock.now())
        .unwrap_err();
    assert!(err.to_string().contains("10.0.0.0"), "{err}");
    let before = lb.backends(clock.now());
    let ids = lb
        .set_backends([backend(0, 1, 1), backend(1, 1, 2)], clock.now())
        .unwrap();
    let after = lb.backends(clock.now());
    assert_eq!(after[0].addr, "HTTP://10.0.0.0:80/");
    assert!(ids.iter().all(|id| before.iter().all(|b| b.id != *id)));
    let names: HashMap<BackendId, usize> = ids.into_iter().zip([0, 1]).collect();
    for key in 0..200u64 {
        let (st, a) = lb.start(RequestInfo::new(true, true).with_hash_key(key), clock.now());
        let Action::Forward { backend, .. } = a else {
            panic!("{a:?}")
        };
        assert!(names.contains_key(&backend), "an old member was picked");
        lb.abandon(st, clock.now());
    }
}
