//! Batch reads (`get_or_load_many`) and `invalidate_many` against the real
//! Postgres and Redis: order, absent rows, one loader call and one
//! statement for a cold page, single-flight per key across threads and
//! engines, a write racing one key of a batch, corrupt entries, a cluster.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::Duration;

use cacheaside::{CacheAside, Config, Error};
use common::servers::PrivateCluster;
use common::test_config;

const TTL: Duration = Duration::from_secs(60);

/// An engine on a products table and namespace of this test's own (rows
/// 1..=`rows` named `p<id>`), both removed on drop.
struct Shop {
    engine: CacheAside,
    table: String,
}

impl Shop {
    fn new(label: &str, rows: i64) -> Shop {
        Shop::with(test_config(label), rows)
    }

    fn with(config: Config, rows: i64) -> Shop {
        let table = format!("{}_items", config.users_table);
        let engine = CacheAside::open(&config).expect("open (are the services up?)");
        engine
            .db()
            .batch_execute(&format!(
                "CREATE TABLE {table} (id bigint PRIMARY KEY, name text NOT NULL);
                 INSERT INTO {table} SELECT g, 'p' || g FROM generate_series(1, {rows}) g"
            ))
            .unwrap();
        Shop { engine, table }
    }

    /// The one statement a batch loader sends: every missing row at once.
    fn load(&self, missing: &[&str]) -> Result<Vec<(String, String)>, Error> {
        let ids: Vec<i64> = missing.iter().map(|k| id_of(k)).collect();
        let sql = format!("SELECT id, name FROM {} WHERE id = ANY($1)", self.table);
        let rows = self.engine.db().query(&sql, &[&ids])?;
        Ok(rows
            .iter()
            .map(|r| (key(r.get(0)), r.get::<_, String>(1)))
            .collect())
    }

    fn rename(&self, id: i64, name: &str) {
        let sql = format!("UPDATE {} SET name = $2 WHERE id = $1", self.table);
        self.engine.db().execute(&sql, &[&id, &name]).unwrap();
    }

    fn cached(&self, k: &str) -> bool {
        self.engine.cache().exists(k).unwrap()
    }
}

impl Drop for Shop {
    fn drop(&mut self) {
        let _ = self
            .engine
            .db()
            .batch_execute(&format!("DROP TABLE IF EXISTS {}", self.table));
        let _ = self.engine.cache().delete_namespace();
    }
}

fn key(id: i64) -> String {
    format!("item:{id}")
}

fn id_of(key: &str) -> i64 {
    key.trim_start_matches("item:")
        .parse()
        .expect("an item key")
}

fn name(id: i64) -> Option<String> {
    Some(format!("p{id}"))
}

#[test]
fn batch_answers_in_key_order_and_caches_absent_rows() {
    let shop = Shop::new("b_order", 10);
    // 11 and 12 have no row; 3 is asked twice.
    let keys: Vec<String> = [5, 11, 3, 1, 12, 3].map(key).to_vec();
    let calls = AtomicU32::new(0);
    let asked = Mutex::new(Vec::new());
    let read = || {
        shop.engine
            .get_or_load_many(&keys, TTL, |missing| {
                calls.fetch_add(1, Ordering::SeqCst);
                asked.lock().unwrap().push(missing.len());
                shop.load(missing)
            })
            .unwrap()
    };
    let want = vec![name(5), None, name(3), name(1), None, name(3)];
    assert_eq!(read(), want);
    assert_eq!(calls.load(Ordering::SeqCst), 1, "one loader call");
    assert_eq!(*asked.lock().unwrap(), [5], "each distinct key once");
    // Everything is cached now, the absent rows as absent: no loader call.
    assert_eq!(read(), want);
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "hits and absences call no loader"
    );
    assert!(shop.cached(&key(11)), "an absent row is cached as absent");
    assert_eq!(shop.engine.in_flight(), 0);
    // An empty batch is an empty answer.
    let none: Vec<Option<String>> = shop
        .engine
        .get_or_load_many::<&str, _, _>(&[], TTL, |_| unreachable!())
        .unwrap();
    assert!(none.is_empty());
}

#[test]
fn hundred_cold_keys_cost_one_loader_call_and_one_statement() {
    let shop = Shop::new("b_cold", 100);
    let keys: Vec<String> = (1..=100).map(key).collect();
    let calls = AtomicU32::new(0);
    let before = shop.engine.db().query_count();
    let got: Vec<Option<String>> = shop
        .engine
        .get_or_load_many(&keys, TTL, |missing| {
            calls.fetch_add(1, Ordering::SeqCst);
            shop.load(missing)
        })
        .unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(shop.engine.db().query_count(), before + 1, "one statement");
    assert_eq!(got, (1..=100).map(name).collect::<Vec<_>>());
    let stats = shop.engine.stats();
    assert_eq!((stats.misses, stats.hits, stats.fills_dropped), (100, 0, 0));
    // The second read: 100 hits, no loader, no statement.
    let again: Vec<Option<String>> = shop
        .engine
        .get_or_load_many(&keys, TTL, |_| unreachable!("all hits"))
        .unwrap();
    assert_eq!(again, got);
    assert_eq!(shop.engine.db().query_count(), before + 1);
    assert_eq!(shop.engine.stats().hits, 100);
}

