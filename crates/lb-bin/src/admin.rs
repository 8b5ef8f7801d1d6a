//! The admin server: `GET /metrics`, `/status`, `/debug/requests` (plain HTTP), and the
//! runtime admin API: `POST /backends`, `PATCH /backends/{host:port}`, `DELETE
//! /backends/{host:port}`, behind a bearer token ([`Token`]).
//!
//! The changes themselves are [`Control`]'s (app.rs): it owns the backend list in force,
//! the health checker and the log of runtime changes a reload discards. This module does
//! HTTP: authentication, bodies, answers.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use lb_core::{BackendStatus, Weight};
use serde_json::{json, Value};
use tokio::net::TcpListener;

use crate::app::{AdminError, Control};
use crate::metrics::Metrics;

/// The largest request body the admin API reads.
const MAX_BODY: usize = 64 * 1024;

/// The admin API's bearer token. Never shown by `Debug`; compared in constant time.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Token(Arc<str>);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(..)")
    }
}

// === impl Token ===

impl Token {
    pub(crate) fn new(token: &str) -> Self {
        Self(token.into())
    }

    /// Returns true if and only if `given` is the token, taking the same time whatever
    /// `given` holds (for a given token length): a timing attack learns nothing of where
    /// the first wrong byte is.
    pub(crate) fn matches(&self, given: &[u8]) -> bool {
        constant_time_eq(self.0.as_bytes(), given)
    }
}

/// Compares `secret` and `given` touching every byte of `secret` whatever they hold: no
/// early exit on the first difference. (The time depends on `secret`'s length only.)
fn constant_time_eq(secret: &[u8], given: &[u8]) -> bool {
    let mut diff = u8::from(secret.len() != given.len());
    for (i, s) in secret.iter().enumerate() {
        diff |= s ^ given.get(i).copied().unwrap_or(!s);
    }
    std::hint::black_box(diff) == 0
}

/// Serves the admin endpoints on `listener` until the task is dropped.
pub(crate) async fn serve(listener: TcpListener, control: Arc<Control>, metrics: Arc<Metrics>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let (control, metrics) = (Arc::clone(&control), Arc::clone(&metrics));
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let (control, metrics) = (Arc::clone(&control), Arc::clone(&metrics));
                async move {
                    let resp = if req.uri().path() == "/backends"
                        || req.uri().path().starts_with("/backends/")
                    {
                        backends(req, &control).await
                    } else {
                        route(&req, &control, &metrics)
                    };
                    Ok::<_, Infallible>(resp)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn route(req: &Request<Incoming>, control: &Control, metrics: &Metrics) -> Response<Full<Bytes>> {
    let proxy = control.proxy();
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
        "/status" => json_response(&status(control, now)),
        "/debug/requests" => json_response(&metrics.recent()),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /metrics, /status, /debug/requests\n".into(),
        ),
    }
}

/// The answer to a request that may not use the mutating endpoints; none if it may.
fn refusal(req: &Request<Incoming>, token: Option<&Token>) -> Option<Response<Full<Bytes>>> {
    let Some(token) = token else {
        return Some(text(
            StatusCode::FORBIDDEN,
            "the admin API is off: set admin_token or --admin-token-file\n".into(),
        ));
    };
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| bearer(v.as_bytes()));
    match given {
        None => {
            let mut r = text(
                StatusCode::UNAUTHORIZED,
                "authorization required: Authorization: Bearer TOKEN\n".into(),
            );
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
            Some(r)
        }
        Some(given) if token.matches(given) => None,
        Some(_) => Some(text(StatusCode::FORBIDDEN, "wrong token\n".into())),
    }
}

/// The credentials of an `Authorization: Bearer TOKEN` value: the scheme is
/// case-insensitive and one or more spaces follow it (RFC 9110 §11.1, §11.4).
fn bearer(value: &[u8]) -> Option<&[u8]> {
    let scheme = value.get(..6)?;
    let rest = value.get(6..)?;
    if !scheme.eq_ignore_ascii_case(b"bearer") || rest.first() != Some(&b' ') {
        return None;
    }
    Some(rest.trim_ascii_start())
}

/// `s` with its `%XX` escapes decoded; none if one is malformed or the result is not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b.get(i + 1..i + 3)?;
            if !hex.iter().all(u8::is_ascii_hexdigit) {
                return None;
            }
            out.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// `POST /backends`, `PATCH` and `DELETE /backends/{host:port}`.
