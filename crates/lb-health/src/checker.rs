//! The probe scheduler: every target on its own timer, concurrently.
//!
//! # Why one task per target
//! The classic design probes backends one after another from a single loop, so one slow
//! backend delays every other probe, a 2 s timeout × 100 backends outlasts the interval, and
//! all probes fire at the same instant. Here each target has its own task: a black-holed
//! backend only ever delays its own next probe. The first probe of each target waits a
//! random fraction of the interval, and every period is jittered by ±10 %, so N backends
//! never probe in lockstep. A probe that outlasts the interval is followed by the next one
//! at once (never by a burst to catch up).
//!
//! Reloads go through [`Checker::set_targets`], which starts and stops only the targets that
//! changed; [`Checker::shutdown`] (or dropping the checker) cancels every probe at once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use lb_core::select::Select;
use lb_core::{BackendId, Balancer, Event, ProbeResult, Rng};
use tokio::runtime::Handle;
use tokio::task::JoinHandle;

use crate::error::ProbeError;
use crate::prober::{Prober, Target};

/// How often and how long to probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckerConfig {
    /// Time between the starts of two probes of one target (SPEC `--health-interval`, 5 s).
    pub interval: Duration,
    /// Limit on one probe (SPEC `--health-timeout`, 2 s).
    pub timeout: Duration,
    /// Each period varies by up to this share of the interval, either way (default 10 %).
    pub jitter_percent: u32,
}

impl Default for CheckerConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(2),
            jitter_percent: 10,
        }
    }
}

/// Where probe results go.
pub trait ProbeSink: Send + Sync + 'static {
    /// One probe of `backend` finished at `at`.
    fn report(&self, backend: BackendId, result: &Result<(), ProbeError>, at: Instant);
}

/// Feeds results into the balancer's rise/fall counting and logs every state change that
/// follows, once, at `info`, with its reason.
impl<S: Select> ProbeSink for Balancer<S> {
    fn report(&self, backend: BackendId, result: &Result<(), ProbeError>, at: Instant) {
        let result = match result {
            Ok(()) => ProbeResult::Success,
            Err(e) => ProbeResult::Failure(e.failure()),
        };
        self.handle_probe(backend, result, at);
        while let Some(event) = self.poll_event() {
            log_event(&event);
        }
    }
}

/// Logs one balancer event at `info` (`backend http://… down: 3 consecutive probe failures:
/// connection refused`).
pub fn log_event(event: &Event) {
    tracing::info!(target: "lb::health", "{event}");
}

/// The `result` labels of `lb_health_checks_total`, in the order of [`ProbeCounts::get`].
pub const RESULT_LABELS: [&str; 8] = [
    "success",
    "refused",
    "timeout",
    "reset",
    "bad_status",
    "bad_response",
    "tls",
    "error",
];

/// Probe results of one target, by result label.
#[derive(Debug, Default)]
pub struct ProbeCounts([AtomicU64; RESULT_LABELS.len()]);

