//! Never stale: leases drop a fill that raced a write, single-flight
//! followers never get a pre-write row, write-through keeps the newest
//! version. The races are forced with the `test-hooks` after-load hook, not
//! hoped for.

mod common;

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use cacheaside::{Client, UserProfile};
use common::{Fixture, Meet, PATIENCE};

/// Makes the next load of `key` stop after reading its row: `loaded` is
/// reached once the row is read, and the load goes on to fill once the test
/// passes `go`.
fn pause_after_load(fx: &Fixture, key: &str) -> (Arc<Meet>, Arc<Meet>) {
    let loaded = Arc::new(Meet::new(2));
    let go = Arc::new(Meet::new(2));
    let (l, g, key, armed) = (
        Arc::clone(&loaded),
        Arc::clone(&go),
        key.to_owned(),
        AtomicBool::new(true),
    );
    fx.client.engine().hooks().set_after_load(move |k| {
        if k == key && armed.swap(false, Ordering::SeqCst) {
            l.wait();
            g.wait();
        }
    });
    (loaded, go)
}

/// Blocks until a thread has joined the single-flight for `key` as a
/// follower (bounded by `PATIENCE`).
fn wait_for_a_follower(fx: &Fixture, key: &str) {
    let deadline = Instant::now() + PATIENCE;
    while fx.client.engine().flight_followers(key) < 1 {
        assert!(Instant::now() < deadline, "follower never joined");
        std::thread::yield_now();
    }
}

/// Makes `key`'s rebuild lock look held by another process (for a minute);
/// returns the lock's Redis key.
fn hold_rebuild_lock_elsewhere(fx: &Fixture, key: &str) -> String {
    let lock = format!("{}:lock", fx.client.cache().redis_key(key));
    let set = |c: &mut cacheaside::RedisConnection| {
        redis::cmd("SET")
            .arg(&lock)
            .arg("another-process")
            .arg("PX")
            .arg(60_000)
            .query::<()>(c)
    };
    fx.client.cache().with_connection(set).unwrap();
    lock
}

/// Reader reads the old row, writer commits and invalidates, reader fills.
/// Returns the plan left in the cache afterwards, if any.
fn race_read_against_write(leases: bool) -> Option<String> {
    // Without the relay, which would repair the naive case's stale entry
    // (when it comes: it polls) and make what is left a race.
    let mut config = common::test_config(if leases { "race_lease" } else { "race_naive" });
    config.invalidation_relay = false;
    let fx = Fixture::with(config);
    fx.client.engine().hooks().set_leases_enabled(leases);
    let key = Client::user_key(1);
    let (loaded, go) = pause_after_load(&fx, &key);
    std::thread::scope(|s| {
        let reader = s.spawn(|| fx.client.get_user_profile(1).unwrap().unwrap());
        loaded.wait(); // the reader holds the old row
        assert!(fx.client.update_user_plan(1, "after-write").unwrap());
        go.wait(); // now it fills
        let read = reader.join().unwrap();
        assert_eq!(
            read.plan, "pro",
            "the reader itself returns the row it read"
        );
    });
    fx.client
        .cache()
        .get_json::<UserProfile>(&key)
        .unwrap()
        .map(|p| p.plan)
}

#[test]
fn fill_after_invalidate_is_dropped() {
    // Without leases the race caches the pre-write row: the bug most teams ship.
    assert_eq!(race_read_against_write(false).as_deref(), Some("pro"));
    // With leases the fill is refused and nothing stale is cached.
    assert_eq!(race_read_against_write(true), None);
}

#[test]
fn dropped_fill_is_counted_and_next_read_is_fresh() {
    let fx = Fixture::new("race_next");
    let key = Client::user_key(2);
    let (loaded, go) = pause_after_load(&fx, &key);
    std::thread::scope(|s| {
        let reader = s.spawn(|| fx.client.get_user_profile_singleflight(2).unwrap());
        loaded.wait();
        fx.client.update_user_plan(2, "new").unwrap();
        go.wait();
        reader.join().unwrap();
    });
    assert_eq!(fx.client.engine().stats().fills_dropped, 1);
    assert_eq!(fx.client.get_user_profile(2).unwrap().unwrap().plan, "new");
}

