//! Many keys at once: the algorithm behind
//! [`CacheAside::get_or_load_many`](crate::CacheAside::get_or_load_many)
//! and [`CacheAside::invalidate_many`](crate::CacheAside::invalidate_many).
//!
//! A batch read is the single-key read ([`crate::engine`]) run for many
//! keys side by side, with each step's Redis commands sent together:
//!
//! 1. the near cache (L1), when on, answers what it holds;
//! 2. one `MGET` finds the hits (on a cluster, a `GET` per key, pipelined
//!    per node and sent to every node at once);
//! 3. each missing key joins its single-flight in this process: the keys
//!    another thread is loading are waited for; the others' rebuild locks
//!    and leases are claimed in one pipelined round trip;
//! 4. one loader call loads every key whose lease was granted, and one
//!    pipelined round trip fills them, each under its own lease;
//! 5. keys whose lock another process holds are claimed again every
//!    `lock_poll` (their value usually lands in the cache meanwhile) and
//!    taken over after `lock_wait`, as a single-key read does.
//!
//! Guarantees (tests in `tests/batch.rs`), per key, as for a single key:
//! - no read returns, and no fill caches, a row older than a write that
//!   returned before the read began: each fill goes through its key's
//!   lease, so a write during the batch's load drops that key's fill and
//!   not the others';
//! - a key one caller (thread or process) is loading is not loaded again
//!   by another batch or single-key read that asks meanwhile;
//! - a corrupt entry is a miss (deleted and counted).
//!
//! Not done for batches: XFetch early refresh of hits, and the soft
//! timeout (a batch waits for its load; with fail-safe on, a failed load
//! still serves the copies it has).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::breaker::Permit;
use crate::cache::{Raw, check_key};
use crate::config::EntryOptions;
use crate::engine::{
    Answer, Engine, Loaded, Verdict, answer_of, decode_value, fill_entry, to_json, valid_before,
};
use crate::entry::{Entry, Payload, now_ms};
use crate::error::{Error, ErrorKind, Result};
use crate::keeper::Hold;
use crate::keys::Keys;
use crate::lease::{self, Acquired, Claim, names_error, new_token};
use crate::near::Ticket;
use crate::observe::report;
use crate::redis_conn::RedisConnection;
use crate::singleflight::{Follower, Leader, Role, WaitError, Waited};

/// A row a batch loader found: its key, its value's JSON and its version.
pub(crate) struct Row {
    pub key: String,
    pub json: Vec<u8>,
    pub version: u64,
}

/// A batch loader as the engine runs it: the missing keys in, the rows it
/// found out (a key it does not return is absent).
pub(crate) type LoadMany<'a> = dyn FnMut(&[&str]) -> Result<Vec<Row>> + 'a;

/// One distinct key of a batch and what the read knows of it so far.
struct Item<'k, T> {
    key: &'k str,
    value_key: String,
    /// The side keys, built on the first miss (a hit needs only the value
    /// key).
    keys: Option<Keys>,
    /// The near cache's invalidation count before the lookup.
    ticket: Option<Ticket>,
    /// A fail-safe copy the lookup found: raw entry and value.
    stale: Option<(Vec<u8>, Option<T>)>,
    /// The answer, once there is one.
    done: Option<Option<T>>,
    /// Why there is none.
    failed: Option<Error>,
}

impl<T> Item<'_, T> {
    fn open(&self) -> bool {
        self.done.is_none() && self.failed.is_none()
    }

    fn keys(&mut self) -> &Keys {
        let value_key = &self.value_key;
        self.keys
            .get_or_insert_with(|| Keys::for_value(value_key.clone()))
    }
}

/// What a batch read carries from step to step.
struct Run<'k, T> {
    items: Vec<Item<'k, T>>,
    opts: EntryOptions,
    permit: Permit,
    use_redis: bool,
    generation: u64,
    started: Instant,
    deadline: Instant,
}

