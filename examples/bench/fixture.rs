//! What every section measures with ([`Bench`]): the plan, the bench's
//! client on a users table `bench_users_<pid>` and a Redis namespace
//! `bench:<pid>:` of its own (both removed when the run ends, also after an
//! error), the floors, and the correctness properties found broken so far.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use cacheaside::{Client, Config, UserProfile};

use crate::BoxResult;
use crate::floors::Floors;
use crate::plan::Plan;

/// The user every hit measurement reads (Ada, from the demo users).
pub const USER_ID: i64 = 1;

// Pool sizes of the bench's client (the library defaults are 8 and 16).
// 50 hit threads each get their own Redis connection, so neither the floor
// nor the library queues on the pool; 32 Postgres connections are a third
// of the server's default max_connections = 100, leaving room for the child
// processes and whatever else runs on the machine.
pub const BENCH_CACHE_POOL: u32 = 64;
pub const BENCH_DB_POOL: u32 = 32;
// The naive 1000-thread stampede sends 1000 × 50 ms of queries through 32
// connections (~1.6 s of queueing); the default 5 s checkout timeout is
// close enough to that to fail on a busy machine, so the bench raises it.
pub const BENCH_POOL_TIMEOUT: Duration = Duration::from_secs(30);

/// The settings of every client the bench opens, in this process or a
/// child, on `namespace`.
pub fn bench_config(namespace: &str) -> BoxResult<Config> {
    let mut config = Config::from_env();
    config.set_namespace(namespace)?;
    config.cache_pool_size = BENCH_CACHE_POOL;
    config.db_pool_size = BENCH_DB_POOL;
    config.pool_timeout = BENCH_POOL_TIMEOUT;
    // A waiter for another process's load must outwait the longest load.
    config.lock_wait = BENCH_POOL_TIMEOUT + config.statement_timeout;
    // Long enough that no hit measurement sees its key expire.
    config.ttl = Duration::from_secs(600);
    Ok(config)
}

/// A run in progress, handed to every section. Dropping it drops the table
/// and deletes the namespace.
pub struct Bench {
    pub plan: Plan,
    /// When the run started.
    pub started: Instant,
    /// `bench:<pid>:`, which the child processes open too.
    pub namespace: String,
    pub config: Config,
    pub floors: Floors,
    /// Broken correctness properties: any of them fails the run at the end.
    failures: Mutex<Vec<String>>,
    fixture: Fixture,
}

impl Bench {
    /// Creates the run's table (with the demo users) and namespace, and
    /// prepares the floors.
    pub fn open(plan: Plan) -> BoxResult<Bench> {
        let started = Instant::now();
        let pid = std::process::id();
        let namespace = format!("bench:{pid}:");
        let mut config = bench_config(&namespace)?;
        config.set_users_table(&format!("bench_users_{pid}"))?;
        config.outbox_table = format!("bench_outbox_{pid}");
        eprintln!(
            "bench: {} run, table {}, namespace {namespace:?}",
            plan.mode(),
            config.users_table
        );
        let fixture = Fixture::create(&config)?;
        let floors = Floors::prepare(&fixture.client)?;
        Ok(Bench {
            plan,
            started,
            namespace,
            config,
            floors,
            failures: Mutex::new(Vec::new()),
            fixture,
        })
    }

    pub fn client(&self) -> &Client {
        &self.fixture.client
    }

    /// Records a broken correctness property: the run goes on, and exits
    /// with status 1 at the end.
    pub fn fail(&self, what: impl Into<String>) {
        self.failures.lock().unwrap().push(what.into());
    }

    /// The broken correctness properties recorded so far.
    pub fn failures(&self) -> Vec<String> {
        self.failures.lock().unwrap().clone()
    }
}

/// The bench's client, table and namespace; dropping it drops the table and
/// deletes the namespace, so a run that fails halfway leaves nothing behind.
struct Fixture {
    client: Client,
    table: String,
}

impl Fixture {
    fn create(config: &Config) -> BoxResult<Fixture> {
        let client = Client::open(config)?;
        let fixture = Fixture {
            client,
            table: config.users_table.clone(),
        };
        fixture.client.install_schema()?;
        fixture.client.seed_demo_users()?;
        // The relay's invalidations of the seeding must not land mid-run.
        fixture.client.engine().sync_relay(Duration::from_secs(30));
        Ok(fixture)
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        // Only the tables this run created: their names carry our pid.
        if let Err(err) = self.client.drop_schema() {
            eprintln!("bench: could not drop {}: {err}", self.table);
        }
        match self.client.cache().delete_namespace() {
            Ok(n) => eprintln!(
                "bench: dropped {}, deleted {n} keys under {:?}",
                self.table,
                self.client.cache().namespace()
            ),
            Err(err) => eprintln!("bench: could not delete the namespace: {err}"),
        }
    }
}

/// The profile of [`USER_ID`], as the demo users seed it.
pub fn expected_profile() -> UserProfile {
    let (id, name, email, plan) = cacheaside::DEMO_USERS[0];
    UserProfile {
        id,
        name: name.into(),
        email: email.into(),
        plan: plan.into(),
        version: 1,
    }
}

/// Checks that a read returned the profile of [`USER_ID`].
pub fn check_profile(p: Option<UserProfile>) -> BoxResult<()> {
    match p {
        Some(p) if p.id == USER_ID => Ok(()),
        other => Err(format!("read returned {other:?}, expected user {USER_ID}").into()),
    }
}
