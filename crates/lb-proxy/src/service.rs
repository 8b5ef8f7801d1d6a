//! One request: read it, drive lb-core's decisions, relay what comes back.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use http::{header, HeaderMap, Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use lb_core::{Action, Completion, Failure, Outcome, RequestInfo, RequestState};

use crate::body::{BodySource, RequestBody, ResponseBody};
use crate::classify::{classify, is_stale_connection};
use crate::config::ProxyConfig;
use crate::conn::Phase;
use crate::headers;
use crate::observe::{Completed, Observer};
use crate::respond;
use crate::routes::Routes;
use crate::upstream::{Lease, Upstream};

/// What every connection and request shares.
pub(crate) struct Shared {
    pub(crate) config: ProxyConfig,
    /// Shared by every worker's `Shared`, so one reload reaches them all.
    pub(crate) routes: Arc<ArcSwap<Routes>>,
    pub(crate) upstream: Arc<Upstream>,
    pub(crate) observer: Arc<dyn Observer>,
    /// Whether this one runs lb-core's timer (one per balancer is enough).
    pub(crate) drive: bool,
}

/// The one clock of the shells: tokio's (so paused-time tests control it).
pub(crate) fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// A request from its head to the end of its response. Ends exactly once: `finish` when the
/// response is complete, or dropped (the client went away, or the task was cancelled),
/// which releases whatever lb-core holds for it and never counts against a backend.
#[derive(Debug)]
pub struct Exchange {
    routes: Arc<Routes>,
    st: Option<RequestState>,
    phase: Arc<Phase>,
    observer: Arc<dyn Observer>,
    method: Method,
    uri: Uri,
    status: u16,
    started: tokio::time::Instant,
}

impl std::fmt::Debug for dyn Observer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Observer")
    }
}

impl Exchange {
    pub(crate) fn finish(mut self, how: Completion) {
        self.end(how);
    }

    fn end(&mut self, how: Completion) {
        let elapsed = self.started.elapsed();
        let status = if how == Completion::ClientGone {
            499
        } else {
            self.status
        };
        self.observer.completed(&Completed {
            method: &self.method,
            uri: &self.uri,
            status,
            elapsed,
            how,
            routes: &self.routes,
            state: self.st.as_ref(),
        });
        match &self.st {
            Some(st) => {
                let backend = st
                    .attempts()
                    .last()
                    .and_then(|a| self.routes.target(a.backend));
                tracing::info!(
                    target: "lb::access",
                    method = %self.method,
                    path = %self.uri.path(),
                    status,
                    backend = %backend.map_or("-", |t| t.authority.as_str()),
                    attempts = st.attempt_count(),
                    duration = %Millis(elapsed),
                    duration = %Millis(elapsed),
                duration_ms = elapsed.as_secs_f64() * 1000.0,
                    trace = %self.routes.trace(st),
                    "request"
                );
            }
            None => tracing::info!(
                target: "lb::access",
                method = %self.method,
                path = %self.uri.path(),
                status,
                backend = "-",
                attempts = 0,
                duration = %Millis(elapsed),
                duration_ms = elapsed.as_secs_f64() * 1000.0,
                trace = "",
                "request"
            ),
        }
        if let Some(st) = self.st.take() {
            self.routes.balancer.finish(st, how, now());
        }
        self.phase.idle();
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        if self.st.is_some() {
            self.end(Completion::ClientGone);
        } else {
            self.phase.idle();
        }
    }
}

/// A duration as the access log shows it: `6.613ms`.
struct Millis(std::time::Duration);

impl std::fmt::Display for Millis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:.3}ms", self.0.as_secs_f64() * 1000.0)
    }
}

/// The parts of the request every attempt sends.
struct Outgoing {
    method: Method,
    path_and_query: http::uri::PathAndQuery,
    headers: HeaderMap,
    source: BodySource,
}

impl Outgoing {
    fn attempt(
        &self,
        authority: &http::uri::Authority,
    ) -> Result<Request<RequestBody>, http::Error> {
        // Origin form on the wire; `Host` is the client's (or, failing that, the backend's).
        let uri = Uri::from(self.path_and_query.clone());
        let mut req = Request::new(self.source.attempt());
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = uri;
        *req.version_mut() = Version::HTTP_11;
        *req.headers_mut() = self.headers.clone();
        if !req.headers().contains_key(header::HOST) {
            if let Ok(host) = http::HeaderValue::from_str(authority.as_str()) {
                req.headers_mut().insert(header::HOST, host);
            }
        }
        Ok(req)
    }
}

