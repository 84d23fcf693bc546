//! (16) Capture under writers: what the capture trigger costs concurrent
//! writers of a captured table, how soon their commits reach the cache at a
//! steady write rate, and what the relays cost when many processes hold
//! clients.
//!
//! - Writers: 1, 16 and 64 threads, each on its own connection, updating
//!   random rows of a 10,000-row table for a while: see [`KINDS`]. TPS and
//!   p99.
//! - Commit → invalidation at a steady 1,000 writes/s: for every tenth
//!   write, a cached key is watched from the commit until the relay has
//!   deleted it. p50, p99, max.
//! - Relay work with 1 and 8 clients (each runs a relay, as each process
//!   would): 16 writers' TPS, and outbox rows read (Postgres's own counters
//!   of the outbox table) per row written.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Barrier, mpsc};
use std::time::{Duration, Instant};

use cacheaside::{Client, Db};
use serde_json::{Value, json};

use crate::BoxResult;
use crate::fixture::Bench;
use crate::measure::quantile_us;
use crate::report::{Section, Target};

/// Rows of each table the writers update.
const ROWS: i64 = 10_000;

/// What the writers update: a table without triggers; the capture
/// trigger with no relay running (the baseline: the trigger
/// without `pg_notify`); capture with the relay running (what a user
/// runs); and the trigger as it was, with a `pg_notify` per row.
const KINDS: [&str; 4] = [
    "no trigger",
    "capture trigger, relay stopped",
    "capture (relay running)",
    "capture + pg_notify per row (before)",
];

/// Each kind's table (index into the tables made) and whether the relay
/// runs meanwhile.
const CELLS: [(usize, bool); 4] = [(0, true), (1, false), (1, true), (2, true)];

/// One cell of the writers' table: (kind, writers, (TPS, p99 ms) or the
/// error it met).
type Cell = (String, usize, Result<(f64, f64), String>);

pub struct Capture {
    writers: Vec<Cell>,
    /// Commit → invalidation, ms, at `rate` writes/s.
    invalidation_ms: Vec<f64>,
    rate: u32,
    /// (clients, writer TPS, outbox rows read per row written).
    fanout: Vec<(String, f64, Option<f64>)>,
    seconds: f64,
    reps: usize,
}

pub fn measure(bench: &Bench) -> BoxResult<Capture> {
    let quick = bench.plan.quick;
    let seconds = if quick { 0.5 } else { 2.0 };
    eprintln!("bench: capture: writers on captured tables, commit-to-invalidation...");
    let client = bench.client();
    let mut config = bench.config.clone();
    // The writers share this pool with the run's client's (32): 64 writers
    // take 32 connections of each, so the run never needs more than the
    // server's 100 at once (the run's client already holds its 32).
    config.db_pool_size = 34;
    let db = Db::connect(&config)?;
    let base = client.users_table().to_owned();
    let tables: Vec<String> = (0..3).map(|i| format!("{base}_cap{i}")).collect();
    let outbox = &bench.config.outbox_table;
    for (i, table) in tables.iter().enumerate() {
        db.batch_execute(&format!(
            "DROP TABLE IF EXISTS {table};
             CREATE TABLE {table} (id bigint PRIMARY KEY, n bigint NOT NULL);
             INSERT INTO {table} SELECT g, 0 FROM generate_series(1, {ROWS} + 200) g;"
        ))?;
        if i > 0 {
            client
                .engine()
                .capture_changes(table, &format!("cap{i}:"), "id", None)?;
        }
    }
    // The trigger as it was: the same capture, and a pg_notify per row.
    db.batch_execute(&format!(
        "CREATE OR REPLACE FUNCTION {outbox}_notify_row() RETURNS trigger
         LANGUAGE plpgsql AS $fn$
         BEGIN
             PERFORM pg_notify('{outbox}', '');
             RETURN NULL;
         END $fn$;
         CREATE TRIGGER cacheaside_notify AFTER INSERT OR UPDATE OR DELETE ON {t2}
         FOR EACH ROW EXECUTE FUNCTION {outbox}_notify_row();",
        t2 = tables[2]
    ))?;
    let outcome = run(bench, &db, &tables, seconds);
    let _ = db.batch_execute(&format!(
        "DROP TABLE IF EXISTS {}; DROP FUNCTION IF EXISTS {outbox}_notify_row();",
        tables.join(", ")
    ));
    outcome
}

