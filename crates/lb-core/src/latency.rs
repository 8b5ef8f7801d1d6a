//! Peak-EWMA latency per backend, read and written lock-free.
//!
//! # Why peak EWMA
//! An average hides the moment a backend slows down; a peak-sensitive average reacts at once
//! to a slow response (the estimate jumps to it) and forgets it smoothly (an exponential
//! decay with time constant `decay`). That is Finagle's `PeakEwma`, used by linkerd and tower
//! for power-of-two-choices. Unlike tower's, this one never reads a clock: the caller's
//! `now` (as nanoseconds since the balancer's epoch) comes in with every call, and reads are
//! non-mutating projections (`estimate_at`), as in linkerd's `ewma` crate.
//!
//! Concurrent writers race on a load/store pair; a lost sample among thousands only nudges an
//! estimate, and a lock per response would cost more than it buys.

use std::sync::atomic::Ordering;

use crate::backend::BackendState;
use crate::config::LatencyConfig;

/// Latency settings in the units the hot path uses.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct LatencyParams {
    decay_ns: f64,
    default_rtt_ns: f64,
    pub(crate) penalty_ns: f64,
}

impl LatencyParams {
    pub(crate) const DEFAULT: Self = Self {
        decay_ns: 10e9,
        default_rtt_ns: 1e6,
        penalty_ns: 250e6,
    };

    pub(crate) fn new(c: &LatencyConfig) -> Self {
        Self {
            decay_ns: c.decay.as_nanos() as f64,
            default_rtt_ns: c.default_rtt.as_nanos() as f64,
            penalty_ns: c.failure_penalty.as_nanos() as f64,
        }
    }

    /// Starts a new backend's estimate at the default, stamped `now_ns`, so it decays as a
    /// sample would (tower's `PeakEwma` starts endpoints the same way). Without that, a
    /// backend nobody sent to yet — one added by a reload, or one whose only attempt failed —
    /// would lose every comparison to any backend faster than the default, and never get
    /// the request that would measure it; decaying, it looks cheaper and cheaper until it
    /// is tried.
    pub(crate) fn start(&self, s: &BackendState, now_ns: u64) {
        s.ewma_ns
            .store(self.default_rtt_ns.to_bits(), Ordering::Relaxed);
        s.ewma_at.store(now_ns.max(1), Ordering::Relaxed);
    }

    /// The estimate at `now_ns`, decayed since its last sample; the default before any sample.
    pub(crate) fn estimate_at(&self, s: &BackendState, now_ns: u64) -> f64 {
        let at = s.ewma_at.load(Ordering::Relaxed);
        if at == 0 {
            return self.default_rtt_ns;
        }
        let value = f64::from_bits(s.ewma_ns.load(Ordering::Relaxed));
        let elapsed = now_ns.saturating_sub(at) as f64;
        value * (-elapsed / self.decay_ns).exp()
    }

    /// Records one sample: a higher one replaces the estimate (peak), a lower one is blended
    /// in by how long it has been since the last sample. The first sample replaces the default.
    pub(crate) fn observe(&self, s: &BackendState, rtt_ns: f64, now_ns: u64) {
        // Tick 0 means "never sampled"; a sample at the epoch itself is stamped 1.
        let now_ns = now_ns.max(1);
        let at = s.ewma_at.load(Ordering::Relaxed);
        let next = if at == 0 {
            rtt_ns
        } else {
            let current = f64::from_bits(s.ewma_ns.load(Ordering::Relaxed));
            if rtt_ns > current {
                rtt_ns
            } else {
                let w = (-(now_ns.saturating_sub(at) as f64) / self.decay_ns).exp();
                current * w + rtt_ns * (1.0 - w)
            }
        };
        s.ewma_ns.store(next.to_bits(), Ordering::Relaxed);
        s.ewma_at.store(now_ns, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::BackendId;

    #[test]
    fn peak_then_decay() {
        let p = LatencyParams::DEFAULT;
        let s = BackendState::new(BackendId(0), "a".into());
        assert_eq!(p.estimate_at(&s, 5), 1e6, "default before any sample");
        p.observe(&s, 2e6, 1_000);
        assert_eq!(p.estimate_at(&s, 1_000), 2e6);
        p.observe(&s, 50e6, 2_000);
        assert_eq!(
            p.estimate_at(&s, 2_000),
            50e6,
            "a slow sample is taken at once"
        );
        p.observe(&s, 1e6, 3_000);
        assert!(
            p.estimate_at(&s, 3_000) > 49e6,
            "a fast one right after barely moves it"
        );
        let later = p.estimate_at(&s, 3_000 + 10_000_000_000);
        assert!(
            (later - 50e6 / std::f64::consts::E).abs() < 1e5,
            "decays by e per time constant: {later}"
        );
    }
}
