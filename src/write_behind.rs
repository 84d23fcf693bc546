//! Durable write-behind: a change goes into the cache and onto a Redis
//! Stream in one script, and worker threads (in any number of processes)
//! write it to Postgres later, in batches.
//!
//! Guarantees (each has a test in `tests/write_behind.rs`; the list with
//! its limits is `docs/write-behind.md`):
//! - **Nothing is dropped.** An enqueue returns once Redis holds the change
//!   on the stream and as the key's value. A change leaves the stream only
//!   after the transaction that wrote it (or a newer change of its key) has
//!   committed, or when it moves, with its error, to the dead-letter stream.
//!   A worker that dies at any point leaves what it read pending in the
//!   consumer group, and another worker claims it within about two seconds:
//!   each worker has a liveness key with a 2 s TTL, renewed every 500 ms by
//!   a thread of its process, and a worker whose key is gone is dead. A
//!   worker that is alive but slow keeps its changes until
//!   [`Config::write_behind_claim_after`] (`XAUTOCLAIM`). A full backlog refuses the
//!   enqueue ([`ErrorKind::BacklogFull`]); it never evicts.
//! - **At-least-once delivery, exactly-once effect.** Every change carries a
//!   per-key sequence number, and an applier's write is conditional on it:
//!   a change older than what the row holds, or one applied before, changes
//!   nothing. So a change delivered twice (a worker killed between `COMMIT`
//!   and `XACK`) has the effect of one.
//! - **Read-your-writes while pending.** From its enqueue until it is in
//!   Postgres, a change is what every reader of its key gets, in every
//!   process: it is the cached value, and if that is evicted, expires or is
//!   deleted, a miss rebuilds it from the key's pending record instead of
//!   loading the older row ([`crate::lease`] has the scripts).
//! - **Coalescing.** A worker writes only the newest change of each key in
//!   a batch; the older ones are acknowledged with it.
//! - **The last write wins across paths.** A synchronous write of a key
//!   (write-through, or a write and `invalidate`) supersedes its pending
//!   change: reads get the synchronous write from its return on, and a
//!   worker commits a change only if it is still the key's pending change
//!   and no registered writer is in progress, asked inside its transaction
//!   once its row locks are held ([`lease::still_current`]); a superseded
//!   change is acknowledged unwritten.
//! - **Failures.** An unreachable or timed-out Postgres (and a serialization
//!   failure, a deadlock, a shutdown) is waited out: the batch is retried,
//!   with backoff, for as long as it takes. When the failure came inside the
//!   transaction (a statement timeout on a row another session keeps
//!   locked), the batch is split first and the failing key is retried in a
//!   transaction of its own, so it delays only itself. A write Postgres refuses (a
//!   constraint, a type error, an applier's error) is retried
//!   [`Config::write_behind_attempts`] times in all, alone (so one bad change
//!   does not hold up its batch), and then moves to the dead-letter stream
//!   with its error, and its cache entry is invalidated: readers fall back
//!   to what Postgres holds. An entry that does not parse moves there at
//!   once.
//! - **Bounded.** At most [`MAX_WRITE_BEHIND_WORKERS`] threads per process; each holds
//!   at most [`Config::write_behind_batch`] entries in memory, reads with a
//!   blocking `XREADGROUP` of at most 100 ms on a connection of its own
//!   (so `stop` returns within that plus the batch in progress), and every
//!   other call is bounded by the cache and database timeouts. (On a
//!   cluster a worker polls the streams of every slot in turn, resting at
//!   most 50 ms when all are empty: one `XREADGROUP` cannot name keys of
//!   several slots.) [`Config::write_behind_max_backlog`] bounds each
//!   stream: on a cluster, each slot's.
//!
//! Keys (the layout of [`crate::lease`]): on a single server the stream is
//! `{namespace}{write_behind}:stream` and the dead-letter stream
//! `{namespace}{write_behind}:dead`. On a Redis Cluster each hash slot has
//! its own pair, in that slot, so a key's enqueue runs on one node
//! (`shards` has the layout and how workers find the streams); workers
//! read, claim and dead-letter per stream, and `pending`, `drain` and the
//! dead-letter listing cover every stream. The consumer group is
//! `cacheaside`. Entries hold `k` (the key, without the namespace), `s`
//! (the sequence number) and `v` (the value's JSON). The scripts that touch
//! the streams alone (acknowledge, dead-letter) live here, since no cache
//! key is involved; the ones that touch a cache key live in
//! [`crate::lease`] (the enqueue is [`crate::lease::write_behind`]).
//!
//! Durability is Redis's: with `appendonly yes` and `appendfsync always`,
//! an enqueued change survives a Redis crash; with `everysec` the last
//! second may be lost. The streams and pending records have no TTL, so
//! Redis must not evict them (`maxmemory-policy` `noeviction` or a
//! `volatile-*` one: every cache entry has a TTL).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use redis::Value;

