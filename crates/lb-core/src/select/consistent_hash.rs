//! Consistent hashing with Maglev (Eisenbud et al., "Maglev: A Fast and Reliable Software
//! Network Load Balancer", NSDI 2016, §3.4), weighted as Envoy's Maglev is.
//!
//! # Why Maglev and not a ring
//! A ring with virtual nodes needs a binary search per pick and hundreds of points per
//! backend to spread evenly. Maglev fills a prime-sized lookup table (here ≥ 100 entries per
//! backend) in which each backend walks its own permutation; a pick is `table[hash % M]`,
//! O(1), and each backend owns almost exactly its share of slots. When a backend joins or
//! leaves, about 1/N of the keys move (plus a small extra churn the paper measures).
//!
//! Backends are placed by the stable hash of their address, not their id, so any two
//! balancers with the same set agree on where a key goes. Slow start does not apply: ramping
//! a weight would move keys at every step, defeating the point of the strategy.

use super::{scan_from, Candidate, PickCx, Select};
use crate::rng::{mix64, stable_hash};

/// Maglev consistent hashing on the request's hash key (random when it has none).
#[derive(Debug, Default, Clone, Copy)]
pub struct ConsistentHash;

/// The Maglev lookup table: slot → candidate index.
#[derive(Debug, Clone)]
pub struct MaglevTable {
    slots: Vec<u32>,
}

const MAX_TABLE: u64 = 1 << 23;

fn is_prime(n: u64) -> bool {
    n >= 2 && (2..).take_while(|d| d * d <= n).all(|d| n % d != 0)
}

/// The table size for `n` backends: the first prime after 65,536 × 10ᵏ that leaves at
/// least 100 slots per backend. The size must not follow `n` closely: a key's slot is
/// `hash % M`, so a new `M` would move nearly every key. It changes only when the pool grows
/// past 655, 6,553, ... backends.
fn table_size(n: usize) -> u64 {
    let mut m = 65_536u64;
    while m < n as u64 * 100 && m * 10 <= MAX_TABLE {
        m *= 10;
    }
    while !is_prime(m) {
        m += 1;
    }
    m
}

impl MaglevTable {
    fn build(candidates: &[Candidate]) -> Self {
        let n = candidates.len();
        if n == 0 {
            return Self { slots: Vec::new() };
        }
        let m = table_size(n);
        let perm: Vec<(u64, u64)> = candidates
            .iter()
            .map(|c| {
                let h = stable_hash(c.addr().as_bytes());
                (
                    mix64(h ^ 0x6d61_676c_6576_3031) % m,
                    mix64(h ^ 0x736b_6970_7069_6e67) % (m - 1) + 1,
                )
            })
            .collect();
        let weights: Vec<u64> = candidates
            .iter()
            .map(|c| u64::from(c.configured_weight().max(1)))
            .collect();
        let max_w = weights.iter().copied().max().unwrap_or(1);
        // Where each backend's permutation is: `(offset + j·skip) mod m`, stepped by one
        // addition instead of a multiplication and a division per probe.
        let mut pos: Vec<u64> = perm.iter().map(|&(offset, _)| offset).collect();
        let mut slots = vec![u32::MAX; m as usize];
        let mut filled = 0u64;
        // One turn: backend i takes the next free slot of its permutation.
        let mut turn = |i: usize| {
            let skip = perm[i].1;
            loop {
                let slot = pos[i] as usize;
                pos[i] += skip;
                if pos[i] >= m {
                    pos[i] -= m;
                }
                if slots[slot] == u32::MAX {
                    slots[slot] = i as u32;
                    filled += 1;
                    return filled == m;
                }
            }
        };
        // A backend of weight w takes a turn in w of every max_w rounds (Envoy's weighted
        // Maglev): in round r iff ⌊r·w / max_w⌋ > ⌊(r−1)·w / max_w⌋. Scanning every backend
        // each round costs O(n) per round, and with mixed weights most of them skip most
        // rounds; backends of one weight take their turns in the same rounds, so a round
        // visits each distinct weight once and only the backends whose turn it is: O(turns +
        // rounds × distinct weights). With equal weights this is the paper's loop.
        let mut groups: Vec<(u64, Vec<usize>)> = Vec::new();
        for (i, &w) in weights.iter().enumerate() {
            match groups.iter_mut().find(|g| g.0 == w) {
                Some(g) => g.1.push(i),
                None => groups.push((w, vec![i])),
            }
        }
        groups.sort_by_key(|g| std::cmp::Reverse(g.0));
        'fill: for r in 1u64.. {
            for (w, members) in &groups {
                if r * w / max_w == (r - 1) * w / max_w {
                    continue;
                }
                for &i in members {
                    if turn(i) {
                        break 'fill;
                    }
                }
            }
        }
        Self { slots }
    }

    /// The candidate index a key maps to when nothing is excluded.
    #[must_use]
    pub fn lookup(&self, key: u64) -> Option<usize> {
        if self.slots.is_empty() {
            return None;
        }
        Some(self.slots[(mix64(key) % self.slots.len() as u64) as usize] as usize)
    }
}

impl Select for ConsistentHash {
    type Table = MaglevTable;

