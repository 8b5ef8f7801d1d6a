//! Soak: many requests (100,000 in CI, 1,000,000 with `LB_RELIABILITY=long`), HTTP/1.1 and
//! h2c at once, GETs and POSTs, through the real `lb` in front of four counting backends.
//! What must hold at the end is what an operator watches on a long-running proxy: nothing
//! grows (file descriptors, resident memory), nothing stays counted in flight, and lb's
//! request counters agree exactly with what the backends received.

mod common;

use common::load::{Load, LoadReport, LoadSpec};
use common::procfs::*;
use common::*;
use std::time::Duration;

/// Memory lb may gain between the start (after the warm-up) and the end.
///
/// Why this bound: a leak of 100 bytes per request (112 with malloc's header) is 10.7 MiB
/// over the 100,000 requests of CI (107 MiB over the long run's million), more than 9 MiB
/// whatever the rest does, so it fails (checked: with such a leak put into lb-proxy's
/// request path, this test fails, at +17 MiB). What a healthy lb gains measured 2.6 MiB
/// here (debug build, load average 12), once the warm-up has taken the upstream pool and
/// the allocator beyond the run's needs; with a warm-up like the run, 2.3–7 MiB, as the
/// pool kept growing (see [`UPSTREAM_BOUND`]) and memory with it. 9 MiB leaves a busy
/// machine that margin while a 100-byte leak (10.7 MiB on top of the healthy gain) fails.
const RSS_SLACK_KIB: u64 = 9 * 1024;

/// File descriptors other than pooled upstream connections (listeners, epoll, timers,
/// client connections once closed) must be the same at the end as at the start, give or
/// take this many.
const FD_SLACK: usize = 2;

/// Clients per protocol.
const PER_PROTOCOL: usize = 16;
const BACKENDS: usize = 4;

/// Clients of the warm-up, both protocols: four times the run's.
const WARM_UP_CLIENTS: usize = 4 * 2 * PER_PROTOCOL;

/// The upstream pool grows, slowly, for a long while: a connection goes back to the pool
/// just after its response reached the client, so now and then the client's next request
/// finds none ready and opens one more. It is bounded by the load, not by the number of
/// requests: per backend, at most two connections per client connection (the one finishing,
/// the one in use; each client connection lives in one worker), and the warm-up has the
/// most clients. A connection leaked per request (or per hundred) would pass it within the
/// run.
const UPSTREAM_BOUND: u64 = (2 * WARM_UP_CLIENTS * BACKENDS) as u64;

fn config(addr: std::net::SocketAddr, admin: std::net::SocketAddr, urls: &[String]) -> String {
    let mut text = format!(
        "listen = [\"{addr}\"]\nadmin = \"{admin}\"\nstrategy = \"round-robin\"\n\
         [health]\ninterval = \"0s\"\n"
    );
    for u in urls {
        text.push_str(&format!("[[backend]]\nurl = \"{u}\"\n"));
    }
    text
}

/// Runs `total` requests, half over HTTP/1.1 and half over h2c, each protocol over
/// `per_protocol` connections, with 10 % POSTs of 512 bytes.
fn run_mix(
    target: std::net::SocketAddr,
    per_protocol: usize,
    total: u64,
) -> (common::load::LoadReport, common::load::LoadReport) {
    let spec = |h2: bool| {
        let mut s = LoadSpec::new(target, per_protocol, Duration::from_secs(3600));
        s.total = total / 2;
        s.post_percent = 10;
        s.post_bytes = 512;
        s.h2 = h2;
        s.request_timeout = Duration::from_secs(20);
        s
    };
    let h1 = Load::start(spec(false));
    let h2 = Load::start(spec(true));
    (h1.wait(), h2.wait())
}

fn merge(into: &mut LoadReport, r: LoadReport) {
    into.sent += r.sent;
    into.ok += r.ok;
    into.posts_sent += r.posts_sent;
    into.failures.extend(r.failures);
    into.latencies_us.extend(r.latencies_us);
}

fn failures(r: &common::load::LoadReport) -> String {
    format!("{:?} (first: {:?})", r.causes(), r.failures.first())
}

