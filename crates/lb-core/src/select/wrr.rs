//! Smooth weighted round robin (NGINX's `ngx_http_upstream_get_peer`).
//!
//! # Why a precomputed sequence
//! NGINX's algorithm mutates every peer's `current_weight` on each pick, under a lock, in
//! O(N). Its output is periodic with period W = Σweights (after dividing by their gcd), so we
//! run it once per eligible-set change and store one period; a pick is then one atomic
//! increment and one table read, with no lock, and any W consecutive picks give backend *i*
//! exactly *wᵢ* picks — across threads too.
//!
//! Running NGINX's loop costs O(W·N). Where that exceeds 2²⁴ steps (thousands of backends
//! with mixed weights), the period is built instead by ordering every backend's picks at the
//! midpoints of equal slots, `(2k+1)/(2wᵢ)` for k < wᵢ (stride scheduling), in O(W log N):
//! the same exact counts per period and the same even spacing, though ties may order
//! differently than NGINX's. A period longer than 2²⁰ is scaled down first (weights kept
//! proportional, each at least 1), bounding the table at 4 MiB.

use std::cmp::Ordering as CmpOrdering;
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::{scan_from, Candidate, PickCx, Select};

const EXACT_WORK_LIMIT: u128 = 1 << 24;
const MAX_PERIOD: u64 = 1 << 20;

/// Smooth weighted round robin: weights 5, 1, 1 give `a a b a c a a`, over and over.
#[derive(Debug, Default)]
pub struct SmoothWrr {
    next: AtomicUsize,
}

/// One period of the smooth WRR sequence, as candidate indices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrrTable {
    seq: Vec<u32>,
}

impl WrrTable {
    /// The period, as candidate indices.
    #[must_use]
    pub fn sequence(&self) -> &[u32] {
        &self.seq
    }
}

