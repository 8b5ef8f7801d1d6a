//! `cargo xtask bench`: lb side by side with direct, nginx and haproxy, in one run.
//!
//! Every row runs every target in interleaved rounds (A B C A B C …) so that drift on a
//! noisy machine hits all alike; the report quotes medians of the rounds and the ratios
//! lb/nginx, lb/haproxy and lb/direct. Load comes from `wrk` (HTTP/1.1; a Lua hook prints
//! exact percentiles) and `h2load` (h2c). Peer configs are written to `target/bench/`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

const BACKEND_BASE: u16 = 21000;
const PROXY_PORT: u16 = 19080;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
enum Proto {
    /// HTTP/1.1 keep-alive.
    H1,
    /// HTTP/1.1, a new connection per request.
    H1Close,
    /// HTTP/2 cleartext, prior knowledge.
    H2c,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
enum Target {
    Direct,
    Lb(&'static str),
    Nginx,
    Haproxy,
}

impl Target {
    fn name(&self) -> String {
        match self {
            Self::Direct => "direct".into(),
            Self::Lb(s) => format!("lb {s}"),
            Self::Nginx => "nginx".into(),
            Self::Haproxy => "haproxy".into(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
struct Row {
    name: String,
    proto: Proto,
    body: usize,
    conns: u32,
    backends: usize,
    targets: Vec<Target>,
}

/// One load run's figures.
#[derive(Debug, Clone, Default, Serialize)]
struct Measure {
    rps: f64,
    p50_ms: Option<f64>,
    p99_ms: Option<f64>,
    p999_ms: Option<f64>,
    requests: u64,
    errors: u64,
    cpu_s_per_100k: Option<f64>,
    peak_rss_mib: Option<f64>,
}

struct Opts {
    quick: bool,
    install: bool,
    rounds: usize,
    duration: Duration,
    out: PathBuf,
}

pub(crate) fn run(args: &[String]) -> Result<(), String> {
    if args.iter().any(|a| a == "--micro") {
        return micro(args.iter().filter(|a| *a != "--micro").cloned().collect());
    }
    let quick = args.iter().any(|a| a == "--quick");
    let opts = Opts {
        quick,
        install: args.iter().any(|a| a == "--install"),
        rounds: flag(args, "--rounds").unwrap_or(if quick { 1 } else { 3 }),
        duration: Duration::from_secs(flag(args, "--duration").unwrap_or(if quick {
            2
        } else {
            4
        })),
        out: PathBuf::from("target/bench"),
    };
    std::fs::create_dir_all(&opts.out).map_err(|e| e.to_string())?;
    tools(&opts)?;
    let lb = build_lb()?;
    let has = |t: &str| which(t).is_some();
    let peers: Vec<Target> = [(Target::Nginx, "nginx"), (Target::Haproxy, "haproxy")]
        .into_iter()
        .filter(|(_, bin)| has(bin))
        .map(|(t, _)| t)
        .collect();
    let rows = rows(&opts, &peers, has("h2load"));
    let total: u64 = rows
        .iter()
        .map(|r| (r.targets.len() * opts.rounds) as u64)
        .sum();
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {msg}")
            .map_err(|e| e.to_string())?
            .progress_chars("=> "),
    );
    std::fs::write(opts.out.join("report.lua"), LUA).map_err(|e| e.to_string())?;
    let mut results: Vec<(Row, BTreeMap<Target, Vec<Measure>>)> = Vec::new();
    // Rows that share backends (count, body size) share one backend process.
    let mut groups: BTreeMap<(usize, usize), Vec<Row>> = BTreeMap::new();
    for r in rows {
        groups.entry((r.backends, r.body)).or_default().push(r);
    }
    for ((count, body), rows) in groups {
        let backends = Backends::start(count, body)?;
        for row in rows {
            let mut by_target: BTreeMap<Target, Vec<Measure>> = BTreeMap::new();
            for round in 0..opts.rounds {
                for target in &row.targets {
                    bar.set_message(format!(
                        "{} · {} · round {}",
                        row.name,
                        target.name(),
                        round + 1
                    ));
                    let m = measure(&opts, &lb, &row, target, &backends)?;
                    by_target.entry(target.clone()).or_default().push(m);
                    bar.inc(1);
                }
            }
            results.push((row, by_target));
        }
        drop(backends);
    }
    bar.finish_and_clear();
    report(&opts, &results)
}

fn flag<T: std::str::FromStr>(args: &[String], name: &str) -> Option<T> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
}

fn micro(rest: Vec<String>) -> Result<(), String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args(["bench", "-p", "lb-benches", "--"])
        .args(&rest)
        .status()
        .map_err(|e| e.to_string())?;
    status
        .success()
        .then_some(())
        .ok_or_else(|| format!("cargo bench failed: {status}"))
}

fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .chain(["/usr/sbin", "/sbin"])
        .map(|d| Path::new(d).join(tool))
        .find(|p| p.is_file())
}

fn tools(opts: &Opts) -> Result<(), String> {
    let wanted = [
        ("wrk", "wrk"),
        ("h2load", "nghttp2-client"),
        ("nginx", "nginx-light"),
        ("haproxy", "haproxy"),
    ];
    let missing: Vec<&str> = wanted
        .iter()
        .filter(|(t, _)| which(t).is_none())
        .map(|(_, pkg)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if opts.install {
        let ok = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "apt-get update -qq && apt-get install -y -qq {}",
                missing.join(" ")
            ))
            .status()
            .map_err(|e| e.to_string())?;
        if !ok.success() {
            return Err("apt-get install failed (run as root)".into());
        }
    } else {
        eprintln!("xtask: missing {}: `apt-get install {}` or rerun with --install (as root); rows and targets that need them are skipped", missing.join(", "), missing.join(" "));
    }
    which("wrk")
        .map(|_| ())
        .ok_or_else(|| "wrk is required: apt-get install wrk (or --install)".into())
}

fn build_lb() -> Result<PathBuf, String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let ok = Command::new(cargo)
        .args(["build", "--release", "-q", "-p", "lb-bin"])
        .status()
        .map_err(|e| e.to_string())?;
    if !ok.success() {
        return Err("building lb failed".into());
    }
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let lb = exe.with_file_name("lb");
    lb.is_file()
        .then_some(lb)
        .ok_or_else(|| "target/release/lb not found".into())
}

