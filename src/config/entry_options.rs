//! [`EntryOptions`]: what a caller decides per entry, over the engine's
//! defaults (FusionCache's entry options).

use std::time::Duration;

use super::{Config, MAX_TTL, check_ttl};
use crate::error::{Error, Result};

/// How one read caches its entry: TTLs, fail-safe, soft timeout and early
/// refresh, decided per call. Start from the engine's defaults
/// ([`CacheAside::entry_options`](crate::CacheAside::entry_options), which
/// come from its [`Config`]) and change what this entry needs.
///
/// ```no_run
/// use std::time::Duration;
/// # let engine = cacheaside::CacheAside::open(&cacheaside::Config::from_env())?;
/// // Prices change often and must not be served stale for long.
/// let prices = engine
///     .entry_options()
///     .ttl(Duration::from_secs(10))
///     .fail_safe_max(Duration::from_secs(30))
///     .beta(0.0); // no early refresh
/// let cents: Option<i64> = engine.get_or_load_with("price:A1", &prices, || Ok(Some(999)))?;
/// # Ok::<(), cacheaside::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct EntryOptions {
    /// How long the value is fresh. At most [`MAX_TTL`]. Defaults to
    /// [`Config::ttl`].
    pub ttl: Duration,
    /// How long an absent row is cached. At most [`MAX_TTL`]. Defaults to
    /// [`Config::negative_ttl`].
    pub negative_ttl: Duration,
    /// How long past its TTL the entry stays as a last-known-good copy
    /// (`ZERO`: fail-safe off for this entry). Defaults to
    /// [`Config::fail_safe_max`].
    pub fail_safe_max: Duration,
    /// With a fail-safe copy at hand, how long a reader waits for a reload
    /// before it takes the copy (`ZERO`: waits). Defaults to
    /// [`Config::soft_timeout`].
    pub soft_timeout: Duration,
    /// XFetch early-refresh aggressiveness (`0.0`: off). Defaults to
    /// [`Config::beta`].
    pub beta: f64,
}

impl EntryOptions {
    /// The engine-wide defaults `config` sets.
    pub fn from_config(config: &Config) -> EntryOptions {
        EntryOptions {
            ttl: config.ttl,
            negative_ttl: config.negative_ttl,
            fail_safe_max: config.fail_safe_max,
            soft_timeout: config.soft_timeout,
            beta: config.beta,
        }
    }

    /// Sets [`ttl`](Self::ttl).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// Sets [`negative_ttl`](Self::negative_ttl).
    pub fn negative_ttl(mut self, negative_ttl: Duration) -> Self {
        self.negative_ttl = negative_ttl;
        self
    }

    /// Sets [`fail_safe_max`](Self::fail_safe_max).
    pub fn fail_safe_max(mut self, fail_safe_max: Duration) -> Self {
        self.fail_safe_max = fail_safe_max;
        self
    }

    /// Sets [`soft_timeout`](Self::soft_timeout).
    pub fn soft_timeout(mut self, soft_timeout: Duration) -> Self {
        self.soft_timeout = soft_timeout;
        self
    }

    /// Sets [`beta`](Self::beta).
    pub fn beta(mut self, beta: f64) -> Self {
        self.beta = beta;
        self
    }

    /// Checks the options as a read does.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidArgument`](crate::ErrorKind) for a TTL of zero
    /// or beyond [`MAX_TTL`], a `fail_safe_max` beyond it, or a `beta` that is
    /// negative or not finite.
    pub(crate) fn check(&self) -> Result<()> {
        check_ttl("ttl", self.ttl)?;
        check_ttl("negative_ttl", self.negative_ttl)?;
        if self.fail_safe_max > MAX_TTL {
            return Err(Error::invalid_argument(
                "fail_safe_max is longer than the maximum TTL",
            ));
        }
        if !(self.beta.is_finite() && self.beta >= 0.0) {
            return Err(Error::invalid_argument("beta must be a finite number >= 0"));
        }
        Ok(())
    }
}
