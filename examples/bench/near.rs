//! (13) the near cache (L1): a hit in process memory, through Rust
//! (`get_user_profile` on a client with `Config::local_cache` on) and the C
//! ABI, against the raw pooled Redis `GET` floor (1) and the Redis hit (3)
//! measured in the same run, at 1 and 50 threads; the memory one cached
//! entry costs; the invalidation latency: a write in one client until
//! its key is evicted from another's L1, p50/p99; and the store comparison
//! that chose L1's store (`near_store.rs`).
//!
//! Its clients share the run's table and namespace; they run no relay (the
//! bench's client does).

use std::fmt::Write as _;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use cacheaside::{Client, Config, LocalCache};
use serde_json::{Value, json};

use crate::BoxResult;
use crate::c_abi::CAbi;
use crate::fixture::{Bench, USER_ID, bench_config, check_profile};
use crate::measure::{self, Baseline, Operation, Series, quantile_us};
use crate::memory::rss_kib;
use crate::near_store::{self, BackToBack, StoreRow, back_to_back};
use crate::report::{Section, Target};

/// How long an L1 entry may be served at most, here.
const MAX_STALENESS: Duration = Duration::from_secs(60);

pub struct Near {
    series: Vec<Series>,
    /// Of the measured L1 reads, the share L1 answered (the rest went to
    /// Redis while L1 was dark for a moment).
    rust_hit_share: f64,
    c_hit_share: f64,
    entries: u64,
    bytes_per_entry: f64,
    /// Write-to-eviction times (ns), sorted.
    evict_ns: Vec<u64>,
    /// moka against quick_cache.
    stores: Vec<StoreRow>,
    /// L1 hits back to back: Rust at 1 and 50 threads, C at 1.
    rust_1: BackToBack,
    rust_50: BackToBack,
    c_1: BackToBack,
}

fn near_config(bench: &Bench, max_entries: u64) -> Config {
    let mut config = bench.config.clone();
    config.local_cache = LocalCache::new(max_entries, MAX_STALENESS);
    config.invalidation_relay = false;
    config
}

/// Reads through `read` until L1 answers (its tracker connected, the entry
/// filled by a Redis hit), at most 30 s.
fn warm(what: &str, read: impl Fn() -> BoxResult<()>, hits: impl Fn() -> u64) -> BoxResult<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let before = hits();
    while hits() == before {
        if Instant::now() > deadline {
            return Err(format!("{what}: L1 never answered").into());
        }
        read()?;
    }
    Ok(())
}

pub fn measure(bench: &Bench) -> BoxResult<Near> {
    let client = bench.client();
    let near = Client::open(&near_config(bench, 100_000))?;
    let c_abi = CAbi::open(&near_config(bench, 100_000))?;
    warm(
        "Rust client",
        || check_profile(near.get_user_profile(USER_ID)?),
        || near.engine().stats().local_hits,
    )?;
    warm(
        "C ABI client",
        || match c_abi.get_user_profile_id(USER_ID)? {
            Some(USER_ID) => Ok(()),
            other => Err(format!("C ABI read returned user {other:?}").into()),
        },
        || c_abi.stats().map_or(0, |s| s.local_hits),
    )?;
    let [floor_redis, _] = bench.floors.ops(client);
    let floor = Baseline::Series {
        id: "floor_redis",
        item: "(1)",
    };
    let ops = [
        floor_redis,
        Operation {
            id: "hit",
            item: "3",
            label: "get_user_profile (Redis hit)",
            baseline: floor,
            call: Box::new(|| check_profile(client.get_user_profile(USER_ID)?)),
        },
        Operation {
            id: "local_hit",
            item: "13a",
            label: "get_user_profile (L1 hit)",
            baseline: floor,
            call: Box::new(|| check_profile(near.get_user_profile(USER_ID)?)),
        },
        Operation {
            id: "local_hit_c_abi",
            item: "13b",
            label: "C ABI cacheaside_get_user_profile (L1 hit)",
            baseline: floor,
            call: Box::new(|| match c_abi.get_user_profile_id(USER_ID)? {
                Some(USER_ID) => Ok(()),
                other => Err(format!("C ABI read returned user {other:?}").into()),
            }),
        },
    ];
    let (rust_before, c_before) = (near.engine().stats(), c_abi.stats()?);
    let mut series = Vec::new();
    for threads in [1, 50] {
        let active: Vec<&Operation> = ops.iter().collect();
        series.extend(measure::side_by_side(&active, threads, &bench.plan)?);
        eprintln!("bench: L1 hits at {threads} thread(s) done");
    }
    // Back to back, in timed batches: what a hit costs when calls are not
    // each timed, nor each interleaved with a network round trip that
    // leaves the caches cold.
    let rust_hit = || check_profile(near.get_user_profile(USER_ID)?);
    let c_hit = || match c_abi.get_user_profile_id(USER_ID)? {
        Some(USER_ID) => Ok(()),
        other => Err(format!("C ABI read returned user {other:?}").into()),
    };
    let time = bench.plan.rep_time * bench.plan.reps as u32;
    let rust_1 = back_to_back(1, time, &rust_hit)?;
    let rust_50 = back_to_back(50, time, &rust_hit)?;
    let c_1 = back_to_back(1, time, &c_hit)?;
    let (rust_after, c_after) = (near.engine().stats(), c_abi.stats()?);
    let share = |hits: u64, misses: u64| hits as f64 / (hits + misses).max(1) as f64;
    let rust_hit_share = share(
        rust_after.local_hits - rust_before.local_hits,
        rust_after.local_misses - rust_before.local_misses,
    );
    let c_hit_share = share(
        c_after.local_hits - c_before.local_hits,
        c_after.local_misses - c_before.local_misses,
    );
    drop(ops);
    drop((near, c_abi));
    let (entries, bytes_per_entry) = memory(bench)?;
    let evict_ns = invalidation_latency(bench)?;
    let stores = near_store::measure(bench.plan.quick)?;
    Ok(Near {
        series,
        rust_hit_share,
        c_hit_share,
        entries,
        bytes_per_entry,
        evict_ns,
        stores,
        rust_1,
        rust_50,
        c_1,
    })
}

