//! Random choice: uniform when weights are equal, proportional to weight otherwise.

use super::{scan_from, Candidate, PickCx, Select};

/// Random choice (weighted like NGINX's `random` when weights differ).
#[derive(Debug, Default, Clone, Copy)]
pub struct Random;

/// Cumulative weights when they differ (`None`: all equal, a uniform draw suffices).
#[derive(Debug, Clone)]
pub struct RandomTable {
    cumulative: Option<Vec<u64>>,
}

impl Select for Random {
    type Table = RandomTable;

    fn name(&self) -> &'static str {
        "random"
    }

    fn build(&self, candidates: &[Candidate]) -> RandomTable {
        let equal = candidates
            .windows(2)
            .all(|w| w[0].weight() == w[1].weight());
        let cumulative = (!equal).then(|| {
            candidates
                .iter()
                .scan(0u64, |sum, c| {
                    *sum += u64::from(c.weight().max(1));
                    Some(*sum)
                })
                .collect()
        });
        RandomTable { cumulative }
    }

    fn pick(
        &self,
        table: &RandomTable,
        candidates: &[Candidate],
        cx: &mut PickCx<'_>,
    ) -> Option<usize> {
        let n = candidates.len();
        if n == 0 {
            return None;
        }
        let i = match &table.cumulative {
            Some(cum) if cum.len() == n => {
                let total = cum[n - 1];
                let x = cx.rng().below(total);
                cum.partition_point(|&c| c <= x)
            }
            _ => cx.rng().below(n as u64) as usize,
        };
        scan_from(candidates, i, cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::select::test_util::{candidates, cx};
    use crate::Rng;

    #[test]
    fn uniform_and_weighted_shares() {
        let mut rng = Rng::from_seed(5);
        for (weights, expect) in [
            (vec![1, 1, 1, 1], [0.25, 0.25, 0.25, 0.25]),
            (vec![1, 1, 2, 4], [0.125, 0.125, 0.25, 0.5]),
        ] {
            let c = candidates(&weights);
            let t = Random.build(&c);
            let mut n = [0f64; 4];
            for _ in 0..40_000 {
                n[Random.pick(&t, &c, &mut cx(&mut rng, &[], None)).unwrap()] += 1.0;
            }
            for i in 0..4 {
                assert!(
                    (n[i] / 40_000.0 - expect[i]).abs() < 0.015,
                    "{weights:?}: {n:?}"
                );
            }
        }
    }
}
