//! Consistent hashing with Maglev (Eisenbud et al., "Maglev: A Fast and Reliable Software
//! Network Load Balancer", NSDI 2016, §3.4), weighted as Envoy's Maglev is.
//!
//! # Why Maglev and not a ring
//! A ring with virtual nodes needs a binary search per pick and hundreds of points per
//! backend to spread evenly. Maglev fills a prime-sized lookup table (here ≥ 100 entries per
//! backend) in which each backend walks its own permutation; a pick is `table[hash % M]`,
//! O(1), and each backend owns almost exactly its share of slots. When a backend joins or
//! leaves, about 1/N of the keys move (plus a small extra churn the paper measures): with
//! 100 equal backends (a 65,537-slot table), one leaving moves about 1.6 % of keys and one
//! joining about 1.5 % (the ideal is 1 %; the rest is that churn).
//!
//! # Why instances agree
//! Several balancers behind ECMP, anycast or DNS round robin must send a key to the same
//! backend without talking to each other, whatever order each was given its backends in
//! and whatever ids it assigned them. So the table is a function of the backends'
//! [identities](crate::Backend::identity) and weights only:
//! - each backend's permutation comes from the [stable hash](crate::stable_hash) of its
//!   identity, never its id, position or a per-process seed;
//! - where two permutations want one slot, the backend whose turn comes first wins, so the
//!   turns are taken in an order derived from the identities too (by stable hash, then by
//!   the identity itself), never in candidate order; slots then name candidate indices;
//! - a retry walks on from the key's slot through the table, and past that (every backend
//!   on the way excluded) through the backends in that same identity order.
//!
//! Requests without a key are placed at random. The embedder must give every instance the
//! same identity for the same backend (lb-proxy normalizes a URL to `scheme://host:port`).
//! Slow start does not apply: ramping a weight would move keys at every step, defeating the
//! point of the strategy.

use super::{scan_from, Candidate, PickCx, Select};
use crate::rng::{mix64, stable_hash};

/// Maglev consistent hashing on the request's hash key (random when it has none).
#[derive(Debug, Default, Clone, Copy)]
pub struct ConsistentHash;

