//! One Redis connection, to a single server or a Redis Cluster: opening it
//! with timeouts, TLS, cluster routing, and what a Redis error means. The
//! twin of [`crate::pg`]; [`crate::cache`] pools these.
//!
//! Guarantees:
//! - Connect, read and write are each bounded by `cache_timeout`: a
//!   synchronous connection without timeouts blocks forever on a hung
//!   server.
//! - On a cluster every command goes to the node of its keys' slot,
//!   following `MOVED` and `ASK`; a multi-key command that spans slots is
//!   split by slot; `TRYAGAIN` and `CLUSTERDOWN` are retried within a few
//!   `cache_timeout`s.
//! - Errors say what failed: a timeout is [`ErrorKind::Timeout`], a refused
//!   or dropped connection, an authentication failure or an out-of-memory
//!   Redis are [`ErrorKind::Cache`] with the cause in the message (never the
//!   password), and the ones that mean Redis is unavailable are marked as
//!   an outage, which the circuit breaker counts.

use std::sync::Arc;
use std::time::Duration;

use redis::cluster::{ClusterClient, ClusterClientBuilder, ClusterConnection};
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, Slot, SlotAddr};
use redis::{Cmd, Commands, Connection, ConnectionLike, RedisResult, Value};

use crate::config::{Config, SentinelUrl};
use crate::error::{Error, ErrorKind, Result};
use crate::pool::Connector;
use crate::server_watch::ServerWatch;

/// A client for one server at `url`, trusting `config.redis_ca_file` for
/// a `rediss://` URL when it is set.
pub(crate) fn single_client(config: &Config, url: &str) -> Result<redis::Client> {
    client_with(url, tls_certificates(config)?)
}

/// A client for the cluster node at `host:port`, with the first seed node's
/// credentials and TLS settings: for a connection that must reach one node
/// the slot map names (a sharded subscription, a near cache tracker). With
/// `resp3`, it hears the pushes a server sends unasked (`sunsubscribe` when
/// a slot moves).
pub(crate) fn node_client(
    config: &Config,
    host: &str,
    port: u16,
    resp3: bool,
) -> Result<redis::Client> {
    let seed = config.redis_nodes().first().copied().unwrap_or_default();
    let info = single_client(config, seed)?.get_connection_info().clone();
    let addr = match info.addr() {
        redis::ConnectionAddr::TcpTls { insecure, .. } => redis::ConnectionAddr::TcpTls {
            host: host.to_owned(),
            port,
            insecure: *insecure,
            tls_params: None,
        },
        _ => redis::ConnectionAddr::Tcp(host.to_owned(), port),
    };
    let protocol = if resp3 {
        redis::ProtocolVersion::RESP3
    } else {
        redis::ProtocolVersion::RESP2
    };
    let settings = info.redis_settings().clone().set_protocol(protocol);
    let info = info.set_addr(addr).set_redis_settings(settings);
    let client = match tls_certificates(config)? {
        Some(certs) => redis::Client::build_with_tls(info, certs),
        None => redis::Client::open(info),
    };
    client.map_err(|e| Error::invalid_argument("redis URL does not parse").with_source(e))
}

fn client_with(url: &str, certs: Option<redis::TlsCertificates>) -> Result<redis::Client> {
    let client = match certs {
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

/// A connection to Redis: to one server, or to a Redis Cluster.
///
/// What [`Cache::with_connection`](crate::Cache::with_connection) hands its closure; it implements
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
    /// Unlinks every key matching `pattern` (a SCAN pattern) that `pick`
    /// chooses, on every master of a cluster, and returns how many it
    /// removed. SCAN is not one
    /// command: run it on a connection of its own, with no retry (a restart
    /// mid-scan just means fewer keys to delete).
    pub(crate) fn unlink_matching(
        &mut self,
        pattern: &str,
        pick: &dyn Fn(&str) -> bool,
    ) -> RedisResult<u64> {
        let conn = match self {
            RedisConnection::Cluster(cluster) => {
                return delete_matching_in_cluster(cluster, pattern, pick);
            }
            RedisConnection::Single(conn) => conn,
        };
        let mut keys: Vec<String> = conn
            .scan_match::<_, String>(pattern)
            .and_then(|keys| keys.collect::<redis::RedisResult<_>>())?;
        keys.retain(|key| pick(key));
        let mut deleted = 0;
        for chunk in keys.chunks(500) {
            deleted += redis::cmd("UNLINK").arg(chunk).query::<u64>(conn)?;
        }
        Ok(deleted)
    }

    /// The connection to the one server; `None` on a cluster (pub/sub and
    /// client tracking need one node's connection).
    pub(crate) fn single(&mut self) -> Option<&mut Connection> {
        match self {
            RedisConnection::Single(c) => Some(c),
            RedisConnection::Cluster(_) => None,
        }
    }

    pub(crate) fn set_read_timeout(&self, timeout: Option<Duration>) -> RedisResult<()> {
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
        SingleNodeRoutingInfo::SpecificNode(Route::with_slot(slot?, SlotAddr::Master)),
    ))
}

