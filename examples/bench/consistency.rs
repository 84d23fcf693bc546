//! (17) Consistency as a number (Polaris-style): readers and writers over
//! every write path at once (write then `invalidate`, `write_through`,
//! direct SQL that only the relay invalidates, write-behind) on a table,
//! outbox and namespace of the section's own, for a fixed count of writes.
//!
//! - Every write that returned is checked d = 0.1 s and 1 s (and 10 s in
//!   the full run) after it returned: the cache is consistent for it when
//!   the key is not cached, or caches that write or a newer one, or caches
//!   exactly what Postgres holds now (a write another one overtook). A
//!   check reads the entry, then (only when it is older) the row, then the
//!   entry again, and counts it inconsistent only if the entry did not
//!   change meanwhile.
//! - Every read is checked afterwards against the writes' real-time order:
//!   it is stale when it returned the value of a write X although some
//!   write W began after X had returned and returned before the read began
//!   (linearizability would have answered W or newer). Direct SQL is
//!   counted apart: its writer does not touch the cache, so until the relay
//!   applies it (milliseconds) a read may legitimately not see it.
//!
//! 2 000 writes in the quick run, 20 000 in the full one (about 450 writes
//! a second on the 2-core machine of the README: 10^6 would take most of
//! an hour); `CACHEASIDE_BENCH_CONSISTENCY_WRITES=N` asks for N.
//!
//! Every value is a write's id (taken when the write begins), and every
//! path stores it with `version = id` only over an older version, so
//! versions are one order across paths.
//!
//! One fault is injected: the relay's listening connection is killed
//! (`pg_terminate_backend`) every 2 s (every 500 ms in the quick run); the
//! relay reconnects and catches up. The inspector runs beside it all, every
//! 100 ms. Not injected yet: a Redis restarted from an older snapshot, a
//! process SIGKILLed between commit and invalidation (`tests/relay.rs`
//! covers that one alone).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use cacheaside::{CacheAside, Db, Mode};
use serde_json::{Value, json};

use crate::fixture::{Bench, bench_config};
use crate::report::{Section, Target};
use crate::{BoxError, BoxResult};

/// The write paths, in the order of the report.
const PATHS: [&str; 4] = ["invalidate", "write-through", "direct SQL", "write-behind"];
const DIRECT: usize = 2;

/// One write that returned.
#[derive(Clone, Copy)]
struct Write {
    key: usize,
    id: u64,
    /// The value it made current: its id, or for a write-through that a
    /// newer write overtook, the row it found and cached again.
    stored: u64,
    path: usize,
    /// Nanoseconds since the run began.
    start: u64,
    end: u64,
}

/// One read: when it began, and whose value it returned.
struct Read {
    key: usize,
    start: u64,
    id: u64,
}

/// The checks at one delay.
#[derive(Clone, Default)]
struct Checked {
    delay: Duration,
    checked: u64,
    inconsistent: [u64; 4],
    /// How much later than due the latest check ran.
    max_late: Duration,
}

/// What the inspector found while the run went on.
#[derive(Default)]
struct Inspected {
    rounds: u64,
    inspected: u64,
    stale: u64,
    /// The longest a finding had been stale (from the outbox).
    max_age: Duration,
    /// Findings whose age the outbox could not tell.
    unknown_age: u64,
}

pub struct Consistency {
    writes: u64,
    write_errors: u64,
    keys: usize,
    writers: usize,
    readers: usize,
    secs: f64,
    checks: Vec<Checked>,
    reads: u64,
    /// Stale reads, by the path of the write they missed.
    stale_reads: [u64; 4],
    /// Times the relay's listening connection was killed, and how often.
    relay_kills: u64,
    kill_every: Duration,
    /// The inspector during the run (every 100 ms, every key).
    inspected_during: Inspected,
    /// One inspection of every key once the relay and the workers were
    /// done: what it found, and its cost.
    inspected_after: cacheaside::InspectReport,
}

