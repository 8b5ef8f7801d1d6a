//! A closed-loop load generator for the reliability tests: `connections` keep-alive clients
//! (HTTP/1.1 or h2c), each sending its next request when the last one ended, GETs plus a
//! share of POSTs, every request tagged with a unique `x-test-id` so that backends can count
//! what they received (and see a POST delivered twice). Every client-visible failure is
//! recorded with its cause; latencies of successful requests are kept for percentiles.
#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};

/// What to send.
#[derive(Clone, Debug)]
pub struct LoadSpec {
    pub target: SocketAddr,
    pub connections: usize,
    /// Stop after this long (whichever of `duration` and `total` comes first).
    pub duration: Duration,
    /// Stop after this many requests in all (`u64::MAX`: only `duration` counts).
    pub total: u64,
    /// Share of requests that are POSTs, 0..=100.
    pub post_percent: u64,
    /// POST body size in bytes.
    pub post_bytes: usize,
    /// h2c prior knowledge instead of HTTP/1.1.
    pub h2: bool,
    /// Path of every request.
    pub path: String,
    /// Give up on one request after this long (a hang guard, recorded as a failure).
    pub request_timeout: Duration,
}

impl LoadSpec {
    pub fn new(target: SocketAddr, connections: usize, duration: Duration) -> Self {
        Self {
            target,
            connections,
            duration,
            total: u64::MAX,
            post_percent: 0,
            post_bytes: 64,
            h2: false,
            path: "/".into(),
            request_timeout: Duration::from_secs(30),
        }
    }
}

/// One request the client did not get a good answer to.
#[derive(Clone, Debug)]
pub struct Failure {
    /// Since the start of the run.
    pub at: Duration,
    pub id: u64,
    pub post: bool,
    /// `status 502`, `connect: ...`, `send: ...`, `body: ...`, `timeout`.
    pub cause: String,
    /// The response head had arrived (with a good status) before the failure: the response
    /// was already streaming.
    pub streamed: bool,
}

/// What a run did.
#[derive(Debug, Default)]
pub struct LoadReport {
    pub sent: u64,
    pub ok: u64,
    pub posts_sent: u64,
    pub failures: Vec<Failure>,
    /// Latency of each successful request, microseconds.
    pub latencies_us: Vec<u32>,
    pub elapsed: Duration,
}

impl LoadReport {
    /// Latency percentile `p` (0..=100) of successful requests, milliseconds.
    pub fn percentile_ms(&self, p: f64) -> f64 {
        percentile_ms(&self.latencies_us, p)
    }

    pub fn requests_per_second(&self) -> f64 {
        self.sent as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Failures grouped by cause, most frequent first.
    pub fn causes(&self) -> Vec<(String, usize)> {
        let mut m = std::collections::BTreeMap::<String, usize>::new();
        for f in &self.failures {
            *m.entry(f.cause.clone()).or_default() += 1;
        }
        let mut v: Vec<_> = m.into_iter().collect();
        v.sort_by_key(|b| std::cmp::Reverse(b.1));
        v
    }
}

/// Percentile `p` of microsecond samples, in milliseconds (0 when empty).
pub fn percentile_ms(samples: &[u32], p: f64) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    let mut v = samples.to_vec();
    v.sort_unstable();
    let rank = ((p / 100.0) * (v.len() - 1) as f64).round() as usize;
    f64::from(v[rank.min(v.len() - 1)]) / 1000.0
}

/// A load run in the background, on its own runtime and thread.
pub struct Load {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<LoadReport>>,
}

