//! `cargo xtask bench`: lb side by side with direct, nginx, haproxy and Pingora, in one run.
//!
//! Every row runs every target in interleaved rounds (A B C A B C …) so that drift on a
//! noisy machine hits all alike; the report quotes medians of the rounds and the ratios
//! lb/nginx, lb/haproxy, lb/pingora and lb/direct. Load comes from `wrk` (HTTP/1.1; a Lua
//! hook prints exact percentiles) and `h2load` (h2c); the idle row opens its connections
//! itself ([`crate::idle`]). Peer configs are written to `target/bench/`.
//!
//! lb runs as users run it: its access log on (`RUST_LOG` unset), written to
//! `target/bench/lb-access.log` (truncated each time lb starts); `--lb-log off` (or
//! `on,off`, both as targets) measures it without. The peers log nothing.
//!
//! Pingora is built on demand outside the workspace ([`crate::pingora`]); the report ends
//! with the bars of issue 11 and this run's value for each ([`crate::bars`]).
//!
//! The `https` rows terminate TLS in lb, nginx and haproxy (not Pingora) with one
//! certificate made per run ([`crate::tls`]): full handshakes per second (the xtask's own
//! rustls client, [`crate::handshake`]: wrk resumes sessions), and kept-alive HTTP/1.1
//! (wrk) and h2 (h2load) over TLS. A
//! target that fails (lb without TLS, say) is reported and dropped from that row; the
//! others go on.
//!
//! Flags: `--quick` (one 2 s round of the headline row and the idle row), `--install`,
//! `--rounds N`, `--duration SECS`, `--only SUBSTR[,SUBSTR]` (of all rows, those whose name
//! contains one; with `--quick` too), `--lb-bin PATH[,PATH]` (more lb binaries, labelled
//! by file name, run with round robin as targets beside the built one in the same rounds:
//! an A/B of two builds), `--lb-log on|off|on,off`, `--no-pingora`, `--port-offset K`
//! (ports 21000+K.. for the backends and 19080+K for the proxy, for a second run beside
//! another).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

/// Default ports: backends from 21000 on, the proxy under test on 19080. `--port-offset K`
/// moves both by K, so that two runs (two worktrees) can share the machine.
const BACKEND_BASE_DEFAULT: u16 = 21000;
const PROXY_PORT_DEFAULT: u16 = 19080;
static PORT_OFFSET: std::sync::OnceLock<u16> = std::sync::OnceLock::new();

fn backend_base() -> u16 {
    BACKEND_BASE_DEFAULT + PORT_OFFSET.get().copied().unwrap_or(0)
}

fn proxy_port() -> u16 {
    PROXY_PORT_DEFAULT + PORT_OFFSET.get().copied().unwrap_or(0)
}

/// Connections the idle row opens and holds (the issue's measurement).
const IDLE_CONNS: u32 = 9000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
enum Proto {
    /// HTTP/1.1 keep-alive.
    H1,
    /// HTTP/1.1, a new connection per request.
    H1Close,
    /// HTTP/2 cleartext, prior knowledge.
    H2c,
    /// `conns` idle HTTP/1.1 connections, one request each: memory per connection.
    Idle,
    /// HTTPS, HTTP/1.1, a new connection and a full TLS handshake (no resumption) per
    /// request: [`crate::handshake`]'s client.
    HttpsNew,
    /// HTTPS, HTTP/1.1 keep-alive (wrk).
    HttpsH1,
    /// HTTPS, HTTP/2 by ALPN (h2load).
    HttpsH2,
}

