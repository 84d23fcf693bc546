//! The generic cache-aside engine: any key, any `Serialize +
//! DeserializeOwned` value, any loader.
//!
//! Guarantees (each with a test named in the README):
//! - A hit is one Redis round trip and no Postgres statement.
//! - No read returns, and no fill caches, a row older than a write that
//!   returned before the read began: fills go through leases
//!   ([`crate::lease`]), and a single-flight follower takes its leader's
//!   row only if the read that produced it began after the follower joined
//!   ([`crate::singleflight`]).
//! - However many threads and processes miss one key together, one load
//!   runs, also when it outlasts the lease and lock TTLs (they are renewed).
//! - Every call honours one deadline ([`Config::call_deadline`]), whatever
//!   role it ends up in.
//! - When Redis fails, reads go to the source (still one load per key per
//!   process) and do not fill; after a few failures the circuit breaker
//!   stops them touching Redis at all ([`crate::breaker`]).
//! - When the source fails and fail-safe is on, the last good copy is
//!   served and re-armed for a throttle period; with a soft timeout, a slow
//!   reload finishes in the background while callers get the copy.

use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::background::Background;
use crate::breaker::{Breaker, Permit};
use crate::cache::{Cache, Raw, check_key};
use crate::config::{Config, check_ttl};
use crate::db::Db;
use crate::entry::{Entry, Payload, now_ms};
use crate::error::{Error, ErrorKind, Result};
use crate::lease::{self, Acquired, Claim, Hold, Json, Keeper, Keys, Ttls, new_token};
use crate::near::{Near, Slot, Tracker};
use crate::observe::{Counters, MissSpan, report};
use crate::singleflight::{Leader, Marks, Role, SingleFlight, WaitError, Waited};
use crate::write_behind::{Applier, DeadLetter, WriteBehind, WriteBehindChange};

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

impl Mode {
    /// The mode's name in reports (`plain`, `single_flight`).
    fn name(self) -> &'static str {
        match self {
            Mode::Plain => "plain",
            Mode::SingleFlight => "single_flight",
        }
    }
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
    engine: Engine,
    background: Background,
    relay: Mutex<Option<crate::relay::Relay>>,
    write_behind: WriteBehind,
    /// Keeps L1 coherent; stopped (joined) when the engine drops.
    _tracker: Option<crate::near::Tracker>,
    config: Config,
}

/// Everything a read needs, cheap to clone into a background job (which
/// must not own the [`Background`] pool it runs on).
#[derive(Clone)]
pub(crate) struct Engine {
    pub(crate) db: Db,
    pub(crate) cache: Cache,
    flights: SingleFlight<Shared>,
    keeper: Arc<Keeper>,
    pub(crate) breaker: Arc<Breaker>,
    settings: Arc<Settings>,
    pub(crate) counters: Arc<Counters>,
    /// The near cache, when [`Config::local_cache`] turns it on.
    near: Option<Arc<Near>>,
    #[cfg(feature = "test-hooks")]
    pub(crate) hooks: Arc<crate::hooks::Hooks>,
}

/// What a single-flight leader hands its followers.
type Shared = Result<Answer, Error>;

/// A read's answer, before the caller decodes it as its type.
#[derive(Clone, Debug)]
enum Answer {
    /// The JSON of the value.
    Value(Arc<[u8]>),
    /// The source has no such row.
    Absent,
    /// Serve the fail-safe copy (each caller its own: the one its lookup
    /// found).
    Stale,
}

struct Settings {
    negative_ttl: Duration,
    ttls: Ttls,
    lock_wait: Duration,
    lock_poll: Duration,
    /// The longest one call may take.
    call_deadline: Duration,
    /// What a load may take: kept free at the end of a call's deadline.
    load_budget: Duration,
    beta: f64,
    fail_safe_max: Duration,
    fail_safe_throttle: Duration,
    soft_timeout: Duration,
}

/// What an engine has done since it opened; see [`CacheAside::stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Reads answered from the cache (values and cached absences).
    pub hits: u64,
    /// Reads that found no usable entry in the cache.
    pub misses: u64,
    /// Reads that did not touch the cache because the circuit breaker was
    /// open (each went to the source).
    pub bypassed: u64,
    /// Hits that XFetch picked to reload ahead of expiry, and that did.
    pub early_refreshes: u64,
    /// Fills refused because their lease was revoked by a write (or taken
    /// over): each is a stale row that was *not* cached.
    pub fills_dropped: u64,
    /// Loads whose row could not be cached because Redis failed or refused
    /// the claim or the fill (unreachable, out of memory): the row was
    /// returned, not cached.
    pub fills_failed: u64,
    /// Entries that did not decode (or were not the expected type, or not a
    /// string at all); each was treated as a miss and deleted.
    pub corrupt_entries: u64,
    /// Fail-safe copies served because a reload failed or was too slow.
    pub stale_served: u64,
    /// Redis calls that failed because Redis was unavailable.
    pub cache_errors: u64,
    /// Times the circuit breaker opened.
    pub breaker_opened: u64,
    /// Times the circuit breaker closed again.
    pub breaker_closed: u64,
    /// Invalidations that could not reach Redis (each left to the relay, or
    /// reported to the caller when no relay runs).
    pub invalidations_failed: u64,
    /// Invalidations the relay applied from the outbox.
    pub relay_invalidations: u64,
    /// Relay rounds that read the outbox to the end.
    pub relay_rounds: u64,
    /// Relay rounds that failed (Postgres or Redis unreachable); each is
    /// retried.
    pub relay_errors: u64,
    /// Times the relay found itself away longer than the outbox retention
    /// and emptied its namespace.
    pub relay_resets: u64,
    /// Write-behind changes this process enqueued.
    pub write_behind_enqueued: u64,
    /// Write-behind changes this process's workers committed to Postgres:
    /// the newest change of each key in a batch.
    pub write_behind_applied: u64,
    /// Write-behind changes that needed no write of their own: a newer
    /// change of the same key was written in their place.
    pub write_behind_coalesced: u64,
    /// Write-behind writes put off for a retry: Postgres was unreachable,
    /// or refused the write (which counts towards
    /// [`Config::write_behind_attempts`]).
    pub write_behind_retried: u64,
    /// Write-behind changes this process's workers moved to the dead-letter
    /// stream (unparseable, or refused on every attempt).
    pub write_behind_dead_lettered: u64,
    /// Write-behind changes this process's workers claimed from another
    /// worker (dead, or slower than [`Config::write_behind_claim_after`]).
    pub write_behind_claimed: u64,
    /// How long the oldest change of the last batch this process's workers
    /// committed had waited, from enqueue to commit, in milliseconds
    /// (Redis's clock at the enqueue against this machine's at the commit).
    pub write_behind_lag_ms: u64,
    /// Reads answered from the near cache (L1) in process memory, with no
    /// network call ([`Config::local_cache`]); not counted in `hits`.
    pub local_hits: u64,
    /// Reads that L1, being on, could not answer (not held, expired, or L1
    /// dark because its tracking connection is not confirmed).
    pub local_misses: u64,
    /// L1 entries evicted because Redis said their key changed.
    pub local_invalidations: u64,
    /// Times L1 was emptied because its tracking connection broke or
    /// stopped answering.
    pub local_clears: u64,
}