fn run(bench: &Bench, db: &Db, tables: &[String], seconds: f64) -> BoxResult<Capture> {
    let client = bench.client();
    let span = Duration::from_secs_f64(seconds);
    // Repetitions taking turns (on a shared machine a burst of load
    // elsewhere lands on one cell); each cell reports its median.
    let reps = if bench.plan.quick { 2 } else { 5 };
    let mut runs: Vec<Vec<Result<(f64, f64), String>>> = vec![Vec::new(); 3 * KINDS.len()];
    for _ in 0..reps {
        for (i, n) in [1, 16, 64].into_iter().enumerate() {
            for (k, (table, relay)) in CELLS.into_iter().enumerate() {
                if !relay {
                    client.engine().stop_relay();
                }
                let pools = [client.db(), db];
                let cell = write_for(&pools, &tables[table], n, span).map_err(|e| e.to_string());
                client.engine().start_relay();
                client.engine().sync_relay(Duration::from_secs(60));
                runs[i * KINDS.len() + k].push(cell);
            }
        }
    }
    let mut writers = Vec::new();
    for (i, n) in [1, 16, 64].into_iter().enumerate() {
        for (k, kind) in KINDS.iter().enumerate() {
            writers.push((kind.to_string(), n, median_cell(&runs[i * KINDS.len() + k])));
        }
    }
    let rate = 1000;
    let invalidation_ms = steady(client, db, &tables[1], rate, span * 4)?;
    let mut fanout = Vec::new();
    for (clients, deploy) in [(1, false), (8, false), (8, true)] {
        fanout.push(relay_work(
            bench,
            db,
            &tables[1],
            clients,
            deploy,
            span * 2,
        )?);
    }
    Ok(Capture {
        writers,
        invalidation_ms,
        rate,
        fanout,
        seconds,
        reps,
    })
}

/// The median TPS and the median p99 of a cell's repetitions, or the
/// first error.
fn median_cell(reps: &[Result<(f64, f64), String>]) -> Result<(f64, f64), String> {
    let mut tps = Vec::new();
    let mut p99 = Vec::new();
    for rep in reps {
        let (t, p) = rep.clone()?;
        tps.push(t);
        p99.push(p);
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    };
    Ok((median(tps), median(p99)))
}

/// `n` threads updating random rows of `table` for `span`: (TPS, p99 ms).
/// `n` writers, writer `i` on pool `i % pools.len()`.
fn write_for(pools: &[&Db], table: &str, n: usize, span: Duration) -> BoxResult<(f64, f64)> {
    let sql = format!("UPDATE {table} SET n = n + 1 WHERE id = $1");
    let barrier = Barrier::new(n);
    let results: Vec<BoxResult<Vec<u64>>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .map(|i| {
                let (db, sql, barrier) = (pools[i % pools.len()], &sql, &barrier);
                s.spawn(move || -> BoxResult<Vec<u64>> {
                    let mut lat = Vec::new();
                    barrier.wait();
                    let end = Instant::now() + span;
                    while Instant::now() < end {
                        let id = fastrand::i64(1..=ROWS);
                        let t = Instant::now();
                        db.execute(sql, &[&id])?;
                        lat.push(t.elapsed().as_nanos() as u64);
                    }
                    Ok(lat)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err("writer panicked".into())))
            .collect()
    });
    let mut all = Vec::new();
    for r in results {
        all.extend(r?);
    }
    all.sort_unstable();
    Ok((
        all.len() as f64 / span.as_secs_f64(),
        quantile_us(&all, 0.99) / 1e3,
    ))
}

