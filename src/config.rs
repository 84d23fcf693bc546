//! Settings: where the servers are, how big the pools are, how long things live.

use std::fmt;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::keys::validate_namespace;

mod builder;
mod entry_options;
mod redact;
mod replica;
pub use builder::ConfigBuilder;
pub use entry_options::EntryOptions;
pub use redact::redact_url;

/// How long after `statement_timeout` the client gives up on a statement the
/// server did not cancel (it is frozen, or the network dropped us).
pub(crate) const CLIENT_MARGIN: Duration = Duration::from_millis(500);

/// The longest TTL a value may be given (ten years): a TTL is a promise
/// about freshness, and Redis refuses expiry times past the year 2262 anyway.
/// A C caller that passes `UINT64_MAX` for "forever" gets
/// [`ErrorKind::InvalidArgument`](crate::ErrorKind) naming this bound.
pub const MAX_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Every setting of a [`Client`](crate::Client) or [`CacheAside`](crate::CacheAside).
///
/// Build one with [`Config::builder()`]: it validates, and derives the
/// values that follow from others (`lock_wait` from `statement_timeout`,
/// …) unless you set them. Or start from [`Config::default()`] or
/// [`Config::from_env()`] and change the public fields you need:
/// [`Config::validate`] (called when a client opens) rejects unusable
/// values, and values that cannot work together, with
/// [`ErrorKind::InvalidArgument`](crate::ErrorKind) naming the fields, but
/// derives nothing.
///
/// How the timeouts fit together (each is checked):
/// - a database load takes at most `pool_timeout + statement_timeout` (plus
///   the client's margin), so `lock_wait`, how long another process waits
///   for a load before running its own, is at least that;
/// - a lease or rebuild lock is renewed every third of its TTL while its
///   load runs, so each TTL is at least three `cache_timeout`s (a renewal
///   that times out leaves time for the next);
/// - `cache_timeout` is at most `pool_timeout`: the cache is the fast path;
/// - with fail-safe on, `fail_safe_max` is at least `fail_safe_throttle`.
///
/// ```
/// use std::time::Duration;
/// let mut config = cacheaside::Config::default();
/// config.namespace = "myapp:".into();
/// config.ttl = Duration::from_secs(300);
/// config.set_users_table("accounts.users").unwrap();
/// assert!(config.set_users_table("users; drop table users").is_err());
/// config.lock_wait = Duration::from_secs(1); // shorter than a load may take
/// assert!(config.validate().unwrap_err().to_string().contains("lock_wait"));
/// ```
///
/// Its `Debug` output shows the URLs with their passwords replaced by
/// `***` (see [`redact_url`]), so a logged config leaks no credential.
#[derive(Clone)]
#[non_exhaustive]
pub struct Config {
    /// PostgreSQL URL. Defaults to `postgres://postgres@127.0.0.1:5432/test`.
    pub database_url: String,
    /// Redis URL, with the password or ACL user and password if the server
    /// wants them (`redis://user:pass@host:6379/`). Several URLs separated
    /// by commas (`redis://127.0.0.1:7001,redis://127.0.0.1:7002`) select
    /// Redis Cluster: they are the seed nodes the client learns the cluster
    /// from (see [`Config::set_redis_cluster`] and `docs/cluster.md`).
    /// Defaults to `redis://127.0.0.1:6379/`.
    pub redis_url: String,
    /// For `rediss://` URLs (TLS, through rustls): a PEM file with the
    /// certificate(s) of the CA that signed the servers' certificates, for
    /// a self-signed or private CA; read when the client opens. `None`
    /// trusts the system's root certificates. Defaults to `None`.
    pub redis_ca_file: Option<std::path::PathBuf>,
    /// For Postgres over TLS (`sslmode=require` in `database_url`, through
    /// rustls, which always checks the certificate and the host name, as
    /// libpq's `verify-full`): a PEM file with the certificate(s) of the CA
    /// that signed the server's certificate; read when the client opens.
    /// `None` trusts the system's root certificates. Without `sslmode` (or
    /// with `prefer`) no TLS is used, so a CA file without `sslmode=require`
    /// is refused by [`validate`](Config::validate) rather than silently
    /// ignored. Defaults to `None`.
    pub database_ca_file: Option<std::path::PathBuf>,
    /// A streaming read replica of `database_url` that serves the loads of a
    /// miss (`DATABASE_REPLICA_URL` in [`Config::from_env`]), never a write.
    /// A load from it is fenced by the committed version of its key: a row
    /// older than a write that returned is read again from the primary
    /// (see [`CacheAside::get_or_load_versioned_from_replica`](crate::CacheAside::get_or_load_versioned_from_replica)
    /// and `docs/replicas.md`). Set it in every process that writes keys
    /// loaded from the replica too: writes raise the fences. Its TLS follows
    /// its own `sslmode`, with `database_ca_file`. Defaults to `None`.
    pub replica_url: Option<String>,
    /// How long a write fences the replica loads of its key: the worst
    /// replica lag the fences cover. While the replica is measured this far
    /// behind or more, loads read the primary (see `docs/replicas.md`).
    /// Used only with `replica_url`. Defaults to 5 s.
    pub replica_max_lag: Duration,
    /// Most Postgres connections one client opens. Defaults to 8, so ten
    /// processes fit under Postgres's default `max_connections` of 100.
    pub db_pool_size: u32,
    /// Most Redis connections one client opens. Defaults to 16.
    pub cache_pool_size: u32,
    /// Idle connections each pool keeps open (opened in the background; a
    /// client opens without waiting for them). At least 1: with none, every
    /// call would open a connection of its own, so
    /// [`validate`](Config::validate) refuses 0 (and a pool built from an
    /// unvalidated config keeps 1). Defaults to 1.
    pub pool_min_idle: u32,
    /// How long a caller waits for a free Postgres connection when every
    /// pooled one is busy, before [`ErrorKind::Timeout`](crate::ErrorKind).
    /// (A server that refuses connections fails the call at once instead.)
    /// Defaults to 5 s.
    pub pool_timeout: Duration,
    /// Bound on opening one Postgres connection: TCP connect, startup and
    /// authentication. Defaults to 3 s.
    pub connect_timeout: Duration,
    /// Bound on everything Redis does for one command: opening a connection,
    /// waiting for a pooled one, and each read and write. A frozen Redis
    /// costs a call at most this (and nothing once the circuit breaker has
    /// opened). Defaults to 250 ms.
    pub cache_timeout: Duration,
    /// Postgres `statement_timeout`, set on every connection; the client
    /// gives up 500 ms later on a server that did not cancel the statement
    /// itself. Defaults to 10 s.
    pub statement_timeout: Duration,
    /// TTL of a cached value. At most [`MAX_TTL`]. Defaults to 60 s.
    pub ttl: Duration,
    /// TTL of a cached "absent" entry (negative caching). At most
    /// [`MAX_TTL`]. Defaults to 10 s.
    pub negative_ttl: Duration,
    /// Prefix of every Redis key this client touches, e.g. `"myapp:"`.
    /// May not contain `{` or `}` (they delimit the cluster hash tag).
    /// Defaults to `""`.
    pub namespace: String,
    /// Table the lab's user functions read and write; an SQL identifier,
    /// optionally schema-qualified. Defaults to `users`.
    pub users_table: String,
    /// How long a reader's lease (its right to fill a missed key) lives
    /// without renewal; it is renewed while its load runs, so this is how
    /// long a dead reader's lease blocks fills. Defaults to 3 s.
    pub lease_ttl: Duration,
    /// How long the cross-process rebuild lock lives without renewal; it is
    /// renewed while its load runs, so this is how long a dead holder delays
    /// other processes. Defaults to 3 s.
    pub lock_ttl: Duration,
    /// Longest a reader waits for another process's rebuild before loading
    /// the value itself. At least `pool_timeout + statement_timeout`.
    /// Defaults to 15 s.
    pub lock_wait: Duration,
    /// How often a reader waiting on another process's rebuild looks for the
    /// value. Defaults to 2 ms.
    pub lock_poll: Duration,
    /// XFetch early-refresh aggressiveness; `0.0` turns early refresh off,
    /// larger values refresh earlier. Defaults to 1.0.
    pub beta: f64,
    /// Fail-safe: how long past its TTL an entry stays in Redis as a
    /// last-known-good copy, served when a reload fails (the database is down
    /// or too slow) instead of the error. `Duration::ZERO` turns fail-safe
    /// off. Defaults to off.
    pub fail_safe_max: Duration,
    /// After a copy was served because a reload failed, for how long it is
    /// served as if fresh, so the next callers do not all retry the database
    /// at once. Defaults to 5 s.
    pub fail_safe_throttle: Duration,
    /// With a fail-safe copy at hand, how long a reader waits for a reload
    /// before it takes the copy (the reload goes on and fills the cache when
    /// it finishes, when it can run in the background).
    /// `Duration::ZERO` waits for the reload. Defaults to off.
    pub soft_timeout: Duration,
    /// Consecutive Redis failures that open the circuit breaker, after which
    /// reads go straight to Postgres without touching Redis. 0 turns the
    /// breaker off. Defaults to 3.
    pub breaker_failures: u32,
    /// How long the breaker stays open before one caller probes Redis again.
    /// Defaults to 1 s.
    pub breaker_cool_off: Duration,
    /// Threads of the client's background pool (early refreshes, slow
    /// reloads past the soft timeout). 0 runs that work on the calling
    /// thread. Defaults to 2.
    pub background_threads: u32,
    /// Run the invalidation relay: a thread that applies the changes the
    /// outbox trigger recorded (including writes that bypassed the library,
    /// and invalidations Redis missed) to the cache. Defaults to on.
    pub invalidation_relay: bool,
    /// The longest the relay waits between two looks at the outbox. It
    /// looks every 5 ms while changes arrive and backs off to this when
    /// none do (a look at a quiet database is one cheap statement: has its
    /// snapshot moved?), so a change after a quiet spell is applied within
    /// about this. The capture trigger sends no notification: nothing is
    /// added to the writer's commit. Defaults to 50 ms.
    pub relay_poll: Duration,
    /// Whether the relays of one namespace share a lease (a session
    /// advisory lock on each relay's own connection): one reads the outbox
    /// and applies it, the others stand by and take over within about
    /// 250 ms when its connection ends, so the outbox is read once however
    /// many processes run clients. Off, every relay reads the outbox: for
    /// poolers that cannot keep a session (PgBouncer in transaction mode).
    /// (The name is historical: the relay used to `LISTEN` for the
    /// trigger's notifications; the trigger sends none now.) Defaults to
    /// on.
    pub relay_listen: bool,
    /// The outbox table the change-capture trigger writes and the relay
    /// reads; an SQL identifier. Defaults to `cacheaside_invalidations`.
    pub outbox_table: String,
    /// How long outbox rows are kept. A relay that was away longer than this
    /// cannot know what it missed, and empties its namespace of cached
    /// entries instead. Defaults to 24 h.
    pub outbox_retention: Duration,
    /// Prepared statements kept per Postgres connection (least recently
    /// used evicted). 0 prepares, runs and closes every statement: for
    /// poolers that cannot keep prepared statements across calls (PgBouncer
    /// in transaction mode before 1.21). Defaults to 256.
    pub statement_cache_size: usize,
    /// The longest a session of [`Client::sessions`](crate::Client::sessions)
    /// (and of the C `cacheaside_session_create`) lives, however often it is
    /// read: reads renew its idle TTL only up to this deadline. Defaults to
    /// 24 hours.
    pub session_max_lifetime: Duration,
    /// Most write-behind changes waiting to reach Postgres (enqueued and not
    /// yet applied or dead-lettered, across every process of the namespace)
    /// before an enqueue is refused with
    /// [`ErrorKind::BacklogFull`](crate::ErrorKind): a bound on Redis memory
    /// and on how far Postgres may lag. Nothing is dropped: a refused change
    /// was not taken. At least 1. Defaults to 100 000.
    pub write_behind_max_backlog: u64,
    /// Changes one write-behind worker reads from the stream at a time; after
    /// coalescing (only the newest change of a key is written) they go to
    /// Postgres in one transaction. 1 to 10 000. Defaults to 256.
    pub write_behind_batch: u32,
    /// How long a change may stay delivered to a live worker without being
    /// acknowledged before another worker (of any process) claims it with
    /// `XAUTOCLAIM`. A dead worker's changes are claimed sooner, within
    /// about 2 s (its liveness key expires). A live worker renews its claim
    /// on changes it is retrying. Keep it longer
    /// than one batch's transaction may take (`pool_timeout +
    /// statement_timeout`): a shorter one costs duplicate writes, which the
    /// sequence guard makes harmless. Defaults to 30 s.
    pub write_behind_claim_after: Duration,
    /// How many times a change whose write Postgres refuses (a constraint,
    /// a type error) is tried before it goes to the dead-letter stream and
    /// its cache entry is invalidated. An unreachable or timed-out Postgres
    /// does not count: changes wait for it. At least 1. Defaults to 5.
    pub write_behind_attempts: u32,
    /// The wait before a failed write is retried; it doubles with every
    /// attempt, up to a quarter of `write_behind_claim_after`. Defaults to
    /// 100 ms.
    pub write_behind_retry_backoff: Duration,
    /// The near cache (L1) in process memory, kept coherent by Redis
    /// client-side caching (see [`LocalCache`] and `docs/near-cache.md`).
    /// Defaults to off ([`LocalCache::OFF`]).
    pub local_cache: LocalCache,
    /// How often a background thread inspects a sample of the cache
    /// against Postgres ([`CacheAside::inspect`](crate::CacheAside::inspect)),
    /// counting what it finds in `Stats::inspected` and
    /// `Stats::inspect_stale`; `Duration::ZERO` runs no inspector. A round
    /// costs about one `SCAN` per thousand keys in the database until the
    /// sample is full, one `MGET`, and a catalog query plus one query per
    /// captured table. Defaults to off.
    pub inspect_every: Duration,
    /// Entries one background inspection samples: 1 to 10 000. Defaults to
    /// 100.
    pub inspect_sample: u32,
}