use crate::cache::Cache;
use crate::config::Config;
use crate::db::Transaction;
use crate::engine::Engine;
use crate::entry::now_ms;
use crate::error::{Error, ErrorKind, Result};
use crate::lease::{self, Enqueued, Json, Keys, new_token};
use crate::observe::report;
use crate::redis_conn::millis;

/// The consumer group every worker of a namespace reads through.
const GROUP: &str = "cacheaside";

/// Longest one `XREADGROUP` blocks: how soon an idle worker sees `stop`.
const BLOCK: Duration = Duration::from_millis(100);

/// Most ids one acknowledgement script takes (Lua's `unpack` has a limit).
const ACK_CHUNK: usize = 1000;

/// How long a worker's liveness key lives without renewal: a worker whose
/// key is gone is dead, and its pending changes are claimed then, instead
/// of after [`Config::write_behind_claim_after`] (which stays for live
/// workers that are slow).
const LIVENESS_TTL: Duration = Duration::from_secs(2);

/// How often the liveness keys of a process's workers are renewed (by a
/// thread of their own, so a worker in a long transaction stays alive), and
/// how often a worker looks for dead ones.
const LIVENESS_EVERY: Duration = Duration::from_millis(500);

/// A dead worker's change is claimed only if idle this long: of two workers
/// that find the same dead one, only the first gets each change (a claim
/// resets the idle time).
const DEAD_CLAIM_IDLE: Duration = Duration::from_secs(1);

/// The largest value (JSON) a write-behind change may carry: an enqueue of
/// a larger one is refused, and a stream entry with one is dead-lettered.
pub(crate) const MAX_VALUE_BYTES: usize = 1 << 20;

/// Most fields a stream entry may have (ours have three): one with more
/// was not written by an enqueue, and is dead-lettered.
const MAX_ENTRY_FIELDS: usize = 16;

/// Highest sequence number an entry may carry: what the enqueue script can
/// produce (below 2^53), far from overflowing a `bigint`'s `version + 1`.
const MAX_SEQ: u64 = (1 << 53) - 1;

/// How much of a poison entry's value its dead letter keeps.
const DEAD_VALUE_BYTES: usize = 64 << 10;

/// The dead-letter stream is trimmed to about this many entries (`XADD
/// MAXLEN ~`), the oldest going first.
const DEAD_LETTER_CAP: u64 = 10_000;

/// Most write-behind worker threads one engine runs.
pub const MAX_WRITE_BEHIND_WORKERS: u32 = 64;

/// One change handed to an applier: the newest pending change of its key.
///
/// `json` is the value's JSON as it was enqueued (and cached); `seq` is its
/// sequence number, which grows with every change of the key. The applier's
/// write must be conditional on it (see
/// [`CacheAside::register_write_behind`](crate::CacheAside::register_write_behind)).
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct WriteBehindChange<'a> {
    /// The cache key, without the namespace (e.g. `user:1`).
    pub key: &'a str,
    /// The value's JSON.
    pub json: &'a [u8],
    /// The change's sequence number: Redis's clock in microseconds at the
    /// enqueue, or one more than the key's previous number when that is
    /// later. Below 2^53, so it fits a `bigint` and a JSON number.
    pub seq: u64,
}