/// Fills Redis with `keys` entries of the profile's size (and a warm-up
/// set), then has a fresh process (this binary in its hidden
/// `--child-near-memory` mode) read them all, each a Redis hit that fills
/// its L1; returns how many entries it held and the resident memory each
/// added. A fresh process, because in this one the heap already grew and
/// shrank with the earlier sections, and new entries would reuse it.
fn memory(bench: &Bench) -> BoxResult<(u64, f64)> {
    let keys: u64 = if bench.plan.quick { 20_000 } else { 100_000 };
    let engine = bench.client().engine();
    let profile = bench
        .client()
        .get_user_profile(USER_ID)?
        .ok_or("the bench's user is missing")?;
    let fill = |prefix: &'static str, count: u64| -> BoxResult<()> {
        thread::scope(|s| {
            let workers: Vec<_> = (0..8u64)
                .map(|t| {
                    let profile = &profile;
                    s.spawn(move || -> BoxResult<()> {
                        for i in (t..count).step_by(8) {
                            let _: Option<cacheaside::UserProfile> = engine
                                .get_or_load_uncoalesced(
                                    &format!("{prefix}:{i}"),
                                    MEMORY_TTL,
                                    || Ok(Some(profile.clone())),
                                )?;
                        }
                        Ok(())
                    })
                })
                .collect();
            workers
                .into_iter()
                .try_for_each(|w| w.join().map_err(|_| "memory fill panicked")?)
        })
    };
    fill("near:warm", WARM_KEYS)?;
    fill("near:mem", keys)?;
    let output = Command::new(std::env::current_exe()?)
        .args(["--child-near-memory", &bench.namespace, &keys.to_string()])
        .stderr(Stdio::inherit())
        .output()?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("result "))
        .ok_or("the near memory child printed no result")?;
    let r: Value = serde_json::from_str(line)?;
    let num = |k: &str| {
        r[k].as_u64()
            .ok_or_else(|| format!("near memory child: no {k}"))
    };
    let entries = num("entries")?;
    let grown = num("rss_after_kib")?.saturating_sub(num("rss_before_kib")?);
    if !output.status.success() || entries != keys {
        bench.fail(format!(
            "near memory child: {} entries of {keys}, exit {}",
            entries, output.status
        ));
    }
    Ok((entries, grown as f64 * 1024.0 / entries.max(1) as f64))
}

/// Keys read before the memory measurement starts (threads, pool, L1's
/// own structures warm).
const WARM_KEYS: u64 = 2_000;
/// The memory run's entries outlive the run; the namespace goes at its end.
const MEMORY_TTL: Duration = Duration::from_secs(600);

