//! The retry budget: retries over the last 10 s may be at most `percent` % of the client
//! requests in that window, plus `min_per_second × 10`.
//!
//! # Why budgets and not only max attempts
//! `attempts = 3` alone lets a fleet-wide failure triple the load on the backends that are
//! left, exactly when they can least take it (a retry storm). A budget caps the *extra* load
//! retries add, whatever happens, while the floor keeps retries available when traffic is
//! light (tower's `TpsBudget`, Finagle's `RetryBudget`). Unlike tower's, this one reads no
//! clock: every call carries the second it happens in.
//!
//! The window is a ring of 100 ms buckets. Counting a request is one atomic add on the hot
//! path, into one of several cache-line-padded stripes chosen per thread, so request threads
//! never write the same line; a withdrawal (a retry: the rare path) sums the window under a
//! short lock so that concurrent retries cannot both take the last token.
//!
//! # What it guarantees
//! Buckets make the window's edge coarse, and the edge is rounded against retries: a
//! retry at `t` is taken only if the retries of every bucket that overlaps `[t − 10 s, t]`
//! (the 101 latest), this one included, are at most `percent` % of the requests of the
//! buckets wholly inside `(t − 10 s, t]` (the 100 latest) plus the floor. So for every
//! retry at `t`, the retries in `[t − 10 s, t]` stay within the budget of the requests in
//! `(t − 10 s, t]`, and no 10 s window, wherever it starts, holds more retries than the
//! budget its last retry saw (STYLE invariant 7); the price is a window up to 100 ms short
//! on the requests' side. Time only moves forward here: a `now` earlier than one already
//! seen counts as the latest one, so a late caller neither escapes the window nor wipes a
//! newer bucket.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

/// Width of one bucket.
const TICK_NS: u64 = 100_000_000;
/// The window, in buckets: 10 s.
const WINDOW_TICKS: u64 = 100;
/// One bucket more than the window, the one the window's far edge falls in.
const SLOTS: u64 = WINDOW_TICKS + 1;
const WINDOW_SECS: u64 = WINDOW_TICKS * TICK_NS / 1_000_000_000;
const STRIPES: usize = 8;

#[derive(Debug, Default)]
#[repr(align(64))]
struct Stripe(AtomicU64);

#[derive(Debug, Default)]
struct Bucket {
    tick: AtomicU64,
    retries: AtomicU64,
    requests: [Stripe; STRIPES],
}

impl Bucket {
    fn requests(&self) -> u64 {
        self.requests
            .iter()
            .map(|s| s.0.load(Ordering::Relaxed))
            .sum()
    }
}

/// This thread's stripe: threads take stripes in turn as they first count a request.
fn stripe() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static STRIPE: usize = NEXT.fetch_add(1, Ordering::Relaxed) % STRIPES;
    }
    STRIPE.with(|s| *s)
}

/// A sliding-window retry budget.
#[derive(Debug)]
pub(crate) struct Budget {
    percent: u64,
    floor: u64,
    buckets: Box<[Bucket]>,
    /// The latest tick seen: the window never moves back.
    latest: AtomicU64,
    lock: Mutex<()>,
}

impl Budget {
    pub(crate) fn new(percent: u32, min_per_second: u32) -> Self {
        Self {
            percent: u64::from(percent),
            floor: u64::from(min_per_second) * WINDOW_SECS,
            buckets: (0..SLOTS).map(|_| Bucket::default()).collect(),
            latest: AtomicU64::new(0),
            lock: Mutex::new(()),
        }
    }

    /// The tick of `now_ns`, or the latest one seen if that is later.
    fn tick(&self, now_ns: u64) -> u64 {
        let t = now_ns / TICK_NS;
        // A plain load on the hot path: the word is written once per tick at most.
        let latest = self.latest.load(Ordering::Relaxed);
        if t <= latest {
            return latest;
        }
        t.max(self.latest.fetch_max(t, Ordering::Relaxed))
    }

    fn bucket(&self, tick: u64) -> &Bucket {
        let b = &self.buckets[(tick % SLOTS) as usize];
        // Only an older tick's bucket is recycled (a newer one means this caller raced a
        // clock more than 10 s ahead; it then counts in the newer bucket).
        if b.tick.load(Ordering::Acquire) < tick {
            let _g = self
                .lock
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if b.tick.load(Ordering::Acquire) < tick {
                for s in &b.requests {
                    s.0.store(0, Ordering::Relaxed);
                }
                b.retries.store(0, Ordering::Relaxed);
                b.tick.store(tick, Ordering::Release);
            }
        }
        b
    }

    /// Counts one client request at `now_ns`.
    pub(crate) fn deposit(&self, now_ns: u64) {
        self.bucket(self.tick(now_ns)).requests[stripe()]
            .0
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Takes one retry at `now_ns` if the window allows it; returns whether it did.
    pub(crate) fn withdraw(&self, now_ns: u64) -> bool {
        let tick = self.tick(now_ns);
        let current = self.bucket(tick);
        let _g = self
            .lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (mut requests, mut retries) = (0u64, 0u64);
        for b in self.buckets.iter() {
            let age = tick.checked_sub(b.tick.load(Ordering::Acquire));
            // Retries: every bucket that overlaps the window; requests: those inside it.
            if age.is_some_and(|a| a <= WINDOW_TICKS) {
                retries += b.retries.load(Ordering::Relaxed);
            }
            if age.is_some_and(|a| a < WINDOW_TICKS) {
                requests += b.requests();
            }
        }
        // retries + 1 <= percent% of requests + floor, in integers.
        if (retries + 1) * 100 <= self.percent * requests + self.floor * 100 {
            current.retries.fetch_add(1, Ordering::Relaxed);
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;
    const SEC: u64 = 1_000 * MS;

    #[test]
    fn floor_then_percent_then_window_slides() {
        let b = Budget::new(20, 1); // floor: 10 retries per 10 s
        for _ in 0..10 {
            assert!(b.withdraw(0));
        }
        assert!(!b.withdraw(0), "floor used up, no requests yet");
        for _ in 0..50 {
            b.deposit(SEC);
        }
        // 20% of 50 = 10 more.
        for _ in 0..10 {
            assert!(b.withdraw(SEC));
        }
        assert!(!b.withdraw(SEC));
        // 10 s after the first retries they are still inside `[t - 10 s, t]`...
        assert!(!b.withdraw(10 * SEC));
        // ... and 100 ms later they have left it, with nothing else.
        assert!(b.withdraw(10 * SEC + 100 * MS));
        // 11.1 s: the requests of 1 s and their retries have left as well; only the floor
        // and the retry of 10.1 s.
        for _ in 0..9 {
            assert!(b.withdraw(11 * SEC + 100 * MS));
        }
        assert!(!b.withdraw(11 * SEC + 100 * MS));
    }

    #[test]
    fn an_earlier_now_counts_as_the_latest() {
        let b = Budget::new(0, 1);
        for _ in 0..10 {
            assert!(b.withdraw(15 * SEC));
        }
        assert!(!b.withdraw(15 * SEC - 10 * MS), "still the same window");
        b.deposit(5 * SEC);
        assert!(!b.withdraw(15 * SEC), "an old instant reset nothing");
        assert!(b.withdraw(25 * SEC + 100 * MS));
    }

    #[test]
    fn zero_budget_means_no_retries() {
        let b = Budget::new(0, 0);
        b.deposit(0);
        assert!(!b.withdraw(0));
    }
}