/// Settings of the near cache (L1): how many entries it holds, and how
/// long any of them may be served at most.
///
/// A hit in L1 costs no network call. Redis tells every process of a change
/// to a key (`CLIENT TRACKING`), and a process serves an entry only while it
/// can prove it has applied every such message up to 50 ms ago; whatever
/// fails, no entry is served longer than `max_staleness` after it was read
/// from Redis.
///
/// ```
/// use std::time::Duration;
/// let mut config = cacheaside::Config::default();
/// config.local_cache = cacheaside::LocalCache::new(10_000, Duration::from_secs(5));
/// assert!(config.validate().is_ok());
/// assert!(!cacheaside::LocalCache::OFF.is_on());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct LocalCache {
    /// Most entries held, approximately (the store is sharded, and a shard
    /// that fills evicts its least useful entries first, CLOCK-Pro-like);
    /// 0 turns L1 off. Defaults to 0.
    pub max_entries: u64,
    /// Longest an entry is served after it was read from Redis, even if no
    /// invalidation came (and never past the Redis entry's TTL). At least
    /// 1 ms and at most [`MAX_TTL`] when L1 is on. Defaults to 1 s.
    pub max_staleness: Duration,
}

impl LocalCache {
    /// L1 off: the default.
    pub const OFF: LocalCache = LocalCache {
        max_entries: 0,
        max_staleness: Duration::from_secs(1),
    };

