//! Invalidation from Postgres itself: a trigger records every changed key in
//! an outbox table in the same transaction as the change, and a relay thread
//! applies the outbox to the cache.
//!
//! This catches what the library's own invalidation cannot: writes that
//! bypass the library (psql, a migration, another service), and writes whose
//! `DEL` never reached Redis (Redis was down, the process died between
//! `COMMIT` and `DEL`).
//!
//! Guarantees:
//! - Every committed change to a captured table is applied to the cache
//!   exactly as [`CacheAside::invalidate`](crate::CacheAside::invalidate)
//!   does (value, lease and writers deleted, so an in-flight fill of the
//!   pre-change row is dropped), within about 5 ms while changes arrive and
//!   about `relay_poll` after a quiet spell. Inserts, updates (old and new
//!   key) and deletes are captured by a row trigger, `TRUNCATE` by a
//!   statement trigger (a reset of the table's key prefix: its cache
//!   entries are deleted, nothing else); both fire also under
//!   `session_replication_role = replica`. The trigger adds no `NOTIFY` to
//!   the writer's commit: the relay polls (one cheap statement when the
//!   database is quiet: has its snapshot moved?).
//! - A table captured with a tag column also writes each changed row's old
//!   and new tag (tag rows, [`tags`]): the relay replaces each tag's stamp
//!   exactly as [`CacheAside::invalidate_tag`](crate::CacheAside::invalidate_tag)
//!   does, skipping (and logging) a name that is no valid tag.
//! - Nothing is skipped, whatever order transactions commit in. Outbox ids
//!   are handed out at insert time, not at commit, so a cursor on ids alone
//!   would step over a row whose transaction commits late. A round reads in
//!   one snapshot the rows above the highest id read so far, and the rows of
//!   the transactions the previous round's snapshot did not see (in
//!   progress, or not begun): the only ones that can still add rows below
//!   that id. So a round costs what is new, not the backlog behind a
//!   long-running transaction; it reads in pages of [`PAGE`] rows, applied
//!   as they come. What survives a restart is a transaction horizon, kept
//!   in Postgres: every row written by a transaction older than the horizon
//!   has been applied; after a round it moves to the snapshot's `xmin`. A
//!   relay's first round reads from the horizon (rows read again are
//!   applied again: deletes are idempotent).
//! - One relay per namespace and outbox does the work: it holds a lease (a
//!   session advisory lock on its own connection, so it is released when
//!   the process or its connection dies) and publishes, after each round,
//!   that round's snapshot in Redis. The relays of other processes stand by:
//!   they try the lease every 250 ms, and a sync (or the breaker's
//!   recovery) waits until the published snapshot covers the moment it was
//!   asked. With `relay_listen = false` (no session, behind a transaction
//!   pooler) every relay reads the outbox.
//! - The horizon is kept in Postgres, per namespace, so a restarted relay
//!   (or a relay in another process) goes on where the last one stopped.
//!   When Redis fails, the horizon stays and the round is retried; when the
//!   relay's Postgres connection drops, it reconnects and catches up.
//! - Outbox rows older than `outbox_retention` are pruned. A relay whose
//!   namespace was not served for longer than that cannot know what it
//!   missed: it deletes its namespace's cache entries (values, leases,
//!   locks, writers, floors; never write-behind streams or pending records,
//!   sessions or rate-limit windows, nor anything outside the namespace; no
//!   `FLUSHALL`), also in the empty namespace, and goes on.
//! - While the circuit breaker waits in recovery, the breaker closes only
//!   after a round that began in recovery has applied everything.
//!
//! Requires PostgreSQL 13 or later (`xid8`, `pg_current_xact_id`).

use crate::observe::report;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use tokio_postgres::error::SqlState;

use crate::config::Config;
use crate::db::{DbConn, Transaction};
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::lease::{self, Keys};

mod outbox;
mod tags;

pub(crate) use outbox::Outbox;

/// How long the relay thread sleeps at most before it looks at its flags
/// (stop, sync requests, breaker recovery).
const SLICE: Duration = Duration::from_millis(25);

/// Outbox rows read per query.
const PAGE: i64 = 1000;

/// How often the relay looks at the outbox while changes arrive; idle, it
/// backs off to `relay_poll`.
const BUSY_POLL: Duration = Duration::from_millis(5);

/// How often, at most, the leader writes the horizon.
const ADVANCE_EVERY: Duration = Duration::from_secs(1);

/// A standby whose syncs the leader's published progress has not covered
/// this many times in a row (a second each) reads the outbox itself.
const UNLEASED_AFTER: u32 = 5;

/// How often, at least, an idle leader publishes its snapshot again.
const REPUBLISH_EVERY: Duration = Duration::from_secs(1);

/// How often a standby tries to take the lease: a leader that died is
/// replaced within about this (its lock goes with its connection).
const STANDBY_TRY: Duration = Duration::from_millis(250);

/// How long a standby's sync waits for the leader before it tries the
/// lease again.
const FOLLOW_FOR: Duration = Duration::from_secs(1);

/// A running relay; stopping it (or dropping it) joins its thread.
pub(crate) struct Relay {
    shared: Arc<RelayShared>,
    thread: Option<JoinHandle<()>>,
}