/// `--child-near-memory NAMESPACE KEYS`: reads `near:warm:*`, then
/// `near:mem:0..KEYS` (all in Redis already) through a client with L1 on,
/// on one thread; prints `result {json}` with the resident memory around
/// the second pass and the entries L1 holds. (`--child-near-memory store
/// NAME N`: the store comparison's child, in `near_store.rs`.)
pub fn child(args: &[String]) -> BoxResult<()> {
    if let [mode, name, entries] = args
        && mode == "store"
    {
        return near_store::child(name, entries);
    }
    let [namespace, keys] = args else {
        return Err("usage: --child-near-memory NAMESPACE KEYS".into());
    };
    let keys: u64 = keys.parse()?;
    let mut config = bench_config(namespace)?;
    // Room to spare: the store's capacity is approximate (per shard).
    config.local_cache = LocalCache::new(2 * (keys + WARM_KEYS), MAX_STALENESS);
    config.invalidation_relay = false;
    let engine = cacheaside::CacheAside::open(&config)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !engine.local_cache_ready() {
        if Instant::now() > deadline {
            return Err("L1 tracker never connected".into());
        }
        thread::sleep(Duration::from_millis(1));
    }
    let read = |prefix: &str, count: u64| -> BoxResult<()> {
        let mut key = String::with_capacity(32);
        for i in 0..count {
            key.clear();
            write!(key, "{prefix}:{i}")?;
            let got: Option<cacheaside::UserProfile> =
                engine.get_or_load_uncoalesced(&key, MEMORY_TTL, || {
                    Err(cacheaside::Error::invalid_argument("not in Redis"))
                })?;
            got.ok_or("absent")?;
        }
        Ok(())
    };
    read("near:warm", WARM_KEYS)?;
    let (rss_before, _) = rss_kib()?;
    read("near:mem", keys)?;
    let (rss_after, _) = rss_kib()?;
    let entries = engine.local_cache_entries().saturating_sub(WARM_KEYS);
    println!(
        "result {}",
        json!({"entries": entries, "rss_before_kib": rss_before, "rss_after_kib": rss_after})
    );
    Ok(())
}

/// A write by the bench's client (an invalidation) until the key is gone
/// from another client's L1: `reps` times, in ns.
fn invalidation_latency(bench: &Bench) -> BoxResult<Vec<u64>> {
    let reps = if bench.plan.quick { 200 } else { 1_000 };
    let writer = bench.client().engine();
    let reader_client = Client::open(&near_config(bench, 1_000))?;
    let reader = reader_client.engine();
    let ttl = Duration::from_secs(600);
    let key = "near:latency";
    let read = || -> BoxResult<()> {
        let v: Option<u64> = reader.get_or_load_uncoalesced(key, ttl, || Ok(Some(7)))?;
        (v == Some(7)).then_some(()).ok_or("wrong value".into())
    };
    let mut ns = Vec::with_capacity(reps);
    for _ in 0..reps {
        warm("L1 latency reader", read, || reader.stats().local_hits)?;
        let (evicted, clears) = (
            reader.stats().local_invalidations,
            reader.stats().local_clears,
        );
        let t = Instant::now();
        writer.invalidate(key)?;
        let deadline = t + Duration::from_secs(5);
        // Evicted by the invalidation, or with everything by a tracker
        // that reconnected meanwhile (a loaded machine's missed heartbeat).
        while reader.stats().local_invalidations == evicted && reader.stats().local_clears == clears
        {
            if Instant::now() > deadline {
                return Err("an invalidation never reached the other client's L1".into());
            }
            std::hint::spin_loop();
        }
        ns.push(t.elapsed().as_nanos() as u64);
    }
    ns.sort_unstable();
    Ok(ns)
}

impl Section for Near {
    fn latency(&self) -> &[Series] {
        &self.series
    }

