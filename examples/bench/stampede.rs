//! (6) a stampede: N threads released together on one cold key whose load
//! takes 50 ms, on the naive and the single-flight path, beside the
//! scheduler's cost of waking N threads ([`wake`](crate::wake)) and the
//! same stampede across processes ([`xproc`](crate::xproc)); and its
//! correctness properties: a single-flight stampede sends exactly one query
//! and leaves no key in flight, and every read returns the right value.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use cacheaside::{CacheAside, Client};
use serde_json::{Value, json};

use crate::fixture::{Bench, expected_profile};
use crate::measure::{Spread, median_sorted};
use crate::report::{Section, Target, spread_cell};
use crate::xproc::{self, CrossProcess, XPROC_PROCESSES, XPROC_THREADS};
use crate::{BoxResult, plots, wake};

/// The slow load of the stampede: 50 ms inside Postgres, sent through
/// `Db::query_opt` so the query counter sees it.
pub const SLOW_LOAD_SQL: &str = "SELECT pg_sleep(0.05)";
/// Stack of the stampede threads: the read path needs far less than the
/// 2 MiB default, and 1000 threads should not reserve 2 GiB.
pub const STAMPEDE_STACK: usize = 512 * 1024;

/// The stampede section: one load alone, the in-process stampedes, the
/// cross-process one.
pub struct Stampedes {
    one_load: Duration,
    in_process: Vec<Stampede>,
    xproc: CrossProcess,
}

/// One stampede at one N on one path, repeated.
pub struct Stampede {
    pub single_flight: bool,
    pub n: usize,
    pub queries: Vec<u64>,
    pub wall_ms: Vec<f64>,
    /// The machine's cost of waking N parked threads (see
    /// [`wake::wake_floors`]), per repetition, (condvar, RwLock gate) in ms;
    /// single-flight rows only.
    pub wake_ms: Vec<(f64, f64)>,
}

pub fn measure(bench: &Bench) -> BoxResult<Stampedes> {
    let one_load = measure_one_load(bench.client())?;
    let in_process = measure_in_process(bench)?;
    let xproc = xproc::measure(bench)?;
    Ok(Stampedes {
        one_load,
        in_process,
        xproc,
    })
}

/// The time of one slow load on its own: the yardstick of stampede walls.
fn measure_one_load(client: &Client) -> BoxResult<Duration> {
    let db = client.db();
    db.query_opt(SLOW_LOAD_SQL, &[])?; // prepare it once
    let mut times: Vec<f64> = (0..5)
        .map(|_| {
            let t = Instant::now();
            db.query_opt(SLOW_LOAD_SQL, &[])
                .map(|_| t.elapsed().as_secs_f64())
        })
        .collect::<Result<_, _>>()?;
    times.sort_by(f64::total_cmp);
    Ok(Duration::from_secs_f64(median_sorted(&times)))
}

/// N threads released by a barrier on a cold key, for every N of the plan,
/// naive and single-flight.
fn measure_in_process(bench: &Bench) -> BoxResult<Vec<Stampede>> {
    let plan = &bench.plan;
    let engine = bench.client().engine();
    let mut out = Vec::new();
    for &n in &plan.stampede_ns {
        for single_flight in [false, true] {
            let mut s = Stampede {
                single_flight,
                n,
                queries: Vec::new(),
                wall_ms: Vec::new(),
                wake_ms: Vec::new(),
            };
            for rep in 0..plan.stampede_reps {
                let key = format!(
                    "stampede:{}:{n}:{rep}",
                    if single_flight { "sf" } else { "naive" }
                );
                engine.invalidate(&key)?;
                let (queries, wall, errors) = stampede_once(engine, &key, n, single_flight)?;
                if errors > 0 {
                    bench.fail(format!(
                        "stampede {} N={n}: {errors} reads failed or returned a wrong value",
                        path_name(single_flight)
                    ));
                }
                if single_flight && queries != 1 {
                    bench.fail(format!(
                        "single-flight stampede N={n} sent {queries} queries, expected exactly 1"
                    ));
                }
                s.queries.push(queries);
                s.wall_ms.push(wall.as_secs_f64() * 1e3);
                if single_flight {
                    s.wake_ms.push(wake::wake_floors(n)?);
                }
            }
            let round = |v: &[f64]| {
                v.iter()
                    .map(|w| (w * 10.0).round() / 10.0)
                    .collect::<Vec<_>>()
            };
            eprintln!(
                "bench: stampede {} N={n}: queries {:?}, wall ms {:?}, wake floor ms (condvar/rwlock) {:?}",
                path_name(single_flight),
                s.queries,
                round(&s.wall_ms),
                s.wake_ms
                    .iter()
                    .map(|(pl, std)| format!("{pl:.1}/{std:.1}"))
                    .collect::<Vec<_>>()
            );
            if single_flight && engine.in_flight() != 0 {
                bench.fail(format!(
                    "{} keys still in flight after the stampede N={n}",
                    engine.in_flight()
                ));
            }
            out.push(s);
        }
    }
    Ok(out)
}

