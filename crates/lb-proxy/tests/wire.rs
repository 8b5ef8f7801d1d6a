//! What crosses the wire, byte for byte: crafted requests from raw TCP and HTTP/2 clients,
//! and a backend that records the raw bytes it receives (SPEC "Behaviour on the wire":
//! framing and routing headers are never ambiguous).

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use lb_core::select::{AnySelect, StrategyKind};
use lb_core::{Balancer, Outcome, Weight};
use lb_proxy::{HashKey, Observer, Proxy, ProxyConfig, Routes, Target};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Generous bound for anything a test waits on.
const WAIT: Duration = Duration::from_secs(10);

const OK: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";

/// A backend on 127.0.0.1 that records every request it receives as raw bytes and answers
/// each with fixed bytes.
struct RawBackend {
    addr: SocketAddr,
    requests: Arc<Mutex<Vec<Vec<u8>>>>,
    connections: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl RawBackend {
    async fn start(response: &'static [u8]) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let (r, c) = (Arc::clone(&requests), Arc::clone(&connections));
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                c.fetch_add(1, Ordering::SeqCst);
                conns.spawn(serve_raw(stream, Arc::clone(&r), response));
            }
        });
        Self {
            addr,
            requests,
            connections,
            task,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request received so far, as text.
    fn received(&self) -> Vec<String> {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .map(|r| String::from_utf8_lossy(r).into_owned())
            .collect()
    }

    /// The one request received: its request line and its header lines, sorted.
    fn only_head(&self) -> (String, Vec<String>) {
        let all = self.received();
        assert_eq!(all.len(), 1, "exactly one request forwarded: {all:?}");
        let head = all[0].split("\r\n\r\n").next().unwrap_or_default();
        let mut lines = head.split("\r\n").map(str::to_owned);
        let first = lines.next().unwrap_or_default();
        let mut headers: Vec<String> = lines.collect();
        headers.sort();
        (first, headers)
    }
}

impl Drop for RawBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The length of a complete chunked body at the start of `b`, if it is all there.
fn chunked_len(b: &[u8]) -> Option<usize> {
    let mut at = 0;
    loop {
        let line = find(&b[at..], b"\r\n")?;
        let size = std::str::from_utf8(&b[at..at + line]).ok()?;
        let size = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
        at += line + 2;
        if size == 0 {
            // No trailers from lb: the empty line ends the body.
            return (b.len() >= at + 2).then_some(at + 2);
        }
        at += size + 2;
        if b.len() < at {
            return None;
        }
    }
}

/// The length of the request (head and body) at the start of `buf`, once it is all there.
fn request_len(buf: &[u8]) -> Option<usize> {
    let head = find(buf, b"\r\n\r\n")? + 4;
    let text = String::from_utf8_lossy(&buf[..head]).to_ascii_lowercase();
    let value = |name: &str| {
        text.split("\r\n")
            .filter_map(|l| l.split_once(':'))
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.trim().to_owned())
    };
    if value("transfer-encoding").is_some() {
        return chunked_len(&buf[head..]).map(|n| head + n);
    }
    let len: usize = value("content-length").map_or(Some(0), |v| v.parse().ok())?;
    (buf.len() >= head + len).then_some(head + len)
}