/// A load's result in the form the cache stores: JSON, with the version
/// that orders it against write-through and how long it took.
struct Loaded {
    json: Option<Vec<u8>>,
    version: u64,
    took: Duration,
}

type LoadResult = Result<Loaded>;

/// A loader as the engine runs it: on the calling thread, or, when it owns
/// what it needs, on a background thread.
trait Load: Sized {
    fn run(self) -> LoadResult;
    /// The loader as a job for another thread, if it can move there.
    fn detach(self) -> Result<Box<dyn FnOnce() -> LoadResult + Send>, Self>;
}

/// A loader that borrows from its caller's stack.
struct Inline<F>(F);

impl<F: FnOnce() -> LoadResult> Load for Inline<F> {
    fn run(self) -> LoadResult {
        (self.0)()
    }

    fn detach(self) -> Result<Box<dyn FnOnce() -> LoadResult + Send>, Self> {
        Err(self)
    }
}

/// A loader that owns what it needs.
struct Owned<F>(F);

impl<F: FnOnce() -> LoadResult + Send + 'static> Load for Owned<F> {
    fn run(self) -> LoadResult {
        (self.0)()
    }

    fn detach(self) -> Result<Box<dyn FnOnce() -> LoadResult + Send>, Self> {
        Ok(Box::new(self.0))
    }
}

/// Runs a typed loader (reporting its time, failed or not) and encodes its
/// value as the cache stores it.
fn encoded<T: Serialize>(
    counters: &Counters,
    load: impl FnOnce() -> Result<Option<(T, u64)>>,
) -> LoadResult {
    let started = Instant::now();
    let loaded = load();
    let took = started.elapsed();
    counters.loaded(took);
    let loaded = loaded?;
    Ok(match loaded {
        Some((value, version)) => Loaded {
            json: Some(to_json(&value)?),
            version,
            took,
        },
        None => Loaded {
            json: None,
            version: 0,
            took,
        },
    })
}

/// One read's miss: what it knows and may still do.
struct Miss<'a> {
    key: &'a str,
    keys: Keys,
    ttl: Duration,
    /// The fail-safe copy the lookup found (raw entry), if any.
    stale: Option<Vec<u8>>,
    /// Whether this call may use Redis (the breaker's verdict and the
    /// lookup's outcome).
    permit: Permit,
    use_redis: bool,
    started: Instant,
    deadline: Instant,
    /// Does a decoded payload have the caller's type?
    fits: &'a dyn Fn(&[u8]) -> bool,
    /// A flight this call followed could not hand it its row (a write came
    /// during that load): the readers it sent back are on their way.
    sent_back: std::cell::Cell<bool>,
}

impl Miss<'_> {
    /// When a caller holding a fail-safe copy stops waiting for a reload.
    fn soft_deadline(&self, settings: &Settings) -> Option<Instant> {
        (self.stale.is_some() && !settings.soft_timeout.is_zero())
            .then(|| (self.started + settings.soft_timeout).min(self.deadline))
    }
}

