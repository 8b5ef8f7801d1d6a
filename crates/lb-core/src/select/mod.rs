//! Selection strategies: which eligible backend gets the next attempt.
//!
//! # Why a table per snapshot
//! The proxy picks from every worker thread at once, so a pick must not take a lock, and must
//! be O(1) or O(log N). Membership and health change rarely (a reload, a probe flip, an
//! ejection), so each strategy precomputes what it needs into a [`Select::Table`] whenever
//! the eligible set changes; the [`Balancer`](crate::Balancer) swaps the table in atomically
//! with the set it was built from. The pick itself then reads that immutable table plus a
//! few per-backend atomics (in-flight count, recent errors, latency).
//!
//! # Why strategies never filter
//! The balancer hands a strategy only eligible candidates (probe-healthy and not ejected,
//! or the panic-mode set), and marks the ones this request already tried as excluded.
//! A strategy only ranks. So no strategy, present or future, can pick a down backend while
//! an up one exists: that invariant lives in one place. The balancer also checks every
//! answer and falls back to a scan if a strategy ever returned an excluded candidate.
//! A backend taken out on the request path (an ejection) before the timer rebuilt the table
//! is excluded the same way, so every strategy skips it from the next pick on.
//!
//! # Why failures fade
//! Load-aware strategies count a backend's recent errors as load, so one that fails fast
//! never looks idle. That weight fades: each error counts one in-flight request's worth when
//! it happens and fades linearly to nothing over five seconds after the latest one, and a
//! good response clears it. A backend that failed once is not starved by its own penalty
//! (nothing would ever send it the request that clears it): it gets its share back within
//! seconds even if no request reaches it meanwhile.

mod consistent_hash;
mod least_conn;
mod p2c;
mod random;
mod round_robin;
mod wrr;

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use crate::backend::{BackendId, BackendState};
use crate::rng::Rng;

pub use consistent_hash::ConsistentHash;
pub use least_conn::LeastConnections;
pub use p2c::P2cEwma;
pub use random::Random;
pub use round_robin::RoundRobin;
pub use wrr::{smooth_wrr_sequence, SmoothWrr};

/// One eligible backend as a strategy sees it: identity, effective weight, live load.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub(crate) weight: u32,
    pub(crate) base_weight: u32,
    pub(crate) state: Arc<BackendState>,
}

// === impl Candidate ===

impl Candidate {
    /// A candidate with counters of its own, outside any [`Balancer`](crate::Balancer): for
    /// testing or benchmarking a [`Select`] implementation on its own. It is not ramping:
    /// its effective weight is the configured one at 100 %. Its identity is `addr`.
    #[must_use]
    pub fn detached(id: BackendId, addr: impl Into<String>, weight: u32) -> Self {
        Self {
            weight: weight.max(1).saturating_mul(100),
            base_weight: weight.max(1),
            state: Arc::new(BackendState::new(id, addr.into())),
        }
    }

    /// Like [`Candidate::detached`], with an identity other than the address.
    #[must_use]
    pub fn detached_with_identity(
        id: BackendId,
        addr: impl Into<String>,
        identity: impl Into<String>,
        weight: u32,
    ) -> Self {
        Self {
            weight: weight.max(1).saturating_mul(100),
            base_weight: weight.max(1),
            state: Arc::new(BackendState::with_identity(
                id,
                addr.into(),
                identity.into(),
            )),
        }
    }

    /// The backend's id.
    #[must_use]
    pub fn id(&self) -> BackendId {
        self.state.id
    }

    /// The backend's address as configured (what `/status` and logs show).
    #[must_use]
    pub fn addr(&self) -> &str {
        &self.state.addr
    }

    /// The backend's identity (see [`Backend::identity`](crate::Backend::identity)): what
    /// consistent hashing places it by. The address unless the embedder gave another.
    #[must_use]
    pub fn identity(&self) -> &str {
        &self.state.identity
    }

    /// Effective weight: the configured weight scaled by slow start, in hundredths
    /// (a weight-3 backend at 100 % is 300). Always at least 1.
    #[must_use]
    pub const fn weight(&self) -> u32 {
        self.weight
    }

    /// The configured weight, without slow start (consistent hashing places by this, so a
    /// ramp never moves keys).
    #[must_use]
    pub const fn configured_weight(&self) -> u32 {
        self.base_weight
    }

    /// Attempts currently in flight to this backend (all requests, all threads).
    #[must_use]
    pub fn in_flight(&self) -> u32 {
        self.state.in_flight()
    }

    /// Its slow-start share in percent (10 to 100; 100 when not ramping).
    #[must_use]
    pub const fn slow_start_percent(&self) -> u32 {
        self.weight / self.base_weight
    }

