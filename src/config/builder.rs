//! [`ConfigBuilder`]: settings by name, validated once, with the values that
//! follow from others derived unless set.

use std::path::PathBuf;
use std::time::Duration;

use super::{Config, LocalCache, redact_url};
use crate::error::Result;

/// Builds a [`Config`]: set what you need, [`build`](Self::build) derives
/// what follows from it and validates the whole (as r2d2's `Builder`).
///
/// Derived unless set explicitly:
/// - `lock_wait`: `pool_timeout + statement_timeout`, the longest a
///   database load may take (so raising `statement_timeout` raises it);
/// - `lease_ttl` and `lock_ttl`: 3 s, or 3 × `cache_timeout` if longer;
/// - `fail_safe_throttle`: 5 s, or `fail_safe_max` if fail-safe is on and
///   shorter.
///
/// An explicit value is kept as given, and [`build`](Self::build) refuses
/// it if it does not fit (as [`Config::validate`] does). The public fields
/// of [`Config`] can still be set directly; only the builder derives.
///
/// ```
/// use std::time::Duration;
/// use cacheaside::Config;
///
/// let config = Config::builder()
///     .urls_from_env()
///     .namespace("shop:")
///     .statement_timeout(Duration::from_secs(30))
///     .build()?;
/// assert_eq!(config.lock_wait, config.pool_timeout + Duration::from_secs(30));
/// # Ok::<(), cacheaside::Error>(())
/// ```
#[derive(Clone)]
#[must_use = "a builder does nothing until `build` is called"]
pub struct ConfigBuilder {
    config: Config,
    lock_wait: Option<Duration>,
    lease_ttl: Option<Duration>,
    lock_ttl: Option<Duration>,
    fail_safe_throttle: Option<Duration>,
    redis_cluster: Option<Vec<String>>,
}

/// As [`Config`]'s: the URLs (the cluster's nodes too) without their
/// passwords.
impl std::fmt::Debug for ConfigBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let nodes = self
            .redis_cluster
            .as_ref()
            .map(|nodes| nodes.iter().map(|n| redact_url(n)).collect::<Vec<_>>());
        f.debug_struct("ConfigBuilder")
            .field("config", &self.config)
            .field("lock_wait", &self.lock_wait)
            .field("lease_ttl", &self.lease_ttl)
            .field("lock_ttl", &self.lock_ttl)
            .field("fail_safe_throttle", &self.fail_safe_throttle)
            .field("redis_cluster", &nodes)
            .finish()
    }
}

