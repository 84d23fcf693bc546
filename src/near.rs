//! The near cache (L1): recently read entries kept in process memory, kept
//! coherent by Redis server-assisted client-side caching.
//!
//! Guarantees (tests/near.rs proves each):
//! - **A hit costs no network call, and allocates nothing.** It is a
//!   lookup in a `quick_cache` store by the caller's own key (no Redis key
//!   is built), one atomic load for liveness and the slot's freshness
//!   check; Redis and Postgres are not touched. The value is shared
//!   (`Arc`), not cloned, where the caller's API allows.
//! - **Coherence, with a bound.** A dedicated connection (the *tracker*)
//!   turns on `CLIENT TRACKING ... BCAST PREFIX <namespace>`, redirected to
//!   itself, and is subscribed to `__redis__:invalidate`: Redis tells it of
//!   every change to a key of the namespace, by any client (our fills,
//!   invalidations, write-through, write-behind, the relay, a `DEL` from
//!   `redis-cli`), and the tracker evicts the key. Every [`BEAT`] the
//!   tracker publishes a numbered heartbeat to a channel of its own on a
//!   second connection; when it reads that heartbeat back, every
//!   invalidation Redis queued before it has been applied (one connection
//!   delivers in order). An entry is served only within [`BOUND`] of the
//!   sending of the last heartbeat read back, so no hit returns a value
//!   that a write completed in Redis more than [`BOUND`] earlier replaced,
//!   whatever fails (a silent network, a stalled tracker thread, a lost
//!   connection). Past that, reads go to Redis until a heartbeat returns.
//! - **Read-your-writes in process.** This process's own writes
//!   (invalidate, write-through, write-behind) evict the key locally after
//!   their Redis command and before they return.
//! - **No stale fills.** L1 is filled only from a Redis hit, and only if no
//!   invalidation of the key's stripe (and no loss of the tracker) came
//!   between the moment the read began and the insert (checked and
//!   inserted under the stripe's lock, which an invalidation takes too).
//!   (A fill after a miss is not kept: our own fill's `SET` sends us an
//!   invalidation. The next read's Redis hit fills L1.)
//! - **Fail closed.** When the tracker's connection breaks, or a heartbeat
//!   stays unanswered past the I/O timeout, L1 is cleared and nothing is
//!   served or stored until a new connection is tracking, subscribed, and
//!   has read a heartbeat back. Every entry also expires after
//!   `max_staleness` and never outlives the Redis entry's own TTL, a
//!   backstop against anything this reasoning missed.

use std::any::Any;
use std::collections::VecDeque;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;
use serde::de::DeserializeOwned;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::cache::Cache;
use crate::config::{Config, LocalCache};
use crate::entry::{Entry, Payload, now_ms};
use crate::error::{Error, Result};
use crate::observe::{Counters, report};

/// How often the tracker sends a heartbeat.
pub(crate) const BEAT: Duration = Duration::from_millis(10);
/// How long after a heartbeat was sent its return lets L1 serve entries:
/// the coherence bound.
pub(crate) const BOUND: Duration = Duration::from_millis(50);
/// The Redis channel of invalidation messages.
const INVALIDATE: &str = "__redis__:invalidate";
/// Invalidation epochs are kept per stripe of keys, so a write to one key
/// rarely refuses the fill of another.
const STRIPES: usize = 1024;
/// First pause before the tracker reconnects; doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(10);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// What L1 holds for a key: the value's JSON, or `None` for a cached
/// absence, until when it may be served, and the value decoded once for
/// callers that share or clone it. Immutable but for that one-time decode,
/// so a hit that holds it sees one value whatever happens to the key.
pub(crate) struct Slot {
    json: Option<Box<[u8]>>,
    fresh_until: Instant,
    decoded: OnceLock<Arc<dyn Any + Send + Sync>>,
}