pub fn path_name(single_flight: bool) -> &'static str {
    if single_flight {
        "single-flight"
    } else {
        "naive"
    }
}

/// Returns (queries, wall from release to the last thread's return, reads
/// that failed or returned a wrong value).
///
/// Each thread first receives the barrier on its own channel, and the
/// barrier is sized only once every thread is spawned: if a spawn fails
/// (thread limit), the senders are dropped and the threads already running
/// return at once instead of waiting at a barrier that can never fill.
fn stampede_once(
    engine: &CacheAside,
    key: &str,
    n: usize,
    single_flight: bool,
) -> BoxResult<(u64, Duration, usize)> {
    let expected = expected_profile();
    let db = engine.db();
    let ttl = Duration::from_secs(60);
    let before = db.query_count();
    let (wall, errors) = thread::scope(|s| -> BoxResult<(Duration, usize)> {
        let mut workers = Vec::with_capacity(n);
        let mut starts = Vec::with_capacity(n);
        for _ in 0..n {
            let (start_tx, start_rx) = mpsc::channel::<Arc<Barrier>>();
            let expected = &expected;
            let worker = thread::Builder::new()
                .stack_size(STAMPEDE_STACK)
                .spawn_scoped(s, move || {
                    let barrier = start_rx.recv().ok()?;
                    barrier.wait();
                    let released = Instant::now();
                    let load = || {
                        db.query_opt(SLOW_LOAD_SQL, &[])?;
                        Ok(Some(expected.clone()))
                    };
                    let got = if single_flight {
                        engine.get_or_load(key, ttl, load)
                    } else {
                        engine.get_or_load_uncoalesced(key, ttl, load)
                    };
                    let ok = matches!(&got, Ok(Some(p)) if p == expected);
                    if let Err(err) = &got {
                        eprintln!("bench: stampede read failed: {}", err.chain());
                    }
                    Some((ok, released, Instant::now()))
                });
            match worker {
                Ok(w) => {
                    workers.push(w);
                    starts.push(start_tx);
                }
                Err(err) => return Err(format!("could not spawn stampede thread: {err}").into()),
            }
        }
        let barrier = Arc::new(Barrier::new(n + 1));
        for tx in starts {
            tx.send(Arc::clone(&barrier))?;
        }
        barrier.wait();
        // The clock starts when the barrier opened: the first of its
        // threads to run again (with a thousand of them on 2 cores, the
        // main thread may well run last, after the load has started).
        let mut start = Instant::now();
        let mut last = start;
        let mut errors = 0;
        for w in workers {
            let (ok, released, end) = w
                .join()
                .expect("stampede thread panicked")
                .ok_or("stampede thread got no barrier")?;
            errors += usize::from(!ok);
            start = start.min(released);
            last = last.max(end);
        }
        Ok((last - start, errors))
    })?;
    Ok((db.query_count() - before, wall, errors))
}

impl Stampedes {
    fn one_load_ms(&self) -> f64 {
        self.one_load.as_secs_f64() * 1e3
    }
}

