//! The upstream client: each worker's own pool of kept-alive HTTP/1.1 connections.
//!
//! # Why not hyper-util's client
//! hyper-util's pooled client is general (any connector, HTTP/2, proxies) and pays for it on
//! every request: a checkout future and a pool-wide lock keyed by scheme and authority, and a
//! task spawned per request to return the connection to the pool once it is ready again. A
//! load balancer needs one thing: reuse an idle connection to this backend, or open one. Here
//! a connection is taken from the worker's pool, used, and put back by the response body the
//! moment the client has the whole response (see [`Lease`]). hyper's `try_send_request` hands
//! back a request the connection never took, so a pooled connection that died idle costs
//! nothing but a second try on the next one.

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use http::uri::Authority;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;

use lb_core::BackendId;

use crate::body::RequestBody;
use crate::config::ProxyConfig;

/// Why an attempt got no response head.
#[derive(Debug)]
pub(crate) enum SendError {
    /// The connection could not be made (refused, unreachable, name not resolved).
    ConnectRefused(io::Error),
    /// The connection did not establish within the connect timeout.
    ConnectTimeout,
    /// The exchange failed after (part of) the request may have been written. `reused`: the
    /// connection came from the pool (so the failure may be a keep-alive race).
    Failed { error: hyper::Error, reused: bool },
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::ConnectRefused(e) => write!(f, "connect failed: {e}"),
            Self::ConnectTimeout => f.write_str("connect timed out"),
            Self::Failed { error, reused } => write!(f, "{error} (pooled connection: {reused})"),
        }
    }
}

type Idle = Vec<(SendRequest<RequestBody>, Instant)>;

/// Backend ids are small distinct integers: hashing them is wasted work on every request.
#[derive(Debug, Default, Clone, Copy)]
struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) | u64::from(b);
        }
    }

    fn write_u32(&mut self, n: u32) {
        self.0 = u64::from(n);
    }
}

type Pool = HashMap<BackendId, Idle, std::hash::BuildHasherDefault<IdHasher>>;

/// One worker's connections to every backend.
#[derive(Debug)]
pub(crate) struct Upstream {
    connect_timeout: Duration,
    idle_timeout: Duration,
    max_idle: usize,
    idle: Mutex<Pool>,
}

/// A connection in use. [`Lease::release`] puts it back in the pool (after the whole response
/// was read); dropping it closes the connection (a response cut short, an upgrade).
#[derive(Debug)]
pub(crate) struct Lease {
    upstream: Arc<Upstream>,
    backend: BackendId,
    tx: SendRequest<RequestBody>,
}

impl Lease {
    pub(crate) fn release(self) {
        if !self.tx.is_closed() {
            self.upstream.checkin(self.backend, self.tx);
        }
    }
}

impl Upstream {
    pub(crate) fn new(config: &ProxyConfig) -> Self {
        Self {
            connect_timeout: config.connect_timeout,
            idle_timeout: config.upstream_idle_timeout,
            max_idle: config.upstream_max_idle,
            idle: Mutex::new(Pool::default()),
        }
    }

    fn pool(&self) -> MutexGuard<'_, Pool> {
        self.idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn checkout(&self, backend: BackendId) -> Option<SendRequest<RequestBody>> {
        let mut pool = self.pool();
        let idle = pool.get_mut(&backend)?;
        while let Some((tx, since)) = idle.pop() {
            if !tx.is_closed() && since.elapsed() < self.idle_timeout {
                return Some(tx);
            }
        }
        None
    }

    fn checkin(&self, backend: BackendId, tx: SendRequest<RequestBody>) {
        let mut pool = self.pool();
        let idle = pool.entry(backend).or_default();
        if idle.len() < self.max_idle {
            idle.push((tx, Instant::now()));
        }
    }

    /// Closes connections idle longer than the idle timeout (or already closed by the
    /// backend), and forgets backends with none left (removed ones among them).
    pub(crate) fn sweep(&self) {
        let mut pool = self.pool();
        pool.retain(|_, idle| {
            idle.retain(|(tx, since)| !tx.is_closed() && since.elapsed() < self.idle_timeout);
            !idle.is_empty()
        });
    }

    /// Idle connections kept, over all backends.
    #[cfg(test)]
    pub(crate) fn idle_count(&self) -> usize {
        self.pool().values().map(Vec::len).sum()
    }

