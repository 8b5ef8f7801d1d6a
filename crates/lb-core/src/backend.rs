//! Backends: their identity, their weight, and the live counters the hot path reads.
//!
//! A backend has an address as written (`"http://127.0.0.1:3031"` or `"10.0.0.1:80"`), shown
//! in `/status` and logs, and an *identity*: the string that says which backend it is. The
//! core never parses or dials either. By default the identity is the address; an embedder
//! that accepts one backend written several ways (`http://a:1`, `http://a:1/`, `A:1`) gives
//! [`Backend::with_identity`] one normalized form of it.
//!
//! The identity is what consistent hashing places a backend by, so **give every instance the
//! same identity for the same backend**: then any balancers given the same backends (in any
//! order, whatever ids they were assigned) send each key to the same one. The [`Balancer`]
//! assigns each backend a [`BackendId`] that stays the same for as long as the backend stays
//! in the set (same identity, same address), so a reload that keeps a backend keeps its
//! health, ejection and load state.
//!
//! [`Balancer`]: crate::Balancer

use std::fmt;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use crate::error::ConfigError;

/// Identifies one backend inside a [`Balancer`](crate::Balancer). Ids are never reused.
///
/// Opaque: ids come from [`Balancer::set_backends`](crate::Balancer::set_backends) (and are
/// shown by [`Display`](fmt::Display) as `#n`); their representation may change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BackendId(pub(crate) u32);

impl fmt::Display for BackendId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// A backend's relative share of traffic: at least 1, at most [`Weight::MAX`].
///
/// ```
/// use lb_core::Weight;
/// assert_eq!(Weight::new(3).unwrap().get(), 3);
/// assert!(Weight::new(0).is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Weight(NonZeroU32);

// === impl Weight ===

impl Weight {
    /// The largest weight accepted (HAProxy allows 256, NGINX no limit; this bounds the
    /// smooth-WRR table and keeps weight arithmetic far from overflow).
    pub const MAX: u32 = 10_000;

    /// Weight 1.
    pub const ONE: Self = Self(NonZeroU32::MIN);

    /// Validates a weight.
    ///
    /// # Errors
    /// [`ConfigError::ZeroWeight`] for 0 and [`ConfigError::WeightTooLarge`] above [`Weight::MAX`].
    pub fn new(weight: u32) -> Result<Self, ConfigError> {
        match NonZeroU32::new(weight) {
            None => Err(ConfigError::ZeroWeight),
            Some(_) if weight > Self::MAX => Err(ConfigError::WeightTooLarge(weight)),
            Some(w) => Ok(Self(w)),
        }
    }

    /// The weight as an integer.
    #[must_use]
    pub const fn get(self) -> u32 {
        self.0.get()
    }
}

impl Default for Weight {
    fn default() -> Self {
        Self::ONE
    }
}

/// One backend as configured: an address, an identity (by default the address) and a weight.
///
/// ```
/// use lb_core::{Backend, Weight};
/// let b = Backend::new("HTTP://127.0.0.1:3031/", Weight::new(3).unwrap());
/// assert_eq!(b.addr(), "HTTP://127.0.0.1:3031/");
/// assert_eq!(b.identity(), "HTTP://127.0.0.1:3031/");
/// assert_eq!(b.weight().get(), 3);
/// // The same backend, as every instance should name it:
/// let b = b.with_identity("http://127.0.0.1:3031");
/// assert_eq!(b.identity(), "http://127.0.0.1:3031");
/// assert_eq!(b.addr(), "HTTP://127.0.0.1:3031/");
/// // A fail-over backend: used only while no priority-0 backend is eligible.
/// let spare = Backend::new("http://10.0.0.9:80", Weight::ONE).with_priority(1);
/// assert_eq!(spare.priority(), 1);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Backend {
    addr: String,
    identity: Option<String>,
    weight: Weight,
    priority: u16,
}

// === impl Backend ===

impl Backend {
    /// A backend with the given address and weight; its identity is the address.
    pub fn new(addr: impl Into<String>, weight: Weight) -> Self {
        Self {
            addr: addr.into(),
            identity: None,
            weight,
            priority: 0,
        }
    }

