//! The benchmark of issue 5: how close a cache hit gets to a raw Redis round
//! trip, and what a stampede costs, side by side in one run.
//!
//! ```text
//! cargo run --release --example bench            # full run, < 3 minutes
//! cargo run --release --example bench -- --quick # ~20 s smoke run (CI)
//! ```
//!
//! It prints a markdown table and writes `target/bench/report.json` and
//! `target/bench/report.md`; the full run also draws `docs/bench-latency.png`
//! and `docs/bench-stampede.png`.
//!
//! Targets are reported as met or not met, never asserted: a slow machine
//! must not fail CI. What does fail the run (exit status 1) is a broken
//! correctness property: a single-flight stampede that sends more than one
//! query, a single-flight key left in flight, or a read that returns a wrong
//! value or an error.
//!
//! Every run owns a users table `bench_users_<pid>` and a Redis namespace
//! `bench:<pid>:`, and removes both when it ends, also after an error.
//!
//! Two hidden modes (`--child-stampede`, `--child-memory`) are this binary
//! run as a child process: the cross-process stampede needs several
//! processes, and peak RSS is only meaningful in a fresh one.

use std::error::Error as StdError;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cacheaside::{CacheAside, Client, Config, UserProfile};
use serde_json::{Value, json};

type BoxError = Box<dyn StdError + Send + Sync>;
type BoxResult<T> = Result<T, BoxError>;

/// The user every hit measurement reads (Ada, from the demo users).
const USER_ID: i64 = 1;
/// The slow load of the stampede: 50 ms inside Postgres, sent through
/// `Db::query_one` so the query counter sees it.
const SLOW_LOAD_SQL: &str = "SELECT pg_sleep(0.05)";
/// Threads of each process in the cross-process stampede, and processes.
const XPROC_THREADS: usize = 50;
const XPROC_PROCESSES: usize = 4;
/// Stack of the stampede threads: the read path needs far less than the
/// 2 MiB default, and 1000 threads should not reserve 2 GiB.
const STAMPEDE_STACK: usize = 512 * 1024;

// Pool sizes of the bench's client (the library defaults are 8 and 16).
// 50 hit threads each get their own Redis connection, so neither the floor
// nor the library queues on the pool; 32 Postgres connections are a third
// of the server's default max_connections = 100, leaving room for the child
// processes and whatever else runs on the machine.
const BENCH_CACHE_POOL: u32 = 64;
const BENCH_DB_POOL: u32 = 32;
// The naive 1000-thread stampede sends 1000 × 50 ms of queries through 32
// connections (~1.6 s of queueing); the default 5 s checkout timeout is
// close enough to that to fail on a busy machine, so the bench raises it.
const BENCH_POOL_TIMEOUT: Duration = Duration::from_secs(30);

/// How much of everything a run does.
struct Plan {
    quick: bool,
    /// Repetitions of every latency measurement.
    reps: usize,
    /// How long one repetition of a hit measurement runs.
    rep_time: Duration,
    /// Misses per repetition of (5).
    misses: usize,
    /// Thread counts of the in-process stampede.
    stampede_ns: Vec<usize>,
    stampede_reps: usize,
    xproc_reps: usize,
    /// Distinct keys of the memory run, and its threads.
    memory_keys: u64,
    memory_threads: usize,
}

impl Plan {
    fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                quick,
                reps: 3,
                rep_time: Duration::from_millis(150),
                misses: 200,
                stampede_ns: vec![50, 200],
                stampede_reps: 2,
                xproc_reps: 1,
                memory_keys: 100_000,
                memory_threads: 8,
            }
        } else {
            Plan {
                quick,
                reps: 5,
                rep_time: Duration::from_millis(500),
                misses: 1000,
                stampede_ns: vec![50, 500, 1000],
                stampede_reps: 3,
                xproc_reps: 3,
                memory_keys: 1_000_000,
                memory_threads: 8,
            }
        }
    }
}

const USAGE: &str = "usage: bench [--quick [--plots]]
  (no flag)  the full run (< 3 min): report in target/bench/, plots in docs/
  --quick    a ~20 s smoke run (CI): report in target/bench/, no plots
  --plots    with --quick: also draw the plots, into target/bench/ (docs/ keeps the full run's)";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let outcome = match args.first().map(String::as_str) {
        Some("--child-stampede") => child_stampede(&args[1..]).map(|()| 0),
        Some("--child-memory") => child_memory(&args[1..]).map(|()| 0),
        Some("-h" | "--help") => {
            println!("{USAGE}");
            Ok(0)
        }
        _ => {
            let quick = args.iter().any(|a| a == "--quick");
            let plots = args.iter().any(|a| a == "--plots");
            if let Some(other) = args.iter().find(|a| *a != "--quick" && *a != "--plots") {
                eprintln!("bench: unknown argument {other:?}\n{USAGE}");
                std::process::exit(2);
            }
            run(Plan::new(quick), quick && plots)
        }
    };
    match outcome {
        Ok(code) => std::process::exit(code),
        Err(err) => {
            eprintln!("bench: error: {err}");
            let mut source = err.source();
            while let Some(cause) = source {
                eprintln!("  caused by: {cause}");
                source = cause.source();
            }
            std::process::exit(1);
        }
    }
}

// ---- set-up and clean-up ----------------------------------------------------

fn bench_config(namespace: &str) -> BoxResult<Config> {
    let mut config = Config::from_env();
    config.set_namespace(namespace)?;
    config.cache_pool_size = BENCH_CACHE_POOL;
    config.db_pool_size = BENCH_DB_POOL;
    config.pool_timeout = BENCH_POOL_TIMEOUT;
    // Long enough that no hit measurement sees its key expire.
    config.ttl = Duration::from_secs(600);
    Ok(config)
}

/// The bench's client, table and namespace; dropping it drops the table and
/// deletes the namespace, so a run that fails halfway leaves nothing behind.
struct Fixture {
    client: Client,
    table: String,
}

impl Fixture {
    fn create(config: &Config) -> BoxResult<Fixture> {
        let client = Client::open(config)?;
        let fixture = Fixture {
            client,
            table: config.users_table.clone(),
        };
        fixture.client.install_schema()?;
        fixture.client.seed_demo_users()?;
        Ok(fixture)
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        // Only the table this run created: its name carries our pid.
        if let Err(err) = self
            .client
            .db()
            .batch_execute(&format!("DROP TABLE IF EXISTS {}", self.table))
        {
            eprintln!("bench: could not drop {}: {err}", self.table);
        }
        match self.client.cache().delete_namespace() {
            Ok(n) => eprintln!(
                "bench: dropped {}, deleted {n} keys under {:?}",
                self.table,
                self.client.cache().namespace()
            ),
            Err(err) => eprintln!("bench: could not delete the namespace: {err}"),
        }
    }
}

fn expected_profile() -> UserProfile {
    let (id, name, email, plan) = cacheaside::DEMO_USERS[0];
    UserProfile {
        id,
        name: name.into(),
        email: email.into(),
        plan: plan.into(),
        version: 1,
    }
}

// ---- statistics ---------------------------------------------------------------

/// One repetition of a latency measurement.
#[derive(Clone, Copy)]
struct Rep {
    median_us: f64,
    p99_us: f64,
    /// Mean of the fastest 99% of calls: what the paired latency ratios
    /// compare (see [`Report::ratio`]).
    trimmed_mean_us: f64,
    ops_per_s: f64,
    /// For misses: the sum of the two floors' trimmed means, measured call
    /// by call alongside them in the same repetition.
    paired_base_us: Option<f64>,
}

/// Min, median and max of one number across repetitions.
#[derive(Clone, Copy, Default)]
struct Spread {
    min: f64,
    median: f64,
    max: f64,
}

impl Spread {
    fn of(values: impl IntoIterator<Item = f64>) -> Spread {
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

    fn json(&self) -> Value {
        json!({"min": self.min, "median": self.median, "max": self.max})
    }
}

fn median_sorted(v: &[f64]) -> f64 {
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The `q`-quantile (0..=1) of sorted nanoseconds, in microseconds
/// (nearest rank).
fn quantile_us(sorted_ns: &[u64], q: f64) -> f64 {
    if sorted_ns.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * sorted_ns.len() as f64).ceil() as usize).clamp(1, sorted_ns.len());
    sorted_ns[rank - 1] as f64 / 1000.0
}

/// Mean of the fastest 99% of sorted nanoseconds, in microseconds.
fn trimmed_mean_us(sorted_ns: &[u64]) -> f64 {
    let kept = &sorted_ns[..(sorted_ns.len() * 99).div_ceil(100)];
    kept.iter().sum::<u64>() as f64 / kept.len().max(1) as f64 / 1000.0
}

