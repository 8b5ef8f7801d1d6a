//! One request: read it, drive lb-core's decisions, relay what comes back.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use http::{header, HeaderMap, Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use lb_core::{Action, BackendId, Completion, Failure, Outcome, RequestInfo};

use crate::body::{BodySource, BodyWatch, ClientFault, RequestBody, ResponseBody};
use crate::classify::{classify, AttemptResult, TimedOut, Verdict, NOT_SENT_HERE};
use crate::clock::now;
use crate::config::ProxyConfig;
use crate::exchange::{Ending, Exchange};
use crate::headers;
use crate::interim::{self, Interim};
use crate::observe::Observer;
use crate::phase::Phase;
use crate::respond;
use crate::routes::Routes;
use crate::upstream::{Lease, Upstream};
use crate::validate;

/// What every connection and request shares.
pub(crate) struct Shared {
    pub(crate) config: ProxyConfig,
    /// Shared by every worker's `Shared`, so one reload reaches them all.
    pub(crate) routes: Arc<ArcSwap<Routes>>,
    /// Held while a reload changes the balancer in force and swaps in the routes that go
    /// with its new backend set ([`crate::Proxy::replace_routes`]); shared like `routes`.
    pub(crate) swap: Arc<std::sync::Mutex<()>>,
    pub(crate) upstream: Arc<Upstream>,
    /// TLS in force, shared by every worker like `routes`.
    pub(crate) tls: Arc<crate::tls::Shared>,
    pub(crate) observer: Arc<dyn Observer>,
    /// Whether this one runs lb-core's timer (one per balancer is enough).
    pub(crate) drive: bool,
}

impl Shared {
    /// The routes in force, when they share `routes`' balancer and know `backend`: a reload
    /// that kept the balancer gave it a new backend set after this request took `routes`,
    /// and the balancer picked one only the new routes know. Waits for a swap under way
    /// (the lock is held only while the balancer's set changes and the routes are stored,
    /// never across an await), so a backend picked from the new set is always found.
    fn routes_knowing(&self, routes: &Routes, backend: BackendId) -> Option<Arc<Routes>> {
        drop(
            self.swap
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        let now = self.routes.load_full();
        (Arc::ptr_eq(&now.balancer, &routes.balancer) && now.target(backend).is_some())
            .then_some(now)
    }

    /// Whether a reload since this request took `routes` removed `target`: an attempt
    /// decided before it (then asleep in its backoff) must not go there (SPEC: after a
    /// reload, no request goes to a backend the new config removed).
    fn removed_since(&self, routes: &Routes, target: &crate::routes::Target) -> bool {
        let now = self.routes.load();
        !std::ptr::eq(&**now, routes) && !now.targets.values().any(|t| t.url == target.url)
    }
}

/// The parts of the request every attempt sends.
struct Outgoing {
    method: Method,
    path_and_query: http::uri::PathAndQuery,
    headers: HeaderMap,
    source: BodySource,
    /// Where a backend's 1xx go (HTTP/1.1 clients only).
    interim: Option<(Arc<Phase>, std::task::Waker)>,
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
        if let Some((phase, waker)) = &self.interim {
            Interim::watch(phase, waker, &mut req);
        }
        headers::host_or(req.headers_mut(), authority);
        Ok(req)
    }
}