fn rows(opts: &Opts, peers: &[Target], h2: bool) -> Vec<Row> {
    let strategies = [
        "round-robin",
        "weighted-round-robin",
        "least-connections",
        "p2c-ewma",
        "consistent-hash",
        "random",
    ];
    let mut all: Vec<Target> = vec![Target::Direct];
    all.extend(strategies.iter().map(|s| Target::Lb(s)));
    all.extend(peers.iter().cloned());
    let mut core: Vec<Target> = vec![Target::Direct, Target::Lb("round-robin")];
    core.extend(peers.iter().cloned());
    let proxies: Vec<Target> = core
        .iter()
        .filter(|t| **t != Target::Direct)
        .cloned()
        .collect();
    let row = |name: &str, proto, body, conns, backends, targets: &Vec<Target>| Row {
        name: name.into(),
        proto,
        body,
        conns,
        backends,
        targets: targets.clone(),
    };
    let mut rows = vec![row(
        "h1 keep-alive 1 KiB c256",
        Proto::H1,
        1024,
        256,
        3,
        &all,
    )];
    if opts.quick {
        return rows;
    }
    rows.push(row(
        "h1 keep-alive 1 KiB c64",
        Proto::H1,
        1024,
        64,
        3,
        &core,
    ));
    rows.push(row(
        "h1 keep-alive 1 KiB c1024",
        Proto::H1,
        1024,
        1024,
        3,
        &core,
    ));
    rows.push(row(
        "h1 keep-alive 64 KiB c256",
        Proto::H1,
        65536,
        256,
        3,
        &core,
    ));
    rows.push(row(
        "h1 new connection 1 KiB c64",
        Proto::H1Close,
        1024,
        64,
        3,
        &core,
    ));
    if h2 {
        rows.push(row("h2c 1 KiB c64", Proto::H2c, 1024, 64, 3, &core));
    }
    rows.push(row(
        "h1 keep-alive 1 KiB c256, 100 backends",
        Proto::H1,
        1024,
        256,
        100,
        &proxies,
    ));
    rows.push(row(
        "h1 keep-alive 1 KiB c256, 1000 backends",
        Proto::H1,
        1024,
        256,
        1000,
        &proxies,
    ));
    rows
}

