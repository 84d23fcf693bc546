//! Sharded pub/sub on a 3-master Redis Cluster of our own (free loopback
//! ports; a node of it is restarted and a slot moved, so it is not shared
//! with other tests): `SPUBLISH` reaches the subscribers of the channel's
//! slot, in order per channel, and a restarted node or a moved slot is
//! reported as a gap, after which messages flow again.

mod common;

use std::sync::mpsc;
use std::time::{Duration, Instant};

use cacheaside::{ErrorKind, Event};
use common::servers::{PrivateCluster, PrivateRedis};
use common::{Fixture, PATIENCE, test_config};

#[derive(Debug, PartialEq)]
enum Got {
    Message(String, String),
    Gap,
}

/// The last line of a `redis-cli` reply (`PUBSUB SHARDNUMSUB ch` prints
/// the channel, then the count).
fn count_in(reply: &str) -> u64 {
    reply
        .lines()
        .last()
        .unwrap_or("")
        .trim()
        .parse()
        .unwrap_or(0)
}

/// Sharded subscribers of `channel` (a full Redis channel name) on `node`.
fn shard_subscribers(node: &PrivateRedis, channel: &str) -> u64 {
    count_in(&node.command(&["PUBSUB", "SHARDNUMSUB", channel]))
}

/// Waits for the next event, skipping nothing.
fn next(rx: &mpsc::Receiver<Got>) -> Got {
    rx.recv_timeout(PATIENCE).expect("an event within PATIENCE")
}

/// Publishes `payload` until a subscriber receives it (right after a
/// restart the cluster may refuse a publish for a moment); returns the
/// first reply count that was not an error.
fn publish_until_delivered(events: &cacheaside::Events, channel: &str, payload: &str) -> u64 {
    let deadline = Instant::now() + PATIENCE;
    loop {
        match events.publish(channel, payload) {
            Ok(n) if n >= 1 => return n,
            Ok(_) | Err(_) => {
                assert!(Instant::now() < deadline, "{channel} never delivered");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

#[test]
fn sharded_events_keep_order_per_channel_and_report_a_restart_and_a_moved_slot_as_gaps() {
    let mut cluster = PrivateCluster::start();
    let mut config = test_config("cl_sharded");
    config.redis_url = cluster.url();
    let fx = Fixture::with(config);
    let ns = fx.config.namespace.clone();
    let events = fx.client.events().unwrap();
    let channels = ["orders", "payments", "invoices"];
    let full = |c: &str| format!("{ns}{{{c}}}");
    let slot = |cluster: &PrivateCluster, c: &str| -> u16 {
        cluster.nodes[0]
            .command(&["CLUSTER", "KEYSLOT", &full(c)])
            .parse()
            .unwrap()
    };
    let owner_port = |cluster: &PrivateCluster, c: &str| cluster.owner_of(slot(cluster, c)).port();

    // Patterns do not exist in sharded pub/sub.
    let err = events.psubscribe(&["*"], |_| {}).err().unwrap();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);

    let (tx, rx) = mpsc::channel();
    let subscription = events
        .subscribe(&channels, move |event| {
            let got = match event {
                Event::Message {
                    channel, payload, ..
                } => Got::Message(
                    channel.to_owned(),
                    String::from_utf8_lossy(payload).into_owned(),
                ),
                Event::Gap { .. } => Got::Gap,
                _ => return,
            };
            let _ = tx.send(got);
        })
        .unwrap();
    // Each channel has one sharded subscriber, on its slot's master, and no
    // classic one anywhere.
    for c in channels {
        let owner = cluster.owner_of(slot(&cluster, c));
        assert_eq!(shard_subscribers(owner, &full(c)), 1, "{c}");
        for node in &cluster.nodes {
            assert_eq!(count_in(&node.command(&["PUBSUB", "NUMSUB", &full(c)])), 0);
        }
    }

    // Order per channel: interleaved publishes, each received once, in
    // order within its channel.
    const EACH: usize = 100;
    for i in 0..EACH {
        for c in channels {
            assert_eq!(events.publish(c, format!("{i}")).unwrap(), 1, "{c} {i}");
        }
    }
    let mut seen = [0_usize; 3];
    for _ in 0..EACH * channels.len() {
        let Got::Message(channel, payload) = next(&rx) else {
            panic!("a gap while nothing broke");
        };
        let at = channels.iter().position(|c| *c == channel).unwrap();
        assert_eq!(payload, seen[at].to_string(), "{channel} out of order");
        seen[at] += 1;
    }
    assert_eq!(seen, [EACH; 3]);

    // A restart of the node serving "orders": reported as a gap, and what
    // is published after the gap arrives.
    let orders_port = owner_port(&cluster, "orders");
    let node = cluster
        .nodes
        .iter_mut()
        .find(|n| n.port() == orders_port)
        .unwrap();
    node.restart();
    assert_eq!(next(&rx), Got::Gap, "the restart is reported");
    assert_eq!(
        publish_until_delivered(&events, "orders", "after-restart"),
        1
    );
    assert_eq!(
        next(&rx),
        Got::Message("orders".into(), "after-restart".into())
    );

    // "payments" moves to another master: the old one unsubscribes us
    // (sunsubscribe), reported as a gap; we follow the slot.
    let payments = slot(&cluster, "payments");
    let from_port = owner_port(&cluster, "payments");
    let from = cluster
        .nodes
        .iter()
        .find(|n| n.port() == from_port)
        .unwrap();
    let to = cluster
        .nodes
        .iter()
        .find(|n| n.port() != from_port && n.port() != orders_port)
        .unwrap_or_else(|| {
            cluster
                .nodes
                .iter()
                .find(|n| n.port() != from_port)
                .unwrap()
        });
    let (from_id, to_id) = (
        from.command(&["CLUSTER", "MYID"]),
        to.command(&["CLUSTER", "MYID"]),
    );
    let s = payments.to_string();
    assert_eq!(
        to.command(&["CLUSTER", "SETSLOT", &s, "IMPORTING", &from_id]),
        "OK"
    );
    assert_eq!(
        from.command(&["CLUSTER", "SETSLOT", &s, "MIGRATING", &to_id]),
        "OK"
    );
    for node in [to, from] {
        assert_eq!(
            node.command(&["CLUSTER", "SETSLOT", &s, "NODE", &to_id]),
            "OK"
        );
    }
    for node in cluster
        .nodes
        .iter()
        .filter(|n| n.port() != from_port && n.port() != to.port())
    {
        assert_eq!(
            node.command(&["CLUSTER", "SETSLOT", &s, "NODE", &to_id]),
            "OK"
        );
    }
    assert_eq!(next(&rx), Got::Gap, "the moved slot is reported");
    assert_eq!(
        publish_until_delivered(&events, "payments", "after-move"),
        1
    );
    assert_eq!(
        next(&rx),
        Got::Message("payments".into(), "after-move".into())
    );
    assert_eq!(shard_subscribers(to, &full("payments")), 1);
    assert_eq!(shard_subscribers(from, &full("payments")), 0);

    // Dropped: nobody hears a publish any more.
    drop(subscription);
    for c in channels {
        assert_eq!(events.publish(c, "late").unwrap(), 0, "{c}");
    }
}
