//! `core_events`: arbitrary event sequences into [`lb_core::Balancer`], checked against the
//! core's invariants after every step.
//!
//! The harness plays a proxy that keeps up to [`MAX_LIVE`] requests open at once and does
//! everything a shell may do, in any order: start requests, report every kind of outcome
//! (also for requests with nothing in flight), ask for transport resends, finish, abandon or
//! simply drop requests mid-flight, feed probe results (for removed backends too), replace
//! the backend set (renumbering: an address removed and added back is a new backend), move
//! the clock forward by milliseconds or by minutes, and call `handle_timeout` on time, late
//! or spuriously. It keeps its own books from the outside (the ids `set_backends` returned,
//! the event stream, every action) and checks:
//!
//! 1. every pick is a current member, probe-healthy, and not ejected unless the core is in
//!    panic mode; never a removed backend, never one this request already tried;
//! 2. a request fails with no backend only while no eligible (untried) backend exists, when
//!    the core's timer is up to date before and after the call (the core defers rebuilds
//!    to its timer, by design);
//! 3. each backend's `active_requests` equals the harness's count of attempts it has open,
//!    after every step, and everything returns to zero once all requests are gone;
//!    `requests_total` equals the attempts sent there, and `failures_total` the backend's
//!    own failures reported (refused or timed-out connects, resets, timeouts, broken
//!    bodies): a client that leaves (abandon, drop, `ClientGone`) never counts;
//! 4. retries stay within the budget over every 10 s window, and within `attempts`;
//! 5. a request that may have been sent (reset, timed out, a response) is retried or
//!    re-sent only if it is idempotent and replayable; a response is never retried; at
//!    most one resend per request;
//! 6. `now <= not_before < try_deadline <= deadline` for every `Forward`;
//! 7. panic mode is on exactly when the eligible share is below the threshold;
//! 8. probe health flips after exactly `rise`/`fall` results in a row;
//! 9. the same seed and inputs give the same actions (the run is replayed once).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use arbitrary::{Arbitrary, Unstructured};
use lb_core::select::{AnySelect, StrategyKind};
use lb_core::{
    Action, Backend, BackendId, Balancer, Completion, Config, Decision, Event, HealthConfig,
    Outcome, PassiveConfig, ProbeFailure, ProbeResult, RequestInfo, RequestState, RetryConfig,
    StopReason, Weight,
};

/// Requests the harness keeps open at once.
pub const MAX_LIVE: usize = 24;
/// Operations taken from one input.
pub const MAX_OPS: usize = 400;
/// Distinct backend addresses the sets are drawn from.
pub const ADDRS: u8 = 6;

/// The balancer's settings, drawn from the input's first bytes.
#[derive(Debug, Clone, Arbitrary)]
pub struct Setup {
    /// Index into [`StrategyKind::ALL`].
    pub strategy: u8,
    /// `retry.attempts`, 1..=10.
    pub attempts: u8,
    /// `retry.budget_percent`, 0..=100.
    pub budget_percent: u8,
    /// `retry.min_retries_per_second`, 0..=3.
    pub min_retries_per_second: u8,
    /// `passive.consecutive_failures`, 0..=4 (0: no passive ejection).
    pub consecutive_failures: u8,
    /// `passive.ejection` in ms, at least 1.
    pub ejection_ms: u16,
    /// `passive.max_ejection` as a multiple of `ejection`.
    pub max_ejection_factor: u8,
    /// `passive.max_ejected_percent`, 0..=100.
    pub max_ejected_percent: u8,
    /// `passive.panic_threshold_percent`, 0..=100.
    pub panic_threshold_percent: u8,
    /// `passive.slow_start` in ms (0: off).
    pub slow_start_ms: u16,
    /// `health.rise`, 1..=3.
    pub rise: u8,
    /// `health.fall`, 1..=3.
    pub fall: u8,
    /// `retry.backoff` in ms.
    pub backoff_ms: u8,
    /// `timeouts.request` in ms, at least 1.
    pub attempt_timeout_ms: u16,
    /// The core's RNG seed.
    pub seed: u64,
    /// The first backend set.
    pub initial: Vec<Member>,
}

/// One backend of a set: an address out of [`ADDRS`] and a weight.
#[derive(Debug, Clone, Copy, Arbitrary)]
pub struct Member {
    /// Address index (taken modulo [`ADDRS`]).
    pub addr: u8,
    /// Weight (modulo 10, at least 1).
    pub weight: u8,
}