#[test]
fn overlapping_batches_from_fifty_threads_load_each_key_once() {
    const THREADS: usize = 50;
    const PAGE: i64 = 100;
    let shop = Shop::new("b_overlap", PAGE);
    let loads: HashMap<String, AtomicU32> =
        (1..=PAGE).map(|id| (key(id), AtomicU32::new(0))).collect();
    let barrier = Barrier::new(THREADS);
    let results: Vec<Vec<Option<String>>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let (shop, loads, barrier) = (&shop, &loads, &barrier);
                s.spawn(move || {
                    // Thread t asks 20 keys starting at 2t: each key is in
                    // up to ten threads' batches, in different company.
                    let ids: Vec<i64> = (0..20).map(|i| (2 * t as i64 + i) % PAGE + 1).collect();
                    let keys: Vec<String> = ids.iter().map(|&id| key(id)).collect();
                    barrier.wait();
                    let got = shop
                        .engine
                        .get_or_load_many(&keys, TTL, |missing| {
                            for k in missing {
                                loads[*k].fetch_add(1, Ordering::SeqCst);
                            }
                            shop.load(missing)
                        })
                        .unwrap();
                    assert_eq!(got, ids.iter().map(|&id| name(id)).collect::<Vec<_>>());
                    got
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(results.len(), THREADS);
    let counts: Vec<(String, u32)> = loads
        .iter()
        .map(|(k, n)| (k.clone(), n.load(Ordering::SeqCst)))
        .filter(|(_, n)| *n != 1)
        .collect();
    assert!(
        counts.is_empty(),
        "keys not loaded exactly once: {counts:?}"
    );
    assert_eq!(shop.engine.in_flight(), 0, "no flight left behind");
}

#[test]
fn a_write_during_a_batch_load_drops_that_keys_fill_only() {
    let shop = Shop::new("b_race", 10);
    let keys: Vec<String> = (1..=5).map(key).collect();
    let got: Vec<Option<String>> = shop
        .engine
        .get_or_load_many(&keys, TTL, |missing| {
            let rows = shop.load(missing);
            // A write of item 3 commits and invalidates after the load read
            // its row, before the batch fills.
            shop.rename(3, "renamed");
            shop.engine.invalidate(&key(3)).unwrap();
            rows
        })
        .unwrap();
    // This call began before the write: the row it read is its answer.
    assert_eq!(got[2], name(3));
    assert_eq!(
        shop.engine.stats().fills_dropped,
        1,
        "item 3's fill dropped"
    );
    assert!(!shop.cached(&key(3)), "the pre-write row was not cached");
    for id in [1, 2, 4, 5] {
        assert!(shop.cached(&key(id)), "item {id} filled");
    }
    // The next read loads the written row, and only that one.
    let calls = AtomicU32::new(0);
    let after: Vec<Option<String>> = shop
        .engine
        .get_or_load_many(&keys, TTL, |missing| {
            calls.fetch_add(1, Ordering::SeqCst);
            assert_eq!(missing, [key(3)]);
            shop.load(missing)
        })
        .unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(after[2].as_deref(), Some("renamed"));
}

#[test]
fn a_corrupt_entry_in_a_batch_is_a_miss() {
    let shop = Shop::new("b_corrupt", 5);
    let keys: Vec<String> = (1..=5).map(key).collect();
    let _: Vec<Option<String>> = shop
        .engine
        .get_or_load_many(&keys, TTL, |missing| shop.load(missing))
        .unwrap();
    // Garbage under item 2, and a value of another type under item 4.
    let cache = shop.engine.cache();
    let (k2, k4) = (cache.redis_key(&key(2)), cache.redis_key(&key(4)));
    cache
        .with_connection(|c| {
            redis::cmd("SET")
                .arg(&k2)
                .arg("not an entry")
                .query::<()>(c)?;
            redis::cmd("SET")
                .arg(&k4)
                .arg(format!("ca1 v 0 0 {}\n[1,2]", u64::MAX / 2))
                .query::<()>(c)
        })
        .unwrap();
    let asked = Mutex::new(Vec::new());
    let got: Vec<Option<String>> = shop
        .engine
        .get_or_load_many(&keys, TTL, |missing| {
            asked
                .lock()
                .unwrap()
                .extend(missing.iter().map(|k| k.to_string()));
            shop.load(missing)
        })
        .unwrap();
    assert_eq!(got, (1..=5).map(name).collect::<Vec<_>>());
    assert_eq!(*asked.lock().unwrap(), [key(2), key(4)]);
    assert_eq!(shop.engine.stats().corrupt_entries, 2);
}

#[test]
fn a_key_another_engine_is_loading_is_waited_for_not_loaded_again() {
    // Two engines on one namespace: as two processes, they share nothing
    // but Redis (no in-process flight between them).
    let config = test_config("b_xproc");
    let shop = Shop::with(config.clone(), 10);
    let other = CacheAside::open(&config).unwrap();
    let keys: Vec<String> = (1..=10).map(key).collect();
    let (entered, release) = (Arc::new(Barrier::new(2)), Arc::new(Barrier::new(2)));
    let (in_loader, go) = (Arc::clone(&entered), Arc::clone(&release));
    let loaded_5 = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&loaded_5);
    let holder = std::thread::spawn(move || {
        other.get_or_load(&key(5), TTL, || {
            counter.fetch_add(1, Ordering::SeqCst);
            in_loader.wait();
            go.wait();
            Ok(Some("p5".to_owned()))
        })
    });
    entered.wait(); // the other engine holds item 5's lock and lease
    let asked = Mutex::new(Vec::new());
    let got: Vec<Option<String>> = std::thread::scope(|s| {
        let batch = s.spawn(|| {
            shop.engine
                .get_or_load_many(&keys, TTL, |missing| {
                    asked.lock().unwrap().push(missing.len());
                    if missing.contains(&key(5).as_str()) {
                        loaded_5.fetch_add(1, Ordering::SeqCst);
                    }
                    shop.load(missing)
                })
                .unwrap()
        });
        // The batch loads the other nine while item 5 waits for its holder.
        while shop.engine.stats().misses < 10 || !shop.cached(&key(1)) {
            std::thread::yield_now();
        }
        release.wait();
        batch.join().unwrap()
    });
    assert_eq!(holder.join().unwrap().unwrap().as_deref(), Some("p5"));
    assert_eq!(got, (1..=10).map(name).collect::<Vec<_>>());
    assert_eq!(
        *asked.lock().unwrap(),
        [9],
        "one loader call, without item 5"
    );
    assert_eq!(
        loaded_5.load(Ordering::SeqCst),
        1,
        "item 5 loaded once in all"
    );
}

#[test]
fn a_batch_takes_near_cache_hits_first_and_a_write_evicts_them() {
    let mut config = test_config("b_near");
    config.local_cache = cacheaside::LocalCache::new(1_000, Duration::from_secs(60));
    let shop = Shop::with(config, 10);
    let keys: Vec<String> = (1..=10).map(key).collect();
    let read = || -> Vec<Option<String>> {
        shop.engine
            .get_or_load_many(&keys, TTL, |missing| shop.load(missing))
            .unwrap()
    };
    // Cold: loaded and filled. Then Redis hits put the entries into L1,
    // once its tracker is live.
    assert_eq!(read(), (1..=10).map(name).collect::<Vec<_>>());
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while shop.engine.local_cache_entries() < 10 {
        assert!(std::time::Instant::now() < deadline, "L1 never filled");
        read();
    }
    let before = shop.engine.stats();
    assert_eq!(read(), (1..=10).map(name).collect::<Vec<_>>());
    let after = shop.engine.stats();
    assert_eq!(after.local_hits - before.local_hits, 10, "all ten from L1");
    assert_eq!(after.hits, before.hits, "no Redis lookup");
    // A write of this process evicts its key at once: the next batch reads
    // that one key from Redis (it misses there too, and reloads).
    shop.rename(4, "four");
    shop.engine.invalidate_many(&[key(4)]).unwrap();
    let asked = Mutex::new(Vec::new());
    let got: Vec<Option<String>> = shop
        .engine
        .get_or_load_many(&keys, TTL, |missing| {
            asked
                .lock()
                .unwrap()
                .extend(missing.iter().map(|k| k.to_string()));
            shop.load(missing)
        })
        .unwrap();
    assert_eq!(*asked.lock().unwrap(), [key(4)]);
    assert_eq!(got[3].as_deref(), Some("four"));
}

#[test]
fn a_batch_loader_that_reads_a_key_it_loads_is_told_at_once() {
    let shop = Shop::new("b_reentrant", 3);
    let keys: Vec<String> = (1..=3).map(key).collect();
    let inner = Mutex::new(None);
    let got: Vec<Option<String>> = shop
        .engine
        .get_or_load_many(&keys, TTL, |missing| {
            // This thread leads item 2's flight: waiting for it would be
            // waiting for itself.
            let again: Result<Option<String>, Error> =
                shop.engine.get_or_load(&key(2), TTL, || Ok(None));
            *inner.lock().unwrap() = Some(again.map_err(|e| e.kind()));
            shop.load(missing)
        })
        .unwrap();
    assert_eq!(got, (1..=3).map(name).collect::<Vec<_>>());
    assert_eq!(
        inner.lock().unwrap().take(),
        Some(Err(cacheaside::ErrorKind::InvalidArgument))
    );
    assert_eq!(shop.engine.in_flight(), 0);
}

#[test]
fn a_batch_with_redis_down_loads_once_and_answers() {
    let mut config = test_config("b_down");
    // Nothing listens there: every Redis call is refused at once.
    config.redis_url = format!("redis://127.0.0.1:{}/", common::servers::free_port());
    let shop = Shop::with(config, 5);
    let keys: Vec<String> = (1..=6).map(key).collect();
    let calls = AtomicU32::new(0);
    let got: Vec<Option<String>> = shop
        .engine
        .get_or_load_many(&keys, TTL, |missing| {
            calls.fetch_add(1, Ordering::SeqCst);
            shop.load(missing)
        })
        .unwrap();
    assert_eq!(got[..5], (1..=5).map(name).collect::<Vec<_>>());
    assert_eq!(got[5], None);
    assert_eq!(calls.load(Ordering::SeqCst), 1, "one loader call, uncached");
    assert_eq!(shop.engine.stats().bypassed, 6);
    assert_eq!(shop.engine.in_flight(), 0);
}

#[test]
fn invalidate_many_makes_those_keys_miss_and_no_others() {
    let shop = Shop::new("b_inval", 6);
    let keys: Vec<String> = (1..=6).map(key).collect();
    let _: Vec<Option<String>> = shop
        .engine
        .get_or_load_many(&keys, TTL, |missing| shop.load(missing))
        .unwrap();
    shop.rename(2, "two");
    shop.rename(5, "five");
    shop.engine.invalidate_many(&[key(2), key(5)]).unwrap();
    let asked = Mutex::new(Vec::new());
    let got: Vec<Option<String>> = shop
        .engine
        .get_or_load_many(&keys, TTL, |missing| {
            asked
                .lock()
                .unwrap()
                .extend(missing.iter().map(|k| k.to_string()));
            shop.load(missing)
        })
        .unwrap();
    assert_eq!(*asked.lock().unwrap(), [key(2), key(5)]);
    assert_eq!(got[1].as_deref(), Some("two"));
    assert_eq!(got[4].as_deref(), Some("five"));
    assert!(shop.engine.invalidate_many(&["ok", "bad{key}"]).is_err());
}

#[test]
fn a_batch_on_a_cluster_spans_slots() {
    let cluster = PrivateCluster::start();
    let mut config = test_config("b_cluster");
    config.redis_url = cluster.url();
    let shop = Shop::with(config, 30);
    assert!(shop.engine.cache().is_cluster());
    let keys: Vec<String> = (1..=30).map(key).collect();
    let owners: std::collections::HashSet<u16> = keys
        .iter()
        .map(|k| {
            let slot: u16 = cluster.nodes[0]
                .command(&["CLUSTER", "KEYSLOT", &shop.engine.cache().redis_key(k)])
                .parse()
                .unwrap();
            cluster.owner_of(slot).port()
        })
        .collect();
    assert_eq!(owners.len(), 3, "the batch spans every master");
    let calls = AtomicU32::new(0);
    let read = |keys: &[String]| -> Vec<Option<String>> {
        shop.engine
            .get_or_load_many(keys, TTL, |missing| {
                calls.fetch_add(1, Ordering::SeqCst);
                shop.load(missing)
            })
            .unwrap()
    };
    let want: Vec<Option<String>> = (1..=30).map(name).collect();
    assert_eq!(read(&keys), want);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(read(&keys), want, "all hits");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    // A value of another type under one key: a miss, swept and reloaded.
    let k3 = shop.engine.cache().redis_key(&key(3));
    shop.engine
        .cache()
        .with_connection(|c| {
            redis::cmd("DEL").arg(&k3).query::<()>(c)?;
            redis::cmd("RPUSH").arg(&k3).arg("x").query::<()>(c)
        })
        .unwrap();
    assert_eq!(read(&keys), want);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_eq!(shop.engine.stats().corrupt_entries, 1);
    // Redis forgot the scripts (a restart would): the pipelines load them.
    for node in &cluster.nodes {
        node.command(&["SCRIPT", "FLUSH"]);
    }
    shop.engine.invalidate_many(&keys[..3]).unwrap();
    assert_eq!(read(&keys), want);
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    shop.rename(7, "seven");
    shop.engine.invalidate_many(&[key(7)]).unwrap();
    assert_eq!(read(&keys)[6].as_deref(), Some("seven"));
    assert_eq!(calls.load(Ordering::SeqCst), 4);
    assert_eq!(shop.engine.stats().fills_dropped, 0);
}
