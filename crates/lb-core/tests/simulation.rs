//! Deterministic simulation: a virtual clock, 3–10 backends that fail, black-hole, slow down
//! and recover on a seeded schedule, 100,000 requests through selection, active health,
//! outlier ejection and retries, for every strategy.
//!
//! The headline property: no attempt goes to a backend that has been dead (refusing or
//! black-holing) for longer than the detection bound. Active probes run every second with
//! `fall = 3` and a 500 ms timeout, so a dead backend is down by probes at most
//! 3 × 1 s + 1 s (probe phase) + 0.5 s after it died; passive ejection usually beats that.
//!
//! Beside it, every run checks what each mechanism is for, tightly enough that turning one
//! off fails the run (`checks_catch_each_mechanism_turned_off` proves it): retries make
//! almost every idempotent request succeed, ejection keeps attempts away from dead backends
//! long before probes notice, the budget caps the retries of a 2 s fleet-wide outage, a sent
//! POST is never replayed, and a reload with requests in flight never routes to a removed
//! backend. A last test shares one `Balancer` between threads.

mod common;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::time::{Duration, Instant};

use common::Clock;
use lb_core::select::{AnySelect, StrategyKind};
use lb_core::{
    Action, Backend, BackendId, Balancer, Completion, Config, Outcome, ProbeFailure, ProbeResult,
    RequestInfo, RequestState, Rng, Weight,
};

const PROBE_EVERY_MS: u64 = 1000;
const PROBE_TIMEOUT_MS: u64 = 500;
const DETECTION_BOUND_MS: u64 = 3 * PROBE_EVERY_MS + PROBE_EVERY_MS + PROBE_TIMEOUT_MS;
/// Every backend refuses for this long (shorter than probes take to notice): a retry storm
/// only the budget can stop.
const STORM_MS: u64 = 2_000;

/// Which mechanisms are on (the checks must fail when any is off).
#[derive(Debug, Clone, Copy)]
struct Knobs {
    ejection: bool,
    attempts: u32,
    budget: bool,
}

impl Knobs {
    const ALL_ON: Self = Self {
        ejection: true,
        attempts: 3,
        budget: true,
    };

    fn config(self, seed: u64) -> Config {
        let d = Config::default();
        let mut passive = d.passive().with_slow_start(Duration::from_secs(5));
        if !self.ejection {
            passive = passive.with_consecutive_failures(0);
        }
        let mut retry = d
            .retry()
            .with_attempt_timeout(Duration::from_millis(1000))
            .with_attempts(self.attempts);
        if !self.budget {
            retry = retry
                .with_budget_percent(100)
                .with_min_retries_per_second(1_000_000);
        }
        d.with_rng_seed(Some(seed))
            .with_passive(passive)
            .with_retry(retry)
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    Up { latency_ms: u64 },
    Slow { latency_ms: u64 },
    Refusing,
    BlackHole,
}

impl Mode {
    const fn dead(self) -> bool {
        matches!(self, Self::Refusing | Self::BlackHole)
    }
}

/// Phases of one backend: (start_ms, mode), sorted.
#[derive(Debug)]
struct Schedule(Vec<(u64, Mode)>);

impl Schedule {
    fn random(rng: &mut Rng, always_up: bool, until: u64) -> Self {
        let mut phases = Vec::new();
        let mut t = 0;
        while t < until {
            let mode = if always_up || t == 0 {
                Mode::Up {
                    latency_ms: 2 + rng.below(18),
                }
            } else {
                match rng.below(20) {
                    0..=9 => Mode::Up {
                        latency_ms: 2 + rng.below(18),
                    },
                    10..=12 => Mode::Slow {
                        latency_ms: 200 + rng.below(200),
                    },
                    13..=16 => Mode::Refusing,
                    _ => Mode::BlackHole,
                }
            };
            phases.push((t, mode));
            t += 5_000 + rng.below(25_000);
        }
        Self(phases)
    }

    fn at(&self, t: u64) -> Mode {
        self.0
            .iter()
            .rev()
            .find(|(s, _)| *s <= t)
            .map_or(Mode::Up { latency_ms: 5 }, |p| p.1)
    }