/// How an attempt ended.
#[derive(Debug, Clone, Copy, Arbitrary)]
pub enum OutcomeKind {
    /// A response head with a status from a small set (2xx to 5xx).
    Response(u8),
    /// [`Outcome::ConnectRefused`].
    ConnectRefused,
    /// [`Outcome::ConnectTimeout`].
    ConnectTimeout,
    /// [`Outcome::StaleConnection`].
    Stale,
    /// [`Outcome::Reset`].
    Reset,
    /// [`Outcome::TimedOut`].
    TimedOut,
}

/// How a relayed response ended.
#[derive(Debug, Clone, Copy, Arbitrary)]
pub enum CompletionKind {
    /// [`Completion::Done`].
    Done,
    /// [`Completion::BackendFailed`].
    BackendFailed,
    /// [`Completion::ClientGone`].
    ClientGone,
}

/// One thing the shell does. `req` picks a live request (modulo their number).
#[derive(Debug, Clone, Arbitrary)]
pub enum Op {
    /// `start` a request.
    Start {
        /// GET-like.
        idempotent: bool,
        /// Its body can be sent again.
        replayable: bool,
        /// A consistent-hash key.
        key: Option<u16>,
        /// An overall deadline, ms from now (0: already due).
        deadline_ms: Option<u16>,
    },
    /// `handle_outcome` for a request (whatever its state).
    Outcome {
        /// Which request.
        req: u8,
        /// What happened.
        outcome: OutcomeKind,
    },
    /// `handle_resend` after a pooled connection died (`reset`: after writing).
    Resend {
        /// Which request.
        req: u8,
        /// `Outcome::Reset` rather than `Outcome::StaleConnection`.
        reset: bool,
    },
    /// `finish` a relayed request.
    Finish {
        /// Which request.
        req: u8,
        /// How it ended.
        completion: CompletionKind,
    },
    /// `abandon` a request (the client left).
    Abandon {
        /// Which request.
        req: u8,
    },
    /// Drop a request's state without telling the core (a cancelled future).
    Drop {
        /// Which request.
        req: u8,
    },
    /// A probe result for a member, or for a removed backend.
    Probe {
        /// Index into members followed by removed backends.
        backend: u8,
        /// Success.
        ok: bool,
    },
    /// `set_backends`.
    SetBackends(Vec<Member>),
    /// The clock moves forward by milliseconds.
    Advance(u16),
    /// The clock jumps forward by `10 s ×` this.
    Jump(u8),
    /// `handle_timeout(now)`, due or not.
    Timeout,
    /// What a timer task does: `handle_timeout(poll_timeout)` if that is due.
    Fire,
}

/// The whole input: settings, then operations.
#[derive(Debug, Clone)]
pub struct Input {
    /// Settings.
    pub setup: Setup,
    /// What happens, in order.
    pub ops: Vec<Op>,
}

impl Input {
    /// Decodes an input from fuzzer bytes; `None` if they do not make one.
    #[must_use]
    pub fn decode(data: &[u8]) -> Option<Self> {
        let mut u = Unstructured::new(data);
        let setup = Setup::arbitrary(&mut u).ok()?;
        let mut ops = Vec::new();
        while !u.is_empty() && ops.len() < MAX_OPS {
            match Op::arbitrary(&mut u) {
                Ok(op) => ops.push(op),
                Err(_) => break,
            }
        }
        Some(Self { setup, ops })
    }
}

/// The fuzz target: decodes `data` and runs it; panics only on a broken invariant.
pub fn core_events(data: &[u8]) {
    if let Some(input) = Input::decode(data) {
        run(&input);
    }
}

/// Runs `input` twice on the same clock and checks every invariant, and that both runs
/// decided the same.
///
/// # Panics
/// When an invariant is broken (the message says which).
pub fn run(input: &Input) {
    let epoch = Instant::now();
    let first = run_once(input, epoch);
    let second = run_once(input, epoch);
    assert_eq!(
        first, second,
        "invariant 9: same seed and inputs, same actions"
    );
}

