//! The bad day: Redis refused, frozen, restarted or full; Postgres down,
//! frozen or slow. Each test routes a client through a fault proxy (to the
//! shared servers, on its own table and namespace) or starts a private
//! server it may kill, and asserts exact outcomes: the right row, a bounded
//! time, nothing lost.

mod common;

use std::sync::Barrier;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cacheaside::{Client, Config, ErrorKind};
use common::proxy::{Fault, FaultProxy};
use common::servers::PrivateRedis;
use common::{Fixture, PATIENCE, server_addr, test_config};

/// The cache timeout of these tests: short, so a fault costs little.
const CACHE_TIMEOUT: Duration = Duration::from_millis(200);

/// The demo users' names by id.
fn name_of(id: i64) -> &'static str {
    cacheaside::DEMO_USERS[(id - 1) as usize].1
}

/// A test config whose Redis is reached through a fault proxy (in `Pass`).
fn through_redis_proxy(label: &str) -> (FaultProxy, Config) {
    let mut config = test_config(label);
    let proxy = FaultProxy::start(server_addr(&config.redis_url));
    config.redis_url = format!("redis://{}/", proxy.addr());
    config.cache_timeout = CACHE_TIMEOUT;
    config.breaker_cool_off = Duration::from_millis(300);
    (proxy, config)
}

/// A client like `fx`'s, but reaching Postgres through a fault proxy.
fn through_db_proxy(fx: &Fixture, tune: impl FnOnce(&mut Config)) -> (FaultProxy, Client) {
    let mut config = fx.config.clone();
    let proxy = FaultProxy::start(server_addr(&config.database_url));
    let db = config.database_url.clone();
    let upstream = db.rsplit('@').next().unwrap().split('/').next().unwrap();
    config.database_url = db.replace(upstream, &proxy.addr().to_string());
    // The fixture's client runs the relay for this table.
    config.invalidation_relay = false;
    tune(&mut config);
    let client = Client::open(&config).unwrap();
    (proxy, client)
}

/// `threads` readers, released together, each reading every demo user
/// `rounds` times. Checks every row; returns the slowest call.
fn read_everyone(client: &Client, threads: usize, rounds: usize) -> Duration {
    let start = Barrier::new(threads);
    let slowest = parking_lot::Mutex::new(Duration::ZERO);
    std::thread::scope(|s| {
        for t in 0..threads {
            let (start, slowest) = (&start, &slowest);
            s.spawn(move || {
                start.wait();
                for r in 0..rounds {
                    let id = ((t + r) % 5 + 1) as i64;
                    let began = Instant::now();
                    let user = if (t + r) % 2 == 0 {
                        client.get_user_profile(id)
                    } else {
                        client.get_user_profile_singleflight(id)
                    };
                    let took = began.elapsed();
                    let user = user.unwrap_or_else(|e| panic!("read of {id} failed: {e:?}"));
                    assert_eq!(user.expect("seeded").name, name_of(id));
                    let mut slowest = slowest.lock();
                    *slowest = (*slowest).max(took);
                }
            });
        }
    });
    slowest.into_inner()
}

/// Reads every demo user once, so all are cached.
fn warm(client: &Client) {
    for id in 1..=5 {
        assert_eq!(
            client.get_user_profile(id).unwrap().unwrap().name,
            name_of(id)
        );
    }
}

/// Waits (bounded) until the breaker has closed again.
fn until_closed(client: &Client) {
    let deadline = Instant::now() + PATIENCE;
    while client.engine().breaker_open() {
        assert!(Instant::now() < deadline, "the breaker never closed");
        // A read is what probes Redis after the cool-off.
        let _ = client.get_user_profile(1);
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// 50 threads, released together, read one cold key of `engine` whose
/// load takes 200 ms; returns how many loads ran (each thread checks it got
/// the value).
fn slow_stampede(engine: &cacheaside::CacheAside) -> u64 {
    let threads = 50;
    let barrier = Barrier::new(threads);
    let loads = AtomicU64::new(0);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                barrier.wait();
                let v: Option<i64> = engine
                    .get_or_load("hot", Duration::from_secs(60), || {
                        loads.fetch_add(1, Ordering::SeqCst);
                        let sql = "SELECT 42::bigint FROM pg_sleep(0.2)";
                        Ok(engine.db().query_opt(sql, &[])?.map(|r| r.get(0)))
                    })
                    .unwrap();
                assert_eq!(v, Some(42));
            });
        }
    });
    loads.into_inner()
}

