//! Invalidation from Postgres itself: writes that bypass the library, and
//! writes whose invalidation never reached Redis, reach the cache through
//! the outbox trigger and the relay.

mod common;

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use cacheaside::{Client, Config, Db};
use common::proxy::{Fault, FaultProxy};
use common::{Fixture, Meet, PATIENCE, test_config};

/// How long the relay may take to apply a change (it takes milliseconds
/// with its notification; the benchmark reports the real figure).
const RELAY_BOUND: Duration = Duration::from_secs(1);

/// A pool of its own on the fixture's database: plain SQL that bypasses
/// the library (as psql, a migration or another service would).
fn outsider(fx: &Fixture) -> Db {
    Db::connect(&fx.config).unwrap()
}

/// Another client on the same table and namespace, as another process
/// would have (its own pools and engine; only Redis and Postgres are
/// shared). It runs no relay: the fixture's does the work.
fn another_process(fx: &Fixture) -> Client {
    let mut config = fx.config.clone();
    config.invalidation_relay = false;
    Client::open(&config).unwrap()
}

fn set_plan(db: &Db, fx: &Fixture, id: i64, plan: &str) {
    let sql = format!(
        "UPDATE {} SET plan = $2 WHERE id = $1",
        fx.config.users_table
    );
    assert_eq!(db.execute(&sql, &[&id, &plan]).unwrap(), 1);
}

