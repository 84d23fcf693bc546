//! (13c) the near cache's store chosen by measurement: moka (the store
//! before) and quick_cache (the store now) side by side, holding what L1
//! holds (a key of the caller's and an `Arc` of a slot with the profile's
//! 81 bytes of JSON), for the cost of a hit at 1 and 50 threads, the hit
//! ratio on a skewed (Zipf) workload, and the resident memory per entry (in
//! a fresh process: this binary as `--child-near-memory store NAME N`).
//!
//! The stores alone, without the library around them: what the store
//! costs, not what L1 costs (rows 13a and 13b are that).

use std::any::Any;
use std::cell::Cell;
use std::fmt::Write as _;
use std::hint::black_box;
use std::process::{Command, Stdio};
use std::sync::{Arc, Barrier, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use crate::BoxResult;
use crate::memory::rss_kib;

/// What L1 keeps per key (the shape of `src/near.rs`'s slot).
#[allow(dead_code)]
struct Slot {
    json: Option<Box<[u8]>>,
    fresh_until: Instant,
    decoded: OnceLock<Arc<dyn Any + Send + Sync>>,
}

fn slot() -> Arc<Slot> {
    Arc::new(Slot {
        json: Some(vec![b'x'; 81].into_boxed_slice()),
        fresh_until: Instant::now() + Duration::from_secs(60),
        decoded: OnceLock::new(),
    })
}

/// The two stores behind one face.
enum Store {
    Moka(moka::sync::Cache<Box<str>, Arc<Slot>>),
    Quick(quick_cache::sync::Cache<Box<str>, Arc<Slot>>),
}

impl Store {
    const NAMES: [&'static str; 2] = ["moka", "quick_cache"];

    /// Configured as L1 configures it (moka as it was: a capacity and a
    /// time to live).
    fn new(name: &str, capacity: u64) -> BoxResult<Store> {
        Ok(match name {
            "moka" => Store::Moka(
                moka::sync::Cache::builder()
                    .max_capacity(capacity)
                    .time_to_live(Duration::from_secs(60))
                    .build(),
            ),
            "quick_cache" => Store::Quick(quick_cache::sync::Cache::new(capacity as usize)),
            other => return Err(format!("no store {other:?}").into()),
        })
    }

    fn get(&self, key: &str) -> Option<Arc<Slot>> {
        match self {
            Store::Moka(c) => c.get(key),
            Store::Quick(c) => c.get(key),
        }
    }

    fn insert(&self, key: &str, slot: Arc<Slot>) {
        match self {
            Store::Moka(c) => c.insert(key.into(), slot),
            Store::Quick(c) => c.insert(key.into(), slot),
        }
    }

    /// Lets moka apply its pending admissions (quick_cache has none).
    fn settle(&self) {
        if let Store::Moka(c) = self {
            c.run_pending_tasks();
        }
    }
}

/// One store's row of the comparison.
pub struct StoreRow {
    pub name: &'static str,
    /// Wall ns per hit, 1 thread.
    pub hit_ns_1: f64,
    /// Wall ns per hit with 50 threads (the machine's throughput, inverted).
    pub hit_ns_50: f64,
    /// Hits / reads on the Zipf workload.
    pub zipf_hit_ratio: f64,
    pub bytes_per_entry: f64,
}

/// Keys a hit is measured over (all present).
const HOT_KEYS: usize = 10_000;
/// The skewed workload: Zipf(1.0) over this many keys, a store of a tenth.
const ZIPF_KEYS: usize = 100_000;
const ZIPF_CAPACITY: u64 = 10_000;

fn key(i: usize) -> String {
    format!("user:{i}")
}

pub fn measure(quick: bool) -> BoxResult<Vec<StoreRow>> {
    let time = if quick {
        Duration::from_millis(150)
    } else {
        Duration::from_millis(500)
    };
    let memory_entries: u64 = if quick { 50_000 } else { 200_000 };
    let mut rows = Vec::new();
    for name in Store::NAMES {
        let store = Store::new(name, HOT_KEYS as u64 * 2)?;
        let keys: Vec<String> = (0..HOT_KEYS).map(key).collect();
        for k in &keys {
            store.insert(k, slot());
        }
        store.settle();
        let hit_ns_1 = hit_cost(&store, &keys, 1, time)?;
        let hit_ns_50 = hit_cost(&store, &keys, 50, time)?;
        drop(store);
        rows.push(StoreRow {
            name,
            hit_ns_1,
            hit_ns_50,
            zipf_hit_ratio: zipf_hit_ratio(name, if quick { 300_000 } else { 1_000_000 })?,
            bytes_per_entry: memory(name, memory_entries)?,
        });
        eprintln!("bench: L1 store {name} measured");
    }
    Ok(rows)
}

/// Wall ns per hit with `threads` threads reading random present keys
/// (see [`back_to_back`]).
fn hit_cost(store: &Store, keys: &[String], threads: usize, time: Duration) -> BoxResult<f64> {
    thread_local! {
        /// Each thread's walk over the keys, from a random start.
        static NEXT: Cell<usize> = Cell::new(fastrand::usize(..));
    }
    let read = || -> BoxResult<()> {
        let i = NEXT.with(|n| {
            let i = n.get().wrapping_add(7919);
            n.set(i);
            i
        }) % keys.len();
        match store.get(&keys[i]) {
            Some(slot) => {
                black_box(&slot);
                Ok(())
            }
            None => Err("a present key missed".into()),
        }
    };
    Ok(back_to_back(threads, time, &read)?.wall_ns)
}

/// What [`back_to_back`] measured, in ns per call.
pub struct BackToBack {
    /// The median over batches of a batch's time per call: the cost of
    /// one call when the thread runs (a batch the scheduler preempted is
    /// an outlier, not the median).
    pub batch_ns: f64,
    /// The wall time over all calls of all threads: the machine's cost per
    /// call, contention and all.
    pub wall_ns: f64,
}

/// Calls made back to back, in batches of [`BATCH`] timed together (a
/// memory-speed call is shorter than the clock's own cost, so calls are
/// not timed one by one), by `threads` threads released together, for
/// `time`.
pub fn back_to_back(
    threads: usize,
    time: Duration,
    call: &(dyn Fn() -> BoxResult<()> + Sync),
) -> BoxResult<BackToBack> {
    let barrier = Barrier::new(threads + 1);
    let (released, results) = thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                let barrier = &barrier;
                s.spawn(move || -> BoxResult<(Vec<u64>, u64)> {
                    let mut batches = Vec::new();
                    barrier.wait();
                    let end = Instant::now() + time;
                    let mut calls = 0;
                    loop {
                        let t = Instant::now();
                        if t >= end {
                            break;
                        }
                        for _ in 0..BATCH {
                            call()?;
                        }
                        batches.push(t.elapsed().as_nanos() as u64);
                        calls += BATCH;
                    }
                    Ok((batches, calls))
                })
            })
            .collect();
        barrier.wait();
        let released = Instant::now();
        let results: Vec<_> = workers
            .into_iter()
            .map(|w| w.join().map_err(|_| "a bench thread panicked"))
            .collect();
        (released, results)
    });
    let wall = released.elapsed();
    let (mut batches, mut calls) = (Vec::new(), 0);
    for result in results {
        let (b, c) = result??;
        batches.extend(b);
        calls += c;
    }
    batches.sort_unstable();
    let median = batches.get(batches.len() / 2).copied().unwrap_or(0);
    Ok(BackToBack {
        batch_ns: median as f64 / BATCH as f64,
        wall_ns: wall.as_nanos() as f64 / calls.max(1) as f64,
    })
}

