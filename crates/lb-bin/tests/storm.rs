//! Reload storm: 50 SIGHUPs to the real `lb` under sustained load (~100 client connections,
//! HTTP/1.1 and h2c, GETs and POSTs), each reload changing the backend set (adding,
//! removing, reordering, so that backend ids are renumbered) and, every other reload, the
//! strategy (all six in turn; the reloads in between keep the strategy and so the balancer).
//! What must hold: no request fails; no request issued after a reload was confirmed reaches
//! a backend that reload removed; the prober of a removed backend stops and none is left
//! running twice; lb's counts equal the backends'; memory stays flat.

mod common;

use common::load::{next_id, Load, LoadSpec};
use common::procfs::*;
use common::*;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

const STRATEGIES: [&str; 6] = [
    "round-robin",
    "weighted-round-robin",
    "least-connections",
    "p2c-ewma",
    "consistent-hash",
    "random",
];
const RELOADS: usize = 50;
/// Reloads before the start figure of memory: four of each strategy, so that every kind of
/// balancer and table has been built and the allocator has mostly settled.
const WARM_UP_RELOADS: usize = 24;
const POOL: usize = 6;
/// Active probe period: short, so that a leaked prober shows within a short window.
const PROBE_INTERVAL: Duration = Duration::from_millis(100);
/// Memory lb may gain over the 50 measured reloads (after the warm-up ones). Measured
/// here: release build, flat (+0.6 MiB, 2,000 requests per reload); debug build, after 12
/// warm-up reloads, +5 to +6.5 MiB, growing ever slower (1.7, 2.3, 0.8, 0.8, 0.8 MiB per
/// ten reloads) towards ~30 MiB, where 150 reloads end too: pooled connections opened and
/// closed as backends come and go, and the allocator settling. So 24 warm-up reloads and
/// 10 MiB (margin for a busy machine's debug build): a leak of 200 KiB or more per reload
/// fails it; smaller per-reload leaks (a
/// prober, a balancer) are what the probe count and the routing checks below catch.
const RSS_SLACK_KIB: u64 = 10 * 1024;

/// The backends (indexes into the pool, in config order) of configuration `i`: 2 to 4 of
/// the 6, shifted by 4 each time (so every reload removes some and adds some) and reversed
/// every other time (so the ones that stay change place, and number).
fn members(i: usize) -> Vec<usize> {
    let size = 2 + i % 3;
    let offset = (i * 4) % POOL;
    let mut m: Vec<usize> = (0..size).map(|k| (offset + k) % POOL).collect();
    if i % 2 == 1 {
        m.reverse();
    }
    m
}

fn strategy(i: usize) -> &'static str {
    STRATEGIES[(i / 2) % STRATEGIES.len()]
}

fn config(
    addr: std::net::SocketAddr,
    admin: std::net::SocketAddr,
    pool: &[Counting],
    i: usize,
) -> String {
    let mut text = format!(
        "listen = [\"{addr}\"]\nadmin = \"{admin}\"\nstrategy = \"{}\"\n\
         hash_key = \"header:x-test-id\"\n\
         [health]\ninterval = \"{}ms\"\ntimeout = \"1s\"\npath = \"{PROBE_PATH}\"\n",
        strategy(i),
        PROBE_INTERVAL.as_millis()
    );
    for (k, &b) in members(i).iter().enumerate() {
        text.push_str(&format!(
            "[[backend]]\nurl = \"{}\"\nweight = {}\n",
            pool[b].url(),
            1 + (k + i) % 3
        ));
    }
    text
}

fn load(target: std::net::SocketAddr, connections: usize, h2: bool) -> Load {
    let mut s = LoadSpec::new(target, connections, Duration::from_secs(3600));
    s.post_percent = 10;
    s.post_bytes = 256;
    s.h2 = h2;
    s.request_timeout = Duration::from_secs(20);
    Load::start(s)
}