impl Load {
    pub fn start(spec: LoadSpec) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || run_blocking(spec, s));
        Self {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops early (requests in flight finish) and returns the report.
    pub fn stop(mut self) -> LoadReport {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.take().unwrap().join().unwrap()
    }

    /// Waits for the run to end by itself (`duration` or `total`).
    pub fn wait(mut self) -> LoadReport {
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Runs `spec` to its end on the calling thread.
pub fn run(spec: LoadSpec) -> LoadReport {
    run_blocking(spec, Arc::new(AtomicBool::new(false)))
}

/// Process-wide, so that ids stay unique across several runs against the same backends.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

struct Shared {
    spec: LoadSpec,
    start: Instant,
    stop: Arc<AtomicBool>,
    issued: AtomicU64,
    report: Mutex<LoadReport>,
}

fn run_blocking(spec: LoadSpec, stop: Arc<AtomicBool>) -> LoadReport {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let shared = Arc::new(Shared {
        spec: spec.clone(),
        start: Instant::now(),
        stop,
        issued: AtomicU64::new(0),
        report: Mutex::new(LoadReport::default()),
    });
    rt.block_on(async {
        let mut tasks = Vec::new();
        for _ in 0..spec.connections {
            tasks.push(tokio::spawn(client(shared.clone())));
        }
        for t in tasks {
            let _ = t.await;
        }
    });
    let mut report = std::mem::take(&mut *shared.report.lock().unwrap());
    report.elapsed = shared.start.elapsed();
    report
}

enum Sender {
    H1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

async fn connect(spec: &LoadSpec) -> Result<Sender, String> {
    let stream = tokio::net::TcpStream::connect(spec.target)
        .await
        .map_err(|e| format!("connect: {}", e.kind()))?;
    let _ = stream.set_nodelay(true);
    let io = TokioIo::new(stream);
    if spec.h2 {
        let (send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        tokio::spawn(conn);
        Ok(Sender::H2(send))
    } else {
        let (send, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        tokio::spawn(conn);
        Ok(Sender::H1(send))
    }
}

fn error_cause(stage: &str, e: &hyper::Error) -> String {
    // The innermost cause names what happened on the wire (reset, eof); hyper's own text
    // names the stage.
    let mut src: &dyn std::error::Error = e;
    while let Some(s) = src.source() {
        src = s;
    }
    if std::ptr::eq(src as *const _ as *const u8, e as *const _ as *const u8) {
        format!("{stage}: {e}")
    } else {
        format!("{stage}: {e}: {src}")
    }
}

async fn client(shared: Arc<Shared>) {
    let spec = &shared.spec;
    let mut sender: Option<Sender> = None;
    loop {
        if shared.stop.load(Ordering::SeqCst) || shared.start.elapsed() >= spec.duration {
            return;
        }
        if shared.issued.fetch_add(1, Ordering::SeqCst) >= spec.total {
            return;
        }
        let id = NEXT_ID.fetch_add(1, Ordering::SeqCst);
        let post = spec.post_percent > 0 && id % 100 < spec.post_percent;
        let began = Instant::now();
        let result = tokio::time::timeout(spec.request_timeout, one(spec, &mut sender, id, post))
            .await
            .unwrap_or_else(|_| Err(("timeout".to_owned(), false)));
        let mut r = shared.report.lock().unwrap();
        r.sent += 1;
        if post {
            r.posts_sent += 1;
        }
        match result {
            Ok(()) => {
                r.ok += 1;
                r.latencies_us
                    .push(began.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
            }
            Err((cause, streamed)) => {
                sender = None;
                r.failures.push(Failure {
                    at: shared.start.elapsed(),
                    id,
                    post,
                    cause,
                    streamed,
                });
            }
        }
    }
}

async fn one(
    spec: &LoadSpec,
    sender: &mut Option<Sender>,
    id: u64,
    post: bool,
) -> Result<(), (String, bool)> {
    let ready = match sender {
        Some(Sender::H1(s)) => s.ready().await.is_ok(),
        Some(Sender::H2(s)) => s.ready().await.is_ok(),
        None => false,
    };
    if !ready {
        *sender = Some(connect(spec).await.map_err(|e| (e, false))?);
    }
    let body = if post {
        Bytes::from(vec![b'p'; spec.post_bytes])
    } else {
        Bytes::new()
    };
    let uri = if spec.h2 {
        format!("http://{}{}", spec.target, spec.path)
    } else {
        spec.path.clone()
    };
    let req = hyper::Request::builder()
        .method(if post { "POST" } else { "GET" })
        .uri(uri)
        .header("host", "load.test")
        .header("x-test-id", id.to_string())
        .body(Full::new(body))
        .unwrap();
    let resp = match sender.as_mut().unwrap() {
        Sender::H1(s) => s.send_request(req).await,
        Sender::H2(s) => s.send_request(req).await,
    }
    .map_err(|e| (error_cause("send", &e), false))?;
    let status = resp.status();
    let body = resp.into_body().collect().await;
    if !status.is_success() {
        return Err((format!("status {}", status.as_u16()), false));
    }
    body.map_err(|e| (error_cause("body", &e), true))?;
    Ok(())
}

/// The `x-test-id` the next request will get: every id issued from now on is at least this.
pub fn next_id() -> u64 {
    NEXT_ID.load(Ordering::SeqCst)
}
