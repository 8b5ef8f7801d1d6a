//! The core's settings, validated once by [`Balancer::new`](crate::Balancer::new).
//!
//! The names follow the `lb.toml` sections of SPEC.md (`[health]`, `[passive]`, `[retry]`) so
//! that a config file maps onto them field by field. Every field has the default SPEC.md gives.

use std::time::Duration;

use crate::error::ConfigError;

/// The most attempts (first one included) one request may make.
///
/// Bounded so a request's routing trace lives inline in its state, allocation-free.
pub const MAX_ATTEMPTS: u32 = 10;

/// Everything the [`Balancer`](crate::Balancer) needs to decide.
///
/// Built from [`Config::default`] (SPEC.md's defaults) with `with_*` methods, read with
/// getters: the fields are private so that a setting added later breaks nobody.
///
/// ```
/// use lb_core::{Config, RetryConfig};
/// let config = Config::default()
///     .with_retry(RetryConfig::default().with_attempts(2))
///     .with_rng_seed(Some(42)); // reproducible choices, e.g. in a simulation
/// assert!(config.validate().is_ok());
/// assert_eq!(config.retry().attempts(), 2);
/// ```
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Config {
    /// Active health: how many probes in a row flip a backend.
    pub(crate) health: HealthConfig,
    /// Passive outlier detection from live traffic.
    pub(crate) passive: PassiveConfig,
    /// Retries, their backoff and their budget.
    pub(crate) retry: RetryConfig,
    /// Latency tracking for `p2c-ewma`.
    pub(crate) latency: LatencyConfig,
    /// Seed for every random choice; `None` seeds from the process's entropy.
    pub(crate) rng_seed: Option<u64>,
}

/// `[health]`: HAProxy-style rise/fall thresholds.
///
/// ```
/// use lb_core::HealthConfig;
/// let h = HealthConfig::default().with_rise(1).with_fall(5);
/// assert_eq!((h.rise(), h.fall()), (1, 5));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthConfig {
    /// Consecutive probe successes that bring a down backend back (default 2).
    pub(crate) rise: u32,
    /// Consecutive probe failures that take a backend down (default 3).
    pub(crate) fall: u32,
}

/// `[passive]`: Envoy-style consecutive-failure ejection, panic mode and slow start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PassiveConfig {
    /// Consecutive connection-level failures that eject a backend (default 5; 0 turns
    /// ejection off).
    pub(crate) consecutive_failures: u32,
    /// First ejection's length; the n-th in a row lasts `n ×` this (default 10 s).
    pub(crate) ejection: Duration,
    /// Cap on one ejection's length (default 5 min).
    pub(crate) max_ejection: Duration,
    /// Ejected backends may be at most this share of the pool (default 50).
    pub(crate) max_ejected_percent: u32,
    /// Below this share of eligible backends, ejections are ignored (default 50).
    pub(crate) panic_threshold_percent: u32,
    /// A returning backend's weight ramps from 10 % to 100 % over this (default 30 s; zero
    /// turns it off).
    pub(crate) slow_start: Duration,
}

/// `[retry]` plus the per-attempt timeout (`timeouts.request`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryConfig {
    /// Backends tried per request, first one included (default 3, at most [`MAX_ATTEMPTS`]).
    pub(crate) attempts: u32,
    /// Base of exponential backoff with full jitter, capped at 10× (default 10 ms; zero retries at once).
    pub(crate) backoff: Duration,
    /// Retries may add at most this percentage on top of the client requests of the last 10 s (default 20).
    pub(crate) budget_percent: u32,
    /// ... plus this many retries per second, from start-up on (default 10).
    pub(crate) min_retries_per_second: u32,
    /// One attempt's limit from sending to the response head (default 30 s).
    pub(crate) attempt_timeout: Duration,
}

/// How `p2c-ewma` estimates a backend's latency (peak EWMA, as Finagle and linkerd).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LatencyConfig {
    /// Decay time constant of the moving average (default 10 s).
    pub(crate) decay: Duration,
    /// Estimate for a backend with no sample yet (default 1 ms).
    pub(crate) default_rtt: Duration,
    /// Floor on a backend's latency estimate right after a failed attempt, fading to nothing
    /// within 5 s (or at once on a good response), so a backend that fails fast never looks
    /// fast (default 250 ms).
    pub(crate) failure_penalty: Duration,
}

// === impl Config ===

/// Getters and by-value setters (`with_*`) for the private fields of a settings struct.
macro_rules! accessors {
    ($ty:ident { $( $field:ident, $with:ident: $t:ty; )* }) => {
        impl $ty {
            $(
                #[doc = concat!("The `", stringify!($field), "` setting (see the field list of [`", stringify!($ty), "`]).")]
                #[must_use]
                pub const fn $field(&self) -> $t {
                    self.$field
                }

                #[doc = concat!("These settings with `", stringify!($field), "` replaced.")]
                #[must_use]
                pub const fn $with(mut self, $field: $t) -> Self {
                    self.$field = $field;
                    self
                }
            )*
        }
    };
}

accessors!(Config {
    health, with_health: HealthConfig;
    passive, with_passive: PassiveConfig;
    retry, with_retry: RetryConfig;
    latency, with_latency: LatencyConfig;
    rng_seed, with_rng_seed: Option<u64>;
});

accessors!(HealthConfig {
    rise, with_rise: u32;
    fall, with_fall: u32;
});

