//! The real `lb` binary, driven as users drive it: flags, config files, signals, the admin
//! server, real backends and real clients on 127.0.0.1.

use std::convert::Infallible;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::TokioIo;

const LB: &str = env!("CARGO_BIN_EXE_lb");

/// A hyper backend on its own thread and runtime, answering `name` after `delay`.
struct Backend {
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
}

impl Backend {
    fn start(name: &'static str, delay: Duration) -> Self {
        Self::start_with(name, delay, 200)
    }

    /// A backend whose `/healthz` answers `health` (everything else 200 `name`).
    fn start_with(name: &'static str, delay: Duration, health: u16) -> Self {
        Self::start_full(name, delay, health, None)
    }

    /// A backend that answers 503 to `fail_path` (everything else 200 `name`).
    fn failing_on(name: &'static str, fail_path: &'static str) -> Self {
        Self::start_full(name, Duration::ZERO, 200, Some(fail_path))
    }

    fn start_full(
        name: &'static str,
        delay: Duration,
        health: u16,
        fail_path: Option<&'static str>,
    ) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let h = hits.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    let h = h.clone();
                    tokio::spawn(async move {
                        let svc = hyper::service::service_fn(
                            move |req: hyper::Request<hyper::body::Incoming>| {
                                let probe = req.uri().path() == "/healthz";
                                let fail = Some(req.uri().path()) == fail_path;
                                if !probe {
                                    h.fetch_add(1, Ordering::SeqCst);
                                }
                                async move {
                                    let mut resp =
                                        hyper::Response::new(Full::new(Bytes::from(name)));
                                    if probe {
                                        *resp.status_mut() =
                                            hyper::StatusCode::from_u16(health).unwrap_or_default();
                                    } else if fail {
                                        *resp.status_mut() = hyper::StatusCode::SERVICE_UNAVAILABLE;
                                    } else {
                                        tokio::time::sleep(delay).await;
                                    }
                                    Ok::<_, Infallible>(resp)
                                }
                            },
                        );
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), svc)
                            .await;
                    });
                }
            });
        });
        Self { addr, hits }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

/// A port that was free a moment ago, never the same one twice in this process: the tests
/// run in parallel, and two lb processes told the same port would fail each other.
fn free_port() -> u16 {
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap();
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// GET over a fresh connection; (status, body).
fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
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

struct Lb {
    child: Child,
    stdout: Arc<Mutex<Vec<String>>>,
}

impl Lb {
    fn spawn(args: &[String]) -> Self {
        Self::spawn_logging(args, "info")
    }

    fn spawn_logging(args: &[String], rust_log: &str) -> Self {
        let mut child = Command::new(LB)
            .args(args)
            .env("RUST_LOG", rust_log)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let out = child.stdout.take().unwrap();
        let lines = stdout.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(line);
            }
        });
        Self { child, stdout }
    }

    fn wait_listening(&mut self, addr: SocketAddr) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(addr).is_err() {
            if let Ok(Some(status)) = self.child.try_wait() {
                let mut err = String::new();
                let _ = self.child.stderr.take().unwrap().read_to_string(&mut err);
                panic!("lb exited with {status}: {err}");
            }
            assert!(Instant::now() < deadline, "lb did not listen on {addr}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(ok.success());
    }

    fn wait_exit(&mut self, within: Duration) -> i32 {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code().unwrap_or(-1);
            }
            assert!(
                Instant::now() < deadline,
                "lb did not exit within {within:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn logs(&self) -> Vec<String> {
        self.stdout.lock().unwrap().clone()
    }

    /// Waits (bounded) until a line of stdout contains `needle`: a line is written before the
    /// response it belongs to ends, but our reader thread may take it in later.
    fn wait_log(&self, needle: &str) {
        wait_until(&format!("a log line with {needle:?}"), || {
            self.logs().iter().any(|l| l.contains(needle))
        });
    }
}