/// A latency measurement: one operation at one thread count.
struct Series {
    id: &'static str,
    item: &'static str,
    label: String,
    threads: usize,
    reps: Vec<Rep>,
    /// Every sample of every repetition, sorted (for the percentile plot).
    pooled_ns: Vec<u64>,
}

impl Series {
    fn new(id: &'static str, item: &'static str, label: &str, threads: usize) -> Series {
        Series {
            id,
            item,
            label: label.to_owned(),
            threads,
            reps: Vec::new(),
            pooled_ns: Vec::new(),
        }
    }

    fn add(&mut self, mut lat_ns: Vec<u64>, wall: Duration) {
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

    fn finish(&mut self) {
        self.pooled_ns.sort_unstable();
    }

    fn median(&self) -> Spread {
        Spread::of(self.reps.iter().map(|r| r.median_us))
    }

    fn p99(&self) -> Spread {
        Spread::of(self.reps.iter().map(|r| r.p99_us))
    }

    fn throughput(&self) -> Spread {
        Spread::of(self.reps.iter().map(|r| r.ops_per_s))
    }

    fn json(&self) -> Value {
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

// ---- the timed loop -----------------------------------------------------------

/// One operation under test; `Err` means the library or a server is broken
/// (a wrong value included), which ends the run with a failure.
type Op<'a> = Box<dyn Fn() -> BoxResult<()> + Sync + 'a>;

/// Runs `op` on `threads` threads, released together, for `duration`;
/// returns every latency (ns) and the wall time from release to the last
/// thread's last operation.
fn run_threads(
    threads: usize,
    duration: Duration,
    op: &(dyn Fn() -> BoxResult<()> + Sync),
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
                        if let Err(err) = op() {
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

/// Runs `ops` in turn on this thread for `duration`, in a fresh random
/// order every round; returns each operation's latencies (ns).
///
/// Random, not rotated: rotating keeps the cyclic order, so every
/// operation would always follow the same one, and a Redis round trip right
/// after a Postgres query is measurably slower (the other servers' threads
/// have to wake up) — that would tax whichever operation follows the
/// Postgres floor.
fn run_interleaved(
    duration: Duration,
    ops: &[&(dyn Fn() -> BoxResult<()> + Sync)],
) -> BoxResult<Vec<Vec<u64>>> {
    let mut lat: Vec<Vec<u64>> = ops.iter().map(|_| Vec::with_capacity(1 << 15)).collect();
    let mut order: Vec<usize> = (0..ops.len()).collect();
    let start = Instant::now();
    while start.elapsed() < duration {
        fastrand::shuffle(&mut order);
        for &k in &order {
            let t = Instant::now();
            ops[k]()?;
            lat[k].push(t.elapsed().as_nanos() as u64);
        }
    }
    Ok(lat)
}

// ---- the run ----------------------------------------------------------------

fn run(plan: Plan, quick_plots: bool) -> BoxResult<i32> {
    let started = Instant::now();
    let pid = std::process::id();
    let namespace = format!("bench:{pid}:");
    let mut config = bench_config(&namespace)?;
    config.set_users_table(&format!("bench_users_{pid}"))?;
    eprintln!(
        "bench: {} run, table {}, namespace {namespace:?}",
        if plan.quick { "quick" } else { "full" },
        config.users_table
    );
    let fixture = Fixture::create(&config)?;
    let client = &fixture.client;
    let mut failures: Vec<String> = Vec::new();

    // (1)-(5) and (7): hits, misses and their floors.
    let series = measure_hits(client, &config, &plan)?;
    // (6): stampedes.
    let one_load = measure_one_load(client)?;
    let stampedes = measure_stampedes(client, &plan, &mut failures)?;
    let xproc = measure_cross_process(&namespace, &plan, &mut failures)?;
    // (8): memory, in a fresh process.
    let memory = measure_memory(&namespace, &plan, &mut failures)?;

    let machine = machine_info(client);
    let report = Report {
        plan: &plan,
        machine,
        series: &series,
        one_load,
        stampedes: &stampedes,
        xproc: &xproc,
        memory: &memory,
    };
    let targets = report.targets();
    let markdown = report.markdown(&targets, started.elapsed());
    println!("{markdown}");

    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target")
        .join("bench");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("report.md"), &markdown)?;
    let json = report.json(&targets, &failures, started.elapsed());
    std::fs::write(dir.join("report.json"), serde_json::to_vec_pretty(&json)?)?;
    eprintln!("bench: wrote {}/report.{{md,json}}", dir.display());
    if !plan.quick || quick_plots {
        let plot_dir = if plan.quick {
            dir.clone()
        } else {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("docs")
        };
        std::fs::create_dir_all(&plot_dir)?;
        match plots::draw(&plot_dir, &series, &stampedes, one_load.as_secs_f64() * 1e3) {
            Ok(()) => eprintln!(
                "bench: wrote {0}/bench-latency.png and {0}/bench-stampede.png",
                plot_dir.display()
            ),
            Err(err) => eprintln!("bench: plots skipped: {err}"),
        }
    }

    drop(fixture);
    eprintln!(
        "bench: finished in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    if failures.is_empty() {
        Ok(0)
    } else {
        for f in &failures {
            eprintln!("bench: FAILED: {f}");
        }
        Ok(1)
    }
}

/// (1) redis floor, (2) Postgres floor, (3) hit, (4) single-flight hit and
/// (7) the C ABI hit, at 1 and 50 threads. The operations of one thread
/// count take turns repetition by repetition, so a slow phase of the machine
/// hits all of them alike.
fn measure_hits(client: &Client, config: &Config, plan: &Plan) -> BoxResult<Vec<Series>> {
    let expected = expected_profile();
    let key = Client::user_key(USER_ID);
    // Warm the cached profile; then copy its size for the floor's value.
    client.get_user_profile(USER_ID)?;
    let cached_entry: Vec<u8> = client.cache().with_connection(|c| {
        redis::cmd("GET")
            .arg(client.cache().redis_key(&key))
            .query(c)
    })?;
    // The floor's value: the profile's plain JSON, padded with trailing
    // whitespace (valid JSON) to the size of the library's cached entry, so
    // both move the same number of bytes.
    let mut floor_value = serde_json::to_vec(&expected)?;
    floor_value.resize(cached_entry.len().max(floor_value.len()), b' ');
    let floor_key = client.cache().redis_key("floor:profile");
    client.cache().with_connection(|c| {
        redis::cmd("SET")
            .arg(&floor_key)
            .arg(&floor_value)
            .query::<()>(c)
    })?;
    let select = format!(
        "SELECT id, name, email, plan, version FROM {} WHERE id = $1",
        client.users_table()
    );
    eprintln!(
        "bench: hit value {} bytes (cached entry), floor value {} bytes",
        cached_entry.len(),
        floor_value.len()
    );

    let check = |p: Option<UserProfile>| -> BoxResult<()> {
        match p {
            Some(p) if p.id == USER_ID => Ok(()),
            other => Err(format!("read returned {other:?}, expected user {USER_ID}").into()),
        }
    };
    // (7): a second client, opened and read through the C ABI.
    let c_abi = ffi_hit::CAbi::open(config)?;
    let ops: Vec<(&'static str, &'static str, &'static str, Op<'_>)> = vec![
        (
            "floor_redis",
            "1",
            "floor: pooled redis GET + serde_json",
            Box::new(|| {
                let raw: Vec<u8> = client
                    .cache()
                    .with_connection(|c| redis::cmd("GET").arg(&floor_key).query(c))?;
                check(Some(serde_json::from_slice::<UserProfile>(&raw)?))
            }),
        ),
        (
            "floor_pg",
            "2",
            "floor: pooled Postgres PK select",
            Box::new(|| {
                let row = client.db().query_one(&select, &[&USER_ID])?;
                check(row.map(|r| UserProfile {
                    id: r.get(0),
                    name: r.get(1),
                    email: r.get(2),
                    plan: r.get(3),
                    version: r.get(4),
                }))
            }),
        ),
        (
            "hit",
            "3",
            "get_user_profile (hit)",
            Box::new(|| check(client.get_user_profile(USER_ID)?)),
        ),
        (
            "hit_singleflight",
            "4",
            "get_user_profile_singleflight (hit)",
            Box::new(|| check(client.get_user_profile_singleflight(USER_ID)?)),
        ),
        (
            "hit_c_abi",
            "7",
            "C ABI cacheaside_get_user_profile (hit)",
            Box::new(|| match c_abi.get_user_profile_id(USER_ID)? {
                Some(USER_ID) => Ok(()),
                other => Err(format!("C ABI read returned user {other:?}").into()),
            }),
        ),
    ];

    // A hit never reaches Postgres: a correctness property, checked here.
    let queries_before = client.db().query_count();
    for _ in 0..1000 {
        check(client.get_user_profile(USER_ID)?)?;
        check(client.get_user_profile_singleflight(USER_ID)?)?;
    }
    if client.db().query_count() != queries_before {
        return Err("cache hits sent Postgres queries".into());
    }
    let mut out = Vec::new();
    for threads in [1, 50] {
        // The C ABI has no pool-size setters, so its client has the
        // library's default 16 Redis connections: at 50 threads it would be
        // measured against a pool a quarter the size of the Rust client's.
        // Its target is single-threaded; it runs at 1 thread only.
        let active: Vec<usize> = (0..ops.len())
            .filter(|&k| threads == 1 || ops[k].0 != "hit_c_abi")
            .collect();
        let mut group: Vec<Series> = active
            .iter()
            .map(|&k| Series::new(ops[k].0, ops[k].1, ops[k].2, threads))
            .collect();
        // Warm-up: opens the pool connections the threads will use.
        for &k in &active {
            run_threads(threads, plan.rep_time / 3, ops[k].3.as_ref())?;
        }
        for rep in 0..plan.reps {
            if threads == 1 {
                // One thread runs the operations in turn, call by call: on a
                // shared 2-core VM the latency of a round trip jumps between
                // levels for hundreds of milliseconds at a time (where the
                // scheduler puts us relative to redis-server), and taking
                // turns per call exposes every operation to the same mix.
                let active_ops: Vec<&(dyn Fn() -> BoxResult<()> + Sync)> =
                    active.iter().map(|&k| ops[k].3.as_ref()).collect();
                let samples = run_interleaved(plan.rep_time * active.len() as u32, &active_ops)?;
                for (s, lat) in group.iter_mut().zip(samples) {
                    // Single-threaded, the throughput is 1 / mean latency.
                    let busy = Duration::from_nanos(lat.iter().sum());
                    s.add(lat, busy);
                }
                continue;
            }
            // Many threads: each operation runs alone (its throughput is the
            // point), in an order rotated per repetition so none always
            // runs first.
            for i in 0..active.len() {
                let j = (i + rep) % active.len();
                let (lat, wall) = run_threads(threads, plan.rep_time, ops[active[j]].3.as_ref())?;
                group[j].add(lat, wall);
            }
        }
        eprintln!("bench: hits at {threads} thread(s) done");
        out.extend(group);
    }
    for s in &mut out {
        s.finish();
    }
    // (5): misses, alongside the floors (ops 0 and 1).
    debug_assert!(ops[0].0 == "floor_redis" && ops[1].0 == "floor_pg");
    out.extend(measure_misses(
        client,
        ops[0].3.as_ref(),
        ops[1].3.as_ref(),
        plan,
    )?);
    Ok(out)
}

/// (5) a miss with the row present: invalidate, then read (only the read is
/// timed), plain and single-flight, taking turns call by call (in a random
/// order per round) with the two floors, so the ratio to (1)+(2) compares
/// numbers from the same stretch of the run.
fn measure_misses(
    client: &Client,
    floor_redis: &(dyn Fn() -> BoxResult<()> + Sync),
    floor_pg: &(dyn Fn() -> BoxResult<()> + Sync),
    plan: &Plan,
) -> BoxResult<Vec<Series>> {
    let key = Client::user_key(USER_ID);
    let mut plain = Series::new("miss", "5", "miss: get_user_profile (cold, row present)", 1);
    let mut sf = Series::new(
        "miss_singleflight",
        "5",
        "miss: get_user_profile_singleflight (cold)",
        1,
    );
    let miss = |single_flight: bool| -> BoxResult<u64> {
        client.engine().invalidate(&key)?;
        let t = Instant::now();
        let p = if single_flight {
            client.get_user_profile_singleflight(USER_ID)?
        } else {
            client.get_user_profile(USER_ID)?
        };
        let took = t.elapsed().as_nanos() as u64;
        if p.map(|p| p.id) != Some(USER_ID) {
            return Err("a miss returned the wrong profile".into());
        }
        Ok(took)
    };
    let timed = |op: &(dyn Fn() -> BoxResult<()> + Sync)| -> BoxResult<u64> {
        let t = Instant::now();
        op()?;
        Ok(t.elapsed().as_nanos() as u64)
    };
    for _ in 0..plan.reps {
        // 0: plain miss, 1: single-flight miss, 2: redis floor, 3: pg floor.
        let mut lat: [Vec<u64>; 4] = Default::default();
        let mut order = [0, 1, 2, 3];
        let before = client.db().query_count();
        for _ in 0..plan.misses {
            fastrand::shuffle(&mut order);
            for &k in &order {
                lat[k].push(match k {
                    0 => miss(false)?,
                    1 => miss(true)?,
                    2 => timed(floor_redis)?,
                    _ => timed(floor_pg)?,
                });
            }
        }
        // One query per miss and one per Postgres floor call.
        let queries = client.db().query_count() - before;
        if queries != 3 * plan.misses as u64 {
            return Err(format!(
                "{} rounds of two misses and a Postgres select sent {queries} queries, expected {}",
                plan.misses,
                3 * plan.misses
            )
            .into());
        }
        let [mut plain_lat, mut sf_lat, mut redis_lat, mut pg_lat] = lat;
        redis_lat.sort_unstable();
        pg_lat.sort_unstable();
        let floors = trimmed_mean_us(&redis_lat) + trimmed_mean_us(&pg_lat);
        for (series, lat) in [(&mut plain, &mut plain_lat), (&mut sf, &mut sf_lat)] {
            let busy = Duration::from_nanos(lat.iter().sum());
            series.add(std::mem::take(lat), busy);
            if let Some(rep) = series.reps.last_mut() {
                rep.paired_base_us = Some(floors);
            }
        }
    }
    plain.finish();
    sf.finish();
    eprintln!("bench: misses done");
    Ok(vec![plain, sf])
}

/// The time of one slow load on its own: the yardstick of stampede walls.
fn measure_one_load(client: &Client) -> BoxResult<Duration> {
    let db = client.db();
    db.query_one(SLOW_LOAD_SQL, &[])?; // prepare it once
    let mut times: Vec<f64> = (0..5)
        .map(|_| {
            let t = Instant::now();
            db.query_one(SLOW_LOAD_SQL, &[])
                .map(|_| t.elapsed().as_secs_f64())
        })
        .collect::<Result<_, _>>()?;
    times.sort_by(f64::total_cmp);
    Ok(Duration::from_secs_f64(median_sorted(&times)))
}

/// One stampede at one N on one path, repeated.
struct Stampede {
    single_flight: bool,
    n: usize,
    queries: Vec<u64>,
    wall_ms: Vec<f64>,
    /// The machine's cost of waking N parked threads (see [`wake_floor`]),
    /// per repetition, (condvar, RwLock gate) in ms; single-flight rows only.
    wake_ms: Vec<(f64, f64)>,
}

/// `parking_lot`'s condvar as a one-shot gate, which `src/singleflight.rs`
/// used before its RwLock gate: `notify_all` requeues the waiters onto the
/// mutex, and each woken thread wakes the next only when it unlocks, one
/// after the other.
#[derive(Default)]
struct CondvarGate(parking_lot::Mutex<bool>, parking_lot::Condvar);

impl CondvarGate {
    /// Parks until the gate opens (30 s at most). `parked` is bumped under
    /// the lock, which the wait releases only once the thread is parked.
    fn wait(&self, parked: &AtomicUsize) {
        let mut open = self.0.lock();
        parked.fetch_add(1, Ordering::Relaxed);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !*open && !self.1.wait_until(&mut open, deadline).timed_out() {}
    }

    fn open(&self) -> Instant {
        let at = {
            let mut open = self.0.lock();
            *open = true;
            Instant::now()
        };
        self.1.notify_all();
        at
    }
}

/// The scheduler's share of a stampede's wall time: `n` threads park in
/// `wait`, then `open` (run on this thread) releases them; returns the time
/// until the last of them has run. No Redis, no Postgres: once the load is
/// done, a single-flight stampede cannot end sooner than this.
fn wake_floor(
    n: usize,
    wait: &(dyn Fn(&AtomicUsize) + Sync),
    open: impl FnOnce() -> Instant,
) -> BoxResult<Duration> {
    let parked = AtomicUsize::new(0);
    thread::scope(|s| {
        let mut workers = Vec::with_capacity(n);
        for _ in 0..n {
            let worker = thread::Builder::new()
                .stack_size(STAMPEDE_STACK)
                .spawn_scoped(s, || {
                    wait(&parked);
                    Instant::now()
                });
            match worker {
                Ok(w) => workers.push(w),
                Err(err) => {
                    open();
                    return Err(format!("could not spawn a thread: {err}").into());
                }
            }
        }
        while parked.load(Ordering::Relaxed) < n {
            thread::sleep(Duration::from_millis(1));
        }
        // A waiter is counted just before it parks; give the last ones time.
        thread::sleep(Duration::from_millis(20));
        let start = open();
        let mut last = start;
        for w in workers {
            last = last.max(w.join().expect("wake-floor thread panicked"));
        }
        Ok(last - start)
    })
}

/// [`wake_floor`] with the old and the current single-flight gate, in ms:
/// (parking_lot condvar, parking_lot RwLock held for writing by the opener,
/// which unparks every waiting reader in one pass on unlock).
fn wake_floors(n: usize) -> BoxResult<(f64, f64)> {
    let gate = CondvarGate::default();
    let condvar = wake_floor(n, &|parked| gate.wait(parked), || gate.open())?;
    let lock = parking_lot::RwLock::new(());
    let held = lock.write();
    let wait = |parked: &AtomicUsize| {
        parked.fetch_add(1, Ordering::Relaxed);
        drop(lock.try_read_for(Duration::from_secs(30)));
    };
    let rwlock = wake_floor(n, &wait, move || {
        let at = Instant::now();
        drop(held);
        at
    })?;
    Ok((condvar.as_secs_f64() * 1e3, rwlock.as_secs_f64() * 1e3))
}

/// (6) N threads released by a barrier on a cold key whose load takes 50 ms.
fn measure_stampedes(
    client: &Client,
    plan: &Plan,
    failures: &mut Vec<String>,
) -> BoxResult<Vec<Stampede>> {
    let engine = client.engine();
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
                    failures.push(format!(
                        "stampede {} N={n}: {errors} reads failed or returned a wrong value",
                        path_name(single_flight)
                    ));
                }
                if single_flight && queries != 1 {
                    failures.push(format!(
                        "single-flight stampede N={n} sent {queries} queries, expected exactly 1"
                    ));
                }
                s.queries.push(queries);
                s.wall_ms.push(wall.as_secs_f64() * 1e3);
                if single_flight {
                    s.wake_ms.push(wake_floors(n)?);
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
                failures.push(format!(
                    "{} keys still in flight after the stampede N={n}",
                    engine.in_flight()
                ));
            }
            out.push(s);
        }
    }
    Ok(out)
}

fn path_name(single_flight: bool) -> &'static str {
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
                        db.query_one(SLOW_LOAD_SQL, &[])?;
                        Ok(Some(expected.clone()))
                    };
                    let got = if single_flight {
                        engine.get_or_load_singleflight(key, ttl, load)
                    } else {
                        engine.get_or_load(key, ttl, load)
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

/// The cross-process stampede: its repetitions.
struct CrossProcess {
    queries: Vec<u64>,
    wall_ms: Vec<f64>,
    /// Per repetition and child, in ms from the parent's "go": when the
    /// child read "go", when its first thread returned (the value reached
    /// this process), when its last did; and its queries.
    children: Vec<Vec<(f64, f64, f64, u64)>>,
    /// [`wake_floors`] of all the processes' threads, in one process.
    wake_ms: Vec<(f64, f64)>,
}

/// P processes × 50 threads on one cold key through the Redis rebuild lock.
/// Children print "ready" when their threads wait at their barrier; the
/// parent writes "go" to all of them at once.
fn measure_cross_process(
    namespace: &str,
    plan: &Plan,
    failures: &mut Vec<String>,
) -> BoxResult<CrossProcess> {
    let exe = std::env::current_exe()?;
    let mut out = CrossProcess {
        queries: Vec::new(),
        wall_ms: Vec::new(),
        children: Vec::new(),
        wake_ms: Vec::new(),
    };
    for rep in 0..plan.xproc_reps {
        let key = format!("stampede:xproc:{rep}");
        let mut children: Vec<(Child, ChildStdin, BufReader<ChildStdout>)> = Vec::new();
        for _ in 0..XPROC_PROCESSES {
            let mut child = Command::new(&exe)
                .args([
                    "--child-stampede",
                    namespace,
                    &key,
                    &XPROC_THREADS.to_string(),
                ])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()?;
            let stdin = child.stdin.take().ok_or("child has no stdin")?;
            let stdout = BufReader::new(child.stdout.take().ok_or("child has no stdout")?);
            children.push((child, stdin, stdout));
        }
        for (_, _, stdout) in &mut children {
            let line = read_line(stdout)?;
            if line != "ready" {
                return Err(format!("stampede child said {line:?} instead of ready").into());
            }
        }
        let go_us = epoch_us();
        for (_, stdin, _) in &mut children {
            stdin.write_all(b"go\n")?;
            stdin.flush()?;
        }
        let mut queries = 0;
        let mut last_end_us = go_us;
        let mut details = Vec::new();
        for (child, _, stdout) in &mut children {
            let line = read_line(stdout)?;
            let result: Value = serde_json::from_str(
                line.strip_prefix("result ")
                    .ok_or_else(|| format!("stampede child said {line:?}"))?,
            )?;
            let child_queries = result["queries"].as_u64().ok_or("no queries")?;
            let end_us = result["end_us"].as_u64().ok_or("no end_us")?;
            let child_go_us = result["go_us"].as_u64().ok_or("no go_us")?;
            let first_us = result["first_end_us"].as_u64().ok_or("no first_end_us")?;
            let since_go = |us: u64| us.saturating_sub(go_us) as f64 / 1e3;
            details.push((
                since_go(child_go_us),
                since_go(first_us),
                since_go(end_us),
                child_queries,
            ));
            queries += child_queries;
            last_end_us = last_end_us.max(end_us);
            let errors = result["errors"].as_u64().unwrap_or(u64::MAX);
            if errors != 0 {
                failures.push(format!(
                    "cross-process stampede: {errors} reads failed in a child"
                ));
            }
            if result["in_flight"].as_u64() != Some(0) {
                failures.push("cross-process stampede: a child left keys in flight".into());
            }
            let status = child.wait()?;
            if !status.success() {
                failures.push(format!("cross-process stampede child exited with {status}"));
            }
        }
        if queries != 1 {
            failures.push(format!(
                "cross-process stampede ({XPROC_PROCESSES} × {XPROC_THREADS}) sent {queries} queries, expected exactly 1"
            ));
        }
        out.queries.push(queries);
        out.wall_ms
            .push((last_end_us.saturating_sub(go_us)) as f64 / 1e3);
        out.children.push(details);
        out.wake_ms
            .push(wake_floors(XPROC_PROCESSES * XPROC_THREADS)?);
    }
    eprintln!(
        "bench: cross-process stampede: queries {:?}, wall ms {:?}, per child (go read, first done, last done, queries) {:?}",
        out.queries, out.wall_ms, out.children
    );
    Ok(out)
}

fn read_line(reader: &mut impl BufRead) -> BoxResult<String> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Err("a child process exited early (see its error above)".into());
    }
    Ok(line.trim_end().to_owned())
}

