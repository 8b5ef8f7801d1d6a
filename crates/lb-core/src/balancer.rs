//! The [`Balancer`]: shared by every request, it owns the backend set, its health, the
//! strategy's table and the retry budget, and turns inputs into [`Action`]s and [`Event`]s.
//!
//! # Concurrency
//! A quinn `Connection` is owned by one task; a `Balancer` is shared by every request on
//! every worker thread. So the request path (`start`, `handle_outcome`, `finish`,
//! `abandon`) takes `&self` and no lock: it reads an immutable [`Snapshot`] through
//! `arc-swap` and touches per-backend atomics. Everything that changes membership or
//! eligibility (a reload, a probe flip, an ejection, a slow-start step) is rare; it takes a
//! short mutex, rebuilds the snapshot and the strategy's table, and swaps it in. The only
//! request-path lock is the retry budget's, taken when a retry is about to happen.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use crate::backend::{Backend, BackendId, BackendState, Weight};
use crate::config::Config;
use crate::error::ConfigError;
use crate::event::Event;
use crate::health::{ejection_duration, slow_start_next_step, slow_start_percent, RiseFall};
use crate::latency::LatencyParams;
use crate::outcome::{Completion, Outcome, ProbeFailure, ProbeResult, RequestInfo};
use crate::retry::backoff::backoff;
use crate::retry::budget::Budget;
use crate::retry::{
    Action, Decision, Failure, Open, PickTrace, RequestState, RetryReason, StopReason,
};
use crate::rng::{mix64, Rng};
use crate::select::{scan_from, AnySelect, Candidate, PickCx, Select};

/// Events kept for `poll_event` before the oldest are dropped (nobody is draining).
const EVENT_QUEUE: usize = 4096;
const NO_TIMEOUT: u64 = u64::MAX;

/// Decides where each request attempt goes and when to stop. Performs no I/O and never reads
/// a clock: every input carries `now`.
///
/// Methods, by kind (quinn's order):
/// * getters: [`backends`](Self::backends), [`strategy`](Self::strategy), [`config`](Self::config);
/// * inputs: [`start`](Self::start), [`handle_outcome`](Self::handle_outcome),
///   [`finish`](Self::finish), [`abandon`](Self::abandon), [`handle_probe`](Self::handle_probe),
///   [`handle_timeout`](Self::handle_timeout);
/// * commands: [`set_backends`](Self::set_backends);
/// * outputs: [`poll_timeout`](Self::poll_timeout), [`poll_event`](Self::poll_event).
///
/// After any input, re-arm your timer from `poll_timeout` and drain `poll_event`.
///
/// ```
/// use std::time::{Duration, Instant};
/// use lb_core::{Action, Backend, Balancer, Completion, Config, Outcome, RequestInfo, Weight};
/// use lb_core::select::{AnySelect, StrategyKind};
///
/// let now = Instant::now(); // the caller's clock; the core never reads one
/// let lb = Balancer::new(Config::default(), AnySelect::new(StrategyKind::RoundRobin)).unwrap();
/// let ids = lb.set_backends([Backend::new("10.0.0.1:80", Weight::ONE),
///                            Backend::new("10.0.0.2:80", Weight::ONE)], now).unwrap();
///
/// let (mut req, mut action) = lb.start(RequestInfo::new(true, true), now);
/// let mut tries = 0;
/// loop {
///     match action {
///         Action::Forward { backend, .. } => {
///             tries += 1;
///             // Send to `backend` here. The first one refuses the connection:
///             let outcome = if tries == 1 { Outcome::ConnectRefused } else { Outcome::Response { status: 200 } };
///             action = lb.handle_outcome(&mut req, outcome, now + Duration::from_millis(tries));
///         }
///         Action::Relay => { /* stream the response */ lb.finish(req, Completion::Done, now); break }
///         Action::Fail(f) => { /* answer f.status() */ let _ = f; break }
///     }
/// }
/// assert_eq!(tries, 2); // retried once, on the other backend
/// # let _ = ids;
/// ```
#[derive(Debug)]
pub struct Balancer<S: Select = AnySelect> {
    select: S,
    config: Config,
    latency: LatencyParams,
    budget: Budget,
    snapshot: ArcSwap<Snapshot<S::Table>>,
    control: Mutex<Control>,
    epoch: OnceLock<Instant>,
    next_timeout_ns: AtomicU64,
    seed: u64,
}

/// What the request path reads: the candidates, the strategy's table, and how to find a
/// backend among them. Immutable once published.
#[derive(Debug)]
struct Snapshot<T> {
    generation: u64,
    candidates: Vec<Candidate>,
    /// Every member (candidate or not) and its index among the candidates, if it is one.
    members: HashMap<BackendId, (Arc<BackendState>, Option<usize>)>,
    panic: bool,
    table: T,
}

