//! A small, seedable pseudo-random generator.
//!
//! Why not `rand`? The core needs exactly three things: a seed it can be given (so a simulation
//! replays bit for bit), a cheap per-request generator (no shared state to contend on), and an
//! unbiased integer below `n`. SplitMix64 (Steele, Lea & Flood, "Fast splittable pseudorandom
//! number generators", OOPSLA 2014) does all three in a dozen lines and passes BigCrush.

use std::hash::{BuildHasher, Hasher};

/// SplitMix64 pseudo-random generator: deterministic for a given seed.
///
/// ```
/// use lb_core::Rng;
/// let mut a = Rng::from_seed(7);
/// let mut b = Rng::from_seed(7);
/// assert_eq!(a.next_u64(), b.next_u64());
/// assert!(a.below(10) < 10);
/// ```
#[derive(Debug, Clone)]
pub struct Rng {
    state: u64,
}

// === impl Rng ===

impl Rng {
    /// A generator that yields the same sequence for the same seed.
    #[must_use]
    pub const fn from_seed(seed: u64) -> Self {
        Self { state: seed }
    }

    /// A generator seeded from the process's random hash keys (no syscall of its own, no clock).
    #[must_use]
    pub fn from_entropy() -> Self {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(0x5eed);
        Self::from_seed(h.finish())
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix64(self.state)
    }

    /// A uniform integer in `0..n` (Lemire's multiply-shift; the bias is below 2^-32 for
    /// the `n` a load balancer sees). Returns 0 when `n` is 0.
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// A uniform float in `[0, 1)`.
    pub fn unit_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// The SplitMix64 finaliser: a bijective avalanche mix of 64 bits.
#[must_use]
pub(crate) const fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A stable 64-bit hash of bytes (FNV-1a, then mixed), identical on every platform and run.
///
/// Used where a hash must not change between processes: consistent hashing places backends by
/// the hash of their address, so two `lb` instances (or one before and after a restart) agree.
/// Callers may use it to turn a request key (client IP, header, cookie) into a hash key.
///
/// ```
/// assert_eq!(lb_core::stable_hash(b"10.0.0.1"), lb_core::stable_hash(b"10.0.0.1"));
/// assert_ne!(lb_core::stable_hash(b"a"), lb_core::stable_hash(b"b"));
/// ```
#[must_use]
pub fn stable_hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    mix64(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn below_stays_in_range_and_covers_it() {
        let mut rng = Rng::from_seed(1);
        let mut seen = [0u32; 7];
        for _ in 0..7000 {
            let v = rng.below(7);
            assert!(v < 7);
            seen[v as usize] += 1;
        }
        for (i, n) in seen.iter().enumerate() {
            assert!((800..1200).contains(n), "value {i} drawn {n} times of 7000");
        }
        assert_eq!(rng.below(0), 0);
    }

    #[test]
    fn unit_is_in_half_open_interval() {
        let mut rng = Rng::from_seed(3);
        for _ in 0..10_000 {
            let x = rng.unit_f64();
            assert!((0.0..1.0).contains(&x));
        }
    }

    #[test]
    fn seeds_differ() {
        assert_ne!(Rng::from_seed(1).next_u64(), Rng::from_seed(2).next_u64());
    }
}
