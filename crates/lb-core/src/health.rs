//! Health arithmetic: rise/fall counting, ejection lengths, slow-start ramps.
//!
//! These are pure functions and small value types; the [`Balancer`](crate::Balancer) owns one
//! of each per backend and applies them under its (rarely taken) control lock.
//!
//! # Why two kinds of health
//! Active probes answer "is it up?" and are authoritative: a backend that fails `fall` probes
//! in a row is down until it passes `rise` in a row (HAProxy's model; pingora's
//! `observe_health`). Passive ejection answers "is it hurting live traffic right now?" from
//! what requests see (Envoy's outlier detection). Ejection is the cheaper, faster and
//! noisier signal, so it is the one bounded by `max_ejected_percent` and overridden by panic
//! mode; a probe verdict is never overridden.

use std::time::Duration;

/// Consecutive-result counter for one backend (HAProxy `rise`/`fall`).
///
/// ```
/// use lb_core::RiseFall;
/// let mut h = RiseFall::new(true);
/// assert_eq!(h.observe(false, 2, 3), None);
/// assert_eq!(h.observe(false, 2, 3), None);
/// assert_eq!(h.observe(false, 2, 3), Some(false)); // third failure in a row: down
/// assert_eq!(h.observe(true, 2, 3), None);
/// assert_eq!(h.observe(true, 2, 3), Some(true));   // second success in a row: up
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RiseFall {
    up: bool,
    /// Consecutive results that disagree with `up`.
    streak: u32,
}

// === impl RiseFall ===

impl RiseFall {
    /// A counter starting in the given state.
    #[must_use]
    pub const fn new(up: bool) -> Self {
        Self { up, streak: 0 }
    }

    /// Returns true if and only if the backend is up by probes.
    #[must_use]
    pub const fn is_up(&self) -> bool {
        self.up
    }

    /// Consecutive results so far that disagree with the current state.
    #[must_use]
    pub const fn streak(&self) -> u32 {
        self.streak
    }

    /// Records one probe result; returns the new state if and only if it changed.
    ///
    /// An up backend goes down after `fall` failures in a row, a down one comes up after
    /// `rise` successes in a row; a result that agrees with the state resets the streak.
    pub fn observe(&mut self, success: bool, rise: u32, fall: u32) -> Option<bool> {
        if success == self.up {
            self.streak = 0;
            return None;
        }
        self.streak = self.streak.saturating_add(1);
        let threshold = if self.up { fall } else { rise };
        if self.streak >= threshold.max(1) {
            self.up = success;
            self.streak = 0;
            Some(success)
        } else {
            None
        }
    }
}

/// Length of the `count`-th ejection in a row: `base × count`, at most `max` (Envoy's
/// `base_ejection_time × number of ejections`, capped by `max_ejection_time`).
///
/// ```
/// use std::time::Duration;
/// let s = Duration::from_secs;
/// assert_eq!(lb_core::ejection_duration(s(10), s(25), 1), s(10));
/// assert_eq!(lb_core::ejection_duration(s(10), s(25), 2), s(20));
/// assert_eq!(lb_core::ejection_duration(s(10), s(25), 3), s(25));
/// ```
#[must_use]
pub fn ejection_duration(base: Duration, max: Duration, count: u32) -> Duration {
    base.saturating_mul(count.max(1)).min(max)
}

/// Number of discrete steps slow start ramps through (10 %, 20 %, ... 100 %).
///
/// Weighted tables are rebuilt at each step rather than on every request, so the ramp is a
/// staircase of ten steps: close enough to linear, and the pick path stays a table lookup.
pub const SLOW_START_STEPS: u32 = 10;

/// Slow-start weight factor in percent, `elapsed` into a ramp of length `window`: linear from
/// 10 % to 100 %, quantised to [`SLOW_START_STEPS`] steps. A zero window is no ramp (100).
///
/// ```
/// use std::time::Duration;
/// let w = Duration::from_secs(30);
/// assert_eq!(lb_core::slow_start_percent(Duration::ZERO, w), 10);
/// assert_eq!(lb_core::slow_start_percent(Duration::from_secs(15), w), 55);
/// assert_eq!(lb_core::slow_start_percent(Duration::from_secs(30), w), 100);
/// ```
#[must_use]
pub fn slow_start_percent(elapsed: Duration, window: Duration) -> u32 {
    if window.is_zero() || elapsed >= window {
        return 100;
    }
    let step = (elapsed.as_nanos() * u128::from(SLOW_START_STEPS) / window.as_nanos()) as u32;
    10 + 90 * step / SLOW_START_STEPS
}

/// When the ramp that started at offset 0 reaches its next step after `elapsed`, or `None`
/// once it is complete.
pub(crate) fn slow_start_next_step(elapsed: Duration, window: Duration) -> Option<Duration> {
    if window.is_zero() || elapsed >= window {
        return None;
    }
    let step = (elapsed.as_nanos() * u128::from(SLOW_START_STEPS) / window.as_nanos()) as u32;
    let next = window.as_nanos() * u128::from(step + 1) / u128::from(SLOW_START_STEPS);
    Some(Duration::from_nanos(
        u64::try_from(next).unwrap_or(u64::MAX),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opposite_result_resets_streak() {
        let mut h = RiseFall::new(true);
        assert_eq!(h.observe(false, 2, 3), None);
        assert_eq!(h.observe(false, 2, 3), None);
        assert_eq!(h.observe(true, 2, 3), None);
        assert_eq!(h.streak(), 0);
        assert_eq!(h.observe(false, 2, 3), None);
        assert!(h.is_up());
    }

    #[test]
    fn ramp_is_monotone_and_steps_line_up() {
        let w = Duration::from_secs(30);
        let mut last = 0;
        let mut t = Duration::ZERO;
        let mut steps = 0;
        while let Some(next) = slow_start_next_step(t, w) {
            assert!(next > t);
            let p = slow_start_percent(next, w);
            assert!(p > last, "{p} after {last}");
            last = p;
            t = next;
            steps += 1;
        }
        assert_eq!(steps, SLOW_START_STEPS);
        assert_eq!(last, 100);
        assert_eq!(
            slow_start_percent(Duration::from_secs(1), Duration::ZERO),
            100
        );
    }
}
