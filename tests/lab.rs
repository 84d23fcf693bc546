//! The lab's guarantees, against the real Postgres and Redis.

mod common;

use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::Duration;

use cacheaside::{CacheAside, Client, Error, ErrorKind, UserProfile};
use common::{Fixture, test_config};

#[test]
fn hit_does_not_touch_postgres() {
    let fx = Fixture::new("hit");
    let before = fx.queries();
    let miss = fx.client.get_user_profile(1).unwrap().expect("seeded");
    assert_eq!(
        fx.queries(),
        before + 1,
        "a miss sends exactly one statement"
    );
    assert_eq!(miss.name, "Ada Lovelace");
    assert!(fx.client.cache().exists(&Client::user_key(1)).unwrap());

    for _ in 0..10 {
        let hit = fx.client.get_user_profile(1).unwrap();
        assert_eq!(hit.as_ref(), Some(&miss));
        let hit = fx.client.get_user_profile_singleflight(1).unwrap();
        assert_eq!(hit.as_ref(), Some(&miss));
    }
    assert_eq!(fx.queries(), before + 1, "hits send no statement");
}

#[test]
fn cached_value_is_what_the_cache_holds() {
    // Proves the hit path reads Redis, not a private copy: change the cached
    // entry behind the client's back and the next read returns it.
    let fx = Fixture::new("cached");
    let mut profile = fx.client.get_user_profile(2).unwrap().unwrap();
    profile.plan = "planted".into();
    fx.client
        .cache()
        .set_json(&Client::user_key(2), &profile, Duration::from_secs(60))
        .unwrap();
    assert_eq!(
        fx.client.get_user_profile(2).unwrap().unwrap().plan,
        "planted"
    );
}

#[test]
fn write_invalidates() {
    let fx = Fixture::new("write");
    assert_eq!(fx.client.get_user_profile(2).unwrap().unwrap().plan, "free");
    let key = Client::user_key(2);
    assert!(fx.client.cache().exists(&key).unwrap());

    assert!(fx.client.update_user_plan(2, "pro").unwrap());
    assert!(
        !fx.client.cache().exists(&key).unwrap(),
        "update deletes the entry"
    );

    let before = fx.queries();
    let fresh = fx.client.get_user_profile(2).unwrap().unwrap();
    assert_eq!(fresh.plan, "pro");
    assert_eq!(fresh.version, 2, "every update bumps the version");
    assert_eq!(fx.queries(), before + 1, "the read after a write reloads");
}

#[test]
fn update_of_missing_user_is_false() {
    let fx = Fixture::new("upd_missing");
    assert!(!fx.client.update_user_plan(999, "pro").unwrap());
    assert_eq!(
        fx.client
            .update_user_plan_write_through(999, "pro")
            .unwrap(),
        None
    );
}

#[test]
fn missing_user_is_none() {
    let fx = Fixture::new("missing");
    assert_eq!(fx.client.get_user_profile(404).unwrap(), None);
    assert_eq!(fx.client.get_user_profile_singleflight(405).unwrap(), None);
}

#[test]
fn negative_cache_absorbs_a_flood_until_an_insert() {
    let fx = Fixture::new("negative");
    let before = fx.queries();
    for _ in 0..50 {
        assert_eq!(fx.client.get_user_profile(77).unwrap(), None);
    }
    assert_eq!(
        fx.queries(),
        before + 1,
        "one query, then the absent entry answers"
    );
    let ttl_ms: i64 = fx
        .client
        .cache()
        .with_connection(|c| {
            redis::cmd("PTTL")
                .arg(fx.client.cache().redis_key("user:77"))
                .query(c)
        })
        .unwrap();
    assert!(
        ttl_ms > 0 && ttl_ms <= fx.config.negative_ttl.as_millis() as i64,
        "absent entries use the shorter negative TTL, got {ttl_ms} ms"
    );

    assert!(
        fx.client
            .insert_user(77, "New", "new@example.com", "free")
            .unwrap()
    );
    let fresh = fx
        .client
        .get_user_profile(77)
        .unwrap()
        .expect("insert invalidated the absent entry");
    assert_eq!(fresh.name, "New");
}

