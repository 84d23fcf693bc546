//! The write-behind workers: each reads the stream through the consumer
//! group, coalesces the changes of each key, writes them through the
//! registered appliers in one transaction per batch (split by key when the
//! batch fails transiently), acknowledges only after the commit, and claims
//! what dead or slow workers left pending. What they guarantee is stated in
//! [`crate::write_behind`], whose constants and shared state they use.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use redis::{Script, Value};

use crate::cache::Cache;
use crate::engine::Engine;
use crate::entry::now_ms;
use crate::error::{Error, ErrorKind, Result};
use crate::lease::{self, Keys, Settled, Verdict, new_token};
use crate::observe::report;
use crate::pool::Conn;
use crate::redis_conn::{RedisConnector, millis};

use super::shards::{REFRESH_EVERY, StreamNames};
use super::{
    ACK_CHUNK, Applier, BLOCK, DEAD_LETTER_CAP, DEAD_VALUE_BYTES, GROUP, LIVENESS_EVERY,
    LIVENESS_TTL, MAX_ENTRY_FIELDS, MAX_SEQ, MAX_VALUE_BYTES, Shared, WriteBehindChange,
};

mod streams;

/// On a cluster a worker polls its streams (one `XREADGROUP` cannot name
/// streams of several slots, and a blocking read of one would starve the
/// others): when a round found nothing, it waits at most this long.
const POLL_IDLE: Duration = Duration::from_millis(50);

/// A stream entry id, `<ms>-<n>`, ordered as Redis orders them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct StreamId(u64, u64);

impl StreamId {
    pub(super) fn parse(id: &str) -> Option<StreamId> {
        let (ms, n) = id.split_once('-')?;
        Some(StreamId(ms.parse().ok()?, n.parse().ok()?))
    }
}

/// One stream entry as Redis returned it.
pub(super) struct RawEntry {
    pub(super) id: String,
    fields: Vec<(Vec<u8>, Vec<u8>)>,
}

impl RawEntry {
    pub(super) fn field(&self, name: &str) -> Option<&[u8]> {
        self.fields
            .iter()
            .find(|(f, _)| f == name.as_bytes())
            .map(|(_, v)| v.as_slice())
    }
}

/// The entries of a reply that is, or holds, a list of `[id, [f, v, ...]]`
/// (`XRANGE`; `XAUTOCLAIM`'s second element; `XREADGROUP`'s streams).
pub(super) fn entries(reply: &Value) -> Vec<RawEntry> {
    let Value::Array(items) = reply else {
        return Vec::new();
    };
    items
        .iter()
        .filter_map(|item| {
            let Value::Array(pair) = item else {
                return None;
            };
            let [Value::BulkString(id), fields] = pair.as_slice() else {
                return None;
            };
            let fields = match fields {
                Value::Array(flat) => flat
                    .chunks(2)
                    .filter_map(|kv| match kv {
                        [Value::BulkString(f), Value::BulkString(v)] => {
                            Some((f.clone(), v.clone()))
                        }
                        _ => None,
                    })
                    .collect(),
                _ => Vec::new(),
            };
            Some(RawEntry {
                id: String::from_utf8_lossy(id).into_owned(),
                fields,
            })
        })
        .collect()
}

