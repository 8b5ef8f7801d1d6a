//! Helpers shared by the binary's reload and limits tests: a counting hyper backend on its
//! own thread, and the `lb` process with its captured stdout; raw-socket tools in [`raw`].
#![allow(dead_code, unreachable_pub)]

pub mod chaos;
pub mod h2raw;
pub mod load;
pub mod procfs;
pub mod raw;
pub mod seedlb;
pub mod tls;
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

pub const LB: &str = env!("CARGO_BIN_EXE_lb");

/// A keep-alive hyper backend on its own thread, answering `name` and counting requests.
pub struct Backend {
    pub addr: SocketAddr,
    pub hits: Arc<AtomicUsize>,
}

impl Backend {
    pub fn start(name: &'static str) -> Self {
        Self::start_delayed(name, Duration::ZERO)
    }

    /// Like [`Backend::start`], answering each request only after `delay`.
    pub fn start_delayed(name: &'static str, delay: Duration) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        Self::serve(listener, name, delay)
    }

    /// Like [`Backend::start`], on `listener` (bound by the caller: `127.0.0.2:PORT`).
    pub fn start_on(listener: std::net::TcpListener, name: &'static str) -> Self {
        Self::serve(listener, name, Duration::ZERO)
    }

    fn serve(listener: std::net::TcpListener, name: &'static str, delay: Duration) -> Self {
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
                                if !delay.is_zero() {
                                    tokio::time::sleep(delay).await;
                                }
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

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

/// GET over a fresh client connection; (status, body), status 0 if there was none.
pub fn get(addr: SocketAddr) -> (u16, String) {
    procfs::admin_get(addr, "/")
}

pub struct Lb {
    pub child: Child,
    pub stdout: Arc<Mutex<Vec<String>>>,
}

impl Lb {
    pub fn spawn(config: &std::path::Path) -> Self {
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

    pub fn wait_for(&mut self, what: &str, mut f: impl FnMut(&mut Self) -> bool) {
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

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(ok.success());
    }

    pub fn logged(&self, needle: &str) -> usize {
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

/// What a [`Counting`] backend saw.
#[derive(Debug, Default)]
pub struct Seen {
    /// Requests other than probes (`health_path`).
    pub requests: std::sync::atomic::AtomicU64,
    /// POSTs among them.
    pub posts: std::sync::atomic::AtomicU64,
    /// Requests for the probe path.
    pub probes: std::sync::atomic::AtomicU64,
    /// Connections accepted.
    pub connections: std::sync::atomic::AtomicU64,
    /// Connections closed (by either side).
    pub closed: std::sync::atomic::AtomicU64,
    /// `x-test-id` of each request, with when it arrived, in arrival order.
    pub arrivals: Mutex<Vec<(u64, Instant)>>,
}

impl Seen {
    fn seen_closed(&self) {
        self.closed.fetch_add(1, Ordering::SeqCst);
    }
}

/// A keep-alive hyper HTTP/1.1 backend on its own thread that answers its name and records
/// what it received: requests and probes counted apart, every `x-test-id` with its arrival
/// time (so that a test can tell which configuration a request was routed under), request
/// bodies read whole before answering.
pub struct Counting {
    pub addr: SocketAddr,
    pub name: String,
    pub seen: Arc<Seen>,
}

/// The path `Counting` backends count as health probes.
pub const PROBE_PATH: &str = "/healthz";

impl Counting {
    pub fn start(name: &str) -> Self {
        // A deep accept queue (std's is 128): lb may open a thousand connections at once, and
        // a SYN dropped on a full queue is retried only after lb's connect timeout.
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = socket.local_addr().unwrap();
        let seen = Arc::new(Seen::default());
        let s = seen.clone();
        let body = Bytes::from(name.to_owned());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = socket.listen(4096).unwrap();
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    let _ = stream.set_nodelay(true);
                    s.connections.fetch_add(1, Ordering::SeqCst);
                    let (s, body) = (s.clone(), body.clone());
                    let closed = s.clone();
                    tokio::spawn(async move {
                        let svc = hyper::service::service_fn(
                            move |req: hyper::Request<hyper::body::Incoming>| {
                                let (s, body) = (s.clone(), body.clone());
                                async move {
                                    use http_body_util::BodyExt;
                                    let probe = req.uri().path() == PROBE_PATH;
                                    let post = req.method() == hyper::Method::POST;
                                    let id = req
                                        .headers()
                                        .get("x-test-id")
                                        .and_then(|v| v.to_str().ok())
                                        .and_then(|v| v.parse::<u64>().ok());
                                    let _ = req.into_body().collect().await;
                                    if probe {
                                        s.probes.fetch_add(1, Ordering::SeqCst);
                                    } else {
                                        s.requests.fetch_add(1, Ordering::SeqCst);
                                        if post {
                                            s.posts.fetch_add(1, Ordering::SeqCst);
                                        }
                                        if let Some(id) = id {
                                            s.arrivals.lock().unwrap().push((id, Instant::now()));
                                        }
                                    }
                                    Ok::<_, Infallible>(hyper::Response::new(Full::new(body)))
                                }
                            },
                        );
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), svc)
                            .await;
                        closed.seen_closed();
                    });
                }
            });
        });
        Self {
            addr,
            name: name.to_owned(),
            seen,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `host:port`, as in lb's `backend` metric label.
    pub fn label(&self) -> String {
        self.addr.to_string()
    }

    /// Connections open now (lb's pooled upstream connections to this backend, when only
    /// lb connects to it).
    pub fn open_connections(&self) -> u64 {
        let closed = self.seen.closed.load(Ordering::SeqCst);
        self.seen.connections.load(Ordering::SeqCst) - closed
    }

    pub fn requests(&self) -> u64 {
        self.seen.requests.load(Ordering::SeqCst)
    }

    pub fn probes(&self) -> u64 {
        self.seen.probes.load(Ordering::SeqCst)
    }

    /// The `x-test-id`s received so far, with their arrival times.
    pub fn arrivals(&self) -> Vec<(u64, Instant)> {
        self.seen.arrivals.lock().unwrap().clone()
    }
}

/// A free port on 127.0.0.1, so that `lb` (which runs one worker per core unless asked for
/// port 0) is tested with all its workers.
pub fn free_port_addr() -> SocketAddr {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    format!("127.0.0.1:{port}").parse().unwrap()
}

/// A config file in a fresh temporary directory: (directory, file).
pub fn write_temp_config(name: &str, text: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("lb-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("lb.toml");
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

impl Lb {
    /// Like [`Lb::spawn`], but without access-log lines (a long run would otherwise pile
    /// them up in the test's memory): `RUST_LOG=info,lb::access=warn`.
    pub fn spawn_quiet(config: &std::path::Path) -> Self {
        let mut child = Command::new(LB)
            .arg("--config")
            .arg(config)
            .args(["--log-format", "json"])
            .env("RUST_LOG", "info,lb::access=warn")
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

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits up to `limit` for `f`, without asserting; whether it came true.
    pub fn poll(&mut self, limit: Duration, mut f: impl FnMut(&mut Self) -> bool) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            if f(self) {
                return true;
            }
            if Instant::now() >= deadline || self.child.try_wait().unwrap().is_some() {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// One HTTP/1.1 request with `headers` over a fresh connection (`Connection: close`): (status, head, body); status 0 if no answer.
pub fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String, String) {
    let Ok(mut s) = TcpStream::connect(addr) else {
        return (0, String::new(), String::new());
    };
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    let _ = s.write_all(req.as_bytes());
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (status, head.to_owned(), body.to_owned())
}