fn config(s: &Setup) -> (StrategyKind, Config) {
    let kind = StrategyKind::ALL[usize::from(s.strategy) % StrategyKind::ALL.len()];
    let ejection = Duration::from_millis(u64::from(s.ejection_ms.max(1)));
    let config = Config::default()
        .with_rng_seed(Some(s.seed))
        .with_health(
            HealthConfig::default()
                .with_rise(u32::from(s.rise % 3 + 1))
                .with_fall(u32::from(s.fall % 3 + 1)),
        )
        .with_passive(
            PassiveConfig::default()
                .with_consecutive_failures(u32::from(s.consecutive_failures % 5))
                .with_ejection(ejection)
                .with_max_ejection(ejection * u32::from(s.max_ejection_factor % 8 + 1))
                .with_max_ejected_percent(u32::from(s.max_ejected_percent % 101))
                .with_panic_threshold_percent(u32::from(s.panic_threshold_percent % 101))
                .with_slow_start(Duration::from_millis(u64::from(s.slow_start_ms))),
        )
        .with_retry(
            RetryConfig::default()
                .with_attempts(u32::from(s.attempts % 10 + 1))
                .with_budget_percent(u32::from(s.budget_percent % 101))
                .with_min_retries_per_second(u32::from(s.min_retries_per_second % 4))
                .with_backoff(Duration::from_millis(u64::from(s.backoff_ms)))
                .with_attempt_timeout(Duration::from_millis(u64::from(
                    s.attempt_timeout_ms.max(1),
                ))),
        );
    (kind, config)
}

fn backends(set: &[Member]) -> Vec<Backend> {
    set.iter()
        .map(|m| {
            let weight = Weight::new(u32::from(m.weight % 10).max(1)).expect("1..=9");
            Backend::new(format!("10.0.0.{}:80", m.addr % ADDRS), weight)
        })
        .collect()
}

fn outcome(kind: OutcomeKind) -> Outcome {
    const STATUSES: [u16; 8] = [200, 204, 301, 404, 429, 500, 502, 503];
    match kind {
        OutcomeKind::Response(i) => Outcome::Response {
            status: STATUSES[usize::from(i) % STATUSES.len()],
        },
        OutcomeKind::ConnectRefused => Outcome::ConnectRefused,
        OutcomeKind::ConnectTimeout => Outcome::ConnectTimeout,
        OutcomeKind::Stale => Outcome::StaleConnection,
        OutcomeKind::Reset => Outcome::Reset,
        OutcomeKind::TimedOut => Outcome::TimedOut,
    }
}

/// What the core decided, in order: compared between the two runs of an input.
#[derive(Debug, PartialEq)]
enum Step {
    Set(Option<Vec<BackendId>>),
    Action(Action),
    Event(Event),
    Resend(bool),
}

/// One open request as the harness sees it.
struct Live {
    st: RequestState,
    info: RequestInfo,
    last: Action,
    /// Backends this request was sent to.
    tried: Vec<BackendId>,
    /// An outcome that may have reached the backend was reported.
    maybe_sent: bool,
    resent: bool,
}

/// What the harness knows from the outside.
struct World {
    lb: Balancer,
    epoch: Instant,
    ms: u64,
    attempts: usize,
    budget_percent: u64,
    floor: u64,
    panic_threshold: usize,
    rise: u32,
    fall: u32,
    members: Vec<BackendId>,
    removed: BTreeSet<BackendId>,
    /// Probe state per member: (up, results in a row against it).
    probe: HashMap<BackendId, (bool, u32)>,
    ejected: BTreeSet<BackendId>,
    panic: bool,
    /// Attempts sent to each backend.
    sent: HashMap<BackendId, u64>,
    /// Failures of each backend's own reported.
    failed: HashMap<BackendId, u64>,
    /// ms → (requests started, retries taken).
    window: BTreeMap<u64, (u64, u64)>,
    live: Vec<Live>,
    trace: Vec<Step>,
}

fn run_once(input: &Input, epoch: Instant) -> Vec<Step> {
    let (kind, config) = config(&input.setup);
    let lb = Balancer::new(config.clone(), AnySelect::new(kind))
        .expect("the harness builds valid configs");
    let mut w = World {
        lb,
        epoch,
        ms: 0,
        attempts: config.retry().attempts() as usize,
        budget_percent: u64::from(config.retry().budget_percent()),
        floor: u64::from(config.retry().min_retries_per_second()) * 10,
        panic_threshold: config.passive().panic_threshold_percent() as usize,
        rise: config.health().rise(),
        fall: config.health().fall(),
        members: Vec::new(),
        removed: BTreeSet::new(),
        probe: HashMap::new(),
        ejected: BTreeSet::new(),
        panic: false,
        sent: HashMap::new(),
        failed: HashMap::new(),
        window: BTreeMap::new(),
        live: Vec::new(),
        trace: Vec::new(),
    };
    w.set_backends(&input.setup.initial);
    w.check();
    for op in &input.ops {
        w.apply(op);
        w.check();
    }
    // Everything gone: nothing is in flight anywhere.
    w.live.clear();
    w.check();
    for b in w.lb.backends(w.now()) {
        assert_eq!(
            b.active_requests, 0,
            "invariant 3: {} in flight at the end",
            b.id
        );
    }
    w.trace
}

