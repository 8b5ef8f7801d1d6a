//! Weighted least connections with an O(1) pick.
//!
//! # Why a lock-free tournament tree
//! NGINX scans every peer under a lock (O(N)); HAProxy keeps an ordered tree under a lock
//! (O(log N)). Here the candidates sit at the leaves of a complete binary tree whose inner
//! nodes each hold the better of their two children; the root is the least-loaded backend,
//! so a pick is one atomic load. When a backend's load changes, the thread that changed it
//! recomputes the path from that leaf to the root, each node with a compare-and-swap on a
//! (version, winner) word. A node whose CAS lost retries from fresh children, so after the
//! last update settles every node reflects its children again (the version makes an
//! unchanged winner still count as a change, ruling out ABA). Cost: O(log N) per load change,
//! O(1) per pick, no lock anywhere.
//!
//! Load is `in_flight + recent_errors + 1` over the effective weight, compared by
//! cross-multiplication (no division); ties go to the backend picked longest ago (a global
//! pick stamp), which makes equal backends take turns, as HAProxy's leastconn does. The
//! error weight fades with time (see [`Candidate::recent_errors`]), so a node compares its
//! children as of the last update that passed through it. A leaf whose penalty is still
//! fading is marked with the time the fade ends at the latest; while any mark is set, a
//! pick (one atomic load otherwise) refreshes the marked leaves' paths at most once per
//! [`FADE_REFRESH_NS`], so a stale inner node cannot hide a faded backend behind a sibling
//! whose load never changes (long-lived streams). The scan is O(N) but runs only while
//! some penalty fades, at most ten times a second. A backend the balancer took out since
//! the table was built (an ejection) counts as infinitely loaded and never wins the root
//! while another candidate is left.

use std::cmp::Ordering as CmpOrdering;
use std::sync::atomic::{AtomicU64, Ordering};

use super::{Candidate, PickCx, Select};
use crate::backend::ERROR_FADE_MS;

/// How often, at most, the paths of leaves whose error weight fades are recomputed.
const FADE_REFRESH_NS: u64 = 100_000_000;

/// Fewest in-flight requests per unit of weight; ties take turns.
#[derive(Debug, Default)]
pub struct LeastConnections {
    stamp: AtomicU64,
}

/// The tournament tree over one eligible set.
#[derive(Debug)]
pub struct LcTable {
    /// Leaves start at `size`; node 1 is the root; node value = version << 32 | (winner + 1).
    size: usize,
    nodes: Vec<AtomicU64>,
    /// When each candidate was last picked (a global counter), for fair ties.
    stamps: Vec<AtomicU64>,
    /// Per candidate: 0, or a time (ns) by which its error weight has faded to 0; its path
    /// needs refreshing until then.
    fading: Vec<AtomicU64>,
    /// When a pick should next refresh the fading leaves (`u64::MAX`: none fading).
    next_refresh: AtomicU64,
}

impl LcTable {
    fn winner(&self, k: usize, n: usize) -> Option<usize> {
        if k >= self.size {
            let i = k - self.size;
            return (i < n).then_some(i);
        }
        let v = self.nodes[k].load(Ordering::Acquire) as u32;
        v.checked_sub(1).map(|i| i as usize)
    }

    fn order(&self, c: &[Candidate], a: usize, b: usize, now_ns: u64) -> CmpOrdering {
        let load = |x: &Candidate| {
            if x.is_hidden() {
                f64::INFINITY
            } else {
                x.load(now_ns)
            }
        };
        let (la, lb) = (load(&c[a]), load(&c[b]));
        let (wa, wb) = (f64::from(c[a].weight()), f64::from(c[b].weight()));
        (la * wb)
            .total_cmp(&(lb * wa))
            .then_with(|| {
                let sa = self.stamps[a].load(Ordering::Relaxed);
                let sb = self.stamps[b].load(Ordering::Relaxed);
                sa.cmp(&sb)
            })
            .then(a.cmp(&b))
    }

    fn better(
        &self,
        c: &[Candidate],
        a: Option<usize>,
        b: Option<usize>,
        now_ns: u64,
    ) -> Option<usize> {
        match (a, b) {
            (Some(x), Some(y)) if x < c.len() && y < c.len() => {
                Some(if self.order(c, x, y, now_ns) == CmpOrdering::Greater {
                    y
                } else {
                    x
                })
            }
            (Some(x), _) if x < c.len() => Some(x),
            (_, Some(y)) if y < c.len() => Some(y),
            _ => None,
        }
    }

    fn compute(&self, c: &[Candidate], k: usize, now_ns: u64) -> u64 {
        let w = self.better(
            c,
            self.winner(2 * k, c.len()),
            self.winner(2 * k + 1, c.len()),
            now_ns,
        );
        w.map_or(0, |i| i as u64 + 1)
    }

