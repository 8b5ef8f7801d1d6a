//! `cargo xtask <task>`: developer tasks that are too long or too specialised for `cargo test`.
//!
//! * `cargo xtask bench [--save-baseline NAME | --baseline NAME] [FILTER]`: the criterion
//!   micro-benchmarks of lb-core (strategy picks at 3, 100 and 10,000 backends, single-threaded
//!   and with 2 threads contending). `--baseline` compares against a saved run; criterion
//!   prints the change per benchmark.
#![forbid(unsafe_code)]

use std::process::{Command, ExitCode};

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    match args.next().as_deref() {
        Some("bench") => bench(args.collect()),
        Some("help" | "--help" | "-h") | None => {
            eprintln!("usage: cargo xtask bench [--save-baseline NAME | --baseline NAME] [FILTER]");
            ExitCode::SUCCESS
        }
        Some(other) => {
            eprintln!("xtask: unknown task {other:?} (try `cargo xtask help`)");
            ExitCode::from(2)
        }
    }
}

fn bench(args: Vec<String>) -> ExitCode {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args(["bench", "-p", "lb-benches", "--"])
        .args(&args)
        .status();
    match status {
        Ok(s) if s.success() => ExitCode::SUCCESS,
        Ok(s) => {
            eprintln!("xtask: cargo bench failed: {s}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("xtask: could not run cargo: {e}");
            ExitCode::FAILURE
        }
    }
}