/// Calls per timed batch of [`back_to_back`].
const BATCH: u64 = 256;

/// Hits / reads of `reads` Zipf(1.0)-distributed keys over [`ZIPF_KEYS`]
/// through a store of [`ZIPF_CAPACITY`]; a miss inserts.
fn zipf_hit_ratio(name: &str, reads: usize) -> BoxResult<f64> {
    let store = Store::new(name, ZIPF_CAPACITY)?;
    // The CDF of Zipf(1.0): P(rank k) ∝ 1/k.
    let mut cdf = Vec::with_capacity(ZIPF_KEYS);
    let mut sum = 0.0;
    for k in 1..=ZIPF_KEYS {
        sum += 1.0 / k as f64;
        cdf.push(sum);
    }
    let keys: Vec<String> = (0..ZIPF_KEYS).map(key).collect();
    let mut rng = fastrand::Rng::with_seed(7);
    let mut draw = || {
        let u = rng.f64() * sum;
        cdf.partition_point(|&c| c < u).min(ZIPF_KEYS - 1)
    };
    // Warm: as many reads as measured, so both start full.
    for _ in 0..reads {
        let k = &keys[draw()];
        if store.get(k).is_none() {
            store.insert(k, slot());
        }
    }
    store.settle();
    let mut hits = 0usize;
    for i in 0..reads {
        let k = &keys[draw()];
        if store.get(k).is_some() {
            hits += 1;
        } else {
            store.insert(k, slot());
        }
        if i % 4096 == 0 {
            store.settle();
        }
    }
    Ok(hits as f64 / reads as f64)
}

