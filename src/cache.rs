//! Redis: a pool of connections with one timeout on everything, namespaced
//! keys, and JSON values.
//!
//! Guarantees:
//! - Every command is bounded by `cache_timeout`: opening a connection,
//!   waiting for a pooled one, and each read and write.
//! - A refused connection fails a call in milliseconds, with its cause, and
//!   the first call after Redis answers again succeeds (see [`crate::pool`]).
//! - After a Redis restart, no caller fails because its pooled connection
//!   died: a command that finds its connection dropped marks every pooled
//!   connection dead and runs once more on a fresh one. (Commands here are
//!   idempotent, scripts included: each is written so that running it twice
//!   with the same token has the effect of once.)
//! - Errors say what failed: a timeout is [`ErrorKind::Timeout`], a refused
//!   or dropped connection, an authentication failure or an out-of-memory
//!   Redis are [`ErrorKind::Cache`] with the cause in the message (never the
//!   password).
//! - Redis Cluster (a `redis_url` listing nodes separated by commas) works
//!   the same: every command and script names keys of one hash slot (the
//!   hash tag of [`Cache::redis_key`]), and the cluster connection follows
//!   `MOVED` and `ASK` redirects and retries `TRYAGAIN` within a few
//!   `cache_timeout`s. Pipelines (which the cluster client sends to one node)
//!   only ever hold commands of one slot, or are split in cluster mode.

use std::sync::Arc;
use std::time::Duration;

use redis::cluster::{ClusterClient, ClusterClientBuilder, ClusterConnection};
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::{Cmd, Commands, Connection, ConnectionLike, RedisResult, Value};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::config::{Config, check_ttl, validate_namespace};
use crate::entry::{Entry, Payload};
use crate::error::{Error, ErrorKind, Result};
use crate::pool::{Conn, Connector, Pool};

/// A pooled Redis client whose keys all live under one namespace.
///
/// Every key `k` is stored as `{namespace}{k}` wrapped in a Redis Cluster
/// hash tag — `namespace + "{" + k + "}"` — so a value and its side keys
/// (`…:lease`, `…:lock`, `…:writers`) always share one slot. Values are JSON
/// in the crate's entry format (a short header line, then the JSON).
///
/// Cheap to clone; every method blocks and is safe from many threads. Each
/// command is bounded by [`Config::cache_timeout`].
///
/// ```no_run
/// use std::time::Duration;
/// let mut config = cacheaside::Config::from_env();
/// config.namespace = "demo:".into();
/// let cache = cacheaside::Cache::connect(&config)?;
/// cache.set_json("greeting", &"hello", Duration::from_secs(5))?;
/// assert_eq!(cache.get_json::<String>("greeting")?, Some("hello".to_owned()));
/// assert!(cache.delete("greeting")?);
/// # Ok::<(), cacheaside::Error>(())
/// ```
#[derive(Clone)]
pub struct Cache {
    pool: Pool<RedisConnector>,
    namespace: Arc<str>,
    /// `redis_url` listed several nodes: a Redis Cluster.
    cluster: bool,
}