    /// L1 holding up to `max_entries`, each served at most `max_staleness`.
    pub fn new(max_entries: u64, max_staleness: Duration) -> LocalCache {
        LocalCache {
            max_entries,
            max_staleness,
        }
    }

    /// True when L1 is on (`max_entries > 0`).
    pub fn is_on(&self) -> bool {
        self.max_entries > 0
    }
}

impl Default for LocalCache {
    fn default() -> Self {
        LocalCache::OFF
    }
}

/// Most entries one inspection
/// ([`CacheAside::inspect`](crate::CacheAside::inspect)) samples.
pub(crate) const MAX_INSPECT_SAMPLE: usize = 10_000;

impl Default for Config {
    fn default() -> Self {
        Config {
            database_url: "postgres://postgres@127.0.0.1:5432/test".into(),
            redis_url: "redis://127.0.0.1:6379/".into(),
            redis_ca_file: None,
            database_ca_file: None,
            replica_url: None,
            replica_max_lag: Duration::from_secs(5),
            db_pool_size: 8,
            cache_pool_size: 16,
            pool_min_idle: 1,
            pool_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(3),
            cache_timeout: Duration::from_millis(250),
            statement_timeout: Duration::from_secs(10),
            ttl: Duration::from_secs(60),
            negative_ttl: Duration::from_secs(10),
            namespace: String::new(),
            users_table: "users".into(),
            lease_ttl: Duration::from_secs(3),
            lock_ttl: Duration::from_secs(3),
            lock_wait: Duration::from_secs(15),
            lock_poll: Duration::from_millis(2),
            beta: 1.0,
            fail_safe_max: Duration::ZERO,
            fail_safe_throttle: Duration::from_secs(5),
            soft_timeout: Duration::ZERO,
            breaker_failures: 3,
            breaker_cool_off: Duration::from_secs(1),
            background_threads: 2,
            invalidation_relay: true,
            relay_poll: Duration::from_millis(50),
            relay_listen: true,
            outbox_table: "cacheaside_invalidations".into(),
            outbox_retention: Duration::from_secs(24 * 3600),
            statement_cache_size: 256,
            session_max_lifetime: Duration::from_secs(24 * 60 * 60),
            write_behind_max_backlog: 100_000,
            write_behind_batch: 256,
            write_behind_claim_after: Duration::from_secs(30),
            write_behind_attempts: 5,
            write_behind_retry_backoff: Duration::from_millis(100),
            local_cache: LocalCache::OFF,
            inspect_every: Duration::ZERO,
            inspect_sample: 100,
        }
    }
}