async fn serve_raw(mut s: TcpStream, requests: Arc<Mutex<Vec<Vec<u8>>>>, response: &[u8]) {
    let mut buf = Vec::new();
    loop {
        while let Some(n) = request_len(&buf) {
            requests.lock().unwrap().push(buf.drain(..n).collect());
            if s.write_all(response).await.is_err() {
                return;
            }
        }
        let mut chunk = [0u8; 8192];
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => {
                if !buf.is_empty() {
                    // Whatever arrived of a request that never completed is recorded too.
                    requests.lock().unwrap().push(std::mem::take(&mut buf));
                }
                return;
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Counts what the proxy charges to backends (`lb_requests_total` is made of these).
/// Also records the answers to heads refused before a request was seen.
#[derive(Default)]
struct Attempts(AtomicUsize, Mutex<Vec<u16>>);

impl Observer for Attempts {
    fn attempt(&self, _: &Target, _: Outcome) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }

    fn refused(&self, status: u16) {
        self.1.lock().unwrap().push(status);
    }
}

struct Lb {
    addr: SocketAddr,
    proxy: Proxy,
    attempts: Arc<Attempts>,
    task: tokio::task::JoinHandle<()>,
}

impl Lb {
    async fn start(backends: &[String]) -> Self {
        let balancer = Arc::new(
            Balancer::new(
                common::core_config(),
                AnySelect::new(StrategyKind::RoundRobin),
            )
            .unwrap(),
        );
        let backends: Vec<(String, Weight)> =
            backends.iter().map(|u| (u.clone(), Weight::ONE)).collect();
        #[allow(clippy::disallowed_methods)]
        let routes = Routes::new(
            balancer,
            &backends,
            HashKey::ClientIp,
            std::time::Instant::now(),
        )
        .unwrap();
        let attempts = Arc::new(Attempts::default());
        let observer: Arc<dyn Observer> = attempts.clone();
        let proxy = Proxy::with_observer(ProxyConfig::default(), routes, observer);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let p = proxy.clone();
        let task = tokio::spawn(async move {
            let _ = p
                .serve(
                    vec![listener],
                    std::future::pending::<()>(),
                    Duration::from_secs(1),
                )
                .await;
        });
        Self {
            addr,
            proxy,
            attempts,
            task,
        }
    }

    fn attempts(&self) -> usize {
        self.attempts.0.load(Ordering::SeqCst)
    }

    fn in_flight(&self) -> u32 {
        #[allow(clippy::disallowed_methods)]
        let now = std::time::Instant::now();
        self.proxy
            .routes()
            .balancer()
            .backends(now)
            .iter()
            .map(|b| b.active_requests)
            .sum()
    }
}

impl Drop for Lb {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Sends `bytes` on a new connection and reads until the proxy closes it. Panics if it does
/// not close within [`WAIT`].
async fn exchange(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    match tokio::time::timeout(WAIT, s.read_to_end(&mut out)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => panic!("read failed: {e}; got {:?}", String::from_utf8_lossy(&out)),
        Err(_) => panic!(
            "connection not closed; got {:?}",
            String::from_utf8_lossy(&out)
        ),
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The status line's code.
fn status(resp: &str) -> &str {
    resp.split(' ').nth(1).unwrap_or("")
}

/// Asserts that `request` got `want` from lb itself, the connection closed, nothing
/// reached the backend, nothing was charged to it, and the next client is served.
async fn assert_rejected(lb: &Lb, backend: &RawBackend, request: &[u8], want: &str) {
    let before = backend.received().len();
    let resp = exchange(lb.addr, request).await;
    let what = String::from_utf8_lossy(request);
    assert_eq!(status(&resp), want, "{what:?} got {resp:?}");
    assert_eq!(
        resp.matches("HTTP/1.1 ").count(),
        1,
        "one response: {resp:?}"
    );
    assert_eq!(
        backend.received().len(),
        before,
        "{what:?} reached the backend: {:?}",
        backend.received()
    );
    assert_eq!(lb.attempts(), 0, "{what:?} was charged to a backend");
    let next = exchange(
        lb.addr,
        b"GET /next HTTP/1.1\r\nHost: next\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status(&next), "200", "{next:?}");
    backend.requests.lock().unwrap().pop();
    lb.attempts.0.store(0, Ordering::SeqCst);
}

fn header_lines(pairs: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = pairs.iter().map(|s| (*s).to_owned()).collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_cannot_strip_host_or_forwarded_headers() {
    let backend = RawBackend::start(OK).await;
    let lb = Lb::start(&[backend.url()]).await;
    let resp = exchange(
        lb.addr,
        b"GET /a HTTP/1.1\r\nHost: app.example\r\nX-Forwarded-For: 10.0.0.1\r\n\
          Connection: close, Host, X-Forwarded-For, X-Forwarded-Host, X-Forwarded-Proto\r\n\r\n",
    )
    .await;
    assert_eq!(status(&resp), "200", "{resp}");
    let (line, headers) = backend.only_head();
    assert_eq!(line, "GET /a HTTP/1.1");
    assert_eq!(
        headers,
        header_lines(&[
            "host: app.example",
            "x-forwarded-for: 10.0.0.1, 127.0.0.1",
            "x-forwarded-proto: http",
            "x-forwarded-host: app.example",
        ])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_1_1_without_one_valid_host_gets_400() {
    let backend = RawBackend::start(OK).await;
    let lb = Lb::start(&[backend.url()]).await;
    for request in [
        &b"GET / HTTP/1.1\r\n\r\n"[..],
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: user@a\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a/b\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: \r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a:b\r\n\r\n",
        b"GET http://a/ HTTP/1.1\r\n\r\n",
        b"GET http://user@a/ HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET a:80 HTTP/1.1\r\nHost: a\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nHost: b\r\nContent-Length: 5\r\n\r\nhello",
    ] {
        assert_rejected(&lb, &backend, request, "400").await;
    }
    assert!(backend.received().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_absolute_form_target_replaces_host() {
    let backend = RawBackend::start(OK).await;
    let lb = Lb::start(&[backend.url()]).await;
    let resp = exchange(
        lb.addr,
        b"GET http://real.example:8080/p?q=1 HTTP/1.1\r\nHost: decoy.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status(&resp), "200", "{resp}");
    let (line, headers) = backend.only_head();
    assert_eq!(line, "GET /p?q=1 HTTP/1.1");
    assert_eq!(
        headers,
        header_lines(&[
            "host: real.example:8080",
            "x-forwarded-for: 127.0.0.1",
            "x-forwarded-proto: http",
            "x-forwarded-host: real.example:8080",
        ])
    );
}

/// Found by lb-fuzz's `http1_head` target: an absolute-form target with an empty path
/// (`http://a`, `http://a#f`) went out with an empty request target, `GET  HTTP/1.1`
/// (RFC 9112 §3.2.1: the origin form of an empty path is `/`). Over HTTP/2, `:path` is
/// never empty, so HTTP/1.1 is the way in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_absolute_form_target_with_an_empty_path_is_sent_as_slash() {
    for (target, line) in [
        ("http://real.example", "GET / HTTP/1.1"),
        ("http://real.example#frag", "GET / HTTP/1.1"),
        ("http://real.example?q=1", "GET /?q=1 HTTP/1.1"),
    ] {
        let backend = RawBackend::start(OK).await;
        let lb = Lb::start(&[backend.url()]).await;
        let request = format!("GET {target} HTTP/1.1\r\nHost: decoy\r\nConnection: close\r\n\r\n");
        let resp = exchange(lb.addr, request.as_bytes()).await;
        assert_eq!(status(&resp), "200", "{target}: {resp}");
        let (got, headers) = backend.only_head();
        assert_eq!(got, line, "{target}");
        assert!(
            headers.contains(&"host: real.example".to_owned()),
            "{target}: {headers:?}"
        );
    }
}

/// An HTTP/2 (prior knowledge) client connection to `addr`.
async fn h2_client(addr: SocketAddr) -> h2::client::SendRequest<Bytes> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// Sends `req` (no body) and returns the status, or the stream error's reason.
async fn h2_send(
    client: &mut h2::client::SendRequest<Bytes>,
    req: http::Request<()>,
) -> Result<u16, h2::Error> {
    let mut ready = client.clone().ready().await?;
    let (resp, _) = ready.send_request(req, true)?;
    let resp = tokio::time::timeout(WAIT, resp)
        .await
        .expect("h2 response")?;
    let status = resp.status().as_u16();
    let mut body = resp.into_body();
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    Ok(status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_http2_authority_wins_userinfo_is_refused_and_cookies_are_joined() {
    let backend = RawBackend::start(OK).await;
    let lb = Lb::start(&[backend.url()]).await;
    let mut h2 = h2_client(lb.addr).await;
    let req = http::Request::get("http://auth.example/c")
        .header("host", "decoy.example")
        .header("cookie", "a=1")
        .header("cookie", "b=2")
        .body(())
        .unwrap();
    assert_eq!(h2_send(&mut h2, req).await.unwrap(), 200);
    let (line, headers) = backend.only_head();
    assert_eq!(line, "GET /c HTTP/1.1");
    assert_eq!(
        headers,
        header_lines(&[
            "host: auth.example",
            "cookie: a=1; b=2",
            "x-forwarded-for: 127.0.0.1",
            "x-forwarded-proto: http",
            "x-forwarded-host: auth.example",
        ])
    );

    let userinfo = http::Request::get("http://user:pw@auth.example/")
        .body(())
        .unwrap();
    assert_eq!(h2_send(&mut h2, userinfo).await.unwrap(), 400);
    assert_eq!(backend.received().len(), 1, "not forwarded");
    assert_eq!(lb.attempts(), 1, "only the good request was charged");
    // The connection goes on serving.
    let again = http::Request::get("http://auth.example/again")
        .body(())
        .unwrap();
    assert_eq!(h2_send(&mut h2, again).await.unwrap(), 200);
    assert_eq!(backend.received().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn look_alikes_of_framing_and_forwarding_headers_are_dropped() {
    let backend = RawBackend::start(OK).await;
    let lb = Lb::start(&[backend.url()]).await;
    let resp = exchange(
        lb.addr,
        b"POST /u HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent_Length: 50\r\n\
          Transfer_Encoding: chunked\r\nX_Forwarded_For: 6.6.6.6\r\nX-Forwarded_Proto: https\r\n\
          X_Forwarded_Host: evil\r\nX_Other_Thing: kept\r\nConnection: close\r\n\r\nhello",
    )
    .await;
    assert_eq!(status(&resp), "200", "{resp}");
    let received = backend.received();
    assert_eq!(received.len(), 1);
    assert!(received[0].ends_with("\r\n\r\nhello"), "{received:?}");
    let (line, headers) = backend.only_head();
    assert_eq!(line, "POST /u HTTP/1.1");
    assert_eq!(
        headers,
        header_lines(&[
            "host: a",
            "content-length: 5",
            "x_other_thing: kept",
            "x-forwarded-for: 127.0.0.1",
            "x-forwarded-proto: http",
            "x-forwarded-host: a",
        ])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambiguous_or_unsupported_framing_is_refused_and_never_forwarded() {
    let backend = RawBackend::start(OK).await;
    let lb = Lb::start(&[backend.url()]).await;
    let post = |framing: &str, body: &str| {
        format!("POST / HTTP/1.1\r\nHost: a\r\n{framing}\r\n\r\n{body}").into_bytes()
    };
    let chunked_body = "5\r\nhello\r\n0\r\n\r\n";
    for (framing, body, want) in [
        ("Transfer-Encoding: gzip, chunked", chunked_body, "501"),
        (
            "Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked",
            chunked_body,
            "501",
        ),
        ("Transfer-Encoding: chunked, chunked", chunked_body, "400"),
        (
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked",
            chunked_body,
            "400",
        ),
        ("Transfer-Encoding: gzip", "hello", "400"),
        ("Content-Length: 5\r\nContent-Length: 6", "hello!", "400"),
        ("Content-Length: 5, 6", "hello!", "400"),
        ("Content-Length: +5", "hello", "400"),
        ("Content-Length: -5", "hello", "400"),
        ("Content-Length: 0x5", "hello", "400"),
        ("Content-Length: 5 5", "hello", "400"),
        ("Content-Length: 18446744073709551616", "hello", "400"),
        ("Content-Length: 18446744073709551615", "hello", "400"),
        ("Content-Length: 18446744073709551614", "hello", "400"),
    ] {
        assert_rejected(&lb, &backend, &post(framing, body), want).await;
    }
    // Too many headers is still what 431 means, a huge Content-Length or not.
    let many: String = (0..120).map(|i| format!("X-{i}: 1\r\n")).collect();
    let many = format!("Content-Length: 18446744073709551615\r\n{many}");
    assert_rejected(&lb, &backend, &post(many.trim_end(), "hello"), "431").await;
    assert!(backend.received().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_gets_405_and_nothing_is_forwarded() {
    let backend = RawBackend::start(OK).await;
    let lb = Lb::start(&[backend.url()]).await;
    let resp = exchange(
        lb.addr,
        b"CONNECT backend.example:443 HTTP/1.1\r\nHost: backend.example:443\r\n\r\n",
    )
    .await;
    assert_eq!(status(&resp), "405", "{resp}");
    assert!(resp.to_ascii_lowercase().contains("\r\nallow: "), "{resp}");
    assert!(backend.received().is_empty());
    assert_eq!(lb.attempts(), 0);
    assert_eq!(backend.connections.load(Ordering::SeqCst), 0);

    let mut h2 = h2_client(lb.addr).await;
    let connect = http::Request::connect("backend.example:443")
        .body(())
        .unwrap();
    assert_eq!(h2_send(&mut h2, connect).await.unwrap(), 405);
    assert!(backend.received().is_empty());
    assert_eq!(lb.attempts(), 0);
    assert_eq!(lb.in_flight(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2c_upgrade_is_never_forwarded() {
    // A backend that would take the offer: if lb forwarded it, the client would get a 101.
    let backend = RawBackend::start(
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n",
    )
    .await;
    let lb = Lb::start(&[backend.url()]).await;
    let resp = exchange(
        lb.addr,
        b"GET /h HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings, close\r\n\
          Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n",
    )
    .await;
    // The backend's 101 to a request that offered no upgrade cannot be relayed.
    assert_eq!(status(&resp), "502", "{resp}");
    let (line, headers) = backend.only_head();
    assert_eq!(line, "GET /h HTTP/1.1");
    assert_eq!(
        headers,
        header_lines(&[
            "host: a",
            "x-forwarded-for: 127.0.0.1",
            "x-forwarded-proto: http",
            "x-forwarded-host: a",
        ]),
        "no Upgrade, no HTTP2-Settings"
    );

    // Nor its drafts, nor `h2` (TLS only), nor an offer on a second line.
    for upgrade in [
        "Upgrade: h2c-14",
        "Upgrade: H2",
        "Upgrade: H2C",
        "Upgrade: h2c\r\nUpgrade: h2",
    ] {
        let before = backend.received().len();
        let request = format!(
            "GET /d HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, close\r\n{upgrade}\r\n\r\n"
        );
        let resp = exchange(lb.addr, request.as_bytes()).await;
        assert_eq!(status(&resp), "502", "{upgrade}: {resp}");
        let received = backend.received();
        assert_eq!(received.len(), before + 1, "{upgrade}");
        assert_eq!(
            received[before],
            "GET /d HTTP/1.1\r\nhost: a\r\nx-forwarded-for: 127.0.0.1\r\n\
             x-forwarded-proto: http\r\nx-forwarded-host: a\r\n\r\n",
            "{upgrade}"
        );
    }

    // A normal backend: the request goes on as plain HTTP/1.1.
    let plain = RawBackend::start(OK).await;
    let lb = Lb::start(&[plain.url()]).await;
    let resp = exchange(
        lb.addr,
        b"GET /h HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings, close\r\n\
          Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n",
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 200 OK\r\n"), "{resp}");
    assert!(resp.ends_with("\r\n\r\nok"), "{resp}");
    let (_, headers) = plain.only_head();
    assert!(
        !headers
            .iter()
            .any(|h| h.starts_with("upgrade") || h.starts_with("http2-settings")),
        "{headers:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_offer_beside_h2c_still_upgrades() {
    let backend = RawBackend::start(
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    )
    .await;
    let lb = Lb::start(&[backend.url()]).await;
    let mut s = TcpStream::connect(lb.addr).await.unwrap();
    s.write_all(
        b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: h2c, websocket\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    while find(&head, b"\r\n\r\n").is_none() {
        let mut b = [0u8; 256];
        let n = tokio::time::timeout(WAIT, s.read(&mut b))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "closed: {:?}", String::from_utf8_lossy(&head));
        head.extend_from_slice(&b[..n]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    let (_, headers) = backend.only_head();
    assert!(
        headers.contains(&"upgrade: websocket".to_owned()),
        "{headers:?}"
    );
}

/// Decodes a chunked body (test input only: well-formed, no trailers).
fn dechunk(mut b: &str) -> String {
    let mut out = String::new();
    loop {
        let (size, rest) = b.split_once("\r\n").expect("chunk size line");
        let size = usize::from_str_radix(size.trim(), 16).expect("hex chunk size");
        if size == 0 {
            return out;
        }
        out.push_str(&rest[..size]);
        b = &rest[size + 2..];
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_with_content_length_and_transfer_encoding_is_framed_by_the_latter() {
    let backend = RawBackend::start(
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\nX-From: backend\r\n\r\n\
          5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
    )
    .await;
    let lb = Lb::start(&[backend.url()]).await;
    let resp = exchange(
        lb.addr,
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await;
    let (head, body) = resp.split_once("\r\n\r\n").unwrap();
    let head = head.to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200 ok\r\n"), "{resp}");
    assert!(head.contains("\r\nx-from: backend"), "{resp}");
    assert!(!head.contains("content-length"), "{resp}");
    assert!(head.contains("\r\ntransfer-encoding: chunked"), "{resp}");
    assert_eq!(dechunk(body), "hello world");

    let h2 = h2_client(lb.addr).await;
    let mut ready = h2.clone().ready().await.unwrap();
    let (resp, _) = ready
        .send_request(http::Request::get("http://a/").body(()).unwrap(), true)
        .unwrap();
    let resp = tokio::time::timeout(WAIT, resp).await.unwrap().unwrap();
    assert_eq!(resp.status(), 200);
    assert!(!resp.headers().contains_key("content-length"), "{resp:?}");
    let mut body = resp.into_body();
    let mut got = Vec::new();
    while let Some(chunk) = tokio::time::timeout(WAIT, body.data()).await.unwrap() {
        let chunk = chunk.expect("a well-formed HTTP/2 body");
        let _ = body.flow_control().release_capacity(chunk.len());
        got.extend_from_slice(&chunk);
    }
    assert_eq!(got, b"hello world");
    drop(h2);
    assert_eq!(backend.received().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_content_length_on_a_kept_alive_connection_gets_400() {
    let backend = RawBackend::start(OK).await;
    let lb = Lb::start(&[backend.url()]).await;
    let mut s = TcpStream::connect(lb.addr).await.unwrap();
    s.write_all(b"GET /first HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let mut first = Vec::new();
    while !first.ends_with(b"\r\n\r\nok") {
        let mut b = [0u8; 512];
        let n = tokio::time::timeout(WAIT, s.read(&mut b))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "closed: {:?}", String::from_utf8_lossy(&first));
        first.extend_from_slice(&b[..n]);
    }
    s.write_all(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 18446744073709551615\r\n\r\nhi")
        .await
        .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut out))
        .await
        .expect("closed after the 400")
        .unwrap();
    let out = String::from_utf8_lossy(&out);
    assert!(out.starts_with("HTTP/1.1 400 "), "{out}");
    assert_eq!(backend.received().len(), 1, "only the first request");
    assert_eq!(lb.attempts(), 1);
}

/// A backend that answers each request with a 103, then waits for `go` before the final
/// response: a client that sees the 103 before it lets the backend go got it early.
async fn early_hints_backend(
    go: Arc<tokio::sync::Semaphore>,
) -> (String, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        while let Ok((mut s, _)) = listener.accept().await {
            let go = Arc::clone(&go);
            conns.spawn(async move {
                let mut buf = Vec::new();
                loop {
                    while let Some(n) = request_len(&buf) {
                        buf.drain(..n);
                        let hint =
                            b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n";
                        if s.write_all(hint).await.is_err() {
                            return;
                        }
                        let Ok(permit) = go.acquire().await else {
                            return;
                        };
                        permit.forget();
                        if s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfinal")
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                    let mut chunk = [0u8; 4096];
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
            });
        }
    });
    (url, task)
}

/// Reads from `s` until `out` holds `want` (bounded by [`WAIT`]).
async fn read_until(s: &mut TcpStream, out: &mut Vec<u8>, want: &[u8]) {
    while find(out, want).is_none() {
        let mut b = [0u8; 1024];
        let n = tokio::time::timeout(WAIT, s.read(&mut b))
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "waiting for {:?}, got {:?}",
                    String::from_utf8_lossy(want),
                    String::from_utf8_lossy(out)
                )
            })
            .unwrap();
        assert!(n > 0, "closed; got {:?}", String::from_utf8_lossy(out));
        out.extend_from_slice(&b[..n]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_hints_reach_an_http_1_1_client_before_the_response() {
    let go = Arc::new(tokio::sync::Semaphore::new(0));
    let (url, task) = early_hints_backend(Arc::clone(&go)).await;
    let lb = Lb::start(&[url]).await;
    let mut s = TcpStream::connect(lb.addr).await.unwrap();
    for path in ["/one", "/two"] {
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: a\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut out = Vec::new();
        // The backend holds its final response until the hint has reached the client.
        read_until(&mut s, &mut out, b"\r\n\r\n").await;
        let hint = String::from_utf8_lossy(&out).into_owned();
        assert_eq!(
            hint.to_ascii_lowercase(),
            "http/1.1 103 early hints\r\nlink: </style.css>; rel=preload\r\n\r\n",
            "{hint:?}"
        );
        go.add_permits(1);
        out.clear();
        read_until(&mut s, &mut out, b"final").await;
        let resp = String::from_utf8_lossy(&out);
        assert!(resp.starts_with("HTTP/1.1 200 OK\r\n"), "{resp:?}");
        assert!(resp.ends_with("\r\n\r\nfinal"), "{resp:?}");
    }
    drop(s);

    // HTTP/1.0 clients never get a 1xx (RFC 9110 §15.2): just the response.
    go.add_permits(1);
    let resp = exchange(lb.addr, b"GET /old HTTP/1.0\r\nHost: a\r\n\r\n").await;
    assert!(resp.starts_with("HTTP/1.0 200 OK\r\n"), "{resp:?}");
    assert!(!resp.contains("103"), "{resp:?}");

    // hyper's HTTP/2 server cannot send a 1xx: the client gets the response, unharmed.
    go.add_permits(1);
    let mut h2 = h2_client(lb.addr).await;
    let req = http::Request::get("http://a/h2").body(()).unwrap();
    assert_eq!(h2_send(&mut h2, req).await.unwrap(), 200);
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_framed_two_ways_is_forwarded_one_way_and_its_connection_closed() {
    let backend = RawBackend::start(OK).await;
    let lb = Lb::start(&[backend.url()]).await;
    // Transfer-Encoding wins over Content-Length (RFC 9112 §6.3), and the connection,
    // whose next request would start wherever the other reading ends, is closed.
    let resp = exchange(
        lb.addr,
        b"POST /te HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n\
          5\r\nhello\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n",
    )
    .await;
    assert_eq!(resp.matches("HTTP/1.1 ").count(), 1, "{resp:?}");
    assert_eq!(status(&resp), "200", "{resp:?}");
    // Two equal Content-Lengths are one.
    let resp = exchange(
        lb.addr,
        b"POST /cl HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
    )
    .await;
    assert_eq!(status(&resp), "200", "{resp:?}");
    let received = backend.received();
    assert_eq!(received.len(), 2, "{received:?}");
    for r in &received {
        let (head, body) = r.split_once("\r\n\r\n").unwrap();
        let head = head.to_ascii_lowercase();
        let framing = head.matches("\r\ncontent-length: ").count()
            + head.matches("\r\ntransfer-encoding: ").count();
        assert_eq!(framing, 1, "one framing header: {r:?}");
        let body = if head.contains("transfer-encoding: chunked") {
            dechunk(body)
        } else {
            body.to_owned()
        };
        assert_eq!(body, "hello", "{r:?}");
    }
    assert!(!received.iter().any(|r| r.contains("/smuggled")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_or_upgrade_not_visible_ascii_is_refused() {
    // A backend that would take any offer: were one forwarded, the client would get a tunnel.
    let backend = RawBackend::start(
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n",
    )
    .await;
    let lb = Lb::start(&[backend.url()]).await;
    for request in [
        &b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: h2c, \x80\r\n\r\n"[..],
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: h2c\x80\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, \xff\r\nUpgrade: h2c\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: x-secret, \xff\r\nX-Secret: 1\r\n\r\n",
    ] {
        assert_rejected_by(&lb, &backend, request, "400").await;
    }
    assert!(backend.received().is_empty());
}

/// As [`assert_rejected`], for a backend whose own answer is not a 200: the next client
/// is served by a request that reaches the backend, whatever it answers.
async fn assert_rejected_by(lb: &Lb, backend: &RawBackend, request: &[u8], want: &str) {
    let before = backend.received().len();
    let resp = exchange(lb.addr, request).await;
    let what = String::from_utf8_lossy(request);
    assert_eq!(status(&resp), want, "{what:?} got {resp:?}");
    assert_eq!(
        resp.matches("HTTP/1.1 ").count(),
        1,
        "one response: {resp:?}"
    );
    assert_eq!(
        backend.received().len(),
        before,
        "{what:?} reached the backend: {:?}",
        backend.received()
    );
    assert_eq!(lb.attempts(), 0, "{what:?} was charged to a backend");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_101_to_a_protocol_the_client_did_not_offer_gets_502() {
    let backend = RawBackend::start(
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n",
    )
    .await;
    let lb = Lb::start(&[backend.url()]).await;
    let resp = exchange(
        lb.addr,
        b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, close\r\nUpgrade: websocket\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 502 "), "{resp}");
    assert_eq!(resp.matches("HTTP/1.1 ").count(), 1, "{resp}");
    let (line, headers) = backend.only_head();
    assert_eq!(line, "GET /ws HTTP/1.1");
    assert_eq!(
        headers,
        header_lines(&[
            "host: a",
            "connection: upgrade",
            "upgrade: websocket",
            "sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==",
            "sec-websocket-version: 13",
            "x-forwarded-for: 127.0.0.1",
            "x-forwarded-proto: http",
            "x-forwarded-host: a",
        ])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_with_a_transfer_coding_other_than_chunked_gets_502() {
    for response in [
        &b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"[..],
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n\
          5\r\nhello\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nhello",
    ] {
        let backend = RawBackend::start(response).await;
        let lb = Lb::start(&[backend.url()]).await;
        let resp = exchange(
            lb.addr,
            b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi",
        )
        .await;
        let what = String::from_utf8_lossy(response);
        assert!(resp.starts_with("HTTP/1.1 502 "), "{what:?}: {resp}");
        assert!(!resp.contains("hello"), "{what:?}: {resp}");
        // Sent once, never replayed: the POST reached the backend exactly as the client sent it.
        let received = backend.received();
        assert_eq!(
            received,
            ["POST /p HTTP/1.1\r\nhost: a\r\ncontent-length: 2\r\nx-forwarded-for: 127.0.0.1\r\n\
              x-forwarded-proto: http\r\nx-forwarded-host: a\r\n\r\nhi"],
            "{what:?}"
        );
        assert_eq!(lb.attempts(), 1, "{what:?}");
    }
}

/// Sends `req` with `body` over HTTP/2 and returns the status, or the stream error.
async fn h2_send_body(
    client: &mut h2::client::SendRequest<Bytes>,
    req: http::Request<()>,
    body: &'static [u8],
) -> Result<u16, h2::Error> {
    let mut ready = client.clone().ready().await?;
    let (resp, mut stream) = ready.send_request(req, false)?;
    // lb may refuse on the head alone and end the stream before the body goes out: the send
    // then fails ("inactive stream") and the answer is still there to read.
    let _ = stream.send_data(Bytes::from_static(body), true);
    let resp = tokio::time::timeout(WAIT, resp)
        .await
        .expect("h2 response")?;
    let status = resp.status().as_u16();
    let mut body = resp.into_body();
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    Ok(status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_http2_repeated_lengths_collapse_and_padded_values_are_refused() {
    let backend = RawBackend::start(OK).await;
    let lb = Lb::start(&[backend.url()]).await;
    let mut h2 = h2_client(lb.addr).await;
    let post = |lengths: &[&'static str], extra: Option<&'static str>| {
        let mut b = http::Request::post("http://a/p");
        for l in lengths {
            b = b.header("content-length", *l);
        }
        if let Some(v) = extra {
            b = b.header("x-a", v);
        }
        b.body(()).unwrap()
    };
    let ok = h2_send_body(&mut h2, post(&["3", "3"], None), b"abc").await;
    assert_eq!(ok.unwrap(), 200);
    assert_eq!(
        backend.received(),
        [
            "POST /p HTTP/1.1\r\ncontent-length: 3\r\nhost: a\r\nx-forwarded-for: 127.0.0.1\r\n\
          x-forwarded-proto: http\r\nx-forwarded-host: a\r\n\r\nabc"
        ]
    );
    for (lengths, extra) in [
        (&["3", "4"][..], None),
        (&["3"], Some(" 1")),
        (&["3"], Some("1 ")),
        (&["3"], Some("1\t")),
    ] {
        let got = h2_send_body(&mut h2, post(lengths, extra), b"abc").await;
        match got {
            Ok(status) => assert_eq!(status, 400, "{lengths:?} {extra:?}"),
            // h2 itself resets a stream whose lengths differ (its body cannot match both).
            Err(e) => assert!(
                lengths.len() > 1 && e.reason() == Some(h2::Reason::PROTOCOL_ERROR),
                "{lengths:?} {extra:?}: {e}"
            ),
        }
        assert_eq!(
            backend.received().len(),
            1,
            "{lengths:?} {extra:?} forwarded"
        );
    }
    assert_eq!(lb.attempts(), 1);
    let again = h2_send_body(&mut h2, post(&["3"], Some("1 2")), b"xyz").await;
    assert_eq!(again.unwrap(), 200);
    assert_eq!(backend.received().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asterisk_form_is_forwarded_for_options_only() {
    let backend = RawBackend::start(OK).await;
    let lb = Lb::start(&[backend.url()]).await;
    for request in [
        &b"GET * HTTP/1.1\r\nHost: a\r\n\r\n"[..],
        b"HEAD * HTTP/1.1\r\nHost: a\r\n\r\n",
        b"POST * HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi",
        b"PRI * HTTP/1.1\r\nHost: a\r\n\r\n",
    ] {
        assert_rejected(&lb, &backend, request, "400").await;
    }
    assert!(backend.received().is_empty());
    let resp = exchange(
        lb.addr,
        b"OPTIONS * HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status(&resp), "200", "{resp}");
    let (line, headers) = backend.only_head();
    assert_eq!(line, "OPTIONS * HTTP/1.1");
    assert_eq!(
        headers,
        header_lines(&[
            "host: a",
            "x-forwarded-for: 127.0.0.1",
            "x-forwarded-proto: http",
            "x-forwarded-host: a",
        ])
    );

    let mut h2 = h2_client(lb.addr).await;
    let asterisk = |method| {
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(http::uri::Scheme::HTTP);
        parts.authority = Some(http::uri::Authority::from_static("a"));
        parts.path_and_query = Some(http::uri::PathAndQuery::from_static("*"));
        http::Request::builder()
            .method(method)
            .uri(http::Uri::from_parts(parts).unwrap())
            .body(())
            .unwrap()
    };
    assert_eq!(h2_send(&mut h2, asterisk("GET")).await.unwrap(), 400);
    assert_eq!(backend.received().len(), 1, "GET * not forwarded");
    assert_eq!(h2_send(&mut h2, asterisk("OPTIONS")).await.unwrap(), 200);
    let received = backend.received();
    assert_eq!(received.len(), 2);
    assert!(
        received[1].starts_with("OPTIONS * HTTP/1.1\r\n"),
        "{received:?}"
    );
    assert_eq!(lb.attempts(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_beyond_65535_gets_400() {
    let backend = RawBackend::start(OK).await;
    let lb = Lb::start(&[backend.url()]).await;
    for request in [
        &b"GET / HTTP/1.1\r\nHost: a:99999\r\n\r\n"[..],
        b"GET / HTTP/1.1\r\nHost: a:65536\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a:999999999999999999999999\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: [::1]:99999\r\n\r\n",
        b"GET http://real:99999/p HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET http://real/p HTTP/1.1\r\nHost: a:99999\r\n\r\n",
    ] {
        assert_rejected(&lb, &backend, request, "400").await;
    }
    assert!(backend.received().is_empty());

    let mut h2 = h2_client(lb.addr).await;
    let get = |uri: &str| http::Request::get(uri).body(()).unwrap();
    assert_eq!(h2_send(&mut h2, get("http://a:99999/")).await.unwrap(), 400);
    assert!(backend.received().is_empty());

    // Up to 65535, and an empty port (the scheme's default), are forwarded as sent.
    let resp = exchange(
        lb.addr,
        b"GET / HTTP/1.1\r\nHost: a:65535\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status(&resp), "200", "{resp}");
    assert_eq!(h2_send(&mut h2, get("http://a:/")).await.unwrap(), 200);
    let received = backend.received();
    assert_eq!(received.len(), 2);
    assert!(
        received[0].contains("\r\nhost: a:65535\r\n"),
        "{received:?}"
    );
    assert!(received[1].contains("\r\nhost: a:\r\n"), "{received:?}");
}

/// Waits (bounded) until the observer has been told of `n` refused heads, and returns them.
async fn refusals(lb: &Lb, n: usize) -> Vec<u16> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let got = lb.attempts.1.lock().unwrap().clone();
        if got.len() >= n || tokio::time::Instant::now() > deadline {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_hyper_gives_before_a_request_are_reported() {
    let backend = RawBackend::start(OK).await;
    let lb = Lb::start(&[backend.url()]).await;
    let huge = format!(
        "GET / HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n",
        "x".repeat(ProxyConfig::default().max_header_bytes)
    );
    let cases: [(&[u8], &str); 4] = [
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: x\r\n\r\n",
            "400",
        ),
        (b"GET / HTTP/9.9\r\nHost: a\r\n\r\n", "400"),
        (huge.as_bytes(), "431"),
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 18446744073709551615\r\n\r\n",
            "400",
        ),
    ];
    let mut want = Vec::new();
    for (request, status_want) in cases {
        let resp = exchange(lb.addr, request).await;
        assert_eq!(status(&resp), status_want, "{resp}");
        want.push(status_want.parse::<u16>().unwrap());
        assert_eq!(refusals(&lb, want.len()).await, want);
    }
    // What lb answers itself, or forwards, is reported as a completed request instead.
    let rejected = exchange(lb.addr, b"GET / HTTP/1.1\r\nHost: a:99999\r\n\r\n").await;
    assert_eq!(status(&rejected), "400");
    let ok = exchange(
        lb.addr,
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status(&ok), "200");
    assert!(backend.received().len() == 1, "{:?}", backend.received());
    // One more refused head: a wrong report of the two above would show before or beside it.
    let last = exchange(lb.addr, b"GET / HTTP/1.1\r\nHost: a\r\nX: \x01\r\n\r\n").await;
    assert_eq!(status(&last), "400", "{last}");
    want.push(400);
    assert_eq!(refusals(&lb, want.len()).await, want);
}

/// Review 11b: requests pipelined behind the first one, in the connection's first read (now
/// up to 4 KiB, replayed to hyper from `ClientIo`'s prefix), are each answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_pipelined_in_the_first_read_are_all_answered() {
    let backend = RawBackend::start(OK).await;
    let lb = Lb::start(&[backend.url()]).await;
    let resp = exchange(
        lb.addr,
        b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\n\r\nGET /3 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(resp.matches("HTTP/1.1 200 ").count(), 3, "{resp}");
    assert_eq!(backend.received().len(), 3);
}

/// Review 11b: a Content-Length beyond hyper's range gets 400 (SPEC: a malformed length), not
/// hyper's 431, also when its request is pipelined behind another in the first read.
///
/// Known, and older than the 4 KiB first read (it fails the same way before it): a request
/// hyper parses from its buffer, without a read, is answered while the connection is idle,
/// and `HeadCopy` (which corrects the 431) was cleared when the first request moved on.
/// The client still gets a 4xx and the backend nothing; the code is wrong.
#[ignore = "known: a pipelined head hyper parses from its buffer is not corrected (see the comment)"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_content_length_pipelined_in_the_first_read_gets_400() {
    let backend = RawBackend::start(OK).await;
    let lb = Lb::start(&[backend.url()]).await;
    let resp = exchange(
        lb.addr,
        b"GET /first HTTP/1.1\r\nHost: a\r\n\r\nPOST / HTTP/1.1\r\nHost: a\r\nContent-Length: 18446744073709551615\r\n\r\nhi",
    )
    .await;
    let second = resp.split("HTTP/1.1 ").nth(2).unwrap_or("");
    assert!(second.starts_with("400 "), "{resp}");
    assert_eq!(backend.received().len(), 1, "only the first request");
}
