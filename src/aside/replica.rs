//! Loads from a read replica ([`Config::replica_url`](crate::Config::replica_url)),
//! fenced by the committed version of their key ([`crate::fence`]).

use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{CacheAside, pair};
use crate::db::Db;
use crate::engine::{Inline, Mode, encoded};
use crate::entry::Versioned;
use crate::error::Result;
use crate::fence::Source;
use crate::near::Slot;

impl CacheAside {
    /// [`get_or_load_versioned`](Self::get_or_load_versioned) for a loader
    /// that reads through the [`Db`] it is given: the read replica
    /// ([`Config::replica_url`](crate::Config::replica_url)) when the key's
    /// fence admits the row it returns, else the primary.
    ///
    /// A replica lags, so a miss right after a write could read the
    /// pre-write row there. Every write of the library (and the relay, and
    /// the write-behind workers) leaves the committed version in the key's
    /// fence for [`Config::replica_max_lag`](crate::Config::replica_max_lag)
    /// before it revokes the key's lease. This read looks at the fence
    /// first: a replica row of an older version (an absent row counts as
    /// version 0), or any row when the version was unknown (a plain
    /// [`invalidate`](Self::invalidate), a delete, a write-behind commit),
    /// is *read again from the primary*, and the primary's row is what the
    /// caller gets and what is cached. So no read returns, and no fill
    /// caches, a row older than a write that returned before the read
    /// began. A fence lives `replica_max_lag`, so while the replica is
    /// measured that far behind (or more), its loads run on the primary
    /// too; so do they with the fence unreadable (Redis down, the breaker
    /// open) or the replica failing. `load` may therefore run twice; without a replica it runs
    /// once, on the primary.
    ///
    /// Counted in [`Stats::replica_loads`](crate::Stats::replica_loads),
    /// [`Stats::replica_fenced`](crate::Stats::replica_fenced) and
    /// [`Stats::replica_skipped`](crate::Stats::replica_skipped).
    ///
    /// ```no_run
    /// # let engine = cacheaside::CacheAside::open(&cacheaside::Config::from_env())?;
    /// use cacheaside::{Mode, Versioned};
    /// let sql = "SELECT name, version FROM products WHERE id = $1";
    /// let name: Option<String> = engine.get_or_load_versioned_from_replica(
    ///     "product:7", std::time::Duration::from_secs(60), Mode::SingleFlight, |db| {
    ///         let row = db.query_opt(sql, &[&7_i64])?;
    ///         Ok(row.map(|r| Versioned::new(r.get(0), r.get::<_, i64>(1) as u64)))
    ///     })?;
    /// # Ok::<(), cacheaside::Error>(())
    /// ```
    ///
    /// # Errors
    /// As [`get_or_load`](Self::get_or_load); the primary's error when the
    /// load fails on both.
    pub fn get_or_load_versioned_from_replica<T, V, F>(
        &self,
        key: &str,
        ttl: Duration,
        mode: Mode,
        load: F,
    ) -> Result<Option<T>>
    where
        T: Serialize + DeserializeOwned,
        V: Into<Versioned<T>>,
        F: Fn(&Db) -> Result<Option<V>>,
    {
        let engine = &self.inner.engine;
        let source = engine.source(key);
        let counters = &engine.counters;
        engine.read(
            &self.inner.background,
            key,
            self.entry_options().ttl(ttl),
            mode,
            Inline(move || encoded(counters, || source.load(|db| Ok(load(db)?.map(pair))))),
            Slot::decode,
        )
    }

    /// One `SELECT 1` on the read replica, if there is one (not counted):
    /// see [`ping`](Self::ping).
    pub(super) fn ping_replica(&self) -> Result<()> {
        let Some(replica) = self.inner.engine.db.replica() else {
            return Ok(());
        };
        match replica.uncounted().query_opt("SELECT 1", &[]) {
            Ok(_) => Ok(()),
            Err(err) => {
                let message = format!("read replica: {err}");
                Err(err.reworded(message))
            }
        }
    }

    /// Where a load of `key` reads (the lab's reads go through it).
    pub(crate) fn source(&self, key: &str) -> Source {
        self.inner.engine.source(key)
    }
}