/// Every field as derived `Debug` would show it, but the URLs through
/// [`redact_url`]: a config in a log or a panic message must not carry the
/// passwords. (A new field must be added here too; `config_debug_lists_every_field`
/// counts them.)
impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("database_url", &redact_url(&self.database_url))
            .field("redis_url", &redact_url(&self.redis_url))
            .field("redis_ca_file", &self.redis_ca_file)
            .field("database_ca_file", &self.database_ca_file)
            .field("replica_url", &self.replica_url.as_deref().map(redact_url))
            .field("replica_max_lag", &self.replica_max_lag)
            .field("db_pool_size", &self.db_pool_size)
            .field("cache_pool_size", &self.cache_pool_size)
            .field("pool_min_idle", &self.pool_min_idle)
            .field("pool_timeout", &self.pool_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("cache_timeout", &self.cache_timeout)
            .field("statement_timeout", &self.statement_timeout)
            .field("ttl", &self.ttl)
            .field("negative_ttl", &self.negative_ttl)
            .field("namespace", &self.namespace)
            .field("users_table", &self.users_table)
            .field("lease_ttl", &self.lease_ttl)
            .field("lock_ttl", &self.lock_ttl)
            .field("lock_wait", &self.lock_wait)
            .field("lock_poll", &self.lock_poll)
            .field("beta", &self.beta)
            .field("fail_safe_max", &self.fail_safe_max)
            .field("fail_safe_throttle", &self.fail_safe_throttle)
            .field("soft_timeout", &self.soft_timeout)
            .field("breaker_failures", &self.breaker_failures)
            .field("breaker_cool_off", &self.breaker_cool_off)
            .field("background_threads", &self.background_threads)
            .field("invalidation_relay", &self.invalidation_relay)
            .field("relay_poll", &self.relay_poll)
            .field("relay_listen", &self.relay_listen)
            .field("outbox_table", &self.outbox_table)
            .field("outbox_retention", &self.outbox_retention)
            .field("statement_cache_size", &self.statement_cache_size)
            .field("session_max_lifetime", &self.session_max_lifetime)
            .field("write_behind_max_backlog", &self.write_behind_max_backlog)
            .field("write_behind_batch", &self.write_behind_batch)
            .field("write_behind_claim_after", &self.write_behind_claim_after)
            .field("write_behind_attempts", &self.write_behind_attempts)
            .field(
                "write_behind_retry_backoff",
                &self.write_behind_retry_backoff,
            )
            .field("local_cache", &self.local_cache)
            .field("inspect_every", &self.inspect_every)
            .field("inspect_sample", &self.inspect_sample)
            .finish()
    }
}

impl Config {
    /// The defaults, with `DATABASE_URL`, `REDIS_URL`, the CA files for
    /// TLS (`DATABASE_CA_FILE`, `REDIS_CA_FILE`) and the read replica
    /// (`DATABASE_REPLICA_URL`) taken from the environment when set (and
    /// not empty, for the CA files and the replica).
    pub fn from_env() -> Self {
        Config::from_vars(|name| std::env::var_os(name))
    }

    /// [`from_env`](Self::from_env) over any source of variables.
    fn from_vars(var: impl Fn(&str) -> Option<std::ffi::OsString>) -> Self {
        let mut config = Config::default();
        let text = |name| var(name).and_then(|v| v.into_string().ok());
        if let Some(url) = text("DATABASE_URL") {
            config.database_url = url;
        }
        if let Some(url) = text("REDIS_URL") {
            config.redis_url = url;
        }
        config.replica_url = text("DATABASE_REPLICA_URL").filter(|url| !url.is_empty());
        let path = |name| var(name).filter(|p| !p.is_empty()).map(Into::into);
        config.database_ca_file = path("DATABASE_CA_FILE");
        config.redis_ca_file = path("REDIS_CA_FILE");
        config
    }

    /// Points the client at a Redis Cluster: `nodes` are seed nodes (any
    /// masters or replicas of the cluster; the client learns the rest with
    /// `CLUSTER SLOTS`), each a URL such as `redis://user:pass@10.0.0.1:7000`.
    /// Stored in [`redis_url`](Config::redis_url) joined by commas, the same
    /// form `REDIS_URL` and `cacheaside_config_set_redis_url` accept. One
    /// node still selects cluster mode (a managed cluster behind one
    /// address).
    ///
    /// ```
    /// let mut config = cacheaside::Config::default();
    /// config.set_redis_cluster(&["redis://127.0.0.1:7001", "redis://127.0.0.1:7002"]).unwrap();
    /// assert_eq!(config.redis_url, "redis://127.0.0.1:7001,redis://127.0.0.1:7002");
    /// assert!(config.is_redis_cluster());
    /// ```
    ///
    /// # Errors
    /// [`ErrorKind::InvalidArgument`](crate::ErrorKind) for an empty list or
    /// a node that is empty or holds a comma.
    pub fn set_redis_cluster<S: AsRef<str>>(&mut self, nodes: &[S]) -> Result<()> {
        if nodes.is_empty() {
            return Err(Error::invalid_argument(
                "a Redis Cluster needs at least one node",
            ));
        }
        let mut joined = String::new();
        for node in nodes {
            let node = node.as_ref().trim();
            if node.is_empty() || node.contains(',') {
                return Err(Error::invalid_argument(format!(
                    "Redis Cluster node {:?} is empty or holds a comma",
                    redact_url(node)
                )));
            }
            if !joined.is_empty() {
                joined.push(',');
            }
            joined.push_str(node);
        }
        // A single node with a trailing comma still reads as a list.
        if nodes.len() == 1 {
            joined.push(',');
        }
        self.redis_url = joined;
        Ok(())
    }

