//! Loads from a read replica, fenced by committed versions: a private
//! PostgreSQL primary with a streaming replica that applies every commit
//! late (`recovery_min_apply_delay`), so a miss right after a write would
//! find the pre-write row there.

mod common;

use std::time::Duration;

use cacheaside::{CacheAside, Config, Db, Mode, Versioned};
use common::replica::{self as soak, until};
use common::servers::{PrivateCluster, PrivatePostgres};
use common::{Fixture, test_config};

const TTL: Duration = Duration::from_secs(60);

/// A config whose loads go to `replica` and everything else to `primary`.
fn replica_config(label: &str, primary: &PrivatePostgres, replica: &PrivatePostgres) -> Config {
    let mut config = test_config(label);
    config.database_url = primary.url();
    config.replica_url = Some(replica.url());
    config.replica_max_lag = Duration::from_secs(10);
    config
}

/// Deletes the engine's keys when the test ends, however it ends.
struct Namespace<'a>(&'a CacheAside);

impl Drop for Namespace<'_> {
    fn drop(&mut self) {
        let _ = self.0.cache().delete_namespace();
    }
}

/// The item's `(val, version)` read through the fenced loader.
fn read_item(engine: &CacheAside, id: i64) -> (i64, u64) {
    let sql = "SELECT val, version FROM items WHERE id = $1";
    engine
        .get_or_load_versioned_from_replica(
            &format!("item:{id}"),
            TTL,
            Mode::SingleFlight,
            |db: &Db| {
                let row = db.query_opt(sql, &[&id])?;
                Ok(row.map(|r| {
                    let version = r.get::<_, i64>(1) as u64;
                    Versioned::new((r.get::<_, i64>(0), version), version)
                }))
            },
        )
        .unwrap()
        .expect("the item exists")
}

fn version_on(db: &Db, id: i64) -> Option<i64> {
    db.query_opt("SELECT version FROM items WHERE id = $1", &[&id])
        .ok()
        .flatten()
        .map(|r| r.get(0))
}

/// Drops the cached value only (as an eviction or an expiry would): the
/// fence and everything else stay.
fn evict(engine: &CacheAside, key: &str) {
    let redis_key = engine.cache().redis_key(key);
    engine
        .cache()
        .with_connection(|c| redis::cmd("DEL").arg(&redis_key).query::<()>(c))
        .unwrap();
}

