//! The generic cache-aside engine: any key, any `Serialize + DeserializeOwned`
//! value, any loader.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::cache::{Acquired, Cache, Claim, Keys, new_token, ttl_millis};
use crate::config::Config;
use crate::db::Db;
use crate::entry::{Entry, Payload};
use crate::error::{Error, ErrorKind, Result};
use crate::singleflight::{Role, SingleFlight, WaitError};

/// How a read that misses the cache reaches the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Mode {
    /// Every caller that misses loads for itself (the naive pattern; still
    /// lease-protected, so it never caches a stale row).
    Plain,
    /// One load per key at a time: in this process through single-flight,
    /// across processes through a Redis rebuild lock.
    SingleFlight,
}

/// The cache-aside engine: Redis in front of any loader.
///
/// Reads check Redis first (one round trip on a hit). On a miss the reader
/// takes a *lease* before it loads, and its fill is stored only if the lease
/// is still its own, so a write that invalidates the key while the load runs
/// makes the fill be dropped rather than cache the pre-write row. Absent rows
/// are cached too (for [`Config::negative_ttl`]). Near expiry, XFetch lets
/// one caller refresh the value early while the others keep reading it.
///
/// `CacheAside` is `Send + Sync`: share one (by reference or in an `Arc`)
/// between all threads. Every method blocks.
///
/// ```no_run
/// use std::time::Duration;
/// use cacheaside::{CacheAside, Config};
///
/// let engine = CacheAside::open(&Config::from_env())?;
/// let db = engine.db().clone();
/// let count: Option<i64> = engine.get_or_load_singleflight("orders:count", Duration::from_secs(30), || {
///     let row = db.query_one("SELECT count(*) FROM pg_class", &[])?;
///     Ok(row.map(|r| r.get(0)))
/// })?;
/// # Ok::<(), cacheaside::Error>(())
/// ```
pub struct CacheAside {
    db: Db,
    cache: Cache,
    flights: SingleFlight<Shared>,
    settings: Settings,
    counters: Counters,
    #[cfg(feature = "test-hooks")]
    hooks: crate::hooks::Hooks,
}

/// What a single-flight leader hands its followers.
type Shared = Result<Landed, Error>;

#[derive(Clone)]
enum Landed {
    /// The JSON of the value, stored in the cache.
    Value(Arc<[u8]>),
    /// The source has no such row (cached as absent).
    Absent,
    /// Followers must read the cache again themselves: the leader's answer
    /// may predate a write that returned before some follower joined. Either
    /// its fill lost its lease (a write happened during the load) or failed
    /// (nobody knows), or it found the value already cached by someone else,
    /// a read that followers who joined later must not reuse.
    ReadAgain,
}

#[derive(Clone)]
struct Settings {
    negative_ttl: Duration,
    lease_ttl: Duration,
    lock_ttl: Duration,
    lock_wait: Duration,
    lock_poll: Duration,
    follower_wait: Duration,
    beta: f64,
}

/// What an engine has done since it opened; see [`CacheAside::stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Reads answered from the cache (values and cached absences).
    pub hits: u64,
    /// Reads that found no usable entry.
    pub misses: u64,
    /// Hits that XFetch picked to reload ahead of expiry, and that did.
    pub early_refreshes: u64,
    /// Fills refused because their lease was revoked by a write (or taken
    /// over): each is a stale row that was *not* cached.
    pub fills_dropped: u64,
    /// Entries that did not decode (or were not the expected type); each was
    /// treated as a miss and deleted.
    pub corrupt_entries: u64,
}

#[derive(Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    early_refreshes: AtomicU64,
    fills_dropped: AtomicU64,
    corrupt_entries: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// A load's result, with the version that orders it against write-through.
struct Loaded<T> {
    value: Option<T>,
    version: u64,
    took: Duration,
}

impl CacheAside {
    /// Connects to Postgres and Redis as `config` says.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidArgument`] for an invalid config; timeouts when a
    /// server does not answer.
    pub fn open(config: &Config) -> Result<CacheAside> {
        config.validate()?;
        CacheAside::new(Db::connect(config)?, Cache::connect(config)?, config)
    }

