//! Wiring: settings → balancer, routes, proxy, health checker, admin server; signals; reload.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lb_core::select::AnySelect;
use lb_core::{BackendId, BackendStatus, Balancer, Weight};
use lb_health::{
    Checker, CheckerConfig, HttpProber, ProbeError, ProbeSink, Prober, Target, TcpProber,
};
use lb_proxy::{BackendSpec, NoObserver, Observer, Proxy, Routes};
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};

use crate::cli::Cli;
use crate::config::{self, NameSpec, Settings};
use crate::discovery::{self, Answer, Found};
use crate::metrics::{label_of, Metrics};

/// Why `lb` could not start (exit 1).
#[derive(Debug, thiserror::Error)]
pub(crate) enum StartupError {
    /// The configuration.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// A listening address.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Building the balancer or routes.
    #[error(transparent)]
    Route(#[from] lb_proxy::RouteError),
    /// The runtime or signal handlers.
    #[error("cannot start: {0}")]
    Runtime(#[from] std::io::Error),
    /// TLS could not be set up (the random number generator for session tickets).
    #[error("cannot set up TLS: {0}")]
    Tls(#[from] rustls::Error),
}

/// TLS as `settings` say: certificates served with `ticketer` (one for the process, so
/// tickets survive reloads), and the verifier for https backends.
fn tls_config(
    settings: &Settings,
    ticketer: &Arc<dyn rustls::server::ProducesTickets>,
) -> Result<lb_proxy::TlsConfig, StartupError> {
    let server = match &settings.tls.certificates {
        Some(c) => Some(Arc::new(lb_proxy::tls::server_config(
            Arc::clone(c),
            Arc::clone(ticketer),
        )?)),
        None => None,
    };
    Ok(lb_proxy::TlsConfig {
        server,
        client: settings.tls.client.clone(),
    })
}

/// Either prober, chosen by `health.path`.
enum AnyProber {
    Tcp(TcpProber),
    Http(HttpProber),
}

impl Prober for AnyProber {
    async fn probe(&self, target: &Target, timeout: Duration) -> Result<(), ProbeError> {
        match self {
            Self::Tcp(p) => p.probe(target, timeout).await,
            Self::Http(p) => p.probe(target, timeout).await,
        }
    }
}

/// Feeds probe results to whichever balancer is in force, and counts them.
struct Sink {
    proxy: Proxy,
    metrics: Option<Arc<Metrics>>,
}

impl ProbeSink for Sink {
    fn report(&self, backend: BackendId, result: &Result<(), ProbeError>, at: Instant) {
        let routes = self.proxy.routes();
        routes.balancer().report(backend, result, at);
        if let Some(m) = &self.metrics {
            let label = result
                .as_ref()
                .map_or_else(ProbeError::label, |()| "success");
            m.health_check(&label_of(&routes, backend, &backend.to_string()), label);
        }
    }
}

/// The running parts that a reload may replace.
struct Running {
    settings: Settings,
    checker: Option<Checker<AnyProber>>,
    ticketer: Arc<dyn rustls::server::ProducesTickets>,
    /// The backends in force: the config's, with the admin API's changes since.
    backends: Vec<(String, Weight)>,
    /// What the admin API changed since the config was loaded (a reload discards it).
    changes: Vec<String>,
    /// Each name's last known backends, by the name as written (`url` or `srv`).
    discovered: BTreeMap<String, Vec<Found>>,
    /// The tasks re-resolving the names (a reload replaces them).
    watchers: Vec<tokio::task::AbortHandle>,
}

/// The set in force: `backends` (the config's static ones with the admin API's changes),
/// then every name's last known backends in config order; an address already in the set
/// (configured, added, or found under an earlier name) is not added twice.
fn merged(
    backends: &[(String, Weight)],
    names: &[NameSpec],
    discovered: &BTreeMap<String, Vec<Found>>,
) -> Vec<BackendSpec> {
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for (url, w) in backends {
        if let Ok(a) = lb_proxy::parse_backend(url) {
            seen.insert(a.identity());
        }
        out.push(BackendSpec::new(url.clone(), *w));
    }
    for n in names {
        for f in discovered.get(&n.written).into_iter().flatten() {
            let id = lb_proxy::parse_backend(&f.url).map(|a| a.identity());
            if id.is_ok_and(|id| seen.insert(id)) {
                out.push(f.spec());
            }
        }
    }
    out
}

/// What SIGHUP and the admin API both change, shared by the control task and the admin
/// server (both on the control thread).
///
/// # Why one handle
/// A reload and an admin change each rebuild the routes from a backend list and then point
/// the health checker at the new set; the admin API's changes must also be remembered so a
/// reload can say which it discarded. Keeping the list, the checker and the change log in
/// one place, and running every change under one async lock (`ops`), means a reload never
/// interleaves with an admin change at an await point (probe targets are resolved with
/// DNS), and the admin server needs no channel of its own into the control loop.
pub(crate) struct Control {
    proxy: Proxy,
    sink: Arc<dyn ProbeSink>,
    metrics: Option<Arc<Metrics>>,
    running: Mutex<Running>,
    ops: tokio::sync::Mutex<()>,
}

/// Why an admin change was refused.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AdminError {
    /// No backend at that `host:port` (404).
    #[error("no backend {0}")]
    NotFound(String),
    /// A backend with that identity exists (409).
    #[error("backend {0} exists")]
    Exists(String),
    /// The URL or the resulting set is not valid (400).
    #[error(transparent)]
    Route(#[from] lb_proxy::RouteError),
    /// A weight change or removal of a backend DNS found: DNS owns those (409).
    #[error(
        "backend {0} was found by DNS: its weight and membership follow DNS (a drain is allowed)"
    )]
    Discovered(String),
    /// An `https://` backend while lb has no verifier for backends' certificates (400).
    #[error("cannot add https backend {0}: lb verifies backends' certificates only when the config has an https backend or [tls] upstream_ca (then reload or restart)")]
    NoVerifier(String),
}

/// The backend in `backends` at `authority` (`host:port`), compared as identities are: host
/// case-insensitive without a trailing dot, an IP address in any form (`[0:0::1]` is `[::1]`).
fn find(backends: &[(String, Weight)], authority: &str) -> Option<usize> {
    let key = |a: &lb_proxy::BackendAddr| {
        let port = a.authority.port_u16().unwrap_or(0);
        lb_proxy::backend_identity(false, a.authority.host(), port)
    };
    let want = key(&lb_proxy::parse_backend(authority).ok()?);
    backends
        .iter()
        .position(|(url, _)| lb_proxy::parse_backend(url).is_ok_and(|a| key(&a) == want))
}

// === impl Control ===

impl Control {
    fn running(&self) -> std::sync::MutexGuard<'_, Running> {
        self.running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The admin API's bearer token, if one is configured.
    pub(crate) fn token(&self) -> Option<crate::admin::Token> {
        self.running().settings.admin_token.clone()
    }