pub fn measure(bench: &Bench) -> BoxResult<Consistency> {
    let quick = bench.plan.quick;
    let count: u64 = std::env::var("CACHEASIDE_BENCH_CONSISTENCY_WRITES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(if quick { 2_000 } else { 20_000 });
    let delays: Vec<Duration> = if quick {
        vec![Duration::from_millis(100), Duration::from_secs(1)]
    } else {
        vec![
            Duration::from_millis(100),
            Duration::from_secs(1),
            Duration::from_secs(10),
        ]
    };
    let keys = 64;
    let (writers, readers) = (4, 4);
    eprintln!(
        "bench: consistency: {count} writes over {} paths, {keys} keys, {writers} writers, {readers} readers...",
        PATHS.len()
    );
    let setup = Setup::create(keys)?;
    let ids = AtomicU64::new(1);
    let writes_done = AtomicBool::new(false);
    let errors = AtomicU64::new(0);
    let started = Instant::now();
    let ns = |t: Instant| t.duration_since(started).as_nanos() as u64;
    let senders_and_checks: Vec<(mpsc::Sender<Write>, mpsc::Receiver<Write>)> =
        delays.iter().map(|_| mpsc::channel()).collect();
    let (senders, receivers): (Vec<_>, Vec<_>) = senders_and_checks.into_iter().unzip();
    let all_writes = Mutex::new(Vec::with_capacity(count as usize));
    let all_reads = Mutex::new(Vec::new());
    let inspected_during = Mutex::new(Inspected::default());
    let relay_kills = Mutex::new(0_u64);
    let kill_every = if quick {
        Duration::from_millis(500)
    } else {
        Duration::from_secs(2)
    };
    let checks: Vec<Checked> = thread::scope(|s| -> BoxResult<Vec<Checked>> {
        let checkers: Vec<_> = receivers
            .into_iter()
            .zip(&delays)
            .map(|(rx, &delay)| {
                let setup = &setup;
                s.spawn(move || setup.checker(rx, delay, started))
            })
            .collect();
        let mut handles = Vec::new();
        for w in 0..writers {
            let senders = senders.clone();
            let (setup, ids, errors, all_writes) = (&setup, &ids, &errors, &all_writes);
            handles.push(s.spawn(move || {
                let mut rng = fastrand::Rng::with_seed(w as u64 + 1);
                let mut mine = Vec::new();
                loop {
                    let start = Instant::now();
                    let id = ids.fetch_add(1, Ordering::SeqCst);
                    if id > count {
                        break;
                    }
                    let key = rng.usize(..setup.keys);
                    let path = (id as usize) % PATHS.len();
                    match setup.write(path, key, id) {
                        Ok(stored) => {
                            let end = Instant::now();
                            let write = Write {
                                key,
                                id,
                                stored,
                                path,
                                start: ns(start),
                                end: ns(end),
                            };
                            for tx in &senders {
                                let _ = tx.send(write);
                            }
                            mine.push(write);
                        }
                        Err(err) => {
                            if errors.fetch_add(1, Ordering::Relaxed) < 3 {
                                eprintln!(
                                    "bench: consistency: a {} write failed: {err}",
                                    PATHS[path]
                                );
                            }
                        }
                    }
                }
                all_writes.lock().unwrap().extend(mine);
            }));
        }
        drop(senders);
        // The inspector beside them, as it would run in production.
        let inspector = {
            let (setup, writes_done) = (&setup, &writes_done);
            s.spawn(move || {
                let mut seen = Inspected::default();
                while !writes_done.load(Ordering::SeqCst) {
                    if let Ok(report) = setup.engine.inspect(setup.keys) {
                        seen.rounds += 1;
                        seen.inspected += report.inspected;
                        for stale in &report.stale {
                            seen.stale += 1;
                            match stale.stale_for {
                                Some(age) => seen.max_age = seen.max_age.max(age),
                                None => seen.unknown_age += 1,
                            }
                        }
                    }
                    thread::sleep(Duration::from_millis(100));
                }
                seen
            })
        };
        // A fault: the relay's listening connection is killed every
        // `kill_every`; it must reconnect and catch up.
        let killer = {
            let (setup, writes_done) = (&setup, &writes_done);
            s.spawn(move || {
                let mut kills = 0_u64;
                let mut next = Instant::now() + kill_every;
                while !writes_done.load(Ordering::SeqCst) {
                    if Instant::now() >= next {
                        kills += setup.kill_relay_connection();
                        next = Instant::now() + kill_every;
                    }
                    thread::sleep(Duration::from_millis(10));
                }
                kills
            })
        };
        let mut reader_handles = Vec::new();
        for r in 0..readers {
            let (setup, writes_done, all_reads) = (&setup, &writes_done, &all_reads);
            reader_handles.push(s.spawn(move || {
                let mut rng = fastrand::Rng::with_seed(1000 + r as u64);
                let mut mine = Vec::new();
                while !writes_done.load(Ordering::SeqCst) {
                    let key = rng.usize(..setup.keys);
                    let start = Instant::now();
                    if let Ok(Some(id)) = setup.read(key) {
                        mine.push(Read {
                            key,
                            start: ns(start),
                            id,
                        });
                    }
                }
                all_reads.lock().unwrap().extend(mine);
            }));
        }
        for h in handles {
            h.join().map_err(|_| "a consistency writer panicked")?;
        }
        writes_done.store(true, Ordering::SeqCst);
        for h in reader_handles {
            h.join().map_err(|_| "a consistency reader panicked")?;
        }
        *relay_kills.lock().unwrap() = killer.join().map_err(|_| "the relay killer panicked")?;
        *inspected_during.lock().unwrap() = inspector
            .join()
            .map_err(|_| "the consistency inspector panicked")?;
        checkers
            .into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| BoxError::from("a consistency checker panicked"))
            })
            .collect()
    })?;
    let secs = started.elapsed().as_secs_f64();
    let writes = all_writes.into_inner().unwrap();
    let reads = all_reads.into_inner().unwrap();
    let stale_reads = stale_reads(&writes, &reads, keys);
    setup.engine.drain_write_behind(Duration::from_secs(30))?;
    let inspected_during = inspected_during.into_inner().unwrap();
    let relay_kills = relay_kills.into_inner().unwrap();
    setup.engine.sync_relay(Duration::from_secs(30));
    let inspected_after = setup.engine.inspect(keys)?;
    Ok(Consistency {
        relay_kills,
        kill_every,
        inspected_during,
        inspected_after,
        writes: writes.len() as u64,
        write_errors: errors.load(Ordering::Relaxed),
        keys,
        writers,
        readers,
        secs,
        checks,
        reads: reads.len() as u64,
        stale_reads,
    })
}