    /// True when [`redis_url`](Config::redis_url) lists nodes separated by
    /// commas, which selects Redis Cluster (a `redis+sentinel://` URL's
    /// list of sentinels does not).
    pub fn is_redis_cluster(&self) -> bool {
        self.redis_url.contains(',') && !self.is_redis_sentinel()
    }

    /// True when [`redis_url`](Config::redis_url) names a master through
    /// Redis Sentinel: `redis+sentinel://[user:pass@]HOST:PORT[,HOST:PORT…]/MASTER_NAME`
    /// (`rediss+sentinel://` for TLS to the sentinels and the master). Each
    /// new connection asks the sentinels (in the order listed, the first
    /// that answers) for the master's address and checks with `ROLE` that
    /// the server it reaches is a master; after a failover, connections to
    /// the old master fail and are replaced by ones to the new master. The
    /// credentials are the master's: sentinels are asked without any (a
    /// sentinel with `requirepass` is not supported yet). See
    /// `docs/cluster.md`.
    ///
    /// ```
    /// let mut config = cacheaside::Config::default();
    /// config.redis_url = "redis+sentinel://127.0.0.1:26379,127.0.0.1:26380/mymaster".into();
    /// assert!(config.is_redis_sentinel());
    /// assert!(!config.is_redis_cluster());
    /// config.validate().unwrap();
    /// ```
    pub fn is_redis_sentinel(&self) -> bool {
        let url = self.redis_url.trim_start();
        url.starts_with("redis+sentinel://") || url.starts_with("rediss+sentinel://")
    }

    /// The parts of a `redis+sentinel://` [`redis_url`](Config::redis_url);
    /// `None` for any other URL.
    pub(crate) fn sentinel_url(&self) -> Result<Option<SentinelUrl>> {
        if !self.is_redis_sentinel() {
            return Ok(None);
        }
        SentinelUrl::parse(self.redis_url.trim()).map(Some)
    }

    /// The URLs in [`redis_url`](Config::redis_url): one for a single
    /// server (or a Sentinel URL, whole), the seed nodes for a cluster
    /// (empty entries skipped).
    pub fn redis_nodes(&self) -> Vec<&str> {
        if self.is_redis_sentinel() {
            return vec![self.redis_url.trim()];
        }
        self.redis_url
            .split(',')
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .collect()
    }

    /// Sets [`users_table`](Config::users_table) after checking it is an SQL
    /// identifier.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidArgument`](crate::ErrorKind) when it is not.
    pub fn set_users_table(&mut self, table: &str) -> Result<()> {
        validate_table_name(table)?;
        self.users_table = table.to_owned();
        Ok(())
    }

    /// Sets [`namespace`](Config::namespace) after checking it.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidArgument`](crate::ErrorKind) when it holds `{`,
    /// `}` or a control character.
    pub fn set_namespace(&mut self, namespace: &str) -> Result<()> {
        validate_namespace(namespace)?;
        self.namespace = namespace.to_owned();
        Ok(())
    }

    /// Checks every setting, alone and against the others; a client refuses
    /// to open with an invalid config.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidArgument`](crate::ErrorKind) naming the settings.
    pub fn validate(&self) -> Result<()> {
        self.validate_each()?;
        self.validate_together()
    }

    /// Checks each setting on its own (what a C setter checks: the relations
    /// are checked when the client opens, so setters may come in any order).
    pub(crate) fn validate_each(&self) -> Result<()> {
        validate_table_name(&self.users_table)?;
        validate_table_name(&self.outbox_table)?;
        validate_namespace(&self.namespace)?;
        self.sentinel_url()?;
        self.validate_replica()?;
        if self.db_pool_size == 0 || self.cache_pool_size == 0 {
            return Err(Error::invalid_argument("pool sizes must be at least 1"));
        }
        if self.pool_min_idle == 0 {
            return Err(Error::invalid_argument(
                "pool_min_idle must be at least 1: a pool that keeps none open stays empty, \
                 and every call would open a connection of its own",
            ));
        }
        let nonzero = [
            ("pool_timeout", self.pool_timeout),
            ("connect_timeout", self.connect_timeout),
            ("cache_timeout", self.cache_timeout),
            ("statement_timeout", self.statement_timeout),
            ("ttl", self.ttl),
            ("negative_ttl", self.negative_ttl),
            ("lease_ttl", self.lease_ttl),
            ("lock_ttl", self.lock_ttl),
            ("lock_poll", self.lock_poll),
            ("breaker_cool_off", self.breaker_cool_off),
            ("relay_poll", self.relay_poll),
            ("outbox_retention", self.outbox_retention),
            ("session_max_lifetime", self.session_max_lifetime),
            ("write_behind_claim_after", self.write_behind_claim_after),
            (
                "write_behind_retry_backoff",
                self.write_behind_retry_backoff,
            ),
        ];
        for (name, value) in nonzero {
            if value.as_millis() == 0 {
                return Err(Error::invalid_argument(format!(
                    "{name} must be at least 1 ms"
                )));
            }
        }
        check_ttl("ttl", self.ttl)?;
        check_ttl("negative_ttl", self.negative_ttl)?;
        if self.local_cache.is_on() {
            check_ttl("local_cache.max_staleness", self.local_cache.max_staleness)?;
        }
        if self.fail_safe_max > MAX_TTL {
            return Err(Error::invalid_argument(format!(
                "fail_safe_max is longer than the maximum TTL ({} ms, ten years)",
                MAX_TTL.as_millis()
            )));
        }
        if self.session_max_lifetime > crate::Sessions::MAX_LIFETIME {
            return Err(Error::invalid_argument(
                "session_max_lifetime must be at most 366 days",
            ));
        }
        if self.write_behind_max_backlog == 0 {
            return Err(Error::invalid_argument(
                "write_behind_max_backlog must be at least 1",
            ));
        }
        if !(1..=10_000).contains(&self.write_behind_batch) {
            return Err(Error::invalid_argument(
                "write_behind_batch must be between 1 and 10000",
            ));
        }
        if self.inspect_sample == 0 || self.inspect_sample as usize > MAX_INSPECT_SAMPLE {
            return Err(Error::invalid_argument(format!(
                "inspect_sample must be between 1 and {}",
                MAX_INSPECT_SAMPLE
            )));
        }
        if self.write_behind_attempts == 0 {
            return Err(Error::invalid_argument(
                "write_behind_attempts must be at least 1",
            ));
        }
        if !(self.beta.is_finite() && self.beta >= 0.0) {
            return Err(Error::invalid_argument("beta must be a finite number >= 0"));
        }
        Ok(())
    }

