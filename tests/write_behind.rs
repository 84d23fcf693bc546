//! Durable write-behind on the real servers: a change is read at once in
//! every process, reaches Postgres exactly once in effect whatever dies,
//! waits out a Postgres outage, dead-letters what Postgres always refuses,
//! and is never dropped, not even by a full backlog.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex, mpsc};
use std::time::{Duration, Instant};

use cacheaside::{Client, Config, ErrorKind, UserProfile};
use common::proxy::{Fault, FaultProxy};
use common::{Fixture, Meet, PATIENCE, test_config, unique};

/// The settings these tests share: a short claim timeout (a dead worker's
/// changes move on after a second) and quick retries.
fn wb_config(label: &str) -> Config {
    let mut config = test_config(label);
    config.write_behind_claim_after = Duration::from_secs(1);
    config.write_behind_retry_backoff = Duration::from_millis(20);
    config.write_behind_attempts = 3;
    config
}

/// Another client on the fixture's table and namespace, as another process
/// would have one (no relay: the fixture's runs it).
fn another_process(fx: &Fixture) -> Client {
    let mut config = fx.config.clone();
    config.invalidation_relay = false;
    Client::open(&config).unwrap()
}

/// The write-behind stream's Redis key.
fn stream_key(fx: &Fixture) -> String {
    format!("{}{{write_behind}}:stream", fx.config.namespace)
}

/// A user's committed row: plan, version, and the row version's `xmin` and
/// `updated_at` (both change whenever the row is written, even to the same
/// values).
fn row(fx: &Fixture, id: i64) -> (String, i64, String) {
    let sql = format!(
        "SELECT plan, version, xmin::text || '/' || updated_at::text FROM {} WHERE id = $1",
        fx.config.users_table
    );
    let r = fx.client.db().query_opt(&sql, &[&id]).unwrap().unwrap();
    (r.get(0), r.get(1), r.get(2))
}

/// Appends an entry to the stream by hand (a late or replayed delivery,
/// or garbage).
fn xadd(fx: &Fixture, fields: &[(&str, String)]) {
    let stream = stream_key(fx);
    fx.client
        .cache()
        .with_connection(|c| {
            let mut cmd = redis::cmd("XADD");
            cmd.arg(&stream).arg("*");
            for (f, v) in fields {
                cmd.arg(*f).arg(v);
            }
            cmd.query::<String>(c)
        })
        .unwrap();
}

/// A user's profile JSON as an enqueue builds it.
fn profile_json(fx: &Fixture, id: i64, plan: &str, seq: u64) -> String {
    let current = fx.client.get_user_profile(id).unwrap().unwrap();
    serde_json::to_string(&UserProfile {
        plan: plan.into(),
        version: seq as i64,
        ..current
    })
    .unwrap()
}

#[test]
fn a_change_is_read_at_once_everywhere_and_reaches_postgres_after_drain() {
    let fx = Fixture::with(wb_config("wb_basic"));
    let elsewhere = another_process(&fx);
    assert_eq!(elsewhere.get_user_profile(1).unwrap().unwrap().plan, "pro"); // cached there
    let before = fx.queries();
    let seq = fx
        .client
        .update_user_plan_write_behind(1, "team")
        .unwrap()
        .expect("user 1 exists");
    assert_eq!(
        fx.queries(),
        before,
        "a cached profile: no statement at all"
    );
    for reader in [&fx.client, &elsewhere] {
        let now = reader.get_user_profile(1).unwrap().unwrap();
        assert_eq!((now.plan.as_str(), now.version as u64), ("team", seq));
    }
    assert_eq!(row(&fx, 1).0, "pro", "not in Postgres yet");
    assert_eq!(fx.client.write_behind_pending().unwrap(), 1);

    fx.client.start_write_behind(2).unwrap();
    fx.client.drain_write_behind(PATIENCE).unwrap();
    let (plan, version, _) = row(&fx, 1);
    assert_eq!((plan.as_str(), version as u64), ("team", seq));
    assert_eq!(fx.client.write_behind_pending().unwrap(), 0);
    let stats = fx.client.engine().stats();
    assert_eq!(
        (stats.write_behind_enqueued, stats.write_behind_applied),
        (1, 1)
    );
    assert_eq!(stats.write_behind_dead_lettered, 0);
    // The committed row replaced the cached change: readers load it.
    let before = fx.queries();
    let now = fx.client.get_user_profile(1).unwrap().unwrap();
    assert_eq!((now.plan.as_str(), now.version as u64), ("team", seq));
    assert_eq!(
        fx.queries(),
        before + 1,
        "the workers' statements are not counted"
    );
}

#[test]
fn a_missing_user_is_not_found_and_nothing_is_enqueued() {
    let fx = Fixture::with(wb_config("wb_missing"));
    assert_eq!(
        fx.client.update_user_plan_write_behind(42, "pro").unwrap(),
        None
    );
    assert_eq!(fx.client.write_behind_pending().unwrap(), 0);
    let err = fx
        .client
        .update_user_plan_write_behind(1, "  ")
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    assert_eq!(fx.client.engine().stats().write_behind_enqueued, 0);
}

#[test]
fn a_cache_entry_deleted_by_hand_while_pending_reads_the_pending_value() {
    let fx = Fixture::with(wb_config("wb_deleted"));
    let elsewhere = another_process(&fx);
    let seq = fx
        .client
        .update_user_plan_write_behind(3, "pending-plan")
        .unwrap()
        .unwrap();
    let value_key = fx.client.cache().redis_key(&Client::user_key(3));
    let delete_by_hand = || {
        fx.client
            .cache()
            .with_connection(|c| redis::cmd("DEL").arg(&value_key).query::<i64>(c))
            .unwrap()
    };
    let before = fx.queries();
    assert_eq!(delete_by_hand(), 1);
    let got = fx.client.get_user_profile(3).unwrap().unwrap();
    assert_eq!(
        (got.plan.as_str(), got.version as u64),
        ("pending-plan", seq)
    );
    assert_eq!(
        delete_by_hand(),
        1,
        "the read stored the pending value again"
    );
    let got = elsewhere.get_user_profile_singleflight(3).unwrap().unwrap();
    assert_eq!(
        (got.plan.as_str(), got.version as u64),
        ("pending-plan", seq)
    );
    assert_eq!(fx.queries(), before, "no read loaded the older row");
    assert_eq!(
        row(&fx, 3).0,
        "enterprise",
        "Postgres still has the old row"
    );
}

#[test]
fn a_pending_change_outlives_its_cache_ttl() {
    let mut config = wb_config("wb_expired");
    config.ttl = Duration::from_millis(300);
    let fx = Fixture::with(config);
    let seq = fx
        .client
        .update_user_plan_write_behind(4, "outlived")
        .unwrap()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500)); // the entry expired
    assert!(!fx.client.cache().exists(&Client::user_key(4)).unwrap());
    let before = fx.queries();
    let got = fx.client.get_user_profile(4).unwrap().unwrap();
    assert_eq!((got.plan.as_str(), got.version as u64), ("outlived", seq));
    assert_eq!(fx.queries(), before);
}

