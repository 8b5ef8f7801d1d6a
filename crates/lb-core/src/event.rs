//! Operator-visible facts the core reports through [`Balancer::poll_event`](crate::Balancer::poll_event).

use std::fmt;
use std::time::Instant;

use crate::backend::BackendId;
use crate::outcome::ProbeFailure;

/// A change of a backend's state, with its reason, for logs and metrics.
///
/// Both the enum and each variant are `non_exhaustive`: new events and new facts about an
/// event may be added, so match with `..` and a wildcard arm.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Active probes took the backend down.
    #[non_exhaustive]
    Down {
        /// Which backend.
        backend: BackendId,
        /// Its address.
        addr: String,
        /// Consecutive failures that did it (`fall`).
        failures: u32,
        /// The last probe's failure.
        last: ProbeFailure,
    },
    /// Active probes brought it back.
    #[non_exhaustive]
    Up {
        /// Which backend.
        backend: BackendId,
        /// Its address.
        addr: String,
        /// Consecutive successes that did it (`rise`).
        successes: u32,
    },
    /// Live traffic failures ejected it until `until`.
    #[non_exhaustive]
    Ejected {
        /// Which backend.
        backend: BackendId,
        /// Its address.
        addr: String,
        /// When it returns.
        until: Instant,
        /// Consecutive failures that did it.
        failures: u32,
        /// This is its n-th ejection in a row.
        ejections: u32,
    },
    /// Its ejection expired: it takes traffic again (with slow start).
    #[non_exhaustive]
    Restored {
        /// Which backend.
        backend: BackendId,
        /// Its address.
        addr: String,
    },
    /// Panic mode turned on or off (too few eligible backends), or, while on, the number of
    /// ejections it ignores changed. Panic mode sends traffic to ejected backends that probes
    /// still call up, never to probe-down ones: when the shortfall is only probe-down
    /// backends, it changes nothing, and the event says so.
    #[non_exhaustive]
    Panic {
        /// On or off.
        on: bool,
        /// Eligible backends (probe-healthy and not ejected).
        eligible: usize,
        /// All backends.
        total: usize,
        /// Backends down by probes (never balanced over, panic or not).
        down: usize,
        /// Ejected, probe-healthy backends panic mode balances over anyway (0 when off).
        ignored: usize,
    },
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Down { addr, failures, last, .. } => {
                write!(f, "backend {addr} down: {failures} consecutive probe failures: {last}")
            }
            Self::Up { addr, successes, .. } => {
                write!(f, "backend {addr} up: {successes} consecutive probe successes")
            }
            Self::Ejected { addr, failures, ejections, .. } => write!(
                f,
                "backend {addr} ejected: {failures} consecutive failures (ejection {ejections} in a row)"
            ),
            Self::Restored { addr, .. } => write!(f, "backend {addr} restored: ejection expired"),
            Self::Panic { on: true, eligible, total, down, ignored: 0 } => write!(
                f,
                "panic mode on: {eligible} of {total} backends eligible, {down} down by probes; no ejection to ignore, so nothing changes"
            ),
            Self::Panic { on: true, eligible, total, down, ignored } => write!(
                f,
                "panic mode on: {eligible} of {total} backends eligible ({down} down by probes), ignoring {ignored} ejection{}",
                if *ignored == 1 { "" } else { "s" }
            ),
            Self::Panic { on: false, eligible, total, .. } => {
                write!(f, "panic mode off: {eligible} of {total} backends eligible")
            }
        }
    }
}