/// Serves one request; never fails (every failure is a response).
pub(crate) async fn handle(
    shared: Arc<Shared>,
    mut req: Request<Incoming>,
    peer: SocketAddr,
    xff: http::HeaderValue,
    https: bool,
    phase: Arc<Phase>,
) -> Response<ResponseBody> {
    let mut routes = shared.routes.load_full();
    let mut ex = Exchange::start(
        Arc::clone(&routes),
        phase,
        Arc::clone(&shared.observer),
        req.method().clone(),
        req.uri().clone(),
    );
    let version = req.version();
    if let Err(rejected) = validate::admit(&mut req) {
        tracing::debug!(target: "lb::conn", %peer, reason = rejected.reason, status = %rejected.status, "request rejected");
        return reply(ex, rejected.response(version), version);
    }
    let upgrade = version == Version::HTTP_11 && headers::is_upgrade(req.headers());
    // What the client offered, to hold a backend's 101 to (the headers move on below).
    let client_upgrade = upgrade.then(|| {
        let offered: Vec<http::HeaderValue> = req
            .headers()
            .get_all(header::UPGRADE)
            .iter()
            .cloned()
            .collect();
        (offered, hyper::upgrade::on(&mut req))
    });
    let mut hash_key = routes.hash_key.of(req.uri(), req.headers(), peer);
    let (mut parts, body) = req.into_parts();
    let authority = parts.uri.authority().map(|a| a.as_str().to_owned());
    headers::forward(
        &mut parts.headers,
        authority.as_deref(),
        &xff,
        https,
        upgrade,
    );
    headers::frame_unknown_length(&mut parts.headers, http_body::Body::is_end_stream(&body));
    let content_length = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let config = &shared.config;
    let source = match BodySource::read(
        body,
        content_length,
        config.replay_buffer,
        config.body_read_timeout,
    )
    .await
    {
        Ok(s) => s,
        Err(fault) => return client_fault(ex, fault, version),
    };
    ex.body = source.watch().cloned();
    let path_and_query = validate::origin_form(&parts.uri);
    let outgoing = Outgoing {
        method: parts.method,
        path_and_query,
        headers: parts.headers,
        source,
        interim: match version {
            Version::HTTP_11 => Some((Arc::clone(&ex.phase), interim::task_waker().await)),
            _ => None,
        },
    };

    let base = RequestInfo::new(
        outgoing.method.is_idempotent(),
        outgoing.source.replayable() && !upgrade,
    );
    // Reading the body may take long, and a reload meanwhile must apply to this request,
    // which has picked nothing yet: a reload that changed the strategy left the removed
    // backends out of the new balancer only. So the routes in force now; and if their
    // balancer is swapped out just before the pick and had none left, the newer routes.
    let mut reloads = 0;
    // A reload can also leave a request that has started nowhere to go: its balancer (the
    // old one, narrowed to the backends the new config kept) may have none untried. A
    // request safe to send again (idempotent and replayable, or never sent) then starts
    // again on the routes in force.
    let resendable = base.idempotent() && base.replayable();
    let mut restarts = 0;
    'restart: loop {
        let (balancer, st, mut action) = loop {
            let current = shared.routes.load_full();
            if !Arc::ptr_eq(&current, &routes) {
                if current.hash_key != routes.hash_key {
                    hash_key = current.hash_key.of(&parts.uri, &outgoing.headers, peer);
                }
                ex.routes = Arc::clone(&current);
                routes = current;
            }
            let info = hash_key.map_or(base, |key| base.with_hash_key(key));
            let balancer = Arc::clone(&routes.balancer);
            let (st, action) = balancer.start(info, now());
            let swapped = || !Arc::ptr_eq(&shared.routes.load().balancer, &balancer);
            if action == Action::Fail(Failure::NoBackend) && reloads < 3 && swapped() {
                reloads += 1;
                continue;
            }
            break (balancer, st, action);
        };
        let st = ex.st.insert(st);
        loop {
            match action {
                Action::Forward {
                    backend,
                    not_before,
                    try_deadline,
                } => {
                    // tokio rounds a sleep up to its next millisecond tick: no backoff, no sleep.
                    if not_before > now() {
                        tokio::time::sleep_until(not_before.into()).await;
                    }
                    if routes.target(backend).is_none() {
                        if let Some(newer) = shared.routes_knowing(&routes, backend) {
                            ex.routes = Arc::clone(&newer);
                            routes = newer;
                        }
                    }
                    let Some(target) = routes.target(backend) else {
                        action = balancer.handle_outcome(st, NOT_SENT_HERE, now());
                        continue;
                    };
                    if shared.removed_since(&routes, target) {
                        action = balancer.handle_outcome(st, NOT_SENT_HERE, now());
                        continue;
                    }
                    let Ok(req) = outgoing.attempt(&target.authority) else {
                        action = balancer.handle_outcome(st, NOT_SENT_HERE, now());
                        continue;
                    };
                    let this_attempt = st.attempt_count().saturating_sub(1);
                    let timeout = try_deadline.saturating_duration_since(now());
                    let body = outgoing.source.watch();
                    // Pinned in place: moved into `within`, the attempt's future would take
                    // two slots of this one's state (every request's future, which hyper
                    // moves, byte for byte, into place).
                    let result: AttemptResult<Lease> = {
                        let send =
                            std::pin::pin!(shared.upstream.send(&target.key, req, body, || {
                                // The pool saw its connection die under a request it took, so it may have
                                // been written (`Reset`; one never taken the pool sends on by itself): lb-core
                                // allows one such resend per request, and records it in the trace.
                                if balancer.handle_resend(st, Outcome::Reset, now()) {
                                    outgoing.attempt(&target.authority).ok()
                                } else {
                                    None
                                }
                            }));
                        within(try_deadline, timeout, body, send).await
                    };
                    if st.resent() == Some(this_attempt) {
                        // The dead pooled send, counted like every send (`lb_requests_total`).
                        shared.observer.attempt(target, Outcome::StaleConnection);
                    }
                    let outcome = match classify(&result, outgoing.source.fault()) {
                        Verdict::Backend(outcome) => outcome,
                        Verdict::Client(fault, outcome) => {
                            // The request reached the backend before the client's body failed:
                            // a send like any other in `lb_requests_total` (and /status).
                            shared.observer.attempt(target, outcome);
                            tracing::debug!(target: "lb::upstream", backend = %target.authority, fault = fault.as_str(), "the client's request body failed");
                            return client_fault(ex, fault, version);
                        }
                    };
                    shared.observer.attempt(target, outcome);
                    match &result {
                        Ok(Err(e)) => {
                            tracing::debug!(target: "lb::upstream", backend = %target.authority, error = %e, ?outcome, "attempt failed");
                        }
                        Ok(Ok(_)) if outcome == Outcome::Reset => {
                            tracing::debug!(target: "lb::upstream", backend = %target.authority, "response with a transfer coding other than chunked");
                        }
                        _ => {}
                    }
                    action = balancer.handle_outcome(st, outcome, now());
                    if let Some(decision) = st.last_decision() {
                        shared.observer.decision(decision);
                    }
                    if action == Action::Relay {
                        let Ok(Ok((resp, mut lease))) = result else {
                            // Relay only ever follows a response.
                            return reply(ex, respond::failure(Failure::BadGateway), version);
                        };
                        lease.bound_body(outgoing.source.watch(), timeout);
                        return relay(ex, resp, lease, version, client_upgrade);
                    }
                }
                Action::Relay => return reply(ex, respond::failure(Failure::BadGateway), version),
                Action::Fail(f) => {
                    let swapped = !Arc::ptr_eq(&shared.routes.load().balancer, &balancer);
                    let never_sent = st.resent().is_none()
                        && st
                            .attempts()
                            .iter()
                            .all(|a| a.outcome().is_some_and(|o| !o.was_sent()));
                    if (resendable || never_sent) && swapped && restarts < 2 {
                        restarts += 1;
                        continue 'restart;
                    }
                    return reply(ex, respond::failure(f), version);
                }
            }
        }
    }
}

