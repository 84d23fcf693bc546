//! Redis: a pool of connections with timeouts, namespaced keys, JSON values,
//! and the Lua scripts that make leases and the rebuild lock atomic.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use r2d2::ManageConnection;
use redis::{Commands, Connection, ConnectionLike, Script, Value};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::config::{Config, validate_namespace};
use crate::entry::{Entry, Payload};
use crate::error::{Error, Result, pool_timeout};

/// A pooled Redis client whose keys all live under one namespace.
///
/// Every key `k` is stored as `{namespace}{k}` wrapped in a Redis Cluster
/// hash tag — `namespace + "{" + k + "}"` — so a value, its lease and its
/// rebuild lock (`…:lease`, `…:lock`) always share one slot. Values are
/// JSON in the crate's entry format (a short header line, then the JSON).
///
/// Cheap to clone; every method blocks and is safe from many threads. Each
/// command is bounded by the connect and I/O timeouts of the [`Config`].
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
    pool: r2d2::Pool<RedisManager>,
    namespace: Arc<str>,
}

/// The Redis keys that belong to one cache key.
pub(crate) struct Keys {
    pub value: String,
    /// The reader holding the right to fill the value (one token).
    pub lease: String,
    /// The cross-process rebuild lock (one token).
    pub lock: String,
    /// Write-through writers in progress (a set of tokens).
    pub writers: String,
}

impl Keys {
    /// The side keys of a value key (a hit needs only the value key, so the
    /// read path builds these on a miss).
    pub fn for_value(value: String) -> Keys {
        Keys {
            lease: format!("{value}:lease"),
            lock: format!("{value}:lock"),
            writers: format!("{value}:writers"),
            value,
        }
    }
}

/// What [`Cache::acquire`] found or got.
pub(crate) enum Acquired {
    /// The value is (now) cached: raw entry bytes.
    Cached(Vec<u8>),
    /// We hold the lease (and, if asked for, the rebuild lock).
    Granted,
    /// Another reader holds the lease or the lock.
    Busy,
}

/// What [`Cache::acquire`] asks for.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Claim {
    /// A lease, unless someone already holds one (plain cache-aside miss).
    Lease,
    /// The rebuild lock and, with it, the lease (single-flight miss).
    Lock,
    /// The rebuild lock even though a value is cached (early refresh).
    Refresh,
    /// The lease, taken over from whoever holds it, without the lock: a
    /// reader that waited `lock_wait` for another process loads itself, and
    /// still fills only through a lease.
    Takeover,
}

