//! A Redis Cluster failover under load: a private cluster of three masters
//! and three replicas (free loopback ports, killed by pid when the test
//! ends), the master of a hot key SIGKILLed and its replica promoted.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cacheaside::Client;
use common::servers::PrivateCluster;
use common::{Fixture, test_config};

/// The breaker's cool-off in this test.
const COOL_OFF: Duration = Duration::from_millis(500);
/// How soon after the kill hits must be back: the promotion (under a
/// second here: the test promotes the replica at once), the cool-off, a
/// relay round (the breaker waits for one in `Recovering`) and a few
/// seconds of slack for a loaded CI machine.
const HITS_BACK_WITHIN: Duration = Duration::from_secs(5);

#[test]
fn hits_resume_after_a_cluster_failover_with_no_failed_or_stale_read() {
    let started = Instant::now();
    let mut cluster = PrivateCluster::start_with_replicas();
    eprintln!("six nodes up in {:?}", started.elapsed());
    let mut config = test_config("cl_failover");
    config.redis_url = cluster.url();
    config.breaker_cool_off = COOL_OFF;
    let fx = Fixture::with(config);
    let seeded = fx.client.get_user_profile(1).unwrap().expect("seeded");
    let key = fx.client.cache().redis_key(&Client::user_key(1));
    let slot: u16 = cluster.nodes[0]
        .command(&["CLUSTER", "KEYSLOT", &key])
        .parse()
        .expect("a slot");
    let master_port = cluster.owner_of(slot).port();
    let replica_port = cluster.replica_of(cluster.owner_of(slot)).port();

    const READERS: usize = 8;
    let barrier = std::sync::Barrier::new(READERS + 1);
    let stop = AtomicBool::new(false);
    let (reads, failed, stale) = (AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0));
    let (outage, recovered, after) = std::thread::scope(|s| {
        for _ in 0..READERS {
            let (fx, barrier, stop, seeded) = (&fx, &barrier, &stop, &seeded);
            let (reads, failed, stale) = (&reads, &failed, &stale);
            s.spawn(move || {
                barrier.wait();
                while !stop.load(Ordering::SeqCst) {
                    match fx.client.get_user_profile(1) {
                        Ok(Some(profile)) if profile == *seeded => {}
                        Ok(other) => {
                            stale.fetch_add(1, Ordering::SeqCst);
                            eprintln!("wrong row: {other:?}");
                        }
                        Err(err) => {
                            failed.fetch_add(1, Ordering::SeqCst);
                            eprintln!("read failed: {}", err.chain());
                        }
                    }
                    reads.fetch_add(1, Ordering::SeqCst);
                }
            });
        }
        barrier.wait();
        std::thread::sleep(Duration::from_millis(200));
        let killed = Instant::now();
        let master = cluster
            .nodes
            .iter_mut()
            .find(|n| n.port() == master_port)
            .expect("ours");
        master.kill();
        // Reads in flight at the kill may still count a hit: wait for the
        // breaker (or a failed read) to say the slot is gone.
        let hits_in_outage = fx.client.engine().stats().hits;
        cluster.take_over(replica_port);
        let outage = killed.elapsed();
        let mut recovered = None;
        while killed.elapsed() < HITS_BACK_WITHIN * 2 {
            // Fifty hits past the outage's count: the hot key is served
            // from its new master.
            if fx.client.engine().stats().hits > hits_in_outage + 50 {
                recovered = Some(killed.elapsed());
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let before = fx.client.engine().stats();
        std::thread::sleep(Duration::from_millis(300));
        stop.store(true, Ordering::SeqCst);
        (outage, recovered, before)
    });
    let stats = fx.client.engine().stats();
    eprintln!(
        "failover: {} reads; from the kill: cluster_state:ok after {outage:?}, hits after \
         {recovered:?}; {stats:?}",
        reads.load(Ordering::SeqCst)
    );
    assert_eq!(failed.load(Ordering::SeqCst), 0, "failed reads");
    assert_eq!(stale.load(Ordering::SeqCst), 0, "wrong rows");
    let recovered = recovered.expect("hits never resumed after the failover");
    assert!(
        recovered <= HITS_BACK_WITHIN,
        "hits took {recovered:?} to resume"
    );
    assert!(
        stats.hits > after.hits + 10,
        "reads keep hitting after recovery"
    );
}
