//! Redis Sentinel: `REDIS_URL=redis+sentinel://…/MASTER_NAME` against a
//! master, a replica and three sentinels of our own (free loopback ports,
//! killed by pid when the test ends), through a failover.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::servers::PrivateSentinels;
use common::{Fixture, test_config};

/// How soon after the master's death hits must be back: the sentinels'
/// `down-after-milliseconds` (500 ms), their vote and the promotion (a
/// second or two), the breaker's cool-off (500 ms), a relay round, and
/// slack for a loaded CI machine.
const HITS_BACK_WITHIN: Duration = Duration::from_secs(10);

#[test]
fn a_sentinel_failover_keeps_reads_whole_and_hits_come_back() {
    let mut group = PrivateSentinels::start();
    let old_master = group.master.port();
    let mut config = test_config("sentinel");
    config.redis_url = group.url();
    config.breaker_cool_off = Duration::from_millis(500);
    assert!(config.is_redis_sentinel() && !config.is_redis_cluster());
    let fx = Fixture::with(config);

    // A write before the kill, cached, and on the replica too.
    fx.client.get_user_profile(1).unwrap().expect("seeded");
    fx.client.update_user_plan(1, "before-kill").unwrap();
    let written = fx.client.get_user_profile(1).unwrap().expect("seeded");
    assert_eq!(written.plan, "before-kill");
    for id in 2..=3 {
        fx.client.get_user_profile(id).unwrap().expect("seeded");
    }
    let replicas: i64 = fx
        .client
        .cache()
        .with_connection(|c| redis::cmd("WAIT").arg(1).arg(1000).query(c))
        .unwrap();
    assert_eq!(replicas, 1, "the replica has every write");

    const READERS: usize = 8;
    let barrier = std::sync::Barrier::new(READERS + 1);
    let stop = AtomicBool::new(false);
    let (reads, failed, stale) = (AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0));
    let recovered = std::thread::scope(|s| {
        for r in 0..READERS {
            let (fx, barrier, stop, written) = (&fx, &barrier, &stop, &written);
            let (reads, failed, stale) = (&reads, &failed, &stale);
            s.spawn(move || {
                barrier.wait();
                let mut i = r as i64;
                while !stop.load(Ordering::SeqCst) {
                    let id = 1 + i % 3;
                    match fx.client.get_user_profile(id) {
                        Ok(Some(p)) if id != 1 || p.version >= written.version => {}
                        Ok(other) => {
                            stale.fetch_add(1, Ordering::SeqCst);
                            eprintln!("pre-write row: {other:?}");
                        }
                        Err(err) => {
                            failed.fetch_add(1, Ordering::SeqCst);
                            eprintln!("read failed: {}", err.chain());
                        }
                    }
                    reads.fetch_add(1, Ordering::SeqCst);
                    i += 1;
                }
            });
        }
        barrier.wait();
        std::thread::sleep(Duration::from_millis(200));
        let killed = Instant::now();
        group.master.kill();
        let hits_at_kill = fx.client.engine().stats().hits;
        let mut recovered = None;
        while killed.elapsed() < HITS_BACK_WITHIN * 2 {
            if group.master_port().is_some_and(|p| p != old_master)
                && fx.client.engine().stats().hits > hits_at_kill + 50
            {
                recovered = Some(killed.elapsed());
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(300));
        stop.store(true, Ordering::SeqCst);
        recovered
    });
    let stats = fx.client.engine().stats();
    eprintln!(
        "sentinel failover: {} reads, hits back {recovered:?} after the kill; {stats:?}",
        reads.load(Ordering::SeqCst)
    );
    assert_eq!(group.master_port(), Some(group.replica.port()), "promoted");
    assert_eq!(failed.load(Ordering::SeqCst), 0, "failed reads");
    assert_eq!(stale.load(Ordering::SeqCst), 0, "reads of a pre-write row");
    let recovered = recovered.expect("hits never resumed after the failover");
    assert!(
        recovered <= HITS_BACK_WITHIN,
        "hits took {recovered:?} to resume"
    );
    // The new master serves the entry written before the kill.
    let hits = fx.client.engine().stats().hits;
    assert_eq!(fx.client.get_user_profile(1).unwrap(), Some(written));
    assert_eq!(fx.client.engine().stats().hits, hits + 1, "a hit");
}