impl<T> Snapshot<T> {
    /// The state of the backend of an attempt that started in some snapshot, and its index
    /// among this snapshot's candidates. `None` once the backend was removed.
    fn locate(&self, open: &Open) -> Option<(&BackendState, Option<usize>)> {
        if self.generation == open.generation {
            return Some((&self.candidates[open.index].state, Some(open.index)));
        }
        self.members.get(&open.id).map(|(s, i)| (&**s, *i))
    }
}

/// A pick: the snapshot it was made in, and the candidate's index there.
type Picked<T> = (arc_swap::Guard<Arc<Snapshot<T>>>, usize);

/// The rare-path state, behind the control mutex.
#[derive(Debug, Default)]
struct Control {
    members: Vec<Member>,
    by_id: HashMap<BackendId, usize>,
    next_id: u32,
    generation: u64,
    panic: bool,
    events: VecDeque<Event>,
}

#[derive(Debug)]
struct Member {
    state: Arc<BackendState>,
    weight: Weight,
    health: RiseFall,
    ejected_until: Option<Instant>,
    ramp_start: Option<Instant>,
}

/// One backend as `/status` shows it. Fields are added as the core learns more about a
/// backend, hence `non_exhaustive`: read them, never build one.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendStatus {
    /// Its id.
    pub id: BackendId,
    /// Its address as configured.
    pub addr: String,
    /// Configured weight.
    pub weight: u32,
    /// Current slow-start share of that weight, in percent (100 when not ramping).
    pub weight_percent: u32,
    /// Up by active probes.
    pub healthy: bool,
    /// Passively ejected until then.
    pub ejected_until: Option<Instant>,
    /// Attempts in flight now.
    pub active_requests: u32,
    /// Attempts sent to it so far.
    pub requests_total: u64,
    /// Connection-level failures so far (refused, timed out, reset, broken bodies).
    pub failures_total: u64,
}

// === impl Balancer ===

impl<S: Select> Balancer<S> {
    /// A balancer with no backends (every request gets 503 until `set_backends`).
    ///
    /// # Errors
    /// The config's first invalid field.
    pub fn new(config: Config, select: S) -> Result<Self, ConfigError> {
        config.validate()?;
        let table = select.build(&[]);
        let seed = config
            .rng_seed
            .unwrap_or_else(|| Rng::from_entropy().next_u64());
        Ok(Self {
            latency: LatencyParams::new(&config.latency),
            budget: Budget::new(
                config.retry.budget_percent,
                config.retry.min_retries_per_second,
            ),
            snapshot: ArcSwap::from_pointee(Snapshot {
                generation: 0,
                candidates: Vec::new(),
                members: HashMap::new(),
                panic: false,
                table,
            }),
            control: Mutex::new(Control::default()),
            epoch: OnceLock::new(),
            next_timeout_ns: AtomicU64::new(NO_TIMEOUT),
            seed,
            select,
            config,
        })
    }

    /// The strategy.
    pub const fn strategy(&self) -> &S {
        &self.select
    }

    /// The validated config.
    pub const fn config(&self) -> &Config {
        &self.config
    }

    fn control(&self) -> MutexGuard<'_, Control> {
        // A panic while holding the lock cannot leave Control half-updated in a way that
        // matters more than stopping balancing would: keep going with what is there.
        self.control
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn ticks(&self, now: Instant) -> u64 {
        let epoch = *self.epoch.get_or_init(|| now);
        u64::try_from(now.saturating_duration_since(epoch).as_nanos()).unwrap_or(u64::MAX - 1)
    }

    // --- commands ---

    /// Replaces the backend set. Backends whose address stays keep their id, health,
    /// ejection and load; new ones start healthy (with slow start, unless this is the first
    /// set); removed ones are never picked again. Returns the ids in the order given.
    ///
    /// # Errors
    /// [`ConfigError::DuplicateBackend`] if an address appears twice; nothing changes then.
    pub fn set_backends(
        &self,
        backends: impl IntoIterator<Item = Backend>,
        now: Instant,
    ) -> Result<Vec<BackendId>, ConfigError> {
        let backends: Vec<Backend> = backends.into_iter().collect();
        let mut seen = std::collections::HashSet::new();
        if let Some(dup) = backends.iter().find(|b| !seen.insert(b.addr())) {
            return Err(ConfigError::DuplicateBackend(dup.addr().to_owned()));
        }
        self.ticks(now);
        let mut ctl = self.control();
        let first = ctl.members.is_empty();
        let mut old: HashMap<String, Member> = ctl
            .members
            .drain(..)
            .map(|m| (m.state.addr.clone(), m))
            .collect();
        let mut ids = Vec::with_capacity(backends.len());
        for b in backends {
            let member = if let Some(mut m) = old.remove(b.addr()) {
                m.weight = b.weight();
                m
            } else {
                let id = BackendId(ctl.next_id);
                ctl.next_id += 1;
                Member {
                    state: Arc::new(BackendState::new(id, b.addr().to_owned())),
                    weight: b.weight(),
                    health: RiseFall::new(true),
                    ejected_until: None,
                    ramp_start: (!first && !self.config.passive.slow_start.is_zero())
                        .then_some(now),
                }
            };
            ids.push(member.state.id);
            ctl.members.push(member);
        }
        ctl.by_id = ctl
            .members
            .iter()
            .enumerate()
            .map(|(i, m)| (m.state.id, i))
            .collect();
        self.rebuild(&mut ctl, now);
        Ok(ids)
    }

