//! Pub/sub against the real Redis: ordered delivery to every subscriber,
//! reconnection with a gap notice after the connection is killed, and
//! subscriptions dropped from their own callback.

mod common;

use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cacheaside::{Config, ErrorKind, Event, Events, Subscription};
use common::{Fixture, PATIENCE};

/// An event, owned, so it can leave the callback.
#[derive(Debug, Clone, PartialEq)]
enum Got {
    Message(String, Vec<u8>),
    Gap(String),
}

fn own(event: Event<'_>) -> Got {
    match event {
        Event::Message {
            channel, payload, ..
        } => Got::Message(channel.to_owned(), payload.to_vec()),
        Event::Gap { cause, .. } => Got::Gap(cause.chain()),
        other => panic!("unexpected event {other:?}"),
    }
}

/// A subscription whose events arrive on a channel.
fn subscribe(events: &Events, channels: &[&str]) -> (Subscription, Receiver<Got>) {
    let (tx, rx) = mpsc::channel();
    let sub = events
        .subscribe(channels, move |event| {
            let _ = tx.send(own(event));
        })
        .unwrap();
    (sub, rx)
}

fn next(rx: &Receiver<Got>) -> Got {
    rx.recv_timeout(PATIENCE)
        .expect("an event within the patience")
}

#[test]
fn two_subscribers_receive_every_message_of_a_burst_in_order() {
    let fx = Fixture::new("ev_burst");
    let events = fx.client.events().unwrap();
    let (plain, plain_rx) = subscribe(&events, &["orders"]);
    let (tx, pattern_rx) = mpsc::channel();
    let pattern = events
        .psubscribe(&["ord*"], move |event| {
            let _ = tx.send(own(event));
        })
        .unwrap();
    let burst = 2000;
    for i in 0..burst {
        // Both are subscribed once subscribe returned: every message reaches 2.
        assert_eq!(events.publish("orders", format!("m{i}")).unwrap(), 2);
    }
    for rx in [&plain_rx, &pattern_rx] {
        for i in 0..burst {
            assert_eq!(
                next(rx),
                Got::Message("orders".into(), format!("m{i}").into_bytes())
            );
        }
    }
    // Another namespace's channel of the same name is someone else's.
    let mut other = Config::from_env();
    other.namespace = format!("{}other:", fx.config.namespace);
    let other_cache = cacheaside::Cache::connect(&other).unwrap();
    let other_events = Events::new(&other_cache, &other).unwrap();
    assert_eq!(other_events.publish("orders", "not yours").unwrap(), 0);
    drop((plain, pattern));
    assert!(plain_rx.try_recv().is_err() && pattern_rx.try_recv().is_err());
    assert_eq!(
        events.publish("orders", "after").unwrap(),
        0,
        "dropping unsubscribed"
    );
}

#[test]
fn payloads_are_bytes() {
    let fx = Fixture::new("ev_bytes");
    let events = fx.client.events().unwrap();
    let (_sub, rx) = subscribe(&events, &["bin", "empty"]);
    let payload = [0u8, 255, 10, 0];
    assert_eq!(events.publish("bin", payload).unwrap(), 1);
    assert_eq!(events.publish("empty", b"").unwrap(), 1);
    assert_eq!(next(&rx), Got::Message("bin".into(), payload.to_vec()));
    assert_eq!(next(&rx), Got::Message("empty".into(), Vec::new()));
}

/// The Redis client id of the connection named `name` (ours alone: the name
/// is unique per subscription).
fn client_id(fx: &Fixture, name: &str) -> Option<u64> {
    let list: String = fx
        .client
        .cache()
        .with_connection(|c| redis::cmd("CLIENT").arg("LIST").query(c))
        .unwrap();
    list.lines()
        .find(|line| line.split(' ').any(|field| field == format!("name={name}")))
        .and_then(|line| {
            line.split(' ')
                .find_map(|field| field.strip_prefix("id="))
                .and_then(|id| id.parse().ok())
        })
}

#[test]
fn a_killed_subscriber_reconnects_reports_the_gap_and_receives_later_messages() {
    let fx = Fixture::new("ev_kill");
    let events = fx.client.events().unwrap();
    let (sub, rx) = subscribe(&events, &["news"]);
    assert_eq!(events.publish("news", "before").unwrap(), 1);
    assert_eq!(next(&rx), Got::Message("news".into(), b"before".to_vec()));

    let killed = client_id(&fx, sub.connection_name()).expect("the subscriber is connected");
    let n: u64 = fx
        .client
        .cache()
        .with_connection(|c| {
            redis::cmd("CLIENT")
                .arg("KILL")
                .arg("ID")
                .arg(killed)
                .query(c)
        })
        .unwrap();
    assert_eq!(n, 1, "killed our own subscriber's connection");

    // Published while it may be away: it may or may not arrive (at most
    // once), but whatever happens the subscriber learns of the gap.
    let _ = events.publish("news", "during").unwrap();
    let gap = loop {
        match next(&rx) {
            Got::Gap(cause) => break cause,
            Got::Message(_, payload) => assert_eq!(payload, b"during"),
        }
    };
    eprintln!("gap reported: {gap}");
    let reconnected = client_id(&fx, sub.connection_name()).expect("connected again");
    assert_ne!(reconnected, killed, "a new connection");

    // The gap is reported after resubscribing: what is published now
    // arrives, with no retry needed.
    assert_eq!(events.publish("news", "after").unwrap(), 1);
    assert_eq!(next(&rx), Got::Message("news".into(), b"after".to_vec()));
    drop(sub);
    assert_eq!(events.publish("news", "gone").unwrap(), 0);
}