#[test]
fn a_refused_redis_costs_reads_nothing_once_the_breaker_opens_and_hits_resume_after() {
    let (proxy, config) = through_redis_proxy("refused");
    let fx = Fixture::with(config);
    warm(&fx.client);
    proxy.set(Fault::Refuse);
    let slowest = read_everyone(&fx.client, 8, 20);
    assert!(
        slowest < CACHE_TIMEOUT + Duration::from_secs(1),
        "a refused connection fails fast: slowest read {slowest:?}"
    );
    let stats = fx.client.engine().stats();
    assert_eq!(stats.breaker_opened, 1, "{stats:?}");
    assert!(fx.client.engine().breaker_open());
    // With the breaker open, a read is one Postgres round trip and no
    // attempt at Redis.
    let (queries, accepted) = (fx.queries(), proxy.accepted());
    for id in 1..=5 {
        assert_eq!(
            fx.client.get_user_profile(id).unwrap().unwrap().name,
            name_of(id)
        );
    }
    assert_eq!(fx.queries(), queries + 5);
    assert_eq!(proxy.accepted(), accepted, "Redis was not touched");

    proxy.set(Fault::Pass);
    until_closed(&fx.client);
    assert_eq!(fx.client.engine().stats().breaker_closed, 1);
    warm(&fx.client);
    let queries = fx.queries();
    warm(&fx.client);
    assert_eq!(fx.queries(), queries, "hits again after recovery");
}

#[test]
fn a_frozen_redis_costs_a_read_at_most_one_cache_timeout() {
    let (proxy, config) = through_redis_proxy("frozen");
    let fx = Fixture::with(config);
    warm(&fx.client);
    proxy.set(Fault::Blackhole);
    let slowest = read_everyone(&fx.client, 8, 10);
    // One cache timeout, then one Postgres load (with room for a loaded box).
    assert!(
        slowest < CACHE_TIMEOUT + Duration::from_secs(1),
        "slowest read {slowest:?}"
    );
    assert!(fx.client.engine().breaker_open());
    let began = Instant::now();
    warm(&fx.client);
    assert!(
        began.elapsed() < CACHE_TIMEOUT,
        "with the breaker open, frozen Redis costs nothing: {:?}",
        began.elapsed()
    );
    proxy.set(Fault::Pass);
    until_closed(&fx.client);
}

#[test]
fn a_redis_restart_fails_no_reader() {
    let mut redis = PrivateRedis::start();
    let mut config = test_config("restart");
    config.redis_url = redis.url();
    config.cache_timeout = CACHE_TIMEOUT;
    let fx = Fixture::with(config);
    warm(&fx.client);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let reads = AtomicU64::new(0);
    std::thread::scope(|s| {
        for t in 0..8 {
            let (fx, stop, reads) = (&fx, &stop, &reads);
            s.spawn(move || {
                let mut r = 0;
                while !stop.load(Ordering::SeqCst) {
                    let id = (t + r) % 5 + 1;
                    let user = fx.client.get_user_profile(id).unwrap();
                    assert_eq!(user.unwrap().name, name_of(id));
                    reads.fetch_add(1, Ordering::SeqCst);
                    r += 1;
                }
            });
        }
        let restarts = 3;
        for _ in 0..restarts {
            let before = reads.load(Ordering::SeqCst);
            while reads.load(Ordering::SeqCst) < before + 50 {
                std::thread::yield_now();
            }
            redis.restart();
        }
        let before = reads.load(Ordering::SeqCst);
        while reads.load(Ordering::SeqCst) < before + 50 {
            std::thread::yield_now();
        }
        stop.store(true, Ordering::SeqCst);
    });
    // The restarted (empty) Redis fills again: hits resume.
    until_closed(&fx.client);
    warm(&fx.client);
    let queries = fx.queries();
    warm(&fx.client);
    assert_eq!(fx.queries(), queries);
}

