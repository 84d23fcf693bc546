//! (14c-14e) What issue 24 brought to a cluster, measured inside the
//! cluster section (14) on its private cluster, against the same on the
//! shared single Redis in the same run: the L1 hit (a near cache with a
//! tracker per master) at 1 and 50 threads, and write-behind's enqueue and
//! flush throughput (a stream per hash slot, workers polling every stream),
//! with the correctness property that every row ends at its newest change.
//!
//! The write-behind users are this section's own (ids from [`SINGLE_IDS`]
//! and [`CLUSTER_IDS`]), so no other section's rows change.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use cacheaside::{Client, Config, LocalCache};

use crate::BoxResult;
use crate::fixture::{Bench, USER_ID, check_profile};
use crate::measure::{self, Baseline, Operation, Series};

/// The first user id of the single Redis's write-behind changes.
const SINGLE_IDS: i64 = 2_000_000;
/// The first user id of the cluster's write-behind changes.
const CLUSTER_IDS: i64 = 3_000_000;
/// Write-behind workers of each flush.
const WORKERS: u32 = 2;
/// Threads enqueueing.
const ENQUEUERS: usize = 4;

/// One write-behind run: enqueue, then flush.
pub struct WriteBehindRun {
    pub changes: u64,
    pub enqueue_secs: f64,
    pub flush_secs: f64,
}

impl WriteBehindRun {
    pub fn enqueue_per_s(&self) -> f64 {
        self.changes as f64 / self.enqueue_secs
    }

    pub fn flush_per_s(&self) -> f64 {
        self.changes as f64 / self.flush_secs
    }
}

/// What this part measured.
pub struct Features {
    /// L1 hits, single then cluster (ids `local_hit_single`,
    /// `local_hit_cluster`).
    pub series: Vec<Series>,
    pub wb_single: WriteBehindRun,
    pub wb_cluster: WriteBehindRun,
}

/// `config` is the cluster client's (the run's table and namespace).
pub fn measure(bench: &Bench, cluster_config: &Config) -> BoxResult<Features> {
    let series = l1_hits(bench, cluster_config)?;
    let changes: u64 = if bench.plan.quick { 2_000 } else { 10_000 };
    let single_config = {
        let mut c = bench.config.clone();
        c.invalidation_relay = false;
        c
    };
    let wb_single = write_behind(bench, &single_config, SINGLE_IDS, changes, "single")?;
    let wb_cluster = write_behind(bench, cluster_config, CLUSTER_IDS, changes, "cluster")?;
    eprintln!(
        "bench: cluster write-behind: enqueue {:.0}/s (single {:.0}/s), flush {:.0}/s (single {:.0}/s)",
        wb_cluster.enqueue_per_s(),
        wb_single.enqueue_per_s(),
        wb_cluster.flush_per_s(),
        wb_single.flush_per_s()
    );
    Ok(Features {
        series,
        wb_single,
        wb_cluster,
    })
}

/// The L1 hit on the single Redis and on the cluster, side by side.
fn l1_hits(bench: &Bench, cluster_config: &Config) -> BoxResult<Vec<Series>> {
    let with_l1 = |config: &Config| -> BoxResult<Client> {
        let mut config = config.clone();
        config.local_cache = LocalCache::new(10_000, Duration::from_secs(60));
        config.invalidation_relay = false;
        Ok(Client::open(&config)?)
    };
    let single = with_l1(&bench.config)?;
    let cluster = with_l1(cluster_config)?;
    for client in [&single, &cluster] {
        let deadline = Instant::now() + Duration::from_secs(30);
        let before = client.engine().stats().local_hits;
        while client.engine().stats().local_hits == before {
            if Instant::now() > deadline {
                return Err("L1 never answered".into());
            }
            check_profile(client.get_user_profile(USER_ID)?)?;
        }
    }
    let ops = [
        Operation {
            id: "local_hit_single",
            item: "(13a)",
            label: "get_user_profile (L1 hit), single Redis",
            baseline: Baseline::None,
            call: Box::new(|| check_profile(single.get_user_profile(USER_ID)?)),
        },
        Operation {
            id: "local_hit_cluster",
            item: "14c",
            label: "get_user_profile (L1 hit), cluster",
            baseline: Baseline::Series {
                id: "local_hit_single",
                item: "(13a)",
            },
            call: Box::new(|| check_profile(cluster.get_user_profile(USER_ID)?)),
        },
    ];
    let before = cluster.engine().stats();
    let mut series = Vec::new();
    for threads in [1, 50] {
        let active: Vec<&Operation> = ops.iter().collect();
        series.extend(measure::side_by_side(&active, threads, &bench.plan)?);
        eprintln!("bench: cluster L1 hits at {threads} thread(s) done");
    }
    let after = cluster.engine().stats();
    let (hits, misses) = (
        after.local_hits - before.local_hits,
        after.local_misses - before.local_misses,
    );
    eprintln!(
        "bench: cluster L1 answered {:.1}% of its measured reads",
        100.0 * hits as f64 / (hits + misses).max(1) as f64
    );
    Ok(series)
}