#[test]
fn a_reader_that_loaded_the_row_before_an_enqueue_cannot_cache_it() {
    let fx = Fixture::with(wb_config("wb_lease"));
    let key = Client::user_key(4);
    let (loaded, go) = (Arc::new(Meet::new(2)), Arc::new(Meet::new(2)));
    let (l, g, armed) = (Arc::clone(&loaded), Arc::clone(&go), AtomicBool::new(true));
    let watched = key.clone();
    fx.client.engine().hooks().set_after_load(move |k| {
        if k == watched && armed.swap(false, Ordering::SeqCst) {
            l.wait();
            g.wait();
        }
    });
    let seq = std::thread::scope(|s| {
        let reader = s.spawn(|| fx.client.get_user_profile(4).unwrap().unwrap());
        loaded.wait(); // the reader holds the lease and the old row
        let seq = fx
            .client
            .update_user_plan_write_behind(4, "behind")
            .unwrap()
            .unwrap();
        go.wait(); // now it fills
        // Its call began before the enqueue returned: the old row is a
        // correct answer for it; caching it would not be.
        assert_eq!(reader.join().unwrap().plan, "free");
        seq
    });
    assert!(fx.client.engine().stats().fills_dropped >= 1);
    let got = fx.client.get_user_profile(4).unwrap().unwrap();
    assert_eq!((got.plan.as_str(), got.version as u64), ("behind", seq));
}

#[test]
fn a_full_backlog_refuses_the_enqueue_and_drops_nothing() {
    let mut config = wb_config("wb_backlog");
    config.write_behind_max_backlog = 10;
    let fx = Fixture::with(config);
    let mut newest = HashMap::new();
    for i in 0..10 {
        let id = i % 5 + 1;
        let plan = format!("queued-{i}");
        let seq = fx
            .client
            .update_user_plan_write_behind(id, &plan)
            .unwrap()
            .unwrap();
        newest.insert(id, (plan, seq));
    }
    let err = fx
        .client
        .update_user_plan_write_behind(1, "refused")
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::BacklogFull, "{err:?}");
    assert!(err.is_backlog_full());
    assert_eq!(fx.client.write_behind_pending().unwrap(), 10);
    assert_eq!(
        fx.client.get_user_profile(1).unwrap().unwrap().plan,
        "queued-5",
        "the refused change was not taken"
    );

    fx.client.start_write_behind(1).unwrap();
    fx.client.drain_write_behind(PATIENCE).unwrap();
    for (id, (plan, seq)) in &newest {
        let (got, version, _) = row(&fx, *id);
        assert_eq!((&got, version as u64), (plan, *seq), "user {id}");
    }
    assert_eq!(fx.client.write_behind_pending().unwrap(), 0);
    let stats = fx.client.engine().stats();
    assert_eq!(stats.write_behind_enqueued, 10);
    assert_eq!(
        stats.write_behind_applied + stats.write_behind_coalesced,
        10
    );
    // Room again.
    assert!(
        fx.client
            .update_user_plan_write_behind(1, "after")
            .unwrap()
            .is_some()
    );
}

#[test]
fn a_hot_key_is_coalesced_and_only_its_newest_change_is_written() {
    let mut config = wb_config("wb_hot");
    config.write_behind_batch = 1000;
    let fx = Fixture::with(config);
    let mut last = 0;
    for i in 0..200 {
        let seq = fx
            .client
            .update_user_plan_write_behind(5, &format!("hot-{i}"))
            .unwrap()
            .unwrap();
        assert!(seq > last, "sequence numbers grow per key");
        last = seq;
    }
    fx.client.start_write_behind(1).unwrap();
    fx.client.drain_write_behind(PATIENCE).unwrap();
    let (plan, version, _) = row(&fx, 5);
    assert_eq!((plan.as_str(), version as u64), ("hot-199", last));
    let stats = fx.client.engine().stats();
    // One read took all 200 (the batch holds 1000): one row written.
    assert_eq!(
        (stats.write_behind_applied, stats.write_behind_coalesced),
        (1, 199)
    );
}

#[test]
fn a_replayed_or_overtaken_change_changes_nothing() {
    let fx = Fixture::with(wb_config("wb_guard"));
    let first = fx
        .client
        .update_user_plan_write_behind(1, "first")
        .unwrap()
        .unwrap();
    let first_json = profile_json(&fx, 1, "first", first);
    let second = fx
        .client
        .update_user_plan_write_behind(1, "second")
        .unwrap()
        .unwrap();
    let second_json = profile_json(&fx, 1, "second", second);
    fx.client.start_write_behind(1).unwrap();
    fx.client.drain_write_behind(PATIENCE).unwrap();
    let written = row(&fx, 1);
    assert_eq!((written.0.as_str(), written.1 as u64), ("second", second));

    // The older change delivered late, and the newer one delivered again.
    xadd(
        &fx,
        &[
            ("k", Client::user_key(1)),
            ("s", first.to_string()),
            ("v", first_json),
        ],
    );
    xadd(
        &fx,
        &[
            ("k", Client::user_key(1)),
            ("s", second.to_string()),
            ("v", second_json),
        ],
    );
    fx.client.drain_write_behind(PATIENCE).unwrap();
    assert_eq!(row(&fx, 1), written, "the row was not written again");
    assert!(
        fx.client
            .engine()
            .write_behind_dead_letters(10)
            .unwrap()
            .is_empty()
    );
    let now = fx.client.get_user_profile(1).unwrap().unwrap();
    assert_eq!((now.plan.as_str(), now.version as u64), ("second", second));
}

#[test]
fn a_synchronous_write_supersedes_a_pending_change() {
    let fx = Fixture::with(wb_config("wb_mixed"));
    // A write-through after an enqueue: the cache holds its row at once.
    fx.client
        .update_user_plan_write_behind(2, "behind")
        .unwrap()
        .unwrap();
    let through = fx
        .client
        .update_user_plan_write_through(2, "through")
        .unwrap()
        .unwrap();
    assert_eq!(fx.client.get_user_profile(2).unwrap().unwrap(), through);
    // An update (write, then invalidate) after an enqueue.
    fx.client
        .update_user_plan_write_behind(3, "behind")
        .unwrap()
        .unwrap();
    assert!(fx.client.update_user_plan(3, "direct").unwrap());
    assert_eq!(
        fx.client.get_user_profile(3).unwrap().unwrap().plan,
        "direct"
    );
    // A change enqueued after a synchronous write is written as usual.
    fx.client
        .update_user_plan_write_behind(4, "behind-1")
        .unwrap()
        .unwrap();
    assert!(fx.client.update_user_plan(4, "direct").unwrap());
    let last = fx
        .client
        .update_user_plan_write_behind(4, "behind-2")
        .unwrap()
        .unwrap();

    // Flushed after the synchronous writes: they stay.
    fx.client.start_write_behind(1).unwrap();
    fx.client.drain_write_behind(PATIENCE).unwrap();
    assert_eq!(
        (row(&fx, 2).0.as_str(), row(&fx, 2).1),
        ("through", through.version)
    );
    assert_eq!(row(&fx, 3).0, "direct");
    assert_eq!(
        (row(&fx, 4).0.as_str(), row(&fx, 4).1 as u64),
        ("behind-2", last)
    );
    for (id, plan) in [(2, "through"), (3, "direct"), (4, "behind-2")] {
        assert_eq!(fx.client.get_user_profile(id).unwrap().unwrap().plan, plan);
    }
    assert!(
        fx.client
            .engine()
            .write_behind_dead_letters(10)
            .unwrap()
            .is_empty()
    );
    assert_eq!(fx.client.write_behind_pending().unwrap(), 0);
}