/// One period of NGINX's smooth weighted round robin over `weights`, as indices.
///
/// ```
/// assert_eq!(lb_core::select::smooth_wrr_sequence(&[5, 1, 1]), [0, 0, 1, 0, 2, 0, 0]);
/// assert_eq!(lb_core::select::smooth_wrr_sequence(&[2, 2]), [0, 1]); // gcd-reduced
/// ```
#[must_use]
pub fn smooth_wrr_sequence(weights: &[u32]) -> Vec<u32> {
    let n = weights.len();
    if n == 0 {
        return Vec::new();
    }
    let g = weights
        .iter()
        .fold(0u64, |g, &w| gcd(g, u64::from(w.max(1))));
    let mut w: Vec<u64> = weights.iter().map(|&x| u64::from(x.max(1)) / g).collect();
    if w.iter().all(|&x| x == w[0]) {
        return (0..n as u32).collect();
    }
    let mut total: u64 = w.iter().sum();
    if total > MAX_PERIOD {
        for x in &mut w {
            *x = (*x * MAX_PERIOD / total).max(1);
        }
        total = w.iter().sum();
    }
    if u128::from(total) * n as u128 <= EXACT_WORK_LIMIT {
        nginx_period(&w, total)
    } else {
        stride_period(&w, total)
    }
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// NGINX's loop, verbatim in spirit: add each weight, take the first maximum, subtract the total.
fn nginx_period(w: &[u64], total: u64) -> Vec<u32> {
    let mut current = vec![0i64; w.len()];
    let mut seq = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for (i, c) in current.iter_mut().enumerate() {
            *c += w[i] as i64;
        }
        for i in 1..w.len() {
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total as i64;
        seq.push(best as u32);
    }
    seq
}

/// Picks at slot midpoints `(2k+1) / (2w)`, earliest first, lower index on ties.
fn stride_period(w: &[u64], total: u64) -> Vec<u32> {
    #[derive(PartialEq, Eq)]
    struct Next {
        num: u64, // 2k+1
        den: u64, // w
        idx: u32,
    }
    impl Ord for Next {
        fn cmp(&self, o: &Self) -> CmpOrdering {
            // Reversed: BinaryHeap is a max-heap and we want the earliest time first.
            let a = u128::from(self.num) * u128::from(o.den);
            let b = u128::from(o.num) * u128::from(self.den);
            b.cmp(&a).then_with(|| o.idx.cmp(&self.idx))
        }
    }
    impl PartialOrd for Next {
        fn partial_cmp(&self, o: &Self) -> Option<CmpOrdering> {
            Some(self.cmp(o))
        }
    }
    let mut heap: BinaryHeap<Next> = w
        .iter()
        .enumerate()
        .map(|(i, &d)| Next {
            num: 1,
            den: d,
            idx: i as u32,
        })
        .collect();
    let mut seq = Vec::with_capacity(total as usize);
    while let Some(mut top) = heap.pop() {
        seq.push(top.idx);
        top.num += 2;
        if top.num < 2 * top.den {
            heap.push(top);
        }
    }
    seq
}

/// The next entry of a precomputed period (`next` is the shared turn counter); a retry keeps
/// the weighted order: the next entries of the period that are not excluded.
pub(crate) fn pick_in_sequence(
    seq: &[u32],
    next: &AtomicUsize,
    candidates: &[Candidate],
    cx: &PickCx<'_>,
) -> Option<usize> {
    let len = seq.len();
    if len == 0 || candidates.is_empty() {
        return None;
    }
    let i = next.fetch_add(1, Ordering::Relaxed) % len;
    for k in 0..len.min(64) {
        let c = seq[(i + k) % len] as usize;
        if c < candidates.len() && !cx.is_excluded(&candidates[c]) {
            return Some(c);
        }
    }
    scan_from(candidates, seq[i] as usize % candidates.len(), cx)
}

impl Select for SmoothWrr {
    type Table = WrrTable;

    fn name(&self) -> &'static str {
        "weighted-round-robin"
    }

    fn build(&self, candidates: &[Candidate]) -> WrrTable {
        let weights: Vec<u32> = candidates.iter().map(Candidate::weight).collect();
        WrrTable {
            seq: smooth_wrr_sequence(&weights),
        }
    }

    fn pick(
        &self,
        table: &WrrTable,
        candidates: &[Candidate],
        cx: &mut PickCx<'_>,
    ) -> Option<usize> {
        pick_in_sequence(&table.seq, &self.next, candidates, cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::select::test_util::{candidates, cx};
    use crate::Rng;

    fn counts(seq: &[u32], n: usize) -> Vec<u64> {
        let mut c = vec![0; n];
        for &i in seq {
            c[i as usize] += 1;
        }
        c
    }

    #[test]
    fn nginx_example() {
        let s = SmoothWrr::default();
        let c = candidates(&[5, 1, 1]);
        let t = s.build(&c);
        let mut rng = Rng::from_seed(0);
        let got: String = (0..14)
            .map(|_| (b'a' + s.pick(&t, &c, &mut cx(&mut rng, &[], None)).unwrap() as u8) as char)
            .collect();
        assert_eq!(got, "aabacaaaabacaa");
    }

    #[test]
    fn large_sets_use_the_stride_period_with_exact_counts() {
        let weights: Vec<u32> = (0..5000).map(|i| 1 + (i % 7)).collect();
        let seq = smooth_wrr_sequence(&weights);
        let total: u64 = weights.iter().map(|&w| u64::from(w)).sum();
        assert_eq!(seq.len() as u64, total);
        let c = counts(&seq, weights.len());
        for (i, &w) in weights.iter().enumerate() {
            assert_eq!(c[i], u64::from(w));
        }
    }

    #[test]
    fn stride_period_spreads_picks() {
        let seq = stride_period(&[5, 1, 1], 7);
        assert_eq!(counts(&seq, 3), [5, 1, 1]);
        // Midpoints: a at .1 .3 .5 .7 .9, b and c at .5 — `a` never runs more than 3 in a row.
        assert_eq!(seq, [0, 0, 0, 1, 2, 0, 0]);
    }

    #[test]
    fn huge_periods_are_scaled_proportionally() {
        let seq = smooth_wrr_sequence(&[1_000_000, 999_999, 7]);
        assert!(seq.len() as u64 <= MAX_PERIOD + 3);
        let c = counts(&seq, 3);
        assert!(c[0].abs_diff(c[1]) <= 1 && c[2] >= 1, "{c:?}");
        let seq = smooth_wrr_sequence(
            &vec![10_000; 3]
                .into_iter()
                .chain([9_999])
                .collect::<Vec<_>>(),
        );
        assert_eq!(counts(&seq, 4), [10_000, 10_000, 10_000, 9_999]);
    }
}