#[test]
fn a_stampede_while_redis_is_down_costs_one_query() {
    // With no cache to hold the value, single-flight is what stands between
    // a hot key and Postgres: the readers that overlap one load share it.
    // (Readers that come after it has finished load again: there is nothing
    // to serve them from.)
    let (proxy, config) = through_redis_proxy("down_stampede");
    let fx = Fixture::with(config);
    proxy.set(Fault::Refuse);
    let engine = fx.client.engine();
    let before = fx.queries();
    assert_eq!(slow_stampede(engine), 1, "one load in the process");
    assert_eq!(fx.queries(), before + 1);
    assert!(engine.stats().bypassed >= 1);
    assert_eq!(engine.in_flight(), 0);
    proxy.set(Fault::Pass);
}

#[test]
fn a_write_during_a_redis_outage_is_never_read_stale_after_recovery() {
    let (proxy, config) = through_redis_proxy("outage_write");
    let fx = Fixture::with(config);
    // Another process reads Redis directly and has the old row cached.
    let mut direct = fx.config.clone();
    direct.redis_url = test_config("unused").redis_url;
    direct.invalidation_relay = false;
    let other = Client::open(&direct).unwrap();
    assert_eq!(other.get_user_profile(2).unwrap().unwrap().plan, "free");
    assert_eq!(fx.client.get_user_profile(2).unwrap().unwrap().plan, "free");

    proxy.set(Fault::Refuse);
    // The write commits; its invalidation cannot reach Redis and is left to
    // the outbox, so the update itself succeeds.
    assert!(fx.client.update_user_plan(2, "written-in-outage").unwrap());
    assert_eq!(fx.client.engine().stats().invalidations_failed, 1);
    // This process reads around the cache meanwhile: the new row.
    let read = fx.client.get_user_profile(2).unwrap().unwrap();
    assert_eq!(read.plan, "written-in-outage");

    proxy.set(Fault::Pass);
    until_closed(&fx.client);
    // The relay applied the pending invalidation before the breaker closed:
    // no process reads the pre-write row.
    assert_eq!(
        fx.client.get_user_profile(2).unwrap().unwrap().plan,
        "written-in-outage"
    );
    assert_eq!(
        other.get_user_profile(2).unwrap().unwrap().plan,
        "written-in-outage"
    );
}

#[test]
fn an_invalidation_against_a_frozen_redis_costs_one_timeout() {
    // It used to be MULTI/DEL/DEL/EXEC: one I/O timeout per reply.
    let (proxy, config) = through_redis_proxy("frozen_invalidate");
    let fx = Fixture::with(config);
    proxy.set(Fault::Blackhole);
    let began = Instant::now();
    let err = fx.client.engine().invalidate("k").unwrap_err();
    let took = began.elapsed();
    assert!(err.is_timeout(), "{err:?}");
    assert!(
        took < CACHE_TIMEOUT * 2,
        "one command, one timeout: took {took:?}"
    );
    proxy.set(Fault::Pass);
    until_closed(&fx.client);
}

#[test]
fn a_full_redis_still_answers_reads_and_accepts_invalidations() {
    let redis = PrivateRedis::start();
    let mut config = test_config("oom");
    config.redis_url = redis.url();
    config.cache_timeout = CACHE_TIMEOUT;
    config.invalidation_relay = false;
    let client = Client::open(&config).unwrap();
    client.install_schema().unwrap();
    client.seed_demo_users().unwrap();
    warm(&client); // cached before Redis fills up
    // Full: any memory in use is over the limit, and nothing is evicted.
    redis.command(&["CONFIG", "SET", "maxmemory-policy", "noeviction"]);
    redis.command(&["CONFIG", "SET", "maxmemory", "1"]);
    assert!(
        redis.command(&["SET", "probe", "1"]).contains("OOM"),
        "Redis is full"
    );

    // Cached rows are hits; an invalidation is accepted (a DEL is allowed);
    // the miss that follows reads Postgres and its fill fails, counted.
    let before = client.db().query_count();
    warm(&client);
    assert_eq!(client.db().query_count(), before, "hits on a full Redis");
    assert!(client.update_user_plan(4, "full").unwrap());
    let stats = client.engine().stats();
    assert_eq!(stats.invalidations_failed, 0, "{stats:?}");
    assert_eq!(client.get_user_profile(4).unwrap().unwrap().plan, "full");
    // A stampede on a key Redis cannot store: a claim or fill that fails
    // does not queue the followers one round each; all that overlap the
    // load take its row.
    let engine = client.engine();
    assert_eq!(slow_stampede(engine), 1);
    assert!(engine.stats().fills_failed >= 1, "counted");
    client.drop_schema().unwrap();
}

