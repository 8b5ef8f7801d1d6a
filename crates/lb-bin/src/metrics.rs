//! Prometheus metrics (names as SPEC.md gives them) and the ring of recent routing traces.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Instant, SystemTime};

use lb_core::{BackendId, Completion, Decision, Outcome, RetryReason};
use lb_proxy::{Completed, Observer, Routes, Target};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use serde_json::{json, Value};

/// Traces kept for `/debug/requests`.
const RECENT: usize = 256;

/// Latency buckets from 100 µs to 10 s.
const BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendCode {
    backend: String,
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Code {
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendLabel {
    backend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reason {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendResult {
    backend: String,
    result: String,
}

/// Every metric, and the registry that encodes them.
pub(crate) struct Metrics {
    registry: Registry,
    requests: Family<BackendCode, Counter>,
    responses: Family<Code, Counter>,
    duration: Histogram,
    healthy: Family<BackendLabel, Gauge>,
    active: Family<BackendLabel, Gauge>,
    retries: Family<Reason, Counter>,
    retries_denied: Family<Reason, Counter>,
    health_checks: Family<BackendResult, Counter>,
    recent: Mutex<VecDeque<Value>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    pub(crate) fn new() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<BackendCode, Counter>::default();
        let responses = Family::<Code, Counter>::default();
        let duration = Histogram::new(BUCKETS);
        let healthy = Family::<BackendLabel, Gauge>::default();
        let active = Family::<BackendLabel, Gauge>::default();
        let retries = Family::<Reason, Counter>::default();
        let retries_denied = Family::<Reason, Counter>::default();
        let health_checks = Family::<BackendResult, Counter>::default();
        // prometheus-client appends `_total` to counters.
        registry.register(
            "lb_requests",
            "Attempts sent to each backend, by backend status or error",
            requests.clone(),
        );
        registry.register(
            "lb_responses",
            "Responses sent to clients, by status",
            responses.clone(),
        );
        registry.register(
            "lb_request_duration_seconds",
            "Time from request head to end of response",
            duration.clone(),
        );
        registry.register(
            "lb_backend_healthy",
            "1 if the backend is up by active health checks",
            healthy.clone(),
        );
        registry.register(
            "lb_backend_active_requests",
            "Attempts in flight to the backend",
            active.clone(),
        );
        registry.register(
            "lb_retries",
            "Retries, by why they were allowed",
            retries.clone(),
        );
        registry.register(
            "lb_retries_denied",
            "Failed attempts not retried, by why",
            retries_denied.clone(),
        );
        registry.register(
            "lb_health_checks",
            "Active health probes, by backend and result",
            health_checks.clone(),
        );
        // Series known in advance start at 0, so dashboards see them before the first event.
        for reason in ["not_sent", "idempotent"] {
            let _ = retries.get_or_create(&Reason {
                reason: reason.into(),
            });
        }
        for reason in [
            "not_idempotent",
            "not_replayable",
            "attempts_exhausted",
            "budget_exhausted",
            "no_untried_backend",
            "deadline",
        ] {
            let _ = retries_denied.get_or_create(&Reason {
                reason: reason.into(),
            });
        }
        Self {
            registry,
            requests,
            responses,
            duration,
            healthy,
            active,
            retries,
            retries_denied,
            health_checks,
            recent: Mutex::new(VecDeque::with_capacity(RECENT)),
        }
    }

    /// Counts one probe of `backend`.
    pub(crate) fn health_check(&self, backend: &str, result: &str) {
        self.health_checks
            .get_or_create(&BackendResult {
                backend: backend.to_owned(),
                result: result.to_owned(),
            })
            .inc();
    }

    /// The Prometheus text exposition, with the per-backend gauges read now.
    pub(crate) fn encode(&self, routes: &Routes, now: Instant) -> String {
        self.healthy.clear();
        self.active.clear();
        for b in routes.balancer().backends(now) {
            let label = BackendLabel {
                backend: label_of(routes, b.id, &b.addr),
            };
            self.healthy.get_or_create(&label).set(i64::from(b.healthy));
            self.active
                .get_or_create(&label)
                .set(i64::from(b.active_requests));
        }
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }

    /// The recent routing traces, oldest first.
    pub(crate) fn recent(&self) -> Value {
        let recent = self
            .recent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Value::Array(recent.iter().cloned().collect())
    }
}

/// A backend's `backend` label: `host:port`.
pub(crate) fn label_of(routes: &Routes, id: BackendId, fallback: &str) -> String {
    routes
        .target(id)
        .map_or_else(|| fallback.to_owned(), |t| t.authority.as_str().to_owned())
}

impl Observer for Metrics {
    fn attempt(&self, backend: &Target, outcome: Outcome) {
        let code = match outcome {
            Outcome::Response { status } => status.to_string(),
            _ => "error".to_owned(),
        };
        self.requests
            .get_or_create(&BackendCode {
                backend: backend.authority.as_str().to_owned(),
                code,
            })
            .inc();
    }

    fn decision(&self, decision: Decision) {
        match decision {
            Decision::Retry(RetryReason::NotSent) => {
                self.retries
                    .get_or_create(&Reason {
                        reason: "not_sent".into(),
                    })
                    .inc();
            }
            Decision::Retry(RetryReason::Idempotent) => {
                self.retries
                    .get_or_create(&Reason {
                        reason: "idempotent".into(),
                    })
                    .inc();
            }
            Decision::Relay => {}
            Decision::Stop(_) => {
                self.retries_denied
                    .get_or_create(&Reason {
                        reason: decision.as_str().into(),
                    })
                    .inc();
            }
            // Decisions lb-core adds later are counted once they are named here.
            _ => {}
        }
    }

    fn refused(&self, status: u16) {
        self.responses
            .get_or_create(&Code {
                code: status.to_string(),
            })
            .inc();
    }

    fn completed(&self, c: &Completed<'_>) {
        self.responses
            .get_or_create(&Code {
                code: c.status.to_string(),
            })
            .inc();
        self.duration.observe(c.elapsed.as_secs_f64());
        let attempts: Vec<Value> = c
            .state
            .map(|st| {
                let mut out = Vec::with_capacity(st.attempts().len() + 1);
                for (i, a) in st.attempts().iter().enumerate() {
                    let backend = label_of(c.routes, a.backend(), &a.backend().to_string());
                    if st.resent() == Some(i) {
                        // The send on a pooled connection that died before any response byte,
                        // re-sent once on a fresh connection to the same backend (the entry
                        // after this one): a send like any other, but not an attempt.
                        out.push(json!({
                            "backend": backend,
                            "outcome": lb_core::Outcome::StaleConnection.to_string(),
                            "decision": "resend",
                            "resend": true,
                        }));
                    }
                    out.push(json!({
                        "backend": backend,
                        "outcome": a.outcome().map(|o| o.to_string()),
                        "decision": a.decision().map(Decision::as_str),
                        "candidates": a.pick().candidates(),
                        "excluded_tried": a.pick().excluded(),
                        "panic": a.pick().panic(),
                    }));
                }
                out
            })
            .unwrap_or_default();
        let entry = json!({
            "time": humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            "method": c.method.as_str(),
            "path": c.uri.path(),
            "status": c.status,
            "client_gone": c.how == Completion::ClientGone,
            // Whole microseconds, so the value prints without float noise.
            "duration_ms": c.elapsed.as_micros() as f64 / 1000.0,
            "attempts": attempts,
            "failure": c.state.and_then(lb_core::RequestState::failure).map(|f| f.status()),
        });
        let mut recent = self
            .recent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if recent.len() == RECENT {
            recent.pop_front();
        }
        recent.push_back(entry);
    }
}