    /// The proxy.
    pub(crate) const fn proxy(&self) -> &Proxy {
        &self.proxy
    }

    /// `url`'s status entry in the routes in force.
    fn status_of(&self, url: &str) -> Option<BackendStatus> {
        let routes = self.proxy.routes();
        let found = routes
            .balancer()
            .backends(Instant::now())
            .into_iter()
            .find(|b| b.addr == url);
        found
    }

    /// Rebuilds the routes on the balancer in force from `backends` (backends that stay
    /// keep their state; requests in flight keep the routes they started with), then
    /// points the probes at the new set.
    async fn apply(&self, backends: Vec<(String, Weight)>) -> Result<(), AdminError> {
        let current = self.proxy.routes();
        let (hash_key, specs) = {
            let r = self.running();
            let specs = merged(&backends, &r.settings.names, &r.discovered);
            (r.settings.hash_key.clone(), specs)
        };
        self.proxy.replace_routes(|| {
            Routes::from_specs(
                Arc::clone(current.balancer()),
                &specs,
                hash_key,
                Instant::now(),
            )
        })?;
        let client = self.running().settings.tls.client.clone();
        let targets = probe_targets(&self.proxy.routes(), client.as_ref()).await;
        let mut r = self.running();
        if let Some(c) = &r.checker {
            c.set_targets(targets);
        }
        r.backends = backends;
        Ok(())
    }

