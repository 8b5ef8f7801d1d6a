//! Real backends, a real proxy and real clients on 127.0.0.1.
#![allow(dead_code, unreachable_pub)]

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use lb_core::select::{AnySelect, StrategyKind};
use lb_core::{Balancer, Config, RetryConfig, Weight};
use lb_proxy::{HashKey, Proxy, ProxyConfig, Routes};
use tokio::net::TcpListener;
use tokio::task::JoinSet;

pub type Body = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;
pub type Handler = Arc<
    dyn Fn(Request<Incoming>) -> Pin<Box<dyn Future<Output = Response<Body>> + Send>> + Send + Sync,
>;

pub fn full(s: impl Into<Bytes>) -> Body {
    Full::new(s.into()).map_err(|e| match e {}).boxed()
}

pub fn ok(s: &'static str) -> Response<Body> {
    Response::new(full(s))
}

/// A hyper HTTP/1.1 backend on 127.0.0.1; `kill` closes the listener and every connection.
pub struct Backend {
    pub addr: SocketAddr,
    pub requests: Arc<AtomicUsize>,
    pub connections: Arc<AtomicUsize>,
    pub seen: Arc<Mutex<Vec<http::request::Parts>>>,
    tasks: Arc<Mutex<JoinSet<()>>>,
}

impl Backend {
    pub async fn start(handler: Handler) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::on(listener, handler)
    }

    pub async fn ok(body: &'static str) -> Self {
        Self::start(Arc::new(move |_| Box::pin(async move { ok(body) }))).await
    }

    pub fn on(listener: TcpListener, handler: Handler) -> Self {
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(AtomicUsize::new(0));
        let connections = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let tasks = Arc::new(Mutex::new(JoinSet::new()));
        let (r, c, s, t) = (
            requests.clone(),
            connections.clone(),
            seen.clone(),
            Arc::downgrade(&tasks),
        );
        tasks.lock().unwrap().spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                c.fetch_add(1, Ordering::SeqCst);
                let (r, s, handler) = (r.clone(), s.clone(), handler.clone());
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    r.fetch_add(1, Ordering::SeqCst);
                    let (parts, body) = req.into_parts();
                    s.lock().unwrap().push(parts.clone());
                    let fut = handler(Request::from_parts(parts, body));
                    async move { Ok::<_, Infallible>(fut.await) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .with_upgrades();
                let Some(tasks) = t.upgrade() else { return };
                tasks.lock().unwrap().spawn(async move {
                    let _ = conn.await;
                });
            }
        });
        Self {
            addr,
            requests,
            connections,
            seen,
            tasks,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn count(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    /// Stops listening and drops every open connection (a crash, as clients see it).
    pub fn kill(&self) {
        self.tasks.lock().unwrap().abort_all();
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A running proxy; dropping it shuts it down.
pub struct TestProxy {
    pub addr: SocketAddr,
    pub proxy: Proxy,
    pub shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    pub task: tokio::task::JoinHandle<()>,
}

impl TestProxy {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn balancer(&self) -> Arc<Balancer> {
        self.proxy.routes().balancer().clone()
    }

    pub fn active(&self) -> u32 {
        #[allow(clippy::disallowed_methods)]
        let now = std::time::Instant::now();
        self.balancer()
            .backends(now)
            .iter()
            .map(|b| b.active_requests)
            .sum()
    }
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub fn core_config() -> Config {
    Config::default()
        .with_rng_seed(Some(7))
        .with_retry(RetryConfig::default().with_backoff(Duration::from_millis(1)))
}

pub async fn proxy(urls: &[String], core: Config, config: ProxyConfig) -> TestProxy {
    proxy_with(urls, core, config, StrategyKind::RoundRobin).await
}

pub async fn proxy_with(
    urls: &[String],
    core: Config,
    config: ProxyConfig,
    kind: StrategyKind,
) -> TestProxy {
    let balancer = Arc::new(Balancer::new(core, AnySelect::new(kind)).unwrap());
    let backends: Vec<(String, Weight)> = urls.iter().map(|u| (u.clone(), Weight::ONE)).collect();
    #[allow(clippy::disallowed_methods)]
    let routes = Routes::new(
        balancer,
        &backends,
        HashKey::ClientIp,
        std::time::Instant::now(),
    )
    .unwrap();
    let proxy = Proxy::new(config, routes);
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

pub fn client() -> Client<hyper_util::client::legacy::connect::HttpConnector, Body> {
    Client::builder(TokioExecutor::new()).build_http()
}

pub async fn get(url: &str) -> (u16, String) {
    let resp = client().get(url.parse().unwrap()).await.unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// Sends raw bytes on a fresh connection and reads until the peer closes or `wait` passes.
pub async fn raw(addr: SocketAddr, bytes: &[u8], wait: Duration) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(wait, s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

pub async fn closed_port() -> String {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    format!("http://{}", l.local_addr().unwrap())
}

pub async fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