/// A usable entry a lookup found.
struct Found<T> {
    value: Option<T>,
    fresh: bool,
    refresh_due: bool,
}

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
        let ttls = Ttls {
            lease: config.lease_ttl,
            lock: config.lock_ttl,
        };
        let settings = Settings {
            negative_ttl: config.negative_ttl,
            ttls,
            lock_wait: config.lock_wait,
            lock_poll: config.lock_poll,
            call_deadline: config.call_deadline(),
            load_budget: config.pool_timeout
                + config.statement_timeout
                + crate::db::CLIENT_MARGIN
                + config.cache_timeout * 2,
            beta: config.beta,
            fail_safe_max: config.fail_safe_max,
            fail_safe_throttle: config.fail_safe_throttle,
            soft_timeout: config.soft_timeout,
        };
        let counters = Arc::new(Counters::new(&config.namespace));
        let cache_for_write_behind = cache.clone();
        let near = config
            .local_cache
            .is_on()
            .then(|| Arc::new(Near::new(config.local_cache, counters.clone())));
        let tracker = near
            .clone()
            .map(|near| Tracker::start(near, cache.clone(), config.cache_timeout));
        Ok(CacheAside {
            engine: Engine {
                keeper: Arc::new(Keeper::new(cache.clone(), ttls)),
                breaker: Arc::new(Breaker::new(
                    config.breaker_failures,
                    config.breaker_cool_off,
                    config.invalidation_relay,
                    counters.clone(),
                )),
                db,
                cache,
                flights: SingleFlight::new(),
                settings: Arc::new(settings),
                counters,
                near,
                #[cfg(feature = "test-hooks")]
                hooks: Default::default(),
            },
            background: Background::new(config.background_threads),
            relay: Mutex::new(None),
            write_behind: WriteBehind::new(&cache_for_write_behind, config),
            _tracker: tracker,
            config: config.clone(),
        })
    }

    /// The Postgres pool (and its query counter).
    pub fn db(&self) -> &Db {
        &self.engine.db
    }

    /// The Redis pool.
    pub fn cache(&self) -> &Cache {
        &self.engine.cache
    }

    /// Checks that both servers answer: one Redis `PING` and one Postgres
    /// `SELECT 1` (not counted in [`Db::query_count`]). Reads keep working
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
            .engine
            .cache
            .run(|conn| redis::cmd("PING").query(conn))?;
        debug_assert_eq!(pong, "PONG");
        self.engine.db.uncounted().query_one("SELECT 1", &[])?;
        Ok(())
    }

    /// The config this engine was built with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Reads `key` from the cache, or on a miss calls `load` and caches what
    /// it returns for `ttl` (`None`: cached as absent for the negative TTL).
    ///
    /// Every caller that misses calls its own `load` (see
    /// [`get_or_load_singleflight`](Self::get_or_load_singleflight) for
    /// one load per key). An entry that does not decode as `T` is deleted,
    /// counted in [`Stats::corrupt_entries`] and treated as a miss.
    ///
    /// # Errors
    /// What `load` returns (or, with fail-safe on and a copy at hand, the
    /// copy instead); cache errors only when nothing else can answer;
    /// [`ErrorKind::InvalidArgument`] for an empty key (or one holding `{`
    /// or `}`), or a TTL of zero or
    /// beyond [`MAX_TTL`](crate::MAX_TTL).
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
    /// `load` must not read `key` through this engine: that is reported as
    /// [`ErrorKind::InvalidArgument`] instead of waiting for itself.
    ///
    /// # Errors
    /// As [`get_or_load`](Self::get_or_load), plus [`ErrorKind::Timeout`]
    /// when the call's deadline passes while it waits.
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
    /// would replace. `load` runs on the calling thread.
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
        let counters = &self.engine.counters;
        self.read(
            key,
            ttl,
            mode,
            Inline(move || encoded(counters, load)),
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
    /// use cacheaside::Mode;
    /// let db = engine.db().clone();
    /// let n: Option<i64> = engine.get_or_load_owned("tables", std::time::Duration::from_secs(60), Mode::SingleFlight, move || {
    ///     Ok(db.query_one("SELECT count(*) FROM pg_class", &[])?.map(|r| (r.get(0), 0)))
    /// })?;
    /// # Ok::<(), cacheaside::Error>(())
    /// ```
    ///
    /// # Errors
    /// As [`get_or_load_singleflight`](Self::get_or_load_singleflight).
    pub fn get_or_load_owned<T, F>(
        &self,
        key: &str,
        ttl: Duration,
        mode: Mode,
        load: F,
    ) -> Result<Option<T>>
    where
        T: Serialize + DeserializeOwned + 'static,
        F: FnOnce() -> Result<Option<(T, u64)>> + Send + 'static,
    {
        let counters = self.engine.counters.clone();
        self.read(
            key,
            ttl,
            mode,
            Owned(move || encoded(&counters, load)),
            Slot::decode,
        )
    }

    /// [`get_or_load_owned`](Self::get_or_load_owned) for a value that can
    /// be cloned: a near-cache hit clones the value the first hit decoded
    /// instead of decoding JSON again. [`Client`](crate::Client) reads this
    /// way.
    pub(crate) fn get_or_load_owned_cloned<T, F>(
        &self,
        key: &str,
        ttl: Duration,
        mode: Mode,
        load: F,
    ) -> Result<Option<T>>
    where
        T: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
        F: FnOnce() -> Result<Option<(T, u64)>> + Send + 'static,
    {
        let counters = self.engine.counters.clone();
        self.read(
            key,
            ttl,
            mode,
            Owned(move || encoded(&counters, load)),
            Slot::cloned,
        )
    }

    /// Removes `key`'s value and revokes any reader's lease on it, so a load
    /// that started before this call can no longer fill it. Call it after
    /// the write to the source has committed. One Redis command, accepted
    /// even by a Redis that is out of memory.
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
        self.engine.invalidate(key)
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
        check_ttl("ttl", ttl)?;
        self.engine
            .write_through(key, ttl, write, self.relay_running())
    }

    #[cfg(feature = "test-hooks")]
    pub(crate) fn hooks(&self) -> &crate::hooks::Hooks {
        &self.engine.hooks
    }

    /// Test hook: the `CLIENT ID` of the near cache's tracking connection,
    /// while it is connected.
    #[cfg(feature = "test-hooks")]
    pub fn local_cache_tracker_id(&self) -> Option<u64> {
        self.engine.near.as_ref().and_then(|near| near.tracker_id())
    }

    /// Test hook: `true` makes the near cache's tracker drop every
    /// invalidation message (heartbeats still flow), so only
    /// `max_staleness` bounds what L1 serves.
    #[cfg(feature = "test-hooks")]
    pub fn ignore_local_invalidations(&self, ignore: bool) {
        if let Some(near) = &self.engine.near {
            near.ignore_invalidations(ignore);
        }
    }

    /// Test hook: how many threads wait on the flight for `key` in progress.
    #[cfg(feature = "test-hooks")]
    pub fn flight_followers(&self, key: &str) -> usize {
        self.engine.flights.followers(key)
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
        self.engine.counters.stats()
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
        self.engine.near.as_ref().is_some_and(|near| near.live())
    }

    /// Entries the near cache holds now (0 when it is off).
    pub fn local_cache_entries(&self) -> u64 {
        self.engine.near.as_ref().map_or(0, |near| near.len())
    }

    /// Keys with a single-flight load in progress in this process; 0 when no
    /// call is running (per-key state is freed when its flight ends).
    pub fn in_flight(&self) -> usize {
        self.engine.flights.len()
    }

    /// Loads whose leases and locks are being renewed now; 0 when no load
    /// runs.
    pub fn holds(&self) -> usize {
        self.engine.keeper.live()
    }

    /// True while the circuit breaker keeps reads away from Redis.
    pub fn breaker_open(&self) -> bool {
        self.engine.breaker.is_open()
    }

    /// Starts the invalidation relay (if the config turns it on and it is
    /// not running yet): a thread that applies the outbox to the cache.
    /// [`Client::open`](crate::Client::open) and
    /// [`capture_changes`](Self::capture_changes) start it; call this when
    /// another process installed the capture.
    pub fn start_relay(&self) {
        if !self.config.invalidation_relay {
            return;
        }
        let mut relay = self.relay.lock();
        if relay.is_none() {
            *relay = Some(crate::relay::Relay::start(
                self.engine.clone(),
                &self.config,
            ));
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
        crate::relay::Outbox::new(&self.config.outbox_table)?.capture(
            &self.engine.db,
            table,
            key_prefix,
            key_column,
            version_column,
        )?;
        self.start_relay();
        Ok(())
    }

    /// Stops the invalidation relay, if it runs (and joins its thread).
    pub fn stop_relay(&self) {
        let relay = self.relay.lock().take();
        if let Some(relay) = relay {
            relay.stop();
        }
    }

    /// True when the invalidation relay runs for this engine.
    pub fn relay_running(&self) -> bool {
        self.relay.lock().is_some()
    }

    /// Outbox rows this engine's relay has read so far, and the most it
    /// held in memory at once; `(0, 0)` without a relay. For tests.
    #[cfg(feature = "test-hooks")]
    pub fn relay_rows_read(&self) -> (u64, u64) {
        let relay = self.relay.lock();
        relay.as_ref().map_or((0, 0), |r| r.handle().rows_read())
    }

    /// Makes the relay read the outbox now, and waits (up to `timeout`) until
    /// it has applied every change committed before this call. True if it
    /// did. Without a relay, false at once.
    pub fn sync_relay(&self, timeout: Duration) -> bool {
        let relay = self.relay.lock().as_ref().map(crate::relay::Relay::handle);
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
        self.write_behind.register(prefix, applier)
    }

    /// Write-behind: makes `value` the value of `key` at once (every reader,
    /// in every process, gets it from now on) and queues its write to the
    /// source, in one Redis script; returns the change's sequence number.
    /// Workers ([`start_write_behind`](Self::start_write_behind), here or
    /// in any process) write it later with the applier registered for the
    /// key's prefix.
    ///
    /// Until the source has it, the change wins over the source's older
    /// row: a reader whose load began earlier cannot cache that row, and if
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
    /// or a value that does not serialize; cache errors and timeouts (the
    /// change may or may not have been enqueued after a timeout).
    pub fn write_behind<T: Serialize + ?Sized>(
        &self,
        key: &str,
        ttl: Duration,
        value: &T,
    ) -> Result<u64> {
        check_key(key)?;
        check_ttl("ttl", ttl)?;
        let json = to_json(value)?;
        let _evict = self.engine.evict_on_return(key);
        self.write_behind
            .enqueue(&self.engine, key, ttl, Json::Whole(&json), 0)
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
        let _evict = self.engine.evict_on_return(key);
        self.write_behind.enqueue(
            &self.engine,
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
    /// Changes a dead worker left pending are claimed after
    /// [`Config::write_behind_claim_after`].
    ///
    /// # Errors
    /// [`ErrorKind::InvalidArgument`] for 0 or more than
    /// [`MAX_WRITE_BEHIND_WORKERS`](crate::MAX_WRITE_BEHIND_WORKERS) workers, or when
    /// workers already run (stop them first).
    pub fn start_write_behind(&self, workers: u32) -> Result<()> {
        self.write_behind.start(&self.engine, workers)
    }

    /// Stops this process's write-behind workers and waits for them: each
    /// finishes the batch in hand (bounded by the statement timeout) and
    /// notices within 100 ms when idle. What a worker holds for a retry
    /// stays pending, for another worker to claim. A no-op when none run;
    /// dropping the engine does the same.
    pub fn stop_write_behind(&self) {
        self.write_behind.stop();
    }

    /// Write-behind worker threads running in this process.
    pub fn write_behind_workers(&self) -> usize {
        self.write_behind.running()
    }

    /// Waits until every write-behind change enqueued (by any process)
    /// before this call has been committed to the source, or dead-lettered
    /// ([`Stats::write_behind_dead_lettered`] and
    /// [`write_behind_dead_letters`](Self::write_behind_dead_letters) tell),
    /// at most `timeout`. Workers may run in any process; without any, it
    /// times out unless nothing is pending.
    ///
    /// # Errors
    /// [`ErrorKind::Timeout`] when changes from before the call are still
    /// pending at the timeout; cache errors.
    pub fn drain_write_behind(&self, timeout: Duration) -> Result<()> {
        self.write_behind.drain(&self.engine.cache, timeout)
    }

    /// Write-behind changes enqueued (by any process) and not yet committed
    /// or dead-lettered: the backlog that
    /// [`Config::write_behind_max_backlog`] bounds.
    ///
    /// # Errors
    /// Cache errors and timeouts.
    pub fn write_behind_pending(&self) -> Result<u64> {
        self.write_behind.pending(&self.engine.cache)
    }

    /// The oldest `count` entries of the dead-letter stream: changes the
    /// workers gave up on, with the error that made them. They stay there
    /// until removed (with `XDEL` on the stream
    /// `{namespace}{write_behind}:dead`).
    ///
    /// # Errors
    /// Cache errors and timeouts.
    pub fn write_behind_dead_letters(&self, count: usize) -> Result<Vec<DeadLetter>> {
        self.write_behind.dead_letters(&self.engine.cache, count)
    }

    /// The read behind every `get_or_load*` method; `local` takes the value
    /// out of a near-cache entry (`None`: not a `T`).
    fn read<T: DeserializeOwned, L: Load>(
        &self,
        key: &str,
        ttl: Duration,
        mode: Mode,
        load: L,
        local: fn(&Slot) -> Option<Option<T>>,
    ) -> Result<Option<T>> {
        check_key(key)?;
        check_ttl("ttl", ttl)?;
        let e = &self.engine;
        let value_key = e.cache.redis_key(key);
        // L1 first, unless the breaker says this process must not trust
        // what Redis told it.
        let ticket = match &e.near {
            Some(near) if !e.breaker.is_open() => {
                if let Some(slot) = near.get(&value_key) {
                    match local(&slot) {
                        Some(value) => return Ok(value),
                        // Another type under this key: read it the long way.
                        None => near.evict(&value_key),
                    }
                }
                // Noted before the GET: an invalidation from now on wins
                // over the fill below.
                Some(near.ticket(&value_key))
            }
            _ => None,
        };
        let mut permit = e.breaker.permit();
        let mut stale = None;
        let mut use_redis = permit != Permit::Bypass;
        if use_redis {
            match e.cache.lookup(&value_key) {
                Ok(raw) => {
                    e.breaker.succeeded(permit);
                    if permit == Permit::Probe && e.breaker.is_open() {
                        // Redis answers, but writes of the outage may still
                        // be pending: nothing it holds is trusted until the
                        // relay has caught up.
                        use_redis = false;
                    } else if let Raw::Foreign = raw {
                        e.corrupt(&value_key, b"");
                    } else if let Raw::Bytes(raw) = raw
                        && let Some(found) = e.decode::<T>(&value_key, &raw)
                    {
                        if found.fresh {
                            e.counters.hits.bump();
                            if let (Some(near), Some(ticket)) = (&e.near, ticket) {
                                #[cfg(feature = "test-hooks")]
                                e.hooks.before_local_fill(key);
                                near.offer(&value_key, ticket, &raw);
                            }
                            if found.refresh_due {
                                self.refresh_early(key, value_key, ttl, load);
                            }
                            return Ok(found.value);
                        }
                        stale = Some((raw, found.value));
                    }
                }
                Err(err) => {
                    e.cache_failed(permit, &err);
                    use_redis = false;
                }
            }
        }
        if use_redis {
            e.counters.misses.bump();
        } else {
            e.counters.bypassed.bump();
            permit = Permit::Bypass;
        }
        let fits = |json: &[u8]| serde_json::from_slice::<T>(json).is_ok();
        let (stale_raw, stale_value) = match stale {
            Some((raw, value)) => (Some(raw), Some(value)),
            None => (None, None),
        };
        let miss = Miss {
            key,
            keys: Keys::for_value(value_key),
            ttl,
            stale: stale_raw,
            permit,
            use_redis,
            started: Instant::now(),
            deadline: Instant::now() + e.settings.call_deadline,
            fits: &fits,
            sent_back: std::cell::Cell::new(false),
        };
        let span = MissSpan::enter(key, mode.name(), !use_redis);
        let answer = match mode {
            Mode::Plain => e.miss_plain(&self.background, &miss, load),
            Mode::SingleFlight => e.miss_single_flight(&self.background, &miss, load),
        };
        span.close(match &answer {
            Ok(Answer::Value(_)) => "value",
            Ok(Answer::Absent) => "absent",
            Ok(Answer::Stale) => "stale",
            Err(_) => "error",
        });
        match answer? {
            Answer::Value(json) => decode_value(key, &json),
            Answer::Absent => Ok(None),
            Answer::Stale => Ok(stale_value.flatten()),
        }
    }

    /// A hit that XFetch picked: refresh it as a flight leader (in the
    /// background when the loader can move there), unless a load of the key
    /// already runs in this process; the caller keeps its cached value.
    fn refresh_early<L: Load>(&self, key: &str, value_key: String, ttl: Duration, load: L) {
        let e = &self.engine;
        let Role::Leader(leader) = e.flights.join(key) else {
            return;
        };
        let target = Target {
            key: key.to_owned(),
            keys: Keys::for_value(value_key),
            ttl,
            deadline: Instant::now() + e.settings.call_deadline,
        };
        match load.detach() {
            Ok(job) => {
                let engine = e.clone();
                let work = Box::new(move || {
                    leader.adopt();
                    engine.refresh(leader, &target, job);
                });
                if let Err(work) = self.background.spawn(work) {
                    work();
                }
            }
            Err(load) => e.refresh(leader, &target, move || load.run()),
        }
    }
}

impl Drop for CacheAside {
    fn drop(&mut self) {
        // Before the background pool and the keeper go: the workers and the
        // relay use the engine they serve.
        self.write_behind.stop();
        self.stop_relay();
    }
}

impl Engine {
    /// Decodes a cached entry: `Some` for a usable one (fresh or a fail-safe
    /// copy), `None` after deleting and counting a corrupt one.
    fn decode<T: DeserializeOwned>(&self, value_key: &str, raw: &[u8]) -> Option<Found<T>> {
        let decoded = Entry::decode(raw).and_then(|entry| {
            let value = match entry.payload {
                Payload::Absent => None,
                Payload::Value(json) => {
                    Some(serde_json::from_slice(json).map_err(|_| "value does not decode")?)
                }
            };
            let fresh = entry.is_fresh(now_ms());
            Ok(Found {
                value,
                fresh,
                refresh_due: fresh
                    && entry.should_refresh_early(self.settings.beta, fastrand::f64()),
            })
        });
        match decoded {
            Ok(found) => Some(found),
            Err(_) => {
                self.corrupt(value_key, raw);
                None
            }
        }
    }

    fn corrupt(&self, value_key: &str, raw: &[u8]) {
        self.counters.corrupt_entries.bump();
        // Best effort: if the delete fails, the fill that follows this miss
        // overwrites the entry anyway.
        let _ = lease::discard(&self.cache, value_key, raw);
    }

    /// Records a failed Redis call: counted, and told to the breaker when it
    /// says Redis is unavailable.
    pub(crate) fn cache_failed(&self, permit: Permit, err: &Error) {
        if err.is_outage() {
            self.counters.cache_errors.bump();
            self.breaker.failed(permit, err);
        }
    }

    /// Records a Redis call's outcome with the breaker.
    fn cache_call<T>(&self, permit: Permit, outcome: Result<T>) -> Result<T> {
        match &outcome {
            Ok(_) => self.breaker.succeeded(permit),
            Err(err) => self.cache_failed(permit, err),
        }
        outcome
    }

    /// Evicts `key` from L1 when the guard drops: after a write's Redis
    /// command, on every path (errors and panics too), before the write
    /// returns. Evicting before the Redis command would not do: a reader of
    /// this process could put the old value back from Redis in between.
    fn evict_on_return(&self, key: &str) -> Option<EvictOnReturn<'_>> {
        let near = self.near.as_deref()?;
        Some(EvictOnReturn {
            near,
            redis_key: self.cache.redis_key(key),
        })
    }

    /// Tells an open flight of `key` that its row changed (a write of this
    /// process, or one the relay read from the outbox).
    pub(crate) fn note_write(&self, key: &str) {
        self.flights.note_write(key);
    }

    /// As [`note_write`](Self::note_write), for every key under `prefix`.
    pub(crate) fn note_prefix_write(&self, prefix: &str) {
        self.flights.note_write_prefix(prefix);
    }

    fn invalidate(&self, key: &str) -> Result<()> {
        self.flights.note_write(key);
        let _evict = self.evict_on_return(key);
        let keys = Keys::for_value(self.cache.redis_key(key));
        match lease::invalidate(&self.cache, &keys) {
            Ok(()) => Ok(()),
            Err(err) => {
                self.counters.invalidations_failed.bump();
                self.cache_failed(Permit::Use, &err);
                // This process must not read what may now be stale.
                self.breaker.trip(&err);
                Err(err)
            }
        }
    }

    fn write_through<T, F>(
        &self,
        key: &str,
        ttl: Duration,
        write: F,
        relay: bool,
    ) -> Result<Option<T>>
    where
        T: Serialize,
        F: FnOnce() -> Result<Option<(T, u64)>>,
    {
        let _evict = self.evict_on_return(key);
        let keys = Keys::for_value(self.cache.redis_key(key));
        let token = new_token();
        let writer =
            match lease::register_writer(&self.cache, &keys, &token, self.settings.call_deadline) {
                Ok(()) => Some(Writer {
                    cache: &self.cache,
                    keys: &keys,
                    token: &token,
                }),
                Err(err) if relay => {
                    // Redis is out; the write itself can go ahead: the outbox
                    // row it commits will invalidate the key once Redis is back.
                    self.cache_failed(Permit::Use, &err);
                    self.breaker.trip(&err);
                    None
                }
                Err(err) => {
                    self.cache_failed(Permit::Use, &err);
                    return Err(err);
                }
            };
        let started = Instant::now();
        let Some((value, version)) = write()? else {
            return Ok(None);
        };
        // The row changed: a flight of this key that loaded before the
        // commit must not hand its older row to followers that join from
        // now on. (With the cache in use they would find this write's value
        // cached first; with the breaker open they go straight to a flight.)
        self.flights.note_write(key);
        #[cfg(feature = "test-hooks")]
        self.hooks.after_write(key);
        let Some(writer) = writer else {
            return Ok(Some(value));
        };
        let json = to_json(&value)?;
        // XFetch needs a load time: the write's, with a floor, so an entry
        // written through is refreshed early like one that was loaded.
        let took = started.elapsed().max(Duration::from_millis(1));
        let raw = Entry::new(Payload::Value(&json), version, took, ttl).encode();
        let physical = ttl.saturating_add(self.settings.fail_safe_max);
        match lease::write_through(&self.cache, &keys, &token, &raw, version, physical) {
            Ok(_) => {
                writer.consumed();
                Ok(Some(value))
            }
            Err(err) => {
                // The write committed, and the cache may hold the row before
                // it: remove that.
                self.cache_failed(Permit::Use, &err);
                drop(writer);
                match self.invalidate(key) {
                    Ok(()) => Ok(Some(value)),
                    Err(_) if relay => Ok(Some(value)),
                    Err(err) => Err(err),
                }
            }
        }
    }

    fn miss_plain<L: Load>(&self, bg: &Background, m: &Miss<'_>, load: L) -> Result<Answer> {
        if !m.use_redis {
            return self.load_uncached(m, load);
        }
        let token = new_token();
        match self.acquire(m, Claim::Lease, &token) {
            Err(_) | Ok(Claimed::Busy) => self.load_uncached(m, load),
            Ok(Claimed::Cached(answer)) => Ok(answer),
            Ok(Claimed::Granted) => {
                let hold = self.keeper.hold(&m.keys, token, m.deadline);
                // No flight: the marks only number this call's own reads.
                match self.load_held(bg, m, load, hold, Marks::default()) {
                    Held::Done(filled) => filled.outcome.or_else(|err| self.load_failed(m, err)),
                    Held::GaveUp => self.serve_stale(m),
                }
            }
        }
    }

    fn miss_single_flight<L: Load>(
        &self,
        bg: &Background,
        m: &Miss<'_>,
        load: L,
    ) -> Result<Answer> {
        loop {
            let follower = match self.flights.join(m.key) {
                Role::Leader(leader) => return self.lead(bg, m, load, leader),
                Role::Reentrant => {
                    return Err(Error::invalid_argument(format!(
                        "the loader of key {:?} read that same key: it would wait for itself",
                        m.key
                    )));
                }
                Role::Follower(follower) => follower,
            };
            let wait_until = m.soft_deadline(&self.settings).unwrap_or(m.deadline);
            match follower.wait(wait_until) {
                Ok(Waited::Outcome(Ok(Answer::Stale))) if m.stale.is_none() => {}
                Ok(Waited::Outcome(Ok(Answer::Stale))) => return self.serve_stale(m),
                Ok(Waited::Outcome(Ok(answer))) => return Ok(answer),
                Ok(Waited::Outcome(Err(err))) => return self.load_failed(m, err),
                Ok(Waited::TooOld(_)) => m.sent_back.set(true),
                Err(WaitError::Abandoned) => {
                    return Err(Error::new(
                        ErrorKind::Panicked,
                        "the thread loading this key panicked",
                    ));
                }
                Err(WaitError::TimedOut) if m.stale.is_some() && Instant::now() < m.deadline => {
                    return self.serve_stale(m);
                }
                Err(WaitError::TimedOut) => {
                    return Err(Error::timeout("waiting for another thread's load"));
                }
            }
            // The outcome may predate a write that returned before this call:
            // read for ourselves.
            if Instant::now() >= m.deadline {
                return Err(Error::timeout("reading a key that keeps being written"));
            }
            if m.use_redis {
                match self.cache.lookup(&m.keys.value) {
                    Ok(Raw::Bytes(raw)) => {
                        if let Some(answer) = self.fresh_answer(m, &raw) {
                            return Ok(answer);
                        }
                    }
                    Ok(Raw::Foreign) => self.corrupt(&m.keys.value, b""),
                    Ok(Raw::Missing) => {}
                    Err(err) => self.cache_failed(m.permit, &err),
                }
            }
        }
    }

    /// The single-flight leader's work: take the cross-process rebuild lock
    /// (or wait for whoever has it), load, fill; publish to the followers on
    /// every path.
    fn lead<L: Load>(
        &self,
        bg: &Background,
        m: &Miss<'_>,
        load: L,
        leader: Leader<Shared>,
    ) -> Result<Answer> {
        if !m.use_redis {
            return self.lead_uncached(m, load, leader);
        }
        let token = new_token();
        let s = &self.settings;
        // Wait for another process at most `lock_wait`, and never so long
        // that the load cannot finish within this call's deadline.
        let lock_deadline = (m.started + s.lock_wait)
            .min(m.deadline.checked_sub(s.load_budget).unwrap_or(m.started));
        let soft = m.soft_deadline(s);
        let mut claim = Claim::Lock;
        // When this leader first found another process's lock, for the
        // lock-wait report.
        let mut busy_since = None;
        loop {
            let read = leader.begin_read();
            match self.acquire(m, claim, &token) {
                // Redis failed mid-call: load without it (still one load in
                // this process), and do not fill.
                Err(_) => {
                    self.lock_wait_over(m, busy_since, "Redis failed: loading uncached");
                    return self.lead_uncached(m, load, leader);
                }
                Ok(Claimed::Cached(answer)) => {
                    self.lock_wait_over(m, busy_since, "read what the holder cached");
                    #[cfg(feature = "test-hooks")]
                    self.hooks.after_load(&m.keys.value);
                    leader.publish(Ok(answer.clone()), read);
                    return Ok(answer);
                }
                Ok(Claimed::Granted) => {
                    let then = match claim {
                        Claim::Takeover => "took the lock over",
                        _ => "took the lock",
                    };
                    self.lock_wait_over(m, busy_since, then);
                    break;
                }
                Ok(Claimed::Busy) => {
                    let now = Instant::now();
                    busy_since.get_or_insert(now);
                    if soft.is_some_and(|soft| now >= soft) {
                        // Another process is reloading, slowly: take the copy.
                        self.lock_wait_over(m, busy_since, "served the fail-safe copy");
                        leader.publish(Ok(Answer::Stale), u64::MAX);
                        return self.serve_stale(m);
                    }
                    if now >= lock_deadline {
                        // Waited long enough: load ourselves, still through a
                        // lease (taken over), so this cannot cache a stale row.
                        claim = Claim::Takeover;
                        continue;
                    }
                    // Another process is rebuilding: its value lands in the
                    // cache, which the next attempt reads. If it dies, its
                    // lock expires and an attempt takes it.
                    let mut until = lock_deadline;
                    if let Some(soft) = soft {
                        until = until.min(soft);
                    }
                    std::thread::sleep(s.lock_poll.min(until.saturating_duration_since(now)));
                }
            }
        }
        if m.sent_back.get() {
            // The last load of this key could not serve the readers that
            // came while it ran (a write dropped its fill): they are
            // re-reading now, with this one. Give them a moment to join,
            // so this load serves them all instead of one by one.
            std::thread::sleep(s.lock_poll);
        }
        let hold = self.keeper.hold(&m.keys, token, m.deadline);
        match self.load_held(bg, m, load, hold, leader.marks()) {
            Held::Done(filled) => {
                leader.publish(filled.outcome.clone(), filled.valid_before);
                filled.outcome.or_else(|err| self.load_failed(m, err))
            }
            Held::GaveUp => {
                leader.publish(Ok(Answer::Stale), u64::MAX);
                self.serve_stale(m)
            }
        }
    }

    /// Reports a leader's wait for another process's rebuild lock, if it
    /// waited (`since` is when it first found the lock held).
    fn lock_wait_over(&self, m: &Miss<'_>, since: Option<Instant>, then: &'static str) {
        if let Some(since) = since {
            self.counters
                .lock_waited(&m.keys.value, since.elapsed(), then);
        }
    }

    /// A leader's load without Redis (it is down, or failed mid-call).
    fn lead_uncached<L: Load>(
        &self,
        m: &Miss<'_>,
        load: L,
        leader: Leader<Shared>,
    ) -> Result<Answer> {
        let marks = leader.marks();
        let load_read = marks.begin_read();
        let outcome = self.load_uncached_shared(m, load);
        let now = marks.begin_read();
        let valid = match &outcome {
            Err(_) => u64::MAX,
            Ok(_) => valid_before(Verdict::Failed, load_read, now, &marks),
        };
        leader.publish(outcome.clone(), valid);
        outcome.or_else(|err| self.load_failed(m, err))
    }

    /// A refresh run by a flight's leader: take the rebuild lock if nobody
    /// holds it, load, fill, publish. Failures are silent: the cached value
    /// is still valid.
    fn refresh(&self, leader: Leader<Shared>, t: &Target, load: impl FnOnce() -> LoadResult) {
        let token = new_token();
        let acquired = lease::acquire(
            &self.cache,
            &t.keys,
            Claim::Refresh,
            &token,
            self.settings.ttls,
            now_ms(),
        );
        match acquired {
            Ok(Acquired::Granted) => {}
            Ok(_) => {
                // Another process is loading the key. Anyone who joined this
                // flight reads again (valid for none).
                leader.publish(Err(Error::timeout("refresh skipped")), 0);
                return;
            }
            Err(err) => {
                self.cache_failed(Permit::Use, &err);
                if err.is_outage() {
                    self.keeper.orphan(&t.keys, token);
                }
                leader.publish(Err(err), 0);
                return;
            }
        }
        let hold = self.keeper.hold(&t.keys, token, t.deadline);
        let load_read = leader.begin_read();
        let loaded = load();
        #[cfg(feature = "test-hooks")]
        self.hooks.after_load(&t.key);
        if loaded.is_ok() {
            self.counters.refreshed_early(&t.key);
        }
        let filled = self.fill_loaded(&t.keys, t.ttl, hold, loaded, load_read, &leader.marks());
        leader.publish(filled.outcome, filled.valid_before);
    }

    /// Loads under a hold (lease, maybe lock) and fills. With a fail-safe
    /// copy, a soft timeout and a loader that can move, the load runs in the
    /// background and this waits only until the soft timeout
    /// ([`Held::GaveUp`]: the load goes on and fills when it ends).
    fn load_held<L: Load>(
        &self,
        bg: &Background,
        m: &Miss<'_>,
        load: L,
        hold: Hold,
        marks: Marks,
    ) -> Held {
        let load = match m.soft_deadline(&self.settings) {
            None => load,
            Some(soft) => match load.detach() {
                Err(load) => load,
                Ok(job) => {
                    let (tx, rx) = std::sync::mpsc::sync_channel(1);
                    let engine = self.clone();
                    let (keys, ttl) = (m.keys.clone(), m.ttl);
                    #[cfg(feature = "test-hooks")]
                    let key = m.key.to_owned();
                    let work = Box::new(move || {
                        let load_read = marks.begin_read();
                        let loaded = job();
                        #[cfg(feature = "test-hooks")]
                        engine.hooks.after_load(&key);
                        let done = Held::Done(
                            engine.fill_loaded(&keys, ttl, hold, loaded, load_read, &marks),
                        );
                        // The caller may have stopped waiting: the fill is
                        // what mattered then.
                        let _ = tx.send(done);
                    });
                    if let Err(work) = bg.spawn(work) {
                        work();
                    }
                    return match rx.recv_timeout(soft.saturating_duration_since(Instant::now())) {
                        Ok(done) => done,
                        Err(_) => Held::GaveUp,
                    };
                }
            },
        };
        let load_read = marks.begin_read();
        let loaded = load.run();
        #[cfg(feature = "test-hooks")]
        self.hooks.after_load(m.key);
        Held::Done(self.fill_loaded(&m.keys, m.ttl, hold, loaded, load_read, &marks))
    }

    /// Fills what a load returned and says for which followers its answer
    /// is valid.
    fn fill_loaded(
        &self,
        keys: &Keys,
        ttl: Duration,
        hold: Hold,
        loaded: LoadResult,
        load_read: u64,
        marks: &Marks,
    ) -> Filled {
        let loaded = match loaded {
            Ok(loaded) => loaded,
            // Every follower hears of a failed load (errors are not stale
            // data); the hold drops and releases.
            Err(err) => {
                return Filled {
                    outcome: Err(err),
                    valid_before: u64::MAX,
                };
            }
        };
        let fill_read = marks.begin_read();
        let verdict = self.fill(keys, ttl, hold, &loaded);
        Filled {
            outcome: Ok(answer_of(&loaded)),
            valid_before: valid_before(verdict, load_read, fill_read, marks),
        }
    }

    /// Stores a load's result if `hold` still has the lease; the lease check
    /// and the write are one Lua script, with no window between them.
    fn fill(&self, keys: &Keys, ttl: Duration, hold: Hold, loaded: &Loaded) -> Verdict {
        let (payload, ttl) = match &loaded.json {
            Some(json) => (Payload::Value(json), ttl),
            None => (Payload::Absent, self.settings.negative_ttl),
        };
        let raw = Entry::new(payload, loaded.version, loaded.took, ttl).encode();
        let physical = ttl.saturating_add(self.settings.fail_safe_max);
        #[cfg(feature = "test-hooks")]
        if self.hooks.leases_disabled() {
            return match self.cache.set_raw(&keys.value, &raw, physical) {
                Ok(()) => Verdict::Stored,
                Err(_) => Verdict::Failed,
            };
        }
        match lease::fill(&self.cache, keys, hold.token(), &raw, physical) {
            Ok(stored) => {
                // The script released the lease and lock.
                hold.filled();
                if stored {
                    Verdict::Stored
                } else {
                    self.counters.fill_dropped(&keys.value);
                    Verdict::Dropped
                }
            }
            Err(err) => {
                self.counters.fills_failed.bump();
                self.cache_failed(Permit::Use, &err);
                report!(debug, "fill of {:?} failed: {}", keys.value, err.chain());
                // Not stored (a full Redis refuses the write). If the lease is
                // still ours, no write invalidated the key since we took it:
                // the row is as good as a stored one (a GET is not refused).
                match lease::holds(&self.cache, keys, hold.token()) {
                    Ok(true) => Verdict::Held,
                    _ => Verdict::Failed,
                }
            }
        }
    }

    /// A load that will not be cached (no lease, or no Redis).
    fn load_uncached<L: Load>(&self, m: &Miss<'_>, load: L) -> Result<Answer> {
        self.load_uncached_shared(m, load)
            .or_else(|err| self.load_failed(m, err))
    }

    fn load_uncached_shared<L: Load>(&self, m: &Miss<'_>, load: L) -> Shared {
        let loaded = load.run();
        #[cfg(feature = "test-hooks")]
        self.hooks.after_load(m.key);
        #[cfg(not(feature = "test-hooks"))]
        let _ = m;
        loaded.map(|loaded| answer_of(&loaded))
    }

    /// A load failed: with a fail-safe copy at hand, serve it; else the error.
    fn load_failed(&self, m: &Miss<'_>, err: Error) -> Result<Answer> {
        if m.stale.is_some() && err.kind() != ErrorKind::InvalidArgument {
            return self.serve_stale(m);
        }
        Err(err)
    }

    /// Serves the fail-safe copy and re-arms it for the throttle period
    /// (only if it is still the same bytes: nothing newer is overwritten).
    fn serve_stale(&self, m: &Miss<'_>) -> Result<Answer> {
        let Some(raw) = &m.stale else {
            return Err(Error::new(
                ErrorKind::Database,
                "no fail-safe copy to serve",
            ));
        };
        self.counters.stale_served.bump();
        if m.use_redis
            && let Ok(entry) = Entry::decode(raw)
        {
            let again = entry.rearmed(self.settings.fail_safe_throttle);
            let rearmed = lease::rearm(&self.cache, &m.keys.value, raw, &again);
            let _ = self.cache_call(m.permit, rearmed);
        }
        Ok(Answer::Stale)
    }

    /// A fresh entry read again by a follower, as an answer.
    fn fresh_answer(&self, m: &Miss<'_>, raw: &[u8]) -> Option<Answer> {
        match Entry::decode(raw) {
            Ok(entry) if entry.is_fresh(now_ms()) => match entry.payload {
                Payload::Absent => Some(Answer::Absent),
                Payload::Value(json) if (m.fits)(json) => Some(Answer::Value(json.into())),
                Payload::Value(_) => {
                    self.corrupt(&m.keys.value, raw);
                    None
                }
            },
            Ok(_) => None,
            Err(_) => {
                self.corrupt(&m.keys.value, raw);
                None
            }
        }
    }

    fn acquire(&self, m: &Miss<'_>, claim: Claim, token: &lease::Token) -> Result<Claimed> {
        // A corrupt value is deleted and the claim retried on a clean slate;
        // bounded, in case something keeps writing garbage under our key.
        for _ in 0..3 {
            let acquired = lease::acquire(
                &self.cache,
                &m.keys,
                claim,
                token,
                self.settings.ttls,
                now_ms(),
            );
            #[cfg(feature = "test-hooks")]
            let acquired = acquired.and_then(|a| self.hooks.lose_reply().map_or(Ok(a), Err));
            match self.cache_call(m.permit, acquired) {
                Ok(Acquired::Granted) => return Ok(Claimed::Granted),
                Ok(Acquired::Busy) => return Ok(Claimed::Busy),
                Ok(Acquired::Cached(raw)) => {
                    if let Some(answer) = self.fresh_answer(m, &raw) {
                        return Ok(Claimed::Cached(answer));
                    }
                }
                Err(err) => {
                    // The script may have run on the server after the client
                    // gave up: what it took is an orphan until released.
                    if err.is_outage() {
                        self.keeper.orphan(&m.keys, token.clone());
                    }
                    // The load that follows cannot be cached.
                    self.counters.fills_failed.bump();
                    return Err(err);
                }
            }
        }
        Err(Error::corrupt(
            &m.keys.value,
            "rewritten with garbage as fast as it is deleted",
        ))
    }
}

/// See [`Engine::evict_on_return`].
struct EvictOnReturn<'a> {
    near: &'a Near,
    redis_key: String,
}

