//! The one error type of the core: configuration that cannot work.
//!
//! Nothing on the request path returns an error: outcomes are data ([`Outcome`](crate::Outcome)),
//! decisions are data ([`Action`](crate::Action)). Only building a [`Balancer`](crate::Balancer)
//! or changing its backend set can fail, and only because of what the caller asked for.

/// A configuration the core refuses, with the value at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A backend weight of 0 (a backend that should get no traffic is removed instead).
    #[error("weight must be at least 1")]
    ZeroWeight,
    /// A backend weight above [`Weight::MAX`](crate::Weight::MAX).
    #[error("weight {0} is larger than the maximum of 10000")]
    WeightTooLarge(u32),
    /// The same backend address twice in one set.
    #[error("duplicate backend {0}")]
    DuplicateBackend(String),
    /// `rise` or `fall` of 0: a state change needs at least one probe.
    #[error("health {0} must be at least 1")]
    ZeroThreshold(&'static str),
    /// `retry.attempts` outside `1..=MAX_ATTEMPTS`.
    #[error("retry attempts must be between 1 and {max}, got {got}")]
    Attempts {
        /// What was asked for.
        got: u32,
        /// The largest accepted value.
        max: u32,
    },
    /// A percentage above 100.
    #[error("{name} must be between 0 and 100, got {value}")]
    Percent {
        /// The setting.
        name: &'static str,
        /// Its value.
        value: u32,
    },
    /// A duration that must be positive is zero.
    #[error("{0} must be greater than zero")]
    ZeroDuration(&'static str),
    /// `max_ejection` shorter than `ejection`.
    #[error("max_ejection must not be shorter than ejection")]
    MaxEjectionBelowEjection,
}