/// A thread that joins a flight after a write returned must not get the row
/// that flight read before the write.
fn follower_after_write(leases: bool) -> (UserProfile, UserProfile) {
    let fx = Fixture::new(if leases {
        "follow_lease"
    } else {
        "follow_naive"
    });
    fx.client.engine().hooks().set_leases_enabled(leases);
    let key = Client::user_key(3);
    let (loaded, go) = pause_after_load(&fx, &key);
    std::thread::scope(|s| {
        let leader = s.spawn(|| fx.client.get_user_profile_singleflight(3).unwrap().unwrap());
        loaded.wait();
        assert!(fx.client.update_user_plan(3, "post-write").unwrap());
        // The write has returned; this reader starts now and joins the flight
        // that is still open.
        let follower = s.spawn(|| fx.client.get_user_profile_singleflight(3).unwrap().unwrap());
        wait_for_a_follower(&fx, &key);
        go.wait();
        (leader.join().unwrap(), follower.join().unwrap())
    })
}

#[test]
fn follower_that_joined_after_a_write_gets_the_post_write_row() {
    let (leader, follower) = follower_after_write(false);
    assert_eq!(
        follower.plan, "enterprise",
        "without leases the follower reuses the stale row"
    );
    assert_eq!(leader.plan, "enterprise");

    let (leader, follower) = follower_after_write(true);
    assert_eq!(
        leader.plan, "enterprise",
        "the leader's caller started before the write"
    );
    assert_eq!(follower.plan, "post-write");
    assert_eq!(follower.version, 2);
}

/// With the breaker open, readers skip the cache and go straight to a
/// flight; a write-through that commits while a flight's load is out must
/// keep followers that join after it returned from taking the older row.
/// (Found by the cluster's slot-migration soak: failed invalidations
/// opened the breaker, and a few reads returned the row before a finished
/// write-through.)
#[test]
fn with_the_breaker_open_a_follower_after_a_write_through_gets_the_new_row() {
    let mut redis = common::servers::PrivateRedis::start();
    let mut config = common::test_config("wt_open");
    config.redis_url = redis.url();
    config.breaker_failures = 1;
    let fx = Fixture::with(config);
    redis.kill();
    // One failed call opens it.
    let _ = fx.client.get_user_profile(4);
    assert!(fx.client.engine().stats().breaker_opened >= 1);
    let key = Client::user_key(4);
    let (loaded, go) = pause_after_load(&fx, &key);
    std::thread::scope(|s| {
        let leader = s.spawn(|| fx.client.get_user_profile_singleflight(4).unwrap().unwrap());
        loaded.wait(); // the leader read the old row from Postgres
        let written = fx
            .client
            .update_user_plan_write_through(4, "post-write")
            .unwrap()
            .expect("user 4 exists");
        let follower = s.spawn(|| fx.client.get_user_profile_singleflight(4).unwrap().unwrap());
        wait_for_a_follower(&fx, &key);
        go.wait();
        assert_eq!(leader.join().unwrap().plan, "free");
        assert_eq!(follower.join().unwrap(), written);
    });
}

#[test]
fn follower_of_a_load_after_a_lock_wait_timeout_gets_the_post_write_row() {
    // Another process holds the rebuild lock and never finishes: our leader
    // waits `lock_wait`, then loads itself. That fallback load must still be
    // lease-checked, or its followers could get a pre-write row.
    let mut config = common::test_config("fallback");
    // A lock wait that ends soon: it must cover the longest load.
    config.cache_timeout = Duration::from_millis(100);
    config.pool_timeout = Duration::from_millis(100);
    config.statement_timeout = Duration::from_millis(100);
    config.lock_wait = Duration::from_millis(200);
    let fx = Fixture::with(config);
    let key = Client::user_key(4);
    hold_rebuild_lock_elsewhere(&fx, &key);
    let (loaded, go) = pause_after_load(&fx, &key);
    std::thread::scope(|s| {
        let leader = s.spawn(|| fx.client.get_user_profile_singleflight(4).unwrap().unwrap());
        loaded.wait(); // the lock wait timed out and the leader read the old row
        assert!(fx.client.update_user_plan(4, "post-write").unwrap());
        let follower = s.spawn(|| fx.client.get_user_profile_singleflight(4).unwrap().unwrap());
        wait_for_a_follower(&fx, &key);
        go.wait();
        assert_eq!(leader.join().unwrap().plan, "free");
        assert_eq!(follower.join().unwrap().plan, "post-write");
    });
    let cached = fx.client.cache().get_json::<UserProfile>(&key).unwrap();
    assert_eq!(cached.map(|p| p.plan).as_deref(), Some("post-write"));
}