#[test]
fn seeding_is_idempotent() {
    let fx = Fixture::new("seed");
    fx.client.seed_demo_users().unwrap();
    let sql = format!("SELECT count(*) FROM {}", fx.config.users_table);
    let count: i64 = fx.client.db().query_opt(&sql, &[]).unwrap().unwrap().get(0);
    assert_eq!(count, 5);
}

#[test]
fn fifty_cold_readers_cost_one_query() {
    let fx = Fixture::new("sf50");
    let row = fx.assert_cold_readers_cost_one_query(50);
    assert_eq!(row.name, "Grace Hopper");
}

#[test]
fn plain_path_stampede_queries_more_than_once_but_caches_one_row() {
    // The contrast to the single-flight test: the naive path lets every
    // cold reader through (the lab's "queries: many"). The loader blocks
    // until all have called it, so the count is exact, not a race.
    let fx = Fixture::new("plain50");
    let threads = 8;
    let barrier = Barrier::new(threads);
    let loads = Barrier::new(threads);
    let calls = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                barrier.wait();
                let v: Option<u32> = fx
                    .client
                    .engine()
                    .get_or_load_uncoalesced("plain", Duration::from_secs(60), || {
                        calls.fetch_add(1, Ordering::SeqCst);
                        loads.wait();
                        Ok(Some(9))
                    })
                    .unwrap();
                assert_eq!(v, Some(9));
            });
        }
    });
    assert_eq!(calls.load(Ordering::SeqCst), threads);
    assert_eq!(fx.client.cache().get_json::<u32>("plain").unwrap(), Some(9));
}

#[test]
fn loader_error_reaches_every_waiter_and_the_next_call_retries() {
    let fx = Fixture::new("loaderr");
    let engine = fx.client.engine();
    let threads = 20;
    let barrier = Barrier::new(threads);
    let joined = AtomicUsize::new(0);
    let calls = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                barrier.wait();
                joined.fetch_add(1, Ordering::SeqCst);
                let got: Result<Option<u32>, Error> =
                    engine.get_or_load("k", Duration::from_secs(60), || {
                        calls.fetch_add(1, Ordering::SeqCst);
                        // Hold the flight open until every thread has at least
                        // entered the call, so most join it as followers.
                        while joined.load(Ordering::SeqCst) < threads {
                            std::thread::yield_now();
                        }
                        std::thread::sleep(Duration::from_millis(50));
                        Err(Error::loader(std::io::Error::other("upstream down")))
                    });
                let err = got.expect_err("every caller sees the failure");
                assert_eq!(err.kind(), ErrorKind::Loader);
                assert!(err.chain().contains("upstream down"), "{}", err.chain());
            });
        }
    });
    let failed_loads = calls.load(Ordering::SeqCst);
    assert!(
        failed_loads >= 1 && failed_loads < threads,
        "waiters shared the failure ({failed_loads} loads)"
    );
    assert_eq!(engine.in_flight(), 0);
    assert!(
        !fx.client.cache().exists("k").unwrap(),
        "a failure is not cached"
    );
    // Nothing is left locked: the next call loads at once.
    let v: Option<u32> = engine
        .get_or_load("k", Duration::from_secs(60), || Ok(Some(1)))
        .unwrap();
    assert_eq!(v, Some(1));
}

#[test]
fn loader_panic_wakes_waiters_with_an_error() {
    let fx = Fixture::new("panic");
    let engine = fx.client.engine();
    let threads = 10;
    let barrier = Barrier::new(threads);
    let joined = AtomicUsize::new(0);
    let outcomes: Vec<std::thread::Result<Result<Option<u32>, Error>>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    barrier.wait();
                    joined.fetch_add(1, Ordering::SeqCst);
                    engine.get_or_load::<u32, _>("boom", Duration::from_secs(60), || {
                        while joined.load(Ordering::SeqCst) < threads {
                            std::thread::yield_now();
                        }
                        std::thread::sleep(Duration::from_millis(50));
                        panic!("loader bug");
                    })
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join()).collect()
    });
    let panicked = outcomes.iter().filter(|o| o.is_err()).count();
    let told = outcomes
        .iter()
        .filter(|o| matches!(o, Ok(Err(e)) if e.kind() == ErrorKind::Panicked))
        .count();
    assert!(
        panicked >= 1,
        "the leader's panic propagates to its own caller"
    );
    assert_eq!(
        panicked + told,
        threads,
        "every other caller got the Panicked error"
    );
    assert_eq!(engine.in_flight(), 0);
    // The panicking leader released its lease and lock on the way out.
    let v: Option<u32> = engine
        .get_or_load("boom", Duration::from_secs(60), || Ok(Some(2)))
        .unwrap();
    assert_eq!(v, Some(2));
}

