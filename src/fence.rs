//! Fences: loads from a lagging read replica that cannot cache (or return)
//! a row older than a write that already returned.
//!
//! The race a lease cannot see: a write commits on the primary and
//! invalidates the key; a reader then misses, takes the lease and reads the
//! replica, which has not replayed the write yet. Nothing revoked that
//! lease (the write finished before it was taken), so the pre-write row
//! would be filled. A replica row carries no proof of its age; the writer
//! knows the committed version, so it leaves it behind:
//!
//! - Every write of the library (an invalidation, a write-through, the
//!   relay applying a captured change, a write-behind worker settling a
//!   commit) raises the key's fence (`…:fence`, in the key's slot) *before*
//!   it revokes the key's lease: to the committed version, or to `*` when
//!   the version is unknown (a plain invalidation, a delete, a table with
//!   no version column, a write-behind commit). A fence only rises (`*`
//!   stays), and lives [`Config::replica_max_lag`](crate::Config::replica_max_lag)
//!   from the last write.
//! - A load reads the fence *after* the read began (and, when it loads to
//!   fill, after its lease was taken), then the replica. A row of the
//!   fence's version or newer is used; a lower one (an absent row counts as
//!   version 0), or any row under a `*` fence, is read again from the
//!   primary, and that row is the caller's answer and the fill.
//!
//! Why that is enough: a write that returned before the read began raised
//! its fence before the read looked, so the read sees it; a write that
//! comes later revokes the lease (its fence rises first), so the fill is
//! dropped as without a replica. A read that cannot see the fences (Redis
//! unreachable, this process's breaker open) reads the primary.
//!
//! A fence expires `replica_max_lag` after its write, so a replica further
//! behind than that must not be read at all: [`LagWatch`] measures the
//! replica's replay lag (at most every [`LAG_EVERY`]) and sends loads to
//! the primary while the lag, plus the time since it was measured, is not
//! below `replica_max_lag`. What it cannot see: WAL the replica has not
//! even received yet (a partition between the servers); there the bound is
//! the replica's own `wal_receiver_timeout`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use redis::Script;

use crate::breaker::Breaker;
use crate::cache::Cache;
use crate::db::Db;
use crate::error::Result;
use crate::keys::fence_key;
use crate::lease::OLDER;
use crate::observe::{Counters, report};
use crate::redis_conn::millis;

/// What a key's fence says about loads from the replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fence {
    /// No write within the replica's accepted lag: any row will do.
    Open,
    /// A write committed this version: an older row is stale.
    AtLeast(u64),
    /// A write of unknown version: read the primary.
    Closed,
}

impl Fence {
    /// Parses a fence's stored text; anything but a version reads as closed
    /// (a value we did not write must not open the gate).
    fn parse(raw: Option<&str>) -> Fence {
        match raw {
            None => Fence::Open,
            Some(text) => text.parse().map_or(Fence::Closed, Fence::AtLeast),
        }
    }

    /// True when a replica row of `version` (0 for an absent row) may be
    /// used.
    pub(crate) fn admits(self, version: u64) -> bool {
        match self {
            Fence::Open => true,
            Fence::AtLeast(fence) => version >= fence,
            Fence::Closed => false,
        }
    }
}

/// Raises the fence of each value key to its committed version (`None`:
/// unknown, which closes it) for `ttl`, in one round trip (one per key on a
/// cluster, where the keys live in many slots). Call it before the write's
/// invalidation or write-through reaches the key.
pub(crate) fn raise(cache: &Cache, fences: &[(&str, Option<u64>)], ttl: Duration) -> Result<()> {
    let ttl_ms = millis(ttl);
    let call = |value_key: &str, version: Option<u64>| {
        let mut call = SCRIPTS.raise.key(fence_key(value_key));
        call.arg(version.map_or_else(|| "*".to_owned(), |v| v.to_string()))
            .arg(ttl_ms);
        call
    };
    if cache.is_cluster() || fences.len() == 1 {
        for (value_key, version) in fences {
            cache.run(|conn| call(value_key, *version).invoke::<i64>(conn))?;
        }
        return Ok(());
    }
    cache.run(|conn| {
        let mut pipe = redis::pipe();
        // Pipelined EVALSHA has no EVAL fallback: load the script first.
        pipe.cmd("SCRIPT")
            .arg("LOAD")
            .arg(&SCRIPTS.raise_code)
            .ignore();
        for (value_key, version) in fences {
            pipe.invoke_script(&call(value_key, *version)).ignore();
        }
        pipe.query::<()>(conn)
    })
}

