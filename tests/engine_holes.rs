//! The generic engine's bad-day paths that a review found open: each test
//! names what it guards, and runs on its own namespace (and, where it needs
//! a fault, through its own proxy to the shared Redis).

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cacheaside::{CacheAside, Config};
use common::proxy::{Fault, FaultProxy};
use common::{Fixture, PATIENCE, server_addr, test_config};

const TTL: Duration = Duration::from_secs(60);

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
        .get_or_load(key, TTL, || {
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

/// An engine on the shared servers with one background thread and an
/// XFetch β so large that every hit refreshes early.
fn eager_refresher(label: &str) -> CacheAside {
    let mut config = test_config(label);
    config.background_threads = 1;
    config.beta = 1e9;
    CacheAside::open(&config).unwrap()
}

#[test]
fn a_caller_whose_early_refresh_waits_in_the_queue_may_read_the_key_again() {
    let engine = eager_refresher("refresh_queued");
    let (release, blocked) = std::sync::mpsc::channel::<()>();
    let blocked = std::sync::Arc::new(parking_lot::Mutex::new(blocked));
    let blocker_loads = std::sync::Arc::new(AtomicU64::new(0));
    // The blocker's refresh occupies the one background thread until
    // released; its first load (a miss) returns at once.
    let blocker = |engine: &CacheAside| {
        let (blocked, loads) = (blocked.clone(), blocker_loads.clone());
        engine
            .get_or_load_owned("blocker", TTL, cacheaside::Mode::SingleFlight, move || {
                std::thread::sleep(Duration::from_millis(1)); // a load time for XFetch
                if loads.fetch_add(1, Ordering::SeqCst) > 0 {
                    let _ = blocked.lock().recv_timeout(PATIENCE);
                }
                Ok(Some((1_i64, 0)))
            })
            .unwrap()
    };
    let k = |engine: &CacheAside| {
        engine.get_or_load_owned("k", TTL, cacheaside::Mode::SingleFlight, || {
            std::thread::sleep(Duration::from_millis(1));
            Ok(Some((2_i64, 0)))
        })
    };
    assert_eq!(blocker(&engine), Some(1)); // miss: loaded
    assert_eq!(blocker(&engine), Some(1)); // hit: its refresh holds the pool
    let deadline = Instant::now() + PATIENCE;
    while blocker_loads.load(Ordering::SeqCst) < 2 {
        assert!(Instant::now() < deadline, "the blocker's refresh never ran");
        std::thread::yield_now();
    }
    assert_eq!(k(&engine).unwrap(), Some(2)); // miss: loaded
    assert_eq!(k(&engine).unwrap(), Some(2)); // hit: its refresh is queued
    engine.invalidate("k").unwrap();
    std::thread::scope(|s| {
        // Frees the pool once this thread waits on the queued refresh.
        s.spawn(|| {
            let deadline = Instant::now() + PATIENCE;
            while engine.flight_followers("k") == 0 && Instant::now() < deadline {
                std::thread::yield_now();
            }
            let _ = release.send(());
        });
        // The same thread reads the key again: a miss, which follows the
        // queued refresh (or loads), never "a loader read its own key".
        let again = k(&engine);
        let _ = release.send(());
        assert_eq!(again.unwrap(), Some(2));
    });
    let _ = engine.cache().delete_namespace();
}

/// Closed until opened: loads wait on it (at most [`Gate::MOST`], so that
/// a caller that should not have waited makes the test fail, not hang).
#[derive(Default)]
struct Gate {
    open: std::sync::Mutex<bool>,
    opened: std::sync::Condvar,
}

impl Gate {
    const MOST: Duration = Duration::from_secs(3);

    fn pass(&self) {
        let open = self.open.lock().unwrap();
        let _ = self
            .opened
            .wait_timeout_while(open, Gate::MOST, |open| !*open);
    }

    fn open(&self) {
        *self.open.lock().unwrap() = true;
        self.opened.notify_all();
    }
}

/// Occupies `engine`'s one background thread and fills its queue with
/// early refreshes whose loads wait on `gate` (held for writing by the
/// test); returns once the pool is full.
fn fill_the_background_pool(engine: &CacheAside, gate: &std::sync::Arc<Gate>) {
    let running = std::sync::Arc::new(AtomicU64::new(0));
    for i in 0..=64 {
        let key = format!("busy:{i}");
        let (gate, running, loads) = (gate.clone(), running.clone(), AtomicU64::new(0));
        let loads = std::sync::Arc::new(loads);
        for _ in 0..2 {
            // A miss that loads at once, then a hit whose refresh is queued.
            let (gate, running, loads) = (gate.clone(), running.clone(), loads.clone());
            let value: Option<i64> = engine
                .get_or_load_owned(&key, TTL, cacheaside::Mode::SingleFlight, move || {
                    std::thread::sleep(Duration::from_millis(1)); // a load time for XFetch
                    if loads.fetch_add(1, Ordering::SeqCst) > 0 {
                        running.fetch_add(1, Ordering::SeqCst);
                        gate.pass();
                    }
                    Ok(Some((1, 0)))
                })
                .unwrap();
            assert_eq!(value, Some(1));
        }
        if i == 0 {
            // The thread took the first refresh: the next 64 stay queued.
            let deadline = Instant::now() + PATIENCE;
            while running.load(Ordering::SeqCst) == 0 {
                assert!(Instant::now() < deadline, "the first refresh never ran");
                std::thread::yield_now();
            }
        }
    }
}

#[test]
fn a_full_background_pool_makes_no_caller_wait_for_a_load() {
    let mut config = test_config("pool_full");
    config.background_threads = 1;
    config.beta = 1e9;
    config.fail_safe_max = Duration::from_secs(60);
    config.soft_timeout = Duration::from_millis(100);
    let engine = CacheAside::open(&config).unwrap();
    let short = Duration::from_millis(50);
    let loads = std::sync::Arc::new(AtomicU64::new(0));
    let gate = std::sync::Arc::new(Gate::default());
    let read = |key: &str, ttl: Duration| {
        let (gate, loads) = (gate.clone(), loads.clone());
        engine.get_or_load_owned(key, ttl, cacheaside::Mode::SingleFlight, move || {
            std::thread::sleep(Duration::from_millis(1));
            loads.fetch_add(1, Ordering::SeqCst);
            if loads.load(Ordering::SeqCst) > 2 {
                gate.pass(); // every load after the first two waits
            }
            Ok(Some((2_i64, 0)))
        })
    };
    // Loaded before the gate closes: a fresh key, and one that will be
    // past its TTL with a fail-safe copy.
    assert_eq!(read("fresh", TTL).unwrap(), Some(2));
    assert_eq!(read("expiring", short).unwrap(), Some(2));
    fill_the_background_pool(&engine, &gate);
    std::thread::sleep(short * 2); // "expiring" is now past its TTL
    let before = loads.load(Ordering::SeqCst);
    // A hit whose early refresh cannot be queued: no load on this thread.
    assert_eq!(read("fresh", TTL).unwrap(), Some(2));
    // A reload past the soft timeout that cannot be queued: the copy, now.
    let started = Instant::now();
    assert_eq!(read("expiring", short).unwrap(), Some(2));
    assert!(started.elapsed() < Gate::MOST, "{:?}", started.elapsed());
    assert_eq!(
        loads.load(Ordering::SeqCst),
        before,
        "no load ran on the caller"
    );
    assert_eq!(engine.stats().stale_served, 1, "{:?}", engine.stats());
    gate.open();
    let _ = engine.cache().delete_namespace();
}

#[test]
fn a_relay_for_another_table_does_not_cover_a_failed_write_through() {
    let mut config = test_config("coverage");
    let proxy = FaultProxy::start(server_addr(&config.redis_url));
    config.redis_url = format!("redis://{}/", proxy.addr());
    config.cache_timeout = Duration::from_millis(200);
    // The lab: its users table is captured under "user:", and its relay runs.
    let fx = Fixture::with(config);
    let engine = fx.client.engine();
    assert!(engine.relay_running());
    proxy.set(Fault::Refuse);
    let writes = AtomicU64::new(0);
    let write = || {
        writes.fetch_add(1, Ordering::SeqCst);
        Ok(Some((1_i64, 1)))
    };
    // No captured table's prefix: Redis cannot take the writer, and no
    // relay will repair the key, so the write must not go ahead unnoticed.
    let outcome = engine.write_through("order:1", TTL, write);
    assert!(outcome.is_err(), "{outcome:?}");
    assert_eq!(writes.load(Ordering::SeqCst), 0, "nothing written");
    // A captured table's key: the relay repairs it, the write goes ahead.
    assert_eq!(engine.write_through("user:1", TTL, write).unwrap(), Some(1));
    assert_eq!(writes.load(Ordering::SeqCst), 1);
    proxy.set(Fault::Pass);
}