    /// Builds an engine over pools you already have (sharing their query
    /// counter and namespace). `config` supplies the engine's settings
    /// (TTLs, lease, lock, XFetch); its URLs and pool sizes are not used.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidArgument`] for an invalid config.
    pub fn new(db: Db, cache: Cache, config: &Config) -> Result<CacheAside> {
        config.validate()?;
        Ok(CacheAside {
            db,
            cache,
            flights: SingleFlight::new(),
            settings: Settings {
                negative_ttl: config.negative_ttl,
                lease_ttl: config.lease_ttl,
                lock_ttl: config.lock_ttl,
                lock_wait: config.lock_wait,
                lock_poll: config.lock_poll,
                // A follower waits as long as its leader can take: the lock
                // wait, then a load bounded by the pool and statement timeouts.
                follower_wait: config.lock_wait
                    + config.pool_timeout
                    + config.statement_timeout
                    + config.cache_io_timeout * 2,
                beta: config.beta,
            },
            counters: Counters::default(),
            #[cfg(feature = "test-hooks")]
            hooks: Default::default(),
        })
    }

    /// The Postgres pool (and its query counter).
    pub fn db(&self) -> &Db {
        &self.db
    }

    /// The Redis pool.
    pub fn cache(&self) -> &Cache {
        &self.cache
    }

    /// Reads `key` from the cache, or on a miss calls `load` and caches what
    /// it returns for `ttl` (`None`: cached as absent for the negative TTL).
    ///
    /// Every caller that misses calls its own `load` (see
    /// [`get_or_load_singleflight`](Self::get_or_load_singleflight) for
    /// one load per key). An entry that does not decode as `T` is deleted,
    /// counted in [`Stats::corrupt_entries`] and treated as a
    /// miss.
    ///
    /// # Errors
    /// What `load` returns; cache errors and timeouts; [`ErrorKind::InvalidArgument`]
    /// for an empty key or a zero TTL.
    ///
    /// ```no_run
    /// # let engine = cacheaside::CacheAside::open(&cacheaside::Config::from_env())?;
    /// let v: Option<String> = engine.get_or_load("greeting", std::time::Duration::from_secs(60), || {
    ///     Ok(Some("hello".to_owned()))
    /// })?;
    /// # Ok::<(), cacheaside::Error>(())
    /// ```
    pub fn get_or_load<T, F>(&self, key: &str, ttl: Duration, load: F) -> Result<Option<T>>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Result<Option<T>>,
    {
        self.get_or_load_versioned(key, ttl, Mode::Plain, || Ok(load()?.map(|v| (v, 0))))
    }

    /// Like [`get_or_load`](Self::get_or_load), but however many threads and
    /// processes miss `key` at once, one `load` runs: the others wait for its
    /// value (in-process on the flight's lock, across processes on the cache).
    ///
    /// If the leader's `load` fails, every thread waiting on it gets the
    /// same error (a panic reaches them as [`ErrorKind::Panicked`]); the next
    /// call tries again.
    ///
    /// # Errors
    /// As [`get_or_load`](Self::get_or_load), plus [`ErrorKind::Timeout`] when
    /// the leader takes longer than the configured bounds.
    pub fn get_or_load_singleflight<T, F>(
        &self,
        key: &str,
        ttl: Duration,
        load: F,
    ) -> Result<Option<T>>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Result<Option<T>>,
    {
        self.get_or_load_versioned(key, ttl, Mode::SingleFlight, || Ok(load()?.map(|v| (v, 0))))
    }

