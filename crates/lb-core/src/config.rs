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
/// ```
/// use lb_core::Config;
/// let mut config = Config::default();
/// config.retry.attempts = 2;
/// config.rng_seed = Some(42); // reproducible choices, e.g. in a simulation
/// assert!(config.validate().is_ok());
/// ```
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Config {
    /// Active health: how many probes in a row flip a backend.
    pub health: HealthConfig,
    /// Passive outlier detection from live traffic.
    pub passive: PassiveConfig,
    /// Retries, their backoff and their budget.
    pub retry: RetryConfig,
    /// Latency tracking for `p2c-ewma`.
    pub latency: LatencyConfig,
    /// Seed for every random choice; `None` seeds from the process's entropy.
    pub rng_seed: Option<u64>,
}

/// `[health]`: HAProxy-style rise/fall thresholds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthConfig {
    /// Consecutive probe successes that bring a down backend back (default 2).
    pub rise: u32,
    /// Consecutive probe failures that take a backend down (default 3).
    pub fall: u32,
}

/// `[passive]`: Envoy-style consecutive-failure ejection, panic mode and slow start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PassiveConfig {
    /// Consecutive connection-level failures that eject a backend (default 5; 0 turns
    /// ejection off).
    pub consecutive_failures: u32,
    /// First ejection's length; the n-th in a row lasts `n ×` this (default 10 s).
    pub ejection: Duration,
    /// Cap on one ejection's length (default 5 min).
    pub max_ejection: Duration,
    /// Ejected backends may be at most this share of the pool (default 50).
    pub max_ejected_percent: u32,
    /// Below this share of eligible backends, ejections are ignored (default 50).
    pub panic_threshold_percent: u32,
    /// A returning backend's weight ramps from 10 % to 100 % over this (default 30 s; zero
    /// turns it off).
    pub slow_start: Duration,
}

/// `[retry]` plus the per-attempt timeout (`timeouts.request`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryConfig {
    /// Backends tried per request, first one included (default 3, at most [`MAX_ATTEMPTS`]).
    pub attempts: u32,
    /// Base of exponential backoff with full jitter, capped at 10× (default 10 ms; zero retries at once).
    pub backoff: Duration,
    /// Retries may add at most this percentage on top of the client requests of the last 10 s (default 20).
    pub budget_percent: u32,
    /// ... plus this many retries per second, from start-up on (default 10).
    pub min_retries_per_second: u32,
    /// One attempt's limit from sending to the response head (default 30 s).
    pub attempt_timeout: Duration,
}

/// How `p2c-ewma` estimates a backend's latency (peak EWMA, as Finagle and linkerd).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LatencyConfig {
    /// Decay time constant of the moving average (default 10 s).
    pub decay: Duration,
    /// Estimate for a backend with no sample yet (default 1 ms).
    pub default_rtt: Duration,
    /// Floor on a backend's latency estimate right after a failed attempt, fading to nothing
    /// within 5 s (or at once on a good response), so a backend that fails fast never looks
    /// fast (default 250 ms).
    pub failure_penalty: Duration,
}

// === impl Config ===

impl Config {
    /// Checks every field.
    ///
    /// # Errors
    /// The first [`ConfigError`] found.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.health.rise == 0 {
            return Err(ConfigError::ZeroThreshold("rise"));
        }
        if self.health.fall == 0 {
            return Err(ConfigError::ZeroThreshold("fall"));
        }
        let p = &self.passive;
        if p.consecutive_failures > 0 && p.ejection.is_zero() {
            return Err(ConfigError::ZeroDuration("ejection"));
        }
        if p.max_ejection < p.ejection {
            return Err(ConfigError::MaxEjectionBelowEjection);
        }
        percent("max_ejected_percent", p.max_ejected_percent)?;
        percent("panic_threshold_percent", p.panic_threshold_percent)?;
        let r = &self.retry;
        if r.attempts == 0 || r.attempts > MAX_ATTEMPTS {
            return Err(ConfigError::Attempts {
                got: r.attempts,
                max: MAX_ATTEMPTS,
            });
        }
        percent("budget_percent", r.budget_percent)?;
        if r.attempt_timeout.is_zero() {
            return Err(ConfigError::ZeroDuration("request timeout"));
        }
        if self.latency.decay.is_zero() {
            return Err(ConfigError::ZeroDuration("latency decay"));
        }
        Ok(())
    }
}

fn percent(name: &'static str, value: u32) -> Result<(), ConfigError> {
    if value > 100 {
        return Err(ConfigError::Percent { name, value });
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
            Err(ConfigError::Attempts {
                got: 0,
                max: MAX_ATTEMPTS
            })
        );
        let mut c = Config::default();
        c.passive.max_ejected_percent = 101;
        assert!(matches!(
            c.validate(),
            Err(ConfigError::Percent { value: 101, .. })
        ));
        let mut c = Config::default();
        c.health.fall = 0;
        assert_eq!(c.validate(), Err(ConfigError::ZeroThreshold("fall")));
        let mut c = Config::default();
        c.passive.max_ejection = Duration::from_secs(1);
        assert_eq!(c.validate(), Err(ConfigError::MaxEjectionBelowEjection));
        let mut c = Config::default();
        c.retry.budget_percent = 250;
        assert!(matches!(
            c.validate(),
            Err(ConfigError::Percent { value: 250, .. })
        ));
    }
}