    /// The name (`url` or `srv` as written) a backend in force was found under, if DNS
    /// found it (`/status` `"name"`).
    pub(crate) fn name_of(&self, url: &str) -> Option<String> {
        let r = self.running();
        let found = r
            .settings
            .names
            .iter()
            .find(|n| {
                r.discovered
                    .get(&n.written)
                    .is_some_and(|f| f.iter().any(|f| f.url == url))
            })
            .map(|n| n.written.clone());
        // A static backend at the same address is the config's, not DNS's.
        found.filter(|_| !r.backends.iter().any(|(u, _)| u == url))
    }

    /// A lookup of `name` answered: a new set applies like a reload on the balancer in
    /// force (the static backends with the admin API's changes, plus every name's last
    /// known set), a failure keeps the last known set.
    async fn discovered(&self, name: &NameSpec, answer: &Answer) {
        let _op = self.ops.lock().await;
        let found = match answer {
            Answer::Found(found, _) => found.clone(),
            Answer::Empty => Vec::new(),
            Answer::Failed(why) => {
                tracing::warn!(target: "lb::discovery", name = %name.written, error = %why, "DNS lookup failed: keeping the last known addresses");
                if let Some(m) = &self.metrics {
                    m.discovery_error(&name.written);
                }
                return;
            }
        };
        let backends = {
            let mut r = self.running();
            // A reload may have dropped the name while this lookup ran.
            if !r.settings.names.iter().any(|n| n == name) {
                return;
            }
            if r.discovered.get(&name.written) == Some(&found) {
                return;
            }
            let urls: Vec<&str> = found.iter().map(|f| f.url.as_str()).collect();
            tracing::info!(target: "lb::discovery", name = %name.written, backends = %urls.join(","), "DNS answer changed");
            let before = r.discovered.insert(name.written.clone(), found);
            (r.backends.clone(), before)
        };
        let (backends, before) = backends;
        if let Err(e) = self.apply(backends).await {
            tracing::warn!(target: "lb::discovery", name = %name.written, error = %e, "cannot apply DNS answer: keeping the last known addresses");
            // The set in force stays the one the routes have: an answer they refuse must
            // not make every later admin change, answer or reload fail with it.
            let mut r = self.running();
            match before {
                Some(b) => r.discovered.insert(name.written.clone(), b),
                None => r.discovered.remove(&name.written),
            };
        }
    }

    fn record(&self, change: String) {
        tracing::info!(target: "lb::admin", "admin: {change}");
        self.running().changes.push(change);
    }

    /// `POST /backends`: adds `url` with `weight`.
    pub(crate) async fn add(&self, url: &str, weight: Weight) -> Result<BackendStatus, AdminError> {
        let _op = self.ops.lock().await;
        let addr = lb_proxy::parse_backend(url)?;
        // The verifier is built from the config (system roots, upstream_ca) at load time.
        if addr.https && self.proxy.tls().client.is_none() {
            return Err(AdminError::NoVerifier(url.to_owned()));
        }
        let identity = addr.identity();
        let mut backends = self.running().backends.clone();
        if backends
            .iter()
            .any(|(u, _)| lb_proxy::parse_backend(u).is_ok_and(|a| a.identity() == identity))
        {
            return Err(AdminError::Exists(url.to_owned()));
        }
        backends.push((url.to_owned(), weight));
        self.apply(backends).await?;
        self.record(format!("added backend {url} (weight {})", weight.get()));
        self.status_of(url)
            .ok_or_else(|| AdminError::NotFound(url.to_owned()))
    }