#[test]
fn dropping_a_subscription_from_its_own_callback_is_safe() {
    let fx = Fixture::new("ev_self_drop");
    let events = fx.client.events().unwrap();
    let slot: Arc<Mutex<Option<Subscription>>> = Arc::new(Mutex::new(None));
    let calls = Arc::new(Mutex::new(0));
    let (done_tx, done_rx): (Sender<()>, Receiver<()>) = mpsc::channel();
    let sub = events
        .subscribe(&["once"], {
            let slot = Arc::clone(&slot);
            let calls = Arc::clone(&calls);
            move |_event| {
                *calls.lock().unwrap() += 1;
                // Drops the subscription on its own thread: it must detach,
                // not join itself (which would deadlock or panic).
                drop(slot.lock().unwrap().take());
                let _ = done_tx.send(());
            }
        })
        .unwrap();
    let name = sub.connection_name().to_owned();
    *slot.lock().unwrap() = Some(sub);
    assert_eq!(events.publish("once", "first").unwrap(), 1);
    done_rx.recv_timeout(PATIENCE).expect("the callback ran");
    // The thread ends after the callback returns, and its connection goes.
    let deadline = Instant::now() + PATIENCE;
    while client_id(&fx, &name).is_some() {
        assert!(
            Instant::now() < deadline,
            "the subscription's connection lingers"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(events.publish("once", "second").unwrap(), 0);
    assert_eq!(
        *calls.lock().unwrap(),
        1,
        "the callback in progress was the last"
    );
}

#[test]
fn dropping_a_subscription_elsewhere_waits_for_its_callback() {
    let fx = Fixture::new("ev_drop_wait");
    let events = fx.client.events().unwrap();
    let (entered_tx, entered_rx) = mpsc::channel();
    let finished = Arc::new(Mutex::new(false));
    let sub = events
        .subscribe(&["slow"], {
            let finished = Arc::clone(&finished);
            move |_event| {
                let _ = entered_tx.send(());
                // A slow consumer; drop must wait for it to return.
                std::thread::sleep(Duration::from_millis(200));
                *finished.lock().unwrap() = true;
            }
        })
        .unwrap();
    assert_eq!(events.publish("slow", "x").unwrap(), 1);
    entered_rx.recv_timeout(PATIENCE).unwrap();
    drop(sub);
    assert!(
        *finished.lock().unwrap(),
        "drop returned while the callback ran"
    );
    assert_eq!(events.publish("slow", "y").unwrap(), 0);
}

#[test]
fn a_subscriber_that_cannot_connect_fails_at_once() {
    let fx = Fixture::new("ev_unreachable");
    let mut config = fx.config.clone();
    // Nothing listens on port 1 of the loopback address.
    config.redis_url = "redis://127.0.0.1:1/".into();
    let events = Events::new(fx.client.cache(), &config).unwrap();
    let started = Instant::now();
    let err = events.subscribe(&["x"], |_| {}).err().unwrap();
    assert!(
        matches!(err.kind(), ErrorKind::Cache | ErrorKind::Timeout),
        "{err:?}"
    );
    assert!(started.elapsed() < PATIENCE);
    let mut bad = fx.config.clone();
    bad.redis_url = "not a url".into();
    let err = Events::new(fx.client.cache(), &bad).err().unwrap();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
}

#[test]
fn bad_channels_are_invalid() {
    let fx = Fixture::new("ev_bad");
    let events = fx.client.events().unwrap();
    let long = "c".repeat(513);
    for bad in ["", "a{b", "a}b", "new\nline", long.as_str()] {
        let err = events.publish(bad, "x").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument, "publish {bad:?}");
        let err = events.subscribe(&[bad], |_| {}).err().unwrap();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument, "subscribe {bad:?}");
        let err = events.psubscribe(&["ok", bad], |_| {}).err().unwrap();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument, "psubscribe {bad:?}");
    }
    let err = events.subscribe(&[], |_| {}).err().unwrap();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
}

#[test]
fn patterns_match_within_the_namespace_only() {
    let fx = Fixture::new("ev_glob");
    let events = fx.client.events().unwrap();
    let (tx, rx) = mpsc::channel();
    let _sub = events
        .psubscribe(&["user:*:login"], move |event| {
            let _ = tx.send(own(event));
        })
        .unwrap();
    assert_eq!(events.publish("user:7:login", "a").unwrap(), 1);
    assert_eq!(events.publish("user:7:logout", "b").unwrap(), 0);
    assert_eq!(
        next(&rx),
        Got::Message("user:7:login".into(), b"a".to_vec())
    );
    // The same channel name without our namespace does not match.
    let raw: u64 = fx
        .client
        .cache()
        .with_connection(|c| redis::cmd("PUBLISH").arg("user:7:login").arg("c").query(c))
        .unwrap();
    assert_eq!(raw, 0);
}

