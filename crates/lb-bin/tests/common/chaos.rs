//! The chaos test's moving parts: backends that are real processes (the test binary
//! re-executed, so they can be SIGKILLed and restarted on the same port), a SYN-dropping
//! address, a seeded fault schedule, and the bookkeeping that turns a run into figures.
//!
//! A backend child writes one line per request it receives to its stdout, flushed before it
//! answers, so the parent's counts survive a SIGKILL: whatever the process saw is in the pipe.
//! Its mode changes arrive on stdin, one word a line; at end of stdin (the parent died) it exits.
#![allow(dead_code, unreachable_pub)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::pin::Pin;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::TokioIo;

/// Set in a child's environment to its port: the child serves instead of testing.
pub const CHILD_ENV: &str = "LB_CHAOS_CHILD";
/// The name of the `#[test]` that becomes a backend when [`CHILD_ENV`] is set.
pub const CHILD_TEST: &str = "chaos_backend_child";
/// Probes go here; the children do not count it as traffic.
pub const HEALTH_PATH: &str = "/healthz";
/// How long a slow backend takes to answer anything (its health path included).
pub const SLOW: Duration = Duration::from_secs(2);
/// Body of a GET answer.
pub const GET_BYTES: usize = 512;
/// Declared length of a response that is reset after [`RESET_AFTER`] bytes.
pub const RESET_DECLARED: usize = 4096;
pub const RESET_AFTER: usize = 1024;

/// What a backend does with what it receives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mode {
    Normal = 0,
    /// Answers everything after [`SLOW`].
    Slow = 1,
    /// Resets every non-health request: half before any response byte, half after the head
    /// and part of the body (SO_LINGER 0, so the peer gets an RST, not a FIN).
    Reset = 2,
    /// Closes idle kept-alive connections at random moments (the stale-connection race).
    CloseIdle = 3,
    /// Takes requests and never answers (until the mode changes; then it closes).
    BlackHole = 4,
}

impl Mode {
    pub const fn name(self) -> &'static str {
        match self {
            Self::Normal => "normal",
            Self::Slow => "slow",
            Self::Reset => "reset",
            Self::CloseIdle => "close-kept-alive",
            Self::BlackHole => "black-hole",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [
            Self::Normal,
            Self::Slow,
            Self::Reset,
            Self::CloseIdle,
            Self::BlackHole,
        ]
        .into_iter()
        .find(|m| m.name() == s)
    }

    fn load(m: &AtomicU8) -> Self {
        match m.load(Ordering::SeqCst) {
            1 => Self::Slow,
            2 => Self::Reset,
            3 => Self::CloseIdle,
            4 => Self::BlackHole,
            _ => Self::Normal,
        }
    }
}

/// SplitMix64: a seeded generator for the schedule and the children's random closes.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub const fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            v.swap(i, j);
        }
    }
}

// === the child ===

/// The body of [`CHILD_TEST`]: returns at once unless [`CHILD_ENV`] is set, else serves forever.
pub fn child_main() {
    let Ok(port) = std::env::var(CHILD_ENV) else {
        return;
    };
    let port: u16 = port.parse().expect("LB_CHAOS_CHILD is a port");
    let mode = Arc::new(AtomicU8::new(Mode::Normal as u8));
    let m = mode.clone();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if let Some(new) = Mode::parse(line.trim()) {
                m.store(new as u8, Ordering::SeqCst);
            }
        }
        // The parent is gone (or done with us): never outlive it.
        std::process::exit(0);
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(serve(port, mode));
}

/// One line on stdout, written and flushed at once (it must be in the pipe before we answer).
fn emit(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(format!("{line}\n").as_bytes());
    let _ = out.flush();
}

async fn serve(port: u16, mode: Arc<AtomicU8>) {
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    // A SIGKILLed predecessor's port is free at once, but give the kernel a moment anyway.
    let deadline = Instant::now() + Duration::from_secs(10);
    let listener = loop {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.set_reuseaddr(true).unwrap();
        match sock.bind(addr).and_then(|()| sock.listen(1024)) {
            Ok(l) => break l,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("bind {addr}: {e}"),
        }
    };
    emit("READY");
    let mut seq = u64::from(port) << 32;
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        };
        seq += 1;
        tokio::spawn(connection(stream, mode.clone(), seq));
    }
}

