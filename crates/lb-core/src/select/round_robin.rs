//! Plain round robin: each eligible backend in turn, weights ignored.

use std::sync::atomic::{AtomicUsize, Ordering};

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

impl Select for RoundRobin {
    type Table = ();

    fn name(&self) -> &'static str {
        "round-robin"
    }

    fn build(&self, _: &[Candidate]) {}

    fn pick(&self, _: &(), candidates: &[Candidate], cx: &mut PickCx<'_>) -> Option<usize> {
        let n = candidates.len();
        if n == 0 {
            return None;
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
        let picks: Vec<_> = (0..6)
            .map(|_| rr.pick(&(), &c, &mut cx(&mut rng, &[], None)).unwrap())
            .collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
        let tried = [BackendId(0)];
        assert_eq!(rr.pick(&(), &c, &mut cx(&mut rng, &tried, None)), Some(1));
        let all = [BackendId(0), BackendId(1), BackendId(2)];
        assert_eq!(rr.pick(&(), &c, &mut cx(&mut rng, &all, None)), None);
        assert_eq!(rr.pick(&(), &[], &mut cx(&mut rng, &[], None)), None);
    }
}