/// Every write path fences the replica: write-through (by version), the
/// relay applying a direct SQL update (by the captured version), a plain
/// invalidation (closed: version unknown). A replica row at the fence's
/// version is used; one below it is read again from the primary.
#[test]
fn a_miss_right_after_a_write_reads_the_primary_not_the_lagging_replica() {
    let primary = PrivatePostgres::start();
    // Long enough that the replica is surely behind when the read comes.
    let replica = primary.start_replica(Duration::from_secs(2));
    let mut config = replica_config("replica_fence", &primary, &replica);
    // Far above the lag here: the fences decide, never the lag watch.
    config.replica_max_lag = Duration::from_secs(120);
    let engine = CacheAside::open(&config).unwrap();
    let _cleanup = Namespace(&engine);
    let db = engine.db();
    let on_replica = db.replica().expect("replica_url is set");
    db.batch_execute(
        "CREATE TABLE items (id bigint PRIMARY KEY, val bigint NOT NULL, version bigint NOT NULL);
         INSERT INTO items VALUES (1, 1, 1)",
    )
    .unwrap();
    engine
        .capture_changes("items", "item:", "id", Some("version"))
        .unwrap();
    until("the replica to have the row", || {
        version_on(on_replica, 1) == Some(1)
    });
    let counts = || {
        let s = engine.stats();
        (
            s.replica_loads,
            s.replica_fenced,
            db.query_count(),
            on_replica.query_count(),
        )
    };

    // No write within the lag: the replica answers.
    let before = counts();
    assert_eq!(read_item(&engine, 1), (1, 1));
    let after = counts();
    assert_eq!(
        (after.0 - before.0, after.1 - before.1),
        (1, 0),
        "replica loads, fenced"
    );
    assert_eq!(
        (after.2 - before.2, after.3 - before.3),
        (0, 1),
        "primary, replica statements"
    );

    // Write-through to version 2, then the entry is evicted: the replica
    // still has version 1, below the fence: the primary answers.
    let update = "UPDATE items SET val = $2, version = $2 WHERE id = $1 RETURNING val, version";
    let written: Option<i64> = engine
        .write_through("item:1", TTL, || {
            let row = db.query_opt(update, &[&1_i64, &2_i64])?;
            Ok(row.map(|r| Versioned::new(r.get::<_, i64>(0), r.get::<_, i64>(1) as u64)))
        })
        .unwrap();
    assert_eq!(written, Some(2));
    evict(&engine, "item:1");
    let before = counts();
    assert_eq!(read_item(&engine, 1), (2, 2), "a pre-write row was read");
    let after = counts();
    assert_eq!(
        (after.0 - before.0, after.1 - before.1),
        (0, 1),
        "replica loads, fenced"
    );
    assert_eq!(
        (after.2 - before.2, after.3 - before.3),
        (1, 1),
        "primary, replica statements"
    );
    assert_eq!(version_on(on_replica, 1), Some(1), "the replica was behind");

    // Once the replica has version 2, it serves the key again, fence or not.
    until("the replica to have version 2", || {
        version_on(on_replica, 1) == Some(2)
    });
    evict(&engine, "item:1");
    let before = counts();
    assert_eq!(read_item(&engine, 1), (2, 2));
    assert_eq!(counts().0 - before.0, 1, "the replica answered");

    // A write that bypasses the library: the relay applies it with its
    // captured version, and fences the key before it invalidates.
    db.execute("UPDATE items SET val = 3, version = 3 WHERE id = 1", &[])
        .unwrap();
    assert!(engine.sync_relay(Duration::from_secs(10)));
    let before = counts();
    assert_eq!(read_item(&engine, 1), (3, 3), "a pre-write row was read");
    assert_eq!(counts().1 - before.1, 1, "fenced");

    // A plain write + invalidate: no version, so the fence is closed and the
    // replica is not even asked.
    db.execute("UPDATE items SET val = 4, version = 4 WHERE id = 1", &[])
        .unwrap();
    engine.invalidate("item:1").unwrap();
    let before = counts();
    assert_eq!(read_item(&engine, 1), (4, 4), "a pre-write row was read");
    let after = counts();
    assert_eq!(after.1 - before.1, 1, "fenced");
    assert_eq!(after.3 - before.3, 0, "the replica was not asked");
    assert_eq!(engine.stats().replica_skipped, 0);
}

/// A fence lives `replica_max_lag`; a replica further behind than that
/// would serve the pre-write row once the fence is gone. The lag watch
/// sends those loads to the primary.
#[test]
fn a_replica_further_behind_than_the_fences_cover_is_not_read() {
    let primary = PrivatePostgres::start();
    let replica = primary.start_replica(Duration::from_secs(3));
    let mut config = replica_config("replica_lag", &primary, &replica);
    config.replica_max_lag = Duration::from_secs(1);
    let engine = CacheAside::open(&config).unwrap();
    let _cleanup = Namespace(&engine);
    let db = engine.db();
    let on_replica = db.replica().expect("replica_url is set");
    db.batch_execute(
        "CREATE TABLE items (id bigint PRIMARY KEY, val bigint NOT NULL, version bigint NOT NULL);
         INSERT INTO items VALUES (1, 1, 1)",
    )
    .unwrap();
    until("the replica to have the row", || {
        version_on(on_replica, 1) == Some(1)
    });
    // Caught up: the replica serves the cold miss.
    assert_eq!(read_item(&engine, 1), (1, 1));
    assert_eq!(engine.stats().replica_loads, 1);

    let update = "UPDATE items SET val = $2, version = $2 WHERE id = $1 RETURNING val, version";
    let written: Option<(i64, u64)> = engine
        .write_through("item:1", TTL, || {
            let row = db.query_opt(update, &[&1_i64, &2_i64])?;
            Ok(row.map(|r| {
                let version = r.get::<_, i64>(1) as u64;
                Versioned::new((r.get::<_, i64>(0), version), version)
            }))
        })
        .unwrap();
    assert_eq!(written, Some((2, 2)));
    let fence = format!("{}:fence", engine.cache().redis_key("item:1"));
    until("the fence to expire", || {
        !engine
            .cache()
            .with_connection(|c| redis::cmd("EXISTS").arg(&fence).query::<bool>(c))
            .unwrap()
    });
    assert_eq!(
        version_on(on_replica, 1),
        Some(1),
        "the replica caught up before the fence expired: the test proves nothing"
    );
    evict(&engine, "item:1");
    let skipped = engine.stats().replica_skipped;
    assert_eq!(read_item(&engine, 1), (2, 2), "a pre-write row was read");
    assert_eq!(engine.stats().replica_skipped, skipped + 1);
}

