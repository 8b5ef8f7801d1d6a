//! # lb-health: active health checking
//!
//! Probes every backend on its own timer and feeds each result into lb-core, where the
//! rise/fall counting lives (so proptest can reach it without sockets). This crate only does
//! I/O and scheduling.
//!
//! # Layout
//! * [`Prober`]: check one [`Target`] once, within a timeout; [`TcpProber`] (connect, then
//!   close at once) and [`HttpProber`] (`GET path`, 2xx/3xx healthy, bounded read).
//! * TLS: a target with a [`TlsTarget`] (an `https://` backend) is probed over TLS. Both
//!   probers complete a handshake that verifies the certificate against the connector's
//!   roots, with the URL's host name as SNI and as the name checked, before they count the
//!   backend healthy; the HTTP probe sends its `GET` inside the session. A certificate that
//!   does not verify, or a peer that does not speak TLS, is [`ProbeError::Tls`]. The timeout
//!   covers connect, handshake and exchange together.
//! * [`Checker`]: probes all targets concurrently and independently, each with its own
//!   jittered interval; reloads start and stop only what changed; shutdown is immediate.
//! * [`ProbeSink`]: where results go. [`lb_core::Balancer`] is one: results feed
//!   `handle_probe`, and each state change is logged once at `info` with its reason.
//! * [`ProbeError`]: why a probe failed (also the `result` label of
//!   `lb_health_checks_total`).
//!
//! # Initial state
//! A backend counts as healthy until its probes say otherwise (`fall` failures in a row), at
//! start-up and when a reload adds it, as SPEC.md asks: a restart of `lb` never begins with
//! a 503 while the first probes are under way, and one probe cannot take a backend out.
//!
//! ```no_run
//! use std::sync::Arc;
//! use lb_core::{Backend, Balancer, Config, Weight};
//! use lb_core::select::{AnySelect, StrategyKind};
//! use lb_health::{Checker, CheckerConfig, HttpProber, Target};
//!
//! # async fn run() {
//! let lb = Arc::new(Balancer::new(Config::default(), AnySelect::new(StrategyKind::RoundRobin)).unwrap());
//! let ids = lb.set_backends([Backend::new("http://127.0.0.1:3031", Weight::ONE)], std::time::Instant::now()).unwrap();
//! let checker = Checker::new(HttpProber::new("/healthz"), CheckerConfig::default(), lb.clone());
//! checker.set_targets([(ids[0], Target::new("127.0.0.1:3031".parse().unwrap()))]);
//! # }
//! ```
#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod checker;
mod error;
mod http;
mod prober;
mod tcp;

pub use checker::{log_event, Checker, CheckerConfig, ProbeCounts, ProbeSink, RESULT_LABELS};
pub use error::ProbeError;
pub use http::HttpProber;
pub use prober::{Prober, Target, TlsTarget};
pub use tcp::TcpProber;
