//! The generic engine's bad-day paths that a review found open: each test
//! names what it guards, and runs on its own namespace (and, where it needs
//! a fault, through its own proxy to the shared Redis).

mod common;

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cacheaside::{CacheAside, Config};
use common::proxy::{Fault, FaultProxy};
use common::{PATIENCE, test_config};

const TTL: Duration = Duration::from_secs(60);

/// `host:port` of a URL like `scheme://user@host:port/db`.
fn server_addr(url: &str) -> SocketAddr {
    let rest = url.split("://").nth(1).expect("a URL");
    let host_port = rest.rsplit('@').next().unwrap().split('/').next().unwrap();
    host_port
        .to_socket_addrs()
        .unwrap()
        .find(SocketAddr::is_ipv4)
        .expect("an IPv4 address")
}

/// A generic engine (no lab, no relay started) whose Redis is reached
/// through a fault proxy, with the relay setting left at its default (on).
fn engine_through_proxy(label: &str) -> (FaultProxy, CacheAside) {
    let mut config: Config = test_config(label);
    let proxy = FaultProxy::start(server_addr(&config.redis_url));
    config.redis_url = format!("redis://{}/", proxy.addr());
    config.cache_timeout = Duration::from_millis(200);
    config.breaker_cool_off = Duration::from_millis(200);
    assert!(config.invalidation_relay, "the default this test is about");
    (proxy, CacheAside::open(&config).unwrap())
}

/// Reads `key` through a loader that counts its calls into `loads`.
fn read(engine: &CacheAside, key: &str, loads: &AtomicU64) -> Option<i64> {
    engine
        .get_or_load_singleflight(key, TTL, || {
            loads.fetch_add(1, Ordering::SeqCst);
            Ok(Some(7_i64))
        })
        .unwrap()
}

/// Reads (each one may be the probe) until the breaker has closed, or
/// fails the test after [`PATIENCE`].
fn until_closed(engine: &CacheAside, loads: &AtomicU64) {
    let deadline = Instant::now() + PATIENCE;
    while engine.breaker_open() {
        assert!(
            Instant::now() < deadline,
            "the breaker never closed: {:?}",
            engine.stats()
        );
        assert_eq!(read(engine, "probe", loads), Some(7));
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Redis refused until the breaker opens, then back: the breaker closes,
/// and a read fills and the next one hits.
fn outage_then_hits(engine: &CacheAside, proxy: &FaultProxy) {
    let loads = AtomicU64::new(0);
    proxy.set(Fault::Refuse);
    for _ in 0..3 {
        assert_eq!(read(engine, "k", &loads), Some(7));
    }
    assert!(engine.breaker_open(), "{:?}", engine.stats());
    proxy.set(Fault::Pass);
    until_closed(engine, &loads);
    assert_eq!(read(engine, "k", &loads), Some(7));
    let before = (loads.load(Ordering::SeqCst), engine.stats().hits);
    for _ in 0..50 {
        assert_eq!(read(engine, "k", &loads), Some(7));
    }
    assert_eq!(loads.load(Ordering::SeqCst), before.0, "every read hit");
    assert_eq!(engine.stats().hits, before.1 + 50);
    let _ = engine.cache().delete_namespace();
}

#[test]
fn a_breaker_with_no_relay_running_closes_after_the_outage() {
    let (proxy, engine) = engine_through_proxy("breaker_no_relay");
    assert!(!engine.relay_running());
    outage_then_hits(&engine, &proxy);
}

#[test]
fn a_breaker_closes_after_the_relay_was_stopped() {
    let (proxy, engine) = engine_through_proxy("breaker_stopped_relay");
    engine.start_relay();
    assert!(engine.relay_running());
    engine.stop_relay();
    outage_then_hits(&engine, &proxy);
}