    /// When the current dead phase began (the start of a run of dead phases).
    fn dead_since(&self, t: u64) -> Option<u64> {
        let i = self.0.iter().rposition(|(s, _)| *s <= t)?;
        if !self.0[i].1.dead() {
            return None;
        }
        let mut j = i;
        while j > 0 && self.0[j - 1].1.dead() {
            j -= 1;
        }
        Some(self.0[j].0)
    }
}

#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Ev {
    /// Request i arrives.
    Arrive(u64),
    /// Request i's attempt is sent (after backoff).
    Send(u64),
    /// Request i's attempt ends (`attempt` guards against stale events).
    Done {
        req: u64,
        attempt: usize,
        outcome: u8,
        status: u16,
    },
    /// Backend b is probed.
    Probe(usize),
    /// A probe result lands.
    ProbeDone { backend: usize, result: u8 },
    /// The backend set changes.
    Reload,
}

struct Sim {
    clock: Clock,
    lb: Balancer,
    /// Every backend ever configured, by id: its index into `schedules` and the counters.
    index: HashMap<BackendId, usize>,
    /// The ids configured now, in order.
    ids: Vec<BackendId>,
    schedules: Vec<Schedule>,
    queue: BinaryHeap<Reverse<(u64, u64, Ev)>>,
    seq: u64,
    reqs: HashMap<u64, (RequestState, Option<(usize, Instant)>)>,
    rng: Rng,
    storm: (u64, u64),
    /// When the reload happens, and the backends it removes.
    reload_at: u64,
    removed: HashSet<BackendId>,
    // Results.
    statuses: HashMap<u16, u64>,
    /// Idempotent, replayable requests, and how many of those failed.
    safe: u64,
    safe_failed: u64,
    /// ... of which with 502 (refused or reset, never timed out): retries rescue these.
    safe_bad_gateway: u64,
    /// Attempts to a refusing backend outside the storm: ejection takes those out after five.
    sent_refusing: u64,
    sent: Vec<u64>,
    /// Attempts to dead backends outside the storm, and attempts during the storm.
    sent_dead: Vec<u64>,
    sent_in_storm: u64,
    late_to_dead: u64,
    /// Requests and retries per second, for the budget check.
    per_sec: HashMap<u64, (u64, u64)>,
    /// Sent POSTs (or non-replayable requests) that were sent again.
    replayed: u64,
    /// Attempts decided after the reload that went to a removed backend.
    to_removed: u64,
    in_flight_at_reload: usize,
}

impl Sim {
    fn new(kind: StrategyKind, seed: u64, n: usize, horizon: u64, knobs: Knobs) -> Self {
        let clock = Clock::new();
        let mut rng = Rng::from_seed(seed);
        let lb = Balancer::new(knobs.config(seed), AnySelect::new(kind)).unwrap();
        let backends = (0..n).map(|i| {
            Backend::new(
                format!("10.1.0.{i}:80"),
                Weight::new(1 + (i as u32 % 3)).unwrap(),
            )
        });
        let ids = lb.set_backends(backends, clock.now()).unwrap();
        let schedules = (0..n)
            .map(|i| Schedule::random(&mut rng, i == 0, horizon))
            .collect();
        let storm_at = horizon * 3 / 10;
        Self {
            clock,
            lb,
            index: ids.iter().enumerate().map(|(i, &id)| (id, i)).collect(),
            ids,
            schedules,
            queue: BinaryHeap::new(),
            seq: 0,
            reqs: HashMap::new(),
            rng,
            storm: (storm_at, storm_at + STORM_MS),
            reload_at: horizon * 6 / 10,
            removed: HashSet::new(),
            statuses: HashMap::new(),
            safe: 0,
            safe_failed: 0,
            safe_bad_gateway: 0,
            sent_refusing: 0,
            sent: vec![0; n],
            sent_dead: vec![0; n],
            sent_in_storm: 0,
            late_to_dead: 0,
            per_sec: HashMap::new(),
            replayed: 0,
            to_removed: 0,
            in_flight_at_reload: 0,
        }
    }

    fn push(&mut self, at: u64, ev: Ev) {
        self.seq += 1;
        self.queue.push(Reverse((at, self.seq, ev)));
    }

    fn at_ms(&self, t: Instant) -> u64 {
        t.duration_since(self.clock.epoch).as_millis() as u64
    }

    fn mode(&self, b: usize, t: u64) -> Mode {
        if (self.storm.0..self.storm.1).contains(&t) {
            return Mode::Refusing;
        }
        self.schedules[b].at(t)
    }

