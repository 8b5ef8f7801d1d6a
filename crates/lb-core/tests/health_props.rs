//! Rise/fall: a backend flips only after `fall` failures / `rise` successes in a row.

mod common;

use common::{balancer, Clock, Model};
use lb_core::select::StrategyKind;
use lb_core::{Config, Event, HealthConfig, ProbeFailure, ProbeResult};
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn flips_exactly_at_thresholds(
        rise in 1u32..5,
        fall in 1u32..5,
        results in prop::collection::vec(any::<bool>(), 1..200),
    ) {
        let mut clock = Clock::new();
        let config = Config::default().with_health(HealthConfig::default().with_rise(rise).with_fall(fall));
        let (lb, ids) = balancer(StrategyKind::RoundRobin, config, &[1], clock.now());
        let mut model = Model::new(&ids, rise, fall);
        for ok in results {
            clock.advance(100);
            let expected = model.probe(ids[0], ok);
            let result = if ok { ProbeResult::Success } else { ProbeResult::Failure(ProbeFailure::TimedOut) };
            lb.handle_probe(ids[0], result, clock.now());
            let mut flip = None;
            while let Some(e) = lb.poll_event() {
                match e {
                    Event::Down { failures, .. } => {
                        prop_assert_eq!(failures, fall);
                        flip = Some(false);
                    }
                    Event::Up { successes, .. } => {
                        prop_assert_eq!(successes, rise);
                        flip = Some(true);
                    }
                    _ => {}
                }
            }
            prop_assert_eq!(flip, expected);
            prop_assert_eq!(lb.backends(clock.now())[0].healthy, model.up(ids[0]));
        }
    }
}