#[test]
fn per_key_state_is_freed_after_many_distinct_keys() {
    let fx = Fixture::new("perkey");
    let engine = fx.client.engine();
    let threads = 8;
    let per_thread = 2_000;
    std::thread::scope(|s| {
        for t in 0..threads {
            s.spawn(move || {
                for i in 0..per_thread {
                    let key = format!("k:{t}:{i}");
                    let v: Option<u64> = engine
                        .get_or_load(&key, Duration::from_secs(5), || Ok(Some(i)))
                        .unwrap();
                    assert_eq!(v, Some(i));
                }
            });
        }
    });
    assert_eq!(
        engine.in_flight(),
        0,
        "no per-key state outlives its flight"
    );
}

#[test]
fn corrupt_entry_is_a_miss_and_is_deleted() {
    let fx = Fixture::new("corrupt");
    let key = Client::user_key(4);
    for raw in [
        &b"not an entry"[..],
        b"ca1 v 1 2 3\n{broken json",
        b"ca1 v 1 2 3\n[1,2,3]",
        b"\xff\xfe",
    ] {
        fx.put_raw(&key, raw);
        let corrupt_before = fx.client.engine().stats().corrupt_entries;
        let before = fx.queries();
        let got = fx
            .client
            .get_user_profile(4)
            .unwrap()
            .expect("loaded from Postgres");
        assert_eq!(got.name, "Edsger Dijkstra");
        assert_eq!(fx.queries(), before + 1, "a corrupt entry is a miss");
        assert_eq!(
            fx.client.engine().stats().corrupt_entries,
            corrupt_before + 1
        );
        // The miss refilled the key with a good entry.
        assert_eq!(
            fx.client.cache().get_json::<UserProfile>(&key).unwrap(),
            Some(got)
        );
    }
    // Through the single-flight path too.
    fx.put_raw(&key, b"garbage");
    assert!(
        fx.client
            .get_user_profile_singleflight(4)
            .unwrap()
            .is_some()
    );
    // The raw accessor reports corruption instead of hiding it.
    fx.put_raw(&key, b"garbage");
    let err = fx.client.cache().get_json::<UserProfile>(&key).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::CorruptEntry);
}

#[test]
fn bad_input_is_rejected_with_clear_errors() {
    let fx = Fixture::new("badinput");
    for plan in ["", "   "] {
        let err = fx.client.update_user_plan(1, plan).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
        assert!(err.to_string().contains("plan"));
    }
    let err = fx
        .client
        .engine()
        .get_or_load::<u32, _>("", Duration::from_secs(1), || Ok(None))
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    let err = fx
        .client
        .engine()
        .get_or_load::<u32, _>("k", Duration::ZERO, || Ok(None))
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    // Braces would end the Redis Cluster hash tag early: refused on a
    // single server too, so keys that work here work on a cluster.
    for key in ["a{b", "a}b", "{x}"] {
        let err = fx
            .client
            .engine()
            .get_or_load::<u32, _>(key, Duration::from_secs(1), || Ok(None))
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{key}");
        let err = fx.client.cache().exists(key).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{key}");
    }

    let mut config = test_config("badtable");
    config.users_table = "users; DROP TABLE users".into();
    let err = Client::open(&config).err().expect("rejected");
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    assert!(err.to_string().contains("not an SQL identifier"), "{err}");

    let mut config = test_config("badns");
    config.namespace = "a{b}".into();
    assert_eq!(
        Client::open(&config).err().map(|e| e.kind()),
        Some(ErrorKind::InvalidArgument)
    );

    let mut config = test_config("badurl");
    config.redis_url = "not a url".into();
    assert_eq!(
        Client::open(&config).err().map(|e| e.kind()),
        Some(ErrorKind::InvalidArgument)
    );
}

#[test]
fn sql_in_values_is_data() {
    let fx = Fixture::new("sqlvalue");
    let plan = "pro'; DROP TABLE users; --";
    assert!(fx.client.update_user_plan(5, plan).unwrap());
    assert_eq!(fx.client.get_user_profile(5).unwrap().unwrap().plan, plan);
}