impl Drop for EvictOnReturn<'_> {
    fn drop(&mut self) {
        self.near.evict(&self.redis_key);
    }
}

/// What an early refresh reloads.
struct Target {
    key: String,
    keys: Keys,
    ttl: Duration,
    deadline: Instant,
}

/// A fill's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Stored,
    /// Not stored, but the lease was still ours after the load: no write
    /// came in between.
    Held,
    /// Refused: a write revoked the lease.
    Dropped,
    /// Redis did not answer.
    Failed,
}

/// For which followers a loaded row is valid (those that joined before the
/// returned read number began). A row that was stored (or whose lease was
/// still held) after the load is proven fresh up to that point; with no
/// word from Redis, it is valid past the load's start only if this process
/// did not write the key meanwhile (writes of other processes cannot be
/// seen then: the outage-mode limit the README states).
fn valid_before(verdict: Verdict, load_read: u64, fill_read: u64, marks: &Marks) -> u64 {
    match verdict {
        Verdict::Stored | Verdict::Held => fill_read,
        Verdict::Failed if !marks.written() => fill_read,
        Verdict::Failed | Verdict::Dropped => load_read,
    }
}

/// A finished load: its answer (or error), and the read number before which
/// a follower must have joined to take it.
struct Filled {
    outcome: Shared,
    valid_before: u64,
}