fn profile(plan: &str, version: i64) -> UserProfile {
    UserProfile {
        id: 1,
        name: "Ada Lovelace".into(),
        email: "ada@example.com".into(),
        plan: plan.into(),
        version,
    }
}

fn cached(fx: &Fixture, key: &str) -> Option<(String, i64)> {
    let entry = fx.client.cache().get_json::<UserProfile>(key).unwrap();
    entry.map(|p| (p.plan, p.version))
}

#[test]
fn follower_of_a_leader_that_found_the_value_cached_reads_again() {
    // Another process holds the rebuild lock; our leader polls until that
    // process fills the key, and finds it cached. A write returns before a
    // follower joins the flight: the follower must not get the leader's read.
    let fx = Fixture::new("leader_cached");
    let key = Client::user_key(1);
    let redis_key = fx.client.cache().redis_key(&key);
    let lock = hold_rebuild_lock_elsewhere(&fx, &key);
    let (answered, go) = pause_after_load(&fx, &redis_key);
    std::thread::scope(|s| {
        let leader = s.spawn(|| fx.client.get_user_profile_singleflight(1).unwrap().unwrap());
        // Past its cache check: a leader that started after the fill below
        // would just hit.
        wait_for_a_follower_or_join(&fx, &key);
        // The other process fills the key and releases its lock.
        let row = fx.client.get_user_profile(1).unwrap().unwrap();
        let del_lock =
            |c: &mut cacheaside::RedisConnection| redis::cmd("DEL").arg(&lock).query::<()>(c);
        fx.client.cache().with_connection(del_lock).unwrap();
        answered.wait(); // our leader found that row cached
        assert_eq!(row.plan, "pro");
        assert!(fx.client.update_user_plan(1, "post-write").unwrap());
        let follower = s.spawn(|| fx.client.get_user_profile_singleflight(1).unwrap().unwrap());
        wait_for_a_follower(&fx, &key);
        go.wait();
        assert_eq!(
            leader.join().unwrap().plan,
            "pro",
            "its call began before the write"
        );
        assert_eq!(follower.join().unwrap().plan, "post-write");
    });
}

#[test]
fn write_through_keeps_the_newer_version_in_either_order() {
    let fx = Fixture::new("wt_order");
    let engine = fx.client.engine();
    let ttl = Duration::from_secs(60);
    let write = |key: &str, plan: &str, version: i64| {
        engine
            .write_through(key, ttl, || {
                Ok(Some((profile(plan, version), version as u64)))
            })
            .unwrap()
            .unwrap()
    };
    // Older finishes first: the newer replaces it.
    write("a", "v2", 2);
    write("a", "v3", 3);
    assert_eq!(cached(&fx, "a"), Some(("v3".into(), 3)));
    // Newer finishes first: the older, finishing later, is refused. The
    // older writer is held between its write and its cache update while the
    // newer one runs start to finish.
    let (written, go) = (Meet::new(2), Meet::new(2));
    std::thread::scope(|s| {
        let older = s.spawn(|| {
            engine.write_through("b", ttl, || {
                written.wait();
                go.wait();
                Ok(Some((profile("v2", 2), 2)))
            })
        });
        written.wait();
        write("b", "v3", 3);
        go.wait();
        older.join().unwrap().unwrap();
    });
    assert_eq!(cached(&fx, "b"), Some(("v3".into(), 3)));
    // The same version again is not news.
    write("b", "v3bis", 3);
    assert_eq!(cached(&fx, "b"), Some(("v3".into(), 3)));
}