/// A leader whose load is about to run, with what it holds in Redis.
struct Granted {
    item: usize,
    leader: Leader<crate::engine::Shared>,
    /// The lease (and lock) it holds; `None` when Redis is not used.
    hold: Option<Hold>,
}

impl Engine {
    /// The read behind `get_or_load_many`: one answer per key of `keys`, in
    /// their order (a key given twice is read once and answered twice).
    pub(crate) fn read_many<T: Serialize + DeserializeOwned>(
        &self,
        keys: &[&str],
        opts: EntryOptions,
        load: &mut LoadMany<'_>,
    ) -> Result<Vec<Option<T>>> {
        opts.check()?;
        let mut index: HashMap<&str, usize> = HashMap::with_capacity(keys.len());
        let mut positions = Vec::with_capacity(keys.len());
        let mut items = Vec::with_capacity(keys.len());
        for &key in keys {
            check_key(key)?;
            let at = *index.entry(key).or_insert_with(|| {
                items.push(Item {
                    key,
                    value_key: self.cache.redis_key(key),
                    keys: None,
                    ticket: None,
                    stale: None,
                    done: None,
                    failed: None,
                });
                items.len() - 1
            });
            positions.push(at);
        }
        let started = Instant::now();
        let mut run = Run {
            items,
            opts,
            permit: Permit::Bypass,
            use_redis: false,
            generation: 0,
            started,
            deadline: started + self.settings.call_deadline,
        };
        self.look_up(&mut run);
        self.resolve_misses(&mut run, load);
        // Taken out as they are handed over (hence the outer Option).
        let mut answers: Vec<Option<Option<T>>> = Vec::with_capacity(run.items.len());
        for item in run.items {
            match (item.failed, item.done) {
                (Some(err), _) => return Err(err),
                (None, Some(value)) => answers.push(Some(value)),
                // Every round ends each key answered, failed or open, and
                // the rounds end only when none is open: not reached.
                (None, None) => return Err(Error::timeout("a key of the batch got no answer")),
            }
        }
        // In the keys' order. A key given twice was read once: its earlier
        // places get a copy (through JSON: values need not be Clone), the
        // last place the value itself.
        let mut uses = vec![0_usize; answers.len()];
        for &at in &positions {
            uses[at] += 1;
        }
        positions
            .into_iter()
            .enumerate()
            .map(|(place, at)| {
                uses[at] -= 1;
                match &answers[at] {
                    Some(Some(value)) if uses[at] > 0 => {
                        decode_value(keys[place], &to_json(value)?)
                    }
                    _ => Ok(answers[at].take().flatten()),
                }
            })
            .collect()
    }

    /// Steps 1 and 2: the near cache, then one `MGET` of what it lacks.
    fn look_up<T: DeserializeOwned>(&self, run: &mut Run<'_, T>) {
        // L1 first, unless the breaker says this process must not trust
        // what Redis told it.
        let near = self.near.as_deref().filter(|_| !self.breaker.is_open());
        if let Some(near) = near {
            for item in &mut run.items {
                if let Some(slot) = near.get(item.key) {
                    match slot.decode::<T>() {
                        Some(value) => {
                            item.done = Some(value);
                            continue;
                        }
                        None => near.evict(item.key),
                    }
                }
                // Noted before the MGET: an invalidation from now on wins
                // over the L1 fill below.
                item.ticket = Some(near.ticket(item.key));
            }
        }
        let open: Vec<usize> = (0..run.items.len())
            .filter(|&i| run.items[i].open())
            .collect();
        if open.is_empty() {
            // No permit taken: a probe permit must report how it went.
            return;
        }
        // As for one key: noted before the permit (see Engine::read).
        run.generation = self.cache.server_generation();
        run.permit = self.breaker.permit();
        run.use_redis = run.permit != Permit::Bypass;
        if run.use_redis {
            match self.lookup_many(&run.items, &open) {
                Ok(_) if self.cache.server_generation() != run.generation => {
                    run.use_redis = false;
                }
                Ok(raws) => {
                    self.breaker.succeeded(run.permit);
                    if run.permit == Permit::Probe && self.breaker.is_open() {
                        // Redis answers, but writes of the outage may still
                        // be pending: nothing it holds is trusted yet.
                        run.use_redis = false;
                    } else {
                        for (&i, raw) in open.iter().zip(raws) {
                            self.take_lookup(&mut run.items[i], raw, true);
                        }
                    }
                }
                Err(err) => {
                    self.cache_failed(run.permit, &err);
                    run.use_redis = false;
                }
            }
        }
        for &i in &open {
            if !run.items[i].open() {
                continue;
            }
            if run.use_redis {
                self.counters.misses.bump();
            } else {
                self.counters.bypassed.bump();
            }
        }
        if !run.use_redis {
            run.permit = Permit::Bypass;
        }
    }