#[test]
fn a_hung_redis_costs_a_read_one_cache_timeout_and_postgres_answers() {
    // A server that accepts connections and never answers.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let held = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let keep = Arc::clone(&held);
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            keep.lock().push(conn);
        }
    });
    let fx = Fixture::new("hungredis");
    let mut config = fx.config.clone();
    config.redis_url = format!("redis://{addr}/");
    config.cache_timeout = Duration::from_millis(200);
    let client = Client::open(&config).expect("opens while Redis hangs");
    let started = std::time::Instant::now();
    let user = client
        .get_user_profile(1)
        .unwrap()
        .expect("Postgres answers");
    let took = started.elapsed();
    assert_eq!(user.name, "Ada Lovelace");
    assert!(
        took < Duration::from_millis(200) * 3 + common::PATIENCE / 10,
        "bounded by the cache timeout, took {took:?}"
    );
}

#[test]
fn an_unreachable_database_fails_fast_with_its_cause() {
    let mut config = test_config("nodb");
    config.database_url = "postgres://postgres@127.0.0.1:1/test".into();
    let engine = CacheAside::open(&config).expect("opens while the database is down");
    let started = std::time::Instant::now();
    let err = engine
        .get_or_load::<i64, _>("k", Duration::from_secs(1), || {
            Ok(engine
                .db()
                .query_opt("SELECT 1::bigint", &[])?
                .map(|r| r.get(0)))
        })
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Database, "{err:?}");
    assert!(err.chain().contains("cannot connect"), "{}", err.chain());
    assert!(
        started.elapsed() < config.pool_timeout,
        "refused at once, not after the pool timeout ({:?})",
        started.elapsed()
    );
    let _ = engine.cache().delete_namespace();
}

#[test]
fn statement_timeout_is_a_timeout() {
    let mut config = test_config("stmt");
    config.statement_timeout = Duration::from_millis(50);
    let db = cacheaside::Db::connect(&config).unwrap();
    let err = db.query_opt("SELECT pg_sleep(2)", &[]).unwrap_err();
    assert!(err.is_timeout(), "{err:?}");
    // The server cancelled it (57014), so the connection is still good.
    let row = db.query_opt("SELECT 1::int", &[]).unwrap().unwrap();
    assert_eq!(row.get::<_, i32>(0), 1);
}

#[test]
fn generic_engine_caches_any_query() {
    // A non-users use: an aggregate over the table, cached under its own key.
    let fx = Fixture::new("generic");
    let engine = fx.client.engine();
    let sql = format!(
        "SELECT count(*) FROM {} WHERE plan = $1",
        fx.config.users_table
    );
    let count_plan = |plan: &str| -> cacheaside::Result<Option<i64>> {
        engine.get_or_load(
            &format!("plan-count:{plan}"),
            Duration::from_secs(60),
            || Ok(engine.db().query_opt(&sql, &[&plan])?.map(|r| r.get(0))),
        )
    };
    let before = fx.queries();
    assert_eq!(count_plan("free").unwrap(), Some(2));
    assert_eq!(count_plan("free").unwrap(), Some(2));
    assert_eq!(fx.queries(), before + 1);
    engine.invalidate("plan-count:free").unwrap();
    fx.set_plan_directly(1, "free");
    assert_eq!(count_plan("free").unwrap(), Some(3));
}

#[test]
fn ttls_beyond_the_maximum_are_rejected_not_silently_uncached() {
    // `UINT64_MAX` ms (a natural "forever" from C) made Redis refuse PX:
    // nothing was ever cached, and followers were served one per round.
    let fx = Fixture::new("ttl_max");
    let engine = fx.client.engine();
    for ttl in [Duration::from_millis(u64::MAX), cacheaside::MAX_TTL * 2] {
        let err = engine
            .get_or_load::<u32, _>("k", ttl, || Ok(Some(1)))
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
        assert!(err.to_string().contains("maximum TTL"), "{err}");
    }
    let v: Option<u32> = engine
        .get_or_load("k", cacheaside::MAX_TTL, || Ok(Some(1)))
        .unwrap();
    assert_eq!(v, Some(1));
    assert!(
        fx.client.cache().exists("k").unwrap(),
        "the longest TTL caches"
    );
}

