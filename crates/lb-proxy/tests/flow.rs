//! The request flow against hostile and faulty clients and backends, through real sockets:
//! faults of the client's own are never charged to a backend, no connection slot is held
//! forever, and a dead pooled connection costs at most one visible resend per request.

mod common;

use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use http::Response;
use http_body_util::BodyExt;
use lb_core::select::{AnySelect, StrategyKind};
use lb_core::{Balancer, Config, Outcome, Weight};
use lb_proxy::{Completed, HashKey, Observer, Proxy, ProxyConfig, Routes, Target};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Far more than anything here needs, on any machine.
const BOUND: Duration = Duration::from_secs(15);

#[allow(clippy::disallowed_methods)]
fn wall() -> std::time::Instant {
    std::time::Instant::now()
}

/// (failures_total, ejected) of every backend.
fn charged(p: &TestProxy) -> Vec<(u64, bool)> {
    p.balancer()
        .backends(wall())
        .iter()
        .map(|b| (b.failures_total, b.ejected_until.is_some()))
        .collect()
}

/// Sends `bytes`, optionally half-closes, and reads until the proxy closes (bounded).
async fn exchange_raw(p: &TestProxy, bytes: &[u8], half_close: bool) -> String {
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    if half_close {
        s.shutdown().await.unwrap();
    }
    let mut out = Vec::new();
    let _ = tokio::time::timeout(BOUND, s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// A backend that reads whole request bodies and answers with their length.
async fn echo_len() -> Backend {
    Backend::start(Arc::new(|req| {
        Box::pin(async move {
            match req.into_body().collect().await {
                Ok(b) => Response::new(full(b.to_bytes().len().to_string())),
                Err(_) => Response::new(full("body failed")),
            }
        })
    }))
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_request_bodies_get_400_and_are_never_charged_to_a_backend() {
    let a = echo_len().await;
    let b = echo_len().await;
    let p = proxy(&[a.url(), b.url()], core_config(), ProxyConfig::default()).await;
    for _ in 0..10 {
        let got = exchange_raw(
            &p,
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
            false,
        )
        .await;
        assert!(
            got.starts_with("HTTP/1.1 400"),
            "bad chunk framing: {got:?}"
        );
    }
    // Fewer bytes than Content-Length, then the client stops sending: buffered and streamed.
    for cl in [10, 1_000_000] {
        let req = format!("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: {cl}\r\n\r\nhello");
        let got = exchange_raw(&p, req.as_bytes(), true).await;
        assert!(
            got.is_empty() || got.starts_with("HTTP/1.1 400"),
            "short body of {cl}: {got:?}"
        );
    }
    // An aborted streamed upload: the client leaves mid-body.
    for _ in 0..5 {
        let mut s = TcpStream::connect(p.addr).await.unwrap();
        s.write_all(
            b"PUT /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
        )
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(s);
    }
    wait_for("every attempt released", || p.active() == 0).await;
    assert_eq!(
        charged(&p),
        vec![(0, false), (0, false)],
        "no failure counted, nobody ejected"
    );
    for _ in 0..4 {
        let (status, body) = get(&p.url("/after")).await;
        assert_eq!((status, body.as_str()), (200, "0"));
    }
    assert!(a.count() >= 2 && b.count() >= 2, "both still in rotation");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_bodies_get_408_silent_http2_is_closed_and_slow_uploads_succeed() {
    let backend = echo_len().await;
    let core = core_config();
    let retry = core
        .retry()
        .with_attempt_timeout(Duration::from_millis(500));
    let core = core.with_retry(retry);
    let short = Duration::from_millis(300);
    let config = ProxyConfig {
        header_read_timeout: short,
        idle_timeout: short,
        // Ten times the slow upload's pauses below, a third of the stalled ones'.
        body_read_timeout: Duration::from_secs(1),
        max_connections: 4,
        ..ProxyConfig::default()
    };
    let p = proxy(&[backend.url()], core, config).await;

    // Four sockets that would hold every slot: two HTTP/2 prefaces with SETTINGS then
    // silence, two request bodies at 1 byte per 3 s.
    let mut hostile = tokio::task::JoinSet::new();
    for i in 0..4 {
        let addr = p.addr;
        hostile.spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            let mut got = Vec::new();
            if i % 2 == 0 {
                s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
                    .await
                    .unwrap();
            } else {
                s.write_all(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1000\r\n\r\n")
                    .await
                    .unwrap();
            }
            // Keep trickling until the proxy closes the socket.
            let closed = tokio::time::timeout(BOUND, async {
                loop {
                    let mut buf = [0u8; 1024];
                    tokio::select! {
                        r = s.read(&mut buf) => match r {
                            Ok(0) | Err(_) => return,
                            Ok(n) => got.extend_from_slice(&buf[..n]),
                        },
                        () = tokio::time::sleep(Duration::from_secs(3)), if i % 2 == 1 => {
                            if s.write_all(b"x").await.is_err() {
                                return;
                            }
                        }
                    }
                }
            })
            .await
            .is_ok();
            (i, closed, String::from_utf8_lossy(&got).into_owned())
        });
    }
    let (status, body) = tokio::time::timeout(BOUND, get(&p.url("/other")))
        .await
        .expect("another client is served");
    assert_eq!((status, body.as_str()), (200, "0"));
    while let Some(r) = hostile.join_next().await {
        let (i, closed, got) = r.unwrap();
        assert!(closed, "socket {i} closed by the proxy");
        if i % 2 == 1 {
            assert!(got.starts_with("HTTP/1.1 408"), "stalled body: {got:?}");
        }
    }

    // A steady chunked upload slower than the request timeout is not cut off: the request
    // timeout counts from the request fully sent.
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(b"POST /slow HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
        .await
        .unwrap();
    for _ in 0..15 {
        s.write_all(b"1\r\nx\r\n").await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    s.write_all(b"0\r\n\r\n").await.unwrap();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(BOUND, async {
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&got).contains("\r\n\r\n15") {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    let got = String::from_utf8_lossy(&got).into_owned();
    assert!(got.starts_with("HTTP/1.1 200"), "slow upload: {got:?}");
    assert!(
        got.ends_with("\r\n\r\n15"),
        "the backend got all 15 bytes: {got:?}"
    );
    assert_eq!(charged(&p), vec![(0, false)]);

    // HTTP/2: a connection that served a request and then has no stream open is closed.
    let tcp = TcpStream::connect(p.addr).await.unwrap();
    let (mut tx, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    let conn = tokio::spawn(conn);
    let req = http::Request::get(p.url("/h2"))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = tx.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let _ = resp.into_body().collect().await.unwrap();
    tokio::time::timeout(BOUND, conn)
        .await
        .expect("an idle HTTP/2 connection is closed")
        .unwrap()
        .ok();
}

/// Counts what an observer sees: attempts (sends) and the last routing trace.
#[derive(Default)]
struct Seen {
    attempts: AtomicUsize,
    stale: AtomicUsize,
    traces: Mutex<Vec<String>>,
}

impl Observer for Seen {
    fn attempt(&self, _: &Target, outcome: Outcome) {
        self.attempts.fetch_add(1, Ordering::SeqCst);
        if outcome == Outcome::StaleConnection {
            self.stale.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn completed(&self, r: &Completed<'_>) {
        if let Some(st) = r.state {
            let line = r.routes.trace(st).to_string();
            self.traces.lock().unwrap().push(line);
        }
    }
}

const ANSWER: u8 = 0;
const CLOSE: u8 = 1;
const FIRST_ONLY: u8 = 2;

/// A raw HTTP/1.1 backend: reads request heads (counted as sends) and, by its mode, answers
/// every one, closes after reading any, or answers only a connection's first.
struct RawBackend {
    addr: std::net::SocketAddr,
    sends: Arc<AtomicUsize>,
    mode: Arc<AtomicU8>,
    task: tokio::task::JoinHandle<()>,
}

impl RawBackend {
    async fn start(mode: u8) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let sends = Arc::new(AtomicUsize::new(0));
        let mode = Arc::new(AtomicU8::new(mode));
        let (s, m) = (sends.clone(), mode.clone());
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((mut c, _)) = listener.accept().await {
                let (s, m) = (s.clone(), m.clone());
                conns.spawn(async move {
                    let mut buf = Vec::new();
                    let mut served = 0;
                    loop {
                        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                            let mut chunk = [0u8; 1024];
                            match c.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        }
                        let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                        buf.drain(..end);
                        s.fetch_add(1, Ordering::SeqCst);
                        let answer = match m.load(Ordering::SeqCst) {
                            ANSWER => true,
                            FIRST_ONLY => served == 0,
                            _ => false,
                        };
                        if !answer {
                            return;
                        }
                        served += 1;
                        let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
                        if c.write_all(ok).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Self {
            addr,
            sends,
            mode,
            task,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn sends(&self) -> usize {
        self.sends.load(Ordering::SeqCst)
    }
}

impl Drop for RawBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn observed_proxy(urls: &[String], core: Config, seen: Arc<Seen>) -> TestProxy {
    let balancer = Arc::new(Balancer::new(core, AnySelect::new(StrategyKind::RoundRobin)).unwrap());
    let backends: Vec<(String, Weight)> = urls.iter().map(|u| (u.clone(), Weight::ONE)).collect();
    let routes = Routes::new(balancer, &backends, HashKey::ClientIp, wall()).unwrap();
    let proxy = Proxy::with_observer(ProxyConfig::default(), routes, seen);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let p = proxy.clone();
    let task = tokio::spawn(async move {
        let _ = p.serve(vec![listener], rx, Duration::from_secs(5)).await;
    });
    TestProxy {
        addr,
        proxy,
        shutdown: Some(tx),
        task,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_pooled_connection_is_resent_once_per_request_and_shown() {
    // One backend: the stale pooled connection leads to the resend, not to a 502.
    let one = RawBackend::start(FIRST_ONLY).await;
    let seen = Arc::new(Seen::default());
    let p = observed_proxy(&[one.url()], core_config(), seen.clone()).await;
    assert_eq!(get(&p.url("/1")).await, (200, "ok".to_owned()));
    assert_eq!(get(&p.url("/2")).await, (200, "ok".to_owned()));
    assert_eq!(
        one.sends(),
        3,
        "the first request, the dead pooled send, the resend"
    );
    assert_eq!(
        seen.attempts.load(Ordering::SeqCst),
        3,
        "every send counted"
    );
    assert_eq!(seen.stale.load(Ordering::SeqCst), 1);
    let traces = seen.traces.lock().unwrap().clone();
    assert!(
        traces[1].contains("stale_connection resend") && traces[1].ends_with("status 200 relay"),
        "{traces:?}"
    );
    assert_eq!(charged(&p), vec![(0, false)], "a resend is not a failure");
    drop(p);

    // Two backends, attempts = 2, both closing every connection they read a request on:
    // at most attempts + 1 sends, and every one of them counted.
    let a = RawBackend::start(ANSWER).await;
    let b = RawBackend::start(ANSWER).await;
    let seen = Arc::new(Seen::default());
    let core = core_config();
    let retry = core.retry().with_attempts(2);
    let core = core.with_retry(retry);
    let p = observed_proxy(&[a.url(), b.url()], core, seen.clone()).await;
    for _ in 0..2 {
        assert_eq!(get(&p.url("/warm")).await.0, 200);
    }
    let before = (a.sends() + b.sends(), seen.attempts.load(Ordering::SeqCst));
    assert_eq!(before, (2, 2));
    a.mode.store(CLOSE, Ordering::SeqCst);
    b.mode.store(CLOSE, Ordering::SeqCst);
    assert_eq!(get(&p.url("/x")).await.0, 502);
    let sends = a.sends() + b.sends() - before.0;
    let counted = seen.attempts.load(Ordering::SeqCst) - before.1;
    assert_eq!(sends, 3, "attempts + 1 sends at the backends");
    assert_eq!(counted, sends, "lb_requests_total counts each of them");
    let traces = seen.traces.lock().unwrap().clone();
    let last = traces.last().unwrap();
    assert_eq!(last.matches("resend").count(), 1, "{last}");
    assert_eq!(
        last.matches(", ").count(),
        3,
        "three sends and the 502: {last}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_stops_reading_the_body_still_gets_the_request_timeout() {
    // Accepts, never reads: once the socket buffers are full, the upload stalls on its side.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let held = tokio::spawn(async move {
        let mut conns = Vec::new();
        while let Ok((c, _)) = listener.accept().await {
            conns.push(c);
        }
    });
    let core = core_config();
    let retry = core
        .retry()
        .with_attempt_timeout(Duration::from_millis(500));
    let core = core.with_retry(retry);
    let config = ProxyConfig {
        body_read_timeout: Duration::from_secs(30),
        ..ProxyConfig::default()
    };
    let p = proxy(&[url], core, config).await;
    let s = TcpStream::connect(p.addr).await.unwrap();
    let (mut rd, mut wr) = s.into_split();
    let writer = tokio::spawn(async move {
        let _ = wr
            .write_all(b"PUT /big HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
            .await;
        let chunk = format!("10000\r\n{}\r\n", "x".repeat(0x10000));
        // At most 1 GiB: far beyond any socket buffer, so the stall is the backend's.
        for _ in 0..16_384 {
            if wr.write_all(chunk.as_bytes()).await.is_err() {
                return;
            }
        }
    });
    let mut got = vec![0u8; 4096];
    let n = tokio::time::timeout(BOUND, rd.read(&mut got))
        .await
        .expect("an answer while the upload is stalled")
        .unwrap();
    let got = String::from_utf8_lossy(&got[..n]).into_owned();
    assert!(got.starts_with("HTTP/1.1 504"), "{got:?}");
    writer.abort();
    held.abort();
}

/// Reads one request head from `c` (with what came after it in `buf`): its Content-Length.
async fn read_head(c: &mut TcpStream, buf: &mut Vec<u8>) -> Option<usize> {
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let mut chunk = [0u8; 4096];
        match c.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
    buf.drain(..end);
    let len = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    Some(len)
}

/// A raw backend that answers `200 ok` as soon as it has a request head, then reads the
/// request's body (by its Content-Length) and logs how much it got, then serves the next.
struct EarlyBackend {
    addr: std::net::SocketAddr,
    bodies: Arc<Mutex<Vec<usize>>>,
    task: tokio::task::JoinHandle<()>,
}

impl EarlyBackend {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let b = bodies.clone();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((mut c, _)) = listener.accept().await {
                let b = b.clone();
                conns.spawn(async move {
                    let mut buf = Vec::new();
                    while let Some(len) = read_head(&mut c, &mut buf).await {
                        let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
                        if c.write_all(ok).await.is_err() {
                            break;
                        }
                        while buf.len() < len {
                            let mut chunk = [0u8; 65536];
                            match c.read(&mut chunk).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        }
                        let got = len.min(buf.len());
                        buf.drain(..got);
                        b.lock().unwrap().push(got);
                        if got < len {
                            break;
                        }
                    }
                });
            }
        });
        Self { addr, bodies, task }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn bodies(&self) -> Vec<usize> {
        self.bodies.lock().unwrap().clone()
    }
}

impl Drop for EarlyBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_still_uploading_after_an_early_answer_is_never_handed_to_another_request() {
    let backend = EarlyBackend::start().await;
    let core = core_config();
    let retry = core
        .retry()
        .with_attempt_timeout(Duration::from_millis(500));
    let core = core.with_retry(retry);
    let config = ProxyConfig {
        body_read_timeout: Duration::from_secs(10),
        ..ProxyConfig::default()
    };
    let p = proxy(&[backend.url()], core, config).await;

    // A streamed upload (beyond the replay buffer) that the backend answers at once, and
    // whose client then trickles its last bytes until the other requests are done.
    const HEAD: usize = 100_000;
    const TAIL: usize = 300;
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (answered_tx, answered) = tokio::sync::oneshot::channel();
    let addr = p.addr;
    let d = done.clone();
    let uploader = tokio::spawn(async move {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let head = format!(
            "PUT /up HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\n\r\n",
            HEAD + TAIL
        );
        s.write_all(head.as_bytes()).await.unwrap();
        s.write_all(&[b'a'; HEAD]).await.unwrap();
        let mut got = Vec::new();
        let _ = tokio::time::timeout(BOUND, async {
            let mut buf = [0u8; 1024];
            while !got.ends_with(b"\r\n\r\nok") {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
        })
        .await;
        let _ = answered_tx.send(String::from_utf8_lossy(&got).into_owned());
        let mut sent = 0;
        while sent < TAIL - 1 && !d.load(Ordering::SeqCst) {
            s.write_all(b"a").await.unwrap();
            sent += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        s.write_all(&vec![b'a'; TAIL - sent]).await.unwrap();
        s
    });
    let got = answered.await.unwrap();
    assert!(got.starts_with("HTTP/1.1 200"), "early answer: {got:?}");

    // Meanwhile every other request is served, on another connection.
    let mut statuses = Vec::new();
    for i in 0..8 {
        statuses.push(get(&p.url(&format!("/g{i}"))).await);
    }
    let all_done = !done.swap(true, Ordering::SeqCst);
    assert!(all_done);
    assert!(
        statuses.iter().all(|(s, b)| *s == 200 && b == "ok"),
        "{statuses:?}"
    );
    let s = uploader.await.unwrap();
    wait_for("the whole upload at the backend", || {
        backend.bodies().contains(&(HEAD + TAIL))
    })
    .await;
    assert_eq!(
        backend.bodies().iter().filter(|&&n| n == 0).count(),
        8,
        "every GET reached the backend: {:?}",
        backend.bodies()
    );
    assert_eq!(charged(&p), vec![(0, false)], "nothing charged");
    drop(s);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_to_a_backend_removed_while_in_use_is_closed_not_pooled() {
    // A raw backend that answers its first request once told to (so that request is in
    // flight across the reload), then waits for the proxy to close the connection.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let slow_url = format!("http://{}", listener.local_addr().unwrap());
    let (go_tx, mut go_rx) = tokio::sync::watch::channel(false);
    let (head_tx, head_rx) = tokio::sync::oneshot::channel();
    let slow = tokio::spawn(async move {
        let (mut c, _) = listener.accept().await.unwrap();
        let mut buf = Vec::new();
        read_head(&mut c, &mut buf).await.unwrap();
        let _ = head_tx.send(());
        let _ = go_rx.wait_for(|g| *g).await;
        c.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nslow")
            .await
            .unwrap();
        // Bounded: the connection the proxy keeps open fails the test instead of hanging it.
        let closed = tokio::time::timeout(BOUND, async {
            let mut b = [0u8; 1024];
            // Bytes would be another request: none should come.
            matches!(c.read(&mut b).await, Ok(0) | Err(_))
        })
        .await;
        closed == Ok(true)
    });
    let other = Backend::ok("other").await;
    let p = proxy(&[slow_url], core_config(), ProxyConfig::default()).await;
    let url = p.url("/in-flight");
    let in_flight = tokio::spawn(async move { get(&url).await });
    head_rx.await.unwrap();
    let routes = Routes::new(
        p.balancer(),
        &[(other.url(), Weight::ONE)],
        HashKey::ClientIp,
        wall(),
    )
    .unwrap();
    p.proxy.set_routes(routes);
    // Past the proxy's next sweep (every 5 s), which closes what the pool held at the reload:
    // the connection must not come back into the pool after it, to stay there until its
    // idle timeout (90 s). A sweep late on a busy machine could only make this test pass.
    tokio::time::sleep(Duration::from_secs(6)).await;
    go_tx.send(true).unwrap();
    assert_eq!(in_flight.await.unwrap(), (200, "slow".to_owned()));
    assert!(
        slow.await.unwrap(),
        "the removed backend's connection is closed, not pooled"
    );
    assert_eq!(get(&p.url("/after")).await, (200, "other".to_owned()));
}

/// A raw backend that counts request heads and never answers (it reads until the proxy
/// closes the connection).
async fn silent_backend() -> (String, Arc<AtomicUsize>, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let heads = Arc::new(AtomicUsize::new(0));
    let h = heads.clone();
    let task = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        while let Ok((mut c, _)) = listener.accept().await {
            let h = h.clone();
            conns.spawn(async move {
                let mut buf = Vec::new();
                if read_head(&mut c, &mut buf).await.is_some() {
                    h.fetch_add(1, Ordering::SeqCst);
                }
                let mut b = [0u8; 4096];
                while matches!(c.read(&mut b).await, Ok(n) if n > 0) {}
            });
        }
    });
    (url, heads, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_cut_short_by_the_clients_body_still_counts_as_a_request_to_the_backend() {
    let (url, heads, task) = silent_backend().await;
    let seen = Arc::new(Seen::default());
    let p = observed_proxy(&[url], core_config(), seen.clone()).await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(
        b"POST /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
    )
    .await
    .unwrap();
    wait_for("the request at the backend", || {
        heads.load(Ordering::SeqCst) == 1
    })
    .await;
    s.write_all(b"zz\r\nhello\r\n0\r\n\r\n").await.unwrap();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(BOUND, s.read_to_end(&mut got)).await;
    let got = String::from_utf8_lossy(&got).into_owned();
    assert!(got.starts_with("HTTP/1.1 400"), "{got:?}");
    wait_for("the attempt released", || p.active() == 0).await;
    assert_eq!(
        seen.attempts.load(Ordering::SeqCst),
        1,
        "the send is counted"
    );
    let backends = p.balancer().backends(wall());
    assert_eq!(
        (backends[0].requests_total, backends[0].failures_total),
        (1, 0),
        "/status agrees, and nothing is charged"
    );
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_body_is_sent_whatever_the_method_and_its_faults_get_400() {
    let backend = echo_len().await;
    let p = proxy(&[backend.url()], core_config(), ProxyConfig::default()).await;
    for method in ["GET", "OPTIONS", "DELETE", "POST"] {
        let req = format!(
            "{method} /m HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        );
        let got = exchange_raw(&p, req.as_bytes(), false).await;
        assert!(
            got.starts_with("HTTP/1.1 200") && got.ends_with("\r\n\r\n5"),
            "{method}: the backend got the 5 bytes: {got:?}"
        );
    }
    let seen = backend.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 4);
    assert!(seen.iter().all(|r| r
        .headers
        .get(http::header::TRANSFER_ENCODING)
        .is_some_and(|v| v == "chunked")));
    for _ in 0..5 {
        let got = exchange_raw(
            &p,
            b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
            false,
        )
        .await;
        assert!(
            got.starts_with("HTTP/1.1 400"),
            "bad chunk framing: {got:?}"
        );
    }
    wait_for("every attempt released", || p.active() == 0).await;
    assert_eq!(charged(&p), vec![(0, false)], "nothing charged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_reading_a_streamed_body_steadily_is_not_timed_out() {
    // Reads the body at most 4 KiB at a time every 20 ms (5 s or more for 1 MiB, more than
    // twice the request timeout), with a small receive buffer as a slow reader has; then
    // answers. The proxy takes the whole body from the client at once: in hyper's buffer
    // and the kernel's, it was all "sent" long before the backend read it.
    const LEN: usize = 1 << 20;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        while let Ok((mut c, _)) = listener.accept().await {
            let _ = socket2::SockRef::from(&c).set_recv_buffer_size(16 * 1024);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let Some(len) = read_head(&mut c, &mut buf).await else {
                    return;
                };
                let mut got = buf.len();
                let mut chunk = vec![0u8; 4096];
                while got < len {
                    match c.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got += n,
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                let body = got.to_string();
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                let _ = c.write_all(resp.as_bytes()).await;
            });
        }
    });
    let core = core_config();
    let retry = core.retry().with_attempt_timeout(Duration::from_secs(2));
    let core = core.with_retry(retry);
    let p = proxy(&[url], core, ProxyConfig::default()).await;
    let mut req = format!(
        "PUT /up HTTP/1.1\r\nHost: a\r\nContent-Length: {LEN}\r\nConnection: close\r\n\r\n"
    )
    .into_bytes();
    req.extend(std::iter::repeat_n(b'a', LEN));
    let got = tokio::time::timeout(Duration::from_secs(60), exchange_raw(&p, &req, false))
        .await
        .expect("bounded");
    assert!(
        got.starts_with("HTTP/1.1 200") && got.ends_with(&format!("\r\n\r\n{LEN}")),
        "{got:?}"
    );
    assert_eq!(charged(&p), vec![(0, false)]);
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_that_timed_out_closes_its_connection_instead_of_sending_the_rest() {
    // Reads the request head and stalls (the upload backs up) until the client has its 504,
    // then drains what it was sent until the proxy closes the connection.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (answered_tx, answered) = tokio::sync::watch::channel(false);
    let backend = tokio::spawn(async move {
        let (mut c, _) = listener.accept().await.unwrap();
        let mut buf = Vec::new();
        read_head(&mut c, &mut buf).await.unwrap();
        let mut answered = answered;
        let _ = answered.wait_for(|a| *a).await;
        let mut total = buf.len();
        let mut chunk = vec![0u8; 65536];
        let closed = tokio::time::timeout(BOUND, async {
            loop {
                match c.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => total += n,
                }
            }
        })
        .await
        .is_ok();
        (closed, total)
    });
    let core = core_config();
    let retry = core
        .retry()
        .with_attempt_timeout(Duration::from_millis(500));
    let core = core.with_retry(retry);
    let p = proxy(&[url], core, ProxyConfig::default()).await;
    let s = TcpStream::connect(p.addr).await.unwrap();
    let (mut rd, mut wr) = s.into_split();
    const MIB: usize = 1 << 20;
    let writer = tokio::spawn(async move {
        let _ = wr
            .write_all(b"PUT /big HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
            .await;
        let chunk = format!("10000\r\n{}\r\n", "x".repeat(0x10000));
        // At most 512 MiB, as long as the proxy takes it.
        let mut sent = 0;
        while sent < 512 * MIB {
            if wr.write_all(chunk.as_bytes()).await.is_err() {
                break;
            }
            sent += 0x10000;
        }
        sent
    });
    let mut got = vec![0u8; 4096];
    let n = tokio::time::timeout(BOUND, rd.read(&mut got))
        .await
        .expect("an answer while the upload is stalled")
        .unwrap();
    let got = String::from_utf8_lossy(&got[..n]).into_owned();
    assert!(got.starts_with("HTTP/1.1 504"), "{got:?}");
    answered_tx.send(true).unwrap();
    let (closed, total) = backend.await.unwrap();
    assert!(closed, "the proxy closed the backend's connection");
    // What the buffers between client and backend held at the 504, not the rest.
    assert!(
        total < 64 * MIB,
        "the backend got {total} bytes after the 504"
    );
    drop(rd);
    let _ = writer.await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_going_on_after_an_early_answer_is_not_taken_for_a_slow_head() {
    let backend = EarlyBackend::start().await;
    let config = ProxyConfig {
        // Far shorter than the upload's tail: if the body's bytes were read as the next
        // request's head, `header_read` would answer them with a 408.
        header_read_timeout: Duration::from_millis(300),
        body_read_timeout: Duration::from_secs(10),
        ..ProxyConfig::default()
    };
    let p = proxy(&[backend.url()], core_config(), config).await;
    const HEAD: usize = 100_000;
    const TAIL: usize = 20;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    let head = format!(
        "PUT /up HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\n\r\n",
        HEAD + TAIL
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(&[b'a'; HEAD]).await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(BOUND, async {
        let mut buf = [0u8; 1024];
        while !got.ends_with(b"\r\n\r\nok") {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .unwrap();
    assert!(got.starts_with(b"HTTP/1.1 200"), "early answer: {got:?}");
    // The tail, a byte at a time: well within `body_read`, far beyond `header_read` in all.
    for _ in 0..TAIL {
        s.write_all(b"a").await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_for("the whole upload at the backend", || {
        backend.bodies().contains(&(HEAD + TAIL))
    })
    .await;
    // The same connection then serves the next request, and nothing came in between.
    s.write_all(b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let mut next = Vec::new();
    tokio::time::timeout(BOUND, async {
        let mut buf = [0u8; 1024];
        while !next.ends_with(b"\r\n\r\nok") {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => next.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .unwrap();
    let next = String::from_utf8_lossy(&next);
    assert!(
        next.starts_with("HTTP/1.1 200"),
        "no 408 after the early answer, and the connection lives on: {next:?}"
    );
    assert_eq!(charged(&p), vec![(0, false)], "nothing charged");
}