/// The fence of `value_key` now.
pub(crate) fn read(cache: &Cache, value_key: &str) -> Result<Fence> {
    let raw: Option<Vec<u8>> =
        cache.run(|conn| redis::cmd("GET").arg(fence_key(value_key)).query(conn))?;
    Ok(Fence::parse(
        raw.as_deref()
            .map(|raw| std::str::from_utf8(raw).unwrap_or("")),
    ))
}

/// Where a load reads: the primary, or the replica under the key's fence.
/// Cheap to clone; owns what it needs, so an owned loader can carry it to
/// a background thread.
#[derive(Clone)]
pub(crate) struct Source {
    primary: Db,
    replica: Option<Replica>,
}

#[derive(Clone)]
struct Replica {
    db: Db,
    cache: Cache,
    value_key: String,
    breaker: Arc<Breaker>,
    counters: Arc<Counters>,
    lag: Arc<LagWatch>,
}

/// How often the replica's lag is measured (by the load that finds the
/// last measure older; the others go by the last one meanwhile).
pub(crate) const LAG_EVERY: Duration = Duration::from_millis(250);

/// On the replica: how far its replay is behind, in seconds. Everything
/// received replayed: 0. Else the time since the last commit it replayed,
/// which is at least the age of the oldest commit it has not (an
/// overestimate when the primary was quiet before: reads then go to the
/// primary, the safe side). Not in recovery (not a replica): 0.
const LAG_SQL: &str = "SELECT CASE WHEN pg_is_in_recovery() \
    AND pg_last_wal_receive_lsn() IS DISTINCT FROM pg_last_wal_replay_lsn() \
    THEN COALESCE(EXTRACT(epoch FROM now() - pg_last_xact_replay_timestamp()), 1e9) \
    ELSE 0 END::float8";

/// Whether the replica is close enough behind for the fences to cover it.
pub(crate) struct LagWatch {
    /// [`Config::replica_max_lag`](crate::Config::replica_max_lag).
    max: Duration,
    /// When the lag was last measured, and what it was (`Duration::MAX`:
    /// the measure failed). Locked only to copy it in or out.
    last: Mutex<Option<(Instant, Duration)>>,
    /// A load is measuring now: the others do not wait for it.
    measuring: AtomicBool,
}

impl LagWatch {
    pub(crate) fn new(max: Duration) -> LagWatch {
        LagWatch {
            max,
            last: Mutex::new(None),
            measuring: AtomicBool::new(false),
        }
    }

    /// True when the replica's lag, as last measured plus the time since
    /// (it cannot have grown faster), is below the maximum. Measures it
    /// first when the last measure is older than [`LAG_EVERY`] and no other
    /// load is measuring. Never measured yet: false.
    fn admits(&self, replica: &Db) -> bool {
        let last = *self.last.lock();
        let due = last.is_none_or(|(at, _)| at.elapsed() >= LAG_EVERY);
        if due && !self.measuring.swap(true, Ordering::AcqRel) {
            // Not counted in the replica's query_count: the library's own.
            let lag = match replica.uncounted().query_opt(LAG_SQL, &[]) {
                Ok(Some(row)) => row
                    .try_get::<_, f64>(0)
                    .ok()
                    .and_then(|secs| Duration::try_from_secs_f64(secs.max(0.0)).ok())
                    .unwrap_or(Duration::MAX),
                Ok(None) => Duration::MAX,
                Err(err) => {
                    report!(debug, "cannot measure the replica's lag: {}", err.chain());
                    Duration::MAX
                }
            };
            *self.last.lock() = Some((Instant::now(), lag));
            self.measuring.store(false, Ordering::Release);
        }
        match *self.last.lock() {
            Some((at, lag)) => lag.saturating_add(at.elapsed()) < self.max,
            None => false,
        }
    }
}