fn epoch_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// `--child-stampede NAMESPACE KEY THREADS`: one process of the
/// cross-process stampede. Prints `ready`, waits for `go` on stdin, then
/// prints `result {json}`.
fn child_stampede(args: &[String]) -> BoxResult<()> {
    let [namespace, key, threads] = args else {
        return Err("usage: --child-stampede NAMESPACE KEY THREADS".into());
    };
    let threads: usize = threads.parse()?;
    let mut config = bench_config(namespace)?;
    // Only a leader queries; followers wait on the condvar. Every connection
    // is opened before "ready" (r2d2's build waits for min_idle), as in a
    // warmed-up service: otherwise the 50 threads' first GETs would wait
    // for new Redis connections inside the timed window.
    config.db_pool_size = 2;
    config.cache_pool_size = 8;
    config.pool_min_idle = 8;
    let engine = CacheAside::open(&config)?;
    let db = engine.db();
    db.query_one("SELECT 1", &[])?; // connect before the clock starts
    let expected = expected_profile();
    let barrier = Barrier::new(threads + 1);
    // Set when no "go" came (the parent gave up): the threads leave the
    // barrier without reading.
    let abort = AtomicBool::new(false);
    let (go_us, results) = thread::scope(|s| -> BoxResult<_> {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    barrier.wait();
                    if abort.load(Ordering::Relaxed) {
                        return (false, epoch_us());
                    }
                    let got = engine.get_or_load_singleflight(key, Duration::from_secs(60), || {
                        db.query_one(SLOW_LOAD_SQL, &[])?;
                        Ok(Some(expected.clone()))
                    });
                    if let Err(err) = &got {
                        eprintln!("bench child: read failed: {}", err.chain());
                    }
                    (matches!(&got, Ok(Some(p)) if *p == expected), epoch_us())
                })
            })
            .collect();
        let go = (|| -> BoxResult<()> {
            println!("ready");
            std::io::stdout().flush()?;
            let mut line = String::new();
            std::io::stdin().read_line(&mut line)?;
            if line.trim() != "go" {
                return Err(format!("expected go, got {line:?}").into());
            }
            Ok(())
        })();
        let go_us = epoch_us();
        abort.store(go.is_err(), Ordering::Relaxed);
        // Whatever happened, every thread leaves the barrier.
        barrier.wait();
        let results: Vec<(bool, u64)> = workers
            .into_iter()
            .map(|w| w.join().expect("child thread panicked"))
            .collect();
        go?;
        Ok((go_us, results))
    })?;
    let result = json!({
        "queries": db.query_count() - 1,
        "errors": results.iter().filter(|(ok, _)| !ok).count(),
        "go_us": go_us,
        "end_us": results.iter().map(|(_, end)| *end).max().unwrap_or(go_us),
        "first_end_us": results.iter().map(|(_, end)| *end).min().unwrap_or(go_us),
        "in_flight": engine.in_flight(),
    });
    println!("result {result}");
    Ok(())
}

