//! Pick cost of every strategy at 3, 100 and 10,000 backends, on one thread and with two
//! threads contending for the same `Balancer`.
//!
//! One iteration is what the proxy does per request that succeeds first time:
//! `start` (pick, in-flight +1) then `handle_outcome(200)` then `finish` (in-flight −1).
//! `pick` iterations stop after `start` + `abandon`: the selection and its bookkeeping only.
//! `select` is the strategy's own pick on its prebuilt table, nothing else.

use std::hint::black_box;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use lb_core::select::{AnySelect, Candidate, PickCx, Select, StrategyKind};
use lb_core::{Backend, Balancer, Completion, Config, Outcome, RequestInfo, Rng, Weight};

fn balancer(kind: StrategyKind, n: usize) -> Balancer {
    let config = Config::default().with_rng_seed(Some(1));
    let lb = Balancer::new(config, AnySelect::new(kind)).expect("valid config");
    let backends = (0..n).map(|i| {
        let w = Weight::new(1 + (i % 4) as u32).expect("weight in range");
        Backend::new(
            format!("10.{}.{}.{}:8080", i >> 16, (i >> 8) & 255, i & 255),
            w,
        )
    });
    #[allow(clippy::disallowed_methods)]
    let now = Instant::now();
    lb.set_backends(backends, now).expect("distinct backends");
    lb
}

fn pick(lb: &Balancer, now: Instant, key: u64) {
    let (st, action) = lb.start(RequestInfo::new(true, true).with_hash_key(key), now);
    black_box(&action);
    lb.abandon(st, now);
}

fn cycle(lb: &Balancer, now: Instant, key: u64) {
    let (mut st, action) = lb.start(RequestInfo::new(true, true).with_hash_key(key), now);
    black_box(&action);
    let relay = lb.handle_outcome(&mut st, Outcome::Response { status: 200 }, now);
    black_box(&relay);
    lb.finish(st, Completion::Done, now);
}

type Op = fn(&Balancer, Instant, u64);

fn bench_select(c: &mut Criterion) {
    #[allow(clippy::disallowed_methods)]
    let now = Instant::now();
    let mut group = c.benchmark_group("select");
    group
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    for kind in StrategyKind::ALL {
        for n in [3usize, 100, 10_000] {
            let strategy = AnySelect::new(kind);
            // Ids are opaque: take real ones from a balancer's backend set.
            let ids = balancer(kind, n).backends(now).into_iter().map(|b| b.id);
            let candidates: Vec<Candidate> = ids
                .enumerate()
                .map(|(i, id)| {
                    Candidate::detached(
                        id,
                        format!("10.0.{}.{}:80", i / 256, i % 256),
                        1 + (i % 4) as u32,
                    )
                })
                .collect();
            let table = strategy.build(&candidates);
            group.bench_with_input(
                BenchmarkId::new(format!("{kind}/1-thread"), n),
                &n,
                |b, _| {
                    let mut rng = Rng::from_seed(1);
                    let mut key = 0u64;
                    b.iter(|| {
                        key = key.wrapping_add(0x9e37_79b9);
                        let mut cx = PickCx::new(Some(key), &mut rng, &[], 0);
                        black_box(strategy.pick(&table, &candidates, &mut cx))
                    });
                },
            );
        }
    }
    group.finish();
}

fn bench(c: &mut Criterion) {
    #[allow(clippy::disallowed_methods)]
    let now = Instant::now();
    let ops: [(&str, Op); 2] = [("pick", pick), ("request", cycle)];
    for (op_name, op) in ops {
        let mut group = c.benchmark_group(op_name);
        group
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(2));
        for kind in StrategyKind::ALL {
            for n in [3usize, 100, 10_000] {
                let lb = balancer(kind, n);
                group.bench_with_input(
                    BenchmarkId::new(format!("{kind}/1-thread"), n),
                    &n,
                    |b, _| {
                        let mut key = 0u64;
                        b.iter(|| {
                            key = key.wrapping_add(0x9e37_79b9);
                            op(&lb, now, key);
                        });
                    },
                );
                group.bench_with_input(
                    BenchmarkId::new(format!("{kind}/2-threads"), n),
                    &n,
                    |b, _| {
                        b.iter_custom(|iters| contended(&lb, now, iters, op));
                    },
                );
            }
        }
        group.finish();
    }
}

/// Two threads each run `iters` operations on one balancer; the wall time of the slower one
/// is the time per operation under contention.
fn contended(lb: &Balancer, now: Instant, iters: u64, op: Op) -> Duration {
    let barrier = Barrier::new(2);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..2u64)
            .map(|t| {
                let barrier = &barrier;
                s.spawn(move || {
                    barrier.wait();
                    #[allow(clippy::disallowed_methods)]
                    let start = Instant::now();
                    for i in 0..iters {
                        op(lb, now, i.wrapping_mul(0x9e37_79b9) ^ t);
                    }
                    start.elapsed()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_default())
            .max()
            .unwrap_or_default()
    })
}

criterion_group!(benches, bench_select, bench);
criterion_main!(benches);