async fn backends(req: Request<Incoming>, control: &Control) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_owned();
    let target = path
        .strip_prefix("/backends/")
        .map(|t| percent_decode(t).unwrap_or_else(|| t.to_owned()));
    let method = req.method().clone();
    let allowed = match (&method, &target) {
        (&Method::POST, None) => true,
        (&Method::PATCH | &Method::DELETE, Some(t)) => !t.is_empty(),
        _ => false,
    };
    if !allowed {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "POST /backends, PATCH or DELETE /backends/{host:port}\n".into(),
        );
    }
    if let Some(r) = refusal(&req, control.token().as_ref()) {
        return r;
    }
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return text(
                StatusCode::BAD_REQUEST,
                format!("cannot read the body: {e}\n"),
            )
        }
    };
    let done = match (method, target) {
        (Method::POST, None) => match parse_post(&body) {
            Ok((url, weight)) => control
                .add(&url, weight)
                .await
                .map(|b| (StatusCode::CREATED, b)),
            Err(e) => return text(StatusCode::BAD_REQUEST, format!("{e}\n")),
        },
        (Method::PATCH, Some(t)) => match parse_patch(&body) {
            Ok(p) => control
                .change(&t, p.weight, p.drain)
                .await
                .map(|b| (StatusCode::OK, b)),
            Err(e) => return text(StatusCode::BAD_REQUEST, format!("{e}\n")),
        },
        (_, Some(t)) => control.remove(&t).await.map(|b| (StatusCode::OK, b)),
        (_, None) => unreachable!("checked above"),
    };
    match done {
        Ok((code, b)) => {
            let name = control.name_of(&b.addr);
            let mut r = json_response(&entry(&b, name, Instant::now(), SystemTime::now()));
            *r.status_mut() = code;
            r
        }
        Err(e) => {
            let code = match e {
                AdminError::NotFound(_) => StatusCode::NOT_FOUND,
                AdminError::Exists(_) | AdminError::Discovered(_) => StatusCode::CONFLICT,
                AdminError::Route(_) | AdminError::NoVerifier(_) => StatusCode::BAD_REQUEST,
            };
            text(code, format!("{e}\n"))
        }
    }
}

/// A PATCH body: what to change.
#[derive(Debug, PartialEq, Eq)]
struct Patch {
    weight: Option<Weight>,
    drain: Option<bool>,
}

fn object(body: &[u8]) -> Result<serde_json::Map<String, Value>, String> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(o)) => Ok(o),
        Ok(_) => Err("the body must be a JSON object".into()),
        Err(e) => Err(format!("the body is not JSON: {e}")),
    }
}

fn weight_of(o: &serde_json::Map<String, Value>) -> Result<Option<Weight>, String> {
    match o.get("weight") {
        None => Ok(None),
        Some(v) => {
            let n = v
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| format!("weight must be an integer from 1 to {}", Weight::MAX))?;
            Weight::new(n).map(Some).map_err(|e| e.to_string())
        }
    }
}

fn only(o: &serde_json::Map<String, Value>, keys: &[&str]) -> Result<(), String> {
    match o.keys().find(|k| !keys.contains(&k.as_str())) {
        Some(k) => Err(format!(
            "unknown field {k:?} (expected {})",
            keys.join(", ")
        )),
        None => Ok(()),
    }
}

/// `{"url": "http://h:p", "weight": N}` (weight optional, default 1).
fn parse_post(body: &[u8]) -> Result<(String, Weight), String> {
    let o = object(body)?;
    only(&o, &["url", "weight"])?;
    let url = o
        .get("url")
        .and_then(Value::as_str)
        .ok_or("url is required: a string such as \"http://10.0.0.1:8080\"")?;
    lb_proxy::parse_backend(url).map_err(|e| e.to_string())?;
    Ok((url.to_owned(), weight_of(&o)?.unwrap_or(Weight::ONE)))
}

/// `{"weight": N}` and/or `{"drain": bool}`.
fn parse_patch(body: &[u8]) -> Result<Patch, String> {
    let o = object(body)?;
    only(&o, &["weight", "drain"])?;
    let drain = match o.get("drain") {
        None => None,
        Some(Value::Bool(b)) => Some(*b),
        Some(_) => return Err("drain must be true or false".into()),
    };
    let weight = weight_of(&o)?;
    if weight.is_none() && drain.is_none() {
        return Err("nothing to change: give weight and/or drain".into());
    }
    Ok(Patch { weight, drain })
}