/// What callers use to talk to a running relay.
#[derive(Clone)]
pub(crate) struct RelayHandle(Arc<RelayShared>);

struct RelayShared {
    stop: AtomicBool,
    /// Sync requests made, and the last one a finished round covers.
    requested: AtomicU64,
    served: Mutex<u64>,
    served_cv: Condvar,
    /// Outbox rows read, and the most held in memory at once.
    rows_read: AtomicU64,
    most_held: AtomicU64,
    /// Rings when a sync is requested (the relay sleeps on it).
    wake_lock: Mutex<()>,
    wake: Condvar,
}

impl Relay {
    pub fn start(mut engine: Engine, config: &Config) -> Relay {
        // The relay's statements are not the application's queries.
        engine.db = engine.db.uncounted();
        let shared = Arc::new(RelayShared {
            stop: AtomicBool::new(false),
            requested: AtomicU64::new(0),
            served: Mutex::new(0),
            served_cv: Condvar::new(),
            rows_read: AtomicU64::new(0),
            most_held: AtomicU64::new(0),
            wake_lock: Mutex::new(()),
            wake: Condvar::new(),
        });
        let outbox = Outbox::new(&config.outbox_table);
        let applied_key = format!(
            "{}:applied:{}",
            engine.cache.redis_key("relay"),
            config.outbox_table
        );
        // With the lease, the leader's progress is everyone's; without it,
        // each relay keeps its own.
        let marker_key = if config.relay_listen {
            applied_key.clone()
        } else {
            format!("{applied_key}:{}", crate::lease::new_token())
        };
        let worker = Worker {
            engine,
            shared: Arc::clone(&shared),
            poll: config.relay_poll,
            last_snapshot: None,
            lease: config.relay_listen,
            leader: !config.relay_listen,
            outbox_name: config.outbox_table.clone(),
            applied_key,
            retention: config.outbox_retention,
            consumer: config.namespace.clone(),
            seen: None,
            last_prune: None,
            last_advance: None,
            last_publish: None,
            missed: 0,
            marker_key,
            published: None,
            replay: None,
            started_from: None,
        };
        let thread = match outbox {
            Ok(outbox) => std::thread::Builder::new()
                .name("cacheaside-relay".into())
                .spawn(move || worker.run(&outbox))
                .map_err(|e| report!(warn, "cannot start the invalidation relay: {e}"))
                .ok(),
            Err(err) => {
                report!(warn, "invalidation relay not started: {}", err.chain());
                None
            }
        };
        Relay { shared, thread }
    }

    pub fn handle(&self) -> RelayHandle {
        RelayHandle(Arc::clone(&self.shared))
    }

    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.halt();
    }
}

impl RelayHandle {
    /// Asks for a round and waits until one that began after this call has
    /// finished; false at the timeout.
    pub fn sync(&self, timeout: Duration) -> bool {
        let want = self.0.requested.fetch_add(1, Ordering::SeqCst) + 1;
        drop(self.0.wake_lock.lock());
        self.0.wake.notify_all();
        let deadline = Instant::now() + timeout;
        let mut served = self.0.served.lock();
        while *served < want {
            if self
                .0
                .served_cv
                .wait_until(&mut served, deadline)
                .timed_out()
            {
                return *served >= want;
            }
        }
        true
    }
}

impl RelayHandle {
    /// Outbox rows this relay has read, and the most it held in memory at
    /// once (one page at most).
    #[cfg(feature = "test-hooks")]
    pub fn rows_read(&self) -> (u64, u64) {
        (
            self.0.rows_read.load(Ordering::Relaxed),
            self.0.most_held.load(Ordering::Relaxed),
        )
    }
}

/// The relay thread's state.
struct Worker {
    engine: Engine,
    shared: Arc<RelayShared>,
    poll: Duration,
    /// The snapshot of the last round: while the database's current one
    /// is the same, nothing committed since.
    last_snapshot: Option<String>,
    /// One relay per namespace and outbox reads the outbox, the holder of
    /// the lease; off (`relay_listen = false`, for poolers that cannot keep
    /// a session), every relay does.
    lease: bool,
    /// Holds the lease (or needs none).
    leader: bool,
    outbox_name: String,
    /// Where the leader publishes its last round's snapshot.
    applied_key: String,
    retention: Duration,
    /// Whose progress the horizon records: the namespace.
    consumer: String,
    /// Where the last round left off; `None` before the first round (which
    /// starts from the horizon).
    seen: Option<Seen>,
    last_prune: Option<Instant>,
    /// When the horizon was last written.
    last_advance: Option<Instant>,
    /// When the snapshot was last published.
    last_publish: Option<Instant>,
    /// A standby's syncs in a row that the leader's progress did not cover.
    missed: u32,
    /// Where this relay writes its progress: the leader's `applied_key`, or
    /// (without the lease, every relay reading) a key of its own.
    marker_key: String,
    /// The marker this relay last wrote to Redis; `None` before its first.
    published: Option<String>,
    /// Redis came back without what it had acknowledged (see
    /// [`Worker::publish`]): the next round reads again from here (a
    /// transaction id), or, with `Some(None)`, resets the namespace.
    replay: Option<Option<u64>>,
    /// The horizon this relay's first round read from.
    started_from: Option<u64>,
}