/// The near cache behind Sentinel: after the master dies and the replica is
/// promoted, its tracker reconnects through the sentinels to the new
/// master, and a write made there by another client evicts this client's
/// L1 copy (`max_staleness` is a minute: only tracking can).
#[test]
fn the_near_cache_follows_a_sentinel_failover() {
    let mut group = PrivateSentinels::start();
    let old_master = group.master.port();
    let mut config = test_config("sentinel_near");
    config.redis_url = group.url();
    config.breaker_cool_off = Duration::from_millis(200);
    let writer = Fixture::with(config.clone());
    config.local_cache = cacheaside::LocalCache::new(1_000, Duration::from_secs(60));
    let reader = cacheaside::Client::open(&config).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let until = |what: &str, cond: &mut dyn FnMut() -> bool| {
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    // An L1 hit before the kill.
    let l1_hit = |reader: &cacheaside::Client| {
        let before = reader.engine().stats().local_hits;
        let profile = reader.get_user_profile(1).unwrap().expect("seeded");
        (reader.engine().stats().local_hits > before, profile)
    };
    until("an L1 hit", &mut || {
        reader.engine().local_cache_ready() && l1_hit(&reader).0
    });
    let clears = reader.engine().stats().local_clears;

    group.master.kill();
    until("the promotion", &mut || {
        group.master_port().is_some_and(|p| p != old_master)
    });
    until(
        "a tracker on the new master, and an L1 hit again",
        &mut || {
            reader.engine().local_cache_ready()
                && reader.engine().stats().local_clears > clears
                && l1_hit(&reader).0
        },
    );
    // Another client writes through the new master: L1 must let go.
    until("the writer's cache back", &mut || {
        writer.client.get_user_profile(1).is_ok() && !writer.client.engine().breaker_open()
    });
    writer.client.update_user_plan(1, "after-failover").unwrap();
    assert_eq!(writer.client.engine().stats().invalidations_failed, 0);
    until("the reader to see the write", &mut || {
        reader
            .get_user_profile(1)
            .unwrap()
            .is_some_and(|p| p.plan == "after-failover")
    });
}

#[test]
fn events_refuse_sentinel_with_a_clear_error() {
    let mut config = test_config("sentinel_events");
    // No server needed: the client connects lazily.
    config.redis_url = "redis+sentinel://127.0.0.1:9/nobody".into();
    config.invalidation_relay = false;
    let client = cacheaside::Client::open(&config).unwrap();
    let Err(err) = client.events() else {
        panic!("events opened on Sentinel");
    };
    assert_eq!(err.kind(), cacheaside::ErrorKind::InvalidArgument);
    assert!(err.to_string().contains("Sentinel"), "{err}");
}

/// A failover through Sentinel to a replica that lagged: it never got the
/// invalidations of two writes the master acknowledged (and the relay
/// applied) before it died. No read returns a pre-write row after it, none
/// fails, and hits come back.
#[test]
fn a_sentinel_failover_to_a_replica_that_lagged_serves_no_pre_write_row() {
    let mut group = PrivateSentinels::start();
    let mut config = test_config("sentinel_lagged");
    config.redis_url = group.url();
    config.breaker_cool_off = Duration::from_millis(500);
    let fx = Fixture::with(config);
    let client = &fx.client;
    for id in 1..=2 {
        client.get_user_profile(id).unwrap().expect("seeded"); // cached
    }
    let replicas: i64 = client
        .cache()
        .with_connection(|c| redis::cmd("WAIT").arg(1).arg(1000).query(c))
        .unwrap();
    assert_eq!(replicas, 1, "the replica has the cached rows");
    // The replica stops receiving: frozen, its link cut.
    group.replica.freeze();
    group.master.command(&["CLIENT", "KILL", "TYPE", "replica"]);
    assert!(client.update_user_plan(1, "after-update").unwrap());
    fx.set_plan_directly(2, "after-sql");
    assert!(client.engine().sync_relay(Duration::from_secs(30)));
    for (id, plan) in [(1, "after-update"), (2, "after-sql")] {
        assert_eq!(client.get_user_profile(id).unwrap().unwrap().plan, plan);
    }
    group.master.kill();
    group.replica.thaw();
    let (mut reads, mut stale, mut hits_back) = (0u64, 0u64, None);
    let killed = Instant::now();
    while killed.elapsed() < HITS_BACK_WITHIN * 2 {
        let hits = client.engine().stats().hits;
        for (id, plan) in [(1, "after-update"), (2, "after-sql")] {
            let row = client.get_user_profile(id).unwrap().expect("a row");
            reads += 1;
            if row.plan != plan {
                stale += 1;
            }
        }
        if client.engine().stats().hits > hits && group.master_port() == Some(group.replica.port())
        {
            hits_back.get_or_insert(killed.elapsed());
            if killed.elapsed() > hits_back.unwrap() + Duration::from_millis(500) {
                break;
            }
        }
    }
    assert_eq!(
        stale, 0,
        "{stale} of {reads} reads returned a pre-write row"
    );
    let hits_back = hits_back.expect("hits never resumed after the failover");
    assert!(hits_back <= HITS_BACK_WITHIN, "hits took {hits_back:?}");
}
