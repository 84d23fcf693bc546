//! The public Redis API: a pool of connections with one timeout on
//! everything, namespaced keys, and JSON values. Connections, cluster
//! routing, TLS and error classification are [`crate::redis_conn`]'s.
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
//! - After a failover the same holds: a demoted master's `READONLY`, and on
//!   a cluster a dead node's refusal or a stale slot map, discard every
//!   pooled connection and run the command once more on a fresh one, which
//!   reads the topology anew; so the breaker's probe succeeds as soon as
//!   the cluster (or Sentinel) serves the slot again.
//! - Every key lives inside its namespace's hash tag ([`crate::keys`]), so
//!   on a Redis Cluster every command and script names keys of one slot.

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::config::{Config, check_ttl};
use crate::entry::{Entry, Payload};
#[cfg(doc)]
use crate::error::ErrorKind;
use crate::error::{Error, Result};
pub(crate) use crate::keys::check_key;
use crate::keys::{self, Keys, escape_glob, validate_namespace};
use crate::pool::{Conn, Connector, Pool};
use crate::redis_conn::{RedisConnection, RedisConnector, classify, dropped, millis, stale_route};
use crate::server_watch::ServerWatch;

/// A pooled Redis client whose keys all live under one namespace.
///
/// Every key `k` is stored as `{namespace}{k}` wrapped in a Redis Cluster
/// hash tag — `namespace + "{" + k + "}"` — so a value and its side keys
/// (`…:lease`, `…:lock`, `…:writers`) always share one slot. Values are JSON
/// in the crate's entry format (a short header line, then the JSON). Keys
/// starting `session:` or `rate_limit:`, and `write_behind`, belong to the
/// sessions, the rate limiter and write-behind: every method here (and
/// every engine call) refuses them with `InvalidArgument`.
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
    /// Which server the connections reach (shared with the connector).
    watch: Arc<ServerWatch>,
    /// A cluster or a Sentinel-named master: where a command goes can
    /// change under a live client (see [`stale_route`]).
    routed: bool,
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
        let cluster = config.is_redis_cluster();
        let connector = RedisConnector::new(config)?;
        let watch = Arc::clone(&connector.watch);
        Ok(Cache {
            watch,
            pool: Pool::new(
                connector,
                config.cache_pool_size,
                config.pool_min_idle,
                config.cache_timeout,
            ),
            namespace: config.namespace.as_str().into(),
            cluster,
            routed: cluster || config.is_redis_sentinel(),
        })
    }

    /// How many times the Redis server changed (restarted, failed over)
    /// since this cache opened; see [`crate::server_watch`].
    pub(crate) fn server_generation(&self) -> u64 {
        self.watch.generation()
    }

    /// Runs `callback` whenever a new connection finds another Redis server
    /// process than the last one, before that connection is used.
    pub(crate) fn on_server_change(&self, callback: Box<dyn Fn() + Send + Sync>) {
        self.watch.on_change(callback);
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
        keys::value_key(&self.namespace, key)
    }

    /// The Redis keys of `key`'s entry: its value and side keys.
    pub(crate) fn keys(&self, key: &str) -> Keys {
        Keys::for_value(self.redis_key(key))
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
                .map_err(|e| Error::corrupt(key, crate::error::json_error(&e))),
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
        let keys = self.keys(key);
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
        Ok(conn.unlink_matching(&pattern, pick)?)
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

    /// Runs `f`; if its pooled connection was dropped by the server, or the
    /// error says the topology changed (a failover: see
    /// [`stale_route`]), marks all pooled connections dead and runs `f`
    /// once more on a fresh one.
    pub(crate) fn run<T>(
        &self,
        mut f: impl FnMut(&mut RedisConnection) -> redis::RedisResult<T>,
    ) -> Result<T> {
        let mut conn = self.pool.get("cache")?;
        match f(&mut conn) {
            Err(err) if dropped(&err) || stale_route(&err, self.routed) => {
                // A restart, a failover or a moved slot: every pooled
                // connection shares the stale picture (a cluster
                // connection keeps its slot map, and keeps retrying a dead
                // master's address), so all of them go, and a fresh one
                // reads the topology anew.
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

    /// A Redis Cluster's slot ranges and the address of each one's master
    /// (`CLUSTER SLOTS`), sorted: `(first slot, last slot, host, port)`.
    pub(crate) fn slot_map(&self) -> Result<Vec<(u16, u16, String, u16)>> {
        let ranges: Vec<Vec<redis::Value>> =
            self.run(|conn| redis::cmd("CLUSTER").arg("SLOTS").query(conn))?;
        let mut map = Vec::new();
        for range in ranges {
            // [start, end, [host, port, id, ...], replicas...]
            let bound = |at: usize| match range.get(at) {
                Some(redis::Value::Int(n)) => u16::try_from(*n).ok(),
                _ => None,
            };
            if let (Some(start), Some(end), Some(redis::Value::Array(node))) =
                (bound(0), bound(1), range.get(2))
                && let [host, redis::Value::Int(port), ..] = node.as_slice()
                && let Ok(host) = redis::from_redis_value_ref::<String>(host)
                && let Ok(port) = u16::try_from(*port)
            {
                map.push((start, end, host, port));
            }
        }
        map.sort();
        Ok(map)
    }

    /// Connections open now (idle or in use).
    pub fn open_connections(&self) -> u32 {
        self.pool.open_connections()
    }
}

/// What a value key holds.
pub(crate) enum Raw {
    Missing,
    Bytes(Vec<u8>),
    /// Not a string: nothing of ours.
    Foreign,
}