    // --- inputs: the request path ---

    /// Starts a request: counts it toward the retry budget and picks its first backend.
    /// Returns `Fail(NoBackend)` at once when no backend is eligible.
    pub fn start(&self, info: RequestInfo, now: Instant) -> (RequestState, Action) {
        let now_ns = self.ticks(now);
        let sec = now_ns / 1_000_000_000;
        let nonce = self.budget.deposit(sec);
        let mut st = RequestState::new(
            info,
            Rng::from_seed(mix64(self.seed ^ mix64(nonce ^ (sec << 40)))),
        );
        if info.deadline.is_some_and(|d| d <= now) {
            st.failure = Some(Failure::GatewayTimeout);
            return (st, Action::Fail(Failure::GatewayTimeout));
        }
        let action = match self.pick(&mut st, now_ns) {
            Some((snap, idx)) => self.commit(&mut st, &snap, idx, now, now, now_ns),
            None => {
                st.failure = Some(Failure::NoBackend);
                Action::Fail(Failure::NoBackend)
            }
        };
        (st, action)
    }

    /// Reports how the attempt in flight ended and returns what to do next: relay the
    /// response, retry elsewhere, or fail. Calling it with no attempt in flight returns the
    /// request's last decision again and changes nothing.
    pub fn handle_outcome(&self, st: &mut RequestState, outcome: Outcome, now: Instant) -> Action {
        if st.finished || st.attempts().last().is_some_and(|a| a.decision.is_some()) {
            return st.failure.map_or(Action::Relay, Action::Fail);
        }
        let Some(open) = st.open.take() else {
            return Action::Fail(st.failure.unwrap_or(Failure::NoBackend));
        };
        let now_ns = self.ticks(now);
        let snap = self.snapshot.load();
        let located = snap.locate(&open);
        if let Outcome::Response { status } = outcome {
            if let Some((s, idx)) = located {
                if s.consecutive_failures.load(Ordering::Relaxed) != 0 {
                    s.consecutive_failures.store(0, Ordering::Relaxed);
                }
                if status >= 500 {
                    s.recent_errors.fetch_add(1, Ordering::Relaxed);
                } else if s.recent_errors.load(Ordering::Relaxed) != 0 {
                    s.recent_errors.store(0, Ordering::Relaxed);
                }
                if self.select.uses_latency() {
                    self.latency
                        .observe(s, now_ns.saturating_sub(open.sent_ns) as f64, now_ns);
                }
                if status < 500 && s.ejection_row.load(Ordering::Relaxed) != 0 {
                    self.end_ejection_row(s.id);
                }
                self.load_changed(&snap, idx);
            }
            st.record(outcome, Decision::Relay);
            st.open = Some(open);
            return Action::Relay;
        }

        if let Some((s, idx)) = located {
            s.release();
            if outcome.is_backend_failure() {
                let _ = s
                    .recent_errors
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |e| e.checked_add(1));
                self.latency.observe(s, self.latency.penalty_ns, now_ns);
                self.passive_failure(s, now);
            }
            self.load_changed(&snap, idx);
        }
        drop(snap);