#[test]
fn a_failover_pause_leaves_no_lock_to_stall_readers() {
    // Under CLIENT PAUSE WRITE (what a failover does) a claim waits on the
    // server while the client gives up. It used to run when the pause ended,
    // and take the rebuild lock and the lease for a caller long gone:
    // readers then stalled for the lock's TTL. The client now closes a
    // connection it gave up on, and Redis drops the waiting claim with it.
    let redis = PrivateRedis::start();
    let mut config = test_config("pause");
    config.redis_url = redis.url();
    config.cache_timeout = CACHE_TIMEOUT;
    config.lock_ttl = Duration::from_secs(10);
    config.lease_ttl = Duration::from_secs(10);
    let fx = Fixture::with(config);
    let pause = Duration::from_millis(800);
    redis.command(&["CLIENT", "PAUSE", &pause.as_millis().to_string(), "WRITE"]);
    let paused = Instant::now();
    assert_eq!(
        fx.client
            .get_user_profile_singleflight(5)
            .unwrap()
            .unwrap()
            .name,
        "Barbara Liskov"
    );
    // Another process reads the key once the pause is over.
    let other = Client::open(&fx.config).unwrap();
    while paused.elapsed() < pause + CACHE_TIMEOUT {
        std::thread::sleep(Duration::from_millis(20));
    }
    let began = Instant::now();
    assert_eq!(
        other
            .get_user_profile_singleflight(5)
            .unwrap()
            .unwrap()
            .name,
        "Barbara Liskov"
    );
    assert!(
        began.elapsed() < Duration::from_secs(2),
        "no orphan lock to wait out: {:?}",
        began.elapsed()
    );
}