    /// Reads the value keys of `open` items: one `MGET` on a single server;
    /// on a cluster one `GET` per key (every key of ours is its own hash
    /// tag, so keys rarely share a slot), pipelined per node, every node's
    /// pipeline sent before any reply is read.
    fn lookup_many<T>(&self, items: &[Item<'_, T>], open: &[usize]) -> Result<Vec<Raw>> {
        let names: Vec<&str> = open.iter().map(|&i| items[i].value_key.as_str()).collect();
        // `None`: a value of another type under one of the keys failed a
        // cluster pipeline whole (a single server's MGET reads it as
        // missing); then each key is looked up alone, telling it apart.
        let found = self.cache.run(|conn| match conn {
            RedisConnection::Cluster(cluster) => {
                let mut pipe = redis::cluster::cluster_pipe();
                for name in &names {
                    pipe.get(*name);
                }
                match pipe.query::<Vec<Option<Vec<u8>>>>(cluster) {
                    Err(err) if names_error(&err, "WRONGTYPE") => Ok(None),
                    found => found.map(Some),
                }
            }
            conn => redis::cmd("MGET").arg(&names).query(conn).map(Some),
        })?;
        let Some(found) = found else {
            return names.iter().map(|name| self.cache.lookup(name)).collect();
        };
        if found.len() != names.len() {
            return Err(Error::new(
                ErrorKind::Cache,
                "a lookup answered another number of keys than it was asked",
            ));
        }
        Ok(found
            .into_iter()
            .map(|bytes| bytes.map_or(Raw::Missing, Raw::Bytes))
            .collect())
    }

    /// Takes what a lookup found for `item`: a fresh entry answers it (and,
    /// from the first lookup, goes to L1), a fail-safe copy is kept, a
    /// corrupt entry is deleted. Returns true if it answered.
    fn take_lookup<T: DeserializeOwned>(
        &self,
        item: &mut Item<'_, T>,
        raw: Raw,
        first: bool,
    ) -> bool {
        let raw = match raw {
            Raw::Missing => return false,
            Raw::Foreign => {
                self.corrupt(&item.value_key, b"");
                return false;
            }
            Raw::Bytes(raw) => raw,
        };
        // An entry filled with tags (get_or_load_tagged) is checked as an
        // untagged single-key read checks it: one of its tags invalidated
        // makes it a miss, not even a fail-safe copy (crate::tags).
        let tagged = crate::entry::is_tagged(&raw);
        if tagged
            && !matches!(
                crate::tags::valid(&self.cache, &item.value_key, &raw, &[], &[]),
                Ok(true)
            )
        {
            return false;
        }
        // No early refresh from a batch (beta 0): see the module docs.
        let Some(found) = self.decode::<T>(&item.value_key, &raw, 0.0) else {
            return false;
        };
        if !found.fresh {
            item.stale = Some((raw, found.value));
            return false;
        }
        if first {
            self.counters.hits.bump();
            if let (Some(near), Some(ticket)) = (&self.near, item.ticket)
                && !tagged
            {
                near.offer(item.key, ticket, &raw);
            }
        }
        item.done = Some(found.value);
        true
    }

    /// Steps 3 to 5 for every key still open, in rounds: a key whose
    /// flight's answer came too late for it (a write during that load) is
    /// looked up again, and read again in the next round if still missing.
    fn resolve_misses<T: DeserializeOwned>(&self, run: &mut Run<'_, T>, load: &mut LoadMany<'_>) {
        let mut open: Vec<usize> = (0..run.items.len())
            .filter(|&i| run.items[i].open())
            .collect();
        while !open.is_empty() {
            if Instant::now() >= run.deadline {
                for &i in &open {
                    self.fail_or_stale(
                        run,
                        i,
                        Error::timeout("reading keys that keep being written"),
                    );
                }
                return;
            }
            let mut leaders = Vec::new();
            let mut followers = Vec::new();
            for &i in &open {
                match self.flights.join(run.items[i].key) {
                    Role::Leader(leader) => leaders.push((i, leader)),
                    Role::Follower(follower) => followers.push((i, follower)),
                    Role::Reentrant => {
                        run.items[i].failed = Some(Error::invalid_argument(format!(
                            "the loader of key {:?} read that same key: it would wait for itself",
                            run.items[i].key
                        )));
                    }
                }
            }
            // Lead first, wait after: a thread never waits for another while
            // it holds flights of its own unpublished, so two batches that
            // lead each other's keys cannot wait for each other.
            self.lead_many(run, leaders, load);
            let again = self.follow_many(run, followers);
            open = self.look_again(run, again);
        }
    }

    /// The leaders' work: claim every key's lock and lease in one round
    /// trip, load the granted ones in one loader call, fill them in one
    /// round trip; claim the busy ones again until their holder's value
    /// lands or `lock_wait` passes (then take them over). Every leader
    /// publishes on every path.
    fn lead_many<T: DeserializeOwned>(
        &self,
        run: &mut Run<'_, T>,
        mut waiting: Vec<(usize, Leader<crate::engine::Shared>)>,
        load: &mut LoadMany<'_>,
    ) {
        let s = &self.settings;
        let lock_deadline = (run.started + s.lock_wait).min(
            run.deadline
                .checked_sub(s.load_budget)
                .unwrap_or(run.started),
        );
        let mut claim = Claim::Lock;
        while !waiting.is_empty() {
            if Instant::now() >= run.deadline {
                // Only a key rewritten with garbage as fast as it is deleted
                // keeps a claim from ending before this.
                let err = Error::timeout("claiming keys that keep being rewritten");
                for (i, leader) in waiting {
                    leader.publish(Err(err.clone()), u64::MAX);
                    self.fail_or_stale(run, i, err.clone());
                }
                return;
            }
            if !run.use_redis {
                let granted = waiting
                    .drain(..)
                    .map(|(item, leader)| Granted {
                        item,
                        leader,
                        hold: None,
                    })
                    .collect();
                self.load_and_fill(run, granted, load);
                return;
            }
            let tokens: Vec<_> = waiting.iter().map(|_| new_token()).collect();
            let reads: Vec<u64> = waiting.iter().map(|(_, l)| l.begin_read()).collect();
            for (i, _) in &waiting {
                run.items[*i].keys();
            }
            let claims: Vec<(&Keys, &str)> = waiting
                .iter()
                .zip(&tokens)
                .map(|((i, _), token)| {
                    (run.items[*i].keys.as_ref().expect("built above"), &**token)
                })
                .collect();
            let acquired = lease::acquire_many(&self.cache, &claims, claim, s.ttls, now_ms());
            drop(claims);
            let acquired = match self.cache_call(run.permit, acquired) {
                Ok(acquired) => acquired,
                Err(err) => {
                    // The scripts may have run on the server after the
                    // client gave up: what they took is orphaned until
                    // released. Load without Redis (still one load per key
                    // in this process), and do not fill.
                    for ((i, _), token) in waiting.iter().zip(tokens) {
                        if err.is_outage() {
                            let keys = run.items[*i].keys().clone();
                            self.keeper.orphan(&keys, token);
                        }
                        self.counters.fills_failed.bump();
                    }
                    run.use_redis = false;
                    continue;
                }
            };
            let mut granted = Vec::new();
            let mut busy = Vec::new();
            for ((((i, leader), token), read), acquired) in
                waiting.into_iter().zip(tokens).zip(reads).zip(acquired)
            {
                match acquired {
                    Acquired::Granted => {
                        let keys = run.items[i].keys();
                        let hold = self.keeper.hold(keys, token, run.deadline, run.generation);
                        granted.push(Granted {
                            item: i,
                            leader,
                            hold: Some(hold),
                        });
                    }
                    Acquired::Busy => busy.push((i, leader)),
                    Acquired::Cached(raw) => {
                        // Another caller filled it since our lookup.
                        match self.cached_answer::<T>(&mut run.items[i], &raw) {
                            Some(answer) => leader.publish(Ok(answer), read),
                            // Corrupt (deleted) or expired: claim it again.
                            None => busy.push((i, leader)),
                        }
                    }
                }
            }
            if !granted.is_empty() {
                self.load_and_fill(run, granted, load);
            }
            waiting = busy;
            if waiting.is_empty() {
                return;
            }
            // Another process loads these keys: its values land in the
            // cache, which the next claim reads. If it dies, its locks
            // expire and a claim takes them; after lock_wait we load them
            // ourselves, still through leases (taken over).
            let now = Instant::now();
            if now >= lock_deadline {
                claim = Claim::Takeover;
            } else {
                std::thread::sleep(s.lock_poll.min(lock_deadline - now));
            }
        }
    }

    /// A fresh entry a claim found instead of a lease, as the key's answer
    /// (taken into `item`); `None` if it is not fresh, or corrupt (then
    /// deleted).
    fn cached_answer<T: DeserializeOwned>(
        &self,
        item: &mut Item<'_, T>,
        raw: &[u8],
    ) -> Option<Answer> {
        let entry = match Entry::decode(raw) {
            Ok(entry) => entry,
            Err(_) => {
                self.corrupt(&item.value_key, raw);
                return None;
            }
        };
        if !entry.is_fresh(now_ms()) {
            return None;
        }
        let (answer, value) = match entry.payload {
            Payload::Absent => (Answer::Absent, None),
            Payload::Value(json) => match serde_json::from_slice::<T>(json) {
                Ok(value) => (Answer::Value(json.into()), Some(value)),
                Err(_) => {
                    self.corrupt(&item.value_key, raw);
                    return None;
                }
            },
        };
        item.done = Some(value);
        Some(answer)
    }

    /// Step 4: one loader call for every granted key, then their fills in
    /// one round trip; each leader publishes its key's outcome, valid for
    /// the followers its fill's verdict allows (as for one key).
    fn load_and_fill<T: DeserializeOwned>(
        &self,
        run: &mut Run<'_, T>,
        mut granted: Vec<Granted>,
        load: &mut LoadMany<'_>,
    ) {
        let names: Vec<&str> = granted.iter().map(|g| run.items[g.item].key).collect();
        let load_reads: Vec<u64> = granted.iter().map(|g| g.leader.begin_read()).collect();
        let started = Instant::now();
        let rows = load(&names);
        let took = started.elapsed();
        self.counters.loaded(took);
        #[cfg(feature = "test-hooks")]
        for name in &names {
            self.hooks.after_load(name);
        }
        let mut rows: HashMap<String, (Vec<u8>, u64)> = match rows {
            Ok(rows) => rows
                .into_iter()
                .map(|row| (row.key, (row.json, row.version)))
                .collect(),
            Err(err) => {
                // Every follower hears of the failed load (errors are not
                // stale data); the holds drop and release.
                for g in granted {
                    g.leader.publish(Err(err.clone()), u64::MAX);
                    self.fail_or_stale(run, g.item, err.clone());
                }
                return;
            }
        };
        let loaded: Vec<Loaded> = names
            .iter()
            .map(|name| {
                let (json, version) = match rows.remove(*name) {
                    Some((json, version)) => (Some(json), version),
                    None => (None, 0),
                };
                Loaded {
                    json,
                    version,
                    took,
                    unchanged: false,
                }
            })
            .collect();
        if !rows.is_empty() {
            report!(
                debug,
                "a batch loader returned {} rows for keys it was not asked for: ignored",
                rows.len()
            );
        }
        let verdicts = self.fill_many(run, &mut granted, &loaded);
        for (((g, loaded), load_read), (verdict, fill_read)) in granted
            .into_iter()
            .zip(&loaded)
            .zip(load_reads)
            .zip(verdicts)
        {
            let marks = g.leader.marks();
            let valid = valid_before(verdict, load_read, fill_read, &marks);
            let answer = answer_of(loaded);
            let item = &mut run.items[g.item];
            match &loaded.json {
                Some(json) => match decode_value::<T>(item.key, json) {
                    Ok(value) => item.done = Some(value),
                    Err(err) => item.failed = Some(err),
                },
                None => item.done = Some(None),
            }
            g.leader.publish(Ok(answer), valid);
        }
    }

    /// Fills each granted key under its lease, in one round trip; returns
    /// each key's verdict and the read number its fill began as. Takes the
    /// holds (a fill releases them).
    fn fill_many<T>(
        &self,
        run: &mut Run<'_, T>,
        granted: &mut [Granted],
        loaded: &[Loaded],
    ) -> Vec<(Verdict, u64)> {
        let fill_reads: Vec<u64> = granted.iter().map(|g| g.leader.begin_read()).collect();
        // No Redis: nothing is filled. Valid past the load's start only if
        // this process did not write the key meanwhile (`Failed`).
        if granted.iter().any(|g| g.hold.is_none()) {
            return fill_reads
                .into_iter()
                .map(|r| (Verdict::Failed, r))
                .collect();
        }
        let entries: Vec<(Vec<u8>, Duration)> = loaded
            .iter()
            .map(|l| {
                let (_, raw, physical) = fill_entry(&run.opts, l, None);
                (raw, physical)
            })
            .collect();
        let items = &run.items;
        let keys_of = |g: &Granted| items[g.item].keys.as_ref().expect("claimed before");
        #[cfg(feature = "test-hooks")]
        if self.hooks.leases_disabled() {
            return granted
                .iter()
                .zip(&entries)
                .zip(fill_reads)
                .map(|((g, (raw, ttl)), read)| {
                    let verdict = match self.cache.set_raw(&keys_of(g).value, raw, *ttl) {
                        Ok(()) => Verdict::Stored,
                        Err(_) => Verdict::Failed,
                    };
                    (verdict, read)
                })
                .collect();
        }
        let fills: Vec<lease::Fill<'_>> = granted
            .iter()
            .zip(&entries)
            .map(|(g, (raw, ttl))| {
                let token = g.hold.as_ref().map_or("", |h| h.token());
                (keys_of(g), token, raw.as_slice(), *ttl)
            })
            .collect();
        let stored = match lease::fill_many(&self.cache, &fills) {
            Ok(stored) => stored.into_iter().map(Ok).collect(),
            Err(err) => vec![Err(err); granted.len()],
        };
        drop(fills);
        granted
            .iter_mut()
            .zip(entries)
            .zip(stored)
            .zip(fill_reads)
            .map(|(((g, (raw, _)), stored), read)| {
                let hold = g.hold.take().expect("checked above");
                (self.fill_verdict(keys_of(g), hold, &raw, stored), read)
            })
            .collect()
    }

    /// Waits for the flights other threads lead; returns the keys whose
    /// answer came from a read that began before this call joined (a write
    /// may have come between): they are read again.
    fn follow_many<T: DeserializeOwned>(
        &self,
        run: &mut Run<'_, T>,
        followers: Vec<(usize, Follower<crate::engine::Shared>)>,
    ) -> Vec<usize> {
        let mut again = Vec::new();
        for (i, follower) in followers {
            match follower.wait(run.deadline) {
                Ok(Waited::Outcome(Ok(Answer::Value(json)))) => {
                    let item = &mut run.items[i];
                    match decode_value::<T>(item.key, &json) {
                        Ok(value) => item.done = Some(value),
                        Err(err) => item.failed = Some(err),
                    }
                }
                Ok(Waited::Outcome(Ok(Answer::Absent))) => run.items[i].done = Some(None),
                Ok(Waited::Outcome(Ok(Answer::Stale))) if run.items[i].stale.is_some() => {
                    self.serve_stale_item(run, i);
                }
                Ok(Waited::Outcome(Ok(Answer::Stale))) | Ok(Waited::TooOld(_)) => again.push(i),
                Ok(Waited::Outcome(Err(err))) => self.fail_or_stale(run, i, err),
                Err(WaitError::Abandoned) => {
                    run.items[i].failed = Some(Error::new(
                        ErrorKind::Panicked,
                        "the thread loading this key panicked",
                    ));
                }
                Err(WaitError::TimedOut) => {
                    self.fail_or_stale(run, i, Error::timeout("waiting for another thread's load"))
                }
            }
        }
        again
    }

    /// Looks up `again` (keys sent back by their flight) once more: a fresh
    /// entry answers them; the rest are read again in the next round.
    fn look_again<T: DeserializeOwned>(
        &self,
        run: &mut Run<'_, T>,
        again: Vec<usize>,
    ) -> Vec<usize> {
        if again.is_empty() || !run.use_redis {
            return again;
        }
        match self.lookup_many(&run.items, &again) {
            Ok(raws) => {
                for (&i, raw) in again.iter().zip(raws) {
                    self.take_lookup(&mut run.items[i], raw, false);
                }
            }
            Err(err) => self.cache_failed(run.permit, &err),
        }
        again.into_iter().filter(|&i| run.items[i].open()).collect()
    }

    /// A key's read failed with `err`: with a fail-safe copy at hand, serve
    /// it; else the batch fails with `err`.
    fn fail_or_stale<T>(&self, run: &mut Run<'_, T>, i: usize, err: Error) {
        if run.items[i].stale.is_some() && err.kind() != ErrorKind::InvalidArgument {
            self.serve_stale_item(run, i);
        } else {
            run.items[i].failed = Some(err);
        }
    }

    /// Serves `i`'s fail-safe copy, re-armed for the throttle period.
    fn serve_stale_item<T>(&self, run: &mut Run<'_, T>, i: usize) {
        let item = &mut run.items[i];
        let Some((raw, value)) = item.stale.take() else {
            return;
        };
        if run.use_redis {
            self.rearm(run.permit, &item.value_key, &raw);
        }
        self.counters.stale_served.bump();
        item.done = Some(value);
    }

    /// Invalidates every key of `keys` (as [`Engine::invalidate`] does one):
    /// their replica fences raised in one call, then one `DEL` per key,
    /// pipelined.
    pub(crate) fn invalidate_many(&self, keys: &[&str]) -> Result<()> {
        for key in keys {
            check_key(key)?;
        }
        let _evict: Vec<_> = keys
            .iter()
            .map(|key| {
                self.note_write(key);
                self.evict_on_return(key)
            })
            .collect();
        let all: Vec<Keys> = keys.iter().map(|key| self.cache.keys(key)).collect();
        if all.is_empty() {
            return Ok(());
        }
        // The fences before the leases go, as for one key (see
        // crate::fence).
        self.raise_fences(all.iter().map(|keys| (keys, None)))
            .and_then(|()| lease::invalidate_many(&self.cache, &all))
            .map_err(|err| self.invalidation_failed(err))
    }
}