    fn dead_since(&self, b: usize, t: u64) -> Option<u64> {
        let scheduled = self.schedules[b].dead_since(t);
        if (self.storm.0..self.storm.1).contains(&t) {
            return Some(scheduled.map_or(self.storm.0, |d| d.min(self.storm.0)));
        }
        scheduled
    }

    fn act(&mut self, id: u64, action: Action, retry: bool) {
        match action {
            Action::Forward {
                backend,
                not_before,
                ..
            } => {
                if retry {
                    self.per_sec.entry(self.clock.ms / 1000).or_default().1 += 1;
                }
                if self.clock.ms >= self.reload_at && self.removed.contains(&backend) {
                    self.to_removed += 1;
                }
                let at = self.at_ms(not_before).max(self.clock.ms);
                self.push(at, Ev::Send(id));
            }
            Action::Relay | Action::Fail(_) => {
                let (st, _) = self.reqs.remove(&id).unwrap();
                let info = *st.info();
                let sent = st
                    .attempts()
                    .iter()
                    .filter(|a| a.outcome().is_some_and(Outcome::was_sent))
                    .count();
                if (!info.idempotent() || !info.replayable()) && sent > 1 {
                    self.replayed += 1;
                }
                let status = match action {
                    Action::Fail(f) => f.status(),
                    _ => 200,
                };
                // Request ids are arrival times; requests around the storm fail by design.
                let near_storm = id + 2_000 >= self.storm.0 && id <= self.storm.1 + 1_000;
                // The storm spends the retry budget on purpose; for the budget's window (10 s)
                // after it, a request the budget refused is the budget working, not a failure.
                let budget_spent = id <= self.storm.1.saturating_add(10_000)
                    && st.last_decision()
                        == Some(lb_core::Decision::Stop(
                            lb_core::StopReason::BudgetExhausted,
                        ));
                if info.idempotent() && info.replayable() && !near_storm && !budget_spent {
                    self.safe += 1;
                    self.safe_failed += u64::from(status != 200);
                    self.safe_bad_gateway += u64::from(status == 502);
                }
                *self.statuses.entry(status).or_default() += 1;
                if status == 200 {
                    self.lb.finish(st, Completion::Done, self.clock.now());
                } else {
                    self.lb.abandon(st, self.clock.now());
                }
            }
        }
    }

    fn run(&mut self, requests: u64) {
        for i in 0..requests {
            self.push(i, Ev::Arrive(i));
        }
        for b in 0..self.ids.len() {
            self.push(b as u64 * 97 % PROBE_EVERY_MS, Ev::Probe(b));
        }
        if self.reload_at != u64::MAX {
            self.push(self.reload_at, Ev::Reload);
        }
        while let Some(Reverse((at, _, ev))) = self.queue.pop() {
            // The timer fires first if it is due.
            while let Some(t) = self.lb.poll_timeout() {
                let t = self.at_ms(t).max(self.clock.ms);
                if t > at {
                    break;
                }
                self.clock.ms = t;
                self.lb.handle_timeout(self.clock.now());
            }
            self.clock.ms = at;
            while self.lb.poll_event().is_some() {}
            if matches!(ev, Ev::Probe(_)) && self.reqs.is_empty() && at > requests {
                continue; // the run is over
            }
            self.step(ev);
        }
    }

    /// Removes the last backend (requests are in flight to it) and adds a new, healthy one.
    fn reload(&mut self, now: Instant) {
        self.in_flight_at_reload = self.reqs.len();
        let gone = *self.ids.last().unwrap();
        let b = self.schedules.len();
        self.schedules
            .push(Schedule(vec![(0, Mode::Up { latency_ms: 5 })]));
        self.sent.push(0);
        self.sent_dead.push(0);
        let mut set: Vec<Backend> = (0..self.ids.len() - 1)
            .map(|i| {
                Backend::new(
                    format!("10.1.0.{i}:80"),
                    Weight::new(1 + (i as u32 % 3)).unwrap(),
                )
            })
            .collect();
        set.push(Backend::new("10.1.1.0:80", Weight::new(2).unwrap()));
        let ids = self.lb.set_backends(set, now).unwrap();
        assert_eq!(
            ids[..ids.len() - 1],
            self.ids[..self.ids.len() - 1],
            "kept ids stay"
        );
        self.removed.insert(gone);
        self.index.insert(ids[ids.len() - 1], b);
        self.ids = ids;
        self.push(self.clock.ms + 1, Ev::Probe(b));
    }

