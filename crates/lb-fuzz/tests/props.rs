//! Each fuzz target driven by proptest: random bytes, and structured inputs that reach
//! deeper than random bytes would in a bounded run. Case counts are bounded so that the
//! whole file runs in well under a minute in a debug build on a busy machine.

use lb_fuzz::core::{self as core_target, Input, Member, Op, OutcomeKind, Setup};
use proptest::prelude::*;

fn cases(n: u32) -> ProptestConfig {
    ProptestConfig {
        cases: n,
        // A failure is shrunk, but not for ever.
        max_shrink_iters: 2_000,
        ..ProptestConfig::default()
    }
}

// --- core_events ---

fn setup() -> impl Strategy<Value = Setup> {
    (
        any::<[u8; 10]>(),
        any::<u16>(),
        any::<u16>(),
        1u16..2_000,
        any::<u64>(),
        prop::collection::vec(member(), 1..6),
    )
        .prop_map(|(b, ejection_ms, slow_start_ms, attempt_timeout_ms, seed, initial)| Setup {
            strategy: b[0],
            attempts: b[1],
            budget_percent: b[2],
            min_retries_per_second: b[3],
            consecutive_failures: b[4],
            ejection_ms: ejection_ms % 30_000,
            max_ejection_factor: b[5],
            max_ejected_percent: b[6],
            panic_threshold_percent: b[7],
            slow_start_ms: slow_start_ms % 20_000,
            rise: b[8],
            fall: b[9],
            backoff_ms: 10,
            attempt_timeout_ms,
            seed,
            initial,
        })
}

fn member() -> impl Strategy<Value = Member> {
    (any::<u8>(), any::<u8>()).prop_map(|(addr, weight)| Member { addr, weight })
}

fn outcome_kind() -> impl Strategy<Value = OutcomeKind> {
    prop_oneof![
        3 => any::<u8>().prop_map(OutcomeKind::Response),
        3 => Just(OutcomeKind::ConnectRefused),
        1 => Just(OutcomeKind::ConnectTimeout),
        1 => Just(OutcomeKind::Stale),
        2 => Just(OutcomeKind::Reset),
        1 => Just(OutcomeKind::TimedOut),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (any::<bool>(), any::<bool>(), any::<Option<u16>>(), prop::option::weighted(0.2, 0u16..3_000))
            .prop_map(|(idempotent, replayable, key, deadline_ms)| Op::Start { idempotent, replayable, key, deadline_ms }),
        8 => (any::<u8>(), outcome_kind()).prop_map(|(req, outcome)| Op::Outcome { req, outcome }),
        1 => (any::<u8>(), any::<bool>()).prop_map(|(req, reset)| Op::Resend { req, reset }),
        2 => (any::<u8>(), prop_oneof![Just(lb_fuzz::core::CompletionKind::Done), Just(lb_fuzz::core::CompletionKind::BackendFailed), Just(lb_fuzz::core::CompletionKind::ClientGone)])
            .prop_map(|(req, completion)| Op::Finish { req, completion }),
        1 => any::<u8>().prop_map(|req| Op::Abandon { req }),
        1 => any::<u8>().prop_map(|req| Op::Drop { req }),
        2 => (any::<u8>(), any::<bool>()).prop_map(|(backend, ok)| Op::Probe { backend, ok }),
        1 => prop::collection::vec(member(), 0..6).prop_map(Op::SetBackends),
        1 => prop::collection::vec(member(), 2..6).prop_map(Op::SetBackends),
        3 => (0u16..2_000).prop_map(Op::Advance),
        1 => (0u8..3).prop_map(Op::Jump),
        1 => Just(Op::Timeout),
        2 => Just(Op::Fire),
    ]
}

proptest! {
    #![proptest_config(cases(64))]

    /// Random bytes, as a fuzzer without a corpus would start.
    #[test]
    fn core_events_random_bytes(data in prop::collection::vec(any::<u8>(), 0..2_048)) {
        core_target::core_events(&data);
    }

    /// Structured sequences: every kind of event, weighted towards requests and outcomes.
    #[test]
    fn core_events_structured(setup in setup(), ops in prop::collection::vec(op(), 1..250)) {
        core_target::run(&Input { setup, ops });
    }
}