    /// Recomputes every node from leaf `i` to the root, and marks the leaf for refreshing
    /// while its error weight fades.
    fn update(&self, c: &[Candidate], i: usize, now_ns: u64) {
        self.mark_if_fading(c, i, now_ns);
        self.update_path(i, c, now_ns);
    }

    /// Returns true if and only if leaf `i` still has an error weight, after marking it.
    fn mark_if_fading(&self, c: &[Candidate], i: usize, now_ns: u64) -> bool {
        if c[i].recent_errors(now_ns) <= 0.0 {
            return false;
        }
        let end = now_ns.saturating_add(ERROR_FADE_MS * 1_000_000);
        // Mark before scheduling: a refresh that takes the schedule then sees the mark.
        self.fading[i].fetch_max(end, Ordering::SeqCst);
        self.next_refresh
            .fetch_min(now_ns.saturating_add(FADE_REFRESH_NS), Ordering::SeqCst);
        true
    }

    /// If a refresh is due, takes it (one thread) and recomputes every marked leaf's path.
    fn refresh_fading(&self, c: &[Candidate], now_ns: u64) {
        let due = self.next_refresh.load(Ordering::SeqCst);
        if now_ns < due
            || self
                .next_refresh
                .compare_exchange(due, u64::MAX, Ordering::SeqCst, Ordering::SeqCst)
                .is_err()
        {
            return;
        }
        for (i, mark) in self.fading.iter().enumerate().take(c.len()) {
            let m = mark.load(Ordering::SeqCst);
            if m == 0 {
                continue;
            }
            // Still fading: `update` re-marks it and schedules the next refresh.
            if !self.mark_if_fading(c, i, now_ns)
                && mark
                    .compare_exchange(m, 0, Ordering::SeqCst, Ordering::SeqCst)
                    .is_ok()
            {
                // An error that landed since the check is visible now: keep it marked.
                self.mark_if_fading(c, i, now_ns);
            }
            self.update_path(i, c, now_ns);
        }
    }

    fn update_path(&self, i: usize, c: &[Candidate], now_ns: u64) {
        let mut k = (self.size + i) / 2;
        while k >= 1 {
            let node = &self.nodes[k];
            let mut old = node.load(Ordering::Acquire);
            loop {
                let new = ((old >> 32).wrapping_add(1) << 32) | self.compute(c, k, now_ns);
                match node.compare_exchange_weak(old, new, Ordering::AcqRel, Ordering::Acquire) {
                    Ok(_) => break,
                    Err(actual) => old = actual,
                }
            }
            k /= 2;
        }
    }
}

impl Select for LeastConnections {
    type Table = LcTable;

