//! lb-core embedded in a small HTTP/1.1 proxy on tokio: everything a shell around the core
//! has to do, in one file.
//!
//! ```text
//! cargo run -p lb-core --example tokio_proxy
//! ```
//! The demo starts five backends on 127.0.0.1 (two that answer, one that refuses connections,
//! one that resets after reading the request, one that never answers), a proxy on
//! 127.0.0.1:0, sends it a few requests, prints what happened, and exits.
//!
//! What the shell does, and where:
//! * one clock, read here and passed in: [`now`];
//! * a timer task that sleeps until `poll_timeout()` and calls `handle_timeout` ([`timer`]);
//! * per request, the loop on [`Action`]: honour `not_before` (sleep only when it is in the
//!   future), bound each attempt with `timeout_at(try_deadline)`, and report every
//!   [`Outcome`] kind ([`attempt`]);
//! * `finish` after a relayed response with how it ended, `abandon` when the client is gone.
//!
//! The proxy is deliberately minimal (no chunked bodies, one request per client connection,
//! `Connection: close` towards the client); lb-proxy is the production version of it.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lb_core::select::{AnySelect, StrategyKind};
use lb_core::{
    Action, Backend, BackendId, Balancer, Completion, Config, Outcome, RequestInfo, RetryConfig,
    Weight,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::time::{sleep_until, timeout, timeout_at};

const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
const MAX_HEAD: usize = 16 * 1024;
const MAX_BODY: usize = 64 * 1024;

/// The shell's one clock. The core never reads one: every input carries this `now`.
/// (tokio's clock, so that a test with paused time controls the core's time too.)
fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// What the proxy shares between connections.
struct Proxy {
    lb: Balancer,
    addrs: HashMap<BackendId, SocketAddr>,
    /// Idle keep-alive connections per backend: a reused one may turn out closed, which is
    /// what [`Outcome::StaleConnection`] is for.
    pool: Mutex<HashMap<BackendId, Vec<TcpStream>>>,
    /// Poked after inputs that may move `poll_timeout` earlier (an ejection).
    timer: Notify,
    /// Outcome classes reported so far, for the demo's summary.
    seen: Mutex<HashMap<&'static str, u32>>,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> io::Result<()> {
    let backends = vec![
        good_backend().await?,
        good_backend().await?,
        refusing_backend()?,
        resetting_backend().await?,
        silent_backend().await?,
    ];
    let config = Config::default().with_rng_seed(Some(1)).with_retry(
        RetryConfig::default()
            .with_attempts(5)
            .with_attempt_timeout(Duration::from_millis(500)),
    );
    let lb = Balancer::new(config, AnySelect::new(StrategyKind::RoundRobin))
        .map_err(io::Error::other)?;
    let set = backends
        .iter()
        .map(|a| Backend::new(a.to_string(), Weight::ONE));
    let ids = lb.set_backends(set, now()).map_err(io::Error::other)?;
    let proxy = Arc::new(Proxy {
        lb,
        addrs: ids.into_iter().zip(backends).collect(),
        pool: Mutex::default(),
        timer: Notify::new(),
        seen: Mutex::default(),
    });
    tokio::spawn(timer(Arc::clone(&proxy)));

    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = Arc::clone(&proxy);
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            tokio::spawn(serve(Arc::clone(&server), client));
        }
    });

    let mut ok = 0;
    for i in 0..16 {
        let (method, body) = if i % 8 == 7 {
            ("POST", "x=1")
        } else {
            ("GET", "")
        };
        let status = client(addr, method, body).await?;
        println!("{method} -> {status}");
        ok += u32::from(status == 200);
    }
    let seen = proxy
        .seen
        .lock()
        .map(|s| format!("{s:?}"))
        .unwrap_or_default();
    println!("outcomes reported: {seen}");
    for b in proxy.lb.backends(now()) {
        println!(
            "backend {} {}: {} requests, {} failures, ejected: {}",
            b.id,
            b.addr,
            b.requests_total,
            b.failures_total,
            b.ejected_until.is_some()
        );
    }
    // Refusals and resets are retried elsewhere (GETs), so most requests succeed even though
    // three of the five backends are broken.
    assert!(ok >= 6, "only {ok} of 16 requests succeeded");
    if let Ok(seen) = proxy.seen.lock() {
        for class in ["connect_refused", "reset", "timeout", "response"] {
            assert!(seen.contains_key(class), "no {class} reported: {seen:?}");
        }
    }
    Ok(())
}