impl Slot {
    /// The value as `T`, decoded from its JSON: `Some(None)` for a cached
    /// absence, `None` if the JSON is not a `T`.
    pub(crate) fn decode<T: DeserializeOwned>(&self) -> Option<Option<T>> {
        match &self.json {
            None => Some(None),
            Some(json) => serde_json::from_slice(json).ok().map(Some),
        }
    }

    /// [`decode`](Self::decode), but the first caller's decoded value is
    /// kept, and later ones get a clone of it: cheaper than JSON for most
    /// types. (A caller of another type under the same key decodes the
    /// JSON.)
    pub(crate) fn cloned<T: DeserializeOwned + Clone + Send + Sync + 'static>(
        &self,
    ) -> Option<Option<T>> {
        self.with(|value: &T| value.clone())
    }

    /// The value decoded once and shared: every hit gets the same `Arc`,
    /// nothing is allocated after the first.
    pub(crate) fn shared<T: DeserializeOwned + Send + Sync + 'static>(
        &self,
    ) -> Option<Option<Arc<T>>> {
        let Some(json) = &self.json else {
            return Some(None);
        };
        match self.kept::<T>(json) {
            Kept::Mine(any) => Arc::downcast::<T>(Arc::clone(any)).ok().map(Some),
            Kept::Other => serde_json::from_slice(json).ok().map(|v| Some(Arc::new(v))),
            Kept::NotT => None,
        }
    }

    /// `f` applied to the value decoded once (`Some(None)` for a cached
    /// absence, `None` if the JSON is not a `T`), without cloning it.
    pub(crate) fn with<T: DeserializeOwned + Send + Sync + 'static, R>(
        &self,
        f: impl FnOnce(&T) -> R,
    ) -> Option<Option<R>> {
        let Some(json) = &self.json else {
            return Some(None);
        };
        match self.kept::<T>(json) {
            Kept::Mine(any) => any.downcast_ref::<T>().map(|v| Some(f(v))),
            Kept::Other => serde_json::from_slice(json).ok().map(|v| Some(f(&v))),
            Kept::NotT => None,
        }
    }

    /// The kept decoded value, decoding it on the first call.
    fn kept<T: DeserializeOwned + Send + Sync + 'static>(&self, json: &[u8]) -> Kept<'_> {
        if let Some(any) = self.decoded.get() {
            return if any.is::<T>() {
                Kept::Mine(any)
            } else {
                Kept::Other
            };
        }
        match serde_json::from_slice::<T>(json) {
            Ok(value) => {
                let any = self.decoded.get_or_init(|| Arc::new(value));
                if any.is::<T>() {
                    Kept::Mine(any)
                } else {
                    // Another type's caller decoded first, in between.
                    Kept::Other
                }
            }
            Err(_) => Kept::NotT,
        }
    }
}

/// What [`Slot::kept`] found.
enum Kept<'a> {
    /// The kept value, a `T`.
    Mine(&'a Arc<dyn Any + Send + Sync>),
    /// The kept value is of another type (a caller of another type under
    /// the same key decoded first): decode the JSON for this caller.
    Other,
    /// The JSON is not a `T`.
    NotT,
}

/// The near cache of one engine, shared by its readers and its tracker.
pub(crate) struct Near {
    /// Keyed by the caller's key (not the Redis key: a hit builds no
    /// string). quick_cache is internally synchronized; it does not expire
    /// entries, a hit checks the slot's `fresh_until`.
    store: quick_cache::sync::Cache<Box<str>, Arc<Slot>>,
    /// `{namespace}{`: what a Redis key of a value starts with, before the
    /// caller's key and the closing `}` ([`crate::keys::value_key`]).
    value_prefix: Box<str>,
    /// Per-stripe invalidation counts: bumped (before the eviction) by every
    /// invalidation of a key of the stripe and by every clear. A reader
    /// reads its stripe's count before its Redis `GET`, and inserts only if
    /// it has not moved, checking and inserting under the stripe's lock: so
    /// no one ever sees an entry an invalidation already refused. (Insert
    /// first and undo on a moved count would let another reader take the
    /// stale entry in between.) Held for a count and an in-memory insert,
    /// never across I/O.
    stripes: Box<[Mutex<u64>]>,
    hasher: std::collections::hash_map::RandomState,
    /// Milliseconds since `origin` until which entries may be served; 0
    /// while the tracker is not connected, subscribed and confirmed.
    live_until: AtomicU64,
    origin: Instant,
    max_staleness: Duration,
    counters: Arc<Counters>,
    /// The tracking connection's `CLIENT ID` (0 when not connected).
    tracker_id: AtomicU64,
    stop: AtomicBool,
    /// Test hook: the tracker drops invalidation messages (keeps beating).
    #[cfg(feature = "test-hooks")]
    ignore_invalidations: AtomicBool,
    /// The engine's test hooks (the tracker runs `before_tracking`).
    #[cfg(feature = "test-hooks")]
    pub(crate) hooks: Arc<crate::hooks::Hooks>,
}