#[test]
fn a_claim_whose_reply_was_lost_leaves_no_lock_behind() {
    // The claim ran on the server but its reply never came back: the lock
    // and lease it took are orphans. The keeper deletes them (compare and
    // delete on the token) as soon as Redis answers, long before their TTL.
    let mut config = test_config("orphan");
    config.lock_ttl = Duration::from_secs(10);
    config.lease_ttl = Duration::from_secs(10);
    let fx = Fixture::with(config);
    let lock = format!("{}:lock", fx.client.cache().redis_key(&Client::user_key(5)));
    let exists = || -> bool {
        fx.client
            .cache()
            .with_connection(|c| redis::cmd("EXISTS").arg(&lock).query(c))
            .unwrap()
    };
    fx.client.engine().hooks().lose_claim_replies(1);
    let began = Instant::now();
    assert_eq!(
        fx.client
            .get_user_profile_singleflight(5)
            .unwrap()
            .unwrap()
            .name,
        "Barbara Liskov"
    );
    while exists() {
        assert!(
            began.elapsed() < Duration::from_secs(2),
            "the orphan lock stayed (its TTL is 10 s)"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    // A reader in another process is not held up.
    let other = Client::open(&fx.config).unwrap();
    let began = Instant::now();
    assert!(other.get_user_profile_singleflight(5).unwrap().is_some());
    assert!(began.elapsed() < Duration::from_secs(2));
}

#[test]
fn a_blackholed_postgres_fails_a_read_within_the_statement_timeout() {
    // Only the server's statement_timeout bounded a statement: against a
    // frozen server a read waited for the kernel (a quarter of an hour).
    let fx = Fixture::new("pg_blackhole");
    let statement_timeout = Duration::from_secs(1);
    let (proxy, client) = through_db_proxy(&fx, |c| {
        c.statement_timeout = statement_timeout;
        c.pool_timeout = Duration::from_secs(1);
        c.lock_wait = Duration::from_secs(2);
    });
    warm(&client); // a pooled connection through the proxy
    client.engine().invalidate(&Client::user_key(1)).unwrap();
    proxy.set(Fault::Blackhole);
    let began = Instant::now();
    let err = client.get_user_profile(1).unwrap_err();
    let took = began.elapsed();
    assert!(err.is_timeout(), "{err:?}");
    assert!(
        took < statement_timeout + Duration::from_secs(1),
        "failed within statement_timeout + 1 s: took {took:?}"
    );
    proxy.set(Fault::Pass);
    assert_eq!(
        client.get_user_profile(1).unwrap().unwrap().name,
        "Ada Lovelace"
    );
}

#[test]
fn with_postgres_down_expired_entries_are_served_stale_and_misses_fail_fast() {
    let fx = Fixture::new("failsafe");
    let ttl = Duration::from_millis(300);
    let (proxy, client) = through_db_proxy(&fx, |c| {
        c.ttl = ttl;
        c.fail_safe_max = Duration::from_secs(60);
        c.fail_safe_throttle = Duration::from_secs(2);
    });
    warm(&client);
    std::thread::sleep(ttl * 2); // let the entries pass their TTL
    proxy.set(Fault::Refuse);
    let began = Instant::now();
    for id in 1..=5 {
        let user = client.get_user_profile(id).unwrap().expect("the copy");
        assert_eq!(user.name, name_of(id));
    }
    assert_eq!(client.engine().stats().stale_served, 5);
    // Re-armed for the throttle period: the next reads are hits.
    let queries = client.db().query_count();
    warm(&client);
    assert_eq!(client.db().query_count(), queries, "re-armed copies");
    // A key that was never cached has no copy: the error, promptly.
    let err = client.get_user_profile(404).unwrap_err();
    assert!(
        matches!(err.kind(), ErrorKind::Database | ErrorKind::Timeout),
        "{err:?}"
    );
    assert!(
        began.elapsed() < Duration::from_secs(2),
        "no waiting for pool timeouts: {:?}",
        began.elapsed()
    );
    proxy.set(Fault::Pass);
    // After the throttle period, a read reloads the fresh row.
    fx.client.update_user_plan(1, "after").unwrap();
    let deadline = Instant::now() + PATIENCE;
    while client.get_user_profile(1).unwrap().unwrap().plan != "after" {
        assert!(Instant::now() < deadline, "never reloaded");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_reload_slower_than_the_soft_timeout_serves_the_copy_and_fills_later() {
    let fx = Fixture::new("soft");
    let ttl = Duration::from_millis(300);
    let soft = Duration::from_millis(100);
    let (proxy, client) = through_db_proxy(&fx, |c| {
        c.ttl = ttl;
        c.fail_safe_max = Duration::from_secs(60);
        c.fail_safe_throttle = Duration::from_secs(1);
        c.soft_timeout = soft;
    });
    warm(&client);
    std::thread::sleep(ttl * 2);
    proxy.set(Fault::Delay(Duration::from_millis(600)));
    let began = Instant::now();
    let user = client.get_user_profile(3).unwrap().unwrap();
    let took = began.elapsed();
    assert_eq!(user.name, "Grace Hopper");
    assert!(
        took < Duration::from_millis(500),
        "the copy after the soft timeout, not the slow reload: {took:?}"
    );
    assert_eq!(client.engine().stats().stale_served, 1);
    // The reload finishes in the background and fills under its lease.
    proxy.set(Fault::Pass);
    let deadline = Instant::now() + PATIENCE;
    loop {
        let raw = client
            .cache()
            .with_connection(|c| {
                redis::cmd("PTTL")
                    .arg(client.cache().redis_key(&Client::user_key(3)))
                    .query::<i64>(c)
            })
            .unwrap();
        // A fill sets a fresh physical TTL of ttl + fail_safe_max.
        if raw > 60_000 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the background reload never filled"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn misconfigured_servers_are_reported_with_their_cause() {
    let check = |mutate: &dyn Fn(&mut Config), kind: ErrorKind, says: &str, secret: &str| {
        let mut config = test_config("misconfig");
        config.invalidation_relay = false;
        mutate(&mut config);
        let began = Instant::now();
        let engine = cacheaside::CacheAside::open(&config).expect("opens anyway");
        let err = engine.ping().unwrap_err();
        assert_eq!(err.kind(), kind, "{err:?}");
        assert!(err.chain().contains(says), "{}", err.chain());
        if !secret.is_empty() {
            assert!(!err.chain().contains(secret), "the password leaked");
        }
        assert!(
            began.elapsed() < Duration::from_secs(4),
            "within the connect timeout"
        );
    };
    let closed = common::servers::free_port();
    check(
        &|c| c.redis_url = format!("redis://127.0.0.1:{closed}/"),
        ErrorKind::Cache,
        "refused",
        "",
    );
    let redis = PrivateRedis::start();
    redis.command(&["CONFIG", "SET", "requirepass", "s3cret-pw"]);
    let port = redis.port();
    check(
        &|c| c.redis_url = format!("redis://:wrong-pw@127.0.0.1:{port}/"),
        ErrorKind::Cache,
        "authentication failed",
        "wrong-pw",
    );
    check(
        &|c| c.redis_url = format!("redis://127.0.0.1:{port}/"),
        ErrorKind::Cache,
        "authentication",
        "",
    );
    check(
        &|c| c.database_url = c.database_url.replace("/test", "/no_such_database_here"),
        ErrorKind::Database,
        "no such database",
        "",
    );
}

#[test]
fn redis_acl_user_logs_in_and_a_wrong_password_is_named_without_it() {
    let redis = PrivateRedis::start();
    redis.command(&[
        "ACL",
        "SETUSER",
        "cacheapp",
        "on",
        ">right-pw-4711",
        "~*",
        "&*",
        "+@all",
    ]);
    redis.command(&["ACL", "SETUSER", "default", "off"]);
    let port = redis.port();
    let mut config = test_config("acl");
    config.invalidation_relay = false;
    config.redis_url = format!("redis://cacheapp:right-pw-4711@127.0.0.1:{port}/");
    let engine = cacheaside::CacheAside::open(&config).expect("opens");
    engine.ping().expect("the ACL user logs in");
    let shown = format!("{config:?}");
    assert!(
        !shown.contains("right-pw-4711"),
        "Config's Debug leaked: {shown}"
    );

    config.redis_url = format!("redis://cacheapp:wrong-pw-0815@127.0.0.1:{port}/");
    let engine = cacheaside::CacheAside::open(&config).expect("opens anyway");
    let err = engine.ping().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Cache, "{err:?}");
    let said = format!("{} | {} | {err:?}", err, err.chain());
    assert!(said.contains("authentication failed"), "{said}");
    assert!(
        !said.contains("wrong-pw-0815"),
        "the password leaked: {said}"
    );
}

#[test]
fn postgres_wrong_password_is_named_without_it() {
    let pg = common::servers::PrivatePostgres::start();
    pg.require_password("right-pw-4711");
    let port = pg.port();
    let mut config = test_config("pgauth");
    config.invalidation_relay = false;
    config.database_url = format!("postgres://postgres:right-pw-4711@127.0.0.1:{port}/postgres");
    let engine = cacheaside::CacheAside::open(&config).expect("opens");
    engine.ping().expect("the right password logs in");

    for url in [
        format!("postgres://postgres:wrong-pw-0815@127.0.0.1:{port}/postgres"),
        format!("host=127.0.0.1 port={port} user=postgres password=wrong-pw-0815 dbname=postgres"),
    ] {
        config.database_url = url;
        assert!(!format!("{config:?}").contains("wrong-pw-0815"));
        let engine = cacheaside::CacheAside::open(&config).expect("opens anyway");
        let err = engine.ping().unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Database, "{err:?}");
        let said = format!("{} | {} | {err:?}", err, err.chain());
        assert!(said.contains("authentication failed"), "{said}");
        assert!(
            !said.contains("wrong-pw-0815"),
            "the password leaked: {said}"
        );
    }
}
