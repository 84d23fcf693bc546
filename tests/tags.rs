//! Tags (`get_or_load_tagged`, `invalidate_tag`) and conditional refresh
//! (`get_or_load_conditional`): a tag's invalidation reaches every entry
//! carrying it, in every process, in one command; an unchanged row's entry
//! is extended, not rewritten.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Barrier, Mutex};
use std::time::Duration;

use cacheaside::{CacheAside, Config, Mode, Refresh, Versioned};
use common::servers::PrivateRedis;
use common::{Fixture, test_config, unique};

const TTL: Duration = Duration::from_secs(60);
const ROLE: &str = "CACHEASIDE_TAGS_CHILD";

/// A table of `(id, gen)` rows that belongs to one test, dropped on `Drop`.
struct Items<'a> {
    engine: &'a CacheAside,
    table: String,
}

impl<'a> Items<'a> {
    fn create(engine: &'a CacheAside, rows: i64) -> Items<'a> {
        let table = unique("ca_tags_items");
        let db = engine.db();
        db.execute(
            &format!("CREATE TABLE {table} (id bigint PRIMARY KEY, gen bigint NOT NULL)"),
            &[],
        )
        .unwrap();
        db.execute(
            &format!("INSERT INTO {table} SELECT g, 0 FROM generate_series(1, $1::bigint) g"),
            &[&rows],
        )
        .unwrap();
        Items { engine, table }
    }
}

impl Drop for Items<'_> {
    fn drop(&mut self) {
        let _ = self
            .engine
            .db()
            .execute(&format!("DROP TABLE IF EXISTS {}", self.table), &[]);
    }
}

/// Reads item `id` under `tags`, loading its `gen` from `table`.
fn read_gen(engine: &CacheAside, table: &str, id: i64, tags: &[&str]) -> i64 {
    let sql = format!("SELECT gen FROM {table} WHERE id = $1");
    engine
        .get_or_load_tagged(&format!("item:{id}"), TTL, tags, || {
            Ok(engine.db().query_opt(&sql, &[&id])?.map(|r| r.get(0)))
        })
        .unwrap()
        .expect("row exists")
}

#[test]
fn invalidate_tag_makes_every_entry_with_the_tag_a_miss_and_no_other() {
    let fx = Fixture::new("tags_basic");
    let engine = fx.client.engine();
    let loads = AtomicU64::new(0);
    let read = |key: &str, tags: &[&str]| -> Option<String> {
        engine
            .get_or_load_tagged(key, TTL, tags, || {
                loads.fetch_add(1, Ordering::SeqCst);
                Ok(Some(format!("{key}@{}", loads.load(Ordering::SeqCst))))
            })
            .unwrap()
    };
    read("product:1", &["category:7"]);
    read("product:2", &["category:7", "shop:1"]);
    read("product:3", &["category:8"]);
    assert_eq!(loads.load(Ordering::SeqCst), 3);
    // All hits.
    assert_eq!(read("product:1", &["category:7"]).unwrap(), "product:1@1");
    assert_eq!(loads.load(Ordering::SeqCst), 3);

    engine.invalidate_tag("category:7").unwrap();
    assert_eq!(read("product:1", &["category:7"]).unwrap(), "product:1@4");
    assert_eq!(
        read("product:2", &["category:7", "shop:1"]).unwrap(),
        "product:2@5"
    );
    assert_eq!(
        read("product:3", &["category:8"]).unwrap(),
        "product:3@3",
        "untouched"
    );
    assert_eq!(loads.load(Ordering::SeqCst), 5);

    // A read that does not name the tags still checks them.
    engine.invalidate_tag("shop:1").unwrap();
    let untagged: Option<String> = engine
        .get_or_load("product:2", TTL, || Ok(Some("reloaded".to_owned())))
        .unwrap();
    assert_eq!(untagged.as_deref(), Some("reloaded"));
    assert_eq!(engine.in_flight(), 0);

    for bad in ["", "a{b", "a\tb"] {
        assert!(engine.invalidate_tag(bad).is_err(), "{bad:?}");
        let err = engine
            .get_or_load_tagged::<i64, _>("k", TTL, &[bad], || Ok(Some(1)))
            .unwrap_err();
        assert_eq!(err.kind(), cacheaside::ErrorKind::InvalidArgument);
    }
}