impl Worker {
    fn run(mut self, outbox: &Outbox) {
        let mut conn: Option<DbConn> = None;
        let mut backoff = Duration::from_millis(50);
        let mut interval = BUSY_POLL;
        let mut next_look = Instant::now();
        let mut next_try = Instant::now();
        while !self.shared.stop.load(Ordering::SeqCst) {
            if conn.as_ref().is_none_or(DbConn::is_broken) {
                match self.engine.db.dedicated(&outbox.listener_name()) {
                    Ok(c) => {
                        conn = Some(c);
                        // Whatever happened meanwhile: look now. A lease
                        // held on the old connection went with it.
                        self.last_snapshot = None;
                        self.leader = !self.lease;
                        self.missed = 0;
                        next_look = Instant::now();
                        next_try = Instant::now();
                    }
                    Err(err) => {
                        self.engine.counters.relay_errors.bump();
                        report!(debug, "invalidation relay cannot connect: {}", err.chain());
                        self.sleep(backoff);
                        backoff = (backoff * 2).min(self.poll.max(Duration::from_millis(50)));
                        continue;
                    }
                }
            }
            let asked = self.shared.requested.load(Ordering::SeqCst) > *self.shared.served.lock()
                || self.engine.breaker.recovery_ticket().is_some();
            if !self.leader && Instant::now() >= next_try {
                next_try = Instant::now() + STANDBY_TRY;
                match conn.as_mut().map(|c| self.try_lead(c)) {
                    Some(Ok(true)) => {
                        self.leader = true;
                        next_look = Instant::now();
                    }
                    Some(Ok(false)) | None => {}
                    Some(Err(err)) => {
                        report!(
                            debug,
                            "invalidation relay lost its connection: {}",
                            err.chain()
                        );
                        conn = None;
                        continue;
                    }
                }
            }
            if !self.leader {
                // A standby: another process's relay applies the outbox;
                // a sync (or the breaker's recovery) waits until it has
                // applied everything committed before it was asked.
                if let (true, Some(c)) = (asked, conn.as_mut()) {
                    match self.follow(c) {
                        Ok(true) => self.missed = 0,
                        Ok(false) => {
                            next_try = Instant::now();
                            self.missed += 1;
                            // Someone holds the lease and publishes nothing
                            // we can use (a relay stuck, or another
                            // namespace whose lock key collides with ours):
                            // read the outbox ourselves rather than wait
                            // for ever.
                            if self.missed >= UNLEASED_AFTER {
                                report!(
                                    warn,
                                    "invalidation relay for namespace {:?}: the lease holder \
                                     publishes no progress; reading the outbox without the lease",
                                    self.consumer
                                );
                                self.leader = true;
                                next_look = Instant::now();
                            }
                        }
                        Err(err) => {
                            self.engine.counters.relay_errors.bump();
                            report!(debug, "invalidation relay standby: {}", err.chain());
                            self.sleep(backoff);
                        }
                    }
                }
                self.nap(next_try);
                continue;
            }
            if asked || Instant::now() >= next_look {
                // One cheap statement: nothing committed anywhere since the
                // last round's snapshot (it would have moved) means nothing
                // new in the outbox.
                let changed = asked
                    || match conn.as_mut().map(current_snapshot) {
                        Some(Ok(now)) => self.last_snapshot.as_deref() != Some(now.as_str()),
                        Some(Err(err)) => {
                            report!(
                                debug,
                                "invalidation relay lost its connection: {}",
                                err.chain()
                            );
                            conn = None;
                            continue;
                        }
                        None => true,
                    };
                if changed {
                    let before = self.shared.rows_read.load(Ordering::Relaxed);
                    match self.round(outbox) {
                        Ok(()) => {
                            backoff = Duration::from_millis(50);
                            let found = self.shared.rows_read.load(Ordering::Relaxed) > before;
                            interval = if found {
                                BUSY_POLL
                            } else {
                                self.slower(interval)
                            };
                        }
                        Err(err) => {
                            self.engine.counters.relay_errors.bump();
                            report!(
                                debug,
                                "invalidation relay round failed (retried): {}",
                                err.chain()
                            );
                            self.sleep(backoff);
                            backoff = (backoff * 2).min(self.poll.max(Duration::from_millis(50)));
                            next_look = Instant::now();
                            continue;
                        }
                    }
                } else {
                    interval = self.slower(interval);
                    // Nothing new: the published snapshot is still the
                    // database's; keep it from expiring (or coming back
                    // lost after a Redis restart) on a quiet database.
                    let stale = self
                        .last_publish
                        .is_none_or(|at| at.elapsed() >= REPUBLISH_EVERY);
                    if stale {
                        match self.publish() {
                            Ok(true) => {}
                            // Redis lost writes: a round reads again now.
                            Ok(false) => {
                                self.last_snapshot = None;
                                interval = BUSY_POLL;
                            }
                            Err(err) => {
                                report!(debug, "invalidation relay cannot publish: {}", err.chain())
                            }
                        }
                    }
                }
                next_look = Instant::now() + interval;
            }
            self.nap(next_look);
        }
    }