/// Enqueues `behind` for user `id`, then sets `direct` as psql or another
/// service would, leaving the version to the capture trigger.
fn enqueue_then_update_directly(fx: &Fixture, id: i64) {
    fx.client
        .update_user_plan_write_behind(id, "behind")
        .unwrap()
        .unwrap();
    let direct = format!(
        "UPDATE {} SET plan = 'direct', updated_at = now() WHERE id = $1",
        fx.config.users_table
    );
    assert_eq!(fx.client.db().execute(&direct, &[&id]).unwrap(), 1);
}

/// SQL that bypasses the library (psql, another service) after an enqueue
/// is the later write: the flush must not land over it, and once the relay
/// has applied it, reads get it rather than the pending change.
#[test]
fn a_direct_sql_write_after_an_enqueue_is_not_overwritten_by_its_flush() {
    let fx = Fixture::with(wb_config("wb_direct_after"));
    enqueue_then_update_directly(&fx, 2);
    // The relay (the fixture's client runs it) takes the pending change
    // back: reads get the direct write, not the older change.
    let deadline = Instant::now() + PATIENCE;
    while fx.client.get_user_profile(2).unwrap().unwrap().plan != "direct" {
        assert!(Instant::now() < deadline, "the direct write never read");
        std::thread::sleep(Duration::from_millis(5));
    }
    fx.client.start_write_behind(1).unwrap();
    fx.client.drain_write_behind(PATIENCE).unwrap();
    assert_eq!(row(&fx, 2).0, "direct", "Postgres keeps the later write");
    assert_eq!(
        fx.client.get_user_profile(2).unwrap().unwrap().plan,
        "direct"
    );
    // And a change enqueued after the direct write is written as usual.
    fx.client
        .update_user_plan_write_behind(2, "behind-again")
        .unwrap()
        .unwrap();
    fx.client.drain_write_behind(PATIENCE).unwrap();
    assert_eq!(row(&fx, 2).0, "behind-again");
}

/// The same when the worker flushes before the relay has seen the direct
/// write: the row's version, stamped by the capture trigger, already
/// orders the two.
#[test]
fn a_flush_before_the_relay_sees_a_direct_write_does_not_land_over_it() {
    let mut config = wb_config("wb_direct_first");
    config.invalidation_relay = false;
    let fx = Fixture::with(config);
    enqueue_then_update_directly(&fx, 2);
    fx.client.start_write_behind(1).unwrap();
    fx.client.drain_write_behind(PATIENCE).unwrap();
    assert_eq!(row(&fx, 2).0, "direct", "Postgres keeps the later write");
    assert!(
        fx.client
            .engine()
            .write_behind_dead_letters(10)
            .unwrap()
            .is_empty()
    );
}