    /// The general read: `load` also returns the row's version (any number
    /// that grows with every write, e.g. a `version` column), which orders
    /// cached values against [`write_through`](Self::write_through). Use it
    /// for every read of a key that is also written through: the unversioned
    /// reads cache version 0, which a delayed write-through of an older row
    /// would replace.
    ///
    /// # Errors
    /// As [`get_or_load_singleflight`](Self::get_or_load_singleflight).
    pub fn get_or_load_versioned<T, F>(
        &self,
        key: &str,
        ttl: Duration,
        mode: Mode,
        load: F,
    ) -> Result<Option<T>>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Result<Option<(T, u64)>>,
    {
        check_key(key)?;
        ttl_millis(ttl)?;
        let value_key = self.cache.redis_key(key);
        let load = || {
            let loaded = timed(load);
            #[cfg(feature = "test-hooks")]
            self.hooks.after_load(key);
            loaded
        };
        if let Some((hit, refresh_due)) = self.lookup::<T>(&value_key)? {
            bump(&self.counters.hits);
            if refresh_due {
                return self.refresh_early(&Keys::for_value(value_key), ttl, load, hit);
            }
            return Ok(hit);
        }
        bump(&self.counters.misses);
        let keys = Keys::for_value(value_key);
        match mode {
            Mode::Plain => self.miss_plain(&keys, ttl, load),
            Mode::SingleFlight => self.miss_single_flight(key, &keys, ttl, load),
        }
    }

    /// Removes `key`'s value and revokes any reader's lease on it, so a load
    /// that started before this call can no longer fill it. Call it after
    /// the write to the source has committed.
    ///
    /// # Errors
    /// Cache errors and timeouts. (If it fails, the old value lives until
    /// its TTL: retry, or keep TTLs short.)
    pub fn invalidate(&self, key: &str) -> Result<()> {
        check_key(key)?;
        self.cache.delete(key)?;
        Ok(())
    }

    /// Runs `write` (a write to the source that returns the new value and
    /// its version, e.g. `UPDATE … RETURNING`), then stores that value in the
    /// cache unless the cache holds the same version or newer, or another
    /// writer invalidated the key after this one started. Readers' leases are
    /// revoked either way. Returns what `write` returned.
    ///
    /// Two write-throughs that finish in either order leave the newer value
    /// cached; a write-through that commits before a plain update (write +
    /// [`invalidate`](Self::invalidate)) never overwrites it with the older
    /// row. That is why the engine runs the write itself: it registers the
    /// writer in Redis first, and an invalidation revokes it.
    ///
    /// # Errors
    /// What `write` returns (nothing is cached then); cache errors and
    /// timeouts; [`ErrorKind::InvalidArgument`] for an empty key, a zero
    /// TTL or a value that does not serialize.
    ///
    /// ```no_run
    /// # let engine = cacheaside::CacheAside::open(&cacheaside::Config::from_env())?;
    /// let sql = "UPDATE prices SET cents = $2, version = version + 1 WHERE sku = $1 RETURNING cents, version";
    /// let cents: Option<i64> = engine.write_through("price:A1", std::time::Duration::from_secs(60), || {
    ///     let row = engine.db().query_one(sql, &[&"A1", &999_i64])?;
    ///     Ok(row.map(|r| (r.get::<_, i64>(0), r.get::<_, i64>(1) as u64)))
    /// })?;
    /// # Ok::<(), cacheaside::Error>(())
    /// ```
    pub fn write_through<T, F>(&self, key: &str, ttl: Duration, write: F) -> Result<Option<T>>
    where
        T: Serialize,
        F: FnOnce() -> Result<Option<(T, u64)>>,
    {
        check_key(key)?;
        ttl_millis(ttl)?;
        let keys = self.cache.keys(key);
        let token = new_token();
        self.cache
            .register_writer(&keys, &token, self.settings.lease_ttl)?;
        let (value, version) = match write() {
            Ok(Some(written)) => written,
            other => {
                // Best effort: a token left behind expires with its set.
                let _ = self.cache.unregister_writer(&keys, &token);
                return other.map(|_| None);
            }
        };
        let json = to_json(&value)?;
        let raw = Entry::new(Payload::Value(&json), version, Duration::ZERO, ttl).encode();
        self.cache
            .write_through(&keys, &token, &raw, version, ttl)?;
        Ok(Some(value))
    }

    #[cfg(feature = "test-hooks")]
    pub(crate) fn hooks(&self) -> &crate::hooks::Hooks {
        &self.hooks
    }

