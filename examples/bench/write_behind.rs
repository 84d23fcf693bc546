//! (12) write-behind: the enqueue (`update_user_plan_write_behind`) against
//! a direct `update_user_plan` (Postgres, then invalidate), side by side in
//! the same run at 1 and 8 threads; flush throughput (rows/s into Postgres)
//! with coalescing on one hot key and on distinct keys; end-to-end lag
//! (enqueue to visible in Postgres) p50/p99 under a steady load; and the
//! correctness properties that every row ends at its newest change and
//! nothing is dead-lettered.
//!
//! It uses a client of its own on the run's table and namespace, with a
//! backlog bound the measurements cannot reach, and users of its own
//! (ids above [`FIRST_ID`]) so the other sections' rows stay untouched.

use std::collections::{HashMap, VecDeque};
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use cacheaside::Client;
use serde_json::{Value, json};

use crate::BoxResult;
use crate::fixture::Bench;
use crate::measure::{self, Baseline, Operation, Series, quantile_us};
use crate::report::{Section, Target};

/// This section's users start above the demo users.
const FIRST_ID: i64 = 1_000_000;
/// Workers of the flush and lag measurements.
const WORKERS: u32 = 2;
/// Users the enqueue and direct-update measurements spread over (each
/// operation its own), so 8 threads do not queue on one row's lock.
const SPREAD: i64 = 500;

/// What one flush measurement found.
struct Flush {
    label: &'static str,
    changes: u64,
    rows: u64,
    secs: f64,
}

impl Flush {
    fn changes_per_s(&self) -> f64 {
        self.changes as f64 / self.secs
    }

    fn rows_per_s(&self) -> f64 {
        self.rows as f64 / self.secs
    }
}

/// The write-behind section.
pub struct WriteBehind {
    series: Vec<Series>,
    flushes: Vec<Flush>,
    lag_rate: u64,
    lag_secs: f64,
    /// Enqueue-to-Postgres times (ns), sorted.
    lags_ns: Vec<u64>,
}

pub fn measure(bench: &Bench) -> BoxResult<WriteBehind> {
    let quick = bench.plan.quick;
    let mut config = bench.config.clone();
    config.invalidation_relay = false; // the bench's client runs it
    config.write_behind_max_backlog = 10_000_000;
    let client = Client::open(&config)?;
    let distinct: i64 = if quick { 2_000 } else { 10_000 };
    let table = &config.users_table;
    client.db().batch_execute(&format!(
        "INSERT INTO {table} (id, name, email, plan)
         SELECT g, 'bench ' || g, 'bench' || g || '@example.com', 'free'
         FROM generate_series({FIRST_ID}, {FIRST_ID} + {distinct} + {}) AS g
         ON CONFLICT (id) DO NOTHING",
        2 * SPREAD
    ))?;
    let series = enqueue_vs_direct(bench, &client)?;
    drain(&client, bench)?;

    let hot = if quick { 5_000 } else { 20_000 };
    let flushes = vec![
        flush(bench, &client, "one hot key", hot, |_| FIRST_ID)?,
        flush(bench, &client, "distinct keys", distinct as u64, |i| {
            FIRST_ID + 1 + i as i64
        })?,
    ];
    let (lag_rate, lag_secs) = if quick { (300, 2.0) } else { (1_000, 5.0) };
    let lags_ns = lag(bench, &client, lag_rate, lag_secs)?;

    let dead = client.engine().write_behind_dead_letters(10)?;
    if !dead.is_empty() {
        bench.fail(format!("write-behind dead-lettered changes: {dead:?}"));
    }
    eprintln!("bench: write-behind done");
    Ok(WriteBehind {
        series,
        flushes,
        lag_rate,
        lag_secs,
        lags_ns,
    })
}

/// The enqueue against a direct update, at 1 and 8 threads; no workers run
/// meanwhile, so the enqueue is measured alone (its backlog is drained
/// afterwards).
fn enqueue_vs_direct(bench: &Bench, client: &Client) -> BoxResult<Vec<Series>> {
    let next = AtomicU64::new(0);
    let pick = |base: i64| {
        let n = next.fetch_add(1, Ordering::Relaxed);
        (base + (n as i64 % SPREAD), format!("p{n}"))
    };
    let direct_base = FIRST_ID + 1;
    let behind_base = FIRST_ID + 1 + SPREAD;
    let ops = [
        Operation {
            id: "update_direct",
            item: "12",
            label: "update_user_plan (Postgres, then invalidate)",
            baseline: Baseline::None,
            call: Box::new(|| {
                let (id, plan) = pick(direct_base);
                match client.update_user_plan(id, &plan)? {
                    true => Ok(()),
                    false => Err(format!("user {id} is missing").into()),
                }
            }),
        },
        Operation {
            id: "write_behind_enqueue",
            item: "12",
            label: "update_user_plan_write_behind (enqueue)",
            baseline: Baseline::Series {
                id: "update_direct",
                item: "(12) direct",
            },
            call: Box::new(|| {
                let (id, plan) = pick(behind_base);
                match client.update_user_plan_write_behind(id, &plan)? {
                    Some(_) => Ok(()),
                    None => Err(format!("user {id} is missing").into()),
                }
            }),
        },
    ];
    let ops: Vec<&Operation> = ops.iter().collect();
    let mut series = Vec::new();
    for threads in [1, 8] {
        series.extend(measure::side_by_side(&ops, threads, &bench.plan)?);
        eprintln!("bench: write-behind enqueue at {threads} thread(s) done");
    }
    Ok(series)
}