#[test]
fn write_through_that_an_invalidating_update_overtook_is_not_cached() {
    // Write-through A commits version 2; plain update B commits version 3 and
    // invalidates; then A updates the cache. Comparing versions cannot catch
    // this (the invalidation left nothing to compare with): A's writer token,
    // revoked by B's invalidation, does.
    let fx = Fixture::new("wt_overtaken");
    let key = Client::user_key(1);
    let (written, go) = (Meet::new(2), Meet::new(2));
    let sql = format!(
        "UPDATE {} SET plan = 'a', version = version + 1 WHERE id = 1 RETURNING version",
        fx.config.users_table
    );
    std::thread::scope(|s| {
        let a = s.spawn(|| {
            fx.client
                .engine()
                .write_through(&key, Duration::from_secs(60), || {
                    let version: i64 = fx.client.db().query_opt(&sql, &[])?.unwrap().get(0);
                    written.wait();
                    go.wait();
                    Ok(Some((profile("a", version), version as u64)))
                })
        });
        written.wait(); // A has committed version 2
        assert!(fx.client.update_user_plan(1, "b").unwrap()); // version 3
        go.wait();
        a.join().unwrap().unwrap();
    });
    assert_eq!(cached(&fx, &key), None, "A's older row was not cached");
    let read = fx.client.get_user_profile(1).unwrap().unwrap();
    assert_eq!((read.plan.as_str(), read.version), ("b", 3));
}

#[test]
fn write_through_that_a_newer_one_overtook_never_fills_the_empty_key() {
    // X registers; plain update Y invalidates (revoking X); W registers and
    // commits; X commits (newer than W) and, revoked and facing an empty key,
    // stores nothing; then W's cache update runs. W must not store its older
    // row in the key X left empty.
    let fx = Fixture::new("wt_overtook");
    let engine = fx.client.engine();
    let key = Client::user_key(2);
    let ttl = Duration::from_secs(60);
    let sql = format!(
        "UPDATE {} SET plan = $1, version = version + 1 WHERE id = 2 RETURNING version",
        fx.config.users_table
    );
    let commit = |plan: &str| -> i64 {
        fx.client
            .db()
            .query_opt(&sql, &[&plan])
            .unwrap()
            .unwrap()
            .get(0)
    };
    let (x_registered, x_go) = (Meet::new(2), Meet::new(2));
    let (w_committed, w_go) = (Meet::new(2), Meet::new(2));
    std::thread::scope(|s| {
        let x = s.spawn(|| {
            engine.write_through(&key, ttl, || {
                x_registered.wait();
                x_go.wait();
                let v = commit("x");
                Ok(Some((profile("x", v), v as u64)))
            })
        });
        x_registered.wait();
        assert!(fx.client.update_user_plan(2, "y").unwrap());
        let w = s.spawn(|| {
            engine.write_through(&key, ttl, || {
                let v = commit("w");
                w_committed.wait();
                w_go.wait();
                Ok(Some((profile("w", v), v as u64)))
            })
        });
        w_committed.wait();
        x_go.wait();
        x.join().unwrap().unwrap(); // X has returned: its row is the newest
        w_go.wait();
        w.join().unwrap().unwrap();
    });
    let newest = fx.db_version(2);
    if let Some((plan, version)) = cached(&fx, &key) {
        assert_eq!(
            (plan.as_str(), version),
            ("x", newest),
            "the cache holds an older row"
        );
    }
    assert_eq!(fx.client.get_user_profile(2).unwrap().unwrap().plan, "x");
}

#[test]
fn write_through_through_the_client_caches_the_new_row() {
    let fx = Fixture::new("wt_client");
    fx.client.get_user_profile(4).unwrap(); // cache version 1
    let written = fx
        .client
        .update_user_plan_write_through(4, "pro")
        .unwrap()
        .unwrap();
    assert_eq!((written.plan.as_str(), written.version), ("pro", 2));
    let before = fx.queries();
    assert_eq!(fx.client.get_user_profile(4).unwrap(), Some(written));
    assert_eq!(fx.queries(), before, "the written-through row is a hit");
}