/// Events of `namespace`, on the fixture's servers.
fn events_in(fx: &Fixture, namespace: &str) -> Events {
    let mut config = fx.config.clone();
    config.namespace = namespace.to_owned();
    let cache = cacheaside::Cache::connect(&config).unwrap();
    Events::new(&cache, &config).unwrap()
}

#[test]
fn namespaces_sharing_a_prefix_do_not_hear_each_other() {
    let fx = Fixture::new("ev_fence");
    // `app:` and `app:v2:`: one namespace's text starts with the other's.
    let app = fx.client.events().unwrap();
    let v2 = events_in(&fx, &format!("{}v2:", fx.config.namespace));
    let everything = events_in(&fx, "");
    let (tx, app_rx) = mpsc::channel();
    let _app_all = app
        .psubscribe(&["*"], move |event| {
            let _ = tx.send(own(event));
        })
        .unwrap();
    let (_v2_orders, v2_rx) = subscribe(&v2, &["orders"]);
    let (tx, empty_rx) = mpsc::channel();
    let _empty_all = everything
        .psubscribe(&["*"], move |event| {
            let _ = tx.send(own(event));
        })
        .unwrap();
    // `v2:orders` in `app:` is app's own channel: only app's `*` hears it.
    assert_eq!(app.publish("v2:orders", "from app").unwrap(), 1);
    // `orders` in `app:v2:` reaches v2's subscriber alone.
    assert_eq!(v2.publish("orders", "from v2").unwrap(), 1);
    assert_eq!(
        next(&app_rx),
        Got::Message("v2:orders".into(), b"from app".to_vec())
    );
    assert_eq!(
        next(&v2_rx),
        Got::Message("orders".into(), b"from v2".to_vec())
    );
    // The empty namespace's `*` hears its own channels only.
    assert_eq!(everything.publish("news", "mine").unwrap(), 1);
    assert_eq!(
        next(&empty_rx),
        Got::Message("news".into(), b"mine".to_vec())
    );
    assert!(app_rx.try_recv().is_err(), "app heard another namespace");
    assert!(v2_rx.try_recv().is_err(), "v2 heard another namespace");
}

/// A fake Redis that answers the subscriber's handshake, then sends one
/// message in two halves, 300 ms apart: longer than the subscriber's read
/// timeout, so its read times out in the middle of the message.
fn serve_a_split_message(listener: std::net::TcpListener, channel: String) {
    use std::io::{BufRead, BufReader, Write};
    let (stream, _) = listener.accept().unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut out = stream;
    // Reads one command (a RESP array of bulk strings).
    let mut command = || -> Vec<String> {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        let n: usize = line.trim_start_matches('*').trim().parse().unwrap();
        (0..n)
            .map(|_| {
                let mut len = String::new();
                reader.read_line(&mut len).unwrap();
                let mut arg = String::new();
                reader.read_line(&mut arg).unwrap();
                arg.trim_end().to_owned()
            })
            .collect()
    };
    loop {
        let args = command();
        if args[0].eq_ignore_ascii_case("SUBSCRIBE") {
            let reply = format!(
                "*3\r\n$9\r\nsubscribe\r\n${}\r\n{}\r\n:1\r\n",
                args[1].len(),
                args[1]
            );
            out.write_all(reply.as_bytes()).unwrap();
            break;
        }
        out.write_all(b"+OK\r\n").unwrap();
    }
    let message = format!(
        "*3\r\n$7\r\nmessage\r\n${}\r\n{channel}\r\n$11\r\nhello world\r\n",
        channel.len()
    );
    let (first, second) = message.split_at(message.len() - 9);
    out.write_all(first.as_bytes()).unwrap();
    out.flush().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    out.write_all(second.as_bytes()).unwrap();
    // Keep the connection open until the subscriber hangs up.
    let mut rest = Vec::new();
    let _ = std::io::Read::read_to_end(&mut out, &mut rest);
}

#[test]
fn a_message_split_across_read_timeouts_arrives_whole() {
    let fx = Fixture::new("ev_split");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut config = fx.config.clone();
    config.redis_url = format!("redis://{}/", listener.local_addr().unwrap());
    // The fake server does not confirm the unsubscribe that drop sends.
    config.cache_timeout = Duration::from_millis(500);
    let channel = format!("{}{{split}}", fx.config.namespace);
    let server = std::thread::spawn(move || serve_a_split_message(listener, channel));
    let events = Events::new(fx.client.cache(), &config).unwrap();
    let (tx, rx) = mpsc::channel();
    let sub = events
        .subscribe(&["split"], move |event| {
            let _ = tx.send(own(event));
        })
        .unwrap();
    assert_eq!(
        next(&rx),
        Got::Message("split".into(), b"hello world".to_vec())
    );
    drop(sub);
    server.join().unwrap();
}