/// Runs workers until everything enqueued so far is in Postgres.
fn drain(client: &Client, bench: &Bench) -> BoxResult<()> {
    client.start_write_behind(WORKERS)?;
    let drained = client.drain_write_behind(Duration::from_secs(300));
    client.stop_write_behind();
    if let Err(err) = drained {
        bench.fail(format!("write-behind drain failed: {}", err.chain()));
        return Err(err.into());
    }
    Ok(())
}

/// Enqueues `changes` changes (to the users `id_of(i)` picks) with no
/// worker running, then times workers flushing them all; checks that every
/// row ends at its newest change.
fn flush(
    bench: &Bench,
    client: &Client,
    label: &'static str,
    changes: u64,
    id_of: impl Fn(u64) -> i64 + Sync,
) -> BoxResult<Flush> {
    let newest: Mutex<HashMap<i64, (u64, String)>> = Mutex::new(HashMap::new());
    let next = AtomicU64::new(0);
    thread::scope(|s| -> BoxResult<()> {
        let handles: Vec<_> = (0..4)
            .map(|_| {
                s.spawn(|| -> BoxResult<()> {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= changes {
                            return Ok(());
                        }
                        let (id, plan) = (id_of(i), format!("f{i}"));
                        let seq = client
                            .update_user_plan_write_behind(id, &plan)?
                            .ok_or("missing user")?;
                        let mut newest = newest.lock().unwrap();
                        let slot = newest.entry(id).or_insert((0, String::new()));
                        if seq > slot.0 {
                            *slot = (seq, plan);
                        }
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().expect("enqueuer panicked")?;
        }
        Ok(())
    })?;
    let applied = client.engine().stats().write_behind_applied;
    let started = Instant::now();
    drain(client, bench)?;
    let secs = started.elapsed().as_secs_f64();
    let rows = client.engine().stats().write_behind_applied - applied;
    // Correctness: every row is at its newest change.
    let newest = newest.into_inner().unwrap();
    let ids: Vec<i64> = newest.keys().copied().collect();
    let sql = format!(
        "SELECT id, plan, version FROM {} WHERE id = ANY($1)",
        bench.config.users_table
    );
    for row in client.db().query(&sql, &[&ids])? {
        let (id, plan, version): (i64, String, i64) = (row.get(0), row.get(1), row.get(2));
        let (seq, want) = &newest[&id];
        if (&plan, version as u64) != (want, *seq) {
            bench.fail(format!(
                "write-behind ({label}): user {id} is at {plan:?} v{version}, expected {want:?} v{seq}"
            ));
        }
    }
    let f = Flush {
        label,
        changes,
        rows,
        secs,
    };
    eprintln!(
        "bench: write-behind flush, {label}: {changes} changes, {rows} rows in {secs:.2} s \
         ({:.0} changes/s, {:.0} rows/s)",
        f.changes_per_s(),
        f.rows_per_s()
    );
    Ok(f)
}

/// Enqueue-to-Postgres lag under a steady `rate` of changes per second over
/// distinct users, with workers running: a poller reads the users'
/// versions from Postgres every millisecond, and a change counts as landed
/// when its user's version reaches its sequence number (a newer change of
/// the user landing carries it too: coalesced).
fn lag(bench: &Bench, client: &Client, rate: u64, secs: f64) -> BoxResult<Vec<u64>> {
    let users: i64 = 100;
    let base = FIRST_ID + 1;
    client.start_write_behind(WORKERS)?;
    let waiting: Mutex<HashMap<i64, VecDeque<(u64, Instant)>>> = Mutex::new(HashMap::new());
    let lags: Mutex<Vec<u64>> = Mutex::new(Vec::new());
    let done = AtomicBool::new(false);
    let ids: Vec<i64> = (base..base + users).collect();
    let sql = format!(
        "SELECT id, version FROM {} WHERE id = ANY($1)",
        bench.config.users_table
    );
    let outcome = thread::scope(|s| -> BoxResult<()> {
        let poller = s.spawn(|| -> BoxResult<()> {
            let mut idle_since: Option<Instant> = None;
            loop {
                let rows = client.db().query(&sql, &[&ids])?;
                let now = Instant::now();
                let mut waiting = waiting.lock().unwrap();
                for row in rows {
                    let (id, version): (i64, i64) = (row.get(0), row.get(1));
                    if let Some(queue) = waiting.get_mut(&id) {
                        while queue.front().is_some_and(|(seq, _)| *seq <= version as u64) {
                            let (_, at) = queue.pop_front().expect("front");
                            lags.lock().unwrap().push((now - at).as_nanos() as u64);
                        }
                    }
                }
                let empty = waiting.values().all(VecDeque::is_empty);
                drop(waiting);
                if done.load(Ordering::SeqCst) && empty {
                    return Ok(());
                }
                if done.load(Ordering::SeqCst) {
                    let since = *idle_since.get_or_insert(now);
                    if since.elapsed() > Duration::from_secs(60) {
                        return Err("write-behind changes never reached Postgres".into());
                    }
                }
                thread::sleep(Duration::from_millis(1));
            }
        });
        let period = Duration::from_secs_f64(1.0 / rate as f64);
        let total = (rate as f64 * secs) as u64;
        let start = Instant::now();
        let mut produced = Ok(());
        for i in 0..total {
            let due = start + period * i as u32;
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                thread::sleep(wait);
            }
            let id = base + (i as i64 % users);
            // The clock starts before the call: the lag includes the enqueue.
            let at = Instant::now();
            match client.update_user_plan_write_behind(id, &format!("l{i}")) {
                Ok(Some(seq)) => waiting
                    .lock()
                    .unwrap()
                    .entry(id)
                    .or_default()
                    .push_back((seq, at)),
                Ok(None) => {
                    produced = Err(format!("user {id} is missing").into());
                    break;
                }
                Err(err) => {
                    produced = Err(err.into());
                    break;
                }
            }
        }
        done.store(true, Ordering::SeqCst);
        let polled = poller.join().expect("poller panicked");
        produced.and(polled)
    });
    client.stop_write_behind();
    outcome?;
    let mut lags = lags.into_inner().unwrap();
    lags.sort_unstable();
    eprintln!(
        "bench: write-behind lag at {rate}/s: p50 {:.2} ms, p99 {:.2} ms ({} changes)",
        quantile_us(&lags, 0.5) / 1e3,
        quantile_us(&lags, 0.99) / 1e3,
        lags.len()
    );
    Ok(lags)
}

impl Section for WriteBehind {
    fn latency(&self) -> &[Series] {
        &self.series
    }

    fn markdown(&self, md: &mut String) {
        md.push_str("\n### Write-behind: flush and lag\n\n");
        let _ = writeln!(
            md,
            "Flush: changes enqueued with no worker running, then {WORKERS} workers time the \
             drain. Rows are the UPDATEs that reached Postgres (one per key per batch: the rest \
             were coalesced).\n"
        );
        md.push_str("| flush | changes | rows written | seconds | changes/s | rows/s |\n");
        md.push_str("|---|---:|---:|---:|---:|---:|\n");
        for f in &self.flushes {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {:.2} | {:.0} | {:.0} |",
                f.label,
                f.changes,
                f.rows,
                f.secs,
                f.changes_per_s(),
                f.rows_per_s()
            );
        }
        let _ = writeln!(
            md,
            "\nEnd-to-end lag (enqueue call to the row's version in Postgres, polled every \
             millisecond) at a steady {} changes/s over 100 users for {:.0} s, {WORKERS} \
             workers: p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} changes).",
            self.lag_rate,
            self.lag_secs,
            quantile_us(&self.lags_ns, 0.5) / 1e3,
            quantile_us(&self.lags_ns, 0.9) / 1e3,
            quantile_us(&self.lags_ns, 0.99) / 1e3,
            quantile_us(&self.lags_ns, 1.0) / 1e3,
            self.lags_ns.len()
        );
    }

    fn targets(&self) -> Vec<Target> {
        let ratio = |threads| measure::median_ratio(&self.series, "write_behind_enqueue", threads);
        vec![
            Target::at_most(
                "write-behind enqueue (12) latency vs direct update, 1 thread",
                ratio(1),
                1.0,
            ),
            Target::at_least(
                "write-behind enqueue (12) throughput vs direct update, 8 threads",
                ratio(8),
                1.0,
            ),
        ]
    }

    fn json(&self) -> Option<(&'static str, Value)> {
        Some((
            "write_behind",
            json!({
                "flush": self.flushes.iter().map(|f| json!({
                    "label": f.label,
                    "changes": f.changes,
                    "rows": f.rows,
                    "seconds": f.secs,
                    "changes_per_s": f.changes_per_s(),
                    "rows_per_s": f.rows_per_s(),
                })).collect::<Vec<_>>(),
                "lag": {
                    "rate_per_s": self.lag_rate,
                    "seconds": self.lag_secs,
                    "changes": self.lags_ns.len(),
                    "p50_ms": quantile_us(&self.lags_ns, 0.5) / 1e3,
                    "p90_ms": quantile_us(&self.lags_ns, 0.9) / 1e3,
                    "p99_ms": quantile_us(&self.lags_ns, 0.99) / 1e3,
                    "max_ms": quantile_us(&self.lags_ns, 1.0) / 1e3,
                },
            }),
        ))
    }
}
