//! The lab's guarantees on a 3-master Redis Cluster of our own (started by
//! the tests, on free loopback ports, and killed when the last test using it
//! is done), with Postgres the shared test server.

mod common;

use std::sync::{Arc, Barrier, Mutex, Weak};
use std::time::{Duration, Instant};

use cacheaside::{Client, ErrorKind, UserProfile};
use common::servers::PrivateCluster;
use common::{Fixture, PATIENCE, test_config};

/// One cluster for the tests that run at the same time: each holds an
/// `Arc`, and the last to finish drops (kills) it. A later test starts a
/// new one. (A `static` cluster would never be dropped, and its servers
/// would outlive the test process.)
fn cluster() -> Arc<PrivateCluster> {
    static SHARED: Mutex<Weak<PrivateCluster>> = Mutex::new(Weak::new());
    let mut shared = SHARED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(cluster) = shared.upgrade() {
        return cluster;
    }
    let cluster = Arc::new(PrivateCluster::start());
    *shared = Arc::downgrade(&cluster);
    cluster
}

/// A seeded fixture whose cache is the cluster.
fn fixture(cluster: &PrivateCluster, label: &str) -> Fixture {
    let mut config = test_config(label);
    config.redis_url = cluster.url();
    assert!(config.is_redis_cluster());
    Fixture::with(config)
}

/// The Redis Cluster hash slot of `key` (CRC16 of its hash tag, mod 16384).
fn slot_of(cluster: &PrivateCluster, key: &str) -> u16 {
    cluster.nodes[0]
        .command(&["CLUSTER", "KEYSLOT", key])
        .parse()
        .expect("a slot number")
}

#[test]
fn hit_costs_no_query_and_miss_one_on_a_cluster() {
    let cluster = cluster();
    let fx = fixture(&cluster, "cl_hit");
    assert!(fx.client.cache().is_cluster());
    let before = fx.queries();
    let miss = fx.client.get_user_profile(1).unwrap().expect("seeded");
    assert_eq!(
        fx.queries(),
        before + 1,
        "a miss sends exactly one statement"
    );
    assert_eq!(miss.name, "Ada Lovelace");
    for _ in 0..10 {
        assert_eq!(fx.client.get_user_profile(1).unwrap().as_ref(), Some(&miss));
        assert_eq!(
            fx.client.get_user_profile_singleflight(1).unwrap().as_ref(),
            Some(&miss)
        );
    }
    assert_eq!(fx.queries(), before + 1, "hits send no statement");

    // The entries of the five users spread over the masters: the cluster is
    // really used, not one node of it.
    let mut owners = std::collections::BTreeSet::new();
    for id in 1..=5 {
        fx.client.get_user_profile(id).unwrap().expect("seeded");
        let key = fx.client.cache().redis_key(&Client::user_key(id));
        owners.insert(cluster.owner_of(slot_of(&cluster, &key)).port());
    }
    assert!(owners.len() >= 2, "five keys on one master: {owners:?}");
}

#[test]
fn fifty_cold_readers_cost_one_query_on_a_cluster() {
    let cluster = cluster();
    let fx = fixture(&cluster, "cl_sf50");
    let threads = 50;
    let barrier = Barrier::new(threads);
    let before = fx.queries();
    let results: Vec<Option<UserProfile>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    barrier.wait();
                    fx.client.get_user_profile_singleflight(3).unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(
        fx.queries(),
        before + 1,
        "exactly one query for {threads} cold readers"
    );
    let first = results[0].clone().expect("seeded");
    assert_eq!(first.name, "Grace Hopper");
    assert!(results.iter().all(|r| r.as_ref() == Some(&first)));
    assert_eq!(fx.client.engine().in_flight(), 0);
}

#[test]
fn writes_are_never_stale_and_absent_rows_are_cached_on_a_cluster() {
    let cluster = cluster();
    let fx = fixture(&cluster, "cl_write");
    let key = Client::user_key(2);

    // Invalidate on write.
    assert_eq!(fx.client.get_user_profile(2).unwrap().unwrap().plan, "free");
    assert!(fx.client.update_user_plan(2, "pro").unwrap());
    assert!(
        !fx.client.cache().exists(&key).unwrap(),
        "update deletes the entry"
    );
    let before = fx.queries();
    assert_eq!(fx.client.get_user_profile(2).unwrap().unwrap().plan, "pro");
    assert_eq!(fx.queries(), before + 1, "the read after a write reloads");

    // Write-through: the new row is what the next read serves, without a query.
    let written = fx
        .client
        .update_user_plan_write_through(2, "team")
        .unwrap()
        .expect("user 2 exists");
    assert_eq!(written.plan, "team");
    let before = fx.queries();
    assert_eq!(fx.client.get_user_profile(2).unwrap().unwrap(), written);
    assert_eq!(fx.queries(), before, "write-through filled the cache");

    // A write behind the library's back reaches the cache through the
    // relay (its invalidations go key by key on a cluster).
    fx.set_plan_directly(2, "enterprise");
    let deadline = Instant::now() + PATIENCE;
    while fx.client.get_user_profile(2).unwrap().unwrap().plan != "enterprise" {
        assert!(Instant::now() < deadline, "the relay never invalidated");
        std::thread::sleep(Duration::from_millis(10));
    }

    // Negative caching: one query for a flood of reads of a missing row,
    // then an insert makes it visible.
    let before = fx.queries();
    for _ in 0..50 {
        assert_eq!(fx.client.get_user_profile(77).unwrap(), None);
    }
    assert_eq!(
        fx.queries(),
        before + 1,
        "one query, then the absent entry answers"
    );
    assert!(
        fx.client
            .insert_user(77, "New", "new@example.com", "free")
            .unwrap()
    );
    assert_eq!(fx.client.get_user_profile(77).unwrap().unwrap().name, "New");

    // delete_namespace walks every master.
    for id in 1..=5 {
        fx.client.get_user_profile(id).unwrap();
    }
    let deleted = fx.client.cache().delete_namespace().unwrap();
    assert!(deleted >= 5, "deleted {deleted}");
    for id in 1..=5 {
        assert!(!fx.client.cache().exists(&Client::user_key(id)).unwrap());
    }
}

#[test]
fn keys_that_break_the_hash_tag_are_rejected() {
    let cluster = cluster();
    let fx = fixture(&cluster, "cl_keys");
    for bad in ["a{b", "a}b", "{x}", ""] {
        let err = fx.client.cache().get_json::<u32>(bad).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{bad:?}");
        let err = fx
            .client
            .engine()
            .get_or_load::<u32, _>(bad, Duration::from_secs(5), || Ok(Some(1)))
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{bad:?}");
    }
}

#[test]
fn write_behind_refuses_a_cluster_with_a_clear_error() {
    let cluster = cluster();
    let fx = fixture(&cluster, "cl_wb");
    let err = fx.client.start_write_behind(1).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    assert!(err.to_string().contains("Redis Cluster"), "{err}");
    let err = fx
        .client
        .update_user_plan_write_behind(1, "pro")
        .unwrap_err();
    assert!(err.to_string().contains("Redis Cluster"), "{err}");
}