    /// Waits until `until`, or a sync request; a little at a time, so stop
    /// requests and the breaker's recovery are seen soon.
    fn nap(&self, until: Instant) {
        let wait = until.saturating_duration_since(Instant::now()).min(SLICE);
        let mut idle = self.shared.wake_lock.lock();
        if self.shared.requested.load(Ordering::SeqCst) <= *self.shared.served.lock() {
            self.shared.wake.wait_for(&mut idle, wait);
        }
    }

    /// Takes the namespace's lease if nobody holds it: a session advisory
    /// lock on the relay's own connection, so it is released when that
    /// connection ends (the process died, the network dropped it).
    fn try_lead(&self, conn: &mut DbConn) -> Result<bool> {
        Ok(conn
            .query_opt(
                "SELECT pg_catalog.pg_try_advisory_lock(
                     pg_catalog.hashtext($1), pg_catalog.hashtext($2))",
                &[&self.outbox_name, &self.consumer],
            )?
            .is_some_and(|row| row.get::<_, bool>(0)))
    }

    /// As a standby, waits (up to [`FOLLOW_FOR`]) until the leader has
    /// published a round whose snapshot covers this moment's: every
    /// transaction that had ended now had ended for it, so it has applied
    /// their changes. False if it did not (the leader may be gone).
    fn follow(&mut self, conn: &mut DbConn) -> Result<bool> {
        let ticket = self.engine.breaker.recovery_ticket();
        let serving = self.shared.requested.load(Ordering::SeqCst);
        let now = Snapshot::parse(&current_snapshot(conn)?)?;
        let deadline = Instant::now() + FOLLOW_FOR;
        loop {
            let applied = self.engine.cache.get_raw(&self.applied_key)?;
            let applied = applied
                .and_then(|raw| String::from_utf8(raw).ok())
                .and_then(|text| Snapshot::parse(&text).ok());
            if applied.is_some_and(|l| l.covers(&now)) {
                if let Some(ticket) = ticket {
                    self.engine.breaker.relay_caught_up(ticket);
                }
                let mut served = self.shared.served.lock();
                *served = (*served).max(serving);
                self.shared.served_cv.notify_all();
                return Ok(true);
            }
            if self.shared.stop.load(Ordering::SeqCst) || Instant::now() >= deadline {
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// As the leader, tells the standbys how far it has applied: the
    /// snapshot of its last round, in Redis beside the namespace's entries
    /// (never a cache entry: a reset leaves it).
    ///
    /// The same key is this relay's proof that Redis still holds what it
    /// applied: it is written only over the value this relay wrote last.
    /// Anything else there (an older snapshot, or nothing) means Redis lost
    /// writes it had acknowledged (a restart from an older snapshot, a
    /// failover to a replica that lagged): invalidations among them, so
    /// entries it holds may predate changes already applied. Then nothing
    /// is published (no standby's breaker closes, and this round's caller
    /// is not told the relay caught up), and the next round reads the
    /// outbox again from the older snapshot's `xmin`, or, with no snapshot
    /// to go by while this relay's first round started past what Redis
    /// shows, resets the namespace's cache entries. False when it did not
    /// publish for that reason.
    fn publish(&mut self) -> Result<bool> {
        let Some(text) = self.last_snapshot.clone() else {
            return Ok(true);
        };
        let key = self.marker_key.clone();
        let expected = self.published.clone().unwrap_or_default();
        let found: Option<String> = self.engine.cache.with_connection(|c| {
            MARKER
                .key(&key)
                .arg(&text)
                .arg(&expected)
                .arg(MARKER_TTL.as_millis() as u64)
                .invoke(c)
        })?;
        let lost = match (&self.published, found) {
            (_, None) => None,
            // Ours, last time: what Redis shows is what we applied.
            (Some(_), Some(found)) => Some(found),
            // Our first: only a snapshot older than where we started
            // shows a loss (a predecessor's marker is older by a second).
            (None, Some(found)) => match Snapshot::parse(&found) {
                Ok(old) if self.started_from.is_some_and(|from| old.xmin < from) => Some(found),
                Ok(_) => None,
                Err(_) if found.is_empty() => Some(found),
                Err(_) => None,
            },
        };
        let Some(found) = lost else {
            self.published = Some(text);
            self.last_publish = Some(Instant::now());
            return Ok(true);
        };
        let from = Snapshot::parse(&found).ok().map(|old| old.xmin);
        report!(
            warn,
            "Redis lost writes it had acknowledged (restarted from an older snapshot, or \
             failed over to a replica that lagged): the invalidation relay {}",
            match from {
                Some(xid) => format!("applies the outbox again from transaction {xid}"),
                None => "deletes the namespace's cache entries".to_owned(),
            }
        );
        self.engine.counters.relay_resets.bump();
        self.replay = Some(from);
        self.published = None;
        self.seen = None;
        Ok(false)
    }

    /// The next idle interval: twice the last, up to `relay_poll`.
    fn slower(&self, interval: Duration) -> Duration {
        (interval * 2).min(self.poll.max(BUSY_POLL))
    }

    fn sleep(&self, total: Duration) {
        let until = Instant::now() + total;
        while !self.shared.stop.load(Ordering::SeqCst) && Instant::now() < until {
            std::thread::sleep(SLICE.min(until.saturating_duration_since(Instant::now())));
        }
    }

    /// Reads, in one snapshot and in pages of at most [`PAGE`] rows, what
    /// the outbox holds that this relay has not read (from the horizon on
    /// its first round), applies each page as it goes, and moves the
    /// horizon.
    fn round(&mut self, outbox: &Outbox) -> Result<()> {
        let ticket = self.engine.breaker.recovery_ticket();
        let serving = self.shared.requested.load(Ordering::SeqCst);
        let db = self.engine.db.clone();
        let outcome = match db.transaction(|tx| self.read_and_apply(tx, outbox)) {
            Ok(outcome) => Some(outcome),
            // No outbox yet (nothing captured): nothing to apply.
            Err(err) if undefined_table(&err) => None,
            Err(err) if sql_state(&err, &SqlState::UNDEFINED_COLUMN) => {
                return Err(err.reworded(
                    "the outbox was made by an older version of cacheaside: run \
                     install_schema() or capture_changes() again to upgrade it",
                ));
            }
            Err(err) => return Err(err),
        };
        if let Some((snapshot, cursor, seen)) = outcome {
            // A write (and a commit to flush) per round would cost more
            // than a horizon that trails by a second: the horizon matters
            // only to the next relay's first round.
            let due = self
                .last_advance
                .is_none_or(|at| at.elapsed() >= ADVANCE_EVERY);
            if (cursor.horizon != Some(snapshot.xmin) && due) || cursor.touch {
                self.advance(outbox, snapshot.xmin)?;
                self.last_advance = Some(Instant::now());
            }
            self.seen = Some(seen);
            if !self.publish()? {
                // Redis lost what this relay had applied: apply it again
                // before anyone hears that the relay caught up (the next
                // publish writes whatever Redis holds).
                return self.round(outbox);
            }
        }
        self.prune(outbox);
        self.engine.counters.relay_rounds.bump();
        if let Some(ticket) = ticket {
            self.engine.breaker.relay_caught_up(ticket);
        }
        let mut served = self.shared.served.lock();
        *served = (*served).max(serving);
        self.shared.served_cv.notify_all();
        Ok(())
    }

    /// The body of a round, in its `REPEATABLE READ` transaction: every
    /// statement sees one snapshot. Returns the snapshot, the cursor as it
    /// was, and what the next round has left to read.
    ///
    /// Which rows are new: outbox ids are handed out at insert time, so a
    /// row below the highest id read may still commit later; but only if
    /// its transaction was invisible to this snapshot, that is in progress
    /// (`xip`) or at or above `xmax`. The next round therefore reads the
    /// rows above the highest id read, and those of exactly these
    /// transactions: never the backlog a long-running transaction holds
    /// the horizon behind.
    fn read_and_apply(
        &mut self,
        tx: &mut Transaction<'_>,
        outbox: &Outbox,
    ) -> Result<(Snapshot, Cursor, Seen)> {
        let (table, cursors) = (&outbox.table, &outbox.cursors);
        // Every read below is a narrow range of an index (the newest ids,
        // one transaction's rows); a plan that scans the outbox instead
        // (statistics of a young, fast-growing table mislead the planner)
        // would cost every round the whole backlog.
        tx.batch_execute(
            "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY;
             SET LOCAL enable_seqscan = off; SET LOCAL enable_hashjoin = off;
             SET LOCAL enable_bitmapscan = off;",
        )?;
        let row = tx
            .query_opt(
                &format!(
                    "SELECT pg_catalog.pg_current_snapshot()::text, c.horizon::text,
                            coalesce(now() - c.updated_at > make_interval(secs => $2), false),
                            coalesce(now() - c.updated_at > make_interval(secs => $2 / 8), true)
                     FROM (SELECT 1) AS one LEFT JOIN {cursors} c ON c.consumer = $1"
                ),
                &[&self.consumer, &self.retention.as_secs_f64()],
            )?
            .ok_or_else(|| Error::new(crate::ErrorKind::Database, "no snapshot row"))?;
        let text: String = row.get(0);
        let snapshot = Snapshot::parse(&text)?;
        let cursor = Cursor {
            horizon: row
                .get::<_, Option<String>>(1)
                .map(|h| parse_xid(&h))
                .transpose()?,
            touch: row.get(3),
        };
        if row.get::<_, bool>(2) {
            report!(
                warn,
                "invalidation relay for namespace {:?} was away longer than the outbox \
                 retention: deleting the namespace's cache entries",
                self.consumer
            );
            let namespace = self.engine.cache.namespace().to_owned();
            self.engine
                .cache
                .delete_in_namespace("", &|key| is_cache_entry(&namespace, key))?;
            self.engine.counters.relay_resets.bump();
            self.seen = None;
        }
        let mut resets = Vec::new();
        let replay = self.replay.take();
        if replay == Some(None) {
            let namespace = self.engine.cache.namespace().to_owned();
            self.engine
                .cache
                .delete_in_namespace("", &|key| is_cache_entry(&namespace, key))?;
        }
        let last_id = match self.seen.clone() {
            None => {
                // Every row of a transaction at or above the horizon (or
                // the snapshot Redis lost back to), in (txid, id) order,
                // which the index walks.
                let horizon = cursor.horizon.unwrap_or(0);
                let from = match replay {
                    Some(Some(xid)) => xid.min(horizon),
                    _ => horizon,
                };
                self.started_from.get_or_insert(horizon);
                self.pages_from(tx, table, from, u64::MAX, i64::MAX, &mut resets)?;
                let top: i64 = tx
                    .query_opt(&format!("SELECT coalesce(max(id), 0) FROM {table}"), &[])?
                    .map_or(0, |r| r.get(0));
                top
            }
            Some(seen) => {
                let mut last_id = seen.last_id;
                // Rows above the highest id read.
                loop {
                    let page = tx.query(
                        &format!(
                            "SELECT id, cache_key, txid::text AS xid, version, reset, tag FROM {table}
                             WHERE id > $1 ORDER BY id LIMIT {PAGE}"
                        ),
                        &[&last_id],
                    )?;
                    let full = page.len() as i64 == PAGE;
                    if let Some(top) = self.apply_page(&page, &mut resets)? {
                        last_id = last_id.max(top.0);
                    }
                    if !full {
                        break;
                    }
                }
                // Rows of the transactions the last snapshot did not see:
                // those in progress then (only those with rows now visible),
                // and those begun since.
                if !seen.pending.is_empty() {
                    let pending: Vec<String> = seen.pending.iter().map(u64::to_string).collect();
                    let landed = tx.query(
                        &format!(
                            "SELECT x::text FROM pg_catalog.unnest($1::text[]::xid8[]) AS x
                             WHERE EXISTS (SELECT 1 FROM {table} WHERE txid = x AND id <= $2)"
                        ),
                        &[&pending, &seen.last_id],
                    )?;
                    for row in landed {
                        let xid = parse_xid(&row.get::<_, String>(0))?;
                        self.pages_from(tx, table, xid, xid, seen.last_id, &mut resets)?;
                    }
                }
                self.pages_from(tx, table, seen.xmax, u64::MAX, seen.last_id, &mut resets)?;
                last_id
            }
        };
        // After the keys' changes: a key re-inserted after the reset (its
        // version starting over) cannot keep a row cached before it.
        for prefix in resets {
            self.reset_prefix(&prefix)?;
            self.engine.counters.relay_invalidations.bump();
        }
        self.last_snapshot = Some(text);
        let seen = Seen {
            last_id,
            pending: snapshot.xip.clone(),
            xmax: snapshot.xmax,
        };
        Ok((snapshot, cursor, seen))
    }

    /// Reads and applies, page by page in (txid, id) order, the rows with
    /// `from <= txid <= to` and `id <= max_id`.
    fn pages_from(
        &mut self,
        tx: &mut Transaction<'_>,
        table: &str,
        from: u64,
        to: u64,
        max_id: i64,
        resets: &mut Vec<String>,
    ) -> Result<()> {
        // (The text column is named `xid`: named `txid`, it would be what
        // ORDER BY sorts, as text.)
        let sql = format!(
            "SELECT id, cache_key, txid::text AS xid, version, reset, tag FROM {table}
             WHERE (txid, id) > ($1::text::xid8, $2) AND txid <= $3::text::xid8 AND id <= $4
             ORDER BY txid, id LIMIT {PAGE}"
        );
        let to = to.to_string();
        // Keyset paging from just below (from, any id).
        let (mut txid, mut id) = (from.saturating_sub(1), i64::MAX);
        loop {
            let page = tx.query(&sql, &[&txid.to_string(), &id, &to, &max_id])?;
            let full = page.len() as i64 == PAGE;
            match self.apply_page(&page, resets)? {
                Some(last) => (id, txid) = last,
                None => break,
            }
            if !full {
                break;
            }
        }
        Ok(())
    }

    /// Applies one page of outbox rows (resets are kept for the end of the
    /// round); returns the last row's (id, txid).
    fn apply_page(
        &mut self,
        page: &[tokio_postgres::Row],
        resets: &mut Vec<String>,
    ) -> Result<Option<(i64, u64)>> {
        let mut changes = Vec::with_capacity(page.len());
        let mut last = None;
        for row in page {
            let change = Change {
                id: row.get(0),
                key: row.get(1),
                txid: parse_xid(&row.get::<_, String>(2))?,
                version: row.get(3),
                reset: row.get(4),
                tag: row.get(5),
            };
            last = Some((change.id, change.txid));
            changes.push(change);
        }
        self.shared
            .rows_read
            .fetch_add(page.len() as u64, Ordering::Relaxed);
        self.shared
            .most_held
            .fetch_max(page.len() as u64, Ordering::Relaxed);
        // Known here even when Redis is out: a load of the key in flight
        // must not hand its row to readers that came after the change.
        for change in &changes {
            if change.tag {
                continue;
            } else if change.reset {
                self.engine.note_prefix_write(&change.key);
            } else {
                self.engine.note_write(&change.key);
            }
        }
        let cache = &self.engine.cache;
        // A key no cache call accepts (a session, a rate limit: anyone who
        // can insert into the outbox could name one) is not ours to delete.
        let keyed: Vec<&Change> = changes
            .iter()
            .filter(|c| !c.reset && !c.tag && crate::keys::check_key(&c.key).is_ok())
            .collect();
        for chunk in keyed.chunks(100) {
            let batch: Vec<(Keys, Option<i64>)> = chunk
                .iter()
                .map(|c| (cache.keys(&c.key), c.version))
                .collect();
            self.engine.raise_captured_fences(&batch)?;
            lease::relay_invalidate(cache, &batch)?;
            self.engine
                .counters
                .relay_invalidations
                .add(chunk.len() as u64);
        }
        let tagged = changes.iter().filter(|c| c.tag).map(|c| c.key.as_str());
        let invalidated = tags::apply(cache, tagged)?;
        self.engine.counters.relay_invalidations.add(invalidated);
        resets.extend(changes.into_iter().filter(|c| c.reset).map(|c| c.key));
        Ok(last)
    }

    /// Deletes the cache entries of every key under `prefix`. Twice: one
    /// `SCAN` may miss a key written while it runs, and a fill of a row
    /// read before the reset writes its value while its lease (taken
    /// before the load) still stands, so such a fill either finds its
    /// lease deleted by the first pass or has stored its value before the
    /// second begins, which then deletes it.
    fn reset_prefix(&self, prefix: &str) -> Result<()> {
        let cache = &self.engine.cache;
        let namespace = cache.namespace().to_owned();
        for _ in 0..2 {
            cache.delete_in_namespace(prefix, &|key| is_cache_entry(&namespace, key))?;
        }
        Ok(())
    }

    fn advance(&self, outbox: &Outbox, horizon: u64) -> Result<()> {
        let cursors = &outbox.cursors;
        self.engine.db.execute(
            &format!(
                "INSERT INTO {cursors} (consumer, horizon) VALUES ($1, $2::text::xid8)
                 ON CONFLICT (consumer) DO UPDATE
                 SET horizon = GREATEST({cursors}.horizon, EXCLUDED.horizon), updated_at = now()"
            ),
            &[&self.consumer, &horizon.to_string()],
        )?;
        Ok(())
    }

    /// Deletes rows past the retention, at most once a minute. Best effort.
    fn prune(&mut self, outbox: &Outbox) {
        if self
            .last_prune
            .is_some_and(|at| at.elapsed() < Duration::from_secs(60))
        {
            return;
        }
        self.last_prune = Some(Instant::now());
        // By id, below the first row young enough to keep: every row under
        // it is older than the retention. (A scan of the old rows, about to
        // go anyway, and no index on created_at for every writer to
        // maintain.)
        let sql = format!(
            "DELETE FROM {t} WHERE id < coalesce(
                 (SELECT id FROM {t}
                  WHERE created_at >= now() - make_interval(secs => $1)
                  ORDER BY id LIMIT 1),
                 (SELECT max(id) + 1 FROM {t}))",
            t = outbox.table
        );
        if let Err(err) = self
            .engine
            .db
            .execute(&sql, &[&self.retention.as_secs_f64()])
        {
            report!(debug, "outbox prune failed: {}", err.chain());
        }
    }
}

/// The database's current snapshot, as text.
fn current_snapshot(conn: &mut DbConn) -> Result<String> {
    Ok(conn
        .query_opt("SELECT pg_catalog.pg_current_snapshot()::text", &[])?
        .map(|row| row.get(0))
        .unwrap_or_default())
}

/// A snapshot, as `pg_current_snapshot()` prints it: `xmin:xmax:xip,…`.
#[derive(Debug, PartialEq)]
struct Snapshot {
    xmin: u64,
    xmax: u64,
    xip: Vec<u64>,
}

impl Snapshot {
    /// True if every transaction that had ended for `earlier` had ended
    /// for this one too.
    fn covers(&self, earlier: &Snapshot) -> bool {
        self.xmax >= earlier.xmax
            && self
                .xip
                .iter()
                .all(|x| *x >= earlier.xmax || earlier.xip.contains(x))
    }

    fn parse(text: &str) -> Result<Snapshot> {
        let mut parts = text.splitn(3, ':');
        let (Some(xmin), Some(xmax), Some(xip)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(Error::new(
                crate::ErrorKind::Database,
                format!("not a snapshot: {text:?}"),
            ));
        };
        Ok(Snapshot {
            xmin: parse_xid(xmin)?,
            xmax: parse_xid(xmax)?,
            xip: xip
                .split(',')
                .filter(|x| !x.is_empty())
                .map(parse_xid)
                .collect::<Result<_>>()?,
        })
    }
}

/// The relay's cursor row as a round found it.
struct Cursor {
    horizon: Option<u64>,
    /// Its timestamp is old enough to refresh even if the horizon did not
    /// move.
    touch: bool,
}

/// What the last round's snapshot left to read: rows above `last_id`, and
/// the rows (whatever their ids) of the transactions it saw in progress
/// (`pending`) or that had not begun (`xmax` and up).
#[derive(Clone, Debug)]
struct Seen {
    last_id: i64,
    pending: Vec<u64>,
    xmax: u64,
}

/// How long a relay's marker lives without being written again (it is
/// written at least every second while the relay runs).
const MARKER_TTL: Duration = Duration::from_secs(60);

/// Writes a relay's marker (`ARGV[1]`) over the value it wrote last
/// (`ARGV[2]`; empty: over anything) and returns nil; or, finding another
/// value (or none, `''`) where its last one should be, writes nothing and
/// returns what it found.
static MARKER: once_cell::sync::Lazy<redis::Script> = once_cell::sync::Lazy::new(|| {
    redis::Script::new(
        r"
        local cur = redis.call('GET', KEYS[1])
        if ARGV[2] == '' or cur == ARGV[2] then
            redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
            if ARGV[2] == '' and cur then return cur end
            return nil
        end
        return cur or ''
        ",
    )
});

/// One outbox row.
struct Change {
    id: i64,
    key: String,
    txid: u64,
    version: Option<i64>,
    /// `key` is a prefix: every key under it changed (a `TRUNCATE`).
    reset: bool,
    /// `key` is a tag: its entries changed.
    tag: bool,
}

/// True for the Redis key of a cache entry of `namespace`: a value
/// (`namespace{key}`) or its lease, lock, writers or floor, and not a
/// pending write-behind record or anything under a name no cache call
/// accepts ([`crate::keys::check_key`]: write-behind's streams, sessions,
/// rate-limit windows): what a reset may delete, since everything else
/// holds data only Redis has.
fn is_cache_entry(namespace: &str, redis_key: &str) -> bool {
    let Some(rest) = redis_key
        .strip_prefix(namespace)
        .and_then(|rest| rest.strip_prefix('{'))
    else {
        return false;
    };
    // A key holds no brace, so the first `}` closes the hash tag.
    let Some((key, suffix)) = rest.split_once('}') else {
        return false;
    };
    matches!(suffix, "" | ":lease" | ":lock" | ":writers" | ":floor")
        && crate::keys::check_key(key).is_ok()
}

fn parse_xid(text: &str) -> Result<u64> {
    text.parse().map_err(|_| {
        Error::new(
            crate::ErrorKind::Database,
            format!("not a transaction id: {text:?}"),
        )
    })
}

/// 42P01 undefined_table.
fn undefined_table(err: &Error) -> bool {
    sql_state(err, &SqlState::UNDEFINED_TABLE)
}

/// The Postgres error behind `err` has `state`. (Through `Error::postgres`:
/// `source()` hands out the shared `Arc`, which does not downcast to the
/// Postgres error.)
fn sql_state(err: &Error, state: &SqlState) -> bool {
    err.postgres().is_some_and(|pg| pg.code() == Some(state))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reset_picks_cache_entries_only() {
        for ns in ["", "app:"] {
            for cached in [
                "{user:1}",
                "{user:1}:lease",
                "{k}:lock",
                "{k}:writers",
                "{k}:floor",
            ] {
                assert!(is_cache_entry(ns, &format!("{ns}{cached}")), "{ns}{cached}");
            }
            for kept in [
                "{user:1}:pending",
                "{write_behind}:stream",
                "{write_behind}:dead",
                "{session:abc}",
                "{rate_limit:ip:1}",
                "{}",
                "user:1",
                "{user:1",
            ] {
                assert!(!is_cache_entry(ns, &format!("{ns}{kept}")), "{ns}{kept}");
            }
        }
        assert!(!is_cache_entry("app:", "app:v2:{user:1}"));
        assert!(!is_cache_entry("app:", "other{user:1}"));
    }

    #[test]
    fn snapshots_parse() {
        assert_eq!(
            Snapshot::parse("10:20:12,15").unwrap(),
            Snapshot {
                xmin: 10,
                xmax: 20,
                xip: vec![12, 15]
            }
        );
        assert_eq!(
            Snapshot::parse("7:7:").unwrap(),
            Snapshot {
                xmin: 7,
                xmax: 7,
                xip: vec![]
            }
        );
        assert!(Snapshot::parse("7:7").is_err());
        assert!(Snapshot::parse("a:7:").is_err());
    }

    #[test]
    fn a_snapshot_covers_an_earlier_one_once_its_ended_transactions_ended() {
        let snap = |xmax, xip: &[u64]| Snapshot {
            xmin: 1,
            xmax,
            xip: xip.to_vec(),
        };
        assert!(snap(20, &[]).covers(&snap(20, &[])));
        assert!(snap(20, &[12]).covers(&snap(20, &[12])));
        assert!(snap(25, &[12, 21]).covers(&snap(20, &[12])));
        // 13 had ended earlier, and is in progress for the later one.
        assert!(!snap(25, &[13]).covers(&snap(20, &[12])));
        // 19 had ended earlier; the later snapshot does not reach it.
        assert!(!snap(19, &[]).covers(&snap(20, &[])));
    }
}
