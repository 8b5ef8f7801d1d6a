//! Every "Behaviour on the wire" bullet of SPEC.md, through real sockets on 127.0.0.1.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use lb_proxy::ProxyConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_is_exact_through_the_proxy_and_connections_are_pooled() {
    let backends = [
        Backend::ok("a").await,
        Backend::ok("b").await,
        Backend::ok("c").await,
    ];
    let urls: Vec<String> = backends.iter().map(Backend::url).collect();
    let p = proxy(&urls, core_config(), ProxyConfig::default()).await;
    let mut bodies = HashMap::new();
    for _ in 0..30 {
        let (status, body) = get(&p.url("/")).await;
        assert_eq!(status, 200);
        *bodies.entry(body).or_insert(0) += 1;
    }
    assert_eq!(
        bodies,
        HashMap::from([("a".into(), 10), ("b".into(), 10), ("c".into(), 10)])
    );
    for b in &backends {
        assert_eq!(b.count(), 10);
        assert!(
            b.connections.load(Ordering::SeqCst) <= 2,
            "kept-alive upstream connections are reused"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_killed_mid_load_costs_no_get() {
    let backends = [
        Backend::ok("a").await,
        Backend::ok("b").await,
        Backend::ok("c").await,
    ];
    let urls: Vec<String> = backends.iter().map(Backend::url).collect();
    let p = Arc::new(proxy(&urls, core_config(), ProxyConfig::default()).await);
    let done = Arc::new(AtomicUsize::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let (p, done) = (p.clone(), done.clone());
        workers.spawn(async move {
            let client = client();
            let mut failures = 0;
            for _ in 0..60 {
                match client.get(p.url("/").parse().unwrap()).await {
                    Ok(r) if r.status() == 200 => {
                        let _ = r.into_body().collect().await;
                    }
                    _ => failures += 1,
                }
                done.fetch_add(1, Ordering::SeqCst);
            }
            failures
        });
    }
    wait_for("a third of the load", || done.load(Ordering::SeqCst) >= 160).await;
    backends[1].kill();
    let mut failures = 0;
    while let Some(f) = workers.join_next().await {
        failures += f.unwrap();
    }
    assert_eq!(failures, 0, "no client-visible GET failure");
    assert_eq!(p.active(), 0);
}

/// A backend that reads the request, then resets the connection without answering.
async fn resetting_backend() -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen = Arc::new(AtomicUsize::new(0));
    let s = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                continue;
            };
            let s = s.clone();
            tokio::spawn(async move {
                // Until the whole head is in (however slowly a busy machine delivers it), so
                // that the request was sent before the reset; the bound only ends a silent peer.
                let mut buf = vec![0u8; 65536];
                let mut len = 0;
                let head = async {
                    while !buf[..len].windows(4).any(|w| w == b"\r\n\r\n") && len < buf.len() {
                        match sock.read(&mut buf[len..]).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => len += n,
                        }
                    }
                };
                let _ = tokio::time::timeout(Duration::from_secs(10), head).await;
                s.fetch_add(1, Ordering::SeqCst);
                let _ = socket2::SockRef::from(&sock).set_linger(Some(Duration::ZERO));
            });
        }
    });
    (url, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sent_post_is_never_replayed_but_a_get_is_retried() {
    let (reset_url, reset_seen) = resetting_backend().await;
    let good = Backend::ok("good").await;
    let p = proxy(
        &[reset_url, good.url()],
        core_config(),
        ProxyConfig::default(),
    )
    .await;
    let req = Request::post(p.url("/pay"))
        .body(full("{\"amount\":1}"))
        .unwrap();
    let resp = client().request(req).await.unwrap();
    assert_eq!(resp.status(), 502);
    assert_eq!(reset_seen.load(Ordering::SeqCst), 1);
    assert_eq!(good.count(), 0, "the other backend never sees the POST");
    // The next request starts on the good backend (round robin); the one after on the
    // resetting one, and as a GET it is retried elsewhere. (A reset on a fresh connection is
    // the backend's doing, not a keep-alive race: no second try there.)
    assert_eq!(get(&p.url("/")).await, (200, "good".into()));
    assert_eq!(get(&p.url("/")).await, (200, "good".into()));
    assert_eq!(reset_seen.load(Ordering::SeqCst), 2);
    assert_eq!(good.count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_backend_503_refused_502_silent_504_and_5xx_passes_through() {
    let t = tokio::time::Instant::now();
    let p = proxy(&[], core_config(), ProxyConfig::default()).await;
    assert_eq!(get(&p.url("/")).await.0, 503);
    // At once: not after any of the timeouts (30 s by default) a waiting design would hit.
    assert!(t.elapsed() < Duration::from_secs(10), "503 at once");

    let p = proxy(
        &[closed_port().await, closed_port().await],
        core_config(),
        ProxyConfig::default(),
    )
    .await;
    assert_eq!(get(&p.url("/")).await.0, 502);

    // A backend that accepts and never answers: 504 after the attempt timeout.
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_url = format!("http://{}", silent.local_addr().unwrap());
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    let core = core_config();
    let retry = core
        .retry()
        .with_attempt_timeout(Duration::from_millis(300))
        .with_attempts(1);
    let core = core.with_retry(retry);
    let p = proxy(&[silent_url], core, ProxyConfig::default()).await;
    let t = tokio::time::Instant::now();
    assert_eq!(get(&p.url("/")).await.0, 504);
    let took = t.elapsed();
    // From the attempt timeout, not from any 30 s default.
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(20),
        "{took:?}"
    );
    hold.abort();

    let failing = Backend::start(Arc::new(|_| {
        Box::pin(async {
            let mut r = Response::new(full("busy"));
            *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            r.headers_mut().insert("x-from", "backend".parse().unwrap());
            r
        })
    }))
    .await;
    let other = Backend::ok("other").await;
    let p = proxy(
        &[failing.url(), other.url()],
        core_config(),
        ProxyConfig::default(),
    )
    .await;
    let resp = client().get(p.url("/").parse().unwrap()).await.unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["x-from"], "backend");
    assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), "busy");
    assert_eq!(other.count(), 0, "a 5xx is relayed, not retried");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_headers_once_even_when_retried_and_hop_by_hop_removed() {
    let echo = Backend::ok("echo").await;
    // The first backend refuses, so the request is retried on the second.
    let p = proxy(
        &[closed_port().await, echo.url()],
        core_config(),
        ProxyConfig::default(),
    )
    .await;
    let req = Request::get(p.url("/x?y=1"))
        .header("host", "app.example")
        .header("x-forwarded-for", "10.9.9.9")
        .header("x-forwarded-proto", "https")
        .header("connection", "x-private")
        .header("x-private", "secret")
        .header("keep-alive", "timeout=5")
        .header("te", "trailers")
        .header("proxy-authorization", "Basic abc")
        .body(full(""))
        .unwrap();
    let resp = client().request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let seen = echo.seen.lock().unwrap()[0].clone();
    let h = &seen.headers;
    assert_eq!(seen.uri, "/x?y=1");
    assert_eq!(h["host"], "app.example");
    assert_eq!(h["x-forwarded-for"], "10.9.9.9, 127.0.0.1");
    assert_eq!(h.get_all("x-forwarded-for").iter().count(), 1);
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["x-forwarded-host"], "app.example");
    for gone in ["x-private", "keep-alive", "te", "proxy-authorization"] {
        assert!(!h.contains_key(gone), "{gone} forwarded");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_sent_events_arrive_as_written() {
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
    let rx = Arc::new(tokio::sync::Mutex::new(Some(rx)));
    let backend = Backend::start(Arc::new(move |_| {
        let rx = rx.clone();
        Box::pin(async move {
            let rx = rx.lock().await.take().expect("one SSE request");
            let mut r = Response::new(ChannelBody(rx).boxed());
            r.headers_mut()
                .insert("content-type", "text/event-stream".parse().unwrap());
            r
        })
    }))
    .await;
    let p = proxy(&[backend.url()], core_config(), ProxyConfig::default()).await;
    tx.send(Bytes::from_static(b"data: one\n\n")).await.unwrap();
    let resp = client()
        .get(p.url("/events").parse().unwrap())
        .await
        .unwrap();
    let mut body = resp.into_body();
    let first = tokio::time::timeout(Duration::from_secs(20), body.frame())
        .await
        .expect("first event before the stream ends");
    assert_eq!(
        first.unwrap().unwrap().into_data().unwrap(),
        "data: one\n\n"
    );
    tx.send(Bytes::from_static(b"data: two\n\n")).await.unwrap();
    let second = tokio::time::timeout(Duration::from_secs(20), body.frame())
        .await
        .unwrap();
    assert_eq!(
        second.unwrap().unwrap().into_data().unwrap(),
        "data: two\n\n"
    );
    drop(tx);
    assert!(body.frame().await.is_none());
    wait_for("request finished", || p.active() == 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrade_echoes_end_to_end() {
    let backend = Backend::start(Arc::new(|mut req: Request<hyper::body::Incoming>| {
        Box::pin(async move {
            assert_eq!(req.headers()["upgrade"], "websocket");
            let on = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                let mut io = hyper_util::rt::TokioIo::new(on.await.unwrap());
                let mut buf = [0u8; 1024];
                loop {
                    match io.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if io.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    }
                }
            });
            Response::builder()
                .status(101)
                .header("connection", "upgrade")
                .header("upgrade", "websocket")
                .header("sec-websocket-accept", "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
                .body(full(""))
                .unwrap()
        })
    }))
    .await;
    let p = proxy(&[backend.url()], core_config(), ProxyConfig::default()).await;
    let mut s = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    s.write_all(b"GET /chat HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.unwrap();
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head).to_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(
        head.contains("upgrade: websocket") && head.contains("sec-websocket-accept"),
        "{head}"
    );
    // A masked text frame "hello", echoed back byte for byte by the backend.
    let frame = [
        0x81u8,
        0x85,
        1,
        2,
        3,
        4,
        b'h' ^ 1,
        b'e' ^ 2,
        b'l' ^ 3,
        b'l' ^ 4,
        b'o' ^ 1,
    ];
    for _ in 0..3 {
        s.write_all(&frame).await.unwrap();
        let mut back = [0u8; 11];
        tokio::time::timeout(Duration::from_secs(20), s.read_exact(&mut back))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(back, frame);
    }
    assert_eq!(p.active(), 1, "an open tunnel is an active request");
    drop(s);
    wait_for("tunnel closed", || p.active() == 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_prior_knowledge() {
    let backend = Backend::ok("over h2").await;
    let p = proxy(&[backend.url()], core_config(), ProxyConfig::default()).await;
    let h2 = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<Body>();
    for _ in 0..3 {
        let resp = h2.get(p.url("/h2").parse().unwrap()).await.unwrap();
        assert_eq!(resp.version(), http::Version::HTTP_2);
        assert_eq!(resp.status(), 200);
        assert_eq!(
            resp.into_body().collect().await.unwrap().to_bytes(),
            "over h2"
        );
    }
    let seen = backend.seen.lock().unwrap()[0].clone();
    assert_eq!(seen.version, http::Version::HTTP_11);
    assert_eq!(
        seen.headers["host"],
        p.addr.to_string(),
        "the :authority becomes Host"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_mid_response_leaves_no_in_flight_count() {
    let backend = Backend::start(Arc::new(|_| {
        Box::pin(async {
            Response::new(Chunks::slow(1000, 16 * 1024, Duration::from_millis(5)).boxed())
        })
    }))
    .await;
    let p = proxy(&[backend.url()], core_config(), ProxyConfig::default()).await;
    let resp = client().get(p.url("/slow").parse().unwrap()).await.unwrap();
    let mut body = resp.into_body();
    let _ = body.frame().await.unwrap().unwrap();
    assert_eq!(p.active(), 1);
    drop(body);
    wait_for("in-flight back to 0", || p.active() == 0).await;
    let now = tokio::time::Instant::now().into_std();
    let status = &p.balancer().backends(now)[0];
    assert_eq!(
        status.failures_total, 0,
        "a client leaving is not the backend's failure"
    );
    assert!(status.healthy && status.ejected_until.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_400_oversized_431_and_the_rest_keep_being_served() {
    let backend = Backend::ok("fine").await;
    let p = proxy(&[backend.url()], core_config(), ProxyConfig::default()).await;
    let bad = raw(
        p.addr,
        b"BLAH\x01 / HTTP/1.1\r\n\r\n",
        Duration::from_secs(2),
    )
    .await;
    assert!(bad.starts_with("HTTP/1.1 400"), "{bad}");
    let big = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(40 * 1024)
    );
    let resp = raw(p.addr, big.as_bytes(), Duration::from_secs(2)).await;
    assert!(resp.starts_with("HTTP/1.1 431"), "{resp}");
    assert_eq!(get(&p.url("/")).await, (200, "fine".into()));
    assert_eq!(backend.count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_request_head_gets_408_and_idle_keep_alive_is_closed() {
    let backend = Backend::ok("fine").await;
    let config = ProxyConfig {
        header_read_timeout: Duration::from_millis(300),
        idle_timeout: Duration::from_secs(1),
        ..ProxyConfig::default()
    };
    let p = proxy(&[backend.url()], core_config(), config).await;
    // Slowloris: half a head, then nothing.
    let resp = raw(
        p.addr,
        b"GET / HTTP/1.1\r\nHost: x\r\n",
        Duration::from_secs(10),
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 408"), "{resp:?}");
    // Nothing at all.
    let resp = raw(p.addr, b"", Duration::from_secs(10)).await;
    assert!(resp.starts_with("HTTP/1.1 408"), "{resp:?}");
    // A keep-alive connection: a request, then idle past the idle timeout: closed quietly.
    let mut s = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    // Well within the idle timeout, a second request on the same connection is fine.
    tokio::time::sleep(Duration::from_millis(100)).await;
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let n = s.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    let t = tokio::time::Instant::now();
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(
        n,
        0,
        "closed without a response: {:?}",
        String::from_utf8_lossy(&buf[..n])
    );
    // Closed by the idle timeout (1 s), not at once; `t` starts a little after the idle
    // clock does, by more on a busy machine, hence the margin.
    assert!(
        t.elapsed() >= Duration::from_millis(500),
        "{:?}",
        t.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_closing_kept_alive_connections_causes_no_client_errors() {
    // Answers, then closes the connection without saying so (no `Connection: close`): the
    // race of a pooled connection closed just as it is reused.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let served = Arc::new(AtomicUsize::new(0));
    let s2 = served.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                continue;
            };
            let s2 = s2.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut len = 0;
                while !buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
                    match sock.read(&mut buf[len..]).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => len += n,
                    }
                }
                let _ = sock
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    .await;
                s2.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(2)).await;
            });
        }
    });
    let p = proxy(&[url], core_config(), ProxyConfig::default()).await;
    let client = client();
    for i in 0..200 {
        let resp = client.get(p.url("/").parse().unwrap()).await.unwrap();
        assert_eq!(resp.status(), 200, "request {i}");
        let _ = resp.into_body().collect().await;
        if i % 3 == 0 {
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
    }
    assert_eq!(served.load(Ordering::SeqCst), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_max_connections_new_connections_wait() {
    let backend = Backend::ok("fine").await;
    let config = ProxyConfig {
        max_connections: 2,
        ..ProxyConfig::default()
    };
    let p = proxy(&[backend.url()], core_config(), config).await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = tokio::net::TcpStream::connect(p.addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 512];
        let n = s.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        held.push(s);
    }
    let third = tokio::spawn({
        let url = p.url("/");
        async move { get(&url).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !third.is_finished(),
        "a third connection waits while two are open"
    );
    held.pop();
    let (status, _) = tokio::time::timeout(Duration::from_secs(20), third)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_lets_in_flight_requests_finish() {
    // The backend answers only when told, so the request is surely in flight at shutdown.
    let release = Arc::new(tokio::sync::Notify::new());
    let r = release.clone();
    let backend = Backend::start(Arc::new(move |_| {
        let r = r.clone();
        Box::pin(async move {
            r.notified().await;
            ok("slow")
        })
    }))
    .await;
    let mut p = proxy(&[backend.url()], core_config(), ProxyConfig::default()).await;
    let inflight = tokio::spawn({
        let url = p.url("/");
        async move { get(&url).await }
    });
    wait_for("the request reached the backend", || backend.count() == 1).await;
    let _ = p.shutdown.take().unwrap().send(());
    let addr = p.addr;
    wait_for("no longer accepting", || {
        std::net::TcpStream::connect(addr).is_err()
    })
    .await;
    assert!(
        !inflight.is_finished(),
        "the in-flight request is not cut off"
    );
    release.notify_one();
    assert_eq!(inflight.await.unwrap(), (200, "slow".into()));
    tokio::time::timeout(Duration::from_secs(5), &mut p.task)
        .await
        .unwrap()
        .unwrap();
    assert!(
        tokio::net::TcpStream::connect(p.addr).await.is_err(),
        "no longer accepting"
    );
}

/// `n` chunks of `size` bytes, optionally one every `every`.
struct Chunks {
    left: usize,
    chunk: Bytes,
    every: Option<Pin<Box<tokio::time::Interval>>>,
}

use std::pin::Pin;
use std::task::{Context, Poll};

impl Chunks {
    fn new(n: usize, size: usize) -> Self {
        Self {
            left: n,
            chunk: Bytes::from(vec![b'x'; size]),
            every: None,
        }
    }

    fn slow(n: usize, size: usize, every: Duration) -> Self {
        Self {
            every: Some(Box::pin(tokio::time::interval(every))),
            ..Self::new(n, size)
        }
    }
}

impl http_body::Body for Chunks {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        if let Some(every) = self.every.as_mut() {
            if every.as_mut().poll_tick(cx).is_pending() {
                return Poll::Pending;
            }
        }
        self.left -= 1;
        Poll::Ready(Some(Ok(http_body::Frame::data(self.chunk.clone()))))
    }
}

/// A body fed by a channel: each message is one frame, as the backend writes it.
struct ChannelBody(tokio::sync::mpsc::Receiver<Bytes>);

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|m| m.map(|b| Ok(http_body::Frame::data(b))))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_over_the_replay_buffer_are_not_retried_once_sent() {
    let (reset_url, reset_seen) = resetting_backend().await;
    let echo = Backend::start(Arc::new(|req: Request<hyper::body::Incoming>| {
        Box::pin(async move {
            let n = req
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes().len())
                .unwrap_or(0);
            Response::new(full(n.to_string()))
        })
    }))
    .await;
    let config = ProxyConfig {
        replay_buffer: 1024,
        ..ProxyConfig::default()
    };
    let p = proxy(&[reset_url.clone(), echo.url()], core_config(), config).await;
    // Over the buffer: streamed to the first backend, which breaks: not replayable, 502.
    let big = Request::put(p.url("/big"))
        .body(full(vec![b'x'; 4096]))
        .unwrap();
    assert_eq!(client().request(big).await.unwrap().status(), 502);
    assert_eq!(echo.count(), 0);
    // Round robin sends the next request to the echo backend; the one after starts on the
    // resetting backend again, and a small PUT is retried with its whole body.
    assert_eq!(get(&p.url("/")).await.0, 200);
    let small = Request::put(p.url("/small"))
        .body(full(vec![b'y'; 512]))
        .unwrap();
    let resp = client().request(small).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), "512");
    assert!(reset_seen.load(Ordering::SeqCst) >= 2);
}
