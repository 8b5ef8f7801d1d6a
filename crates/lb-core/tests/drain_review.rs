//! Review13: a draining backend takes no new request under every strategy, first attempts
//! and retries alike, with requests in flight on the others (load-aware tables) and while it
//! is down or ejected too; ending the drain brings it back. Public API only.

mod common;

use lb_core::select::{AnySelect, StrategyKind};
use lb_core::{Action, Backend, BackendId, Balancer, Config, Outcome, RequestInfo, Weight};

#[test]
fn a_draining_backend_gets_no_first_attempt_nor_retry_under_any_strategy() {
    let t0 = common::Clock::new().now();
    for kind in [
        StrategyKind::RoundRobin,
        StrategyKind::WeightedRoundRobin,
        StrategyKind::LeastConnections,
        StrategyKind::P2cEwma,
        StrategyKind::ConsistentHash,
        StrategyKind::Random,
    ] {
        let lb = Balancer::new(Config::default(), AnySelect::new(kind)).unwrap();
        let ids = lb
            .set_backends(
                (0..3).map(|i| Backend::new(format!("10.0.0.{i}:80"), Weight::ONE)),
                t0,
            )
            .unwrap();
        // Requests in flight on the others: a load-aware strategy would prefer the idle one.
        let mut held = Vec::new();
        for _ in 0..6 {
            held.push(lb.start(RequestInfo::new(true, true), t0).0);
        }
        assert!(lb.set_draining(ids[0], true, t0));
        let mut seen: Vec<BackendId> = Vec::new();
        for k in 0..200u64 {
            let (mut st, a) = lb.start(RequestInfo::new(true, true).with_hash_key(k), t0);
            let Action::Forward { backend, .. } = a else {
                panic!("{kind:?}: {a:?}");
            };
            assert_ne!(
                backend, ids[0],
                "{kind:?}: key {k} went to the drained backend"
            );
            seen.push(backend);
            // A retry of a refused attempt goes to the third backend, never the drained one.
            let a = lb.handle_outcome(&mut st, Outcome::ConnectRefused, t0);
            if let Action::Forward { backend: b, .. } = a {
                assert_ne!(b, ids[0], "{kind:?}: a retry went to the drained backend");
            }
            lb.abandon(st, t0);
        }
        assert!(seen.contains(&ids[1]) || seen.contains(&ids[2]), "{kind:?}");
        for st in held {
            lb.abandon(st, t0);
        }
        assert!(lb.set_draining(ids[0], false, t0));
        let back = (0..300u64).any(|k| {
            let (st, a) = lb.start(RequestInfo::new(true, true).with_hash_key(k), t0);
            lb.abandon(st, t0);
            matches!(a, Action::Forward { backend, .. } if backend == ids[0])
        });
        assert!(
            back,
            "{kind:?}: the drain ended but the backend gets nothing"
        );
    }
}