impl ProbeCounts {
    fn bump(&self, result: &Result<(), ProbeError>) {
        let label = result
            .as_ref()
            .map_or_else(ProbeError::label, |()| "success");
        if let Some(i) = RESULT_LABELS.iter().position(|l| *l == label) {
            self.0[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// `(label, count)` for every result label.
    #[must_use]
    pub fn get(&self) -> [(&'static str, u64); RESULT_LABELS.len()] {
        std::array::from_fn(|i| (RESULT_LABELS[i], self.0[i].load(Ordering::Relaxed)))
    }

    /// All probes so far.
    #[must_use]
    pub fn total(&self) -> u64 {
        self.0.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }
}

#[derive(Debug)]
struct Task {
    target: Target,
    handle: JoinHandle<()>,
    counts: Arc<ProbeCounts>,
}

struct Shared<P> {
    prober: P,
    config: CheckerConfig,
    sink: Arc<dyn ProbeSink>,
}

/// Probes every target concurrently and independently, reporting each result to a sink.
pub struct Checker<P> {
    shared: Arc<Shared<P>>,
    tasks: Mutex<HashMap<BackendId, Task>>,
    runtime: Handle,
    seed: u64,
}

impl<P> std::fmt::Debug for Checker<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checker")
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

// === impl Checker ===

impl<P: Prober> Checker<P> {
    /// A checker with no targets yet, spawning its probes on the current tokio runtime.
    ///
    /// # Panics
    /// When called outside a tokio runtime.
    pub fn new(prober: P, config: CheckerConfig, sink: Arc<dyn ProbeSink>) -> Self {
        Self {
            shared: Arc::new(Shared {
                prober,
                config,
                sink,
            }),
            tasks: Mutex::new(HashMap::new()),
            runtime: Handle::current(),
            seed: Rng::from_entropy().next_u64(),
        }
    }

    fn tasks(&self) -> MutexGuard<'_, HashMap<BackendId, Task>> {
        self.tasks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Makes `targets` the probed set: probes of targets that stay (same id, same target)
    /// go on undisturbed, new ones start, removed or changed ones stop.
    pub fn set_targets(&self, targets: impl IntoIterator<Item = (BackendId, Target)>) {
        let wanted: HashMap<BackendId, Target> = targets.into_iter().collect();
        let mut tasks = self.tasks();
        tasks.retain(|id, task| {
            let keep = wanted.get(id) == Some(&task.target);
            if !keep {
                task.handle.abort();
            }
            keep
        });
        for (id, target) in wanted {
            if tasks.contains_key(&id) {
                continue;
            }
            let counts = Arc::new(ProbeCounts::default());
            let seed = self.seed ^ lb_core::stable_hash(id.to_string().as_bytes());
            let run = probe_loop(
                Arc::clone(&self.shared),
                id,
                target.clone(),
                Arc::clone(&counts),
                seed,
            );
            let handle = self.runtime.spawn(run);
            tasks.insert(
                id,
                Task {
                    target,
                    handle,
                    counts,
                },
            );
        }
    }

    /// Probe counts by target, for `lb_health_checks_total{backend,result}`.
    #[must_use]
    pub fn counts(&self) -> Vec<(BackendId, Target, Arc<ProbeCounts>)> {
        self.tasks()
            .iter()
            .map(|(id, t)| (*id, t.target.clone(), Arc::clone(&t.counts)))
            .collect()
    }

    /// The task probing `backend`, if any: the same id across two calls means its probes
    /// were not restarted in between.
    #[must_use]
    pub fn task_id(&self, backend: BackendId) -> Option<tokio::task::Id> {
        self.tasks().get(&backend).map(|t| t.handle.id())
    }

    /// Stops every probe at once (each is cancelled at its next await point).
    pub fn shutdown(&self) {
        for (_, task) in self.tasks().drain() {
            task.handle.abort();
        }
    }
}

impl<P> Drop for Checker<P> {
    fn drop(&mut self) {
        let tasks = self
            .tasks
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (_, task) in tasks.drain() {
            task.handle.abort();
        }
    }
}

/// The one clock of the shell: tokio's, so paused-time tests control it.
fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

async fn probe_loop<P: Prober>(
    shared: Arc<Shared<P>>,
    id: BackendId,
    target: Target,
    counts: Arc<ProbeCounts>,
    seed: u64,
) {
    let CheckerConfig {
        interval,
        timeout,
        jitter_percent,
    } = shared.config;
    let mut rng = Rng::from_seed(seed);
    tokio::time::sleep(interval.mul_f64(rng.unit_f64())).await;
    let jitter = f64::from(jitter_percent.min(100)) / 100.0;
    loop {
        let started = tokio::time::Instant::now();
        let result =
            match tokio::time::timeout(timeout, shared.prober.probe(&target, timeout)).await {
                Ok(result) => result,
                Err(_) => Err(ProbeError::Timeout(timeout)),
            };
        if let Err(e) = &result {
            tracing::debug!(target: "lb::health", backend = %target.authority, error = %e, "probe failed");
        }
        counts.bump(&result);
        shared.sink.report(id, &result, now());
        let factor = 1.0 + jitter * (2.0 * rng.unit_f64() - 1.0);
        tokio::time::sleep_until(started + interval.mul_f64(factor)).await;
    }
}
