//! Active health checking for `lb` (the `Prober` trait, TCP and HTTP probers and the probe
//! scheduler) feeding probe results into [`lb_core::Balancer::handle_probe`], where the
//! rise/fall counting lives.
//!
//! Not built yet: this crate is filled by the lb-health issue. It holds no code until then,
//! so nothing here pretends to probe.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub use lb_core::{ProbeFailure, ProbeResult};
