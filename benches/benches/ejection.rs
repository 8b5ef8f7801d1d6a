//! Request-path cost of the request whose failure ejects a backend, with 10,000 backends.
//!
//! One iteration is `start` + `handle_outcome(ConnectRefused)` + `abandon` on a balancer
//! where one failure ejects (`consecutive_failures = 1`) and every ejection is allowed
//! (`max_ejected_percent = 100`, `panic_threshold_percent = 0`), so each iteration ejects
//! one more backend. This is the latency a client request sees when it is the one that
//! trips an ejection; whatever the balancer does off the request path (the table rebuild
//! the timer runs) is measured apart, as `rebuild`, by `handle_timeout` after one ejection.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode};
use lb_core::select::{AnySelect, StrategyKind};
use lb_core::{Action, Backend, Balancer, Config, Outcome, PassiveConfig, RequestInfo, Weight};

const BACKENDS: usize = 10_000;

fn balancer(kind: StrategyKind, now: Instant) -> Balancer {
    let config = Config::default().with_rng_seed(Some(1)).with_passive(
        PassiveConfig::default()
            .with_consecutive_failures(1)
            .with_max_ejected_percent(100)
            .with_panic_threshold_percent(0),
    );
    let lb = Balancer::new(config, AnySelect::new(kind)).expect("valid config");
    let backends = (0..BACKENDS).map(|i| {
        let w = Weight::new(1 + (i % 4) as u32).expect("weight in range");
        Backend::new(
            format!("10.{}.{}.{}:8080", i >> 16, (i >> 8) & 255, i & 255),
            w,
        )
    });
    lb.set_backends(backends, now).expect("distinct backends");
    lb
}

/// One request that fails to connect and so ejects its backend; returns whether it did.
fn eject_one(lb: &Balancer, now: Instant, key: u64) -> bool {
    let (mut st, action) = lb.start(RequestInfo::new(true, true).with_hash_key(key), now);
    if !matches!(action, Action::Forward { .. }) {
        lb.abandon(st, now);
        return false;
    }
    let next = lb.handle_outcome(&mut st, Outcome::ConnectRefused, now);
    black_box(&next);
    lb.abandon(st, now);
    true
}

fn bench(c: &mut Criterion) {
    #[allow(clippy::disallowed_methods)]
    let now = Instant::now();
    let mut group = c.benchmark_group("ejection");
    group
        .sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_millis(100))
        .measurement_time(Duration::from_secs(3));
    for kind in [
        StrategyKind::RoundRobin,
        StrategyKind::LeastConnections,
        StrategyKind::ConsistentHash,
    ] {
        let lb = balancer(kind, now);
        let mut key = 0u64;
        group.bench_with_input(
            BenchmarkId::new(format!("{kind}/handle_outcome"), BACKENDS),
            &BACKENDS,
            |b, _| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        key = key.wrapping_add(0x9e37_79b9);
                        #[allow(clippy::disallowed_methods)]
                        let t = Instant::now();
                        black_box(eject_one(&lb, now, key));
                        total += t.elapsed();
                        // Off the request path: the timer task's turn (not timed here).
                        lb.handle_timeout(now);
                    }
                    total
                });
            },
        );
        group.bench_with_input(
            BenchmarkId::new(format!("{kind}/rebuild"), BACKENDS),
            &BACKENDS,
            |b, _| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        key = key.wrapping_add(0x9e37_79b9);
                        black_box(eject_one(&lb, now, key));
                        #[allow(clippy::disallowed_methods)]
                        let t = Instant::now();
                        lb.handle_timeout(now);
                        total += t.elapsed();
                    }
                    total
                });
            },
        );
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