    /// Test hook: how many threads wait on the flight for `key` in progress.
    #[cfg(feature = "test-hooks")]
    pub fn flight_followers(&self, key: &str) -> usize {
        self.flights.followers(key)
    }

    /// Counters of what this engine has done since it opened.
    ///
    /// ```no_run
    /// # let engine = cacheaside::CacheAside::open(&cacheaside::Config::from_env())?;
    /// let stats = engine.stats();
    /// println!("hit ratio {:.2}", stats.hits as f64 / (stats.hits + stats.misses).max(1) as f64);
    /// # Ok::<(), cacheaside::Error>(())
    /// ```
    pub fn stats(&self) -> Stats {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Stats {
            hits: get(&c.hits),
            misses: get(&c.misses),
            early_refreshes: get(&c.early_refreshes),
            fills_dropped: get(&c.fills_dropped),
            corrupt_entries: get(&c.corrupt_entries),
        }
    }

    /// Keys with a single-flight load in progress in this process; 0 when no
    /// call is running (per-key state is freed when its flight ends).
    pub fn in_flight(&self) -> usize {
        self.flights.len()
    }

    /// The hit path: one GET. `Some((value, refresh_due))` for a usable
    /// entry; `None` for no entry or a corrupt one (deleted and counted).
    fn lookup<T: DeserializeOwned>(&self, value_key: &str) -> Result<Option<(Option<T>, bool)>> {
        Ok(self
            .cache
            .get_raw(value_key)?
            .and_then(|raw| self.decode_hit(value_key, &raw)))
    }

    /// Decodes a cached entry: `Some((value, refresh_due))`, or `None` after
    /// deleting and counting a corrupt one.
    fn decode_hit<T: DeserializeOwned>(
        &self,
        value_key: &str,
        raw: &[u8],
    ) -> Option<(Option<T>, bool)> {
        let decoded = Entry::decode(raw).and_then(|entry| {
            let value = match entry.payload {
                Payload::Absent => None,
                Payload::Value(json) => {
                    Some(serde_json::from_slice(json).map_err(|_| "value does not decode")?)
                }
            };
            Ok((
                value,
                entry.should_refresh_early(self.settings.beta, fastrand::f64()),
            ))
        });
        match decoded {
            Ok(hit) => Some(hit),
            Err(_) => {
                bump(&self.counters.corrupt_entries);
                // Best effort: if the delete fails, the fill that follows
                // this miss overwrites the entry anyway.
                let _ = self.cache.delete_if_equal(value_key, raw);
                None
            }
        }
    }

    fn miss_plain<T, F>(&self, keys: &Keys, ttl: Duration, load: F) -> Result<Option<T>>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Result<Loaded<T>>,
    {
        let token = new_token();
        let claim = self.acquire(keys, Claim::Lease, &token)?;
        match claim {
            Claimed::Cached(hit) => Ok(hit),
            Claimed::Busy => Ok(load()?.value),
            Claimed::Granted => {
                let hold = self.hold(keys, &token);
                let loaded = load()?;
                // Not caching is never wrong: a fill that fails (or loses its
                // lease) still returns the row this call read.
                let _ = self.fill(hold, ttl, &loaded);
                Ok(loaded.value)
            }
        }
    }

    fn miss_single_flight<T, F>(
        &self,
        key: &str,
        keys: &Keys,
        ttl: Duration,
        load: F,
    ) -> Result<Option<T>>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Result<Loaded<T>>,
    {
        let deadline = Instant::now() + self.settings.follower_wait;
        loop {
            let leader = match self.flights.join(key) {
                Role::Leader(leader) => leader,
                Role::Follower(follower) => {
                    match follower.wait(deadline) {
                        Ok(Ok(Landed::Value(json))) => {
                            return decode_shared(key, &json);
                        }
                        Ok(Ok(Landed::Absent)) => return Ok(None),
                        Ok(Err(err)) => return Err(err),
                        Err(WaitError::Abandoned) => {
                            return Err(Error::new(
                                ErrorKind::Panicked,
                                "the thread loading this key panicked",
                            ));
                        }
                        Err(WaitError::TimedOut) => {
                            return Err(Error::timeout("waiting for another thread's load"));
                        }
                        Ok(Ok(Landed::ReadAgain)) => {}
                    }
                    if Instant::now() >= deadline {
                        return Err(Error::timeout("reading a key that keeps being written"));
                    }
                    if let Some((hit, _)) = self.lookup::<T>(&keys.value)? {
                        return Ok(hit);
                    }
                    continue;
                }
            };
            // We lead. Whatever happens below, followers hear of it: an error
            // is published explicitly; a panic drops `leader`, which wakes
            // them with `Abandoned`.
            let (result, landed) = self.lead(keys, ttl, load, &leader);
            leader.publish(landed);
            return result;
        }
    }