accessors!(PassiveConfig {
    consecutive_failures, with_consecutive_failures: u32;
    ejection, with_ejection: Duration;
    max_ejection, with_max_ejection: Duration;
    max_ejected_percent, with_max_ejected_percent: u32;
    panic_threshold_percent, with_panic_threshold_percent: u32;
    slow_start, with_slow_start: Duration;
});

accessors!(RetryConfig {
    attempts, with_attempts: u32;
    backoff, with_backoff: Duration;
    budget_percent, with_budget_percent: u32;
    min_retries_per_second, with_min_retries_per_second: u32;
    attempt_timeout, with_attempt_timeout: Duration;
});

accessors!(LatencyConfig {
    decay, with_decay: Duration;
    default_rtt, with_default_rtt: Duration;
    failure_penalty, with_failure_penalty: Duration;
});

impl Config {
    /// Checks every field against its range. These ranges are the only ones: a shell (such
    /// as `lb`'s config file loader) maps its keys onto these settings and reports what this
    /// returns, keyed by [`ConfigError::setting`].
    ///
    /// # Errors
    /// The first [`ConfigError`] found, in the order of SPEC.md's config file.
    pub fn validate(&self) -> Result<(), ConfigError> {
        // Thresholds above 1,000 would take hours to flip at any sane probe interval; the
        // bound keeps every counter far from overflow.
        range("health.rise", self.health.rise, 1, 1_000)?;
        range("health.fall", self.health.fall, 1, 1_000)?;
        let p = &self.passive;
        range(
            "passive.consecutive_failures",
            p.consecutive_failures,
            0,
            1_000_000,
        )?;
        if p.consecutive_failures > 0 && p.ejection.is_zero() {
            return Err(ConfigError::ZeroDuration("passive.ejection"));
        }
        if p.max_ejection < p.ejection {
            return Err(ConfigError::MaxEjectionBelowEjection);
        }
        range("passive.max_ejected_percent", p.max_ejected_percent, 0, 100)?;
        range(
            "passive.panic_threshold_percent",
            p.panic_threshold_percent,
            0,
            100,
        )?;
        let r = &self.retry;
        range("retry.attempts", r.attempts, 1, MAX_ATTEMPTS)?;
        range("retry.budget_percent", r.budget_percent, 0, 100)?;
        range(
            "retry.min_retries_per_second",
            r.min_retries_per_second,
            0,
            1_000_000,
        )?;
        if r.attempt_timeout.is_zero() {
            return Err(ConfigError::ZeroDuration("timeouts.request"));
        }
        if self.latency.decay.is_zero() {
            return Err(ConfigError::ZeroDuration("latency.decay"));
        }
        Ok(())
    }
}

fn range(setting: &'static str, value: u32, min: u32, max: u32) -> Result<(), ConfigError> {
    if !(min..=max).contains(&value) {
        return Err(ConfigError::OutOfRange {
            setting,
            value,
            min,
            max,
        });
    }
    Ok(())
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self { rise: 2, fall: 3 }
    }
}

impl Default for PassiveConfig {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            ejection: Duration::from_secs(10),
            max_ejection: Duration::from_secs(300),
            max_ejected_percent: 50,
            panic_threshold_percent: 50,
            slow_start: Duration::from_secs(30),
        }
    }
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            attempts: 3,
            backoff: Duration::from_millis(10),
            budget_percent: 20,
            min_retries_per_second: 10,
            attempt_timeout: Duration::from_secs(30),
        }
    }
}

impl Default for LatencyConfig {
    fn default() -> Self {
        Self {
            decay: Duration::from_secs(10),
            default_rtt: Duration::from_millis(1),
            failure_penalty: Duration::from_millis(250),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_match_spec() {
        let c = Config::default();
        c.validate().unwrap();
        assert_eq!((c.health.rise, c.health.fall), (2, 3));
        assert_eq!(c.retry.attempts, 3);
        assert_eq!(c.passive.consecutive_failures, 5);
        assert_eq!(c.passive.max_ejection, Duration::from_secs(300));
    }

    #[test]
    fn rejects_bad_values() {
        let mut c = Config::default();
        c.retry.attempts = 0;
        assert_eq!(
            c.validate(),
            Err(ConfigError::OutOfRange {
                setting: "retry.attempts",
                value: 0,
                min: 1,
                max: MAX_ATTEMPTS
            })
        );
        assert_eq!(c.validate().unwrap_err().setting(), Some("retry.attempts"));
        let mut c = Config::default();
        c.passive.max_ejected_percent = 101;
        assert!(matches!(
            c.validate(),
            Err(ConfigError::OutOfRange { value: 101, .. })
        ));
        let mut c = Config::default();
        c.health.fall = 0;
        assert_eq!(c.validate().unwrap_err().setting(), Some("health.fall"));
        let c = Config::default().with_health(HealthConfig::default().with_rise(1001));
        assert_eq!(
            c.validate().unwrap_err().to_string(),
            "health.rise must be between 1 and 1000, got 1001"
        );
        let mut c = Config::default();
        c.passive.max_ejection = Duration::from_secs(1);
        assert_eq!(c.validate(), Err(ConfigError::MaxEjectionBelowEjection));
        let mut c = Config::default();
        c.retry.budget_percent = 250;
        assert!(matches!(
            c.validate(),
            Err(ConfigError::OutOfRange { value: 250, .. })
        ));
    }
}