/// Writes at `rate`/s for `span` from 4 paced threads; every tenth write
/// goes to a watched row whose cache key is set beforehand, and a watcher
/// times commit → the key gone. Returns the latencies, ms.
fn steady(client: &Client, db: &Db, table: &str, rate: u32, span: Duration) -> BoxResult<Vec<f64>> {
    let sql = format!("UPDATE {table} SET n = n + 1 WHERE id = $1");
    let cache = client.cache();
    let (tx, rx) = mpsc::channel::<(String, Instant)>();
    let done = AtomicBool::new(false);
    let threads = 4_u32;
    let per_thread = Duration::from_secs_f64(f64::from(threads) / f64::from(rate));
    std::thread::scope(|s| -> BoxResult<Vec<f64>> {
        let done = &done;
        let watcher = s.spawn(move || -> BoxResult<Vec<f64>> {
            let mut watched: Vec<(String, Instant)> = Vec::new();
            let mut out = Vec::new();
            loop {
                while let Ok(w) = rx.try_recv() {
                    watched.push(w);
                }
                if watched.is_empty() {
                    if done.load(Ordering::SeqCst) {
                        return Ok(out);
                    }
                    std::thread::sleep(Duration::from_micros(200));
                    continue;
                }
                let keys: Vec<&String> = watched.iter().map(|(k, _)| k).collect();
                let exists: Vec<bool> = cache.with_connection(|c| {
                    let mut pipe = redis::pipe();
                    for k in &keys {
                        pipe.cmd("EXISTS").arg(*k);
                    }
                    pipe.query(c)
                })?;
                let now = Instant::now();
                let mut i = 0;
                watched.retain(|(_, at)| {
                    let keep = exists[i];
                    i += 1;
                    if !keep {
                        out.push(now.duration_since(*at).as_secs_f64() * 1e3);
                    }
                    keep
                });
                if watched
                    .iter()
                    .any(|(_, at)| at.elapsed() > Duration::from_secs(10))
                {
                    return Err("the relay did not invalidate within 10 s".into());
                }
                std::thread::sleep(Duration::from_micros(200));
            }
        });
        let writers: Vec<_> = (0..threads)
            .map(|w| {
                let (tx, sql) = (tx.clone(), &sql);
                s.spawn(move || -> BoxResult<()> {
                    let start = Instant::now();
                    let mut i: u64 = 0;
                    while start.elapsed() < span {
                        let due = start + per_thread * i as u32;
                        if let Some(wait) = due.checked_duration_since(Instant::now()) {
                            std::thread::sleep(wait);
                        }
                        i += 1;
                        if i.is_multiple_of(10) {
                            // A watched row of this thread's own: 200 spare
                            // rows above the writers' range.
                            let id = ROWS + 1 + i64::from(w) * 50 + (i / 10 % 50) as i64;
                            let key = cache.redis_key(&format!("cap1:{id}"));
                            cache.with_connection(|c| {
                                redis::cmd("SET")
                                    .arg(&key)
                                    .arg("x")
                                    .arg("PX")
                                    .arg(60_000)
                                    .query::<()>(c)
                            })?;
                            db.execute(sql, &[&id])?;
                            let _ = tx.send((key, Instant::now()));
                        } else {
                            db.execute(sql, &[&fastrand::i64(1..=ROWS)])?;
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        drop(tx);
        let mut first_err = None;
        for w in writers {
            if let Err(e) = w.join().unwrap_or_else(|_| Err("writer panicked".into())) {
                first_err.get_or_insert(e);
            }
        }
        done.store(true, Ordering::SeqCst);
        let out = watcher
            .join()
            .unwrap_or_else(|_| Err("watcher panicked".into()))?;
        match first_err {
            Some(e) => Err(e),
            None => Ok(out),
        }
    })
}

/// Outbox rows read so far, by Postgres's counters (sequential and index
/// reads), after asking this backend's to be flushed.
fn outbox_reads(db: &Db, outbox: &str) -> BoxResult<i64> {
    let bare = outbox.rsplit('.').next().unwrap_or(outbox);
    let row = db.query_opt(
        "SELECT coalesce(seq_tup_read, 0) + coalesce(idx_tup_fetch, 0)
         FROM pg_stat_user_tables WHERE relname = $1",
        &[&bare],
    )?;
    Ok(row.map_or(0, |r| r.get(0)))
}

/// 16 writers on the captured table for `span` while `clients` clients
/// (each with its relay) run: (what ran, TPS, outbox rows read per row
/// written). After a deploy: the bench's own client (the relay that led)
/// stops first and the new clients open on the outbox and cursor it left,
/// their start inside the measured window.
fn relay_work(
    bench: &Bench,
    db: &Db,
    table: &str,
    clients: usize,
    deploy: bool,
    span: Duration,
) -> BoxResult<(String, f64, Option<f64>)> {
    let outbox = &bench.config.outbox_table;
    let open = || -> BoxResult<Vec<Client>> {
        Ok((0..clients - usize::from(!deploy))
            .map(|_| Client::open(&bench.config))
            .collect::<Result<_, _>>()?)
    };
    let mut extra = Vec::new();
    if deploy {
        bench.client().engine().stop_relay();
    } else {
        extra = open()?;
        for c in &extra {
            c.engine().sync_relay(Duration::from_secs(30));
        }
    }
    // A backend flushes its statistics at the end of a transaction at most
    // once a second, and an idle one after 10 s: the full run waits that
    // out around its window; the quick one does not count (the tests count
    // the relay's reads exactly).
    let settle = (!bench.plan.quick).then_some(Duration::from_secs(11));
    if let Some(settle) = settle {
        std::thread::sleep(settle);
    }
    let before = outbox_reads(db, outbox)?;
    if deploy {
        extra = open()?;
    }
    let (tps, _) = write_for(&[db], table, 16, span)?;
    for c in &extra {
        c.engine().sync_relay(Duration::from_secs(60));
    }
    let read = match settle {
        Some(settle) => {
            std::thread::sleep(settle);
            Some(outbox_reads(db, outbox)? - before)
        }
        None => None,
    };
    let written = tps * span.as_secs_f64();
    drop(extra);
    bench.client().engine().start_relay();
    bench.client().engine().sync_relay(Duration::from_secs(60));
    let label = if deploy {
        format!("{clients}, started after the one that led stopped (a deploy)")
    } else {
        clients.to_string()
    };
    let per_row = read.filter(|_| written > 0.0).map(|r| r as f64 / written);
    Ok((label, tps, per_row))
}

fn percentile_ms(ms: &[f64], q: f64) -> f64 {
    let mut ns: Vec<u64> = ms.iter().map(|m| (m * 1e6) as u64).collect();
    ns.sort_unstable();
    quantile_us(&ns, q) / 1e3
}

impl Capture {
    fn tps(&self, kind: &str, n: usize) -> Option<f64> {
        self.writers
            .iter()
            .find(|(k, w, _)| k == kind && *w == n)
            .and_then(|(_, _, r)| r.as_ref().ok().map(|(tps, _)| *tps))
    }

    /// Capture with its relay against the trigger without `pg_notify`.
    fn ratio(&self, n: usize) -> Option<f64> {
        Some(self.tps(KINDS[2], n)? / self.tps(KINDS[1], n)?)
    }
}

impl Section for Capture {
    fn markdown(&self, md: &mut String) {
        let _ = writeln!(
            md,
            "\n### Capture under writers (16): random-row UPDATEs of a {ROWS}-row table, {:.1} s per cell, median of {} repetitions taking turns\n",
            self.seconds, self.reps
        );
        md.push_str(
            "| writers | table | TPS | p99 ms | TPS vs no trigger |\n|---:|---|---:|---:|---:|\n",
        );
        for (kind, n, cell) in &self.writers {
            match cell {
                Ok((tps, p99)) => {
                    let vs = self
                        .tps(KINDS[0], *n)
                        .map_or("–".into(), |base| format!("{:.2}×", tps / base));
                    let _ = writeln!(md, "| {n} | {kind} | {tps:.0} | {p99:.2} | {vs} |");
                }
                Err(e) => {
                    let _ = writeln!(md, "| {n} | {kind} | error: {e} | | |");
                }
            }
        }
        let ms = &self.invalidation_ms;
        let max = ms.iter().copied().fold(0.0, f64::max);
        let _ = writeln!(
            md,
            "\nCommit → invalidation at a steady {} writes/s ({} watched commits): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms.\n",
            self.rate,
            ms.len(),
            percentile_ms(ms, 0.5),
            percentile_ms(ms, 0.99),
            max
        );
        md.push_str("| clients (each runs a relay) | 16 writers' TPS | outbox rows read per row written (Postgres's statistics; full run only) |\n|---:|---:|---:|\n");
        for (clients, tps, per) in &self.fanout {
            let per = per.map_or("–".into(), |p| format!("{p:.2}"));
            let _ = writeln!(md, "| {clients} | {tps:.0} | {per} |");
        }
    }

    fn targets(&self) -> Vec<Target> {
        let p99 = percentile_ms(&self.invalidation_ms, 0.99);
        let fan = |n: &str| self.fanout.iter().find(|f| f.0.starts_with(n));
        let deploy = self.fanout.iter().find(|f| f.0.contains("deploy"));
        let fan_ratio = match (fan("1"), fan("8")) {
            (Some(one), Some(eight)) => Some(eight.1 / one.1),
            _ => None,
        };
        let deploy_ratio = match (fan("1"), deploy) {
            (Some(one), Some(after)) => Some(after.1 / one.1),
            _ => None,
        };
        vec![
            Target::at_least(
                "capture: 16 writers' TPS vs the trigger without pg_notify",
                self.ratio(16),
                0.9,
            ),
            Target::at_least(
                "capture: 64 writers' TPS vs the trigger without pg_notify",
                self.ratio(64),
                0.9,
            ),
            Target {
                name: format!(
                    "capture: commit-to-invalidation p99 at {} writes/s",
                    self.rate
                ),
                value: format!("{p99:.1} ms"),
                limit: "≤ 50 ms".into(),
                met: Some(p99 <= 50.0),
            },
            Target::at_least("capture: 16 writers' TPS, 8 clients vs 1", fan_ratio, 0.9),
            Target::at_least(
                "capture: 16 writers' TPS, 8 clients after a deploy vs 1",
                deploy_ratio,
                0.9,
            ),
            Target {
                name: "capture: outbox rows read per row written, 8 clients (and after a deploy)"
                    .into(),
                value: [fan("8"), deploy]
                    .iter()
                    .map(|f| {
                        f.and_then(|f| f.2)
                            .map_or("–".into(), |p| format!("{p:.2}"))
                    })
                    .collect::<Vec<_>>()
                    .join(", "),
                limit: "≤ 2".into(),
                met: match (fan("8").and_then(|f| f.2), deploy.and_then(|f| f.2)) {
                    (Some(a), Some(b)) => Some(a <= 2.0 && b <= 2.0),
                    _ => None,
                },
            },
        ]
    }

    fn json(&self) -> Option<(&'static str, Value)> {
        let writers: Vec<Value> = self
            .writers
            .iter()
            .map(|(kind, n, cell)| match cell {
                Ok((tps, p99)) => json!({"table": kind, "writers": n, "tps": tps, "p99_ms": p99}),
                Err(e) => json!({"table": kind, "writers": n, "error": e}),
            })
            .collect();
        let fanout: Vec<Value> = self
            .fanout
            .iter()
            .map(|(c, tps, per)| json!({"clients": c, "tps": tps, "outbox_rows_read_per_row_written": per}))
            .collect();
        Some((
            "capture",
            json!({
                "writers": writers,
                "invalidation_ms": {
                    "rate": self.rate,
                    "samples": self.invalidation_ms.len(),
                    "p50": percentile_ms(&self.invalidation_ms, 0.5),
                    "p99": percentile_ms(&self.invalidation_ms, 0.99),
                    "max": self.invalidation_ms.iter().copied().fold(0.0, f64::max),
                },
                "fanout": fanout,
            }),
        ))
    }
}
