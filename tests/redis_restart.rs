//! Redis losing what it acknowledged: a restart from an older snapshot, a
//! failover to a replica that lagged. The invalidations Redis accepted are
//! gone, and the pre-write rows are back; no read may return them.
//!
//! Each test runs its own Redis (with a snapshot to restart from) on a free
//! loopback port, and its own table and namespace on the shared Postgres.

mod common;

use std::time::{Duration, Instant};

use cacheaside::Client;
use common::proxy::FaultProxy;
use common::servers::PrivateRedis;
use common::{Fixture, PATIENCE, test_config};

/// A fixture whose Redis is `redis`, with a short breaker cool-off.
fn fixture_on(redis: &PrivateRedis, label: &str) -> Fixture {
    let mut config = test_config(label);
    config.redis_url = redis.url();
    config.breaker_cool_off = Duration::from_millis(200);
    Fixture::with(config)
}

/// Reads users 1 and 2 for `window` from `reader`; returns (reads, reads of
/// a pre-write row, hits during the last second), failing on any error.
fn read_for(reader: &Client, window: Duration) -> (u64, u64, u64) {
    let (mut reads, mut stale) = (0, 0);
    let started = Instant::now();
    let mut hits_at_last_second = None;
    while started.elapsed() < window {
        if hits_at_last_second.is_none() && started.elapsed() >= window - Duration::from_secs(1) {
            hits_at_last_second = Some(reader.engine().stats().hits);
        }
        for (id, new) in [(1, "after-update"), (2, "after-sql")] {
            let profile = reader.get_user_profile(id).unwrap().unwrap();
            reads += 1;
            if profile.plan != new {
                stale += 1;
            }
        }
    }
    let hits = reader.engine().stats().hits - hits_at_last_second.unwrap_or(0);
    (reads, stale, hits)
}

/// A library write (user 1) and a direct SQL write (user 2): the relay
/// applies both (Redis acknowledges the invalidations), and the new rows
/// are read back (and cached).
fn write_and_read_back(fx: &Fixture) {
    let client = &fx.client;
    assert!(client.update_user_plan(1, "after-update").unwrap());
    fx.set_plan_directly(2, "after-sql");
    assert!(client.engine().sync_relay(PATIENCE));
    assert_eq!(
        client.get_user_profile(1).unwrap().unwrap().plan,
        "after-update"
    );
    assert_eq!(
        client.get_user_profile(2).unwrap().unwrap().plan,
        "after-sql"
    );
}

#[test]
fn a_restart_from_an_older_snapshot_serves_no_pre_write_row() {
    let mut redis = PrivateRedis::start();
    let fx = fixture_on(&redis, "restart_snapshot");
    let client = &fx.client;
    for id in 1..=2 {
        client.get_user_profile(id).unwrap().unwrap(); // cached
    }
    // The snapshot holds the pre-write rows.
    assert_eq!(redis.command(&["SAVE"]).trim(), "OK");
    write_and_read_back(&fx);

    redis.restart(); // SIGKILL, then up again from the snapshot
    let restored = redis.command(&["EXISTS", &client.cache().redis_key("user:1")]);
    assert_eq!(
        restored.trim(),
        "1",
        "the snapshot brought the old entry back"
    );

    let (reads, stale, hits) = read_for(client, Duration::from_secs(4));
    assert_eq!(
        stale, 0,
        "{stale} of {reads} reads returned a pre-write row"
    );
    assert!(hits > 0, "hits resume: {:?}", client.engine().stats());
}

#[test]
fn a_failover_to_a_replica_that_lagged_serves_no_pre_write_row() {
    let master = PrivateRedis::start();
    let replica =
        PrivateRedis::start_with(&["--replicaof", "127.0.0.1", &master.port().to_string()]);
    // The clients reach "the master" through one address, as behind a
    // virtual IP or a DNS name that a failover moves.
    let proxy = FaultProxy::start(master.addr());
    let mut config = test_config("failover_lagged");
    config.redis_url = format!("redis://{}/", proxy.addr());
    config.breaker_cool_off = Duration::from_millis(200);
    let fx = Fixture::with(config);
    let client = &fx.client;
    for id in 1..=2 {
        client.get_user_profile(id).unwrap().unwrap(); // cached
    }
    // The replica has the cached rows, then stops receiving (frozen, and
    // its link cut, so nothing in flight reaches it when it thaws).
    assert_eq!(master.command(&["WAIT", "1", "5000"]).trim(), "1");
    replica.freeze();
    master.command(&["CLIENT", "KILL", "TYPE", "replica"]);
    write_and_read_back(&fx);

    // The master dies; the replica, which never saw the invalidations, is
    // promoted and takes the address.
    let mut master = master;
    master.kill();
    replica.thaw();
    assert_eq!(replica.command(&["REPLICAOF", "NO", "ONE"]).trim(), "OK");
    proxy.set_upstream(replica.addr());
    proxy.close_all();
    let key = client.cache().redis_key("user:1");
    assert_eq!(
        replica.command(&["EXISTS", &key]).trim(),
        "1",
        "the replica lagged"
    );

    let (reads, stale, hits) = read_for(client, Duration::from_secs(4));
    assert_eq!(
        stale, 0,
        "{stale} of {reads} reads returned a pre-write row"
    );
    assert!(hits > 0, "hits resume: {:?}", client.engine().stats());
}