/// A change that the workers gave up on, as the dead-letter stream holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeadLetter {
    /// The id of the entry in the dead-letter stream.
    pub id: String,
    /// The id the change had in the write-behind stream.
    pub original_id: String,
    /// The cache key, if the entry had one.
    pub key: Option<String>,
    /// The sequence number, if the entry had a valid one.
    pub seq: Option<u64>,
    /// The value's JSON, if the entry had one.
    pub json: Option<String>,
    /// Why it was given up on: the last error, or what did not parse.
    pub error: String,
    /// How many times its write was tried (0: it never was).
    pub attempts: u32,
}

/// A write of changes to the source: it runs inside a transaction that
/// commits when it returns `Ok`.
pub(crate) type Applier =
    Arc<dyn Fn(&mut Transaction<'_>, &[WriteBehindChange<'_>]) -> Result<()> + Send + Sync>;

/// The write-behind side of one engine: its appliers and its workers.
pub(crate) struct WriteBehind {
    shared: Arc<Shared>,
    /// Guarded by its mutex, held only to start or stop (stop joins the
    /// threads under it, so a concurrent start waits for the stop).
    workers: Mutex<Option<Workers>>,
}

/// What every worker of an engine reads.
struct Shared {
    /// The stream (single server) or the streams per slot (cluster).
    streams: Streams,
    /// A worker's liveness key is this followed by its consumer name.
    alive: String,
    /// Longest prefix first. Read by enqueues and by workers (who copy the
    /// list out, and never hold the lock across I/O); written by register.
    appliers: RwLock<Vec<(String, Applier)>>,
    max_backlog: u64,
    batch: usize,
    claim_after: Duration,
    attempts: u32,
    backoff: Duration,
    fail_safe_max: Duration,
    /// XREADGROUP's read timeout: the block plus a command's own bound.
    read_timeout: Duration,
}

/// While this process's circuit breaker is open (or probing, or waiting
/// for the relay), its reads bypass Redis and load the source's older row:
/// a change enqueued now would be in Redis, and other processes would read
/// it, but this process would not read its own write. Refused instead, with
/// nothing enqueued; the caller retries once Redis is back, or writes
/// directly.
fn refuse_while_bypassing(engine: &Engine) -> Result<()> {
    if engine.breaker.is_open() {
        return Err(Error::new(
            ErrorKind::Cache,
            "write-behind refused: this process's circuit breaker keeps its reads off \
             Redis (it failed lately), so they would not see the change; nothing was \
             enqueued",
        ));
    }
    Ok(())
}

/// A synchronous write of one key in progress, announced to the
/// write-behind workers (as a registered writer of the key) before it
/// writes the source: a worker about to commit a pending change of the key
/// holds it until the write has finished and superseded it
/// ([`lease::still_current`]). Without the announcement a flush could land
/// between the write's commit and its invalidation, over the newer row.
/// Dropped without [`SyncWrite::finished`] (the write failed), it
/// unregisters, and the pending change goes ahead.
pub(crate) struct SyncWrite<'a> {
    cache: &'a Cache,
    keys: Keys,
    token: crate::lease::Token,
    finished: bool,
}

/// Announces a synchronous write of `key` that will be followed by its
/// invalidation; `None` when Redis does not answer (the invalidation after
/// the write fails then too, and the workers cannot commit either).
pub(crate) fn announce_sync_write<'a>(
    cache: &'a Cache,
    key: &str,
    ttl: Duration,
) -> Option<SyncWrite<'a>> {
    let keys = Keys::for_value(cache.redis_key(key));
    let token = new_token();
    lease::register_writer(cache, &keys, &token, ttl).ok()?;
    Some(SyncWrite {
        cache,
        keys,
        token,
        finished: false,
    })
}

impl SyncWrite<'_> {
    /// The write committed and its invalidation ran (which removed the
    /// registration with every other writer's).
    pub(crate) fn finished(mut self) {
        self.finished = true;
    }
}

