//! The read/write algorithm behind [`CacheAside`](crate::CacheAside): the
//! lookup, the miss in either mode (plain, single-flight), the lease-guarded
//! fill, fail-safe and early refresh, invalidation and write-through. The
//! relay and the write-behind workers run on the same [`Engine`].
//!
//! Guarantees (each with a test named in the README):
//! - A hit is one Redis round trip and no Postgres statement.
//! - No read returns, and no fill caches, a row older than a write that
//!   returned before the read began: fills go through leases
//!   ([`crate::lease`]), and a single-flight follower takes its leader's
//!   row only if the read that produced it began after the follower joined
//!   ([`crate::singleflight`]).
//! - However many threads and processes miss one key together, one load
//!   runs, also when it outlasts the lease and lock TTLs (they are renewed
//!   by [`crate::keeper`]).
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

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::background::Background;
use crate::breaker::{Breaker, Permit};
use crate::cache::{Cache, Raw, check_key};
use crate::config::{Config, EntryOptions};
use crate::db::Db;
use crate::entry::{Entry, Payload, now_ms};
use crate::error::{Error, ErrorKind, Result};
use crate::fence::LagWatch;
use crate::keeper::{Hold, Keeper};
use crate::lease::{self, Acquired, Claim, Keys, Ttls, new_token};
use crate::miss_ahead::{Ahead, AheadClaim, Behind, Streak};
use crate::near::{Near, Slot};
use crate::observe::{Counters, MissSpan, report};
use crate::singleflight::{Leader, Marks, Role, SingleFlight, WaitError, Waited};

// A loader built only on a miss, and the fill handed off behind the caller.
mod behind;
pub(crate) use behind::Deferred;
// Fences of the keys a write changes, for loads from a read replica.
mod fences;
// Invalidation and write-through.
mod write;

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

/// Everything a read needs, cheap to clone into a background job (which
/// must not own the [`Background`] pool it runs on).
#[derive(Clone)]
pub(crate) struct Engine {
    pub(crate) db: Db,
    pub(crate) cache: Cache,
    pub(crate) flights: SingleFlight<Shared>,
    pub(crate) keeper: Arc<Keeper>,
    pub(crate) breaker: Arc<Breaker>,
    pub(crate) settings: Arc<Settings>,
    pub(crate) counters: Arc<Counters>,
    /// The near cache, when [`Config::local_cache`] turns it on.
    pub(crate) near: Option<Arc<Near>>,
    /// Whether this engine's reads mostly miss Redis lately.
    streak: Arc<Streak>,
    /// Its fills handed to the background pool, not landed yet.
    behind: Arc<Behind>,
    /// How far behind the read replica is ([`crate::fence`]).
    replica_lag: Arc<LagWatch>,
    #[cfg(feature = "test-hooks")]
    pub(crate) hooks: Arc<crate::hooks::Hooks>,
}

/// What a single-flight leader hands its followers.
pub(crate) type Shared = Result<Answer, Error>;

/// A read's answer, before the caller decodes it as its type.
#[derive(Clone, Debug)]
pub(crate) enum Answer {
    /// The JSON of the value.
    Value(Arc<[u8]>),
    /// The source has no such row.
    Absent,
    /// Serve the fail-safe copy (each caller its own: the one its lookup
    /// found).
    Stale,
}

pub(crate) struct Settings {
    /// The entry options of a read that names only its TTL.
    pub(crate) defaults: EntryOptions,
    pub(crate) ttls: Ttls,
    pub(crate) lock_wait: Duration,
    pub(crate) lock_poll: Duration,
    /// The longest one call may take.
    pub(crate) call_deadline: Duration,
    /// What a load may take: kept free at the end of a call's deadline.
    pub(crate) load_budget: Duration,
    fail_safe_throttle: Duration,
    /// How long a write fences replica loads of its key
    /// ([`Config::replica_max_lag`]); `None` without a replica: no fences.
    fence: Option<Duration>,
}

/// A load's result in the form the cache stores: JSON, with the version
/// that orders it against write-through and how long it took.
pub(crate) struct Loaded {
    pub(crate) json: Option<Vec<u8>>,
    pub(crate) version: u64,
    pub(crate) took: Duration,
    /// A conditional loader found the cached row (`json`, `version`)
    /// unchanged: the fill only extends the cached entry
    /// ([`crate::refresh`]).
    pub(crate) unchanged: bool,
}