    fn markdown(&self, md: &mut String) {
        let _ = writeln!(
            md,
            "\n### Near cache (13): L1 in process memory, kept coherent by Redis\n"
        );
        let _ = writeln!(
            md,
            "L1 answered {:.1}% of the measured Rust reads and {:.1}% of the C ABI's (the rest went to Redis while L1 was dark for a moment). Memory: {:.0} bytes of resident memory per entry ({} entries of a {}-byte profile). Write in one client → eviction in another's L1 ({} samples, from the start of the write): p50 {:.0} µs, p99 {:.0} µs, max {:.0} µs.",
            self.rust_hit_share * 100.0,
            self.c_hit_share * 100.0,
            self.bytes_per_entry,
            self.entries,
            serde_json::to_vec(&crate::fixture::expected_profile()).map_or(0, |v| v.len()),
            self.evict_ns.len(),
            quantile_us(&self.evict_ns, 0.5),
            quantile_us(&self.evict_ns, 0.99),
            self.evict_ns.last().copied().unwrap_or(0) as f64 / 1e3,
        );
        let _ = writeln!(
            md,
            "\nL1 hits back to back (timed in batches of calls; per call: the median batch's time, and the wall time over all calls): Rust 1 thread {:.0} ns (wall {:.0} ns), Rust 50 threads {:.0} ns (wall {:.0} ns per hit on the machine), C ABI 1 thread {:.0} ns (wall {:.0} ns).",
            self.rust_1.batch_ns,
            self.rust_1.wall_ns,
            self.rust_50.batch_ns,
            self.rust_50.wall_ns,
            self.c_1.batch_ns,
            self.c_1.wall_ns,
        );
        near_store::markdown(&self.stores, md);
    }

    fn targets(&self) -> Vec<Target> {
        let ratio = |id, threads| measure::median_ratio(&self.series, id, threads);
        let one_ns = self.rust_1.batch_ns;
        // The floor's mean latency (slowest 1% left out) at 1 thread,
        // median across repetitions.
        let floor_us = measure::find(&self.series, "floor_redis", 1)
            .map(|s| measure::Spread::of(s.reps.iter().map(|r| r.trimmed_mean_us)).median);
        vec![
            Target {
                name: "Rust L1 hit (13a) back to back, 1 thread".into(),
                value: format!("{one_ns:.0} ns"),
                limit: "≤ 200 ns".into(),
                met: Some(one_ns > 0.0 && one_ns <= 200.0),
            },
            Target::at_most(
                "Rust L1 hit (13a) cost per hit, 50 threads vs 1 thread (back to back)",
                (one_ns > 0.0).then(|| self.rust_50.batch_ns / one_ns),
                1.0,
            ),
            Target {
                name: "memory per L1 entry (81-byte profile)".into(),
                value: format!("{:.0} B", self.bytes_per_entry),
                limit: "≤ 400 B".into(),
                met: Some(self.bytes_per_entry <= 400.0),
            },
            Target::at_most(
                "C ABI L1 hit (13b) latency vs floor (1), 1 thread",
                ratio("local_hit_c_abi", 1),
                0.02,
            ),
            Target::at_most(
                "C ABI L1 hit (13b) back to back vs floor (1) mean latency, 1 thread",
                floor_us.map(|us| self.c_1.batch_ns / (us * 1e3)),
                0.02,
            ),
            Target::at_least(
                "L1 hit (13a) throughput vs floor (1), 50 threads",
                ratio("local_hit", 50),
                20.0,
            ),
        ]
    }

    fn json(&self) -> Option<(&'static str, Value)> {
        Some((
            "near",
            json!({
                "rust_hit_share": self.rust_hit_share,
                "c_abi_hit_share": self.c_hit_share,
                "entries": self.entries,
                "bytes_per_entry": self.bytes_per_entry,
                "invalidation_us": {
                    "samples": self.evict_ns.len(),
                    "p50": quantile_us(&self.evict_ns, 0.5),
                    "p99": quantile_us(&self.evict_ns, 0.99),
                },
                "back_to_back_ns": {
                    "rust_1_thread": {"batch": self.rust_1.batch_ns, "wall": self.rust_1.wall_ns},
                    "rust_50_threads": {"batch": self.rust_50.batch_ns, "wall": self.rust_50.wall_ns},
                    "c_abi_1_thread": {"batch": self.c_1.batch_ns, "wall": self.c_1.wall_ns},
                },
                "stores": self.stores.iter().map(|r| json!({
                    "store": r.name,
                    "hit_ns_1_thread": r.hit_ns_1,
                    "hit_wall_ns_50_threads": r.hit_ns_50,
                    "zipf_hit_ratio": r.zipf_hit_ratio,
                    "bytes_per_entry": r.bytes_per_entry,
                })).collect::<Vec<_>>(),
            }),
        ))
    }
}
