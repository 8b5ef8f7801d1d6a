//! # lb-core: the sans-IO load-balancing engine
//!
//! Everything that decides *where a request goes and what happens when it fails*, with no
//! I/O at all. This crate is a fully deterministic state machine: it contains no networking
//! code, spawns nothing, sleeps nowhere and never reads a clock or the OS's randomness on its
//! own (quinn-proto's contract). Time comes in as a `now: Instant` argument on every input;
//! randomness comes from a seed ([`Config::rng_seed`]). The same seed and the same inputs
//! give the same decisions, which is what lets the property tests and the simulation in
//! `tests/` replay 100,000 requests on a virtual clock, and what lets another proxy embed it
//! with whatever runtime and HTTP stack it already has.
//!
//! # Layout
//! * [`Balancer`] (`balancer`): the shared engine; `&self`, lock-free on the request path;
//!   split into `pool` (membership, eligibility, snapshot rebuilds), `ejection` and `timer`.
//! * [`select`]: the [`Select`](select::Select) trait and six strategies: round robin, smooth
//!   weighted round robin, least connections, p2c over peak EWMA, Maglev consistent hashing,
//!   random.
//! * `health`: rise/fall counting, ejection lengths, slow-start ramps.
//! * `retry`: [`RequestState`] (also a drop guard for its in-flight slot), [`Action`],
//!   [`Decision`] (the routing trace), the retry decision as a pure function, backoff, budget.
//! * `outcome`: the inputs: [`RequestInfo`], [`Outcome`], [`Completion`], [`ProbeResult`].
//! * [`Event`]: state changes for logs and metrics. [`ConfigError`]: the only error.
//!
//! # Driving it
//! A proxy calls [`Balancer::start`] per request and loops on the [`Action`] it gets:
//!
//! ```
//! use std::time::{Duration, Instant};
//! use lb_core::{Action, Backend, Balancer, Completion, Config, Outcome, RequestInfo, Weight};
//! use lb_core::select::{AnySelect, StrategyKind};
//!
//! # fn send(_to: lb_core::BackendId) -> Outcome { Outcome::Response { status: 200 } }
//! let now = Instant::now; // in a real proxy: the runtime's clock, read in the shell only
//! let lb = Balancer::new(Config::default(), AnySelect::new(StrategyKind::P2cEwma)).unwrap();
//! lb.set_backends([Backend::new("127.0.0.1:3031", Weight::ONE),
//!                  Backend::new("127.0.0.1:3032", Weight::new(2).unwrap())], now()).unwrap();
//!
//! let info = RequestInfo::new(/* idempotent */ true, /* replayable */ true);
//! let (mut req, mut action) = lb.start(info, now());
//! let status = loop {
//!     match action {
//!         // Wait until `not_before`, send, and report `TimedOut` at `try_deadline`.
//!         Action::Forward { backend, not_before: _, try_deadline: _ } => {
//!             action = lb.handle_outcome(&mut req, send(backend), now());
//!         }
//!         Action::Relay => break 200,          // stream the backend's response
//!         Action::Fail(failure) => break failure.status(), // 502, 503 or 504
//!     };
//! };
//! println!("routing trace: {req}");
//! lb.finish(req, Completion::Done, now()); // or `abandon` if the client left
//! assert_eq!(status, 200);
//!
//! // A timer task: sleep until `poll_timeout`, then `handle_timeout`, then log events.
//! if let Some(at) = lb.poll_timeout() { lb.handle_timeout(at); }
//! while let Some(event) = lb.poll_event() { println!("{event}"); }
//! # let _ = Duration::ZERO;
//! ```
#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod backend;
mod balancer;
mod config;
mod error;
mod event;
mod health;
mod latency;
mod outcome;
mod retry;
mod rng;
pub mod select;

pub use backend::{Backend, BackendId, Weight};
pub use balancer::{BackendStatus, Balancer};
pub use config::{Config, HealthConfig, LatencyConfig, PassiveConfig, RetryConfig, MAX_ATTEMPTS};
pub use error::ConfigError;
pub use event::Event;
pub use health::{ejection_duration, slow_start_percent, RiseFall, SLOW_START_STEPS};
pub use outcome::{Completion, Outcome, ProbeFailure, ProbeResult, RequestInfo};
pub use retry::backoff::backoff;
pub use retry::{
    Action, Attempt, Decision, Failure, PickTrace, RequestState, RetryReason, StopReason,
};
pub use rng::{stable_hash, Rng};

/// The README's example, compiled and run as a doc test so it cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