pub(crate) type LoadResult = Result<Loaded>;

/// A loader as the engine runs it: on the calling thread, or, when it owns
/// what it needs, on a background thread.
pub(crate) trait Load: Sized {
    fn run(self) -> LoadResult;
    /// The loader as a job for another thread, if it can move there.
    fn detach(self) -> Result<Box<dyn FnOnce() -> LoadResult + Send>, Self>;
    /// The loader, told the cached entry (raw) it may refresh: a
    /// conditional loader may then answer that the row is unchanged.
    fn with_cached(self, _raw: &[u8]) -> Self {
        self
    }
}

/// A loader that borrows from its caller's stack.
pub(crate) struct Inline<F>(pub(crate) F);

impl<F: FnOnce() -> LoadResult> Load for Inline<F> {
    fn run(self) -> LoadResult {
        (self.0)()
    }

    fn detach(self) -> Result<Box<dyn FnOnce() -> LoadResult + Send>, Self> {
        Err(self)
    }
}

/// A loader that owns what it needs.
pub(crate) struct Owned<F>(pub(crate) F);

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
pub(crate) fn encoded<T: Serialize>(
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
            unchanged: false,
        },
        None => Loaded {
            json: None,
            version: 0,
            took,
            unchanged: false,
        },
    })
}

/// One read's miss: what it knows and may still do.
struct Miss<'a> {
    key: &'a str,
    keys: Keys,
    /// This read's TTLs, fail-safe, soft timeout and β.
    opts: EntryOptions,
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
    /// The Redis server generation before this call's first command.
    generation: u64,
    /// The lease claimed with the lookup ([`Ahead`]), for the miss path to
    /// take (once).
    ahead: std::cell::Cell<Option<AheadClaim>>,
}

impl Miss<'_> {
    /// When a caller holding a fail-safe copy stops waiting for a reload.
    fn soft_deadline(&self) -> Option<Instant> {
        let soft = self.opts.soft_timeout;
        (self.stale.is_some() && !soft.is_zero()).then(|| (self.started + soft).min(self.deadline))
    }
}

/// A usable entry a lookup found.
pub(crate) struct Found<T> {
    pub(crate) value: Option<T>,
    pub(crate) fresh: bool,
    refresh_due: bool,
}

impl Engine {
    /// The engine `config` describes over these pools (validated by the
    /// caller).
    pub(crate) fn new(db: Db, cache: Cache, config: &Config) -> Engine {
        let ttls = Ttls {
            lease: config.lease_ttl,
            lock: config.lock_ttl,
        };
        let settings = Settings {
            defaults: EntryOptions::from_config(config),
            ttls,
            lock_wait: config.lock_wait,
            lock_poll: config.lock_poll,
            call_deadline: config.call_deadline(),
            load_budget: config.pool_timeout
                + config.statement_timeout
                + crate::config::CLIENT_MARGIN
                + config.cache_timeout * 2,
            fail_safe_throttle: config.fail_safe_throttle,
            fence: config
                .replica_url
                .is_some()
                .then_some(config.replica_max_lag),
        };
        let counters = Arc::new(Counters::new(&config.namespace));
        let breaker = Arc::new(Breaker::new(
            config.breaker_failures,
            config.breaker_cool_off,
            counters.clone(),
        ));
        // A restarted or failed-over Redis may have lost acknowledged
        // writes (invalidations among them): trust nothing it holds until
        // the breaker has recovered (with a relay, after the relay has
        // re-applied the outbox).
        let watched = Arc::downgrade(&breaker);
        cache.on_server_change(Box::new(move || {
            if let Some(breaker) = watched.upgrade() {
                breaker.trip_because(
                    "the Redis server changed (a restart or a failover): it may have lost \
                     acknowledged invalidations",
                );
            }
        }));
        #[cfg(feature = "test-hooks")]
        let hooks = Arc::new(crate::hooks::Hooks::default());
        let near = config.local_cache.is_on().then(|| {
            #[allow(unused_mut)]
            let mut near = Near::new(config.local_cache, cache.namespace(), counters.clone());
            #[cfg(feature = "test-hooks")]
            {
                near.hooks = Arc::clone(&hooks);
            }
            Arc::new(near)
        });
        Engine {
            keeper: Arc::new(Keeper::new(cache.clone(), ttls)),
            breaker,
            db,
            cache,
            flights: SingleFlight::new(),
            settings: Arc::new(settings),
            counters,
            near,
            streak: Arc::default(),
            behind: Arc::default(),
            replica_lag: Arc::new(LagWatch::new(config.replica_max_lag)),
            #[cfg(feature = "test-hooks")]
            hooks,
        }
    }