/// What a reader noted before it went to Redis; see [`Near::offer`].
#[derive(Clone, Copy)]
pub(crate) struct Ticket {
    stripe: usize,
    epoch: u64,
}

impl Near {
    /// The near cache of the keys of `namespace`.
    pub(crate) fn new(settings: LocalCache, namespace: &str, counters: Arc<Counters>) -> Near {
        let capacity = usize::try_from(settings.max_entries).unwrap_or(usize::MAX);
        Near {
            store: quick_cache::sync::Cache::new(capacity.max(1)),
            value_prefix: format!("{namespace}{{").into(),
            stripes: (0..STRIPES).map(|_| Mutex::new(0)).collect(),
            hasher: Default::default(),
            live_until: AtomicU64::new(0),
            origin: Instant::now(),
            max_staleness: settings.max_staleness,
            counters,
            tracker_id: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            #[cfg(feature = "test-hooks")]
            ignore_invalidations: AtomicBool::new(false),
            #[cfg(feature = "test-hooks")]
            hooks: Default::default(),
        }
    }

    fn now(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.origin).as_millis() as u64
    }

    /// True while entries may be served: the tracker read back a heartbeat
    /// sent less than [`BOUND`] ago.
    pub(crate) fn live(&self) -> bool {
        self.now(Instant::now()) < self.live_until.load(Ordering::SeqCst)
    }

    /// The cached entry for the caller's `key`; `None` for a miss (or while
    /// L1 is dark). Allocates nothing.
    pub(crate) fn get(&self, key: &str) -> Option<Arc<Slot>> {
        let now = Instant::now();
        let hit = if self.now(now) < self.live_until.load(Ordering::SeqCst) {
            self.store.get(key).filter(|slot| slot.fresh_until > now)
        } else {
            None
        };
        match hit {
            Some(slot) => {
                self.counters.local_hits.bump();
                Some(slot)
            }
            None => {
                self.counters.local_misses.bump();
                None
            }
        }
    }

    fn stripe(&self, key: &str) -> usize {
        (self.hasher.hash_one(key) as usize) % STRIPES
    }

    /// Notes the key's invalidation count before a read goes to Redis.
    pub(crate) fn ticket(&self, key: &str) -> Ticket {
        let stripe = self.stripe(key);
        Ticket {
            stripe,
            epoch: *self.stripes[stripe].lock(),
        }
    }

    /// Puts a fresh entry a Redis `GET` returned into L1, unless an
    /// invalidation of its stripe (or a clear) came since `ticket`.
    ///
    /// The race it closes: an invalidation bumps the count under the
    /// stripe's lock, then evicts; this checks the count and inserts under
    /// the same lock. Either the bump comes first and this inserts nothing,
    /// or the insert comes first and the eviction removes it. Either way an
    /// invalidation that arrived while the read was in flight wins.
    pub(crate) fn offer(&self, key: &str, ticket: Ticket, raw: &[u8]) {
        if !self.live() {
            return;
        }
        let Ok(entry) = Entry::decode(raw) else {
            return;
        };
        let now_wall = now_ms();
        let Some(left_ms) = entry.expires_at_ms.checked_sub(now_wall) else {
            return;
        };
        let left = Duration::from_millis(left_ms).min(self.max_staleness);
        let json = match entry.payload {
            Payload::Value(json) => Some(Box::from(json)),
            Payload::Absent => None,
        };
        let slot = Arc::new(Slot {
            json,
            fresh_until: Instant::now() + left,
            decoded: OnceLock::new(),
        });
        let epoch = self.stripes[ticket.stripe].lock();
        if *epoch == ticket.epoch {
            self.store.insert(key.into(), slot);
        }
    }

    /// Evicts a key this process just wrote (or whose cached copy turned
    /// out unusable).
    pub(crate) fn evict(&self, key: &str) {
        self.bump(key);
        self.store.remove(key);
    }

    /// Applies an invalidation message: evicts the key it names.
    fn invalidated(&self, redis_key: &[u8]) {
        let Some(key) = self.cache_key(redis_key) else {
            // Not a value key of ours (a side key such as `…:lease`, or
            // another client's key under the prefix): L1 holds no such
            // entry, and no fill of ours reads it.
            return;
        };
        self.bump(key);
        if self.store.remove(key).is_some() {
            self.counters.local_invalidations.bump();
        }
    }

    /// The caller's key inside a Redis key of a value, `{namespace}{key}`:
    /// `None` for any other key. Keys hold no brace ([`crate::keys`]), so
    /// the first `}` closes the tag; ours are UTF-8 (a non-UTF-8 key could
    /// only be stored by someone else).
    fn cache_key<'k>(&self, redis_key: &'k [u8]) -> Option<&'k str> {
        let key = std::str::from_utf8(redis_key)
            .ok()?
            .strip_prefix(&*self.value_prefix)?
            .strip_suffix('}')?;
        (!key.contains(['{', '}'])).then_some(key)
    }

    /// Refuses the fills of the reads of `key` in flight.
    fn bump(&self, key: &str) {
        *self.stripes[self.stripe(key)].lock() += 1;
    }

    /// Empties L1 and refuses every read in flight its fill.
    fn flush(&self) {
        for stripe in self.stripes.iter() {
            *stripe.lock() += 1;
        }
        self.store.clear();
    }

    /// The tracker lost its connection (or stopped answering): serve
    /// nothing until a new one is confirmed, and forget everything.
    fn lost(&self) {
        self.live_until.store(0, Ordering::SeqCst);
        self.tracker_id.store(0, Ordering::SeqCst);
        self.flush();
        self.counters.local_clears.bump();
    }

    /// A heartbeat sent at `sent` came back: every invalidation queued
    /// before it has been applied.
    fn confirmed(&self, sent: Instant) {
        let until = self.now(sent + BOUND);
        self.live_until.fetch_max(until, Ordering::SeqCst);
    }

    /// On a cluster: every master's tracker has read back a heartbeat sent
    /// at `oldest` or later (the oldest of their latest). Set, not raised:
    /// the caller serializes it with [`lost`](Self::lost).
    fn confirmed_everywhere(&self, oldest: Instant) {
        self.live_until
            .store(self.now(oldest + BOUND).max(1), Ordering::SeqCst);
    }

    /// Entries held now (expired ones too, until evicted).
    pub(crate) fn len(&self) -> u64 {
        self.store.len() as u64
    }

    /// The `CLIENT ID` of the tracking connection, if connected.
    #[cfg(feature = "test-hooks")]
    pub(crate) fn tracker_id(&self) -> Option<u64> {
        Some(self.tracker_id.load(Ordering::SeqCst)).filter(|&id| id != 0)
    }

    #[cfg(feature = "test-hooks")]
    pub(crate) fn ignore_invalidations(&self, ignore: bool) {
        self.ignore_invalidations.store(ignore, Ordering::SeqCst);
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }
}