impl Cache {
    /// Builds the pool for `config.redis_url`. Connections open lazily (and
    /// in the background), so this succeeds while Redis is down; the first
    /// command then reports why it cannot connect.
    ///
    /// A `redis_url` that lists nodes separated by commas selects Redis
    /// Cluster (see [`Config::set_redis_cluster`]).
    ///
    /// # Errors
    /// [`ErrorKind::InvalidArgument`] for an unparsable URL or namespace.
    pub fn connect(config: &Config) -> Result<Cache> {
        validate_namespace(&config.namespace)?;
        let timeout = config.cache_timeout;
        let cluster = config.is_redis_cluster();
        let target = if cluster {
            // Redirects (MOVED, ASK) are followed at once. TRYAGAIN (a
            // multi-key command or script whose keys are split between
            // the two nodes of a slot migration, until the migrator moves
            // the rest) and CLUSTERDOWN wait and retry: up to 20, 40, 80,
            // ... ms, at most half a cache_timeout each (each wait is
            // drawn at random below its bound), so a call rides through
            // a migration's split moments and gives up after about three
            // cache_timeouts (250 ms: 765 ms at worst). The crate's
            // default waits start at 1.28 s, far past a call's budget.
            let max_wait = (millis(timeout) / 2).max(10);
            let mut builder = ClusterClientBuilder::new(config.redis_nodes());
            if let Some(certs) = tls_certificates(config)? {
                builder = builder.certs(certs);
            }
            let client = builder
                .connection_timeout(timeout)
                .response_timeout(timeout)
                .retries(CLUSTER_RETRIES)
                .min_retry_wait(1)
                .max_retry_wait(max_wait)
                .retry_wait_formula(10, 2)
                .build()
                .map_err(|e| {
                    Error::invalid_argument("redis cluster URLs do not parse").with_source(e)
                })?;
            Target::Cluster(client)
        } else {
            Target::Single(single_client(config, &config.redis_url)?)
        };
        let connector = RedisConnector { target, timeout };
        Ok(Cache {
            pool: Pool::new(
                connector,
                config.cache_pool_size,
                config.pool_min_idle,
                config.cache_timeout,
            ),
            namespace: config.namespace.as_str().into(),
            cluster,
        })
    }

