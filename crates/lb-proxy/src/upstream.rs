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
//!
//! # Only ready connections are pooled
//! A backend may answer before it has read the whole request body (an early 200, or a 413):
//! the client then has its whole response while the upload still runs on the connection, at
//! whatever pace the client sends it. Such a connection goes back to the pool only once hyper
//! is ready for a new request on it (the body sent, the response read): a small task waits
//! for that, which is the rare case hyper-util pays for on every request. The pool never
//! holds a busy connection, and a request never waits for one: it opens a new connection.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use http::uri::Authority;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::body::{BodyWatch, RequestBody, Wire};
use crate::classify::{is_stale_connection, SendError};
use crate::config::ProxyConfig;

type Idle = Vec<(Conn, Instant)>;

/// `TCP_NOTSENT_LOWAT` of upstream sockets: small enough that a body's last socket write is
/// close to its last byte read by the backend, large enough for few wake-ups per MiB.
#[cfg(any(target_os = "linux", target_os = "android"))]
const NOT_SENT_LOW_WATER: u32 = 32 * 1024;

/// How often a connection whose request is still being sent is checked for being done.
const POKE: Duration = Duration::from_millis(100);

/// One upstream connection: hyper's sender and the task that drives the socket.
#[derive(Debug)]
struct Conn {
    tx: SendRequest<RequestBody>,
    /// Aborting the task closes the socket at once, whatever hyper is still writing.
    task: tokio::task::AbortHandle,
    /// When its socket last took bytes (how far a streamed request body really got).
    wire: Arc<Wire>,
    /// Has the task poll hyper's connection again (see [`Lease::release`]).
    poke: Arc<tokio::sync::Notify>,
    /// An `https://` backend's connection: the TLS client config its certificate was
    /// verified with. Once a reload puts another in force (another `upstream_ca`), the
    /// connection is not reused: the backend must pass the verification in force.
    verified_with: Option<Arc<rustls::ClientConfig>>,
}

impl Conn {
    /// Closes the connection now: the backend sees the request end instead of getting the
    /// rest of a body nobody waits on.
    fn close(self) {
        self.task.abort();
    }

    /// Sends `req` and waits for the response head. Abandoned before it (the attempt timed
    /// out, the client left), the connection is closed at once: otherwise its task would
    /// go on sending the body to a backend whose answer nobody waits for, then pool nothing.
    async fn request(
        &mut self,
        req: Request<RequestBody>,
    ) -> Result<Response<Incoming>, hyper::client::conn::TrySendError<Request<RequestBody>>> {
        struct CloseOnDrop<'a>(Option<&'a tokio::task::AbortHandle>);
        impl Drop for CloseOnDrop<'_> {
            fn drop(&mut self) {
                if let Some(task) = self.0 {
                    task.abort();
                }
            }
        }
        let sent = self.tx.try_send_request(req);
        let mut guard = CloseOnDrop(Some(&self.task));
        let out = sent.await;
        guard.0 = None;
        out
    }
}

/// The socket of an upstream connection, telling its [`Wire`] each time it takes bytes.
#[derive(Debug)]
struct Watched {
    io: TcpStream,
    wire: Arc<Wire>,
}

impl Watched {
    fn wrote(&self, n: &std::task::Poll<std::io::Result<usize>>) {
        if matches!(n, std::task::Poll::Ready(Ok(n)) if *n > 0) {
            self.wire.wrote();
        }
    }
}