async fn connection(stream: tokio::net::TcpStream, mode: Arc<AtomicU8>, seed: u64) {
    let _ = stream.set_nodelay(true);
    // A second descriptor of the same socket, to set SO_LINGER 0 on it: the socket is closed
    // (with an RST) only when this one goes too, after hyper has dropped its own.
    let Ok(std) = stream.into_std() else { return };
    let Ok(raw) = std.try_clone() else { return };
    let Ok(stream) = tokio::net::TcpStream::from_std(std) else {
        return;
    };
    let raw = Arc::new(raw);
    let (m, r) = (mode.clone(), raw.clone());
    // Only a connection that has served a request is "kept alive": a fresh one is never
    // closed before its first request (lb resends a stale request on a fresh connection).
    let served = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let count = served.clone();
    let svc = hyper::service::service_fn(move |req| {
        count.fetch_add(1, Ordering::SeqCst);
        handle(req, m.clone(), r.clone())
    });
    let conn =
        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc);
    tokio::pin!(conn);
    let mut rng = Rng::new(seed);
    loop {
        let wait = Duration::from_millis(1 + rng.below(300));
        tokio::select! {
            _ = conn.as_mut() => return,
            () = tokio::time::sleep(wait) => {
                if Mode::load(&mode) == Mode::CloseIdle && served.load(Ordering::SeqCst) > 0 {
                    // Closes now if idle, else after the response in progress.
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.as_mut().await;
                    return;
                }
            }
        }
    }
}

/// A response body: whole, or `RESET_AFTER` bytes of a longer one, then an error (which makes
/// hyper abort the connection).
pub struct ChildBody {
    data: Option<Bytes>,
    fail: Option<Pin<Box<tokio::time::Sleep>>>,
    len: u64,
}

impl ChildBody {
    fn full(b: Bytes) -> Self {
        Self {
            len: b.len() as u64,
            data: Some(b),
            fail: None,
        }
    }
}

