//! The [`Balancer`]: shared by every request, it owns the backend set, its health, the
//! strategy's table and the retry budget, and turns inputs into [`Action`]s and [`Event`]s.
//!
//! # Layout
//! As quinn-proto splits its connection, by concern:
//! * this module: the type, its inputs and outputs, and the request path (`start`,
//!   `handle_outcome`, `finish`, `abandon`), which carries out the retry decision made by a
//!   pure function (`retry::decide`);
//! * `pool`: membership, eligibility (snapshot and lock-free hidden flags), panic mode, the
//!   rebuild of the snapshot and the strategy's table;
//! * `ejection`: passive ejection, its expiry, probe verdicts;
//! * `timer`: the enum-indexed deadlines behind `poll_timeout`/`handle_timeout`.
//!
//! # Concurrency
//! A quinn `Connection` is owned by one task; a `Balancer` is shared by every request on
//! every worker thread. So the request path takes `&self` and no lock in the common case: it
//! reads an immutable snapshot through `arc-swap` and touches per-backend atomics. What
//! changes membership or eligibility is rare and takes a short mutex. An ejection (the one
//! such change made on the request path) only marks the backend, hides it from picks with
//! an atomic flag, and leaves the snapshot and table rebuild to the timer's next
//! `handle_timeout`; reloads and probe flips rebuild in the caller's task, outside the
//! mutex. Tables are rebuilt only when the strategy's input changed: slow-start steps do not
//! rebuild consistent hashing, which ignores them. The other request-path locks are the
//! retry budget's, taken when a retry is about to happen, and the control mutex for the
//! O(1) bookkeeping of an ejection.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use crate::backend::{Backend, BackendId};
use crate::config::Config;
use crate::error::ConfigError;
use crate::event::Event;
use crate::health::slow_start_next_step;
use crate::latency::LatencyParams;
use crate::outcome::{Completion, Outcome, RequestInfo};
use crate::retry::backoff::backoff;
use crate::retry::budget::Budget;
use crate::retry::decide::{decide, failure, Facts};
use crate::retry::{Action, Decision, Failure, Open, PickTrace, RequestState};
use crate::rng::{mix64, Rng};
use crate::select::{scan_from, AnySelect, PickCx, Select};

mod ejection;
mod pool;
mod timer;

pub use pool::BackendStatus;
use pool::{Control, Snapshot};
use timer::{Deadline, Timer};

/// Events kept for `poll_event` before the oldest are dropped (nobody is draining).
const EVENT_QUEUE: usize = 4096;

/// Decides where each request attempt goes and when to stop. Performs no I/O and never reads
/// a clock: every input carries `now`.
///
/// Methods, by kind (quinn's order):
/// * getters: [`backends`](Self::backends), [`strategy`](Self::strategy), [`config`](Self::config);
/// * inputs: [`start`](Self::start), [`handle_outcome`](Self::handle_outcome),
///   [`finish`](Self::finish), [`abandon`](Self::abandon), [`handle_probe`](Self::handle_probe),
///   [`handle_timeout`](Self::handle_timeout);
/// * commands: [`set_backends`](Self::set_backends), [`set_draining`](Self::set_draining),
///   [`set_weight`](Self::set_weight);
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
    /// Serializes snapshot rebuilds, which run outside `control`.
    rebuilding: Mutex<()>,
    epoch: OnceLock<Instant>,
    deadline: Deadline,
    seed: u64,
    requests: RequestCounter,
}

/// Numbers requests in the order they start, on a cache line of its own: request `n` draws
/// its random stream from `(seed, n)`, so every request's stream differs from every other's
/// (whatever thread it runs on) and a run is reproducible from `rng_seed`.
#[derive(Debug, Default)]
#[repr(align(64))]
struct RequestCounter(AtomicU64);

