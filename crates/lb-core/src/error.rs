//! The one error type of the core: configuration that cannot work.
//!
//! Nothing on the request path returns an error: outcomes are data ([`Outcome`](crate::Outcome)),
//! decisions are data ([`Action`](crate::Action)). Only building a [`Balancer`](crate::Balancer)
//! or changing its backend set can fail, and only because of what the caller asked for.

/// A configuration the core refuses, with the value at fault.
///
/// Settings are named as `lb.toml` names them (`section.key`), so a shell that reads a
/// config file can point at the line: see [`ConfigError::setting`].
#[non_exhaustive]
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
    /// A setting outside its range (`health.rise` of 0, `retry.attempts` above
    /// [`MAX_ATTEMPTS`](crate::MAX_ATTEMPTS), a percentage above 100, ...).
    #[error("{setting} must be between {min} and {max}, got {value}")]
    OutOfRange {
        /// The setting, named as in `lb.toml` (`section.key`).
        setting: &'static str,
        /// What was asked for.
        value: u32,
        /// The smallest accepted value.
        min: u32,
        /// The largest accepted value.
        max: u32,
    },
    /// A duration that must be positive is zero.
    #[error("{0} must be greater than zero")]
    ZeroDuration(&'static str),
    /// `max_ejection` shorter than `ejection`.
    #[error("passive.max_ejection must not be shorter than passive.ejection")]
    MaxEjectionBelowEjection,
}

// === impl ConfigError ===

impl ConfigError {
    /// The setting at fault, named as in `lb.toml` (`retry.attempts`), if the error is about
    /// one [`Config`](crate::Config) setting; `None` for errors about the backend set.
    #[must_use]
    pub const fn setting(&self) -> Option<&'static str> {
        match self {
            Self::OutOfRange { setting, .. } | Self::ZeroDuration(setting) => Some(setting),
            Self::MaxEjectionBelowEjection => Some("passive.max_ejection"),
            Self::ZeroWeight | Self::WeightTooLarge(_) | Self::DuplicateBackend(_) => None,
        }
    }
}
