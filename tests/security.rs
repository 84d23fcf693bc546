//! The library under a least-privilege Redis ACL, as the README's Security
//! section advises: a user fenced to its namespace's keys and channels,
//! without `@admin` or `@dangerous` commands, can use every feature, and
//! Redis refuses it anything outside its namespace.

mod common;

use std::sync::mpsc;
use std::time::{Duration, Instant};

use cacheaside::{Event, LocalCache};
use common::servers::PrivateRedis;
use common::{Fixture, PATIENCE, test_config};

#[test]
fn a_redis_user_fenced_to_its_namespace_can_use_every_feature() {
    let redis = PrivateRedis::start();
    let mut config = test_config("acl_fence");
    let ns = config.namespace.clone();
    let keys = format!("~{ns}*");
    let channels = format!("&{ns}{{*}}");
    redis.command(&[
        "ACL",
        "SETUSER",
        "app",
        "on",
        ">fence-pw-4711",
        &keys,
        &channels,
        // The near cache's tracker: invalidations, and its heartbeats.
        "&__redis__:invalidate",
        "&__cacheaside_near__:*",
        "+@all",
        "-@admin",
        "-@dangerous",
    ]);
    redis.command(&["ACL", "SETUSER", "default", "off"]);
    config.redis_url = format!("redis://app:fence-pw-4711@127.0.0.1:{}/", redis.port());
    config.local_cache = LocalCache::new(1000, Duration::from_secs(5));
    let fx = Fixture::with(config);
    let client = &fx.client;

    // Cache-aside, invalidation, write-through, and the near cache (whose
    // tracker subscribes to __redis__:invalidate).
    assert_eq!(client.get_user_profile(1).unwrap().unwrap().id, 1);
    assert!(client.update_user_plan(1, "pro").unwrap());
    assert_eq!(client.get_user_profile(1).unwrap().unwrap().plan, "pro");
    client.update_user_plan_write_through(2, "team").unwrap();
    assert_eq!(client.get_user_profile(2).unwrap().unwrap().plan, "team");
    let deadline = Instant::now() + PATIENCE;
    while client.engine().stats().local_hits == 0 && Instant::now() < deadline {
        client.get_user_profile(2).unwrap();
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(client.engine().stats().local_hits > 0, "L1 never served");

    // Write-behind: streams, consumer groups, the workers.
    client.start_write_behind(1).unwrap();
    client.update_user_plan_write_behind(3, "behind").unwrap();
    client.drain_write_behind(PATIENCE).unwrap();
    let row = client
        .db()
        .query_opt(
            &format!("SELECT plan FROM {} WHERE id = 3", fx.config.users_table),
            &[],
        )
        .unwrap()
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "behind");
    client.stop_write_behind();

    // Sessions and the rate limiter.
    let sessions = client.sessions();
    let id = sessions.create(&"alice").unwrap();
    assert_eq!(
        sessions.get::<String>(&id).unwrap().as_deref(),
        Some("alice")
    );
    assert!(sessions.delete(&id).unwrap());
    assert!(
        client
            .rate_limit("ip:1", 1, Duration::from_secs(60))
            .unwrap()
            .allowed
    );

    // Pub/sub: a channel and the `*` pattern, inside `&<namespace>{*}`.
    let events = client.events().unwrap();
    let (tx, rx) = mpsc::channel();
    let plain_tx = tx.clone();
    let _plain = events
        .subscribe(&["orders"], move |e| {
            if let Event::Message { channel, .. } = e {
                let _ = plain_tx.send(channel.to_owned());
            }
        })
        .unwrap();
    let _all = events
        .psubscribe(&["*"], move |e| {
            if let Event::Message { channel, .. } = e {
                let _ = tx.send(channel.to_owned());
            }
        })
        .unwrap();
    assert_eq!(events.publish("orders", "shipped").unwrap(), 2);
    for _ in 0..2 {
        assert_eq!(rx.recv_timeout(PATIENCE).unwrap(), "orders");
    }
    assert_eq!(client.engine().stats().breaker_opened, 0);

    // And the fence holds: another namespace's key and channel are refused.
    let other_key: Result<Option<String>, _> = client
        .cache()
        .with_connection(|c| redis::cmd("GET").arg("other:{user:1}").query(c));
    let err = other_key.unwrap_err();
    assert!(err.chain().contains("no permissions"), "{}", err.chain());
    let other_channel: Result<u64, _> = client.cache().with_connection(|c| {
        redis::cmd("PUBLISH")
            .arg("other:{orders}")
            .arg("x")
            .query(c)
    });
    assert!(other_channel.is_err());
}