    /// `PATCH /backends/{authority}`: a new weight and/or the start or end of a drain.
    pub(crate) async fn change(
        &self,
        authority: &str,
        weight: Option<Weight>,
        drain: Option<bool>,
    ) -> Result<BackendStatus, AdminError> {
        let _op = self.ops.lock().await;
        let not_found = || AdminError::NotFound(authority.to_owned());
        let r = self.running();
        let i = find(&r.backends, authority);
        let (url, old) = match i {
            Some(i) => r.backends[i].clone(),
            // A discovered backend: it can be drained; DNS owns its weight.
            None => {
                let specs = merged(&r.backends, &r.settings.names, &r.discovered);
                let found = specs
                    .into_iter()
                    .find(|b| {
                        lb_proxy::parse_backend(&b.url)
                            .is_ok_and(|a| a.authority.as_str().eq_ignore_ascii_case(authority))
                    })
                    .ok_or_else(not_found)?;
                if weight.is_some() {
                    return Err(AdminError::Discovered(found.url));
                }
                (found.url, found.weight)
            }
        };
        drop(r);
        let status = self.status_of(&url).ok_or_else(not_found)?;
        let routes = self.proxy.routes();
        let now = Instant::now();
        if let Some(w) = weight {
            // The list too: the next rebuild (an add or a remove) sets weights from it.
            if let Some(i) = i {
                self.running().backends[i].1 = w;
            }
            routes.balancer().set_weight(status.id, w, now);
            if w != old {
                self.record(format!(
                    "backend {url}: weight {} -> {}",
                    old.get(),
                    w.get()
                ));
            }
        }
        if let Some(on) = drain {
            routes.balancer().set_draining(status.id, on, now);
            if on != status.draining {
                let what = if on { "drain on" } else { "drain off" };
                self.record(format!("backend {url}: {what}"));
            }
        }
        self.status_of(&url).ok_or_else(not_found)
    }

    /// `DELETE /backends/{authority}`: drains the backend and removes it. Its requests in
    /// flight finish (they hold the routes they started with); no new one goes there.
    pub(crate) async fn remove(&self, authority: &str) -> Result<BackendStatus, AdminError> {
        let _op = self.ops.lock().await;
        let not_found = || AdminError::NotFound(authority.to_owned());
        let mut backends = self.running().backends.clone();
        let Some(i) = find(&backends, authority) else {
            let r = self.running();
            let discovered = merged(&r.backends, &r.settings.names, &r.discovered)
                .into_iter()
                .find(|b| {
                    lb_proxy::parse_backend(&b.url)
                        .is_ok_and(|a| a.authority.as_str().eq_ignore_ascii_case(authority))
                });
            return Err(discovered.map_or_else(not_found, |b| AdminError::Discovered(b.url)));
        };
        let (url, _) = backends.remove(i);
        let status = self.status_of(&url).ok_or_else(not_found)?;
        self.proxy
            .routes()
            .balancer()
            .set_draining(status.id, true, Instant::now());
        let status = self.status_of(&url).unwrap_or(status);
        self.apply(backends).await?;
        self.record(format!("removed backend {url}"));
        Ok(status)
    }
}

/// The resolver, each name's first backends, and when to ask each again.
type FirstResolution = (
    Arc<hickory_resolver::TokioResolver>,
    BTreeMap<String, Vec<Found>>,
    BTreeMap<String, Duration>,
);

/// The resolver for `settings`' names and their first answers (every name at once), or
/// none without names. A name that does not resolve starts with no backends.
async fn first_resolution(
    settings: &Settings,
    metrics: Option<&Metrics>,
) -> Option<FirstResolution> {
    if settings.names.is_empty() {
        return None;
    }
    if let Some(m) = metrics {
        m.discovery_names(settings.names.iter().map(|n| n.written.as_str()));
    }
    let resolver = match discovery::resolver(&settings.discovery) {
        Ok(r) => Arc::new(r),
        Err(e) => {
            // No /etc/resolv.conf: names get no backends, the static ones still serve.
            tracing::error!(target: "lb::discovery", error = %e, "cannot set up the DNS resolver: names are not resolved");
            return None;
        }
    };
    let mut set = tokio::task::JoinSet::new();
    for n in settings.names.clone() {
        let r = Arc::clone(&resolver);
        set.spawn(async move {
            let a = discovery::resolve(&r, &n).await;
            (n, a)
        });
    }
    let mut discovered = BTreeMap::new();
    let mut next = BTreeMap::new();
    while let Some(Ok((n, answer))) = set.join_next().await {
        next.insert(
            n.written.clone(),
            discovery::next_refresh(&answer, settings.discovery.refresh),
        );
        match answer {
            Answer::Found(found, _) => {
                discovered.insert(n.written, found);
            }
            Answer::Empty => {
                tracing::warn!(target: "lb::discovery", name = %n.written, "name has no addresses: no backends from it until it has");
            }
            Answer::Failed(why) => {
                tracing::warn!(target: "lb::discovery", name = %n.written, error = %why, "DNS lookup failed at start-up: retrying");
                if let Some(m) = metrics {
                    m.discovery_error(&n.written);
                }
            }
        }
    }
    Some((resolver, discovered, next))
}

/// Starts one task per name of `settings` that re-resolves it and hands each answer to
/// `control`.
fn watch(
    control: &Arc<Control>,
    resolver: &Arc<hickory_resolver::TokioResolver>,
    settings: &Settings,
    first: &BTreeMap<String, Duration>,
) -> Vec<tokio::task::AbortHandle> {
    let refresh = settings.discovery.refresh;
    settings
        .names
        .iter()
        .map(|n| {
            // After start-up's lookup, as its answer says; after a reload (none), at once.
            let mut wait = first.get(&n.written).copied().unwrap_or(Duration::ZERO);
            let (control, resolver, n) = (Arc::clone(control), Arc::clone(resolver), n.clone());
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(wait).await;
                    let answer = discovery::resolve(&resolver, &n).await;
                    control.discovered(&n, &answer).await;
                    wait = discovery::next_refresh(&answer, refresh);
                }
            })
            .abort_handle()
        })
        .collect()
}

