//! # lb-proxy: the HTTP forwarder
//!
//! A hyper 1.x server (HTTP/1.1 with keep-alive and upgrades, and HTTP/2 cleartext with prior
//! knowledge, on the same port; or both over TLS, by ALPN) and a per-worker pool of upstream connections, driving
//! [`lb_core::Balancer`] for every request: lb-core decides where each attempt goes and when
//! to stop; this crate does the sockets, the headers, the bodies and the clock.
//!
//! # Layout
//! * [`Proxy`]: accepts on any number of listeners, serves until shutdown, drains.
//! * `conn`: one client connection: protocol detection, request-head (408) and keep-alive
//!   idle timers, the send timeout for clients that do not read, graceful shutdown, and the
//!   splice of an upgraded tunnel (closed when idle).
//! * `phase`: what a connection is doing, so its timers know which deadline applies; it holds
//!   the connection's place under `max_connections`, so a tunnel keeps it.
//! * `service`: one request: body read (replayable up to `replay_buffer`), attempts with
//!   lb-core's deadlines, relay, WebSocket tunnels.
//! * `exchange`: a request from head to end of response, ended once, and its access log;
//!   the response body ends it through `body::BodyEnd`.
//! * `body`: the client's body (`body_read`, faults of the client's own) and the response's.
//! * `upstream`: the pool of backend connections, keyed by backend address, and the one
//!   resend after a pooled connection died.
//! * `validate`: which requests are forwarded at all (one valid Host, unambiguous framing, no
//!   CONNECT, no h2c upgrade) and their routing headers. `interim`: a backend's 1xx relayed
//!   to HTTP/1.1 clients.
//! * `headers`: `X-Forwarded-*`, hop-by-hop fields. `classify`: every failure → an lb-core
//!   `Outcome` or a fault of the client's own. `respond`: the responses the proxy makes
//!   itself. `driver`: lb-core's timer.
//! * [`Routes`]: the balancer and each backend's address, swapped whole on reload.
//! * [`tls`]: certificates by SNI for clients, verification of `https://` backends; the
//!   handshakes themselves are `conn`'s and `upstream`'s. [`Proxy::set_tls`] swaps it.
//! * [`Observer`]: hooks for metrics.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod body;
mod classify;
mod clock;
mod config;
mod conn;
mod driver;
mod error;
mod exchange;
mod flood;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
mod headers;
mod interim;
mod observe;
mod phase;
mod respond;
mod routes;
mod service;
pub mod tls;
mod upstream;
mod validate;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

pub use config::ProxyConfig;
pub use error::{RouteError, ServeError};
pub use observe::{Completed, NoObserver, Observer};
pub use routes::{
    backend_identity, parse_backend, BackendAddr, BackendSpec, HashKey, Routes, Target,
};
pub use tls::TlsConfig;

use service::Shared;

/// The load balancer's data plane.
///
/// ```no_run
/// use std::sync::Arc;
/// use lb_core::{Balancer, Config, Weight};
/// use lb_core::select::{AnySelect, StrategyKind};
/// use lb_proxy::{HashKey, Proxy, ProxyConfig, Routes};
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let balancer = Arc::new(Balancer::new(Config::default(), AnySelect::new(StrategyKind::RoundRobin))?);
/// let backends = [("http://127.0.0.1:3031".to_owned(), Weight::ONE)];
/// let routes = Routes::new(balancer, &backends, HashKey::ClientIp, std::time::Instant::now())?;
/// let proxy = Proxy::new(ProxyConfig::default(), routes);
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:3030").await?;
/// let shutdown = std::future::pending::<()>(); // e.g. a signal
/// proxy.serve(vec![listener], shutdown, std::time::Duration::from_secs(30)).await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Proxy {
    shared: Arc<Shared>,
    /// `limits.max_connections`, one for the process: every worker takes its connections'
    /// permits from here, so no client waits while the process is below the limit.
    permits: Arc<Semaphore>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