impl Section for Stampedes {
    fn markdown(&self, md: &mut String) {
        let one_load_ms = self.one_load_ms();
        let _ = writeln!(
            md,
            "\n### Stampede (6): N threads on one cold key, load = `{SLOW_LOAD_SQL}` \
             (one load alone: {one_load_ms:.1} ms)\n"
        );
        md.push_str(
            "| path | N | Postgres queries (per repetition) | wall ms, median (min–max) | wall / one load | wake N threads: condvar / RwLock gate, ms |\n",
        );
        md.push_str("|---|---:|---|---:|---:|---:|\n");
        for s in &self.in_process {
            let wall = Spread::of(s.wall_ms.iter().copied());
            let _ = writeln!(
                md,
                "| {} | {} | {:?} | {} | {:.2}× | {} |",
                path_name(s.single_flight),
                s.n,
                s.queries,
                spread_cell(wall, 1),
                wall.median / one_load_ms,
                wake::cell(&s.wake_ms)
            );
        }
        let xwall = Spread::of(self.xproc.wall_ms.iter().copied());
        let _ = writeln!(
            md,
            "| single-flight, {XPROC_PROCESSES} processes × {XPROC_THREADS} threads (Redis rebuild lock) | {} | {:?} (summed over processes) | {} | {:.2}× | {} |",
            XPROC_PROCESSES * XPROC_THREADS,
            self.xproc.queries,
            spread_cell(xwall, 1),
            xwall.median / one_load_ms,
            wake::cell(&self.xproc.wake_ms)
        );
        md.push_str(
            "\nThe last column is the scheduler's share of a stampede: the time to wake N parked \
             threads until the last has run (no Redis, no Postgres), with parking_lot's condvar \
             (`notify_all` hands off from thread to thread) and with the RwLock gate \
             `src/singleflight.rs` uses (one unlock unparks every reader). Once its load is done, \
             a single-flight stampede cannot end sooner than that.\n",
        );
    }

    fn targets(&self) -> Vec<Target> {
        let mut t = Vec::new();
        let one_load_ms = self.one_load_ms();
        for s in self.in_process.iter().filter(|s| s.single_flight) {
            let max_q = s.queries.iter().copied().max().unwrap_or(0);
            let min_q = s.queries.iter().copied().min().unwrap_or(0);
            t.push(Target {
                name: format!("stampede N={}: Postgres queries (every repetition)", s.n),
                value: if min_q == max_q {
                    format!("{max_q}")
                } else {
                    format!("{min_q}–{max_q}")
                },
                limit: "= 1".into(),
                met: Some(min_q == 1 && max_q == 1),
            });
            let wall = Spread::of(s.wall_ms.iter().copied()).median;
            t.push(Target {
                name: format!(
                    "stampede N={}: median wall vs one load ({one_load_ms:.1} ms)",
                    s.n
                ),
                value: format!("{wall:.1} ms = {:.3}×", wall / one_load_ms),
                limit: "≤ 1.20×".into(),
                met: Some(wall / one_load_ms <= 1.20),
            });
        }
        let xq_ok = self.xproc.queries.iter().all(|&q| q == 1);
        t.push(Target {
            name: format!(
                "cross-process stampede {XPROC_PROCESSES}×{XPROC_THREADS}: Postgres queries"
            ),
            value: format!("{:?}", self.xproc.queries),
            limit: "= 1".into(),
            met: Some(xq_ok && !self.xproc.queries.is_empty()),
        });
        let xwall = Spread::of(self.xproc.wall_ms.iter().copied()).median;
        t.push(Target {
            name: "cross-process stampede: median wall vs one load + 10 ms".into(),
            value: format!("{xwall:.1} ms (one load + {:.1} ms)", xwall - one_load_ms),
            limit: format!("≤ {:.1} ms", one_load_ms + 10.0),
            met: Some(xwall <= one_load_ms + 10.0),
        });
        t
    }

    fn json(&self) -> Option<(&'static str, Value)> {
        let stampede = json!({
            "load_sql": SLOW_LOAD_SQL,
            "one_load_ms": self.one_load_ms(),
            "in_process": self.in_process.iter().map(|s| json!({
                "path": path_name(s.single_flight),
                "n": s.n,
                "queries": s.queries,
                "wall_ms": s.wall_ms,
                "wall_ms_spread": Spread::of(s.wall_ms.iter().copied()).json(),
                "wake_floor_ms": wake::json(&s.wake_ms),
            })).collect::<Vec<_>>(),
            "cross_process": self.xproc.json(),
        });
        Some(("stampede", stampede))
    }

    fn plot(&self, dir: &Path) -> BoxResult<Vec<PathBuf>> {
        let path = dir.join("bench-stampede.png");
        plots::stampede(&path, &self.in_process, self.one_load_ms())?;
        Ok(vec![path])
    }
}