impl tokio::io::AsyncRead for Watched {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Watched {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let n = std::pin::Pin::new(&mut this.io).poll_write(cx, buf);
        this.wrote(&n);
        n
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let n = std::pin::Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.wrote(&n);
        n
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// What a pooled connection leads to: the backend's address, not its lb-core id (ids are
/// numbered afresh by a new balancer on reload, and an id must never reach a connection to
/// a backend that was removed). The hash is computed once per backend, when the routes are
/// built, so a checkout costs one `u64` hash and one short string comparison.
#[derive(Debug, Clone)]
pub(crate) struct PoolKey {
    hash: u64,
    authority: Authority,
    /// An `https://` backend: the name its certificate is verified for (and SNI).
    pub(crate) tls: Option<rustls::pki_types::ServerName<'static>>,
}

impl PoolKey {
    pub(crate) fn new(authority: &Authority, https: bool) -> Self {
        let scheme: &[u8] = if https { b"https://" } else { b"http://" };
        let mut id = scheme.to_vec();
        id.extend_from_slice(authority.as_str().to_ascii_lowercase().as_bytes());
        Self {
            hash: lb_core::stable_hash(&id),
            authority: authority.clone(),
            // `parse_backend` refused an https host that is not a server name.
            tls: https
                .then(|| crate::tls::server_name(authority.host()))
                .flatten(),
        }
    }
}

impl PartialEq for PoolKey {
    fn eq(&self, other: &Self) -> bool {
        self.hash == other.hash
            && self.authority == other.authority
            && self.tls.is_some() == other.tls.is_some()
    }
}

impl Eq for PoolKey {}

impl std::hash::Hash for PoolKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

/// The key's hash is already one: hashing it again is wasted work on every request.
#[derive(Debug, Default, Clone, Copy)]
struct KeyHasher(u64);

impl std::hash::Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) | u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type KeySet = std::collections::HashSet<PoolKey, std::hash::BuildHasherDefault<KeyHasher>>;

#[derive(Debug, Default)]
struct Pool {
    idle: HashMap<PoolKey, Idle, std::hash::BuildHasherDefault<KeyHasher>>,
    /// The backends routed to, as of the last [`Upstream::retain`] (`None`: not told yet, the
    /// routes the proxy started with): a connection to any other is closed, never pooled.
    routed: Option<KeySet>,
}

impl Pool {
    fn routes(&self, key: &PoolKey) -> bool {
        self.routed.as_ref().is_none_or(|r| r.contains(key))
    }
}

/// One worker's connections to every backend.
#[derive(Debug)]
pub(crate) struct Upstream {
    /// How `https://` backends are verified (shared by every worker, swapped on reload).
    tls: Arc<crate::tls::Shared>,
    connect_timeout: Duration,
    idle_timeout: Duration,
    max_idle: usize,
    pool: Mutex<Pool>,
}

/// A connection in use. [`Lease::release`] puts it back in the pool (after the whole response
/// was read); dropping it closes the connection (a response cut short, an upgrade).
#[derive(Debug)]
pub(crate) struct Lease {
    upstream: Arc<Upstream>,
    key: PoolKey,
    conn: Conn,
    /// The streamed request body sent on it and `timeouts.request`: a backend that answered
    /// early and then stops reading the rest is cut off after that long (SPEC: "also the
    /// longest a backend may stall reading the request body").
    body: Option<(Arc<BodyWatch>, Duration)>,
}

impl Lease {
    /// Closes the connection now (the response was not relayed whole: whatever it was still
    /// sending or receiving is of no use).
    pub(crate) fn close(self) {
        self.conn.close();
    }

    /// How long the backend may stall reading `body` (`timeouts.request`) once its response
    /// is relayed.
    pub(crate) fn bound_body(&mut self, body: Option<&Arc<BodyWatch>>, timeout: Duration) {
        self.body = body.map(|b| (Arc::clone(b), timeout));
    }

    /// Gives the connection back once it is ready for another request: at once when it is,
    /// or when the request body still being sent on it (the backend answered early) is done.
    /// A connection to a backend no longer routed is closed instead.
    pub(crate) fn release(self) {
        let Self {
            upstream,
            key,
            mut conn,
            body,
        } = self;
        if conn.tx.is_closed() || !upstream.pool().routes(&key) {
            conn.close();
            return;
        }
        if conn.tx.is_ready() {
            upstream.checkin(key, conn);
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return; // dropped: hyper closes it once the upload ends
        };
        // Bounded: a connection busy longer than it may sit idle is not worth keeping. Given
        // up on, it is not cut off: without its sender, hyper closes it once the upload ends.
        //
        // hyper asks for the next request only when its connection is polled after its write
        // buffer emptied; the last flush of a body it had buffered whole can end the poll
        // before that, and nothing wakes it again until the backend sends something. So the
        // wait pokes the connection's task now and then.
        let until = Instant::now() + upstream.idle_timeout;
        rt.spawn(async move {
            // While a request body is still going out, the stall check bounds the wait
            // instead: a slow but steady upload may take longer than the idle timeout.
            while Instant::now() < until || body.as_ref().is_some_and(|(b, _)| !b.is_done()) {
                let left = until.saturating_duration_since(Instant::now());
                let wait = if left.is_zero() { POKE } else { POKE.min(left) };
                match tokio::time::timeout(wait, conn.tx.ready()).await {
                    Ok(Ok(())) => return upstream.checkin(key, conn),
                    Ok(Err(_)) => return,
                    Err(_) => conn.poke.notify_one(),
                }
                let stalled = body.as_ref().is_some_and(|(b, timeout)| {
                    b.deadline(*timeout).is_some_and(|at| at <= Instant::now())
                });
                if stalled {
                    // The backend stopped reading the upload (not the client pausing, which
                    // `body_read` bounds): cut it off, which also frees the client's side.
                    tracing::debug!(target: "lb::upstream", "backend stalled reading a request body after answering: closing");
                    return conn.close();
                }
            }
            // Given up: without its sender, the polled connection closes when it is idle.
            let Conn { tx, poke, .. } = conn;
            drop(tx);
            poke.notify_one();
        });
    }
}

impl Upstream {
    pub(crate) fn new(config: &ProxyConfig, tls: Arc<crate::tls::Shared>) -> Self {
        Self {
            tls,
            connect_timeout: config.connect_timeout,
            idle_timeout: config.upstream_idle_timeout,
            max_idle: config.upstream_max_idle,
            pool: Mutex::new(Pool::default()),
        }
    }

