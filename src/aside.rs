//! [`CacheAside`]: the generic engine's public face. Its methods check
//! their arguments, run the read/write algorithm of [`crate::engine`], and
//! own what runs beside it: the background pool, the invalidation relay,
//! the write-behind workers and the near cache's tracker.
//!
//! Guarantees are the engine's ([`crate::engine`]); this file adds one: an
//! engine that drops stops its relay and workers before the pool and the
//! keeper they use go.

// Batch reads and invalidations.
mod batch;
mod replica;

use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::background::Background;
use crate::cache::{Cache, check_key};
use crate::config::{Config, EntryOptions, check_ttl};
use crate::db::Db;
use crate::engine::{Deferred, Engine, Inline, Mode, Owned, encoded, to_json};
use crate::entry::Versioned;
#[cfg(doc)]
use crate::error::ErrorKind;
use crate::error::Result;
use crate::lease::Json;
use crate::near::{Slot, Tracker};
use crate::observe::{Stats, report};
use crate::write_behind::{Applier, DeadLetter, WriteBehind, WriteBehindChange};

/// The cache-aside engine: Redis in front of any loader.
///
/// Reads check Redis first (one round trip on a hit). On a miss the reader
/// takes a *lease* before it loads, and its fill is stored only if the lease
/// is still its own, so a write that invalidates the key while the load runs
/// makes the fill be dropped rather than cache the pre-write row. Absent rows
/// are cached too (for [`Config::negative_ttl`]). Near expiry, XFetch lets
/// one caller refresh the value early while the others keep reading it.
///
/// `CacheAside` is `Send + Sync` and cheap to clone (an `Arc` inside, like
/// moka's `Cache` or r2d2's `Pool`): every clone is the same engine, with
/// the same pools, relay, workers and stats; the relay and the workers stop
/// when the last clone drops.
///
/// Every method blocks. From async code, call it inside
/// `tokio::task::spawn_blocking`: called from an async task of a tokio
/// runtime, anything that reaches Postgres (a miss's load through
/// [`Db`], a write) fails with [`ErrorKind::InvalidArgument`] naming
/// `spawn_blocking`, instead of panicking or stalling the executor.
///
/// ```no_run
/// use std::time::Duration;
/// use cacheaside::{CacheAside, Config};
///
/// let engine = CacheAside::open(&Config::from_env())?;
/// let db = engine.db().clone();
/// let count: Option<i64> = engine.get_or_load("orders:count", Duration::from_secs(30), || {
///     let row = db.query_opt("SELECT count(*) FROM pg_class", &[])?;
///     Ok(row.map(|r| r.get(0)))
/// })?;
/// # Ok::<(), cacheaside::Error>(())
/// ```
#[derive(Clone)]
pub struct CacheAside {
    /// Shared by every clone; the relay, the workers and the pools stop
    /// when the last clone drops.
    inner: Arc<Inner>,
}

struct Inner {
    engine: Engine,
    background: Background,
    relay: Mutex<Option<crate::relay::Relay>>,
    write_behind: WriteBehind,
    /// Keeps L1 coherent; stopped (joined) when the engine drops.
    _tracker: Option<crate::near::Tracker>,
    /// The background inspector ([`Config::inspect_every`]), if on.
    _inspector: Option<crate::inspect::Inspector>,
    config: Config,
    /// The key prefixes captured into this engine's outbox, and when they
    /// were read: see [`CacheAside::relay_covers`]. Held while the
    /// catalog is read, so one caller reads it for all.
    captured: Mutex<Option<(Instant, Vec<String>)>>,
}

/// How long the captured prefixes read from the catalog are trusted.
const COVERAGE_FOR: Duration = Duration::from_secs(5);

impl CacheAside {
    /// Connects to Postgres and Redis as `config` says. Neither server needs
    /// to be up: connections open lazily, and calls degrade (or fail) while
    /// one is down.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidArgument`] for an invalid config or an unparsable
    /// URL.
    pub fn open(config: &Config) -> Result<CacheAside> {
        config.validate()?;
        CacheAside::new(Db::connect(config)?, Cache::connect(config)?, config)
    }

    /// Builds an engine over pools you already have (sharing their query
    /// counter and namespace). `config` supplies the engine's settings
    /// (TTLs, lease, lock, XFetch, fail-safe, breaker, relay); its URLs and
    /// pool sizes are not used.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidArgument`] for an invalid config.
    pub fn new(db: Db, cache: Cache, config: &Config) -> Result<CacheAside> {
        config.validate()?;
        let engine = Engine::new(db, cache, config);
        let tracker = engine
            .near
            .clone()
            .map(|near| Tracker::start(near, engine.cache.clone(), config));
        let inspector = (!config.inspect_every.is_zero())
            .then(|| {
                crate::inspect::Inspector::start(
                    engine.db.clone(),
                    engine.cache.clone(),
                    engine.counters.clone(),
                    config.outbox_table.clone(),
                    config.inspect_every,
                    config.inspect_sample as usize,
                )
            })
            .flatten();
        Ok(CacheAside {
            inner: Arc::new(Inner {
                write_behind: WriteBehind::new(&engine.cache, config),
                engine,
                background: Background::new(config.background_threads),
                relay: Mutex::new(None),
                _tracker: tracker,
                _inspector: inspector,
                config: config.clone(),
                captured: Mutex::new(None),
            }),
        })
    }

    /// The Postgres pool (and its query counter).
    pub fn db(&self) -> &Db {
        &self.inner.engine.db
    }

    /// The Redis pool.
    pub fn cache(&self) -> &Cache {
        &self.inner.engine.cache
    }

    /// Checks that both servers answer: one Redis `PING` and one Postgres
    /// `SELECT 1` (not counted in [`Db::query_count`]), and one more on the
    /// read replica when [`Config::replica_url`] is set (its error starts
    /// "read replica: "; without this check a replica that does not answer
    /// only shows as loads read from the primary). Reads keep working
    /// while Redis is down (they go to Postgres), so this is where a
    /// misconfiguration shows: a closed port, a wrong password, a server
    /// that wants one, a missing database each fail with a message that
    /// names the server and the cause (never the password), within the
    /// connect timeout.
    ///
    /// ```no_run
    /// # let engine = cacheaside::CacheAside::open(&cacheaside::Config::from_env())?;
    /// if let Err(err) = engine.ping() {
    ///     eprintln!("not ready: {}", err.chain());
    /// }
    /// # Ok::<(), cacheaside::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`ErrorKind::Cache`] or [`ErrorKind::Database`] with the cause;
    /// [`ErrorKind::Timeout`] for a server that does not answer.
    pub fn ping(&self) -> Result<()> {
        let pong: String = self
            .inner
            .engine
            .cache
            .run(|conn| redis::cmd("PING").query(conn))?;
        debug_assert_eq!(pong, "PONG");
        self.inner
            .engine
            .db
            .uncounted()
            .query_opt("SELECT 1", &[])?;
        self.ping_replica()
    }