/// A pick: the snapshot it was made in, and the candidate's index there.
type Picked<T> = (arc_swap::Guard<std::sync::Arc<Snapshot<T>>>, usize);

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
            snapshot: ArcSwap::from_pointee(Snapshot::empty(table)),
            control: Mutex::new(Control::default()),
            rebuilding: Mutex::new(()),
            epoch: OnceLock::new(),
            deadline: Deadline::new(),
            seed,
            requests: RequestCounter::default(),
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

    /// Replaces the backend set. Backends whose identity and address stay keep their id, health,
    /// ejection and load; new ones start healthy (with slow start, unless this is the first
    /// set or the strategy is consistent hashing); removed ones are never picked again, from
    /// the moment this is called. Returns the ids in the order given.
    ///
    /// # Errors
    /// [`ConfigError::DuplicateBackend`] if an identity ([`Backend::identity`]) appears twice;
    /// nothing changes then.
    pub fn set_backends(
        &self,
        backends: impl IntoIterator<Item = Backend>,
        now: Instant,
    ) -> Result<Vec<BackendId>, ConfigError> {
        let backends: Vec<Backend> = backends.into_iter().collect();
        let mut seen = HashSet::new();
        if let Some(dup) = backends.iter().find(|b| !seen.insert(b.identity())) {
            return Err(ConfigError::DuplicateBackend(dup.addr().to_owned()));
        }
        self.ticks(now);
        let ids = {
            let mut ctl = self.control();
            let ids = self.replace_members(&mut ctl, backends, now);
            self.schedule(&mut ctl, now);
            ids
        };
        self.rebuild(now);
        Ok(ids)
    }

    // --- inputs: the request path ---

    /// Starts a request: counts it toward the retry budget and picks its first backend.
    /// Returns `Fail(NoBackend)` at once when no backend is eligible.
    pub fn start(&self, info: RequestInfo, now: Instant) -> (RequestState, Action) {
        let now_ns = self.ticks(now);
        self.budget.deposit(now_ns);
        let n = self.requests.0.fetch_add(1, Ordering::Relaxed);
        let mut st = RequestState::new(info, Rng::from_seed(mix64(self.seed ^ mix64(n))));
        if info.deadline.is_some_and(|d| d <= now) {
            st.failure = Some(Failure::GatewayTimeout);
            return (st, Action::Fail(Failure::GatewayTimeout));
        }
        let action = match self.pick(&mut st, now, now_ns) {
            Some((snap, idx)) => self.commit(&mut st, &snap, idx, now, now, now_ns),
            None => {
                st.failure = Some(Failure::NoBackend);
                Action::Fail(Failure::NoBackend)
            }
        };
        (st, action)
    }

    /// Reports how the attempt in flight ended and returns what to do next: relay the
    /// response, retry elsewhere, or fail. The decision behind it (and its reason) is then
    /// [`RequestState::last_decision`]. Calling it with no attempt in flight returns the
    /// request's last action again and changes nothing.
    pub fn handle_outcome(&self, st: &mut RequestState, outcome: Outcome, now: Instant) -> Action {
        if st.finished || st.attempts().last().is_some_and(|a| a.decision.is_some()) {
            return st.failure.map_or(Action::Relay, Action::Fail);
        }
        let Some(open) = st.open.take() else {
            return Action::Fail(st.failure.unwrap_or(Failure::NoBackend));
        };
        let now_ns = self.ticks(now);
        let snap = self.snapshot.load();
        let idx = snap.index_of(&open);
        let s = &*open.state;
        if let Outcome::Response { status } = outcome {
            // The failure row and ejection row end only in `finish(Done)`: a backend that
            // sends heads and then breaks every body must still reach the threshold.
            if status >= 500 {
                s.add_error(now_ns);
            } else {
                s.clear_errors();
            }
            if self.select.uses_latency() {
                self.latency
                    .observe(s, now_ns.saturating_sub(open.sent_ns) as f64, now_ns);
            }
            self.load_changed(&snap, idx, now_ns);
            st.record(outcome, Decision::Relay);
            st.open = Some(open);
            return Action::Relay;
        }

        s.release();
        if outcome.is_backend_failure() {
            s.add_error(now_ns);
            self.passive_failure(s, &snap, idx, now, now_ns);
        }
        self.load_changed(&snap, idx, now_ns);
        drop(snap);
        drop(open);

        let delay = backoff(self.config.retry.backoff, st.len as u32, &mut st.rng);
        let not_before = later(now, delay);
        let info = st.info;
        let facts = Facts {
            outcome,
            info: &info,
            attempts: st.len,
            config: &self.config.retry,
            not_before,
        };
        let mut picked = None;
        let decision = decide(
            &facts,
            || {
                picked = self.pick(st, now, now_ns);
                picked.is_some()
            },
            || self.budget.withdraw(now_ns),
        );
        match (decision, picked) {
            (Decision::Retry(_), Some((snap, idx))) => {
                st.record(outcome, decision);
                let sent_ns =
                    now_ns.saturating_add(u64::try_from(delay.as_nanos()).unwrap_or(u64::MAX));
                self.commit(st, &snap, idx, now, not_before, sent_ns)
            }
            (Decision::Stop(why), _) => {
                let fail = failure(outcome, why);
                st.record(outcome, decision);
                st.failure = Some(fail);
                Action::Fail(fail)
            }
            // `decide` retries only after a pick, and relays only responses (handled above).
            _ => {
                let why = crate::retry::StopReason::NoUntriedBackend;
                let fail = failure(outcome, why);
                st.record(outcome, Decision::Stop(why));
                st.failure = Some(fail);
                Action::Fail(fail)
            }
        }
    }

    /// Ends a request whose response was relayed: releases its in-flight slot and records a
    /// body the backend broke off. Anything else in flight is released as by `abandon`.
    pub fn finish(&self, mut st: RequestState, completion: Completion, now: Instant) {
        st.finished = true;
        let Some(open) = st.open.take() else { return };
        let s = &*open.state;
        s.release();
        let now_ns = self.ticks(now);
        let snap = self.snapshot.load();
        let idx = snap.index_of(&open);
        match completion {
            Completion::BackendFailed => {
                s.add_error(now_ns);
                self.passive_failure(s, &snap, idx, now, now_ns);
            }
            // Only a whole exchange is a success. A 5xx neither counts toward ejection nor
            // ends an ejection row (SPEC), but it does end the row of transport failures.
            Completion::Done => {
                if s.consecutive_failures.load(Ordering::Relaxed) != 0 {
                    s.consecutive_failures.store(0, Ordering::Relaxed);
                }
                let good = st.attempts().last().is_some_and(
                    |a| matches!(a.outcome, Some(Outcome::Response { status }) if status < 500),
                );
                if good && s.ejection_row.load(Ordering::Relaxed) != 0 {
                    self.end_ejection_row(s.id);
                }
            }
            Completion::ClientGone => {}
        }
        self.load_changed(&snap, idx, now_ns);
    }

    /// The client went away (or the caller gave up) mid-request: releases the in-flight
    /// slot. Never counts toward ejection, health or the retry budget. Dropping the
    /// [`RequestState`] does the same (without telling a load-indexed strategy at once).
    pub fn abandon(&self, st: RequestState, now: Instant) {
        self.finish(st, Completion::ClientGone, now);
    }

    // --- inputs: the rare path ---

    /// Expires ejections, advances slow-start ramps and rebuilds the table after an
    /// ejection, whatever is due by `now`. Spurious calls are no-ops. This is where table
    /// rebuilds caused on the request path happen (but a pick that finds nothing does a due
    /// rebuild itself first): call it from a timer task, never inline in a request.
    pub fn handle_timeout(&self, now: Instant) {
        let now_ns = self.ticks(now);
        if self.deadline.load() > now_ns {
            return;
        }
        {
            let mut ctl = self.control();
            if ctl.timers.is_due(Timer::Ejection, now) {
                self.expire_ejections(&mut ctl, now);
            }
            if ctl.timers.is_due(Timer::SlowStart, now) {
                // Ramps move weights at every step.
                let window = self.config.passive.slow_start;
                for m in &mut ctl.members {
                    if m.ramp_start
                        .is_some_and(|r| now.saturating_duration_since(r) >= window)
                    {
                        m.ramp_start = None;
                    }
                }
                ctl.dirty = true;
            }
            ctl.recount();
            ctl.update_panic(self.config.passive.panic_threshold_percent);
            ctl.publish_flags();
            self.schedule(&mut ctl, now);
        }
        self.rebuild(now);
    }

    // --- outputs ---

    /// When `handle_timeout` should next be called, if ever.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        let ns = self.deadline.load();
        let epoch = self.epoch.get()?;
        (ns != Deadline::NONE).then(|| later(*epoch, Duration::from_nanos(ns)))
    }

    /// The next state change to log or count, oldest first.
    #[must_use]
    pub fn poll_event(&self) -> Option<Event> {
        self.control().events.pop_front()
    }

    // --- internals ---

    /// Recomputes the ejection and slow-start deadlines from every member (rare paths
    /// only) and publishes the next one.
    fn schedule(&self, ctl: &mut Control, now: Instant) {
        let window = self.config.passive.slow_start;
        let expiry = ctl.members.iter().filter_map(|m| m.ejected_until).min();
        let step = ctl
            .members
            .iter()
            .filter_map(|m| {
                let r = m.ramp_start?;
                slow_start_next_step(now.saturating_duration_since(r), window).map(|d| later(r, d))
            })
            .min();
        ctl.timers.set(Timer::Ejection, expiry);
        ctl.timers.set(Timer::SlowStart, step);
        if ctl.dirty {
            ctl.timers.set_earlier(Timer::Rebuild, now);
        }
        self.publish_deadline(ctl);
    }

    fn publish_deadline(&self, ctl: &Control) {
        self.deadline
            .store(ctl.timers.next().map(|t| self.ticks(t)));
    }

    /// Asks the strategy for a candidate this request has not tried, and checks its answer.
    ///
    /// A change of the backend set hides the removed backends at once and publishes the new
    /// ones with the snapshot rebuilt just after; a pick in between finds nothing when every
    /// backend of its snapshot was removed. So before answering "none", a stale snapshot is
    /// rebuilt here (waiting for a rebuild under way) and the pick is made again from it.
    fn pick(&self, st: &mut RequestState, now: Instant, now_ns: u64) -> Option<Picked<S::Table>> {
        let snap = self.snapshot.load();
        let generation = snap.generation;
        if let Some(picked) = self.pick_from(snap, st, now_ns) {
            return Some(picked);
        }
        self.rebuild(now);
        let snap = self.snapshot.load();
        if snap.generation == generation {
            return None;
        }
        self.pick_from(snap, st, now_ns)
    }

    fn pick_from(
        &self,
        snap: arc_swap::Guard<std::sync::Arc<Snapshot<S::Table>>>,
        st: &mut RequestState,
        now_ns: u64,
    ) -> Option<Picked<S::Table>> {
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
        self.load_changed(snap, Some(idx), sent_ns.min(self.ticks(now)));
        let excluded = if st.len == 0 {
            0
        } else {
            let candidate = |id: &&BackendId| snap.members.get(id).is_some_and(Option::is_some);
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
            state: std::sync::Arc::clone(&c.state),
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
    fn load_changed(&self, snap: &Snapshot<S::Table>, idx: Option<usize>, now_ns: u64) {
        if let Some(i) = idx.filter(|_| self.select.tracks_load()) {
            self.select
                .load_changed(&snap.table, &snap.candidates, i, now_ns);
        }
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
    use crate::backend::Weight;
    use crate::outcome::{ProbeFailure, ProbeResult};
    use crate::retry::StopReason;
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
    fn a_pick_between_a_set_change_and_its_snapshot_finds_the_new_backends() {
        // set_backends hides the removed backends at once and publishes the new ones with
        // the rebuild after: a pick in between, from the old snapshot, must not answer "no
        // backend" (503) when every old one was removed. The window, frozen: members
        // replaced, snapshot not yet rebuilt.
        let (lb, old, t0) = two(Config::default());
        {
            let mut ctl = lb.control();
            lb.replace_members(
                &mut ctl,
                vec![
                    Backend::new("c", Weight::ONE),
                    Backend::new("d", Weight::ONE),
                ],
                t0,
            );
        }
        for _ in 0..4 {
            let (mut st, a) = lb.start(RequestInfo::new(true, true), t0);
            let Action::Forward { backend, .. } = a else {
                panic!("{a:?}");
            };
            assert!(!old.contains(&backend), "a removed backend was picked");
            let _ = lb.handle_outcome(&mut st, Outcome::Response { status: 200 }, t0);
            lb.finish(st, Completion::Done, t0);
        }
    }

    #[test]
    fn a_draining_backend_takes_no_new_request_while_its_in_flight_one_finishes() {
        let (lb, ids, t0) = two(Config::default());
        let (mut held, a) = lb.start(RequestInfo::new(true, true), t0);
        assert!(matches!(a, Action::Forward { backend, .. } if backend == ids[0]));
        assert!(lb.set_draining(ids[0], true, t0));
        assert!(lb.backends(t0)[0].draining);
        for _ in 0..4 {
            let (mut st, a) = lb.start(RequestInfo::new(true, true), t0);
            assert!(matches!(a, Action::Forward { backend, .. } if backend == ids[1]));
            // A retry never goes to the drained backend either.
            let a = lb.handle_outcome(&mut st, Outcome::ConnectRefused, t0);
            assert!(matches!(a, Action::Fail(_)), "{a:?}");
        }
        assert_eq!(
            lb.handle_outcome(&mut held, Outcome::Response { status: 200 }, t0),
            Action::Relay
        );
        lb.finish(held, Completion::Done, t0);
        assert_eq!(lb.backends(t0)[0].active_requests, 0);
        // set_backends keeps the drain of a backend that stays.
        lb.set_backends(
            [
                Backend::new("a", Weight::ONE),
                Backend::new("b", Weight::ONE),
            ],
            t0,
        )
        .unwrap();
        assert!(lb.backends(t0)[0].draining);
        assert!(lb.set_draining(ids[0], false, t0));
        let mut seen = HashSet::new();
        for _ in 0..4 {
            let (st, a) = lb.start(RequestInfo::new(true, true), t0);
            if let Action::Forward { backend, .. } = a {
                seen.insert(backend);
            }
            lb.abandon(st, t0);
        }
        assert_eq!(seen.len(), 2, "drain false restores it");
        assert!(!lb.set_draining(BackendId(99), true, t0));
    }

    #[test]
    fn consistent_hash_keys_move_off_a_draining_backend_and_weights_change_at_runtime() {
        let t0 = epoch();
        let lb = Balancer::new(
            Config::default(),
            AnySelect::new(StrategyKind::ConsistentHash),
        )
        .unwrap();
        let ids = lb
            .set_backends(
                (0..3).map(|i| Backend::new(format!("10.0.0.{i}:80"), Weight::ONE)),
                t0,
            )
            .unwrap();
        let place = |k: u64| {
            let (st, a) = lb.start(RequestInfo::new(true, true).with_hash_key(k), t0);
            lb.abandon(st, t0);
            match a {
                Action::Forward { backend, .. } => backend,
                a => panic!("{a:?}"),
            }
        };
        let before: Vec<BackendId> = (0..300).map(place).collect();
        assert!(before.contains(&ids[0]));
        lb.set_draining(ids[0], true, t0);
        for (k, was) in before.iter().enumerate() {
            let now = place(k as u64);
            assert_ne!(now, ids[0], "key {k} stayed on the drained backend");
            if *was != ids[0] {
                assert_eq!(now, *was, "key {k} moved though its backend stayed");
            }
        }
        lb.set_draining(ids[0], false, t0);
        assert!((0..300).map(place).eq(before.iter().copied()));

        let lb = Balancer::new(
            Config::default(),
            AnySelect::new(StrategyKind::WeightedRoundRobin),
        )
        .unwrap();
        let ids = lb
            .set_backends(
                [
                    Backend::new("a", Weight::ONE),
                    Backend::new("b", Weight::ONE),
                ],
                t0,
            )
            .unwrap();
        assert!(lb.set_weight(ids[1], Weight::new(3).unwrap(), t0));
        assert_eq!(lb.backends(t0)[1].weight, 3);
        let mut to_b = 0;
        for _ in 0..8 {
            let (st, a) = lb.start(RequestInfo::new(true, true), t0);
            to_b += usize::from(matches!(a, Action::Forward { backend, .. } if backend == ids[1]));
            lb.abandon(st, t0);
        }
        assert_eq!(to_b, 6, "weights 1:3 over 8 picks");
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

    /// The backends `n` picks (with varied hash keys) went to.
    fn picked<S: Select>(lb: &Balancer<S>, n: u64, now: Instant) -> HashSet<BackendId> {
        let mut seen = HashSet::new();
        for k in 0..n {
            let (st, a) = lb.start(RequestInfo::new(true, true).with_hash_key(k), now);
            if let Action::Forward { backend, .. } = a {
                seen.insert(backend);
            }
            lb.abandon(st, now);
        }
        seen
    }

    #[test]
    fn only_the_lowest_priority_group_with_an_eligible_backend_takes_requests() {
        for kind in StrategyKind::ALL {
            let t0 = epoch();
            let lb = Balancer::new(Config::default(), AnySelect::new(kind)).unwrap();
            let ids = lb
                .set_backends(
                    [
                        Backend::new("a", Weight::ONE),
                        Backend::new("b", Weight::ONE),
                        Backend::new("c", Weight::ONE).with_priority(1),
                        Backend::new("d", Weight::ONE).with_priority(2),
                    ],
                    t0,
                )
                .unwrap();
            let (a, b, c) = (ids[0], ids[1], ids[2]);
            assert_eq!(lb.backends(t0)[2].priority, 1);
            assert_eq!(picked(&lb, 64, t0), HashSet::from([a, b]), "{kind}");
            // One of the group left: the group stays.
            lb.set_draining(a, true, t0);
            assert_eq!(picked(&lb, 64, t0), HashSet::from([b]), "{kind}");
            // None of it eligible (b down by probes): the next group only, not the one after.
            for i in 0..3 {
                lb.handle_probe(b, ProbeResult::Failure(ProbeFailure::Refused), ms(t0, i));
            }
            let t1 = ms(t0, 10);
            assert_eq!(picked(&lb, 64, t1), HashSet::from([c]), "{kind}: fail-over");
            // A retry stays in the group in use: c refused, and no lower group to go to.
            let (mut st, act) = lb.start(RequestInfo::new(true, true), t1);
            assert!(matches!(act, Action::Forward { backend, .. } if backend == c));
            let act = lb.handle_outcome(&mut st, Outcome::ConnectRefused, t1);
            assert!(
                !matches!(act, Action::Forward { backend, .. } if backend == a || backend == b),
                "{kind}: {act:?}"
            );
            lb.abandon(st, t1);
            // One of the lower group back: traffic returns to it at once.
            lb.set_draining(a, false, t1);
            assert_eq!(picked(&lb, 64, t1), HashSet::from([a]), "{kind}: fail-back");
            // Priorities follow set_backends for backends that stay.
            lb.set_backends(
                [
                    Backend::new("a", Weight::ONE).with_priority(3),
                    Backend::new("b", Weight::ONE),
                    Backend::new("c", Weight::ONE).with_priority(1),
                    Backend::new("d", Weight::ONE).with_priority(2),
                ],
                t1,
            )
            .unwrap();
            assert_eq!(
                picked(&lb, 64, t1),
                HashSet::from([c]),
                "{kind}: a moved to group 3"
            );
        }
    }

    /// Review13b: standby priority groups that are down by probes put the group in use in
    /// panic mode. Two of two primaries up and three standbys down was 40 % eligible, below
    /// the 50 % threshold: panic was on although the group in use was whole, so an ejected
    /// primary kept taking requests. Panic mode is now judged on the group in use.
    #[test]
    fn down_standby_groups_do_not_put_the_group_in_use_in_panic() {
        let mut config = Config::default();
        config.passive.consecutive_failures = 1;
        config.passive.slow_start = Duration::ZERO;
        let t0 = epoch();
        let lb = Balancer::new(config, RoundRobin::default()).unwrap();
        let ids = lb
            .set_backends(
                [
                    Backend::new("a", Weight::ONE),
                    Backend::new("b", Weight::ONE),
                    Backend::new("c", Weight::ONE).with_priority(1),
                    Backend::new("d", Weight::ONE).with_priority(1),
                    Backend::new("e", Weight::ONE).with_priority(1),
                ],
                t0,
            )
            .unwrap();
        for &id in &ids[2..] {
            for i in 0..3 {
                lb.handle_probe(id, ProbeResult::Failure(ProbeFailure::Refused), ms(t0, i));
            }
        }
        let t1 = ms(t0, 10);
        assert_eq!(picked(&lb, 8, t1), HashSet::from([ids[0], ids[1]]));
        // a refuses a connect: ejected (1 of 5 is within max_ejected_percent).
        loop {
            let (mut st, a) = lb.start(RequestInfo::new(true, true), t1);
            let on_a = matches!(a, Action::Forward { backend, .. } if backend == ids[0]);
            if on_a {
                let _ = lb.handle_outcome(&mut st, Outcome::ConnectRefused, t1);
            }
            lb.abandon(st, t1);
            if on_a {
                break;
            }
        }
        lb.handle_timeout(t1);
        assert!(lb.backends(t1)[0].ejected_until.is_some(), "a is ejected");
        // The group in use has 1 of 2 eligible, not below 50 %: b only.
        assert_eq!(
            picked(&lb, 8, t1),
            HashSet::from([ids[1]]),
            "an ejected primary takes no request while its group is not in panic"
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
            // The table rebuild is the timer's, at once, off the request path.
            assert_eq!(lb.poll_timeout(), Some(t));
            lb.handle_timeout(t);
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