#[test]
fn a_reload_storm_under_load_fails_nothing_and_leaks_nothing() {
    // Requests to let through under each configuration before the next reload.
    let per_reload: u64 = if long_mode() { 2_000 } else { 150 };
    let pool: Vec<Counting> = (0..POOL)
        .map(|i| Counting::start(&format!("b{i}")))
        .collect();
    let addr = free_port_addr();
    let admin = free_port_addr();
    let (dir, path) = write_temp_config("storm", &config(addr, admin, &pool, 0));
    let mut lb = Lb::spawn_quiet(&path);
    lb.wait_for("lb to listen", |lb| lb.logged("lb started") == 1);
    let pid = lb.pid();

    let h1 = load(addr, 80, false);
    let h2 = load(addr, 20, true);
    let warm = next_id() + 2_000;
    lb.wait_for("warm-up traffic", |_| next_id() >= warm);

    // confirmed[r]: every id from this one on was issued after reload r was in force.
    // hup_at[r]: when reload r was asked for (no request could be routed by it before).
    let mut confirmed = vec![0u64];
    let mut hup_at = vec![Instant::now()];
    let mut rss_start = 0;
    let mut rss_trace = Vec::new();
    let total = WARM_UP_RELOADS + RELOADS;
    for r in 1..=total {
        std::fs::write(&path, config(addr, admin, &pool, r)).unwrap();
        hup_at.push(Instant::now());
        lb.signal("HUP");
        lb.wait_for("the reload", |lb| lb.logged("configuration reloaded") == r);
        confirmed.push(next_id());
        let until = next_id() + per_reload;
        lb.wait_for("traffic under the new configuration", |_| {
            next_id() >= until
        });
        if r == WARM_UP_RELOADS {
            rss_start = rss_kib(pid);
        }
        if r >= WARM_UP_RELOADS && (r - WARM_UP_RELOADS) % 10 == 0 {
            rss_trace.push(rss_kib(pid));
        }
    }
    let r1 = h1.stop();
    let r2 = h2.stop();
    assert_eq!(lb.logged("reload failed"), 0, "every reload applied");
    let failed = r1.failures.len() + r2.failures.len();
    assert_eq!(
        failed,
        0,
        "failed requests: {:?} {:?}; first {:?}",
        r1.causes(),
        r2.causes(),
        r1.failures.first().or(r2.failures.first())
    );

    // No request reached a backend that was not in any configuration it could have been
    // routed by: from the last one confirmed before its id was issued to the last one asked
    // for before it arrived.
    let sets: Vec<BTreeSet<usize>> = (0..=total)
        .map(|i| members(i).into_iter().collect())
        .collect();
    let mut to_removed = Vec::new();
    let mut arrived = 0u64;
    for (b, backend) in pool.iter().enumerate() {
        for (id, at) in backend.arrivals() {
            arrived += 1;
            let lo = confirmed.partition_point(|&c| c <= id) - 1;
            let hi = hup_at
                .partition_point(|&h| h <= at)
                .saturating_sub(1)
                .max(lo);
            if !(lo..=hi).any(|r| sets[r].contains(&b)) {
                to_removed.push((id, backend.name.clone(), lo, hi));
            }
        }
    }
    assert_eq!(arrived, r1.sent + r2.sent, "each request arrived once");

    // lb's counters (which outlive the balancers the reloads replaced) equal the backends'.
    let idle = lb.poll(Duration::from_secs(10), |_| status_active(admin) == 0);
    assert!(idle, "requests still counted in flight");
    let metrics = admin_get(admin, "/metrics").1;
    for b in &pool {
        let label = format!("backend=\"{}\"", b.label());
        let counted = metric_sum(&metrics, "lb_requests_total", &[&label]) as u64;
        assert_eq!(counted, b.requests(), "lb_requests_total for {}", b.name);
    }

    // Probes: wait until every backend of the last configuration has been probed twice
    // more (the probers of the last reload are running and anything sent before it has
    // arrived), then count over a window.
    let last = &sets[total];
    let base: Vec<u64> = pool.iter().map(Counting::probes).collect();
    let probing = lb.poll(Duration::from_secs(20), |_| {
        last.iter().all(|&b| pool[b].probes() >= base[b] + 2)
    });
    let before: Vec<u64> = pool.iter().map(Counting::probes).collect();
    let window_start = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    let after: Vec<u64> = pool.iter().map(Counting::probes).collect();
    let window = window_start.elapsed();
    // At most one per 0.9 interval (the jitter), plus one; a second prober would double it.
    let expected = window.as_secs_f64() / PROBE_INTERVAL.as_secs_f64();
    let mut leaks = Vec::new();
    let mut not_probed = Vec::new();
    for (b, backend) in pool.iter().enumerate() {
        let n = after[b] - before[b];
        let present = last.contains(&b);
        let leaked = if present {
            n as f64 > 1.5 * expected
        } else {
            n > 0
        };
        if leaked {
            leaks.push((backend.name.clone(), present, n));
        }
        if present && (n == 0 || !probing) {
            not_probed.push(backend.name.clone());
        }
    }
    let rss_end = rss_kib(pid);
    report(serde_json::json!({
        "section": "reload_storm",
        "reloads": RELOADS,
        "requests": r1.sent + r2.sent,
        "failed": failed,
        "to_removed": to_removed.len(),
        "probe_leaks": leaks.len(),
        "probe_window_s": window.as_secs_f64(),
        "probes_expected_per_backend": expected.round(),
        "rss_kib_start": rss_start,
        "rss_kib_end": rss_end,
        "rss_kib_every_10_reloads": rss_trace,
        "warm_up_reloads": WARM_UP_RELOADS,
        "rss_tolerance_kib": RSS_SLACK_KIB,
    }));
    assert!(
        to_removed.is_empty(),
        "{} requests reached a backend their configuration had removed (id, backend, configs): {:?}",
        to_removed.len(),
        &to_removed[..to_removed.len().min(10)]
    );
    assert!(
        not_probed.is_empty(),
        "in the last configuration but not probed: {not_probed:?}"
    );
    assert!(
        leaks.is_empty(),
        "probes beyond the configured ones over {window:?} (expected {expected:.0} per present backend): {leaks:?}"
    );
    assert!(
        rss_end <= rss_start + RSS_SLACK_KIB,
        "RSS {rss_start} KiB → {rss_end} KiB"
    );
    lb.signal("TERM");
    lb.wait_for("lb to exit", |lb| lb.child.try_wait().unwrap().is_some());
    let _ = std::fs::remove_dir_all(&dir);
}

