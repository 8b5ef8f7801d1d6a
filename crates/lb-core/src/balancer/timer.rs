//! The balancer's deadlines, quinn-style: an enum-indexed table whose minimum is the next
//! time `handle_timeout` should run, published in one atomic for a lock-free `poll_timeout`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// What a deadline is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Timer {
    /// The earliest ejection expiry.
    Ejection = 0,
    /// The earliest slow-start step.
    SlowStart = 1,
    /// The eligible set changed on the request path: rebuild the snapshot and table. Set to
    /// "now" by an ejection, so the timer task rebuilds off the request path at its next turn.
    Rebuild = 2,
}

const TIMERS: usize = 3;

/// `[Option<Instant>; N]` indexed by [`Timer`].
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct TimerTable([Option<Instant>; TIMERS]);

impl TimerTable {
    pub(super) fn set(&mut self, timer: Timer, at: Option<Instant>) {
        self.0[timer as usize] = at;
    }

    /// Moves `timer` to `at` if that is earlier (or it was unset).
    pub(super) fn set_earlier(&mut self, timer: Timer, at: Instant) {
        let t = &mut self.0[timer as usize];
        *t = Some(t.map_or(at, |old| old.min(at)));
    }

    pub(super) fn get(&self, timer: Timer) -> Option<Instant> {
        self.0[timer as usize]
    }

    /// Returns true if and only if `timer` is set and due by `now`.
    pub(super) fn is_due(&self, timer: Timer, now: Instant) -> bool {
        self.get(timer).is_some_and(|t| t <= now)
    }

    pub(super) fn next(&self) -> Option<Instant> {
        self.0.iter().filter_map(|&t| t).min()
    }
}

/// The next deadline in nanoseconds since the balancer's epoch (`NONE`: none), readable
/// without a lock.
#[derive(Debug)]
pub(super) struct Deadline(AtomicU64);

impl Deadline {
    pub(super) const NONE: u64 = u64::MAX;

    pub(super) const fn new() -> Self {
        Self(AtomicU64::new(Self::NONE))
    }

    pub(super) fn load(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }

    /// Publishes a table's next deadline, already converted to ticks.
    pub(super) fn store(&self, ticks: Option<u64>) {
        self.0.store(
            ticks.map_or(Self::NONE, |t| t.min(Self::NONE - 1)),
            Ordering::Release,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn next_is_the_minimum_and_set_earlier_only_moves_earlier() {
        #[allow(clippy::disallowed_methods)]
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut t = TimerTable::default();
        assert_eq!(t.next(), None);
        t.set(Timer::Ejection, Some(t0 + s(10)));
        t.set_earlier(Timer::SlowStart, t0 + s(3));
        t.set_earlier(Timer::SlowStart, t0 + s(5));
        assert_eq!(t.get(Timer::SlowStart), Some(t0 + s(3)));
        assert_eq!(t.next(), Some(t0 + s(3)));
        assert!(!t.is_due(Timer::Rebuild, t0 + s(100)));
        t.set_earlier(Timer::Rebuild, t0);
        assert!(t.is_due(Timer::Rebuild, t0));
        assert_eq!(t.next(), Some(t0));
    }
}