impl Proxy {
    /// A proxy routing by `routes`.
    #[must_use]
    pub fn new(config: ProxyConfig, routes: Routes) -> Self {
        Self::with_observer(config, routes, Arc::new(NoObserver))
    }

    /// A proxy that reports what happens to `observer`.
    #[must_use]
    pub fn with_observer(config: ProxyConfig, routes: Routes, observer: Arc<dyn Observer>) -> Self {
        let tls = Arc::<tls::Shared>::default();
        let shared = Shared {
            config,
            routes: Arc::new(ArcSwap::from_pointee(routes)),
            swap: Arc::default(),
            upstream: Arc::new(upstream::Upstream::new(&config, Arc::clone(&tls))),
            tls,
            observer,
            drive: true,
        };
        let max = config.max_connections.clamp(1, Semaphore::MAX_PERMITS);
        Self {
            shared: Arc::new(shared),
            permits: Arc::new(Semaphore::new(max)),
        }
    }

    /// A proxy for another worker thread: the same routes (a reload reaches both), the same
    /// observer, the same `max_connections` (one limit for all workers), its own upstream
    /// connection pool, and no second lb-core timer.
    ///
    /// # Why thread-per-core
    /// With one work-stealing runtime, a request's client connection, its upstream
    /// connection's task and the pool often sit on different threads, and every hand-off is
    /// a cross-thread wake-up (a futex, an eventfd write). Run one current-thread runtime per
    /// core, each with its own `for_worker` proxy, its own `SO_REUSEPORT` listeners and its
    /// own pool, and a request never leaves its thread (NGINX's and HAProxy's model).
    #[must_use]
    pub fn for_worker(&self) -> Self {
        let s = &self.shared;
        let shared = Shared {
            config: s.config,
            routes: Arc::clone(&s.routes),
            swap: Arc::clone(&s.swap),
            upstream: Arc::new(upstream::Upstream::new(&s.config, Arc::clone(&s.tls))),
            tls: Arc::clone(&s.tls),
            observer: Arc::clone(&s.observer),
            drive: false,
        };
        Self {
            shared: Arc::new(shared),
            permits: Arc::clone(&self.permits),
        }
    }

    /// Swaps in new routes (a reload): new requests use them at once; requests in flight
    /// finish with the routes they started with.
    ///
    /// Pooled connections to backends the new routes no longer have are closed: this
    /// worker's at once, every other worker's at its next sweep (within 5 s). None is used
    /// meanwhile: the pool is keyed by backend address, and no new request routes there.
    pub fn set_routes(&self, routes: Routes) {
        self.shared.upstream.retain(routes.pool_keys());
        self.shared.routes.store(Arc::new(routes));
    }

    /// Builds new routes with `build` and swaps them in, as one step for requests. Use it
    /// when the new routes share the balancer in force: [`Routes::new`] changes that
    /// balancer's backend set at once, so a request that took the old routes can pick a
    /// backend only the new ones know; it then waits for this swap and takes the new routes
    /// (with [`set_routes`](Self::set_routes) after the build, it would fail in between).
    ///
    /// # Errors
    /// `build`'s, and then nothing changes.
    pub fn replace_routes<E>(&self, build: impl FnOnce() -> Result<Routes, E>) -> Result<(), E> {
        let _swap = self
            .shared
            .swap
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        self.set_routes(build()?);
        Ok(())
    }

    /// Sets TLS for every worker (a reload): connections accepted from now on are served
    /// with `tls.server` (TLS on every listener; none: plain HTTP), and new connections to
    /// `https://` backends verified with `tls.client`. Established connections keep what
    /// they were set up with.
    pub fn set_tls(&self, tls: TlsConfig) {
        self.shared.tls.set(tls);
    }

    /// The TLS in force.
    #[must_use]
    pub fn tls(&self) -> Arc<TlsConfig> {
        self.shared.tls.config.load_full()
    }

    /// The routes in force.
    #[must_use]
    pub fn routes(&self) -> Arc<Routes> {
        self.shared.routes.load_full()
    }

