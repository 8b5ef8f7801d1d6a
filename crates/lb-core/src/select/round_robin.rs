//! Plain round robin: each eligible backend in turn, configured weights ignored.
//!
//! Slow start still applies (SPEC: to every strategy but consistent-hash): while some
//! backend ramps, the turns follow the smooth weighted round robin of the slow-start
//! percentages (a backend at 10 % beside one at 100 % gets 1 turn in 11), and once every
//! ramp is over the table goes and the turns are plain again.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::wrr::{pick_in_sequence, smooth_wrr_sequence};
use super::{scan_from, Candidate, PickCx, Select};

/// Round robin over the eligible backends. With a fixed eligible set of N, any K·N
/// consecutive picks give each backend exactly K (one shared counter, so this holds across
/// threads too: the counter, not the thread, decides).
///
/// ```
/// use lb_core::{Backend, Balancer, Config, RequestInfo, Weight, Action, select::RoundRobin};
/// # let now = std::time::Instant::now();
/// let lb = Balancer::new(Config::default(), RoundRobin::default()).unwrap();
/// let ids = lb.set_backends([Backend::new("a:1", Weight::ONE), Backend::new("b:1", Weight::ONE)], now).unwrap();
/// let mut got = Vec::new();
/// for _ in 0..4 {
///     let (state, action) = lb.start(RequestInfo::new(true, true), now);
///     if let Action::Forward { backend, .. } = action { got.push(backend) }
///     lb.abandon(state, now);
/// }
/// assert_eq!(got, [ids[0], ids[1], ids[0], ids[1]]);
/// ```
#[derive(Debug, Default)]
pub struct RoundRobin {
    next: AtomicUsize,
}

/// Round robin's table: the turns while some backend ramps up (slow start), else none.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RrTable {
    ramp: Option<Vec<u32>>,
}

impl Select for RoundRobin {
    type Table = RrTable;

    fn name(&self) -> &'static str {
        "round-robin"
    }

    fn build(&self, candidates: &[Candidate]) -> RrTable {
        let percent: Vec<u32> = candidates
            .iter()
            .map(Candidate::slow_start_percent)
            .collect();
        let ramping = percent.windows(2).any(|w| w[0] != w[1]);
        RrTable {
            ramp: ramping.then(|| smooth_wrr_sequence(&percent)),
        }
    }

    fn pick(
        &self,
        table: &RrTable,
        candidates: &[Candidate],
        cx: &mut PickCx<'_>,
    ) -> Option<usize> {
        let n = candidates.len();
        if n == 0 {
            return None;
        }
        if let Some(seq) = &table.ramp {
            return pick_in_sequence(seq, &self.next, candidates, cx);
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % n;
        if !cx.is_excluded(&candidates[i]) {
            return Some(i);
        }
        scan_from(candidates, i + 1, cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::BackendId;
    use crate::select::test_util::{candidates, cx};
    use crate::Rng;

    #[test]
    fn exact_turns_and_skips_tried() {
        let rr = RoundRobin::default();
        let c = candidates(&[1, 5, 1]);
        let mut rng = Rng::from_seed(0);
        let t = rr.build(&c);
        assert_eq!(t, RrTable::default(), "no ramp, no table");
        let picks: Vec<_> = (0..6)
            .map(|_| rr.pick(&t, &c, &mut cx(&mut rng, &[], None)).unwrap())
            .collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
        let tried = [BackendId(0)];
        assert_eq!(rr.pick(&t, &c, &mut cx(&mut rng, &tried, None)), Some(1));
        let all = [BackendId(0), BackendId(1), BackendId(2)];
        assert_eq!(rr.pick(&t, &c, &mut cx(&mut rng, &all, None)), None);
        assert_eq!(rr.pick(&t, &[], &mut cx(&mut rng, &[], None)), None);
    }

    #[test]
    fn a_ramping_backend_gets_its_slow_start_share() {
        let rr = RoundRobin::default();
        let mut c = candidates(&[3, 1]);
        // b0 at 10 % of its weight 3, b1 at 100 % of 1: weights are ignored, the ramp is not.
        c[0].weight = 30;
        c[1].weight = 100;
        let t = rr.build(&c);
        let mut rng = Rng::from_seed(0);
        let mut n = [0; 2];
        for _ in 0..110 {
            n[rr.pick(&t, &c, &mut cx(&mut rng, &[], None)).unwrap()] += 1;
        }
        assert_eq!(n, [10, 100]);
    }
}