/// What the memory child reports.
struct Memory {
    keys: u64,
    threads: usize,
    secs: f64,
    rss_before_kib: u64,
    hwm_before_kib: u64,
    rss_after_kib: u64,
    hwm_after_kib: u64,
    in_flight: u64,
}

impl Memory {
    fn growth_kib(&self) -> u64 {
        self.hwm_after_kib.saturating_sub(self.hwm_before_kib)
    }
}

/// (8) Peak RSS around single-flight reads of many distinct keys, in a fresh
/// process so earlier sections' peaks (1000 stampede threads) do not hide it.
fn measure_memory(namespace: &str, plan: &Plan, failures: &mut Vec<String>) -> BoxResult<Memory> {
    let exe = std::env::current_exe()?;
    eprintln!(
        "bench: memory: {} distinct keys on {} threads...",
        plan.memory_keys, plan.memory_threads
    );
    let output = Command::new(exe)
        .args([
            "--child-memory",
            namespace,
            &plan.memory_keys.to_string(),
            &plan.memory_threads.to_string(),
        ])
        .stderr(Stdio::inherit())
        .output()?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("result "))
        .ok_or("the memory child printed no result")?;
    let r: Value = serde_json::from_str(line)?;
    let num = |k: &str| r[k].as_u64().ok_or_else(|| format!("memory child: no {k}"));
    let memory = Memory {
        keys: num("keys")?,
        threads: plan.memory_threads,
        secs: r["secs"].as_f64().unwrap_or(f64::NAN),
        rss_before_kib: num("rss_before_kib")?,
        hwm_before_kib: num("hwm_before_kib")?,
        rss_after_kib: num("rss_after_kib")?,
        hwm_after_kib: num("hwm_after_kib")?,
        in_flight: num("in_flight")?,
    };
    if !output.status.success() {
        failures.push(format!("memory child exited with {}", output.status));
    }
    if num("errors")? != 0 {
        failures.push(format!("memory run: {} reads failed", num("errors")?));
    }
    if memory.in_flight != 0 {
        failures.push(format!(
            "memory run: {} keys still in flight at the end, expected 0",
            memory.in_flight
        ));
    }
    eprintln!(
        "bench: memory: {:.1} s, peak RSS {} -> {} KiB, in flight {}",
        memory.secs, memory.hwm_before_kib, memory.hwm_after_kib, memory.in_flight
    );
    Ok(memory)
}