/// The Redis Cluster hash slot of `key`: CRC16 (XMODEM) of its hash tag
/// (the text between the first `{` and the next `}`, if not empty) or of
/// the whole key, modulo 16384. redis-rs computes it (the same function
/// its cluster client routes with), so the two cannot disagree.
pub(crate) fn key_slot(key: &[u8]) -> Slot {
    Slot::for_key(key)
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

/// Scans every master of a cluster for keys matching `pattern`, handing
/// each page to `take` until it returns true (enough); the masters in a
/// random order, so that a sample does not always come from the first.
/// Returns the `SCAN` calls made.
pub(crate) fn scan_cluster(
    conn: &mut ClusterConnection,
    pattern: &str,
    take: &mut dyn FnMut(Vec<String>) -> bool,
) -> RedisResult<u64> {
    let mut masters = cluster_masters(conn)?;
    fastrand::shuffle(&mut masters);
    let mut calls = 0;
    for (host, port) in masters {
        let mut cursor = 0u64;
        loop {
            let mut scan = redis::cmd("SCAN");
            scan.arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(1000);
            let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                host: host.clone(),
                port,
            });
            let (next, keys): (u64, Vec<String>) =
                redis::from_redis_value(conn.route_command(&scan, route)?)?;
            calls += 1;
            if take(keys) {
                return Ok(calls);
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
    }
    Ok(calls)
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

/// True when the server closed the connection under us (a restart, a
/// proxy's reset): not a timeout, which may mean the server is frozen.
pub(crate) fn dropped(err: &redis::RedisError) -> bool {
    err.is_connection_dropped() && !err.is_connection_refusal() && !err.is_timeout()
}

/// True when `err` says the connection's picture of where the data lives
/// is out of date, rather than that Redis is unwell: a server that answers
/// `READONLY` was demoted to a replica (a failover, through Sentinel or a
/// cluster's own), and a `MOVED` or `CLUSTERDOWN` the cluster client's own
/// retries did not get past means its slot map is stale. On a cluster
/// (`routed`), a node that refuses or drops the connection, or a slot no
/// known node serves, means the same: the node died, and another one may
/// serve its slots now. The cure for all of them is a connection opened
/// anew, which reads the topology afresh ([`crate::cache`] retries once on
/// one). A timeout is not one of them: a frozen node would make every
/// fresh connection wait for it.
pub(crate) fn stale_route(err: &redis::RedisError, routed: bool) -> bool {
    if matches!(err.code(), Some("READONLY" | "MOVED" | "CLUSTERDOWN")) {
        return true;
    }
    routed
        && !err.is_timeout()
        && (err.is_io_error()
            || err.is_connection_refusal()
            || err.is_connection_dropped()
            || err.kind() == redis::ErrorKind::ClusterConnectionNotFound
            || (err.kind() == redis::ErrorKind::Client
                && err.to_string().to_ascii_lowercase().contains("slot")))
}

impl From<redis::RedisError> for Error {
    fn from(err: redis::RedisError) -> Self {
        classify(err)
    }
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

/// Opens Redis connections with one timeout on connect, reads and writes.
/// (The `redis` crate's own r2d2 manager sets none, and a synchronous
/// connection without them blocks forever on a hung server.)
pub(crate) struct RedisConnector {
    target: Target,
    timeout: Duration,
    /// Told which server each new connection reached.
    pub(crate) watch: Arc<ServerWatch>,
}

enum Target {
    Single(redis::Client),
    /// Built with the connect and response timeouts; the write timeout is
    /// set per connection.
    Cluster(ClusterClient),
    /// A master found through Redis Sentinel, asked anew for each
    /// connection.
    Sentinel(SentinelTarget),
}

/// The sentinels of one master name, and how to reach the master they name.
///
/// The lookup is ours, not the `redis` crate's `SentinelClient`: that one
/// connects to the sentinels and checks the master's role without any
/// timeout, so a frozen sentinel would hang every new connection (and the
/// pool's connector with it). Here each step is bounded by `cache_timeout`.
struct SentinelTarget {
    url: SentinelUrl,
    /// One client per sentinel, in the order of the URL.
    sentinels: Vec<redis::Client>,
    certs: Option<redis::TlsCertificates>,
}

impl SentinelTarget {
    fn new(config: &Config, url: SentinelUrl) -> Result<SentinelTarget> {
        let certs = tls_certificates(config)?;
        let sentinels = url
            .sentinels
            .iter()
            .map(|host| client_with(&url.sentinel(host), certs.clone()))
            .collect::<Result<_>>()?;
        Ok(SentinelTarget {
            url,
            sentinels,
            certs,
        })
    }

    /// A connection to the master the first answering sentinel names,
    /// checked with `ROLE` (a sentinel that has not yet seen a failover
    /// may name a demoted master: refused, and the next sentinel asked).
    fn connect(&self, timeout: Duration) -> Result<Connection> {
        let mut last = None;
        for sentinel in &self.sentinels {
            match self.master_from(sentinel, timeout) {
                Ok(conn) => return Ok(conn),
                Err(err) => last = Some(err),
            }
        }
        Err(last.unwrap_or_else(|| Error::invalid_argument("no sentinel in redis_url")))
    }

    fn master_from(&self, sentinel: &redis::Client, timeout: Duration) -> Result<Connection> {
        let mut ask = sentinel
            .get_connection_with_timeout(timeout)
            .map_err(classify)?;
        ask.set_read_timeout(Some(timeout)).map_err(classify)?;
        ask.set_write_timeout(Some(timeout)).map_err(classify)?;
        let addr: Option<(String, u16)> = redis::cmd("SENTINEL")
            .arg("GET-MASTER-ADDR-BY-NAME")
            .arg(&self.url.master_name)
            .query(&mut ask)
            .map_err(classify)?;
        let Some((host, port)) = addr else {
            return Err(Error::new(
                ErrorKind::Cache,
                format!(
                    "the sentinel knows no master named {:?}",
                    self.url.master_name
                ),
            )
            .outage());
        };
        let master = client_with(&self.url.master(&host, port), self.certs.clone())?;
        let mut conn = open_with_timeouts(&master, timeout)?;
        let role: Vec<Value> = redis::cmd("ROLE").query(&mut conn).map_err(classify)?;
        let is_master = matches!(
            role.first(),
            Some(Value::BulkString(b)) if b.as_slice() == b"master"
        ) || matches!(role.first(), Some(Value::SimpleString(s)) if s == "master");
        if !is_master {
            return Err(Error::new(
                ErrorKind::Cache,
                format!(
                    "the sentinel names {host}:{port} as master {:?}, but it is not a master (yet)",
                    self.url.master_name
                ),
            )
            .outage());
        }
        Ok(conn)
    }
}

/// A connection of `client` with `timeout` on connect, reads and writes.
fn open_with_timeouts(client: &redis::Client, timeout: Duration) -> Result<Connection> {
    let conn = client
        .get_connection_with_timeout(timeout)
        .map_err(classify)?;
    conn.set_read_timeout(Some(timeout)).map_err(classify)?;
    conn.set_write_timeout(Some(timeout)).map_err(classify)?;
    Ok(conn)
}

impl RedisConnector {
    /// The connector for `config.redis_url`: one server, a cluster when
    /// the URL lists several nodes, or the master Redis Sentinel names for
    /// a `redis+sentinel://` URL.
    pub(crate) fn new(config: &Config) -> Result<RedisConnector> {
        let timeout = config.cache_timeout;
        let target = if let Some(url) = config.sentinel_url()? {
            Target::Sentinel(SentinelTarget::new(config, url)?)
        } else if config.is_redis_cluster() {
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
        Ok(RedisConnector {
            target,
            timeout,
            watch: Arc::default(),
        })
    }
}

impl Connector for RedisConnector {
    type Conn = RedisConnection;

    fn connect(&self) -> Result<RedisConnection> {
        match &self.target {
            Target::Single(client) => {
                let mut conn = open_with_timeouts(client, self.timeout)?;
                self.watch.observe(&mut conn);
                Ok(RedisConnection::Single(conn))
            }
            Target::Sentinel(sentinels) => {
                let mut conn = sentinels.connect(self.timeout)?;
                self.watch.observe(&mut conn);
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
        let slot = |n| Slot::new(n).expect("a slot number");
        assert_eq!(key_slot(b"123456789"), slot(0x31C3));
        assert_eq!(key_slot(b"somekey"), slot(11058));
        assert_eq!(key_slot(b"foo{hash_tag}"), slot(2515));
        assert_eq!(key_slot(b"ns:{user:1}:lease"), key_slot(b"user:1"));
        assert_ne!(
            key_slot(b"{}x"),
            key_slot(b"x"),
            "an empty tag hashes the whole key"
        );
    }

    fn server_error(reply: &[u8]) -> redis::RedisError {
        redis::parse_redis_value(reply)
            .and_then(Value::extract_error)
            .expect_err("an error reply")
    }

    #[test]
    fn a_demoted_masters_readonly_is_a_stale_route_anywhere() {
        let readonly = server_error(b"-READONLY You can't write against a read only replica.\r\n");
        assert!(stale_route(&readonly, false), "one server (DNS failover)");
        assert!(stale_route(&readonly, true));
        let moved = server_error(b"-MOVED 3999 127.0.0.1:6381\r\n");
        assert!(stale_route(&moved, true));
        let refused =
            redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert!(stale_route(&refused, true), "a dead node of a cluster");
        assert!(!stale_route(&refused, false), "one server: just down");
        let timeout = redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut));
        assert!(
            !stale_route(&timeout, true),
            "a frozen node is no new topology"
        );
        let wrong = server_error(b"-WRONGTYPE Operation against a key\r\n");
        assert!(!stale_route(&wrong, true));
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
}