    fn pool(&self) -> MutexGuard<'_, Pool> {
        self.pool
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The most recently used idle connection to `key`'s backend that is ready for a request
    /// now; any other met on the way is closed (a request never waits on a connection).
    fn checkout(&self, key: &PoolKey) -> Option<Conn> {
        let mut pool = self.pool();
        let idle = pool.idle.get_mut(key)?;
        while let Some((conn, since)) = idle.pop() {
            if conn.tx.is_ready() && since.elapsed() < self.idle_timeout && self.verified(&conn) {
                return Some(conn);
            }
            conn.close();
        }
        None
    }

    /// Whether `conn` was verified (if over TLS) with the TLS client config in force.
    fn verified(&self, conn: &Conn) -> bool {
        conn.verified_with.as_ref().is_none_or(|used| {
            self.tls
                .config
                .load()
                .client
                .as_ref()
                .is_some_and(|now| Arc::ptr_eq(used, now))
        })
    }

    fn checkin(&self, key: PoolKey, conn: Conn) {
        let mut pool = self.pool();
        if !pool.routes(&key) || !self.verified(&conn) {
            conn.close();
            return;
        }
        let idle = pool.idle.entry(key).or_default();
        if idle.len() < self.max_idle {
            idle.push((conn, Instant::now()));
        } else {
            conn.close();
        }
    }

    /// Closes connections idle longer than the idle timeout (or already closed by the
    /// backend), and forgets backends with none left (removed ones among them).
    pub(crate) fn sweep(&self) {
        let mut pool = self.pool();
        pool.idle.retain(|_, idle| {
            idle.retain(|(conn, since)| {
                !conn.tx.is_closed() && since.elapsed() < self.idle_timeout
            });
            !idle.is_empty()
        });
    }

    /// Closes every pooled connection to a backend not in `keep` (after a reload), and every
    /// one to them handed back later.
    pub(crate) fn retain<'a>(&self, keep: impl IntoIterator<Item = &'a PoolKey>) {
        let keep: KeySet = keep.into_iter().cloned().collect();
        let mut pool = self.pool();
        pool.idle.retain(|key, _| keep.contains(key));
        pool.routed = Some(keep);
    }

    /// Idle connections kept, over all backends.
    #[cfg(test)]
    pub(crate) fn idle_count(&self) -> usize {
        self.pool().idle.values().map(Vec::len).sum()
    }