    /// The same backend in priority group `priority` (default 0; lower is preferred, as in
    /// DNS SRV records). Only the lowest group with an eligible backend (up by probes, not
    /// ejected, not draining) takes requests, with every strategy; the next group takes
    /// over while none of a lower one is eligible, and hands back as soon as one is again.
    /// Panic mode (`panic_threshold_percent`) counts the whole pool.
    #[must_use]
    pub const fn with_priority(mut self, priority: u16) -> Self {
        self.priority = priority;
        self
    }

    /// The priority group (lower is preferred).
    #[must_use]
    pub const fn priority(&self) -> u16 {
        self.priority
    }

    /// The same backend with `identity` as its identity: the string consistent hashing places
    /// it by and duplicates are detected by. Give every balancer instance the same identity
    /// for the same backend, however its address is written (a normalized
    /// `scheme://host:port`, or the resolved `ip:port` of a discovered backend).
    #[must_use]
    pub fn with_identity(mut self, identity: impl Into<String>) -> Self {
        self.identity = Some(identity.into());
        self
    }

    /// The address, exactly as given (what `/status` and logs show).
    #[must_use]
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The identity: what [`Backend::with_identity`] set, else the address.
    #[must_use]
    pub fn identity(&self) -> &str {
        self.identity.as_deref().unwrap_or(&self.addr)
    }

    /// The configured weight.
    #[must_use]
    pub const fn weight(&self) -> Weight {
        self.weight
    }
}

/// How long one failure keeps counting as load: its weight fades linearly to nothing over
/// this, counted from the backend's latest failure (SPEC: "a backend that failed and then
/// serves well gets its even share back within 10 s"; half of that leaves a margin).
pub(crate) const ERROR_FADE_MS: u64 = 5_000;

/// Fixed-point unit of the error weight: one failure.
const ERROR_UNIT: u64 = 256;
const AT_BITS: u32 = 40;
const AT_MASK: u64 = (1 << AT_BITS) - 1;

/// Live, lock-free counters of one backend, shared by every request thread.
///
/// Aligned to a cache line so two backends' counters never share one.
#[derive(Debug)]
#[repr(align(64))]
pub(crate) struct BackendState {
    pub(crate) id: BackendId,
    pub(crate) addr: String,
    /// What consistent hashing places it by (see [`Backend::identity`]).
    pub(crate) identity: String,
    /// Attempts sent and not yet finished.
    pub(crate) in_flight: AtomicU32,
    /// Consecutive connection-level failures (refused, timed out, reset, a broken body); reset
    /// by any exchange that completes (`finish(Done)`), 5xx included.
    pub(crate) consecutive_failures: AtomicU32,
    /// Recent errors of any kind, 5xx included: the load penalty least-connections and p2c
    /// add so a backend that fails fast never looks idle. Packed in one word so readers never
    /// see half an update: weight in 1/256ths of a failure (high 24 bits) and the
    /// millisecond tick of the latest failure (low 40 bits). The weight fades linearly to
    /// zero over [`ERROR_FADE_MS`] after that failure, and a good response clears it.
    pub(crate) errors: AtomicU64,
    /// Not to be picked whatever the published snapshot says: ejected (outside panic mode)
    /// or down since the snapshot was built. Lets the request path take a backend out at
    /// once while the table rebuild waits for the timer.
    pub(crate) hidden: AtomicBool,
    /// Peak-EWMA latency in nanoseconds (f64 bits) and the tick it was last updated.
    pub(crate) ewma_ns: AtomicU64,
    pub(crate) ewma_at: AtomicU64,
    /// Number of ejections in the current row (0: not in a row). Read lock-free on success.
    pub(crate) ejection_row: AtomicU32,
    pub(crate) requests_total: AtomicU64,
    pub(crate) failures_total: AtomicU64,
}

// === impl BackendState ===

impl BackendState {
    /// State whose identity is its address.
    pub(crate) fn new(id: BackendId, addr: String) -> Self {
        let identity = addr.clone();
        Self::with_identity(id, addr, identity)
    }

