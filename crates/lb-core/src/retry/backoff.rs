//! Exponential backoff with full jitter (AWS Architecture Blog, "Exponential Backoff And
//! Jitter", 2015): the n-th retry waits a uniform time in `[0, min(base·2ⁿ⁻¹, 10·base)]`.
//!
//! Full jitter spreads the retries of many clients that failed together, so a backend that
//! hiccupped is not hit by a synchronized wave. Returned as a `Duration` (not a timer): the
//! caller turns it into `not_before`.

use std::time::Duration;

use crate::rng::Rng;

/// The wait before retry number `retry` (1 for the first retry). Zero base: no wait.
///
/// ```
/// use std::time::Duration;
/// let mut rng = lb_core::Rng::from_seed(1);
/// let d = lb_core::backoff(Duration::from_millis(10), 3, &mut rng);
/// assert!(d <= Duration::from_millis(40));
/// ```
#[must_use]
pub fn backoff(base: Duration, retry: u32, rng: &mut Rng) -> Duration {
    let base_ns = u64::try_from(base.as_nanos()).unwrap_or(u64::MAX);
    if base_ns == 0 {
        return Duration::ZERO;
    }
    let exp = base_ns.saturating_mul(1u64 << retry.saturating_sub(1).min(32));
    let cap = exp.min(base_ns.saturating_mul(10));
    Duration::from_nanos(rng.below(cap.saturating_add(1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_by_exponential_then_ten_times_base() {
        let base = Duration::from_millis(10);
        let mut rng = Rng::from_seed(2);
        for retry in 1..20 {
            let cap = (base * 2u32.pow(retry.min(20) - 1)).min(base * 10);
            let mut max = Duration::ZERO;
            for _ in 0..2000 {
                let d = backoff(base, retry, &mut rng);
                assert!(d <= cap, "retry {retry}: {d:?} > {cap:?}");
                max = max.max(d);
            }
            assert!(max > cap / 2, "jitter covers the range: {max:?} of {cap:?}");
        }
        assert_eq!(backoff(Duration::ZERO, 3, &mut rng), Duration::ZERO);
    }
}
