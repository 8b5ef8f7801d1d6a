//! Connection slots (`limits.max_connections`): a client that never reads its response, an
//! idle WebSocket tunnel or an HTTP/2 client that ignores GOAWAY must not hold one forever.
mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Request, Response};
use lb_proxy::ProxyConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// Every outcome here waits at most this long (the timeouts under test are far shorter).
const BOUND: Duration = Duration::from_secs(20);

fn short(max_connections: usize) -> ProxyConfig {
    ProxyConfig {
        idle_timeout: Duration::from_millis(300),
        header_read_timeout: Duration::from_millis(300),
        body_read_timeout: Duration::from_millis(300),
        max_connections,
        ..ProxyConfig::default()
    }
}

/// A backend answering `/big` with 64 MiB (more than any socket buffer holds), else "ok".
async fn big_backend() -> Backend {
    let big = Bytes::from(vec![b'x'; 64 << 20]);
    Backend::start(Arc::new(move |req: Request<hyper::body::Incoming>| {
        let big = big.clone();
        Box::pin(async move {
            if req.uri().path() == "/big" {
                Response::new(full(big))
            } else {
                ok("ok")
            }
        })
    }))
    .await
}

fn failures(p: &TestProxy) -> u64 {
    #[allow(clippy::disallowed_methods)]
    let now = std::time::Instant::now();
    p.balancer()
        .backends(now)
        .iter()
        .map(|b| b.failures_total)
        .sum()
}

/// A connection with a small receive buffer that asks for `/big` and never reads.
async fn deaf_h1(addr: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut s = socket.connect(addr).await.unwrap();
    s.write_all(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    s
}

/// Reads (and discards) until the peer closes; true if it did within `BOUND`.
async fn closes(s: &mut TcpStream) -> bool {
    let mut buf = vec![0u8; 1 << 16];
    let until = tokio::time::Instant::now() + BOUND;
    loop {
        match tokio::time::timeout_at(until, s.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => {}
            Err(_) => return false,
        }
    }
}

/// Reads (and discards) until the peer resets the connection; false if it closed it with a
/// FIN instead, or neither happened within `BOUND`.
async fn resets(s: &mut TcpStream) -> bool {
    let mut buf = vec![0u8; 1 << 16];
    let until = tokio::time::Instant::now() + BOUND;
    loop {
        match tokio::time::timeout_at(until, s.read(&mut buf)).await {
            Ok(Err(e)) => return e.kind() == std::io::ErrorKind::ConnectionReset,
            Ok(Ok(0)) | Err(_) => return false,
            Ok(Ok(_)) => {}
        }
    }
}

async fn served(p: &TestProxy) -> (u16, String) {
    tokio::time::timeout(BOUND, get(&p.url("/")))
        .await
        .expect("a normal client is served once the slots free")
}

#[tokio::test]
async fn http1_clients_that_never_read_lose_their_slot_uncharged() {
    let backend = big_backend().await;
    let p = proxy(&[backend.url()], core_config(), short(2)).await;
    let mut deaf = vec![deaf_h1(p.addr).await, deaf_h1(p.addr).await];
    wait_for("both requests at the backend", || backend.count() == 2).await;
    // Both slots are taken by clients that stopped reading: the third is served only once
    // the send timeout closes one of them.
    assert_eq!(served(&p).await, (200, "ok".to_owned()));
    for s in &mut deaf {
        // A reset: a FIN would wait in the kernel behind the unread bytes.
        assert!(resets(s).await, "a client that never reads is reset");
    }
    wait_for("the requests released", || p.active() == 0).await;
    assert_eq!(
        failures(&p),
        0,
        "a client not reading is not the backend's fault"
    );
    assert_eq!(backend.count(), 3);
}

#[tokio::test]
async fn http2_clients_that_grant_no_window_lose_their_slot_uncharged() {
    let backend = big_backend().await;
    let p = proxy(&[backend.url()], core_config(), short(2)).await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let tcp = TcpStream::connect(p.addr).await.unwrap();
        let (client, conn) = h2::client::handshake(tcp).await.unwrap();
        let conn = tokio::spawn(conn);
        let mut client = client.ready().await.unwrap();
        let req = Request::get(p.url("/big")).body(()).unwrap();
        let (resp, _) = client.send_request(req, true).unwrap();
        let resp = tokio::time::timeout(BOUND, resp).await.unwrap().unwrap();
        assert_eq!(resp.status(), 200);
        // The body is never read, so its window is never given back.
        held.push((client, resp, conn));
    }
    assert_eq!(served(&p).await, (200, "ok".to_owned()));
    for (_, _, conn) in held {
        let ended = tokio::time::timeout(BOUND, conn).await;
        assert!(ended.is_ok(), "the stalled connection is closed");
    }
    wait_for("the requests released", || p.active() == 0).await;
    assert_eq!(
        failures(&p),
        0,
        "a client not reading is not the backend's fault"
    );
    assert_eq!(backend.count(), 3);
}