    fn step(&mut self, ev: Ev) {
        let now = self.clock.now();
        let t = self.clock.ms;
        match ev {
            Ev::Arrive(id) => {
                let post = self.rng.below(10) == 0;
                let info = RequestInfo::new(!post, self.rng.below(20) != 0)
                    .with_hash_key(self.rng.below(1000));
                self.per_sec.entry(t / 1000).or_default().0 += 1;
                let (st, action) = self.lb.start(info, now);
                self.reqs.insert(id, (st, None));
                self.act(id, action, false);
            }
            Ev::Send(id) => {
                let Some((st, slot)) = self.reqs.get_mut(&id) else {
                    return;
                };
                let backend = st.in_flight().unwrap();
                let b = self.index[&backend];
                let attempt = st.attempt_count();
                *slot = Some((b, now));
                self.sent[b] += 1;
                self.sent_in_storm += u64::from((self.storm.0..self.storm.1).contains(&t));
                let mode = self.mode(b, t);
                let in_storm = (self.storm.0..self.storm.1).contains(&t);
                self.sent_refusing += u64::from(mode == Mode::Refusing && !in_storm);
                if mode.dead() && !in_storm {
                    self.sent_dead[b] += 1;
                    if self
                        .dead_since(b, t)
                        .is_some_and(|d| t - d > DETECTION_BOUND_MS)
                    {
                        self.late_to_dead += 1;
                    }
                }
                let (after, outcome, status) = match mode {
                    Mode::Up { latency_ms } | Mode::Slow { latency_ms } => {
                        let status = if self.rng.below(200) == 0 { 503 } else { 200 };
                        (latency_ms, 0, status)
                    }
                    Mode::Refusing => (0, 1, 0),
                    Mode::BlackHole => (1000, 2, 0),
                };
                self.push(
                    t + after,
                    Ev::Done {
                        req: id,
                        attempt,
                        outcome,
                        status,
                    },
                );
            }
            Ev::Done {
                req,
                attempt,
                outcome,
                status,
            } => {
                let Some((st, _)) = self.reqs.get_mut(&req) else {
                    return;
                };
                if st.attempt_count() != attempt {
                    return;
                }
                let outcome = match outcome {
                    1 => Outcome::ConnectRefused,
                    2 => Outcome::TimedOut,
                    _ => Outcome::Response { status },
                };
                let action = self.lb.handle_outcome(st, outcome, now);
                self.act(req, action, true);
            }
            Ev::Probe(b) => {
                let id = self.index.iter().find(|(_, &i)| i == b).map(|(&id, _)| id);
                if id.is_some_and(|id| self.removed.contains(&id)) {
                    return; // removed: its checker stopped
                }
                let (delay, result) = match self.mode(b, t) {
                    Mode::Up { .. } | Mode::Slow { .. } => (1, 0),
                    Mode::Refusing => (1, 1),
                    Mode::BlackHole => (PROBE_TIMEOUT_MS, 2),
                };
                self.push(t + delay, Ev::ProbeDone { backend: b, result });
                self.push(t + PROBE_EVERY_MS, Ev::Probe(b));
            }
            Ev::ProbeDone { backend, result } => {
                let r = match result {
                    0 => ProbeResult::Success,
                    1 => ProbeResult::Failure(ProbeFailure::Refused),
                    _ => ProbeResult::Failure(ProbeFailure::TimedOut),
                };
                let id = self
                    .index
                    .iter()
                    .find(|(_, &i)| i == backend)
                    .map(|(&id, _)| id);
                if let Some(id) = id {
                    self.lb.handle_probe(id, r, now);
                }
            }
            Ev::Reload => self.reload(now),
        }
    }