/// The backend process, killed on drop.
struct Backends {
    child: Child,
    count: usize,
}

impl Backends {
    fn start(count: usize, body: usize) -> Result<Self, String> {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let mut child = Command::new(exe)
            .args([
                "backend",
                &BACKEND_BASE.to_string(),
                &count.to_string(),
                &body.to_string(),
            ])
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| e.to_string())?;
        let mut line = String::new();
        let out = child.stdout.take().ok_or("no backend stdout")?;
        std::io::BufRead::read_line(&mut std::io::BufReader::new(out), &mut line)
            .map_err(|e| e.to_string())?;
        if line.trim() != "ready" {
            let _ = child.kill();
            return Err(format!(
                "backends did not start (ports {BACKEND_BASE}..): {line}"
            ));
        }
        Ok(Self { child, count })
    }

    fn addrs(&self) -> impl Iterator<Item = String> + '_ {
        (0..self.count).map(|i| format!("127.0.0.1:{}", usize::from(BACKEND_BASE) + i))
    }
}

impl Drop for Backends {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the target (if it is a proxy), runs the load, stops it.
fn measure(
    opts: &Opts,
    lb: &Path,
    row: &Row,
    target: &Target,
    backends: &Backends,
) -> Result<Measure, String> {
    if *target != Target::Direct && std::net::TcpStream::connect(("127.0.0.1", PROXY_PORT)).is_ok()
    {
        // Whatever listens there would be measured instead of the target.
        return Err(format!(
            "port {PROXY_PORT} is busy: stop whatever listens there and run again"
        ));
    }
    let (port, mut proxy) = match target {
        Target::Direct => (BACKEND_BASE, None),
        Target::Lb(strategy) => {
            let list: Vec<String> = backends.addrs().map(|a| format!("http://{a}")).collect();
            let cmd = format!(
                "ulimit -n $(ulimit -Hn) 2>/dev/null; exec {} --listen 127.0.0.1:{PROXY_PORT} --health-interval 0 --strategy {strategy} --backends {}",
                lb.display(),
                list.join(",")
            );
            (PROXY_PORT, Some(spawn_sh(&cmd)?))
        }
        Target::Nginx => {
            let conf = nginx_conf(opts, row, backends)?;
            let cmd = format!(
                "exec nginx -p {} -c {} -g 'daemon off;'",
                opts.out.display(),
                conf.display()
            );
            (PROXY_PORT, Some(spawn_sh(&cmd)?))
        }
        Target::Haproxy => {
            let conf = haproxy_conf(opts, row, backends)?;
            let cmd = format!(
                "ulimit -n $(ulimit -Hn) 2>/dev/null; exec haproxy -db -f {}",
                conf.display()
            );
            (PROXY_PORT, Some(spawn_sh(&cmd)?))
        }
    };
    let result = (|| {
        wait_port(port, proxy.as_mut()).map_err(|e| format!("{}: {e}", target.name()))?;
        let pid = proxy.as_ref().map(Child::id);
        // Warm up pools and caches, then measure.
        load(opts, row, port, Duration::from_secs(1))?;
        let cpu0 = pid.map(tree_cpu_ticks);
        let m = load(opts, row, port, opts.duration)?;
        let cpu1 = pid.map(tree_cpu_ticks);
        let mut m = m;
        if let (Some(a), Some(b)) = (cpu0, cpu1) {
            let secs = (b.saturating_sub(a)) as f64 / 100.0;
            m.cpu_s_per_100k = (m.requests > 0).then(|| secs / m.requests as f64 * 1e5);
        }
        m.peak_rss_mib = pid.map(|p| tree_rss_kib(p) as f64 / 1024.0);
        Ok(m)
    })();
    if let Some(child) = proxy.as_mut() {
        stop(child);
    }
    result
}

/// Starts a proxy through `sh -c` (for `ulimit` and `exec`), quiet, logging at warn.
fn spawn_sh(cmd: &str) -> Result<Child, String> {
    Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())
}