impl World {
    fn now(&self) -> Instant {
        self.epoch + Duration::from_millis(self.ms)
    }

    fn set_backends(&mut self, set: &[Member]) {
        let list = backends(set);
        let mut seen = BTreeSet::new();
        let dup = list.iter().any(|b| !seen.insert(b.addr().to_owned()));
        match self.lb.set_backends(list, self.now()) {
            Ok(ids) => {
                assert!(!dup, "set_backends took a duplicate address");
                for old in &self.members {
                    if !ids.contains(old) {
                        self.removed.insert(*old);
                    }
                }
                for id in &ids {
                    assert!(
                        !self.removed.contains(id),
                        "a removed backend's id {id} came back"
                    );
                    self.probe.entry(*id).or_insert((true, 0));
                }
                self.probe.retain(|id, _| ids.contains(id));
                self.ejected.retain(|id| ids.contains(id));
                self.members = ids;
                self.trace.push(Step::Set(Some(self.members.clone())));
            }
            Err(e) => {
                assert!(dup, "set_backends refused a valid set: {e}");
                self.trace.push(Step::Set(None));
            }
        }
        self.drain_events();
    }

    fn drain_events(&mut self) {
        while let Some(e) = self.lb.poll_event() {
            match &e {
                Event::Ejected { backend, .. } => {
                    assert!(
                        self.members.contains(backend),
                        "a non-member {backend} was ejected"
                    );
                    self.ejected.insert(*backend);
                }
                Event::Restored { backend, .. } => {
                    self.ejected.remove(backend);
                }
                Event::Panic { on, .. } => self.panic = *on,
                Event::Up { backend, .. } | Event::Down { backend, .. } => {
                    let up = matches!(e, Event::Up { .. });
                    let p = self.probe.get(backend).copied();
                    assert_eq!(p.map(|p| p.0), Some(up), "invariant 8: {e} not expected");
                }
                _ => {}
            }
            self.trace.push(Step::Event(e));
        }
    }

    fn eligible(&self, id: BackendId) -> bool {
        self.probe.get(&id).is_some_and(|p| p.0) && (self.panic || !self.ejected.contains(&id))
    }

    /// The core's timer has nothing due: every deferred change is applied.
    fn timer_up_to_date(&self) -> bool {
        self.lb.poll_timeout().is_none_or(|t| t > self.now())
    }

    fn pick(&self, i: u8) -> Option<usize> {
        (!self.live.is_empty()).then(|| usize::from(i) % self.live.len())
    }