impl Cache {
    /// Opens the pool (and its first idle connection) for `config.redis_url`.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidArgument`](crate::ErrorKind) for an unparsable URL
    /// or namespace; [`ErrorKind::Timeout`](crate::ErrorKind) when no
    /// connection could be made within `pool_timeout`.
    pub fn connect(config: &Config) -> Result<Cache> {
        validate_namespace(&config.namespace)?;
        let client = redis::Client::open(config.redis_url.as_str())
            .map_err(|e| Error::invalid_argument("redis URL").with_source(e))?;
        let manager = RedisManager {
            client,
            connect_timeout: config.connect_timeout,
            io_timeout: config.cache_io_timeout,
        };
        let pool = r2d2::Pool::builder()
            .max_size(config.cache_pool_size)
            .min_idle(Some(config.pool_min_idle.min(config.cache_pool_size)))
            .connection_timeout(config.pool_timeout)
            // A PING per checkout would double the cost of a cache hit. A
            // broken connection fails its command (an error the caller sees
            // once) and `has_broken` keeps it out of the pool afterwards.
            .test_on_check_out(false)
            .build(manager)
            .map_err(|e| pool_timeout("cache", e))?;
        Ok(Cache {
            pool,
            namespace: config.namespace.as_str().into(),
        })
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

    pub(crate) fn keys(&self, key: &str) -> Keys {
        Keys::for_value(self.redis_key(key))
    }

    /// Reads `key` and decodes its JSON value; `Ok(None)` when it is not
    /// cached or is cached as absent.
    ///
    /// # Errors
    /// [`ErrorKind::CorruptEntry`](crate::ErrorKind) when the stored bytes do
    /// not decode as `T` (the engine's read paths instead treat such an entry
    /// as a miss and delete it); cache errors and timeouts.
    pub fn get_json<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>> {
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
    /// [`ErrorKind::InvalidArgument`](crate::ErrorKind) for a TTL under 1 ms or
    /// a value that does not serialize; cache errors and timeouts.
    pub fn set_json<T: Serialize + ?Sized>(
        &self,
        key: &str,
        value: &T,
        ttl: Duration,
    ) -> Result<()> {
        let ttl_ms = ttl_millis(ttl)?;
        let json = serde_json::to_vec(value).map_err(|e| {
            Error::invalid_argument("value does not serialize to JSON").with_source(e)
        })?;
        let raw = Entry::new(Payload::Value(&json), 0, Duration::ZERO, ttl).encode();
        self.run(|conn| {
            redis::cmd("SET")
                .arg(self.redis_key(key))
                .arg(raw)
                .arg("PX")
                .arg(ttl_ms)
                .query(conn)
        })
    }

    /// Deletes `key`'s value and revokes every lease on it (readers' and
    /// write-through writers'), atomically; true if a value was there.
    ///
    /// # Errors
    /// Cache errors and timeouts.
    pub fn delete(&self, key: &str) -> Result<bool> {
        let keys = self.keys(key);
        let (value_deleted, _revoked): (bool, u32) = self.run(|conn| {
            redis::pipe()
                .atomic()
                .del(&keys.value)
                .del(&[&keys.lease, &keys.writers])
                .query(conn)
        })?;
        Ok(value_deleted)
    }

    /// True if `key` holds a value (or an absent marker).
    ///
    /// # Errors
    /// Cache errors and timeouts.
    pub fn exists(&self, key: &str) -> Result<bool> {
        self.run(|conn| redis::cmd("EXISTS").arg(self.redis_key(key)).query(conn))
    }

    /// Deletes every key under this namespace (values, leases and locks) and
    /// returns how many it deleted. Meant for tests and demos that own their
    /// namespace; it refuses the empty namespace, which would mean every key
    /// of the database.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidArgument`](crate::ErrorKind) for the empty
    /// namespace; cache errors and timeouts.
    pub fn delete_namespace(&self) -> Result<u64> {
        if self.namespace.is_empty() {
            return Err(Error::invalid_argument(
                "refusing to delete the empty namespace (that is the whole database)",
            ));
        }
        let pattern = format!("{}*", escape_glob(&self.namespace));
        self.run(|conn| {
            let keys: Vec<String> = conn
                .scan_match::<_, String>(&pattern)?
                .collect::<redis::RedisResult<_>>()?;
            let mut deleted = 0;
            for chunk in keys.chunks(500) {
                deleted += redis::cmd("UNLINK").arg(chunk).query::<u64>(conn)?;
            }
            Ok(deleted)
        })
    }

    /// Runs `f` on a pooled connection: an escape hatch for commands this
    /// type does not wrap. Keys you build yourself should use
    /// [`Cache::redis_key`].
    ///
    /// # Errors
    /// What `f` returns, and pool timeouts.
    pub fn with_connection<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> redis::RedisResult<T>,
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

    /// Deletes a corrupt value, but only if it is still the bytes we read: a
    /// good value filled in the meantime must survive.
    pub(crate) fn delete_if_equal(&self, redis_key: &str, raw: &[u8]) -> Result<()> {
        self.run(|conn| {
            SCRIPTS
                .delete_if_equal
                .key(redis_key)
                .arg(raw)
                .invoke::<i64>(conn)
        })?;
        Ok(())
    }

    /// One round trip: returns the cached value if there is one, otherwise
    /// tries to take what `claim` asks for under `token`.
    pub(crate) fn acquire(
        &self,
        keys: &Keys,
        claim: Claim,
        token: &str,
        lease_ttl: Duration,
        lock_ttl: Duration,
    ) -> Result<Acquired> {
        let mode = match claim {
            Claim::Lease => "lease",
            Claim::Lock => "lock",
            Claim::Refresh => "refresh",
            Claim::Takeover => "takeover",
        };
        let reply: Value = self.run(|conn| {
            SCRIPTS
                .acquire
                .key(&keys.value)
                .key(&keys.lease)
                .key(&keys.lock)
                .arg(mode)
                .arg(token)
                .arg(millis(lease_ttl))
                .arg(millis(lock_ttl))
                .invoke(conn)
        })?;
        match reply {
            Value::BulkString(raw) => Ok(Acquired::Cached(raw)),
            Value::Int(1) => Ok(Acquired::Granted),
            Value::Int(0) => Ok(Acquired::Busy),
            other => Err(Error::new(
                crate::ErrorKind::Cache,
                format!("unexpected reply from the acquire script: {other:?}"),
            )),
        }
    }

    /// Stores `raw` if `token` still holds the lease, and releases the rebuild
    /// lock if `token` holds it; both in one atomic script. True if stored.
    pub(crate) fn fill(&self, keys: &Keys, token: &str, raw: &[u8], ttl: Duration) -> Result<bool> {
        self.run(|conn| {
            SCRIPTS
                .fill
                .key(&keys.value)
                .key(&keys.lease)
                .key(&keys.lock)
                .arg(token)
                .arg(raw)
                .arg(millis(ttl))
                .invoke(conn)
        })
    }

    /// Gives up `token`'s lease and lock, if it still holds them, without
    /// storing anything (the load failed).
    pub(crate) fn release(&self, keys: &Keys, token: &str) -> Result<()> {
        self.run(|conn| {
            SCRIPTS
                .release
                .key(&keys.lease)
                .key(&keys.lock)
                .arg(token)
                .invoke::<i64>(conn)
        })?;
        Ok(())
    }

    /// Registers a write-through writer before it writes the source, so an
    /// invalidation from another writer that commits later revokes it.
    pub(crate) fn register_writer(&self, keys: &Keys, token: &str, ttl: Duration) -> Result<()> {
        self.run(|conn| {
            redis::pipe()
                .atomic()
                .sadd(&keys.writers, token)
                .ignore()
                .pexpire(&keys.writers, millis(ttl) as i64)
                .ignore()
                .query::<()>(conn)
        })
    }

    /// Forgets a writer whose write did not happen.
    pub(crate) fn unregister_writer(&self, keys: &Keys, token: &str) -> Result<()> {
        self.run(|conn| {
            redis::cmd("SREM")
                .arg(&keys.writers)
                .arg(token)
                .query::<()>(conn)
        })
    }

    /// Stores `raw` (written to the source with `version`) if the writer
    /// `token` was not revoked by an invalidation and the cached entry is
    /// older; always revokes readers' leases, so no reader that started
    /// before this write can fill an older row afterwards. True if stored.
    pub(crate) fn write_through(
        &self,
        keys: &Keys,
        token: &str,
        raw: &[u8],
        version: u64,
        ttl: Duration,
    ) -> Result<bool> {
        self.run(|conn| {
            SCRIPTS
                .write_through
                .key(&keys.value)
                .key(&keys.lease)
                .key(&keys.writers)
                .arg(token)
                .arg(raw)
                .arg(version)
                .arg(millis(ttl))
                .invoke(conn)
        })
    }

    fn run<T>(&self, f: impl FnOnce(&mut Connection) -> redis::RedisResult<T>) -> Result<T> {
        let mut conn = self.pool.get().map_err(|e| pool_timeout("cache", e))?;
        Ok(f(&mut conn)?)
    }
}

fn millis(d: Duration) -> u64 {
    d.as_millis().clamp(1, u64::MAX as u128) as u64
}

pub(crate) fn ttl_millis(ttl: Duration) -> Result<u64> {
    if ttl.as_millis() == 0 {
        return Err(Error::invalid_argument("ttl must be at least 1 ms"));
    }
    Ok(millis(ttl))
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

/// The scripts, hashed once per process; `invoke` sends EVALSHA and falls
/// back to EVAL after a server restart forgot them.
struct Scripts {
    acquire: Script,
    fill: Script,
    release: Script,
    write_through: Script,
    delete_if_equal: Script,
}

static SCRIPTS: once_cell::sync::Lazy<Scripts> = once_cell::sync::Lazy::new(|| Scripts {
    // KEYS: value, lease, lock. ARGV: mode, token, lease_ms, lock_ms.
    // "lease": a lease only if nobody holds one, so of many plain readers
    // exactly one fills. "lock"/"refresh": the rebuild lock, and with it the
    // lease (taken over from any plain reader: the lock holder is the one
    // other processes wait for, so its fill must not be refused for that).
    // "takeover": the lease alone, from anyone. Taking a lease over is always
    // safe: it can only make an older reader's fill fail, never succeed.
    acquire: Script::new(
        r"
        if ARGV[1] ~= 'refresh' then
          local v = redis.call('GET', KEYS[1])
          if v then return v end
        end
        if ARGV[1] == 'lease' then
          if redis.call('SET', KEYS[2], ARGV[2], 'NX', 'PX', ARGV[3]) then return 1 end
          return 0
        end
        if ARGV[1] == 'takeover' then
          redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
          return 1
        end
        if redis.call('SET', KEYS[3], ARGV[2], 'NX', 'PX', ARGV[4]) then
          redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
          return 1
        end
        return 0
        ",
    ),
    // KEYS: value, lease, lock. ARGV: token, entry, ttl_ms.
    // The lease check is what drops a stale fill: an invalidation after our
    // read deleted the lease (or a newer reader replaced it).
    fill: Script::new(
        r"
        local stored = 0
        if redis.call('GET', KEYS[2]) == ARGV[1] then
          redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
          redis.call('DEL', KEYS[2])
          stored = 1
        end
        if redis.call('GET', KEYS[3]) == ARGV[1] then redis.call('DEL', KEYS[3]) end
        return stored
        ",
    ),
    // KEYS: lease, lock. ARGV: token. Compare-and-delete: a holder whose
    // lease or lock expired never deletes one that is now someone else's.
    release: Script::new(
        r"
        if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
        if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
        return 0
        ",
    ),
    // KEYS: value, lease, writers. ARGV: token, entry, version, ttl_ms.
    // The invariant: once a write has returned, no cached entry is older.
    // Versions order write-throughs among themselves and against fills. An
    // invalidation leaves no version to compare with, so the writer token
    // covers that case: if a plain update that may be newer invalidated the
    // key after this writer registered (revoking its token) and the key is
    // still empty, we cannot tell whose row is newer and store nothing. If
    // the key holds an older version, replacing it is right even then: that
    // entry was filled after the invalidation, so no newer committed write
    // is being overwritten. A writer that leaves the key empty revokes all
    // others: one of them may be older than this one, and must not fill the
    // empty key after this write returns (a newer one only loses a fill).
    write_through: Script::new(
        r"
        redis.call('DEL', KEYS[2])
        local registered = redis.call('SREM', KEYS[3], ARGV[1]) == 1
        local cur = redis.call('GET', KEYS[1])
        if cur then
          local v = tonumber(string.match(cur, '^ca1 %a (%d+) '))
          if v and v >= tonumber(ARGV[3]) then return 0 end
        elseif not registered then
          redis.call('DEL', KEYS[3])
          return 0
        end
        redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[4])
        return 1
        ",
    ),
    delete_if_equal: Script::new(
        r"
        if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
        return 0
        ",
    ),
});

/// Opens Redis connections with a connect timeout and read/write timeouts.
/// (The `redis` crate's own r2d2 manager sets none, and a synchronous
/// connection without them blocks forever on a hung server.)
struct RedisManager {
    client: redis::Client,
    connect_timeout: Duration,
    io_timeout: Duration,
}

impl ManageConnection for RedisManager {
    type Connection = Connection;
    type Error = redis::RedisError;

    fn connect(&self) -> redis::RedisResult<Connection> {
        let conn = self
            .client
            .get_connection_with_timeout(self.connect_timeout)?;
        conn.set_read_timeout(Some(self.io_timeout))?;
        conn.set_write_timeout(Some(self.io_timeout))?;
        Ok(conn)
    }

    fn is_valid(&self, conn: &mut Connection) -> redis::RedisResult<()> {
        redis::cmd("PING").query(conn)
    }

    fn has_broken(&self, conn: &mut Connection) -> bool {
        !conn.is_open()
    }
}

/// Tokens name one holder of a lease or lock: unique across processes (pid,
/// a random start) and within one (a counter).
pub(crate) fn new_token() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    static START: once_cell::sync::Lazy<u64> = once_cell::sync::Lazy::new(|| fastrand::u64(..));
    format!(
        "{}:{:x}:{}",
        std::process::id(),
        *START,
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_are_escaped() {
        assert_eq!(escape_glob("a*b?[c]\\"), "a\\*b\\?\\[c\\]\\\\");
    }

    #[test]
    fn tokens_are_unique() {
        assert_ne!(new_token(), new_token());
    }
}