/// `--child-memory NAMESPACE KEYS THREADS`: single-flight reads of KEYS
/// distinct keys with a trivial loader; prints `result {json}`.
fn child_memory(args: &[String]) -> BoxResult<()> {
    let [namespace, keys, threads] = args else {
        return Err("usage: --child-memory NAMESPACE KEYS THREADS".into());
    };
    let (keys, threads): (u64, usize) = (keys.parse()?, threads.parse()?);
    let config = bench_config(namespace)?;
    let engine = CacheAside::open(&config)?;
    // Short-lived: these keys only have to outlive their one read, and Redis
    // then frees them itself, long before the run's clean-up scans for them.
    let ttl = Duration::from_secs(5);
    let read_all = |prefix: &str, count: u64| -> u64 {
        let next = AtomicU64::new(0);
        let errors = AtomicU64::new(0);
        thread::scope(|s| {
            for _ in 0..threads {
                s.spawn(|| {
                    let mut key = String::with_capacity(32);
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= count {
                            break;
                        }
                        key.clear();
                        let _ = write!(key, "{prefix}:{i}");
                        let got = engine.get_or_load_singleflight(&key, ttl, || Ok(Some(i)));
                        if !matches!(got, Ok(Some(v)) if v == i) {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        errors.into_inner()
    };
    // Warm-up: threads, pool connections, allocator arenas, script cache.
    let mut errors = read_all("mem:warm", 20_000);
    let (rss_before, hwm_before) = rss_kib()?;
    let t = Instant::now();
    errors += read_all("mem", keys);
    let secs = t.elapsed().as_secs_f64();
    let (rss_after, hwm_after) = rss_kib()?;
    let result = json!({
        "keys": keys,
        "secs": secs,
        "errors": errors,
        "rss_before_kib": rss_before,
        "hwm_before_kib": hwm_before,
        "rss_after_kib": rss_after,
        "hwm_after_kib": hwm_after,
        "in_flight": engine.in_flight(),
    });
    println!("result {result}");
    Ok(())
}

/// (VmRSS, VmHWM) of this process, in KiB.
fn rss_kib() -> BoxResult<(u64, u64)> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let field = |name: &str| -> BoxResult<u64> {
        let line = status
            .lines()
            .find(|l| l.starts_with(name))
            .ok_or_else(|| format!("no {name} in /proc/self/status"))?;
        Ok(line
            .split_whitespace()
            .nth(1)
            .ok_or("malformed /proc/self/status")?
            .parse()?)
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

// ---- machine ----------------------------------------------------------------

fn machine_info(client: &Client) -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    let cores = thread::available_parallelism().map_or(0, |n| n.get());
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kib| kib.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| (kib / 1024.0 / 1024.0 * 10.0).round() / 10.0);
    // Other work on the machine moves every number here; say how busy it was.
    let load = std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    let postgres = client
        .db()
        .query_one("SHOW server_version", &[])
        .ok()
        .flatten()
        .map(|r| r.get::<_, String>(0))
        .unwrap_or_default();
    let redis = client
        .cache()
        .with_connection(|c| redis::cmd("INFO").arg("server").query::<String>(c))
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("redis_version:"))
                .map(|v| v.trim().to_owned())
        })
        .unwrap_or_default();
    json!({
        "cpu": cpu,
        "cores": cores,
        "memory_gib": mem_gib,
        "kernel": kernel,
        "load_average_at_end": load,
        "postgres": postgres,
        "redis": redis,
        "servers": "local, over TCP on 127.0.0.1",
    })
}

// ---- the report ---------------------------------------------------------------

struct Report<'a> {
    plan: &'a Plan,
    machine: Value,
    series: &'a [Series],
    one_load: Duration,
    stampedes: &'a [Stampede],
    xproc: &'a CrossProcess,
    memory: &'a Memory,
}

/// One target: what was measured against what limit.
struct Target {
    name: String,
    value: String,
    limit: String,
    met: Option<bool>,
}

impl Report<'_> {
    fn get(&self, id: &str, threads: usize) -> Option<&Series> {
        self.series
            .iter()
            .find(|s| s.id == id && s.threads == threads)
    }

    /// The ratio of `s` to its baseline, paired by repetition: for each
    /// repetition, `s`'s number over the baseline's in the same repetition;
    /// returns the spread of those ratios across repetitions and what they
    /// compare.
    ///
    /// Why paired means and not a ratio of medians: on a shared 2-core VM a
    /// round trip's latency jumps between levels (18 µs and 60 µs here) for
    /// stretches of a run, so one repetition's calls can be bimodal, and the
    /// median of a bimodal sample flips between the modes on a small change
    /// of mix: two operations measured call by call in the same stretch
    /// then show medians 15% apart by chance. A mean moves only in
    /// proportion to the mix, and both operations see the same mix; the
    /// slowest 1% of calls (scheduler hiccups of milliseconds) are left out.
    fn ratio(&self, s: &Series) -> Option<(Spread, &'static str)> {
        let paired = |base: &str, value: fn(&Rep) -> f64| {
            let base = self.get(base, s.threads)?;
            let ratios: Vec<f64> = s
                .reps
                .iter()
                .zip(&base.reps)
                .map(|(a, b)| value(a) / value(b))
                .collect();
            (!ratios.is_empty()).then(|| Spread::of(ratios))
        };
        let latency = |base| paired(base, |r: &Rep| r.trimmed_mean_us);
        let tput = |base| paired(base, |r: &Rep| r.ops_per_s);
        match (s.id, s.threads) {
            ("hit" | "hit_singleflight", 1) => Some((latency("floor_redis")?, "× (1), latency")),
            ("hit" | "hit_singleflight", _) => Some((tput("floor_redis")?, "× (1), throughput")),
            ("hit_c_abi", 1) => Some((latency("hit")?, "× (3), latency")),
            ("hit_c_abi", _) => Some((tput("hit")?, "× (3), throughput")),
            ("miss" | "miss_singleflight", _) => {
                let ratios: Vec<f64> = s
                    .reps
                    .iter()
                    .filter_map(|r| Some(r.trimmed_mean_us / r.paired_base_us?))
                    .collect();
                (!ratios.is_empty()).then(|| (Spread::of(ratios), "× (1)+(2), latency"))
            }
            _ => None,
        }
    }

    fn targets(&self) -> Vec<Target> {
        let mut t = Vec::new();
        let ratio_target = |name: &str, ratio: Option<f64>, limit: f64, at_most: bool| Target {
            name: name.to_owned(),
            value: ratio.map_or("not measured".into(), |r| format!("{r:.3}×")),
            limit: format!("{} {limit:.2}×", if at_most { "≤" } else { "≥" }),
            met: ratio.map(|r| if at_most { r <= limit } else { r >= limit }),
        };
        let ratio_of = |id: &str, threads: usize| {
            self.get(id, threads)
                .and_then(|s| self.ratio(s))
                .map(|(r, _)| r.median)
        };
        t.push(ratio_target(
            "hit (3) latency vs floor (1), 1 thread",
            ratio_of("hit", 1),
            1.10,
            true,
        ));
        t.push(ratio_target(
            "hit (3) throughput vs floor (1), 50 threads",
            ratio_of("hit", 50),
            0.90,
            false,
        ));
        t.push(ratio_target(
            "single-flight hit (4) latency vs floor (1), 1 thread",
            ratio_of("hit_singleflight", 1),
            1.15,
            true,
        ));
        t.push(ratio_target(
            "C ABI hit (7) latency vs Rust hit (3), 1 thread",
            ratio_of("hit_c_abi", 1),
            1.10,
            true,
        ));
        let one_load_ms = self.one_load.as_secs_f64() * 1e3;
        for s in self.stampedes.iter().filter(|s| s.single_flight) {
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
        t.push(Target {
            name: format!("memory: in-flight keys after {} reads", self.memory.keys),
            value: self.memory.in_flight.to_string(),
            limit: "= 0".into(),
            met: Some(self.memory.in_flight == 0),
        });
        t.push(Target {
            name: format!("memory: peak RSS growth over {} keys", self.memory.keys),
            value: format!("{:.2} MiB", self.memory.growth_kib() as f64 / 1024.0),
            limit: "< 10 MiB".into(),
            met: Some(self.memory.growth_kib() < 10 * 1024),
        });
        t
    }

    fn markdown(&self, targets: &[Target], elapsed: Duration) -> String {
        let mut md = String::new();
        let m = &self.machine;
        let _ = writeln!(
            md,
            "## cacheaside benchmark ({} run, {:.0} s)\n",
            if self.plan.quick { "quick" } else { "full" },
            elapsed.as_secs_f64()
        );
        let _ = writeln!(
            md,
            "Machine: {} ({} cores, {} GiB), Linux {}; PostgreSQL {}, Redis {}, {}. \
             Load average at the end: {}. \
             Pools: {BENCH_CACHE_POOL} Redis and {BENCH_DB_POOL} Postgres connections, \
             checkout timeout {} s. {} repetitions of everything. At 1 thread the operations take \
             turns call by call ({} ms per operation per repetition); at 50 threads each runs alone \
             for {} ms per repetition, in an order rotated per repetition. Each cell: the median \
             across repetitions (min–max). A ratio is paired by repetition (the operation over its \
             baseline in the same repetition, then the median (min–max) of those): at 1 thread of \
             mean latencies without the slowest 1% of calls, at 50 threads of throughputs.\n",
            m["cpu"].as_str().unwrap_or("?"),
            m["cores"],
            m["memory_gib"],
            m["kernel"].as_str().unwrap_or("?"),
            m["postgres"].as_str().unwrap_or("?"),
            m["redis"].as_str().unwrap_or("?"),
            m["servers"].as_str().unwrap_or("?"),
            m["load_average_at_end"].as_str().unwrap_or("?"),
            BENCH_POOL_TIMEOUT.as_secs(),
            self.plan.reps,
            self.plan.rep_time.as_millis(),
            self.plan.rep_time.as_millis(),
        );
        md.push_str("### Latency and throughput\n\n");
        md.push_str("| # | measurement | threads | median µs | p99 µs | ops/s | ratio |\n");
        md.push_str("|---|---|---:|---:|---:|---:|---|\n");
        let spread = |s: Spread, digits: usize| {
            format!("{:.d$} ({:.d$}–{:.d$})", s.median, s.min, s.max, d = digits)
        };
        let mut rows: Vec<&Series> = self.series.iter().collect();
        rows.sort_by_key(|s| (s.item, s.threads, s.id));
        for s in rows {
            let ratio = self.ratio(s).map_or(String::new(), |(r, what)| {
                if r.min == r.max {
                    format!("{:.3}{what}", r.median)
                } else {
                    format!("{:.3}{what} ({:.3}–{:.3})", r.median, r.min, r.max)
                }
            });
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} |",
                s.item,
                s.label,
                s.threads,
                spread(s.median(), 1),
                spread(s.p99(), 1),
                spread(s.throughput(), 0),
                ratio
            );
        }

        let one_load_ms = self.one_load.as_secs_f64() * 1e3;
        let _ = writeln!(
            md,
            "\n### Stampede (6): N threads on one cold key, load = `{SLOW_LOAD_SQL}` \
             (one load alone: {one_load_ms:.1} ms)\n"
        );
        md.push_str(
            "| path | N | Postgres queries (per repetition) | wall ms, median (min–max) | wall / one load | wake N threads: condvar / RwLock gate, ms |\n",
        );
        md.push_str("|---|---:|---|---:|---:|---:|\n");
        let wake = |v: &[(f64, f64)]| {
            if v.is_empty() {
                "–".to_owned()
            } else {
                format!(
                    "{:.1} / {:.1}",
                    Spread::of(v.iter().map(|w| w.0)).median,
                    Spread::of(v.iter().map(|w| w.1)).median
                )
            }
        };
        for s in self.stampedes {
            let wall = Spread::of(s.wall_ms.iter().copied());
            let _ = writeln!(
                md,
                "| {} | {} | {:?} | {} | {:.2}× | {} |",
                path_name(s.single_flight),
                s.n,
                s.queries,
                spread(wall, 1),
                wall.median / one_load_ms,
                wake(&s.wake_ms)
            );
        }
        let xwall = Spread::of(self.xproc.wall_ms.iter().copied());
        let _ = writeln!(
            md,
            "| single-flight, {XPROC_PROCESSES} processes × {XPROC_THREADS} threads (Redis rebuild lock) | {} | {:?} (summed over processes) | {} | {:.2}× | {} |",
            XPROC_PROCESSES * XPROC_THREADS,
            self.xproc.queries,
            spread(xwall, 1),
            xwall.median / one_load_ms,
            wake(&self.xproc.wake_ms)
        );
        md.push_str(
            "\nThe last column is the scheduler's share of a stampede: the time to wake N parked \
             threads until the last has run (no Redis, no Postgres), with parking_lot's condvar \
             (`notify_all` hands off from thread to thread) and with the RwLock gate \
             `src/singleflight.rs` uses (one unlock unparks every reader). Once its load is done, \
             a single-flight stampede cannot end sooner than that.\n",
        );

        let mem = self.memory;
        let _ = writeln!(
            md,
            "\n### Memory (8): single-flight reads of {} distinct keys ({} threads, {:.1} s, fresh process)\n",
            mem.keys, mem.threads, mem.secs
        );
        md.push_str("| | before | after | growth |\n|---|---:|---:|---:|\n");
        let mib = |kib: u64| kib as f64 / 1024.0;
        let _ = writeln!(
            md,
            "| peak RSS (VmHWM) MiB | {:.1} | {:.1} | {:.2} |",
            mib(mem.hwm_before_kib),
            mib(mem.hwm_after_kib),
            mib(mem.growth_kib())
        );
        let _ = writeln!(
            md,
            "| RSS (VmRSS) MiB | {:.1} | {:.1} | {:.2} |",
            mib(mem.rss_before_kib),
            mib(mem.rss_after_kib),
            mib(mem.rss_after_kib) - mib(mem.rss_before_kib)
        );
        let _ = writeln!(md, "| `in_flight()` at the end | | {} | |", mem.in_flight);

        md.push_str("\n### Targets\n\n| target | measured | limit | met |\n|---|---|---|---|\n");
        for t in targets {
            let met = match t.met {
                Some(true) => "met",
                Some(false) => "**not met**",
                None => "not measured",
            };
            let _ = writeln!(md, "| {} | {} | {} | {met} |", t.name, t.value, t.limit);
        }
        md
    }

    fn json(&self, targets: &[Target], failures: &[String], elapsed: Duration) -> Value {
        let one_load_ms = self.one_load.as_secs_f64() * 1e3;
        json!({
            "mode": if self.plan.quick { "quick" } else { "full" },
            "elapsed_s": elapsed.as_secs_f64(),
            "machine": self.machine,
            "settings": {
                "repetitions": self.plan.reps,
                "repetition_ms": self.plan.rep_time.as_millis() as u64,
                "misses_per_repetition": self.plan.misses,
                "cache_pool_size": BENCH_CACHE_POOL,
                "db_pool_size": BENCH_DB_POOL,
                "pool_timeout_s": BENCH_POOL_TIMEOUT.as_secs(),
            },
            "latency": self.series.iter().map(|s| {
                let mut v = s.json();
                if let Some((r, what)) = self.ratio(s) {
                    v["ratio"] = json!({
                        "paired_by_repetition": r.json(),
                        "to": what.trim_start_matches("× "),
                    });
                }
                v
            }).collect::<Vec<_>>(),
            "stampede": {
                "load_sql": SLOW_LOAD_SQL,
                "one_load_ms": one_load_ms,
                "in_process": self.stampedes.iter().map(|s| json!({
                    "path": path_name(s.single_flight),
                    "n": s.n,
                    "queries": s.queries,
                    "wall_ms": s.wall_ms,
                    "wall_ms_spread": Spread::of(s.wall_ms.iter().copied()).json(),
                    "wake_floor_ms": s.wake_ms.iter().map(|(pl, std)| json!({"condvar": pl, "rwlock_gate": std})).collect::<Vec<_>>(),
                })).collect::<Vec<_>>(),
                "cross_process": {
                    "processes": XPROC_PROCESSES,
                    "threads_per_process": XPROC_THREADS,
                    "queries": self.xproc.queries,
                    "wall_ms": self.xproc.wall_ms,
                    "wall_ms_spread": Spread::of(self.xproc.wall_ms.iter().copied()).json(),
                    "wake_floor_ms": self.xproc.wake_ms.iter().map(|(pl, std)| json!({"condvar": pl, "rwlock_gate": std})).collect::<Vec<_>>(),
                    "children": self.xproc.children.iter().map(|rep| rep.iter().map(|(go, first, last, q)| json!({
                        "go_read_ms": go, "first_done_ms": first, "last_done_ms": last, "queries": q,
                    })).collect::<Vec<_>>()).collect::<Vec<_>>(),
                },
            },
            "memory": {
                "keys": self.memory.keys,
                "threads": self.memory.threads,
                "secs": self.memory.secs,
                "rss_before_kib": self.memory.rss_before_kib,
                "rss_after_kib": self.memory.rss_after_kib,
                "hwm_before_kib": self.memory.hwm_before_kib,
                "hwm_after_kib": self.memory.hwm_after_kib,
                "peak_growth_kib": self.memory.growth_kib(),
                "in_flight": self.memory.in_flight,
            },
            "targets": targets.iter().map(|t| json!({
                "target": t.name, "measured": t.value, "limit": t.limit, "met": t.met,
            })).collect::<Vec<_>>(),
            "failures": failures,
        })
    }
}

