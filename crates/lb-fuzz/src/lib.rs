//! # lb-fuzz: fuzz targets for lb
//!
//! One function per target, each taking the fuzzer's bytes and panicking only when one of
//! lb's invariants is broken (never on a merely odd input). The same functions are driven
//! three ways:
//! * `tests/props.rs`: proptest, with random bytes and with structured inputs, bounded for CI;
//! * `tests/corpus.rs`: every file under `corpus/<target>/` (the seed corpus, and every crash
//!   found so far, each also a named regression test);
//! * `fuzz/` at the workspace root: a cargo-fuzz (libFuzzer) project for the long mode
//!   (`fuzz/run.sh SECONDS`).
//!
//! # Layout
//! * [`config`] (`config`): TOML text through `lb`'s config loader.
//! * [`http1_head`] (`http1`): HTTP/1 request heads, parsed as hyper does, through
//!   lb-proxy's validation and header rewriting.
//! * [`core_events`] (`core`): arbitrary event sequences into [`lb_core::Balancer`].
#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod config;
pub mod core;
pub mod http1;

pub use crate::config::config;
pub use crate::core::core_events;
pub use crate::http1::http1_head;

/// A fuzz target: the fuzzer's bytes in, a panic out only on a broken invariant.
pub type Target = fn(&[u8]);

/// The targets by name, as the corpus directories and `fuzz/fuzz_targets` name them.
pub const TARGETS: [(&str, Target); 3] = [
    ("config", config),
    ("http1_head", http1_head),
    ("core_events", core_events),
];