/// The Maglev lookup table: slot → candidate index, and the candidates in identity order.
#[derive(Debug, Clone)]
pub struct MaglevTable {
    slots: Vec<u32>,
    /// Candidate indices sorted by (stable hash of the identity, identity): the order turns
    /// are taken in, and the order a fallback scans in.
    order: Vec<u32>,
    /// Candidate index → its position in `order`.
    rank: Vec<u32>,
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

/// Where a backend whose identity hashes to `h` starts its walk of an `m`-slot table, and
/// its step (never 0: `m` is prime, so the walk visits every slot).
fn permutation(h: u64, m: u64) -> (u64, u64) {
    (
        mix64(h ^ 0x6d61_676c_6576_3031) % m,
        mix64(h ^ 0x736b_6970_7069_6e67) % (m - 1) + 1,
    )
}

/// Candidate indices sorted by (stable hash of the identity, identity): a total order on
/// distinct identities that no list order, id or process changes.
fn identity_order(candidates: &[Candidate], hashes: &[u64]) -> Vec<u32> {
    let mut order: Vec<u32> = (0..candidates.len() as u32).collect();
    order.sort_by(|&a, &b| {
        let (a, b) = (a as usize, b as usize);
        (hashes[a], candidates[a].identity()).cmp(&(hashes[b], candidates[b].identity()))
    });
    order
}

impl MaglevTable {
    fn build(candidates: &[Candidate]) -> Self {
        let n = candidates.len();
        if n == 0 {
            return Self {
                slots: Vec::new(),
                order: Vec::new(),
                rank: Vec::new(),
            };
        }
        let m = table_size(n);
        let hashes: Vec<u64> = candidates
            .iter()
            .map(|c| stable_hash(c.identity().as_bytes()))
            .collect();
        let order = identity_order(candidates, &hashes);
        let mut rank = vec![0u32; n];
        for (r, &i) in order.iter().enumerate() {
            rank[i as usize] = r as u32;
        }
        let perm: Vec<(u64, u64)> = hashes.iter().map(|&h| permutation(h, m)).collect();
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
        // Members join their group in identity order, and groups go by weight: the turns
        // are the same whatever order the candidates came in.
        let mut groups: Vec<(u64, Vec<usize>)> = Vec::new();
        for i in order.iter().map(|&i| i as usize) {
            let w = weights[i];
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
        Self { slots, order, rank }
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
            // No key, nothing to agree on: at random (the scan order does not matter).
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
        // Past that, the backends in identity order from the key's own: the same on every
        // instance, whatever order the candidates are in.
        let from = table.rank[table.slots[start] as usize] as usize;
        (0..n)
            .map(|k| table.order[(from + k) % n] as usize)
            .find(|&i| !cx.is_excluded(&candidates[i]))
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
    use crate::{BackendId, Rng};

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

    /// The paper's round-scanning fill (turns in identity order): the reference.
    fn reference_fill(candidates: &[Candidate]) -> Vec<u32> {
        let n = candidates.len();
        let m = table_size(n);
        let hashes: Vec<u64> = candidates
            .iter()
            .map(|c| stable_hash(c.identity().as_bytes()))
            .collect();
        let order = identity_order(candidates, &hashes);
        let perm: Vec<(u64, u64)> = hashes.iter().map(|&h| permutation(h, m)).collect();
        let weights: Vec<u64> = candidates
            .iter()
            .map(|c| u64::from(c.configured_weight()))
            .collect();
        let max_w = weights.iter().copied().max().unwrap_or(1).max(1);
        let (mut next, mut credit) = (vec![0u64; n], vec![0u64; n]);
        let mut slots = vec![u32::MAX; m as usize];
        let mut filled = 0u64;
        'fill: loop {
            for i in order.iter().map(|&i| i as usize) {
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

    /// Candidates `name(i)` for `i` in `which`, in that order, with the given ids.
    fn named(which: &[usize], ids: &[u32], weight: impl Fn(usize) -> u32) -> Vec<Candidate> {
        which
            .iter()
            .zip(ids)
            .map(|(&i, &id)| {
                Candidate::detached_with_identity(
                    BackendId(id),
                    format!("as written {id}"),
                    format!("http://10.0.{}.{}:80", i / 256, i % 256),
                    weight(i),
                )
            })
            .collect()
    }

    /// Every key's backend (by identity) with nothing excluded, and with the key's first
    /// choice and then its second excluded (the retry path).
    fn placements(c: &[Candidate], keys: u64) -> Vec<[String; 3]> {
        let t = ConsistentHash.build(c);
        let mut rng = Rng::from_seed(7);
        (0..keys)
            .map(|k| {
                let key = mix64(k);
                let mut tried = Vec::new();
                [(); 3].map(|()| {
                    let i = ConsistentHash
                        .pick(&t, c, &mut cx(&mut rng, &tried, Some(key)))
                        .unwrap();
                    tried.push(c[i].id());
                    c[i].identity().to_owned()
                })
            })
            .collect()
    }

    /// Every permutation of `0..n`, by Heap's algorithm.
    fn permutations(n: usize) -> Vec<Vec<usize>> {
        fn heap(k: usize, a: &mut Vec<usize>, out: &mut Vec<Vec<usize>>) {
            if k <= 1 {
                out.push(a.clone());
                return;
            }
            for i in 0..k {
                heap(k - 1, a, out);
                let j = if k % 2 == 0 { i } else { 0 };
                a.swap(j, k - 1);
            }
        }
        let mut out = Vec::new();
        heap(n, &mut (0..n).collect(), &mut out);
        out
    }

    #[test]
    fn the_same_backends_in_any_order_with_any_ids_place_every_key_alike() {
        for weight in [|_: usize| 1, |i: usize| 1 + (i % 3) as u32] {
            let perms = permutations(5);
            assert_eq!(perms.len(), 120);
            let reference = placements(&named(&[0, 1, 2, 3, 4], &[0, 1, 2, 3, 4], weight), 2000);
            for (p, order) in perms.iter().enumerate() {
                // Ids as another process (or a reloaded one) might have assigned them.
                let ids: Vec<u32> = (0..5).map(|k| 1000 - 7 * ((k + p) % 5) as u32).collect();
                let c = named(order, &ids, weight);
                assert_eq!(placements(&c, 2000), reference, "order {order:?}");
                // The table itself, slot by slot, names the same backends.
                let names = |c: &[Candidate]| -> Vec<String> {
                    let t = ConsistentHash.build(c);
                    t.slots
                        .iter()
                        .map(|&s| c[s as usize].identity().to_owned())
                        .collect()
                };
                assert!(names(&c) == names(&named(&[0, 1, 2, 3, 4], &[0, 1, 2, 3, 4], weight)));
            }
        }
        // 100 backends, a few shuffles.
        let base: Vec<usize> = (0..100).collect();
        let ids: Vec<u32> = (0..100).collect();
        let reference = placements(&named(&base, &ids, |_| 1), 3000);
        let mut rng = Rng::from_seed(42);
        for _ in 0..5 {
            let mut order = base.clone();
            for i in (1..order.len()).rev() {
                order.swap(i, rng.below(i as u64 + 1) as usize);
            }
            let ids: Vec<u32> = order.iter().map(|&i| 500 + i as u32 * 3 % 100).collect();
            assert_eq!(placements(&named(&order, &ids, |_| 1), 3000), reference);
        }
    }

    /// The share of keys whose backend changes between two sets.
    fn moved(a: &[Candidate], b: &[Candidate], keys: u64) -> f64 {
        let (ta, tb) = (ConsistentHash.build(a), ConsistentHash.build(b));
        let n = (0..keys)
            .filter(|&k| {
                let key = mix64(k ^ 0x5eed);
                a[ta.lookup(key).unwrap()].identity() != b[tb.lookup(key).unwrap()].identity()
            })
            .count();
        n as f64 / keys as f64
    }

    #[test]
    fn one_of_a_hundred_leaving_or_joining_moves_about_one_hundredth() {
        let n = 100usize;
        let keys = 200_000;
        let all: Vec<usize> = (0..=n).collect();
        let ids: Vec<u32> = (0..=n as u32).collect();
        let hundred = named(&all[..n], &ids[..n], |_| 1);
        for gone in [0, 37, 99] {
            let rest: Vec<usize> = all[..n].iter().copied().filter(|&i| i != gone).collect();
            let f = moved(&hundred, &named(&rest, &ids, |_| 1), keys);
            println!(
                "one of {n} leaves (#{gone}): {:.3} % of keys move",
                f * 100.0
            );
            assert!(
                f > 0.5 / n as f64 && f <= 1.5 / n as f64 + 0.002,
                "leave moved {f}"
            );
        }
        let f = moved(&hundred, &named(&all, &ids, |_| 1), keys);
        println!("one joins {n}: {:.3} % of keys move", f * 100.0);
        let ideal = 1.0 / (n + 1) as f64;
        assert!(
            f > 0.5 * ideal && f <= 1.5 * ideal + 0.002,
            "join moved {f}"
        );
    }

    #[test]
    fn weights_set_the_shares_whatever_the_order() {
        let weights = |i: usize| [1, 2, 3, 4, 10][i % 5];
        for order in [vec![0, 1, 2, 3, 4], vec![4, 2, 0, 3, 1]] {
            let c = named(&order, &[9, 8, 7, 6, 5], weights);
            let t = ConsistentHash.build(&c);
            let total: u32 = order.iter().map(|&i| weights(i)).sum();
            for (k, &i) in order.iter().enumerate() {
                let share = t.slots.iter().filter(|&&s| s as usize == k).count() as f64
                    / t.slots.len() as f64;
                let want = f64::from(weights(i)) / f64::from(total);
                assert!(
                    (share - want).abs() < 0.01,
                    "weight {}: {share} vs {want}",
                    weights(i)
                );
            }
        }
    }
}