/// The tracker thread; stops (and is joined) on drop.
pub(crate) struct Tracker {
    near: Arc<Near>,
    thread: Option<JoinHandle<()>>,
}

impl Tracker {
    /// Starts tracking the keys of `cache`'s namespace for `near`; on a
    /// Redis Cluster, on every master (reached with `config`'s
    /// credentials), each I/O bounded by `config.cache_timeout`.
    pub(crate) fn start(near: Arc<Near>, cache: Cache, config: &Config) -> Tracker {
        let io_timeout = config.cache_timeout;
        let config = cache.is_cluster().then(|| config.clone());
        let thread = {
            let near = near.clone();
            thread::Builder::new()
                .name("cacheaside-near".into())
                .spawn(move || track(&near, &cache, config.as_ref(), io_timeout))
                .ok()
        };
        if thread.is_none() {
            report!(
                warn,
                "could not start the near cache's tracker: L1 stays off"
            );
        }
        Tracker { near, thread }
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        self.near.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The tracker's life: sessions, with a backoff between them. `cluster`:
/// the settings to reach each master with, on a Redis Cluster.
fn track(near: &Near, cache: &Cache, cluster: Option<&Config>, io_timeout: Duration) {
    let mut backoff = FIRST_BACKOFF;
    // Said once per streak of refusals, not once per retry.
    let mut warned = false;
    while !near.stopped() {
        let mut connected = false;
        let outcome = match cluster {
            Some(config) => masters::session(near, cache, config, io_timeout, &mut connected),
            None => session(near, cache, io_timeout, &mut connected),
        };
        if connected {
            near.lost();
            backoff = FIRST_BACKOFF;
            warned = false;
        }
        match outcome {
            Ok(()) => return,
            // Redis answers but refuses (older than 6.0, an ACL without
            // CLIENT or SUBSCRIBE): L1 stays dark, and someone should know.
            Err(err) if !connected && !err.is_outage() && !warned => {
                warned = true;
                report!(
                    warn,
                    "near cache off: Redis refused client-side caching: {}",
                    err.chain()
                );
            }
            Err(err) => report!(
                debug,
                "near cache tracker disconnected, L1 cleared: {}",
                err.chain()
            ),
        }
        let deadline = Instant::now() + backoff;
        while !near.stopped() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5).min(backoff));
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// One tracking connection, from connect to break (`Err`) or stop (`Ok`).
fn session(near: &Near, cache: &Cache, io_timeout: Duration, connected: &mut bool) -> Result<()> {
    let mut sub = cache.dedicated(io_timeout)?;
    let mut beat = cache.dedicated(io_timeout)?;
    let name = tracker_name();
    let id = start_tracking(near, &mut *sub, &name, cache.namespace())?;
    let channel = format!("__cacheaside_near__:{name}");
    // (A cluster's masters are tracked by `masters::session`.)
    let sub = sub
        .single()
        .ok_or_else(|| Error::invalid_argument("the near cache needs a single Redis server"))?;
    let mut pubsub = sub.as_pubsub();
    pubsub.subscribe(&[INVALIDATE, channel.as_str()])?;
    // Tracking covers writes from now on. A read that went to Redis while
    // L1 was dark may hold a value replaced before now, of which no
    // invalidation will come: refuse the fills of every read in flight
    // (their tickets predate this), before any heartbeat can make L1 live.
    near.flush();
    pubsub.set_read_timeout(Some(BEAT))?;
    near.tracker_id.store(id, Ordering::SeqCst);
    *connected = true;
    pump(
        near,
        &mut pubsub,
        &mut *beat,
        &channel,
        io_timeout,
        || near.stopped(),
        |sent| {
            near.confirmed(sent);
            true
        },
    )
}

/// Names `sub`, and turns on broadcast tracking of `namespace`'s keys,
/// redirected to `sub` itself: if it dies, tracking and subscription die
/// together, and we notice on the next read. Returns its `CLIENT ID`.
fn start_tracking(
    near: &Near,
    sub: &mut dyn redis::ConnectionLike,
    name: &str,
    namespace: &str,
) -> Result<u64> {
    redis::cmd("CLIENT")
        .arg("SETNAME")
        .arg(name)
        .query::<()>(sub)?;
    let id: u64 = redis::cmd("CLIENT").arg("ID").query(sub)?;
    #[cfg(feature = "test-hooks")]
    near.hooks.before_tracking("");
    #[cfg(not(feature = "test-hooks"))]
    let _ = near;
    let mut tracking = redis::cmd("CLIENT");
    tracking
        .arg("TRACKING")
        .arg("ON")
        .arg("REDIRECT")
        .arg(id)
        .arg("BCAST");
    if !namespace.is_empty() {
        tracking.arg("PREFIX").arg(namespace);
    }
    tracking.query::<()>(sub)?;
    Ok(id)
}

/// Sends the next heartbeat on `channel` when it is due, and fails when
/// the oldest one unanswered is older than `io_timeout`.
/// Reads a tracking subscription (`pubsub`) until `done()` (`Ok`) or the
/// connection fails (`Err`): applies its invalidations, sends heartbeats
/// on `beat` to `channel`, and tells `confirmed` when each was sent as it
/// comes back (every invalidation queued before then has been applied);
/// `confirmed` returns false to stop.
fn pump(
    near: &Near,
    pubsub: &mut redis::PubSub<'_>,
    beat: &mut dyn redis::ConnectionLike,
    channel: &str,
    io_timeout: Duration,
    done: impl Fn() -> bool,
    mut confirmed: impl FnMut(Instant) -> bool,
) -> Result<()> {
    // Heartbeats sent and not yet read back, oldest first.
    let mut sent: VecDeque<(u64, Instant)> = VecDeque::new();
    let (mut seq, mut next_beat) = (0u64, Instant::now());
    loop {
        if done() {
            return Ok(());
        }
        heartbeat(
            beat,
            channel,
            &mut seq,
            &mut sent,
            &mut next_beat,
            io_timeout,
        )?;
        let msg = match pubsub.get_message() {
            Ok(msg) => msg,
            Err(err) if err.is_timeout() => continue,
            Err(err) => return Err(err.into()),
        };
        if let Some(at) = on_message(near, &msg, channel, &mut sent)?
            && !confirmed(at)
        {
            return Ok(());
        }
    }
}

fn heartbeat(
    beat: &mut dyn redis::ConnectionLike,
    channel: &str,
    seq: &mut u64,
    sent: &mut VecDeque<(u64, Instant)>,
    next_beat: &mut Instant,
    io_timeout: Duration,
) -> Result<()> {
    let now = Instant::now();
    if now >= *next_beat {
        *seq += 1;
        let receivers: u64 = redis::cmd("PUBLISH").arg(channel).arg(*seq).query(beat)?;
        if receivers == 0 {
            return Err(Error::new(
                crate::ErrorKind::Cache,
                "the tracker's subscription is gone",
            ));
        }
        sent.push_back((*seq, now));
        *next_beat = now + BEAT;
    }
    if let Some(&(_, oldest)) = sent.front()
        && now.saturating_duration_since(oldest) > io_timeout
    {
        return Err(Error::timeout("near cache heartbeat"));
    }
    Ok(())
}

/// Applies one message of a tracker's subscription: an invalidation, or
/// one of its heartbeats read back; for a heartbeat, returns when it was
/// sent (every invalidation queued before then has been applied).
fn on_message(
    near: &Near,
    msg: &redis::Msg,
    channel: &str,
    sent: &mut VecDeque<(u64, Instant)>,
) -> Result<Option<Instant>> {
    let mut confirmed = None;
    {
        let from: Vec<u8> = msg.get_channel().unwrap_or_default();
        if from == INVALIDATE.as_bytes() {
            #[cfg(feature = "test-hooks")]
            if near.ignore_invalidations.load(Ordering::SeqCst) {
                return Ok(None);
            }
            match msg.get_payload::<redis::Value>() {
                Ok(redis::Value::Array(keys)) => {
                    for key in keys {
                        match key {
                            redis::Value::BulkString(key) => near.invalidated(&key),
                            // Not a key name: we cannot tell what changed.
                            _ => near.flush(),
                        }
                    }
                }
                // Nil: FLUSHALL / FLUSHDB, everything changed. Anything
                // else we cannot read: assume the same.
                _ => near.flush(),
            }
        } else if from == channel.as_bytes() {
            let Some(n) = std::str::from_utf8(msg.get_payload_bytes())
                .ok()
                .and_then(|s| s.parse::<u64>().ok())
            else {
                return Ok(None);
            };
            while let Some(&(m, at)) = sent.front() {
                if m > n {
                    break;
                }
                sent.pop_front();
                if m < n {
                    // TCP does not lose bytes from the middle of a live
                    // connection, but a proxy or a bug might: if a heartbeat
                    // went missing, invalidations may have gone with it.
                    return Err(Error::new(
                        crate::ErrorKind::Cache,
                        "a near cache heartbeat was lost",
                    ));
                }
                confirmed = Some(at);
            }
        }
    }
    Ok(confirmed)
}

/// `cacheaside-near-<pid>-<n>`: unique per tracker across processes (a
/// heartbeat channel is named after it).
fn tracker_name() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "cacheaside-near-{}-{}-{:08x}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed),
        fastrand::u32(..)
    )
}