/// Stale reads by the path of the write missed: a read that returned
/// write X's value is stale when a write W began after X returned and
/// returned before the read began. (A value a write-through stored again
/// counts as written by whichever of the two returned later.)
fn stale_reads(writes: &[Write], reads: &[Read], keys: usize) -> [u64; 4] {
    let mut ends: HashMap<u64, u64> = HashMap::new();
    for w in writes {
        let end = ends.entry(w.stored).or_insert(0);
        *end = (*end).max(w.end);
    }
    // Per key: writes by end, and the running latest start (with its path).
    let mut by_key: Vec<Vec<Write>> = vec![Vec::new(); keys];
    for w in writes {
        by_key[w.key].push(*w);
    }
    let mut prefix: Vec<Vec<(u64, u64, usize)>> = Vec::with_capacity(keys);
    for list in &mut by_key {
        list.sort_by_key(|w| w.end);
        let mut best: Option<(u64, usize)> = None;
        prefix.push(
            list.iter()
                .map(|w| {
                    if best.is_none_or(|(s, _)| w.start > s) {
                        best = Some((w.start, w.path));
                    }
                    let (start, path) = best.unwrap_or((0, 0));
                    (w.end, start, path)
                })
                .collect(),
        );
    }
    let mut stale = [0; 4];
    for r in reads {
        // The initial row (id 0) was there before anything began.
        let x_end = if r.id == 0 {
            0
        } else {
            match ends.get(&r.id) {
                Some(&end) => end,
                None => continue, // a write that failed but committed
            }
        };
        let list = &prefix[r.key];
        let n = list.partition_point(|(end, ..)| *end < r.start);
        if n > 0 {
            let (_, latest_start, path) = list[n - 1];
            if latest_start > x_end {
                stale[path] += 1;
            }
        }
    }
    stale
}

/// The section's table, outbox, namespace and engine; dropped, it removes
/// them all.
struct Setup {
    engine: CacheAside,
    /// Another connection pool, for the direct SQL path.
    outsider: Db,
    table: String,
    outbox: String,
    keys: usize,
    ttl: Duration,
}

