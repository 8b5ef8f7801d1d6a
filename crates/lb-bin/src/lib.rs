//! `lb`: an HTTP load balancer and reverse proxy. See README.md and SPEC.md.
//!
//! The binary's code, as a library so that tests and fuzz targets reach the same code paths
//! the binary runs (`src/main.rs` only calls [`main`]): [`check_config`] is the config loader
//! of `lb --config FILE --check` on text already read.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod admin;
mod app;
mod cli;
mod config;
mod discovery;
mod log;
mod metrics;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Parser;

/// What a config file that `lb` accepts comes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedConfig {
    /// The summary `lb --check` prints.
    pub summary: String,
    /// Every effective setting (their `Debug` form): equal for equal settings.
    pub settings: String,
}

/// Why `lb` refuses a config file (it would exit 1 and print [`shown`](Self::shown)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    /// The file named, if any.
    pub file: Option<PathBuf>,
    /// The 1-based line named, if any.
    pub line: Option<usize>,
    /// The key named (`health.interval`, `backend[2].url`); empty if none.
    pub key: String,
    /// The message `lb` prints.
    pub shown: String,
}

/// Loads and validates `text` as the config file `file` with no flags, exactly as
/// `lb --config FILE --check` does after reading the file.
///
/// # Errors
/// What `lb` would refuse the file for.
pub fn check_config(file: &Path, text: &str) -> Result<CheckedConfig, ConfigProblem> {
    let cli = cli::Cli::parse_from(["lb", "--check"]);
    match config::load_text(&cli, Some(file), text) {
        Ok(s) => Ok(CheckedConfig {
            summary: s.to_string(),
            settings: format!("{s:?}"),
        }),
        Err(e) => Err(ConfigProblem {
            shown: e.to_string(),
            file: e.file,
            line: e.line,
            key: e.key,
        }),
    }
}

/// The `lb` command: parses the command line, loads the config, runs until a signal says
/// stop. Returns the process's exit code (SPEC: 2 for usage errors, 1 for config errors).
#[must_use]
pub fn main() -> ExitCode {
    let cli = cli::Cli::parse(); // usage errors exit 2
    let settings = match config::load(&cli) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("lb: {e}");
            return ExitCode::from(1);
        }
    };
    if cli.check {
        use std::io::Write;
        // Not `println!`: a reader that stops early (`lb --check | head`) would make it panic.
        let warnings = discovery::check_names(&settings);
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{settings}");
        for w in warnings {
            let _ = writeln!(out, "warning: {w}");
        }
        let _ = writeln!(out, "configuration OK");
        return ExitCode::SUCCESS;
    }
    log::init(settings.log_format);
    match app::start(cli, settings) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let mut msg = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                if !msg.contains(&s.to_string()) {
                    msg.push_str(&format!(": {s}"));
                }
                source = s.source();
            }
            eprintln!("lb: {msg}");
            tracing::error!(target: "lb", error = %msg, "failed");
            ExitCode::from(1)
        }
    }
}