    /// True when this cache talks to a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        self.cluster
    }

    /// The namespace every key is stored under.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The full Redis key under which `key`'s value is stored.
    ///
    /// ```no_run
    /// # let cache = cacheaside::Cache::connect(&cacheaside::Config::from_env())?;
    /// assert_eq!(cache.redis_key("user:1"), "{user:1}");
    /// # Ok::<(), cacheaside::Error>(())
    /// ```
    pub fn redis_key(&self, key: &str) -> String {
        format!("{}{{{}}}", self.namespace, key)
    }

    /// Reads `key` and decodes its JSON value; `Ok(None)` when it is not
    /// cached or is cached as absent. (A fail-safe copy past its TTL is
    /// returned too: this is the raw accessor.)
    ///
    /// # Errors
    /// [`ErrorKind::CorruptEntry`] when the stored bytes do not decode as `T`
    /// (the engine's read paths instead treat such an entry as a miss and
    /// delete it); [`ErrorKind::InvalidArgument`] for an empty key or one
    /// holding `{` or `}`; cache errors and timeouts.
    pub fn get_json<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>> {
        check_key(key)?;
        let Some(raw) = self.get_raw(&self.redis_key(key))? else {
            return Ok(None);
        };
        let entry = Entry::decode(&raw).map_err(|why| Error::corrupt(key, why))?;
        match entry.payload {
            Payload::Absent => Ok(None),
            Payload::Value(json) => serde_json::from_slice(json)
                .map(Some)
                .map_err(|e| Error::corrupt(key, e)),
        }
    }

    /// Stores `value` as JSON under `key`, expiring after `ttl`.
    ///
    /// This is an unconditional write: it does not take part in leases, so
    /// prefer [`CacheAside`](crate::CacheAside) for values read from a
    /// database.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidArgument`] for a TTL of zero or beyond
    /// [`MAX_TTL`](crate::MAX_TTL), a value that does not serialize, or an
    /// empty key or one holding `{` or `}`;
    /// cache errors and timeouts.
    pub fn set_json<T: Serialize + ?Sized>(
        &self,
        key: &str,
        value: &T,
        ttl: Duration,
    ) -> Result<()> {
        check_key(key)?;
        check_ttl("ttl", ttl)?;
        let json = serde_json::to_vec(value).map_err(|e| {
            Error::invalid_argument("value does not serialize to JSON").with_source(e)
        })?;
        let raw = Entry::new(Payload::Value(&json), 0, Duration::ZERO, ttl).encode();
        let redis_key = self.redis_key(key);
        self.run(|conn| {
            redis::cmd("SET")
                .arg(&redis_key)
                .arg(&raw)
                .arg("PX")
                .arg(millis(ttl))
                .query(conn)
        })
    }

    /// Deletes `key`'s value and revokes every lease on it (readers' and
    /// write-through writers'), in one command; true if a value was there.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidArgument`] for an empty key or one holding `{`
    /// or `}`; cache errors and timeouts.
    pub fn delete(&self, key: &str) -> Result<bool> {
        check_key(key)?;
        let keys = crate::lease::Keys::for_value(self.redis_key(key));
        if self.cluster {
            // The cluster client sends a pipeline to one node without
            // following redirects inside it: two commands, each redirected.
            return self.run(|conn| {
                let existed: bool = redis::cmd("EXISTS").arg(&keys.value).query(conn)?;
                redis::cmd("DEL")
                    .arg(&[&keys.value, &keys.lease, &keys.writers])
                    .query::<i64>(conn)?;
                Ok(existed)
            });
        }
        // One round trip (not a transaction: EXISTS only informs the return
        // value; the DEL is the same one command the engine sends).
        let (existed, _): (bool, i64) = self.run(|conn| {
            redis::pipe()
                .exists(&keys.value)
                .del(&[&keys.value, &keys.lease, &keys.writers])
                .query(conn)
        })?;
        Ok(existed)
    }

    /// True if `key` holds a value (or an absent marker).
    ///
    /// # Errors
    /// [`ErrorKind::InvalidArgument`] for an empty key or one holding `{`
    /// or `}`; cache errors and timeouts.
    pub fn exists(&self, key: &str) -> Result<bool> {
        check_key(key)?;
        let redis_key = self.redis_key(key);
        self.run(|conn| redis::cmd("EXISTS").arg(&redis_key).query(conn))
    }

    /// Deletes every key of this namespace (values and their side keys) and
    /// returns how many it deleted. Meant for tests and demos that own their
    /// namespace. It matches `namespace{*` — every key of ours starts with
    /// the namespace and then the `{` of its hash tag — so the keys of a
    /// namespace that merely starts with the same text (`app:` and
    /// `app:v2:`) are left alone. It refuses the empty namespace, which
    /// would mean every key of the database that has a hash tag first.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidArgument`] for the empty namespace; cache errors
    /// and timeouts.
    pub fn delete_namespace(&self) -> Result<u64> {
        if self.namespace.is_empty() {
            return Err(Error::invalid_argument(
                "refusing to delete the empty namespace (that is the whole database)",
            ));
        }
        self.delete_in_namespace("", &|_| true)
    }

    /// Deletes the keys of this namespace whose key starts with
    /// `key_prefix` (`namespace{key_prefix*`, also for the empty namespace)
    /// that `pick` chooses, by their Redis names.
    pub(crate) fn delete_in_namespace(
        &self,
        key_prefix: &str,
        pick: &dyn Fn(&str) -> bool,
    ) -> Result<u64> {
        let pattern = format!(
            "{}{{{}*",
            escape_glob(&self.namespace),
            escape_glob(key_prefix)
        );
        // SCAN is not one command: run it on a connection of its own, with
        // no retry (a restart mid-scan just means fewer keys to delete).
        let mut conn = self.pool.get("cache")?;
        if let RedisConnection::Cluster(cluster) = &mut *conn {
            return Ok(delete_matching_in_cluster(cluster, &pattern, pick)?);
        }
        let mut keys: Vec<String> = conn
            .scan_match::<_, String>(&pattern)
            .and_then(|keys| keys.collect::<redis::RedisResult<_>>())?;
        keys.retain(|key| pick(key));
        let mut deleted = 0;
        for chunk in keys.chunks(500) {
            deleted += redis::cmd("UNLINK").arg(chunk).query::<u64>(&mut *conn)?;
        }
        Ok(deleted)
    }

    /// Runs `f` on a pooled connection: an escape hatch for commands this
    /// type does not wrap. Keys you build yourself should use
    /// [`Cache::redis_key`]. On a Redis Cluster each command goes to the
    /// node of its first key; a pipeline goes to one node whole, so keep
    /// its keys in one slot. If the connection turns out dropped (Redis
    /// restarted), `f` runs once more on a fresh one, so it must be safe to
    /// run twice.
    ///
    /// # Errors
    /// What `f` returns, and pool timeouts.
    pub fn with_connection<T>(
        &self,
        f: impl FnMut(&mut RedisConnection) -> redis::RedisResult<T>,
    ) -> Result<T> {
        self.run(f)
    }

    #[cfg(feature = "test-hooks")]
    pub(crate) fn set_raw(&self, redis_key: &str, raw: &[u8], ttl: Duration) -> Result<()> {
        self.run(|conn| {
            redis::cmd("SET")
                .arg(redis_key)
                .arg(raw)
                .arg("PX")
                .arg(millis(ttl))
                .query(conn)
        })
    }

    pub(crate) fn get_raw(&self, redis_key: &str) -> Result<Option<Vec<u8>>> {
        self.run(|conn| redis::cmd("GET").arg(redis_key).query(conn))
    }

    /// One `GET` of a value key, telling a value of another type (a list,
    /// a set: never ours) from a failure.
    pub(crate) fn lookup(&self, redis_key: &str) -> Result<Raw> {
        self.run(|conn| match redis::cmd("GET").arg(redis_key).query(conn) {
            Ok(Some(bytes)) => Ok(Raw::Bytes(bytes)),
            Ok(None) => Ok(Raw::Missing),
            Err(err) if err.code() == Some("WRONGTYPE") => Ok(Raw::Foreign),
            Err(err) => Err(err),
        })
    }

    /// Runs `f`; if its pooled connection was dropped by the server, marks
    /// all pooled connections dead and runs `f` once more on a fresh one.
    pub(crate) fn run<T>(
        &self,
        mut f: impl FnMut(&mut RedisConnection) -> redis::RedisResult<T>,
    ) -> Result<T> {
        let mut conn = self.pool.get("cache")?;
        match f(&mut conn) {
            Err(err) if dropped(&err) => {
                self.pool.discard_all();
                drop(conn);
                let mut fresh = self.pool.fresh()?;
                Ok(f(&mut fresh)?)
            }
            Err(err) => {
                if err.is_timeout() {
                    // The reply may still come: never reuse this connection.
                    conn.discard();
                }
                Err(err.into())
            }
            Ok(value) => Ok(value),
        }
    }

    /// A connection of its own (outside the pool) whose reads may wait
    /// `read_timeout`: for a blocking command (`XREADGROUP ... BLOCK`) that
    /// must not hold a pooled connection, and whose wait would exceed the
    /// pool's read timeout. Connect and writes keep `cache_timeout`.
    pub(crate) fn dedicated(&self, read_timeout: Duration) -> Result<Conn<RedisConnector>> {
        let conn = self.pool.fresh_with(|connector| connector.connect())?;
        conn.set_read_timeout(Some(read_timeout))
            .map_err(classify)?;
        Ok(conn)
    }

    /// Connections open now (idle or in use).
    pub fn open_connections(&self) -> u32 {
        self.pool.open_connections()
    }
}

