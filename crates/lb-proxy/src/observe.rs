//! Hooks for metrics: the proxy tells an [`Observer`] what happened, the binary counts it.

use std::time::Duration;

use http::{Method, Uri};
use lb_core::{Completion, Decision, Outcome, RequestState};

use crate::routes::{Routes, Target};

/// A finished request, as the access log sees it.
#[derive(Debug)]
pub struct Completed<'a> {
    /// The request method.
    pub method: &'a Method,
    /// The request target as the client sent it.
    pub uri: &'a Uri,
    /// What the client got (the backend's status, or the proxy's own 4xx/5xx).
    pub status: u16,
    /// From the request head to the end of the response.
    pub elapsed: Duration,
    /// How it ended.
    pub how: Completion,
    /// The routes it was served with (to name backends).
    pub routes: &'a Routes,
    /// Its routing trace, if it got as far as lb-core.
    pub state: Option<&'a RequestState>,
}

/// Receives the facts metrics are made of. Every method has a no-op default and is called on
/// the request path: keep them cheap (atomic counters), never block.
pub trait Observer: Send + Sync + 'static {
    /// One attempt to `backend` ended with `outcome` (`lb_requests_total{backend,code}`).
    fn attempt(&self, backend: &Target, outcome: Outcome) {
        let _ = (backend, outcome);
    }

    /// lb-core decided what follows an attempt (`lb_retries_total{reason}` for retries).
    fn decision(&self, decision: Decision) {
        let _ = decision;
    }

    /// A request finished (`lb_responses_total{code}`, `lb_request_duration_seconds`, the
    /// recent-requests ring).
    fn completed(&self, request: &Completed<'_>) {
        let _ = request;
    }

    /// A request head was answered before the proxy saw a request: hyper's own answer to a
    /// head it could not parse (400, 414, 431), or lb's 400 in its place for a huge
    /// `Content-Length` (`lb_responses_total{code}`: what clients got). Called once the
    /// connection, which such an answer closes, has ended.
    fn refused(&self, status: u16) {
        let _ = status;
    }

    /// A client's TLS handshake failed or did not finish within `header_read`
    /// (`lb_tls_handshake_errors_total`).
    fn tls_handshake_failed(&self) {}
}

/// Observes nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoObserver;

impl Observer for NoObserver {}
