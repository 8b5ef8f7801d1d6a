//! What a process holds, read from /proc: open file descriptors and resident memory; and the
//! admin server's metrics, scraped over a plain HTTP/1.1 connection.
#![allow(dead_code, unreachable_pub)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// Open file descriptors of `pid`.
pub fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Resident set size of `pid`, KiB.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// `GET path` on the admin server: (status, body).
pub fn admin_get(admin: SocketAddr, path: &str) -> (u16, String) {
    let Ok(mut s) = TcpStream::connect(admin) else {
        return (0, String::new());
    };
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let _ = write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n"
    );
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// Sum of every sample of metric `name` whose label set contains all of `labels`
/// (`key="value"` strings), from a Prometheus text exposition.
pub fn metric_sum(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, rest) = match series.split_once('{') {
                Some((m, r)) => (m, r),
                None => (series, ""),
            };
            if metric != name || !labels.iter().all(|want| rest.contains(want)) {
                return None;
            }
            value.parse::<f64>().ok()
        })
        .sum()
}

/// Scrapes `/metrics` and sums `name` over the series matching `labels`.
pub fn scrape(admin: SocketAddr, name: &str, labels: &[&str]) -> f64 {
    metric_sum(&admin_get(admin, "/metrics").1, name, labels)
}

/// One figure line for `cargo xtask reliability`: `RELIABILITY {json}` on stdout.
pub fn report(figures: serde_json::Value) {
    println!("RELIABILITY {figures}");
}

/// Whether the long form was asked for (`LB_RELIABILITY=long`).
pub fn long_mode() -> bool {
    std::env::var("LB_RELIABILITY").is_ok_and(|v| v == "long")
}

/// Open file descriptors of `pid` once they stop changing (the same count over five reads
/// 100 ms apart, for at most `limit`): connections that just closed on the client's side
/// take a moment to close in the process too.
pub fn settled_fds(pid: u32, limit: Duration) -> usize {
    let deadline = std::time::Instant::now() + limit;
    let mut last = open_fds(pid);
    let mut same = 0;
    while same < 5 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        let now = open_fds(pid);
        if now == last {
            same += 1;
        } else {
            same = 0;
            last = now;
        }
    }
    last
}

/// Sum of `active_requests` over the backends of `/status`.
pub fn status_active(admin: SocketAddr) -> u64 {
    let (_, body) = admin_get(admin, "/status");
    serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| {
            v["backends"].as_array().map(|b| {
                b.iter()
                    .map(|b| b["active_requests"].as_u64().unwrap_or(0))
                    .sum()
            })
        })
        .unwrap_or(u64::MAX)
}