/// The lab's reads on a replica 500 ms behind, while a writer updates the
/// same users (plain update + invalidate, and write-through): no read ever
/// returns (and so no cache entry ever holds) a version older than a write
/// that returned before the read began; at the end every cached profile is
/// the committed one; and most misses are served by the replica.
#[test]
fn readers_beside_a_writer_cache_no_pre_write_row_and_the_replica_serves_most_misses() {
    replica_soak("replica_soak", None);
}

/// The same with the fences (and entries) on a Redis Cluster: each fence
/// lives in its key's slot.
#[test]
fn the_replica_soak_holds_on_a_redis_cluster() {
    let cluster = PrivateCluster::start();
    replica_soak("replica_soak_cluster", Some(cluster.url()));
}

/// Readers and a writer on the lab's users, loads from a replica 500 ms
/// behind (Redis at `redis_url`, or the shared one): 0 reads older than a
/// write that had returned, 0 cached profiles older than their row, most
/// misses served by the replica.
fn replica_soak(label: &str, redis_url: Option<String>) {
    let primary = PrivatePostgres::start();
    let replica = primary.start_replica(Duration::from_millis(500));
    let mut config = replica_config(label, &primary, &replica);
    if let Some(url) = redis_url {
        config.redis_url = url;
    }
    // Entries of users nobody writes expire often: their misses are the
    // replica's to serve.
    config.ttl = Duration::from_millis(200);
    let fx = Fixture::with(config);
    let client = &fx.client;
    // Cold users beside the five hot (written) demo users.
    let cold: Vec<i64> = (1000..1200).collect();
    soak::add_users_and_wait_for_the_replica(client, 1000..1200);
    fx.settle();
    let hot: Vec<i64> = cacheaside::DEMO_USERS.iter().map(|u| u.0).collect();

    let seen = soak::run(client, &hot, &cold, Duration::from_secs(3), 4);
    eprintln!("{seen:?}, replica share {:.2}", seen.replica_share());
    assert!(
        seen.writes > 50 && seen.reads > 500,
        "too little ran: {seen:?}"
    );
    assert_eq!(seen.stale, 0, "reads older than a write that had returned");
    assert_eq!(
        soak::cached_behind_committed(client, &hot),
        Vec::<i64>::new(),
        "cached profiles older than the committed row"
    );
    // (Skipped loads came while another thread first measured the
    // replica's lag: they read the primary, and count against the share.)
    assert!(
        seen.fenced > 0,
        "no miss met a fence: the test did not race"
    );
    assert!(
        seen.replica_share() > 0.5,
        "the replica served {} of {} misses",
        seen.replica_loads,
        seen.replica_loads + seen.fenced + seen.skipped
    );
}