/// Setters that store a field as given.
macro_rules! setters {
    ($($(#[$doc:meta])* $name:ident: $ty:ty),+ $(,)?) => {
        $(
            $(#[$doc])*
            pub fn $name(mut self, value: $ty) -> Self {
                self.config.$name = value.into();
                self
            }
        )+
    };
}

/// Setters of derived fields: an explicit value wins over the derivation.
macro_rules! overrides {
    ($($(#[$doc:meta])* $name:ident),+ $(,)?) => {
        $(
            $(#[$doc])*
            pub fn $name(mut self, value: Duration) -> Self {
                self.$name = Some(value);
                self
            }
        )+
    };
}

impl Config {
    /// A [`ConfigBuilder`] starting from the defaults.
    ///
    /// ```
    /// let config = cacheaside::Config::builder().namespace("app:").build()?;
    /// assert_eq!(config.namespace, "app:");
    /// # Ok::<(), cacheaside::Error>(())
    /// ```
    pub fn builder() -> ConfigBuilder {
        ConfigBuilder {
            config: Config::default(),
            lock_wait: None,
            lease_ttl: None,
            lock_ttl: None,
            fail_safe_throttle: None,
            redis_cluster: None,
        }
    }
}

impl ConfigBuilder {
    /// Takes `DATABASE_URL`, `REDIS_URL`, `DATABASE_CA_FILE`,
    /// `REDIS_CA_FILE` and `DATABASE_REPLICA_URL` from the environment where
    /// set, as
    /// [`Config::from_env`] does.
    pub fn urls_from_env(mut self) -> Self {
        let env = Config::from_env();
        self.config.database_url = env.database_url;
        self.config.redis_url = env.redis_url;
        self.config.database_ca_file = env.database_ca_file;
        self.config.redis_ca_file = env.redis_ca_file;
        self.config.replica_url = env.replica_url;
        self
    }

    /// Sets the Redis Cluster seed nodes, as
    /// [`Config::set_redis_cluster`] (checked by [`build`](Self::build)).
    pub fn redis_cluster<S: AsRef<str>>(mut self, nodes: &[S]) -> Self {
        self.redis_cluster = Some(nodes.iter().map(|n| n.as_ref().to_owned()).collect());
        self
    }

    setters! {
        /// Sets [`Config::database_url`].
        database_url: impl Into<String>,
        /// Sets [`Config::redis_url`].
        redis_url: impl Into<String>,
        /// Sets [`Config::redis_ca_file`].
        redis_ca_file: Option<PathBuf>,
        /// Sets [`Config::database_ca_file`].
        database_ca_file: Option<PathBuf>,
        /// Sets [`Config::replica_url`]: loads read this replica, fenced by
        /// the committed version of their key.
        ///
        /// ```
        /// let config = cacheaside::Config::builder()
        ///     .replica_url(Some("postgres://app@replica:5432/app".into()))
        ///     .build()?;
        /// assert!(format!("{config:?}").contains("replica:5432"));
        /// # Ok::<(), cacheaside::Error>(())
        /// ```
        replica_url: Option<String>,
        /// Sets [`Config::replica_max_lag`].
        replica_max_lag: Duration,
        /// Sets [`Config::db_pool_size`].
        db_pool_size: u32,
        /// Sets [`Config::cache_pool_size`].
        cache_pool_size: u32,
        /// Sets [`Config::pool_min_idle`].
        pool_min_idle: u32,
        /// Sets [`Config::pool_timeout`] (`lock_wait` follows).
        pool_timeout: Duration,
        /// Sets [`Config::connect_timeout`].
        connect_timeout: Duration,
        /// Sets [`Config::cache_timeout`] (the lease and lock TTLs follow).
        cache_timeout: Duration,
        /// Sets [`Config::statement_timeout`] (`lock_wait` follows).
        statement_timeout: Duration,
        /// Sets [`Config::ttl`] (the lab's `Client` only; the engine takes
        /// a TTL per call).
        ttl: Duration,
        /// Sets [`Config::negative_ttl`].
        negative_ttl: Duration,
        /// Sets [`Config::namespace`] (checked by [`build`](Self::build)).
        namespace: impl Into<String>,
        /// Sets [`Config::users_table`] (the lab's; checked by
        /// [`build`](Self::build)).
        users_table: impl Into<String>,
        /// Sets [`Config::lock_poll`].
        lock_poll: Duration,
        /// Sets [`Config::beta`].
        beta: f64,
        /// Sets [`Config::fail_safe_max`] (`fail_safe_throttle` follows).
        fail_safe_max: Duration,
        /// Sets [`Config::soft_timeout`].
        soft_timeout: Duration,
        /// Sets [`Config::breaker_failures`].
        breaker_failures: u32,
        /// Sets [`Config::breaker_cool_off`].
        breaker_cool_off: Duration,
        /// Sets [`Config::background_threads`].
        background_threads: u32,
        /// Sets [`Config::invalidation_relay`].
        invalidation_relay: bool,
        /// Sets [`Config::relay_poll`].
        relay_poll: Duration,
        /// Sets [`Config::relay_listen`].
        relay_listen: bool,
        /// Sets [`Config::outbox_table`] (checked by [`build`](Self::build)).
        outbox_table: impl Into<String>,
        /// Sets [`Config::outbox_retention`].
        outbox_retention: Duration,
        /// Sets [`Config::statement_cache_size`].
        statement_cache_size: usize,
        /// Sets [`Config::session_max_lifetime`].
        session_max_lifetime: Duration,
        /// Sets [`Config::write_behind_max_backlog`].
        write_behind_max_backlog: u64,
        /// Sets [`Config::write_behind_batch`].
        write_behind_batch: u32,
        /// Sets [`Config::write_behind_claim_after`].
        write_behind_claim_after: Duration,
        /// Sets [`Config::write_behind_attempts`].
        write_behind_attempts: u32,
        /// Sets [`Config::write_behind_retry_backoff`].
        write_behind_retry_backoff: Duration,
        /// Sets [`Config::local_cache`].
        local_cache: LocalCache,
    }

    overrides! {
        /// Sets [`Config::lock_wait`] instead of deriving it.
        lock_wait,
        /// Sets [`Config::lease_ttl`] instead of deriving it.
        lease_ttl,
        /// Sets [`Config::lock_ttl`] instead of deriving it.
        lock_ttl,
        /// Sets [`Config::fail_safe_throttle`] instead of deriving it.
        fail_safe_throttle,
    }

    /// Derives what was not set, and validates the whole.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidArgument`](crate::ErrorKind) naming the
    /// settings, as [`Config::validate`].
    pub fn build(self) -> Result<Config> {
        let mut config = self.config;
        if let Some(nodes) = self.redis_cluster {
            config.set_redis_cluster(&nodes)?;
        }
        config.lock_wait = self
            .lock_wait
            .unwrap_or(config.pool_timeout + config.statement_timeout);
        let renewable = Duration::from_secs(3).max(config.cache_timeout * 3);
        config.lease_ttl = self.lease_ttl.unwrap_or(renewable);
        config.lock_ttl = self.lock_ttl.unwrap_or(renewable);
        config.fail_safe_throttle = self.fail_safe_throttle.unwrap_or_else(|| {
            let throttle = Duration::from_secs(5);
            if config.fail_safe_max.is_zero() {
                throttle
            } else {
                throttle.min(config.fail_safe_max)
            }
        });
        config.validate()?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_build_the_default_config() {
        let built = Config::builder().build().unwrap();
        assert_eq!(format!("{built:?}"), format!("{:?}", Config::default()));
    }

    #[test]
    fn derived_values_follow_and_explicit_ones_win() {
        let config = Config::builder()
            .cache_timeout(Duration::from_secs(2))
            .fail_safe_max(Duration::from_secs(1))
            .build()
            .unwrap();
        assert_eq!(config.lease_ttl, Duration::from_secs(6));
        assert_eq!(config.lock_ttl, Duration::from_secs(6));
        assert_eq!(config.fail_safe_throttle, Duration::from_secs(1));
        let err = Config::builder()
            .statement_timeout(Duration::from_secs(30))
            .lock_wait(Duration::from_secs(15))
            .build()
            .unwrap_err();
        assert!(err.to_string().contains("lock_wait"), "{err}");
        assert!(Config::builder().namespace("a{b}").build().is_err());
        assert!(
            Config::builder()
                .redis_cluster::<&str>(&[])
                .build()
                .is_err()
        );
    }

    #[test]
    fn a_builder_debug_shows_no_password() {
        let builder = Config::builder()
            .redis_url("redis://u:s3cret@h:1/")
            .redis_cluster(&["redis://u:s3cret@h:7001"]);
        let shown = format!("{builder:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
    }
}