    fn apply(&mut self, op: &Op) {
        let now = self.now();
        match *op {
            Op::Start {
                idempotent,
                replayable,
                key,
                deadline_ms,
            } => {
                if self.live.len() >= MAX_LIVE {
                    return;
                }
                let mut info = RequestInfo::new(idempotent, replayable);
                if let Some(k) = key {
                    info = info.with_hash_key(u64::from(k));
                }
                if let Some(d) = deadline_ms {
                    info = info.with_deadline(now + Duration::from_millis(u64::from(d)));
                }
                let fresh = self.timer_up_to_date();
                let (st, action) = self.lb.start(info, now);
                self.window.entry(self.ms).or_default().0 += 1;
                self.drain_events();
                let mut live = Live {
                    st,
                    info,
                    last: action,
                    tried: Vec::new(),
                    maybe_sent: false,
                    resent: false,
                };
                match action {
                    Action::Forward { .. } => self.forwarded(&mut live, action, false),
                    Action::Fail(f) => {
                        if deadline_ms != Some(0) && fresh {
                            let any = self.members.iter().any(|id| self.eligible(*id));
                            assert!(
                                !any,
                                "invariant 2: {f:?} at start while an eligible backend exists"
                            );
                        }
                    }
                    Action::Relay => panic!("start relayed"),
                }
                self.trace.push(Step::Action(action));
                self.live.push(live);
            }
            Op::Outcome { req, outcome: kind } => {
                let Some(i) = self.pick(req) else { return };
                let o = outcome(kind);
                let fresh = self.timer_up_to_date();
                let mut live = self.live.swap_remove(i);
                let before = live.last;
                let action = self.lb.handle_outcome(&mut live.st, o, now);
                // An ejection inside the call defers its rebuild to the timer (documented):
                // until then a retry may see the older candidates.
                let fresh = fresh && self.timer_up_to_date();
                self.drain_events();
                if let Action::Forward { backend, .. } = before {
                    if o.is_backend_failure() {
                        *self.failed.entry(backend).or_default() += 1;
                    }
                    let expect = match action {
                        Action::Forward { backend, .. } => Some(backend),
                        // A relayed attempt stays in flight until `finish`.
                        Action::Relay => Some(backend),
                        Action::Fail(_) => None,
                    };
                    assert_eq!(live.st.in_flight(), expect, "the attempt in flight");
                    if o.was_sent() {
                        live.maybe_sent = true;
                    }
                    match action {
                        Action::Forward { .. } => {
                            assert!(
                                !matches!(o, Outcome::Response { .. }),
                                "invariant 5: a response was retried"
                            );
                            if live.maybe_sent {
                                assert!(
                                    live.info.idempotent() && live.info.replayable(),
                                    "invariant 5: a request that may have been sent was replayed: {}",
                                    live.st
                                );
                            }
                            self.forwarded(&mut live, action, true);
                        }
                        Action::Relay => assert!(matches!(o, Outcome::Response { .. })),
                        Action::Fail(_) => {
                            let no_untried = live.st.last_decision()
                                == Some(Decision::Stop(StopReason::NoUntriedBackend));
                            if no_untried && fresh {
                                let any = self
                                    .members
                                    .iter()
                                    .any(|id| self.eligible(*id) && !live.tried.contains(id));
                                assert!(
                                    !any,
                                    "invariant 2: no untried backend said while one is eligible: {}",
                                    live.st
                                );
                            }
                        }
                    }
                } else {
                    assert_eq!(
                        action, before,
                        "an outcome with nothing in flight changes nothing"
                    );
                }
                live.last = action;
                self.trace.push(Step::Action(action));
                self.live.push(live);
            }
            Op::Resend { req, reset } => {
                let Some(i) = self.pick(req) else { return };
                let failed = if reset {
                    Outcome::Reset
                } else {
                    Outcome::StaleConnection
                };
                let live = &mut self.live[i];
                let open = matches!(live.last, Action::Forward { .. });
                let ok = self.lb.handle_resend(&mut live.st, failed, now);
                if ok {
                    assert!(open, "resend with nothing in flight");
                    assert!(!live.resent, "invariant 5: a second resend");
                    if reset {
                        live.maybe_sent = true;
                    }
                    assert!(
                        !live.maybe_sent || (live.info.idempotent() && live.info.replayable()),
                        "invariant 5: a request that may have been sent was re-sent: {}",
                        live.st
                    );
                    live.resent = true;
                }
                self.trace.push(Step::Resend(ok));
            }
            Op::Finish { req, completion } => {
                let Some(i) = self.pick(req) else { return };
                if !matches!(self.live[i].last, Action::Relay) {
                    return;
                }
                let live = self.live.swap_remove(i);
                if let (CompletionKind::BackendFailed, Some(b)) = (completion, live.st.in_flight())
                {
                    *self.failed.entry(b).or_default() += 1;
                }
                let c = match completion {
                    CompletionKind::Done => Completion::Done,
                    CompletionKind::BackendFailed => Completion::BackendFailed,
                    CompletionKind::ClientGone => Completion::ClientGone,
                };
                self.lb.finish(live.st, c, now);
                self.drain_events();
            }
            Op::Abandon { req } => {
                let Some(i) = self.pick(req) else { return };
                let live = self.live.swap_remove(i);
                self.lb.abandon(live.st, now);
                self.drain_events();
            }
            Op::Drop { req } => {
                let Some(i) = self.pick(req) else { return };
                drop(self.live.swap_remove(i));
            }
            Op::Probe { backend, ok } => {
                let all: Vec<BackendId> = self
                    .members
                    .iter()
                    .chain(self.removed.iter())
                    .copied()
                    .collect();
                if all.is_empty() {
                    return;
                }
                let id = all[usize::from(backend) % all.len()];
                let result = if ok {
                    ProbeResult::Success
                } else {
                    ProbeResult::Failure(ProbeFailure::Refused)
                };
                // The expected flip, as SPEC words rise/fall.
                let (rise, fall) = (self.rise, self.fall);
                if let Some(p) = self.probe.get_mut(&id) {
                    if ok == p.0 {
                        p.1 = 0;
                    } else {
                        p.1 += 1;
                        if p.1 >= if p.0 { fall } else { rise } {
                            *p = (ok, 0);
                        }
                    }
                }
                self.lb.handle_probe(id, result, now);
                self.drain_events();
            }
            Op::SetBackends(ref set) => self.set_backends(set),
            Op::Advance(ms) => self.ms += u64::from(ms),
            Op::Jump(tens) => self.ms += u64::from(tens) * 10_000,
            Op::Timeout => {
                self.lb.handle_timeout(now);
                self.drain_events();
            }
            Op::Fire => {
                if let Some(at) = self.lb.poll_timeout().filter(|&t| t <= now) {
                    self.lb.handle_timeout(at);
                    self.drain_events();
                }
            }
        }
    }

