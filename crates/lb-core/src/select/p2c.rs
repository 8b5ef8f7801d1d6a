//! Power of two choices over peak-EWMA latency × load (Mitzenmacher, "The Power of Two Choices
//! in Randomized Load Balancing", 2001; Finagle's `P2CPeakEwma`, linkerd, tower's `p2c`).
//!
//! Two distinct candidates are drawn at random and the cheaper one wins, where cost =
//! latency estimate × (in-flight + recent errors + 1) / weight. A failure weighs twice,
//! and both weights fade within seconds: it counts as load (see
//! [`Candidate::recent_errors`]) and lifts the latency estimate to at least the configured
//! failure penalty, fading with it (see [`PickCx::latency_ns`]); the moving average itself
//! only ever sees real response times. Sampling two instead of
//! scanning all keeps the pick O(1) and avoids the herd that "always the global minimum"
//! causes when many pickers see the same stale minimum at once.

use super::{Candidate, PickCx, Select};

/// Power of two choices, cost = peak-EWMA latency × load / weight.
#[derive(Debug, Default, Clone, Copy)]
pub struct P2cEwma;

fn cost(c: &Candidate, cx: &PickCx<'_>) -> f64 {
    cx.latency_ns(c).max(1.0) * c.load(cx.now_ns()) / f64::from(c.weight().max(1))
}

impl Select for P2cEwma {
    type Table = ();

    fn name(&self) -> &'static str {
        "p2c-ewma"
    }

    fn build(&self, _: &[Candidate]) {}

    fn uses_latency(&self) -> bool {
        true
    }

    fn pick(&self, _: &(), candidates: &[Candidate], cx: &mut PickCx<'_>) -> Option<usize> {
        let n = candidates.len();
        match n {
            0 => return None,
            1 => return (!cx.is_excluded(&candidates[0])).then_some(0),
            _ => {}
        }
        // A few draws find two untried candidates unless nearly all were tried; then scan.
        for _ in 0..4 {
            let a = cx.rng().below(n as u64) as usize;
            let mut b = cx.rng().below(n as u64 - 1) as usize;
            if b >= a {
                b += 1;
            }
            let (ea, eb) = (
                cx.is_excluded(&candidates[a]),
                cx.is_excluded(&candidates[b]),
            );
            match (ea, eb) {
                (false, false) => {
                    return Some(if cost(&candidates[b], cx) < cost(&candidates[a], cx) {
                        b
                    } else {
                        a
                    });
                }
                (false, true) => return Some(a),
                (true, false) => return Some(b),
                (true, true) => {}
            }
        }
        (0..n)
            .filter(|&i| !cx.is_excluded(&candidates[i]))
            .min_by(|&a, &b| cost(&candidates[a], cx).total_cmp(&cost(&candidates[b], cx)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::BackendId;
    use crate::latency::LatencyParams;
    use crate::select::test_util::{candidates, cx};
    use crate::Rng;

    #[test]
    fn prefers_the_faster_backend() {
        let c = candidates(&[1, 1, 1]);
        let p = LatencyParams::DEFAULT;
        p.observe(&c[0].state, 50e6, 1);
        p.observe(&c[1].state, 1e6, 1);
        p.observe(&c[2].state, 1e6, 1);
        let mut rng = Rng::from_seed(9);
        let mut n = [0; 3];
        for _ in 0..3000 {
            n[P2cEwma.pick(&(), &c, &mut cx(&mut rng, &[], None)).unwrap()] += 1;
        }
        // The slow one only wins when drawn... never: it loses every pairing.
        assert_eq!(n[0], 0, "{n:?}");
        assert!(n[1] > 1200 && n[2] > 1200, "{n:?}");
    }

    #[test]
    fn skips_tried_and_handles_tiny_sets() {
        let c = candidates(&[1, 1, 1]);
        let mut rng = Rng::from_seed(1);
        let tried = [BackendId(0), BackendId(2)];
        for _ in 0..50 {
            assert_eq!(
                P2cEwma.pick(&(), &c, &mut cx(&mut rng, &tried, None)),
                Some(1)
            );
        }
        let one = candidates(&[1]);
        assert_eq!(
            P2cEwma.pick(&(), &one, &mut cx(&mut rng, &[], None)),
            Some(0)
        );
        assert_eq!(
            P2cEwma.pick(&(), &one, &mut cx(&mut rng, &[BackendId(0)], None)),
            None
        );
    }
}