/// Resident bytes per entry of a store holding `entries`, from a fresh
/// process.
fn memory(name: &str, entries: u64) -> BoxResult<f64> {
    let output = Command::new(std::env::current_exe()?)
        .args(["--child-near-memory", "store", name, &entries.to_string()])
        .stderr(Stdio::inherit())
        .output()?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let grown: f64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("store-result "))
        .ok_or("the store memory child printed no result")?
        .trim()
        .parse()?;
    if !output.status.success() {
        return Err(format!("the store memory child exited {}", output.status).into());
    }
    Ok(grown * 1024.0 / entries as f64)
}

/// `--child-near-memory store NAME N`: fills store NAME with N entries and
/// prints `store-result <KiB grown>`.
pub fn child(name: &str, entries: &str) -> BoxResult<()> {
    let entries: usize = entries.parse()?;
    let store = Store::new(name, entries as u64 * 2)?;
    // Keys built before the first reading: they are the caller's, not the
    // store's (the store's copy is counted).
    let keys: Vec<String> = (0..entries).map(key).collect();
    let (before, _) = rss_kib()?;
    for k in &keys {
        store.insert(k, slot());
    }
    store.settle();
    let (after, _) = rss_kib()?;
    let held = keys.iter().filter(|k| store.get(k).is_some()).count();
    if held != entries {
        return Err(format!("{name} held {held} of {entries} entries").into());
    }
    println!("store-result {}", after.saturating_sub(before));
    Ok(())
}

/// The comparison as a markdown table.
pub fn markdown(rows: &[StoreRow], md: &mut String) {
    let _ = writeln!(
        md,
        "\nL1 store comparison (13c; the stores alone, holding L1's slots; hits over {HOT_KEYS} present keys; Zipf(1.0) over {ZIPF_KEYS} keys through a store of {ZIPF_CAPACITY}; memory in a fresh process):\n"
    );
    md.push_str("| store | hit, 1 thread (wall ns per hit) | hit, 50 threads (wall ns per hit) | Zipf hit ratio | bytes per entry |\n|---|---:|---:|---:|---:|\n");
    for r in rows {
        let _ = writeln!(
            md,
            "| {}{} | {:.0} | {:.0} | {:.1}% | {:.0} |",
            r.name,
            if r.name == "quick_cache" {
                " (used)"
            } else {
                ""
            },
            r.hit_ns_1,
            r.hit_ns_50,
            r.zipf_hit_ratio * 100.0,
            r.bytes_per_entry
        );
    }
}
