//! Single-flight across processes: the Redis rebuild lock. The test binary
//! re-runs itself as child processes (see `child_process_entry_point`); the
//! parent starts them together over their stdin and sums what they report.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Barrier, Mutex};
use std::time::{Duration, Instant};

use cacheaside::{CacheAside, Config};
use common::{Fixture, test_config};

const ROLE: &str = "CACHEASIDE_TEST_CHILD";
/// The child's settings: `name=value` pairs, see `child_config`.
const SETTINGS: &str = "CACHEASIDE_TEST_SETTINGS";
const KEY: &str = "hot";
/// What the slow loader returns, so every reader can check its value.
const ANSWER: i64 = 42;

/// The slow query every reader would send on a miss: one statement that
/// takes a while, counted by the query counter like any other.
const SLOW_LOAD: &str = "SELECT 42::bigint FROM pg_sleep(0.2)";

/// What a stampede child does.
struct Stampede {
    threads: usize,
    load: String,
}

/// Not a test of its own: when the parent runs this binary as a child, this
/// is the child's `main`. Ignored in a normal run, where it would prove
/// nothing; the parent runs it with `--ignored`.
#[test]
#[ignore = "the child process of the cross-process tests, run by them"]
fn child_process_entry_point() {
    let role = std::env::var(ROLE).expect("run by the cross-process tests, which set the role");
    let (config, stampede) = child_config(&std::env::var(SETTINGS).unwrap());
    let engine = CacheAside::open(&config).unwrap();
    match role.as_str() {
        "stampede" => child_stampede(&engine, &stampede),
        "holder" => child_holder(&engine),
        other => panic!("unknown child role {other}"),
    }
}

/// The settings a parent hands its children, as `name=value;...`.
fn settings(config: &Config, stampede: &Stampede) -> String {
    format!(
        "redis={};table={};namespace={};lock_ttl={};lease_ttl={};cache_timeout={};threads={};load={}",
        config.redis_url,
        config.users_table,
        config.namespace,
        config.lock_ttl.as_millis(),
        config.lease_ttl.as_millis(),
        config.cache_timeout.as_millis(),
        stampede.threads,
        stampede.load,
    )
}

fn child_config(text: &str) -> (Config, Stampede) {
    let mut config = Config::from_env();
    config.db_pool_size = 2;
    let mut stampede = Stampede {
        threads: 50,
        load: SLOW_LOAD.into(),
    };
    for pair in text.split(';') {
        let (name, value) = pair.split_once('=').unwrap();
        let ms = || Duration::from_millis(value.parse().unwrap());
        match name {
            "redis" => config.redis_url = value.into(),
            "table" => config.users_table = value.into(),
            "namespace" => config.namespace = value.into(),
            "lock_ttl" => config.lock_ttl = ms(),
            "lease_ttl" => config.lease_ttl = ms(),
            "cache_timeout" => config.cache_timeout = ms(),
            "threads" => stampede.threads = value.parse().unwrap(),
            "load" => stampede.load = value.into(),
            other => panic!("unknown setting {other}"),
        }
    }
    (config, stampede)
}

/// N threads read the cold key at once, released when the parent says go.
fn child_stampede(engine: &CacheAside, stampede: &Stampede) {
    let barrier = Barrier::new(stampede.threads + 1);
    let wrong = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..stampede.threads {
            s.spawn(|| {
                barrier.wait();
                match read_hot_key(engine, &stampede.load) {
                    Ok(Some(ANSWER)) => {}
                    other => {
                        eprintln!("CHILD read {other:?}");
                        wrong.fetch_add(1, Ordering::SeqCst);
                    }
                }
            });
        }
        println!("CHILD ready");
        let mut line = String::new();
        std::io::stdin().read_line(&mut line).unwrap();
        barrier.wait();
    });
    println!(
        "CHILD queries {} wrong {}",
        engine.db().query_count(),
        wrong.load(Ordering::SeqCst)
    );
}

/// Takes the rebuild lock and never fills: the parent kills us mid-load.
fn child_holder(engine: &CacheAside) {
    let _ = engine.get_or_load::<i64, _>(KEY, Duration::from_secs(60), || {
        println!("CHILD loading");
        loop {
            std::thread::park();
        }
    });
}

fn read_hot_key(engine: &CacheAside, load: &str) -> cacheaside::Result<Option<i64>> {
    engine.get_or_load(KEY, Duration::from_secs(60), || {
        Ok(engine.db().query_opt(load, &[])?.map(|row| row.get(0)))
    })
}

fn spawn_child(role: &str, config: &Config) -> (Child, BufReader<ChildStdout>) {
    let stampede = Stampede {
        threads: 50,
        load: SLOW_LOAD.into(),
    };
    spawn_stampede(role, config, &stampede)
}

fn spawn_stampede(
    role: &str,
    config: &Config,
    stampede: &Stampede,
) -> (Child, BufReader<ChildStdout>) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_process_entry_point",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(ROLE, role)
        .env(SETTINGS, settings(config, stampede))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    (child, stdout)
}

