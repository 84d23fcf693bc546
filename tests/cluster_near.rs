//! The near cache (L1) on a Redis Cluster of our own (three masters, a
//! replica each, free loopback ports; a master is killed, so it is shared
//! with no other test): one tracker per master, so another client's writes
//! to keys of every master evict L1 within the bound, and a slot migration
//! and a failover (replica takeover) each leave no read older than a write
//! that returned more than the bound before it.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use cacheaside::{Client, LocalCache};
use common::servers::PrivateCluster;
use common::{Fixture, PATIENCE, test_config};

/// The coherence bound L1 promises (src/near.rs `BOUND`).
const BOUND: Duration = Duration::from_millis(50);

/// Polls `cond` until it holds; panics after [`PATIENCE`].
fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(1));
    }
}

/// Reads user `id` until L1 answers; returns its profile.
fn warm(client: &Client, id: i64) -> cacheaside::UserProfile {
    wait_for("the near cache's trackers", || {
        client.engine().local_cache_ready()
    });
    let mut profile = None;
    wait_for("an L1 hit", || {
        let before = client.engine().stats().local_hits;
        profile = client.get_user_profile(id).ok().flatten();
        client.engine().stats().local_hits > before
    });
    profile.expect("user exists")
}

/// The reads (began, version) older than a write that returned `slack`
/// before they began.
fn stale_reads(
    reads: &[(Instant, i64)],
    writes: &[(Instant, i64)],
    slack: Duration,
) -> Vec<String> {
    reads
        .iter()
        .filter_map(|&(began, version)| {
            let newest = writes
                .iter()
                .filter(|(done, _)| *done + slack <= began)
                .map(|&(_, v)| v)
                .max()?;
            (version < newest).then(|| format!("read version {version} after {newest} was written"))
        })
        .collect()
}

#[test]
fn l1_on_a_cluster_sees_writes_within_the_bound_and_a_migration_or_failover_leaves_no_stale_read() {
    let mut cluster = PrivateCluster::start_with_replicas();
    let mut config = test_config("cl_near");
    config.redis_url = cluster.url();
    config.local_cache = LocalCache::new(10_000, Duration::from_secs(60));
    // Only Redis's messages may evict: no relay invalidating behind them.
    config.invalidation_relay = false;
    let fx = Fixture::with(config);
    assert!(fx.client.cache().is_cluster());
    let reader = &fx.client;
    let writer = Client::open(&fx.config).unwrap();
    let slot_of = |id: i64| -> u16 {
        let key = reader.cache().redis_key(&Client::user_key(id));
        cluster.nodes[0]
            .command(&["CLUSTER", "KEYSLOT", &key])
            .parse()
            .unwrap()
    };
    let masters: std::collections::BTreeSet<u16> = (1..=5)
        .map(|id| cluster.owner_of(slot_of(id)).port())
        .collect();
    assert_eq!(masters.len(), 3, "users 1-5 live on all three masters");

    // Another client writes (through the library, or behind its back with
    // a raw DEL): every read that begins more than the bound after the
    // write returned sees it. Keys rotate over the three masters.
    const REPS: usize = 1_000;
    let mut took = Vec::with_capacity(REPS);
    for rep in 0..REPS {
        let id = (rep % 5) as i64 + 1;
        let old = warm(reader, id);
        let plan = format!("p{rep}");
        if rep % 2 == 0 {
            assert!(writer.update_user_plan(id, &plan).unwrap());
        } else {
            fx.set_plan_directly(id, &plan);
            let key = writer.cache().redis_key(&Client::user_key(id));
            writer
                .cache()
                .with_connection(|c| redis::cmd("DEL").arg(&key).query::<i64>(c))
                .unwrap();
        }
        let written = Instant::now();
        loop {
            let began = Instant::now();
            let seen = reader.get_user_profile(id).unwrap().unwrap();
            if seen.plan == plan {
                break;
            }
            assert_eq!(seen.plan, old.plan, "rep {rep}");
            assert!(
                began - written <= BOUND,
                "rep {rep}: a read {:?} after the write returned the old plan",
                began - written
            );
        }
        took.push(written.elapsed());
    }
    took.sort();
    eprintln!(
        "cluster: write -> other client reads it: p50 {:?} p99 {:?} max {:?}",
        took[REPS / 2],
        took[REPS * 99 / 100],
        took[REPS - 1]
    );

    // A slot migration: user 2's slot moves to another master under a
    // reader and a writer. Then a failover: user 1's master is SIGKILLed,
    // its replica takes over. Through each, no read may return a version
    // older than a write that returned more than the bound before it began.
    let slot = slot_of(2);
    let from_port = cluster.owner_of(slot).port();
    no_stale_read_through(&fx, 2, "the migration", || {
        let from = cluster.owner_of(slot);
        let to = cluster
            .nodes
            .iter()
            .find(|n| {
                n.port() != from_port && n.command(&["INFO", "REPLICATION"]).contains("role:master")
            })
            .unwrap();
        cluster.migrate_slot(slot, from, to, Duration::from_millis(500));
    });
    assert_ne!(cluster.owner_of(slot).port(), from_port, "the slot moved");

    let master_port = cluster.owner_of(slot_of(1)).port();
    let replica_port = cluster.replica_of(cluster.owner_of(slot_of(1))).port();
    no_stale_read_through(&fx, 1, "the failover", || {
        cluster
            .nodes
            .iter_mut()
            .find(|n| n.port() == master_port)
            .unwrap()
            .kill();
        cluster.take_over(replica_port);
    });
}