    /// The read behind every `get_or_load*` method; `local` takes the value
    /// out of a near-cache entry (`None`: not a `T`).
    pub(crate) fn read<T: DeserializeOwned, L: Load>(
        &self,
        background: &Background,
        key: &str,
        opts: EntryOptions,
        mode: Mode,
        load: L,
        local: fn(&Slot) -> Option<Option<T>>,
    ) -> Result<Option<T>> {
        self.read_tagged(background, key, opts, mode, load, local, None)
    }

    /// [`read`](Self::read) of an entry filled with `tags`
    /// ([`crate::tags`]; `None`: untagged). A tagged read bypasses the near
    /// cache: a tag's invalidation evicts nothing there.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn read_tagged<T: DeserializeOwned, L: Load>(
        &self,
        background: &Background,
        key: &str,
        opts: EntryOptions,
        mode: Mode,
        load: L,
        local: fn(&Slot) -> Option<Option<T>>,
        tags: Option<Arc<crate::keys::Tags>>,
    ) -> Result<Option<T>> {
        check_key(key)?;
        opts.check()?;
        let e = self;
        // L1 first, unless the breaker says this process must not trust
        // what Redis told it. Looked up by the caller's key: a hit builds
        // no Redis key.
        let ticket = match &e.near {
            Some(near) if tags.is_none() && !e.breaker.is_open() => {
                if let Some(slot) = near.get(key) {
                    match local(&slot) {
                        Some(value) => return Ok(value),
                        // Another type under this key: read it the long way.
                        None => near.evict(key),
                    }
                }
                // Noted before the GET: an invalidation from now on wins
                // over the fill below.
                Some(near.ticket(key))
            }
            _ => None,
        };
        let value_key = e.cache.redis_key(key);
        // Noted before the permit: a Redis server change (restart, failover)
        // trips the breaker before the generation moves, so if this read's
        // GET reached the new server either the permit saw the breaker
        // tripped or the generation moved under the GET (see
        // crate::server_watch). Either way the answer is not trusted.
        let generation = e.cache.server_generation();
        let mut permit = e.breaker.permit();
        let mut stale = None;
        let mut use_redis = permit != Permit::Bypass;
        // A plain read while this engine's reads mostly miss: the lease is
        // claimed in the GET's round trip (see `Ahead`). (A tagged read
        // fetches its tags' stamps in that round trip instead.)
        let mut ahead =
            (use_redis && mode == Mode::Plain && permit == Permit::Use && tags.is_none())
                .then(|| e.streak.expects_miss())
                .filter(|&expects| expects)
                .map(|_| Ahead::new(&value_key, e.behind.landings()));
        if use_redis {
            let looked = match &mut ahead {
                Some(ahead) => ahead
                    .lookup(&e.cache, e.settings.ttls)
                    .and_then(|raw| crate::tags::checked(&e.cache, &value_key, raw))
                    .inspect(|raw| {
                        if matches!(raw, Raw::Missing) {
                            // A tagged entry found invalid, and deleted:
                            // claim again on a clean slate.
                            ahead.claimed = None;
                        }
                    }),
                None => crate::tags::lookup(&e.cache, &value_key, tags.as_deref()),
            };
            match looked {
                Ok(_) if e.cache.server_generation() != generation => {
                    use_redis = false;
                }
                Ok(raw) => {
                    e.breaker.succeeded(permit);
                    let missing = matches!(raw, Raw::Missing);
                    if permit == Permit::Probe && e.breaker.is_open() {
                        // Redis answers, but writes of the outage may still
                        // be pending: nothing it holds is trusted until the
                        // relay has caught up.
                        use_redis = false;
                    } else if let Raw::Foreign = raw {
                        e.corrupt(&value_key, b"");
                        if let Some(ahead) = &mut ahead {
                            ahead.claimed = None;
                        }
                    } else if let Raw::Bytes(raw) = raw
                        && let Some(found) = e.decode::<T>(&value_key, &raw, opts.beta)
                    {
                        if found.fresh {
                            e.counters.hits.bump();
                            e.streak.hit();
                            if let Some(ahead) = ahead.take() {
                                ahead.unused(&e.keeper);
                            }
                            if let (Some(near), Some(ticket)) = (&e.near, ticket)
                                && !crate::entry::is_tagged(&raw)
                            {
                                #[cfg(feature = "test-hooks")]
                                e.hooks.before_local_fill(key);
                                near.offer(key, ticket, &raw);
                            }
                            if found.refresh_due {
                                let mut keys = Keys::for_value(value_key);
                                keys.tags = tags;
                                let load = load.with_cached(&raw);
                                self.refresh_early(background, key, keys, opts, generation, load);
                            }
                            return Ok(found.value);
                        }
                        stale = Some((raw, found.value));
                    } else if !missing && let Some(ahead) = &mut ahead {
                        // Foreign or corrupt, and deleted: claim again on a
                        // clean slate (with the same token, which finds
                        // what the first claim took).
                        ahead.claimed = None;
                    }
                }
                Err(err) => {
                    e.cache_failed(permit, &err);
                    use_redis = false;
                }
            }
        }
        // A tagged read's stamps, read before the load as the lease is
        // taken: an invalidate_tag from now on makes its fill be dropped.
        // (A tagged read claims no lease ahead.)
        let tags = match tags {
            Some(tags) if use_redis => match crate::tags::stamp(&e.cache, &tags) {
                Ok(stamped) => Some(stamped),
                Err(err) => {
                    e.cache_failed(permit, &err);
                    use_redis = false;
                    Some(tags)
                }
            },
            tags => tags,
        };
        if use_redis {
            e.counters.misses.bump();
            e.streak.miss();
        } else {
            e.counters.bypassed.bump();
            permit = Permit::Bypass;
            if let Some(ahead) = ahead.take() {
                ahead.unused(&e.keeper);
            }
        }
        let fits = |json: &[u8]| serde_json::from_slice::<T>(json).is_ok();
        let (stale_raw, stale_value) = match stale {
            Some((raw, value)) => (Some(raw), Some(value)),
            None => (None, None),
        };
        let load = match &stale_raw {
            Some(raw) => load.with_cached(raw),
            None => load,
        };
        let (mut keys, ahead) = match ahead {
            Some(ahead) => {
                let (keys, claim) = ahead.into_parts();
                (keys, Some(claim))
            }
            None => (Keys::for_value(value_key), None),
        };
        keys.tags = tags;
        let miss = Miss {
            key,
            keys,
            ahead: std::cell::Cell::new(ahead),
            opts,
            stale: stale_raw,
            permit,
            use_redis,
            started: Instant::now(),
            deadline: Instant::now() + e.settings.call_deadline,
            fits: &fits,
            sent_back: std::cell::Cell::new(false),
            generation,
        };
        let span = MissSpan::enter(key, mode.name(), !use_redis);
        let answer = match mode {
            Mode::Plain => e.miss_plain(background, &miss, load),
            Mode::SingleFlight => e.miss_single_flight(background, &miss, load),
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
    fn refresh_early<L: Load>(
        &self,
        background: &Background,
        key: &str,
        keys: Keys,
        opts: EntryOptions,
        generation: u64,
        load: L,
    ) {
        let e = self;
        if background.overloaded() {
            // The value is fresh: a later hit refreshes it. Running the load
            // here would make this caller wait for it.
            return;
        }
        let Role::Leader(leader) = e.flights.join(key) else {
            return;
        };
        let target = Target {
            key: key.to_owned(),
            keys,
            opts,
            deadline: Instant::now() + e.settings.call_deadline,
            generation,
        };
        match load.detach() {
            Ok(job) => {
                let engine = e.clone();
                // Until a pool thread adopts it, the caller that queued it
                // must not count as its leader: a read of this key on the
                // caller's thread would be refused as a loader reading its
                // own key.
                leader.hand_off();
                let work = Box::new(move || {
                    leader.adopt();
                    engine.refresh(leader, &target, job);
                });
                if let Err(work) = background.spawn(work) {
                    work();
                }
            }
            Err(load) => e.refresh(leader, &target, move || load.run()),
        }
    }
}

impl Engine {
    /// Decodes a cached entry: `Some` for a usable one (fresh or a fail-safe
    /// copy), `None` after deleting and counting a corrupt one.
    pub(crate) fn decode<T: DeserializeOwned>(
        &self,
        value_key: &str,
        raw: &[u8],
        beta: f64,
    ) -> Option<Found<T>> {
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
                refresh_due: fresh && entry.should_refresh_early(beta, fastrand::f64()),
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

    pub(crate) fn corrupt(&self, value_key: &str, raw: &[u8]) {
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
    pub(crate) fn cache_call<T>(&self, permit: Permit, outcome: Result<T>) -> Result<T> {
        match &outcome {
            Ok(_) => self.breaker.succeeded(permit),
            Err(err) => self.cache_failed(permit, err),
        }
        outcome
    }

    /// As [`note_write`](Self::note_write), for every key under `prefix`.
    pub(crate) fn note_prefix_write(&self, prefix: &str) {
        self.flights.note_write_prefix(prefix);
    }

    /// Whether a plain read claims its lease with its lookup now.
    #[cfg(feature = "test-hooks")]
    pub(crate) fn expects_misses(&self) -> bool {
        self.streak.expects_miss()
    }

    /// Threads waiting on the flight of `key` in this process.
    #[cfg(feature = "test-hooks")]
    pub(crate) fn flight_followers(&self, key: &str) -> usize {
        self.flights.followers(key)
    }

    /// Loads in flight in this process.
    pub(crate) fn in_flight(&self) -> usize {
        self.flights.len()
    }

    /// Tells an open flight of `key` that its row changed (a write of this
    /// process, or one the relay read from the outbox).
    pub(crate) fn note_write(&self, key: &str) {
        self.flights.note_write(key);
    }

    fn miss_plain<L: Load>(&self, bg: &Background, m: &Miss<'_>, load: L) -> Result<Answer> {
        if !m.use_redis {
            return self.load_uncached(m, load);
        }
        let ahead = m.ahead.take();
        let behind = ahead.is_some();
        let (token, first, landings) = match ahead {
            Some(a) => (a.token, a.claimed, a.landings),
            None => (new_token(), None, 0),
        };
        match self.acquire_first(m, Claim::Lease, &token, first) {
            Ok(Claimed::Busy) if behind && self.own_fill_landed(m, landings) => {
                self.read_own_fill(m, load)
            }
            Err(_) | Ok(Claimed::Busy) => self.load_uncached(m, load),
            Ok(Claimed::Cached(answer)) => Ok(answer),
            Ok(Claimed::Granted) => {
                let hold = self.keeper.hold(&m.keys, token, m.deadline, m.generation);
                if behind && m.stale.is_none() && !bg.inline() && !bg.overloaded() {
                    return self.load_fill_behind(bg, m, load, hold);
                }
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
            let wait_until = m.soft_deadline().unwrap_or(m.deadline);
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
                let tags = m.keys.tags.as_deref();
                match crate::tags::lookup(&self.cache, &m.keys.value, tags) {
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
        let soft = m.soft_deadline();
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
        let hold = self.keeper.hold(&m.keys, token, m.deadline, m.generation);
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
        let mut stamped = None;
        if t.keys.tags.is_some() {
            // Stamps before the load, as on a miss.
            let mut target = t.clone();
            if let Err(err) = crate::tags::stamp_keys(&self.cache, &mut target.keys) {
                self.cache_failed(Permit::Use, &err);
                leader.publish(Err(err), 0);
                return;
            }
            stamped = Some(target);
        }
        let t = stamped.as_ref().unwrap_or(t);
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
        let hold = self.keeper.hold(&t.keys, token, t.deadline, t.generation);
        let load_read = leader.begin_read();
        let loaded = load();
        #[cfg(feature = "test-hooks")]
        self.hooks.after_load(&t.key);
        if loaded.is_ok() {
            self.counters.refreshed_early(&t.key);
        }
        let filled = self.fill_loaded(&t.keys, &t.opts, hold, loaded, load_read, &leader.marks());
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
        let load = match m.soft_deadline() {
            None => load,
            Some(soft) => match load.detach() {
                Err(load) => load,
                Ok(job) => {
                    let (tx, rx) = std::sync::mpsc::sync_channel(1);
                    let engine = self.clone();
                    let (keys, opts) = (m.keys.clone(), m.opts);
                    #[cfg(feature = "test-hooks")]
                    let key = m.key.to_owned();
                    let work = Box::new(move || {
                        let load_read = marks.begin_read();
                        let loaded = job();
                        #[cfg(feature = "test-hooks")]
                        engine.hooks.after_load(&key);
                        let done = Held::Done(
                            engine.fill_loaded(&keys, &opts, hold, loaded, load_read, &marks),
                        );
                        // The caller may have stopped waiting: the fill is
                        // what mattered then.
                        let _ = tx.send(done);
                    });
                    if let Err(work) = bg.spawn(work) {
                        if !bg.inline() {
                            // Every background thread is busy and the queue
                            // is full: serve the copy now rather than wait
                            // for a load (dropping the job drops its hold).
                            return Held::GaveUp;
                        }
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
        Held::Done(self.fill_loaded(&m.keys, &m.opts, hold, loaded, load_read, &marks))
    }

    /// Fills what a load returned and says for which followers its answer
    /// is valid.
    fn fill_loaded(
        &self,
        keys: &Keys,
        opts: &EntryOptions,
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
        let verdict = self.fill(keys, opts, hold, &loaded);
        Filled {
            outcome: Ok(answer_of(&loaded)),
            valid_before: valid_before(verdict, load_read, fill_read, marks),
        }
    }

    /// Stores a load's result if `hold` still has the lease; the lease check
    /// and the write are one Lua script, with no window between them.
    fn fill(&self, keys: &Keys, opts: &EntryOptions, hold: Hold, loaded: &Loaded) -> Verdict {
        let (entry, raw, physical) = fill_entry(opts, loaded, keys.tags.as_deref());
        #[cfg(feature = "test-hooks")]
        if self.hooks.leases_disabled() {
            return match self.cache.set_raw(&keys.value, &raw, physical) {
                Ok(()) => Verdict::Stored,
                Err(_) => Verdict::Failed,
            };
        }
        let filled = if loaded.unchanged {
            lease::touch(&self.cache, keys, hold.token(), &entry, physical)
        } else {
            lease::fill(&self.cache, keys, hold.token(), &raw, physical)
        };
        #[cfg(feature = "test-hooks")]
        let filled = filled.and_then(|f| self.hooks.lose_fill_reply().map_or(Ok(f), Err));
        // A tag invalidated during the load (or a reply lost, after which
        // neither the lease nor this process's writes can tell): the row
        // goes only to followers that joined before the load began, as for
        // a fill a write dropped.
        let stored = (!loaded.unchanged).then_some(raw.as_slice());
        if !matches!(filled, Ok(false)) && !crate::tags::kept(&self.cache, keys, stored) {
            match &filled {
                // The script released the lease and lock.
                Ok(_) => hold.filled(),
                // Dropping the hold releases them if they are still ours.
                Err(err) => self.cache_failed(Permit::Use, err),
            }
            self.counters.fill_dropped(&keys.value);
            return Verdict::Dropped;
        }
        self.fill_verdict(keys, hold, &raw, filled)
    }

    /// What a fill script's reply (`stored`) means for the key, with the
    /// bookkeeping that goes with it: the hold released, a fill on another
    /// server taken back, drops and failures counted.
    pub(crate) fn fill_verdict(
        &self,
        keys: &Keys,
        hold: Hold,
        raw: &[u8],
        stored: Result<bool>,
    ) -> Verdict {
        match stored {
            Ok(true) if self.cache.server_generation() != hold.generation() => {
                // Stored on another Redis server than the one the lease was
                // taken on: there the lease may have come back from a
                // snapshot though a write revoked it. Take the row back out
                // (only if it is still ours); the breaker tripped with the
                // change, so nobody trusted it meanwhile.
                hold.filled();
                let _ = lease::discard(&self.cache, &keys.value, raw);
                self.counters.fill_dropped(&keys.value);
                Verdict::Dropped
            }
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
        if m.use_redis {
            self.rearm(m.permit, &m.keys.value, raw);
        }
        self.counters.stale_served.bump();
        Ok(Answer::Stale)
    }

    /// Re-arms a fail-safe copy about to be served, for the throttle period
    /// (only if it is still the same bytes: nothing newer is overwritten).
    pub(crate) fn rearm(&self, permit: Permit, value_key: &str, raw: &[u8]) {
        if let Ok(entry) = Entry::decode(raw) {
            let again = entry.rearmed(self.settings.fail_safe_throttle);
            let rearmed = lease::rearm(&self.cache, value_key, raw, &again);
            let _ = self.cache_call(permit, rearmed);
        }
    }

    /// A fresh entry read again by a follower, as an answer.
    fn fresh_answer(&self, m: &Miss<'_>, raw: &[u8]) -> Option<Answer> {
        if crate::entry::is_tagged(raw)
            && !crate::tags::valid(&self.cache, &m.keys.value, raw, &[], &[]).unwrap_or(false)
        {
            // A tag invalidated it (and it is gone now), or its tags
            // could not be checked: not an answer.
            return None;
        }
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
        self.acquire_first(m, claim, token, None)
    }

    /// [`acquire`](Self::acquire), whose first reply (`first`) may have
    /// come already, with the lookup.
    fn acquire_first(
        &self,
        m: &Miss<'_>,
        claim: Claim,
        token: &lease::Token,
        mut first: Option<Result<Acquired>>,
    ) -> Result<Claimed> {
        // A corrupt value is deleted and the claim retried on a clean slate;
        // bounded, in case something keeps writing garbage under our key.
        for _ in 0..3 {
            let acquired = first.take().unwrap_or_else(|| {
                lease::acquire(
                    &self.cache,
                    &m.keys,
                    claim,
                    token,
                    self.settings.ttls,
                    now_ms(),
                )
            });
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

/// What an early refresh reloads.
#[derive(Clone)]
struct Target {
    key: String,
    keys: Keys,
    opts: EntryOptions,
    deadline: Instant,
    /// The Redis server generation when the refresh began.
    generation: u64,
}

/// A fill's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
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
pub(crate) fn valid_before(verdict: Verdict, load_read: u64, fill_read: u64, marks: &Marks) -> u64 {
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

/// The entry a fill stores for `loaded`, and its physical TTL (the
/// logical one plus the fail-safe period).
pub(crate) fn fill_entry<'a>(
    opts: &EntryOptions,
    loaded: &'a Loaded,
    tags: Option<&crate::keys::Tags>,
) -> (Entry<'a>, Vec<u8>, Duration) {
    let (payload, ttl) = match &loaded.json {
        Some(json) => (Payload::Value(json), opts.ttl),
        None => (Payload::Absent, opts.negative_ttl),
    };
    let entry = Entry::new(payload, loaded.version, loaded.took, ttl);
    let line = tags.map(crate::tags::line);
    let raw = entry.tagged(line.as_deref().unwrap_or_default()).encode();
    (entry, raw, ttl.saturating_add(opts.fail_safe_max))
}

pub(crate) fn answer_of(loaded: &Loaded) -> Answer {
    match &loaded.json {
        Some(json) => Answer::Value(json.as_slice().into()),
        None => Answer::Absent,
    }
}

pub(crate) fn to_json<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(value)
        .map_err(|e| Error::invalid_argument("value does not serialize to JSON").with_source(e))
}

pub(crate) fn decode_value<T: DeserializeOwned>(key: &str, json: &[u8]) -> Result<Option<T>> {
    serde_json::from_slice(json).map(Some).map_err(|e| {
        let why = crate::error::json_error(&e);
        Error::corrupt(
            key,
            format!("another caller loaded a different type: {why}"),
        )
    })
}