#[test]
fn reader_that_raced_a_write_through_cannot_overwrite_it() {
    let fx = Fixture::new("wt_race");
    let key = Client::user_key(5);
    let (loaded, go) = pause_after_load(&fx, &key);
    std::thread::scope(|s| {
        let reader = s.spawn(|| fx.client.get_user_profile(5).unwrap());
        loaded.wait();
        fx.client
            .update_user_plan_write_through(5, "written")
            .unwrap();
        go.wait();
        reader.join().unwrap();
    });
    let cached = fx
        .client
        .cache()
        .get_json::<UserProfile>(&key)
        .unwrap()
        .unwrap();
    assert_eq!((cached.plan.as_str(), cached.version), ("written", 2));
}

#[test]
fn concurrent_write_through_leaves_the_newest_row() {
    // Write-through's own ordering, without the relay (tests/relay.rs has
    // write-through against the relay).
    let mut config = common::test_config("wt_concurrent");
    config.invalidation_relay = false;
    let fx = Fixture::with(config);
    let writers = 8;
    let rounds = 15;
    let barrier = Barrier::new(writers);
    std::thread::scope(|s| {
        for w in 0..writers {
            let (fx, barrier) = (&fx, &barrier);
            s.spawn(move || {
                barrier.wait();
                for r in 0..rounds {
                    fx.client
                        .update_user_plan_write_through(1, &format!("w{w}r{r}"))
                        .unwrap()
                        .unwrap();
                }
            });
        }
    });
    let sql = format!(
        "SELECT plan, version FROM {} WHERE id = 1",
        fx.config.users_table
    );
    let row = fx.client.db().query_opt(&sql, &[]).unwrap().unwrap();
    let (plan, version): (String, i64) = (row.get(0), row.get(1));
    assert_eq!(version, 1 + (writers * rounds) as i64);
    let cached = fx
        .client
        .cache()
        .get_json::<UserProfile>(&Client::user_key(1))
        .unwrap()
        .unwrap();
    assert_eq!((cached.plan, cached.version), (plan, version));
}

/// Readers and writers on one hot row with a slow read path: every read that
/// starts after an update returned sees that update's version or newer.
#[test]
fn soak_reads_never_see_a_version_older_than_a_finished_write() {
    let fx = Fixture::new("soak");
    // The slow read path widens every race window between load and fill.
    fx.client
        .engine()
        .hooks()
        .set_after_load(|_| std::thread::sleep(Duration::from_millis(2)));
    let floor = AtomicI64::new(1); // newest version whose write has returned
    let stop = AtomicBool::new(false);
    let (reads, writes, violations) = (AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0));
    let run_for = Duration::from_secs(3);
    std::thread::scope(|s| {
        for r in 0..4 {
            let (fx, floor, stop, reads, violations) = (&fx, &floor, &stop, &reads, &violations);
            s.spawn(move || {
                let mut i = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    let must_see = floor.load(Ordering::SeqCst);
                    let got = if (r + i).is_multiple_of(2) {
                        fx.client.get_user_profile(1)
                    } else {
                        fx.client.get_user_profile_singleflight(1)
                    };
                    let version = got.unwrap().unwrap().version;
                    if version < must_see {
                        violations.fetch_add(1, Ordering::SeqCst);
                        eprintln!("stale read: version {version} after {must_see} was written");
                    }
                    reads.fetch_add(1, Ordering::SeqCst);
                    i += 1;
                }
            });
        }
        for w in 0..2 {
            let (fx, floor, stop, writes) = (&fx, &floor, &stop, &writes);
            s.spawn(move || {
                let mut i = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    let written = if w == 0 {
                        // Our update makes the version at least one more than
                        // any version committed before it.
                        let before = fx.db_version(1);
                        assert!(fx.client.update_user_plan(1, &format!("plain{i}")).unwrap());
                        before + 1
                    } else {
                        let row = fx
                            .client
                            .update_user_plan_write_through(1, &format!("wt{i}"))
                            .unwrap();
                        row.unwrap().version
                    };
                    floor.fetch_max(written, Ordering::SeqCst);
                    writes.fetch_add(1, Ordering::SeqCst);
                    i += 1;
                    std::thread::sleep(Duration::from_millis(3));
                }
            });
        }
        std::thread::sleep(run_for);
        stop.store(true, Ordering::SeqCst);
    });
    let (reads, writes) = (reads.load(Ordering::SeqCst), writes.load(Ordering::SeqCst));
    let stats = fx.client.engine().stats();
    eprintln!(
        "soak: {reads} reads and {writes} writes checked, {} stale fills dropped",
        stats.fills_dropped
    );
    assert!(
        reads > 100 && writes > 20,
        "the soak ran: {reads} reads, {writes} writes"
    );
    assert_eq!(violations.load(Ordering::SeqCst), 0);
    assert_eq!(fx.client.engine().in_flight(), 0);
}