impl Drop for SyncWrite<'_> {
    fn drop(&mut self) {
        if !self.finished {
            // Best effort: the registration expires with its TTL anyway.
            let _ = lease::unregister_writer(self.cache, &self.keys, &self.token);
        }
    }
}

struct Workers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    /// Each thread's finished rounds (`Worker::rounds`), in `threads`' order.
    rounds: Vec<Arc<AtomicU64>>,
    /// Renews the workers' liveness keys until `stop`.
    liveness: Option<JoinHandle<()>>,
    /// The workers' liveness keys, deleted once they have stopped.
    alive_keys: Vec<String>,
    cache: Cache,
}

impl WriteBehind {
    pub fn new(cache: &Cache, config: &Config) -> WriteBehind {
        let streams = Streams::new(cache);
        WriteBehind {
            shared: Arc::new(Shared {
                alive: format!("{}:alive:", streams.base()),
                streams,
                appliers: RwLock::new(Vec::new()),
                max_backlog: config.write_behind_max_backlog,
                batch: config.write_behind_batch as usize,
                claim_after: config.write_behind_claim_after,
                attempts: config.write_behind_attempts,
                backoff: config.write_behind_retry_backoff,
                fail_safe_max: config.fail_safe_max,
                read_timeout: BLOCK + config.cache_timeout,
            }),
            workers: Mutex::new(None),
        }
    }

    /// Registers (or replaces) the applier of keys that start with `prefix`.
    pub fn register(&self, prefix: &str, applier: Applier) -> Result<()> {
        crate::keys::check_tag_safe("a write-behind prefix", prefix)?;
        let mut appliers = self.shared.appliers.write();
        appliers.retain(|(p, _)| p != prefix);
        appliers.push((prefix.to_owned(), applier));
        appliers.sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
        Ok(())
    }

    /// Enqueues a change of `key`; returns its sequence number.
    pub fn enqueue(
        &self,
        engine: &Engine,
        key: &str,
        ttl: Duration,
        json: Json<'_>,
        floor: u64,
    ) -> Result<u64> {
        refuse_while_bypassing(engine)?;
        let size = match json {
            Json::Whole(json) => json.len(),
            Json::Sequenced { head, tail } => head.len() + tail.len() + 16,
        };
        if size > MAX_VALUE_BYTES {
            return Err(Error::invalid_argument(format!(
                "a write-behind value may hold at most {MAX_VALUE_BYTES} bytes of JSON \
                 ({size} given)"
            )));
        }
        if self.shared.applier_for(key).is_none() {
            return Err(Error::invalid_argument(format!(
                "no write-behind applier is registered for key {key:?}"
            )));
        }
        self.enqueue_registered(engine, key, ttl, json, floor)
    }

    /// [`enqueue`](Self::enqueue) without asking for a local applier: for
    /// a change the namespace's workers took before (a dead letter replayed
    /// by an operator's process, which registers none).
    fn enqueue_registered(
        &self,
        engine: &Engine,
        key: &str,
        ttl: Duration,
        json: Json<'_>,
        floor: u64,
    ) -> Result<u64> {
        // A load of the key in flight in this process read the older row:
        // followers that join after this write must not take it.
        engine.note_write(key);
        let keys = engine.cache.keys(key);
        let names = self.shared.streams.for_key(key);
        if let Err(err) = self.shared.streams.register(&engine.cache, key) {
            engine.cache_failed(crate::breaker::Permit::Use, &err);
            return Err(err);
        }
        let stream = lease::Stream {
            key: &names.stream,
            group: GROUP,
            max_backlog: self.shared.max_backlog,
        };
        let expires_at_ms = now_ms().saturating_add(millis(ttl));
        let physical = ttl.saturating_add(self.shared.fail_safe_max);
        let enqueued = lease::write_behind(
            &engine.cache,
            &keys,
            &stream,
            key,
            json,
            floor,
            expires_at_ms,
            ttl,
            physical,
        );
        match enqueued {
            Ok(Enqueued::Taken { seq, .. }) => {
                engine.counters.write_behind_enqueued.bump();
                Ok(seq)
            }
            Ok(Enqueued::BacklogFull) => Err(Error::new(
                ErrorKind::BacklogFull,
                format!(
                    "write-behind backlog is full ({} changes wait for Postgres): \
                     the change was not enqueued",
                    self.shared.max_backlog
                ),
            )),
            Err(err) => {
                engine.cache_failed(crate::breaker::Permit::Use, &err);
                Err(err)
            }
        }
    }