    async fn connect(&self, authority: &Authority) -> Result<SendRequest<RequestBody>, SendError> {
        let stream = match tokio::time::timeout(
            self.connect_timeout,
            TcpStream::connect(authority.as_str()),
        )
        .await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(SendError::ConnectRefused(e)),
            Err(_) => return Err(SendError::ConnectTimeout),
        };
        let _ = stream.set_nodelay(true);
        let (tx, conn) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|error| SendError::Failed {
                error,
                reused: false,
            })?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::trace!(target: "lb::upstream", error = %e, "upstream connection ended");
            }
        });
        Ok(tx)
    }

    /// Sends `req` over a pooled connection to `backend` (at `authority`), or a new one.
    pub(crate) async fn send(
        self: &Arc<Self>,
        backend: BackendId,
        authority: &Authority,
        mut req: Request<RequestBody>,
    ) -> Result<(Response<Incoming>, Lease), SendError> {
        let lease = |tx| Lease {
            upstream: Arc::clone(self),
            backend,
            tx,
        };
        while let Some(mut tx) = self.checkout(backend) {
            if tx.ready().await.is_err() {
                continue; // closed while idle
            }
            match tx.try_send_request(req).await {
                Ok(resp) => return Ok((resp, lease(tx))),
                Err(mut e) => match e.take_message() {
                    // Never written: the next connection (or a new one) gets it.
                    Some(back) => req = back,
                    None => {
                        return Err(SendError::Failed {
                            error: e.into_error(),
                            reused: true,
                        })
                    }
                },
            }
        }
        let mut tx = self.connect(authority).await?;
        match tx.try_send_request(req).await {
            Ok(resp) => Ok((resp, lease(tx))),
            Err(e) => Err(SendError::Failed {
                error: e.into_error(),
                reused: false,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A backend that answers every request on a connection, then keeps it open.
    async fn backend() -> (Authority, tokio::task::JoinHandle<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let authority: Authority = listener.local_addr().unwrap().to_string().parse().unwrap();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(|_req| async {
                        Ok::<_, std::convert::Infallible>(Response::new(http_body_util::Full::new(
                            bytes::Bytes::from_static(b"ok"),
                        )))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        (authority, task)
    }

    /// Ids are opaque: take real ones from a balancer.
    fn ids(n: usize) -> Vec<BackendId> {
        let lb = lb_core::Balancer::new(
            lb_core::Config::default(),
            lb_core::select::AnySelect::new(lb_core::select::StrategyKind::RoundRobin),
        )
        .unwrap();
        let backends = (0..n).map(|i| lb_core::Backend::new(format!("b{i}"), lb_core::Weight::ONE));
        lb.set_backends(backends, tokio::time::Instant::now().into_std())
            .unwrap()
    }

    fn get() -> Request<RequestBody> {
        let mut req = Request::new(RequestBody::Full(None));
        req.headers_mut()
            .insert(http::header::HOST, http::HeaderValue::from_static("x"));
        req
    }

    #[tokio::test]
    async fn connections_are_reused_and_swept_when_idle_too_long() {
        use http_body_util::BodyExt;
        let (authority, task) = backend().await;
        let config = ProxyConfig {
            upstream_idle_timeout: Duration::from_secs(1),
            ..ProxyConfig::default()
        };
        let up = Arc::new(Upstream::new(&config));
        for _ in 0..5 {
            let (resp, lease) = up.send(ids(1)[0], &authority, get()).await.unwrap();
            assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), "ok");
            lease.release();
            assert_eq!(up.idle_count(), 1, "one connection, reused");
        }
        up.sweep();
        assert_eq!(up.idle_count(), 1, "not idle long enough yet");
        // Sleeps only ever run long, so this is past the timeout however busy the machine.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        up.sweep();
        assert_eq!(
            up.idle_count(),
            0,
            "idle past the timeout: closed and forgotten"
        );
        task.abort();
    }

    #[tokio::test]
    async fn connect_failures_are_told_apart() {
        let closed: Authority = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().to_string().parse().unwrap()
        };
        let up = Arc::new(Upstream::new(&ProxyConfig::default()));
        assert!(matches!(
            up.send(ids(2)[1], &closed, get()).await,
            Err(SendError::ConnectRefused(_))
        ));
    }
}