mod masters;

#[cfg(test)]
mod tests {
    use super::*;

    fn near() -> Near {
        let near = Near::new(
            LocalCache::new(100, Duration::from_secs(10)),
            "t:",
            Arc::new(Counters::new("t:")),
        );
        near.confirmed(Instant::now() + Duration::from_secs(3600));
        near
    }

    fn raw(json: &[u8]) -> Vec<u8> {
        Entry::new(
            Payload::Value(json),
            0,
            Duration::ZERO,
            Duration::from_secs(60),
        )
        .encode()
    }

    #[test]
    fn fill_after_invalidate_is_dropped() {
        let near = near();
        let ticket = near.ticket("k");
        near.invalidated(b"t:{k}");
        near.offer("k", ticket, &raw(b"1"));
        assert!(near.get("k").is_none());
        let ticket = near.ticket("k");
        near.offer("k", ticket, &raw(b"1"));
        let slot = near.get("k").unwrap();
        assert_eq!(slot.decode::<u32>(), Some(Some(1)));
        assert_eq!(slot.cloned::<u32>(), Some(Some(1)));
        assert_eq!(slot.cloned::<u32>(), Some(Some(1)), "from the kept value");
        assert_eq!(slot.cloned::<String>(), None, "not a string");
        let shared = slot.shared::<u32>().unwrap().unwrap();
        assert!(Arc::ptr_eq(
            &shared,
            &slot.shared::<u32>().unwrap().unwrap()
        ));
    }