#[test]
fn a_fill_that_raced_invalidate_tag_is_not_stored() {
    let fx = Fixture::new("tags_race");
    let engine = fx.client.engine();
    let before = engine.stats();
    // The load reads the old row; the writer commits and invalidates the
    // tag before the fill.
    let v: Option<i64> = engine
        .get_or_load_tagged("item:1", TTL, &["items"], || {
            engine.invalidate_tag("items").unwrap();
            Ok(Some(1))
        })
        .unwrap();
    assert_eq!(v, Some(1), "the caller still gets what it loaded");
    assert_eq!(engine.stats().fills_dropped - before.fills_dropped, 1);
    assert!(!engine.cache().exists("item:1").unwrap(), "nothing stored");
    let again: Option<i64> = engine
        .get_or_load_tagged("item:1", TTL, &["items"], || Ok(Some(2)))
        .unwrap();
    assert_eq!(again, Some(2), "the next read loads");
}

/// Counts the commands a private Redis ran, by name (INFO and CONFIG,
/// the counting's own, left out).
fn commands(redis: &PrivateRedis) -> Vec<(String, u64)> {
    redis
        .command(&["INFO", "commandstats"])
        .lines()
        .filter_map(|line| {
            let (name, rest) = line.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = rest
                .strip_prefix("calls=")?
                .split(',')
                .next()?
                .parse()
                .ok()?;
            (!name.starts_with("info") && !name.starts_with("config"))
                .then(|| (name.to_owned(), calls))
        })
        .collect()
}

#[test]
fn invalidate_tag_of_ten_thousand_entries_is_one_command() {
    let redis = PrivateRedis::start();
    let mut config = test_config("tags_many");
    config.redis_url = redis.url();
    // Nothing else on this server: its commands are counted.
    config.invalidation_relay = false;
    let fx = Fixture::with(config);
    let engine = fx.client.engine();
    const ENTRIES: i64 = 10_000;
    // Reads every entry on 4 threads, the loader answering `sign * id`;
    // returns the loads.
    let read_all = |sign: i64| -> u64 {
        let (threads, loads) = (4, AtomicU64::new(0));
        std::thread::scope(|s| {
            for t in 0..threads {
                let loads = &loads;
                s.spawn(move || {
                    for id in (t..ENTRIES).step_by(threads as usize) {
                        let v: Option<i64> = engine
                            .get_or_load_tagged(&format!("p:{id}"), TTL, &["big"], || {
                                loads.fetch_add(1, Ordering::Relaxed);
                                Ok(Some(sign * id))
                            })
                            .unwrap();
                        assert_eq!(v, Some(sign * id));
                    }
                });
            }
        });
        loads.into_inner()
    };
    assert_eq!(read_all(1), ENTRIES as u64);
    redis.command(&["CONFIG", "RESETSTAT"]);
    engine.invalidate_tag("big").unwrap();
    assert_eq!(
        commands(&redis),
        [("set".to_owned(), 1)],
        "one command for {ENTRIES} entries"
    );
    // And every one of them is a miss now.
    assert_eq!(read_all(-1), ENTRIES as u64);
}

#[test]
fn a_tagged_hit_is_one_command_on_a_single_server() {
    let redis = PrivateRedis::start();
    let mut config = test_config("tags_hit");
    config.redis_url = redis.url();
    // Nothing else on this server: its commands are counted.
    config.invalidation_relay = false;
    let fx = Fixture::with(config);
    let engine = fx.client.engine();
    let read = |key: &str, tags: &[&str]| -> Option<i64> {
        engine
            .get_or_load_tagged(key, TTL, tags, || Ok(Some(7)))
            .unwrap()
    };
    read("a", &["t1", "t2"]);
    read("b", &[]);
    redis.command(&["CONFIG", "RESETSTAT"]);
    assert_eq!(read("a", &["t1", "t2"]), Some(7));
    assert_eq!(commands(&redis), [("mget".to_owned(), 1)]);
    redis.command(&["CONFIG", "RESETSTAT"]);
    assert_eq!(read("b", &[]), Some(7));
    assert_eq!(
        commands(&redis),
        [("get".to_owned(), 1)],
        "untagged: one GET"
    );
}

