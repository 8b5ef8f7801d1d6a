//! Hooks for metrics: the proxy tells an [`Observer`] what happened, the binary counts it.

use std::time::Duration;

use lb_core::{Completion, Decision, Outcome};

use crate::routes::Target;

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

    /// A client got `status` after `elapsed` (`lb_responses_total{code}`,
    /// `lb_request_duration_seconds`).
    fn response(&self, status: u16, elapsed: Duration, how: Completion) {
        let _ = (status, elapsed, how);
    }
}

/// Observes nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoObserver;

impl Observer for NoObserver {}