/// What follows `marker` in the next line of the child's output holding it.
/// (The marker may not start the line: libtest prints `test name ... `
/// without a newline before the test's own output.)
fn expect_line(out: &mut BufReader<ChildStdout>, marker: &str) -> String {
    let mut line = String::new();
    loop {
        line.clear();
        let read = out.read_line(&mut line).unwrap();
        assert!(read > 0, "child exited before {marker:?}");
        if let Some(at) = line.find(marker) {
            return line[at + marker.len()..].trim().to_owned();
        }
    }
}

/// Runs `processes` stampede children released together; returns the
/// queries they sent in total (each child checks every read was `ANSWER`).
fn run_stampede(fx: &Fixture, processes: usize, stampede: &Stampede) -> u64 {
    let mut children: Vec<_> = (0..processes)
        .map(|_| spawn_stampede("stampede", &fx.config, stampede))
        .collect();
    for (_, out) in &mut children {
        expect_line(out, "CHILD ready");
    }
    let started = Instant::now();
    for (child, _) in &mut children {
        child.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
    }
    let mut total_queries = 0;
    for (mut child, mut out) in children {
        let report = expect_line(&mut out, "CHILD queries");
        let fields: Vec<&str> = report.split_whitespace().collect();
        assert_eq!(fields[1..], ["wrong", "0"], "every thread read {ANSWER}");
        total_queries += fields[0].parse::<u64>().unwrap();
        assert!(child.wait().unwrap().success());
    }
    eprintln!(
        "{processes} processes x {} threads: {total_queries} queries in {:?}",
        stampede.threads,
        started.elapsed()
    );
    total_queries
}

#[test]
fn four_processes_of_fifty_threads_send_one_query() {
    let fx = Fixture::new("xproc");
    let stampede = Stampede {
        threads: 50,
        load: SLOW_LOAD.into(),
    };
    assert_eq!(
        run_stampede(&fx, 4, &stampede),
        1,
        "one query across all processes"
    );
}

#[test]
fn four_processes_of_fifty_threads_send_one_query_on_a_redis_cluster() {
    let cluster = common::servers::PrivateCluster::start();
    let mut config = test_config("xproc_cluster");
    config.redis_url = cluster.url();
    let fx = Fixture::with(config);
    let stampede = Stampede {
        threads: 50,
        load: SLOW_LOAD.into(),
    };
    assert_eq!(
        run_stampede(&fx, 4, &stampede),
        1,
        "one query across all processes"
    );
}

#[test]
fn a_load_longer_than_the_lease_and_lock_ttls_costs_one_query_and_is_cached() {
    // Before renewal: the lock expired mid-load, another process took it
    // (revoking the first loader's lease), and the processes took turns
    // loading for ever (7 queries, most reads failed).
    let mut config = test_config("longload");
    config.cache_timeout = Duration::from_millis(300);
    config.lease_ttl = Duration::from_millis(1000);
    config.lock_ttl = Duration::from_millis(1000);
    let fx = Fixture::with(config);
    let stampede = Stampede {
        threads: 10,
        load: "SELECT 42::bigint FROM pg_sleep(2.5)".into(),
    };
    assert_eq!(run_stampede(&fx, 2, &stampede), 1, "one load in all");
    assert_eq!(
        fx.client.cache().get_json::<i64>(KEY).unwrap(),
        Some(ANSWER),
        "the long load's value was cached"
    );
}

#[test]
fn a_dead_lock_holder_delays_but_does_not_block_readers() {
    let mut config = test_config("deadholder");
    // The dead holder's lease and lock both expire well before lock_wait,
    // so readers wait for their expiry, not for lock_wait (with the 3 s
    // default lease the slowest reader waited lock_wait to the
    // millisecond, and failed the bound on a loaded machine).
    config.lock_ttl = Duration::from_millis(600);
    config.lease_ttl = Duration::from_millis(600);
    config.cache_timeout = Duration::from_millis(200);
    config.pool_timeout = Duration::from_secs(1);
    config.statement_timeout = Duration::from_secs(2);
    config.lock_wait = Duration::from_secs(3);
    let fx = Fixture::with(config);
    let (mut holder, mut out) = spawn_child("holder", &fx.config);
    expect_line(&mut out, "CHILD loading"); // it holds the lock now
    holder.kill().unwrap();
    holder.wait().unwrap();

    let engine = fx.client.engine();
    let threads = 50;
    let barrier = Barrier::new(threads);
    let loads = AtomicUsize::new(0);
    let slowest = Mutex::new(Duration::ZERO);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                barrier.wait();
                let started = Instant::now();
                let got: Option<i64> = engine
                    .get_or_load(KEY, Duration::from_secs(60), || {
                        loads.fetch_add(1, Ordering::SeqCst);
                        Ok(Some(ANSWER))
                    })
                    .unwrap();
                assert_eq!(got, Some(ANSWER));
                let took = started.elapsed();
                let mut slowest = slowest.lock().unwrap();
                *slowest = (*slowest).max(took);
            });
        }
    });
    let slowest = *slowest.lock().unwrap();
    eprintln!("dead holder: slowest reader waited {slowest:?}");
    assert_eq!(
        loads.load(Ordering::SeqCst),
        1,
        "one reload after the lock expired"
    );
    assert!(
        slowest < fx.config.lock_wait,
        "no reader waited past the bound: {slowest:?}"
    );
    assert_eq!(engine.in_flight(), 0);
}
