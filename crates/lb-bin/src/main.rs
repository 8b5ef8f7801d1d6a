//! `lb`: an HTTP load balancer and reverse proxy. See README.md and SPEC.md.
#![forbid(unsafe_code)]

mod admin;
mod app;
mod cli;
mod config;
mod metrics;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse(); // usage errors exit 2
    let settings = match config::load(&cli) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("lb: {e}");
            return ExitCode::from(1);
        }
    };
    if cli.check {
        println!("{settings}");
        println!("configuration OK");
        return ExitCode::SUCCESS;
    }
    init_logging(settings.log_format);
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

/// Logs to stdout; `RUST_LOG` filters (default `info`); `--log-format json` gives one JSON
/// object per line.
fn init_logging(format: cli::LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stdout)
        .with_ansi(false);
    match format {
        cli::LogFormat::Text => builder.init(),
        cli::LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .init(),
    }
}
