//! `limits.max_connections` through the real binary with one worker per core: one limit for
//! the process (not a share per worker), and a reload that leaves the limits alone says
//! nothing about them.

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

/// A free port on 127.0.0.1 (a fixed port, so that `lb` runs one worker per core).
fn free_addr() -> SocketAddr {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    format!("127.0.0.1:{port}").parse().unwrap()
}

fn config(addr: SocketAddr, strategy: &str, urls: &[String], max_connections: usize) -> String {
    let mut text = format!(
        "listen = [\"{addr}\"]\nstrategy = \"{strategy}\"\n[health]\ninterval = \"0s\"\n\
         [limits]\nmax_connections = {max_connections}\n"
    );
    for u in urls {
        text.push_str(&format!("[[backend]]\nurl = \"{u}\"\n"));
    }
    text
}

fn temp_config(name: &str, text: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("lb-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("lb.toml");
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

/// Sends one keep-alive request and reads its whole response ("A", one byte), leaving the
/// connection open.
fn served_keep_alive(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    if s.write_all(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut out = Vec::new();
    let mut buf = [0u8; 1024];
    while !(out.starts_with(b"HTTP/1.1 200") && out.ends_with(b"\r\n\r\nA")) {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return false,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    true
}

#[test]
fn max_connections_is_one_limit_for_all_workers() {
    const N: usize = 16;
    let a = Backend::start("A");
    let addr = free_addr();
    let (dir, path) = temp_config("maxconn", &config(addr, "round-robin", &[a.url()], N));
    let mut lb = Lb::spawn(&path);
    lb.wait_for("lb to listen", |lb| lb.logged("lb started") == 1);
    // N connections open at once, however the kernel spreads them over the workers: every
    // one is served while the others stay open.
    let mut open = Vec::new();
    for i in 0..N {
        let mut s = TcpStream::connect(addr).unwrap();
        assert!(
            served_keep_alive(&mut s),
            "connection {} of {N} was not served",
            i + 1
        );
        open.push(s);
    }
    assert_eq!(a.hits(), N);
    drop(open);
    lb.signal("TERM");
    lb.wait_for("lb to exit", |lb| lb.child.try_wait().unwrap().is_some());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_reload_of_backends_and_strategy_only_warns_of_nothing() {
    let a = Backend::start("A");
    let b = Backend::start("B");
    let addr = free_addr();
    let (dir, path) = temp_config("reloadwarn", &config(addr, "round-robin", &[a.url()], 100));
    let mut lb = Lb::spawn(&path);
    lb.wait_for("lb to listen", |lb| lb.logged("lb started") == 1);
    std::fs::write(&path, config(addr, "random", &[b.url()], 100)).unwrap();
    lb.signal("HUP");
    lb.wait_for("the reload", |lb| lb.logged("configuration reloaded") == 1);
    assert_eq!(get(addr), (200, "B".to_owned()));
    assert_eq!(
        lb.logged("take effect after a restart"),
        0,
        "no false warning"
    );
    assert_eq!(lb.logged("WARN"), 0, "no warning at all");
    lb.signal("TERM");
    lb.wait_for("lb to exit", |lb| lb.child.try_wait().unwrap().is_some());
    let _ = std::fs::remove_dir_all(&dir);
}
