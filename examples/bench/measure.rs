//! The measurement core every section shares: how an operation is timed
//! (threads released together, or one thread taking turns with other
//! operations in a random order), the repetition scheme, percentiles,
//! spreads across repetitions, and the ratios to a baseline, paired by
//! repetition, that the report compares.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Barrier, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::BoxResult;
use crate::plan::Plan;

/// One call of an operation under test; `Err` means the library or a server
/// is broken (a wrong value included), which ends the run with a failure.
pub type Call<'a> = dyn Fn() -> BoxResult<()> + Sync + 'a;

/// One call that times itself: returns the nanoseconds of the part that
/// counts (a miss leaves out the invalidation that makes it one).
pub type TimedCall<'a> = dyn Fn() -> BoxResult<u64> + Sync + 'a;

/// Times one whole call, in nanoseconds.
pub fn timed(call: &Call<'_>) -> BoxResult<u64> {
    let t = Instant::now();
    call()?;
    Ok(t.elapsed().as_nanos() as u64)
}

/// What a series is compared with in the report's ratio column.
#[derive(Clone, Copy)]
pub enum Baseline {
    /// Nothing (a floor).
    None,
    /// The series `id` of the same section at the same thread count, shown
    /// as `item` ("(1)"): at 1 thread the trimmed mean latencies, at more
    /// the throughputs.
    Series {
        id: &'static str,
        item: &'static str,
    },
    /// The base measured call by call alongside, per repetition
    /// ([`Rep::paired_base_us`]), shown as `item` ("(1)+(2)"): latencies.
    Paired { item: &'static str },
}

/// An operation under test, and the row of the latency table it becomes.
pub struct Operation<'a> {
    pub id: &'static str,
    /// Its number in the report ("3").
    pub item: &'static str,
    pub label: &'static str,
    pub baseline: Baseline,
    pub call: Box<Call<'a>>,
}

impl Operation<'_> {
    fn series(&self, threads: usize) -> Series {
        Series::new(self.id, self.item, self.label, threads, self.baseline)
    }
}

// ---- statistics ---------------------------------------------------------------

/// One repetition of a latency measurement.
#[derive(Clone, Copy)]
pub struct Rep {
    pub median_us: f64,
    pub p99_us: f64,
    /// Mean of the fastest 99% of calls: what the paired latency ratios
    /// compare (see [`Series::ratio`]).
    pub trimmed_mean_us: f64,
    pub ops_per_s: f64,
    /// For misses: the sum of the two floors' trimmed means, measured call
    /// by call alongside them in the same repetition.
    pub paired_base_us: Option<f64>,
}

/// Min, median and max of one number across repetitions.
#[derive(Clone, Copy, Default)]
pub struct Spread {
    pub min: f64,
    pub median: f64,
    pub max: f64,
}

impl Spread {
    pub fn of(values: impl IntoIterator<Item = f64>) -> Spread {
        let mut v: Vec<f64> = values.into_iter().collect();
        if v.is_empty() {
            return Spread::default();
        }
        v.sort_by(f64::total_cmp);
        Spread {
            min: v[0],
            median: median_sorted(&v),
            max: v[v.len() - 1],
        }
    }

    pub fn json(&self) -> Value {
        json!({"min": self.min, "median": self.median, "max": self.max})
    }
}

pub fn median_sorted(v: &[f64]) -> f64 {
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The `q`-quantile (0..=1) of sorted nanoseconds, in microseconds
/// (nearest rank).
pub fn quantile_us(sorted_ns: &[u64], q: f64) -> f64 {
    if sorted_ns.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * sorted_ns.len() as f64).ceil() as usize).clamp(1, sorted_ns.len());
    sorted_ns[rank - 1] as f64 / 1000.0
}

/// Mean of the fastest 99% of sorted nanoseconds, in microseconds.
pub fn trimmed_mean_us(sorted_ns: &[u64]) -> f64 {
    let kept = &sorted_ns[..(sorted_ns.len() * 99).div_ceil(100)];
    kept.iter().sum::<u64>() as f64 / kept.len().max(1) as f64 / 1000.0
}

/// A latency measurement: one operation at one thread count.
pub struct Series {
    pub id: &'static str,
    pub item: &'static str,
    pub label: &'static str,
    pub threads: usize,
    pub baseline: Baseline,
    pub reps: Vec<Rep>,
    /// Every sample of every repetition, sorted (for the percentile plot).
    pub pooled_ns: Vec<u64>,
}

impl Series {
    pub fn new(
        id: &'static str,
        item: &'static str,
        label: &'static str,
        threads: usize,
        baseline: Baseline,
    ) -> Series {
        Series {
            id,
            item,
            label,
            threads,
            baseline,
            reps: Vec::new(),
            pooled_ns: Vec::new(),
        }
    }