/// The reloads that keep the strategy keep lb-core's balancer and change its backend set
/// in place: a request that took the routes in force just before such a reload may pick a
/// backend only the new routes know. Every such request must still be served (it used to
/// get 502 or 503 when the reload replaced every backend).
#[test]
fn reloads_that_keep_the_strategy_and_replace_every_backend_fail_nothing() {
    let pool: Vec<Counting> = (0..4).map(|i| Counting::start(&format!("b{i}"))).collect();
    let addr = free_port_addr();
    let admin = free_port_addr();
    let text = |i: usize| {
        let mut t = format!(
            "listen = [\"{addr}\"]\nadmin = \"{admin}\"\nstrategy = \"round-robin\"\n\
             [health]\ninterval = \"0s\"\n"
        );
        for b in &pool[(i % 2) * 2..(i % 2) * 2 + 2] {
            t.push_str(&format!("[[backend]]\nurl = \"{}\"\n", b.url()));
        }
        t
    };
    let (dir, path) = write_temp_config("storm-same", &text(0));
    let mut lb = Lb::spawn_quiet(&path);
    lb.wait_for("lb to listen", |lb| lb.logged("lb started") == 1);
    let h1 = load(addr, 48, false);
    let h2 = load(addr, 16, true);
    for r in 1..=20 {
        std::fs::write(&path, text(r)).unwrap();
        lb.signal("HUP");
        lb.wait_for("the reload", |lb| lb.logged("configuration reloaded") == r);
        let until = next_id() + 100;
        lb.wait_for("traffic", |_| next_id() >= until);
    }
    let (r1, r2) = (h1.stop(), h2.stop());
    assert!(r1.sent > 0 && r2.sent > 0);
    assert!(
        r1.failures.is_empty() && r2.failures.is_empty(),
        "failed: {:?} {:?}",
        r1.causes(),
        r2.causes()
    );
    assert_eq!(
        pool.iter().map(Counting::requests).sum::<u64>(),
        r1.sent + r2.sent
    );
    lb.signal("TERM");
    lb.wait_for("lb to exit", |lb| lb.child.try_wait().unwrap().is_some());
    let _ = std::fs::remove_dir_all(&dir);
}