#[test]
fn a_soak_leaves_nothing_behind_and_counts_exactly() {
    let total: u64 = if long_mode() { 1_000_000 } else { 100_000 };
    let warm_up: u64 = 10_000;
    let per_protocol = PER_PROTOCOL;
    let backends: Vec<Counting> = (0..BACKENDS)
        .map(|i| Counting::start(&format!("b{i}")))
        .collect();
    let addr = free_port_addr();
    let admin = free_port_addr();
    let urls: Vec<String> = backends.iter().map(Counting::url).collect();
    let (dir, path) = write_temp_config("soak", &config(addr, admin, &urls));
    let mut lb = Lb::spawn_quiet(&path);
    lb.wait_for("lb to listen", |lb| lb.logged("lb started") == 1);
    let pid = lb.pid();

    // Warm-up with four times the run's clients: the upstream pool then holds more
    // connections than the run can ever have busy at once, and the allocator's arenas have
    // seen bigger peaks than the run's, so neither grows during the run (with the run's own
    // concurrency, the pool kept opening a connection now and then for the whole run, and
    // memory followed).
    let (w1, w2) = run_mix(addr, WARM_UP_CLIENTS / 2, warm_up);
    assert!(w1.failures.is_empty(), "warm-up h1: {}", failures(&w1));
    assert!(w2.failures.is_empty(), "warm-up h2: {}", failures(&w2));
    let upstream = |bs: &[Counting]| bs.iter().map(Counting::open_connections).sum::<u64>();
    let fds_start = settled_fds(pid, Duration::from_secs(10));
    let upstream_start = upstream(&backends);
    let rss_start = rss_kib(pid);

    // In tenths, with the memory after each: a leak grows in a straight line, a pool or an
    // allocator settling does not.
    let (mut r1, mut r2) = (LoadReport::default(), LoadReport::default());
    let mut elapsed = Duration::ZERO;
    let mut rss_trace = Vec::new();
    for _ in 0..10 {
        let (a, b) = run_mix(addr, per_protocol, total / 10);
        elapsed += a.elapsed.max(b.elapsed);
        merge(&mut r1, a);
        merge(&mut r2, b);
        rss_trace.push(rss_kib(pid));
    }
    let fds_end = settled_fds(pid, Duration::from_secs(10));
    let upstream_end = upstream(&backends);
    let rss_end = rss_kib(pid);

    assert!(r1.failures.is_empty(), "h1: {}", failures(&r1));
    assert!(r2.failures.is_empty(), "h2: {}", failures(&r2));
    assert_eq!(r1.sent + r2.sent, total);

    // In flight: nothing, once the last responses are out (bounded wait: the count drops
    // just after the client has its last byte).
    let idle = lb.poll(Duration::from_secs(10), |_| {
        status_active(admin) == 0 && scrape(admin, "lb_backend_active_requests", &[]) == 0.0
    });
    let metrics = admin_get(admin, "/metrics").1;
    assert!(
        idle,
        "requests still counted in flight: /status {}, lb_backend_active_requests {}",
        status_active(admin),
        metric_sum(&metrics, "lb_backend_active_requests", &[])
    );

    // Counted exactly: lb's attempts per backend = what that backend received; and every
    // request the clients sent arrived once (no id twice, none lost).
    let sent = w1.sent + w2.sent + r1.sent + r2.sent;
    let posts = w1.posts_sent + w2.posts_sent + r1.posts_sent + r2.posts_sent;
    let mut lb_total = 0u64;
    let mut backend_total = 0u64;
    let mut backend_posts = 0u64;
    for b in &backends {
        let label = format!("backend=\"{}\"", b.label());
        let counted = metric_sum(&metrics, "lb_requests_total", &[&label]) as u64;
        assert_eq!(counted, b.requests(), "lb_requests_total for {}", b.name);
        assert!(b.requests() > 0, "{} got nothing", b.name);
        lb_total += counted;
        backend_total += b.requests();
        backend_posts += b.seen.posts.load(std::sync::atomic::Ordering::SeqCst);
    }
    assert_eq!(
        metric_sum(&metrics, "lb_requests_total", &[]) as u64,
        lb_total,
        "no attempt counted against another backend"
    );
    assert_eq!(backend_total, sent, "each request arrived once");
    assert_eq!(backend_posts, posts, "each POST arrived once");
    let mut ids: Vec<u64> = backends
        .iter()
        .flat_map(|b| b.arrivals().into_iter().map(|(id, _)| id))
        .collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len() as u64, sent, "no request id arrived twice");

    let rps = (r1.sent + r2.sent) as f64 / elapsed.as_secs_f64();
    let mut lat = r1.latencies_us.clone();
    lat.extend_from_slice(&r2.latencies_us);
    report(serde_json::json!({
        "section": "soak",
        "requests": total,
        "failed": r1.failures.len() + r2.failures.len(),
        "fds_start": fds_start,
        "fds_end": fds_end,
        "fd_tolerance": FD_SLACK,
        "upstream_conns_start": upstream_start,
        "upstream_conns_end": upstream_end,
        "rss_kib_start": rss_start,
        "rss_kib_end": rss_end,
        "rss_kib_every_tenth": rss_trace,
        "warm_up_requests": warm_up,
        "rss_tolerance_kib": RSS_SLACK_KIB,
        "rps": rps.round(),
        "p50_ms": common::load::percentile_ms(&lat, 50.0),
        "p99_ms": common::load::percentile_ms(&lat, 99.0),
        "lb_requests_total": lb_total,
        "backend_total": backend_total,
    }));
    let other_start = fds_start - upstream_start as usize;
    let other_end = fds_end - upstream_end as usize;
    assert!(
        other_end <= other_start + FD_SLACK && other_end + FD_SLACK >= other_start,
        "open fds {fds_start} → {fds_end}, of which upstream {upstream_start} → {upstream_end}"
    );
    assert!(
        upstream_end <= UPSTREAM_BOUND,
        "{upstream_end} upstream connections open"
    );
    assert!(
        rss_end <= rss_start + RSS_SLACK_KIB,
        "RSS {rss_start} KiB → {rss_end} KiB"
    );
    lb.signal("TERM");
    lb.wait_for("lb to exit", |lb| lb.child.try_wait().unwrap().is_some());
    let _ = std::fs::remove_dir_all(&dir);
}