impl Proto {
    /// Whether the proxy terminates TLS in this row.
    fn tls(self) -> bool {
        matches!(self, Self::HttpsNew | Self::HttpsH1 | Self::HttpsH2)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
enum Target {
    Direct,
    Lb(Lb),
    Nginx,
    Haproxy,
    Pingora,
}

/// One way of running lb.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
struct Lb {
    strategy: &'static str,
    /// The label of an `--lb-bin` binary; `None` for the one built from this tree.
    bin: Option<String>,
    /// Access log on (as users run it) or off.
    log: bool,
}

impl Lb {
    /// The target that runs lb this way.
    fn target(strategy: &'static str, bin: Option<String>, log: bool) -> Target {
        Target::Lb(Self { strategy, bin, log })
    }
}

impl Target {
    fn name(&self) -> String {
        match self {
            Self::Direct => "direct".into(),
            Self::Lb(lb) => {
                let mut name = format!("lb {}", lb.strategy);
                if let Some(label) = &lb.bin {
                    let _ = write!(name, " [{label}]");
                }
                if !lb.log {
                    name.push_str(" (log off)");
                }
                name
            }
            Self::Nginx => "nginx".into(),
            Self::Haproxy => "haproxy".into(),
            Self::Pingora => "pingora".into(),
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
    /// The idle row's figures.
    idle: Option<crate::idle::Idle>,
    /// TLS rows: what an OpenSSL client negotiated with the target ([`crate::tls::probe`]).
    tls: Option<String>,
    /// The handshake row: what its rustls client negotiated.
    tls_rustls: Option<String>,
}

struct Opts {
    quick: bool,
    install: bool,
    rounds: usize,
    duration: Duration,
    out: PathBuf,
    /// `--only`: rows whose name contains one of these.
    only: Vec<String>,
    /// `--lb-bin`: (label, path) of more lb binaries to measure.
    lb_bins: Vec<(String, PathBuf)>,
    /// `--lb-log`: access log on, off, or both (each a target).
    lb_logs: Vec<bool>,
    /// Whether to build and run the Pingora peer.
    pingora: bool,
}

pub(crate) fn run(args: &[String]) -> Result<(), String> {
    if args.iter().any(|a| a == "--micro") {
        return micro(args.iter().filter(|a| *a != "--micro").cloned().collect());
    }
    let quick = args.iter().any(|a| a == "--quick");
    let offset: u16 = flag(args, "--port-offset").unwrap_or(0);
    if offset > 20000 {
        return Err("--port-offset: at most 20000".into());
    }
    let _ = PORT_OFFSET.set(offset);
    let list = |name: &str| -> Vec<String> {
        flag::<String>(args, name)
            .map(|v| {
                v.split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default()
    };
    let lb_logs = match flag::<String>(args, "--lb-log").as_deref() {
        None | Some("on") => vec![true],
        Some("off") => vec![false],
        Some("on,off") => vec![true, false],
        Some("off,on") => vec![false, true],
        Some(other) => return Err(format!("--lb-log {other:?}: on, off or on,off")),
    };
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
        only: list("--only"),
        lb_bins: lb_bins(&list("--lb-bin"))?,
        lb_logs,
        pingora: !args.iter().any(|a| a == "--no-pingora"),
    };
    std::fs::create_dir_all(&opts.out).map_err(|e| e.to_string())?;
    tools(&opts)?;
    let lb = build_lb()?;
    let has = |t: &str| which(t).is_some();
    let mut peers: Vec<Target> = [(Target::Nginx, "nginx"), (Target::Haproxy, "haproxy")]
        .into_iter()
        .filter(|(_, bin)| has(bin))
        .map(|(t, _)| t)
        .collect();
    if opts.pingora {
        peers.push(Target::Pingora);
    }
    let mut rows = rows(&opts, &peers, has("h2load"));
    if !opts.only.is_empty() {
        rows.retain(|r| opts.only.iter().any(|o| r.name.contains(o.as_str())));
        if rows.is_empty() {
            return Err(format!("--only {}: no row matches", opts.only.join(",")));
        }
    }
    let mut pingora = None;
    let mut pingora_note = if opts.pingora {
        String::new()
    } else {
        "; no pingora (`--no-pingora`)".to_owned()
    };
    if rows.iter().any(|r| r.targets.contains(&Target::Pingora)) {
        match crate::pingora::ensure_built(&opts.out) {
            Ok(built) => {
                pingora_note = format!(
                    "; pingora is pingora-proxy {} (round robin, 2 threads, built in target/bench/pingora-lb)",
                    built.version
                );
                pingora = Some(built);
            }
            Err(e) => {
                pingora_note =
                    "; no pingora: its build failed (target/bench/pingora-lb/build.log)".to_owned();
                eprintln!("xtask: no Pingora target in this run: {e}");
                for r in &mut rows {
                    r.targets.retain(|t| *t != Target::Pingora);
                }
            }
        }
    }
    let tls = if rows.iter().any(|r| r.proto.tls()) {
        Some(crate::tls::generate(&opts.out.join("tls"))?)
    } else {
        None
    };
    let bins = Bins {
        lb,
        pingora: pingora.as_ref().map(|b| b.exe.clone()),
        tls,
    };
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
    // (row, target, error) of targets that failed: the others go on.
    let mut failures: Vec<(String, String, String)> = Vec::new();
    // Rows that share backends (count, body size) share one backend process.
    let mut groups: BTreeMap<(usize, usize), Vec<Row>> = BTreeMap::new();
    let order: Vec<String> = rows.iter().map(|r| r.name.clone()).collect();
    for r in rows {
        groups.entry((r.backends, r.body)).or_default().push(r);
    }
    for ((count, body), rows) in groups {
        let backends = Backends::start(count, body)?;
        for row in rows {
            let mut by_target: BTreeMap<Target, Vec<Measure>> = BTreeMap::new();
            let mut failed: Vec<Target> = Vec::new();
            for round in 0..opts.rounds {
                for target in &row.targets {
                    if failed.contains(target) {
                        // It failed in an earlier round: not tried again in this row.
                        bar.inc(1);
                        continue;
                    }
                    bar.set_message(format!(
                        "{} · {} · round {}",
                        row.name,
                        target.name(),
                        round + 1
                    ));
                    if *target != Target::Direct {
                        port_free()?;
                    }
                    match measure(&opts, &bins, &row, target, &backends) {
                        Ok(m) => by_target.entry(target.clone()).or_default().push(m),
                        Err(e) => {
                            bar.suspend(|| {
                                eprintln!("xtask: {} · {}: {e}", row.name, target.name());
                            });
                            failures.push((row.name.clone(), target.name(), e));
                            failed.push(target.clone());
                        }
                    }
                    bar.inc(1);
                }
            }
            results.push((row, by_target));
        }
        drop(backends);
    }
    bar.finish_and_clear();
    // Back to the order of `rows`: the headline first.
    results.sort_by_key(|(r, _)| order.iter().position(|n| *n == r.name));
    report(&opts, &pingora_note, &results, &failures)
}

/// The binaries the targets run.
struct Bins {
    lb: PathBuf,
    pingora: Option<PathBuf>,
    /// The certificate of the HTTPS rows (made when one of them runs).
    tls: Option<crate::tls::TlsFiles>,
}

/// Labels the `--lb-bin` paths by file name (by `parent/name` where two share a name).
fn lb_bins(paths: &[String]) -> Result<Vec<(String, PathBuf)>, String> {
    let paths: Vec<PathBuf> = paths
        .iter()
        .map(|p| std::fs::canonicalize(p).map_err(|e| format!("--lb-bin {p}: {e}")))
        .collect::<Result<_, _>>()?;
    let name = |p: &Path| {
        p.file_name()
            .map_or(String::new(), |n| n.to_string_lossy().into_owned())
    };
    Ok(paths
        .iter()
        .map(|p| {
            let label = if paths.iter().filter(|q| name(q) == name(p)).count() > 1 {
                let parent = p.parent().map_or(String::new(), name);
                format!("{parent}/{}", name(p))
            } else {
                name(p)
            };
            (label, p.clone())
        })
        .collect())
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

pub(crate) fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .chain(["/usr/sbin", "/sbin"])
        .map(|d| Path::new(d).join(tool))
        .find(|p| p.is_file())
}

fn tools(opts: &Opts) -> Result<(), String> {
    let mut wanted = vec![
        ("wrk", "wrk"),
        ("h2load", "nghttp2-client"),
        ("nginx", "nginx-light"),
        ("haproxy", "haproxy"),
    ];
    // Pingora's build compiles zlib-ng with cmake; not needed once it is built.
    if opts.pingora && !crate::pingora::is_built(&opts.out) {
        wanted.push(("cmake", "cmake"));
    }
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
    // Each lb variant of this run (log on/off, --lb-bin binaries) with one strategy.
    let lbs = |strategy: &'static str, bins: bool| -> Vec<Target> {
        let mut v = Vec::new();
        for &log in &opts.lb_logs {
            v.push(Lb::target(strategy, None, log));
            if bins {
                v.extend(
                    opts.lb_bins
                        .iter()
                        .map(|(label, _)| Lb::target(strategy, Some(label.clone()), log)),
                );
            }
        }
        v
    };
    let mut all: Vec<Target> = vec![Target::Direct];
    for s in strategies {
        all.extend(lbs(s, s == "round-robin"));
    }
    all.extend(peers.iter().cloned());
    let mut core: Vec<Target> = vec![Target::Direct];
    core.extend(lbs("round-robin", true));
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
    let idle = row(
        &format!("idle keep-alive {IDLE_CONNS} connections"),
        Proto::Idle,
        1024,
        IDLE_CONNS,
        3,
        &proxies,
    );
    if opts.quick && opts.only.is_empty() {
        rows.push(idle);
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
    // HTTPS: lb and the peers that terminate TLS (not Pingora: its peer binary has no TLS
    // listener); no direct, the backends speak plain HTTP.
    let tls: Vec<Target> = proxies
        .iter()
        .filter(|t| **t != Target::Pingora)
        .cloned()
        .collect();
    rows.push(row(
        "https handshake 1 KiB c64",
        Proto::HttpsNew,
        1024,
        64,
        3,
        &tls,
    ));
    rows.push(row(
        "https keep-alive 1 KiB c64 h1",
        Proto::HttpsH1,
        1024,
        64,
        3,
        &tls,
    ));
    if h2 {
        rows.push(row("https h2 1 KiB c64", Proto::HttpsH2, 1024, 64, 3, &tls));
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
    rows.push(idle);
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
                &backend_base().to_string(),
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
            let base = backend_base();
            return Err(format!("backends did not start (ports {base}..): {line}"));
        }
        Ok(Self { child, count })
    }

    fn addrs(&self) -> impl Iterator<Item = String> + '_ {
        (0..self.count).map(|i| format!("127.0.0.1:{}", usize::from(backend_base()) + i))
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
    bins: &Bins,
    row: &Row,
    target: &Target,
    backends: &Backends,
) -> Result<Measure, String> {
    let proxy = proxy_port();
    let tls = if row.proto.tls() {
        Some(
            bins.tls
                .as_ref()
                .ok_or("no certificate for the HTTPS rows")?,
        )
    } else {
        None
    };
    // Room for the idle row's connections.
    let nofile = RAISE_NOFILE;
    let (port, mut proxy) = match target {
        Target::Direct => (backend_base(), None),
        Target::Lb(lb) => {
            let exe = match &lb.bin {
                None => bins.lb.clone(),
                Some(label) => opts
                    .lb_bins
                    .iter()
                    .find(|(l, _)| l == label)
                    .map(|(_, p)| p.clone())
                    .ok_or_else(|| format!("no --lb-bin labelled {label}"))?,
            };
            let list: Vec<String> = backends.addrs().map(|a| format!("http://{a}")).collect();
            let tls_flags = tls.map_or(String::new(), |f| {
                format!(
                    " --tls-cert {} --tls-key {}",
                    f.cert.display(),
                    f.key.display()
                )
            });
            let cmd = format!(
                "{nofile}; exec {} --listen 127.0.0.1:{proxy} --health-interval 0 --strategy {} --backends {}{tls_flags}",
                exe.display(),
                lb.strategy,
                list.join(",")
            );
            // lb's stderr to a file, quoted if it does not start.
            let stderr = std::fs::File::create(opts.out.join("lb-stderr.log"))
                .map_err(|e| format!("lb-stderr.log: {e}"))?;
            let child = if lb.log {
                // As users run it: the default filter, the access log to a file.
                let log = std::fs::File::create(opts.out.join("lb-access.log"))
                    .map_err(|e| format!("lb-access.log: {e}"))?;
                spawn_sh(&cmd, None, Stdio::from(log), Stdio::from(stderr))?
            } else {
                spawn_sh(&cmd, Some("warn"), Stdio::null(), Stdio::from(stderr))?
            };
            (proxy_port(), Some(child))
        }
        Target::Nginx => {
            let conf = nginx_conf(opts, row, backends, tls)?;
            let cmd = format!(
                "exec nginx -p {} -c {} -g 'daemon off;'",
                opts.out.display(),
                conf.display()
            );
            (
                proxy_port(),
                Some(spawn_sh(&cmd, None, Stdio::null(), Stdio::null())?),
            )
        }
        Target::Haproxy => {
            let conf = haproxy_conf(opts, row, backends, tls)?;
            let cmd = format!("{nofile}; exec haproxy -db -f {}", conf.display());
            (
                proxy_port(),
                Some(spawn_sh(&cmd, None, Stdio::null(), Stdio::null())?),
            )
        }
        Target::Pingora => {
            let exe = bins.pingora.as_ref().ok_or("pingora is not built")?;
            let list: Vec<String> = backends.addrs().collect();
            let h2c = if row.proto == Proto::H2c { " h2c" } else { "" };
            let cmd = format!(
                "{nofile}; exec {} 127.0.0.1:{proxy} {}{h2c}",
                exe.display(),
                list.join(",")
            );
            (
                proxy_port(),
                Some(spawn_sh(&cmd, None, Stdio::null(), Stdio::null())?),
            )
        }
    };
    let result = (|| {
        wait_port(port, proxy.as_mut()).map_err(|e| match target {
            Target::Lb(_) => {
                let said =
                    std::fs::read_to_string(opts.out.join("lb-stderr.log")).unwrap_or_default();
                let tail: Vec<&str> = said.lines().rev().take(3).collect();
                if tail.is_empty() {
                    e
                } else {
                    let tail: Vec<&str> = tail.into_iter().rev().collect();
                    format!("{e}; lb said: {}", tail.join(" / "))
                }
            }
            _ => e,
        })?;
        let negotiated = if row.proto.tls() {
            crate::tls::probe(port)?
        } else {
            None
        };
        let pid = proxy.as_ref().map(Child::id);
        // Warm up pools and caches, then measure.
        let warm = Row {
            proto: if row.proto == Proto::Idle {
                Proto::H1
            } else {
                row.proto
            },
            conns: if row.proto == Proto::Idle {
                64
            } else {
                row.conns
            },
            ..row.clone()
        };
        load(opts, &warm, port, Duration::from_secs(1), tls)?;
        if row.proto == Proto::Idle {
            let pid = pid.ok_or("the idle row needs a proxy")?;
            let idle = crate::idle::measure(pid, port, row.conns)?;
            return Ok(Measure {
                requests: u64::from(idle.ok),
                errors: u64::from(row.conns - idle.ok),
                peak_rss_mib: Some(tree_rss_kib(pid) as f64 / 1024.0),
                idle: Some(idle),
                ..Measure::default()
            });
        }
        let cpu0 = pid.map(tree_cpu_ticks);
        let m = load(opts, row, port, opts.duration, tls)?;
        let cpu1 = pid.map(tree_cpu_ticks);
        let mut m = m;
        if let (Some(a), Some(b)) = (cpu0, cpu1) {
            let secs = (b.saturating_sub(a)) as f64 / 100.0;
            m.cpu_s_per_100k = (m.requests > 0).then(|| secs / m.requests as f64 * 1e5);
        }
        m.peak_rss_mib = pid.map(|p| tree_rss_kib(p) as f64 / 1024.0);
        m.tls = negotiated;
        Ok(m)
    })();
    if let Some(child) = proxy.as_mut() {
        stop(child);
    }
    result
}

/// Raises a shell's open-file limit as far as it goes: 65536, or the hard limit if this
/// machine allows no more (20000 on some containers).
pub(crate) const RAISE_NOFILE: &str =
    "ulimit -n 65536 2>/dev/null || ulimit -n $(ulimit -Hn) 2>/dev/null";

/// The open-file limit the proxies get through [`RAISE_NOFILE`].
fn nofile_limit() -> u32 {
    Command::new("sh")
        .arg("-c")
        .arg(format!("{RAISE_NOFILE}; ulimit -n"))
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(16384)
}

/// Starts a proxy through `sh -c` (for `ulimit` and `exec`) with `RUST_LOG` set to
/// `rust_log` (unset if `None`), its stdout and stderr to `stdout` and `stderr`.
fn spawn_sh(
    cmd: &str,
    rust_log: Option<&str>,
    stdout: Stdio,
    stderr: Stdio,
) -> Result<Child, String> {
    let mut c = Command::new("sh");
    c.arg("-c").arg(cmd).stdout(stdout).stderr(stderr);
    match rust_log {
        Some(level) => c.env("RUST_LOG", level),
        None => c.env_remove("RUST_LOG"),
    };
    c.spawn().map_err(|e| e.to_string())
}

/// Errs if something listens on the proxy port: it would be measured instead of the target.
fn port_free() -> Result<(), String> {
    let proxy = proxy_port();
    if std::net::TcpStream::connect(("127.0.0.1", proxy)).is_ok() {
        return Err(format!(
            "port {proxy} is busy: stop whatever listens there and run again"
        ));
    }
    Ok(())
}

fn stop(child: &mut Child) {
    if let Ok(Some(_)) = child.try_wait() {
        // It exited by itself (lb refusing a flag, say): nothing to stop.
        return;
    }
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .stderr(Stdio::null())
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
    let _ = wait_port_free(proxy_port());
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

fn load(
    opts: &Opts,
    row: &Row,
    port: u16,
    duration: Duration,
    tls: Option<&crate::tls::TlsFiles>,
) -> Result<Measure, String> {
    let scheme = if row.proto.tls() { "https" } else { "http" };
    let url = format!("{scheme}://127.0.0.1:{port}/");
    let secs = duration.as_secs().max(1);
    match row.proto {
        Proto::HttpsNew => {
            let cert = tls.ok_or("no certificate for the handshake row")?;
            handshakes(row, port, Duration::from_secs(secs), &cert.cert_der)
        }
        Proto::H1 | Proto::H1Close | Proto::HttpsH1 => {
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
        Proto::Idle => Err("the idle row sends no load".into()),
        Proto::H2c | Proto::HttpsH2 => {
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
            if row.proto == Proto::HttpsH2
                && !text.lines().any(|l| l.trim() == "Application protocol: h2")
            {
                return Err(format!("h2load did not negotiate h2 by ALPN: {text}"));
            }
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

/// The handshake row's load: [`crate::handshake`]'s rustls client, `row.conns`
/// connections, a full handshake and one request each time.
fn handshakes(
    row: &Row,
    port: u16,
    duration: Duration,
    cert_der: &[u8],
) -> Result<Measure, String> {
    let mut run = crate::handshake::run(port, row.conns, duration, row.body, cert_der)?;
    if run.requests == 0 {
        return Err(format!(
            "no handshake and answer succeeded: {}",
            run.first_error.unwrap_or_default()
        ));
    }
    run.latencies_us.sort_unstable();
    let p = |q| crate::handshake::percentile_ms(&run.latencies_us, q);
    Ok(Measure {
        tls_rustls: run.negotiated.take(),
        rps: run.requests as f64 / duration.as_secs_f64(),
        p50_ms: p(50.0),
        p99_ms: p(99.0),
        p999_ms: p(99.9),
        requests: run.requests,
        errors: run.errors,
        ..Measure::default()
    })
}

/// utime + stime of `pid` and its children (nginx's workers), in clock ticks.
fn tree_cpu_ticks(pid: u32) -> u64 {
    tree(pid)
        .iter()
        .filter_map(|p| stat(*p))
        .map(|f| f.get(11).zip(f.get(12)).map_or(0, |(u, s)| u + s))
        .sum()
}

/// Peak RSS of `pid`'s tree: the sum of each process's VmHWM, in KiB.
fn tree_rss_kib(pid: u32) -> u64 {
    tree_status_kib(pid, "VmHWM:")
}

/// The sum over `pid` and its children of one `/proc/PID/status` field in kB (`VmRSS:`).
pub(crate) fn tree_status_kib(pid: u32, field: &str) -> u64 {
    tree(pid)
        .iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/status")).ok())
        .filter_map(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
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

fn nginx_conf(
    opts: &Opts,
    row: &Row,
    backends: &Backends,
    tls: Option<&crate::tls::TlsFiles>,
) -> Result<PathBuf, String> {
    let proxy = proxy_port();
    let servers: String = backends
        .addrs()
        .map(|a| format!("    server {a};\n"))
        .collect();
    // nginx 1.22 (Debian 12) knows `listen … http2`, not `http2 on;` (1.25.1).
    let h2 = if row.proto == Proto::H2c {
        " http2"
    } else if row.proto.tls() {
        // ALPN h2 and http/1.1, as lb and haproxy offer.
        " ssl http2"
    } else {
        ""
    };
    // Default ciphers and curves; session cache and tickets on.
    let ssl = tls.map_or(String::new(), |f| {
        format!(
            "    ssl_certificate {};\n    ssl_certificate_key {};\n    ssl_protocols TLSv1.2 TLSv1.3;\n\
             \x20   ssl_session_cache shared:TLS:10m;\n    ssl_session_tickets on;\n",
            f.cert.display(),
            f.key.display()
        )
    });
    // The idle row's connections may all land on one worker.
    let (nofile, conns) = if row.proto == Proto::Idle {
        let limit = nofile_limit();
        (limit, limit.saturating_sub(100))
    } else {
        (16384, 8192)
    };
    let conf = format!(
        "# generated by cargo xtask bench: nginx as a peer of lb, configured equivalently\n\
         worker_processes 2;\nworker_rlimit_nofile {nofile};\npid nginx.pid;\nerror_log stderr error;\n\
         events {{ worker_connections {conns}; }}\n\
         http {{\n  access_log off;\n  keepalive_requests 1000000;\n\
         upstream b {{\n{servers}    keepalive 512;\n  }}\n\
         server {{\n    listen 127.0.0.1:{proxy}{h2};\n{ssl}    location / {{\n      proxy_pass http://b;\n\
         \x20     proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n      proxy_set_header Host $host;\n\
         \x20     proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n    }}\n  }}\n}}\n"
    );
    let path = std::fs::canonicalize(&opts.out)
        .map_err(|e| e.to_string())?
        .join("nginx.conf");
    std::fs::write(&path, conf).map_err(|e| e.to_string())?;
    Ok(path)
}

fn haproxy_conf(
    opts: &Opts,
    row: &Row,
    backends: &Backends,
    tls: Option<&crate::tls::TlsFiles>,
) -> Result<PathBuf, String> {
    let proxy = proxy_port();
    let servers: String = backends
        .addrs()
        .enumerate()
        .map(|(i, a)| format!("  server s{i} {a}\n"))
        .collect();
    // TLS: default ciphers and curves; its session cache (tune.ssl.cachesize) and
    // tickets are on by default.
    let proto = match tls {
        _ if row.proto == Proto::H2c => " proto h2".to_owned(),
        Some(f) => format!(
            " ssl crt {} alpn h2,http/1.1 ssl-min-ver TLSv1.2 ssl-max-ver TLSv1.3",
            f.combined.display()
        ),
        None => String::new(),
    };
    // HAProxy wants two descriptors per connection (and refuses to start without them).
    let maxconn = if row.proto == Proto::Idle {
        nofile_limit().saturating_sub(100) / 2
    } else {
        8000
    };
    let conf = format!(
        "# generated by cargo xtask bench: haproxy as a peer of lb, configured equivalently\n\
         global\n  nbthread 2\n  maxconn {maxconn}\n\n\
         defaults\n  mode http\n  timeout connect 1s\n  timeout client 60s\n  timeout server 60s\n\
         \x20 option http-keep-alive\n  http-reuse always\n\n\
         frontend f\n  bind 127.0.0.1:{proxy}{proto}\n  option forwardfor\n  default_backend b\n\n\
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
pub(crate) struct Summary {
    pub(crate) row: String,
    pub(crate) target: String,
    pub(crate) rps: f64,
    pub(crate) p50_ms: Option<f64>,
    pub(crate) p99_ms: Option<f64>,
    pub(crate) p999_ms: Option<f64>,
    pub(crate) cpu_s_per_100k: Option<f64>,
    pub(crate) peak_rss_mib: Option<f64>,
    pub(crate) errors: u64,
    /// The idle row's figures: medians over the rounds, `ok` the fewest.
    pub(crate) idle: Option<crate::idle::Idle>,
    rounds: Vec<Measure>,
}

impl Summary {
    /// A summary with the figures the bars read, for tests.
    #[cfg(test)]
    pub(crate) fn for_test(row: &str, target: &str, rps: f64, p99_ms: f64, cpu: f64) -> Self {
        Self {
            row: row.into(),
            target: target.into(),
            rps,
            p50_ms: None,
            p99_ms: Some(p99_ms),
            p999_ms: None,
            cpu_s_per_100k: Some(cpu),
            peak_rss_mib: Some(20.0),
            errors: 0,
            idle: None,
            rounds: Vec::new(),
        }
    }
}

fn summarise(row: &Row, target: &Target, ms: &[Measure]) -> Summary {
    let med = |f: &dyn Fn(&Measure) -> Option<f64>| {
        let mut v: Vec<f64> = ms.iter().filter_map(f).collect();
        (!v.is_empty()).then(|| median(&mut v))
    };
    let idles: Vec<&crate::idle::Idle> = ms.iter().filter_map(|m| m.idle.as_ref()).collect();
    let idle = (!idles.is_empty()).then(|| {
        let med = |f: &dyn Fn(&crate::idle::Idle) -> f64| {
            median(&mut idles.iter().map(|i| f(i)).collect::<Vec<_>>())
        };
        crate::idle::Idle {
            before_kib: med(&|i| i.before_kib as f64) as u64,
            after_kib: med(&|i| i.after_kib as f64) as u64,
            conns: idles[0].conns,
            ok: idles.iter().map(|i| i.ok).min().unwrap_or(0),
            kib_per_conn: med(&|i| i.kib_per_conn),
            open_s: med(&|i| i.open_s),
        }
    });
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
        idle,
        rounds: ms.to_vec(),
    }
}

fn report(
    opts: &Opts,
    pingora_note: &str,
    results: &[(Row, BTreeMap<Target, Vec<Measure>>)],
    failures: &[(String, String, String)],
) -> Result<(), String> {
    let opt = |v: Option<f64>, digits: usize| v.map_or("–".into(), |x| format!("{x:.digits$}"));
    let mut md = String::new();
    let _ = writeln!(
        md,
        "Medians of {} round(s) of {} s each; ratios are lb ÷ peer requests/s in the same row.",
        opts.rounds,
        opts.duration.as_secs()
    );
    let log = match opts.lb_logs.as_slice() {
        [true] => "lb with its access log on, as users run it (`RUST_LOG` unset, stdout to target/bench/lb-access.log)",
        [false] => "lb with its access log off (`--lb-log off`: `RUST_LOG=warn`, stdout discarded)",
        _ => "lb with its access log on (`RUST_LOG` unset, stdout to target/bench/lb-access.log) and off (`(log off)`: `RUST_LOG=warn`)",
    };
    let _ = write!(
        md,
        "{log}; nginx, haproxy and pingora with logging off (`access_log off`, no log section, no logger)"
    );
    md.push_str(pingora_note);
    for (label, path) in &opts.lb_bins {
        let _ = write!(md, "; `[{label}]` is {}", path.display());
    }
    let _ = writeln!(md, ".\n");
    let mut table = String::new();
    let mut summaries = Vec::new();
    let mut idle_md = String::new();
    for (row, by_target) in results {
        let rps_of = |t: &Target| by_target.get(t).map(|ms| summarise(row, t, ms).rps);
        for target in &row.targets {
            let Some(ms) = by_target.get(target) else {
                continue;
            };
            let s = summarise(row, target, ms);
            if let Some(i) = &s.idle {
                let _ = writeln!(
                    idle_md,
                    "| {} | {:.1} | {:.1} | {:.2} | {}/{} | {:.1} |",
                    s.target,
                    i.before_kib as f64 / 1024.0,
                    i.after_kib as f64 / 1024.0,
                    i.kib_per_conn,
                    i.ok,
                    i.conns,
                    i.open_s,
                );
                summaries.push(s);
                continue;
            }
            let ratio = |peer: &Target| match (target, rps_of(peer)) {
                (Target::Lb(_), Some(p)) if p > 0.0 => format!("{:.2}", s.rps / p),
                _ => String::new(),
            };
            let _ = writeln!(
                table,
                "| {} | {} | {:.0} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
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
                ratio(&Target::Pingora),
                ratio(&Target::Direct),
            );
            summaries.push(s);
        }
    }
    if !table.is_empty() {
        let _ = writeln!(md, "| row | target | req/s | p50 ms | p99 ms | p99.9 ms | CPU s/100k | peak RSS MiB | errors | ÷nginx | ÷haproxy | ÷pingora | ÷direct |");
        let _ = writeln!(
            md,
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        md.push_str(&table);
    }
    if !failures.is_empty() {
        let _ = writeln!(
            md,
            "\n### Targets that failed\n\nEach was dropped from its row after its first failure; the other targets ran.\n\n| row | target | error |\n|---|---|---|"
        );
        for (row, target, e) in failures {
            let mut e: String = e.replace(['\n', '|'], " ");
            if e.len() > 300 {
                let cut = (0..=300)
                    .rev()
                    .find(|i| e.is_char_boundary(*i))
                    .unwrap_or(0);
                e.truncate(cut);
                e.push('…');
            }
            let _ = writeln!(md, "| {row} | {target} | {e} |");
        }
    }
    if results.iter().any(|(r, _)| r.proto.tls()) {
        md.push_str(&tls_notes(results));
    }
    if !idle_md.is_empty() {
        let _ = writeln!(
            md,
            "\n### Idle keep-alive connections\n\n\
             {IDLE_CONNS} HTTP/1.1 connections opened one after another by the xtask, one `GET /` \
             each (answer read whole), then held silent; VmRSS summed over the proxy's process \
             tree after a 1 s warm-up and no client, then {:.0} s after the last connection.\n",
            crate::idle::SETTLE.as_secs_f64()
        );
        let _ = writeln!(
            md,
            "| target | RSS before MiB | RSS with them MiB | KiB per connection | answered 200 | open s |"
        );
        let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|");
        md.push_str(&idle_md);
    }
    let lb = Lb::target("round-robin", None, opts.lb_logs[0]).name();
    let bars = crate::bars::bars(&summaries, &lb);
    md.push_str(&crate::bars::markdown(&bars, &lb));
    print!("{md}");
    std::fs::write(opts.out.join("report.md"), &md).map_err(|e| e.to_string())?;
    let json = serde_json::to_string_pretty(&summaries).map_err(|e| e.to_string())?;
    std::fs::write(opts.out.join("report.json"), json).map_err(|e| e.to_string())?;
    let json = serde_json::to_string_pretty(&bars).map_err(|e| e.to_string())?;
    std::fs::write(opts.out.join("bars.json"), json).map_err(|e| e.to_string())?;
    crate::chart::draw(
        &opts.out.join("report.svg"),
        &summaries
            .iter()
            .filter(|s| s.idle.is_none())
            .map(|s| (s.row.clone(), s.target.clone(), s.rps, s.p99_ms))
            .collect::<Vec<_>>(),
    )?;
    eprintln!(
        "wrote {0}/report.md, {0}/report.json, {0}/bars.json, {0}/report.svg",
        opts.out.display()
    );
    Ok(())
}

/// The HTTPS rows' notes: certificate, clients, and what each target negotiated.
fn tls_notes(results: &[(Row, BTreeMap<Target, Vec<Measure>>)]) -> String {
    let mut md = String::from(
        "\n### HTTPS rows\n\n\
         Each proxy terminates TLS with the same ECDSA P-256 self-signed certificate for \
         localhost and 127.0.0.1 (rcgen, `target/bench/tls/`), TLS 1.2 and 1.3, ALPN h2 and \
         http/1.1, its default ciphers and groups, session cache and tickets on; the backends \
         are the plain HTTP ones of the other rows. Pingora has no HTTPS rows (its peer binary \
         has no TLS listener). `https handshake`: the xtask's rustls client (`cargo xtask \
         handshake-client`), 2 threads and 64 connections, each a full handshake (resumption \
         disabled: no session ID, no ticket), one HTTP/1.1 `Connection: close` request and \
         its answer to the close, then a new connection; latency is connect to last byte. \
         wrk is not used there: it resumes its TLS session on every reconnection \
         (`openssl s_time -new` does full handshakes but its OpenSSL 3 client costs about 3× \
         the server's CPU per handshake, and the row measured mostly it). Client and proxy \
         share the machine: read CPU s/100k beside req/s. \
         `https keep-alive … h1`: wrk over https (HTTP/1.1, no ALPN). \
         `https h2`: h2load over https, h2 by ALPN, the h2c row's settings (`-t2 -c64 -m10`).\n\n\
         Negotiated: with an OpenSSL client (`openssl s_client -alpn h2,http/1.1`, the library \
         wrk uses) before each measurement, and by the handshake row's rustls client:\n\n\
         | target | OpenSSL client | rustls client (handshakes) |\n|---|---|---|\n",
    );
    // Per target: the distinct answers of each client over rows and rounds.
    let mut seen: BTreeMap<String, [Vec<String>; 2]> = BTreeMap::new();
    for (row, by_target) in results.iter().filter(|(r, _)| r.proto.tls()) {
        for target in &row.targets {
            for m in by_target.get(target).into_iter().flatten() {
                let v = seen.entry(target.name()).or_default();
                for (i, t) in [&m.tls, &m.tls_rustls].into_iter().enumerate() {
                    if let Some(t) = t {
                        if !v[i].contains(t) {
                            v[i].push(t.clone());
                        }
                    }
                }
            }
        }
    }
    let cell = |v: &[String]| {
        if v.is_empty() {
            "–".to_owned()
        } else {
            v.join("; ")
        }
    };
    for (target, [openssl, rustls]) in &seen {
        let _ = writeln!(md, "| {target} | {} | {} |", cell(openssl), cell(rustls));
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lb_bins_are_labelled_by_file_name_and_parent_when_names_clash() {
        let dir = std::env::temp_dir().join(format!("xtask-lb-bins-{}", std::process::id()));
        for sub in ["a", "b"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
            std::fs::write(dir.join(sub).join("lb"), "").unwrap();
        }
        std::fs::write(dir.join("a").join("lb-next"), "").unwrap();
        let p = |s: &str| dir.join(s).display().to_string();
        let labels: Vec<String> = lb_bins(&[p("a/lb"), p("b/lb"), p("a/lb-next")])
            .unwrap()
            .into_iter()
            .map(|(l, _)| l)
            .collect();
        assert_eq!(labels, ["a/lb", "b/lb", "lb-next"]);
        assert!(lb_bins(&[p("missing")]).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn lb_target_names_show_the_binary_and_a_log_turned_off() {
        assert_eq!(
            Lb::target("round-robin", None, true).name(),
            "lb round-robin"
        );
        assert_eq!(
            Lb::target("round-robin", Some("lb-next".into()), false).name(),
            "lb round-robin [lb-next] (log off)"
        );
    }
}