    fn name(&self) -> &'static str {
        "least-connections"
    }

    fn build(&self, candidates: &[Candidate]) -> LcTable {
        let size = candidates.len().next_power_of_two().max(2);
        let table = LcTable {
            size,
            nodes: (0..size).map(|_| AtomicU64::new(0)).collect(),
            stamps: (0..candidates.len()).map(|_| AtomicU64::new(0)).collect(),
            fading: (0..candidates.len()).map(|_| AtomicU64::new(0)).collect(),
            next_refresh: AtomicU64::new(u64::MAX),
        };
        for k in (1..size).rev() {
            // Built off the request path with no clock: errors count at full weight until
            // the balancer's first update (it refreshes every leaf once the table is live).
            table.nodes[k].store(table.compute(candidates, k, 0), Ordering::Relaxed);
        }
        table
    }

    fn pick(
        &self,
        table: &LcTable,
        candidates: &[Candidate],
        cx: &mut PickCx<'_>,
    ) -> Option<usize> {
        if table.fading.len() == candidates.len() {
            table.refresh_fading(candidates, cx.now_ns());
        }
        let chosen = match table.winner(1, candidates.len()) {
            Some(i) if !cx.is_excluded(&candidates[i]) => Some(i),
            // A retry (or an empty tree): the least loaded of those not yet tried.
            _ => (0..candidates.len())
                .filter(|&i| !cx.is_excluded(&candidates[i]))
                .reduce(|a, b| {
                    if table.order(candidates, a, b, cx.now_ns()) == CmpOrdering::Greater {
                        b
                    } else {
                        a
                    }
                }),
        }?;
        let stamp = self.stamp.fetch_add(1, Ordering::Relaxed) + 1;
        table.stamps[chosen].store(stamp, Ordering::Relaxed);
        Some(chosen)
    }

    fn load_changed(&self, table: &LcTable, candidates: &[Candidate], index: usize, now_ns: u64) {
        if index < candidates.len() && index < table.stamps.len() {
            table.update(candidates, index, now_ns);
        }
    }

    fn tracks_load(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::BackendId;
    use crate::select::test_util::{candidates, cx};
    use crate::Rng;

    fn start(s: &LeastConnections, t: &LcTable, c: &[Candidate], rng: &mut Rng) -> usize {
        let i = s.pick(t, c, &mut cx(rng, &[], None)).unwrap();
        c[i].state.in_flight.fetch_add(1, Ordering::Relaxed);
        s.load_changed(t, c, i, 0);
        i
    }

    #[test]
    fn equal_backends_take_turns_when_idle() {
        let s = LeastConnections::default();
        let c = candidates(&[1, 1, 1]);
        let t = s.build(&c);
        let mut rng = Rng::from_seed(0);
        let mut got = Vec::new();
        for _ in 0..6 {
            let i = start(&s, &t, &c, &mut rng);
            c[i].state.release();
            s.load_changed(&t, &c, i, 0);
            got.push(i);
        }
        assert_eq!(got, [0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn fills_the_least_loaded_respecting_weights() {
        let s = LeastConnections::default();
        let c = candidates(&[3, 1]);
        let t = s.build(&c);
        let mut rng = Rng::from_seed(0);
        let mut n = [0; 2];
        for _ in 0..8 {
            n[start(&s, &t, &c, &mut rng)] += 1;
        }
        assert_eq!(n, [6, 2], "held connections split 3:1");
        // One backend's requests finish: it is the least loaded now.
        for _ in 0..2 {
            c[1].state.release();
        }
        s.load_changed(&t, &c, 1, 0);
        assert_eq!(start(&s, &t, &c, &mut rng), 1);
    }

    #[test]
    fn errors_count_as_load_and_retries_skip_tried() {
        let s = LeastConnections::default();
        let c = candidates(&[1, 1]);
        let t = s.build(&c);
        for _ in 0..5 {
            c[0].state.add_error(1_000_000);
        }
        s.load_changed(&t, &c, 0, 1_000_000);
        let mut rng = Rng::from_seed(0);
        assert_eq!(s.pick(&t, &c, &mut cx(&mut rng, &[], None)), Some(1));
        let tried = [BackendId(1)];
        assert_eq!(s.pick(&t, &c, &mut cx(&mut rng, &tried, None)), Some(0));
        let both = [BackendId(0), BackendId(1)];
        assert_eq!(s.pick(&t, &c, &mut cx(&mut rng, &both, None)), None);
    }

    #[test]
    fn a_pick_refreshes_the_path_of_a_faded_penalty() {
        let s = LeastConnections::default();
        let c = candidates(&[1, 1, 1, 1]);
        let t = s.build(&c);
        let sec = 1_000_000_000;
        for _ in 0..5 {
            c[0].state.add_error(sec);
        }
        // 1 holds three long requests, 2 and 3 four each: nothing on 0 or 1 changes again.
        for (i, n) in [(1, 3), (2, 4), (3, 4)] {
            c[i].state.in_flight.store(n, Ordering::Relaxed);
        }
        for i in 0..4 {
            s.load_changed(&t, &c, i, sec);
        }
        let mut rng = Rng::from_seed(0);
        let mut at = |now_ns| s.pick(&t, &c, &mut PickCx::new(None, &mut rng, &[], now_ns));
        assert_eq!(at(sec), Some(1), "0's penalty counts while fresh");
        // Past the fade, 0 is the idlest, although the node over 0 and 1 saw no update.
        assert_eq!(at(7 * sec), Some(0));
    }

    #[test]
    fn root_matches_a_scan_after_concurrent_updates() {
        let s = LeastConnections::default();
        let c = candidates(&[1; 37]);
        let t = s.build(&c);
        std::thread::scope(|scope| {
            for th in 0..2u64 {
                let (s, t, c) = (&s, &t, &c);
                scope.spawn(move || {
                    let mut rng = Rng::from_seed(th);
                    for _ in 0..20_000 {
                        let i = rng.below(37) as usize;
                        if rng.below(2) == 0 {
                            c[i].state.in_flight.fetch_add(1, Ordering::Relaxed);
                        } else {
                            let _ = c[i].state.in_flight.fetch_update(
                                Ordering::Relaxed,
                                Ordering::Relaxed,
                                |n| n.checked_sub(1),
                            );
                        }
                        s.load_changed(t, c, i, 0);
                    }
                });
            }
        });
        let root = t.winner(1, c.len()).unwrap();
        let min = c.iter().map(|c| c.load(0)).fold(f64::INFINITY, f64::min);
        assert_eq!(
            c[root].load(0),
            min,
            "root is a least-loaded candidate once updates settle"
        );
    }
}
