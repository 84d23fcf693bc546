//! The fast paths (issue 28): a plain miss that claims its lease in the
//! lookup's round trip and fills behind the caller keeps every lease
//! guarantee, and turns itself off when reads hit; a near-cache hit shares
//! one decoded value. Real servers; each test has its own table and
//! namespace.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use cacheaside::{Client, LocalCache, UserProfile};
use common::{Fixture, Meet, PATIENCE, test_config};

/// A fixture without the relay (which would invalidate on its own
/// schedule), whose plain reads have missed often enough that they now
/// claim their lease with the lookup: cold reads of keys of their own,
/// never invalidated, so no fill of theirs is dropped (or counted) later.
fn missing_fixture(label: &str) -> Fixture {
    let mut config = test_config(label);
    config.invalidation_relay = false;
    let fx = Fixture::with(config);
    for i in 0..5u32 {
        let v: Option<u32> = fx
            .client
            .engine()
            .get_or_load_uncoalesced(&format!("warm:{i}"), Duration::from_secs(60), || {
                Ok(Some(i))
            })
            .unwrap();
        assert_eq!(v, Some(i));
    }
    assert!(fx.client.engine().claims_leases_ahead());
    fx
}

/// Polls `cond` until it holds; panics after [`PATIENCE`]. (The fill runs
/// on the engine's background pool after the read returns.)
fn wait_for(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(1));
    }
}

fn lease_exists(fx: &Fixture, key: &str) -> bool {
    let lease = format!("{}:lease", fx.client.cache().redis_key(key));
    fx.client
        .cache()
        .with_connection(|c| redis::cmd("EXISTS").arg(&lease).query::<bool>(c))
        .unwrap()
}

#[test]
fn a_miss_with_the_lease_claimed_ahead_costs_one_query_and_fills() {
    let fx = missing_fixture("ahead_fill");
    let key = Client::user_key(3);
    fx.client.engine().invalidate(&key).unwrap();
    let before = fx.queries();
    let read = fx.client.get_user_profile(3).unwrap().unwrap();
    assert_eq!(fx.queries(), before + 1);
    let cached = || fx.client.cache().get_json::<UserProfile>(&key).unwrap();
    wait_for("the fill", || cached().is_some());
    assert_eq!(cached(), Some(read), "the fill stored the row");
    assert!(!lease_exists(&fx, &key), "the fill released its lease");
    // A hit now: no query, and the claim behind its GET took nothing.
    fx.client.get_user_profile(3).unwrap().unwrap();
    assert_eq!(fx.queries(), before + 1);
    assert!(!lease_exists(&fx, &key), "a hit left a lease behind");
}

#[test]
fn a_read_right_after_a_miss_that_fills_behind_sends_no_second_query() {
    let fx = missing_fixture("ahead_again");
    let key = Client::user_key(2);
    for round in 0..30 {
        fx.client.engine().invalidate(&key).unwrap();
        let before = fx.queries();
        let missed = fx.client.get_user_profile(2).unwrap().unwrap();
        // At once: the fill may not have landed, its lease still held.
        let again = fx.client.get_user_profile(2).unwrap().unwrap();
        assert_eq!(fx.queries(), before + 1, "round {round}");
        assert_eq!(missed, again);
        assert!(fx.client.engine().claims_leases_ahead(), "round {round}");
    }
}

#[test]
fn fill_after_invalidate_is_dropped_when_the_lease_was_claimed_ahead() {
    let fx = missing_fixture("ahead_race");
    let key = Client::user_key(1);
    fx.client.engine().invalidate(&key).unwrap();
    let loaded = Arc::new(Meet::new(2));
    let go = Arc::new(Meet::new(2));
    {
        let (loaded, go, key) = (loaded.clone(), go.clone(), key.clone());
        let armed = AtomicBool::new(true);
        fx.client.engine().hooks().set_after_load(move |k| {
            if k == key && armed.swap(false, Ordering::SeqCst) {
                loaded.wait();
                go.wait();
            }
        });
    }
    let dropped = fx.client.engine().stats().fills_dropped;
    thread::scope(|s| {
        let reader = s.spawn(|| fx.client.get_user_profile(1).unwrap().unwrap());
        loaded.wait(); // the reader holds the old row, and its lease
        assert!(fx.client.update_user_plan(1, "after-write").unwrap());
        go.wait(); // now it fills
        assert_eq!(
            reader.join().unwrap().plan,
            "pro",
            "it returns what it read"
        );
    });
    wait_for("the fill's verdict", || {
        fx.client.engine().stats().fills_dropped > dropped
    });
    assert_eq!(fx.client.engine().stats().fills_dropped, dropped + 1);
    assert_eq!(
        fx.client.cache().get_json::<UserProfile>(&key).unwrap(),
        None,
        "the pre-write row was cached"
    );
    assert_eq!(
        fx.client.get_user_profile(1).unwrap().unwrap().plan,
        "after-write"
    );
}

#[test]
fn reads_that_hit_stop_claiming_ahead() {
    let fx = missing_fixture("ahead_off");
    for _ in 0..16 {
        fx.client.get_user_profile(2).unwrap().unwrap();
    }
    assert!(!fx.client.engine().claims_leases_ahead());
}

#[test]
fn near_cache_hits_share_one_value() {
    let mut config = test_config("near_shared");
    config.local_cache = LocalCache::new(1_000, Duration::from_secs(60));
    let fx = Fixture::with(config);
    let deadline = Instant::now() + PATIENCE;
    // The first read fills Redis, a Redis hit fills L1, then L1 answers.
    let first = loop {
        assert!(Instant::now() < deadline, "L1 never answered");
        let hits = fx.client.engine().stats().local_hits;
        let profile = fx.client.get_user_profile_shared(4).unwrap().unwrap();
        if fx.client.engine().stats().local_hits > hits {
            break profile;
        }
        thread::sleep(Duration::from_millis(1));
    };
    let hits = fx.client.engine().stats().local_hits;
    let again = fx.client.get_user_profile_shared(4).unwrap().unwrap();
    assert_eq!(fx.client.engine().stats().local_hits, hits + 1);
    assert!(Arc::ptr_eq(&first, &again), "the hit decoded a new value");
    // The owned read clones the same value.
    assert_eq!(fx.client.get_user_profile(4).unwrap().unwrap(), *first);

    let engine = fx.client.engine();
    let value = || {
        engine
            .get_or_load_shared("shared:list", Duration::from_secs(60), || {
                Ok(Some(vec![1u32, 2, 3]))
            })
            .unwrap()
            .unwrap()
    };
    let deadline = Instant::now() + PATIENCE;
    let first = loop {
        assert!(Instant::now() < deadline, "L1 never answered");
        let hits = engine.stats().local_hits;
        let v = value();
        if engine.stats().local_hits > hits {
            break v;
        }
        thread::sleep(Duration::from_millis(1));
    };
    assert_eq!(*first, vec![1, 2, 3]);
    assert!(Arc::ptr_eq(&first, &value()));
}
