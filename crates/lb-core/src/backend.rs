//! Backends: their identity, their weight, and the live counters the hot path reads.
//!
//! A backend is named by its address as written (`"http://127.0.0.1:3031"` or `"10.0.0.1:80"`):
//! the core never parses or dials it, it only needs a stable identity. The [`Balancer`]
//! assigns each address a [`BackendId`] that stays the same for as long as the address stays
//! in the set, so a reload that keeps a backend keeps its health, ejection and load state.
//!
//! [`Balancer`]: crate::Balancer

use std::fmt;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

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

/// One backend as configured: an address (its identity) and a weight.
///
/// ```
/// use lb_core::{Backend, Weight};
/// let b = Backend::new("http://127.0.0.1:3031", Weight::new(3).unwrap());
/// assert_eq!(b.addr(), "http://127.0.0.1:3031");
/// assert_eq!(b.weight().get(), 3);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Backend {
    addr: String,
    weight: Weight,
}

// === impl Backend ===

impl Backend {
    /// A backend with the given address and weight.
    pub fn new(addr: impl Into<String>, weight: Weight) -> Self {
        Self {
            addr: addr.into(),
            weight,
        }
    }

    /// The address, exactly as given (also the key consistent hashing places it by).
    #[must_use]
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The configured weight.
    #[must_use]
    pub const fn weight(&self) -> Weight {
        self.weight
    }
}

/// Live, lock-free counters of one backend, shared by every request thread.
///
/// Aligned to a cache line so two backends' counters never share one.
#[derive(Debug)]
#[repr(align(64))]
pub(crate) struct BackendState {
    pub(crate) id: BackendId,
    pub(crate) addr: String,
    /// Attempts sent and not yet finished.
    pub(crate) in_flight: AtomicU32,
    /// Consecutive connection-level failures (refused, timed out, reset); reset by any response.
    pub(crate) consecutive_failures: AtomicU32,
    /// Consecutive errors of any kind, 5xx included: the load penalty least-connections and
    /// p2c add so a backend that fails fast never looks idle. Reset by a non-5xx response.
    pub(crate) recent_errors: AtomicU32,
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
    pub(crate) fn new(id: BackendId, addr: String) -> Self {
        Self {
            id,
            addr,
            in_flight: AtomicU32::new(0),
            consecutive_failures: AtomicU32::new(0),
            recent_errors: AtomicU32::new(0),
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

    pub(crate) fn recent_errors(&self) -> u32 {
        self.recent_errors.load(Ordering::Relaxed)
    }

    /// Decrements the in-flight count. Each attempt is released once (its `Open` is taken
    /// out of the request state), so this never goes below zero.
    pub(crate) fn release(&self) {
        let prev = self.in_flight.fetch_sub(1, Ordering::Relaxed);
        debug_assert!(prev > 0, "in-flight count released below zero");
    }
}