/// The timer task: sleep until the core's next deadline (or until poked), then let it act,
/// then log what changed.
async fn timer(proxy: Arc<Proxy>) {
    loop {
        match proxy.lb.poll_timeout() {
            Some(at) => tokio::select! {
                () = sleep_until(at.into()) => {}
                () = proxy.timer.notified() => {}
            },
            None => proxy.timer.notified().await,
        }
        proxy.lb.handle_timeout(now());
        while let Some(event) = proxy.lb.poll_event() {
            eprintln!("event: {event}");
        }
    }
}

/// One client connection, one request.
async fn serve(proxy: Arc<Proxy>, mut client: TcpStream) {
    let Ok(request) = read_message(&mut client).await else {
        return; // nothing routed yet: the core never heard of this request
    };
    let idempotent = !request.starts_with(b"POST ") && !request.starts_with(b"PATCH ");
    // The whole body is in `request`, so it can be sent again: replayable.
    let info = RequestInfo::new(idempotent, true);
    let lb = &proxy.lb;
    let (mut req, mut action) = lb.start(info, now());
    // The request's state must end in `finish` or `abandon`, which say *how* it ended. (If
    // this task is cancelled or panics first, dropping `req` still releases its in-flight
    // count: `RequestState` is a drop guard. Do not rely on it for the normal paths.)
    loop {
        match action {
            Action::Forward {
                backend,
                not_before,
                try_deadline,
            } => {
                // The retry backoff: only sleep when `not_before` is in the future.
                if not_before > now() {
                    sleep_until(not_before.into()).await;
                }
                let result = timeout_at(try_deadline.into(), attempt(&proxy, backend, &request))
                    .await
                    // No response head by `try_deadline`: the backend may have acted on it.
                    .unwrap_or(Err(Outcome::TimedOut));
                let outcome = match &result {
                    Ok((status, _)) => Outcome::Response { status: *status },
                    Err(outcome) => *outcome,
                };
                if let Ok(mut seen) = proxy.seen.lock() {
                    *seen.entry(outcome.class()).or_default() += 1;
                }
                action = lb.handle_outcome(&mut req, outcome, now());
                proxy.timer.notify_one();
                if let (Action::Relay, Ok((_, response))) = (action, result) {
                    let completion = relay(response, &mut client).await;
                    eprintln!("{} {completion:?}: {req}", first_line(&request));
                    lb.finish(req, completion, now());
                    proxy.timer.notify_one();
                    return;
                }
            }
            // `start` never relays, and the relay above consumes `req`.
            Action::Relay => return,
            Action::Fail(failure) => {
                eprintln!("{} -> {}: {req}", first_line(&request), failure.status());
                let head = format!(
                    "HTTP/1.1 {} {failure}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                    failure.status()
                );
                // Whether or not the client is still there to read it, the request is over
                // and nothing is in flight after `Fail`: `abandon` closes it explicitly.
                let _ = client.write_all(head.as_bytes()).await;
                lb.abandon(req, now());
                return;
            }
        }
    }
}

/// One attempt, as far as the response head: the status and the whole response, or the
/// outcome that explains why there is none. Every `Outcome` but `TimedOut` (the caller's
/// `timeout_at`) is produced here.
async fn attempt(
    proxy: &Proxy,
    backend: BackendId,
    request: &[u8],
) -> Result<(u16, Vec<u8>), Outcome> {
    let pooled = proxy
        .pool
        .lock()
        .ok()
        .and_then(|mut p| p.get_mut(&backend)?.pop());
    let reused = pooled.is_some();
    let mut conn = match pooled {
        Some(conn) => conn,
        None => {
            let addr = proxy.addrs.get(&backend).ok_or(Outcome::ConnectRefused)?;
            match timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
                Ok(Ok(conn)) => conn,
                Ok(Err(_)) => return Err(Outcome::ConnectRefused),
                Err(_) => return Err(Outcome::ConnectTimeout),
            }
        }
    };
    let written = conn.write_all(request).await;
    let mut first = [0u8; 1];
    let read = match written {
        Ok(()) => conn.read(&mut first).await,
        Err(e) => Err(e),
    };
    match read {
        Ok(1) => {}
        // A reused keep-alive connection that was closed before any response byte: the
        // ordinary race of keep-alive (the backend closed it while idle), not a bad backend.
        Ok(_) | Err(_) if reused => return Err(Outcome::StaleConnection),
        // A fresh connection that broke after the request was written: it may have been
        // acted on, so only an idempotent request may be retried.
        Ok(_) | Err(_) => return Err(Outcome::Reset),
    }
    let mut rest = read_message(&mut conn).await.map_err(|_| Outcome::Reset)?;
    rest.insert(0, first[0]);
    let status = parse_status(&rest).ok_or(Outcome::Reset)?;
    if let Ok(mut pool) = proxy.pool.lock() {
        pool.entry(backend).or_default().push(conn);
    }
    Ok((status, rest))
}