    /// The single-flight leader's work: take the cross-process rebuild lock
    /// (or wait for whoever has it), load, fill. Returns the caller's result
    /// and what to hand the followers. Closes the flight before filling.
    fn lead<T, F>(
        &self,
        keys: &Keys,
        ttl: Duration,
        load: F,
        leader: &crate::singleflight::Leader<'_, Shared>,
    ) -> (Result<Option<T>>, Shared)
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Result<Loaded<T>>,
    {
        let token = new_token();
        let wait_until = Instant::now() + self.settings.lock_wait;
        let mut claim = Claim::Lock;
        loop {
            match self.acquire(keys, claim, &token) {
                Err(err) => return (Err(err.clone()), Err(err)),
                // Another process filled it (or an earlier flight did). Our
                // caller asked before this read; a follower may have joined
                // after it and after a write, so followers read for themselves.
                Ok(Claimed::Cached(hit)) => {
                    #[cfg(feature = "test-hooks")]
                    self.hooks.after_load(&keys.value);
                    return (Ok(hit), Ok(Landed::ReadAgain));
                }
                Ok(Claimed::Granted) => break,
                // Waited long enough: load ourselves, still through a lease
                // (taken over), so this fallback cannot cache a stale row.
                Ok(Claimed::Busy) if Instant::now() >= wait_until => claim = Claim::Takeover,
                // Another process is rebuilding: its value lands in the
                // cache, which the next attempt reads. If it dies, its lock
                // expires and an attempt takes it over.
                Ok(Claimed::Busy) => std::thread::sleep(self.settings.lock_poll),
            }
        }
        let hold = self.hold(keys, &token);
        let loaded = match load() {
            Ok(loaded) => loaded,
            Err(err) => return (Err(err.clone()), Err(err)),
        };
        let json = match loaded.value.as_ref().map(to_json).transpose() {
            Ok(json) => json,
            Err(err) => return (Err(err.clone()), Err(err)),
        };
        leader.close();
        let landed = match self.fill(hold, ttl, &loaded) {
            Ok(true) => json.map_or(Landed::Absent, |j| Landed::Value(j.into())),
            Ok(false) | Err(_) => Landed::ReadAgain,
        };
        // The leader's own call began before any write its fill lost to, so
        // the row it read is a valid answer for it.
        (Ok(loaded.value), Ok(landed))
    }

    /// A hit that XFetch picked for early refresh: reload under the rebuild
    /// lock if nobody else is; serve the cached value otherwise, and also if
    /// the refresh fails (the cached value is still valid).
    fn refresh_early<T, F>(
        &self,
        keys: &Keys,
        ttl: Duration,
        load: F,
        cached: Option<T>,
    ) -> Result<Option<T>>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Result<Loaded<T>>,
    {
        let token = new_token();
        if !matches!(
            self.acquire::<T>(keys, Claim::Refresh, &token),
            Ok(Claimed::Granted)
        ) {
            return Ok(cached);
        }
        let hold = self.hold(keys, &token);
        let Ok(loaded) = load() else {
            return Ok(cached);
        };
        bump(&self.counters.early_refreshes);
        // A refresh the lease rejects was overtaken by a write: our caller
        // started before that write finished, so either row is fine for it.
        let _ = self.fill(hold, ttl, &loaded);
        Ok(loaded.value)
    }