/// Waits up to `within` for `done`; false if it never held (used to give a
/// wrong behaviour its chance to show, not to make a test pass).
fn eventually(within: Duration, done: impl Fn() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if done() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    done()
}

#[test]
fn taking_the_rebuild_lock_does_not_revoke_a_live_loaders_lease() {
    // A plain reader in one process holds the lease mid-load; a
    // single-flight reader in another process misses the same key. It used
    // to take the lock and the lease over, load a second time, and make the
    // first reader's fill be dropped. Now it waits for that fill.
    let fx = Fixture::new("lock_no_steal");
    let key = Client::user_key(1);
    let other = Client::open(&fx.config).unwrap();
    let other_loads = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&other_loads);
    other.engine().hooks().set_after_load(move |k| {
        // Loads only: the hook also runs (with the full Redis key) when a
        // leader finds the value cached.
        if k == "user:1" {
            counter.fetch_add(1, Ordering::SeqCst);
        }
    });
    let (loaded, go) = pause_after_load(&fx, &key);
    std::thread::scope(|s| {
        let plain = s.spawn(|| fx.client.get_user_profile(1).unwrap().unwrap());
        loaded.wait(); // the plain reader holds the lease and the old row
        let single = s.spawn(|| other.get_user_profile_singleflight(1).unwrap().unwrap());
        // Give a lease thief its chance to load (then release the plain
        // reader before asserting, so a failure cannot hang the test).
        let stole = eventually(Duration::from_millis(300), || {
            other_loads.load(Ordering::SeqCst) > 0
        });
        go.wait();
        assert!(
            !stole,
            "the lock taker loaded while a live loader held the lease"
        );
        assert_eq!(plain.join().unwrap().plan, "pro");
        assert_eq!(single.join().unwrap().plan, "pro");
    });
    assert_eq!(other_loads.load(Ordering::SeqCst), 0, "one load in all");
    assert_eq!(fx.client.engine().stats().fills_dropped, 0);
    assert_eq!(
        cached(&fx, &key).map(|(plan, _)| plan).as_deref(),
        Some("pro")
    );
}

#[test]
fn followers_that_joined_before_the_load_take_its_row_though_a_write_dropped_the_fill() {
    // Single-flight under steady writes used to serve one reader per load:
    // every write dropped the leader's fill and sent all followers back to
    // read again. Followers that joined before the load began may take the
    // row: it was read during their calls.
    let fx = Fixture::new("early_followers");
    let key = Client::user_key(2);
    let lock = hold_rebuild_lock_elsewhere(&fx, &key);
    let loads = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&loads);
    let writer = Client::open(&fx.config).unwrap();
    fx.client.engine().hooks().set_after_load(move |k| {
        if k == "user:2" && counter.fetch_add(1, Ordering::SeqCst) == 0 {
            // A write commits (and invalidates) during the load: the fill
            // will be dropped.
            assert!(writer.update_user_plan(2, "during").unwrap());
        }
    });
    let followers = 8;
    std::thread::scope(|s| {
        let leader = s.spawn(|| fx.client.get_user_profile_singleflight(2).unwrap().unwrap());
        // The leader polls the lock another process holds; followers join.
        let joined: Vec<_> = (0..followers)
            .map(|_| s.spawn(|| fx.client.get_user_profile_singleflight(2).unwrap().unwrap()))
            .collect();
        let deadline = Instant::now() + PATIENCE;
        while fx.client.engine().flight_followers(&key) < followers {
            assert!(Instant::now() < deadline, "followers never joined");
            std::thread::yield_now();
        }
        let del_lock =
            |c: &mut cacheaside::RedisConnection| redis::cmd("DEL").arg(&lock).query::<()>(c);
        fx.client.cache().with_connection(del_lock).unwrap();
        assert_eq!(leader.join().unwrap().plan, "free");
        for follower in joined {
            assert_eq!(follower.join().unwrap().plan, "free", "the leader's row");
        }
    });
    assert_eq!(loads.load(Ordering::SeqCst), 1, "one load served everyone");
    assert_eq!(fx.client.engine().stats().fills_dropped, 1);
    assert_eq!(cached(&fx, &key), None, "the pre-write row was not cached");
}