    pub(crate) fn with_identity(id: BackendId, addr: String, identity: String) -> Self {
        Self {
            id,
            addr,
            identity,
            in_flight: AtomicU32::new(0),
            consecutive_failures: AtomicU32::new(0),
            errors: AtomicU64::new(0),
            hidden: AtomicBool::new(false),
            ewma_ns: AtomicU64::new(0f64.to_bits()),
            ewma_at: AtomicU64::new(0),
            ejection_row: AtomicU32::new(0),
            requests_total: AtomicU64::new(0),
            failures_total: AtomicU64::new(0),
        }
    }

    pub(crate) fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub(crate) fn is_hidden(&self) -> bool {
        self.hidden.load(Ordering::Relaxed)
    }

    /// The weight of recent errors at `now_ns`, in failures (each counts 1 when it happens,
    /// fading linearly to 0 over [`ERROR_FADE_MS`] after the latest one).
    pub(crate) fn error_weight(&self, now_ns: u64) -> f64 {
        let (units, left) = faded(self.errors.load(Ordering::Relaxed), now_ns);
        (units * left) as f64 / (ERROR_UNIT * ERROR_FADE_MS) as f64
    }

    /// How much of the latest failure's fade is left at `now_ns`: 1 right after it, 0 once
    /// [`ERROR_FADE_MS`] passed or a good response cleared it.
    pub(crate) fn error_fade(&self, now_ns: u64) -> f64 {
        let (units, left) = faded(self.errors.load(Ordering::Relaxed), now_ns);
        if units == 0 {
            0.0
        } else {
            left as f64 / ERROR_FADE_MS as f64
        }
    }

    /// Counts one more error at `now_ns`, on top of what is left of the earlier ones.
    pub(crate) fn add_error(&self, now_ns: u64) {
        let at = (now_ns / 1_000_000) & AT_MASK;
        let _ = self
            .errors
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |word| {
                let (units, left) = faded(word, now_ns);
                let units = (units * left / ERROR_FADE_MS + ERROR_UNIT).min((1 << 24) - 1);
                Some(units << AT_BITS | at)
            });
    }

    /// A good response: the backend serves well, its errors stop counting.
    pub(crate) fn clear_errors(&self) {
        if self.errors.load(Ordering::Relaxed) != 0 {
            self.errors.store(0, Ordering::Relaxed);
        }
    }

    /// Decrements the in-flight count. Each attempt is released once (its `Open` is taken
    /// out of the request state), so this never goes below zero.
    pub(crate) fn release(&self) {
        let prev = self.in_flight.fetch_sub(1, Ordering::Relaxed);
        debug_assert!(prev > 0, "in-flight count released below zero");
    }
}

/// A packed error word's weight units and the milliseconds left of its fade at `now_ns`.
fn faded(word: u64, now_ns: u64) -> (u64, u64) {
    let units = word >> AT_BITS;
    let at = word & AT_MASK;
    let now = (now_ns / 1_000_000) & AT_MASK;
    let elapsed = now.saturating_sub(at);
    (units, ERROR_FADE_MS.saturating_sub(elapsed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_weight_fades_to_zero_and_adds_up() {
        let s = BackendState::new(BackendId(0), "a".into());
        let ms = |n: u64| n * 1_000_000;
        assert_eq!(s.error_weight(ms(5)), 0.0);
        s.add_error(ms(1_000));
        assert_eq!(s.error_weight(ms(1_000)), 1.0);
        assert_eq!(s.error_fade(ms(1_000)), 1.0);
        assert!((s.error_weight(ms(3_500)) - 0.5).abs() < 1e-9);
        s.add_error(ms(3_500));
        assert!((s.error_weight(ms(3_500)) - 1.5).abs() < 1e-2);
        assert_eq!(s.error_weight(ms(3_500 + ERROR_FADE_MS)), 0.0);
        assert_eq!(s.error_fade(ms(3_500 + ERROR_FADE_MS)), 0.0);
        s.add_error(ms(9_000));
        s.clear_errors();
        assert_eq!(s.error_weight(ms(9_000)), 0.0);
        assert_eq!(s.error_fade(ms(9_000)), 0.0);
    }
}