fn balancer(settings: &Settings) -> Result<Arc<Balancer>, StartupError> {
    let b = Balancer::new(settings.core.clone(), AnySelect::new(settings.strategy))
        .map_err(lb_proxy::RouteError::Core)?;
    Ok(Arc::new(b))
}

/// Each backend's probe target; an `https://` one's probes handshake and verify with
/// `client`, as requests do.
async fn probe_targets(
    routes: &Routes,
    client: Option<&Arc<rustls::ClientConfig>>,
) -> Vec<(BackendId, Target)> {
    let mut targets = Vec::new();
    for b in routes.balancer().backends(Instant::now()) {
        let Some(t) = routes.target(b.id) else {
            continue;
        };
        match tokio::net::lookup_host(t.authority.as_str())
            .await
            .ok()
            .and_then(|mut a| a.next())
        {
            Some(addr) => {
                let mut target = Target::new(addr).with_authority(t.authority.as_str());
                if let (Some(name), Some(client)) = (t.server_name(), client) {
                    let connector = tokio_rustls::TlsConnector::from(Arc::clone(client));
                    target = target.with_tls(connector, name.clone());
                }
                targets.push((b.id, target));
            }
            None => {
                tracing::warn!(target: "lb::health", backend = %t.url, "cannot resolve backend: not probed")
            }
        }
    }
    targets
}

fn checker(settings: &Settings, sink: Arc<dyn ProbeSink>) -> Option<Checker<AnyProber>> {
    let h = &settings.health;
    if h.interval.is_zero() {
        return None;
    }
    let prober = h.path.as_ref().map_or(AnyProber::Tcp(TcpProber), |p| {
        AnyProber::Http(HttpProber::new(p.clone()))
    });
    let config = CheckerConfig {
        interval: h.interval,
        timeout: h.timeout,
        ..CheckerConfig::default()
    };
    Some(Checker::new(prober, config, sink))
}

/// How many worker threads serve traffic: one per core (thread-per-core, see
/// [`Proxy::for_worker`]), or one when a listen address asks the kernel for a port.
fn worker_count(settings: &Settings) -> usize {
    if settings.listen.iter().any(|a| a.port() == 0) {
        return 1;
    }
    std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
}