    /// The weight of recent errors (connect failures, resets, timeouts, 5xx) at `now_ns`:
    /// each counts 1 when it happens and fades linearly to 0 within five seconds of the
    /// latest one; a good response clears it. Load-aware strategies add it to the load so
    /// a fast-failing backend never looks idle, and never starve one that failed once.
    #[must_use]
    pub fn recent_errors(&self, now_ns: u64) -> f64 {
        self.state.error_weight(now_ns)
    }

    /// In-flight plus recent errors plus one, at `now_ns`: the load least-connections and
    /// p2c compare (see [`PickCx::now_ns`]).
    #[must_use]
    pub fn load(&self, now_ns: u64) -> f64 {
        f64::from(self.in_flight()) + self.recent_errors(now_ns) + 1.0
    }

    /// Returns true if and only if the balancer took this backend out after the table was
    /// built (ejected, or down): it must not be picked.
    pub(crate) fn is_hidden(&self) -> bool {
        self.state.is_hidden()
    }
}

/// Everything one pick may consult besides the table: the request's key, its RNG, the
/// backends it already tried, and the time.
#[derive(Debug)]
pub struct PickCx<'a> {
    pub(crate) key: Option<u64>,
    pub(crate) rng: &'a mut Rng,
    pub(crate) tried: &'a [BackendId],
    pub(crate) now_ns: u64,
    pub(crate) latency: &'a crate::latency::LatencyParams,
}

// === impl PickCx ===

impl<'a> PickCx<'a> {
    /// A context for picking outside a [`Balancer`](crate::Balancer) (benchmarks, tests,
    /// another proxy's own loop). `tried` are excluded; `now_ns` is any monotonic nanosecond
    /// count that latency samples were recorded against.
    pub fn new(key: Option<u64>, rng: &'a mut Rng, tried: &'a [BackendId], now_ns: u64) -> Self {
        Self {
            key,
            rng,
            tried,
            now_ns,
            latency: &crate::latency::LatencyParams::DEFAULT,
        }
    }

    /// The request's hash key, if it has one.
    #[must_use]
    pub const fn key(&self) -> Option<u64> {
        self.key
    }

    /// This request's random generator.
    pub fn rng(&mut self) -> &mut Rng {
        self.rng
    }

    /// The time, as the monotonic nanosecond count latency and error samples use.
    #[must_use]
    pub const fn now_ns(&self) -> u64 {
        self.now_ns
    }

    /// Returns true if and only if `candidate` must not be returned: this request already
    /// tried it, or the balancer took it out (an ejection) since the table was built.
    #[must_use]
    pub fn is_excluded(&self, candidate: &Candidate) -> bool {
        candidate.is_hidden() || (!self.tried.is_empty() && self.tried.contains(&candidate.id()))
    }

    /// Returns true if and only if any candidate may be excluded (the request is a retry).
    #[must_use]
    pub fn has_exclusions(&self) -> bool {
        !self.tried.is_empty()
    }

    /// The candidate's latency estimate now, in nanoseconds: its peak EWMA, but at least the
    /// configured failure penalty while its latest error fades (linearly, to nothing within
    /// five seconds, or at once on a good response).
    #[must_use]
    pub fn latency_ns(&self, candidate: &Candidate) -> f64 {
        let ewma = self.latency.estimate_at(&candidate.state, self.now_ns);
        let fade = candidate.state.error_fade(self.now_ns);
        if fade > 0.0 {
            ewma.max(self.latency.penalty_ns * fade)
        } else {
            ewma
        }
    }
}