/// A client for one server at `url`, trusting `config.redis_ca_file` for
/// a `rediss://` URL when it is set.
pub(crate) fn single_client(config: &Config, url: &str) -> Result<redis::Client> {
    let client = match tls_certificates(config)? {
        Some(certs) => redis::Client::build_with_tls(url, certs),
        None => redis::Client::open(url),
    };
    client.map_err(|e| Error::invalid_argument("redis URL does not parse").with_source(e))
}

/// The CA certificates of `config.redis_ca_file`, if one is named.
fn tls_certificates(config: &Config) -> Result<Option<redis::TlsCertificates>> {
    let Some(path) = &config.redis_ca_file else {
        return Ok(None);
    };
    let pem = std::fs::read(path).map_err(|e| {
        Error::invalid_argument(format!("cannot read redis_ca_file {}", path.display()))
            .with_source(e)
    })?;
    Ok(Some(redis::TlsCertificates {
        client_tls: None,
        root_cert: Some(pem),
    }))
}

/// How many times a cluster command is retried (redirects included).
const CLUSTER_RETRIES: u32 = 8;

/// Rejects a key that would break the hash tag [`Cache::redis_key`] wraps
/// it in: an empty one, or one holding `{` or `}` (the side keys of such an
/// entry could land in another cluster slot than its value). The same rule
/// holds on a single server, so data and code move to a cluster unchanged.
pub(crate) fn check_key(key: &str) -> Result<()> {
    if key.is_empty() {
        return Err(Error::invalid_argument("cache key must not be empty"));
    }
    if key.contains(['{', '}']) {
        return Err(Error::invalid_argument(format!(
            "cache key {key:?} may not contain '{{' or '}}' (they delimit the Redis Cluster hash tag)"
        )));
    }
    Ok(())
}

