//! The `lb` binary. The proxy it wraps arrives with the lb-proxy and lb-bin issues; until
//! then it says so and exits with status 1 rather than pretending to serve.
#![forbid(unsafe_code)]

use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!(
        "lb {}: the HTTP proxy is not built yet (lb-core is; see README.md)",
        env!("CARGO_PKG_VERSION")
    );
    ExitCode::FAILURE
}