    /// Every property the run must have; each failure is one line.
    fn check(&self, what: &str, requests: u64, knobs: Knobs) -> Vec<String> {
        let mut bad = Vec::new();
        let total: u64 = self.statuses.values().sum();
        if total != requests {
            bad.push(format!("{what}: {total} of {requests} requests ended"));
        }
        for b in self.lb.backends(self.clock.now()) {
            if b.active_requests != 0 {
                bad.push(format!(
                    "{what}: {} in flight at the end on {}",
                    b.active_requests, b.id
                ));
            }
        }
        if self.late_to_dead != 0 {
            bad.push(format!(
                "{what}: {} attempts to a backend dead for > {DETECTION_BOUND_MS} ms",
                self.late_to_dead
            ));
        }
        // Retries: a refused (or reset) idempotent, replayable request is retried on another
        // backend, and backend 0 never fails: outside the storm, such a request almost never
        // ends in 502. (Timeouts are rarer to rescue: the budget runs low after black holes.)
        if self.safe_bad_gateway > self.safe / 2_000 {
            bad.push(format!(
                "{what}: {} of {} retryable requests failed with 502",
                self.safe_bad_gateway, self.safe
            ));
        }
        let safe_fail = self.safe_failed as f64 / self.safe as f64;
        if safe_fail > 0.02 {
            bad.push(format!(
                "{what}: {:.2}% of retryable requests failed",
                100.0 * safe_fail
            ));
        }
        // Ejection: five refusals take a refusing backend out, long before three probes do
        // (only `max_ejected_percent` of the pool can be out, so with 3 backends and two
        // refusing, one keeps getting attempts until probes take it down).
        let sent: u64 = self.sent.iter().sum::<u64>() - self.sent_in_storm;
        let refusing = self.sent_refusing as f64 / sent as f64;
        if refusing > 0.02 {
            bad.push(format!(
                "{what}: {:.2}% of attempts went to refusing backends",
                100.0 * refusing
            ));
        }
        let dead: u64 = self.sent_dead.iter().sum();
        let dead_share = dead as f64 / sent as f64;
        if dead_share > 0.06 {
            bad.push(format!(
                "{what}: {:.2}% of attempts went to dead backends",
                100.0 * dead_share
            ));
        }
        // The budget: retries over any 10 s window ≤ 20 % of its requests + 10/s × 10.
        if knobs.budget {
            let last = self.per_sec.keys().copied().max().unwrap_or(0);
            for sec in 0..=last {
                let (reqs, retries) = (sec.saturating_sub(9)..=sec)
                    .filter_map(|s| self.per_sec.get(&s))
                    .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
                if retries > reqs.div_ceil(5) + 100 {
                    bad.push(format!(
                        "{what}: {retries} retries on {reqs} requests in the 10 s to {sec} s"
                    ));
                    break;
                }
            }
        }
        let storm_retries: u64 = (self.storm.0 / 1000..=self.storm.1 / 1000)
            .filter_map(|s| self.per_sec.get(&s))
            .map(|c| c.1)
            .sum();
        let storm_requests: u64 = (self.storm.0 / 1000..=self.storm.1 / 1000)
            .filter_map(|s| self.per_sec.get(&s))
            .map(|c| c.0)
            .sum();
        // Unbudgeted, the storm's requests would each retry (attempts − 1) times.
        if storm_retries > storm_requests {
            bad.push(format!(
                "{what}: {storm_retries} retries for {storm_requests} requests in the storm"
            ));
        }
        if self.replayed != 0 {
            bad.push(format!(
                "{what}: {} sent POSTs or non-replayable requests sent again",
                self.replayed
            ));
        }
        if self.to_removed != 0 {
            bad.push(format!(
                "{what}: {} attempts to a removed backend after the reload",
                self.to_removed
            ));
        }
        if self.in_flight_at_reload == 0 || self.sent.last().copied().unwrap_or(0) == 0 {
            bad.push(format!(
                "{what}: the reload had nothing in flight or the new backend got nothing"
            ));
        }
        bad
    }

    fn summary(&self, what: &str) -> String {
        let mut statuses: Vec<_> = self.statuses.iter().collect();
        statuses.sort();
        let sent: u64 = self.sent.iter().sum::<u64>() - self.sent_in_storm;
        let (storm_reqs, storm_retries) = (self.storm.0 / 1000..=self.storm.1 / 1000)
            .filter_map(|s| self.per_sec.get(&s))
            .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
        format!(
            "{what:>36} safe_502={} refusing={:.3}% safe_failed={:.2}% to_dead={:.2}% storm={storm_retries}/{storm_reqs} statuses={statuses:?} in_flight_at_reload={}",
            self.safe_bad_gateway,
            100.0 * self.sent_refusing as f64 / sent as f64,
            100.0 * self.safe_failed as f64 / self.safe as f64,
            100.0 * self.sent_dead.iter().sum::<u64>() as f64 / sent as f64,
            self.in_flight_at_reload
        )
    }
}