    /// Starts `workers` threads.
    pub fn start(&self, engine: &Engine, workers: u32) -> Result<()> {
        if workers == 0 || workers > MAX_WRITE_BEHIND_WORKERS {
            return Err(Error::invalid_argument(format!(
                "write-behind workers must be between 1 and {MAX_WRITE_BEHIND_WORKERS}"
            )));
        }
        let mut slot = self.workers.lock();
        if slot.is_some() {
            return Err(Error::invalid_argument(
                "write-behind workers already run: stop them first",
            ));
        }
        let mut engine = engine.clone();
        // The workers' statements are the library's, not the application's.
        engine.db = engine.db.uncounted();
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        let mut rounds = Vec::new();
        let mut alive_keys = Vec::new();
        for i in 0..workers {
            let worker = Worker::new(engine.clone(), Arc::clone(&self.shared), Arc::clone(&stop));
            let done = Arc::clone(&worker.rounds);
            let alive_key = format!("{}{}", self.shared.alive, worker.consumer);
            // Alive before it reads anything (best effort: the renewer
            // retries, and a worker taken for dead early only costs a
            // duplicate write, which the sequence guard makes harmless).
            let _ = renew_liveness(&engine.cache, std::slice::from_ref(&alive_key));
            alive_keys.push(alive_key);
            match std::thread::Builder::new()
                .name(format!("cacheaside-write-behind-{i}"))
                .spawn(move || worker.run())
            {
                Ok(thread) => {
                    threads.push(thread);
                    rounds.push(done);
                }
                Err(err) => report!(warn, "cannot start a write-behind worker thread: {err}"),
            }
        }
        if threads.is_empty() {
            let _ = delete_liveness(&engine.cache, &alive_keys);
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                "the system refused every write-behind worker thread",
            ));
        }
        let liveness = {
            let (cache, keys, stop) = (engine.cache.clone(), alive_keys.clone(), Arc::clone(&stop));
            std::thread::Builder::new()
                .name("cacheaside-write-behind-liveness".into())
                .spawn(move || {
                    while !stop.load(Ordering::SeqCst) {
                        if let Err(err) = renew_liveness(&cache, &keys) {
                            report!(
                                debug,
                                "write-behind liveness renewal failed: {}",
                                err.chain()
                            );
                        }
                        let until = Instant::now() + LIVENESS_EVERY;
                        while !stop.load(Ordering::SeqCst) && Instant::now() < until {
                            std::thread::sleep(Duration::from_millis(20));
                        }
                    }
                })
                // Without it the workers' keys expire: others claim their
                // changes early (duplicate writes, harmless), nothing is lost.
                .map_err(|e| report!(warn, "cannot start the write-behind liveness thread: {e}"))
                .ok()
        };
        *slot = Some(Workers {
            stop,
            threads,
            rounds,
            liveness,
            alive_keys,
            cache: engine.cache.clone(),
        });
        Ok(())
    }

    /// Stops the workers and joins them; a no-op when none run.
    pub fn stop(&self) {
        let mut slot = self.workers.lock();
        if let Some(workers) = slot.take() {
            workers.stop.store(true, Ordering::SeqCst);
            for thread in workers.threads {
                let _ = thread.join();
            }
            if let Some(thread) = workers.liveness {
                let _ = thread.join();
            }
            // What they still hold is claimed by others at once, not after
            // the claim timeout.
            let _ = delete_liveness(&workers.cache, &workers.alive_keys);
        }
    }

    /// Worker threads running now.
    pub fn running(&self) -> usize {
        self.workers.lock().as_ref().map_or(0, |w| w.threads.len())
    }

    /// Changes enqueued (by any process) and not yet in Postgres or
    /// dead-lettered, over every stream.
    pub fn pending(&self, cache: &Cache) -> Result<u64> {
        let all = self.shared.streams.all(cache)?;
        let streams: Vec<&str> = all.iter().map(|n| n.stream.as_str()).collect();
        total_length(cache, &streams)
    }

    /// Dead letters kept, over every dead-letter stream.
    pub fn dead_lettered(&self, cache: &Cache) -> Result<u64> {
        let all = self.shared.streams.all(cache)?;
        let streams: Vec<&str> = all.iter().map(|n| n.dead.as_str()).collect();
        total_length(cache, &streams)
    }

    /// Waits (at most until `deadline`) for each of this process's workers
    /// to finish the round it is in. A change leaves its stream inside a
    /// round, and the round adds its counters (applied, dead-lettered) at
    /// its end: after this, a drain's caller reads them whole.
    fn rounds_finished(&self, deadline: Instant) {
        let started: Vec<(Arc<AtomicU64>, u64)> = match self.workers.lock().as_ref() {
            Some(w) => w
                .rounds
                .iter()
                .map(|r| (Arc::clone(r), r.load(Ordering::SeqCst)))
                .collect(),
            None => return,
        };
        // A worker blocked in its read ends the round within BLOCK; a
        // worker thread that is gone never will (the deadline bounds it).
        while Instant::now() < deadline
            && started
                .iter()
                .any(|(r, at)| r.load(Ordering::SeqCst) == *at)
        {
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Waits until every change enqueued before this call has left its
    /// stream (committed, or dead-lettered), at most `timeout`.
    pub fn drain(&self, cache: &Cache, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let all = self.shared.streams.all(cache)?;
        let streams: Vec<&str> = all.iter().map(|n| n.stream.as_str()).collect();
        // Per stream, its newest entry now: drained once its oldest is past it.
        let mut targets: Vec<(&str, StreamId)> = streams
            .iter()
            .zip(edges(cache, &streams, "XREVRANGE", "+", "-")?)
            .filter_map(|(stream, last)| Some((*stream, last?)))
            .collect();
        loop {
            let left: Vec<&str> = targets.iter().map(|(stream, _)| *stream).collect();
            if left.is_empty() {
                self.rounds_finished(deadline);
                return Ok(());
            }
            let firsts = edges(cache, &left, "XRANGE", "-", "+")?;
            targets = targets
                .into_iter()
                .zip(firsts)
                .filter(|((_, target), first)| first.is_some_and(|first| first <= *target))
                .map(|(target, _)| target)
                .collect();
            // Wait on one stream (a round trip a look), then look at all
            // that remain again (in one pipeline): most have drained too.
            let Some(&(stream, target)) = targets.first() else {
                self.rounds_finished(deadline);
                return Ok(());
            };
            loop {
                let now = Instant::now();
                if now >= deadline {
                    return Err(Error::timeout(
                        "waiting for write-behind changes to reach Postgres",
                    ));
                }
                std::thread::sleep(Duration::from_millis(5).min(deadline - now));
                match edges(cache, &[stream], "XRANGE", "-", "+")?.first() {
                    Some(Some(first)) if *first <= target => {}
                    _ => break,
                }
            }
        }
    }

    /// The oldest `count` entries of the dead-letter stream (on a cluster,
    /// of every slot's, oldest first).
    pub fn dead_letters(&self, cache: &Cache, count: usize) -> Result<Vec<DeadLetter>> {
        let mut letters: Vec<(Option<StreamId>, DeadLetter)> = Vec::new();
        let all = self.shared.streams.all(cache)?;
        let dead: Vec<&str> = all.iter().map(|n| n.dead.as_str()).collect();
        let replies = per_stream(cache, &dead, |stream| {
            let mut cmd = redis::cmd("XRANGE");
            cmd.arg(stream)
                .arg("-")
                .arg("+")
                .arg("COUNT")
                .arg(count.max(1));
            cmd
        })?;
        for (names, reply) in all.iter().zip(replies) {
            letters.extend(entries(&reply).into_iter().map(|e| {
                let text = |name: &str| {
                    e.field(name)
                        .map(|v| String::from_utf8_lossy(v).into_owned())
                };
                let letter = DeadLetter {
                    original_id: text("id").unwrap_or_default(),
                    key: text("k"),
                    seq: text("s").and_then(|s| s.parse().ok()),
                    json: text("v"),
                    error: text("error").unwrap_or_default(),
                    attempts: text("attempts").and_then(|a| a.parse().ok()).unwrap_or(0),
                    id: Streams::letter_id(names, &e.id),
                };
                (StreamId::parse(&e.id), letter)
            }));
        }
        letters.sort_by_key(|letter| letter.0);
        letters.truncate(count.max(1));
        Ok(letters.into_iter().map(|(_, letter)| letter).collect())
    }
}

/// The first (or last) entry id of each of `streams`.
fn edges(
    cache: &Cache,
    streams: &[&str],
    cmd: &str,
    from: &str,
    to: &str,
) -> Result<Vec<Option<StreamId>>> {
    let replies = per_stream(cache, streams, |stream| {
        let mut edge = redis::cmd(cmd);
        edge.arg(stream).arg(from).arg(to).arg("COUNT").arg(1);
        edge
    })?;
    Ok(replies
        .iter()
        .map(|reply| entries(reply).first().and_then(|e| StreamId::parse(&e.id)))
        .collect())
}

/// `command(stream)` for each of `streams`, replies in order: on a cluster
/// in one cluster pipeline (a round trip per node; a cluster may have a
/// stream per slot), else one by one.
fn per_stream(
    cache: &Cache,
    streams: &[&str],
    command: impl Fn(&str) -> redis::Cmd,
) -> Result<Vec<Value>> {
    if streams.len() > 1 && cache.is_cluster() {
        let replies: Option<Vec<Value>> = cache.run(|conn| {
            let crate::redis_conn::RedisConnection::Cluster(cluster) = conn else {
                return Ok(None);
            };
            let mut pipe = redis::cluster::cluster_pipe();
            for stream in streams {
                pipe.add_command(command(stream));
            }
            pipe.query(cluster).map(Some)
        })?;
        if let Some(replies) = replies.filter(|r| r.len() == streams.len()) {
            return Ok(replies);
        }
    }
    streams
        .iter()
        .map(|stream| cache.run(|conn| command(stream).query(conn)))
        .collect()
}

impl Drop for WriteBehind {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Shared {
    fn applier_for(&self, key: &str) -> Option<Applier> {
        find(&self.appliers.read(), key)
    }

    /// The wait before a refused write's next attempt (`attempts` made).
    fn retry_backoff(&self, attempts: u32) -> Duration {
        let doubled = self
            .backoff
            .saturating_mul(1 << attempts.saturating_sub(1).min(20));
        doubled.min(self.max_wait())
    }

    /// No wait is longer: a worker renews its claim on what it holds every
    /// `claim_after / 4`, and must look at its held changes as often.
    fn max_wait(&self) -> Duration {
        (self.claim_after / 4).clamp(Duration::from_millis(1), Duration::from_secs(5))
    }
}

fn find(appliers: &[(String, Applier)], key: &str) -> Option<Applier> {
    appliers
        .iter()
        .find(|(prefix, _)| key.starts_with(prefix.as_str()))
        .map(|(_, applier)| Arc::clone(applier))
}

mod dead_letters;
pub use dead_letters::ReplayReport;
mod shards;
use shards::Streams;
mod worker;
use worker::{StreamId, Worker, delete_liveness, entries, renew_liveness};

/// The entries of `streams` together (`XLEN` of each, a pipeline per node).
fn total_length(cache: &Cache, streams: &[&str]) -> Result<u64> {
    let lengths = per_stream(cache, streams, |stream| {
        let mut cmd = redis::cmd("XLEN");
        cmd.arg(stream);
        cmd
    })?;
    Ok(lengths
        .iter()
        .map(|len| redis::from_redis_value_ref::<u64>(len).unwrap_or(0))
        .sum())
}