/// Polls `f` until it holds; fails after a bound no busy machine reaches.
fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for Lb {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn run(args: &[&str]) -> Output {
    Command::new(LB).args(args).output().unwrap()
}

fn config_file(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lb-bin-test-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("lb.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn config_errors_exit_1_naming_file_key_and_line() {
    let cases = [
        (
            "unknown",
            "listen = [\"127.0.0.1:1\"]\nmystery = true\n",
            "2",
            "mystery",
        ),
        (
            "badurl",
            "[[backend]]\nurl = \"ftp://x:1\"\n",
            "2",
            "backend[0].url",
        ),
        (
            "baddur",
            "[health]\ninterval = \"often\"\n[[backend]]\nurl = \"http://a:1\"\n",
            "2",
            "health.interval",
        ),
        (
            "zeroweight",
            "[[backend]]\nurl = \"http://a:1\"\nweight = 0\n",
            "3",
            "backend[0].weight",
        ),
        (
            "dup",
            "[[backend]]\nurl = \"http://a:1\"\n[[backend]]\nurl = \"http://a:1\"\n",
            "4",
            "duplicate",
        ),
        ("empty", "strategy = \"random\"\n", "", "no backends"),
        (
            "badstrategy",
            "strategy = \"fastest\"\n[[backend]]\nurl = \"http://a:1\"\n",
            "1",
            "strategy",
        ),
    ];
    for (name, text, line, needle) in cases {
        let path = config_file(name, text);
        let out = run(&["--config", path.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{name}: {err}");
        assert!(
            err.contains(path.to_str().unwrap()),
            "{name} names the file: {err}"
        );
        if !line.is_empty() {
            assert!(
                err.contains(&format!("lb.toml:{line}:")),
                "{name} names line {line}: {err}"
            );
        }
        assert!(err.contains(needle), "{name} names {needle}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    }
    let out = run(&["--config", "/nonexistent/lb.toml"]);
    assert_eq!(out.status.code(), Some(1));
    let out = run(&[]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "no backends at all is a config error"
    );
}

#[test]
fn usage_errors_exit_2_and_help_lists_every_flag() {
    assert_eq!(run(&["--no-such-flag"]).status.code(), Some(2));
    assert_eq!(
        run(&["--strategy", "fastest", "--backend", "http://a:1"])
            .status
            .code(),
        Some(2)
    );
    assert_eq!(
        run(&["--health-interval", "soon", "--backend", "http://a:1"])
            .status
            .code(),
        Some(2)
    );
    assert_eq!(
        run(&["--log-format", "xml", "--backend", "http://a:1"])
            .status
            .code(),
        Some(2)
    );
    let help = String::from_utf8_lossy(&run(&["--help"]).stdout).into_owned();
    for flag in [
        "--listen",
        "--port",
        "--backend",
        "--backends",
        "--strategy",
        "--hash-key",
        "--health-interval",
        "--health-path",
        "--health-timeout",
        "--admin",
        "--drain-timeout",
        "--tls-cert",
        "--tls-key",
        "--config",
        "--check",
        "--log-format",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}");
    }
    assert!(run(&["--version"]).status.success());
    // A TLS file that cannot be read: a config error naming the flag and the file, never
    // plain HTTP served instead.
    let tls = run(&[
        "--backend",
        "http://a:1",
        "--tls-cert",
        "/nonexistent/lb-review/cert.pem",
        "--tls-key",
        "/nonexistent/lb-review/key.pem",
    ]);
    assert_eq!(tls.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&tls.stderr);
    assert!(
        stderr.contains("--tls-cert") && stderr.contains("/nonexistent/lb-review/cert.pem"),
        "{stderr}"
    );
}

#[test]
fn timeouts_body_read_is_a_duration() {
    let text = |v: &str| {
        format!("[[backend]]\nurl = \"http://127.0.0.1:3031\"\n[timeouts]\nbody_read = {v}\n")
    };
    let good = config_file("bodyread", &text("\"5s\""));
    let out = run(&["--config", good.to_str().unwrap(), "--check"]);
    let summary = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{summary}");
    assert!(summary.contains("body_read 5s"), "{summary}");
    let default = config_file(
        "bodyreaddefault",
        "[[backend]]\nurl = \"http://127.0.0.1:3031\"\n",
    );
    let out = run(&["--config", default.to_str().unwrap(), "--check"]);
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(
        summary.contains("body_read 1m"),
        "60 s by default: {summary}"
    );
    for (name, value, why) in [
        ("bodyreadbad", "\"x\"", ""),
        ("bodyreadzero", "\"0s\"", "greater than zero"),
    ] {
        let bad = config_file(name, &text(value));
        let out = run(&["--config", bad.to_str().unwrap(), "--check"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{value}: {err}");
        assert!(
            err.contains(&format!("{}:4:", bad.display())) && err.contains("timeouts.body_read"),
            "names file, line and key: {err}"
        );
        assert!(err.contains(why), "{err}");
    }
    let typo = config_file(
        "bodyreadtypo",
        "[[backend]]\nurl = \"http://127.0.0.1:3031\"\n[timeouts]\nbody_reed = \"5s\"\n",
    );
    let out = run(&["--config", typo.to_str().unwrap(), "--check"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("{}:4: timeouts.body_reed", typo.display())),
        "an unknown key names file, line and key: {err}"
    );
}

#[test]
fn check_validates_and_summarises() {
    let path = config_file("check", "strategy = \"weighted-round-robin\"\n[[backend]]\nurl = \"http://127.0.0.1:3031\"\nweight = 3\n");
    let out = run(&["--config", path.to_str().unwrap(), "--check"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(
        text.contains("weighted-round-robin") && text.contains("http://127.0.0.1:3031 weight 3"),
        "{text}"
    );
    let bad = config_file(
        "checkbad",
        "[[backend]]\nurl = \"http://127.0.0.1:3031\"\nweight = -2\n",
    );
    assert_eq!(
        run(&["--config", bad.to_str().unwrap(), "--check"])
            .status
            .code(),
        Some(1)
    );
}

#[test]
fn simplelb_flags_and_port_in_use() {
    let (a, b) = (
        Backend::start("a", Duration::ZERO),
        Backend::start("b", Duration::ZERO),
    );
    let port = free_port();
    let mut lb = Lb::spawn(&[
        format!("--backends={},{}", a.url(), b.url()),
        format!("--port={port}"),
        "--health-interval=0".into(),
    ]);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    lb.wait_listening(addr);
    let bodies: Vec<String> = (0..4).map(|_| get(addr, "/").1).collect();
    assert_eq!(bodies, ["a", "b", "a", "b"]);

    // A second lb on the same port: one line, exit 1.
    let out = run(&["--backend", &a.url(), "--port", &port.to_string()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("0.0.0.0:{port}")) && err.trim().lines().count() == 1,
        "{err}"
    );
    lb.signal("TERM");
    assert_eq!(lb.wait_exit(Duration::from_secs(10)), 0);
}

#[test]
fn sigterm_lets_an_in_flight_request_finish_then_exits_0() {
    let slow = Backend::start("slow", Duration::from_secs(2));
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut lb = Lb::spawn(&[
        "--listen".into(),
        addr.to_string(),
        "--backend".into(),
        slow.url(),
    ]);
    lb.wait_listening(addr);
    let request = std::thread::spawn(move || get(addr, "/"));
    // In flight: at the backend, which answers 2 s later.
    wait_until("the request reached the backend", || slow.hits() == 1);
    lb.signal("TERM");
    // Stops accepting at once, while the in-flight request still runs.
    wait_until("lb stopped accepting", || TcpStream::connect(addr).is_err());
    assert!(
        !request.is_finished(),
        "the in-flight request is not cut off"
    );
    assert_eq!(request.join().unwrap(), (200, "slow".into()));
    assert_eq!(lb.wait_exit(Duration::from_secs(10)), 0);
}

#[test]
fn sighup_moves_traffic_keeps_in_flight_and_survives_a_bad_config() {
    let old = Backend::start("old", Duration::from_secs(2));
    let new = Backend::start("new", Duration::ZERO);
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let text = |url: &str| {
        format!(
            "listen = [\"{addr}\"]\n[health]\ninterval = \"0s\"\n[[backend]]\nurl = \"{url}\"\n"
        )
    };
    let path = config_file("reload", &text(&old.url()));
    let mut lb = Lb::spawn(&["--config".into(), path.display().to_string()]);
    lb.wait_listening(addr);

    let long = std::thread::spawn(move || get(addr, "/long"));
    wait_until("the long request reached the old backend", || {
        old.hits() == 1
    });
    std::fs::write(&path, text(&new.url())).unwrap();
    lb.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    while get(addr, "/").1 != "new" {
        assert!(
            Instant::now() < deadline,
            "traffic never moved to the new backend"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        long.join().unwrap(),
        (200, "old".into()),
        "the in-flight request finished"
    );

    std::fs::write(&path, "this is = not [valid toml").unwrap();
    lb.signal("HUP");
    lb.wait_log("reload failed");
    assert_eq!(
        get(addr, "/"),
        (200, "new".into()),
        "a bad config keeps the old one in force"
    );
    lb.signal("TERM");
    assert_eq!(lb.wait_exit(Duration::from_secs(10)), 0);
}

#[test]
fn status_metrics_and_json_logs() {
    let (a, b) = (
        Backend::start("a", Duration::ZERO),
        Backend::start("b", Duration::ZERO),
    );
    let (port, admin_port) = (free_port(), free_port());
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let admin: SocketAddr = format!("127.0.0.1:{admin_port}").parse().unwrap();
    let mut lb = Lb::spawn(&[
        "--listen".into(),
        addr.to_string(),
        "--admin".into(),
        admin.to_string(),
        "--backend".into(),
        a.url(),
        "--backend".into(),
        b.url(),
        "--log-format".into(),
        "json".into(),
        "--health-interval".into(),
        "200ms".into(),
    ]);
    lb.wait_listening(addr);
    lb.wait_listening(admin);
    for _ in 0..10 {
        assert_eq!(get(addr, "/x").0, 200);
    }
    let (code, status) = get(admin, "/status");
    assert_eq!(code, 200);
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["strategy"], "round-robin");
    let backends = status["backends"].as_array().unwrap();
    assert_eq!(backends.len(), 2);
    for (i, backend) in [&a, &b].iter().enumerate() {
        assert_eq!(backend.hits(), 5, "round robin over two");
        let s = &backends[i];
        assert_eq!(s["url"], backend.url());
        assert_eq!(s["healthy"], true);
        assert_eq!(s["weight"], 1);
        assert_eq!(s["active_requests"], 0);
        assert_eq!(s["requests_total"], backend.hits() as u64);
        assert_eq!(s["failures_total"], 0);
        assert!(s["ejected_until"].is_null());
    }

    // A few probes (every 200 ms) are counted.
    let mut metrics = String::new();
    wait_until("probes in /metrics", || {
        let (code, m) = get(admin, "/metrics");
        metrics = m;
        code == 200
            && [&a, &b].iter().all(|b| {
                metrics.contains(&format!(
                    "lb_health_checks_total{{backend=\"{}\",result=\"success\"}}",
                    b.addr
                ))
            })
    });
    for backend in [&a, &b] {
        let line = format!(
            "lb_requests_total{{backend=\"{}\",code=\"200\"}} {}",
            backend.addr,
            backend.hits()
        );
        assert!(metrics.contains(&line), "missing {line} in\n{metrics}");
        assert!(metrics.contains(&format!(
            "lb_backend_healthy{{backend=\"{}\"}} 1",
            backend.addr
        )));
        assert!(metrics.contains(&format!(
            "lb_backend_active_requests{{backend=\"{}\"}} 0",
            backend.addr
        )));
    }
    assert!(
        metrics.contains("lb_responses_total{code=\"200\"} 10"),
        "{metrics}"
    );
    assert!(
        metrics.contains("lb_request_duration_seconds_count 10"),
        "{metrics}"
    );
    assert!(
        metrics.contains("lb_health_checks_total{backend="),
        "{metrics}"
    );
    assert!(
        metrics.contains("lb_retries_total{reason=\"not_sent\"} 0"),
        "{metrics}"
    );

    let (_, recent) = get(admin, "/debug/requests");
    let recent: serde_json::Value = serde_json::from_str(&recent).unwrap();
    let recent = recent.as_array().unwrap();
    assert_eq!(recent.len(), 10);
    assert_eq!(recent[0]["attempts"][0]["decision"], "relay");

    let access_lines = |logs: &[String]| -> Vec<serde_json::Value> {
        logs.iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["target"] == "lb::access")
            .collect()
    };
    wait_until("10 access lines", || access_lines(&lb.logs()).len() >= 10);
    let logs = lb.logs();
    let access = access_lines(&logs);
    assert_eq!(
        access.len(),
        10,
        "one JSON access line per request: {logs:?}"
    );
    assert_eq!(access[0]["method"], "GET");
    assert_eq!(access[0]["path"], "/x");
    assert_eq!(access[0]["status"], 200);
    assert_eq!(access[0]["attempts"], 1);
    assert!(access[0]["backend"]
        .as_str()
        .unwrap()
        .starts_with("127.0.0.1:"));
    assert!(access[0]["duration"].as_str().unwrap().ends_with("ms"));
    assert!(access[0]["duration_ms"].as_f64().unwrap() >= 0.0);
    assert!(access[0]["trace"]
        .as_str()
        .unwrap()
        .contains("status 200 relay"));
    lb.signal("INT");
    assert_eq!(lb.wait_exit(Duration::from_secs(10)), 0);
}

#[test]
fn drain_timeout_cuts_off_and_still_exits_0() {
    let stuck = Backend::start("stuck", Duration::from_secs(30));
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut lb = Lb::spawn(&[
        "--listen".into(),
        addr.to_string(),
        "--backend".into(),
        stuck.url(),
        "--drain-timeout".into(),
        "300ms".into(),
    ]);
    lb.wait_listening(addr);
    let request = std::thread::spawn(move || get(addr, "/"));
    wait_until("the request reached the backend", || stuck.hits() == 1);
    lb.signal("TERM");
    // Well before the stuck backend (30 s) or the default drain timeout (30 s) would let go.
    assert_eq!(
        lb.wait_exit(Duration::from_secs(20)),
        0,
        "the drain timeout bounds the exit"
    );
    let (status, _) = request.join().unwrap();
    assert_ne!(status, 200, "the stuck request was cut off");
}

#[test]
fn dead_backends_503_ejection_in_status_and_error_metrics() {
    // Two backends that refuse; probes every 100 ms take both down.
    let dead = |_: ()| format!("http://127.0.0.1:{}", free_port());
    let (d1, d2) = (dead(()), dead(()));
    let good = Backend::start("good", Duration::ZERO);
    let (port, admin_port) = (free_port(), free_port());
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let admin: SocketAddr = format!("127.0.0.1:{admin_port}").parse().unwrap();
    let text = format!(
        "listen = [\"{addr}\"]\nadmin = \"{admin}\"\n[health]\ninterval = \"0s\"\n[passive]\nconsecutive_failures = 1\nmax_ejected_percent = 50\n\
         [[backend]]\nurl = \"{d1}\"\n[[backend]]\nurl = \"{}\"\n",
        good.url()
    );
    let path = config_file("eject", &text);
    let mut lb = Lb::spawn(&["--config".into(), path.display().to_string()]);
    lb.wait_listening(addr);
    lb.wait_listening(admin);
    // The first request goes to the dead backend, is retried on the good one, and ejects the dead one.
    assert_eq!(get(addr, "/"), (200, "good".into()));
    let (_, status) = get(admin, "/status");
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    let until = status["backends"][0]["ejected_until"]
        .as_str()
        .expect("ejected");
    assert!(humantime::parse_rfc3339(until).is_ok(), "RFC 3339: {until}");
    assert_eq!(status["backends"][0]["failures_total"], 1);
    let (_, metrics) = get(admin, "/metrics");
    let refused = format!(
        "lb_requests_total{{backend=\"{}\",code=\"error\"}} 1",
        d1.trim_start_matches("http://")
    );
    assert!(
        metrics.contains(&refused),
        "a refused connect is counted: {metrics}"
    );
    assert!(
        metrics.contains("lb_retries_total{reason=\"not_sent\"} 1"),
        "{metrics}"
    );
    lb.signal("TERM");
    assert_eq!(lb.wait_exit(Duration::from_secs(10)), 0);

    // Every backend down by probes: 503 at once.
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut lb = Lb::spawn(&[
        "--listen".into(),
        addr.to_string(),
        format!("--backends={d1},{d2}"),
        "--health-interval".into(),
        "100ms".into(),
        "--health-timeout".into(),
        "100ms".into(),
    ]);
    lb.wait_listening(addr);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (code, _) = get(addr, "/");
        if code == 503 {
            break;
        }
        assert_eq!(code, 502, "before the probes notice, the attempts fail");
        assert!(Instant::now() < deadline, "never 503");
        std::thread::sleep(Duration::from_millis(100));
    }
    lb.wait_log("down: 3 consecutive probe failures: connection refused");
}

#[test]
fn weighted_round_robin_through_the_binary() {
    let (a, b, c) = (
        Backend::start("a", Duration::ZERO),
        Backend::start("b", Duration::ZERO),
        Backend::start("c", Duration::ZERO),
    );
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let text = format!(
        "listen = [\"{addr}\"]\nstrategy = \"weighted-round-robin\"\n[health]\ninterval = \"0s\"\n\
         [[backend]]\nurl = \"{}\"\nweight = 5\n[[backend]]\nurl = \"{}\"\n[[backend]]\nurl = \"{}\"\n",
        a.url(),
        b.url(),
        c.url()
    );
    let path = config_file("wrr", &text);
    let mut lb = Lb::spawn(&["--config".into(), path.display().to_string()]);
    lb.wait_listening(addr);
    let order: String = (0..14).map(|_| get(addr, "/").1).collect();
    assert_eq!(order, "aabacaaaabacaa");
}

/// GET with an extra header, over a fresh connection.
fn get_as(addr: SocketAddr, user: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        s,
        "GET / HTTP/1.1\r\nHost: test\r\nX-User: {user}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    text.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default()
}

#[test]
fn consistent_hash_on_a_header_and_http_health_checks() {
    let sick = Backend::start_with("sick", Duration::ZERO, 503);
    let (a, b) = (
        Backend::start("a", Duration::ZERO),
        Backend::start("b", Duration::ZERO),
    );
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut lb = Lb::spawn(&[
        "--listen".into(),
        addr.to_string(),
        format!("--backends={},{},{}", sick.url(), a.url(), b.url()),
        "--strategy".into(),
        "consistent-hash".into(),
        "--hash-key".into(),
        "header:X-User".into(),
        "--health-path".into(),
        "/healthz".into(),
        "--health-interval".into(),
        "100ms".into(),
    ]);
    lb.wait_listening(addr);
    // The backend whose /healthz says 503 is taken out after three probes.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !lb
        .logs()
        .iter()
        .any(|l| l.contains("down: 3 consecutive probe failures: status 503"))
    {
        assert!(
            Instant::now() < deadline,
            "the sick backend was never marked down: {:?}",
            lb.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let sick_before = sick.hits();
    let mut placement = std::collections::HashMap::new();
    for round in 0..3 {
        for user in 0..20 {
            let got = get_as(addr, &format!("user-{user}"));
            assert_ne!(got, "sick");
            let first = placement.entry(user).or_insert_with(|| got.clone());
            assert_eq!(*first, got, "user-{user} moved in round {round}");
        }
    }
    let used: std::collections::HashSet<&String> = placement.values().collect();
    assert_eq!(used.len(), 2, "20 users spread over both healthy backends");
    assert_eq!(
        sick.hits(),
        sick_before,
        "no request reached the backend that failed its checks"
    );
    lb.signal("TERM");
    assert_eq!(lb.wait_exit(Duration::from_secs(10)), 0);
}

/// One HTTP/2 frame header: length, type, flags, stream 0.
fn h2_frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).unwrap().to_be_bytes();
    let mut f = vec![len[1], len[2], len[3], kind, flags, 0, 0, 0, 0];
    f.extend_from_slice(payload);
    f
}

/// Unsolicited PING acks over h2c: lb must not log a line per frame (any client could fill
/// the log), unless RUST_LOG asks for h2's own messages.
#[test]
fn unsolicited_h2_ping_acks_do_not_fill_the_log() {
    const PING: u8 = 6;
    const ACK: u8 = 1;
    let backend = Backend::start("fine", Duration::ZERO);
    for (rust_log, want_h2_warnings) in [("info", false), ("info,h2=warn", true)] {
        let port = free_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let mut lb = Lb::spawn_logging(
            &[
                "--listen".into(),
                addr.to_string(),
                "--backend".into(),
                backend.url(),
                "--health-interval".into(),
                "0".into(),
            ],
            rust_log,
        );
        lb.wait_listening(addr);
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        out.extend(h2_frame(4, 0, &[])); // SETTINGS
        for i in 0..50u8 {
            out.extend(h2_frame(PING, ACK, &[i; 8]));
        }
        // A real PING last: frames are handled in order, so its ack means all acks were seen.
        out.extend(h2_frame(PING, 0, b"lastping"));
        s.write_all(&out).unwrap();
        loop {
            let mut head = [0u8; 9];
            s.read_exact(&mut head).expect("lb answers the PING");
            let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
            let mut payload = vec![0u8; len];
            s.read_exact(&mut payload).unwrap();
            if head[3] == PING && head[4] & ACK != 0 && payload == b"lastping" {
                break;
            }
        }
        // A later request's access line: once it is in, every earlier line is too.
        assert_eq!(get(addr, "/after"), (200, "fine".into()));
        lb.wait_log("/after");
        let h2_warnings = lb
            .logs()
            .iter()
            .filter(|l| l.contains("WARN") && l.contains("h2::"))
            .count();
        if want_h2_warnings {
            assert!(h2_warnings >= 1, "RUST_LOG={rust_log} shows h2's warnings");
        } else {
            assert_eq!(h2_warnings, 0, "RUST_LOG={rust_log}: {:?}", lb.logs());
        }
        drop(s);
        lb.signal("TERM");
        assert_eq!(lb.wait_exit(Duration::from_secs(10)), 0);
    }
}

/// The raw value of `"key":` in a JSON line, as printed.
fn raw_json_value<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let at = line.find(&format!("\"{key}\":"))? + key.len() + 3;
    let rest = &line[at..];
    Some(rest[..rest.find([',', '}']).unwrap_or(rest.len())].trim())
}

#[test]
fn access_log_lines_have_one_duration_and_duration_ms_to_the_microsecond() {
    let backend = Backend::start("fine", Duration::from_millis(3));
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut lb = Lb::spawn(&[
        "--listen".into(),
        addr.to_string(),
        "--backend".into(),
        backend.url(),
        "--health-interval".into(),
        "0".into(),
        "--log-format".into(),
        "json".into(),
    ]);
    lb.wait_listening(addr);
    for i in 0..20 {
        assert_eq!(get(addr, &format!("/r{i}")).0, 200);
    }
    wait_until("20 access lines", || {
        lb.logs()
            .iter()
            .filter(|l| l.contains("\"lb::access\""))
            .count()
            >= 20
    });
    let access: Vec<String> = lb
        .logs()
        .into_iter()
        .filter(|l| l.contains("\"lb::access\""))
        .collect();
    assert_eq!(access.len(), 20);
    for line in &access {
        assert_eq!(line.matches("\"duration\":").count(), 1, "{line}");
        let ms = raw_json_value(line, "duration_ms").expect("duration_ms");
        let decimals = ms.split_once('.').map_or(0, |(_, d)| d.len());
        assert!(decimals <= 3, "duration_ms {ms} in {line}");
        assert!(ms.parse::<f64>().is_ok_and(|v| v >= 3.0), "{line}");
    }
    lb.signal("TERM");
    assert_eq!(lb.wait_exit(Duration::from_secs(10)), 0);
}

/// One 503 from a backend, then it serves well: it gets its even share back within 10 s
/// (SPEC), instead of being starved because the failure never fades. Least-connections with
/// sequential requests is exact (equal loads take turns), so the share is a sharp signal.
/// (p2c-ewma is not tested this way: through real sockets its picks follow latency noise;
/// without any failure one of two equal backends got 3 of 100 in one of three runs.)
#[test]
fn least_connections_gives_a_recovered_backend_its_share_back() {
    let strategy = "least-connections";
    let a = Backend::failing_on("a", "/fail");
    let b = Backend::start("b", Duration::ZERO);
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut lb = Lb::spawn(&[
        "--listen".into(),
        addr.to_string(),
        format!("--backends={},{}", a.url(), b.url()),
        "--strategy".into(),
        strategy.into(),
        "--health-interval".into(),
        "0".into(),
    ]);
    lb.wait_listening(addr);
    // Until one request lands on A, which answers it 503 (relayed, not retried); B answers 200.
    let mut failed_at = None;
    for _ in 0..50 {
        let (status, body) = get(addr, "/fail");
        if status == 503 {
            failed_at = Some(Instant::now());
            break;
        }
        assert_eq!((status, body.as_str()), (200, "b"));
    }
    let failed_at = failed_at.expect("one request reached A");
    // Light traffic meanwhile, as a live service has; then A must be back to its share.
    while failed_at.elapsed() < Duration::from_secs(11) {
        assert_eq!(get(addr, "/").0, 200);
        std::thread::sleep(Duration::from_millis(200));
    }
    let before = a.hits();
    for _ in 0..100 {
        assert_eq!(get(addr, "/").0, 200);
    }
    let share = a.hits() - before;
    assert!(
        share >= 30,
        "{strategy}: 11 s after one failure, A got {share} of 100 sequential requests"
    );
    lb.signal("TERM");
    assert_eq!(lb.wait_exit(Duration::from_secs(10)), 0);
}

#[test]
fn config_timeouts_and_limits_reach_the_proxy() {
    let backend = Backend::start("fine", Duration::ZERO);
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let text = format!(
        "listen = [\"{addr}\"]\n[health]\ninterval = \"0s\"\n[timeouts]\nheader_read = \"300ms\"\n\
         [limits]\nmax_header_bytes = 2048\n[[backend]]\nurl = \"{}\"\n",
        backend.url()
    );
    let path = config_file("limits", &text);
    let mut lb = Lb::spawn(&["--config".into(), path.display().to_string()]);
    lb.wait_listening(addr);
    let send = |bytes: &[u8]| {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.write_all(bytes).unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    };
    // Half a head, then nothing: 408 (from header_read = 300ms, not the 10 s default).
    let slow = send(b"GET / HTTP/1.1\r\nHost: x\r\n");
    assert!(slow.starts_with("HTTP/1.1 408"), "{slow:?}");
    let big = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
        "a".repeat(4096)
    );
    let big = send(big.as_bytes());
    assert!(big.starts_with("HTTP/1.1 431"), "{big:?}");
    assert_eq!(get(addr, "/"), (200, "fine".into()));
    assert_eq!(
        backend.hits(),
        1,
        "neither rejected request reached the backend"
    );
    lb.signal("TERM");
    assert_eq!(lb.wait_exit(Duration::from_secs(10)), 0);
}

#[test]
fn port_and_listen_together_listen_on_both() {
    let backend = Backend::start("fine", Duration::ZERO);
    let (listen_port, port) = (free_port(), free_port());
    let listen: SocketAddr = format!("127.0.0.1:{listen_port}").parse().unwrap();
    let on_port: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut lb = Lb::spawn(&[
        "--listen".into(),
        listen.to_string(),
        "--port".into(),
        port.to_string(),
        "--backend".into(),
        backend.url(),
        "--health-interval".into(),
        "0".into(),
    ]);
    lb.wait_listening(listen);
    lb.wait_listening(on_port);
    assert_eq!(get(listen, "/"), (200, "fine".into()));
    assert_eq!(get(on_port, "/"), (200, "fine".into()));
    lb.signal("TERM");
    assert_eq!(lb.wait_exit(Duration::from_secs(10)), 0);
}

#[test]
fn debug_requests_keeps_the_last_256_traces() {
    let backend = Backend::start("fine", Duration::ZERO);
    let (port, admin_port) = (free_port(), free_port());
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let admin: SocketAddr = format!("127.0.0.1:{admin_port}").parse().unwrap();
    let mut lb = Lb::spawn(&[
        "--listen".into(),
        addr.to_string(),
        "--admin".into(),
        admin.to_string(),
        "--backend".into(),
        backend.url(),
        "--health-interval".into(),
        "0".into(),
    ]);
    lb.wait_listening(addr);
    lb.wait_listening(admin);
    for i in 0..300 {
        assert_eq!(get(addr, &format!("/r{i}")).0, 200);
    }
    let (code, recent) = get(admin, "/debug/requests");
    assert_eq!(code, 200);
    let recent: serde_json::Value = serde_json::from_str(&recent).unwrap();
    let recent = recent.as_array().unwrap();
    assert_eq!(recent.len(), 256, "bounded");
    let (code, metrics) = get(admin, "/metrics");
    assert_eq!(code, 200);
    assert!(
        metrics.contains("lb_responses_total{code=\"200\"} 300"),
        "every request counted, not only the kept ones: {metrics}"
    );
    lb.signal("TERM");
    assert_eq!(lb.wait_exit(Duration::from_secs(10)), 0);
}

#[test]
fn localhost_and_127_0_0_1_are_different_backends() {
    let path = config_file(
        "notdup",
        "[[backend]]\nurl = \"http://localhost:3031\"\n[[backend]]\nurl = \"http://127.0.0.1:3031\"\n",
    );
    let out = run(&["--config", path.to_str().unwrap(), "--check"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("backends: 2"), "{text}");
}

/// A backend that answers the first request on each connection and keeps it alive, then
/// reads the second request on it and closes without a word: the stale pooled connection.
/// Counts the request heads it read.
fn answer_once_then_close() -> (SocketAddr, Arc<AtomicUsize>) {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let heads = Arc::new(AtomicUsize::new(0));
    let h = heads.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let h = h.clone();
            std::thread::spawn(move || {
                let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                for answered in [false, true] {
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut chunk) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    h.fetch_add(1, Ordering::SeqCst);
                    buf.clear();
                    if answered {
                        return; // dropped: closed under the pooled request
                    }
                    let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
                }
            });
        }
    });
    (addr, heads)
}

#[test]
fn a_transport_resend_shows_in_debug_requests_and_is_counted() {
    let (backend, heads) = answer_once_then_close();
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut lb = Lb::spawn(&[
        "--listen".into(),
        addr.to_string(),
        "--admin".into(),
        admin.to_string(),
        "--backend".into(),
        format!("http://{backend}"),
        "--health-interval".into(),
        "0".into(),
    ]);
    lb.wait_listening(addr);
    lb.wait_listening(admin);
    // Each worker thread has its own pool: its first request opens a connection that is
    // then pooled, and each later one takes it, the backend closes it under the request,
    // and lb re-sends once on a fresh one. Ten requests over the workers: by pigeonhole at
    // least eight reuse a pooled connection.
    for i in 0..10 {
        assert_eq!(
            get(addr, &format!("/r{i}")).0,
            200,
            "one backend: resent, not 502"
        );
    }
    let (_, recent) = get(admin, "/debug/requests");
    let recent: serde_json::Value = serde_json::from_str(&recent).unwrap();
    let mut resends = 0;
    for r in recent.as_array().unwrap() {
        let attempts = r["attempts"].as_array().unwrap();
        if attempts[0]["decision"] == "resend" {
            resends += 1;
            assert_eq!(attempts.len(), 2, "the resend, then the attempt: {r}");
            assert_eq!(attempts[0]["outcome"], "stale_connection", "{r}");
            assert_eq!(attempts[1]["outcome"], "status 200", "{r}");
        } else {
            assert_eq!(attempts.len(), 1, "{r}");
        }
    }
    assert!(resends >= 8, "{resends} resends shown: {recent}");
    assert_eq!(
        heads.load(Ordering::SeqCst),
        10 + resends,
        "one resend per request at most"
    );
    let (_, metrics) = get(admin, "/metrics");
    let sends: usize = metrics
        .lines()
        .filter(|l| l.starts_with("lb_requests_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<usize>().ok())
        .sum();
    assert_eq!(
        sends,
        10 + resends,
        "every send the backend saw is counted: {metrics}"
    );
    lb.signal("TERM");
    assert_eq!(lb.wait_exit(Duration::from_secs(10)), 0);
}

/// Sends `raw` on a new connection and returns what came back until the proxy closed it.
fn raw_exchange(addr: SocketAddr, raw: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // The proxy may answer (and close) before it has read all of `raw`.
    let _ = s.write_all(raw);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn heads_refused_before_a_request_are_counted_in_lb_responses_total() {
    let backend = Backend::start("fine", Duration::ZERO);
    let (port, admin_port) = (free_port(), free_port());
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let admin: SocketAddr = format!("127.0.0.1:{admin_port}").parse().unwrap();
    let mut lb = Lb::spawn(&[
        "--listen".into(),
        addr.to_string(),
        "--admin".into(),
        admin.to_string(),
        "--backend".into(),
        backend.url(),
        "--health-interval".into(),
        "0".into(),
    ]);
    lb.wait_listening(addr);
    lb.wait_listening(admin);
    let bad = raw_exchange(
        addr,
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: x\r\n\r\n",
    );
    assert!(bad.starts_with("HTTP/1.1 400 "), "{bad}");
    // Just over the default `limits.max_header_bytes` (32 KiB).
    let huge = format!(
        "GET / HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n",
        "x".repeat(32 * 1024)
    );
    let huge = raw_exchange(addr, huge.as_bytes());
    assert!(huge.starts_with("HTTP/1.1 431 "), "{huge}");
    assert_eq!(get(addr, "/fine").0, 200);
    wait_until("refused heads in /metrics", || {
        let (code, metrics) = get(admin, "/metrics");
        code == 200
            && metrics.contains("lb_responses_total{code=\"400\"} 1")
            && metrics.contains("lb_responses_total{code=\"431\"} 1")
            && metrics.contains("lb_responses_total{code=\"200\"} 1")
    });
    assert_eq!(backend.hits(), 1, "only the good request was forwarded");
    lb.signal("TERM");
    assert_eq!(lb.wait_exit(Duration::from_secs(10)), 0);
}

/// The access log waits in a buffer per worker thread (see `lb-bin/src/log`). It must still
/// be the log users had: a request's line shows up with no more traffic to push it out; under
/// concurrent load on every worker each line is whole (long lines, so that a buffer holds
/// only a few and two workers write at once) and there is exactly one per request; and what
/// is buffered when SIGTERM comes is written before lb exits.
#[test]
fn buffered_access_lines_are_prompt_whole_and_one_per_request() {
    let backend = Backend::start("fine", Duration::ZERO);
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut lb = Lb::spawn(&[
        "--listen".into(),
        addr.to_string(),
        "--backend".into(),
        backend.url(),
        "--health-interval".into(),
        "0".into(),
        "--log-format".into(),
        "json".into(),
    ]);
    lb.wait_listening(addr);
    let access = |lb: &Lb| -> Vec<String> {
        lb.logs()
            .into_iter()
            .filter(|l| l.contains("\"lb::access\""))
            .collect()
    };
    assert_eq!(get(addr, "/first").0, 200);
    wait_until("the one request's line, with no more traffic", || {
        access(&lb).len() == 1
    });

    let (threads, each) = (4, 150);
    let long = "x".repeat(1500);
    std::thread::scope(|s| {
        for t in 0..threads {
            let long = &long;
            s.spawn(move || {
                for i in 0..each {
                    assert_eq!(get(addr, &format!("/t{t}-{i}/{long}")).0, 200);
                }
            });
        }
    });
    let want = 1 + threads * each;
    wait_until("a line per request", || access(&lb).len() >= want);
    lb.signal("TERM");
    assert_eq!(lb.wait_exit(Duration::from_secs(20)), 0);
    let lines = access(&lb);
    assert_eq!(lines.len(), want, "one line per request");
    let mut seen = std::collections::HashSet::new();
    for line in &lines {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("a whole JSON line, not {line:?}: {e}"));
        assert_eq!(v["status"], 200, "{line}");
        assert!(
            seen.insert(v["path"].as_str().unwrap().to_owned()),
            "{line}"
        );
    }
    assert!(lb.logs().iter().any(|l| l.contains("stopped")));
}

/// A backend (plain threads, no runtime) that streams an endless body to `/stream*` as fast
/// as the socket takes it, and answers anything else with a short 200.
fn streaming_backend() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            std::thread::spawn(move || {
                let chunk = vec![b'z'; 256 * 1024];
                let mut reader = BufReader::new(s.try_clone().unwrap());
                loop {
                    let mut head = String::new();
                    let mut line = String::new();
                    loop {
                        line.clear();
                        match reader.read_line(&mut line) {
                            Ok(0) | Err(_) => return,
                            Ok(_) if line == "\r\n" => break,
                            Ok(_) => head.push_str(&line),
                        }
                    }
                    if head
                        .split(' ')
                        .nth(1)
                        .is_some_and(|p| p.starts_with("/stream"))
                    {
                        let _ = write!(
                            s,
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
                            1u64 << 50
                        );
                        while s.write_all(&chunk).is_ok() {}
                        return;
                    }
                    if s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// lb on one worker (a port-0 address makes it run one), kept busy by 16 endless downloads
/// read as fast as it relays them; `stop` ends the readers.
struct BusyWorker {
    lb: Lb,
    addr: SocketAddr,
    stop: Arc<std::sync::atomic::AtomicBool>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl BusyWorker {
    fn start() -> Self {
        let backend = streaming_backend();
        let port = free_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let mut lb = Lb::spawn(&[
            "--listen".into(),
            addr.to_string(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--backend".into(),
            format!("http://{backend}"),
            "--health-interval".into(),
            "0".into(),
        ]);
        lb.wait_listening(addr);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let readers = (0..16)
            .map(|i| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut s = TcpStream::connect(addr).unwrap();
                    write!(s, "GET /stream{i} HTTP/1.1\r\nHost: test\r\n\r\n").unwrap();
                    let mut buf = vec![0u8; 256 * 1024];
                    while !stop.load(Ordering::Relaxed) {
                        if matches!(s.read(&mut buf), Ok(0) | Err(_)) {
                            break;
                        }
                    }
                })
            })
            .collect();
        std::thread::sleep(Duration::from_secs(1));
        Self {
            lb,
            addr,
            stop,
            readers,
        }
    }

    fn stop_downloads(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
    }
}

/// Buffered access lines must still show up without waiting for traffic of their own: a
/// worker busy relaying large downloads (there is always one more chunk to move, so its
/// runtime does not run out of work and does not park) must not sit on the line of a short
/// request it finished meanwhile. Before the buffer each line was written as its request
/// ended; now it waits in the buffer until the worker parks, the buffer reaches PIPE_BUF, or
/// the thread ends: seconds here, unbounded in general.
#[test]
fn access_lines_show_up_while_a_worker_is_kept_busy_by_downloads() {
    let mut busy = BusyWorker::start();
    assert_eq!(get(busy.addr, "/short").0, 200);
    let answered = Instant::now();
    let logged = |lb: &Lb| lb.logs().iter().any(|l| l.contains("path=/short "));
    while !logged(&busy.lb) && answered.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let waited = answered.elapsed();
    let shown = logged(&busy.lb);
    busy.stop_downloads();
    assert!(
        shown,
        "the access line of a finished request still unwritten {waited:?} after its \
         response, while downloads kept the worker busy"
    );
}

/// The log is one story: a request answered before a reload is logged before the reload's
/// "configuration reloaded" (the control thread writes its lines at once, the worker's wait
/// in its buffer). An operator reading why traffic moved sees the requests in the wrong
/// configuration's era.
#[test]
fn a_request_answered_before_a_reload_is_logged_before_it() {
    let mut busy = BusyWorker::start();
    assert_eq!(get(busy.addr, "/before-reload").0, 200);
    busy.lb.signal("HUP");
    busy.lb.wait_log("configuration reloaded");
    busy.stop_downloads();
    busy.lb.wait_log("path=/before-reload ");
    let logs = busy.lb.logs();
    let at = |needle: &str| logs.iter().position(|l| l.contains(needle)).unwrap();
    assert!(
        at("path=/before-reload ") < at("configuration reloaded"),
        "the request's line comes after the reload it preceded:\n{}",
        logs.join("\n")
    );
}

/// When stdout goes away (the log collector died: a closed pipe), lines lost are said so on
/// stderr, as tracing-subscriber does for every line it cannot write. The worker's buffer
/// drops its lines silently: the access log, the lines that matter, vanish without a trace.
#[test]
fn access_lines_lost_to_a_closed_stdout_are_reported_on_stderr() {
    let backend = Backend::start("fine", Duration::ZERO);
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut child = Command::new(LB)
        .args([
            "--listen",
            &addr.to_string(),
            "--backend",
            &backend.url(),
            "--health-interval",
            "0",
        ])
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The reader of lb's stdout is gone: every write to it fails (EPIPE).
    drop(child.stdout.take());
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "lb did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    let requests = 5;
    for i in 0..requests {
        assert_eq!(get(addr, &format!("/lost-{i}")).0, 200);
    }
    std::thread::sleep(Duration::from_millis(500));
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    let reported = err.matches("Unable to write an event").count();
    assert!(
        reported >= requests,
        "{requests} access lines lost, {reported} reported on stderr:\n{err}"
    );
}

/// Review 11b: voluntary context switches of lb's worker threads but the first (`lb-worker-0`
/// also runs lb-core's timer), summed, and how many such workers there are.
fn worker_wakeups(pid: u32) -> (u64, usize) {
    let (mut total, mut workers) = (0, 0);
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if !comm.starts_with("lb-worker-") || comm.trim() == "lb-worker-0" {
            continue;
        }
        workers += 1;
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        total += status
            .lines()
            .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
    }
    (total, workers)
}

/// Review 11b: an idle lb leaves its workers asleep. The access log is written when a worker
/// runs out of work ("nothing waits for a timer"); the 100 ms flush tick added for busy
/// workers fires on idle ones too, with nothing buffered: ten wake-ups a second per worker,
/// forever, on a proxy that serves nothing (NGINX's `flush=` timer runs only while its
/// buffer holds lines).
#[test]
fn an_idle_lb_does_not_wake_its_workers() {
    let backend = Backend::start("fine", Duration::ZERO);
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut lb = Lb::spawn(&[
        "--listen".into(),
        addr.to_string(),
        "--backend".into(),
        backend.url(),
        "--health-interval".into(),
        "0".into(),
    ]);
    lb.wait_listening(addr);
    assert_eq!(get(addr, "/once").0, 200);
    lb.wait_log("path=/once ");
    std::thread::sleep(Duration::from_millis(500));
    let pid = lb.child.id();
    let (before, workers) = worker_wakeups(pid);
    std::thread::sleep(Duration::from_secs(2));
    let woken = worker_wakeups(pid).0 - before;
    lb.signal("TERM");
    assert_eq!(lb.wait_exit(Duration::from_secs(10)), 0);
    if workers == 0 {
        return; // one core: one worker, which also runs lb-core's timer
    }
    assert!(
        woken < 5,
        "lb's idle workers (but the first) woke {woken} times in 2 s with nothing to do"
    );
}

/// Review 11b: reloads while a busy worker keeps answering: every request whose response
/// the client had before a SIGHUP was sent is logged before that reload's line. (Lines of
/// requests still finishing while the reload runs can land on either side of its line, as
/// with any two threads writing; a timestamp margin would make this a timing test.)
#[test]
fn requests_answered_before_each_of_many_reloads_are_logged_before_its_line() {
    let mut busy = BusyWorker::start();
    let addr = busy.addr;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let answered = Arc::new(Mutex::new(Vec::<String>::new()));
    let getters: Vec<_> = (0..4)
        .map(|t| {
            let (stop, answered) = (stop.clone(), answered.clone());
            std::thread::spawn(move || {
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    let path = format!("/during-{t}-{i}");
                    if get(addr, &path).0 == 200 {
                        answered.lock().unwrap().push(path);
                    }
                    i += 1;
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let reloads = 20;
    // Per reload: the paths answered before its signal was sent.
    let mut before: Vec<Vec<String>> = Vec::new();
    for k in 1..=reloads {
        before.push(answered.lock().unwrap().clone());
        busy.lb.signal("HUP");
        wait_until("the reload's line", || {
            busy.lb
                .logs()
                .iter()
                .filter(|l| l.contains("configuration reloaded"))
                .count()
                >= k
        });
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::Relaxed);
    for g in getters {
        g.join().unwrap();
    }
    busy.stop_downloads();
    let logs = busy.lb.logs();
    let reload_at: Vec<usize> = logs
        .iter()
        .enumerate()
        .filter(|(_, l)| l.contains("configuration reloaded"))
        .map(|(i, _)| i)
        .collect();
    assert_eq!(reload_at.len(), reloads);
    let mut checked = 0;
    for (k, paths) in before.iter().enumerate() {
        for path in paths {
            let needle = format!("path={path} ");
            let at = logs.iter().position(|l| l.contains(&needle));
            assert!(
                at.is_some_and(|at| at < reload_at[k]),
                "{path}, answered before reload {k}'s signal, is logged at {at:?}, after its \
                 line at {}",
                reload_at[k]
            );
            checked += 1;
        }
    }
    assert!(checked > reloads, "too few requests to tell: {checked}");
}