        let fail = if outcome == Outcome::TimedOut {
            Failure::GatewayTimeout
        } else {
            Failure::BadGateway
        };
        let reason = if outcome.was_sent() {
            RetryReason::Idempotent
        } else {
            RetryReason::NotSent
        };
        let stop = |st: &mut RequestState, why: StopReason, fail: Failure| {
            st.record(outcome, Decision::Stop(why));
            st.failure = Some(fail);
            Action::Fail(fail)
        };
        if outcome.was_sent() && !st.info.idempotent {
            return stop(st, StopReason::NotIdempotent, fail);
        }
        if outcome.was_sent() && !st.info.replayable {
            return stop(st, StopReason::NotReplayable, fail);
        }
        if st.len >= self.config.retry.attempts as usize {
            return stop(st, StopReason::AttemptsExhausted, fail);
        }
        let delay = backoff(self.config.retry.backoff, st.len as u32, &mut st.rng);
        let not_before = later(now, delay);
        if st.info.deadline.is_some_and(|d| not_before >= d) {
            return stop(st, StopReason::Deadline, Failure::GatewayTimeout);
        }
        let Some((snap, idx)) = self.pick(st, now_ns) else {
            return stop(st, StopReason::NoUntriedBackend, fail);
        };
        if !self.budget.withdraw(now_ns / 1_000_000_000) {
            return stop(st, StopReason::BudgetExhausted, fail);
        }
        st.record(outcome, Decision::Retry(reason));
        let sent_ns = now_ns.saturating_add(u64::try_from(delay.as_nanos()).unwrap_or(u64::MAX));
        self.commit(st, &snap, idx, now, not_before, sent_ns)
    }

    /// Ends a request whose response was relayed: releases its in-flight slot and records a
    /// body the backend broke off. Anything else in flight is released as by `abandon`.
    pub fn finish(&self, mut st: RequestState, completion: Completion, now: Instant) {
        st.finished = true;
        let Some(open) = st.open.take() else { return };
        let snap = self.snapshot.load();
        let Some((s, idx)) = snap.locate(&open) else {
            return;
        };
        s.release();
        if completion == Completion::BackendFailed {
            let _ = s
                .recent_errors
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |e| e.checked_add(1));
            self.passive_failure(s, now);
        }
        self.load_changed(&snap, idx);
    }

    /// The client went away (or the caller gave up) mid-request: releases the in-flight
    /// slot. Never counts toward ejection, health or the retry budget.
    pub fn abandon(&self, st: RequestState, now: Instant) {
        self.finish(st, Completion::ClientGone, now);
    }

    // --- inputs: the rare path ---

    /// Records one active probe result; a backend flips after `rise`/`fall` in a row.
    /// Results for unknown (removed) backends are ignored.
    pub fn handle_probe(&self, backend: BackendId, result: ProbeResult, now: Instant) {
        self.ticks(now);
        let (rise, fall) = (self.config.health.rise, self.config.health.fall);
        let mut ctl = self.control();
        let Some(&i) = ctl.by_id.get(&backend) else {
            return;
        };
        let m = &mut ctl.members[i];
        let Some(up) = m.health.observe(result.is_success(), rise, fall) else {
            return;
        };
        let addr = m.state.addr.clone();
        let event = if up {
            if !self.config.passive.slow_start.is_zero() {
                m.ramp_start = Some(now);
            }
            Event::Up {
                backend,
                addr,
                successes: rise,
            }
        } else {
            let last = match result {
                ProbeResult::Failure(f) => f,
                ProbeResult::Success => ProbeFailure::Other,
            };
            m.ramp_start = None;
            Event::Down {
                backend,
                addr,
                failures: fall,
                last,
            }
        };
        push_event(&mut ctl, event);
        self.rebuild(&mut ctl, now);
    }

    /// Expires ejections and advances slow-start ramps due by `now`. Spurious calls are no-ops.
    pub fn handle_timeout(&self, now: Instant) {
        let now_ns = self.ticks(now);
        if self.next_timeout_ns.load(Ordering::Acquire) > now_ns {
            return;
        }
        let slow_start = self.config.passive.slow_start;
        let mut ctl = self.control();
        let mut restored = Vec::new();
        for m in &mut ctl.members {
            if m.ejected_until.is_some_and(|u| u <= now) {
                m.ejected_until = None;
                if !slow_start.is_zero() {
                    m.ramp_start = Some(now);
                }
                restored.push(Event::Restored {
                    backend: m.state.id,
                    addr: m.state.addr.clone(),
                });
            }
            if m.ramp_start
                .is_some_and(|r| now.saturating_duration_since(r) >= slow_start)
            {
                m.ramp_start = None;
            }
        }
        for e in restored {
            push_event(&mut ctl, e);
        }
        // Ramps move weights at every step: rebuild whenever anything was due.
        self.rebuild(&mut ctl, now);
    }

    // --- outputs ---

    /// When `handle_timeout` should next be called, if ever.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        let ns = self.next_timeout_ns.load(Ordering::Acquire);
        let epoch = self.epoch.get()?;
        (ns != NO_TIMEOUT).then(|| later(*epoch, Duration::from_nanos(ns)))
    }

    /// The next state change to log or count, oldest first.
    #[must_use]
    pub fn poll_event(&self) -> Option<Event> {
        self.control().events.pop_front()
    }

    // --- getters ---

    /// Every backend's state, in configured order.
    #[must_use]
    pub fn backends(&self, now: Instant) -> Vec<BackendStatus> {
        let ctl = self.control();
        ctl.members
            .iter()
            .map(|m| BackendStatus {
                id: m.state.id,
                addr: m.state.addr.clone(),
                weight: m.weight.get(),
                weight_percent: self.ramp_percent(m, now),
                healthy: m.health.is_up(),
                ejected_until: m.ejected_until.filter(|&u| u > now),
                active_requests: m.state.in_flight(),
                requests_total: m.state.requests_total.load(Ordering::Relaxed),
                failures_total: m.state.failures_total.load(Ordering::Relaxed),
            })
            .collect()
    }

    // --- internals ---

    /// Asks the strategy for a candidate this request has not tried, and checks its answer.
    fn pick(&self, st: &mut RequestState, now_ns: u64) -> Option<Picked<S::Table>> {
        let snap = self.snapshot.load();
        let mut cx = PickCx {
            key: st.info.hash_key,
            rng: &mut st.rng,
            tried: &st.tried[..st.len],
            now_ns,
            latency: &self.latency,
        };
        let c = &snap.candidates;
        let idx = match self.select.pick(&snap.table, c, &mut cx) {
            Some(i) if i < c.len() && !cx.is_excluded(&c[i]) => i,
            // A strategy that broke its contract must not break the invariants.
            Some(_) => scan_from(c, 0, &cx)?,
            None => return None,
        };
        Some((snap, idx))
    }

    /// Puts the request in flight on `snap.candidates[idx]`.
    fn commit(
        &self,
        st: &mut RequestState,
        snap: &Snapshot<S::Table>,
        idx: usize,
        now: Instant,
        not_before: Instant,
        sent_ns: u64,
    ) -> Action {
        let c = &snap.candidates[idx];
        c.state.in_flight.fetch_add(1, Ordering::Relaxed);
        c.state.requests_total.fetch_add(1, Ordering::Relaxed);
        self.load_changed(snap, Some(idx));
        let excluded = if st.len == 0 {
            0
        } else {
            let candidate = |id: &&BackendId| snap.members.get(id).is_some_and(|m| m.1.is_some());
            st.tried().iter().filter(candidate).count()
        };
        st.push(
            c.state.id,
            PickTrace {
                candidates: snap.candidates.len() as u32,
                excluded: excluded as u32,
                panic: snap.panic,
            },
        );
        st.open = Some(Open {
            id: c.state.id,
            generation: snap.generation,
            index: idx,
            sent_ns,
        });
        let mut try_deadline = later(not_before.max(now), self.config.retry.attempt_timeout);
        if let Some(d) = st.info.deadline {
            try_deadline = try_deadline.min(d);
        }
        Action::Forward {
            backend: c.state.id,
            not_before: not_before.max(now),
            try_deadline,
        }
    }

    /// Tells the strategy that the load of candidate `idx` changed (if it cares).
    fn load_changed(&self, snap: &Snapshot<S::Table>, idx: Option<usize>) {
        if let Some(i) = idx.filter(|_| self.select.tracks_load()) {
            self.select.load_changed(&snap.table, &snap.candidates, i);
        }
    }

    /// Counts one connection-level failure; ejects the backend at the threshold if allowed.
    fn passive_failure(&self, s: &BackendState, now: Instant) {
        s.failures_total.fetch_add(1, Ordering::Relaxed);
        let threshold = self.config.passive.consecutive_failures;
        if threshold == 0 {
            return;
        }
        let n = s
            .consecutive_failures
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        if n < threshold {
            return;
        }
        let p = self.config.passive;
        let mut ctl = self.control();
        let Some(&i) = ctl.by_id.get(&s.id) else {
            return;
        };
        if ctl.members[i].ejected_until.is_some() {
            return;
        }
        let total = ctl.members.len();
        let ejected = ctl
            .members
            .iter()
            .filter(|m| m.ejected_until.is_some())
            .count();
        if (ejected + 1) * 100 > p.max_ejected_percent as usize * total {
            return; // Stays counted: the next failure asks again once others return.
        }
        let m = &mut ctl.members[i];
        let row = m
            .state
            .ejection_row
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        let until = later(now, ejection_duration(p.ejection, p.max_ejection, row));
        m.ejected_until = Some(until);
        m.ramp_start = None;
        m.state.consecutive_failures.store(0, Ordering::Relaxed);
        let event = Event::Ejected {
            backend: s.id,
            addr: s.addr.clone(),
            until,
            failures: n,
            ejections: row,
        };
        push_event(&mut ctl, event);
        self.rebuild(&mut ctl, now);
    }

    /// A returned backend served a request well: its next ejection starts a new row.
    fn end_ejection_row(&self, id: BackendId) {
        let ctl = self.control();
        if let Some(&i) = ctl.by_id.get(&id) {
            let m = &ctl.members[i];
            if m.ejected_until.is_none() {
                m.state.ejection_row.store(0, Ordering::Relaxed);
            }
        }
    }

    fn ramp_percent(&self, m: &Member, now: Instant) -> u32 {
        m.ramp_start.map_or(100, |r| {
            slow_start_percent(
                now.saturating_duration_since(r),
                self.config.passive.slow_start,
            )
        })
    }

    /// Recomputes eligibility, panic mode and weights; publishes a new snapshot; re-arms the timer.
    fn rebuild(&self, ctl: &mut Control, now: Instant) {
        let live = |m: &&Member| m.ejected_until.is_none_or(|u| u <= now);
        let total = ctl.members.len();
        let eligible = ctl
            .members
            .iter()
            .filter(|m| m.health.is_up())
            .filter(live)
            .count();
        let threshold = self.config.passive.panic_threshold_percent as usize;
        let panic = total > 0 && eligible * 100 < threshold * total;
        if panic != ctl.panic {
            ctl.panic = panic;
            push_event(
                ctl,
                Event::Panic {
                    on: panic,
                    eligible,
                    total,
                },
            );
        }
        // Panic mode overrides ejections, never probes: a backend that fails its health
        // checks is not sent traffic, so "no healthy backend" is always a 503.
        let candidates: Vec<Candidate> = ctl
            .members
            .iter()
            .filter(|m| m.health.is_up() && (panic || live(m)))
            .map(|m| Candidate {
                weight: (m.weight.get() * self.ramp_percent(m, now)).max(1),
                base_weight: m.weight.get(),
                state: Arc::clone(&m.state),
            })
            .collect();
        let table = self.select.build(&candidates);
        ctl.generation += 1;
        let mut members: HashMap<BackendId, (Arc<BackendState>, Option<usize>)> = ctl
            .members
            .iter()
            .map(|m| (m.state.id, (Arc::clone(&m.state), None)))
            .collect();
        for (i, c) in candidates.iter().enumerate() {
            if let Some(m) = members.get_mut(&c.id()) {
                m.1 = Some(i);
            }
        }
        self.snapshot.store(Arc::new(Snapshot {
            generation: ctl.generation,
            candidates,
            members,
            panic,
            table,
        }));
        // Loads that changed while the table was built are folded in now that it is visible.
        let snap = self.snapshot.load();
        for i in 0..snap.candidates.len() {
            self.load_changed(&snap, Some(i));
        }

        let slow_start = self.config.passive.slow_start;
        let next = ctl
            .members
            .iter()
            .flat_map(|m| {
                let expiry = m.ejected_until;
                let step = m.ramp_start.and_then(|r| {
                    slow_start_next_step(now.saturating_duration_since(r), slow_start)
                        .map(|d| later(r, d))
                });
                [expiry, step]
            })
            .flatten()
            .min();
        let ns = next.map_or(NO_TIMEOUT, |t| self.ticks(t).min(NO_TIMEOUT - 1));
        self.next_timeout_ns.store(ns, Ordering::Release);
    }
}

