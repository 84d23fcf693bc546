//! Settings: where the servers are, how big the pools are, how long things live.

use std::time::Duration;

use crate::error::{Error, Result};

/// Every setting of a [`Client`](crate::Client) or [`CacheAside`](crate::CacheAside).
///
/// Start from [`Config::default()`] or [`Config::from_env()`] and change the
/// fields you need; [`Config::validate`] (called when a client opens) rejects
/// unusable values with [`ErrorKind::InvalidArgument`](crate::ErrorKind).
///
/// ```
/// use std::time::Duration;
/// let mut config = cacheaside::Config::default();
/// config.namespace = "myapp:".into();
/// config.ttl = Duration::from_secs(300);
/// config.set_users_table("accounts.users").unwrap();
/// assert!(config.set_users_table("users; drop table users").is_err());
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Config {
    /// PostgreSQL URL. Defaults to `postgres://postgres@127.0.0.1:5432/test`.
    pub database_url: String,
    /// Redis URL. Defaults to `redis://127.0.0.1:6379/`.
    pub redis_url: String,
    /// Most Postgres connections one client opens. Defaults to 8, so ten
    /// processes fit under Postgres's default `max_connections` of 100.
    pub db_pool_size: u32,
    /// Most Redis connections one client opens. Defaults to 16.
    pub cache_pool_size: u32,
    /// Idle connections each pool keeps open; the rest are opened on demand.
    /// Defaults to 1.
    pub pool_min_idle: u32,
    /// How long a caller waits for a free pooled connection before
    /// [`ErrorKind::Timeout`](crate::ErrorKind). Defaults to 5 s.
    pub pool_timeout: Duration,
    /// TCP connect timeout for both servers. Defaults to 3 s.
    pub connect_timeout: Duration,
    /// Read and write timeout of every Redis command; without one a
    /// synchronous connection blocks forever on a hung server. Defaults to 3 s.
    pub cache_io_timeout: Duration,
    /// Postgres `statement_timeout` set on every connection. Defaults to 10 s.
    pub statement_timeout: Duration,
    /// TTL of a cached value. Defaults to 60 s.
    pub ttl: Duration,
    /// TTL of a cached "absent" entry (negative caching). Defaults to 10 s.
    pub negative_ttl: Duration,
    /// Prefix of every Redis key this client touches, e.g. `"myapp:"`.
    /// May not contain `{` or `}` (they delimit the cluster hash tag).
    /// Defaults to `""`.
    pub namespace: String,
    /// Table the lab's user functions read and write; an SQL identifier,
    /// optionally schema-qualified. Defaults to `users`.
    pub users_table: String,
    /// How long a reader's lease (its right to fill a missed key) lives.
    /// A fill after it expired is dropped. Defaults to 10 s.
    pub lease_ttl: Duration,
    /// How long the cross-process rebuild lock lives if its holder dies
    /// without releasing it. Defaults to 5 s.
    pub lock_ttl: Duration,
    /// Longest a reader waits for another process's rebuild before loading
    /// the value itself. Defaults to 10 s.
    pub lock_wait: Duration,
    /// How often a reader waiting on another process's rebuild looks for the
    /// value. Defaults to 2 ms.
    pub lock_poll: Duration,
    /// XFetch early-refresh aggressiveness; `0.0` turns early refresh off,
    /// larger values refresh earlier. Defaults to 1.0.
    pub beta: f64,
    /// The longest a session of [`Client::sessions`](crate::Client::sessions)
    /// (and of the C `cacheaside_session_create`) lives, however often it is
    /// read: reads renew its idle TTL only up to this deadline. Defaults to
    /// 24 hours.
    pub session_max_lifetime: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            database_url: "postgres://postgres@127.0.0.1:5432/test".into(),
            redis_url: "redis://127.0.0.1:6379/".into(),
            db_pool_size: 8,
            cache_pool_size: 16,
            pool_min_idle: 1,
            pool_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(3),
            cache_io_timeout: Duration::from_secs(3),
            statement_timeout: Duration::from_secs(10),
            ttl: Duration::from_secs(60),
            negative_ttl: Duration::from_secs(10),
            namespace: String::new(),
            users_table: "users".into(),
            lease_ttl: Duration::from_secs(10),
            lock_ttl: Duration::from_secs(5),
            lock_wait: Duration::from_secs(10),
            lock_poll: Duration::from_millis(2),
            beta: 1.0,
            session_max_lifetime: Duration::from_secs(24 * 60 * 60),
        }
    }
}

