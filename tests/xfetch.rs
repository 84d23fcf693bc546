//! Early refresh (XFetch): a hot key is reloaded shortly before it expires,
//! by one caller, while everyone else keeps reading the cached value.

mod common;

use std::sync::Barrier;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use cacheaside::Stats;
use common::{Fixture, test_config};

const TTL: Duration = Duration::from_millis(600);
const PERIODS: u32 = 5;
/// A load that takes a measurable time (XFetch's head start scales with it).
const LOAD: &str = "SELECT 7::bigint FROM pg_sleep(0.02)";

/// Four threads read one key continuously for `PERIODS` TTLs. Returns the
/// engine's counters and the Postgres queries of the run (after the fill).
fn read_hot_key_for_several_ttls(beta: f64) -> (Stats, Stats, u64) {
    let mut config = test_config("xfetch");
    config.beta = beta;
    let fx = Fixture::with(config);
    let engine = fx.client.engine();
    let read = || -> Option<i64> {
        engine
            .get_or_load("hot", TTL, || {
                Ok(engine.db().query_opt(LOAD, &[])?.map(|r| r.get(0)))
            })
            .unwrap()
    };
    assert_eq!(read(), Some(7)); // the first fill
    let (before, queries_before) = (engine.stats(), fx.queries());
    let threads = 4;
    let barrier = Barrier::new(threads + 1);
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                barrier.wait();
                while !stop.load(Ordering::SeqCst) {
                    assert_eq!(read(), Some(7));
                }
            });
        }
        barrier.wait();
        std::thread::sleep(TTL * PERIODS);
        stop.store(true, Ordering::SeqCst);
    });
    (before, engine.stats(), fx.queries() - queries_before)
}

#[test]
fn hot_key_is_refreshed_before_it_expires() {
    let (before, after, loads) = read_hot_key_for_several_ttls(1.0);
    let reads = after.hits - before.hits;
    eprintln!(
        "xfetch: {reads} reads over {PERIODS} TTLs, {loads} loads, {} early refreshes",
        after.early_refreshes - before.early_refreshes
    );
    assert!(reads > 1000, "the readers kept the key hot ({reads} reads)");
    assert_eq!(
        after.misses, before.misses,
        "no read found the key absent after the first fill"
    );
    assert_eq!(
        after.early_refreshes - before.early_refreshes,
        loads,
        "every load was an early refresh"
    );
    // About one load per TTL period: at least one per period (else it would
    // have expired) and nowhere near one per read.
    assert!(
        (u64::from(PERIODS) - 1..=u64::from(PERIODS) * 2 + 1).contains(&loads),
        "{loads} loads over {PERIODS} TTL periods"
    );
}

#[test]
fn without_early_refresh_the_hot_key_expires() {
    // The contrast: beta = 0 turns XFetch off, and the key goes missing once
    // per TTL (each time costing readers a miss).
    let (before, after, loads) = read_hot_key_for_several_ttls(0.0);
    assert_eq!(after.early_refreshes, before.early_refreshes);
    assert!(
        after.misses - before.misses >= u64::from(PERIODS) - 1,
        "{after:?}"
    );
    assert!(loads >= u64::from(PERIODS) - 1);
}
