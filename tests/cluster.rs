//! The lab's guarantees on a 3-master Redis Cluster of our own (started by
//! the tests, on free loopback ports, and killed when the last test using it
//! is done), with Postgres the shared test server.

mod common;

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use cacheaside::{Client, ErrorKind};
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
    let row = fx.assert_cold_readers_cost_one_query(50);
    assert_eq!(row.name, "Grace Hopper");
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
    // The relay applies the update's outbox row too; let it, so its
    // invalidation cannot land between the steps measured below.
    fx.settle();
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
fn events_reach_subscribers_and_publish_counts_them_on_a_cluster() {
    let cluster = cluster();
    let fx = fixture(&cluster, "cl_events");
    let events = fx.client.events().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let _sub = events
        .subscribe(&["orders"], move |event| {
            if let cacheaside::Event::Message { payload, .. } = event {
                let _ = tx.send(payload.to_vec());
            }
        })
        .unwrap();
    for i in 0..20 {
        // SPUBLISH goes to the master of the channel's slot, where ours is.
        assert_eq!(events.publish("orders", format!("m{i}")).unwrap(), 1);
    }
    for i in 0..20 {
        assert_eq!(
            rx.recv_timeout(PATIENCE).unwrap(),
            format!("m{i}").into_bytes()
        );
    }
}

/// The stale-read soak (readers and writers on one hot row, a slow read
/// path) while the hot key's slot moves to another master (held MIGRATING
/// for 2 s): every read that starts after a write returned sees that
/// write's version or newer, and no call fails.
///
/// While the slot migrates, Redis refuses the entry's multi-key scripts
/// with TRYAGAIN (their keys are never all on one side: most do not
/// exist), so invalidations fail after their retries, the breaker opens
/// and reads go to Postgres until the relay has caught up. On its own
/// cluster: the migration moves the slot of `{user:1}` for every
/// namespace, which would disturb the other tests.
#[test]
fn soak_survives_migrating_the_hot_slot_without_stale_reads_or_errors() {
    soak(true);
}

#[test]
fn soak_on_a_settled_cluster_has_no_stale_reads_or_errors() {
    soak(false);
}

fn soak(migrate: bool) {
    let cluster = if migrate {
        Arc::new(PrivateCluster::start())
    } else {
        cluster()
    };
    let mut config = test_config(if migrate { "cl_soak_mig" } else { "cl_soak" });
    config.redis_url = cluster.url();
    let fx = Fixture::with(config);
    fx.client
        .engine()
        .hooks()
        .set_after_load(|_| std::thread::sleep(Duration::from_millis(2)));
    let hot = fx.client.cache().redis_key(&Client::user_key(1));
    let slot = slot_of(&cluster, &hot);
    let from = cluster.owner_of(slot);
    let to = cluster
        .nodes
        .iter()
        .find(|n| n.port() != from.port())
        .expect("another master");
    let floor = AtomicI64::new(1);
    let stop = AtomicBool::new(false);
    let (reads, writes, violations, errors) = (
        AtomicU64::new(0),
        AtomicU64::new(0),
        AtomicU64::new(0),
        AtomicU64::new(0),
    );
    let began = Instant::now();
    let moved = std::thread::scope(|s| {
        for r in 0..4u64 {
            let (fx, floor, stop, reads, violations, errors, began) =
                (&fx, &floor, &stop, &reads, &violations, &errors, &began);
            s.spawn(move || {
                let mut i = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    let must_see = floor.load(Ordering::SeqCst);
                    let got = if (r + i).is_multiple_of(2) {
                        fx.client.get_user_profile(1)
                    } else {
                        fx.client.get_user_profile_singleflight(1)
                    };
                    match got {
                        Ok(Some(profile)) if profile.version >= must_see => {}
                        Ok(other) => {
                            violations.fetch_add(1, Ordering::SeqCst);
                            eprintln!(
                                "stale read at {:?}: {other:?} after {must_see} was written",
                                began.elapsed()
                            );
                        }
                        Err(err) => {
                            errors.fetch_add(1, Ordering::SeqCst);
                            eprintln!("read failed: {}", err.chain());
                        }
                    }
                    reads.fetch_add(1, Ordering::SeqCst);
                    i += 1;
                }
            });
        }
        for w in 0..2 {
            let (fx, floor, stop, writes, errors) = (&fx, &floor, &stop, &writes, &errors);
            s.spawn(move || {
                let mut i = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    let written = if w == 0 {
                        let before = fx.db_version(1);
                        fx.client
                            .update_user_plan(1, &format!("plain{i}"))
                            .map(|_| before + 1)
                    } else {
                        fx.client
                            .update_user_plan_write_through(1, &format!("wt{i}"))
                            .map(|row| row.map_or(0, |r| r.version))
                    };
                    match written {
                        Ok(version) => {
                            floor.fetch_max(version, Ordering::SeqCst);
                            writes.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(err) => {
                            errors.fetch_add(1, Ordering::SeqCst);
                            eprintln!("write failed: {}", err.chain());
                        }
                    }
                    i += 1;
                    std::thread::sleep(Duration::from_millis(3));
                }
            });
        }
        // Run a while on the settled cluster, then move the slot under load,
        // then run a while on its new master.
        std::thread::sleep(Duration::from_millis(500));
        let moved = if migrate {
            cluster.migrate_slot(slot, from, to, Duration::from_secs(2))
        } else {
            std::thread::sleep(Duration::from_secs(2));
            0
        };
        std::thread::sleep(Duration::from_millis(500));
        stop.store(true, Ordering::SeqCst);
        moved
    });
    let (reads, writes) = (reads.load(Ordering::SeqCst), writes.load(Ordering::SeqCst));
    eprintln!("migration soak: {reads} reads, {writes} writes, {moved} keys migrated");
    if migrate {
        // (How many keys MIGRATE moved depends on the moment: with the
        // entry invalidated, the new keys are created on the target.)
        assert_eq!(cluster.owner_of(slot).port(), to.port(), "the slot moved");
    }
    assert!(
        reads > 100 && writes > 20,
        "the soak ran: {reads} reads, {writes} writes"
    );
    assert_eq!(violations.load(Ordering::SeqCst), 0, "stale reads");
    assert_eq!(errors.load(Ordering::SeqCst), 0, "failed calls");
    assert_eq!(fx.client.engine().in_flight(), 0);
}