#[test]
fn a_follower_never_pays_the_lock_wait_twice() {
    // The lock is held by a process that never finishes; the leader waits
    // `lock_wait`, loads itself, and a write drops its fill. A follower that
    // joined at the start used to read again, lead, and wait `lock_wait` a
    // second time; now it takes the leader's row.
    let mut config = common::test_config("one_deadline");
    config.cache_timeout = Duration::from_millis(100);
    config.pool_timeout = Duration::from_millis(100);
    config.statement_timeout = Duration::from_millis(200);
    config.lock_wait = Duration::from_millis(1000);
    let fx = Fixture::with(config);
    let key = Client::user_key(3);
    hold_rebuild_lock_elsewhere(&fx, &key);
    let writer = Client::open(&fx.config).unwrap();
    let wrote = Arc::new(AtomicBool::new(false));
    let w = Arc::clone(&wrote);
    fx.client.engine().hooks().set_after_load(move |k| {
        if k == "user:3" && !w.swap(true, Ordering::SeqCst) {
            assert!(writer.update_user_plan(3, "during").unwrap());
        }
    });
    std::thread::scope(|s| {
        let leader = s.spawn(|| fx.client.get_user_profile_singleflight(3).unwrap());
        wait_for_a_follower_or_join(&fx, &key);
        let started = Instant::now();
        let follower = s.spawn(|| fx.client.get_user_profile_singleflight(3).unwrap());
        let took = {
            let row = follower.join().unwrap();
            assert!(row.is_some());
            started.elapsed()
        };
        leader.join().unwrap();
        assert!(
            took < fx.config.lock_wait * 3 / 2,
            "the follower waited {took:?}: more than one lock wait"
        );
    });
    assert!(wrote.load(Ordering::SeqCst));
}

/// Blocks until a single-flight for `key` is in progress (its leader polls).
fn wait_for_a_follower_or_join(fx: &Fixture, key: &str) {
    let deadline = Instant::now() + PATIENCE;
    while fx.client.engine().in_flight() == 0 {
        assert!(Instant::now() < deadline, "no flight for {key}");
        std::thread::yield_now();
    }
}

#[test]
fn a_write_through_revoked_by_a_delete_never_brings_the_row_back() {
    // W commits version 2; D deletes the row and invalidates (revoking W);
    // a reader caches "absent" (version 0); then W's cache update runs. It
    // used to see 0 < 2 and store the deleted row for a whole TTL.
    let fx = Fixture::new("wt_delete");
    let key = Client::user_key(4);
    let (written, go) = (Meet::new(2), Meet::new(2));
    let update = format!(
        "UPDATE {} SET plan = 'w', version = version + 1 WHERE id = 4 RETURNING version",
        fx.config.users_table
    );
    let delete = format!("DELETE FROM {} WHERE id = 4", fx.config.users_table);
    std::thread::scope(|s| {
        let w = s.spawn(|| {
            fx.client
                .engine()
                .write_through(&key, Duration::from_secs(60), || {
                    let version: i64 = fx.client.db().query_opt(&update, &[])?.unwrap().get(0);
                    written.wait();
                    go.wait();
                    Ok(Some((profile("w", version), version as u64)))
                })
        });
        written.wait(); // W has committed
        fx.client.db().execute(&delete, &[]).unwrap();
        fx.client.engine().invalidate(&key).unwrap();
        assert_eq!(fx.client.get_user_profile(4).unwrap(), None, "absent now");
        go.wait();
        w.join().unwrap().unwrap();
    });
    assert_eq!(
        fx.client.get_user_profile(4).unwrap(),
        None,
        "stays deleted"
    );
}