/// One backend's `/status` entry.
/// `name`: the `url` or `srv` as written that DNS found it under, for a discovered one.
fn entry(b: &BackendStatus, name: Option<String>, now: Instant, wall: SystemTime) -> Value {
    let ejected_until = b.ejected_until.map(|until| {
        let at = wall + until.saturating_duration_since(now);
        humantime::format_rfc3339_millis(at).to_string()
    });
    let state = if b.draining {
        "draining"
    } else if !b.healthy {
        "down"
    } else if b.ejected_until.is_some() {
        "ejected"
    } else {
        "up"
    };
    let mut v = json!({
        "url": b.addr,
        "healthy": b.healthy,
        "state": state,
        "weight": b.weight,
        "active_requests": b.active_requests,
        "requests_total": b.requests_total,
        "failures_total": b.failures_total,
        "ejected_until": ejected_until,
    });
    if let (Some(name), Some(o)) = (name, v.as_object_mut()) {
        o.insert("name".into(), Value::String(name));
    }
    v
}

/// SPEC.md's `/status` document.
pub(crate) fn status(control: &Control, now: Instant) -> Value {
    let routes = control.proxy().routes();
    let wall = SystemTime::now();
    let backends: Vec<Value> = routes
        .balancer()
        .backends(now)
        .into_iter()
        .map(|b| {
            let name = control.name_of(&b.addr);
            entry(&b, name, now, wall)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_compare() {
        assert!(constant_time_eq(b"s3cret", b"s3cret"));
        for wrong in [
            &b""[..],
            b"s3cre",
            b"s3cret!",
            b"S3cret",
            b"s3creu",
            b"\0\0\0\0\0\0",
        ] {
            assert!(!constant_time_eq(b"s3cret", wrong), "{wrong:?}");
        }
        // A given value padded with the complement of the secret's bytes still differs.
        assert!(!constant_time_eq(b"a", b""));
        assert!(!constant_time_eq(b"", b"a"));
        assert!(constant_time_eq(b"", b""));
        let t = Token::new("tok");
        assert!(t.matches(b"tok") && !t.matches(b"tok "));
        assert_eq!(format!("{t:?}"), "Token(..)", "Debug never shows the token");
    }

    #[test]
    fn post_bodies() {
        assert_eq!(
            parse_post(br#"{"url": "http://127.0.0.1:9000", "weight": 3}"#),
            Ok(("http://127.0.0.1:9000".into(), Weight::new(3).unwrap()))
        );
        assert_eq!(
            parse_post(br#"{"url": "http://a:1"}"#).unwrap().1,
            Weight::ONE,
            "weight defaults to 1"
        );
        for bad in [
            &br#"not json"#[..],
            br#"[]"#,
            br#"{}"#,
            br#"{"url": 5}"#,
            br#"{"url": "ftp://a:1"}"#,
            br#"{"url": "http://a"}"#,
            br#"{"url": "http://a:1", "weight": 0}"#,
            br#"{"url": "http://a:1", "weight": 10001}"#,
            br#"{"url": "http://a:1", "weight": -1}"#,
            br#"{"url": "http://a:1", "weight": 1.5}"#,
            br#"{"url": "http://a:1", "wieght": 2}"#,
        ] {
            assert!(parse_post(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn patch_bodies() {
        assert_eq!(
            parse_patch(br#"{"weight": 5}"#),
            Ok(Patch {
                weight: Some(Weight::new(5).unwrap()),
                drain: None
            })
        );
        assert_eq!(
            parse_patch(br#"{"drain": true, "weight": 2}"#),
            Ok(Patch {
                weight: Some(Weight::new(2).unwrap()),
                drain: Some(true)
            })
        );
        assert_eq!(
            parse_patch(br#"{"drain": false}"#).unwrap().drain,
            Some(false)
        );
        for bad in [
            &br#"{}"#[..],
            br#"{"drain": "yes"}"#,
            br#"{"weight": 0}"#,
            br#"{"url": "http://a:1"}"#,
            br#"""#,
        ] {
            assert!(
                parse_patch(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