/// Runs an attempt until its response head, within `timeouts.request` (`timeout`) counted
/// from the request fully sent: a streamed body that is still being sent moves the deadline
/// (`try_deadline` at first) while the backend keeps reading it.
async fn within<T>(
    try_deadline: Instant,
    timeout: Duration,
    body: Option<&Arc<BodyWatch>>,
    mut attempt: Pin<&mut impl Future<Output = T>>,
) -> Result<T, TimedOut> {
    let mut at = tokio::time::Instant::from_std(try_deadline);
    loop {
        if let Ok(out) = tokio::time::timeout_at(at, attempt.as_mut()).await {
            return Ok(out);
        }
        match body.and_then(|b| b.deadline(timeout)) {
            Some(later) if later > tokio::time::Instant::now() => at = later,
            _ => return Err(TimedOut),
        }
    }
}

/// Answers a fault of the client's own: lb-core releases the request as for a client that
/// left (nothing charged to a backend, nothing retried).
fn client_fault(mut ex: Exchange, fault: ClientFault, version: Version) -> Response<ResponseBody> {
    ex.fault = Some(fault);
    reply(ex, respond::client_fault(fault, version), version)
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
    let ending = Ending {
        exchange: ex,
        lease: None,
    };
    Response::from_parts(parts, body.on_end(Box::new(ending)))
}

/// Relays the backend's response: streamed, hop-by-hop fields removed; a 101 becomes a tunnel.
fn relay(
    mut ex: Exchange,
    mut resp: Response<Incoming>,
    lease: Lease,
    version: Version,
    client_upgrade: Option<(Vec<http::HeaderValue>, hyper::upgrade::OnUpgrade)>,
) -> Response<ResponseBody> {
    let status = resp.status();
    ex.status = status.as_u16();
    if status == StatusCode::SWITCHING_PROTOCOLS {
        // A switch to a protocol the client did not offer would hand it a tunnel speaking
        // something it never asked for (RFC 9110 §7.8): not relayed either.
        let accepted = client_upgrade
            .filter(|(offered, _)| headers::upgrade_accepted(offered, resp.headers()));
        if let Some((_, client)) = accepted {
            let upstream = hyper::upgrade::on(&mut resp);
            ex.phase.free();
            let (mut parts, _) = resp.into_parts();
            headers::backward(&mut parts.headers, true);
            parts.version = version;
            tokio::spawn(tunnel(client, upstream, ex));
            return Response::from_parts(parts, ResponseBody::empty());
        }
        // A 101 nobody asked for (or to another protocol) cannot be relayed.
        return reply(ex, respond::failure(Failure::BadGateway), version);
    }
    let (mut parts, body) = resp.into_parts();
    headers::backward(&mut parts.headers, false);
    parts.version = version;
    let ending = Ending {
        exchange: ex,
        lease: Some(lease),
    };
    Response::from_parts(parts, ResponseBody::upstream(body).on_end(Box::new(ending)))
}

/// Copies bytes both ways between the upgraded client and backend connections until either
/// side closes, or until `timeouts.idle` passes with no byte either way; the request stays in
/// flight (and counted, in lb-core and in `max_connections`) meanwhile.
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
    let (client, upstream) = (TokioIo::new(client), TokioIo::new(upstream));
    let how = match crate::conn::splice(client, upstream, ex.phase.idle).await {
        Ok(()) => Completion::Done,
        Err(_) => Completion::ClientGone,
    };
    // The connection's place under `max_connections` goes with the last of `ex.phase`.
    ex.finish(how);
}