impl Source {
    /// Loads of cache key `key`: from `primary`'s replica under the key's
    /// fence when it has one, else from `primary`.
    pub(crate) fn new(
        primary: &Db,
        cache: &Cache,
        key: &str,
        breaker: &Arc<Breaker>,
        counters: &Arc<Counters>,
        lag: &Arc<LagWatch>,
    ) -> Source {
        Source {
            primary: primary.clone(),
            replica: primary.replica().map(|db| Replica {
                db: db.clone(),
                cache: cache.clone(),
                value_key: cache.redis_key(key),
                breaker: Arc::clone(breaker),
                counters: Arc::clone(counters),
                lag: Arc::clone(lag),
            }),
        }
    }

    /// Runs `load` against the replica when the key's fence admits the row
    /// it returns, else (a fence below it or closed, a fence that cannot be
    /// read, a replica too far behind or failing) against the primary: the
    /// row returned is never older than a write that returned before this
    /// call began. `load` returns the row and its version (0: unversioned).
    pub(crate) fn load<T>(
        &self,
        load: impl Fn(&Db) -> Result<Option<(T, u64)>>,
    ) -> Result<Option<(T, u64)>> {
        let Some(replica) = &self.replica else {
            return load(&self.primary);
        };
        // Read before the replica is, and after the read began (and after
        // the lease, for a load that fills): see the module docs.
        let generation = replica.cache.server_generation();
        let fence = if replica.breaker.is_open() {
            // This process does not trust what Redis says now (nor wait on
            // it): no fence to go by.
            None
        } else {
            match read(&replica.cache, &replica.value_key) {
                // A Redis server that changed under the GET (a restart, a
                // failover) may have lost fences: its answer proves nothing
                // (the change trips the breaker first, see server_watch).
                Ok(_) if replica.cache.server_generation() != generation => None,
                Ok(fence) if !replica.breaker.is_open() => Some(fence),
                Ok(_) => None,
                Err(err) => {
                    report!(debug, "cannot read a replica fence: {}", err.chain());
                    None
                }
            }
        };
        let counters = &replica.counters;
        // A fence lives replica_max_lag: a replica further behind than that
        // may lack a write whose fence is gone, so it is not read at all.
        let fence = fence.filter(|_| replica.lag.admits(&replica.db));
        let Some(fence) = fence else {
            counters.replica_skipped.bump();
            return load(&self.primary);
        };
        if fence == Fence::Closed {
            counters.replica_fenced.bump();
            return load(&self.primary);
        }
        match load(&replica.db) {
            Ok(row) if fence.admits(row.as_ref().map_or(0, |(_, version)| *version)) => {
                counters.replica_loads.bump();
                Ok(row)
            }
            Ok(_) => {
                counters.replica_fenced.bump();
                load(&self.primary)
            }
            Err(err) => {
                report!(
                    debug,
                    "a replica load failed; reading the primary: {}",
                    err.chain()
                );
                counters.replica_skipped.bump();
                load(&self.primary)
            }
        }
    }
}

struct Scripts {
    raise: Script,
    raise_code: String,
}

static SCRIPTS: once_cell::sync::Lazy<Scripts> = once_cell::sync::Lazy::new(|| {
    // KEYS: fence. ARGV: version or '*', ttl_ms. The fence only rises ('*'
    // stays): two writers' fences in either order leave the higher one.
    let raise_code = format!(
        r"{OLDER}
        local new = ARGV[1]
        if redis.call('TYPE', KEYS[1]).ok == 'string' then
          local cur = redis.call('GET', KEYS[1])
          if cur == '*' then
            new = '*'
          elseif new ~= '*' and string.match(cur, '^%d+$') and older(new, cur) then
            new = cur
          end
        end
        redis.call('SET', KEYS[1], new, 'PX', ARGV[2])
        return 1
        "
    );
    Scripts {
        raise: Script::new(&raise_code),
        raise_code,
    }
});

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fences_admit_rows_of_their_version_or_newer() {
        assert!(Fence::parse(None).admits(0));
        let fence = Fence::parse(Some("7"));
        assert_eq!(fence, Fence::AtLeast(7));
        assert!(!fence.admits(0) && !fence.admits(6));
        assert!(fence.admits(7) && fence.admits(u64::MAX));
        for closed in ["*", "", "x1", "-1"] {
            assert!(!Fence::parse(Some(closed)).admits(u64::MAX), "{closed}");
        }
    }
}