    fn name(&self) -> &'static str {
        "consistent-hash"
    }

    fn build(&self, candidates: &[Candidate]) -> MaglevTable {
        MaglevTable::build(candidates)
    }

    fn pick(
        &self,
        table: &MaglevTable,
        candidates: &[Candidate],
        cx: &mut PickCx<'_>,
    ) -> Option<usize> {
        let n = candidates.len();
        if n == 0 || table.slots.is_empty() {
            return None;
        }
        let Some(key) = cx.key() else {
            let i = cx.rng().below(n as u64) as usize;
            return scan_from(candidates, i, cx);
        };
        let m = table.slots.len();
        let start = (mix64(key) % m as u64) as usize;
        // A retry walks on from the key's slot, so one key's fallback is stable too.
        for k in 0..m.min(4096) {
            let i = table.slots[(start + k) % m] as usize;
            if i < n && !cx.is_excluded(&candidates[i]) {
                return Some(i);
            }
        }
        scan_from(candidates, table.slots[start] as usize, cx)
    }

    /// Ramping a weight would rebuild the table and move keys at every step (SPEC: slow
    /// start applies to every strategy but consistent-hash).
    fn slow_start(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::select::test_util::{candidates, cx};
    use crate::Rng;

    #[test]
    fn table_sizes_are_prime() {
        for n in [1, 3, 10, 11, 100, 1000, 10_000] {
            let m = table_size(n);
            assert!(is_prime(m) && m >= 100 * n as u64, "{n} -> {m}");
        }
        assert_eq!(
            table_size(3),
            table_size(600),
            "membership changes keep the table size"
        );
    }

    #[test]
    fn shares_follow_weights_and_keys_stick() {
        let c = candidates(&[1, 1, 2]);
        let t = ConsistentHash.build(&c);
        let mut share = [0usize; 3];
        for &s in &t.slots {
            share[s as usize] += 1;
        }
        let m = t.slots.len() as f64;
        assert!((share[2] as f64 / m - 0.5).abs() < 0.02, "{share:?}");
        let mut rng = Rng::from_seed(0);
        for key in 0..100u64 {
            let a = ConsistentHash.pick(&t, &c, &mut cx(&mut rng, &[], Some(key)));
            let b = ConsistentHash.pick(&t, &c, &mut cx(&mut rng, &[], Some(key)));
            assert_eq!(a, b);
            assert_eq!(a, t.lookup(key));
        }
    }

    /// The round-scanning fill this module used before the heap: the reference.
    fn reference_fill(candidates: &[Candidate]) -> Vec<u32> {
        let n = candidates.len();
        let m = table_size(n);
        let perm: Vec<(u64, u64)> = candidates
            .iter()
            .map(|c| {
                let h = stable_hash(c.addr().as_bytes());
                (
                    mix64(h ^ 0x6d61_676c_6576_3031) % m,
                    mix64(h ^ 0x736b_6970_7069_6e67) % (m - 1) + 1,
                )
            })
            .collect();
        let weights: Vec<u64> = candidates
            .iter()
            .map(|c| u64::from(c.configured_weight()))
            .collect();
        let max_w = weights.iter().copied().max().unwrap_or(1).max(1);
        let (mut next, mut credit) = (vec![0u64; n], vec![0u64; n]);
        let mut slots = vec![u32::MAX; m as usize];
        let mut filled = 0u64;
        'fill: loop {
            for i in 0..n {
                credit[i] += weights[i];
                if credit[i] < max_w {
                    continue;
                }
                credit[i] -= max_w;
                let (offset, skip) = perm[i];
                loop {
                    let slot = ((offset + next[i] * skip) % m) as usize;
                    next[i] += 1;
                    if slots[slot] == u32::MAX {
                        slots[slot] = i as u32;
                        filled += 1;
                        break;
                    }
                }
                if filled == m {
                    break 'fill;
                }
            }
        }
        slots
    }

    #[test]
    fn fill_matches_the_round_scan_for_equal_weights_and_shares_for_mixed() {
        for weights in [vec![1, 1, 1], vec![3; 50]] {
            let c = candidates(&weights);
            assert_eq!(
                MaglevTable::build(&c).slots,
                reference_fill(&c),
                "{weights:?}"
            );
        }
        for weights in [vec![1, 2, 3, 4], vec![7, 1, 100, 3, 3], vec![10_000, 1, 1]] {
            let c = candidates(&weights);
            let (ours, reference) = (MaglevTable::build(&c).slots, reference_fill(&c));
            let share = |slots: &[u32]| {
                let mut n = vec![0u64; weights.len()];
                for &s in slots {
                    n[s as usize] += 1;
                }
                n
            };
            // Same turns per round, taken by weight group rather than by index: the same
            // shares to within a few slots, every slot filled.
            let (a, b) = (share(&ours), share(&reference));
            for i in 0..weights.len() {
                assert!(
                    a[i].abs_diff(b[i]) <= weights.len() as u64,
                    "{weights:?}: {a:?} vs {b:?}"
                );
            }
            assert!(ours.iter().all(|&s| (s as usize) < weights.len()));
        }
    }

    #[test]
    fn removal_moves_about_one_nth() {
        let full = candidates(&[1; 10]);
        let t10 = ConsistentHash.build(&full);
        let rest: Vec<_> = full.iter().filter(|c| c.id().0 != 4).cloned().collect();
        let t9 = ConsistentHash.build(&rest);
        let keys = 20_000u64;
        let moved = (0..keys)
            .filter(|&k| {
                let before = full[t10.lookup(k).unwrap()].id();
                let after = rest[t9.lookup(k).unwrap()].id();
                before != after
            })
            .count();
        let frac = moved as f64 / keys as f64;
        assert!(frac < 0.1 + 0.03, "moved {frac}");
    }
}
