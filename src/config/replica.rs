//! The read replica's settings: [`Config::replica_url`] and
//! [`Config::replica_max_lag`], checked.

use super::{Config, check_ttl, redact_url};
use crate::error::{Error, Result};

impl Config {
    /// Checks the replica's settings on their own: a URL that parses (its
    /// password never shown) and a fence that lasts (at least 1 ms, at most
    /// [`MAX_TTL`](crate::MAX_TTL)).
    pub(crate) fn validate_replica(&self) -> Result<()> {
        let Some(url) = &self.replica_url else {
            return Ok(());
        };
        url.parse::<tokio_postgres::Config>().map_err(|e| {
            Error::invalid_argument(format!("replica_url {:?} does not parse", redact_url(url)))
                .with_source(e)
        })?;
        check_ttl("replica_max_lag", self.replica_max_lag)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn replica_settings_are_checked() {
        let mut c = Config::default();
        assert!(c.validate().is_ok());
        c.replica_url = Some("postgres://app:s3cret@replica:5432/test".into());
        assert!(c.validate().is_ok());
        assert!(!format!("{c:?}").contains("s3cret"));
        c.replica_max_lag = Duration::ZERO;
        let err = c.validate().unwrap_err();
        assert!(err.to_string().contains("replica_max_lag"), "{err}");
        c.replica_max_lag = Duration::from_secs(5);
        c.replica_url = Some("postgres://app:s3cret@replica:notaport/test".into());
        let err = c.validate().unwrap_err();
        assert!(err.to_string().contains("replica_url"), "{err}");
        assert!(!err.to_string().contains("s3cret"), "{err}");
    }

    #[test]
    fn from_env_reads_the_replica_url() {
        let c = Config::from_vars(|name| {
            (name == "DATABASE_REPLICA_URL").then(|| "postgres://u@replica/x".into())
        });
        assert_eq!(c.replica_url.as_deref(), Some("postgres://u@replica/x"));
        let c = Config::from_vars(|name| (name == "DATABASE_REPLICA_URL").then(|| "".into()));
        assert_eq!(c.replica_url, None);
    }
}
