//! (11) Single-flight under steady writes: four readers of one key whose
//! load takes 10 ms, while a writer updates it every ~4 ms (UPDATE, then
//! invalidate). Every leader's fill is dropped by the next write; the
//! followers that joined before its load began still take its row, so
//! single-flight serves about as many reads as the plain path, with one
//! load at a time. No read may be older than a write that finished before
//! it began (counted; any is a correctness failure).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cacheaside::Mode;
use serde_json::{Value, json};

use crate::BoxResult;
use crate::fixture::Bench;
use crate::report::{Section, Target};

pub struct Steady {
    run: Duration,
    plain: Run,
    single_flight: Run,
}

struct Run {
    reads: u64,
    loads: u64,
    writes: u64,
    stale: u64,
}

const READERS: usize = 4;
const USER: i64 = 3;

pub fn measure(bench: &Bench) -> BoxResult<Steady> {
    let run = if bench.plan.quick {
        Duration::from_millis(1000)
    } else {
        Duration::from_secs(3)
    };
    eprintln!("bench: steady writes: plain and single-flight, {run:?} each...");
    let plain = one_run(bench, Mode::Plain, run)?;
    let single_flight = one_run(bench, Mode::SingleFlight, run)?;
    for (name, r) in [("plain", &plain), ("single-flight", &single_flight)] {
        if r.stale > 0 {
            bench.fail(format!(
                "steady writes ({name}): {} reads older than a finished write",
                r.stale
            ));
        }
    }
    Ok(Steady {
        run,
        plain,
        single_flight,
    })
}

fn one_run(bench: &Bench, mode: Mode, run: Duration) -> BoxResult<Run> {
    let client = bench.client();
    let engine = client.engine();
    let table = client.users_table();
    let key = format!("steady:{mode:?}");
    let select = format!("SELECT version FROM {table}, pg_sleep(0.01) WHERE id = $1");
    let update = format!(
        "UPDATE {table} SET plan = $1, version = version + 1 WHERE id = $2 RETURNING version"
    );
    let floor = AtomicI64::new(0);
    let stop = AtomicBool::new(false);
    let (reads, loads, writes, stale) = (
        AtomicU64::new(0),
        AtomicU64::new(0),
        AtomicU64::new(0),
        AtomicU64::new(0),
    );
    let failure = std::sync::Mutex::new(None::<String>);
    std::thread::scope(|s| {
        for _ in 0..READERS {
            s.spawn(|| {
                while !stop.load(Ordering::SeqCst) {
                    let must_see = floor.load(Ordering::SeqCst);
                    let got: cacheaside::Result<Option<i64>> =
                        engine.get_or_load_versioned(&key, Duration::from_secs(60), mode, || {
                            loads.fetch_add(1, Ordering::Relaxed);
                            let row = engine.db().query_opt(&select, &[&USER])?;
                            Ok(row.map(|r| {
                                let v: i64 = r.get(0);
                                cacheaside::Versioned::new(v, v as u64)
                            }))
                        });
                    match got {
                        Ok(Some(version)) => {
                            if version < must_see {
                                stale.fetch_add(1, Ordering::Relaxed);
                            }
                            reads.fetch_add(1, Ordering::Relaxed);
                        }
                        other => {
                            failure.lock().unwrap().get_or_insert(format!("{other:?}"));
                            stop.store(true, Ordering::SeqCst);
                        }
                    }
                }
            });
        }
        s.spawn(|| {
            let started = Instant::now();
            let mut i = 0;
            while started.elapsed() < run && !stop.load(Ordering::SeqCst) {
                let written = engine
                    .db()
                    .query_opt(&update, &[&format!("s{i}"), &USER])
                    .and_then(|row| {
                        engine.invalidate(&key)?;
                        Ok(row.map_or(0, |r| r.get::<_, i64>(0)))
                    });
                match written {
                    Ok(version) => {
                        floor.fetch_max(version, Ordering::SeqCst);
                        writes.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(err) => {
                        failure.lock().unwrap().get_or_insert(err.chain());
                    }
                }
                i += 1;
                std::thread::sleep(Duration::from_millis(4));
            }
            stop.store(true, Ordering::SeqCst);
        });
    });
    if let Some(err) = failure.into_inner().unwrap() {
        return Err(format!("steady writes: {err}").into());
    }
    Ok(Run {
        reads: reads.into_inner(),
        loads: loads.into_inner(),
        writes: writes.into_inner(),
        stale: stale.into_inner(),
    })
}

impl Steady {
    fn ratio(&self) -> f64 {
        self.single_flight.reads as f64 / self.plain.reads.max(1) as f64
    }
}

impl Section for Steady {
    fn markdown(&self, md: &mut String) {
        let _ = writeln!(
            md,
            "\n### Steady writes (11): {READERS} readers, a 10 ms load, a write every ~4 ms, {:.0} s per path\n",
            self.run.as_secs_f64()
        );
        md.push_str("| path | reads | loads | writes | reads older than a finished write |\n|---|---:|---:|---:|---:|\n");
        for (name, r) in [
            ("plain", &self.plain),
            ("single-flight", &self.single_flight),
        ] {
            let _ = writeln!(
                md,
                "| {name} | {} | {} | {} | {} |",
                r.reads, r.loads, r.writes, r.stale
            );
        }
        let _ = writeln!(
            md,
            "\nSingle-flight served {:.2}× the plain path's reads (before followers could take a row whose fill a write dropped, it served about a quarter).",
            self.ratio()
        );
    }

    fn targets(&self) -> Vec<Target> {
        vec![Target::at_least(
            "steady writes: single-flight reads vs plain reads",
            Some(self.ratio()),
            0.9,
        )]
    }

    fn json(&self) -> Option<(&'static str, Value)> {
        let run = |r: &Run| json!({"reads": r.reads, "loads": r.loads, "writes": r.writes, "stale": r.stale});
        Some((
            "steady_writes",
            json!({"seconds": self.run.as_secs_f64(), "plain": run(&self.plain), "single_flight": run(&self.single_flight)}),
        ))
    }
}