fn stop(child: &mut Child) {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    // Proxies with worker processes (nginx) must be gone before the next one binds the port.
    let _ = wait_port_free(PROXY_PORT);
}

fn wait_port(port: u16, mut proxy: Option<&mut Child>) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Some(Ok(Some(status))) = proxy.as_mut().map(|c| c.try_wait()) {
            return Err(format!("exited with {status} before listening on {port}"));
        }
        if Instant::now() > deadline {
            return Err(format!("nothing listens on port {port}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn wait_port_free(port: u16) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
        if Instant::now() > deadline {
            return Err(format!("port {port} still in use"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn load(opts: &Opts, row: &Row, port: u16, duration: Duration) -> Result<Measure, String> {
    let url = format!("http://127.0.0.1:{port}/");
    let secs = duration.as_secs().max(1);
    match row.proto {
        Proto::H1 | Proto::H1Close => {
            let close = if row.proto == Proto::H1Close {
                "-H 'Connection: close'"
            } else {
                ""
            };
            let cmd = format!(
                "ulimit -n $(ulimit -Hn) 2>/dev/null; exec wrk -t2 -c{} -d{secs}s {close} -s {} {url}",
                row.conns,
                opts.out.join("report.lua").display()
            );
            let out = Command::new("sh")
                .arg("-c")
                .arg(cmd)
                .output()
                .map_err(|e| e.to_string())?;
            let text = String::from_utf8_lossy(&out.stdout);
            let line = text
                .lines()
                .find(|l| l.starts_with("LBSTATS"))
                .ok_or_else(|| format!("wrk said: {text}"))?;
            let f: Vec<f64> = line
                .split_whitespace()
                .skip(1)
                .filter_map(|v| v.parse().ok())
                .collect();
            if f.len() < 6 {
                return Err(format!("bad wrk stats: {line}"));
            }
            let (requests, errors, dur_us) = (f[0] as u64, f[1] as u64, f[2]);
            Ok(Measure {
                rps: requests as f64 / (dur_us / 1e6),
                p50_ms: Some(f[3] / 1000.0),
                p99_ms: Some(f[4] / 1000.0),
                p999_ms: Some(f[5] / 1000.0),
                requests,
                errors,
                ..Measure::default()
            })
        }
        Proto::H2c => {
            let cmd = format!(
                "ulimit -n $(ulimit -Hn) 2>/dev/null; exec h2load -t2 -c{} -m10 -D {secs} {url}",
                row.conns
            );
            let out = Command::new("sh")
                .arg("-c")
                .arg(cmd)
                .output()
                .map_err(|e| e.to_string())?;
            let text = String::from_utf8_lossy(&out.stdout);
            let rps = text
                .lines()
                .find(|l| l.starts_with("finished in"))
                .and_then(|l| l.split(", ").nth(1))
                .and_then(|s| s.split_whitespace().next())
                .and_then(|v| v.parse::<f64>().ok())
                .ok_or_else(|| format!("h2load said: {text}"))?;
            let field = |name: &str| -> Option<u64> {
                let l = text.lines().find(|l| l.starts_with("requests:"))?;
                l.split(", ")
                    .find(|p| p.contains(name))?
                    .split_whitespace()
                    .find_map(|w| w.parse().ok())
            };
            let succeeded = field("succeeded").unwrap_or(0);
            Ok(Measure {
                rps,
                requests: succeeded,
                errors: field("failed").unwrap_or(0),
                ..Measure::default()
            })
        }
    }
}

/// utime + stime of `pid` and its children (nginx's workers), in clock ticks.
fn tree_cpu_ticks(pid: u32) -> u64 {
    tree(pid)
        .iter()
        .filter_map(|p| stat(*p))
        .map(|f| f.get(11).zip(f.get(12)).map_or(0, |(u, s)| u + s))
        .sum()
}

fn tree_rss_kib(pid: u32) -> u64 {
    tree(pid)
        .iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/status")).ok())
        .filter_map(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .sum()
}

/// Fields of /proc/PID/stat after the command name (state is field 0 here, utime 11, stime 12).
fn stat(pid: u32) -> Option<Vec<u64>> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    Some(
        rest.split_whitespace()
            .map(|v| v.parse().unwrap_or(0))
            .collect(),
    )
}

fn tree(root: u32) -> Vec<u32> {
    let mut all = vec![root];
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return all;
    };
    let procs: Vec<(u32, u32)> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|p| Some((p, u32::try_from(*stat(p)?.get(1)?).ok()?)))
        .collect();
    let mut i = 0;
    while i < all.len() {
        let parent = all[i];
        all.extend(
            procs
                .iter()
                .filter(|(_, pp)| *pp == parent)
                .map(|(p, _)| *p),
        );
        i += 1;
    }
    all
}

fn nginx_conf(opts: &Opts, row: &Row, backends: &Backends) -> Result<PathBuf, String> {
    let servers: String = backends
        .addrs()
        .map(|a| format!("    server {a};\n"))
        .collect();
    let h2 = if row.proto == Proto::H2c {
        " http2"
    } else {
        ""
    };
    let conf = format!(
        "# generated by cargo xtask bench: nginx as a peer of lb, configured equivalently\n\
         worker_processes 2;\nworker_rlimit_nofile 16384;\npid nginx.pid;\nerror_log stderr error;\n\
         events {{ worker_connections 8192; }}\n\
         http {{\n  access_log off;\n  keepalive_requests 1000000;\n\
         upstream b {{\n{servers}    keepalive 512;\n  }}\n\
         server {{\n    listen 127.0.0.1:{PROXY_PORT}{h2};\n    location / {{\n      proxy_pass http://b;\n\
         \x20     proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n      proxy_set_header Host $host;\n\
         \x20     proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n    }}\n  }}\n}}\n"
    );
    let path = std::fs::canonicalize(&opts.out)
        .map_err(|e| e.to_string())?
        .join("nginx.conf");
    std::fs::write(&path, conf).map_err(|e| e.to_string())?;
    Ok(path)
}

fn haproxy_conf(opts: &Opts, row: &Row, backends: &Backends) -> Result<PathBuf, String> {
    let servers: String = backends
        .addrs()
        .enumerate()
        .map(|(i, a)| format!("  server s{i} {a}\n"))
        .collect();
    let proto = if row.proto == Proto::H2c {
        " proto h2"
    } else {
        ""
    };
    let conf = format!(
        "# generated by cargo xtask bench: haproxy as a peer of lb, configured equivalently\n\
         global\n  nbthread 2\n  maxconn 8000\n\n\
         defaults\n  mode http\n  timeout connect 1s\n  timeout client 60s\n  timeout server 60s\n\
         \x20 option http-keep-alive\n  http-reuse always\n\n\
         frontend f\n  bind 127.0.0.1:{PROXY_PORT}{proto}\n  option forwardfor\n  default_backend b\n\n\
         backend b\n  balance roundrobin\n{servers}"
    );
    let path = opts.out.join("haproxy.cfg");
    std::fs::write(&path, conf).map_err(|e| e.to_string())?;
    Ok(path)
}

const LUA: &str = r#"-- generated by cargo xtask bench: exact percentiles from wrk
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("LBSTATS %d %d %d %.1f %.1f %.1f\n", summary.requests,
    e.connect + e.read + e.write + e.status + e.timeout, summary.duration,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9)))
end
"#;

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return 0.0;
    }
    v[v.len() / 2]
}

