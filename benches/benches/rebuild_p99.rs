//! Does a table rebuild disturb requests in flight? With 10,000 backends, one thread runs
//! requests (`start` + `handle_outcome` + `finish`) back to back and records each one's
//! latency, first on a quiet balancer, then while another thread keeps reloading
//! (`set_backends` with one backend swapped), ejecting (a refused connect with
//! `consecutive_failures = 1`) and running the timer (`handle_timeout`, where the rebuild
//! happens). Prints p50/p99/p99.9 of both phases per strategy; the rebuild must stay off the
//! request path, so the two phases' p99 should be alike.
//!
//! `cargo bench -p lb-benches --bench rebuild_p99` (about 10 s).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use lb_core::select::{AnySelect, StrategyKind};
use lb_core::{
    Action, Backend, Balancer, Completion, Config, Outcome, PassiveConfig, RequestInfo, Weight,
};

const BACKENDS: usize = 10_000;
const PHASE: Duration = Duration::from_millis(1500);

fn addr(i: usize) -> String {
    format!("10.{}.{}.{}:8080", i >> 16, (i >> 8) & 255, i & 255)
}

fn set(swap: usize) -> Vec<Backend> {
    (0..BACKENDS)
        .map(|i| {
            let i = if i == swap { BACKENDS + swap } else { i };
            Backend::new(addr(i), Weight::new(1 + (i % 4) as u32).expect("weight"))
        })
        .collect()
}

#[allow(clippy::disallowed_methods)]
fn now() -> Instant {
    Instant::now()
}

/// Latencies (ns) of requests run back to back until `stop`.
fn requests(lb: &Balancer, stop: &AtomicBool) -> Vec<u64> {
    let mut out = Vec::with_capacity(1 << 20);
    let mut key = 0u64;
    while !stop.load(Ordering::Relaxed) {
        key = key.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let t = now();
        let (mut st, action) = lb.start(RequestInfo::new(true, true).with_hash_key(key), t);
        if let Action::Forward { .. } = action {
            let _ = lb.handle_outcome(&mut st, Outcome::Response { status: 200 }, t);
            lb.finish(st, Completion::Done, t);
        }
        out.push(u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX));
    }
    out
}

fn percentiles(mut v: Vec<u64>) -> (usize, f64, f64, f64) {
    v.sort_unstable();
    let at = |q: f64| v[((v.len() - 1) as f64 * q) as usize] as f64 / 1000.0;
    (v.len(), at(0.5), at(0.99), at(0.999))
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing we need either.
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    for kind in [
        StrategyKind::RoundRobin,
        StrategyKind::LeastConnections,
        StrategyKind::ConsistentHash,
    ] {
        let config = Config::default().with_rng_seed(Some(1)).with_passive(
            PassiveConfig::default()
                .with_consecutive_failures(1)
                .with_max_ejected_percent(100)
                .with_panic_threshold_percent(0),
        );
        let lb = Balancer::new(config, AnySelect::new(kind)).expect("valid config");
        lb.set_backends(set(usize::MAX), now()).expect("distinct");
        lb.handle_timeout(now());

        let stop = AtomicBool::new(false);
        let quiet = std::thread::scope(|s| {
            let h = s.spawn(|| requests(&lb, &stop));
            std::thread::sleep(PHASE);
            stop.store(true, Ordering::Relaxed);
            h.join().expect("request thread")
        });

        let stop = AtomicBool::new(false);
        let rebuilds = AtomicU64::new(0);
        let busy = std::thread::scope(|s| {
            let h = s.spawn(|| requests(&lb, &stop));
            s.spawn(|| {
                let mut round = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    round += 1;
                    let t = now();
                    if round % 2 == 0 {
                        let _ = lb.set_backends(set(round % BACKENDS), t);
                    } else {
                        let (mut st, a) = lb.start(RequestInfo::new(true, true), t);
                        if let Action::Forward { .. } = a {
                            let _ = lb.handle_outcome(&mut st, Outcome::ConnectRefused, t);
                        }
                        lb.abandon(st, t);
                    }
                    lb.handle_timeout(t);
                    rebuilds.fetch_add(1, Ordering::Relaxed);
                }
            });
            std::thread::sleep(PHASE);
            stop.store(true, Ordering::Relaxed);
            h.join().expect("request thread")
        });
        let (qn, q50, q99, q999) = percentiles(quiet);
        let (bn, b50, b99, b999) = percentiles(busy);
        println!(
            "{:>18} quiet: {qn:>8} req p50 {q50:>6.2} µs p99 {q99:>7.2} µs p99.9 {q999:>8.2} µs | \
             reload/eject ({} rebuilds): {bn:>8} req p50 {b50:>6.2} µs p99 {b99:>7.2} µs p99.9 {b999:>8.2} µs",
            kind.to_string(),
            rebuilds.load(Ordering::Relaxed)
        );
    }
}
