//! Write-behind on a 3-master Redis Cluster of our own (free loopback
//! ports, killed when the last test using it is done): a stream per slot,
//! so each key's enqueue is one atomic script on one node; workers in other
//! processes read every stream, one is SIGKILLed mid-batch, entries are
//! evicted while pending, and still Postgres ends with every key's last
//! change and no read goes back in time.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex, Weak, mpsc};
use std::time::{Duration, Instant};

use cacheaside::{Client, Config, Error};
use common::servers::PrivateCluster;
use common::{Fixture, PATIENCE, test_config};

/// One cluster for the tests that run at the same time (see
/// `tests/cluster.rs`): the last to finish drops (kills) it.
fn cluster() -> Arc<PrivateCluster> {
    static SHARED: Mutex<Weak<PrivateCluster>> = Mutex::new(Weak::new());
    let mut shared = SHARED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(cluster) = shared.upgrade() {
        return cluster;
    }
    let cluster = Arc::new(PrivateCluster::start());
    *shared = Arc::downgrade(&cluster);
    cluster
}

/// Write-behind settings on `redis_url`: a short claim timeout and quick
/// retries, as `tests/write_behind.rs` uses.
fn wb_config(label: &str, redis_url: &str) -> Config {
    let mut config = test_config(label);
    config.redis_url = redis_url.into();
    config.write_behind_claim_after = Duration::from_secs(1);
    config.write_behind_retry_backoff = Duration::from_millis(20);
    config.write_behind_attempts = 3;
    config
}