fn simulate(kind: StrategyKind, seed: u64, requests: u64, knobs: Knobs) -> Vec<String> {
    let n = 3 + (seed % 8) as usize;
    let mut sim = Sim::new(kind, seed, n, requests, knobs);
    sim.run(requests);
    let what = format!("{kind} seed {seed:#x} n={n}");
    println!("{}", sim.summary(&what));
    sim.check(&what, requests, knobs)
}

#[test]
fn hundred_thousand_requests_never_reach_a_known_dead_backend() {
    let mut bad = Vec::new();
    for (k, kind) in StrategyKind::ALL.into_iter().enumerate() {
        for seed in [0x5eed_0000 + k as u64, 0xabcd_0000 + 3 * k as u64 + 1] {
            bad.extend(simulate(kind, seed, 50_000, Knobs::ALL_ON));
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

/// The checks above are tight enough to notice each mechanism missing.
#[test]
fn checks_catch_each_mechanism_turned_off() {
    let on = Knobs::ALL_ON;
    for (name, kind, seed, knobs, needle) in [
        (
            "no ejection",
            StrategyKind::WeightedRoundRobin,
            0x5eed_0001,
            Knobs {
                ejection: false,
                ..on
            },
            "refusing backends",
        ),
        (
            "no retries",
            StrategyKind::RoundRobin,
            0x5eed_0004,
            Knobs { attempts: 1, ..on },
            "failed with 502",
        ),
        (
            "no budget",
            StrategyKind::RoundRobin,
            0x5eed_0004,
            Knobs {
                budget: false,
                ..on
            },
            "in the storm",
        ),
    ] {
        let bad = simulate(kind, seed, 50_000, knobs);
        assert!(
            bad.iter().any(|b| b.contains(needle)),
            "{name}: the checks did not notice ({bad:?})"
        );
    }
}

/// Least-connections and p2c-ewma send less to a slow backend; round robin cannot.
#[test]
fn load_aware_strategies_send_less_to_a_slow_backend() {
    for (kind, max_share) in [
        (StrategyKind::LeastConnections, 0.2),
        (StrategyKind::P2cEwma, 0.2),
        (StrategyKind::RoundRobin, 0.34),
    ] {
        let mut sim = Sim::new(kind, 11, 3, 20_000, Knobs::ALL_ON);
        sim.storm = (u64::MAX, u64::MAX);
        sim.reload_at = u64::MAX;
        sim.schedules = vec![
            Schedule(vec![(0, Mode::Slow { latency_ms: 100 })]),
            Schedule(vec![(0, Mode::Up { latency_ms: 5 })]),
            Schedule(vec![(0, Mode::Up { latency_ms: 5 })]),
        ];
        sim.run(20_000);
        let total: u64 = sim.sent.iter().sum();
        let share = sim.sent[0] as f64 / total as f64;
        println!(
            "{kind}: slow backend got {:.1}% ({:?})",
            share * 100.0,
            sim.sent
        );
        assert!(share <= max_share, "{kind}: slow backend got {share:.3}");
        if kind == StrategyKind::RoundRobin {
            assert!(
                share >= 0.32,
                "round robin is oblivious to latency: {share:.3}"
            );
        }
    }
}

/// Four threads share one `Balancer` (as a proxy's workers do) while one of them reloads the
/// backend set mid-run: every request ends, GETs survive a refusing and a resetting
/// backend, POSTs are never replayed, nothing is routed to the removed backend after the
/// reload, retries stay within the budget, and every in-flight count returns to zero.
#[test]
fn threads_share_one_balancer_through_a_reload() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    const THREADS: u64 = 4;
    const PER_THREAD: u64 = 5_000;
    for kind in [
        StrategyKind::RoundRobin,
        StrategyKind::LeastConnections,
        StrategyKind::P2cEwma,
    ] {
        let clock = Clock::new();
        let lb = Balancer::new(
            Config::default().with_rng_seed(Some(9)),
            AnySelect::new(kind),
        )
        .unwrap();
        let addrs = |names: &[&str]| -> Vec<Backend> {
            names
                .iter()
                .map(|a| Backend::new(*a, Weight::ONE))
                .collect()
        };
        let ids = lb
            .set_backends(
                addrs(&["refuse:1", "reset:1", "ok:1", "ok:2", "ok:3"]),
                clock.now(),
            )
            .unwrap();
        let removed = ids[4];
        // Virtual time: each request moves it on by a millisecond, whoever serves it.
        let ms = AtomicU64::new(0);
        let now = || clock.at(ms.load(Ordering::Relaxed));
        let reloaded = AtomicBool::new(false);
        let (retries, to_removed, replayed, failed) = (
            AtomicU64::new(0),
            AtomicU64::new(0),
            AtomicU64::new(0),
            AtomicU64::new(0),
        );
        std::thread::scope(|s| {
            for t in 0..THREADS {
                let (lb, ms, now, reloaded) = (&lb, &ms, &now, &reloaded);
                let (retries, to_removed, replayed, failed) =
                    (&retries, &to_removed, &replayed, &failed);
                let (addrs, ids) = (&addrs, &ids);
                s.spawn(move || {
                    let mut rng = Rng::from_seed(t);
                    for i in 0..PER_THREAD {
                        ms.fetch_add(1, Ordering::Relaxed);
                        if t == 0 && i == PER_THREAD / 2 {
                            let set = addrs(&["refuse:1", "reset:1", "ok:1", "ok:2", "ok:4"]);
                            lb.set_backends(set, now()).unwrap();
                            reloaded.store(true, Ordering::Release);
                        }
                        if t == 0 && i % 50 == 0 {
                            lb.handle_timeout(now());
                        }
                        let post = rng.below(10) == 0;
                        // Whether the reload had finished before this decision began: a pick
                        // made concurrently with `set_backends` may still see the old set.
                        let mut after_reload = reloaded.load(Ordering::Acquire);
                        let (mut st, mut action) = lb.start(RequestInfo::new(!post, true), now());
                        let mut first = true;
                        let status = loop {
                            match action {
                                Action::Forward { backend, .. } => {
                                    // Decided after the reload was seen: never the removed one.
                                    if backend == removed && after_reload {
                                        to_removed.fetch_add(1, Ordering::Relaxed);
                                    }
                                    if !first {
                                        retries.fetch_add(1, Ordering::Relaxed);
                                    }
                                    first = false;
                                    let outcome = if backend == ids[0] {
                                        Outcome::ConnectRefused
                                    } else if backend == ids[1] {
                                        Outcome::Reset
                                    } else {
                                        Outcome::Response { status: 200 }
                                    };
                                    after_reload = reloaded.load(Ordering::Acquire);
                                    action = lb.handle_outcome(&mut st, outcome, now());
                                }
                                Action::Relay => break 200,
                                Action::Fail(f) => break f.status(),
                            }
                        };
                        let sent = st
                            .attempts()
                            .iter()
                            .filter(|a| a.outcome().is_some_and(Outcome::was_sent))
                            .count();
                        if post && sent > 1 {
                            replayed.fetch_add(1, Ordering::Relaxed);
                        }
                        let budget_stop = st.attempts().last().and_then(|a| a.decision())
                            == Some(lb_core::Decision::Stop(
                                lb_core::StopReason::BudgetExhausted,
                            ));
                        if !post && status != 200 && !budget_stop {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                        if status == 200 {
                            lb.finish(st, Completion::Done, now());
                        } else {
                            lb.abandon(st, now());
                        }
                    }
                });
            }
        });
        let requests = THREADS * PER_THREAD;
        let secs = ms.load(Ordering::Relaxed) / 1000 + 1;
        assert_eq!(failed.load(Ordering::Relaxed), 0, "{kind}: a GET failed");
        assert_eq!(
            replayed.load(Ordering::Relaxed),
            0,
            "{kind}: a POST was replayed"
        );
        assert_eq!(
            to_removed.load(Ordering::Relaxed),
            0,
            "{kind}: routed to a removed backend"
        );
        let retries = retries.load(Ordering::Relaxed);
        assert!(
            retries > 0,
            "{kind}: the broken backends were never retried away from"
        );
        assert!(
            retries <= requests.div_ceil(5) + 10 * (secs + 10),
            "{kind}: {retries} retries for {requests} requests in {secs} s"
        );
        for b in lb.backends(clock.at(ms.load(Ordering::Relaxed))) {
            assert_eq!(
                b.active_requests, 0,
                "{kind}: in flight at the end on {}",
                b.addr
            );
        }
        println!("{kind}: {retries} retries for {requests} requests");
    }
}