/// Streams the response to the client and says how that went. (The body was read with the
/// head here, so only the client can fail; a proxy that streams bodies reports
/// `BackendFailed` when the backend breaks one off.)
async fn relay(response: Vec<u8>, client: &mut TcpStream) -> Completion {
    match client.write_all(&response).await {
        Ok(()) => {
            let _ = client.shutdown().await;
            Completion::Done
        }
        Err(_) => Completion::ClientGone,
    }
}

// --- tiny HTTP/1.1 framing: a head, and a body of `content-length` bytes ---

/// Reads one message (head and `content-length` body).
async fn read_message(stream: &mut TcpStream) -> io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = find(&buf, b"\r\n\r\n") {
            let len = content_length(&buf[..end]);
            if len > MAX_BODY {
                return Err(io::Error::other("body too large"));
            }
            if buf.len() >= end + 4 + len {
                buf.truncate(end + 4 + len);
                return Ok(buf);
            }
        } else if buf.len() > MAX_HEAD {
            return Err(io::Error::other("head too large"));
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn content_length(head: &[u8]) -> usize {
    String::from_utf8_lossy(head)
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .unwrap_or(0)
}

fn parse_status(response: &[u8]) -> Option<u16> {
    let line = std::str::from_utf8(response.get(..12)?).ok()?;
    line.strip_prefix("HTTP/1.1 ")?.parse().ok()
}

fn first_line(message: &[u8]) -> String {
    let end = find(message, b"\r\n").unwrap_or(message.len());
    String::from_utf8_lossy(&message[..end]).into_owned()
}

// --- the demo's client and backends ---

async fn client(proxy: SocketAddr, method: &str, body: &str) -> io::Result<u16> {
    let mut s = TcpStream::connect(proxy).await?;
    let request = format!(
        "{method} / HTTP/1.1\r\nhost: demo\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(request.as_bytes()).await?;
    let response = read_message(&mut s).await?;
    parse_status(&response).ok_or_else(|| io::Error::other("no status"))
}

/// Answers `ok` with keep-alive, but closes each connection after two responses without a
/// word, so the proxy's pooled connection to it goes stale.
async fn good_backend() -> io::Result<SocketAddr> {
    backend(|mut conn| async move {
        for _ in 0..2 {
            if read_message(&mut conn).await.is_err() {
                return;
            }
            let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
            if conn.write_all(ok).await.is_err() {
                return;
            }
        }
    })
    .await
}

/// Reads the request, then closes the connection without answering.
async fn resetting_backend() -> io::Result<SocketAddr> {
    backend(|mut conn| async move {
        let _ = read_message(&mut conn).await;
    })
    .await
}

/// Reads the request and never answers (holds the connection until the demo exits).
async fn silent_backend() -> io::Result<SocketAddr> {
    backend(|mut conn| async move {
        let _ = read_message(&mut conn).await;
        std::future::pending::<()>().await;
    })
    .await
}

/// An address nothing listens on: connections are refused.
fn refusing_backend() -> io::Result<SocketAddr> {
    std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()
}

async fn backend<F, Fut>(handle: F) -> io::Result<SocketAddr>
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((conn, _)) = listener.accept().await {
            tokio::spawn(handle(conn));
        }
    });
    Ok(addr)
}

/// The demo doubles as a test (`test = true` in Cargo.toml), so `cargo test` runs it.
#[cfg(test)]
mod tests {
    #[test]
    fn demo_serves_through_broken_backends_and_exits() {
        super::main().unwrap();
    }
}