impl Setup {
    fn create(keys: usize) -> BoxResult<Setup> {
        let pid = std::process::id();
        let mut config = bench_config(&format!("bench:{pid}:consistency:"))?;
        config.outbox_table = format!("bench_consistency_outbox_{pid}");
        config.cache_pool_size = 32;
        config.db_pool_size = 16;
        let table = format!("bench_consistency_{pid}");
        let engine = CacheAside::open(&config)?;
        let outsider = Db::connect(&config)?;
        let setup = Setup {
            engine,
            outsider,
            table: table.clone(),
            outbox: config.outbox_table.clone(),
            keys,
            ttl: config.ttl,
        };
        setup.engine.db().batch_execute(&format!(
            "DROP TABLE IF EXISTS {table};
             CREATE TABLE {table} (id bigint PRIMARY KEY, val bigint NOT NULL, version bigint NOT NULL);
             INSERT INTO {table} SELECT g, 0, 0 FROM generate_series(0, {}) g;",
            keys - 1
        ))?;
        setup
            .engine
            .capture_changes(&table, "c:", "id", Some("version"))?;
        let update = setup.update_sql();
        setup
            .engine
            .register_write_behind("c:", move |tx, changes| {
                for change in changes {
                    let id: i64 = change.key["c:".len()..]
                        .parse()
                        .map_err(cacheaside::Error::invalid_argument)?;
                    let val: i64 = serde_json::from_slice(change.json)
                        .map_err(cacheaside::Error::invalid_argument)?;
                    tx.execute(&update, &[&id, &val])?;
                }
                Ok(())
            })?;
        setup.engine.start_write_behind(2)?;
        setup.engine.sync_relay(Duration::from_secs(30));
        Ok(setup)
    }

    /// Sets the row to write `$2` unless a newer write is there.
    fn update_sql(&self) -> String {
        format!(
            "UPDATE {} SET val = $2, version = $2 WHERE id = $1 AND version < $2 RETURNING val, version",
            self.table
        )
    }

    fn cache_key(key: usize) -> String {
        format!("c:{key}")
    }

    /// Runs write `id` on `path`; returns the value it made current.
    fn write(&self, path: usize, key: usize, id: u64) -> cacheaside::Result<u64> {
        let cache_key = Setup::cache_key(key);
        let (row, val) = (key as i64, id as i64);
        match path {
            0 => {
                self.engine
                    .db()
                    .execute(&self.update_sql(), &[&row, &val])?;
                self.engine.invalidate(&cache_key).map(|()| id)
            }
            1 => {
                // A write another one overtook stores nothing, and returns
                // the row that is there: read by a statement of its own,
                // since the UPDATE's snapshot predates the commit that
                // overtook it (a CTE would return the row before both).
                let (update, select) = (
                    self.update_sql(),
                    format!("SELECT val, version FROM {} WHERE id = $1", self.table),
                );
                let db = self.engine.db().clone();
                self.engine
                    .write_through(&cache_key, self.ttl, move || {
                        let row = match db.query_opt(&update, &[&row, &val])? {
                            Some(updated) => Some(updated),
                            None => db.query_opt(&select, &[&row])?,
                        };
                        Ok(row.map(|r| (r.get::<_, i64>(0), r.get::<_, i64>(1) as u64)))
                    })
                    .map(|stored| stored.map_or(id, |v| v as u64))
            }
            DIRECT => self
                .outsider
                .execute(&self.update_sql(), &[&row, &val])
                .map(|_| id),
            _ => self
                .engine
                .write_behind(&cache_key, self.ttl, &val)
                .map(|_| id),
        }
    }

    fn read(&self, key: usize) -> cacheaside::Result<Option<u64>> {
        let sql = format!("SELECT val, version FROM {} WHERE id = $1", self.table);
        let db = self.engine.db();
        let row = key as i64;
        let val: Option<i64> = self.engine.get_or_load_versioned(
            &Setup::cache_key(key),
            self.ttl,
            Mode::SingleFlight,
            || {
                Ok(db
                    .query_opt(&sql, &[&row])?
                    .map(|r| (r.get::<_, i64>(0), r.get::<_, i64>(1) as u64)))
            },
        )?;
        Ok(val.map(|v| v as u64))
    }

    /// The cached value (a write id) of `key`, `None` when not cached, and
    /// the raw entry.
    fn cached(&self, key: usize) -> cacheaside::Result<(Option<u64>, Option<Vec<u8>>)> {
        let redis_key = self.engine.cache().redis_key(&Setup::cache_key(key));
        let raw: Option<Vec<u8>> = self
            .engine
            .cache()
            .with_connection(|c| redis::cmd("GET").arg(&redis_key).query(c))?;
        let id = raw.as_deref().and_then(|raw| {
            let newline = raw.iter().position(|&b| b == b'\n')?;
            let head = std::str::from_utf8(&raw[..newline]).ok()?;
            if !head.starts_with("ca1 v ") {
                return Some(0); // an absence: no row is absent here
            }
            std::str::from_utf8(&raw[newline + 1..]).ok()?.parse().ok()
        });
        Ok((id, raw))
    }

