//! Shared test fixture: a users table and a Redis namespace that belong to
//! one test alone, removed again when the fixture drops. Tests therefore run
//! in parallel and never touch anyone else's data.
//!
//! For failure tests: [`proxy`] puts a fault proxy between a client and a
//! server, [`servers`] starts private Redis and PostgreSQL servers to kill,
//! freeze and restart; [`replica`] is the workload of the read-replica
//! tests (and of the benchmark's `replica` section).

#![allow(dead_code)] // each test binary uses a different part of it

pub mod proxy;
pub mod replica;
pub mod servers;

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use cacheaside::{Client, Config};

/// A client on its own table and namespace, seeded with the demo users.
pub struct Fixture {
    pub client: Client,
    pub config: Config,
}

/// A name no other test, process or earlier session uses.
pub fn unique(label: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{label}_{}_{}_{:x}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed),
        fastrand::u32(..)
    )
}

/// The config every test starts from: the servers from the environment, a
/// fresh table, outbox and namespace, and generous timeouts (CI machines are
/// slow, and a test must fail on a wrong result, not on a slow box: a Redis
/// command that takes 300 ms on a loaded 2-core machine is not an outage).
pub fn test_config(label: &str) -> Config {
    let name = unique(&format!("ca_test_{label}"));
    let mut config = Config::from_env();
    config.users_table = name.clone();
    config.outbox_table = format!("{name}_outbox");
    config.namespace = format!("{name}:");
    config.db_pool_size = 4;
    config.cache_timeout = Duration::from_secs(1);
    config
}

impl Fixture {
    /// A seeded fixture with the default test config.
    pub fn new(label: &str) -> Fixture {
        Fixture::with(test_config(label))
    }

    /// A seeded fixture with `config` (whose table and namespace must be
    /// unique, as [`test_config`] makes them).
    pub fn with(config: Config) -> Fixture {
        let client =
            Client::open(&config).expect("open client (are the services up? scripts/services.sh)");
        client.install_schema().expect("install schema");
        client.seed_demo_users().expect("seed");
        let fx = Fixture { client, config };
        fx.settle();
        fx
    }

    /// Waits until the relay has applied every change committed so far, so
    /// its invalidations of earlier writes (the seeding's) cannot land in
    /// the middle of what a test measures.
    pub fn settle(&self) {
        if self.config.invalidation_relay {
            assert!(
                self.client.engine().sync_relay(PATIENCE),
                "the relay did not catch up: {:?}",
                self.client.engine().stats()
            );
        }
    }

    /// Statements sent to Postgres so far.
    pub fn queries(&self) -> u64 {
        self.client.db().query_count()
    }

    /// `threads` threads released together on user 3's cold key through
    /// single-flight: asserts that they cost exactly one statement, all got
    /// the same (seeded) row, and nothing is left in flight; returns the row.
    pub fn assert_cold_readers_cost_one_query(&self, threads: usize) -> cacheaside::UserProfile {
        let barrier = std::sync::Barrier::new(threads);
        let before = self.queries();
        let results: Vec<Option<cacheaside::UserProfile>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads)
                .map(|_| {
                    s.spawn(|| {
                        barrier.wait();
                        self.client.get_user_profile_singleflight(3).unwrap()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(
            self.queries(),
            before + 1,
            "exactly one query for {threads} cold readers"
        );
        let first = results[0].clone().expect("seeded");
        assert!(results.iter().all(|r| r.as_ref() == Some(&first)));
        assert_eq!(self.client.engine().in_flight(), 0);
        first
    }

    /// Sets a user's row behind the library's back (no invalidation).
    pub fn set_plan_directly(&self, id: i64, plan: &str) {
        let sql = format!(
            "UPDATE {} SET plan = $2, version = version + 1 WHERE id = $1",
            self.config.users_table
        );
        self.client.db().execute(&sql, &[&id, &plan]).unwrap();
    }

    /// Reads the committed row's version straight from Postgres.
    pub fn db_version(&self, id: i64) -> i64 {
        let sql = format!(
            "SELECT version FROM {} WHERE id = $1",
            self.config.users_table
        );
        self.client
            .db()
            .query_opt(&sql, &[&id])
            .unwrap()
            .unwrap()
            .get(0)
    }

    /// Stores raw bytes under a key of this fixture's namespace.
    pub fn put_raw(&self, key: &str, raw: &[u8]) {
        let redis_key = self.client.cache().redis_key(key);
        self.client
            .cache()
            .with_connection(|c| {
                redis::cmd("SET")
                    .arg(&redis_key)
                    .arg(raw)
                    .arg("PX")
                    .arg(60_000)
                    .query::<()>(c)
            })
            .unwrap();
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if let Err(err) = self.client.drop_schema() {
            eprintln!("could not drop the test's tables: {}", err.chain());
        }
        let _ = self.client.cache().delete_namespace();
    }
}

/// `host:port` of a URL like `scheme://user@host:port/db`, as an IPv4
/// address (what a fault proxy in front of that server connects to).
pub fn server_addr(url: &str) -> std::net::SocketAddr {
    use std::net::ToSocketAddrs;
    let rest = url.split("://").nth(1).expect("a URL");
    let host_port = rest.rsplit('@').next().unwrap().split('/').next().unwrap();
    host_port
        .to_socket_addrs()
        .unwrap()
        .find(std::net::SocketAddr::is_ipv4)
        .expect("an IPv4 address")
}

/// A bound long enough that only a hang reaches it.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// A barrier that gives up: `wait` blocks until `parties` threads have
/// called it, like `std::sync::Barrier`, but panics after [`PATIENCE`], so a
/// test whose other side died fails instead of hanging for ever.
pub struct Meet {
    parties: usize,
    /// (threads arrived in this round, rounds completed).
    state: std::sync::Mutex<(usize, u64)>,
    all_here: std::sync::Condvar,
}

impl Meet {
    pub fn new(parties: usize) -> Meet {
        Meet {
            parties,
            state: std::sync::Mutex::new((0, 0)),
            all_here: std::sync::Condvar::new(),
        }
    }

    pub fn wait(&self) {
        let mut state = self.state.lock().unwrap();
        let round = state.1;
        state.0 += 1;
        if state.0 == self.parties {
            *state = (0, round + 1);
            self.all_here.notify_all();
            return;
        }
        let (state, timeout) = self
            .all_here
            .wait_timeout_while(state, PATIENCE, |s| s.1 == round)
            .unwrap();
        drop(state);
        assert!(
            !timeout.timed_out(),
            "the other side never arrived (it failed?)"
        );
    }
}