/// Polls `read` until it returns `want`; panics after `within`.
fn sees(within: Duration, want: &str, read: impl Fn() -> String) -> Duration {
    let began = Instant::now();
    loop {
        let got = read();
        if got == want {
            return began.elapsed();
        }
        assert!(
            began.elapsed() < within,
            "still {got:?} after {within:?}, expected {want:?}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn an_update_that_bypasses_the_library_reaches_every_reader() {
    let fx = Fixture::new("relay_bypass");
    let reader = another_process(&fx);
    assert_eq!(reader.get_user_profile(1).unwrap().unwrap().plan, "pro");
    let before = fx.client.engine().stats().relay_invalidations;
    set_plan(&outsider(&fx), &fx, 1, "from-psql");
    let took = sees(RELAY_BOUND, "from-psql", || {
        reader.get_user_profile(1).unwrap().unwrap().plan
    });
    eprintln!("relay: a bypassing update reached another reader in {took:?}");
    let stats = fx.client.engine().stats();
    assert!(stats.relay_invalidations > before, "{stats:?}");
    // The trigger moved the version the writer forgot forward, to the
    // clock in microseconds (write-behind's unit): ordered with the rest.
    let clock = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64;
    let version = reader.get_user_profile(1).unwrap().unwrap().version;
    assert!(
        (clock - 60_000_000..=clock).contains(&version),
        "version {version}, clock {clock}"
    );
}

#[test]
fn a_relay_started_before_its_outbox_exists_waits_without_errors() {
    // Client::open starts the relay; the schema may come later (a missing
    // outbox is "nothing to apply yet", not an error).
    let config = test_config("relay_early");
    let client = Client::open(&config).unwrap();
    assert!(client.engine().sync_relay(PATIENCE), "a round ran");
    assert_eq!(client.engine().stats().relay_errors, 0);
}

#[test]
fn an_insert_ends_a_cached_absence() {
    let fx = Fixture::new("relay_insert");
    let reader = another_process(&fx);
    assert_eq!(reader.get_user_profile(42).unwrap(), None); // cached as absent
    let sql = format!(
        "INSERT INTO {} (id, name, email, plan) VALUES (42, 'New', 'new@example.com', 'free')",
        fx.config.users_table
    );
    outsider(&fx).execute(&sql, &[]).unwrap();
    sees(RELAY_BOUND, "New", || {
        reader
            .get_user_profile(42)
            .unwrap()
            .map_or_else(String::new, |u| u.name)
    });
}

#[test]
fn a_burst_of_updates_while_the_relay_loses_its_connection_is_all_applied() {
    let fx = Fixture::new("relay_burst");
    let reader = another_process(&fx);
    let db = outsider(&fx);
    for id in 1..=5 {
        reader.get_user_profile(id).unwrap();
    }
    let listener = format!("relay:{}", fx.config.outbox_table);
    let killed = AtomicBool::new(false);
    for i in 0..200 {
        let id = i % 5 + 1;
        set_plan(&db, &fx, id, &format!("burst-{i}"));
        if i == 100 {
            // Only our relay's connection: it carries our outbox's name.
            let terminated: bool = db
                .query_opt(
                    "SELECT bool_or(pg_terminate_backend(pid)) FROM pg_stat_activity \
                     WHERE application_name = $1",
                    &[&listener],
                )
                .unwrap()
                .unwrap()
                .get::<_, Option<bool>>(0)
                .unwrap_or(false);
            killed.store(terminated, Ordering::SeqCst);
        }
    }
    assert!(
        killed.load(Ordering::SeqCst),
        "the relay's connection was killed"
    );
    for id in 1..=5 {
        let last = format!("burst-{}", 195 + id - 1);
        sees(PATIENCE, &last, || {
            reader.get_user_profile(id).unwrap().unwrap().plan
        });
    }
}

#[test]
fn updates_while_redis_is_unreachable_are_applied_once_it_answers() {
    let mut config = test_config("relay_redis_down");
    let proxy = FaultProxy::start(
        std::net::ToSocketAddrs::to_socket_addrs("127.0.0.1:6379")
            .unwrap()
            .next()
            .unwrap(),
    );
    let direct_redis = config.redis_url.clone();
    config.redis_url = format!("redis://{}/", proxy.addr());
    config.cache_timeout = Duration::from_millis(200);
    let fx = Fixture::with(config);
    // A reader that reaches Redis directly, and has the rows cached.
    let mut direct = fx.config.clone();
    direct.redis_url = direct_redis;
    direct.invalidation_relay = false;
    let reader = Client::open(&direct).unwrap();
    for id in 1..=5 {
        reader.get_user_profile(id).unwrap();
    }
    proxy.set(Fault::Blackhole);
    let db = outsider(&fx);
    for id in 1..=5 {
        set_plan(&db, &fx, id, &format!("while-down-{id}"));
    }
    // The relay keeps its place while its Redis is unreachable...
    let applied = fx.client.engine().stats().relay_invalidations;
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(fx.client.engine().stats().relay_invalidations, applied);
    // ...and applies everything once it answers.
    proxy.set(Fault::Pass);
    for id in 1..=5 {
        let want = format!("while-down-{id}");
        sees(PATIENCE, &want, || {
            reader.get_user_profile(id).unwrap().unwrap().plan
        });
    }
}

#[test]
fn a_reader_that_read_before_an_external_commit_cannot_fill_it() {
    // The lease race, with a writer that bypasses the library: the relay's
    // invalidation revokes the lease like the library's own does.
    let fx = Fixture::new("relay_lease");
    let key = Client::user_key(3);
    let (loaded, go) = (Arc::new(Meet::new(2)), Arc::new(Meet::new(2)));
    let (l, g, armed) = (Arc::clone(&loaded), Arc::clone(&go), AtomicBool::new(true));
    let watched = key.clone();
    fx.client.engine().hooks().set_after_load(move |k| {
        if k == watched && armed.swap(false, Ordering::SeqCst) {
            l.wait();
            g.wait();
        }
    });
    std::thread::scope(|s| {
        let reader = s.spawn(|| fx.client.get_user_profile(3).unwrap().unwrap());
        loaded.wait(); // the reader holds the lease and the old row
        set_plan(&outsider(&fx), &fx, 3, "external");
        assert!(
            fx.client.engine().sync_relay(PATIENCE),
            "the relay applied it"
        );
        go.wait(); // now it fills
        assert_eq!(reader.join().unwrap().plan, "enterprise");
    });
    assert_eq!(
        fx.client
            .cache()
            .get_json::<cacheaside::UserProfile>(&key)
            .unwrap(),
        None,
        "the pre-write row was not cached"
    );
    assert_eq!(
        fx.client.get_user_profile(3).unwrap().unwrap().plan,
        "external"
    );
}

/// Runs `write` on another thread, stopping it after its commit (before its
/// cache update) until `meanwhile` has run.
fn between_commit_and_cache<T: Send>(
    fx: &Fixture,
    key: String,
    write: impl FnOnce() -> T + Send,
    meanwhile: impl FnOnce(),
) -> T {
    let (committed, go) = (Arc::new(Meet::new(2)), Arc::new(Meet::new(2)));
    let (c, g, armed) = (
        Arc::clone(&committed),
        Arc::clone(&go),
        AtomicBool::new(true),
    );
    fx.client.engine().hooks().set_after_write(move |k| {
        if k == key && armed.swap(false, Ordering::SeqCst) {
            c.wait();
            g.wait();
        }
    });
    std::thread::scope(|s| {
        let writer = s.spawn(write);
        committed.wait();
        meanwhile();
        go.wait();
        writer.join().unwrap()
    })
}

#[test]
fn a_write_through_the_relay_applied_first_is_still_cached() {
    // The relay is often faster than the writer's own cache update: the
    // writer of the very change it applied still stores its row.
    let fx = Fixture::new("relay_wt_first");
    let written = between_commit_and_cache(
        &fx,
        Client::user_key(4),
        || {
            fx.client
                .update_user_plan_write_through(4, "pro")
                .unwrap()
                .unwrap()
        },
        || {
            assert!(
                fx.client.engine().sync_relay(PATIENCE),
                "the relay applied it"
            )
        },
    );
    let before = fx.queries();
    let read = fx.client.get_user_profile(4).unwrap().unwrap();
    assert_eq!(read, written);
    assert_eq!(fx.queries() - before, 0, "served from the cache");
}

#[test]
fn a_write_through_older_than_a_relayed_change_is_not_cached() {
    // The writer committed version 2, an outside update made version 3, and
    // the relay applied it before the writer's cache update: that update
    // must not store version 2.
    let fx = Fixture::new("relay_wt_older");
    let written = between_commit_and_cache(
        &fx,
        Client::user_key(4),
        || {
            fx.client
                .update_user_plan_write_through(4, "pro")
                .unwrap()
                .unwrap()
        },
        || {
            set_plan(&outsider(&fx), &fx, 4, "external");
            assert!(
                fx.client.engine().sync_relay(PATIENCE),
                "the relay applied it"
            );
        },
    );
    assert_eq!(written.plan, "pro");
    assert_eq!(
        fx.client
            .cache()
            .get_json::<cacheaside::UserProfile>(&Client::user_key(4))
            .unwrap(),
        None,
        "the older row was not cached"
    );
    let read = fx.client.get_user_profile(4).unwrap().unwrap();
    assert_eq!(
        (read.plan.as_str(), read.version),
        ("external", fx.db_version(4))
    );
}

#[test]
fn two_relays_share_the_work_and_the_horizon() {
    let fx = Fixture::new("relay_two");
    let second = Client::open(&fx.config).unwrap(); // runs a relay too
    let reader = another_process(&fx);
    let db = outsider(&fx);
    let threads = 4;
    let barrier = Barrier::new(threads);
    std::thread::scope(|s| {
        for t in 0..threads {
            let (db, fx, barrier) = (&db, &fx, &barrier);
            s.spawn(move || {
                barrier.wait();
                for i in 0..25 {
                    set_plan(db, fx, (t as i64) + 1, &format!("t{t}-{i}"));
                }
            });
        }
    });
    for t in 0..threads {
        let id = (t as i64) + 1;
        sees(PATIENCE, &format!("t{t}-24"), || {
            reader.get_user_profile(id).unwrap().unwrap().plan
        });
    }
    assert!(second.engine().sync_relay(PATIENCE));
    assert!(fx.client.engine().sync_relay(PATIENCE));
}

/// Cached rows, a session, a rate-limit window and a queued write-behind
/// change; then the relay comes back after longer than the outbox
/// retention (its cursor aged, as if nobody had served the namespace):
/// the reset deletes the cache entries, and only those.
fn a_reset_keeps_what_only_redis_holds(mut config: Config) {
    config.write_behind_retry_backoff = Duration::from_millis(20);
    let fx = Fixture::with(config);
    let c = &fx.client;
    c.get_user_profile(1).unwrap();
    assert!(c.cache().exists(&Client::user_key(1)).unwrap());
    let session = c.sessions().create(&42_u32).unwrap();
    for _ in 0..2 {
        assert!(
            c.rate_limit("ip:1", 3, Duration::from_secs(60))
                .unwrap()
                .allowed
        );
    }
    c.update_user_plan_write_behind(2, "queued")
        .unwrap()
        .unwrap();

    c.engine().stop_relay();
    let cursors = format!("{}_cursors", fx.config.outbox_table);
    let aged = outsider(&fx)
        .execute(
            &format!("UPDATE {cursors} SET updated_at = now() - interval '2 days'"),
            &[],
        )
        .unwrap();
    assert_eq!(aged, 1, "the relay's cursor");
    c.engine().start_relay();
    assert!(c.engine().sync_relay(PATIENCE));
    assert_eq!(c.engine().stats().relay_resets, 1);

    assert!(
        !c.cache().exists(&Client::user_key(1)).unwrap(),
        "entries go"
    );
    assert_eq!(c.sessions().get::<u32>(&session).unwrap(), Some(42));
    let third = c.rate_limit("ip:1", 3, Duration::from_secs(60)).unwrap();
    assert_eq!(
        (third.allowed, third.remaining),
        (true, 0),
        "the window kept two"
    );
    assert_eq!(c.write_behind_pending().unwrap(), 1);
    assert_eq!(c.get_user_profile(2).unwrap().unwrap().plan, "queued");
    c.start_write_behind(1).unwrap();
    c.drain_write_behind(PATIENCE).unwrap();
    let sql = format!("SELECT plan FROM {} WHERE id = 2", fx.config.users_table);
    let plan: String = outsider(&fx).query_opt(&sql, &[]).unwrap().unwrap().get(0);
    assert_eq!(plan, "queued", "the queued change reached Postgres");
    c.stop_write_behind();
}

#[test]
fn a_reset_after_the_retention_deletes_cache_entries_only() {
    a_reset_keeps_what_only_redis_holds(test_config("relay_away"));
}

#[test]
fn a_reset_in_the_empty_namespace_deletes_cache_entries_only() {
    // The empty namespace is the whole database: a Redis of its own.
    let redis = common::servers::PrivateRedis::start();
    let mut config = test_config("relay_away_empty");
    config.namespace = String::new();
    config.redis_url = redis.url();
    a_reset_keeps_what_only_redis_holds(config);
}

// ---- a process killed between COMMIT and DEL -------------------------------

const ROLE: &str = "CACHEASIDE_TEST_RELAY_CHILD";

/// The child: an update whose process is killed after the commit, before
/// the invalidation.
#[test]
#[ignore = "the child process of the kill test, run by it"]
fn child_process_entry_point() {
    let settings = std::env::var(ROLE).expect("run by the kill test");
    let mut config = Config::from_env();
    let mut parts = settings.split(';');
    config.users_table = parts.next().unwrap().into();
    config.namespace = parts.next().unwrap().into();
    config.outbox_table = parts.next().unwrap().into();
    config.invalidation_relay = false;
    let client = Client::open(&config).unwrap();
    client.engine().hooks().set_after_write(|_| {
        let me = std::process::id().to_string();
        let _ = Command::new("kill").args(["-9", &me]).status();
        std::thread::sleep(Duration::from_secs(60));
    });
    client.update_user_plan(1, "committed-then-killed").unwrap();
    unreachable!("killed before the invalidation");
}

#[test]
fn a_process_killed_between_commit_and_invalidation_loses_no_invalidation() {
    let fx = Fixture::new("relay_kill");
    let reader = another_process(&fx);
    assert_eq!(reader.get_user_profile(1).unwrap().unwrap().plan, "pro");
    let c = &fx.config;
    let status = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_process_entry_point",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(
            ROLE,
            format!("{};{};{}", c.users_table, c.namespace, c.outbox_table),
        )
        .status()
        .unwrap();
    assert!(!status.success(), "the child was killed");
    sees(RELAY_BOUND, "committed-then-killed", || {
        reader.get_user_profile(1).unwrap().unwrap().plan
    });
}

#[test]
fn a_planted_to_jsonb_overload_on_the_writers_path_does_not_run() {
    // Someone who can create functions in a schema on a writer's path
    // plants `to_jsonb(<the row type>)`, which Postgres prefers to the
    // built-in, and a temporary table named like the outbox: the capture
    // trigger (run as the writer) must call neither.
    let fx = Fixture::new("relay_planted");
    let db = outsider(&fx);
    let evil = common::unique("ca_test_evil");
    let users = &fx.config.users_table;
    db.batch_execute(&format!(
        "CREATE SCHEMA {evil};
         CREATE SEQUENCE {evil}.calls;
         CREATE FUNCTION {evil}.to_jsonb(r {users}) RETURNS jsonb
         LANGUAGE plpgsql AS $$
         BEGIN
             PERFORM nextval('{evil}.calls');
             RETURN '{{}}'::jsonb;
         END $$;"
    ))
    .unwrap();
    let reader = another_process(&fx);
    assert_eq!(reader.get_user_profile(1).unwrap().unwrap().plan, "pro");
    let outbox = fx.config.outbox_table.clone();
    db.transaction(|tx| {
        tx.batch_execute(&format!(
            "SET LOCAL search_path = {evil}, public;
             CREATE TEMP TABLE {outbox} (
                 id bigserial, cache_key text, version bigint,
                 txid xid8 DEFAULT pg_current_xact_id(),
                 created_at timestamptz DEFAULT now()
             ) ON COMMIT DROP;
             UPDATE {users} SET plan = 'planted' WHERE id = 1;"
        ))
    })
    .unwrap();
    let called: bool = db
        .query_opt(&format!("SELECT is_called FROM {evil}.calls"), &[])
        .unwrap()
        .unwrap()
        .get(0);
    db.batch_execute(&format!("DROP SCHEMA {evil} CASCADE"))
        .unwrap();
    assert!(!called, "the planted to_jsonb ran as the writer");
    // And the change reached the real outbox, and the cache.
    sees(RELAY_BOUND, "planted", || {
        reader.get_user_profile(1).unwrap().unwrap().plan
    });
}

#[test]
fn a_key_prefix_with_backslashes_and_quotes_is_escaped() {
    // With standard_conforming_strings off, `\'` in a plain literal is an
    // escaped quote: a prefix must still reach the trigger exactly, and
    // never as SQL.
    let mut config = test_config("relay_prefix");
    let sep = if config.database_url.contains('?') {
        '&'
    } else {
        '?'
    };
    config.database_url = format!(
        "{}{sep}options=-c%20standard_conforming_strings%3Doff",
        config.database_url
    );
    let fx = Fixture::with(config);
    let db = fx.client.db();
    let scs: String = db
        .query_opt("SHOW standard_conforming_strings", &[])
        .unwrap()
        .unwrap()
        .get(0);
    assert_eq!(scs, "off", "the URL's options reach the session");
    let table = format!("{}_p", fx.config.users_table);
    db.batch_execute(&format!("CREATE TABLE {table} (id bigint PRIMARY KEY)"))
        .unwrap();
    let outbox = &fx.config.outbox_table;
    for (id, prefix) in [
        (1_i64, r"back\slash:"),
        (2, r"it\'s:"),
        (3, r"x\', '', ''); --:"),
    ] {
        fx.client
            .engine()
            .capture_changes(&table, prefix, "id", None)
            .unwrap();
        db.execute(&format!("INSERT INTO {table} VALUES ($1)"), &[&id])
            .unwrap();
        let key: String = db
            .query_opt(
                &format!("SELECT cache_key FROM {outbox} ORDER BY id DESC LIMIT 1"),
                &[],
            )
            .unwrap()
            .unwrap()
            .get(0);
        assert_eq!(key, format!("{prefix}{id}"));
    }
    db.batch_execute(&format!("DROP TABLE {table}")).unwrap();
}

#[test]
fn truncate_empties_the_prefix() {
    // Row triggers do not fire on TRUNCATE: a statement trigger records
    // "every key under user: changed", and the relay deletes those cache
    // entries, and only those.
    let fx = Fixture::new("relay_truncate");
    let reader = another_process(&fx);
    for id in 1..=5 {
        reader.get_user_profile(id).unwrap().expect("seeded");
    }
    let engine = fx.client.engine();
    let ttl = Duration::from_secs(60);
    let other: Option<i64> = engine
        .get_or_load("users-count", ttl, || Ok(Some(5)))
        .unwrap();
    assert_eq!(other, Some(5));
    let session = fx.client.sessions().create(&7_u32).unwrap();
    let outsider = outsider(&fx);
    outsider
        .batch_execute(&format!("TRUNCATE {}", fx.config.users_table))
        .unwrap();
    for id in 1..=5 {
        sees(RELAY_BOUND, "gone", || {
            reader
                .get_user_profile(id)
                .unwrap()
                .map_or_else(|| "gone".into(), |u| u.plan)
        });
    }
    assert!(
        fx.client.cache().exists("users-count").unwrap(),
        "outside the prefix"
    );
    assert_eq!(fx.client.sessions().get::<u32>(&session).unwrap(), Some(7));
    assert!(engine.sync_relay(PATIENCE));
    assert_eq!(engine.stats().relay_errors, 0);
}

#[test]
fn a_write_under_session_replication_role_replica_is_captured() {
    // A logical-replication apply or a restore runs as `replica`, which
    // skips ordinary triggers; the capture triggers fire ALWAYS.
    let fx = Fixture::new("relay_replica");
    let reader = another_process(&fx);
    assert_eq!(reader.get_user_profile(1).unwrap().unwrap().plan, "pro");
    let users = &fx.config.users_table;
    outsider(&fx)
        .transaction(|tx| {
            tx.batch_execute(&format!(
                "SET LOCAL session_replication_role = replica;
                 UPDATE {users} SET plan = 'replicated', version = version + 1 WHERE id = 1;"
            ))
        })
        .unwrap();
    sees(RELAY_BOUND, "replicated", || {
        reader.get_user_profile(1).unwrap().unwrap().plan
    });
}

/// A captured table of `rows` rows (`bulk:<id>` keys, no version column),
/// filled in one statement: that many outbox rows in one transaction.
fn bulk_table(fx: &Fixture, db: &Db, rows: i64) -> String {
    let table = format!("{}_bulk", fx.config.users_table);
    db.batch_execute(&format!(
        "CREATE TABLE {table} (id bigint PRIMARY KEY, v int NOT NULL)"
    ))
    .unwrap();
    fx.client
        .engine()
        .capture_changes(&table, "bulk:", "id", None)
        .unwrap();
    // In statements of at most 50,000 rows, each well inside the statement
    // timeout on a loaded machine.
    for from in (1..=rows).step_by(50_000) {
        let to = (from + 49_999).min(rows);
        db.execute(
            &format!("INSERT INTO {table} SELECT g, 0 FROM generate_series($1::bigint, $2) g"),
            &[&from, &to],
        )
        .unwrap();
    }
    table
}

#[test]
fn a_long_open_transaction_does_not_make_rounds_reread_the_backlog() {
    // A transaction held open elsewhere pins the horizon; 100,000 captured
    // changes commit behind it. A round must read what is new, not the
    // backlog: one more update is applied at once.
    let fx = Fixture::new("relay_pinned");
    let reader = another_process(&fx);
    assert_eq!(reader.get_user_profile(1).unwrap().unwrap().plan, "pro");
    let db = outsider(&fx);
    let (held, release) = (Meet::new(2), Meet::new(2));
    std::thread::scope(|s| {
        let holder = s.spawn(|| {
            outsider(&fx).transaction(|tx| {
                tx.query_opt("SELECT pg_current_xact_id()::text", &[])?;
                held.wait();
                release.wait();
                Ok(())
            })
        });
        held.wait();
        let table = bulk_table(&fx, &db, 100_000);
        assert!(
            fx.client.engine().sync_relay(PATIENCE),
            "the backlog applied"
        );
        let (before, _) = fx.client.engine().relay_rows_read();
        set_plan(&db, &fx, 1, "behind-the-backlog");
        let took = sees(RELAY_BOUND, "behind-the-backlog", || {
            reader.get_user_profile(1).unwrap().unwrap().plan
        });
        eprintln!("relay: an update behind a pinned 100,000-row backlog applied in {took:?}");
        assert!(fx.client.engine().sync_relay(PATIENCE));
        let (after, most) = fx.client.engine().relay_rows_read();
        assert!(
            after - before <= 10,
            "{} rows read for one update",
            after - before
        );
        assert!(most <= 1000, "{most} rows held at once");
        release.wait();
        holder.join().unwrap().unwrap();
        db.batch_execute(&format!("DROP TABLE {table}")).unwrap();
    });
}

#[test]
fn a_new_relay_reads_a_large_outbox_in_bounded_pages() {
    // A namespace never served starts from horizon 0: the whole outbox,
    // read a page at a time, never all at once.
    let fx = Fixture::new("relay_pages");
    let db = outsider(&fx);
    // A million captured changes (the bound the security review asked
    // about): what a new namespace's first rounds must walk.
    const ROWS: i64 = 1_000_000;
    let table = bulk_table(&fx, &db, ROWS);
    let mut config = fx.config.clone();
    config.namespace = format!("{}new:", fx.config.namespace);
    let fresh = Client::open(&config).unwrap();
    assert!(fresh.engine().sync_relay(PATIENCE * 4));
    let (read, most) = fresh.engine().relay_rows_read();
    assert!(read >= ROWS as u64, "{read} rows read");
    assert!(most <= 1000, "{most} rows held at once");
    assert_eq!(fresh.engine().stats().relay_errors, 0);
    drop(fresh);
    db.batch_execute(&format!("DROP TABLE {table}")).unwrap();
}

#[test]
fn the_capture_trigger_adds_no_notify_to_the_writers_commit() {
    // A transaction that has sent NOTIFY takes a database-wide lock at
    // commit, which serialized every writer of a captured table: the
    // trigger records the change and nothing else; the relay polls.
    let fx = Fixture::new("relay_quiet");
    let bodies: Vec<String> = outsider(&fx)
        .query(
            "SELECT prosrc FROM pg_proc WHERE proname = ANY($1)",
            &[&vec![
                format!("{}_capture", fx.config.outbox_table),
                format!("{}_reset", fx.config.outbox_table),
            ]],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(bodies.len(), 2, "both trigger functions");
    for body in bodies {
        assert!(!body.to_lowercase().contains("notify"), "{body}");
    }
    // And a change is still applied at once.
    let reader = another_process(&fx);
    reader.get_user_profile(1).unwrap();
    set_plan(&outsider(&fx), &fx, 1, "polled");
    let took = sees(RELAY_BOUND, "polled", || {
        reader.get_user_profile(1).unwrap().unwrap().plan
    });
    eprintln!("relay: a change applied without a notification in {took:?}");
}

#[test]
fn one_relay_per_namespace_reads_the_outbox_and_a_standby_takes_over() {
    // Every process runs a relay; one holds the namespace's lease and
    // reads the outbox, the others stand by (their syncs follow the
    // leader). When the leader goes, a standby takes over within 2 s,
    // from the horizon: nothing skipped.
    let fx = Fixture::new("relay_lease");
    let standbys: Vec<Client> = (0..3).map(|_| Client::open(&fx.config).unwrap()).collect();
    let reader = another_process(&fx);
    let db = outsider(&fx);
    for i in 0..100 {
        set_plan(&db, &fx, i % 5 + 1, &format!("w{i}"));
    }
    for standby in &standbys {
        assert!(
            standby.engine().sync_relay(PATIENCE),
            "a standby's sync follows the leader"
        );
    }
    assert!(fx.client.engine().sync_relay(PATIENCE));
    let (led, _) = fx.client.engine().relay_rows_read();
    assert!(led >= 100, "the leader read the changes: {led}");
    for standby in &standbys {
        assert_eq!(
            standby.engine().relay_rows_read().0,
            0,
            "a standby read nothing"
        );
    }
    assert_eq!(reader.get_user_profile(5).unwrap().unwrap().plan, "w99");
    assert_eq!(reader.get_user_profile(1).unwrap().unwrap().plan, "w95"); // cached

    // The leader goes (its connection, and so its lock, with it).
    fx.client.engine().stop_relay();
    set_plan(&db, &fx, 1, "after-the-leader");
    let took = sees(Duration::from_secs(2), "after-the-leader", || {
        reader.get_user_profile(1).unwrap().unwrap().plan
    });
    eprintln!("relay: a standby took over and applied a change in {took:?}");
    let leaders = standbys
        .iter()
        .filter(|s| s.engine().relay_rows_read().0 > 0)
        .count();
    assert_eq!(leaders, 1, "exactly one standby took over");
    for standby in &standbys {
        assert_eq!(standby.engine().stats().relay_errors, 0);
    }
    fx.client.engine().start_relay(); // for the fixture's drop
}

#[test]
fn a_first_round_pages_across_transaction_ids_in_numeric_order() {
    // Keyset pages go by (txid, id): they must be read in that order, not
    // in the order of the txids' text ("10" before "9"), or a page boundary
    // skips a transaction's rows.
    let fx = Fixture::new("relay_xid_order");
    let db = outsider(&fx);
    let outbox = &fx.config.outbox_table;
    db.execute(
        &format!(
            "INSERT INTO {outbox} (cache_key, txid)
             SELECT 'fake:' || g, (CASE WHEN g <= 1500 THEN '9' ELSE '10' END)::xid8
             FROM generate_series(1, 3000) g"
        ),
        &[],
    )
    .unwrap();
    let mut config = fx.config.clone();
    config.namespace = format!("{}new:", fx.config.namespace);
    let fresh = Client::open(&config).unwrap();
    assert!(fresh.engine().sync_relay(PATIENCE));
    let (read, _) = fresh.engine().relay_rows_read();
    assert!(read >= 3000, "{read} rows read of 3000 and more");
    drop(fresh);
}

#[test]
fn rows_past_the_retention_are_pruned_and_younger_ones_kept() {
    let fx = Fixture::new("relay_prune");
    let db = outsider(&fx);
    let outbox = &fx.config.outbox_table;
    // Rows as if written two days ago (ids come in time order), then one
    // young change.
    db.batch_execute(&format!(
        "INSERT INTO {outbox} (cache_key) SELECT 'old:' || g FROM generate_series(1, 50) g;
         UPDATE {outbox} SET created_at = now() - interval '2 days';"
    ))
    .unwrap();
    set_plan(&db, &fx, 1, "young");
    let count = |like: &str| -> i64 {
        db.query_opt(
            &format!("SELECT count(*) FROM {outbox} WHERE cache_key LIKE $1"),
            &[&like],
        )
        .unwrap()
        .unwrap()
        .get(0)
    };
    assert_eq!(count("old:%"), 50);
    // A relay prunes on its first round (then once a minute).
    fx.client.engine().stop_relay();
    fx.client.engine().start_relay();
    assert!(fx.client.engine().sync_relay(PATIENCE));
    assert_eq!(count("old:%"), 0, "past the retention");
    assert_eq!(count("%"), 1, "the young row stays, alone");
}

#[test]
fn a_lease_holder_that_publishes_nothing_does_not_stall_the_relays() {
    // Someone holds the namespace's lock and applies nothing (a stuck
    // relay, or an unrelated lock whose key collides): after a few
    // seconds of syncs it never covers, a standby reads the outbox itself.
    let config = test_config("relay_squatter");
    let squatter = Db::connect(&config).unwrap();
    let (held, release) = (Meet::new(2), Meet::new(2));
    std::thread::scope(|s| {
        let holder = s.spawn(|| {
            squatter.transaction(|tx| {
                let row = tx.query_opt(
                    "SELECT pg_try_advisory_xact_lock(hashtext($1), hashtext($2))",
                    &[&config.outbox_table, &config.namespace],
                )?;
                assert!(row.is_some_and(|r| r.get::<_, bool>(0)), "the lock");
                held.wait();
                release.wait();
                Ok(())
            })
        });
        held.wait();
        let began = Instant::now();
        let fx = Fixture::with(config.clone()); // its settle syncs the relay
        let took = began.elapsed();
        eprintln!("relay: a standby under a silent lease holder led after {took:?}");
        assert!(took >= Duration::from_secs(4), "it was a standby first");
        let reader = another_process(&fx);
        assert_eq!(reader.get_user_profile(1).unwrap().unwrap().plan, "pro");
        set_plan(&outsider(&fx), &fx, 1, "unstalled");
        sees(RELAY_BOUND, "unstalled", || {
            reader.get_user_profile(1).unwrap().unwrap().plan
        });
        release.wait();
        holder.join().unwrap().unwrap();
    });
}