#[derive(Serialize)]
struct Summary {
    row: String,
    target: String,
    rps: f64,
    p50_ms: Option<f64>,
    p99_ms: Option<f64>,
    p999_ms: Option<f64>,
    cpu_s_per_100k: Option<f64>,
    peak_rss_mib: Option<f64>,
    errors: u64,
    rounds: Vec<Measure>,
}

fn summarise(row: &Row, target: &Target, ms: &[Measure]) -> Summary {
    let med = |f: &dyn Fn(&Measure) -> Option<f64>| {
        let mut v: Vec<f64> = ms.iter().filter_map(f).collect();
        (!v.is_empty()).then(|| median(&mut v))
    };
    Summary {
        row: row.name.clone(),
        target: target.name(),
        rps: med(&|m| Some(m.rps)).unwrap_or(0.0),
        p50_ms: med(&|m| m.p50_ms),
        p99_ms: med(&|m| m.p99_ms),
        p999_ms: med(&|m| m.p999_ms),
        cpu_s_per_100k: med(&|m| m.cpu_s_per_100k),
        peak_rss_mib: ms.iter().filter_map(|m| m.peak_rss_mib).reduce(f64::max),
        errors: ms.iter().map(|m| m.errors).sum(),
        rounds: ms.to_vec(),
    }
}