/// What a load under a hold came to.
enum Held {
    Done(Filled),
    /// The soft timeout passed first; the load goes on in the background.
    GaveUp,
}

/// What the engine made of an acquire attempt.
enum Claimed {
    Cached(Answer),
    Granted,
    Busy,
}

/// Removes a write-through writer's token on every path but success
/// (errors, panics), so tokens never pile up in the writers set.
struct Writer<'a> {
    cache: &'a Cache,
    keys: &'a Keys,
    token: &'a str,
}

impl Writer<'_> {
    /// The write-through script removed the token.
    fn consumed(self) {
        std::mem::forget(self);
    }
}

impl Drop for Writer<'_> {
    fn drop(&mut self) {
        // Best effort: a token left behind expires with its set.
        let _ = lease::unregister_writer(self.cache, self.keys, self.token);
    }
}

fn answer_of(loaded: &Loaded) -> Answer {
    match &loaded.json {
        Some(json) => Answer::Value(json.as_slice().into()),
        None => Answer::Absent,
    }
}

fn to_json<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(value)
        .map_err(|e| Error::invalid_argument("value does not serialize to JSON").with_source(e))
}

fn decode_value<T: DeserializeOwned>(key: &str, json: &[u8]) -> Result<Option<T>> {
    serde_json::from_slice(json)
        .map(Some)
        .map_err(|e| Error::corrupt(key, format!("another caller loaded a different type: {e}")))
}
