//! Reload through the real binary: after a SIGHUP that changes the strategy (so lb-core's
//! balancer, and its backend ids, are built anew) and removes backends, no request and no
//! pooled upstream connection goes to a removed backend.

use std::convert::Infallible;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::TokioIo;

const LB: &str = env!("CARGO_BIN_EXE_lb");

/// A keep-alive hyper backend on its own thread, answering `name` and counting requests.
struct Backend {
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
}

impl Backend {
    fn start(name: &'static str) -> Self {
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
                        let svc = hyper::service::service_fn(move |_req| {
                            h.fetch_add(1, Ordering::SeqCst);
                            async move {
                                Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from(
                                    name,
                                ))))
                            }
                        });
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

/// GET over a fresh client connection; (status, body).
fn get(addr: SocketAddr) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        s,
        "GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
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
    fn spawn(config: &std::path::Path) -> Self {
        let mut child = Command::new(LB)
            .arg("--config")
            .arg(config)
            .args(["--log-format", "json"])
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
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

    fn wait_for(&mut self, what: &str, mut f: impl FnMut(&mut Self) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !f(self) {
            assert!(
                self.child.try_wait().unwrap().is_none(),
                "lb exited while waiting for {what}"
            );
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
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

    fn logged(&self, needle: &str) -> usize {
        self.stdout
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }
}

impl Drop for Lb {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_reload_that_renumbers_backends_never_reaches_a_removed_one() {
    let a = Backend::start("A");
    let b = Backend::start("B");
    let c = Backend::start("C");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let config = |strategy: &str, urls: &[String]| {
        let mut text = format!(
            "listen = [\"{addr}\"]\nstrategy = \"{strategy}\"\n[health]\ninterval = \"0s\"\n"
        );
        for u in urls {
            text.push_str(&format!("[[backend]]\nurl = \"{u}\"\n"));
        }
        text
    };
    let dir = std::env::temp_dir().join(format!("lb-reload-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("lb.toml");
    std::fs::write(&path, config("round-robin", &[a.url(), b.url()])).unwrap();
    let mut lb = Lb::spawn(&path);
    lb.wait_for("lb to listen", |_| TcpStream::connect(addr).is_ok());

    // Enough requests for every worker to keep connections to A and B in its pool.
    for _ in 0..16 {
        let (status, body) = get(addr);
        assert_eq!(status, 200);
        assert!(body == "A" || body == "B", "{body}");
    }
    let (a_before, b_before) = (a.hits(), b.hits());
    assert!(a_before > 0 && b_before > 0);

    std::fs::write(&path, config("random", &[c.url()])).unwrap();
    lb.signal("HUP");
    lb.wait_for("the reload", |lb| lb.logged("configuration reloaded") == 1);
    for _ in 0..16 {
        assert_eq!(get(addr), (200, "C".to_owned()));
    }
    assert_eq!(c.hits(), 16, "every request reached C");
    assert_eq!(
        (a.hits(), b.hits()),
        (a_before, b_before),
        "the removed backends got nothing more"
    );

    // And each access-log line says its duration once, in at most 3 decimals of a millisecond.
    let access: Vec<String> = lb
        .stdout
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains("\"duration_ms\""))
        .cloned()
        .collect();
    assert!(access.len() >= 32, "one line per request: {}", access.len());
    for line in &access {
        assert_eq!(line.matches("\"duration\":").count(), 1, "{line}");
        let ms = line.split("\"duration_ms\":").nth(1).unwrap();
        let ms: String = ms
            .chars()
            .take_while(|c| c.is_ascii_digit() || *c == '.')
            .collect();
        let decimals = ms.split_once('.').map_or(0, |(_, d)| d.len());
        assert!(decimals <= 3, "duration_ms {ms} in {line}");
    }
    lb.signal("TERM");
    lb.wait_for("lb to exit", |lb| lb.child.try_wait().unwrap().is_some());
    let _ = std::fs::remove_dir_all(&dir);
}