#[test]
fn a_loader_that_reads_its_own_key_is_told_at_once() {
    // It used to wait for itself until the follower deadline (tens of
    // seconds), then time out.
    let fx = Fixture::new("reentrant");
    let engine = fx.client.engine();
    let started = std::time::Instant::now();
    let outer: cacheaside::Result<Option<u32>> =
        engine.get_or_load("self", Duration::from_secs(60), || {
            let inner =
                engine.get_or_load::<u32, _>("self", Duration::from_secs(60), || Ok(Some(2)));
            let err = inner.expect_err("a loader cannot wait for itself");
            assert_eq!(err.kind(), ErrorKind::InvalidArgument);
            assert!(err.to_string().contains("same key"), "{err}");
            // Other keys are fine from inside a loader.
            let other: Option<u32> =
                engine.get_or_load("other", Duration::from_secs(60), || Ok(Some(3)))?;
            Ok(other)
        });
    assert_eq!(outer.unwrap(), Some(3));
    assert!(started.elapsed() < common::PATIENCE / 10, "told at once");
    assert_eq!(engine.in_flight(), 0);
}

#[test]
fn deleting_a_namespace_leaves_one_that_starts_with_it_alone() {
    // `delete_namespace` matched `fp7:*`, which also deleted every key of
    // `fp7:v2:`.
    let base = common::unique("nsprefix");
    let mut short = test_config("nsprefix_a");
    short.namespace = format!("{base}:");
    let mut long = test_config("nsprefix_b");
    long.namespace = format!("{base}:v2:");
    let a = cacheaside::Cache::connect(&short).unwrap();
    let b = cacheaside::Cache::connect(&long).unwrap();
    a.set_json("k", &1, Duration::from_secs(60)).unwrap();
    b.set_json("k", &2, Duration::from_secs(60)).unwrap();
    assert_eq!(a.delete_namespace().unwrap(), 1);
    assert_eq!(a.get_json::<i32>("k").unwrap(), None);
    assert_eq!(
        b.get_json::<i32>("k").unwrap(),
        Some(2),
        "the other survives"
    );
    assert_eq!(b.delete_namespace().unwrap(), 1);
}

#[test]
fn a_foreign_value_under_our_keys_is_removed_and_reloaded() {
    // A list under a value key made every read fail with WRONGTYPE for
    // ever; a value without a TTL under a `:lease` key turned fills off for
    // ever. Both are now treated like a corrupt entry.
    let fx = Fixture::new("foreign");
    let key = Client::user_key(5);
    let value_key = fx.client.cache().redis_key(&key);
    let run = |cmd: redis::Cmd| {
        fx.client
            .cache()
            .with_connection(|c| cmd.query::<()>(c))
            .unwrap()
    };
    run(redis::cmd("RPUSH").arg(&value_key).arg("x").clone());
    let corrupt_before = fx.client.engine().stats().corrupt_entries;
    let got = fx
        .client
        .get_user_profile(5)
        .unwrap()
        .expect("from Postgres");
    assert_eq!(got.name, "Barbara Liskov");
    assert_eq!(
        fx.client.engine().stats().corrupt_entries,
        corrupt_before + 1
    );
    let before = fx.queries();
    assert_eq!(fx.client.get_user_profile(5).unwrap(), Some(got.clone()));
    assert_eq!(fx.queries(), before, "reloaded and cached again: a hit");

    // A stray lease: a string with no TTL (ours always have one).
    fx.client.engine().invalidate(&key).unwrap();
    run(redis::cmd("SET")
        .arg(format!("{value_key}:lease"))
        .arg("not-ours")
        .clone());
    assert_eq!(fx.client.get_user_profile(5).unwrap(), Some(got.clone()));
    assert!(
        fx.client.cache().exists(&key).unwrap(),
        "the fill went through: the stray lease was swept"
    );
    // And a foreign type under the lock key does not block single-flight.
    fx.client.engine().invalidate(&key).unwrap();
    run(redis::cmd("SADD")
        .arg(format!("{value_key}:lock"))
        .arg("x")
        .clone());
    assert_eq!(
        fx.client.get_user_profile_singleflight(5).unwrap(),
        Some(got)
    );
    assert!(fx.client.cache().exists(&key).unwrap());
}