// ---- (7) the C ABI hit path ---------------------------------------------------

mod ffi_hit {
    //! ======================= (7) the C ABI hit path =======================
    //!
    //! Called from Rust through `cacheaside::ffi` exactly as a C program
    //! calls the header: a `cacheaside_config` filled by setters, a client
    //! from `cacheaside_client_open`, a read into a caller-owned
    //! `cacheaside_user_profile`, its strings freed with
    //! `cacheaside_user_profile_free`. So the measured cost is the whole
    //! boundary: panic guard, NULL checks, the three C strings allocated
    //! and freed per read.
    use std::ffi::{CStr, CString, c_char};
    use std::ptr;

    use cacheaside::Config;
    use cacheaside::ffi::{
        cacheaside_client, cacheaside_client_free, cacheaside_client_open, cacheaside_config,
        cacheaside_config_free, cacheaside_config_new, cacheaside_config_set_namespace,
        cacheaside_config_set_ttl_ms, cacheaside_config_set_users_table,
        cacheaside_get_user_profile, cacheaside_last_error, cacheaside_status,
        cacheaside_user_profile, cacheaside_user_profile_free,
    };

    use super::BoxResult;

    /// A client opened through the C ABI; freed on drop.
    pub struct CAbi(*mut cacheaside_client);

