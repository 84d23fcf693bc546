//! The generic engine as a new user meets it: cheap handles, the names of
//! the reads, versioned values, the loader's own error, the builder. Each
//! test runs on its own namespace (and table, when it needs one).

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use cacheaside::{CacheAside, Config, Mode, Versioned};
use common::test_config;

const TTL: Duration = Duration::from_secs(60);

/// An engine on a namespace of its own, deleted when it drops.
struct Space {
    engine: CacheAside,
}

impl Space {
    fn new(label: &str) -> Space {
        Space::with(test_config(label))
    }

    fn with(config: Config) -> Space {
        Space {
            engine: CacheAside::open(&config).expect("open (are the services up?)"),
        }
    }
}

impl Drop for Space {
    fn drop(&mut self) {
        let _ = self.engine.cache().delete_namespace();
    }
}

#[test]
fn clones_share_one_engine() {
    let space = Space::new("clones");
    let loads = AtomicU64::new(0);
    let load = || {
        loads.fetch_add(1, Ordering::SeqCst);
        Ok(Some(7_i64))
    };
    let copy = space.engine.clone();
    assert_eq!(copy.get_or_load("k", TTL, load).unwrap(), Some(7));
    // The clone filled it: the original hits, and sees the clone's stats.
    let queries = space.engine.db().query_count();
    let elsewhere = std::thread::spawn(move || {
        let v: Option<i64> = copy
            .get_or_load("k", TTL, || unreachable!("cached"))
            .unwrap();
        (v, copy.stats().hits)
    });
    assert_eq!(elsewhere.join().unwrap(), (Some(7), 1));
    let v: Option<i64> = space
        .engine
        .get_or_load("k", TTL, || unreachable!("cached"))
        .unwrap();
    assert_eq!(v, Some(7));
    assert_eq!(loads.load(Ordering::SeqCst), 1);
    assert_eq!(space.engine.stats().hits, 2);
    assert_eq!(space.engine.db().query_count(), queries);
}

#[test]
fn a_relay_outlives_a_dropped_clone() {
    let space = Space::new("clone_relay");
    let copy = space.engine.clone();
    copy.start_relay();
    assert!(space.engine.relay_running());
    drop(copy);
    assert!(
        space.engine.relay_running(),
        "the relay stops with the last clone only"
    );
}

#[test]
fn a_client_clone_reads_what_the_original_cached() {
    let fx = common::Fixture::new("client_clone");
    let copy = fx.client.clone();
    let ada = fx.client.get_user_profile(1).unwrap().expect("seeded");
    let before = fx.queries();
    let from_thread = std::thread::spawn(move || copy.get_user_profile(1).unwrap());
    assert_eq!(from_thread.join().unwrap(), Some(ada));
    assert_eq!(fx.queries(), before, "the clone hit the original's entry");
}

/// `threads` readers released together on a cold key: how many loads ran.
/// Each load waits until every reader has entered its call, so readers that
/// are not coalesced all load.
fn loads_of_a_stampede(engine: &CacheAside, coalesced: bool) -> usize {
    let threads = 16;
    let barrier = std::sync::Barrier::new(threads);
    let entered = AtomicU64::new(0);
    let loads = AtomicU64::new(0);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                barrier.wait();
                entered.fetch_add(1, Ordering::SeqCst);
                let load = || {
                    loads.fetch_add(1, Ordering::SeqCst);
                    while entered.load(Ordering::SeqCst) < threads as u64 {
                        std::thread::yield_now();
                    }
                    // Widens the window in which an uncoalesced reader
                    // would load too; the coalesced count is 1 regardless.
                    std::thread::sleep(Duration::from_millis(50));
                    Ok(Some(5_i64))
                };
                let got = if coalesced {
                    engine.get_or_load("cold", TTL, load)
                } else {
                    engine.get_or_load_uncoalesced("cold", TTL, load)
                };
                assert_eq!(got.unwrap(), Some(5));
            });
        }
    });
    assert_eq!(engine.in_flight(), 0);
    loads.load(Ordering::SeqCst) as usize
}

#[test]
fn get_or_load_coalesces_concurrent_misses() {
    let space = Space::new("coalesced");
    assert_eq!(loads_of_a_stampede(&space.engine, true), 1);
}

#[test]
fn get_or_load_uncoalesced_loads_per_caller() {
    let space = Space::new("uncoalesced");
    assert_eq!(loads_of_a_stampede(&space.engine, false), 16);
}

#[test]
fn an_older_versioned_write_does_not_replace_a_newer_one() {
    let space = Space::new("versioned");
    let engine = &space.engine;
    let read = || -> Option<String> {
        engine
            .get_or_load_versioned("p", TTL, Mode::SingleFlight, || {
                Ok(Some(Versioned::new("loaded".to_owned(), 1)))
            })
            .unwrap()
    };
    let five = engine
        .write_through("p", TTL, || Ok(Some(Versioned::new("five".to_owned(), 5))))
        .unwrap();
    assert_eq!(five.as_deref(), Some("five"));
    // A write-through that committed earlier (version 3) but reaches the
    // cache later: the cache keeps version 5.
    engine
        .write_through("p", TTL, || Ok(Some(Versioned::new("three".to_owned(), 3))))
        .unwrap();
    assert_eq!(read().as_deref(), Some("five"));
    // The tuple form of older code still converts.
    engine
        .write_through("p", TTL, || Ok(Some(("six".to_owned(), 6))))
        .unwrap();
    assert_eq!(read().as_deref(), Some("six"));
}