#[test]
fn versions_near_two_to_the_63_compare_exactly() {
    // As Lua doubles, 2^63 - 2 and 2^63 - 1 are the same number: the newer
    // write-through was refused as "not newer".
    let fx = Fixture::new("wt_bigver");
    let engine = fx.client.engine();
    let ttl = Duration::from_secs(60);
    let write = |plan: &str, version: u64| {
        engine
            .write_through("big", ttl, || {
                Ok(Some((profile(plan, version as i64), version)))
            })
            .unwrap()
    };
    let (older, newer) = (i64::MAX as u64 - 1, i64::MAX as u64);
    write("older", older);
    write("newer", newer);
    assert_eq!(cached(&fx, "big"), Some(("newer".into(), newer as i64)));
    write("older again", older);
    assert_eq!(cached(&fx, "big"), Some(("newer".into(), newer as i64)));
    // And across a change of length, as strings of digits would not.
    write("short", 9);
    write("long", 10);
    assert_eq!(cached(&fx, "big"), Some(("newer".into(), newer as i64)));
}

/// The writers set of `key`: empty after every write-through, whatever
/// happened in it.
fn writers(fx: &Fixture, key: &str) -> i64 {
    let set = format!("{}:writers", fx.client.cache().redis_key(key));
    let card = |c: &mut cacheaside::RedisConnection| redis::cmd("SCARD").arg(&set).query::<i64>(c);
    fx.client.cache().with_connection(card).unwrap()
}

#[test]
fn write_through_removes_its_writer_token_on_every_path() {
    // Tokens used to stay behind when the value did not serialize or the
    // write panicked; every later writer extended the set's TTL.
    let fx = Fixture::new("wt_tokens");
    let engine = fx.client.engine();
    let ttl = Duration::from_secs(60);
    let unserializable: std::collections::HashMap<(i32, i32), i32> = [((1, 2), 3)].into();
    let err = engine
        .write_through("t", ttl, || Ok(Some((unserializable, 1))))
        .unwrap_err();
    assert_eq!(err.kind(), cacheaside::ErrorKind::InvalidArgument);
    assert_eq!(
        writers(&fx, "t"),
        0,
        "after a value that does not serialize"
    );
    let failed = engine.write_through::<i32, cacheaside::Versioned<i32>, _>("t", ttl, || {
        Err(cacheaside::Error::loader(std::io::Error::other("no")))
    });
    assert!(failed.is_err());
    assert_eq!(writers(&fx, "t"), 0, "after a failed write");
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _ = engine.write_through::<i32, cacheaside::Versioned<i32>, _>("t", ttl, || {
            panic!("write blew up")
        });
    }));
    assert!(panicked.is_err());
    assert_eq!(writers(&fx, "t"), 0, "after a panicking write");
    engine.write_through("t", ttl, || Ok(Some((1, 1)))).unwrap();
    assert_eq!(writers(&fx, "t"), 0, "after a good one");
}

#[test]
fn written_through_entries_are_refreshed_early_too() {
    // A written-through entry recorded a load time of 0, so XFetch never
    // picked it; it now records the write's duration (at least 1 ms).
    let mut config = common::test_config("wt_xfetch");
    // With a 1 ms load time, an entry of a 2 s TTL is due unless the draw
    // is above 1 - 2e-6.
    config.beta = 1e9;
    let fx = Fixture::with(config);
    let engine = fx.client.engine();
    let ttl = Duration::from_secs(2);
    engine
        .write_through("x", ttl, || Ok(Some((1_i64, 1))))
        .unwrap();
    let refreshed = Arc::new(AtomicU64::new(0));
    let before = engine.stats().early_refreshes;
    let v: Option<i64> = engine
        .get_or_load_versioned("x", ttl, cacheaside::Mode::SingleFlight, || {
            refreshed.fetch_add(1, Ordering::SeqCst);
            Ok(Some((2, 2)))
        })
        .unwrap();
    assert_eq!(v, Some(1), "the caller gets the cached value");
    assert_eq!(refreshed.load(Ordering::SeqCst), 1, "and it was refreshed");
    assert_eq!(engine.stats().early_refreshes, before + 1);
    assert_eq!(cached_i64(&fx, "x"), Some(2));
}

fn cached_i64(fx: &Fixture, key: &str) -> Option<i64> {
    fx.client.cache().get_json::<i64>(key).unwrap()
}
