//! Criterion benchmarks of lb-core live in `benches/`; run them with `cargo xtask bench`.
#![forbid(unsafe_code)]