/// A loader's own error type.
#[derive(Debug, PartialEq)]
struct OutOfStock(u32);

impl std::fmt::Display for OutOfStock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "product {} is out of stock", self.0)
    }
}

impl std::error::Error for OutOfStock {}

#[test]
fn a_loader_error_downcasts_to_the_loaders_type() {
    let space = Space::new("loader_error");
    let threads = 4;
    let barrier = std::sync::Barrier::new(threads);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                barrier.wait();
                let err = space
                    .engine
                    .get_or_load::<i64, _>("p", TTL, || {
                        Err(cacheaside::Error::loader(OutOfStock(7)))
                    })
                    .unwrap_err();
                assert_eq!(err.kind(), cacheaside::ErrorKind::Loader);
                // Leader and waiters alike get the loader's own error back.
                assert_eq!(err.downcast_ref::<OutOfStock>(), Some(&OutOfStock(7)));
                let source = std::error::Error::source(&err).expect("a source");
                assert_eq!(source.downcast_ref::<OutOfStock>(), Some(&OutOfStock(7)));
            });
        }
    });
}

/// A read whose loader queries Postgres.
fn read_one(engine: &CacheAside) -> cacheaside::Result<Option<i64>> {
    engine.get_or_load("one", TTL, || {
        Ok(engine
            .db()
            .query_opt("SELECT 1::bigint", &[])?
            .map(|r| r.get(0)))
    })
}

#[test]
fn a_read_from_an_async_task_is_refused_naming_spawn_blocking() {
    let space = Space::new("async");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let err = runtime
        .block_on(async { read_one(&space.engine) })
        .unwrap_err();
    assert_eq!(
        err.kind(),
        cacheaside::ErrorKind::InvalidArgument,
        "{err:?}"
    );
    assert!(err.to_string().contains("spawn_blocking"), "{err}");
    assert_eq!(space.engine.db().query_count(), 0);
    // Where the message sends the caller, the read works.
    let engine = space.engine.clone();
    let read = runtime.block_on(async move {
        tokio::task::spawn_blocking(move || read_one(&engine))
            .await
            .unwrap()
    });
    assert_eq!(read.unwrap(), Some(1));
    assert_eq!(space.engine.db().query_count(), 1);
}

#[test]
fn a_30_s_statement_timeout_from_the_builder_opens() {
    let base = test_config("builder");
    let config = Config::builder()
        .urls_from_env()
        .namespace(base.namespace.clone())
        .outbox_table(base.outbox_table.clone())
        .statement_timeout(Duration::from_secs(30))
        .build()
        .expect("lock_wait follows statement_timeout");
    assert_eq!(
        config.lock_wait,
        config.pool_timeout + Duration::from_secs(30)
    );
    let space = Space::with(config);
    space.engine.ping().unwrap();
    // The same change on the public fields alone is refused at open: only
    // the builder derives.
    let mut fields = base;
    fields.statement_timeout = Duration::from_secs(30);
    let err = CacheAside::open(&fields)
        .err()
        .expect("lock_wait too short");
    assert!(err.to_string().contains("lock_wait"), "{err}");
}

/// How long Redis keeps `key` of this engine's namespace, in ms.
fn pttl(engine: &CacheAside, key: &str) -> i64 {
    let redis_key = engine.cache().redis_key(key);
    engine
        .cache()
        .with_connection(|c| redis::cmd("PTTL").arg(&redis_key).query(c))
        .unwrap()
}

#[test]
fn per_call_entry_options_set_the_entrys_lifetimes() {
    let mut config = test_config("entry_options");
    config.ttl = Duration::from_secs(120);
    let space = Space::with(config);
    let engine = &space.engine;
    let defaults = engine.entry_options();
    assert_eq!(defaults.ttl, Duration::from_secs(120), "from the config");
    assert!(defaults.fail_safe_max.is_zero());

    let short = defaults.ttl(Duration::from_secs(2));
    let v: Option<i64> = engine
        .get_or_load_with("short", &short, || Ok(Some(1)))
        .unwrap();
    assert_eq!(v, Some(1));
    assert!((1..=2_000).contains(&pttl(engine, "short")));

    // Fail-safe on for this entry only: it stays past its TTL as a copy.
    let safe = short.fail_safe_max(Duration::from_secs(60));
    let _: Option<i64> = engine
        .get_or_load_with("safe", &safe, || Ok(Some(2)))
        .unwrap();
    assert!((50_000..=62_000).contains(&pttl(engine, "safe")));

    let absent = defaults.negative_ttl(Duration::from_secs(3));
    let none: Option<i64> = engine
        .get_or_load_with("absent", &absent, || Ok(None))
        .unwrap();
    assert_eq!(none, None);
    assert!((1..=3_000).contains(&pttl(engine, "absent")));

    let err = engine
        .get_or_load_with::<i64, _>("bad", &defaults.beta(-1.0), || Ok(Some(3)))
        .unwrap_err();
    assert_eq!(err.kind(), cacheaside::ErrorKind::InvalidArgument);
}