/// `t + d`, saturating far in the future instead of overflowing: durations come from
/// configuration, and no configuration may make the core panic.
fn later(t: Instant, d: Duration) -> Instant {
    t.checked_add(d)
        .or_else(|| t.checked_add(Duration::from_secs(1 << 32)))
        .unwrap_or(t)
}

fn push_event(ctl: &mut Control, event: Event) {
    tracing::trace!(%event, "lb-core event");
    if ctl.events.len() >= EVENT_QUEUE {
        ctl.events.pop_front();
    }
    ctl.events.push_back(event);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::select::{RoundRobin, StrategyKind};

    fn ms(epoch: Instant, n: u64) -> Instant {
        epoch + Duration::from_millis(n)
    }

    #[allow(clippy::disallowed_methods)]
    fn epoch() -> Instant {
        Instant::now()
    }

    fn two(config: Config) -> (Balancer<RoundRobin>, Vec<BackendId>, Instant) {
        let t0 = epoch();
        let lb = Balancer::new(config, RoundRobin::default()).unwrap();
        let ids = lb
            .set_backends(
                [
                    Backend::new("a", Weight::ONE),
                    Backend::new("b", Weight::ONE),
                ],
                t0,
            )
            .unwrap();
        (lb, ids, t0)
    }

    #[test]
    fn balancer_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Balancer<AnySelect>>();
        check::<RequestState>();
    }

    #[test]
    fn refused_then_retried_elsewhere_then_relayed() {
        let (lb, ids, t0) = two(Config::default());
        let (mut st, a) = lb.start(RequestInfo::new(false, false), t0);
        let Action::Forward { backend, .. } = a else {
            panic!("{a:?}")
        };
        assert_eq!(backend, ids[0]);
        let a = lb.handle_outcome(&mut st, Outcome::ConnectRefused, ms(t0, 1));
        let Action::Forward {
            backend,
            not_before,
            try_deadline,
        } = a
        else {
            panic!("{a:?}")
        };
        assert_eq!(backend, ids[1], "a POST that never left may go elsewhere");
        assert!(not_before >= ms(t0, 1) && not_before <= ms(t0, 11));
        assert_eq!(try_deadline, not_before + Duration::from_secs(30));
        assert_eq!(
            lb.handle_outcome(&mut st, Outcome::Response { status: 201 }, ms(t0, 5)),
            Action::Relay
        );
        assert_eq!(
            st.to_string(),
            "#0 connect_refused retry_not_sent, #1 status 201 relay"
        );
        assert_eq!(lb.backends(t0)[1].active_requests, 1, "held until finish");
        lb.finish(st, Completion::Done, ms(t0, 6));
        assert!(lb.backends(t0).iter().all(|b| b.active_requests == 0));
    }

    #[test]
    fn sent_post_is_never_replayed_and_504_on_last_timeout() {
        let (lb, _, t0) = two(Config::default());
        let (mut st, _) = lb.start(RequestInfo::new(false, true), t0);
        assert_eq!(
            lb.handle_outcome(&mut st, Outcome::Reset, t0),
            Action::Fail(Failure::BadGateway)
        );
        assert_eq!(
            st.attempts().last().unwrap().decision,
            Some(Decision::Stop(StopReason::NotIdempotent))
        );

        let (mut st, _) = lb.start(RequestInfo::new(true, true), t0);
        let a = lb.handle_outcome(&mut st, Outcome::TimedOut, t0);
        assert!(matches!(a, Action::Forward { .. }));
        assert_eq!(
            lb.handle_outcome(&mut st, Outcome::TimedOut, t0),
            Action::Fail(Failure::GatewayTimeout)
        );
        assert_eq!(
            st.attempts().last().unwrap().decision,
            Some(Decision::Stop(StopReason::NoUntriedBackend))
        );
        assert!(lb.backends(t0).iter().all(|b| b.active_requests == 0));
    }

    #[test]
    fn no_backend_is_503_and_removed_backends_are_never_picked() {
        let (lb, ids, t0) = two(Config::default());
        lb.set_backends([Backend::new("b", Weight::ONE)], t0)
            .unwrap();
        for _ in 0..4 {
            let (st, a) = lb.start(RequestInfo::new(true, true), t0);
            assert!(
                matches!(a, Action::Forward { backend, .. } if backend == ids[1]),
                "b keeps its id"
            );
            lb.abandon(st, t0);
        }
        lb.set_backends([], t0).unwrap();
        let (_, a) = lb.start(RequestInfo::new(true, true), t0);
        assert_eq!(a, Action::Fail(Failure::NoBackend));
        assert_eq!(
            lb.set_backends(
                [
                    Backend::new("x", Weight::ONE),
                    Backend::new("x", Weight::ONE)
                ],
                t0
            ),
            Err(ConfigError::DuplicateBackend("x".into()))
        );
    }

    #[test]
    fn probes_flip_after_thresholds_with_events() {
        let (lb, ids, t0) = two(Config::default());
        for i in 0..3 {
            lb.handle_probe(
                ids[0],
                ProbeResult::Failure(ProbeFailure::Refused),
                ms(t0, i),
            );
        }
        let e = lb.poll_event().unwrap();
        assert_eq!(
            e.to_string(),
            "backend a down: 3 consecutive probe failures: connection refused"
        );
        // Half the pool eligible is not below the 50% panic threshold: b only.
        for _ in 0..3 {
            let (st, a) = lb.start(RequestInfo::new(true, true), t0);
            assert!(matches!(a, Action::Forward { backend, .. } if backend == ids[1]));
            lb.abandon(st, t0);
        }
        lb.handle_probe(ids[0], ProbeResult::Success, ms(t0, 10));
        assert!(lb.poll_event().is_none());
        lb.handle_probe(ids[0], ProbeResult::Success, ms(t0, 20));
        assert!(matches!(
            lb.poll_event(),
            Some(Event::Up { successes: 2, .. })
        ));
        assert_eq!(
            lb.backends(ms(t0, 20))[0].weight_percent,
            10,
            "slow start after coming back"
        );
        assert_eq!(lb.poll_timeout(), Some(ms(t0, 20) + Duration::from_secs(3)));
        // All probe-down: 503 at once, panic mode notwithstanding.
        for id in &ids {
            for i in 0..3 {
                lb.handle_probe(
                    *id,
                    ProbeResult::Failure(ProbeFailure::TimedOut),
                    ms(t0, 30 + i),
                );
            }
        }
        assert_eq!(
            lb.start(RequestInfo::new(true, true), ms(t0, 40)).1,
            Action::Fail(Failure::NoBackend)
        );
    }

    #[test]
    fn ejection_grows_and_caps_and_row_ends_on_success() {
        let mut config = Config::default();
        config.passive.consecutive_failures = 1;
        config.passive.ejection = Duration::from_secs(10);
        config.passive.max_ejection = Duration::from_secs(25);
        config.passive.slow_start = Duration::ZERO;
        let (lb, ids, t0) = two(config);
        let fail_on_a = |at: Instant| loop {
            let (mut st, a) = lb.start(RequestInfo::new(true, true), at);
            if matches!(a, Action::Forward { backend, .. } if backend == ids[0]) {
                let _ = lb.handle_outcome(&mut st, Outcome::ConnectRefused, at);
                lb.abandon(st, at);
                return;
            }
            lb.abandon(st, at);
        };
        let mut t = t0;
        for expected in [10, 20, 25, 25] {
            fail_on_a(t);
            let Some(Event::Ejected { until, .. }) = lb.poll_event() else {
                panic!()
            };
            assert_eq!(until, t + Duration::from_secs(expected));
            t = until;
            assert_eq!(lb.poll_timeout(), Some(until));
            lb.handle_timeout(t);
            assert!(matches!(lb.poll_event(), Some(Event::Restored { .. })));
        }
        // A success after returning ends the row: the next ejection is a first one again.
        loop {
            let (mut st, a) = lb.start(RequestInfo::new(true, true), t);
            let hit_a = matches!(a, Action::Forward { backend, .. } if backend == ids[0]);
            let _ = lb.handle_outcome(&mut st, Outcome::Response { status: 200 }, t);
            lb.finish(st, Completion::Done, t);
            if hit_a {
                break;
            }
        }
        fail_on_a(t);
        let Some(Event::Ejected {
            until,
            ejections: 1,
            ..
        }) = lb.poll_event()
        else {
            panic!()
        };
        assert_eq!(until, t + Duration::from_secs(10));
    }

    #[test]
    fn max_ejected_percent_holds() {
        let mut config = Config::default();
        config.passive.consecutive_failures = 1;
        config.passive.max_ejected_percent = 50;
        let (lb, _, t0) = two(config);
        for _ in 0..10 {
            let (mut st, _) = lb.start(RequestInfo::new(true, true), t0);
            while let Action::Forward { .. } =
                lb.handle_outcome(&mut st, Outcome::ConnectRefused, t0)
            {}
        }
        let ejected = lb
            .backends(t0)
            .iter()
            .filter(|b| b.ejected_until.is_some())
            .count();
        assert_eq!(ejected, 1, "1 of 2 at 50% is allowed, 2 of 2 is not");
    }

    #[test]
    fn huge_durations_saturate_instead_of_panicking() {
        let mut config = Config::default();
        config.retry.attempt_timeout = Duration::MAX;
        config.retry.backoff = Duration::MAX;
        config.passive.consecutive_failures = 1;
        config.passive.ejection = Duration::MAX;
        config.passive.max_ejection = Duration::MAX;
        config.passive.slow_start = Duration::MAX;
        let (lb, _, t0) = two(config);
        let (mut st, a) = lb.start(RequestInfo::new(true, true), t0);
        assert!(matches!(a, Action::Forward { .. }));
        let a = lb.handle_outcome(&mut st, Outcome::ConnectRefused, t0);
        assert!(matches!(a, Action::Forward { .. }), "{a:?}");
        lb.handle_timeout(t0);
        assert!(lb.poll_timeout().is_some());
        lb.abandon(st, t0);
    }

    #[test]
    fn any_select_works_for_every_kind() {
        for kind in StrategyKind::ALL {
            let t0 = epoch();
            let lb = Balancer::new(Config::default(), AnySelect::new(kind)).unwrap();
            lb.set_backends(
                (0..5).map(|i| Backend::new(format!("10.0.0.{i}:80"), Weight::ONE)),
                t0,
            )
            .unwrap();
            let mut seen = std::collections::HashSet::new();
            for k in 0..200u64 {
                let (mut st, a) = lb.start(RequestInfo::new(true, true).with_hash_key(k), t0);
                let Action::Forward { backend, .. } = a else {
                    panic!("{kind}: {a:?}")
                };
                seen.insert(backend);
                assert_eq!(
                    lb.handle_outcome(&mut st, Outcome::Response { status: 200 }, ms(t0, 1)),
                    Action::Relay
                );
                lb.finish(st, Completion::Done, ms(t0, 1));
            }
            assert_eq!(seen.len(), 5, "{kind} reaches every backend");
        }
    }
}