/// Polls until `done`; panics after [`PATIENCE`] with `what`.
fn eventually(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !done() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn unversioned_invalidations_reach_a_cluster_without_relay_errors() {
    // A DELETE, a key-column change and a table without a version column
    // are invalidated without a version: the path that passed the script
    // too few keys on a cluster and stopped the relay.
    let cluster = cluster();
    let fx = fixture(&cluster, "cl_unversioned");
    let c = &fx.client;
    let db = c.db();
    let users = &fx.config.users_table;
    for id in 1..=2 {
        c.get_user_profile(id).unwrap().expect("seeded");
    }
    db.execute(&format!("DELETE FROM {users} WHERE id = 1"), &[])
        .unwrap();
    eventually("the deleted row is still served", || {
        c.get_user_profile(1).unwrap().is_none()
    });
    db.execute(&format!("UPDATE {users} SET id = 200 WHERE id = 2"), &[])
        .unwrap();
    eventually("the row under its old key is still served", || {
        c.get_user_profile(2).unwrap().is_none()
    });

    let table = format!("{users}_plain");
    db.batch_execute(&format!(
        "CREATE TABLE {table} (id bigint PRIMARY KEY, v text NOT NULL);
         INSERT INTO {table} VALUES (1, 'old')"
    ))
    .unwrap();
    c.engine()
        .capture_changes(&table, "plain:", "id", None)
        .unwrap();
    let read = || -> String {
        c.engine()
            .get_or_load("plain:1", Duration::from_secs(60), || {
                let row = db.query_opt(&format!("SELECT v FROM {table} WHERE id = 1"), &[])?;
                Ok(row.map(|r| r.get::<_, String>(0)))
            })
            .unwrap()
            .unwrap()
    };
    assert_eq!(read(), "old");
    db.execute(&format!("UPDATE {table} SET v = 'new' WHERE id = 1"), &[])
        .unwrap();
    eventually("the unversioned row is still served", || read() == "new");

    assert!(c.engine().sync_relay(PATIENCE));
    let stats = c.engine().stats();
    assert_eq!(stats.relay_errors, 0, "{stats:?}");
    db.batch_execute(&format!("DROP TABLE {table}")).unwrap();
}

/// A plain read that claims its lease in its lookup's round trip (an
/// engine whose reads mostly miss) on a master that forgot the scripts (a
/// promoted replica, a restart; here `SCRIPT FLUSH`): a cluster pipeline
/// fails as a whole with NOSCRIPT, and the read must load the script and
/// go on through Redis, not go around it on every read from then on.
#[test]
fn a_lease_claimed_ahead_survives_a_master_without_the_scripts() {
    let cluster = cluster();
    let fx = fixture(&cluster, "cl_ahead_noscript");
    let engine = fx.client.engine();
    let mut id = 0;
    while !engine.claims_leases_ahead() {
        id = id % 5 + 1;
        engine.invalidate(&Client::user_key(id)).unwrap();
        fx.client.get_user_profile(id).unwrap().expect("seeded");
    }
    for node in &cluster.nodes {
        node.command(&["SCRIPT", "FLUSH"]);
    }
    let before = engine.stats();
    engine.invalidate(&Client::user_key(1)).unwrap();
    fx.client.get_user_profile(1).unwrap().expect("seeded");
    let queries = fx.queries();
    fx.client.get_user_profile(1).unwrap().expect("seeded");
    assert_eq!(
        fx.queries(),
        queries,
        "the miss filled: the next read sent no statement"
    );
    assert_eq!(
        engine.stats().bypassed,
        before.bypassed,
        "no read went around Redis"
    );
}