/// A connection to Redis: to one server, or to a Redis Cluster.
///
/// What [`Cache::with_connection`] hands its closure; it implements
/// [`redis::ConnectionLike`], so `redis::cmd(...).query(conn)` and scripts
/// work on either. On a cluster, each command goes to the node that owns
/// its first key's slot (following `MOVED` and `ASK`), and a pipeline goes
/// whole to the node of its first command's key.
#[non_exhaustive]
pub enum RedisConnection {
    /// One Redis server.
    Single(Connection),
    /// A Redis Cluster: one connection per node, opened as needed. (Boxed:
    /// it is four times the size of a single connection.)
    Cluster(Box<ClusterConnection>),
}

impl RedisConnection {
    /// The connection to the one server; `None` on a cluster (pub/sub and
    /// client tracking need one node's connection).
    pub(crate) fn single(&mut self) -> Option<&mut Connection> {
        match self {
            RedisConnection::Single(c) => Some(c),
            RedisConnection::Cluster(_) => None,
        }
    }

    fn set_read_timeout(&self, timeout: Option<Duration>) -> RedisResult<()> {
        match self {
            RedisConnection::Single(c) => c.set_read_timeout(timeout),
            RedisConnection::Cluster(c) => c.set_read_timeout(timeout),
        }
    }
}