    // SAFETY: the header documents `cacheaside_client` as safe to share
    // between threads for every function taking `const cacheaside_client *`
    // (the only kind used through `&self`); `cacheaside_client_free` runs in
    // `drop`, when no other reference is left.
    unsafe impl Send for CAbi {}
    unsafe impl Sync for CAbi {}

    fn check(status: cacheaside_status, what: &str) -> BoxResult<()> {
        if status == cacheaside_status::CACHEASIDE_OK {
            return Ok(());
        }
        // SAFETY: a static or thread-local NUL-terminated string.
        let message = unsafe { CStr::from_ptr(cacheaside_last_error()) };
        Err(format!("{what}: {status:?}: {}", message.to_string_lossy()).into())
    }

    /// Frees a config however `open` leaves.
    struct ConfigGuard(*mut cacheaside_config);

    impl Drop for ConfigGuard {
        fn drop(&mut self) {
            // SAFETY: from cacheaside_config_new, freed only here.
            unsafe { cacheaside_config_free(self.0) };
        }
    }

    impl CAbi {
        /// Opens a client on the same servers, table, namespace and TTL as
        /// the Rust client (the URLs come from the environment in both).
        pub fn open(config: &Config) -> BoxResult<CAbi> {
            let c_config = ConfigGuard(cacheaside_config_new());
            if c_config.0.is_null() {
                return Err("cacheaside_config_new returned NULL".into());
            }
            let namespace = CString::new(config.namespace.as_str())?;
            let table = CString::new(config.users_table.as_str())?;
            let ttl_ms = u64::try_from(config.ttl.as_millis())?;
            let mut client: *mut cacheaside_client = ptr::null_mut();
            // SAFETY: a live config and NUL-terminated strings that outlive
            // the calls; `client` is writable storage for one pointer.
            unsafe {
                check(
                    cacheaside_config_set_namespace(c_config.0, namespace.as_ptr()),
                    "set namespace",
                )?;
                check(
                    cacheaside_config_set_users_table(c_config.0, table.as_ptr()),
                    "set users table",
                )?;
                check(cacheaside_config_set_ttl_ms(c_config.0, ttl_ms), "set ttl")?;
                check(
                    cacheaside_client_open(c_config.0, &mut client),
                    "open client",
                )?;
            }
            Ok(CAbi(client))
        }

        /// One read as a C caller does it; returns the profile's id.
        pub fn get_user_profile_id(&self, user_id: i64) -> BoxResult<Option<i64>> {
            let mut profile = cacheaside_user_profile {
                id: 0,
                name: ptr::null_mut::<c_char>(),
                email: ptr::null_mut(),
                plan: ptr::null_mut(),
                version: 0,
            };
            // SAFETY: a live client and a zeroed profile on our stack, whose
            // strings are freed (once) right after.
            let status = unsafe { cacheaside_get_user_profile(self.0, user_id, &mut profile) };
            let id = profile.id;
            unsafe { cacheaside_user_profile_free(&mut profile) };
            match status {
                cacheaside_status::CACHEASIDE_NOT_FOUND => Ok(None),
                other => check(other, "cacheaside_get_user_profile").map(|()| Some(id)),
            }
        }
    }

