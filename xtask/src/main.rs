//! `cargo xtask <task>`: developer tasks too long or too specialised for `cargo test`.
//!
//! * `cargo xtask bench [--quick] [--install] [--rounds N] [--duration SECS]
//!   [--only SUBSTR[,..]] [--lb-bin PATH[,..]] [--lb-log on|off|on,off] [--no-pingora]
//!   [--port-offset K]`: lb against direct, nginx, haproxy and Pingora in one interleaved
//!   run; writes `target/bench/report.{md,json,svg}` and `bars.json` (see `bench.rs`).
//! * `cargo xtask bench --micro [criterion args]`: the criterion micro-benchmarks of lb-core.
//! * `cargo xtask reliability [--only PARTS] [--fuzz-seconds N] [--render]`: the long form of the
//!   reliability program (chaos, hostile clients, h2spec, fuzzing, soak, idle, reload storms);
//!   writes `RELIABILITY.md`.
//! * `cargo xtask backend BASE_PORT COUNT BODY_BYTES`: the benchmark's upstream (internal).
//! * `cargo xtask idle-open PORT COUNT`: the idle row's connection holder (internal).
//! * `cargo xtask handshake-client PORT CONNS SECS CERT.pem`: the HTTPS handshake row's
//!   client on its own (full TLS handshakes, one request each; see `handshake.rs`).
#![forbid(unsafe_code)]

mod backend;
mod bars;
mod bench;
mod chart;
mod handshake;
mod idle;
mod pingora;
mod reliability;
mod tls;

use std::process::ExitCode;

const USAGE: &str = "usage: cargo xtask bench [--quick] [--install] [--rounds N] [--duration SECS] [--only SUBSTR[,SUBSTR]] [--lb-bin PATH[,PATH]] [--lb-log on|off|on,off] [--no-pingora] [--port-offset K] | bench --micro [criterion args] | reliability [--only PARTS] [--fuzz-seconds N] [--out FILE]";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("bench") => bench::run(&args[1..]),
        Some("backend") => backend::serve(&args[1..]),
        Some("idle-open") => idle::open(&args[1..]),
        Some("reliability") => reliability::run(&args[1..]),
        Some("chart") => chart::redraw(&args[1..]),
        Some("handshake-client") => handshake::cli(&args[1..]),
        Some("help" | "--help" | "-h") | None => {
            eprintln!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Some(other) => Err(format!("unknown task {other:?}\n{USAGE}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}