    /// The settings.
    #[must_use]
    pub fn config(&self) -> &ProxyConfig {
        &self.shared.config
    }

    /// Serves `listeners` until `shutdown` resolves; then stops accepting, lets in-flight
    /// requests finish for up to `drain`, and returns (cutting off whatever is left).
    ///
    /// Beyond `max_connections` open client connections (counted over this proxy and all its
    /// [`for_worker`](Self::for_worker) proxies, WebSocket tunnels included), accepting pauses
    /// until one closes: each listener holds at most one accepted connection waiting for a
    /// place, the kernel's backlog the rest.
    ///
    /// The drain waits for every worker's connections, since the limit is shared.
    ///
    /// # Errors
    /// Never for a single failed accept (logged, then retried after a pause).
    pub async fn serve(
        &self,
        listeners: Vec<TcpListener>,
        shutdown: impl Future<Output = impl Sized>,
        drain: Duration,
    ) -> Result<(), ServeError> {
        let (stop_tx, stop_rx) = watch::channel(false);
        let max = self
            .shared
            .config
            .max_connections
            .clamp(1, Semaphore::MAX_PERMITS);
        let permits = &self.permits;
        let mut tasks = tokio::task::JoinSet::new();
        if self.shared.drive {
            tasks.spawn(driver::run(Arc::clone(&self.shared), stop_rx.clone()));
        }
        tasks.spawn(sweep_idle(Arc::clone(&self.shared), stop_rx.clone()));
        for listener in listeners {
            tasks.spawn(accept_loop(
                Arc::clone(&self.shared),
                listener,
                Arc::clone(permits),
                stop_rx.clone(),
            ));
        }
        shutdown.await;
        tracing::info!(target: "lb::proxy", ?drain, "shutting down: draining in-flight requests");
        let _ = stop_tx.send(true);
        // Every connection (or the tunnel it became) holds a permit until it closes: all
        // permits back = all closed.
        let all = u32::try_from(max).unwrap_or(u32::MAX);
        if tokio::time::timeout(drain, permits.acquire_many(all))
            .await
            .is_err()
        {
            tracing::warn!(target: "lb::proxy", "drain timeout: closing the remaining connections");
        }
        tasks.abort_all();
        Ok(())
    }
}

/// Closes this worker's upstream connections that sat idle past their timeout, and those to
/// backends a reload removed.
async fn sweep_idle(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut routes = shared.routes.load_full();
    loop {
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(5)) => shared.upstream.sweep(),
            _ = stop.wait_for(|s| *s) => return,
        }
        let now = shared.routes.load_full();
        if !Arc::ptr_eq(&routes, &now) {
            shared.upstream.retain(now.pool_keys());
            routes = now;
        }
    }
}

async fn accept_loop(
    shared: Arc<Shared>,
    listener: TcpListener,
    permits: Arc<Semaphore>,
    stop: watch::Receiver<bool>,
) {
    let mut stop_accepting = stop.clone();
    let mut conns = tokio::task::JoinSet::new();
    loop {
        // Accept first, then wait for a place: the limit is shared by every worker, and a
        // place taken before accepting would sit idle in a worker with nobody to accept
        // while a client waits in another worker's queue.
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop_accepting.wait_for(|s| *s) => break,
        };
        match accepted {
            Ok((stream, peer)) => {
                let slot = tokio::select! {
                    p = Arc::clone(&permits).acquire_owned() => match p { Ok(p) => p, Err(_) => return },
                    _ = stop_accepting.wait_for(|s| *s) => break,
                };
                let (shared, stop) = (Arc::clone(&shared), stop.clone());
                conns.spawn(conn::serve(shared, stream, peer, stop, slot));
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(target: "lb::proxy", error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        while conns.try_join_next().is_some() {}
    }
    drop(listener);
    // Keep the connections' tasks alive through the drain; `serve` aborts us when it is over.
    while conns.join_next().await.is_some() {}
}