/// Not a test of its own: the reader process of
/// `no_stale_tagged_read_after_invalidate_tag_across_processes`.
#[test]
#[ignore = "the child process of the cross-process tag test, run by it"]
fn tags_child_process_entry_point() {
    let settings = std::env::var(ROLE).expect("run by the cross-process tag test");
    let fields: Vec<&str> = settings.split(';').collect();
    let [redis, namespace, table, keys] = fields[..] else {
        panic!("bad settings {settings:?}")
    };
    let mut config = Config::from_env();
    config.redis_url = redis.into();
    config.namespace = namespace.into();
    config.db_pool_size = 2;
    // As test_config: a slow command on a loaded machine is not an outage.
    config.cache_timeout = Duration::from_secs(1);
    let engine = CacheAside::open(&config).unwrap();
    let keys: i64 = keys.parse().unwrap();
    println!("CHILD ready");
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).unwrap();
    let (reads, stale) = soak_readers(&engine, table, keys, &AtomicBool::new(false), true);
    println!("CHILD reads {reads} stale {stale}");
}

/// Readers that check every tagged read against the generation published
/// (after its `invalidate_tag` returned) before the read began; they stop
/// when `stop` is set or, in a child, when the published generation is
/// `u64::MAX`'s marker (-1). Returns (reads, stale reads).
fn soak_readers(
    engine: &CacheAside,
    table: &str,
    keys: i64,
    stop: &AtomicBool,
    child: bool,
) -> (u64, u64) {
    let published_key = engine.cache().redis_key("published");
    let published = || -> i64 {
        engine
            .cache()
            .with_connection(|conn| {
                redis::cmd("GET")
                    .arg(&published_key)
                    .query::<Option<i64>>(conn)
            })
            .unwrap()
            .unwrap_or(0)
    };
    let (reads, stale) = (AtomicU64::new(0), AtomicU64::new(0));
    std::thread::scope(|s| {
        for t in 0..3 {
            let (reads, stale) = (&reads, &stale);
            s.spawn(move || {
                let mut id = t;
                loop {
                    let floor = published();
                    if stop.load(Ordering::SeqCst) || (child && floor < 0) {
                        return;
                    }
                    id = id % keys + 1;
                    let got = read_gen(engine, table, id, &["soak"]);
                    reads.fetch_add(1, Ordering::Relaxed);
                    if got < floor {
                        stale.fetch_add(1, Ordering::Relaxed);
                        eprintln!("stale: item {id} gen {got} < {floor}");
                    }
                }
            });
        }
    });
    (reads.into_inner(), stale.into_inner())
}