    fn acquire<T: DeserializeOwned>(
        &self,
        keys: &Keys,
        claim: Claim,
        token: &str,
    ) -> Result<Claimed<T>> {
        let s = &self.settings;
        // A corrupt value is deleted and the claim retried on a clean slate;
        // bounded, in case something keeps writing garbage under our key.
        for _ in 0..3 {
            match self
                .cache
                .acquire(keys, claim, token, s.lease_ttl, s.lock_ttl)?
            {
                Acquired::Granted => return Ok(Claimed::Granted),
                Acquired::Busy => return Ok(Claimed::Busy),
                Acquired::Cached(raw) => {
                    if let Some((hit, _)) = self.decode_hit::<T>(&keys.value, &raw) {
                        return Ok(Claimed::Cached(hit));
                    }
                }
            }
        }
        Err(Error::corrupt(
            &keys.value,
            "rewritten with garbage as fast as it is deleted",
        ))
    }

    fn hold<'a>(&'a self, keys: &'a Keys, token: &'a str) -> Hold<'a> {
        Hold {
            cache: &self.cache,
            keys,
            token,
        }
    }

    /// Stores a load's result if `hold` still has the lease, and releases
    /// the lease and lock. The lease check and the write are one Lua script:
    /// there is no window between them.
    fn fill<T: Serialize>(
        &self,
        hold: Hold<'_>,
        ttl: Duration,
        loaded: &Loaded<T>,
    ) -> Result<bool> {
        let json;
        let (payload, ttl) = match &loaded.value {
            Some(value) => {
                json = to_json(value)?;
                (Payload::Value(&json), ttl)
            }
            None => (Payload::Absent, self.settings.negative_ttl),
        };
        let raw = Entry::new(payload, loaded.version, loaded.took, ttl).encode();
        #[cfg(feature = "test-hooks")]
        if self.hooks.leases_disabled() {
            return self
                .cache
                .set_raw(&hold.keys.value, &raw, ttl)
                .map(|()| true);
        }
        let stored = self.cache.fill(hold.keys, hold.token, &raw, ttl)?;
        // The script released the lease and lock; skip the guard's release
        // round trip.
        std::mem::forget(hold);
        if !stored {
            bump(&self.counters.fills_dropped);
        }
        Ok(stored)
    }
}

/// A granted lease (and maybe lock). Dropping it releases both if still
/// ours, so a loader that fails or panics does not hold up other readers
/// until the lease expires; a successful fill releases them itself and
/// forgets the guard.
struct Hold<'a> {
    cache: &'a Cache,
    keys: &'a Keys,
    token: &'a str,
}

impl Drop for Hold<'_> {
    fn drop(&mut self) {
        // Compare-and-delete: harmless if the lease or lock is someone else's
        // by now. A failure leaves them to expire.
        let _ = self.cache.release(self.keys, self.token);
    }
}

/// What the engine made of an acquire attempt.
enum Claimed<T> {
    Cached(Option<T>),
    Granted,
    Busy,
}

/// Runs a loader and times it (XFetch needs the time a load takes). A panic
/// unwinds through: the drop guards on the way release the lease and lock
/// and wake single-flight followers.
fn timed<T>(load: impl FnOnce() -> Result<Option<(T, u64)>>) -> Result<Loaded<T>> {
    let start = Instant::now();
    let (value, version) = match load()? {
        Some((value, version)) => (Some(value), version),
        None => (None, 0),
    };
    Ok(Loaded {
        value,
        version,
        took: start.elapsed(),
    })
}

fn to_json<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(value)
        .map_err(|e| Error::invalid_argument("value does not serialize to JSON").with_source(e))
}

fn decode_shared<T: DeserializeOwned>(key: &str, json: &[u8]) -> Result<Option<T>> {
    serde_json::from_slice(json)
        .map(Some)
        .map_err(|e| Error::corrupt(key, format!("another caller loaded a different type: {e}")))
}

fn check_key(key: &str) -> Result<()> {
    if key.is_empty() {
        return Err(Error::invalid_argument("cache key must not be empty"));
    }
    Ok(())
}