    pub fn add(&mut self, mut lat_ns: Vec<u64>, wall: Duration) {
        lat_ns.sort_unstable();
        let ops = lat_ns.len() as f64;
        self.reps.push(Rep {
            median_us: quantile_us(&lat_ns, 0.5),
            p99_us: quantile_us(&lat_ns, 0.99),
            trimmed_mean_us: trimmed_mean_us(&lat_ns),
            ops_per_s: ops / wall.as_secs_f64(),
            paired_base_us: None,
        });
        self.pooled_ns.extend_from_slice(&lat_ns);
    }

    /// [`Series::add`] for calls made by one thread, whose throughput is
    /// 1 / mean latency; `paired_base_us` as in [`Rep`].
    pub fn add_single_threaded(&mut self, lat_ns: Vec<u64>, paired_base_us: Option<f64>) {
        let busy = Duration::from_nanos(lat_ns.iter().sum());
        self.add(lat_ns, busy);
        if let Some(rep) = self.reps.last_mut() {
            rep.paired_base_us = paired_base_us;
        }
    }

    pub fn finish(&mut self) {
        self.pooled_ns.sort_unstable();
    }

    pub fn median(&self) -> Spread {
        Spread::of(self.reps.iter().map(|r| r.median_us))
    }

    pub fn p99(&self) -> Spread {
        Spread::of(self.reps.iter().map(|r| r.p99_us))
    }

    pub fn throughput(&self) -> Spread {
        Spread::of(self.reps.iter().map(|r| r.ops_per_s))
    }

    /// The ratio of this series to its baseline (a series among `among`, or
    /// the paired base), paired by repetition: for each repetition, this
    /// series' number over the baseline's in the same repetition; returns
    /// the spread of those ratios across repetitions and what they compare.
    ///
    /// Why paired means and not a ratio of medians: on a shared 2-core VM a
    /// round trip's latency jumps between levels (18 µs and 60 µs here) for
    /// stretches of a run, so one repetition's calls can be bimodal, and the
    /// median of a bimodal sample flips between the modes on a small change
    /// of mix: two operations measured call by call in the same stretch
    /// then show medians 15% apart by chance. A mean moves only in
    /// proportion to the mix, and both operations see the same mix; the
    /// slowest 1% of calls (scheduler hiccups of milliseconds) are left out.
    pub fn ratio(&self, among: &[Series]) -> Option<(Spread, String)> {
        let spread = |ratios: Vec<f64>| (!ratios.is_empty()).then(|| Spread::of(ratios));
        match self.baseline {
            Baseline::None => None,
            Baseline::Series { id, item } => {
                let base = find(among, id, self.threads)?;
                let (value, what): (fn(&Rep) -> f64, &str) = if self.threads == 1 {
                    (|r| r.trimmed_mean_us, "latency")
                } else {
                    (|r| r.ops_per_s, "throughput")
                };
                let ratios = self
                    .reps
                    .iter()
                    .zip(&base.reps)
                    .map(|(a, b)| value(a) / value(b))
                    .collect();
                Some((spread(ratios)?, format!("× {item}, {what}")))
            }
            Baseline::Paired { item } => {
                let ratios = self
                    .reps
                    .iter()
                    .filter_map(|r| Some(r.trimmed_mean_us / r.paired_base_us?))
                    .collect();
                Some((spread(ratios)?, format!("× {item}, latency")))
            }
        }
    }

    pub fn json(&self) -> Value {
        json!({
            "id": self.id,
            "item": self.item,
            "label": self.label,
            "threads": self.threads,
            "repetitions": self.reps.len(),
            "samples": self.pooled_ns.len(),
            "median_us": self.median().json(),
            "p99_us": self.p99().json(),
            "ops_per_s": self.throughput().json(),
            "per_repetition": self.reps.iter().map(|r| json!({
                "median_us": r.median_us,
                "p99_us": r.p99_us,
                "trimmed_mean_us": r.trimmed_mean_us,
                "ops_per_s": r.ops_per_s,
                "paired_floors_us": r.paired_base_us,
            })).collect::<Vec<_>>(),
            "pooled_percentiles_us": {
                "p50": quantile_us(&self.pooled_ns, 0.5),
                "p90": quantile_us(&self.pooled_ns, 0.9),
                "p99": quantile_us(&self.pooled_ns, 0.99),
                "p99.9": quantile_us(&self.pooled_ns, 0.999),
            },
        })
    }
}

/// The series `id` at `threads` among `series`.
pub fn find<'a>(series: &'a [Series], id: &str, threads: usize) -> Option<&'a Series> {
    series.iter().find(|s| s.id == id && s.threads == threads)
}

/// The median of [`Series::ratio`] for the series `id` at `threads`, its
/// baseline looked up among `series` too.
pub fn median_ratio(series: &[Series], id: &str, threads: usize) -> Option<f64> {
    find(series, id, threads)?
        .ratio(series)
        .map(|(r, _)| r.median)
}

