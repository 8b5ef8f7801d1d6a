//! The command line (SPEC.md, "Command line"). Usage errors exit 2, as clap does.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use lb_core::select::StrategyKind;
use lb_proxy::HashKey;

/// HTTP load balancer and reverse proxy.
///
/// Every flag also exists as a key of the TOML config file; flags given on the command line
/// override the file. Durations are written 250ms, 2s, 1m.
#[derive(Debug, Clone, Parser)]
#[command(name = "lb", version, about, long_about = None, max_term_width = 100)]
pub(crate) struct Cli {
    /// Client-facing address (repeatable; replaces the config's `listen`) [default: 127.0.0.1:3030]
    #[arg(long, value_name = "ADDR", value_parser = parse_addr)]
    pub(crate) listen: Vec<SocketAddr>,

    /// Same as --listen 0.0.0.0:N (with --listen, listens on both)
    #[arg(long, value_name = "N")]
    pub(crate) port: Option<u16>,

    /// One backend, http://host:port (repeatable)
    #[arg(long = "backend", value_name = "URL")]
    pub(crate) backend: Vec<String>,

    /// Comma-separated backends (simplelb's flag)
    #[arg(long, value_name = "A,B", value_delimiter = ',')]
    pub(crate) backends: Vec<String>,

    /// round-robin, weighted-round-robin, least-connections, p2c-ewma, consistent-hash, random [default: round-robin]
    #[arg(long, value_name = "S", value_parser = parse_strategy)]
    pub(crate) strategy: Option<StrategyKind>,

    /// For consistent-hash: client-ip, path, header:NAME, cookie:NAME [default: client-ip]
    #[arg(long, value_name = "K", value_parser = parse_hash_key)]
    pub(crate) hash_key: Option<HashKey>,

    /// Active probe period; 0 or 0s turns probing off [default: 5s]
    #[arg(long, value_name = "D", value_parser = parse_duration)]
    pub(crate) health_interval: Option<Duration>,

    /// HTTP GET this path expecting 2xx/3xx; without it a TCP connect probe
    #[arg(long, value_name = "P")]
    pub(crate) health_path: Option<String>,

    /// Limit on one probe [default: 2s]
    #[arg(long, value_name = "D", value_parser = parse_duration)]
    pub(crate) health_timeout: Option<Duration>,

    /// Admin server address: /metrics, /status, /debug/requests [default: off]
    #[arg(long, value_name = "ADDR", value_parser = parse_addr)]
    pub(crate) admin: Option<SocketAddr>,

    /// On SIGTERM, how long in-flight requests may finish [default: 30s]
    #[arg(long, value_name = "D", value_parser = parse_duration)]
    pub(crate) drain_timeout: Option<Duration>,

    /// PEM certificate chain: serve HTTPS (ALPN h2, http/1.1)
    #[arg(long, value_name = "FILE")]
    pub(crate) tls_cert: Option<PathBuf>,

    /// PEM private key for --tls-cert
    #[arg(long, value_name = "FILE")]
    pub(crate) tls_key: Option<PathBuf>,

    /// Bearer token for the admin server's mutating endpoints (one line; replaces the
    /// config's `admin_token`)
    #[arg(long, value_name = "FILE")]
    pub(crate) admin_token_file: Option<PathBuf>,

    /// TOML config file; flags given on the command line override it
    #[arg(long, value_name = "FILE")]
    pub(crate) config: Option<PathBuf>,

    /// Validate the configuration, print a summary, exit 0 (valid) or 1
    #[arg(long)]
    pub(crate) check: bool,

    /// Log format [default: text]
    #[arg(long, value_name = "F")]
    pub(crate) log_format: Option<LogFormat>,
}

/// How log lines are written to stdout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

pub(crate) fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = s.parse() {
        return Ok(a);
    }
    s.to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| format!("{s:?} is not an address (expected host:port, e.g. 127.0.0.1:3030)"))
}

fn parse_strategy(s: &str) -> Result<StrategyKind, String> {
    s.parse()
        .map_err(|e: lb_core::select::UnknownStrategy| e.to_string())
}

fn parse_hash_key(s: &str) -> Result<HashKey, String> {
    s.parse().map_err(|e: lb_proxy::RouteError| e.to_string())
}

/// `250ms`, `2s`, `1m`, `1h`, `1m30s`; `0` alone is zero.
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if t == "0" {
        return Ok(Duration::ZERO);
    }
    let bad = || format!("{s:?} is not a duration (write 250ms, 2s, 1m)");
    if t.is_empty() || !t.as_bytes()[0].is_ascii_digit() {
        return Err(bad());
    }
    let d = humantime::parse_duration(t).map_err(|_| bad())?;
    // Far beyond any sensible timeout, and far from the overflow of `Instant + Duration`.
    if d > Duration::from_secs(365 * 24 * 3600) {
        return Err(format!("{s:?} is longer than a year"));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        for bad in [
            "",
            "fast",
            "-1s",
            "10",
            "1 parsec",
            "1000y",
            "99999999999999999999s",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn simplelb_flags() {
        let cli =
            Cli::try_parse_from(["lb", "--backends=http://a:1,http://b:2", "--port=3030"]).unwrap();
        assert_eq!(cli.backends, ["http://a:1", "http://b:2"]);
        assert_eq!(cli.port, Some(3030));
    }

    #[test]
    fn bad_values_are_usage_errors() {
        for args in [
            &["lb", "--strategy", "fastest"][..],
            &["lb", "--health-interval", "soon"],
            &["lb", "--listen", "nowhere"],
            &["lb", "--log-format", "xml"],
            &["lb", "--hash-key", "cookie:"],
            &["lb", "--no-such-flag"],
        ] {
            let err = Cli::try_parse_from(args).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{args:?}");
        }
    }
}