/// A write-behind worker's commit reaches the replica late too: the
/// worker closes the key's fence before it settles the change (which
/// deletes the cached value), so the miss that follows reads the primary.
#[test]
fn a_write_behind_commit_fences_the_replica() {
    let primary = PrivatePostgres::start();
    let replica = primary.start_replica(Duration::from_secs(2));
    let mut config = replica_config("replica_write_behind", &primary, &replica);
    // The relay would fence the key too (the worker's UPDATE is captured):
    // without it, the worker's own fence is what is tested.
    config.invalidation_relay = false;
    let fx = Fixture::with(config);
    let client = &fx.client;
    let on_replica = client.db().replica().expect("replica_url is set");
    let table = &fx.config.users_table;
    // A user of its own, inserted behind the library's back: no write of
    // the library has fenced it.
    client
        .db()
        .execute(
            &format!(
                "INSERT INTO {table} (id, name, email, plan) VALUES (3000, 'x', 'x@x', 'free')"
            ),
            &[],
        )
        .unwrap();
    let version = format!("SELECT version FROM {table} WHERE id = 3000");
    until("the replica to have the user", || {
        matches!(on_replica.query_opt(&version, &[]), Ok(Some(_)))
    });
    client.start_write_behind(1).unwrap();
    let seq = client
        .update_user_plan_write_behind(3000, "team")
        .unwrap()
        .expect("user 3000 exists");
    assert_eq!(
        client.engine().stats().replica_loads,
        1,
        "read from the replica"
    );
    client.drain_write_behind(Duration::from_secs(10)).unwrap();
    let before = client.engine().stats().replica_fenced;
    let now = client.get_user_profile(3000).unwrap().unwrap();
    assert_eq!(
        (now.plan.as_str(), now.version as u64),
        ("team", seq),
        "a pre-write row was read"
    );
    assert_eq!(client.engine().stats().replica_fenced, before + 1, "fenced");
    let on_the_replica: i64 = on_replica.query_opt(&version, &[]).unwrap().unwrap().get(0);
    assert!((on_the_replica as u64) < seq, "the replica was behind");
}

/// A Redis out of memory (`noeviction`) refuses the fence's `SET`, but
/// accepts the `DEL`: the write's invalidation still goes through (else the
/// old row would stay cached, and the relay would retry it for ever).
#[test]
fn a_full_redis_still_accepts_invalidations_with_a_replica() {
    let redis = common::servers::PrivateRedis::start();
    let mut config = test_config("replica_oom");
    config.redis_url = redis.url();
    config.invalidation_relay = false;
    // The shared database as its own "replica": no lag is needed here.
    config.replica_url = Some(config.database_url.clone());
    let fx = Fixture::with(config);
    let client = &fx.client;
    assert_eq!(client.get_user_profile(4).unwrap().unwrap().version, 1);
    redis.command(&["CONFIG", "SET", "maxmemory-policy", "noeviction"]);
    redis.command(&["CONFIG", "SET", "maxmemory", "1"]);
    assert!(
        redis.command(&["SET", "probe", "1"]).contains("OOM"),
        "Redis is full"
    );
    assert!(client.update_user_plan(4, "full").unwrap());
    assert_eq!(client.engine().stats().invalidations_failed, 0);
    assert_eq!(client.get_user_profile(4).unwrap().unwrap().plan, "full");
    redis.command(&["CONFIG", "SET", "maxmemory", "0"]);
}

/// `ping` is where a misconfigured server shows: a replica that does not
/// answer is named, though reads would only have gone to the primary.
#[test]
fn ping_names_a_replica_that_does_not_answer() {
    let mut config = test_config("replica_ping");
    config.replica_url = Some(format!(
        "postgres://postgres@127.0.0.1:{}/test",
        common::servers::free_port()
    ));
    let engine = CacheAside::open(&config).unwrap();
    let err = engine.ping().unwrap_err();
    assert!(
        err.to_string().starts_with("read replica: "),
        "{}",
        err.chain()
    );
    config.replica_url = Some(config.database_url.clone());
    CacheAside::open(&config).unwrap().ping().unwrap();
}