/// A backend accepting every WebSocket upgrade and then saying nothing.
async fn silent_ws_backend() -> Backend {
    Backend::start(Arc::new(|mut req: Request<hyper::body::Incoming>| {
        Box::pin(async move {
            if req.headers().get("upgrade").is_none() {
                return ok("ok");
            }
            let on = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                if let Ok(up) = on.await {
                    let mut io = hyper_util::rt::TokioIo::new(up);
                    let mut buf = [0u8; 64];
                    while matches!(io.read(&mut buf).await, Ok(n) if n > 0) {}
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
    .await
}

async fn tunnel(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        tokio::time::timeout(BOUND, s.read_exact(&mut b))
            .await
            .unwrap()
            .unwrap();
        head.push(b[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"));
    s
}

#[tokio::test]
async fn silent_tunnels_hold_their_slot_until_the_idle_timeout() {
    let backend = silent_ws_backend().await;
    let p = proxy(&[backend.url()], core_config(), short(2)).await;
    let mut tunnels = vec![tunnel(p.addr).await, tunnel(p.addr).await];
    assert_eq!(served(&p).await, (200, "ok".to_owned()));
    // The third connection got a place only after a tunnel closed its client side, which
    // happens before its place is given back: the end of that tunnel is already here.
    let ended = tunnels
        .iter()
        .filter(|s| matches!(s.try_read(&mut [0u8; 1]), Ok(0)))
        .count();
    assert!(
        ended >= 1,
        "a tunnel counts toward max_connections while open"
    );
    for s in &mut tunnels {
        assert!(closes(s).await, "an idle tunnel is closed");
    }
    wait_for("the tunnels released", || p.active() == 0).await;
    assert_eq!(failures(&p), 0);
}

#[tokio::test]
async fn tunnel_with_traffic_outlives_the_idle_timeout() {
    let backend = silent_ws_backend().await;
    let config = ProxyConfig {
        idle_timeout: Duration::from_secs(2),
        ..short(4)
    };
    let p = proxy(&[backend.url()], core_config(), config).await;
    let mut s = tunnel(p.addr).await;
    // Bytes every 100 ms for longer than the idle timeout: the tunnel stays open.
    for _ in 0..25 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        s.write_all(b"x").await.unwrap();
    }
    let mut b = [0u8; 1];
    assert!(
        matches!(s.try_read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "a tunnel with traffic is not idle"
    );
    assert!(closes(&mut s).await);
}

#[tokio::test]
async fn http2_client_that_never_acknowledges_goaway_is_closed_soon() {
    let backend = Backend::ok("ok").await;
    let config = ProxyConfig {
        // A GOAWAY grace of `idle` would outlast the test's bound.
        idle_timeout: Duration::from_secs(600),
        header_read_timeout: Duration::from_millis(300),
        ..ProxyConfig::default()
    };
    let p = proxy(&[backend.url()], core_config(), config).await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    // The preface and an empty SETTINGS frame; then silence (no request, no PING ack).
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    assert!(closes(&mut s).await, "closed after GOAWAY without an ack");
    assert_eq!(backend.count(), 0);
}

/// One HTTP/1.1 keep-alive exchange on `s`: true once the whole "ok" response is read.
async fn exchange(s: &mut TcpStream) -> bool {
    if s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .is_err()
    {
        return false;
    }
    let mut out = Vec::new();
    let mut buf = [0u8; 1024];
    while !(out.starts_with(b"HTTP/1.1 200") && out.ends_with(b"\r\n\r\nok")) {
        match tokio::time::timeout(BOUND, s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => out.extend_from_slice(&buf[..n]),
            _ => return false,
        }
    }
    true
}

#[tokio::test]
async fn workers_share_one_limit_and_a_freed_place_goes_to_the_waiting_connection() {
    let backend = Backend::ok("ok").await;
    let first = proxy(&[backend.url()], core_config(), short(1)).await;
    let mut a = TcpStream::connect(first.addr).await.unwrap();
    assert!(exchange(&mut a).await);
    // A second worker on its own listener, under the same limit of one, started after the
    // first worker went back to waiting for its next connection.
    let second = first.proxy.for_worker();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let second_addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let _ = second
            .serve(vec![listener], std::future::pending::<()>(), BOUND)
            .await;
    });
    // The place is taken (a's connection stays open): b waits in the second worker, whose
    // queue is the only one with a client, and gets the place when a closes, although the
    // first worker is waiting to accept too.
    let mut b = TcpStream::connect(second_addr).await.unwrap();
    b.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    drop(a);
    let mut out = Vec::new();
    let mut buf = [0u8; 1024];
    while !out.ends_with(b"\r\n\r\nok") {
        match tokio::time::timeout(BOUND, b.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => out.extend_from_slice(&buf[..n]),
            r => panic!("the waiting connection was not served: {r:?}"),
        }
    }
    assert!(out.starts_with(b"HTTP/1.1 200"));
    assert_eq!(backend.count(), 2);
    task.abort();
}

#[tokio::test]
async fn http2_stream_waiting_for_a_slow_backend_is_not_a_stalled_client() {
    // The backend answers after several idle timeouts (within `request`), in two parts with
    // as long a pause between: nothing moves on the client's socket meanwhile, but the client
    // is not the one holding the response up.
    let backend = Backend::start(Arc::new(|_req: Request<hyper::body::Incoming>| {
        Box::pin(async move {
            tokio::time::sleep(Duration::from_millis(1200)).await;
            let (tx, rx) = tokio::sync::mpsc::channel(1);
            tokio::spawn(async move {
                let _ = tx.send(Bytes::from("one ")).await;
                tokio::time::sleep(Duration::from_millis(1200)).await;
                let _ = tx.send(Bytes::from("two")).await;
            });
            Response::new(http_body_util::BodyExt::boxed(ChannelBody(rx)))
        })
    }))
    .await;
    let p = proxy(&[backend.url()], core_config(), short(4)).await;
    let tcp = TcpStream::connect(p.addr).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    let conn = tokio::spawn(conn);
    let mut client = client.ready().await.unwrap();
    let (resp, _) = client
        .send_request(Request::get(p.url("/")).body(()).unwrap(), true)
        .unwrap();
    let resp = tokio::time::timeout(BOUND, resp).await.unwrap().unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut got = Vec::new();
    while let Some(chunk) = tokio::time::timeout(BOUND, body.data()).await.unwrap() {
        let chunk = chunk.expect("the connection stays open");
        let _ = body.flow_control().release_capacity(chunk.len());
        got.extend_from_slice(&chunk);
    }
    assert_eq!(got, b"one two");
    assert_eq!(failures(&p), 0);
    conn.abort();
}

/// A body of whatever arrives on a channel.
struct ChannelBody(tokio::sync::mpsc::Receiver<Bytes>);

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|c| Ok(http_body::Frame::data(c))))
    }
}

/// A raw backend: `/up` is answered at once and the rest of its body never read (the socket
/// is held); anything else gets "ok".
async fn answers_then_stops_reading() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut c, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                loop {
                    let mut head = Vec::new();
                    let mut b = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") {
                        match c.read(&mut b).await {
                            Ok(0) | Err(_) => return,
                            Ok(_) => head.push(b[0]),
                        }
                    }
                    let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
                    if c.write_all(ok).await.is_err() {
                        return;
                    }
                    if head.starts_with(b"PUT /up") {
                        // Never reads another byte; holds the socket until lb closes it.
                        let mut rest = [0u8; 1];
                        tokio::time::sleep(BOUND * 2).await;
                        let _ = c.read(&mut rest).await;
                        return;
                    }
                }
            });
        }
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_answers_then_stops_reading_the_upload_loses_it_after_the_request_timeout() {
    let (backend, task) = answers_then_stops_reading().await;
    let core = core_config();
    // The attempt timeout also bounds the wait for the early answer's head: 2 s, not less,
    // so that a busy machine's scheduling delay is never taken for a backend timeout (504).
    let retry = core.retry().with_attempt_timeout(Duration::from_secs(2));
    let config = ProxyConfig {
        body_read_timeout: Duration::from_secs(30),
        ..short(1)
    };
    let p = proxy(
        &[format!("http://{backend}")],
        core.with_retry(retry),
        config,
    )
    .await;
    let s = TcpStream::connect(p.addr).await.unwrap();
    let (mut rd, mut wr) = s.into_split();
    let uploader = tokio::spawn(async move {
        let total = 64usize << 20;
        let head = format!("PUT /up HTTP/1.1\r\nHost: a\r\nContent-Length: {total}\r\n\r\n");
        wr.write_all(head.as_bytes()).await?;
        let chunk = vec![b'a'; 64 << 10];
        let mut sent = 0;
        while sent < total {
            wr.write_all(&chunk).await?;
            sent += chunk.len();
        }
        Ok::<_, std::io::Error>(())
    });
    let mut got = Vec::new();
    tokio::time::timeout(BOUND, async {
        let mut buf = [0u8; 1024];
        while !got.ends_with(b"\r\n\r\nok") {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .unwrap();
    assert!(got.starts_with(b"HTTP/1.1 200"), "early answer: {got:?}");
    // The only slot is the uploader's: another client is served only once lb has cut off
    // the backend that stopped reading, and with it the upload.
    assert_eq!(served(&p).await, (200, "ok".to_owned()));
    let ended = tokio::time::timeout(BOUND, uploader).await;
    assert!(
        matches!(ended, Ok(Ok(Err(_)))),
        "the upload was cut off, not taken whole: {ended:?}"
    );
    task.abort();
}

/// The stall rule must not cut off a client that takes its response, however long that
/// response runs past `idle` (here more than three times over).
#[tokio::test]
async fn http2_client_reading_steadily_is_not_taken_for_a_stalled_one() {
    let backend = big_backend().await;
    let idle = Duration::from_secs(1);
    let config = ProxyConfig {
        idle_timeout: idle,
        ..short(2)
    };
    let p = proxy(&[backend.url()], core_config(), config).await;
    let tcp = TcpStream::connect(p.addr).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    let conn = tokio::spawn(conn);
    let mut client = client.ready().await.unwrap();
    let req = Request::get(p.url("/big")).body(()).unwrap();
    let (resp, _) = client.send_request(req, true).unwrap();
    let resp = tokio::time::timeout(BOUND, resp).await.unwrap().unwrap();
    let mut body = resp.into_body();
    let start = tokio::time::Instant::now();
    let mut got = 0usize;
    while start.elapsed() < idle * 3 {
        match tokio::time::timeout(BOUND, body.data()).await.unwrap() {
            Some(Ok(d)) => {
                got += d.len();
                let _ = body.flow_control().release_capacity(d.len());
            }
            Some(Err(e)) => panic!("a reading client was cut off after {got} bytes: {e}"),
            None => break, // the whole response: nothing cut it off either
        }
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    assert!(got > 0);
    conn.abort();
}