    /// Checks a `Forward` the core just returned for `live`.
    fn forwarded(&mut self, live: &mut Live, action: Action, retry: bool) {
        let Action::Forward {
            backend,
            not_before,
            try_deadline,
        } = action
        else {
            return;
        };
        let now = self.now();
        assert!(
            self.members.contains(&backend),
            "invariant 1: picked {backend}, not a member (removed: {})",
            self.removed.contains(&backend)
        );
        assert!(
            self.probe.get(&backend).is_some_and(|p| p.0),
            "invariant 1: picked {backend}, down by probes"
        );
        assert!(
            self.panic || !self.ejected.contains(&backend),
            "invariant 1: picked {backend}, ejected, outside panic mode"
        );
        assert!(
            !live.tried.contains(&backend),
            "invariant 1: picked {backend} again for one request: {}",
            live.st
        );
        assert!(
            now <= not_before && not_before < try_deadline,
            "invariant 6: now <= not_before < try_deadline"
        );
        if let Some(d) = live.info.deadline() {
            assert!(try_deadline <= d, "invariant 6: try_deadline <= deadline");
        }
        assert_eq!(live.st.in_flight(), Some(backend));
        live.tried.push(backend);
        assert!(
            live.tried.len() <= self.attempts,
            "invariant 4: more than {} attempts",
            self.attempts
        );
        *self.sent.entry(backend).or_default() += 1;
        if retry {
            let t = self.ms;
            self.window.entry(t).or_default().1 += 1;
            // SPEC: over the last 10 s, retries <= percent of requests + floor × 10 s.
            let retries: u64 = self
                .window
                .range(t.saturating_sub(10_000)..=t)
                .map(|(_, c)| c.1)
                .sum();
            let requests: u64 = self
                .window
                .range(t.saturating_sub(9_999)..=t)
                .map(|(_, c)| c.0)
                .sum();
            assert!(
                retries * 100 <= self.budget_percent * requests + self.floor * 100,
                "invariant 4: {retries} retries for {requests} requests in 10 s at {t} ms"
            );
        }
    }

    /// Checks what holds after every step.
    fn check(&self) {
        let mut open: HashMap<BackendId, u32> = HashMap::new();
        for l in &self.live {
            if let Some(b) = l.st.in_flight() {
                *open.entry(b).or_default() += 1;
            }
        }
        let status = self.lb.backends(self.now());
        let ids: Vec<BackendId> = status.iter().map(|b| b.id).collect();
        assert_eq!(ids, self.members, "members are the ids set_backends gave");
        for b in &status {
            assert_eq!(
                b.active_requests,
                open.get(&b.id).copied().unwrap_or(0),
                "invariant 3: {} in flight by the core, not by the harness",
                b.id
            );
            assert_eq!(
                b.requests_total,
                self.sent.get(&b.id).copied().unwrap_or(0),
                "invariant 3: attempts sent to {}",
                b.id
            );
            assert_eq!(
                b.failures_total,
                self.failed.get(&b.id).copied().unwrap_or(0),
                "invariant 3: failures of {} counted",
                b.id
            );
            assert_eq!(
                Some(b.healthy),
                self.probe.get(&b.id).map(|p| p.0),
                "invariant 8: probe health of {}",
                b.id
            );
        }
        let total = self.members.len();
        let eligible = self
            .members
            .iter()
            .filter(|id| self.probe.get(id).is_some_and(|p| p.0) && !self.ejected.contains(id))
            .count();
        let panic = total > 0 && eligible * 100 < self.panic_threshold * total;
        assert_eq!(
            self.panic, panic,
            "invariant 7: panic mode with {eligible} of {total} eligible"
        );
    }
}