#[test]
fn no_stale_tagged_read_after_invalidate_tag_across_processes() {
    let fx = Fixture::new("tags_xproc");
    let engine = fx.client.engine();
    const KEYS: i64 = 8;
    let items = Items::create(engine, KEYS);
    // A second engine in this process (its own Redis and Postgres pools),
    // and a child process, both reading.
    let other = CacheAside::open(&fx.config).unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "tags_child_process_entry_point",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(
            ROLE,
            format!(
                "{};{};{};{KEYS}",
                fx.config.redis_url, fx.config.namespace, items.table
            ),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let expect = |out: &mut BufReader<_>, marker: &str| -> String {
        let mut line = String::new();
        loop {
            line.clear();
            assert!(out.read_line(&mut line).unwrap() > 0, "child exited early");
            if let Some(at) = line.find(marker) {
                return line[at + marker.len()..].trim().to_owned();
            }
        }
    };
    expect(&mut out, "CHILD ready");
    child.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
    let published_key = engine.cache().redis_key("published");
    let publish = |generation: i64| {
        engine
            .cache()
            .with_connection(|conn| {
                redis::cmd("SET")
                    .arg(&published_key)
                    .arg(generation)
                    .query::<()>(conn)
            })
            .unwrap()
    };
    let stop = AtomicBool::new(false);
    let here = Mutex::new((0, 0));
    const GENERATIONS: i64 = 150;
    std::thread::scope(|s| {
        s.spawn(|| *here.lock().unwrap() = soak_readers(&other, &items.table, KEYS, &stop, false));
        let update = format!("UPDATE {} SET gen = $1", items.table);
        for generation in 1..=GENERATIONS {
            engine.db().execute(&update, &[&generation]).unwrap();
            engine.invalidate_tag("soak").unwrap();
            // Only now may a read that begins see no older generation.
            publish(generation);
        }
        stop.store(true, Ordering::SeqCst);
    });
    publish(-1);
    let report = expect(&mut out, "CHILD reads");
    assert!(child.wait().unwrap().success());
    let fields: Vec<&str> = report.split_whitespace().collect();
    let (child_reads, child_stale): (u64, u64) =
        (fields[0].parse().unwrap(), fields[2].parse().unwrap());
    let (reads, stale) = *here.lock().unwrap();
    eprintln!(
        "{GENERATIONS} invalidations: {reads} reads here ({stale} stale), \
         {child_reads} in the child ({child_stale} stale)"
    );
    assert_eq!((stale, child_stale), (0, 0), "no stale tagged read");
    assert!(reads > 0 && child_reads > 0, "both processes read");
    // The last generation is what everyone reads now.
    assert_eq!(read_gen(engine, &items.table, 1, &["soak"]), GENERATIONS);
}

/// The raw entry under `key`: (header fields, payload).
fn entry(engine: &CacheAside, key: &str) -> (Vec<u64>, Vec<u8>) {
    let redis_key = engine.cache().redis_key(key);
    let raw: Vec<u8> = engine
        .cache()
        .with_connection(|conn| redis::cmd("GET").arg(&redis_key).query(conn))
        .unwrap();
    let newline = raw.iter().position(|&b| b == b'\n').unwrap();
    let header = String::from_utf8(raw[..newline].to_vec()).unwrap();
    let numbers = header
        .split(' ')
        .skip(2)
        .map(|n| n.parse().unwrap())
        .collect();
    (numbers, raw[newline + 1..].to_vec())
}

/// When the key expires in Redis (Unix ms).
fn expire_time(engine: &CacheAside, key: &str) -> i64 {
    let redis_key = engine.cache().redis_key(key);
    engine
        .cache()
        .with_connection(|conn| redis::cmd("PEXPIRETIME").arg(&redis_key).query(conn))
        .unwrap()
}

/// An engine whose every hit refreshes early (XFetch with a huge β).
fn refreshing(label: &str) -> Fixture {
    let mut config = test_config(label);
    config.beta = 1e9;
    Fixture::with(config)
}

/// A conditional read of `key`: returns what the loader was given.
fn read_conditional(
    engine: &CacheAside,
    key: &str,
    answer: impl FnOnce(Option<u64>) -> Refresh<String>,
) -> (Option<String>, Option<Option<u64>>) {
    let mut given = None;
    let v = engine
        .get_or_load_conditional(key, TTL, Mode::SingleFlight, |cached| {
            given = Some(cached);
            // A load that takes a while: XFetch refreshes only what it
            // measured taking time, and the re-stamped expiry moves on.
            std::thread::sleep(Duration::from_millis(5));
            Ok(answer(cached))
        })
        .unwrap();
    (v, given)
}

#[test]
fn unchanged_row_extends_the_entry_without_rewriting_its_value() {
    let fx = refreshing("cond_unchanged");
    let engine = fx.client.engine();
    let row = |v: u64| Refresh::Loaded(Some(Versioned::new("widget".to_owned(), v)));
    let (v, given) = read_conditional(engine, "p:1", |_| row(3));
    assert_eq!((v.as_deref(), given), (Some("widget"), Some(None)));
    let (header, payload) = entry(engine, "p:1");
    let expires_before = expire_time(engine, "p:1");
    let before = engine.stats();

    let (v, given) = read_conditional(engine, "p:1", |_| Refresh::Unchanged);
    assert_eq!(
        given,
        Some(Some(3)),
        "the early refresh passed the cached version"
    );
    assert_eq!(v.as_deref(), Some("widget"));
    assert_eq!(engine.stats().early_refreshes - before.early_refreshes, 1);
    let (header_after, payload_after) = entry(engine, "p:1");
    assert_eq!(payload_after, payload, "same value");
    assert_eq!(header_after[0], 3, "same version");
    assert!(
        header_after[2] >= header[2] + 5,
        "logical expiry extended: {header:?} -> {header_after:?}"
    );
    assert!(
        expire_time(engine, "p:1") >= expires_before + 5,
        "key TTL extended"
    );

    // Changed: rewritten.
    let (_, given) = read_conditional(engine, "p:1", |_| {
        Refresh::Loaded(Some(Versioned::new("gadget".to_owned(), 4)))
    });
    assert_eq!(given, Some(Some(3)));
    let (header, payload) = entry(engine, "p:1");
    assert_eq!((header[0], payload.as_slice()), (4, &b"\"gadget\""[..]));
}

#[test]
fn unchanged_is_not_stored_over_a_write_during_the_load() {
    let fx = refreshing("cond_race");
    let engine = fx.client.engine();
    read_conditional(engine, "p:1", |_| {
        Refresh::Loaded(Some(Versioned::new("old".to_owned(), 1)))
    });
    let before = engine.stats();
    let (v, given) = read_conditional(engine, "p:1", |_| {
        // A writer commits and invalidates while the refresh loads.
        engine.invalidate("p:1").unwrap();
        Refresh::Unchanged
    });
    assert_eq!((v.as_deref(), given), (Some("old"), Some(Some(1))));
    assert!(!engine.cache().exists("p:1").unwrap(), "not extended back");
    assert_eq!(engine.stats().fills_dropped - before.fills_dropped, 1);
}

#[test]
fn unchanged_without_a_cached_version_is_an_error() {
    let fx = Fixture::new("cond_error");
    let engine = fx.client.engine();
    let err = engine
        .get_or_load_conditional::<String, _>("p:1", TTL, Mode::SingleFlight, |cached| {
            assert_eq!(cached, None);
            Ok(Refresh::Unchanged)
        })
        .unwrap_err();
    assert_eq!(err.kind(), cacheaside::ErrorKind::InvalidArgument);
    assert!(!engine.cache().exists("p:1").unwrap());
}

#[test]
fn a_fail_safe_copy_found_unchanged_is_re_armed_without_a_rewrite() {
    let mut config = test_config("cond_fail_safe");
    config.fail_safe_max = Duration::from_secs(60);
    let fx = Fixture::with(config);
    let engine = fx.client.engine();
    // A copy past its logical expiry (a fail-safe copy), at version 3.
    fx.put_raw("p:1", b"ca1 v 3 1000 1000\n\"widget\"");
    let before = engine.stats();
    let (v, given) = read_conditional(engine, "p:1", |_| Refresh::Unchanged);
    assert_eq!(
        given,
        Some(Some(3)),
        "the reload was told the copy's version"
    );
    assert_eq!(v.as_deref(), Some("widget"));
    let (header, payload) = entry(engine, "p:1");
    assert_eq!((header[0], payload.as_slice()), (3, &b"\"widget\""[..]));
    assert!(
        header[2] > now_ms() + TTL.as_millis() as u64 / 2,
        "fresh again for its TTL: {header:?}"
    );
    assert_eq!(
        engine.stats().stale_served,
        before.stale_served,
        "not served as stale"
    );
    // A hit now, with no load.
    let (v, given) = read_conditional(engine, "p:1", |_| unreachable!("a hit"));
    assert_eq!((v.as_deref(), given), (Some("widget"), None));
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[test]
fn tags_work_on_a_redis_cluster() {
    let cluster = common::servers::PrivateCluster::start();
    let mut config = test_config("tags_cluster");
    config.redis_url = cluster.url();
    let fx = Fixture::with(config);
    let engine = fx.client.engine();
    assert!(engine.cache().is_cluster());
    let loads = AtomicU64::new(0);
    let read = |key: &str| -> Option<String> {
        engine
            .get_or_load_tagged(key, TTL, &["category:7", "shop:1"], || {
                let n = loads.fetch_add(1, Ordering::SeqCst) + 1;
                Ok(Some(format!("{key}@{n}")))
            })
            .unwrap()
    };
    // Keys and tags in many slots.
    let keys: Vec<String> = (0..20).map(|i| format!("product:{i}")).collect();
    for key in &keys {
        read(key);
    }
    assert_eq!(loads.load(Ordering::SeqCst), 20);
    for key in &keys {
        read(key);
    }
    assert_eq!(loads.load(Ordering::SeqCst), 20, "hits");
    engine.invalidate_tag("shop:1").unwrap();
    for key in &keys {
        read(key);
    }
    assert_eq!(loads.load(Ordering::SeqCst), 40, "every entry a miss once");
    // A read that names no tags checks them too.
    engine.invalidate_tag("category:7").unwrap();
    let v: Option<String> = engine
        .get_or_load("product:0", TTL, || Ok(Some("untagged".to_owned())))
        .unwrap();
    assert_eq!(v.as_deref(), Some("untagged"));
    // A fill that raced an invalidation is not kept.
    let v: Option<i64> = engine
        .get_or_load_tagged("item:1", TTL, &["items"], || {
            engine.invalidate_tag("items").unwrap();
            Ok(Some(1))
        })
        .unwrap();
    assert_eq!(v, Some(1));
    assert!(!engine.cache().exists("item:1").unwrap());
}

#[test]
fn a_follower_never_takes_a_row_whose_fill_reply_was_lost_after_invalidate_tag() {
    let fx = Fixture::new("tags_lost_reply");
    let engine = fx.client.engine();
    let go = Barrier::new(2);
    let read = |value: i64, during: &dyn Fn()| -> Option<i64> {
        engine
            .get_or_load_tagged("item:1", TTL, &["items"], || {
                during();
                Ok(Some(value))
            })
            .unwrap()
    };
    std::thread::scope(|s| {
        let leader = s.spawn(|| {
            read(1, &|| {
                // The load read row 1; the writer commits row 2 and
                // invalidates the tag; then a reader begins and follows
                // this flight.
                engine.invalidate_tag("items").unwrap();
                go.wait();
                let deadline = std::time::Instant::now() + Duration::from_secs(10);
                while engine.flight_followers("item:1") == 0 {
                    assert!(std::time::Instant::now() < deadline, "no follower joined");
                    std::thread::yield_now();
                }
                // The fill runs on the server, its reply is lost.
                engine.hooks().lose_fill_replies(1);
            })
        });
        let follower = s.spawn(|| {
            go.wait();
            read(2, &|| {})
        });
        assert_eq!(leader.join().unwrap(), Some(1), "the leader keeps its load");
        assert_eq!(
            follower.join().unwrap(),
            Some(2),
            "the follower began after invalidate_tag returned"
        );
    });
    assert_eq!(engine.in_flight(), 0);
}

/// A batch read (`get_or_load_many`) names no tags, and still finds a
/// tagged entry out of date once one of its tags is invalidated.
#[test]
fn a_batch_read_of_tagged_entries_honours_invalidate_tag() {
    let fx = Fixture::new("tags_batch");
    let engine = fx.client.engine();
    for (key, tag) in [("product:1", "category:7"), ("product:2", "category:8")] {
        let _: Option<String> = engine
            .get_or_load_tagged(key, TTL, &[tag], || Ok(Some(format!("{key}@tagged"))))
            .unwrap();
    }
    let loads = Mutex::new(Vec::new());
    let batch = || -> Vec<Option<String>> {
        engine
            .get_or_load_many(&["product:1", "product:2"], TTL, |missing| {
                loads
                    .lock()
                    .unwrap()
                    .extend(missing.iter().map(|k| k.to_string()));
                Ok(missing
                    .iter()
                    .map(|k| (k.to_string(), format!("{k}@batch")))
                    .collect())
            })
            .unwrap()
    };
    // Both tagged entries are hits while their tags stand.
    assert_eq!(
        batch(),
        [
            Some("product:1@tagged".into()),
            Some("product:2@tagged".into())
        ]
    );
    assert!(loads.lock().unwrap().is_empty());
    engine.invalidate_tag("category:7").unwrap();
    assert_eq!(
        batch(),
        [
            Some("product:1@batch".into()),
            Some("product:2@tagged".into())
        ]
    );
    assert_eq!(*loads.lock().unwrap(), ["product:1"]);
}

/// A captured table with a tag column: a write to it from anywhere (here
/// plain SQL, bypassing the library) invalidates, through the relay, every
/// entry carrying the row's tag, whatever the entry's key; both tags when
/// an update moves the row; and a row whose tag is no valid tag name is
/// skipped without holding up the others.
#[test]
fn a_captured_tag_column_invalidates_the_tags_of_rows_written_in_sql() {
    let fx = Fixture::new("tags_capture");
    let engine = fx.client.engine();
    let table = unique("ca_tags_shelf");
    let db = engine.db();
    db.batch_execute(&format!(
        "CREATE TABLE {table} (id bigint PRIMARY KEY, cat text, gen bigint NOT NULL);
         INSERT INTO {table} VALUES (1, 'a', 0), (2, 'a', 0), (3, 'b', 0),
                                    (4, 'c', 0), (5, 'bad{{', 0);"
    ))
    .unwrap();
    let _drop = Items {
        engine,
        table: table.clone(),
    };
    engine
        .capture_changes_tagged(&table, "shelf:", "id", None, "cat:", "cat")
        .unwrap();
    // Listings of a category: keys that are no row's key, tagged by it.
    let loads = Mutex::new(Vec::<String>::new());
    let read_all = || {
        for (key, tag) in [
            ("list:a", "cat:a"),
            ("count:a", "cat:a"),
            ("list:b", "cat:b"),
            ("list:c", "cat:c"),
        ] {
            let _: Option<String> = engine
                .get_or_load_tagged(key, TTL, &[tag], || {
                    loads.lock().unwrap().push(key.to_owned());
                    Ok(Some(format!("{key}:value")))
                })
                .unwrap();
        }
        std::mem::take(&mut *loads.lock().unwrap())
    };
    let write = |sql: &str| {
        db.execute(&sql.replace("{t}", &table), &[]).unwrap();
        assert!(engine.sync_relay(common::PATIENCE), "the relay caught up");
    };
    assert_eq!(read_all(), ["list:a", "count:a", "list:b", "list:c"]);
    assert!(read_all().is_empty(), "all hits");

    // An update that keeps row 2 in category a: both of a's entries.
    write("UPDATE {t} SET gen = gen + 1 WHERE id = 2");
    assert_eq!(read_all(), ["list:a", "count:a"]);
    // Row 3 moves from b to c: both.
    write("UPDATE {t} SET cat = 'c' WHERE id = 3");
    assert_eq!(read_all(), ["list:b", "list:c"]);
    // A delete; and a row with an invalid tag ("cat:bad{") written with
    // one of c: it is skipped, c is invalidated.
    write("DELETE FROM {t} WHERE id = 1");
    assert_eq!(read_all(), ["list:a", "count:a"]);
    let errors = engine.stats().relay_errors;
    write("UPDATE {t} SET gen = gen + 1 WHERE id IN (4, 5)");
    assert_eq!(read_all(), ["list:c"]);
    assert_eq!(engine.stats().relay_errors, errors, "no relay error");
    assert!(read_all().is_empty(), "all hits again");
    assert_eq!(engine.in_flight(), 0);
}