/// The cluster hash slot of a hash tag (CRC16/XMODEM mod 16384), written
/// out here so the test does not trust the library's.
fn slot_of(tag: &str) -> u16 {
    let mut crc: u16 = 0;
    for byte in tag.bytes() {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % 16384
}

/// The write-behind stream of `key` (docs/cluster.md: the stream of its
/// slot, `{namespace}{write_behind:N}:stream` with the first `N` that hashes
/// to the slot).
fn stream_of(fx: &Fixture, key: &str) -> String {
    let slot = slot_of(key);
    let n = (0..)
        .find(|n| slot_of(&format!("write_behind:{n}")) == slot)
        .unwrap();
    format!("{}{{write_behind:{n}}}:stream", fx.config.namespace)
}

// ---- workers in other processes, killed ------------------------------------

const ROLE: &str = "CACHEASIDE_TEST_CLUSTER_WRITE_BEHIND_CHILD";

/// The child: `workers` workers on the parent's table, namespace and
/// cluster until its stdin closes; then it prints its counters.
#[test]
#[ignore = "the child process of the cluster kill test, run by it"]
fn cluster_worker_process_entry_point() {
    let settings = std::env::var(ROLE).expect("run by the kill test");
    let parts: Vec<&str> = settings.split(';').collect();
    let [table, namespace, outbox, redis_url, workers] = parts[..] else {
        panic!("bad settings {settings:?}");
    };
    let mut config = wb_config("child", redis_url);
    config.users_table = table.into();
    config.namespace = namespace.into();
    config.outbox_table = outbox.into();
    config.invalidation_relay = false;
    config.write_behind_batch = 64;
    // The default claim timeout: a dead worker's changes must move on long
    // before it, once its liveness key has expired.
    config.write_behind_claim_after = Config::default().write_behind_claim_after;
    let client = Client::open(&config).unwrap();
    client.start_write_behind(workers.parse().unwrap()).unwrap();
    println!("workers started");
    let mut line = String::new();
    while std::io::stdin().read_line(&mut line).unwrap_or(0) > 0 {}
    client.stop_write_behind();
    let stats = client.engine().stats();
    println!(
        "stats applied={} claimed={} dead={}",
        stats.write_behind_applied, stats.write_behind_claimed, stats.write_behind_dead_lettered
    );
}

/// A worker process: the child, and its final counters line.
struct WorkerProcess {
    child: Child,
    stats: mpsc::Receiver<String>,
}

impl WorkerProcess {
    /// Closes its stdin (it stops its workers and exits); returns how many
    /// changes it claimed from other workers.
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

fn worker_process(fx: &Fixture, workers: u32) -> WorkerProcess {
    let c = &fx.config;
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "cluster_worker_process_entry_point",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(
            ROLE,
            format!(
                "{};{};{};{};{workers}",
                c.users_table, c.namespace, c.outbox_table, c.redis_url
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
            _ => {
                let status = child.wait();
                panic!("the worker process ended before starting: {status:?}");
            }
        }
    }
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

/// Changes delivered to the workers of process `pid` and not yet
/// acknowledged, over `streams`.
fn held_by(fx: &Fixture, streams: &[String], pid: u32) -> i64 {
    let prefix = format!("worker-{pid}:");
    let mut held = 0;
    for stream in streams {
        let summary: redis::Value = fx
            .client
            .cache()
            .with_connection(|c| {
                redis::cmd("XPENDING")
                    .arg(stream)
                    .arg("cacheaside")
                    .query(c)
            })
            .unwrap_or(redis::Value::Nil);
        let redis::Value::Array(parts) = summary else {
            continue;
        };
        let Some(redis::Value::Array(consumers)) = parts.get(3) else {
            continue;
        };
        held += consumers
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
            .sum::<i64>();
    }
    held
}

/// A user's committed plan and version.
fn row(fx: &Fixture, id: i64) -> (String, i64) {
    let sql = format!(
        "SELECT plan, version FROM {} WHERE id = $1",
        fx.config.users_table
    );
    let r = fx.client.db().query_opt(&sql, &[&id]).unwrap().unwrap();
    (r.get(0), r.get(1))
}

/// The change number in a plan `p<i>` (the seeded plans count as -1).
fn change_no(plan: &str) -> i64 {
    plan.strip_prefix('p')
        .and_then(|n| n.parse().ok())
        .unwrap_or(-1)
}

#[test]
fn five_keys_in_five_slots_keep_their_last_change_through_a_killed_worker_and_evictions() {
    const USERS: i64 = 5;
    const CHANGES: i64 = 2_000;
    let cluster = cluster();
    let fx = Fixture::with(wb_config("cwb_soak", &cluster.url()));
    assert!(fx.client.cache().is_cluster());
    let slots: std::collections::BTreeSet<u16> = (1..=USERS)
        .map(|id| slot_of(&format!("user:{id}")))
        .collect();
    assert_eq!(slots.len(), USERS as usize, "five keys, five slots");
    let masters: std::collections::BTreeSet<u16> = slots
        .iter()
        .map(|slot| cluster.owner_of(*slot).port())
        .collect();
    assert_eq!(masters.len(), 3, "the keys' slots span the three masters");
    let streams: Vec<String> = (1..=USERS)
        .map(|id| stream_of(&fx, &format!("user:{id}")))
        .collect();

    let mut victim = Some(worker_process(&fx, 2));
    let survivor = worker_process(&fx, 2);
    // Another process's reader: its reads of each key never go back.
    let reader = {
        let mut config = fx.config.clone();
        config.invalidation_relay = false;
        Client::open(&config).unwrap()
    };

    let last_seq: Mutex<HashMap<i64, u64>> = Mutex::new(HashMap::new());
    let enqueued = AtomicUsize::new(0);
    let done = AtomicBool::new(false);
    let (reads, evictions) = (AtomicUsize::new(0), AtomicUsize::new(0));
    let start = Barrier::new(USERS as usize + 3);
    let restarted = std::thread::scope(|s| {
        // One writer per key: 2,000 ordered changes each, every one read
        // back at once (read-your-writes, even right after an eviction).
        for id in 1..=USERS {
            let (fx, last_seq, enqueued, start) = (&fx, &last_seq, &enqueued, &start);
            s.spawn(move || {
                start.wait();
                let mut seq = 0;
                for i in 0..CHANGES {
                    let plan = format!("p{i}");
                    let next = fx
                        .client
                        .update_user_plan_write_behind(id, &plan)
                        .unwrap()
                        .expect("seeded");
                    assert!(next > seq, "user {id}: sequence {next} after {seq}");
                    seq = next;
                    enqueued.fetch_add(1, Ordering::Relaxed);
                    let got = fx.client.get_user_profile(id).unwrap().unwrap();
                    assert_eq!(
                        (got.plan.as_str(), got.version as u64),
                        (plan.as_str(), seq),
                        "user {id} read back its own change"
                    );
                }
                last_seq.lock().unwrap().insert(id, seq);
            });
        }
        // Another process reads every key over and over: never older than
        // what it read before.
        {
            let (reader, done, reads, start) = (&reader, &done, &reads, &start);
            s.spawn(move || {
                let mut seen = [(-1_i64, 0_i64); USERS as usize + 1];
                start.wait();
                while !done.load(Ordering::Relaxed) {
                    for id in 1..=USERS {
                        let got = reader.get_user_profile(id).unwrap().unwrap();
                        let now = (change_no(&got.plan), got.version);
                        let before = seen[id as usize];
                        assert!(
                            now.0 >= before.0 && now.1 >= before.1,
                            "user {id} went back in time: {now:?} after {before:?}"
                        );
                        seen[id as usize] = now;
                        reads.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
        // Entries evicted while pending: value keys deleted behind the
        // library's back, as maxmemory would.
        {
            let (fx, done, evictions, start) = (&fx, &done, &evictions, &start);
            s.spawn(move || {
                start.wait();
                let mut id = 0;
                while !done.load(Ordering::Relaxed) {
                    id = id % USERS + 1;
                    let key = fx.client.cache().redis_key(&format!("user:{id}"));
                    let deleted: i64 = fx
                        .client
                        .cache()
                        .with_connection(|c| redis::cmd("DEL").arg(&key).query(c))
                        .unwrap();
                    evictions.fetch_add(deleted as usize, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(2));
                }
            });
        }
        start.wait();
        // Midway, SIGKILL a worker process while its workers hold
        // delivered changes, and start another.
        let deadline = Instant::now() + PATIENCE * 4;
        while enqueued.load(Ordering::Relaxed) < (USERS * CHANGES / 2) as usize {
            assert!(Instant::now() < deadline, "the writers stalled");
            std::thread::sleep(Duration::from_millis(1));
        }
        let mut child = victim.take().unwrap().child;
        let pid = child.id();
        while held_by(&fx, &streams, pid) == 0 {
            assert!(Instant::now() < deadline, "the worker never held a change");
            std::thread::sleep(Duration::from_micros(200));
        }
        child.kill().unwrap(); // SIGKILL
        let killed_at = Instant::now();
        assert!(!child.wait().unwrap().success());
        while held_by(&fx, &streams, pid) > 0 {
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
        let restarted = worker_process(&fx, 2);
        while enqueued.load(Ordering::Relaxed) < (USERS * CHANGES) as usize {
            assert!(Instant::now() < deadline, "the writers stalled");
            std::thread::sleep(Duration::from_millis(5));
        }
        done.store(true, Ordering::Relaxed);
        restarted
    });
    eprintln!(
        "reads by another process: {}, evictions: {}",
        reads.load(Ordering::Relaxed),
        evictions.load(Ordering::Relaxed)
    );
    assert!(evictions.load(Ordering::Relaxed) > 0, "nothing was evicted");

    if let Err(err) = fx.client.drain_write_behind(PATIENCE) {
        for stream in &streams {
            let dump: redis::Value = fx
                .client
                .cache()
                .with_connection(|c| {
                    redis::pipe()
                        .cmd("XLEN")
                        .arg(stream)
                        .cmd("XPENDING")
                        .arg(stream)
                        .arg("cacheaside")
                        .cmd("XINFO")
                        .arg("GROUPS")
                        .arg(stream)
                        .cmd("XRANGE")
                        .arg(stream)
                        .arg("-")
                        .arg("+")
                        .arg("COUNT")
                        .arg(3)
                        .query(c)
                })
                .unwrap();
            eprintln!("{stream}: {dump:?}");
        }
        panic!("{err}");
    }
    let last_seq = last_seq.into_inner().unwrap();
    for id in 1..=USERS {
        let last = format!("p{}", CHANGES - 1);
        assert_eq!(
            row(&fx, id),
            (last.clone(), last_seq[&id] as i64),
            "user {id}"
        );
        let now = reader.get_user_profile(id).unwrap().unwrap();
        assert_eq!((now.plan, now.version as u64), (last, last_seq[&id]));
    }
    assert_eq!(fx.client.write_behind_pending().unwrap(), 0);
    assert!(
        fx.client
            .engine()
            .write_behind_dead_letters(10)
            .unwrap()
            .is_empty()
    );
    // Each key's changes went to the stream of its slot.
    for stream in &streams {
        let exists: bool = fx
            .client
            .cache()
            .with_connection(|c| redis::cmd("EXISTS").arg(stream).query(c))
            .unwrap();
        assert!(exists, "{stream}");
    }
    let claimed = survivor.finish() + restarted.finish();
    assert!(claimed >= 1, "nothing was claimed from the killed worker");
}

#[test]
fn dead_letters_of_every_slot_are_listed_and_dropped_on_a_cluster() {
    let cluster = cluster();
    let fx = Fixture::with(wb_config("cwb_dead", &cluster.url()));
    let engine = fx.client.engine();
    engine
        .register_write_behind("refused:", |_, _| {
            Err(Error::loader(std::io::Error::other("always refused")))
        })
        .unwrap();
    let keys = ["refused:a", "refused:b", "refused:c"];
    let slots: std::collections::BTreeSet<u16> = keys.iter().map(|k| slot_of(k)).collect();
    assert_eq!(slots.len(), 3, "three slots");
    for key in keys {
        engine
            .write_behind(key, Duration::from_secs(60), &1_i64)
            .unwrap();
    }
    assert_eq!(engine.write_behind_pending().unwrap(), 3);
    engine.start_write_behind(1).unwrap();
    let deadline = Instant::now() + PATIENCE;
    let letters = loop {
        let letters = engine.write_behind_dead_letters(10).unwrap();
        if letters.len() == 3 {
            break letters;
        }
        assert!(Instant::now() < deadline, "dead letters: {letters:?}");
        std::thread::sleep(Duration::from_millis(20));
    };
    engine.stop_write_behind();
    assert_eq!(engine.write_behind_pending().unwrap(), 0);
    let mut got: Vec<&str> = letters.iter().filter_map(|l| l.key.as_deref()).collect();
    got.sort_unstable();
    assert_eq!(got, keys);
    for letter in &letters {
        let slot: u16 = letter.id.split_once('@').unwrap().1.parse().unwrap();
        assert_eq!(Some(slot), letter.key.as_deref().map(slot_of), "{letter:?}");
        assert!(letter.error.contains("always refused"), "{letter:?}");
    }
    // An id without its slot is ambiguous on a cluster: refused.
    let bare = letters[0].id.split_once('@').unwrap().0.to_owned();
    assert!(engine.drop_dead_letters(&[bare.as_str()]).is_err());
    // Counted over every slot's stream (as `cacheaside stats` reports).
    assert_eq!(engine.write_behind_dead_letter_count().unwrap(), 3);
    let ids: Vec<&str> = letters.iter().map(|l| l.id.as_str()).collect();
    assert_eq!(engine.drop_dead_letters(&ids).unwrap(), 3);
    assert!(engine.write_behind_dead_letters(10).unwrap().is_empty());
    assert_eq!(engine.write_behind_dead_letter_count().unwrap(), 0);
}

#[test]
fn ordered_changes_survive_a_keys_slot_migrating_mid_run() {
    const USERS: i64 = 3;
    const CHANGES: i64 = 600;
    // Its own cluster: the migration moves user 1's slot for everyone.
    let cluster = PrivateCluster::start();
    let fx = Fixture::with(wb_config("cwb_migrate", &cluster.url()));
    fx.client.start_write_behind(2).unwrap();
    let reader = {
        let mut config = fx.config.clone();
        config.invalidation_relay = false;
        Client::open(&config).unwrap()
    };
    let slot = slot_of("user:1");
    let stream = stream_of(&fx, "user:1");
    let from_port = cluster.owner_of(slot).port();
    let enqueued = AtomicUsize::new(0);
    let (refused, done) = (AtomicUsize::new(0), AtomicBool::new(false));
    let failed_reads = AtomicUsize::new(0);
    let last_seq: Mutex<HashMap<i64, u64>> = Mutex::new(HashMap::new());
    let moved = std::thread::scope(|s| {
        for id in 1..=USERS {
            let (fx, enqueued, refused, last_seq) = (&fx, &enqueued, &refused, &last_seq);
            s.spawn(move || {
                let mut seq = 0;
                for i in 0..CHANGES {
                    let plan = format!("p{i}");
                    let deadline = Instant::now() + PATIENCE;
                    // Refused while the slot's keys are split: retried.
                    let next = loop {
                        match fx.client.update_user_plan_write_behind(id, &plan) {
                            Ok(next) => break next.expect("seeded"),
                            Err(err) => {
                                assert!(Instant::now() < deadline, "user {id}: {err}");
                                refused.fetch_add(1, Ordering::Relaxed);
                                std::thread::sleep(Duration::from_millis(5));
                            }
                        }
                    };
                    assert!(next > seq);
                    seq = next;
                    enqueued.fetch_add(1, Ordering::Relaxed);
                }
                last_seq.lock().unwrap().insert(id, seq);
            });
        }
        {
            let (reader, done, failed_reads) = (&reader, &done, &failed_reads);
            s.spawn(move || {
                let mut seen = [(-1_i64, 0_i64); USERS as usize + 1];
                while !done.load(Ordering::Relaxed) {
                    for id in 1..=USERS {
                        let Ok(Some(got)) = reader.get_user_profile(id) else {
                            failed_reads.fetch_add(1, Ordering::Relaxed);
                            continue;
                        };
                        let now = (change_no(&got.plan), got.version);
                        let before = seen[id as usize];
                        assert!(
                            now.0 >= before.0 && now.1 >= before.1,
                            "user {id} went back in time: {now:?} after {before:?}"
                        );
                        seen[id as usize] = now;
                    }
                }
            });
        }
        let deadline = Instant::now() + PATIENCE * 2;
        while enqueued.load(Ordering::Relaxed) < (USERS * CHANGES / 3) as usize {
            assert!(Instant::now() < deadline, "the writers stalled");
            std::thread::sleep(Duration::from_millis(1));
        }
        let from = cluster.owner_of(slot);
        let to = cluster
            .nodes
            .iter()
            .find(|n| n.port() != from_port)
            .unwrap();
        let moved = cluster.migrate_slot(slot, from, to, Duration::from_secs(1));
        while enqueued.load(Ordering::Relaxed) < (USERS * CHANGES) as usize {
            assert!(Instant::now() < deadline, "the writers stalled");
            std::thread::sleep(Duration::from_millis(5));
        }
        done.store(true, Ordering::Relaxed);
        moved
    });
    eprintln!(
        "migration: {moved} keys moved, {} enqueues refused and retried, {} failed reads",
        refused.load(Ordering::Relaxed),
        failed_reads.load(Ordering::Relaxed)
    );
    // The slot, and user 1's stream with it, moved to another master.
    let owner = cluster.owner_of(slot);
    assert_ne!(owner.port(), from_port, "the slot moved");
    assert_eq!(owner.command(&["EXISTS", &stream]), "1", "{stream}");
    fx.client.drain_write_behind(PATIENCE).unwrap();
    let last_seq = last_seq.into_inner().unwrap();
    for id in 1..=USERS {
        let last = format!("p{}", CHANGES - 1);
        assert_eq!(row(&fx, id), (last, last_seq[&id] as i64), "user {id}");
    }
    assert_eq!(fx.client.write_behind_pending().unwrap(), 0);
    fx.client.stop_write_behind();
}