/// A selection strategy: builds a table when the eligible set changes, picks from it per attempt.
///
/// Implementations must be cheap to pick with from many threads at once (`&self`, no locks)
/// and must never return an excluded candidate (see [`PickCx::is_excluded`]).
///
/// ```
/// use lb_core::select::{Candidate, PickCx, Select};
///
/// /// Always the first candidate not yet tried.
/// struct First;
/// impl Select for First {
///     type Table = ();
///     fn name(&self) -> &'static str { "first" }
///     fn build(&self, _: &[Candidate]) {}
///     fn pick(&self, _: &(), candidates: &[Candidate], cx: &mut PickCx<'_>) -> Option<usize> {
///         candidates.iter().position(|c| !cx.is_excluded(c))
///     }
/// }
/// let balancer = lb_core::Balancer::new(lb_core::Config::default(), First).unwrap();
/// # let _ = balancer;
/// ```
pub trait Select: Send + Sync + 'static {
    /// What the strategy precomputes for one eligible set.
    type Table: Send + Sync + 'static;

    /// The strategy's name as SPEC.md spells it (`round-robin`, ...).
    fn name(&self) -> &'static str;

    /// Precomputes the table for `candidates`. Called on the rare path (set or health change).
    fn build(&self, candidates: &[Candidate]) -> Self::Table;

    /// Picks the index of one candidate that `cx` does not exclude, or `None` if and only if
    /// every candidate is excluded (or there are none).
    fn pick(
        &self,
        table: &Self::Table,
        candidates: &[Candidate],
        cx: &mut PickCx<'_>,
    ) -> Option<usize>;

    /// Told after the load of `candidates[index]` changed at `now_ns` (an attempt started or
    /// ended, an error was counted, the balancer took the backend out), for strategies that
    /// index load. The default does nothing.
    fn load_changed(
        &self,
        table: &Self::Table,
        candidates: &[Candidate],
        index: usize,
        now_ns: u64,
    ) {
        let _ = (table, candidates, index, now_ns);
    }

    /// Returns true if and only if `load_changed` does something (lets the balancer skip the
    /// call, and the snapshot lookup before it, on every request).
    fn tracks_load(&self) -> bool {
        false
    }

    /// Returns true if and only if picks read [`PickCx::latency_ns`] (lets the balancer skip
    /// latency bookkeeping on every response).
    fn uses_latency(&self) -> bool {
        false
    }

    /// Returns true if and only if slow start applies (every built-in strategy but
    /// consistent hashing, where ramping a weight would move keys at every step). When it
    /// does not, a returning backend gets its full weight at once and the balancer
    /// schedules no ramp steps, so no table is rebuilt for them.
    fn slow_start(&self) -> bool {
        true
    }
}

/// The first non-excluded candidate at or after `start`, wrapping around.
pub(crate) fn scan_from(candidates: &[Candidate], start: usize, cx: &PickCx<'_>) -> Option<usize> {
    let n = candidates.len();
    (0..n)
        .map(|k| (start + k) % n)
        .find(|&i| !cx.is_excluded(&candidates[i]))
}

/// The strategies SPEC.md names, for choosing one from a config string.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StrategyKind {
    /// `round-robin`: each healthy backend in turn, weights ignored.
    RoundRobin,
    /// `weighted-round-robin`: NGINX's smooth weighted round robin.
    WeightedRoundRobin,
    /// `least-connections`: fewest in-flight per weight.
    LeastConnections,
    /// `p2c-ewma`: power of two choices over peak-EWMA latency × load.
    P2cEwma,
    /// `consistent-hash`: Maglev hashing of the request key.
    ConsistentHash,
    /// `random`: uniformly random (weighted when weights differ).
    Random,
}

impl StrategyKind {
    /// Every strategy, in SPEC.md's order.
    pub const ALL: [Self; 6] = [
        Self::RoundRobin,
        Self::WeightedRoundRobin,
        Self::LeastConnections,
        Self::P2cEwma,
        Self::ConsistentHash,
        Self::Random,
    ];

    /// The name as SPEC.md spells it.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::RoundRobin => "round-robin",
            Self::WeightedRoundRobin => "weighted-round-robin",
            Self::LeastConnections => "least-connections",
            Self::P2cEwma => "p2c-ewma",
            Self::ConsistentHash => "consistent-hash",
            Self::Random => "random",
        }
    }
}

impl fmt::Display for StrategyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An unknown strategy name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown strategy {0:?} (expected one of round-robin, weighted-round-robin, least-connections, p2c-ewma, consistent-hash, random)")]
pub struct UnknownStrategy(pub String);

impl FromStr for StrategyKind {
    type Err = UnknownStrategy;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| UnknownStrategy(s.to_owned()))
    }
}

/// Any of the built-in strategies, chosen at run time (e.g. from a config file).
///
/// ```
/// use lb_core::select::{AnySelect, StrategyKind};
/// let s = AnySelect::new("weighted-round-robin".parse::<StrategyKind>().unwrap());
/// assert_eq!(lb_core::select::Select::name(&s), "weighted-round-robin");
/// ```
#[derive(Debug)]
pub enum AnySelect {
    /// See [`RoundRobin`].
    RoundRobin(RoundRobin),
    /// See [`SmoothWrr`].
    WeightedRoundRobin(SmoothWrr),
    /// See [`LeastConnections`].
    LeastConnections(LeastConnections),
    /// See [`P2cEwma`].
    P2cEwma(P2cEwma),
    /// See [`ConsistentHash`].
    ConsistentHash(ConsistentHash),
    /// See [`Random`].
    Random(Random),
}

/// The table of whichever strategy an [`AnySelect`] holds.
#[derive(Debug)]
pub enum AnyTable {
    /// No table (p2c).
    None,
    /// Round robin's slow-start sequence, while a backend ramps.
    RoundRobin(<RoundRobin as Select>::Table),
    /// Smooth WRR sequence.
    Wrr(<SmoothWrr as Select>::Table),
    /// Least-connections tournament tree.
    LeastConnections(<LeastConnections as Select>::Table),
    /// Maglev lookup table.
    ConsistentHash(<ConsistentHash as Select>::Table),
    /// Cumulative weights.
    Random(<Random as Select>::Table),
}