fn report(opts: &Opts, results: &[(Row, BTreeMap<Target, Vec<Measure>>)]) -> Result<(), String> {
    let opt = |v: Option<f64>, digits: usize| v.map_or("–".into(), |x| format!("{x:.digits$}"));
    let mut md = String::new();
    let _ = writeln!(
        md,
        "Medians of {} round(s) of {} s each; ratios are lb ÷ peer requests/s in the same row.\n",
        opts.rounds,
        opts.duration.as_secs()
    );
    let _ = writeln!(md, "| row | target | req/s | p50 ms | p99 ms | p99.9 ms | CPU s/100k | peak RSS MiB | errors | ÷nginx | ÷haproxy | ÷direct |");
    let _ = writeln!(
        md,
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    let mut summaries = Vec::new();
    for (row, by_target) in results {
        let rps_of = |t: &Target| by_target.get(t).map(|ms| summarise(row, t, ms).rps);
        for target in &row.targets {
            let Some(ms) = by_target.get(target) else {
                continue;
            };
            let s = summarise(row, target, ms);
            let ratio = |peer: &Target| match (target, rps_of(peer)) {
                (Target::Lb(_), Some(p)) if p > 0.0 => format!("{:.2}", s.rps / p),
                _ => String::new(),
            };
            let _ = writeln!(
                md,
                "| {} | {} | {:.0} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                row.name,
                s.target,
                s.rps,
                opt(s.p50_ms, 2),
                opt(s.p99_ms, 2),
                opt(s.p999_ms, 2),
                opt(s.cpu_s_per_100k, 2),
                opt(s.peak_rss_mib, 1),
                s.errors,
                ratio(&Target::Nginx),
                ratio(&Target::Haproxy),
                ratio(&Target::Direct),
            );
            summaries.push(s);
        }
    }
    print!("{md}");
    std::fs::write(opts.out.join("report.md"), &md).map_err(|e| e.to_string())?;
    let json = serde_json::to_string_pretty(&summaries).map_err(|e| e.to_string())?;
    std::fs::write(opts.out.join("report.json"), json).map_err(|e| e.to_string())?;
    crate::chart::draw(
        &opts.out.join("report.svg"),
        &summaries
            .iter()
            .map(|s| (s.row.clone(), s.target.clone(), s.rps, s.p99_ms))
            .collect::<Vec<_>>(),
    )?;
    eprintln!(
        "wrote {0}/report.md, {0}/report.json, {0}/report.svg",
        opts.out.display()
    );
    Ok(())
}