/// `changes` changes over as many users (from `first`) enqueued by
/// [`ENQUEUERS`] threads with no worker running, then flushed by
/// [`WORKERS`] workers; every row must end at its newest change.
fn write_behind(
    bench: &Bench,
    config: &Config,
    first: i64,
    changes: u64,
    label: &str,
) -> BoxResult<WriteBehindRun> {
    let mut config = config.clone();
    config.invalidation_relay = false;
    config.write_behind_max_backlog = 10_000_000;
    let client = Client::open(&config)?;
    let table = &config.users_table;
    client.db().batch_execute(&format!(
        "INSERT INTO {table} (id, name, email, plan)
         SELECT g, 'bench ' || g, 'bench' || g || '@example.com', 'free'
         FROM generate_series({first}, {first} + {changes}) AS g
         ON CONFLICT (id) DO NOTHING"
    ))?;
    let newest: Mutex<HashMap<i64, (u64, String)>> = Mutex::new(HashMap::new());
    let next = AtomicU64::new(0);
    let started = Instant::now();
    thread::scope(|s| -> BoxResult<()> {
        let handles: Vec<_> = (0..ENQUEUERS)
            .map(|_| {
                s.spawn(|| -> BoxResult<()> {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= changes {
                            return Ok(());
                        }
                        let (id, plan) = (first + i as i64, format!("c{i}"));
                        let seq = client
                            .update_user_plan_write_behind(id, &plan)?
                            .ok_or("missing user")?;
                        newest.lock().unwrap().insert(id, (seq, plan));
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().expect("enqueuer panicked")?;
        }
        Ok(())
    })?;
    let enqueue_secs = started.elapsed().as_secs_f64();
    let started = Instant::now();
    client.start_write_behind(WORKERS)?;
    let drained = client.drain_write_behind(Duration::from_secs(300));
    let flush_secs = started.elapsed().as_secs_f64();
    client.stop_write_behind();
    if let Err(err) = drained {
        bench.fail(format!(
            "write-behind ({label}) drain failed: {}",
            err.chain()
        ));
        return Err(err.into());
    }
    let newest = newest.into_inner().unwrap();
    let ids: Vec<i64> = newest.keys().copied().collect();
    let sql = format!("SELECT id, plan, version FROM {table} WHERE id = ANY($1)");
    for row in client.db().query(&sql, &[&ids])? {
        let (id, plan, version): (i64, String, i64) = (row.get(0), row.get(1), row.get(2));
        let (seq, want) = &newest[&id];
        if (&plan, version as u64) != (want, *seq) {
            bench.fail(format!(
                "write-behind ({label}): user {id} is at {plan:?} v{version}, expected {want:?} v{seq}"
            ));
        }
    }
    let dead = client.engine().write_behind_dead_letters(10)?;
    if !dead.is_empty() {
        bench.fail(format!("write-behind ({label}) dead-lettered: {dead:?}"));
    }
    Ok(WriteBehindRun {
        changes,
        enqueue_secs,
        flush_secs,
    })
}