    /// Checks the settings that must fit together.
    fn validate_together(&self) -> Result<()> {
        let ms = |d: Duration| d.as_millis();
        if self.database_ca_file.is_some() && !self.database_url_requires_tls() {
            // Redis refuses the equivalent (a CA file with a redis:// URL
            // is never used either); here it would connect in plaintext.
            return Err(Error::invalid_argument(
                "database_ca_file is set but database_url does not ask for TLS: add \
                 sslmode=require (without it the connection is not encrypted)",
            ));
        }
        if self.cache_timeout > self.pool_timeout {
            return Err(Error::invalid_argument(format!(
                "cache_timeout ({} ms) must not be longer than pool_timeout ({} ms): \
                 the cache is the fast path",
                ms(self.cache_timeout),
                ms(self.pool_timeout)
            )));
        }
        for (name, ttl) in [("lease_ttl", self.lease_ttl), ("lock_ttl", self.lock_ttl)] {
            if ttl < self.cache_timeout * 3 {
                return Err(Error::invalid_argument(format!(
                    "{name} ({} ms) must be at least 3 x cache_timeout ({} ms): it is renewed \
                     every third of its TTL, and a renewal may take a cache_timeout",
                    ms(ttl),
                    ms(self.cache_timeout) * 3
                )));
            }
        }
        check_ttl(
            "ttl + fail_safe_max",
            self.ttl
                .max(self.negative_ttl)
                .saturating_add(self.fail_safe_max),
        )?;
        let longest_load = self.pool_timeout + self.statement_timeout;
        if self.lock_wait < longest_load {
            return Err(Error::invalid_argument(format!(
                "lock_wait ({} ms) must be at least pool_timeout + statement_timeout ({} ms), \
                 the longest a database load may take: a waiter that gives up sooner loads a \
                 second time",
                ms(self.lock_wait),
                ms(longest_load)
            )));
        }
        if !self.fail_safe_max.is_zero() && self.fail_safe_max < self.fail_safe_throttle {
            return Err(Error::invalid_argument(format!(
                "fail_safe_max ({} ms) must be at least fail_safe_throttle ({} ms)",
                ms(self.fail_safe_max),
                ms(self.fail_safe_throttle)
            )));
        }
        Ok(())
    }

    /// True when `database_url` says `sslmode=require`; also for a URL that
    /// does not parse, which [`Db::connect`](crate::Db::connect) refuses
    /// with its own error.
    fn database_url_requires_tls(&self) -> bool {
        use tokio_postgres::config::SslMode;
        self.database_url
            .parse::<tokio_postgres::Config>()
            .map_or(true, |pg| pg.get_ssl_mode() == SslMode::Require)
    }

    /// The longest one call may take before it gives up: a wait for another
    /// process's load, then a load of its own, and the cache round trips
    /// around them.
    pub(crate) fn call_deadline(&self) -> Duration {
        self.lock_wait
            + self.pool_timeout
            + self.statement_timeout
            + CLIENT_MARGIN
            + self.cache_timeout * 4
    }
}

/// A `redis+sentinel://[user:pass@]HOST:PORT[,HOST:PORT…]/MASTER_NAME[?query]`
/// URL, taken apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SentinelUrl {
    /// `rediss+sentinel://`: TLS to the sentinels and to the master.
    pub tls: bool,
    /// `user:pass` as written (percent-encoded), for the master only.
    pub userinfo: Option<String>,
    /// The sentinels' `host:port`s, as written (`[v6]:port` included).
    pub sentinels: Vec<String>,
    pub master_name: String,
    /// What followed a `?`, passed on to the master's URL.
    pub query: Option<String>,
}

impl SentinelUrl {
    fn parse(url: &str) -> Result<SentinelUrl> {
        let bad = |why: &str| {
            Error::invalid_argument(format!(
                "redis_url {:?} is not redis+sentinel://[user:pass@]HOST:PORT[,HOST:PORT...]/MASTER_NAME: {why}",
                redact_url(url)
            ))
        };
        let (tls, rest) = if let Some(rest) = url.strip_prefix("redis+sentinel://") {
            (false, rest)
        } else if let Some(rest) = url.strip_prefix("rediss+sentinel://") {
            (true, rest)
        } else {
            return Err(bad("not a sentinel URL"));
        };
        let (authority, path) = rest.split_once('/').ok_or_else(|| bad("no /MASTER_NAME"))?;
        let (userinfo, hosts) = match authority.rsplit_once('@') {
            Some((userinfo, hosts)) => (Some(userinfo.to_owned()), hosts),
            None => (None, authority),
        };
        let mut sentinels = Vec::new();
        for host in hosts.split(',').map(str::trim) {
            let port = match host.rsplit_once(':') {
                Some((name, port)) if !name.is_empty() && !port.contains(']') => port,
                _ => return Err(bad(&format!("sentinel {host:?} has no HOST:PORT"))),
            };
            if port.parse::<u16>().map_or(true, |p| p == 0) {
                return Err(bad(&format!("sentinel {host:?} has no valid port")));
            }
            sentinels.push(host.to_owned());
        }
        let (name, query) = match path.split_once('?') {
            Some((name, query)) => (name, Some(query.to_owned())),
            None => (path, None),
        };
        let name = name.trim_end_matches('/');
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(bad("MASTER_NAME must be letters, digits, '-', '_' or '.'"));
        }
        Ok(SentinelUrl {
            tls,
            userinfo,
            sentinels,
            master_name: name.to_owned(),
            query,
        })
    }

    /// The URL of one sentinel (no credentials: they are the master's).
    pub fn sentinel(&self, host: &str) -> String {
        format!("{}://{host}/", self.scheme())
    }

    /// The URL of the master at `host`:`port`, with the credentials and
    /// query of the sentinel URL.
    pub fn master(&self, host: &str, port: u16) -> String {
        let host = if host.contains(':') && !host.starts_with('[') {
            format!("[{host}]")
        } else {
            host.to_owned()
        };
        let userinfo = self
            .userinfo
            .as_ref()
            .map_or(String::new(), |u| format!("{u}@"));
        let query = self
            .query
            .as_ref()
            .map_or(String::new(), |q| format!("?{q}"));
        format!("{}://{userinfo}{host}:{port}/{query}", self.scheme())
    }

    fn scheme(&self) -> &'static str {
        if self.tls { "rediss" } else { "redis" }
    }
}