/// Serves one request; never fails (every failure is a response).
pub(crate) async fn handle(
    shared: Arc<Shared>,
    mut req: Request<Incoming>,
    peer: SocketAddr,
    xff: http::HeaderValue,
    phase: Arc<Phase>,
) -> Response<ResponseBody> {
    phase.busy();
    let routes = shared.routes.load_full();
    let mut ex = Exchange {
        routes: Arc::clone(&routes),
        st: None,
        phase,
        observer: Arc::clone(&shared.observer),
        method: req.method().clone(),
        uri: req.uri().clone(),
        status: 0,
        started: tokio::time::Instant::now(),
    };
    let version = req.version();
    let upgrade = version == Version::HTTP_11 && headers::is_upgrade(req.headers());
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let hash_key = routes.hash_key.of(req.uri(), req.headers(), peer);
    let (mut parts, body) = req.into_parts();
    let authority = parts.uri.authority().map(|a| a.as_str().to_owned());
    headers::forward(&mut parts.headers, authority.as_deref(), &xff, upgrade);
    let content_length = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let source = match BodySource::read(body, content_length, shared.config.replay_buffer).await {
        Ok(s) => s,
        Err(_) => return reply(ex, respond::synthetic(StatusCode::BAD_REQUEST), version),
    };
    let path_and_query = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
    let outgoing = Outgoing {
        method: parts.method,
        path_and_query,
        headers: parts.headers,
        source,
    };

    let mut info = RequestInfo::new(
        outgoing.method.is_idempotent(),
        outgoing.source.replayable() && !upgrade,
    );
    info.hash_key = hash_key;
    let balancer = &routes.balancer;
    let (st, mut action) = balancer.start(info, now());
    let st = ex.st.insert(st);
    loop {
        match action {
            Action::Forward {
                backend,
                not_before,
                try_deadline,
            } => {
                tokio::time::sleep_until(not_before.into()).await;
                let Some(target) = routes.target(backend) else {
                    // Picked from a backend set newer than this request's routes: not sent.
                    action = balancer.handle_outcome(st, Outcome::StaleConnection, now());
                    continue;
                };
                let Ok(req) = outgoing.attempt(&target.authority) else {
                    action = balancer.handle_outcome(st, Outcome::ConnectRefused, now());
                    continue;
                };
                let deadline = tokio::time::Instant::from_std(try_deadline);
                let mut result = tokio::time::timeout_at(
                    deadline,
                    shared.upstream.send(backend, &target.authority, req),
                )
                .await;
                if let Ok(Err(e)) = &result {
                    if info.idempotent && info.replayable && is_stale_connection(e) {
                        // A pooled connection closed under us: once more, on a fresh one.
                        tracing::debug!(target: "lb::upstream", backend = %target.authority, error = %e, "stale pooled connection, resending");
                        if let Ok(req) = outgoing.attempt(&target.authority) {
                            result = tokio::time::timeout_at(
                                deadline,
                                shared.upstream.send(backend, &target.authority, req),
                            )
                            .await;
                        }
                    }
                }
                let outcome = classify(&result);
                shared.observer.attempt(target, outcome);
                if let Ok(Err(e)) = &result {
                    tracing::debug!(target: "lb::upstream", backend = %target.authority, error = %e, ?outcome, "attempt failed");
                }
                action = balancer.handle_outcome(st, outcome, now());
                if let Some(decision) = st.last_decision() {
                    shared.observer.decision(decision);
                }
                if action == Action::Relay {
                    let Ok(Ok((resp, lease))) = result else {
                        // Relay only ever follows a response.
                        return reply(ex, respond::failure(Failure::BadGateway), version);
                    };
                    return relay(ex, resp, lease, version, client_upgrade);
                }
            }
            Action::Relay => return reply(ex, respond::failure(Failure::BadGateway), version),
            Action::Fail(f) => return reply(ex, respond::failure(f), version),
        }
    }
}

/// Answers with a response the proxy made.
fn reply(
    mut ex: Exchange,
    resp: Response<ResponseBody>,
    version: Version,
) -> Response<ResponseBody> {
    ex.status = resp.status().as_u16();
    let (mut parts, body) = resp.into_parts();
    parts.version = version;
    Response::from_parts(parts, body.with_exchange(ex))
}

/// Relays the backend's response: streamed, hop-by-hop fields removed; a 101 becomes a tunnel.
fn relay(
    mut ex: Exchange,
    mut resp: Response<Incoming>,
    lease: Lease,
    version: Version,
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
) -> Response<ResponseBody> {
    let status = resp.status();
    ex.status = status.as_u16();
    if status == StatusCode::SWITCHING_PROTOCOLS {
        if let Some(client) = client_upgrade {
            let upstream = hyper::upgrade::on(&mut resp);
            ex.phase.free();
            let (mut parts, _) = resp.into_parts();
            headers::strip_hop_by_hop(&mut parts.headers, true);
            parts.version = version;
            tokio::spawn(tunnel(client, upstream, ex));
            return Response::from_parts(parts, ResponseBody::empty());
        }
        // A 101 nobody asked for cannot be relayed.
        return reply(ex, respond::failure(Failure::BadGateway), version);
    }
    let (mut parts, body) = resp.into_parts();
    headers::strip_hop_by_hop(&mut parts.headers, false);
    parts.version = version;
    Response::from_parts(parts, ResponseBody::upstream(body, ex, lease))
}

/// Copies bytes both ways between the upgraded client and backend connections until either
/// side closes; the request stays in flight (and counted) meanwhile.
async fn tunnel(
    client: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    ex: Exchange,
) {
    let (client, upstream) = match tokio::try_join!(client, upstream) {
        Ok(both) => both,
        Err(e) => {
            tracing::debug!(target: "lb::upstream", error = %e, "upgrade failed");
            ex.finish(Completion::BackendFailed);
            return;
        }
    };
    let (mut client, mut upstream) = (TokioIo::new(client), TokioIo::new(upstream));
    let how = match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        Ok(_) => Completion::Done,
        Err(_) => Completion::ClientGone,
    };
    ex.finish(how);
}