    /// The config this engine was built with.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// Reads `key` from the cache, or on a miss calls `load` and caches what
    /// it returns for `ttl` (`None`: cached as absent for the negative TTL).
    ///
    /// However many threads and processes miss `key` at once, one `load`
    /// runs: the others wait for its value (in-process on the flight's lock,
    /// across processes on the cache). If the leader's `load` fails, every
    /// thread waiting on it gets the same error (a panic reaches them as
    /// [`ErrorKind::Panicked`]); the next call tries again. See
    /// [`get_or_load_uncoalesced`](Self::get_or_load_uncoalesced) for a
    /// read where every caller that misses loads for itself.
    ///
    /// An entry that does not decode as `T` is deleted, counted in
    /// [`Stats::corrupt_entries`] and treated as a miss. `load` must not
    /// read `key` through this engine: that is reported as
    /// [`ErrorKind::InvalidArgument`] instead of waiting for itself.
    ///
    /// Blocks the calling thread; from async code call it inside
    /// `tokio::task::spawn_blocking` (see [`CacheAside`]).
    ///
    /// # Errors
    /// What `load` returns (or, with fail-safe on and a copy at hand, the
    /// copy instead); cache errors only when nothing else can answer;
    /// [`ErrorKind::Timeout`] when the call's deadline passes while it
    /// waits; [`ErrorKind::InvalidArgument`] for an empty key (or one
    /// holding `{` or `}`), or a TTL of zero or beyond
    /// [`MAX_TTL`](crate::MAX_TTL).
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
        self.get_or_load_versioned(key, ttl, Mode::SingleFlight, || Ok(load()?.map(|v| (v, 0))))
    }

    /// [`get_or_load`](Self::get_or_load) with entry options of this call's
    /// own: TTLs, fail-safe, soft timeout, early refresh (start from
    /// [`entry_options`](Self::entry_options), the engine's defaults).
    ///
    /// # Errors
    /// As [`get_or_load`](Self::get_or_load), and
    /// [`ErrorKind::InvalidArgument`] for options out of range (a TTL of zero
    /// or beyond [`MAX_TTL`](crate::MAX_TTL), a negative `beta`).
    ///
    /// ```no_run
    /// # let engine = cacheaside::CacheAside::open(&cacheaside::Config::from_env())?;
    /// use std::time::Duration;
    /// let hot = engine.entry_options().ttl(Duration::from_secs(5)).soft_timeout(Duration::from_millis(50));
    /// let v: Option<u32> = engine.get_or_load_with("hot", &hot, || Ok(Some(1)))?;
    /// # Ok::<(), cacheaside::Error>(())
    /// ```
    pub fn get_or_load_with<T, F>(
        &self,
        key: &str,
        options: &EntryOptions,
        load: F,
    ) -> Result<Option<T>>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Result<Option<T>>,
    {
        let counters = &self.inner.engine.counters;
        self.inner.engine.read(
            &self.inner.background,
            key,
            *options,
            Mode::SingleFlight,
            Inline(move || encoded(counters, || Ok(load()?.map(|v| (v, 0))))),
            Slot::decode,
        )
    }

    /// The engine-wide entry options, from its [`Config`] (`ttl`,
    /// `negative_ttl`, `fail_safe_max`, `soft_timeout`, `beta`): what a read
    /// that names only its TTL uses, and where per-call options start.
    pub fn entry_options(&self) -> EntryOptions {
        self.inner.engine.settings.defaults
    }

    /// Like [`get_or_load`](Self::get_or_load), but not coalesced: every
    /// caller that misses `key` calls its own `load` (the naive pattern;
    /// still lease-protected, so it never caches a stale row). For loads
    /// that are cheap, or that must run once per caller.
    ///
    /// # Errors
    /// As [`get_or_load`](Self::get_or_load), without the wait.
    ///
    /// ```no_run
    /// # let engine = cacheaside::CacheAside::open(&cacheaside::Config::from_env())?;
    /// let v: Option<u32> = engine.get_or_load_uncoalesced("dice", std::time::Duration::from_secs(5), || {
    ///     Ok(Some(4))
    /// })?;
    /// # Ok::<(), cacheaside::Error>(())
    /// ```
    pub fn get_or_load_uncoalesced<T, F>(
        &self,
        key: &str,
        ttl: Duration,
        load: F,
    ) -> Result<Option<T>>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Result<Option<T>>,
    {
        self.get_or_load_versioned(key, ttl, Mode::Plain, || Ok(load()?.map(|v| (v, 0))))
    }

    /// The coalescing read under its old name: [`get_or_load`](Self::get_or_load)
    /// coalesces now.
    ///
    /// # Errors
    /// As [`get_or_load`](Self::get_or_load).
    #[deprecated(since = "0.2.0", note = "`get_or_load` coalesces now: call it")]
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
        self.get_or_load(key, ttl, load)
    }

    /// The general read: `load` returns the row with its version
    /// ([`Versioned`]: any number that grows with every write, e.g. a
    /// `version` column), which orders cached values against
    /// [`write_through`](Self::write_through). Use it for every read of a
    /// key that is also written through: the unversioned reads cache
    /// version 0, which a delayed write-through of an older row would
    /// replace. `load` runs on the calling thread. (A `(value, version)`
    /// tuple converts into [`Versioned`], for code written before it.)
    ///
    /// ```no_run
    /// # let engine = cacheaside::CacheAside::open(&cacheaside::Config::from_env())?;
    /// use cacheaside::{Mode, Versioned};
    /// let sql = "SELECT name, version FROM products WHERE id = $1";
    /// let name: Option<String> = engine.get_or_load_versioned("product:7", std::time::Duration::from_secs(60), Mode::SingleFlight, || {
    ///     let row = engine.db().query_opt(sql, &[&7_i64])?;
    ///     Ok(row.map(|r| Versioned::new(r.get(0), r.get::<_, i64>(1) as u64)))
    /// })?;
    /// # Ok::<(), cacheaside::Error>(())
    /// ```
    ///
    /// # Errors
    /// As [`get_or_load`](Self::get_or_load).
    pub fn get_or_load_versioned<T, V, F>(
        &self,
        key: &str,
        ttl: Duration,
        mode: Mode,
        load: F,
    ) -> Result<Option<T>>
    where
        T: Serialize + DeserializeOwned,
        V: Into<Versioned<T>>,
        F: FnOnce() -> Result<Option<V>>,
    {
        let counters = &self.inner.engine.counters;
        self.inner.engine.read(
            &self.inner.background,
            key,
            self.entry_options().ttl(ttl),
            mode,
            Inline(move || encoded(counters, || Ok(load()?.map(pair)))),
            Slot::decode,
        )
    }

    /// Like [`get_or_load_versioned`](Self::get_or_load_versioned), for a
    /// loader that owns what it needs (`Send + 'static`). The engine may then
    /// run it on its background pool: a reload slower than
    /// [`Config::soft_timeout`] finishes (and fills) there while callers get
    /// the fail-safe copy, and an early refresh never makes the caller that
    /// triggered it wait. [`Client`](crate::Client) reads this way.
    ///
    /// ```no_run
    /// # let engine = cacheaside::CacheAside::open(&cacheaside::Config::from_env())?;
    /// use cacheaside::{Mode, Versioned};
    /// let db = engine.db().clone();
    /// let n: Option<i64> = engine.get_or_load_owned("tables", std::time::Duration::from_secs(60), Mode::SingleFlight, move || {
    ///     // A count has no version: never written through, so none is needed.
    ///     Ok(db.query_opt("SELECT count(*) FROM pg_class", &[])?.map(|r| Versioned::unversioned(r.get(0))))
    /// })?;
    /// # Ok::<(), cacheaside::Error>(())
    /// ```
    ///
    /// # Errors
    /// As [`get_or_load`](Self::get_or_load).
    pub fn get_or_load_owned<T, V, F>(
        &self,
        key: &str,
        ttl: Duration,
        mode: Mode,
        load: F,
    ) -> Result<Option<T>>
    where
        T: Serialize + DeserializeOwned + 'static,
        V: Into<Versioned<T>>,
        F: FnOnce() -> Result<Option<V>> + Send + 'static,
    {
        let counters = self.inner.engine.counters.clone();
        self.inner.engine.read(
            &self.inner.background,
            key,
            self.entry_options().ttl(ttl),
            mode,
            Owned(move || encoded(&counters, || Ok(load()?.map(pair)))),
            Slot::decode,
        )
    }

    /// [`get_or_load`](Self::get_or_load), sharing the value: a near-cache
    /// ([`Config::local_cache`]) hit hands every caller the same `Arc`,
    /// decoded once, and allocates nothing (a Redis hit or a load decodes a
    /// new one). For values read often and large enough that a clone per
    /// hit shows.
    ///
    /// # Errors
    /// As [`get_or_load`](Self::get_or_load).
    ///
    /// ```no_run
    /// # let engine = cacheaside::CacheAside::open(&cacheaside::Config::from_env())?;
    /// let names: Option<std::sync::Arc<Vec<String>>> =
    ///     engine.get_or_load_shared("names", std::time::Duration::from_secs(60), || {
    ///         Ok(Some(vec!["Ada".to_owned(), "Alan".to_owned()]))
    ///     })?;
    /// # Ok::<(), cacheaside::Error>(())
    /// ```
    pub fn get_or_load_shared<T, F>(
        &self,
        key: &str,
        ttl: Duration,
        load: F,
    ) -> Result<Option<Arc<T>>>
    where
        T: Serialize + DeserializeOwned + Send + Sync + 'static,
        F: FnOnce() -> Result<Option<T>>,
    {
        let counters = &self.inner.engine.counters;
        self.inner.engine.read(
            &self.inner.background,
            key,
            self.entry_options().ttl(ttl),
            Mode::SingleFlight,
            Inline(move || encoded(counters, || Ok(load()?.map(|v| (v, 0))))),
            Slot::shared,
        )
    }

    /// [`get_or_load_owned`](Self::get_or_load_owned) whose owned loader is
    /// built by `make` only on a miss (a hit clones nothing for it), and
    /// whose near-cache hit takes the value out of the slot with `local`
    /// ([`Slot::cloned`], [`Slot::shared`]). [`Client`](crate::Client)
    /// reads this way.
    pub(crate) fn get_or_load_deferred<T, U, M, F>(
        &self,
        key: &str,
        ttl: Duration,
        mode: Mode,
        make: M,
        local: fn(&Slot) -> Option<Option<T>>,
    ) -> Result<Option<T>>
    where
        T: DeserializeOwned,
        U: Serialize,
        M: FnOnce() -> F,
        F: FnOnce() -> Result<Option<(U, u64)>> + Send + 'static,
    {
        let engine = &self.inner.engine;
        engine.read(
            &self.inner.background,
            key,
            self.entry_options().ttl(ttl),
            mode,
            Deferred(|| {
                let counters = engine.counters.clone();
                let load = make();
                move || encoded(&counters, load)
            }),
            local,
        )
    }

    /// Removes `key`'s value and revokes any reader's lease on it, so a load
    /// that started before this call can no longer fill it. Call it after
    /// the write to the source has committed. One Redis command, accepted
    /// even by a Redis that is out of memory. It supersedes the key's
    /// pending write-behind change, if any (the workers skip it); a flush
    /// that commits between your write's commit and this call can still
    /// land over your write: for keys also written behind, prefer
    /// [`write_through`](Self::write_through), which closes that window.
    ///
    /// If it fails, this process stops reading the cache (the circuit
    /// breaker opens) until Redis answers again and, when the invalidation
    /// relay runs, until it has applied the outbox: with the table's changes
    /// captured ([`capture_changes`](Self::capture_changes)) the relay will
    /// delete the key, so the write needs no retry (see
    /// [`relay_running`](Self::relay_running)).
    ///
    /// # Errors
    /// Cache errors and timeouts.
    pub fn invalidate(&self, key: &str) -> Result<()> {
        check_key(key)?;
        self.inner.engine.invalidate(key)
    }

    /// [`get_or_load`](Self::get_or_load) of an entry that carries `tags`:
    /// [`invalidate_tag`](Self::invalidate_tag) of any of them makes it a
    /// miss, in every process.
    ///
    /// The tags' current stamps are read before `load` runs and stored in
    /// the entry; a hit compares them with the tags' stamps now. On a single
    /// Redis server the value and the stamps come in one `MGET` (one round
    /// trip, as an untagged hit's `GET`); on a Redis Cluster each tag lives
    /// in its own slot and costs one more round trip. Tagged entries are not
    /// kept in the near cache. Any read of a tagged entry checks its tags,
    /// also one that names none (a second round trip then). Up to 32 tags,
    /// each a name like a rate-limit subject (non-empty, at most 512 bytes,
    /// no `{`, `}` or control character).
    ///
    /// A [`write_through`](Self::write_through) stores an untagged entry:
    /// invalidate tagged keys instead of writing them through.
    ///
    /// ```no_run
    /// # let engine = cacheaside::CacheAside::open(&cacheaside::Config::from_env())?;
    /// use std::time::Duration;
    /// let name: Option<String> =
    ///     engine.get_or_load_tagged("product:1", Duration::from_secs(60), &["category:7"], || {
    ///         Ok(Some("widget".to_owned()))
    ///     })?;
    /// // Every entry tagged category:7, in every process, is a miss from here.
    /// engine.invalidate_tag("category:7")?;
    /// # Ok::<(), cacheaside::Error>(())
    /// ```
    ///
    /// # Errors
    /// As [`get_or_load`](Self::get_or_load), and
    /// [`ErrorKind::InvalidArgument`] for a tag that breaks the rules above.
    pub fn get_or_load_tagged<T, F>(
        &self,
        key: &str,
        ttl: Duration,
        tags: &[&str],
        load: F,
    ) -> Result<Option<T>>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Result<Option<T>>,
    {
        let engine = &self.inner.engine;
        let tags = crate::tags::tag_set(engine.cache.namespace(), tags)?;
        let counters = &engine.counters;
        engine.read_tagged(
            &self.inner.background,
            key,
            self.entry_options().ttl(ttl),
            Mode::SingleFlight,
            Inline(move || encoded(counters, || Ok(load()?.map(|v| (v, 0))))),
            Slot::decode,
            tags,
        )
    }

    /// Makes every entry tagged `tag` (by
    /// [`get_or_load_tagged`](Self::get_or_load_tagged)) a miss, in every
    /// process: one Redis command (a `SET` of the tag's new stamp), however
    /// many entries carry the tag. Lazy: the entries stay in Redis until a
    /// read finds them outdated (and deletes them) or they expire. A load
    /// that was running meanwhile does not keep its fill. Call it after the
    /// write to the source has committed.
    ///
    /// # Errors
    /// Cache errors and timeouts (then the tag's entries may still be
    /// read: retry); [`ErrorKind::InvalidArgument`] for a tag that
    /// [`get_or_load_tagged`](Self::get_or_load_tagged) would refuse.
    pub fn invalidate_tag(&self, tag: &str) -> Result<()> {
        crate::tags::check_tag(tag)?;
        crate::tags::invalidate(&self.inner.engine.cache, tag)
    }

    /// A versioned read whose loader may answer that the row has not
    /// changed ([`Refresh::Unchanged`](crate::Refresh)): `load` is given the
    /// cached version when there is a copy to refresh (an early refresh, or
    /// the reload of a fail-safe copy; `None` on a plain miss), and on
    /// `Unchanged` the cached entry's expiry is extended inside Redis, under
    /// the lease and only while it is still at that version: the value is
    /// not sent to Redis again. `load` runs on the calling thread.
    ///
    /// ```no_run
    /// # let engine = cacheaside::CacheAside::open(&cacheaside::Config::from_env())?;
    /// use cacheaside::{Mode, Refresh, Versioned};
    /// let name: Option<String> = engine.get_or_load_conditional(
    ///     "product:7", std::time::Duration::from_secs(60), Mode::SingleFlight, |cached| {
    ///         let since = cached.map_or(-1, |v| v as i64);
    ///         let sql = "SELECT name, version FROM products WHERE id = $1 AND version > $2";
    ///         match engine.db().query_opt(sql, &[&7_i64, &since])? {
    ///             Some(r) => Ok(Refresh::Loaded(Some(Versioned::new(r.get(0), r.get::<_, i64>(1) as u64)))),
    ///             // Nothing newer than the cached version (or no row at all).
    ///             None if cached.is_some() => Ok(Refresh::Unchanged),
    ///             None => Ok(Refresh::Loaded(None)),
    ///         }
    ///     })?;
    /// # Ok::<(), cacheaside::Error>(())
    /// ```
    ///
    /// (`Unchanged` when the row was deleted is wrong: check for that in
    /// the query, or invalidate on delete, as a captured table does.)
    ///
    /// # Errors
    /// As [`get_or_load`](Self::get_or_load), and
    /// [`ErrorKind::InvalidArgument`] when `load` answers `Unchanged` though
    /// it was given no version.
    pub fn get_or_load_conditional<T, F>(
        &self,
        key: &str,
        ttl: Duration,
        mode: Mode,
        load: F,
    ) -> Result<Option<T>>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce(Option<u64>) -> Result<crate::Refresh<T>>,
    {
        let counters = self.inner.engine.counters.clone();
        self.inner.engine.read(
            &self.inner.background,
            key,
            self.entry_options().ttl(ttl),
            mode,
            crate::refresh::Conditional::new(counters, load),
            Slot::decode,
        )
    }

    /// [`invalidate`](Self::invalidate) after a committed write: a failure
    /// is not the caller's when the relay covers the key (the outbox row
    /// committed with the write, and the relay will delete the key).
    /// Whether it does is decided once, in [`relay_covers`](Self::relay_covers).
    pub(crate) fn invalidate_captured(&self, key: &str) -> Result<()> {
        match self.invalidate(key) {
            Err(err) if self.relay_covers(key) => {
                report!(
                    warn,
                    // No key: nothing at warn level names one.
                    "invalidating a key failed; the relay will: {}",
                    err.chain()
                );
                Ok(())
            }
            outcome => outcome,
        }
    }

    /// True when a failed invalidation of `key` is the relay's to repair: a
    /// relay runs for this engine and `key` starts with a prefix whose table
    /// is captured into its outbox (read from the catalog at most every
    /// [`COVERAGE_FOR`], and whenever this engine captures a table). A
    /// relay for another table does not cover `key`; nor does anything
    /// when the catalog cannot be read (the failure is then the caller's).
    fn relay_covers(&self, key: &str) -> bool {
        if !self.relay_running() {
            return false;
        }
        let mut captured = self.inner.captured.lock();
        let stale = captured
            .as_ref()
            .is_none_or(|(read, _)| read.elapsed() >= COVERAGE_FOR);
        if stale {
            let outbox = crate::relay::Outbox::new(&self.config().outbox_table);
            match outbox.and_then(|o| o.captured_prefixes(self.db())) {
                Ok(prefixes) => *captured = Some((Instant::now(), prefixes)),
                Err(err) => {
                    report!(
                        debug,
                        "cannot read which tables are captured: {}",
                        err.chain()
                    );
                }
            }
        }
        captured.as_ref().is_some_and(|(_, prefixes)| {
            prefixes
                .iter()
                .any(|prefix| key.starts_with(prefix.as_str()))
        })
    }

    /// Runs `write` (a write to the source that returns the new value and
    /// its version, e.g. `UPDATE … RETURNING`), then stores that value in the
    /// cache unless that could leave the cache older than a write that has
    /// returned. Readers' leases are revoked either way. Returns what
    /// `write` returned.
    ///
    /// Two write-throughs that finish in either order leave the newer value
    /// cached; a write-through that commits before a plain update (write +
    /// [`invalidate`](Self::invalidate)) or a delete never overwrites it with
    /// its older row. That is why the engine runs the write itself: it
    /// registers the writer in Redis first, and an invalidation revokes it.
    ///
    /// # Errors
    /// What `write` returns (nothing is cached then); cache errors and
    /// timeouts (if Redis fails after the write committed, the key is
    /// invalidated, or the error says the cache may hold the old row);
    /// [`ErrorKind::InvalidArgument`] for an empty key (or one holding `{`
    /// or `}`), a TTL of zero or
    /// beyond [`MAX_TTL`](crate::MAX_TTL), or a value that does not
    /// serialize.
    ///
    /// ```no_run
    /// # let engine = cacheaside::CacheAside::open(&cacheaside::Config::from_env())?;
    /// let sql = "UPDATE prices SET cents = $2, version = version + 1 WHERE sku = $1 RETURNING cents, version";
    /// let cents: Option<i64> = engine.write_through("price:A1", std::time::Duration::from_secs(60), || {
    ///     let row = engine.db().query_opt(sql, &[&"A1", &999_i64])?;
    ///     Ok(row.map(|r| cacheaside::Versioned::new(r.get::<_, i64>(0), r.get::<_, i64>(1) as u64)))
    /// })?;
    /// # Ok::<(), cacheaside::Error>(())
    /// ```
    pub fn write_through<T, V, F>(&self, key: &str, ttl: Duration, write: F) -> Result<Option<T>>
    where
        T: Serialize,
        V: Into<Versioned<T>>,
        F: FnOnce() -> Result<Option<V>>,
    {
        check_key(key)?;
        check_ttl("ttl", ttl)?;
        self.inner.engine.write_through(
            key,
            ttl,
            || Ok(write()?.map(pair)),
            || self.relay_covers(key),
        )
    }

    /// Announces a write of `key` to the write-behind workers before it
    /// runs (see [`crate::write_behind::SyncWrite`]).
    pub(crate) fn announce_write(&self, key: &str) -> Option<crate::write_behind::SyncWrite<'_>> {
        // With the breaker open, Redis is failing: no worker commits either.
        (!self.inner.engine.breaker.is_open()).then_some(())?;
        crate::write_behind::announce_sync_write(
            self.cache(),
            key,
            self.inner.config.call_deadline(),
        )
    }

    /// Test hooks: forced interleavings for this crate's tests.
    #[cfg(feature = "test-hooks")]
    pub fn hooks(&self) -> &crate::hooks::Hooks {
        &self.inner.engine.hooks
    }

    /// True while this engine's plain reads claim their lease in the
    /// lookup's round trip (its reads have mostly missed lately).
    #[cfg(feature = "test-hooks")]
    pub fn claims_leases_ahead(&self) -> bool {
        self.inner.engine.expects_misses()
    }

    /// Test hook: the `CLIENT ID` of the near cache's tracking connection,
    /// while it is connected.
    #[cfg(feature = "test-hooks")]
    pub fn local_cache_tracker_id(&self) -> Option<u64> {
        self.inner
            .engine
            .near
            .as_ref()
            .and_then(|near| near.tracker_id())
    }

    /// Test hook: `true` makes the near cache's tracker drop every
    /// invalidation message (heartbeats still flow), so only
    /// `max_staleness` bounds what L1 serves.
    #[cfg(feature = "test-hooks")]
    pub fn ignore_local_invalidations(&self, ignore: bool) {
        if let Some(near) = &self.inner.engine.near {
            near.ignore_invalidations(ignore);
        }
    }

    /// Test hook: how many threads wait on the flight for `key` in progress.
    #[cfg(feature = "test-hooks")]
    pub fn flight_followers(&self, key: &str) -> usize {
        self.inner.engine.flight_followers(key)
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
        self.inner.engine.counters.stats()
    }

    /// True when the near cache ([`Config::local_cache`]) is on and may
    /// serve entries now: its tracking connection is subscribed and has
    /// confirmed, within the last 50 ms, that every invalidation was applied.
    /// Reads go to Redis while it is false.
    ///
    /// ```no_run
    /// # let engine = cacheaside::CacheAside::open(&cacheaside::Config::from_env())?;
    /// if !engine.local_cache_ready() {
    ///     println!("L1 dark: reads go to Redis");
    /// }
    /// # Ok::<(), cacheaside::Error>(())
    /// ```
    pub fn local_cache_ready(&self) -> bool {
        self.inner
            .engine
            .near
            .as_ref()
            .is_some_and(|near| near.live())
    }

    /// Entries the near cache holds now (0 when it is off).
    pub fn local_cache_entries(&self) -> u64 {
        self.inner.engine.near.as_ref().map_or(0, |near| near.len())
    }

    /// Keys with a single-flight load in progress in this process; 0 when no
    /// call is running (per-key state is freed when its flight ends).
    pub fn in_flight(&self) -> usize {
        self.inner.engine.in_flight()
    }

    /// Loads whose leases and locks are being renewed now; 0 when no load
    /// runs.
    pub fn holds(&self) -> usize {
        self.inner.engine.keeper.live()
    }

    /// True while the circuit breaker keeps reads away from Redis.
    pub fn breaker_open(&self) -> bool {
        self.inner.engine.breaker.is_open()
    }

    /// Starts the invalidation relay (if the config turns it on and it is
    /// not running yet): a thread that applies the outbox to the cache.
    /// [`Client::open`](crate::Client::open) and
    /// [`capture_changes`](Self::capture_changes) start it; call this when
    /// another process installed the capture.
    pub fn start_relay(&self) {
        if !self.inner.config.invalidation_relay {
            return;
        }
        let mut relay = self.inner.relay.lock();
        if relay.is_none() {
            *relay = Some(crate::relay::Relay::start(
                self.inner.engine.clone(),
                &self.inner.config,
            ));
            self.inner.engine.breaker.set_relay_running(true);
        }
    }

    /// Captures the changes of `table` for the invalidation relay: installs
    /// (idempotently) the outbox ([`Config::outbox_table`]) and a trigger
    /// that, in the same transaction as every insert, update or delete of a
    /// row, records the cache key `key_prefix || <key_column>` (the old and
    /// the new one), and on a `TRUNCATE` a reset of every key under
    /// `key_prefix` (the triggers fire also under `session_replication_role
    /// = replica`, and send no `NOTIFY`: the relay polls); then starts the
    /// relay. After this, a write to `table` from anywhere (psql, another
    /// service, a migration, a logical-replication apply) invalidates its
    /// key, and an insert ends a cached absence. One capture per table:
    /// capturing it again replaces the triggers (and upgrades an outbox an
    /// older version made).
    ///
    /// With a `version_column` (the version your versioned reads and
    /// write-throughs cache), the relay leaves alone a key whose cached row
    /// is already at the changed row's version or newer, so it does not undo
    /// a write-through or evict a fresh fill; and every update bumps that
    /// column if the writer did not (so a write from psql orders correctly).
    /// Without one, every captured change deletes its key.
    ///
    /// ```no_run
    /// # let engine = cacheaside::CacheAside::open(&cacheaside::Config::from_env())?;
    /// // row id 7 -> key "order:7"
    /// engine.capture_changes("orders", "order:", "id", Some("version"))?;
    /// # Ok::<(), cacheaside::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`ErrorKind::InvalidArgument`] for a table or column that is not an
    /// SQL identifier or a prefix holding `{`, `}` or control characters;
    /// database errors and timeouts.
    pub fn capture_changes(
        &self,
        table: &str,
        key_prefix: &str,
        key_column: &str,
        version_column: Option<&str>,
    ) -> Result<()> {
        self.capture(table, key_prefix, key_column, version_column, None)
    }

    /// [`capture_changes`](Self::capture_changes) of a table whose rows
    /// carry a tag: every insert, update or delete of a row also
    /// invalidates the tag `tag_prefix || <tag_column>` (the one the row
    /// had and the one it has, so an update that moves the row invalidates
    /// both), exactly as [`invalidate_tag`](Self::invalidate_tag) does.
    /// Tag your reads of the table's rows with the same names
    /// ([`get_or_load_tagged`](Self::get_or_load_tagged)), and a write from
    /// anywhere reaches every entry carrying the row's tag, whatever its
    /// key.
    ///
    /// A row whose tag column is NULL has no tag; one whose tag is not a
    /// valid tag name (`{`, `}`, a control character, over 512 bytes) is
    /// skipped by the relay (logged). A `TRUNCATE` resets `key_prefix` only:
    /// it invalidates no tag. Capturing the table again without a tag
    /// column (`capture_changes`) removes the tag capture.
    ///
    /// ```no_run
    /// # let engine = cacheaside::CacheAside::open(&cacheaside::Config::from_env())?;
    /// // product 7 in category 3: key "product:7", tag "category:3"
    /// engine.capture_changes_tagged(
    ///     "products", "product:", "id", Some("version"), "category:", "category_id",
    /// )?;
    /// # Ok::<(), cacheaside::Error>(())
    /// ```
    ///
    /// # Errors
    /// As [`capture_changes`](Self::capture_changes), and
    /// [`ErrorKind::InvalidArgument`] for a `tag_column` that is not an SQL
    /// identifier or a `tag_prefix` holding `{`, `}` or control characters.
    pub fn capture_changes_tagged(
        &self,
        table: &str,
        key_prefix: &str,
        key_column: &str,
        version_column: Option<&str>,
        tag_prefix: &str,
        tag_column: &str,
    ) -> Result<()> {
        let tag = Some((tag_prefix, tag_column));
        self.capture(table, key_prefix, key_column, version_column, tag)
    }

    fn capture(
        &self,
        table: &str,
        key_prefix: &str,
        key_column: &str,
        version_column: Option<&str>,
        tag: Option<(&str, &str)>,
    ) -> Result<()> {
        crate::relay::Outbox::new(&self.inner.config.outbox_table)?.capture(
            &self.inner.engine.db,
            table,
            key_prefix,
            key_column,
            version_column,
            tag,
        )?;
        // Read again on the next need: this table is captured now.
        *self.inner.captured.lock() = None;
        self.start_relay();
        Ok(())
    }

    /// Stops the invalidation relay, if it runs (and joins its thread).
    pub fn stop_relay(&self) {
        let relay = self.inner.relay.lock().take();
        if let Some(relay) = relay {
            self.inner.engine.breaker.set_relay_running(false);
            relay.stop();
        }
    }

    /// True when the invalidation relay runs for this engine.
    pub fn relay_running(&self) -> bool {
        self.inner.relay.lock().is_some()
    }

    /// Outbox rows this engine's relay has read so far, and the most it
    /// held in memory at once; `(0, 0)` without a relay. For tests.
    #[cfg(feature = "test-hooks")]
    pub fn relay_rows_read(&self) -> (u64, u64) {
        let relay = self.inner.relay.lock();
        relay.as_ref().map_or((0, 0), |r| r.handle().rows_read())
    }

    /// Makes the relay read the outbox now, and waits (up to `timeout`) until
    /// it has applied every change committed before this call. True if it
    /// did. Without a relay, false at once.
    pub fn sync_relay(&self, timeout: Duration) -> bool {
        let relay = self
            .inner
            .relay
            .lock()
            .as_ref()
            .map(crate::relay::Relay::handle);
        relay.is_some_and(|r| r.sync(timeout))
    }

    /// Registers the write that write-behind workers run for keys starting
    /// with `prefix` (the longest matching prefix wins; `""` matches every
    /// key). Every process that enqueues or runs workers for this namespace
    /// registers the same appliers: a worker may flush changes enqueued
    /// anywhere, and a closure cannot cross processes, so each process
    /// brings its own copy of the code and the stream carries only data.
    ///
    /// A worker calls `applier` with up to
    /// [`Config::write_behind_batch`] changes, at most one per key (the
    /// newest), inside a transaction that commits when it returns `Ok`. Its
    /// write must be conditional on each change's
    /// [`seq`](WriteBehindChange::seq): a change is delivered at least once,
    /// and changes of one key may reach different workers in any order, so
    /// a change older than what the row holds, or one applied before, must
    /// change nothing. That is what makes the effect exactly once.
    ///
    /// An `Err` whose cause is an unreachable or timed-out Postgres makes
    /// the changes wait and retry; any other `Err` (or a panic) is a
    /// refusal: the changes are retried one by one, and a change refused
    /// [`Config::write_behind_attempts`] times goes to the dead-letter
    /// stream.
    ///
    /// ```no_run
    /// # let engine = cacheaside::CacheAside::open(&cacheaside::Config::from_env())?;
    /// // prices(sku text primary key, cents bigint, seq bigint)
    /// engine.register_write_behind("price:", |tx, changes| {
    ///     for change in changes {
    ///         let sku = &change.key["price:".len()..];
    ///         let cents: i64 = serde_json::from_slice(change.json)
    ///             .map_err(|e| cacheaside::Error::invalid_argument(e))?;
    ///         tx.execute(
    ///             "INSERT INTO prices (sku, cents, seq) VALUES ($1, $2, $3)
    ///              ON CONFLICT (sku) DO UPDATE SET cents = $2, seq = $3 WHERE prices.seq < $3",
    ///             &[&sku, &cents, &(change.seq as i64)],
    ///         )?;
    ///     }
    ///     Ok(())
    /// })?;
    /// # Ok::<(), cacheaside::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`ErrorKind::InvalidArgument`] for a prefix holding `{`, `}` or a
    /// control character.
    pub fn register_write_behind<F>(&self, prefix: &str, applier: F) -> Result<()>
    where
        F: Fn(&mut crate::db::Transaction<'_>, &[WriteBehindChange<'_>]) -> Result<()>
            + Send
            + Sync
            + 'static,
    {
        let applier: Applier = Arc::new(applier);
        self.inner.write_behind.register(prefix, applier)
    }

    /// Write-behind: makes `value` the value of `key` at once (every reader,
    /// in every process, gets it from now on) and queues its write to the
    /// source, in one Redis script; returns the change's sequence number.
    /// Workers ([`start_write_behind`](Self::start_write_behind), here or
    /// in any process) write it later with the applier registered for the
    /// key's prefix.
    ///
    /// Until the source has it (or a synchronous write of the key, which
    /// supersedes it), the change wins over the source's older row: a reader whose load began earlier cannot cache that row, and if
    /// the cached value is evicted, expires or is deleted, the next read
    /// rebuilds it from the key's pending record (no load). Once a worker
    /// has committed it, the cached value is dropped and the next read
    /// loads the committed row. Durable once this returns, as far as Redis
    /// is (see `docs/write-behind.md`).
    ///
    /// ```no_run
    /// # let engine = cacheaside::CacheAside::open(&cacheaside::Config::from_env())?;
    /// # engine.register_write_behind("price:", |_, _| Ok(()))?;
    /// let ttl = std::time::Duration::from_secs(60);
    /// let seq = engine.write_behind("price:A1", ttl, &999_i64)?;
    /// let now: Option<i64> = engine.get_or_load("price:A1", ttl, || unreachable!("cached"))?;
    /// assert_eq!(now, Some(999));
    /// # Ok::<(), cacheaside::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`ErrorKind::BacklogFull`] when [`Config::write_behind_max_backlog`]
    /// changes already wait (nothing was enqueued: retry later);
    /// [`ErrorKind::InvalidArgument`] for an empty key, a key no applier is
    /// registered for, a TTL of zero or beyond [`MAX_TTL`](crate::MAX_TTL),
    /// a value that does not serialize or whose JSON is larger than 1 MiB; cache errors and timeouts (the
    /// change may or may not have been enqueued after a timeout);
    /// [`ErrorKind::Cache`] while this process's circuit breaker is open
    /// (its reads would not see the change: nothing is enqueued).
    pub fn write_behind<T: Serialize + ?Sized>(
        &self,
        key: &str,
        ttl: Duration,
        value: &T,
    ) -> Result<u64> {
        check_key(key)?;
        check_ttl("ttl", ttl)?;
        let json = to_json(value)?;
        let _evict = self.inner.engine.evict_on_return(key);
        self.inner
            .write_behind
            .enqueue(&self.inner.engine, key, ttl, Json::Whole(&json), 0)
    }

    /// [`write_behind`](Self::write_behind) of a value whose JSON carries
    /// its own sequence number: `head`, the number, `tail`. The number is
    /// above `floor` (e.g. the version the row had when the value was
    /// built).
    pub(crate) fn write_behind_sequenced(
        &self,
        key: &str,
        ttl: Duration,
        head: &[u8],
        tail: &[u8],
        floor: u64,
    ) -> Result<u64> {
        check_key(key)?;
        check_ttl("ttl", ttl)?;
        let _evict = self.inner.engine.evict_on_return(key);
        self.inner.write_behind.enqueue(
            &self.inner.engine,
            key,
            ttl,
            Json::Sequenced { head, tail },
            floor,
        )
    }

    /// Starts `workers` write-behind worker threads in this process. They
    /// read the namespace's change stream through its consumer group
    /// (sharing the work with the workers of every other process), coalesce
    /// the changes of each key, write them in batches through the
    /// registered appliers, and acknowledge them only after the commit.
    /// Changes a dead worker left pending are claimed within about 2 s (its
    /// liveness key expires); those of a live worker slower than
    /// [`Config::write_behind_claim_after`] after that.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidArgument`] for 0 or more than
    /// [`MAX_WRITE_BEHIND_WORKERS`](crate::MAX_WRITE_BEHIND_WORKERS) workers, or when
    /// workers already run (stop them first).
    pub fn start_write_behind(&self, workers: u32) -> Result<()> {
        self.inner.write_behind.start(&self.inner.engine, workers)
    }

    /// Stops this process's write-behind workers and waits for them: each
    /// finishes the batch in hand (bounded by the statement timeout) and
    /// notices within 100 ms when idle. What a worker holds for a retry
    /// stays pending, for another worker to claim. A no-op when none run;
    /// dropping the engine does the same.
    pub fn stop_write_behind(&self) {
        self.inner.write_behind.stop();
    }

    /// Write-behind worker threads running in this process.
    pub fn write_behind_workers(&self) -> usize {
        self.inner.write_behind.running()
    }

    /// Waits until every write-behind change enqueued (by any process)
    /// before this call has been committed to the source, or dead-lettered
    /// ([`Stats::write_behind_dead_lettered`] and
    /// [`write_behind_dead_letters`](Self::write_behind_dead_letters) tell),
    /// at most `timeout`. Workers may run in any process; without any, it
    /// times out unless nothing is pending. When it returns, this process's
    /// workers have also finished the round they were in, so its
    /// [`Stats`] count every change they took out of the streams.
    ///
    /// # Errors
    /// [`ErrorKind::Timeout`] when changes from before the call are still
    /// pending at the timeout; cache errors.
    pub fn drain_write_behind(&self, timeout: Duration) -> Result<()> {
        self.inner
            .write_behind
            .drain(&self.inner.engine.cache, timeout)
    }

    /// Write-behind changes enqueued (by any process) and not yet committed
    /// or dead-lettered: the backlog that
    /// [`Config::write_behind_max_backlog`] bounds.
    ///
    /// # Errors
    /// Cache errors and timeouts.
    pub fn write_behind_pending(&self) -> Result<u64> {
        self.inner.write_behind.pending(&self.inner.engine.cache)
    }

    /// How many dead letters are kept (see
    /// [`write_behind_dead_letters`](Self::write_behind_dead_letters)), over
    /// every dead-letter stream (one per slot on a Redis Cluster).
    ///
    /// # Errors
    /// Cache errors and timeouts.
    pub fn write_behind_dead_letter_count(&self) -> Result<u64> {
        self.inner
            .write_behind
            .dead_lettered(&self.inner.engine.cache)
    }

    /// The oldest `count` entries of the dead-letter stream: changes the
    /// workers gave up on, with the error that made them. They stay there
    /// until removed ([`drop_dead_letters`](Self::drop_dead_letters), or
    /// `XDEL` on the stream `{namespace}{write_behind}:dead`). On a Redis
    /// Cluster each slot has its own dead-letter stream: this lists the
    /// oldest of all of them, and each id ends with `@<slot>`.
    ///
    /// # Errors
    /// Cache errors and timeouts.
    pub fn write_behind_dead_letters(&self, count: usize) -> Result<Vec<DeadLetter>> {
        self.inner
            .write_behind
            .dead_letters(&self.inner.engine.cache, count)
    }

    /// Replays the oldest `count` dead letters: each is enqueued again
    /// through the normal write-behind path (cached for [`Config::ttl`],
    /// with a sequence number above its old one, for the workers of any
    /// process to write), then removed from the dead-letter stream. Needs
    /// no applier in this process (an operator's command registers none);
    /// the workers that take the change need one.
    ///
    /// A letter whose key was given a newer write-behind change since is
    /// left and reported superseded (replaying it would take the key back
    /// in time); one without a replayable key or JSON value is left and
    /// reported unreadable. Fix the cause first (the applier's error, the
    /// constraint), or the change comes back to the dead-letter stream.
    ///
    /// ```no_run
    /// # let engine = cacheaside::CacheAside::open(&cacheaside::Config::from_env())?;
    /// let report = engine.replay_dead_letters(100)?;
    /// println!("{} replayed, {} superseded", report.replayed.len(), report.superseded.len());
    /// # Ok::<(), cacheaside::Error>(())
    /// ```
    ///
    /// # Errors
    /// Cache errors and timeouts (the letters replayed before it stay
    /// replayed); [`ErrorKind::InvalidArgument`] on a Redis Cluster;
    /// [`ErrorKind::Cache`] while this process's circuit breaker is open.
    pub fn replay_dead_letters(&self, count: usize) -> Result<crate::write_behind::ReplayReport> {
        let inner = &self.inner;
        inner
            .write_behind
            .replay_dead_letters(&inner.engine, count, inner.config.ttl)
    }

    /// Removes the dead letters `ids` (their [`DeadLetter::id`]s) from the
    /// dead-letter stream, unreplayed; returns how many were there.
    ///
    /// ```no_run
    /// # let engine = cacheaside::CacheAside::open(&cacheaside::Config::from_env())?;
    /// let ids: Vec<String> = engine.write_behind_dead_letters(10)?.into_iter().map(|d| d.id).collect();
    /// let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    /// engine.drop_dead_letters(&ids)?;
    /// # Ok::<(), cacheaside::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`ErrorKind::InvalidArgument`] for an id that is not a stream entry
    /// id (on a Redis Cluster, one with its `@<slot>`, as
    /// [`write_behind_dead_letters`](Self::write_behind_dead_letters) gives
    /// it; nothing is removed then); cache errors and timeouts.
    pub fn drop_dead_letters(&self, ids: &[&str]) -> Result<u64> {
        self.inner
            .write_behind
            .remove_dead_letters(&self.inner.engine.cache, ids)
    }

    /// Samples up to `sample` cached entries of the tables whose changes
    /// are captured with a version column
    /// ([`capture_changes`](Self::capture_changes), in any process) and
    /// compares each with its row in Postgres: one `SCAN` per thousand
    /// keys in the database until the sample is full, one `MGET`, one
    /// query per captured table, and one more Redis round trip to confirm
    /// what looks stale. Changes nothing; counts into
    /// [`Stats::inspected`] and [`Stats::inspect_stale`], and reports each
    /// stale entry as a `warn` event. [`Config::inspect_every`] runs it in
    /// the background.
    ///
    /// An entry is stale when its version is below the row's, when it
    /// holds a value for a row that is gone, or an absence for a row that
    /// exists; an entry that changed while the inspection ran, or has a
    /// pending write-behind change, is not. See
    /// [`InspectReport`](crate::InspectReport).
    ///
    /// ```no_run
    /// # let engine = cacheaside::CacheAside::open(&cacheaside::Config::from_env())?;
    /// let report = engine.inspect(100)?;
    /// for stale in &report.stale {
    ///     println!("{} stale for {:?}", stale.key, stale.stale_for);
    /// }
    /// # Ok::<(), cacheaside::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`ErrorKind::InvalidArgument`] for a sample of 0 or above 10 000,
    /// or on a Redis Cluster; database and cache errors and timeouts.
    pub fn inspect(&self, sample: usize) -> Result<crate::inspect::InspectReport> {
        let engine = &self.inner.engine;
        crate::inspect::inspect(
            &engine.db.uncounted(),
            &engine.cache,
            &engine.counters,
            &self.inner.config.outbox_table,
            sample,
        )
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Before the background pool and the keeper go: the workers and the
        // relay use the engine they serve.
        self.write_behind.stop();
        let relay = self.relay.lock().take();
        if let Some(relay) = relay {
            self.engine.breaker.set_relay_running(false);
            relay.stop();
        }
    }
}

/// A versioned value as the engine takes it.
fn pair<T>(versioned: impl Into<Versioned<T>>) -> (T, u64) {
    let v = versioned.into();
    (v.value, v.version)
}