    /// A new connection to `key`'s backend: TCP, then TLS for an `https://` one (verified
    /// as [`crate::tls::client_config`] says), both within the connect timeout. A TLS failure
    /// is a failed connect: nothing was sent.
    async fn connect(&self, key: &PoolKey) -> Result<Conn, SendError> {
        let deadline = Instant::now() + self.connect_timeout;
        let stream =
            match tokio::time::timeout_at(deadline, TcpStream::connect(key.authority.as_str()))
                .await
            {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return Err(SendError::ConnectRefused(e)),
                Err(_) => return Err(SendError::ConnectTimeout),
            };
        let _ = stream.set_nodelay(true);
        // The kernel keeps at most this much of a request unsent: beyond it, the socket takes
        // bytes only as the backend's receive window opens, which is to say as the backend
        // reads (see `Wire`). Bytes in flight are not limited, so neither is throughput.
        #[cfg(any(target_os = "linux", target_os = "android"))]
        let _ = socket2::SockRef::from(&stream).set_tcp_notsent_lowat(NOT_SENT_LOW_WATER);
        let wire = Arc::new(Wire::new());
        let io = Watched {
            io: stream,
            wire: Arc::clone(&wire),
        };
        let Some(name) = &key.tls else {
            return Self::handshake(io, wire, None).await;
        };
        let Some(client) = self.tls.config.load().client.clone() else {
            // Routes with an https backend come with a client config (lb-bin builds one);
            // an embedder that gave none gets a clear failure rather than plain HTTP.
            let e = std::io::Error::other("no TLS client configuration for https backends");
            self.tls.failed(key.authority.as_str(), &e);
            return Err(SendError::Tls(e));
        };
        let connector = tokio_rustls::TlsConnector::from(Arc::clone(&client));
        let tls = match tokio::time::timeout_at(deadline, connector.connect(name.clone(), io)).await
        {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                self.tls.failed(key.authority.as_str(), &e);
                return Err(SendError::Tls(e));
            }
            Err(_) => return Err(SendError::ConnectTimeout),
        };
        self.tls.succeeded(key.authority.as_str());
        Self::handshake(tls, wire, Some(client)).await
    }

    /// hyper's HTTP/1.1 client over `io`, driven by a task of its own.
    async fn handshake<I>(
        io: I,
        wire: Arc<Wire>,
        verified_with: Option<Arc<rustls::ClientConfig>>,
    ) -> Result<Conn, SendError>
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
    {
        let (tx, conn) = http1::Builder::new()
            .handshake(TokioIo::new(io))
            .await
            .map_err(|error| SendError::Failed {
                error,
                reused: false,
            })?;
        let poke = Arc::new(tokio::sync::Notify::new());
        let poked = Arc::clone(&poke);
        let task = tokio::spawn(async move {
            let mut conn = std::pin::pin!(conn.with_upgrades());
            let ended = loop {
                tokio::select! {
                    ended = &mut conn => break ended,
                    () = poked.notified() => {} // polls the connection again
                }
            };
            if let Err(e) = ended {
                tracing::trace!(target: "lb::upstream", error = %e, "upstream connection ended");
            }
        })
        .abort_handle();
        Ok(Conn {
            tx,
            task,
            wire,
            poke,
            verified_with,
        })
    }

    /// Sends `req` over a pooled connection to `key`'s backend, or a new one. When a pooled
    /// connection fails under a request it took, before any response byte (the keep-alive
    /// race), and `resend` gives the request again (it is the caller's, and lb-core's, to
    /// allow: once per request, safe requests only), it is re-sent on a fresh connection.
    /// `body`, a streamed body's watch, learns which connection it is sent on.
    pub(crate) async fn send(
        self: &Arc<Self>,
        key: &PoolKey,
        mut req: Request<RequestBody>,
        body: Option<&Arc<BodyWatch>>,
        resend: impl FnOnce() -> Option<Request<RequestBody>>,
    ) -> Result<(Response<Incoming>, Lease), SendError> {
        let watch = |conn: &Conn| {
            if let Some(b) = body {
                b.sent_on(&conn.wire);
            }
        };
        let lease = |conn| Lease {
            upstream: Arc::clone(self),
            key: key.clone(),
            conn,
            body: None,
        };
        while let Some(mut conn) = self.checkout(key) {
            watch(&conn);
            match conn.request(req).await {
                Ok(resp) => return Ok((resp, lease(conn))),
                Err(mut e) => match e.take_message() {
                    // Never written: the next connection (or a new one) gets it.
                    Some(back) => req = back,
                    None => {
                        let error = SendError::Failed {
                            error: e.into_error(),
                            reused: true,
                        };
                        if !is_stale_connection(&error) {
                            return Err(error);
                        }
                        let Some(again) = resend() else {
                            return Err(error);
                        };
                        tracing::debug!(target: "lb::upstream", backend = %key.authority, %error, "stale pooled connection, resending");
                        req = again;
                        break;
                    }
                },
            }
        }
        // Boxed: connecting is the rare case, and its future (the TCP connect and hyper's
        // handshake) would otherwise make every request's future larger, and every move of it
        // (hyper moves the service's future into place) a longer copy.
        let mut conn = Box::pin(self.connect(key)).await?;
        watch(&conn);
        match conn.request(req).await {
            Ok(resp) => Ok((resp, lease(conn))),
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
        let up = Arc::new(Upstream::new(&config, Arc::default()));
        let key = PoolKey::new(&authority, false);
        for _ in 0..5 {
            let (resp, lease) = up.send(&key, get(), None, || None).await.unwrap();
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
    async fn connections_to_a_removed_backend_are_dropped() {
        use http_body_util::BodyExt;
        let (authority, task) = backend().await;
        let up = Arc::new(Upstream::new(&ProxyConfig::default(), Arc::default()));
        let key = PoolKey::new(&authority, false);
        let (resp, lease) = up.send(&key, get(), None, || None).await.unwrap();
        let _ = resp.into_body().collect().await.unwrap();
        lease.release();
        up.retain([&key]);
        assert_eq!(up.idle_count(), 1, "still routed: kept");
        up.retain([]);
        assert_eq!(up.idle_count(), 0, "removed: closed");
        task.abort();
    }

    #[tokio::test]
    async fn a_connection_released_after_its_backend_was_removed_is_closed() {
        use http_body_util::BodyExt;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let authority: Authority = listener.local_addr().unwrap().to_string().parse().unwrap();
        let backend = tokio::spawn(async move {
            let (mut c, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            let _ = c.read(&mut buf).await.unwrap();
            c.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                .await
                .unwrap();
            // The proxy closing the connection ends this read.
            tokio::time::timeout(Duration::from_secs(15), c.read(&mut buf)).await
        });
        let up = Arc::new(Upstream::new(&ProxyConfig::default(), Arc::default()));
        let key = PoolKey::new(&authority, false);
        let (resp, lease) = up.send(&key, get(), None, || None).await.unwrap();
        up.retain([]); // the reload, while the response is still on its way
        let _ = resp.into_body().collect().await.unwrap();
        lease.release();
        assert_eq!(up.idle_count(), 0, "not pooled");
        assert!(
            matches!(backend.await.unwrap(), Ok(Ok(0))),
            "the backend sees the connection closed"
        );
    }

    #[tokio::test]
    async fn a_connection_still_sending_its_request_is_pooled_only_once_it_is_done() {
        use http_body_util::BodyExt;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        const LEN: usize = 8 << 20; // far beyond what socket buffers hold unread
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let authority: Authority = listener.local_addr().unwrap().to_string().parse().unwrap();
        let (go_tx, go) = tokio::sync::oneshot::channel::<()>();
        // Answers the upload at once, reads its body only when told to, then answers
        // every later request on the same connection; counts its connections.
        let backend = tokio::spawn(async move {
            let (mut c, _) = listener.accept().await.unwrap();
            let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
            let mut buf = vec![0u8; 65536];
            let mut seen = 0;
            while !buf[..seen].windows(4).any(|w| w == b"\r\n\r\n") {
                seen += c.read(&mut buf[seen..]).await.unwrap();
            }
            c.write_all(ok).await.unwrap();
            go.await.unwrap();
            let head = buf[..seen]
                .windows(4)
                .position(|w| w == b"\r\n\r\n")
                .unwrap()
                + 4;
            let mut body = seen - head;
            while body < LEN {
                body += c.read(&mut buf).await.unwrap();
            }
            loop {
                match c.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => c.write_all(ok).await.unwrap(),
                }
            }
        });
        let up = Arc::new(Upstream::new(&ProxyConfig::default(), Arc::default()));
        let key = PoolKey::new(&authority, false);
        let mut put = Request::new(RequestBody::Full(Some(bytes::Bytes::from(vec![b'a'; LEN]))));
        *put.method_mut() = http::Method::PUT;
        put.headers_mut()
            .insert(http::header::HOST, http::HeaderValue::from_static("x"));
        let (resp, lease) = up.send(&key, put, None, || None).await.unwrap();
        assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), "ok");
        lease.release();
        assert_eq!(up.idle_count(), 0, "still sending the upload: not pooled");
        go_tx.send(()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(15);
        while up.idle_count() == 0 {
            assert!(Instant::now() < deadline, "pooled once the upload is done");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // The backend accepts one connection only: a new one would never be answered.
        let (resp, lease) =
            tokio::time::timeout(Duration::from_secs(15), up.send(&key, get(), None, || None))
                .await
                .expect("answered on the pooled connection")
                .unwrap();
        assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), "ok");
        lease.release();
        assert_eq!(up.idle_count(), 1, "the same connection, reused");
        backend.abort();
    }

    #[tokio::test]
    async fn connect_failures_are_told_apart() {
        let closed: Authority = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().to_string().parse().unwrap()
        };
        let up = Arc::new(Upstream::new(&ProxyConfig::default(), Arc::default()));
        assert!(matches!(
            up.send(&PoolKey::new(&closed, false), get(), None, || None)
                .await,
            Err(SendError::ConnectRefused(_))
        ));
    }
}