// ---- the timed loops ----------------------------------------------------------

/// Runs `call` on `threads` threads, released together, for `duration`;
/// returns every latency (ns) and the wall time from release to the last
/// thread's last operation.
pub fn run_threads(
    threads: usize,
    duration: Duration,
    call: &Call<'_>,
) -> BoxResult<(Vec<u64>, Duration)> {
    let barrier = Barrier::new(threads + 1);
    let stop = AtomicBool::new(false);
    let first_error: Mutex<Option<String>> = Mutex::new(None);
    let (lat, wall) = thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let mut lat = Vec::with_capacity(1 << 15);
                    barrier.wait();
                    let released = Instant::now();
                    while !stop.load(Ordering::Relaxed) {
                        let t = Instant::now();
                        if let Err(err) = call() {
                            first_error.lock().unwrap().get_or_insert(err.to_string());
                            stop.store(true, Ordering::Relaxed);
                            break;
                        }
                        lat.push(t.elapsed().as_nanos() as u64);
                    }
                    (lat, released, Instant::now())
                })
            })
            .collect();
        barrier.wait();
        let mut start = Instant::now();
        thread::sleep(duration);
        stop.store(true, Ordering::Relaxed);
        let mut all = Vec::new();
        let mut last = start;
        for w in workers {
            let (lat, released, end) = w.join().expect("bench worker panicked");
            all.extend(lat);
            start = start.min(released);
            last = last.max(end);
        }
        (all, last - start)
    });
    if let Some(err) = first_error.into_inner().unwrap() {
        return Err(err.into());
    }
    Ok((lat, wall))
}

/// How long [`interleave`] goes on.
#[derive(Clone, Copy)]
pub enum Until {
    /// Rounds until this much time has passed.
    Elapsed(Duration),
    /// Exactly this many rounds.
    Rounds(usize),
}

/// Runs `calls` in turn on this thread, in a fresh random order every
/// round, `until` says how long; returns each call's latencies (ns).
///
/// Random, not rotated: rotating keeps the cyclic order, so every
/// operation would always follow the same one, and a Redis round trip right
/// after a Postgres query is measurably slower (the other servers' threads
/// have to wake up) — that would tax whichever operation follows the
/// Postgres floor.
pub fn interleave(until: Until, calls: &[&TimedCall<'_>]) -> BoxResult<Vec<Vec<u64>>> {
    let mut lat: Vec<Vec<u64>> = calls.iter().map(|_| Vec::with_capacity(1 << 15)).collect();
    let mut order: Vec<usize> = (0..calls.len()).collect();
    let start = Instant::now();
    let mut rounds = 0;
    while match until {
        Until::Elapsed(duration) => start.elapsed() < duration,
        Until::Rounds(n) => rounds < n,
    } {
        fastrand::shuffle(&mut order);
        for &k in &order {
            lat[k].push(calls[k]()?);
        }
        rounds += 1;
    }
    Ok(lat)
}

// ---- repetitions --------------------------------------------------------------

/// Measures `ops` at `threads` threads: a warm-up, then `plan.reps`
/// repetitions in which the operations take turns, so a slow phase of the
/// machine hits all of them alike; returns one series per operation.
pub fn side_by_side(ops: &[&Operation<'_>], threads: usize, plan: &Plan) -> BoxResult<Vec<Series>> {
    let mut group: Vec<Series> = ops.iter().map(|op| op.series(threads)).collect();
    // Warm-up: opens the pool connections the threads will use.
    for op in ops {
        run_threads(threads, plan.rep_time / 3, &*op.call)?;
    }
    let timed_calls: Vec<_> = ops.iter().map(|op| move || timed(&*op.call)).collect();
    let timed_calls: Vec<&TimedCall<'_>> =
        timed_calls.iter().map(|c| c as &TimedCall<'_>).collect();
    for rep in 0..plan.reps {
        if threads == 1 {
            // One thread runs the operations in turn, call by call: on a
            // shared 2-core VM the latency of a round trip jumps between
            // levels for hundreds of milliseconds at a time (where the
            // scheduler puts us relative to redis-server), and taking
            // turns per call exposes every operation to the same mix.
            let until = Until::Elapsed(plan.rep_time * ops.len() as u32);
            for (s, lat) in group.iter_mut().zip(interleave(until, &timed_calls)?) {
                s.add_single_threaded(lat, None);
            }
            continue;
        }
        // Many threads: each operation runs alone (its throughput is the
        // point), in an order rotated per repetition so none always
        // runs first.
        for i in 0..ops.len() {
            let j = (i + rep) % ops.len();
            let (lat, wall) = run_threads(threads, plan.rep_time, &*ops[j].call)?;
            group[j].add(lat, wall);
        }
    }
    for s in &mut group {
        s.finish();
    }
    Ok(group)
}