// === impl AnySelect ===

impl AnySelect {
    /// A fresh strategy of the given kind.
    #[must_use]
    pub fn new(kind: StrategyKind) -> Self {
        match kind {
            StrategyKind::RoundRobin => Self::RoundRobin(RoundRobin::default()),
            StrategyKind::WeightedRoundRobin => Self::WeightedRoundRobin(SmoothWrr::default()),
            StrategyKind::LeastConnections => Self::LeastConnections(LeastConnections::default()),
            StrategyKind::P2cEwma => Self::P2cEwma(P2cEwma),
            StrategyKind::ConsistentHash => Self::ConsistentHash(ConsistentHash),
            StrategyKind::Random => Self::Random(Random),
        }
    }

    /// Which strategy this is.
    #[must_use]
    pub const fn kind(&self) -> StrategyKind {
        match self {
            Self::RoundRobin(_) => StrategyKind::RoundRobin,
            Self::WeightedRoundRobin(_) => StrategyKind::WeightedRoundRobin,
            Self::LeastConnections(_) => StrategyKind::LeastConnections,
            Self::P2cEwma(_) => StrategyKind::P2cEwma,
            Self::ConsistentHash(_) => StrategyKind::ConsistentHash,
            Self::Random(_) => StrategyKind::Random,
        }
    }
}

impl Select for AnySelect {
    type Table = AnyTable;

    fn name(&self) -> &'static str {
        self.kind().as_str()
    }

    fn build(&self, candidates: &[Candidate]) -> AnyTable {
        match self {
            Self::P2cEwma(_) => AnyTable::None,
            Self::RoundRobin(s) => AnyTable::RoundRobin(s.build(candidates)),
            Self::WeightedRoundRobin(s) => AnyTable::Wrr(s.build(candidates)),
            Self::LeastConnections(s) => AnyTable::LeastConnections(s.build(candidates)),
            Self::ConsistentHash(s) => AnyTable::ConsistentHash(s.build(candidates)),
            Self::Random(s) => AnyTable::Random(s.build(candidates)),
        }
    }

    fn pick(
        &self,
        table: &AnyTable,
        candidates: &[Candidate],
        cx: &mut PickCx<'_>,
    ) -> Option<usize> {
        match (self, table) {
            (Self::RoundRobin(s), AnyTable::RoundRobin(t)) => s.pick(t, candidates, cx),
            (Self::P2cEwma(s), _) => s.pick(&(), candidates, cx),
            (Self::WeightedRoundRobin(s), AnyTable::Wrr(t)) => s.pick(t, candidates, cx),
            (Self::LeastConnections(s), AnyTable::LeastConnections(t)) => s.pick(t, candidates, cx),
            (Self::ConsistentHash(s), AnyTable::ConsistentHash(t)) => s.pick(t, candidates, cx),
            (Self::Random(s), AnyTable::Random(t)) => s.pick(t, candidates, cx),
            // A table always comes from `build` of the same strategy; stay total anyway.
            _ => scan_from(candidates, 0, cx),
        }
    }

    fn load_changed(&self, table: &AnyTable, candidates: &[Candidate], index: usize, now_ns: u64) {
        if let (Self::LeastConnections(s), AnyTable::LeastConnections(t)) = (self, table) {
            s.load_changed(t, candidates, index, now_ns);
        }
    }

    fn tracks_load(&self) -> bool {
        matches!(self, Self::LeastConnections(_))
    }

    fn uses_latency(&self) -> bool {
        matches!(self, Self::P2cEwma(_))
    }

    fn slow_start(&self) -> bool {
        !matches!(self, Self::ConsistentHash(_))
    }
}

#[cfg(test)]
pub(crate) mod test_util {
    use super::*;

    /// Candidates with the given weights, ids 0.., addresses "b0"...
    pub(crate) fn candidates(weights: &[u32]) -> Vec<Candidate> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &w)| Candidate {
                weight: w,
                base_weight: w,
                state: Arc::new(BackendState::new(BackendId(i as u32), format!("b{i}"))),
            })
            .collect()
    }

    pub(crate) fn cx<'a>(rng: &'a mut Rng, tried: &'a [BackendId], key: Option<u64>) -> PickCx<'a> {
        PickCx::new(key, rng, tried, 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_round_trip_through_their_names() {
        for k in StrategyKind::ALL {
            assert_eq!(k.as_str().parse::<StrategyKind>().unwrap(), k);
            assert_eq!(AnySelect::new(k).name(), k.as_str());
        }
        assert!("fastest".parse::<StrategyKind>().is_err());
    }
}
