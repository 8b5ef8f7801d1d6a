//! The admin server: `GET /metrics`, `/status`, `/debug/requests` (plain HTTP).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use lb_proxy::Proxy;
use serde_json::{json, Value};
use tokio::net::TcpListener;

use crate::metrics::Metrics;

/// Serves the admin endpoints on `listener` until the task is dropped.
pub(crate) async fn serve(listener: TcpListener, proxy: Proxy, metrics: Arc<Metrics>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let (proxy, metrics) = (proxy.clone(), Arc::clone(&metrics));
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let resp = route(&req, &proxy, &metrics);
                async move { Ok::<_, Infallible>(resp) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn route(req: &Request<Incoming>, proxy: &Proxy, metrics: &Metrics) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n".into());
    }
    let now = Instant::now();
    match req.uri().path() {
        "/metrics" => {
            let mut r = text(StatusCode::OK, metrics.encode(&proxy.routes(), now));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            r
        }
        "/status" => json_response(&status(proxy, now)),
        "/debug/requests" => json_response(&metrics.recent()),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /metrics, /status, /debug/requests\n".into(),
        ),
    }
}

/// SPEC.md's `/status` document.
pub(crate) fn status(proxy: &Proxy, now: Instant) -> Value {
    let routes = proxy.routes();
    let wall = SystemTime::now();
    let backends: Vec<Value> = routes
        .balancer()
        .backends(now)
        .into_iter()
        .map(|b| {
            let ejected_until = b.ejected_until.map(|until| {
                let at = wall + until.saturating_duration_since(now);
                humantime::format_rfc3339_millis(at).to_string()
            });
            json!({
                "url": b.addr,
                "healthy": b.healthy,
                "weight": b.weight,
                "active_requests": b.active_requests,
                "requests_total": b.requests_total,
                "failures_total": b.failures_total,
                "ejected_until": ejected_until,
            })
        })
        .collect();
    json!({ "backends": backends, "strategy": lb_core::select::Select::name(routes.balancer().strategy()) })
}

fn json_response(v: &Value) -> Response<Full<Bytes>> {
    let mut r = text(StatusCode::OK, format!("{v}\n"));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}