/// Rejects a TTL of zero or beyond [`MAX_TTL`].
pub(crate) fn check_ttl(name: &str, ttl: Duration) -> Result<()> {
    if ttl.as_millis() == 0 {
        return Err(Error::invalid_argument(format!(
            "{name} must be at least 1 ms"
        )));
    }
    if ttl > MAX_TTL {
        return Err(Error::invalid_argument(format!(
            "{name} ({} ms) is longer than the maximum TTL ({} ms, ten years)",
            ttl.as_millis(),
            MAX_TTL.as_millis()
        )));
    }
    Ok(())
}

/// Accepts `name` or `schema.name`, each part `[A-Za-z_][A-Za-z0-9_]*` and at
/// most 63 bytes (Postgres's identifier limit). Such a name is safe to place
/// in SQL text, which is the only place a table name can go (parameters bind
/// values, not identifiers).
pub(crate) fn validate_table_name(name: &str) -> Result<()> {
    let valid_part = |part: &str| {
        let mut chars = part.chars();
        matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
            && part.len() <= 63
    };
    let parts: Vec<&str> = name.split('.').collect();
    if parts.len() <= 2 && parts.iter().all(|p| valid_part(p)) {
        Ok(())
    } else {
        Err(Error::invalid_argument(format!(
            "table name {name:?} is not an SQL identifier (letters, digits, '_', optionally schema-qualified)"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_debug_never_prints_a_password() {
        let c = Config {
            database_url: "host=db user=app password = s3cret-db".into(),
            redis_url: "redis+unix:///run/redis.sock?pass=s3cret-redis".into(),
            ..Config::default()
        };
        let shown = format!("{c:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
    }

    #[test]
    fn config_debug_hides_passwords() {
        let c = Config {
            database_url: "postgres://app:db-s3cret@127.0.0.1/test".into(),
            redis_url: "redis://alice:redis-s3cret@127.0.0.1:6379/".into(),
            ..Config::default()
        };
        let shown = format!("{c:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("alice:***@"), "{shown}");
    }

    #[test]
    fn config_debug_lists_every_field() {
        let shown = format!("{:?}", Config::default());
        // Fields of the struct, counted from the derive-free source.
        let source = include_str!("config.rs");
        let start = source.find("pub struct Config {").unwrap();
        let end = start + source[start..].find("\n}").unwrap();
        let fields = source[start..end]
            .lines()
            .filter(|l| l.starts_with("    pub "))
            .map(|l| {
                l.trim_start_matches("    pub ")
                    .split(':')
                    .next()
                    .unwrap()
                    .to_owned()
            })
            .collect::<Vec<_>>();
        assert!(fields.len() > 30, "{fields:?}");
        for field in fields {
            assert!(
                shown.contains(&format!("{field}: ")),
                "Debug misses {field}"
            );
        }
    }

    #[test]
    fn cluster_node_lists() {
        let mut c = Config::default();
        assert!(!c.is_redis_cluster());
        assert_eq!(c.redis_nodes(), ["redis://127.0.0.1:6379/"]);
        c.set_redis_cluster(&["redis://a:1", "redis://b:2"])
            .unwrap();
        assert!(c.is_redis_cluster());
        assert_eq!(c.redis_nodes(), ["redis://a:1", "redis://b:2"]);
        c.set_redis_cluster(&["redis://a:1"]).unwrap();
        assert!(c.is_redis_cluster());
        assert_eq!(c.redis_nodes(), ["redis://a:1"]);
        assert!(c.set_redis_cluster::<&str>(&[]).is_err());
        assert!(c.set_redis_cluster(&["redis://a:1,redis://b:2"]).is_err());
    }

    #[test]
    fn from_env_reads_the_urls_and_the_ca_files() {
        let vars = [
            ("DATABASE_URL", "postgres://u@db/x?sslmode=require"),
            ("REDIS_URL", "rediss://cache:6380/"),
            ("DATABASE_CA_FILE", "/etc/db-ca.pem"),
            ("REDIS_CA_FILE", ""),
        ];
        let c = Config::from_vars(|name| {
            vars.iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| (*v).into())
        });
        assert_eq!(c.database_url, "postgres://u@db/x?sslmode=require");
        assert_eq!(c.redis_url, "rediss://cache:6380/");
        assert_eq!(c.database_ca_file, Some("/etc/db-ca.pem".into()));
        assert_eq!(c.redis_ca_file, None, "an empty variable names no file");
        let unset = Config::from_vars(|_| None);
        assert_eq!(unset.redis_url, Config::default().redis_url);
    }

    #[test]
    fn sentinel_urls_are_not_clusters_and_bad_ones_are_refused() {
        let c = Config {
            redis_url:
                "redis+sentinel://app:p%40ss@10.0.0.1:26379,[::1]:26380/cache-1?protocol=resp2"
                    .into(),
            ..Config::default()
        };
        assert!(c.is_redis_sentinel() && !c.is_redis_cluster());
        c.validate().unwrap();
        let url = c.sentinel_url().unwrap().unwrap();
        assert_eq!(url.sentinels, ["10.0.0.1:26379", "[::1]:26380"]);
        assert_eq!(url.master_name, "cache-1");
        assert_eq!(url.sentinel("[::1]:26380"), "redis://[::1]:26380/");
        assert_eq!(
            url.master("fe80::1", 6380),
            "redis://app:p%40ss@[fe80::1]:6380/?protocol=resp2"
        );
        assert!(!redact_url(&c.redis_url).contains("p%40ss"));
        for bad in [
            "redis+sentinel://127.0.0.1:26379",
            "redis+sentinel://127.0.0.1:26379/",
            "redis+sentinel://127.0.0.1/mymaster",
            "redis+sentinel://127.0.0.1:0/mymaster",
            "redis+sentinel://127.0.0.1:26379,/mymaster",
            "redis+sentinel://127.0.0.1:26379/my master",
        ] {
            let c = Config {
                redis_url: bad.into(),
                ..Config::default()
            };
            let err = c.validate().unwrap_err();
            assert_eq!(err.kind(), crate::ErrorKind::InvalidArgument, "{bad}");
        }
    }

    #[test]
    fn a_database_ca_file_without_sslmode_require_is_refused() {
        for url in [
            "postgres://u@db/x",
            "postgres://u@db/x?sslmode=prefer",
            "postgres://u@db/x?sslmode=disable",
            "host=db user=u",
        ] {
            let c = Config {
                database_url: url.into(),
                database_ca_file: Some("/etc/db-ca.pem".into()),
                ..Config::default()
            };
            let err = c.validate().unwrap_err();
            assert_eq!(err.kind(), crate::ErrorKind::InvalidArgument, "{url}");
            let shown = err.to_string();
            assert!(
                shown.contains("database_ca_file") && shown.contains("sslmode=require"),
                "{shown}"
            );
        }
        for url in [
            "postgres://u@db/x?sslmode=require",
            "host=db sslmode=require",
        ] {
            let c = Config {
                database_url: url.into(),
                database_ca_file: Some("/etc/db-ca.pem".into()),
                ..Config::default()
            };
            assert!(c.validate().is_ok(), "{url}");
        }
        // Without a CA file, no sslmode is plain Postgres, as before.
        let c = Config {
            database_url: "postgres://u@db/x".into(),
            ..Config::default()
        };
        assert!(c.validate().is_ok());
    }

    #[test]
    fn the_near_cache_is_accepted_on_a_cluster() {
        let mut c = Config {
            local_cache: LocalCache::new(1000, Duration::from_secs(1)),
            ..Config::default()
        };
        assert!(c.validate().is_ok());
        c.set_redis_cluster(&["redis://a:1", "redis://b:2"])
            .unwrap();
        assert!(c.validate().is_ok());
    }

    #[test]
    fn table_names() {
        for ok in ["users", "_t1", "app.users", "Users_2"] {
            assert!(validate_table_name(ok).is_ok(), "{ok}");
        }
        let long = "a".repeat(64);
        for bad in [
            "",
            "1users",
            "users;drop",
            "a.b.c",
            "a.",
            ".a",
            "us ers",
            "\"users\"",
            "usérs",
            &long,
        ] {
            assert!(validate_table_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn namespaces() {
        assert!(validate_namespace("").is_ok());
        assert!(validate_namespace("app:v1:").is_ok());
        assert!(validate_namespace("a{b").is_err());
        assert!(validate_namespace("a\nb").is_err());
    }

    #[test]
    fn validate_relates_the_timeouts() {
        let c = Config {
            cache_timeout: Duration::from_secs(6),
            ..Config::default()
        };
        let err = c.validate().unwrap_err().to_string();
        assert!(
            err.contains("cache_timeout") && err.contains("pool_timeout"),
            "{err}"
        );
        let c = Config {
            lease_ttl: Duration::from_millis(500),
            ..Config::default()
        };
        assert!(c.validate().unwrap_err().to_string().contains("lease_ttl"));
        let c = Config {
            fail_safe_max: Duration::from_secs(1),
            fail_safe_throttle: Duration::from_secs(2),
            ..Config::default()
        };
        let err = c.validate().unwrap_err().to_string();
        assert!(
            err.contains("fail_safe_max") && err.contains("fail_safe_throttle"),
            "{err}"
        );
        let c = Config {
            statement_timeout: Duration::from_secs(60),
            ..Config::default()
        };
        assert!(c.validate().unwrap_err().to_string().contains("lock_wait"));
    }

    #[test]
    fn ttls_have_a_ceiling() {
        assert!(check_ttl("ttl", MAX_TTL).is_ok());
        let err = check_ttl("ttl", Duration::from_millis(u64::MAX)).unwrap_err();
        assert!(err.to_string().contains("maximum TTL"), "{err}");
        let c = Config {
            ttl: MAX_TTL,
            fail_safe_max: Duration::from_secs(3600),
            ..Config::default()
        };
        assert!(c.validate().is_err(), "ttl + fail_safe_max is bounded too");
    }

    #[test]
    fn pool_min_idle_zero_is_refused() {
        let c = Config {
            pool_min_idle: 0,
            ..Config::default()
        };
        let err = c.validate().unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::InvalidArgument);
        assert!(err.to_string().contains("pool_min_idle"), "{err}");
    }

    #[test]
    fn validate_rejects_zero_durations_and_bad_beta() {
        let mut c = Config::default();
        assert!(c.validate().is_ok());
        c.ttl = Duration::ZERO;
        assert!(c.validate().is_err());
        let c = Config {
            beta: f64::NAN,
            ..Config::default()
        };
        assert!(c.validate().is_err());
    }
}