impl ConnectionLike for RedisConnection {
    fn req_packed_command(&mut self, cmd: &[u8]) -> RedisResult<Value> {
        match self {
            RedisConnection::Single(c) => c.req_packed_command(cmd),
            RedisConnection::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands(
        &mut self,
        cmd: &[u8],
        offset: usize,
        count: usize,
    ) -> RedisResult<Vec<Value>> {
        match self {
            RedisConnection::Single(c) => c.req_packed_commands(cmd, offset, count),
            RedisConnection::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn req_command(&mut self, cmd: &Cmd) -> RedisResult<Value> {
        match self {
            RedisConnection::Single(c) => c.req_command(cmd),
            RedisConnection::Cluster(c) => match single_slot_route(cmd) {
                Some(route) => c.route_command(cmd, route),
                None => c.req_command(cmd),
            },
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConnection::Single(c) => c.get_db(),
            RedisConnection::Cluster(c) => c.get_db(),
        }
    }

    /// True for a cluster too (whose own connection says false): a pipeline
    /// is sent whole to the node of its first command's key, which is right
    /// for the pipelines of this crate (one slot each, or split in cluster
    /// mode).
    fn supports_pipelining(&self) -> bool {
        true
    }

    fn check_connection(&mut self) -> bool {
        match self {
            RedisConnection::Single(c) => c.check_connection(),
            RedisConnection::Cluster(c) => c.check_connection(),
        }
    }

    fn is_open(&self) -> bool {
        match self {
            RedisConnection::Single(c) => c.is_open(),
            RedisConnection::Cluster(c) => c.is_open(),
        }
    }
}

/// Multi-key commands the cluster client splits by slot. It sends the parts
/// straight to the nodes its slot map names, without following `MOVED` or
/// `ASK`: after a slot migration such a `DEL` fails (and an invalidation
/// with it), so one whose keys share a slot is routed as one command to
/// that slot, which does follow redirects.
const SPLIT_BY_SLOT: [&[u8]; 5] = [b"DEL", b"UNLINK", b"EXISTS", b"MGET", b"TOUCH"];

/// The route of `cmd` when it is one of [`SPLIT_BY_SLOT`] and all its keys
/// share a slot; `None` otherwise (the cluster client routes it).
fn single_slot_route(cmd: &Cmd) -> Option<RoutingInfo> {
    let mut args = cmd.args_iter();
    let redis::Arg::Simple(name) = args.next()? else {
        return None;
    };
    if !SPLIT_BY_SLOT.iter().any(|c| name.eq_ignore_ascii_case(c)) {
        return None;
    }
    let mut slot = None;
    for arg in args {
        let redis::Arg::Simple(key) = arg else {
            return None;
        };
        let this = key_slot(key);
        if slot.is_some_and(|s| s != this) {
            return None;
        }
        slot = Some(this);
    }
    Some(RoutingInfo::SingleNode(
        SingleNodeRoutingInfo::SpecificNode(Route::new(slot?, SlotAddr::Master)),
    ))
}

/// The Redis Cluster hash slot of `key`: CRC16 (XMODEM) of its hash tag
/// (the text between the first `{` and the next `}`, if not empty) or of
/// the whole key, modulo 16384.
pub(crate) fn key_slot(key: &[u8]) -> u16 {
    let hashed = key
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            let close = rest.iter().position(|&b| b == b'}')?;
            (close > 0).then(|| &rest[..close])
        })
        .unwrap_or(key);
    let mut crc: u16 = 0;
    for &byte in hashed {
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

/// Deletes the keys matching `pattern` on every master of a cluster (SCAN
/// walks one node's keys only); returns how many it deleted.
fn delete_matching_in_cluster(
    conn: &mut ClusterConnection,
    pattern: &str,
    pick: &dyn Fn(&str) -> bool,
) -> RedisResult<u64> {
    let masters = cluster_masters(conn)?;
    let mut deleted = 0;
    for (host, port) in masters {
        let route = || {
            RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                host: host.clone(),
                port,
            })
        };
        let mut cursor = 0u64;
        loop {
            let mut scan = redis::cmd("SCAN");
            scan.arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(500);
            let (next, keys): (u64, Vec<String>) =
                redis::from_redis_value(conn.route_command(&scan, route())?)?;
            for key in keys.iter().filter(|key| pick(key)) {
                // One key per command: keys of one node span many slots.
                deleted += redis::cmd("UNLINK").arg(key).query::<u64>(conn)?;
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
    }
    Ok(deleted)
}

/// The (host, port) of every master, from `CLUSTER SLOTS`.
fn cluster_masters(conn: &mut ClusterConnection) -> RedisResult<Vec<(String, u16)>> {
    let slots: Vec<Vec<Value>> = redis::cmd("CLUSTER").arg("SLOTS").query(conn)?;
    let mut masters: Vec<(String, u16)> = Vec::new();
    for range in slots {
        // [start, end, [host, port, id, ...], replicas...]
        let Some(master) = range.into_iter().nth(2) else {
            continue;
        };
        let node: Vec<Value> = redis::from_redis_value(master)?;
        let mut fields = node.into_iter();
        let (Some(host), Some(port)) = (fields.next(), fields.next()) else {
            continue;
        };
        let host: String = redis::from_redis_value(host)?;
        let port: u16 = redis::from_redis_value(port)?;
        if !masters.contains(&(host.clone(), port)) {
            masters.push((host, port));
        }
    }
    Ok(masters)
}

/// What a value key holds.
pub(crate) enum Raw {
    Missing,
    Bytes(Vec<u8>),
    /// Not a string: nothing of ours.
    Foreign,
}

/// True when the server closed the connection under us (a restart, a
/// proxy's reset): not a timeout, which may mean the server is frozen.
fn dropped(err: &redis::RedisError) -> bool {
    err.is_connection_dropped() && !err.is_connection_refusal() && !err.is_timeout()
}

/// What a Redis error means to a caller, and whether it says Redis is
/// unavailable (which the circuit breaker counts) rather than that one
/// command was wrong.
pub(crate) fn classify(err: redis::RedisError) -> Error {
    if err.is_timeout() {
        return Error::timeout("cache command").with_source(err).outage();
    }
    if err.kind() == redis::ErrorKind::AuthenticationFailed
        || matches!(err.code(), Some("WRONGPASS" | "NOAUTH" | "NOPERM"))
    {
        return Error::new(ErrorKind::Cache, "cache authentication failed")
            .with_source(err)
            .outage();
    }
    if err.code() == Some("OOM") {
        // Reads still work on a full Redis; only writes are refused.
        return Error::new(ErrorKind::Cache, "cache is out of memory").with_source(err);
    }
    if err.is_connection_refusal() {
        return Error::new(ErrorKind::Cache, "cache connection refused")
            .with_source(err)
            .outage();
    }
    if err.to_string().contains("invalid peer certificate") {
        // rustls's verdict, inside an I/O error: say what to do about it.
        return Error::new(
            ErrorKind::Cache,
            "cache TLS handshake failed: the server's certificate is not trusted \
             (Config::redis_ca_file names the CA that signed it)",
        )
        .with_source(err)
        .outage();
    }
    if err.is_io_error() || err.code() == Some("LOADING") {
        return Error::new(ErrorKind::Cache, "cache connection failed")
            .with_source(err)
            .outage();
    }
    Error::new(ErrorKind::Cache, "cache command failed").with_source(err)
}

pub(crate) fn millis(d: Duration) -> u64 {
    d.as_millis().clamp(1, u64::MAX as u128) as u64
}

/// Escapes the characters SCAN MATCH treats as a pattern.
fn escape_glob(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Opens Redis connections with one timeout on connect, reads and writes.
/// (The `redis` crate's own r2d2 manager sets none, and a synchronous
/// connection without them blocks forever on a hung server.)
pub(crate) struct RedisConnector {
    target: Target,
    timeout: Duration,
}

enum Target {
    Single(redis::Client),
    /// Built with the connect and response timeouts; the write timeout is
    /// set per connection.
    Cluster(ClusterClient),
}

impl Connector for RedisConnector {
    type Conn = RedisConnection;

    fn connect(&self) -> Result<RedisConnection> {
        match &self.target {
            Target::Single(client) => {
                let conn = client
                    .get_connection_with_timeout(self.timeout)
                    .map_err(classify)?;
                conn.set_read_timeout(Some(self.timeout))
                    .map_err(classify)?;
                conn.set_write_timeout(Some(self.timeout))
                    .map_err(classify)?;
                Ok(RedisConnection::Single(conn))
            }
            Target::Cluster(client) => {
                // Connects to the seed nodes and reads the slot map.
                let conn = client.get_connection().map_err(classify)?;
                conn.set_write_timeout(Some(self.timeout))
                    .map_err(classify)?;
                Ok(RedisConnection::Cluster(Box::new(conn)))
            }
        }
    }

    fn is_broken(&self, conn: &mut RedisConnection) -> bool {
        !conn.is_open()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_slots_are_redis_cluster_slots() {
        // Values from the Redis Cluster specification and CLUSTER KEYSLOT.
        assert_eq!(key_slot(b"123456789"), 0x31C3);
        assert_eq!(key_slot(b"somekey"), 11058);
        assert_eq!(key_slot(b"foo{hash_tag}"), 2515);
        assert_eq!(key_slot(b"ns:{user:1}:lease"), key_slot(b"user:1"));
        assert_ne!(
            key_slot(b"{}x"),
            key_slot(b"x"),
            "an empty tag hashes the whole key"
        );
    }

    #[test]
    fn multi_key_commands_of_one_slot_get_one_route() {
        let mut del = redis::cmd("DEL");
        del.arg("ns{k}").arg("ns{k}:lease").arg("ns{k}:writers");
        assert!(single_slot_route(&del).is_some());
        let mut spans = redis::cmd("DEL");
        spans.arg("{a}").arg("{b}");
        assert!(single_slot_route(&spans).is_none());
        assert!(single_slot_route(redis::cmd("GET").arg("{a}")).is_none());
    }

    #[test]
    fn globs_are_escaped() {
        assert_eq!(escape_glob("a*b?[c]\\"), "a\\*b\\?\\[c\\]\\\\");
    }
}