impl hyper::body::Body for ChildBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        if let Some(b) = self.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(b))));
        }
        match self.fail.as_mut() {
            None => Poll::Ready(None),
            Some(sleep) => {
                // Pending first, so that hyper flushes the head and the first bytes.
                if std::future::Future::poll(sleep.as_mut(), cx).is_pending() {
                    return Poll::Pending;
                }
                self.fail = None;
                Poll::Ready(Some(Err(std::io::Error::other("reset mid-body"))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none() && self.fail.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.len)
    }
}

async fn handle(
    req: hyper::Request<Incoming>,
    mode: Arc<AtomicU8>,
    raw: Arc<std::net::TcpStream>,
) -> Result<hyper::Response<ChildBody>, std::io::Error> {
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    let id = req
        .headers()
        .get("x-test-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_owned();
    emit(&format!("REQ {method} {path} {id}"));
    let health = path == HEALTH_PATH;
    let body = req
        .into_body()
        .collect()
        .await
        .map_err(std::io::Error::other)?
        .to_bytes();
    match Mode::load(&mode) {
        Mode::Slow => tokio::time::sleep(SLOW).await,
        Mode::BlackHole => {
            while Mode::load(&mode) == Mode::BlackHole {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            return Err(std::io::Error::other("black hole over"));
        }
        Mode::Reset if !health => {
            let _ = socket2::SockRef::from(&*raw).set_linger(Some(Duration::ZERO));
            let n: u64 = id.parse().unwrap_or(0);
            if n % 2 == 0 {
                return Err(std::io::Error::other("reset before the response"));
            }
            let mut r = hyper::Response::new(ChildBody {
                data: Some(Bytes::from(vec![b'r'; RESET_AFTER])),
                fail: Some(Box::pin(tokio::time::sleep(Duration::from_millis(30)))),
                len: RESET_DECLARED as u64,
            });
            r.headers_mut()
                .insert("content-length", RESET_DECLARED.into());
            return Ok(r);
        }
        _ => {}
    }
    let answer = if method == hyper::Method::POST {
        Bytes::from(format!("posted {}", body.len()))
    } else {
        Bytes::from(vec![b'g'; GET_BYTES])
    };
    Ok(hyper::Response::new(ChildBody::full(answer)))
}

// === the parent's view of the children ===

/// What the backends received, as they told it, across restarts.
#[derive(Debug, Default)]
pub struct Received {
    /// Non-health requests per backend index.
    pub per_backend: Vec<u64>,
    pub health: Vec<u64>,
    /// Every POST id and how many times any backend received it.
    pub posts: HashMap<u64, u32>,
    /// Every id and the backends that received it (bit `i`: backend `i`; a bit set, not a
    /// list, as the long mode sees millions of ids).
    pub seen_by: HashMap<u64, u8>,
}

impl Received {
    /// Whether backend `b` received request `id`.
    pub fn saw(&self, b: usize, id: u64) -> bool {
        self.seen_by
            .get(&id)
            .is_some_and(|m| m & (1 << (b % 8)) != 0)
    }

    /// The backends that received request `id`.
    pub fn seen(&self, id: u64) -> Vec<usize> {
        (0..8).filter(|b| self.saw(*b, id)).collect()
    }

    pub fn post_duplicates(&self) -> Vec<(u64, u32)> {
        let mut v: Vec<_> = self
            .posts
            .iter()
            .filter(|(_, n)| **n > 1)
            .map(|(i, n)| (*i, *n))
            .collect();
        v.sort_unstable();
        v
    }
}

/// One backend process on a fixed port; started again on the same port after a kill.
pub struct BackendProc {
    pub index: usize,
    pub addr: SocketAddr,
    child: Option<Child>,
    stdin: Option<ChildStdin>,
    received: Arc<Mutex<Received>>,
}

impl BackendProc {
    pub fn start(index: usize, port: u16, received: Arc<Mutex<Received>>) -> Self {
        let mut b = Self {
            index,
            addr: ([127, 0, 0, 1], port).into(),
            child: None,
            stdin: None,
            received,
        };
        b.spawn();
        b
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// (Re)starts the process and waits until it listens.
    pub fn spawn(&mut self) {
        assert!(self.child.is_none());
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", CHILD_TEST, "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, self.addr.port().to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        self.stdin = child.stdin.take();
        self.child = Some(child);
        let (ready_tx, ready_rx) = mpsc::channel();
        let received = self.received.clone();
        let index = self.index;
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                // libtest may have written "test name ... " on that line first.
                if line.ends_with("READY") {
                    let _ = ready_tx.send(());
                    continue;
                }
                let Some(rest) = line.strip_prefix("REQ ") else {
                    continue;
                };
                let mut parts = rest.split(' ');
                let (Some(method), Some(path), Some(id)) =
                    (parts.next(), parts.next(), parts.next())
                else {
                    continue;
                };
                let mut r = received.lock().unwrap();
                if r.per_backend.len() <= index {
                    r.per_backend.resize(index + 1, 0);
                    r.health.resize(index + 1, 0);
                }
                if path == HEALTH_PATH {
                    r.health[index] += 1;
                    continue;
                }
                r.per_backend[index] += 1;
                if let Ok(id) = id.parse::<u64>() {
                    if method == "POST" {
                        *r.posts.entry(id).or_default() += 1;
                    }
                    *r.seen_by.entry(id).or_default() |= 1 << (index % 8);
                }
            }
        });
        ready_rx
            .recv_timeout(Duration::from_secs(20))
            .expect("a backend child started listening");
    }

    pub fn kill(&mut self) {
        self.stdin = None;
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    pub fn set_mode(&mut self, mode: Mode) {
        if let Some(stdin) = self.stdin.as_mut() {
            let _ = writeln!(stdin, "{}", mode.name());
            let _ = stdin.flush();
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

impl Drop for BackendProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// An address whose SYNs are dropped: a listener with the smallest backlog that never
/// accepts, its queue filled by connections we hold, so the kernel drops new SYNs (Linux drops
/// a SYN when the accept queue is full) and a connect just times out.
pub struct SynDrop {
    pub addr: SocketAddr,
    _listener: socket2::Socket,
    _held: Vec<socket2::Socket>,
}

impl SynDrop {
    pub fn start() -> Self {
        use socket2::{Domain, Protocol, SockAddr, Socket, Type};
        let listener = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
        listener
            .bind(&SockAddr::from(SocketAddr::from(([127, 0, 0, 1], 0))))
            .unwrap();
        listener.listen(0).unwrap();
        let addr = listener.local_addr().unwrap().as_socket().unwrap();
        let mut held = Vec::new();
        let mut dropped = false;
        for _ in 0..64 {
            let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
            match s.connect_timeout(&SockAddr::from(addr), Duration::from_millis(300)) {
                Ok(()) => held.push(s),
                Err(_) => {
                    dropped = true;
                    break;
                }
            }
        }
        assert!(dropped, "the SYN-dropping listener's queue never filled");
        Self {
            addr,
            _listener: listener,
            _held: held,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

// === the schedule ===

/// A fault a backend suffers for a while.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Fault {
    /// SIGKILL, restarted on the same port when the fault ends.
    Kill,
    Mode(Mode),
}

impl Fault {
    pub const ALL: [Self; 5] = [
        Self::Kill,
        Self::Mode(Mode::Slow),
        Self::Mode(Mode::Reset),
        Self::Mode(Mode::CloseIdle),
        Self::Mode(Mode::BlackHole),
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Self::Kill => "sigkill",
            Self::Mode(m) => m.name(),
        }
    }
}

/// One fault on one backend from `start` to `end` (since the run's start).
#[derive(Clone, Copy, Debug)]
pub struct Injection {
    pub backend: usize,
    pub fault: Fault,
    pub start: Duration,
    pub end: Duration,
}

/// The faults of a run of `total`: rounds of about `round`, each giving the five faults to the five
/// backends in a seeded order, one after another with seeded jitter, each overlapping the next
/// by about half: never more than two faulted backends at once, so three attempts always
/// reach a healthy one. The first `warmup` and the last `tail` of the run are fault-free.
pub fn schedule(seed: u64, total: Duration, round: Duration, backends: usize) -> Vec<Injection> {
    let mut rng = Rng::new(seed);
    let warmup = Duration::from_secs(3);
    let tail = Duration::from_secs(3);
    let span = total.saturating_sub(warmup + tail);
    let rounds = (span.as_secs() / round.as_secs().max(1)).max(1) as u32;
    let per_round = span / rounds;
    let mut out = Vec::new();
    for r in 0..rounds {
        let base = warmup + per_round * r;
        let mut order: Vec<usize> = (0..backends).collect();
        rng.shuffle(&mut order);
        let mut faults = Fault::ALL.to_vec();
        rng.shuffle(&mut faults);
        // Five faults, each 2 steps long, starting a step apart: they fill 6 steps.
        let step = per_round / 6;
        for (i, fault) in faults.into_iter().enumerate() {
            let jitter = step.mul_f64(rng.below(300) as f64 / 1000.0);
            let start = base + step * i as u32 + jitter;
            let len =
                (step * 2).saturating_sub(jitter) - step.mul_f64(rng.below(200) as f64 / 1000.0);
            out.push(Injection {
                backend: order[i % order.len()],
                fault,
                start,
                end: start + len,
            });
        }
    }
    out
}

/// Most backends faulted at once in `s`.
pub fn max_overlap(s: &[Injection]) -> usize {
    s.iter()
        .map(|a| {
            s.iter()
                .filter(|b| b.start <= a.start && a.start < b.end)
                .count()
        })
        .max()
        .unwrap_or(0)
}

/// The seed of this run: `LB_CHAOS_SEED`, else a fixed one (CI is reproducible).
pub fn seed() -> u64 {
    std::env::var("LB_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5EED_0010)
}

// === detection ===

/// One look at a proxy's view of its backends: (probe-healthy, ejected) per backend index.
pub type View = Vec<(bool, bool)>;

/// A proxy's view of its backends over time, sampled every `period`.
pub struct Watcher {
    samples: Arc<Mutex<Vec<(Duration, View)>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watcher {
    pub fn start(
        start: Instant,
        period: Duration,
        mut look: impl FnMut() -> Option<View> + Send + 'static,
    ) -> Self {
        let samples = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (s, st) = (samples.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !st.load(Ordering::SeqCst) {
                if let Some(v) = look() {
                    s.lock().unwrap().push((start.elapsed(), v));
                }
                std::thread::sleep(period);
            }
        });
        Self {
            samples,
            stop,
            thread: Some(thread),
        }
    }

    pub fn finish(mut self) -> Vec<(Duration, View)> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        std::mem::take(&mut *self.samples.lock().unwrap())
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// lb's `/status` as a [`View`], backends in the order of `addrs`.
pub fn lb_view(admin: SocketAddr, addrs: &[SocketAddr]) -> Option<View> {
    let (status, body) = super::procfs::admin_get(admin, "/status");
    if status != 200 {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    let list = v["backends"].as_array()?;
    addrs
        .iter()
        .map(|a| {
            let b = list.iter().find(|b| {
                b["url"].as_str() == Some(&a.to_string())
                    || b["url"].as_str() == Some(&format!("http://{a}"))
            })?;
            Some((
                b["healthy"].as_bool().unwrap_or(true),
                !b["ejected_until"].is_null(),
            ))
        })
        .collect()
}

/// Time from `from` to the first sample in `[from, until]` where `pick` starts to hold for
/// `backend`: if it already held at `from` (left over from an earlier fault), only once it has
/// stopped holding and holds again.
pub fn first_after(
    samples: &[(Duration, View)],
    backend: usize,
    from: Duration,
    until: Duration,
    pick: impl Fn((bool, bool)) -> bool,
) -> Option<Duration> {
    let holds = |v: &View| v.get(backend).is_some_and(|s| pick(*s));
    let mut clear = samples
        .iter()
        .rfind(|(t, _)| *t < from)
        .is_none_or(|(_, v)| !holds(v));
    for (t, v) in samples.iter().filter(|(t, _)| *t >= from && *t <= until) {
        if !holds(v) {
            clear = true;
        } else if clear {
            return Some(*t - from);
        }
    }
    None
}

/// Millisecond JSON value of an optional duration.
pub fn ms(d: Option<Duration>) -> serde_json::Value {
    d.map_or(serde_json::Value::Null, |d| {
        serde_json::json!(d.as_millis() as u64)
    })
}

/// Waits (bounded) until `f` gives the same value twice `settle` apart.
pub fn settled<T: PartialEq>(settle: Duration, bound: Duration, mut f: impl FnMut() -> T) -> T {
    let deadline = Instant::now() + bound;
    let mut last = f();
    loop {
        std::thread::sleep(settle);
        let now = f();
        if now == last || Instant::now() > deadline {
            return now;
        }
        last = now;
    }
}
