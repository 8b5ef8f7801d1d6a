//! The seed design, as the baseline lb must beat: round robin over the backends thought
//! alive; an active health check (a TCP connect per backend each interval, as the seed did);
//! and passive detection by retrying: a failed send is tried again on the SAME backend up to
//! 3 times 10 ms apart, then that backend is marked down and the request goes to the next one
//! (3 backends at most, then 503). Like the seed it replays any method, POST included (the
//! body is buffered). Per-send timeouts are lb's own (`connect`, `request`), which is kinder to
//! it than the seed, whose sends had no response timeout.
#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};

type Body = BoxBody<Bytes, hyper::Error>;

/// How the baseline was configured.
#[derive(Clone, Debug)]
pub struct SeedConfig {
    pub backends: Vec<SocketAddr>,
    pub health_interval: Duration,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
}

struct State {
    cfg: SeedConfig,
    alive: Vec<AtomicBool>,
    next: AtomicUsize,
    idle: Vec<Mutex<Vec<SendRequest<Full<Bytes>>>>>,
    /// Sends per backend (what lb calls `lb_requests_total`).
    pub sends: Vec<AtomicU64>,
    /// (since start, backend, alive, by probe?) for every change of `alive`.
    changes: Mutex<Vec<(Duration, usize, bool, bool)>>,
    start: Instant,
}

/// The baseline proxy on its own thread and runtime; stops when dropped.
pub struct SeedLb {
    pub addr: SocketAddr,
    state: Arc<State>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SeedLb {
    pub fn start(cfg: SeedConfig, start: Instant) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let n = cfg.backends.len();
        let state = Arc::new(State {
            cfg,
            alive: (0..n).map(|_| AtomicBool::new(true)).collect(),
            next: AtomicUsize::new(0),
            idle: (0..n).map(|_| Mutex::new(Vec::new())).collect(),
            sends: (0..n).map(|_| AtomicU64::new(0)).collect(),
            changes: Mutex::new(Vec::new()),
            start,
        });
        let (tx, mut rx) = tokio::sync::oneshot::channel::<()>();
        let st = state.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                tokio::spawn(health_check(st.clone()));
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                loop {
                    let stream = tokio::select! {
                        r = listener.accept() => match r { Ok((s, _)) => s, Err(_) => continue },
                        _ = &mut rx => return,
                    };
                    let st = st.clone();
                    tokio::spawn(async move {
                        let svc = hyper::service::service_fn(move |req| handle(st.clone(), req));
                        // h2c by prior knowledge too, so the same clients can be pointed at it.
                        let mut head = [0u8; 4];
                        for _ in 0..100 {
                            match stream.peek(&mut head).await {
                                Ok(n) if n > 0 && n < 4 => {
                                    tokio::time::sleep(Duration::from_millis(1)).await;
                                }
                                _ => break,
                            }
                        }
                        let h2 = &head == b"PRI ";
                        let io = TokioIo::new(stream);
                        if h2 {
                            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                                .serve_connection(io, svc)
                                .await;
                        } else {
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(io, svc)
                                .await;
                        }
                    });
                }
            });
        });
        Self {
            addr,
            state,
            stop: Some(tx),
            thread: Some(thread),
        }
    }

    /// (probe-healthy, marked down by traffic) per backend, as lb's `/status` gives them.
    pub fn view(&self) -> Vec<(bool, bool)> {
        // The seed has one flag; say which of its mechanisms set it last.
        let changes = self.state.changes.lock().unwrap();
        (0..self.state.alive.len())
            .map(|i| {
                let last = changes.iter().rev().find(|c| c.1 == i);
                match last {
                    Some(&(_, _, false, true)) => (false, false),
                    Some(&(_, _, false, false)) => (true, true),
                    _ => (true, false),
                }
            })
            .collect()
    }

    pub fn sends(&self) -> Vec<u64> {
        self.state
            .sends
            .iter()
            .map(|s| s.load(Ordering::SeqCst))
            .collect()
    }
}

impl Drop for SeedLb {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn set_alive(st: &State, i: usize, alive: bool, by_probe: bool) {
    if st.alive[i].swap(alive, Ordering::SeqCst) != alive {
        st.changes
            .lock()
            .unwrap()
            .push((st.start.elapsed(), i, alive, by_probe));
    }
}

async fn health_check(st: Arc<State>) {
    loop {
        for (i, addr) in st.cfg.backends.iter().enumerate() {
            let ok = matches!(
                tokio::time::timeout(st.cfg.connect_timeout, tokio::net::TcpStream::connect(addr))
                    .await,
                Ok(Ok(_))
            );
            set_alive(&st, i, ok, true);
        }
        tokio::time::sleep(st.cfg.health_interval).await;
    }
}

fn pick(st: &State) -> Option<usize> {
    let n = st.alive.len();
    (0..n)
        .map(|_| st.next.fetch_add(1, Ordering::SeqCst) % n)
        .find(|&i| st.alive[i].load(Ordering::SeqCst))
}

async fn sender(st: &State, i: usize) -> Result<SendRequest<Full<Bytes>>, ()> {
    loop {
        let idle = st.idle[i].lock().unwrap().pop();
        match idle {
            Some(s) if s.is_ready() => return Ok(s),
            Some(_) => continue,
            None => break,
        }
    }
    let connect = tokio::net::TcpStream::connect(st.cfg.backends[i]);
    let stream = match tokio::time::timeout(st.cfg.connect_timeout, connect).await {
        Ok(Ok(s)) => s,
        _ => return Err(()),
    };
    let _ = stream.set_nodelay(true);
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|_| ())?;
    tokio::spawn(conn);
    Ok(send)
}

async fn send_once(
    st: &Arc<State>,
    i: usize,
    parts: &http::request::Parts,
    body: &Bytes,
) -> Result<hyper::Response<Body>, ()> {
    st.sends[i].fetch_add(1, Ordering::SeqCst);
    let mut s = sender(st, i).await?;
    let mut req = hyper::Request::new(Full::new(body.clone()));
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = parts.uri.clone();
    *req.headers_mut() = parts.headers.clone();
    let resp = tokio::time::timeout(st.cfg.request_timeout, s.send_request(req))
        .await
        .map_err(|_| ())?
        .map_err(|_| ())?;
    // Back to the pool once this response is read out.
    let st2 = st.clone();
    tokio::spawn(async move {
        if tokio::time::timeout(Duration::from_secs(30), s.ready())
            .await
            .is_ok_and(|r| r.is_ok())
        {
            st2.idle[i].lock().unwrap().push(s);
        }
    });
    Ok(resp.map(BodyExt::boxed))
}

fn synthetic(status: u16) -> hyper::Response<Body> {
    let mut r = hyper::Response::new(
        Full::new(Bytes::new())
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
    r
}

async fn handle(
    st: Arc<State>,
    req: hyper::Request<hyper::body::Incoming>,
) -> Result<hyper::Response<Body>, std::convert::Infallible> {
    let (parts, body) = req.into_parts();
    let Ok(body) = body.collect().await.map(|b| b.to_bytes()) else {
        return Ok(synthetic(400));
    };
    for _attempt in 0..3 {
        let Some(i) = pick(&st) else {
            return Ok(synthetic(503));
        };
        // One send and 3 retries on the same backend, 10 ms apart.
        for retry in 0..4 {
            if retry > 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            if let Ok(resp) = send_once(&st, i, &parts, &body).await {
                return Ok(resp);
            }
        }
        set_alive(&st, i, false, false);
    }
    Ok(synthetic(503))
}
