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
//! The window is ten one-second buckets. Counting a request is one atomic add on the hot
//! path, into one of several cache-line-padded stripes chosen per thread, so request threads
//! never write the same line; a withdrawal (a retry: the rare path) sums the window under a
//! short lock so that concurrent retries cannot both take the last token.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

const WINDOW_SECS: u64 = 10;
const STRIPES: usize = 8;

#[derive(Debug, Default)]
#[repr(align(64))]
struct Stripe(AtomicU64);

#[derive(Debug, Default)]
struct Bucket {
    sec: AtomicU64,
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
    buckets: [Bucket; WINDOW_SECS as usize],
    lock: Mutex<()>,
}

impl Budget {
    pub(crate) fn new(percent: u32, min_per_second: u32) -> Self {
        Self {
            percent: u64::from(percent),
            floor: u64::from(min_per_second) * WINDOW_SECS,
            buckets: Default::default(),
            lock: Mutex::new(()),
        }
    }

    fn bucket(&self, sec: u64) -> &Bucket {
        let b = &self.buckets[(sec % WINDOW_SECS) as usize];
        if b.sec.load(Ordering::Acquire) != sec {
            let _g = self
                .lock
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if b.sec.load(Ordering::Acquire) != sec {
                for s in &b.requests {
                    s.0.store(0, Ordering::Relaxed);
                }
                b.retries.store(0, Ordering::Relaxed);
                b.sec.store(sec, Ordering::Release);
            }
        }
        b
    }

    /// Counts one client request in second `sec`.
    pub(crate) fn deposit(&self, sec: u64) {
        self.bucket(sec).requests[stripe()]
            .0
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Takes one retry in second `sec` if the window allows it; returns whether it did.
    pub(crate) fn withdraw(&self, sec: u64) -> bool {
        let current = self.bucket(sec);
        let _g = self
            .lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (mut requests, mut retries) = (0u64, 0u64);
        for b in &self.buckets {
            let s = b.sec.load(Ordering::Acquire);
            if s <= sec && sec - s < WINDOW_SECS {
                requests += b.requests();
                retries += b.retries.load(Ordering::Relaxed);
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

    #[test]
    fn floor_then_percent_then_window_slides() {
        let b = Budget::new(20, 1); // floor: 10 retries per 10 s
        for _ in 0..10 {
            assert!(b.withdraw(0));
        }
        assert!(!b.withdraw(0), "floor used up, no requests yet");
        for _ in 0..50 {
            b.deposit(1);
        }
        // 20% of 50 = 10 more.
        for _ in 0..10 {
            assert!(b.withdraw(1));
        }
        assert!(!b.withdraw(1));
        // Second 10: second 0's retries have left the window, its requests too.
        assert!(b.withdraw(10));
        // Second 11: second 1 left the window as well; only the floor and second 10's one retry.
        for _ in 0..9 {
            assert!(b.withdraw(11));
        }
        assert!(!b.withdraw(11));
    }

    #[test]
    fn zero_budget_means_no_retries() {
        let b = Budget::new(0, 0);
        b.deposit(0);
        assert!(!b.withdraw(0));
    }
}