    impl Drop for CAbi {
        fn drop(&mut self) {
            // SAFETY: from cacheaside_client_open; every read has returned.
            unsafe { cacheaside_client_free(self.0) };
        }
    }
}

// ---- plots --------------------------------------------------------------------

mod plots {
    //! The two PNGs of the full run. Text needs a font: plotters' `ab_glyph`
    //! backend renders a TTF file read at run time (no system font library),
    //! so without one of the usual DejaVu files the plots are skipped.
    use std::path::Path;

    use plotters::prelude::*;

    use super::{BoxResult, Series, Spread, Stampede, quantile_us};

    const FONT_FILES: [&str; 3] = [
        "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
        "/usr/share/fonts/dejavu/DejaVuSans.ttf",
        "/usr/share/fonts/TTF/DejaVuSans.ttf",
    ];
    const PERCENTILES: [(f64, &str); 6] = [
        (0.5, "p50"),
        (0.75, "p75"),
        (0.9, "p90"),
        (0.95, "p95"),
        (0.99, "p99"),
        (0.999, "p99.9"),
    ];

    fn register_font() -> BoxResult<()> {
        let bytes = FONT_FILES
            .iter()
            .find_map(|f| std::fs::read(f).ok())
            .ok_or("no DejaVuSans.ttf found (install fonts-dejavu-core)")?;
        plotters::style::register_font(
            "sans-serif",
            FontStyle::Normal,
            Box::leak(bytes.into_boxed_slice()),
        )
        .map_err(|_| "the font file does not parse")?;
        Ok(())
    }

    pub fn draw(
        docs: &Path,
        series: &[Series],
        stampedes: &[Stampede],
        one_load_ms: f64,
    ) -> BoxResult<()> {
        register_font()?;
        latency(&docs.join("bench-latency.png"), series)?;
        stampede(&docs.join("bench-stampede.png"), stampedes, one_load_ms)?;
        Ok(())
    }

    fn colour(id: &str) -> RGBColor {
        match id {
            "floor_redis" => RGBColor(90, 90, 90),
            "hit" => RGBColor(31, 119, 180),
            "hit_singleflight" => RGBColor(255, 127, 14),
            "hit_c_abi" => RGBColor(44, 160, 44),
            _ => RGBColor(214, 39, 40),
        }
    }

    fn latency(path: &Path, series: &[Series]) -> BoxResult<()> {
        let root = BitMapBackend::new(path, (1200, 520)).into_drawing_area();
        root.fill(&WHITE)?;
        let root = root.titled(
            "Cache hit latency percentiles: floor (pooled GET + serde_json) vs library",
            ("sans-serif", 22),
        )?;
        let panels = root.split_evenly((1, 2));
        let ids = ["floor_redis", "hit", "hit_singleflight", "hit_c_abi"];
        for (panel, threads) in panels.iter().zip([1, 50]) {
            let shown: Vec<&Series> = ids
                .iter()
                .filter_map(|id| series.iter().find(|s| s.id == *id && s.threads == threads))
                .collect();
            let top = shown
                .iter()
                .map(|s| quantile_us(&s.pooled_ns, 0.999))
                .fold(1.0, f64::max)
                * 1.1;
            let mut chart = ChartBuilder::on(panel)
                .caption(
                    if threads == 1 {
                        "1 thread (operations taking turns call by call)".to_owned()
                    } else {
                        format!("{threads} threads (each operation alone)")
                    },
                    ("sans-serif", 18),
                )
                .margin(12)
                .margin_right(28)
                .x_label_area_size(40)
                .y_label_area_size(60)
                .build_cartesian_2d(-0.1f64..(PERCENTILES.len() - 1) as f64 + 0.3, 0f64..top)?;
            chart
                .configure_mesh()
                .x_labels(PERCENTILES.len())
                .x_label_formatter(&|x| {
                    let i = x.round();
                    if (x - i).abs() > 1e-6 || i < 0.0 {
                        return String::new();
                    }
                    PERCENTILES
                        .get(i as usize)
                        .map_or(String::new(), |p| p.1.to_owned())
                })
                .y_label_formatter(&|y| format!("{y:.0}"))
                .y_desc("latency (µs)")
                .x_desc("percentile (all repetitions pooled)")
                .draw()?;
            for s in shown {
                let c = colour(s.id);
                let points: Vec<(f64, f64)> = PERCENTILES
                    .iter()
                    .enumerate()
                    .map(|(i, (q, _))| (i as f64, quantile_us(&s.pooled_ns, *q)))
                    .collect();
                chart
                    .draw_series(LineSeries::new(points.clone(), c.stroke_width(2)))?
                    .label(format!("({}) {}", s.item, s.label))
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2))
                    });
                chart.draw_series(points.iter().map(|&p| Circle::new(p, 3, c.filled())))?;
            }
            legend(&mut chart)?;
        }
        root.present()?;
        Ok(())
    }

    /// Every plot's legend: upper left, on a light box.
    fn legend<'a, DB, CT>(chart: &mut ChartContext<'a, DB, CT>) -> BoxResult<()>
    where
        DB: DrawingBackend + 'a,
        DB::ErrorType: 'static,
        CT: CoordTranslate,
    {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 13))
            .draw()?;
        Ok(())
    }

    fn stampede(path: &Path, stampedes: &[Stampede], one_load_ms: f64) -> BoxResult<()> {
        let root = BitMapBackend::new(path, (1200, 520)).into_drawing_area();
        root.fill(&WHITE)?;
        let root = root.titled(
            "Stampede on one cold key (50 ms load): naive vs single-flight",
            ("sans-serif", 22),
        )?;
        let panels = root.split_evenly((1, 2));
        let max_n = stampedes.iter().map(|s| s.n).max().unwrap_or(1) as f64;
        let max_q = stampedes
            .iter()
            .flat_map(|s| s.queries.iter().copied())
            .max()
            .unwrap_or(1) as f64;
        let max_wall = stampedes
            .iter()
            .flat_map(|s| s.wall_ms.iter().copied())
            .fold(1.0, f64::max);
        let paths = [
            (false, "naive (get_or_load)", RGBColor(214, 39, 40)),
            (
                true,
                "single-flight (get_or_load_singleflight)",
                RGBColor(31, 119, 180),
            ),
        ];

        let mut q = ChartBuilder::on(&panels[0])
            .caption("Postgres queries vs N (log scale)", ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..max_n * 1.05, (0.8f64..max_q * 1.5).log_scale())?;
        // Log axes: plotters' light grid lines bunch up into a grey band.
        q.configure_mesh()
            .light_line_style(TRANSPARENT)
            .x_label_formatter(&|x| format!("{x:.0}"))
            .x_desc("threads N")
            .y_desc("queries")
            .y_label_formatter(&|y| format!("{y:.0}"))
            .draw()?;
        let mut w = ChartBuilder::on(&panels[1])
            .caption(
                "wall time vs N (median of repetitions, log scale)",
                ("sans-serif", 18),
            )
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(
                0f64..max_n * 1.05,
                (one_load_ms * 0.8..max_wall * 1.5).log_scale(),
            )?;
        w.configure_mesh()
            .light_line_style(TRANSPARENT)
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| format!("{y:.0}"))
            .x_desc("threads N")
            .y_desc("wall (ms)")
            .draw()?;
        let grey = RGBColor(120, 120, 120);
        w.draw_series(LineSeries::new(
            [(0.0, one_load_ms), (max_n * 1.05, one_load_ms)],
            grey.stroke_width(1),
        ))?
        .label(format!("one load alone ({one_load_ms:.1} ms)"))
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], grey.stroke_width(1)));
        for (sf, label, c) in paths {
            let mine: Vec<&Stampede> = stampedes.iter().filter(|s| s.single_flight == sf).collect();
            let qp: Vec<(f64, f64)> = mine
                .iter()
                .map(|s| {
                    (
                        s.n as f64,
                        Spread::of(s.queries.iter().map(|&q| q as f64)).median,
                    )
                })
                .collect();
            let wp: Vec<(f64, f64)> = mine
                .iter()
                .map(|s| (s.n as f64, Spread::of(s.wall_ms.iter().copied()).median))
                .collect();
            q.draw_series(LineSeries::new(qp.clone(), c.stroke_width(2)))?
                .label(label)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2))
                });
            q.draw_series(qp.iter().map(|&p| Circle::new(p, 4, c.filled())))?;
            w.draw_series(LineSeries::new(wp.clone(), c.stroke_width(2)))?
                .label(label)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2))
                });
            w.draw_series(wp.iter().map(|&p| Circle::new(p, 4, c.filled())))?;
        }
        legend(&mut q)?;
        legend(&mut w)?;
        root.present()?;
        Ok(())
    }
}