    /// Terminates the relay's listening connection (by its
    /// `application_name`); returns how many backends went.
    fn kill_relay_connection(&self) -> u64 {
        let mut name = format!("relay:{}", self.outbox);
        name.truncate(63);
        self.outsider
            .query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
                &[&name],
            )
            .map_or(0, |rows| rows.len() as u64)
    }

    /// Is the cache consistent for `write` now?
    fn consistent(&self, write: &Write) -> bool {
        for _ in 0..3 {
            let Ok((cached, raw)) = self.cached(write.key) else {
                return false;
            };
            let Some(cached) = cached else { return true };
            if cached >= write.id {
                return true;
            }
            let sql = format!("SELECT val FROM {} WHERE id = $1", self.table);
            let Ok(Some(row)) = self.outsider.query_opt(&sql, &[&(write.key as i64)]) else {
                return false;
            };
            let in_postgres: i64 = row.get(0);
            let Ok((_, again)) = self.cached(write.key) else {
                return false;
            };
            if again == raw {
                return cached == in_postgres as u64;
            }
            // The entry changed while we looked: look again.
        }
        false
    }

    /// Checks every write `delay` after it returned.
    fn checker(&self, rx: mpsc::Receiver<Write>, delay: Duration, started: Instant) -> Checked {
        let mut out = Checked {
            delay,
            ..Checked::default()
        };
        for write in rx {
            let due = started + Duration::from_nanos(write.end) + delay;
            let now = Instant::now();
            if due > now {
                thread::sleep(due - now);
            } else {
                out.max_late = out.max_late.max(now - due);
            }
            out.checked += 1;
            if !self.consistent(&write) {
                out.inconsistent[write.path] += 1;
            }
        }
        out
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        self.engine.stop_write_behind();
        self.engine.stop_relay();
        let outbox = &self.outbox;
        let dropped = self.engine.db().batch_execute(&format!(
            "DROP TABLE IF EXISTS {}, {outbox}_cursors, {outbox};
             DROP FUNCTION IF EXISTS {outbox}_capture(), {outbox}_bump();",
            self.table
        ));
        if let Err(err) = dropped {
            eprintln!("bench: consistency: could not drop {}: {err}", self.table);
        }
        // The write-behind streams go with the namespace: the run owns it.
        let _ = self.engine.cache().delete_namespace();
    }
}

/// "N nines": -log10 of the fraction; with none, more than log10(total).
fn nines(bad: u64, total: u64) -> String {
    match (bad, total) {
        (_, 0) => "-".into(),
        (0, t) => format!("> {:.1}", (t as f64).log10()),
        (b, t) => format!("{:.1}", -(b as f64 / t as f64).log10()),
    }
}

impl Consistency {
    fn at(&self, delay: Duration) -> Option<&Checked> {
        self.checks.iter().find(|c| c.delay == delay)
    }

    fn library_stale_reads(&self) -> u64 {
        self.stale_reads
            .iter()
            .enumerate()
            .filter(|(p, _)| *p != DIRECT)
            .map(|(_, n)| n)
            .sum()
    }
}