#[test]
fn a_flush_between_a_synchronous_commit_and_its_cache_step_does_not_land_over_it() {
    let fx = Fixture::with(wb_config("wb_race"));
    let mut config = fx.config.clone();
    config.invalidation_relay = false;
    let workers = Arc::new(Client::open(&config).unwrap());
    // Right after a synchronous write committed, and before its cache step,
    // a worker tries to flush the pending change of the same key: it must
    // hold it (a writer is in progress), not write it.
    let w = Arc::clone(&workers);
    fx.client.engine().hooks().set_after_write(move |_| {
        let stats = w.engine().stats();
        if w.engine().write_behind_workers() == 0 {
            w.start_write_behind(1).unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            let now = w.engine().stats();
            if now.write_behind_retried > stats.write_behind_retried
                || now.write_behind_applied > stats.write_behind_applied
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    });
    fx.client
        .update_user_plan_write_behind(2, "behind")
        .unwrap()
        .unwrap();
    let through = fx
        .client
        .update_user_plan_write_through(2, "through")
        .unwrap()
        .unwrap();
    workers.stop_write_behind();
    fx.client
        .update_user_plan_write_behind(3, "behind")
        .unwrap()
        .unwrap();
    assert!(fx.client.update_user_plan(3, "direct").unwrap());

    assert_eq!(workers.engine().write_behind_workers(), 1, "the hook ran");
    fx.client.drain_write_behind(PATIENCE).unwrap();
    assert_eq!(
        (row(&fx, 2).0.as_str(), row(&fx, 2).1),
        ("through", through.version)
    );
    assert_eq!(row(&fx, 3).0, "direct");
    assert_eq!(
        fx.client.get_user_profile(2).unwrap().unwrap().plan,
        "through"
    );
    assert_eq!(
        fx.client.get_user_profile(3).unwrap().unwrap().plan,
        "direct"
    );
    assert_eq!(workers.engine().stats().write_behind_applied, 0);
}

/// Every write path mixed on the same keys: update, write-through,
/// write-behind, and SQL that bypasses the library (the relay invalidates
/// it). One writer thread per group of keys, so each key's writes are
/// ordered; readers alongside, workers flushing. No read older than a
/// library write that finished before it began; every key's last write
/// (whatever its path) read within 1 s of the end; and Postgres ends with
/// every key's last write: a direct write is not overwritten by a
/// write-behind change enqueued before it.
#[test]
fn every_write_path_mixed_on_the_same_keys_keeps_the_last_write() {
    const WRITERS: usize = 4;
    const READERS: usize = 4;
    const KEYS_PER_WRITER: i64 = 2;
    const KEYS: i64 = WRITERS as i64 * KEYS_PER_WRITER;
    // 3 s in CI; `MIXED_SOAK_SECS=20` for the longer soak.
    let run = Duration::from_secs(
        std::env::var("MIXED_SOAK_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(3),
    );
    let fx = Fixture::with(wb_config("wb_mixed_soak"));
    for id in 6..=KEYS {
        fx.client
            .insert_user(
                id,
                &format!("user {id}"),
                &format!("u{id}@example.com"),
                "free",
            )
            .unwrap();
    }
    fx.client.start_write_behind(2).unwrap();
    let number = |plan: &str| -> u64 {
        plan.strip_prefix('n')
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    // Per key: the number of the last write that has returned, and of the
    // last library write that has.
    let done: Vec<AtomicU64> = (0..=KEYS).map(|_| AtomicU64::new(0)).collect();
    let library: Vec<AtomicU64> = (0..=KEYS).map(|_| AtomicU64::new(0)).collect();
    let direct = format!(
        "UPDATE {} SET plan = $2, updated_at = now() WHERE id = $1",
        fx.config.users_table
    );
    let stop = AtomicBool::new(false);
    let (reads, stale, writes) = (
        AtomicUsize::new(0),
        AtomicUsize::new(0),
        AtomicUsize::new(0),
    );
    let start = Barrier::new(WRITERS + READERS + 1);
    std::thread::scope(|s| {
        for w in 0..WRITERS {
            let (fx, done, library, direct, stop, writes, start) =
                (&fx, &done, &library, &direct, &stop, &writes, &start);
            s.spawn(move || {
                let write = |id: i64, n: u64, path: u8| {
                    let plan = format!("n{n}");
                    match path {
                        0 => assert!(fx.client.update_user_plan(id, &plan).unwrap()),
                        1 => assert!(
                            fx.client
                                .update_user_plan_write_through(id, &plan)
                                .unwrap()
                                .is_some()
                        ),
                        2 => assert!(
                            fx.client
                                .update_user_plan_write_behind(id, &plan)
                                .unwrap()
                                .is_some()
                        ),
                        // As psql or another service would: the version is
                        // left to the capture trigger.
                        _ => assert_eq!(fx.client.db().execute(direct, &[&id, &plan]).unwrap(), 1),
                    }
                    done[id as usize].store(n, Ordering::SeqCst);
                    if path != 3 {
                        // What a read must not go below: a direct write
                        // reaches the cache through the relay, later.
                        library[id as usize].store(n, Ordering::SeqCst);
                    }
                    writes.fetch_add(1, Ordering::Relaxed);
                };
                start.wait();
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let id = w as i64 * KEYS_PER_WRITER + fastrand::i64(1..=KEYS_PER_WRITER);
                    write(id, n, fastrand::u8(0..4));
                }
                // Each key's last two writes: a change written behind, then
                // SQL that bypasses the library before the change is
                // flushed (most of the time): the SQL is the last write.
                for id in w as i64 * KEYS_PER_WRITER + 1..=(w as i64 + 1) * KEYS_PER_WRITER {
                    write(id, n + 1, 2);
                    write(id, n + 2, 3);
                    n += 2;
                }
            });
        }
        for r in 0..READERS {
            let (fx, library, stop, reads, stale, start) =
                (&fx, &library, &stop, &reads, &stale, &start);
            s.spawn(move || {
                start.wait();
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    let id = fastrand::i64(1..=KEYS);
                    let floor = library[id as usize].load(Ordering::SeqCst);
                    let got = if (i + r) % 2 == 0 {
                        fx.client.get_user_profile(id)
                    } else {
                        fx.client.get_user_profile_singleflight(id)
                    };
                    let got = number(&got.unwrap().unwrap().plan);
                    if got < floor {
                        stale.fetch_add(1, Ordering::Relaxed);
                        eprintln!("user {id}: read n{got} after n{floor} had returned");
                    }
                    reads.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        start.wait();
        std::thread::sleep(run);
        stop.store(true, Ordering::Relaxed);
    });
    let (reads, stale, writes) = (reads.into_inner(), stale.into_inner(), writes.into_inner());
    eprintln!("{writes} writes, {reads} reads, {stale} stale");
    assert!(
        writes > 100 && reads > 100,
        "{writes} writes, {reads} reads"
    );
    assert_eq!(
        stale, 0,
        "reads older than a library write that had returned"
    );
    // Every last write is visible within 1 s (a direct one once the relay
    // has applied it), and is what Postgres holds after the drain.
    let deadline = Instant::now() + Duration::from_secs(1);
    for id in 1..=KEYS {
        let last = done[id as usize].load(Ordering::SeqCst);
        let mut got;
        loop {
            got = number(&fx.client.get_user_profile(id).unwrap().unwrap().plan);
            if got == last || Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(
            got, last,
            "user {id} reads n{got} 1 s after its last write, n{last}"
        );
    }
    fx.client.drain_write_behind(PATIENCE).unwrap();
    for id in 1..=KEYS {
        let last = done[id as usize].load(Ordering::SeqCst);
        assert_eq!(number(&row(&fx, id).0), last, "user {id} in Postgres");
        let got = number(&fx.client.get_user_profile(id).unwrap().unwrap().plan);
        assert_eq!(got, last, "user {id} after the drain");
    }
    assert!(
        fx.client
            .engine()
            .write_behind_dead_letters(10)
            .unwrap()
            .is_empty()
    );
}

#[test]
fn a_change_postgres_always_refuses_is_dead_lettered_and_its_entry_invalidated() {
    let fx = Fixture::with(wb_config("wb_refused"));
    fx.client
        .db()
        .batch_execute(&format!(
            "ALTER TABLE {} ADD CONSTRAINT no_poison CHECK (plan <> 'poison')",
            fx.config.users_table
        ))
        .unwrap();
    let fine = fx
        .client
        .update_user_plan_write_behind(1, "fine")
        .unwrap()
        .unwrap();
    let bad = fx
        .client
        .update_user_plan_write_behind(2, "poison")
        .unwrap()
        .unwrap();
    assert_eq!(
        fx.client.get_user_profile(2).unwrap().unwrap().plan,
        "poison"
    );

    fx.client.start_write_behind(1).unwrap();
    fx.client.drain_write_behind(PATIENCE).unwrap();
    // The good change of the same batch was not held up.
    let (plan, version, _) = row(&fx, 1);
    assert_eq!((plan.as_str(), version as u64), ("fine", fine));
    let dead = fx.client.engine().write_behind_dead_letters(10).unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    let letter = &dead[0];
    assert_eq!(letter.key.as_deref(), Some("user:2"));
    assert_eq!(letter.seq, Some(bad));
    assert_eq!(letter.attempts, 3);
    assert!(letter.error.contains("no_poison"), "{}", letter.error);
    assert!(letter.json.as_deref().unwrap().contains("\"poison\""));
    let stats = fx.client.engine().stats();
    assert_eq!(stats.write_behind_dead_lettered, 1);
    assert_eq!(
        stats.write_behind_retried, 2,
        "attempts 1 and 2 were retried"
    );
    // Invalidated: readers fall back to what Postgres holds.
    assert!(!fx.client.cache().exists(&Client::user_key(2)).unwrap());
    let now = fx.client.get_user_profile(2).unwrap().unwrap();
    assert_eq!((now.plan.as_str(), now.version), ("free", 1));
    assert_eq!(fx.client.write_behind_pending().unwrap(), 0);
}

#[test]
fn an_unparseable_entry_is_dead_lettered_at_once() {
    let fx = Fixture::with(wb_config("wb_poison"));
    let good = fx
        .client
        .update_user_plan_write_behind(3, "good")
        .unwrap()
        .unwrap();
    xadd(
        &fx,
        &[
            ("k", Client::user_key(3)),
            ("s", "not-a-number".into()),
            ("v", "{}".into()),
        ],
    );
    xadd(&fx, &[("garbage", "yes".into())]);
    fx.client.start_write_behind(1).unwrap();
    fx.client.drain_write_behind(PATIENCE).unwrap();
    assert_eq!(row(&fx, 3).1 as u64, good);
    let dead = fx.client.engine().write_behind_dead_letters(10).unwrap();
    assert_eq!(dead.len(), 2, "{dead:?}");
    for letter in &dead {
        assert!(letter.error.starts_with("unparseable"), "{letter:?}");
        assert_eq!(letter.attempts, 0);
    }
    let stats = fx.client.engine().stats();
    assert_eq!(
        (stats.write_behind_dead_lettered, stats.write_behind_retried),
        (2, 0)
    );
}

#[test]
fn postgres_down_while_flushing_changes_wait_and_all_land() {
    let fx = Fixture::with(wb_config("wb_pg_down"));
    // The workers reach Postgres through a proxy; the fixture's client
    // (which enqueues and reads) reaches it directly.
    let mut config = fx.config.clone();
    let url = config.database_url.clone();
    let upstream = url.rsplit('@').next().unwrap().split('/').next().unwrap();
    let proxy = FaultProxy::start(
        std::net::ToSocketAddrs::to_socket_addrs(upstream)
            .unwrap()
            .find(std::net::SocketAddr::is_ipv4)
            .unwrap(),
    );
    config.database_url = url.replace(upstream, &proxy.addr().to_string());
    config.invalidation_relay = false;
    let workers = Client::open(&config).unwrap();
    workers.start_write_behind(2).unwrap();
    proxy.set(Fault::Refuse);

    let mut newest = HashMap::new();
    for i in 0..50 {
        let id = i % 5 + 1;
        let plan = format!("down-{i}");
        let seq = fx
            .client
            .update_user_plan_write_behind(id, &plan)
            .unwrap()
            .unwrap();
        newest.insert(id, (plan, seq));
    }
    let deadline = Instant::now() + PATIENCE;
    while workers.engine().stats().write_behind_retried == 0 {
        assert!(Instant::now() < deadline, "the workers never tried");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(500)); // several retries
    let stats = workers.engine().stats();
    assert_eq!(stats.write_behind_applied, 0);
    assert_eq!(
        stats.write_behind_dead_lettered, 0,
        "an outage is waited out"
    );
    for id in 1..=5 {
        assert_eq!(row(&fx, id).1, 1, "nothing reached Postgres");
        let (plan, seq) = &newest[&id];
        let now = fx.client.get_user_profile(id).unwrap().unwrap();
        assert_eq!((&now.plan, now.version as u64), (plan, *seq));
    }

    proxy.set(Fault::Pass);
    fx.client.drain_write_behind(PATIENCE).unwrap();
    for (id, (plan, seq)) in &newest {
        let (got, version, _) = row(&fx, *id);
        assert_eq!((&got, version as u64), (plan, *seq), "user {id}");
    }
    assert!(
        fx.client
            .engine()
            .write_behind_dead_letters(10)
            .unwrap()
            .is_empty()
    );
    assert_eq!(workers.engine().stats().write_behind_dead_lettered, 0);
}

#[test]
fn a_locked_row_delays_only_its_own_key() {
    let fx = Fixture::with(wb_config("wb_locked"));
    let mut seqs = HashMap::new();
    for id in 1..=5 {
        let seq = fx
            .client
            .update_user_plan_write_behind(id, "behind")
            .unwrap()
            .unwrap();
        seqs.insert(id, seq);
    }
    // Another session holds user 1's row lock until told to let go.
    let (locked_tx, locked) = mpsc::channel::<()>();
    let (release, release_rx) = mpsc::channel::<()>();
    let db = fx.client.db().clone();
    let lock = format!(
        "SELECT 1 FROM {} WHERE id = 1 FOR UPDATE",
        fx.config.users_table
    );
    let holder = std::thread::spawn(move || {
        db.transaction(|tx| {
            tx.query_opt(&lock, &[])?;
            locked_tx.send(()).unwrap();
            let _ = release_rx.recv_timeout(PATIENCE * 2);
            Ok(())
        })
    });
    locked.recv_timeout(PATIENCE).unwrap();
    // Workers whose statements time out quickly; the five changes are one
    // batch (they were enqueued before the workers started).
    let mut config = fx.config.clone();
    config.invalidation_relay = false;
    config.statement_timeout = Duration::from_millis(300);
    let workers = Client::open(&config).unwrap();
    workers.start_write_behind(1).unwrap();

    let deadline = Instant::now() + Duration::from_secs(3);
    while !(2..=5).all(|id| row(&fx, id).1 as u64 == seqs[&id]) {
        assert!(
            Instant::now() < deadline,
            "the unlocked users waited for the locked one: {:?}",
            (2..=5).map(|id| row(&fx, id).1).collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(row(&fx, 1).1, 1, "user 1 is still locked");

    release.send(()).unwrap();
    holder.join().unwrap().unwrap();
    fx.client.drain_write_behind(PATIENCE).unwrap();
    for id in 1..=5 {
        assert_eq!(row(&fx, id).1 as u64, seqs[&id], "user {id}");
    }
    assert_eq!(workers.engine().stats().write_behind_dead_lettered, 0);
}

/// The address behind a `scheme://[user@]host:port/...` URL.
fn server_addr(url: &str) -> std::net::SocketAddr {
    let rest = url.split("://").nth(1).unwrap();
    let host_port = rest.rsplit('@').next().unwrap().split('/').next().unwrap();
    std::net::ToSocketAddrs::to_socket_addrs(host_port)
        .unwrap()
        .find(std::net::SocketAddr::is_ipv4)
        .unwrap()
}

#[test]
fn an_enqueue_is_refused_while_the_breaker_keeps_reads_off_redis() {
    let mut config = wb_config("wb_breaker");
    let proxy = FaultProxy::start(server_addr(&config.redis_url));
    config.redis_url = format!("redis://{}/", proxy.addr());
    config.breaker_failures = 1;
    config.breaker_cool_off = Duration::from_secs(1);
    let fx = Fixture::with(config);
    assert_eq!(fx.client.get_user_profile(1).unwrap().unwrap().plan, "pro");
    // Redis refuses one read: the breaker opens. Redis is back at once, but
    // this process's reads bypass it until the breaker closes.
    proxy.set(Fault::Refuse);
    let _ = fx.client.get_user_profile(2);
    proxy.set(Fault::Pass);
    assert!(fx.client.engine().breaker_open());

    let err = fx
        .client
        .update_user_plan_write_behind(1, "behind")
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Cache, "{err:?}");
    assert!(err.to_string().contains("breaker"), "{err}");
    assert_eq!(fx.client.write_behind_pending().unwrap(), 0, "not enqueued");
    assert_eq!(fx.client.get_user_profile(1).unwrap().unwrap().plan, "pro");

    // Once the breaker has closed, the enqueue is taken and read at once.
    let deadline = Instant::now() + PATIENCE;
    while fx.client.engine().breaker_open() {
        assert!(Instant::now() < deadline, "the breaker never closed");
        let _ = fx.client.get_user_profile(3);
        std::thread::sleep(Duration::from_millis(20));
    }
    let seq = fx
        .client
        .update_user_plan_write_behind(1, "behind")
        .unwrap()
        .unwrap();
    let now = fx.client.get_user_profile(1).unwrap().unwrap();
    assert_eq!((now.plan.as_str(), now.version as u64), ("behind", seq));
}

#[test]
fn any_key_can_be_written_behind_through_a_registered_applier() {
    let fx = Fixture::with(wb_config("wb_generic"));
    let table = counters_applier(&fx);
    let db = fx.client.db().clone();
    let engine = fx.client.engine();
    let ttl = Duration::from_secs(60);
    engine.write_behind("counter:a", ttl, &41_i64).unwrap();
    let seq = engine.write_behind("counter:a", ttl, &42_i64).unwrap();
    let read: Option<i64> = engine
        .get_or_load("counter:a", ttl, || {
            unreachable!("the pending value is cached")
        })
        .unwrap();
    assert_eq!(read, Some(42));
    let err = engine.write_behind("orders:1", ttl, &1).unwrap_err();
    assert_eq!(
        err.kind(),
        ErrorKind::InvalidArgument,
        "no applier: {err:?}"
    );

    fx.client.start_write_behind(1).unwrap();
    fx.client.drain_write_behind(PATIENCE).unwrap();
    let r = db
        .query_opt(&format!("SELECT n, seq FROM {table} WHERE name = 'a'"), &[])
        .unwrap()
        .unwrap();
    assert_eq!((r.get::<_, i64>(0), r.get::<_, i64>(1) as u64), (42, seq));
    fx.client.stop_write_behind();
    db.batch_execute(&format!("DROP TABLE {table}")).unwrap();
}

/// A `counter:` applier over a table of its own, conditional on `seq`, as
/// the docs show it; returns the table's name (dropped by the caller).
fn counters_applier(fx: &Fixture) -> String {
    let table = unique("ca_test_wb_counters");
    fx.client
        .db()
        .batch_execute(&format!(
            "CREATE TABLE {table} (name text PRIMARY KEY, n bigint NOT NULL, seq bigint NOT NULL)"
        ))
        .unwrap();
    let upsert = format!(
        "INSERT INTO {table} (name, n, seq) VALUES ($1, $2, $3)
         ON CONFLICT (name) DO UPDATE SET n = EXCLUDED.n, seq = EXCLUDED.seq
         WHERE {table}.seq < EXCLUDED.seq"
    );
    fx.client
        .engine()
        .register_write_behind("counter:", move |tx, changes| {
            for change in changes {
                let n: i64 = serde_json::from_slice(change.json)
                    .map_err(cacheaside::Error::invalid_argument)?;
                let name = &change.key["counter:".len()..];
                tx.execute(&upsert, &[&name, &n, &(change.seq as i64)])?;
            }
            Ok(())
        })
        .unwrap();
    table
}

/// A counter's committed `(n, seq)`.
fn counter(fx: &Fixture, table: &str, name: &str) -> (i64, u64) {
    let r = fx
        .client
        .db()
        .query_opt(
            &format!("SELECT n, seq FROM {table} WHERE name = $1"),
            &[&name],
        )
        .unwrap()
        .unwrap();
    (r.get(0), r.get::<_, i64>(1) as u64)
}

#[test]
fn a_generic_change_after_a_redis_clock_step_back_still_lands() {
    let fx = Fixture::with(wb_config("wb_clock"));
    let table = counters_applier(&fx);
    let engine = fx.client.engine();
    let ttl = Duration::from_secs(60);
    // The first change is numbered from a Redis clock an hour ahead (as if
    // the cached entry carried that clock's number).
    let now_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64;
    let ahead = now_us + 3_600_000_000;
    let expires_ms = now_us / 1000 + 60_000;
    fx.put_raw(
        "counter:a",
        format!("ca1 v {ahead} 0 {expires_ms}\n0").as_bytes(),
    );
    let first = engine.write_behind("counter:a", ttl, &1_i64).unwrap();
    assert!(first > ahead);
    fx.client.start_write_behind(1).unwrap();
    fx.client.drain_write_behind(PATIENCE).unwrap();
    assert_eq!(counter(&fx, &table, "a"), (1, first));
    // The flush left no value and no pending record; the clock is an hour
    // behind that number now. The next change still follows the first.
    let second = engine.write_behind("counter:a", ttl, &2_i64).unwrap();
    assert!(second > first, "{second} after {first}");
    fx.client.drain_write_behind(PATIENCE).unwrap();
    assert_eq!(counter(&fx, &table, "a"), (2, second));
    fx.client.stop_write_behind();
    fx.client
        .db()
        .batch_execute(&format!("DROP TABLE {table}"))
        .unwrap();
}

#[test]
fn forged_stream_entries_are_dead_lettered_and_write_nothing() {
    let fx = Fixture::with(wb_config("wb_forged"));
    let before: Vec<_> = (1..=5).map(|id| row(&fx, id)).collect();
    let seq = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64)
        .to_string();
    let profile = |id: i64, plan: &str| {
        serde_json::to_string(&UserProfile {
            id,
            name: "forged".into(),
            email: "forged@example.com".into(),
            plan: plan.into(),
            version: 0,
        })
        .unwrap()
    };
    let entry = |key: &str, seq: &str, json: String| {
        vec![("k", key.to_owned()), ("s", seq.to_owned()), ("v", json)]
    };
    // The key says user 1, the JSON says user 2.
    xadd(&fx, &entry("user:1", &seq, profile(2, "hijacked")));
    // A sequence number that would overflow `version + 1`.
    xadd(
        &fx,
        &entry("user:3", &i64::MAX.to_string(), profile(3, "overflow")),
    );
    // Thousands of fields besides a valid change.
    let mut many = entry("user:4", &seq, profile(4, "many"));
    let junk: Vec<(String, String)> = (0..8000).map(|i| (format!("f{i}"), "x".into())).collect();
    many.extend(junk.iter().map(|(f, v)| (f.as_str(), v.clone())));
    xadd(&fx, &many);
    // A value beyond the size bound.
    xadd(
        &fx,
        &entry("user:5", &seq, profile(5, &"x".repeat(2 << 20))),
    );
    // A key that is not a cache key.
    xadd(&fx, &entry("user:{1}", &seq, profile(1, "braces")));

    fx.client.start_write_behind(1).unwrap();
    fx.client.drain_write_behind(PATIENCE).unwrap();
    let after: Vec<_> = (1..=5).map(|id| row(&fx, id)).collect();
    assert_eq!(after, before, "no forged entry wrote Postgres");
    let stats = fx.client.engine().stats();
    assert_eq!(
        (stats.write_behind_dead_lettered, stats.write_behind_applied),
        (5, 0)
    );
    let dead = fx.client.engine().write_behind_dead_letters(10).unwrap();
    assert_eq!(dead.len(), 5, "{dead:?}");
    for letter in &dead {
        assert!(
            letter.json.as_ref().is_none_or(|v| v.len() <= 70_000),
            "a dead letter keeps a bounded value"
        );
    }
    // The enqueue refuses a value beyond the bound too.
    fx.client
        .engine()
        .register_write_behind("big:", |_, _| Ok(()))
        .unwrap();
    let err = fx
        .client
        .engine()
        .write_behind("big:1", Duration::from_secs(60), &"x".repeat(2 << 20))
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err:?}");
    assert_eq!(fx.client.write_behind_pending().unwrap(), 0);
}

#[test]
fn the_dead_letter_stream_is_capped() {
    let fx = Fixture::with(wb_config("wb_dead_cap"));
    let dead = format!("{}{{write_behind}}:dead", fx.config.namespace);
    const FILLED: usize = 10_500;
    fx.client
        .cache()
        .with_connection(|c| {
            let mut pipe = redis::pipe();
            for i in 0..FILLED {
                pipe.cmd("XADD")
                    .arg(&dead)
                    .arg("*")
                    .arg("error")
                    .arg(i)
                    .ignore();
            }
            pipe.query::<()>(c)
        })
        .unwrap();
    xadd(&fx, &[("garbage", "yes".into())]);
    fx.client.start_write_behind(1).unwrap();
    fx.client.drain_write_behind(PATIENCE).unwrap();
    assert_eq!(fx.client.engine().stats().write_behind_dead_lettered, 1);
    let len: usize = fx
        .client
        .cache()
        .with_connection(|c| redis::cmd("XLEN").arg(&dead).query(c))
        .unwrap();
    assert!(len <= 10_100, "the dead-letter stream holds {len} entries");
}

#[test]
fn workers_start_once_stop_and_leave_the_group() {
    let fx = Fixture::with(wb_config("wb_lifecycle"));
    let client = &fx.client;
    for bad in [0, cacheaside::MAX_WRITE_BEHIND_WORKERS + 1] {
        let err = client.start_write_behind(bad).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    }
    client.drain_write_behind(Duration::ZERO).unwrap(); // nothing pending
    client
        .update_user_plan_write_behind(1, "one")
        .unwrap()
        .unwrap();
    let err = client
        .drain_write_behind(Duration::from_millis(200))
        .unwrap_err();
    assert!(err.is_timeout(), "no worker runs: {err:?}");
    assert_eq!(client.write_behind_pending().unwrap(), 1);

    client.start_write_behind(3).unwrap();
    assert_eq!(client.engine().write_behind_workers(), 3);
    let err = client.start_write_behind(1).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument, "already running");
    client.drain_write_behind(PATIENCE).unwrap();
    let stopping = Instant::now();
    client.stop_write_behind();
    assert!(
        stopping.elapsed() < Duration::from_secs(2),
        "{:?}",
        stopping.elapsed()
    );
    assert_eq!(client.engine().write_behind_workers(), 0);
    let stream = stream_key(&fx);
    let consumers: Vec<redis::Value> = client
        .cache()
        .with_connection(|c| {
            redis::cmd("XINFO")
                .arg("CONSUMERS")
                .arg(&stream)
                .arg("cacheaside")
                .query(c)
        })
        .unwrap();
    assert!(consumers.is_empty(), "stopped workers left: {consumers:?}");
    client.stop_write_behind(); // a no-op
    client.start_write_behind(1).unwrap(); // and again; dropping stops them
}

// ---- workers in other processes, killed ------------------------------------

const ROLE: &str = "CACHEASIDE_TEST_WRITE_BEHIND_CHILD";

/// The child: workers on the parent's table and namespace. `workers N`
/// runs N workers until its stdin closes, then prints its counters;
/// `kill-after-commit` kills itself right after its first commit, before
/// the acknowledgement.
#[test]
#[ignore = "the child process of the kill tests, run by them"]
fn worker_process_entry_point() {
    let settings = std::env::var(ROLE).expect("run by a kill test");
    let parts: Vec<&str> = settings.split(';').collect();
    let [table, namespace, outbox, mode, workers] = parts[..] else {
        panic!("bad settings {settings:?}");
    };
    let mut config = wb_config("child");
    config.users_table = table.into();
    config.namespace = namespace.into();
    config.outbox_table = outbox.into();
    config.invalidation_relay = false;
    config.write_behind_batch = 64;
    if mode == "workers" {
        // The default claim timeout: a dead worker's changes must move on
        // long before it, once its liveness key has expired.
        config.write_behind_claim_after = Config::default().write_behind_claim_after;
    }
    let client = Client::open(&config).unwrap();
    if mode == "kill-after-commit" {
        client.engine().hooks().set_after_write_behind_commit(|_| {
            let me = std::process::id().to_string();
            let _ = Command::new("kill").args(["-9", &me]).status();
            std::thread::sleep(Duration::from_secs(60));
        });
    }
    client.start_write_behind(workers.parse().unwrap()).unwrap();
    // The harness may have printed "test ... " on this line already.
    println!("workers started");
    if mode == "kill-after-commit" {
        // Its hook kills it at the first commit. Not watching stdin: the
        // parent's `Child::wait` closes it, which would stop the workers
        // before they commit. A commit that never comes fails the test.
        std::thread::sleep(PATIENCE);
        panic!("no write-behind commit within {PATIENCE:?}");
    }
    // Until the parent closes our stdin (or kills us).
    let mut line = String::new();
    while std::io::stdin().read_line(&mut line).unwrap_or(0) > 0 {}
    client.stop_write_behind();
    let stats = client.engine().stats();
    println!(
        "stats applied={} coalesced={} claimed={} dead={}",
        stats.write_behind_applied,
        stats.write_behind_coalesced,
        stats.write_behind_claimed,
        stats.write_behind_dead_lettered
    );
}

/// A worker process of a test: the child, and its final counters line.
struct WorkerProcess {
    child: Child,
    stats: mpsc::Receiver<String>,
}

impl WorkerProcess {
    /// Closes its stdin (it stops its workers and exits) and returns how
    /// many changes it claimed from other workers.
    fn finish(mut self) -> u64 {
        drop(self.child.stdin.take());
        let status = self.child.wait().unwrap();
        assert!(status.success(), "{status}");
        let line = self.stats.recv_timeout(PATIENCE).expect("its counters");
        eprintln!("worker process: {line}");
        line.split(' ')
            .find_map(|f| f.strip_prefix("claimed="))
            .and_then(|n| n.parse().ok())
            .expect("claimed=N")
    }
}

/// Starts a worker process and waits until its workers run.
fn worker_process(fx: &Fixture, mode: &str, workers: u32) -> WorkerProcess {
    let c = &fx.config;
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "worker_process_entry_point",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(
            ROLE,
            format!(
                "{};{};{};{mode};{workers}",
                c.users_table, c.namespace, c.outbox_table
            ),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    loop {
        match lines.next() {
            Some(Ok(line)) if line.ends_with("workers started") => break,
            Some(Ok(_)) => {}
            // It may kill itself before it says so.
            _ if mode == "kill-after-commit" => break,
            _ => {
                let status = child.wait();
                panic!("the worker process ended before starting: {status:?}");
            }
        }
    }
    // Keep reading (so the child never blocks on a full pipe), keeping its
    // final counters.
    let (tx, stats) = mpsc::channel();
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            if let Some(at) = line.find("stats ") {
                let _ = tx.send(line[at..].to_owned());
            }
        }
    });
    WorkerProcess { child, stats }
}

/// Workers of the process `pid` that hold delivered, unacknowledged
/// changes (its consumers are named `worker-<pid>:...`).
fn held_by(fx: &Fixture, pid: u32) -> i64 {
    let stream = stream_key(fx);
    let summary: redis::Value = fx
        .client
        .cache()
        .with_connection(|c| {
            redis::cmd("XPENDING")
                .arg(&stream)
                .arg("cacheaside")
                .query(c)
        })
        .unwrap();
    let redis::Value::Array(parts) = summary else {
        return 0;
    };
    let Some(redis::Value::Array(consumers)) = parts.get(3) else {
        return 0;
    };
    let prefix = format!("worker-{pid}:");
    consumers
        .iter()
        .filter_map(|c| match c {
            redis::Value::Array(pair) => match pair.as_slice() {
                [redis::Value::BulkString(name), redis::Value::BulkString(n)]
                    if name.starts_with(prefix.as_bytes()) =>
                {
                    std::str::from_utf8(n).ok()?.parse::<i64>().ok()
                }
                _ => None,
            },
            _ => None,
        })
        .sum()
}

#[test]
fn a_worker_killed_between_commit_and_ack_applies_its_change_once() {
    let fx = Fixture::with(wb_config("wb_commit_kill"));
    let seq = fx
        .client
        .update_user_plan_write_behind(2, "committed-then-killed")
        .unwrap()
        .unwrap();
    let mut child = worker_process(&fx, "kill-after-commit", 1).child;
    let status = child.wait().unwrap();
    assert!(!status.success(), "the worker process was killed");
    // Committed...
    let written = row(&fx, 2);
    assert_eq!(
        (written.0.as_str(), written.1 as u64),
        ("committed-then-killed", seq)
    );
    // ...but not acknowledged: still on the stream, still pending.
    assert_eq!(fx.client.write_behind_pending().unwrap(), 1);
    let got = fx.client.get_user_profile(2).unwrap().unwrap();
    assert_eq!(got.version as u64, seq);

    // A worker here claims it after the claim timeout and writes it again:
    // a no-op by the sequence guard.
    fx.client.start_write_behind(1).unwrap();
    fx.client.drain_write_behind(PATIENCE).unwrap();
    assert_eq!(
        row(&fx, 2),
        written,
        "the row was not written a second time"
    );
    let stats = fx.client.engine().stats();
    assert_eq!(
        (stats.write_behind_claimed, stats.write_behind_applied),
        (1, 1)
    );
    assert_eq!(fx.client.write_behind_pending().unwrap(), 0);
    assert!(
        fx.client
            .engine()
            .write_behind_dead_letters(10)
            .unwrap()
            .is_empty()
    );
}

#[test]
fn ten_thousand_updates_from_eight_threads_with_a_worker_process_killed_midway() {
    const THREADS: usize = 8;
    const PER_THREAD: usize = 1250;
    const USERS: i64 = 5;
    let fx = Fixture::with(wb_config("wb_soak"));
    let mut killed = Some(worker_process(&fx, "workers", 2));
    let survivor = worker_process(&fx, "workers", 2);

    // Per user: the newest change enqueued (by sequence number).
    let newest: Mutex<HashMap<i64, (u64, String)>> = Mutex::new(HashMap::new());
    let enqueued = AtomicUsize::new(0);
    let reads = AtomicUsize::new(0);
    let start = Barrier::new(THREADS + 1);
    let restarted = std::thread::scope(|s| {
        for t in 0..THREADS {
            let (newest, enqueued, reads, start, fx) = (&newest, &enqueued, &reads, &start, &fx);
            s.spawn(move || {
                let mut mine = [0_u64; USERS as usize + 1];
                start.wait();
                for i in 0..PER_THREAD {
                    let id = ((t * 3 + i) as i64) % USERS + 1;
                    let plan = format!("t{t}-{i}");
                    let seq = fx
                        .client
                        .update_user_plan_write_behind(id, &plan)
                        .unwrap()
                        .unwrap();
                    mine[id as usize] = seq;
                    {
                        let mut newest = newest.lock().unwrap();
                        let entry = newest.entry(id).or_insert((0, String::new()));
                        if seq > entry.0 {
                            *entry = (seq, plan);
                        }
                    }
                    enqueued.fetch_add(1, Ordering::Relaxed);
                    // Read a user: at least as new as this thread's last
                    // change of it.
                    let r = ((t + i * 7) as i64) % USERS + 1;
                    let got = if i % 2 == 0 {
                        fx.client.get_user_profile(r)
                    } else {
                        fx.client.get_user_profile_singleflight(r)
                    };
                    let got = got.unwrap().unwrap();
                    assert!(
                        got.version as u64 >= mine[r as usize],
                        "thread {t} read user {r} at {} after enqueuing {}",
                        got.version,
                        mine[r as usize]
                    );
                    reads.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        start.wait();
        // Midway, SIGKILL one worker process (its workers are mid-batch or
        // hold delivered entries) and start it again.
        let deadline = Instant::now() + PATIENCE * 4;
        while enqueued.load(Ordering::Relaxed) < THREADS * PER_THREAD / 2 {
            assert!(Instant::now() < deadline, "the writers stalled");
            std::thread::sleep(Duration::from_millis(1));
        }
        // Kill it while its workers hold delivered changes (mid-batch).
        let mut victim = killed.take().unwrap().child;
        let pid = victim.id();
        while held_by(&fx, pid) == 0 {
            assert!(
                Instant::now() < deadline,
                "the worker process never held a change"
            );
            std::thread::sleep(Duration::from_micros(200));
        }
        victim.kill().unwrap(); // SIGKILL
        let killed_at = Instant::now();
        let status = victim.wait().unwrap();
        assert!(!status.success());
        // The survivor sees the dead worker within about 2 s (its liveness
        // key expires) and claims what it held: not after the 30 s claim
        // timeout, which is for live workers that are slow.
        while held_by(&fx, pid) > 0 {
            assert!(
                killed_at.elapsed() < Duration::from_secs(5),
                "the dead worker's changes were not claimed within 5 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!(
            "the dead worker's changes were claimed after {:?}",
            killed_at.elapsed()
        );
        worker_process(&fx, "workers", 2)
    });
    assert_eq!(enqueued.load(Ordering::Relaxed), THREADS * PER_THREAD);
    assert_eq!(reads.load(Ordering::Relaxed), THREADS * PER_THREAD);

    let draining = Instant::now();
    fx.client.drain_write_behind(PATIENCE * 2).unwrap();
    assert!(
        draining.elapsed() < Duration::from_secs(5),
        "drain took {:?}",
        draining.elapsed()
    );
    let newest = newest.into_inner().unwrap();
    for id in 1..=USERS {
        let (seq, plan) = &newest[&id];
        let (got, version, _) = row(&fx, id);
        assert_eq!((&got, version as u64), (plan, *seq), "user {id}");
        let now = fx.client.get_user_profile(id).unwrap().unwrap();
        assert_eq!((&now.plan, now.version as u64), (plan, *seq));
    }
    assert!(
        fx.client
            .engine()
            .write_behind_dead_letters(10)
            .unwrap()
            .is_empty()
    );
    assert_eq!(fx.client.write_behind_pending().unwrap(), 0);
    // What the killed process held was claimed by the others.
    let claimed = survivor.finish() + restarted.finish();
    assert!(claimed >= 1, "nothing was claimed from the killed worker");
}

#[test]
fn a_transaction_postgres_rolled_back_is_an_error() {
    // A statement fails, the work swallows the error and returns Ok:
    // Postgres answers COMMIT with ROLLBACK, and so must we.
    let fx = Fixture::with(wb_config("tx_aborted"));
    let db = fx.client.db();
    let err = db
        .transaction(|tx| {
            set_plan_in(tx, &fx, 1, "lost");
            let _ = tx.execute("SELECT 1 / 0", &[]);
            Ok(())
        })
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Database, "{err:?}");
    assert!(err.chain().contains("rolled back"), "{}", err.chain());
    assert_eq!(row(&fx, 1).0, "pro", "nothing committed");
    // The connection went back to the pool usable, outside a transaction.
    db.transaction(|tx| {
        set_plan_in(tx, &fx, 1, "kept");
        Ok(())
    })
    .unwrap();
    assert_eq!(row(&fx, 1).0, "kept");
}

fn set_plan_in(tx: &mut cacheaside::Transaction<'_>, fx: &Fixture, id: i64, plan: &str) {
    let sql = format!(
        "UPDATE {} SET plan = $2 WHERE id = $1",
        fx.config.users_table
    );
    assert_eq!(tx.execute(&sql, &[&id, &plan]).unwrap(), 1);
}

#[test]
fn an_applier_that_swallows_a_failed_statement_is_never_acknowledged() {
    let fx = Fixture::with(wb_config("wb_swallowed"));
    let engine = fx.client.engine();
    let users = fx.config.users_table.clone();
    engine
        .register_write_behind("swallow:", move |tx, _changes| {
            tx.execute(
                &format!("UPDATE {users} SET plan = 'swallowed' WHERE id = 1"),
                &[],
            )?;
            if let Err(err) = tx.execute("SELECT 1 / 0", &[]) {
                eprintln!("applier logged and went on: {}", err.chain());
            }
            Ok(())
        })
        .unwrap();
    let seq = engine
        .write_behind("swallow:1", Duration::from_secs(60), &1_i64)
        .unwrap();
    fx.client.start_write_behind(1).unwrap();
    fx.client.drain_write_behind(PATIENCE).unwrap();
    let stats = engine.stats();
    assert_eq!(stats.write_behind_applied, 0, "{stats:?}");
    assert_eq!(stats.write_behind_dead_lettered, 1, "{stats:?}");
    let dead = engine.write_behind_dead_letters(10).unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(
        (dead[0].key.as_deref(), dead[0].seq),
        (Some("swallow:1"), Some(seq))
    );
    assert!(dead[0].error.contains("rolled back"), "{}", dead[0].error);
    assert_eq!(row(&fx, 1).0, "pro", "nothing reached Postgres");
    fx.client.stop_write_behind();
}