impl Config {
    /// The defaults, with `DATABASE_URL` and `REDIS_URL` taken from the
    /// environment when set.
    pub fn from_env() -> Self {
        let mut config = Config::default();
        if let Ok(url) = std::env::var("DATABASE_URL") {
            config.database_url = url;
        }
        if let Ok(url) = std::env::var("REDIS_URL") {
            config.redis_url = url;
        }
        config
    }

    /// Sets [`users_table`](Config::users_table) after checking it is an SQL
    /// identifier.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidArgument`](crate::ErrorKind) when it is not.
    pub fn set_users_table(&mut self, table: &str) -> Result<()> {
        validate_table_name(table)?;
        self.users_table = table.to_owned();
        Ok(())
    }

    /// Sets [`namespace`](Config::namespace) after checking it.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidArgument`](crate::ErrorKind) when it holds `{`,
    /// `}` or a control character.
    pub fn set_namespace(&mut self, namespace: &str) -> Result<()> {
        validate_namespace(namespace)?;
        self.namespace = namespace.to_owned();
        Ok(())
    }

    /// Checks every setting; a client refuses to open with an invalid one.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidArgument`](crate::ErrorKind) naming the setting.
    pub fn validate(&self) -> Result<()> {
        validate_table_name(&self.users_table)?;
        validate_namespace(&self.namespace)?;
        if self.db_pool_size == 0 || self.cache_pool_size == 0 {
            return Err(Error::invalid_argument("pool sizes must be at least 1"));
        }
        let nonzero = [
            ("pool_timeout", self.pool_timeout),
            ("connect_timeout", self.connect_timeout),
            ("cache_io_timeout", self.cache_io_timeout),
            ("statement_timeout", self.statement_timeout),
            ("ttl", self.ttl),
            ("negative_ttl", self.negative_ttl),
            ("lease_ttl", self.lease_ttl),
            ("lock_ttl", self.lock_ttl),
            ("lock_poll", self.lock_poll),
            ("session_max_lifetime", self.session_max_lifetime),
        ];
        for (name, value) in nonzero {
            if value.as_millis() == 0 {
                return Err(Error::invalid_argument(format!(
                    "{name} must be at least 1 ms"
                )));
            }
        }
        if self.session_max_lifetime > crate::Sessions::MAX_LIFETIME {
            return Err(Error::invalid_argument(
                "session_max_lifetime must be at most 366 days",
            ));
        }
        if !(self.beta.is_finite() && self.beta >= 0.0) {
            return Err(Error::invalid_argument("beta must be a finite number >= 0"));
        }
        Ok(())
    }
}

/// Accepts `name` or `schema.name`, each part `[A-Za-z_][A-Za-z0-9_]*` and at
/// most 63 bytes (Postgres's identifier limit). Such a name is safe to place
/// in SQL text, which is the only place a table name can go (parameters bind
/// values, not identifiers).
pub(crate) fn validate_table_name(name: &str) -> Result<()> {
    let valid_part = |part: &str| {
        let mut chars = part.chars();
        matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
            && part.len() <= 63
    };
    let parts: Vec<&str> = name.split('.').collect();
    if parts.len() <= 2 && parts.iter().all(|p| valid_part(p)) {
        Ok(())
    } else {
        Err(Error::invalid_argument(format!(
            "table name {name:?} is not an SQL identifier (letters, digits, '_', optionally schema-qualified)"
        )))
    }
}

pub(crate) fn validate_namespace(namespace: &str) -> Result<()> {
    if namespace
        .chars()
        .any(|c| c == '{' || c == '}' || c.is_control())
    {
        return Err(Error::invalid_argument(format!(
            "namespace {namespace:?} may not contain '{{', '}}' or control characters"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names() {
        for ok in ["users", "_t1", "app.users", "Users_2"] {
            assert!(validate_table_name(ok).is_ok(), "{ok}");
        }
        let long = "a".repeat(64);
        for bad in [
            "",
            "1users",
            "users;drop",
            "a.b.c",
            "a.",
            ".a",
            "us ers",
            "\"users\"",
            "usérs",
            &long,
        ] {
            assert!(validate_table_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn namespaces() {
        assert!(validate_namespace("").is_ok());
        assert!(validate_namespace("app:v1:").is_ok());
        assert!(validate_namespace("a{b").is_err());
        assert!(validate_namespace("a\nb").is_err());
    }

    #[test]
    fn validate_rejects_zero_durations_and_bad_beta() {
        let mut c = Config::default();
        assert!(c.validate().is_ok());
        c.ttl = Duration::ZERO;
        assert!(c.validate().is_err());
        let c = Config {
            beta: f64::NAN,
            ..Config::default()
        };
        assert!(c.validate().is_err());
    }
}