/// The entries of an `XREADGROUP` reply (one stream, or nil).
fn read_entries(reply: &Value) -> Vec<RawEntry> {
    match reply {
        Value::Array(streams) => streams
            .iter()
            .flat_map(|stream| match stream {
                Value::Array(pair) if pair.len() == 2 => entries(&pair[1]),
                _ => Vec::new(),
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// A change as a worker holds it.
#[derive(Debug, Clone)]
struct Change {
    id: String,
    key: String,
    seq: u64,
    json: Vec<u8>,
}

impl Change {
    /// Parses an entry; `Err` says why it is poison.
    pub(super) fn parse(raw: &RawEntry) -> std::result::Result<Change, String> {
        if raw.fields.len() > MAX_ENTRY_FIELDS {
            return Err(format!(
                "unparseable: {} fields (an enqueue writes 3)",
                raw.fields.len()
            ));
        }
        let text = |name: &str| {
            raw.field(name)
                .ok_or_else(|| format!("unparseable: no field {name:?}"))
        };
        let key = std::str::from_utf8(text("k")?)
            .map_err(|_| "unparseable: the key is not UTF-8".to_owned())?;
        if crate::cache::check_key(key).is_err() {
            return Err("unparseable: not a cache key".into());
        }
        let seq: u64 = std::str::from_utf8(text("s")?)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| "unparseable: the sequence number is not a number".to_owned())?;
        if seq > MAX_SEQ {
            return Err(format!(
                "unparseable: the sequence number is beyond {MAX_SEQ}"
            ));
        }
        let json = text("v")?;
        if json.len() > MAX_VALUE_BYTES {
            return Err(format!(
                "unparseable: the value is larger than {MAX_VALUE_BYTES} bytes"
            ));
        }
        if let Err(err) = serde_json::from_slice::<serde::de::IgnoredAny>(json) {
            return Err(format!("unparseable: the value is not JSON: {err}"));
        }
        Ok(Change {
            id: raw.id.clone(),
            key: key.to_owned(),
            seq,
            json: json.to_vec(),
        })
    }

    /// Redis's clock (ms) when it was enqueued: its id's first part.
    fn enqueued_ms(&self) -> Option<u64> {
        StreamId::parse(&self.id).map(|id| id.0)
    }
}

/// One key's changes in a worker's hands: the newest is written, the older
/// ones (their ids) are acknowledged with it.
#[derive(Debug)]
struct KeyBatch {
    newest: Change,
    /// Refused writes of `newest` so far.
    attempts: u32,
    /// Its write failed transiently inside a transaction (a row lock held
    /// elsewhere): it is written in a transaction of its own until it lands.
    alone: bool,
    older: Vec<String>,
}

impl KeyBatch {
    pub(super) fn new(change: Change) -> KeyBatch {
        KeyBatch {
            newest: change,
            attempts: 0,
            alone: false,
            older: Vec::new(),
        }
    }

    /// Folds `other` (of the same key) in: the newer change is kept.
    fn merge(&mut self, other: KeyBatch) {
        let KeyBatch {
            newest,
            attempts,
            alone,
            older,
        } = other;
        // The row it failed on is the same row, whichever change is newer.
        self.alone |= alone;
        for id in older {
            self.add_older(id);
        }
        if newest.id == self.newest.id {
            return;
        }
        if newest.seq > self.newest.seq {
            let was = std::mem::replace(&mut self.newest, newest);
            self.attempts = attempts;
            self.add_older(was.id);
        } else {
            self.add_older(newest.id);
        }
    }

    fn add_older(&mut self, id: String) {
        if id != self.newest.id {
            self.older.push(id);
        }
    }

    /// Drops ids delivered twice (a claim and a read may overlap), once the
    /// batch is complete: linear merging, then one sort.
    fn dedup(&mut self) {
        self.older.sort_unstable();
        self.older.dedup();
        let newest = &self.newest.id;
        self.older.retain(|id| id != newest);
    }

    fn ids(&self) -> impl Iterator<Item = &String> {
        std::iter::once(&self.newest.id).chain(&self.older)
    }

    fn len(&self) -> usize {
        1 + self.older.len()
    }
}

/// A key's changes waiting for their next attempt.
struct Held {
    batch: KeyBatch,
    due: Instant,
}

/// One stream as a worker reads it.
struct StreamState {
    names: StreamNames,
    /// Its consumer group exists (the first enqueue creates both).
    ready: bool,
    claim_cursor: String,
}

/// Entries read from a stream that do not parse, with why and where from.
type Poison = Vec<(RawEntry, String, StreamNames)>;

/// One worker thread.
pub(super) struct Worker {
    engine: Engine,
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
    /// Rounds this worker has finished, counters included: see
    /// `WriteBehind::drain`.
    pub(super) rounds: Arc<AtomicU64>,
    pub(super) consumer: String,
    /// The connection the blocking reads use, opened on demand and dropped
    /// after any error on it.
    conn: Option<Conn<RedisConnector>>,
    /// The namespace's streams (one on a single server), refreshed every
    /// [`REFRESH_EVERY`].
    streams: Vec<StreamState>,
    next_refresh: Instant,
    /// Where the next poll of the streams starts (cluster), so a busy
    /// stream does not starve the others.
    read_from: usize,
    held: Vec<Held>,
    next_claim: Instant,
    next_dead_check: Instant,
    next_touch: Instant,
    next_sweep: Instant,
    /// The wait before retrying after an outage; doubles while it lasts.
    outage_backoff: Duration,
}

impl Worker {
    pub(super) fn new(engine: Engine, shared: Arc<Shared>, stop: Arc<AtomicBool>) -> Worker {
        let now = Instant::now();
        Worker {
            engine,
            rounds: Arc::default(),
            consumer: format!("worker-{}", new_token()),
            conn: None,
            streams: Vec::new(),
            next_refresh: now,
            // Workers start their sweeps apart.
            read_from: fastrand::usize(..1 << 16),
            held: Vec::new(),
            next_claim: now,
            next_dead_check: now,
            next_touch: now,
            next_sweep: now + shared.claim_after * 10,
            outage_backoff: Duration::ZERO,
            shared,
            stop,
        }
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    pub(super) fn run(mut self) {
        let mut pause = Duration::from_millis(20);
        while !self.stopping() {
            let outcome = self.round();
            self.rounds.fetch_add(1, Ordering::SeqCst);
            match outcome {
                Ok(()) => pause = Duration::from_millis(20),
                Err(err) => {
                    report!(debug, "write-behind worker (retrying): {}", err.chain());
                    self.conn = None;
                    self.sleep(pause);
                    pause = (pause * 2).min(self.shared.max_wait().max(BLOCK));
                }
            }
        }
        self.leave();
    }

    /// Sleeps up to `total`, waking early when stopped.
    fn sleep(&self, total: Duration) {
        let until = Instant::now() + total;
        while !self.stopping() {
            let now = Instant::now();
            if now >= until {
                return;
            }
            std::thread::sleep((until - now).min(Duration::from_millis(20)));
        }
    }

    /// Entries held (waiting for a retry).
    fn held_entries(&self) -> usize {
        self.held.iter().map(|h| h.batch.len()).sum()
    }

    /// One round: renew claims on held changes, take the due ones, claim
    /// abandoned ones, read new ones, and flush what it has.
    fn round(&mut self) -> Result<()> {
        if Instant::now() >= self.next_refresh {
            self.refresh_streams()?;
            self.next_refresh = Instant::now() + REFRESH_EVERY;
        }
        let waiting: Vec<usize> = (0..self.streams.len())
            .filter(|i| !self.streams[*i].ready)
            .collect();
        if self.shared.streams.sharded() && waiting.len() > 1 {
            self.find_groups(&waiting)?;
        } else {
            for i in waiting {
                self.ensure_group(i)?;
            }
        }
        if !self.streams.iter().any(|s| s.ready) {
            // Nothing was ever enqueued in this namespace.
            self.sleep(BLOCK);
            return Ok(());
        }
        let now = Instant::now();
        if !self.held.is_empty() && now >= self.next_touch {
            self.touch()?;
            self.next_touch = now + self.shared.max_wait();
        }
        if now >= self.next_sweep {
            self.sweep_consumers();
            self.next_sweep = now + self.shared.claim_after * 10;
        }
        let mut batch: Vec<KeyBatch> = Vec::new();
        let mut poison: Poison = Vec::new();
        let mut i = 0;
        while i < self.held.len() {
            if self.held[i].due <= now {
                batch.push(self.held.swap_remove(i).batch);
            } else {
                i += 1;
            }
        }
        let mut room = self
            .shared
            .batch
            .saturating_sub(self.held_entries() + batch.len());
        // What this worker claimed from others joins the batch, counted.
        let counters = Arc::clone(&self.engine.counters);
        let shared = Arc::clone(&self.shared);
        let mut take = |claimed: Vec<RawEntry>, from: &StreamNames, room: &mut usize| {
            counters.write_behind_claimed.add(claimed.len() as u64);
            *room = room.saturating_sub(claimed.len());
            sort(&shared, claimed, from, &mut batch, &mut poison);
        };
        let ready: Vec<usize> = (0..self.streams.len())
            .filter(|i| self.streams[*i].ready)
            .collect();
        if room > 0 && now >= self.next_claim {
            if self.shared.streams.sharded() {
                for (names, claimed) in self.claim_all(&ready, room)? {
                    take(claimed, &names, &mut room);
                }
            } else {
                for &i in &ready {
                    if room > 0 {
                        let names = self.streams[i].names.clone();
                        take(self.claim(i, room)?, &names, &mut room);
                    }
                }
            }
            self.next_claim = now + self.shared.max_wait();
        }
        if room > 0 && now >= self.next_dead_check {
            for (names, claimed) in self.claim_from_dead(&ready, room)? {
                take(claimed, &names, &mut room);
            }
            self.next_dead_check = now + LIVENESS_EVERY;
        }
        let idle = batch.is_empty() && poison.is_empty();
        if room > 0 && !self.shared.streams.sharded() {
            // One stream: a blocking read waits for the next change.
            let block = idle.then(|| self.idle_wait(now));
            let names = self.streams[ready[0]].names.clone();
            let read = self.read(ready[0], room, block)?;
            sort(&self.shared, read, &names, &mut batch, &mut poison);
        } else if room > 0 {
            // A stream per slot: up to `room` of them polled at once (one
            // round trip per node), from a rotating start, so the entries
            // read stay within `room` and every stream gets its turn. A
            // window that held nothing (another worker just read it) moves
            // on to the next, until one sweep of all.
            let mut swept = 0;
            while swept < ready.len() {
                let take = (ready.len() - swept).min(room);
                let window: Vec<usize> = (0..take)
                    .map(|n| ready[(self.read_from + n) % ready.len()])
                    .collect();
                self.read_from = (self.read_from + take) % ready.len();
                swept += take;
                for (i, read) in self.poll(&window, room / take)? {
                    let names = self.streams[i].names.clone();
                    sort(&self.shared, read, &names, &mut batch, &mut poison);
                }
                if !batch.is_empty() || !poison.is_empty() {
                    break;
                }
            }
            if batch.is_empty() && poison.is_empty() {
                self.sleep(self.idle_wait(now).min(POLL_IDLE));
            }
        } else if batch.is_empty() {
            // Full of changes that wait for their retry.
            self.sleep(self.idle_wait(now));
        }
        for (raw, why, names) in poison {
            self.dead_letter_raw(&raw, &why, 0, &names)?;
        }
        if !batch.is_empty() {
            self.process(batch);
        }
        Ok(())
    }

    /// How long an idle worker may wait: until the next held change is due
    /// or the next claim, at most [`BLOCK`].
    fn idle_wait(&self, now: Instant) -> Duration {
        let mut until = now + BLOCK;
        for held in &self.held {
            until = until.min(held.due);
        }
        until = until.min(self.next_claim.max(now));
        until
            .saturating_duration_since(now)
            .max(Duration::from_millis(1))
    }

    /// Coalesces a batch per key (folding in held changes of the same keys)
    /// and writes each applier's share in one transaction.
    fn process(&mut self, batch: Vec<KeyBatch>) {
        let mut by_key: HashMap<String, KeyBatch> = HashMap::new();
        for kb in batch {
            match by_key.get_mut(&kb.newest.key) {
                Some(have) => have.merge(kb),
                None => {
                    by_key.insert(kb.newest.key.clone(), kb);
                }
            }
        }
        let mut i = 0;
        while i < self.held.len() {
            if let Some(have) = by_key.get_mut(&self.held[i].batch.newest.key) {
                have.merge(self.held.swap_remove(i).batch);
            } else {
                i += 1;
            }
        }
        for kb in by_key.values_mut() {
            kb.dedup();
        }
        let appliers = self.shared.appliers.read().clone();
        let mut groups: Vec<Vec<KeyBatch>> = appliers.iter().map(|_| Vec::new()).collect();
        for kb in by_key.into_values() {
            let at = appliers
                .iter()
                .position(|(prefix, _)| kb.newest.key.starts_with(prefix.as_str()));
            match at {
                Some(at) => groups[at].push(kb),
                None => {
                    let why = "no write-behind applier is registered for this key in the \
                               worker's process";
                    self.dead(kb, why);
                }
            }
        }
        // A key whose write timed out alone before (a row lock another
        // session holds) is written alone again, so it holds up nobody.
        let mut outage: Option<Error> = None;
        for ((_, applier), group) in appliers.iter().zip(groups) {
            let (alone, together): (Vec<KeyBatch>, Vec<KeyBatch>) =
                group.into_iter().partition(|kb| kb.alone);
            let parts = std::iter::once(together).chain(alone.into_iter().map(|kb| vec![kb]));
            for part in parts.filter(|part| !part.is_empty()) {
                match &outage {
                    // Postgres is unreachable: the rest wait without trying.
                    Some(err) => {
                        let err = err.clone();
                        self.wait_out(part, &err);
                    }
                    None => outage = self.flush(applier, part),
                }
            }
        }
    }

    /// Writes one applier's changes in one transaction; on a refusal, or a
    /// transient failure inside the transaction (a statement timeout on a
    /// row another session keeps locked, a deadlock), writes them one by
    /// one, so only the change that fails waits. Returns the error when
    /// Postgres could not be reached at all (nothing else is worth trying
    /// this round).
    fn flush(&mut self, applier: &Applier, group: Vec<KeyBatch>) -> Option<Error> {
        // Set once the transaction began: a failure after that is the
        // statements', not the connection's.
        let mut began = false;
        // Set when a change turned out superseded, or Redis could not say:
        // the transaction was rolled back for it.
        let mut verdicts: Option<Vec<Verdict>> = None;
        let mut redis_down: Option<Error> = None;
        let outcome = {
            let changes: Vec<WriteBehindChange<'_>> = group
                .iter()
                .map(|kb| WriteBehindChange {
                    key: &kb.newest.key,
                    json: &kb.newest.json,
                    seq: kb.newest.seq,
                })
                .collect();
            let cache = &self.engine.cache;
            let checks: Vec<(Keys, u64)> = group
                .iter()
                .map(|kb| {
                    (
                        Keys::for_value(cache.redis_key(&kb.newest.key)),
                        kb.newest.seq,
                    )
                })
                .collect();
            self.engine.db.transaction(|tx| {
                began = true;
                std::panic::catch_unwind(AssertUnwindSafe(|| applier(tx, &changes)))
                    .unwrap_or_else(|_| {
                        Err(Error::new(
                            ErrorKind::Panicked,
                            "the write-behind applier panicked",
                        ))
                    })?;
                // The row locks are ours now: a synchronous write that
                // registers from here on waits for our commit, and one that
                // registered or superseded before shows here.
                match lease::still_current(cache, &checks) {
                    Ok(v) if v.iter().all(|v| *v == Verdict::Apply) => Ok(()),
                    Ok(v) => {
                        verdicts = Some(v);
                        Err(Error::new(
                            ErrorKind::Cache,
                            "write-behind change superseded",
                        ))
                    }
                    Err(err) => {
                        redis_down = Some(err.clone());
                        Err(err)
                    }
                }
            })
        };
        if let Some(err) = redis_down {
            self.wait_out(group, &err);
            return Some(err);
        }
        if let Some(verdicts) = verdicts {
            return self.superseded(applier, group, verdicts);
        }
        match outcome {
            Ok(()) => {
                self.outage_backoff = Duration::ZERO;
                self.committed(group);
            }
            Err(err) if transient(&err) && !began => {
                self.wait_out(group, &err);
                return Some(err);
            }
            Err(err) if transient(&err) && group.len() == 1 => {
                let mut group = group;
                for kb in &mut group {
                    kb.alone = true;
                }
                self.wait_out(group, &err);
            }
            Err(err) => {
                if group.len() > 1 {
                    let mut rest = group.into_iter();
                    while let Some(kb) = rest.next() {
                        if let Some(err) = self.flush(applier, vec![kb]) {
                            let rest: Vec<KeyBatch> = rest.collect();
                            if !rest.is_empty() {
                                self.wait_out(rest, &err);
                            }
                            return Some(err);
                        }
                    }
                    return None;
                }
                let mut kb = group.into_iter().next()?;
                kb.attempts += 1;
                if kb.attempts >= self.shared.attempts {
                    let why = err.chain();
                    self.dead(kb, &why);
                } else {
                    self.engine.counters.write_behind_retried.bump();
                    report!(
                        debug,
                        "write-behind write of {:?} refused (attempt {}): {}",
                        kb.newest.key,
                        kb.attempts,
                        err.chain()
                    );
                    let due = Instant::now() + self.shared.retry_backoff(kb.attempts);
                    self.held.push(Held { batch: kb, due });
                }
            }
        }
        None
    }

    /// After a rollback because some changes of `group` were no longer
    /// current: the superseded ones are acknowledged unwritten, those whose
    /// key a synchronous writer is writing wait for it, and the rest are
    /// written again.
    fn superseded(
        &mut self,
        applier: &Applier,
        group: Vec<KeyBatch>,
        verdicts: Vec<Verdict>,
    ) -> Option<Error> {
        let (mut again, mut skip) = (Vec::new(), Vec::new());
        let due = Instant::now() + self.shared.backoff.min(self.shared.max_wait());
        for (kb, verdict) in group.into_iter().zip(verdicts) {
            match verdict {
                Verdict::Apply => again.push(kb),
                Verdict::Skip => skip.push(kb),
                Verdict::Wait => {
                    self.engine.counters.write_behind_retried.bump();
                    self.held.push(Held { batch: kb, due });
                }
            }
        }
        if !skip.is_empty() {
            let ids: usize = skip.iter().map(KeyBatch::len).sum();
            match self.ack_batches(&skip) {
                Ok(()) => self.engine.counters.write_behind_coalesced.add(ids as u64),
                Err(err) => self.wait_out(skip, &err),
            }
        }
        if again.is_empty() {
            None
        } else {
            self.flush(applier, again)
        }
    }

    /// Holds changes through an outage (Postgres or Redis unreachable):
    /// retried after a growing wait, without counting attempts.
    fn wait_out(&mut self, group: Vec<KeyBatch>, err: &Error) {
        report!(
            debug,
            "write-behind: {} changes wait for an outage to end: {}",
            group.len(),
            err.chain()
        );
        self.outage_backoff = (self.outage_backoff * 2)
            .max(Duration::from_millis(50))
            .min(self.shared.max_wait());
        let due = Instant::now() + self.outage_backoff;
        for kb in group {
            self.engine.counters.write_behind_retried.bump();
            self.held.push(Held { batch: kb, due });
        }
    }

    /// After the commit: the pending records go (and the cached values, so
    /// readers load the committed rows), then the entries leave the stream.
    /// If Redis fails here, the changes are held and written again (a no-op
    /// by the sequence guard) until it answers.
    fn committed(&mut self, group: Vec<KeyBatch>) {
        #[cfg(feature = "test-hooks")]
        for kb in &group {
            self.engine.hooks.after_write_behind_commit(&kb.newest.key);
        }
        let cache = &self.engine.cache;
        let settles: Vec<(Keys, u64)> = group
            .iter()
            .map(|kb| (cache.keys(&kb.newest.key), kb.newest.seq))
            .collect();
        // A replica may not have the commit yet: fence it (a sequence
        // number is not the row's version, so closed).
        let fenced = self
            .engine
            .raise_fences(settles.iter().map(|(k, _)| (k, None)));
        if let Err(err) = fenced.and_then(|()| lease::settle(cache, &settles, Settled::Applied)) {
            return self.wait_out(group, &err);
        }
        if let Err(err) = self.ack_batches(&group) {
            return self.wait_out(group, &err);
        }
        let counters = &self.engine.counters;
        let coalesced: usize = group.iter().map(|kb| kb.older.len()).sum();
        counters.write_behind_applied.add(group.len() as u64);
        counters.write_behind_coalesced.add(coalesced as u64);
        let oldest = group
            .iter()
            .flat_map(|kb| kb.ids())
            .filter_map(|id| StreamId::parse(id).map(|id| id.0))
            .min();
        if let Some(oldest) =
            oldest.or_else(|| group.first().and_then(|kb| kb.newest.enqueued_ms()))
        {
            counters
                .write_behind_lag_ms
                .set(now_ms().saturating_sub(oldest));
        }
    }

    /// Gives up on a key's newest change: its cache entry is invalidated
    /// (unless a newer change is pending), it moves to the dead-letter
    /// stream with `why`, and the older changes it superseded are
    /// acknowledged. If Redis fails, it is held and tried again.
    fn dead(&mut self, kb: KeyBatch, why: &str) {
        let cache = &self.engine.cache;
        let keys = cache.keys(&kb.newest.key);
        let names = self.shared.streams.for_key(&kb.newest.key);
        let moved = lease::settle(cache, &[(keys, kb.newest.seq)], Settled::Dead).and_then(|()| {
            let fields: Vec<(&str, Vec<u8>)> = vec![
                ("k", kb.newest.key.as_bytes().to_vec()),
                ("s", kb.newest.seq.to_string().into_bytes()),
                ("v", kb.newest.json.clone()),
            ];
            self.dead_letter(&names, &kb.newest.id, why, kb.attempts, &fields)
        });
        let moved = moved.and_then(|()| self.ack(&names.stream, &kb.older));
        if let Err(err) = moved {
            let due = Instant::now() + self.shared.max_wait();
            report!(
                debug,
                "write-behind: dead-lettering failed (retried): {}",
                err.chain()
            );
            self.held.push(Held { batch: kb, due });
        }
    }

    /// Moves an entry that does not parse to the dead-letter stream: its
    /// `k`, `s` and `v` fields (the value cut to [`DEAD_VALUE_BYTES`]), not
    /// whatever else it holds (an entry may have been forged with thousands
    /// of fields, which would break the script).
    fn dead_letter_raw(
        &self,
        raw: &RawEntry,
        why: &str,
        attempts: u32,
        names: &StreamNames,
    ) -> Result<()> {
        let fields: Vec<(&str, Vec<u8>)> = ["k", "s", "v"]
            .into_iter()
            .filter_map(|name| {
                let value = raw.field(name)?;
                Some((name, value[..value.len().min(DEAD_VALUE_BYTES)].to_vec()))
            })
            .collect();
        report!(warn, "write-behind: entry {} is poison: {why}", raw.id);
        self.dead_letter(names, &raw.id, why, attempts, &fields)
    }

    /// The dead-letter script: acknowledges `id` and, if it was still
    /// pending (not already done by someone), appends it with `why` to the
    /// dead-letter stream; deletes it from the stream.
    fn dead_letter(
        &self,
        names: &StreamNames,
        id: &str,
        why: &str,
        attempts: u32,
        fields: &[(&str, Vec<u8>)],
    ) -> Result<()> {
        let moved: i64 = self.engine.cache.run(|conn| {
            let mut call = STREAM_SCRIPTS.dead_letter.key(&names.stream);
            call.key(&names.dead)
                .arg(GROUP)
                .arg(DEAD_LETTER_CAP)
                .arg(id)
                .arg(why)
                .arg(attempts);
            for (field, value) in fields {
                call.arg(*field).arg(value.as_slice());
            }
            call.invoke(conn)
        })?;
        if moved == 1 {
            self.engine.counters.write_behind_dead_lettered.bump();
        }
        Ok(())
    }

    /// Acknowledges every change of `batches`, each on its key's stream.
    fn ack_batches(&self, batches: &[KeyBatch]) -> Result<()> {
        self.ack_keys(
            batches
                .iter()
                .flat_map(|kb| kb.ids().map(|id| (kb.newest.key.as_str(), id))),
        )
    }

    /// Acknowledges `(key, id)` pairs, grouped by the keys' streams.
    fn ack_keys<'a>(&self, ids: impl IntoIterator<Item = (&'a str, &'a String)>) -> Result<()> {
        let mut by_stream: HashMap<String, Vec<String>> = HashMap::new();
        for (key, id) in ids {
            let stream = self.shared.streams.for_key(key).stream;
            by_stream.entry(stream).or_default().push(id.clone());
        }
        if self.shared.streams.sharded() {
            // A stream per slot: every stream's acknowledgement in one
            // cluster pipeline.
            let calls: Vec<(Vec<&str>, Vec<String>)> = by_stream
                .iter()
                .flat_map(|(stream, ids)| {
                    ids.chunks(ACK_CHUNK).map(move |chunk| {
                        let args = std::iter::once(GROUP.to_owned())
                            .chain(chunk.iter().cloned())
                            .collect();
                        (vec![stream.as_str()], args)
                    })
                })
                .collect();
            lease::cluster_calls::<i64>(&self.engine.cache, &STREAM_SCRIPTS.ack, &calls)?;
            return Ok(());
        }
        for (stream, ids) in &by_stream {
            self.ack(stream, ids)?;
        }
        Ok(())
    }

    /// Acknowledges entries and deletes them from `stream`, so the stream
    /// holds exactly the changes not yet done.
    fn ack(&self, stream: &str, ids: &[String]) -> Result<()> {
        for chunk in ids.chunks(ACK_CHUNK) {
            self.engine.cache.run(|conn| {
                STREAM_SCRIPTS
                    .ack
                    .key(stream)
                    .arg(GROUP)
                    .arg(chunk)
                    .invoke::<i64>(conn)
            })?;
        }
        Ok(())
    }
}

/// Sets (or renews) liveness keys for [`LIVENESS_TTL`], in one round trip.
pub(super) fn renew_liveness(cache: &Cache, keys: &[String]) -> Result<()> {
    cache.run(|conn| {
        let mut pipe = redis::pipe();
        for key in keys {
            pipe.cmd("SET")
                .arg(key)
                .arg(1)
                .arg("PX")
                .arg(millis(LIVENESS_TTL))
                .ignore();
        }
        pipe.query::<()>(conn)
    })
}

pub(super) fn delete_liveness(cache: &Cache, keys: &[String]) -> Result<()> {
    if keys.is_empty() {
        return Ok(());
    }
    cache.run(|conn| redis::cmd("DEL").arg(keys).query::<i64>(conn))?;
    Ok(())
}

/// The consumers of an `XPENDING` summary reply that hold changes, with
/// how many.
fn pending_consumers(summary: &Value) -> Vec<(String, u64)> {
    let Value::Array(parts) = summary else {
        return Vec::new();
    };
    let Some(Value::Array(consumers)) = parts.get(3) else {
        return Vec::new();
    };
    consumers
        .iter()
        .filter_map(|c| match c {
            Value::Array(pair) => match pair.as_slice() {
                [Value::BulkString(name), Value::BulkString(n)] => Some((
                    String::from_utf8_lossy(name).into_owned(),
                    std::str::from_utf8(n).ok()?.parse().ok()?,
                )),
                [Value::BulkString(name), Value::Int(n)] => Some((
                    String::from_utf8_lossy(name).into_owned(),
                    u64::try_from(*n).ok()?,
                )),
                _ => None,
            },
            _ => None,
        })
        .filter(|(_, n)| *n > 0)
        .collect()
}

/// Sorts entries read from the stream `from` into changes (as key batches)
/// and poison. A change found in another stream than its key's (a forged
/// entry, on a cluster) is poison too: its acknowledgement would go to its
/// key's stream, and it would stay pending for ever.
fn sort(
    shared: &Shared,
    raw: Vec<RawEntry>,
    from: &StreamNames,
    batch: &mut Vec<KeyBatch>,
    poison: &mut Poison,
) {
    for entry in raw {
        match Change::parse(&entry) {
            Ok(change) if shared.streams.for_key(&change.key).stream == from.stream => {
                batch.push(KeyBatch::new(change));
            }
            Ok(_) => poison.push((
                entry,
                "unparseable: the key belongs to another slot's stream".into(),
                from.clone(),
            )),
            Err(why) => poison.push((entry, why, from.clone())),
        }
    }
}

/// True for a failure that says nothing about the change: Postgres could
/// not be reached, timed out, or asks for a retry (SQLSTATE classes 08
/// connection, 40 transaction rollback, 53 resources, 57 operator
/// intervention, 58 system error); also a Redis outage after the commit.
/// Such a change waits; it does not use up its attempts.
fn transient(err: &Error) -> bool {
    if err.is_timeout() || err.is_outage() {
        return true;
    }
    match err.kind() {
        ErrorKind::Database => {}
        ErrorKind::Cache => return true,
        _ => return false,
    }
    if let Some(pg) = err.postgres() {
        return match pg.code() {
            None => true,
            Some(code) => ["08", "40", "53", "57", "58"]
                .iter()
                .any(|class| code.code().starts_with(class)),
        };
    }
    // A database error with no server answer behind it: no connection.
    true
}

/// The scripts that touch only the streams (one slot: `write_behind`), so
/// they live here rather than with the cache keys' scripts in
/// [`crate::lease`].
struct StreamScripts {
    ack: Script,
    dead_letter: Script,
}

static STREAM_SCRIPTS: once_cell::sync::Lazy<StreamScripts> =
    once_cell::sync::Lazy::new(|| StreamScripts {
        // KEYS: stream. ARGV: group, ids...
        ack: Script::new(
            r"
        redis.call('XACK', KEYS[1], ARGV[1], unpack(ARGV, 2))
        return redis.call('XDEL', KEYS[1], unpack(ARGV, 2))
        ",
        ),
        // KEYS: stream, dead. ARGV: group, cap, id, error, attempts, then
        // the entry's fields and values. Gated on the acknowledgement, so a
        // change finished elsewhere (or a second run of this script) is not
        // dead-lettered twice.
        dead_letter: Script::new(
            r"
        local acked = redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
        if acked == 1 then
          local fields = {'id', ARGV[3], 'error', ARGV[4], 'attempts', ARGV[5]}
          for i = 6, #ARGV do fields[#fields + 1] = ARGV[i] end
          redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', unpack(fields))
        end
        redis.call('XDEL', KEYS[1], ARGV[3])
        return acked
        ",
        ),
    });

#[cfg(test)]
mod tests {
    use super::*;

    fn change(id: &str, seq: u64) -> Change {
        Change {
            id: id.into(),
            key: "k".into(),
            seq,
            json: b"1".to_vec(),
        }
    }

    #[test]
    fn stream_ids_order_as_redis_does() {
        let a = StreamId::parse("1700000000000-5").unwrap();
        let b = StreamId::parse("1700000000000-12").unwrap();
        let c = StreamId::parse("1700000000001-0").unwrap();
        assert!(a < b && b < c);
        assert_eq!(StreamId::parse("nope"), None);
    }

    #[test]
    fn a_key_batch_keeps_the_newest_and_acknowledges_the_rest() {
        let mut kb = KeyBatch::new(change("1-0", 10));
        kb.merge(KeyBatch::new(change("3-0", 30)));
        kb.merge(KeyBatch::new(change("2-0", 20)));
        kb.merge(KeyBatch::new(change("3-0", 30))); // delivered twice
        kb.merge(KeyBatch::new(change("2-0", 20))); // this one too
        kb.dedup();
        assert_eq!(kb.newest.id, "3-0");
        let mut older = kb.older.clone();
        older.sort();
        assert_eq!(older, ["1-0", "2-0"]);
        assert_eq!(kb.len(), 3);
    }

    #[test]
    fn a_newer_change_resets_the_attempts() {
        let mut failing = KeyBatch::new(change("1-0", 10));
        failing.attempts = 3;
        let mut kb = KeyBatch::new(change("2-0", 20));
        kb.merge(failing);
        assert_eq!((kb.newest.seq, kb.attempts), (20, 0));
    }

    #[test]
    fn poison_is_told_apart() {
        let entry = |fields: &[(&str, &str)]| RawEntry {
            id: "1-0".into(),
            fields: fields
                .iter()
                .map(|(f, v)| (f.as_bytes().to_vec(), v.as_bytes().to_vec()))
                .collect(),
        };
        assert!(Change::parse(&entry(&[("k", "a"), ("s", "7"), ("v", "{}")])).is_ok());
        for bad in [
            entry(&[("s", "7"), ("v", "{}")]),
            entry(&[("k", "a"), ("s", "x"), ("v", "{}")]),
            entry(&[("k", "a"), ("s", "7"), ("v", "{oops")]),
            entry(&[("k", ""), ("s", "7"), ("v", "1")]),
            entry(&[("k", "a{b}"), ("s", "7"), ("v", "1")]),
            entry(&[("k", "a"), ("s", "9223372036854775807"), ("v", "1")]),
            entry(&[("k", "a"), ("s", "9007199254740992"), ("v", "1")]),
            entry(
                &[("k", "a"), ("s", "7"), ("v", "1")]
                    .into_iter()
                    .chain(std::iter::repeat_n(("x", "y"), MAX_ENTRY_FIELDS))
                    .collect::<Vec<_>>(),
            ),
        ] {
            assert!(Change::parse(&bad).is_err());
        }
    }

    #[test]
    fn transient_failures_are_told_from_refusals() {
        assert!(transient(&Error::timeout("statement")));
        assert!(transient(&Error::new(
            ErrorKind::Database,
            "cannot connect"
        )));
        assert!(!transient(&Error::invalid_argument("bad value")));
        assert!(!transient(&Error::loader(std::io::Error::other("refused"))));
    }
}