impl Section for Consistency {
    fn markdown(&self, md: &mut String) {
        let _ = writeln!(
            md,
            "\n### Consistency (17): every write checked after d, every read against the writes before it\n"
        );
        let _ = writeln!(
            md,
            "{} writes that returned ({} failed), a quarter on each path, over {} keys by {} writers, with {} readers, in {:.1} s. Fault: the relay's listening connection killed every {} ms ({} times).\n",
            self.writes,
            self.write_errors,
            self.keys,
            self.writers,
            self.readers,
            self.secs,
            self.kill_every.as_millis(),
            self.relay_kills
        );
        md.push_str("| d | writes checked | inconsistent | by path (invalidate / write-through / direct SQL / write-behind) | nines | latest check late by |\n|---|---:|---:|---|---:|---:|\n");
        for c in &self.checks {
            let bad: u64 = c.inconsistent.iter().sum();
            let _ = writeln!(
                md,
                "| {:.1} s | {} | {} | {} | {} | {:.0} ms |",
                c.delay.as_secs_f64(),
                c.checked,
                bad,
                c.inconsistent.map(|n| n.to_string()).join(" / "),
                nines(bad, c.checked),
                c.max_late.as_secs_f64() * 1e3
            );
        }
        let lib = self.library_stale_reads();
        let direct = self.stale_reads[DIRECT];
        let _ = writeln!(
            md,
            "\nReads: {} checked. Stale (returned a row older than a write that returned before the read began): {} missed a write of the library's paths ({:.6}%; invalidate / write-through / write-behind: {} / {} / {}), {} missed a direct SQL write not yet relayed ({:.6}%).",
            self.reads,
            lib,
            100.0 * lib as f64 / self.reads.max(1) as f64,
            self.stale_reads[0],
            self.stale_reads[1],
            self.stale_reads[3],
            direct,
            100.0 * direct as f64 / self.reads.max(1) as f64,
        );
        let after = &self.inspected_after;
        let _ = writeln!(
            md,
            "\nInspector: during the run, {} rounds (every 100 ms, all {} keys) compared {} entries and found {} stale, each confirmed by a second read, stale for at most {:.1} ms ({} of unknown age): a write between its commit and its cache step (the writer's invalidation or store, or the relay's for direct SQL) looks stale that long. Afterwards one round compared {} entries, found {} stale, and cost {} Redis round trips, {} Postgres queries and {:.1} ms.",
            self.inspected_during.rounds,
            self.keys,
            self.inspected_during.inspected,
            self.inspected_during.stale,
            self.inspected_during.max_age.as_secs_f64() * 1e3,
            self.inspected_during.unknown_age,
            after.inspected,
            after.stale.len(),
            after.redis_round_trips,
            after.postgres_queries,
            after.took.as_secs_f64() * 1e3,
        );
    }

    fn targets(&self) -> Vec<Target> {
        let one = self.at(Duration::from_secs(1));
        let bad = one.map(|c| c.inconsistent.iter().sum::<u64>());
        vec![
            Target {
                name: "consistency: writes inconsistent 1 s after they returned".into(),
                value: match (bad, one) {
                    (Some(b), Some(c)) => format!("{b} of {}", c.checked),
                    _ => "not measured".into(),
                },
                limit: "0".into(),
                met: bad.map(|b| b == 0),
            },
            Target {
                name: "consistency: reads that missed a library write before them".into(),
                value: format!("{} of {}", self.library_stale_reads(), self.reads),
                limit: "0".into(),
                met: Some(self.library_stale_reads() == 0),
            },
        ]
    }

    fn json(&self) -> Option<(&'static str, Value)> {
        let checks: Vec<Value> = self
            .checks
            .iter()
            .map(|c| {
                let paths: serde_json::Map<String, Value> = PATHS
                    .iter()
                    .zip(c.inconsistent)
                    .map(|(p, n)| ((*p).to_owned(), json!(n)))
                    .collect();
                json!({
                    "d_s": c.delay.as_secs_f64(),
                    "writes_checked": c.checked,
                    "inconsistent": c.inconsistent.iter().sum::<u64>(),
                    "inconsistent_by_path": paths,
                    "max_late_ms": c.max_late.as_secs_f64() * 1e3,
                })
            })
            .collect();
        Some((
            "consistency",
            json!({
                "writes": self.writes,
                "relay_connection_kills": self.relay_kills,
                "write_errors": self.write_errors,
                "keys": self.keys,
                "writers": self.writers,
                "readers": self.readers,
                "secs": self.secs,
                "checks": checks,
                "reads": self.reads,
                "stale_reads_library_paths": self.library_stale_reads(),
                "stale_reads_direct_sql": self.stale_reads[DIRECT],
                "inspector_during": {
                    "rounds": self.inspected_during.rounds,
                    "inspected": self.inspected_during.inspected,
                    "stale": self.inspected_during.stale,
                    "max_stale_ms": self.inspected_during.max_age.as_secs_f64() * 1e3,
                    "unknown_age": self.inspected_during.unknown_age,
                },
                "inspector_after": {
                    "inspected": self.inspected_after.inspected,
                    "stale": self.inspected_after.stale.len(),
                    "redis_round_trips": self.inspected_after.redis_round_trips,
                    "postgres_queries": self.inspected_after.postgres_queries,
                    "ms": self.inspected_after.took.as_secs_f64() * 1e3,
                },
            }),
        ))
    }
}