/// Reads user `id` on the fixture's client (L1 on) while another client
/// writes it, through `event`, run once 20 writes have returned; until L1
/// has been cleared, answers again, and 20 more writes have returned. No
/// read may fail, nor return a version older than a write that returned
/// more than the bound before it began.
fn no_stale_read_through(fx: &Fixture, id: i64, what: &str, event: impl FnOnce()) {
    let reader = &fx.client;
    warm(reader, id);
    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(Mutex::new(Vec::<(Instant, i64)>::new()));
    let writing = {
        let (stop, writes) = (stop.clone(), writes.clone());
        let writer = Client::open(&fx.config).unwrap();
        thread::spawn(move || {
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) {
                n += 1;
                if writer.update_user_plan(id, &format!("w{n}")).is_ok()
                    && let Ok(Some(now)) = writer.get_user_profile(id)
                {
                    writes.lock().unwrap().push((Instant::now(), now.version));
                }
                thread::sleep(Duration::from_millis(2));
            }
        })
    };
    let mut reads: Vec<(Instant, i64)> = Vec::new();
    let mut failed = 0;
    let mut read = |reads: &mut Vec<(Instant, i64)>| {
        let began = Instant::now();
        match reader.get_user_profile(id) {
            Ok(Some(p)) => reads.push((began, p.version)),
            _ => failed += 1,
        }
    };
    let written = |n: usize| {
        let writes = writes.clone();
        move || writes.lock().unwrap().len() >= n
    };
    let enough = written(20);
    wait_for("writes before the event", || {
        read(&mut reads);
        enough()
    });
    let clears = reader.engine().stats().local_clears;
    let began = Instant::now();
    event();
    wait_for("L1 cleared after the event", || {
        read(&mut reads);
        reader.engine().stats().local_clears > clears
    });
    let hits = reader.engine().stats().local_hits;
    wait_for("L1 hits again after the event", || {
        read(&mut reads);
        reader.engine().stats().local_hits > hits
    });
    eprintln!("{what}: L1 hits again {:?} after it began", began.elapsed());
    let enough = written(writes.lock().unwrap().len() + 20);
    wait_for("writes after the event", || {
        read(&mut reads);
        enough()
    });
    stop.store(true, Ordering::SeqCst);
    writing.join().unwrap();
    let writes = writes.lock().unwrap();
    let stale = stale_reads(&reads, &writes, BOUND);
    eprintln!(
        "{what}: {} reads ({failed} failed), {} writes",
        reads.len(),
        writes.len()
    );
    assert!(
        stale.is_empty(),
        "{what}: {} stale reads: {:?}",
        stale.len(),
        &stale[..stale.len().min(5)]
    );
    assert_eq!(failed, 0, "{what}: failed reads");
}