    #[test]
    fn only_value_keys_of_the_namespace_evict() {
        let near = near();
        near.offer("k", near.ticket("k"), &raw(b"1"));
        for other in [&b"t:{k}:lease"[..], b"u:{k}", b"t:k", b"t:{k", b"\xff"] {
            near.invalidated(other);
            assert!(near.get("k").is_some(), "{other:?} evicted k");
        }
        near.invalidated(b"t:{k}");
        assert!(near.get("k").is_none());
    }

    #[test]
    fn nothing_is_served_or_stored_while_dark() {
        let near = near();
        let ticket = near.ticket("k");
        near.offer("k", ticket, &raw(b"1"));
        near.lost();
        assert!(near.get("k").is_none());
        near.offer("k", near.ticket("k"), &raw(b"1"));
        assert_eq!(near.len(), 0);
        // A read that began before the loss cannot fill after a reconnect.
        near.confirmed(Instant::now());
        near.offer("k", ticket, &raw(b"1"));
        assert!(near.get("k").is_none());
    }

    #[test]
    fn expired_entries_are_not_served() {
        let near = near();
        let gone = Entry::new(Payload::Value(b"1"), 0, Duration::ZERO, Duration::ZERO).encode();
        near.offer("k", near.ticket("k"), &gone);
        assert!(near.get("k").is_none());
    }
}