/// A listening socket that other workers can share (`SO_REUSEPORT`: the kernel spreads new
/// connections over them).
fn reuseport_listener(addr: SocketAddr, share: bool) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    if share {
        socket.set_reuse_port(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// Runs `lb` until SIGTERM/SIGINT, then drains and returns: one control thread (signals,
/// reload, health checks, admin server) and one serving thread per core.
pub(crate) fn start(cli: Cli, settings: Settings) -> Result<(), StartupError> {
    let workers = worker_count(&settings);
    let mut listeners: Vec<Vec<std::net::TcpListener>> = (0..workers).map(|_| Vec::new()).collect();
    for &addr in &settings.listen {
        let err = |source| StartupError::Listen { addr, source };
        if workers > 1 {
            // SO_REUSEPORT would let a second lb share the port: ask for it alone first, so
            // "address in use" is still an error.
            drop(std::net::TcpListener::bind(addr).map_err(err)?);
        }
        for set in &mut listeners {
            set.push(reuseport_listener(addr, workers > 1).map_err(err)?);
        }
    }
    let admin = match settings.admin {
        Some(addr) => {
            let l = std::net::TcpListener::bind(addr)
                .map_err(|source| StartupError::Listen { addr, source })?;
            l.set_nonblocking(true)?;
            Some(l)
        }
        None => None,
    };
    // The connection limit is the process's: the workers share one (`Proxy::for_worker`).
    let control = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    control.block_on(run(cli, settings, listeners, admin))
}

async fn run(
    cli: Cli,
    settings: Settings,
    listeners: Vec<Vec<std::net::TcpListener>>,
    admin: Option<std::net::TcpListener>,
) -> Result<(), StartupError> {
    let metrics = admin.as_ref().map(|_| Arc::new(Metrics::new()));
    let observer: Arc<dyn Observer> = match &metrics {
        Some(m) => m.clone(),
        None => Arc::new(NoObserver),
    };
    // The first resolution is not a change: its backends start like configured ones.
    let resolver = first_resolution(&settings, metrics.as_deref()).await;
    let discovered = resolver
        .as_ref()
        .map(|(_, d, _)| d.clone())
        .unwrap_or_default();
    let routes = Routes::from_specs(
        balancer(&settings)?,
        &merged(&settings.backends, &settings.names, &discovered),
        settings.hash_key.clone(),
        Instant::now(),
    )?;
    let proxy = Proxy::with_observer(settings.proxy, routes, observer);
    let ticketer = lb_proxy::tls::ticketer()?;
    proxy.set_tls(tls_config(&settings, &ticketer)?);
    let sink: Arc<dyn ProbeSink> = Arc::new(Sink {
        proxy: proxy.clone(),
        metrics: metrics.clone(),
    });
    let checker = checker(&settings, Arc::clone(&sink));
    if let Some(c) = &checker {
        c.set_targets(probe_targets(&proxy.routes(), settings.tls.client.as_ref()).await);
    }
    let control = Arc::new(Control {
        proxy: proxy.clone(),
        sink: Arc::clone(&sink),
        metrics: metrics.clone(),
        running: Mutex::new(Running {
            backends: settings.backends.clone(),
            settings: settings.clone(),
            checker,
            ticketer,
            changes: Vec::new(),
            discovered,
            watchers: Vec::new(),
        }),
        ops: tokio::sync::Mutex::new(()),
    });
    if let Some((resolver, _, next)) = resolver {
        let watchers = watch(&control, &resolver, &settings, &next);
        control.running().watchers = watchers;
    }
    let admin_task = match (admin, &metrics) {
        (Some(l), Some(m)) => Some(tokio::spawn(crate::admin::serve(
            TcpListener::from_std(l)?,
            Arc::clone(&control),
            Arc::clone(m),
        ))),
        _ => None,
    };
    let listen: Vec<String> = settings.listen.iter().map(ToString::to_string).collect();
    tracing::info!(
        target: "lb",
        listen = %listen.join(","),
        admin = %settings.admin.map_or("off".into(), |a| a.to_string()),
        strategy = %settings.strategy,
        backends = settings.backends.len(),
        names = settings.names.len(),
        workers = listeners.len(),
        "lb started"
    );

    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sighup = signal(SignalKind::hangup())?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let drain = settings.drain;
    let mut threads = Vec::new();
    for (i, set) in listeners.into_iter().enumerate() {
        // Worker 0 keeps the original proxy, which also runs lb-core's timer.
        let worker = if i == 0 {
            proxy.clone()
        } else {
            proxy.for_worker()
        };
        let mut stop = stop_rx.clone();
        let thread = std::thread::Builder::new()
            .name(format!("lb-worker-{i}"))
            .spawn(move || {
                // Access-log lines wait in this thread's buffer until it runs out of work.
                crate::log::buffer_this_thread();
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .on_thread_park(crate::log::flush_this_thread)
                    .build()?;
                rt.block_on(async move {
                    let mut bound = Vec::with_capacity(set.len());
                    for l in set {
                        bound.push(TcpListener::from_std(l)?);
                    }
                    let stopped = async move {
                        let _ = stop.wait_for(|s| *s).await;
                    };
                    // Ends with the runtime, after `serve`.
                    tokio::spawn(crate::log::flush_periodically());
                    worker
                        .serve(bound, stopped, drain)
                        .await
                        .map_err(std::io::Error::other)
                })
            })?;
        threads.push(thread);
    }
    loop {
        // The lines of requests answered before the signal go before its own.
        tokio::select! {
            _ = sigterm.recv() => {
                crate::log::flush_workers().await;
                tracing::info!(target: "lb", "SIGTERM: draining");
                break;
            }
            _ = sigint.recv() => {
                crate::log::flush_workers().await;
                tracing::info!(target: "lb", "SIGINT: draining");
                break;
            }
            _ = sighup.recv() => {
                crate::log::flush_workers().await;
                reload(&cli, &control).await;
            }
        }
    }
    let _ = stop_tx.send(true);
    let joined = tokio::task::spawn_blocking(move || {
        threads.into_iter().map(|t| t.join()).collect::<Vec<_>>()
    })
    .await;
    for r in joined.unwrap_or_default() {
        match r {
            Ok(Err(e)) => tracing::warn!(target: "lb", error = %e, "worker stopped with an error"),
            Err(_) => tracing::warn!(target: "lb", "worker panicked"),
            Ok(Ok(())) => {}
        }
    }
    for w in control.running().watchers.drain(..) {
        w.abort();
    }
    let checker = control.running().checker.take();
    if let Some(c) = checker {
        c.shutdown();
    }
    if let Some(t) = admin_task {
        t.abort();
    }
    tracing::info!(target: "lb", "stopped");
    Ok(())
}

/// SIGHUP: re-read the config file; apply it if valid, keep the old one otherwise. Requests
/// in flight finish with the routes they started with; probes of backends that stay go on.
///
/// Runtime changes made through the admin API are discarded (and logged): the config's
/// backends, weights and drains win.
async fn reload(cli: &Cli, control_arc: &Arc<Control>) {
    let control: &Control = control_arc;
    let _op = control.ops.lock().await;
    let (proxy, running, sink) = (&control.proxy, &control.running, &control.sink);
    let new = match config::load(cli) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(target: "lb", error = %e, "reload failed: keeping the running configuration");
            return;
        }
    };
    let (old_settings, ticketer, old_specs, discovered) = {
        let r = running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Names the new config keeps keep their last known backends; new ones are
        // resolved by their watchers, which start at once.
        let discovered: BTreeMap<String, Vec<Found>> = r
            .discovered
            .iter()
            .filter(|(w, _)| {
                new.names
                    .iter()
                    .any(|n| &n.written == *w && r.settings.names.contains(n))
            })
            .map(|(w, f)| (w.clone(), f.clone()))
            .collect();
        (
            r.settings.clone(),
            Arc::clone(&r.ticketer),
            merged(&r.backends, &r.settings.names, &r.discovered),
            discovered,
        )
    };
    let new_specs = merged(&new.backends, &new.names, &discovered);
    let mut new = new;
    new.tls.keep_client_of(&old_settings.tls);
    // Built before anything changes: a certificate rustls refuses keeps the old ones (and
    // everything else) in force.
    let tls = match tls_config(&new, &ticketer) {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(target: "lb", error = %e, "reload failed: keeping the running configuration");
            return;
        }
    };
    for (what, changed) in [
        ("listen", new.listen != old_settings.listen),
        ("admin", new.admin != old_settings.admin),
        (
            "timeouts and limits",
            new.proxy != old_settings.proxy || new.drain != old_settings.drain,
        ),
        ("log_format", new.log_format != old_settings.log_format),
    ] {
        if changed {
            tracing::warn!(target: "lb", "reload: {what} changes take effect after a restart");
        }
    }
    // Same strategy and core settings: keep the balancer (and every backend's state).
    let current = proxy.routes();
    let same_balancer = new.strategy == old_settings.strategy && new.core == old_settings.core;
    let mut old_checker = running
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .checker
        .take();
    // TLS first: a request routed to a new https backend finds its verifier in force. New
    // connections get the new certificates; established ones keep theirs.
    let old_tls = proxy.tls();
    // Until the swap, requests on the old routes may still pick an https backend the new
    // config dropped: the old verifier stays for them while there is no new one.
    let needs_old_client = tls.client.is_none() && old_tls.client.is_some();
    let during = lb_proxy::TlsConfig {
        server: tls.server.clone(),
        client: tls.client.clone().or_else(|| old_tls.client.clone()),
    };
    proxy.set_tls(if needs_old_client {
        during
    } else {
        tls.clone()
    });
    let swapped = if same_balancer {
        // Building the routes changes the balancer in force: build and swap as one step,
        // or a request between the two could pick a backend its routes do not know.
        proxy
            .replace_routes(|| {
                let now = Instant::now();
                let routes = Routes::from_specs(
                    Arc::clone(current.balancer()),
                    &new_specs,
                    new.hash_key.clone(),
                    now,
                )?;
                // The config wins over the admin API: a drain it made ends here.
                let balancer = routes.balancer();
                for b in balancer.backends(now).iter().filter(|b| b.draining) {
                    balancer.set_draining(b.id, false, now);
                }
                Ok::<_, lb_proxy::RouteError>(routes)
            })
            .map_err(StartupError::from)
    } else {
        balancer(&new)
            .and_then(|b| {
                Ok(Routes::from_specs(
                    b,
                    &new_specs,
                    new.hash_key.clone(),
                    Instant::now(),
                )?)
            })
            .map(|routes| {
                // A new balancer numbers its backends afresh: stop the old probes before
                // its ids could be mistaken for the new ones.
                if let Some(c) = old_checker.take() {
                    c.shutdown();
                }
                proxy.set_routes(routes);
                // Requests in flight keep the old balancer for their retries: narrow it to
                // the backends the new config keeps, so that none of them goes to a removed
                // one (SPEC: whatever a reload changed, strategy included). Kept backends
                // keep their ids there, so the old routes still know them.
                let kept = old_specs
                    .iter()
                    .filter(|b| new_specs.iter().any(|n| n.url == b.url))
                    .map(|b| {
                        // The identity and priority the routes gave it, or it is a new
                        // member there.
                        let backend = lb_core::Backend::new(b.url.clone(), b.weight)
                            .with_priority(b.priority);
                        match lb_proxy::parse_backend(&b.url) {
                            Ok(a) => backend.with_identity(a.identity()),
                            Err(_) => backend,
                        }
                    });
                if let Err(e) = current.balancer().set_backends(kept, Instant::now()) {
                    tracing::warn!(target: "lb", error = %e, "reload: the old balancer kept its backends");
                }
            })
    };
    if let Err(e) = swapped {
        proxy.set_tls((*old_tls).clone());
        tracing::error!(target: "lb", error = %e, "reload failed: keeping the running configuration");
        running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .checker = old_checker;
        return;
    }
    if needs_old_client {
        proxy.set_tls(tls);
    }
    let targets = probe_targets(&proxy.routes(), new.tls.client.as_ref()).await;
    let checker = if new.health == old_settings.health && old_checker.is_some() {
        old_checker
    } else {
        if let Some(c) = old_checker {
            c.shutdown();
        }
        checker(&new, Arc::clone(sink))
    };
    if let Some(c) = &checker {
        c.set_targets(targets);
    }
    // Requests answered while the reload ran are logged before its line too.
    crate::log::flush_workers().await;
    tracing::info!(target: "lb", strategy = %new.strategy, backends = new.backends.len(), "configuration reloaded");
    let mut r = running
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if !r.changes.is_empty() {
        tracing::info!(
            target: "lb::admin",
            "reload discarded runtime changes: {}",
            r.changes.join("; ")
        );
        r.changes.clear();
    }
    r.backends = new.backends.clone();
    r.discovered = discovered;
    for w in r.watchers.drain(..) {
        w.abort();
    }
    if !new.names.is_empty() {
        if let Some(m) = &control.metrics {
            m.discovery_names(new.names.iter().map(|n| n.written.as_str()));
        }
        match discovery::resolver(&new.discovery) {
            Ok(resolver) => {
                drop(r);
                let watchers = watch(control_arc, &Arc::new(resolver), &new, &BTreeMap::new());
                let mut r = running
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                r.settings = new;
                r.checker = checker;
                r.watchers = watchers;
                return;
            }
            Err(e) => {
                tracing::error!(target: "lb::discovery", error = %e, "cannot set up the DNS resolver: names are not resolved");
            }
        }
    }
    r.settings = new;
    r.checker = checker;
}
