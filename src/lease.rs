//! The lease protocol: the Lua scripts that make every step atomic, and
//! their Rust wrappers. The keeper that renews what a live load holds is
//! [`crate::keeper`].
//!
//! The keys each script touches are laid out in [`crate::keys`].
//!
//! Guarantees, each kept by one script:
//! - A reader fills a key only while it holds its lease (`fill`); a write
//!   deletes the value, the lease and the writers in one command
//!   (`invalidate`), so a load that may have read the pre-write row can
//!   never cache it.
//! - Taking the rebuild lock never revokes a live loader's lease: the lock
//!   is taken only when neither lock nor lease is held (`acquire`). Only a
//!   reader that waited `lock_wait` takes a lease over.
//! - Side keys that are not ours (another type, or no TTL: ours always have
//!   one) are removed when a reader meets them, so a stray value cannot
//!   block fills or waiters for ever.
//! - Write-through stores the newest version whatever order writers finish
//!   in, never overwrites a newer plain update, and never brings back a row
//!   that a delete removed (`write_through`, whose comment has the cases).
//! - A write-behind change is readable from the moment it is enqueued until
//!   the source has it: the enqueue stores it as the value, revokes readers'
//!   leases and records it as the key's pending change (`write_behind`); a
//!   miss rebuilds the value from the pending change instead of loading the
//!   older row (`acquire`); no fill lands while it is pending (`fill`); and
//!   the pending change goes only once a worker has committed it, or
//!   dead-lettered it (`settle`), or a synchronous write of the key
//!   superseded it.
//! - A synchronous write (write-through, or a write followed by
//!   `invalidate`) supersedes the key's pending write-behind change: its
//!   record goes (`write_through`, `invalidate`), and a worker commits a
//!   change only if it is still the key's pending change and no registered
//!   writer is in progress, asked inside its transaction after its row
//!   locks are taken (`still_current`). So the change never lands over the
//!   synchronous write, and no read after that write returned gets it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use redis::{Script, Value};

use crate::cache::{Cache, Raw};
use crate::error::{Error, ErrorKind, Result};
pub(crate) use crate::keys::Keys;
use crate::redis_conn::{RedisConnection, millis};

/// Names one holder of a lease, lock or writer slot: unique across
/// processes (pid, a random start) and within one (a counter).
pub(crate) type Token = Arc<str>;

pub(crate) fn new_token() -> Token {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    static START: once_cell::sync::Lazy<u64> = once_cell::sync::Lazy::new(|| fastrand::u64(..));
    format!(
        "{}:{:x}:{}",
        std::process::id(),
        *START,
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
    .into()
}

/// What [`acquire`] asks for.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Claim {
    /// A lease, unless someone holds one (plain cache-aside miss).
    Lease,
    /// The rebuild lock and the lease, if neither is held (single-flight
    /// miss).
    Lock,
    /// As `Lock`, while a (still fresh) value is cached: early refresh.
    Refresh,
    /// The lease, taken over from whoever holds it: a reader that waited
    /// `lock_wait` loads itself, and still fills only through a lease.
    /// Taking a lease over can only make an older reader's fill fail.
    Takeover,
}

/// What [`acquire`] found or got.
pub(crate) enum Acquired {
    /// A value is cached and not past its logical expiry: raw entry bytes.
    Cached(Vec<u8>),
    /// We hold what we asked for.
    Granted,
    /// Another reader holds the lease or the lock.
    Busy,
}

/// The TTLs of what a load holds.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ttls {
    pub lease: Duration,
    pub lock: Duration,
}

/// One round trip: the cached value if there is a fresh one (logical expiry
/// after `now_ms`), else the key's pending write-behind change (stored again
/// as the value), else an attempt at what `claim` asks for under `token`.
pub(crate) fn acquire(
    cache: &Cache,
    keys: &Keys,
    claim: Claim,
    token: &str,
    ttls: Ttls,
    now_ms: u64,
) -> Result<Acquired> {
    let reply: Value =
        cache.run(|conn| acquire_call(keys, claim, token, ttls, now_ms).invoke(conn))?;
    acquired(reply)
}

/// [`acquire`] for many keys (each with its own token), pipelined: one
/// round trip on a single server, one per node (sent together) on a
/// cluster.
pub(crate) fn acquire_many(
    cache: &Cache,
    claims: &[(&Keys, &str)],
    claim: Claim,
    ttls: Ttls,
    now_ms: u64,
) -> Result<Vec<Acquired>> {
    let calls: Vec<_> = claims
        .iter()
        .map(|(keys, token)| acquire_call(keys, claim, token, ttls, now_ms))
        .collect();
    pipelined(cache, &SCRIPTS.acquire, &calls)?
        .into_iter()
        .map(acquired)
        .collect()
}

fn acquire_call<'a>(
    keys: &'a Keys,
    claim: Claim,
    token: &'a str,
    ttls: Ttls,
    now_ms: u64,
) -> redis::ScriptInvocation<'static> {
    let mode = match claim {
        Claim::Lease => "lease",
        Claim::Lock => "lock",
        Claim::Refresh => "refresh",
        Claim::Takeover => "takeover",
    };
    let mut call = SCRIPTS.acquire.key(&keys.value);
    call.key(&keys.lease)
        .key(&keys.lock)
        .key(&keys.pending)
        .arg(mode)
        .arg(token)
        .arg(millis(ttls.lease))
        .arg(millis(ttls.lock))
        .arg(now_ms);
    call
}

/// What the acquire script's reply means.
fn acquired(reply: Value) -> Result<Acquired> {
    match reply {
        Value::BulkString(raw) => Ok(Acquired::Cached(raw)),
        Value::Int(1) => Ok(Acquired::Granted),
        Value::Int(0) => Ok(Acquired::Busy),
        Value::ServerError(err) => Err(redis::RedisError::from(err).into()),
        other => Err(Error::new(
            ErrorKind::Cache,
            format!("unexpected reply from the acquire script: {other:?}"),
        )),
    }
}

/// A read that expects a miss, in one round trip: the value's `GET` and,
/// pipelined behind it, [`acquire`] of a [`Claim::Lease`] under `token`.
/// Both run whatever the `GET` finds; the acquire script takes nothing
/// while a fresh value is cached (it returns the value), so on a hit it
/// costs Redis a script run and the caller nothing. Returns what the `GET`
/// found (as [`Cache::lookup`]) and what the claim got, or the claim's own
/// error (then the caller claims again with the same `token`, which finds
/// what this one took).
pub(crate) fn lookup_and_lease(
    cache: &Cache,
    keys: &Keys,
    token: &str,
    ttls: Ttls,
    now_ms: u64,
) -> Result<(Raw, Result<Acquired>)> {
    let claim = acquire_call(keys, Claim::Lease, token, ttls, now_ms);
    let mut pipe = redis::pipe();
    // Each reply on its own: a `WRONGTYPE` of the GET is an answer.
    pipe.ignore_errors()
        .add_command(redis::cmd("GET").arg(&keys.value).clone())
        .invoke_script(&claim);
    // A server that has not seen the script yet (a restart, a promoted
    // replica) answers NOSCRIPT: as the claim's own reply on a single
    // server, as the whole pipeline's error on a cluster (whose pipelines
    // fail as one). Either way the claim runs once as `invoke` (EVALSHA,
    // then EVAL, which leaves the script on the key's node), and the
    // pipeline again; the same token finds what the first claim took.
    let claim_by_eval =
        |conn: &mut crate::redis_conn::RedisConnection| -> redis::RedisResult<Value> {
            claim.invoke(conn)
        };
    let (got, claimed): (Value, Value) = cache.run(|conn| match pipe.query(conn) {
        Ok((got, Value::ServerError(err))) if err.code() == "NOSCRIPT" => {
            Ok((got, claim_by_eval(conn)?))
        }
        Err(err) if names_error(&err, "NOSCRIPT") => {
            claim_by_eval(conn)?;
            pipe.query(conn)
        }
        replies => replies,
    })?;
    let raw = match got {
        Value::BulkString(bytes) => Raw::Bytes(bytes),
        Value::Nil => Raw::Missing,
        Value::ServerError(err) if err.code() == "WRONGTYPE" => Raw::Foreign,
        Value::ServerError(err) => return Err(redis::RedisError::from(err).into()),
        other => {
            return Err(Error::new(
                ErrorKind::Cache,
                format!("unexpected reply to GET: {other:?}"),
            ));
        }
    };
    Ok((raw, acquired(claimed)))
}

/// Runs `calls` of `script` pipelined: one round trip on a single server;
/// on a cluster one pipeline per node, all sent before any reply is read
/// (a command whose slot moved is retried on its own after the slot map is
/// read again).
///
/// A pipelined `EVALSHA` has no `EVAL` fallback. On a single server the
/// pipeline loads the script first (a no-op when Redis has it); a cluster
/// pipeline may not carry `SCRIPT LOAD`, so there a script Redis forgot (a
/// restart) is loaded on every master and the pipeline sent once more,
/// which the scripts allow (each is idempotent for its token, and a fill
/// that ran twice reports "not stored", the cautious answer).
fn pipelined(
    cache: &Cache,
    script: &Script,
    calls: &[redis::ScriptInvocation<'_>],
) -> Result<Vec<Value>> {
    let replies: Vec<Value> = cache.run(|conn| match conn {
        RedisConnection::Cluster(cluster) => {
            let mut pipe = redis::cluster::cluster_pipe();
            for call in calls {
                pipe.invoke_script(call);
            }
            match pipe.query(cluster) {
                Err(err) if names_error(&err, "NOSCRIPT") => {
                    script.load(conn)?;
                    let RedisConnection::Cluster(cluster) = conn else {
                        unreachable!("matched as a cluster above");
                    };
                    pipe.query(cluster)
                }
                replies => replies,
            }
        }
        conn => {
            let mut pipe = redis::pipe();
            pipe.ignore_errors();
            pipe.load_script(script).ignore();
            for call in calls {
                pipe.invoke_script(call);
            }
            pipe.query(conn)
        }
    })?;
    if replies.len() != calls.len() {
        return Err(Error::new(
            ErrorKind::Cache,
            "a pipelined script call got the wrong number of replies",
        ));
    }
    replies
        .into_iter()
        .map(|reply| match reply {
            Value::ServerError(err) => Err(redis::RedisError::from(err).into()),
            reply => Ok(reply),
        })
        .collect()
}

/// True when `err` (or, for a pipeline, one of its commands' errors) is the
/// server error `code`: a cluster pipeline's error lists its commands'
/// errors by kind name ("NoScript"), not by code.
pub(crate) fn names_error(err: &redis::RedisError, code: &str) -> bool {
    err.code() == Some(code) || err.to_string().to_ascii_uppercase().contains(code)
}

/// Stores `raw` for `ttl` if `token` still holds the lease and no
/// write-behind change of the key is pending, and releases the lease and the
/// lock if `token` holds them; one atomic script. True if stored.
pub(crate) fn fill(
    cache: &Cache,
    keys: &Keys,
    token: &str,
    raw: &[u8],
    ttl: Duration,
) -> Result<bool> {
    cache.run(|conn| fill_call(keys, token, raw, ttl).invoke(conn))
}

/// One key's fill for [`fill_many`]: its keys, its lease's token, the
/// entry, and its physical TTL.
pub(crate) type Fill<'a> = (&'a Keys, &'a str, &'a [u8], Duration);

/// [`fill`] for many keys, pipelined as [`acquire_many`]; true for each
/// one stored.
pub(crate) fn fill_many(cache: &Cache, fills: &[Fill<'_>]) -> Result<Vec<bool>> {
    let calls: Vec<_> = fills
        .iter()
        .map(|(keys, token, raw, ttl)| fill_call(keys, token, raw, *ttl))
        .collect();
    pipelined(cache, &SCRIPTS.fill, &calls)?
        .into_iter()
        .map(|reply| {
            redis::from_redis_value::<bool>(reply).map_err(|e| {
                Error::new(ErrorKind::Cache, "unexpected reply from the fill script").with_source(e)
            })
        })
        .collect()
}

fn fill_call(
    keys: &Keys,
    token: &str,
    raw: &[u8],
    ttl: Duration,
) -> redis::ScriptInvocation<'static> {
    let mut call = SCRIPTS.fill.key(&keys.value);
    call.key(&keys.lease)
        .key(&keys.lock)
        .key(&keys.pending)
        .arg(token)
        .arg(raw)
        .arg(millis(ttl));
    call
}

/// A conditional refresh found the row unchanged: re-stamps the cached
/// entry's load time and logical expiry with `entry`'s and sets its key's
/// TTL, inside Redis, so the value is not sent again. Only while `token`
/// holds the lease, no write-behind change is pending and the entry is
/// still at `entry`'s version; releases the lease and lock as [`fill`]
/// does. One atomic script; true if the entry was extended.
pub(crate) fn touch(
    cache: &Cache,
    keys: &Keys,
    token: &str,
    entry: &crate::entry::Entry<'_>,
    ttl: Duration,
) -> Result<bool> {
    cache.run(|conn| {
        TOUCH
            .key(&keys.value)
            .key(&keys.lease)
            .key(&keys.lock)
            .key(&keys.pending)
            .arg(token)
            .arg(entry.version)
            .arg(entry.load_us)
            .arg(entry.expires_at_ms)
            .arg(millis(ttl))
            .invoke(conn)
    })
}

/// KEYS: value, lease, lock, pending. ARGV: token, version, load_us,
/// expires_at_ms, ttl_ms. The checks are `fill`'s, and the entry must still
/// be the version the loader was told: a write-through of a newer one
/// since must not be re-stamped as the unchanged row.
static TOUCH: once_cell::sync::Lazy<Script> = once_cell::sync::Lazy::new(|| {
    Script::new(
        r"
        local stored = 0
        if redis.call('GET', KEYS[2]) == ARGV[1] then
          if redis.call('EXISTS', KEYS[4]) == 0 and redis.call('TYPE', KEYS[1]).ok == 'string' then
            local kind, v, rest =
              string.match(redis.call('GET', KEYS[1]), '^ca1 (%a) (%d+) %d+ %d+\n(.*)$')
            if kind and v == ARGV[2] then
              redis.call('SET', KEYS[1],
                'ca1 ' .. kind .. ' ' .. v .. ' ' .. ARGV[3] .. ' ' .. ARGV[4] .. '\n' .. rest,
                'PX', ARGV[5])
              stored = 1
            end
          end
          redis.call('DEL', KEYS[2])
        end
        if redis.call('GET', KEYS[3]) == ARGV[1] then redis.call('DEL', KEYS[3]) end
        return stored
        ",
    )
});

/// True if `token` still holds the lease (a read: a full Redis answers it).
pub(crate) fn holds(cache: &Cache, keys: &Keys, token: &str) -> Result<bool> {
    let holder: Option<String> =
        cache.run(|conn| redis::cmd("GET").arg(&keys.lease).query(conn))?;
    Ok(holder.as_deref() == Some(token))
}

/// Gives up `token`'s lease and lock, if it still holds them.
pub(crate) fn release(cache: &Cache, lease: &str, lock: &str, token: &str) -> Result<()> {
    cache.run(|conn| {
        SCRIPTS
            .release
            .key(lease)
            .key(lock)
            .arg(token)
            .invoke::<i64>(conn)
    })?;
    Ok(())
}

/// Extends `token`'s lease and lock (those it still holds) by their TTLs.
pub(crate) fn renew(cache: &Cache, lease: &str, lock: &str, token: &str, ttls: Ttls) -> Result<()> {
    cache.run(|conn| {
        SCRIPTS
            .renew
            .key(lease)
            .key(lock)
            .arg(token)
            .arg(millis(ttls.lease))
            .arg(millis(ttls.lock))
            .invoke::<i64>(conn)
    })?;
    Ok(())
}

/// Deletes a key's value and revokes its lease and every registered
/// writer: one command, so it costs at most one timeout, and Redis accepts
/// it even when it is out of memory (a delete is not refused).
///
/// It follows a write to the source, so it also supersedes the key's
/// pending write-behind change (enqueued before that write): its record
/// goes, readers load the newer row, and the workers skip the change
/// ([`still_current`]).
pub(crate) fn invalidate(cache: &Cache, keys: &Keys) -> Result<()> {
    cache.run(|conn| invalidate_cmd(keys).query::<i64>(conn))?;
    Ok(())
}

/// [`invalidate`] for many keys: a pipeline of one `DEL` per key (each
/// key's side keys share its slot), one round trip on a single server, one
/// per node (sent together) on a cluster.
pub(crate) fn invalidate_many(cache: &Cache, all: &[Keys]) -> Result<()> {
    cache.run(|conn| match conn {
        RedisConnection::Cluster(cluster) => {
            let mut pipe = redis::cluster::cluster_pipe();
            for keys in all {
                pipe.add_command(invalidate_cmd(keys)).ignore();
            }
            pipe.query::<()>(cluster)
        }
        conn => {
            let mut pipe = redis::pipe();
            for keys in all {
                pipe.add_command(invalidate_cmd(keys)).ignore();
            }
            pipe.query::<()>(conn)
        }
    })
}

fn invalidate_cmd(keys: &Keys) -> redis::Cmd {
    let mut del = redis::cmd("DEL");
    del.arg(&keys.value)
        .arg(&keys.lease)
        .arg(&keys.writers)
        .arg(&keys.floor)
        .arg(&keys.pending);
    del
}

/// What a write-behind worker does with a change it is about to commit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Still the key's pending change, and no synchronous write is in
    /// progress: commit it.
    Apply,
    /// No longer pending (a synchronous write superseded it, a newer change
    /// replaced it, or it was applied before): acknowledge it unwritten.
    Skip,
    /// A synchronous write of the key is in progress (a registered writer):
    /// roll back and try again once it has finished.
    Wait,
}

/// For each `(keys, seq)`, whether the change `seq` may be committed now,
/// in one round trip. A worker asks this inside its transaction, after its
/// writes took their row locks: a synchronous writer registers before its
/// own write (which then waits for those locks), and supersedes the
/// pending change after its commit, so a change whose verdict is
/// [`Verdict::Apply`] at this point cannot land over a synchronous write
/// that returned.
pub(crate) fn still_current(cache: &Cache, changes: &[(Keys, u64)]) -> Result<Vec<Verdict>> {
    let call = |keys: &Keys, seq: u64| {
        let mut call = SCRIPTS.still_current.key(&keys.pending);
        call.key(&keys.writers).arg(seq);
        call
    };
    let replies: Vec<i64> = if cache.is_cluster() {
        // The keys live in many slots, and a plain pipeline would go to one
        // node.
        let calls: Vec<(Vec<&str>, Vec<String>)> = changes
            .iter()
            .map(|(keys, seq)| {
                (
                    vec![keys.pending.as_str(), keys.writers.as_str()],
                    vec![seq.to_string()],
                )
            })
            .collect();
        cluster_calls(cache, &SCRIPTS.still_current, &calls)?
    } else {
        cache.run(|conn| {
            let mut pipe = redis::pipe();
            pipe.cmd("SCRIPT")
                .arg("LOAD")
                .arg(&SCRIPTS.still_current_code)
                .ignore();
            for (keys, seq) in changes {
                pipe.invoke_script(&call(keys, *seq));
            }
            pipe.query(conn)
        })?
    };
    if replies.len() != changes.len() {
        return Err(Error::new(
            ErrorKind::Cache,
            "unexpected reply from the still-current script",
        ));
    }
    Ok(replies
        .into_iter()
        .map(|r| match r {
            1 => Verdict::Apply,
            2 => Verdict::Wait,
            _ => Verdict::Skip,
        })
        .collect())
}

/// Registers a write-through writer before it writes the source, so an
/// invalidation that comes later revokes it.
pub(crate) fn register_writer(
    cache: &Cache,
    keys: &Keys,
    token: &str,
    ttl: Duration,
) -> Result<()> {
    cache.run(|conn| {
        SCRIPTS
            .register_writer
            .key(&keys.writers)
            .arg(token)
            .arg(millis(ttl))
            .invoke::<i64>(conn)
    })?;
    Ok(())
}

/// Forgets a writer whose write did not happen.
pub(crate) fn unregister_writer(cache: &Cache, keys: &Keys, token: &str) -> Result<()> {
    cache.run(|conn| {
        redis::cmd("SREM")
            .arg(&keys.writers)
            .arg(token)
            .query::<i64>(conn)
    })?;
    Ok(())
}

/// Stores a written row (`raw`, at `version`) unless that could leave the
/// cache older than a write that has returned; supersedes the key's pending
/// write-behind change; always revokes readers' leases. True if stored.
pub(crate) fn write_through(
    cache: &Cache,
    keys: &Keys,
    token: &str,
    raw: &[u8],
    version: u64,
    ttl: Duration,
) -> Result<bool> {
    cache.run(|conn| {
        SCRIPTS
            .write_through
            .key(&keys.value)
            .key(&keys.lease)
            .key(&keys.writers)
            .key(&keys.pending)
            .key(&keys.floor)
            .arg(token)
            .arg(raw)
            .arg(version)
            .arg(millis(ttl))
            .invoke(conn)
    })
}

/// The value of a write-behind change as its JSON will be stored: whole, or
/// with its sequence number spliced in between `head` and `tail` (so a
/// value can carry the number that orders it, e.g. a row's `version`).
#[derive(Clone, Copy, Debug)]
pub(crate) enum Json<'a> {
    Whole(&'a [u8]),
    Sequenced { head: &'a [u8], tail: &'a [u8] },
}

/// How long a key's last write-behind sequence number is kept after its
/// enqueue (`…:seq`), as a floor for the next: the pending record goes once
/// the change is in the source, and without a trace of its number a Redis
/// clock stepped back (a failover to a replica whose clock is behind) would
/// number the next change lower, and an applier's `WHERE seq < $seq` would
/// make its write a silent no-op. A step back longer than this on a key not
/// written behind since is not covered.
pub(crate) const SEQ_FLOOR_TTL: Duration = Duration::from_secs(24 * 60 * 60);

/// Where a write-behind change goes besides its key: the stream, and the
/// consumer group to create with it.
pub(crate) struct Stream<'a> {
    pub key: &'a str,
    pub group: &'a str,
    pub max_backlog: u64,
}

/// What [`write_behind`] did.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Enqueued {
    /// Stored, pending and on the stream: its sequence number and entry id.
    Taken { seq: u64, id: String },
    /// The stream holds `max_backlog` changes already: nothing was written.
    BacklogFull,
}

/// Enqueues a write-behind change in one script: the value is stored as
/// the key's entry (version = the change's sequence number), readers'
/// leases are revoked (a load that began earlier read the older row and
/// must not fill it), the change becomes the key's pending change, and it is
/// appended to the stream. Nothing happens when the backlog is full.
///
/// The sequence number is Redis's clock in microseconds, or one more than
/// the key's last (pending, cached, or kept in `…:seq` for
/// [`SEQ_FLOOR_TTL`]) sequence or `floor` when that is later, so it grows
/// per key even across a clock step back or a lost counter.
///
/// The change must be readable if and only if it will be written, and only
/// one script makes both true at once: so the stream is in the key's slot
/// on a Redis Cluster (one stream per slot, see `write_behind::shards`),
/// and the script runs on one node.
#[allow(clippy::too_many_arguments)]
pub(crate) fn write_behind(
    cache: &Cache,
    keys: &Keys,
    stream: &Stream<'_>,
    key: &str,
    json: Json<'_>,
    floor: u64,
    expires_at_ms: u64,
    ttl: Duration,
    physical: Duration,
) -> Result<Enqueued> {
    let (head, tail, sequenced): (&[u8], &[u8], &str) = match json {
        Json::Whole(json) => (json, b"", "0"),
        Json::Sequenced { head, tail } => (head, tail, "1"),
    };
    // A retry after a dropped connection may enqueue the change twice: the
    // second copy is newer and equal, so the flush writes it once.
    let reply: Value = cache.run(|conn| {
        SCRIPTS
            .write_behind
            .key(&keys.value)
            .key(&keys.lease)
            .key(&keys.pending)
            .key(stream.key)
            .key(&keys.seq)
            .arg(key)
            .arg(head)
            .arg(tail)
            .arg(sequenced)
            .arg(floor)
            .arg(expires_at_ms)
            .arg(millis(ttl))
            .arg(millis(physical))
            .arg(stream.max_backlog)
            .arg(stream.group)
            .arg(millis(SEQ_FLOOR_TTL))
            .invoke(conn)
    })?;
    let unexpected = |reply: &Value| {
        Error::new(
            ErrorKind::Cache,
            format!("unexpected reply from the write-behind script: {reply:?}"),
        )
    };
    match &reply {
        Value::Int(-1) => Ok(Enqueued::BacklogFull),
        Value::Array(parts) => match parts.as_slice() {
            [Value::BulkString(seq), Value::BulkString(id)] => {
                let seq = std::str::from_utf8(seq)
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| unexpected(&reply))?;
                let id = String::from_utf8(id.clone()).map_err(|_| unexpected(&reply))?;
                Ok(Enqueued::Taken { seq, id })
            }
            _ => Err(unexpected(&reply)),
        },
        _ => Err(unexpected(&reply)),
    }
}

/// How a write-behind change ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Settled {
    /// Committed to the source.
    Applied,
    /// Given up on (dead-lettered): the source does not have it.
    Dead,
}

/// After a worker committed (or dead-lettered) changes, one per key (`seq`
/// on `keys`), in one round trip: unless a newer change of the key is
/// pending, its pending record goes, and so does its cached value (so
/// readers load what the source now holds): for [`Settled::Applied`] only if
/// the value is not newer than `seq`, for [`Settled::Dead`] always, with the
/// lease. Idempotent: settling a change twice (a replay) changes nothing
/// the second time.
pub(crate) fn settle(cache: &Cache, changes: &[(Keys, u64)], how: Settled) -> Result<()> {
    let how = match how {
        Settled::Applied => "applied",
        Settled::Dead => "dead",
    };
    let call = |keys: &Keys, seq: u64| {
        let mut call = SCRIPTS.settle.key(&keys.value);
        call.key(&keys.lease).key(&keys.pending).arg(seq).arg(how);
        call
    };
    if cache.is_cluster() {
        let calls: Vec<(Vec<&str>, Vec<String>)> = changes
            .iter()
            .map(|(keys, seq)| {
                (
                    vec![
                        keys.value.as_str(),
                        keys.lease.as_str(),
                        keys.pending.as_str(),
                    ],
                    vec![seq.to_string(), how.to_owned()],
                )
            })
            .collect();
        cluster_calls::<Value>(cache, &SCRIPTS.settle, &calls)?;
        return Ok(());
    }
    cache.run(|conn| {
        let mut pipe = redis::pipe();
        // Pipelined EVALSHA has no EVAL fallback: load the script first.
        pipe.cmd("SCRIPT")
            .arg("LOAD")
            .arg(&SCRIPTS.settle_code)
            .ignore();
        for (keys, seq) in changes {
            pipe.invoke_script(&call(keys, *seq)).ignore();
        }
        pipe.query::<()>(conn)
    })
}

/// One call of `script` per entry of `calls` (its keys, then its
/// arguments; the keys of one call share a slot), on a Redis Cluster. They
/// go in one cluster pipeline of `EVALSHA` (a round trip per node); if that
/// fails (a node without the script yet, a moved slot, a dropped
/// connection), one call at a time, which loads the script and follows
/// redirects. So a call may run twice: every caller's script is read-only
/// or idempotent.
pub(crate) fn cluster_calls<T: redis::FromRedisValue>(
    cache: &Cache,
    script: &Script,
    calls: &[(Vec<&str>, Vec<String>)],
) -> Result<Vec<T>> {
    if calls.is_empty() {
        return Ok(Vec::new());
    }
    let piped: Option<Vec<T>> = cache.run(|conn| {
        let crate::redis_conn::RedisConnection::Cluster(cluster) = conn else {
            return Ok(None);
        };
        let mut pipe = redis::cluster::cluster_pipe();
        for (keys, args) in calls {
            pipe.cmd("EVALSHA")
                .arg(script.get_hash())
                .arg(keys.len())
                .arg(keys)
                .arg(args);
        }
        Ok(pipe.query::<Vec<T>>(cluster).ok())
    })?;
    if let Some(replies) = piped.filter(|r| r.len() == calls.len()) {
        return Ok(replies);
    }
    calls
        .iter()
        .map(|(keys, args)| {
            cache.run(|conn| {
                let mut call = script.prepare_invoke();
                for key in keys {
                    call.key(*key);
                }
                for arg in args {
                    call.arg(arg);
                }
                call.invoke(conn)
            })
        })
        .collect()
}

/// Applies changes the relay read from the outbox, in one round trip: each
/// as [`invalidate`], unless the cached entry is a row of the changed row's
/// version or newer (it was loaded or written after that change, so it
/// reflects it; and any lease held now was taken after it was filled, so
/// after the change too). With a version, write-through writers in progress
/// are not revoked but held to it: one that wrote this change (the relay
/// may be faster than the writer's own cache update) still stores it, an
/// older one cannot. A change without a version (a delete, or a table
/// without a version column) always invalidates.
pub(crate) fn relay_invalidate(cache: &Cache, changes: &[(Keys, Option<i64>)]) -> Result<()> {
    if cache.is_cluster() {
        // The changes' keys live in many slots, and the cluster client sends
        // a pipeline to one node: one script call each, each routed (and
        // redirected) on its own.
        for (keys, version) in changes {
            cache.run(|conn| relay_call(keys, *version).invoke::<()>(conn))?;
        }
        return Ok(());
    }
    cache.run(|conn| {
        let mut pipe = redis::pipe();
        // Pipelined EVALSHA has no EVAL fallback: load the script first (it
        // is a no-op when Redis has it).
        pipe.cmd("SCRIPT")
            .arg("LOAD")
            .arg(&SCRIPTS.relay_invalidate_code)
            .ignore();
        for (keys, version) in changes {
            pipe.invoke_script(&relay_call(keys, *version)).ignore();
        }
        pipe.query::<()>(conn)
    })
}

/// One change's script call, the same on a cluster and a single server:
/// the value, lease, writers, floor and pending keys (one slot: one hash
/// tag).
fn relay_call<'a>(keys: &'a Keys, version: Option<i64>) -> redis::ScriptInvocation<'a> {
    let mut call = SCRIPTS.relay_invalidate.key(&keys.value);
    call.key(&keys.lease)
        .key(&keys.writers)
        .key(&keys.floor)
        .key(&keys.pending)
        .arg(version.map_or(String::new(), |v| v.to_string()));
    call
}

/// Deletes a value that is not an entry of ours: one of another type, or a
/// string still equal to `raw` (a good value filled meanwhile survives).
pub(crate) fn discard(cache: &Cache, value_key: &str, raw: &[u8]) -> Result<()> {
    cache.run(|conn| SCRIPTS.discard.key(value_key).arg(raw).invoke::<i64>(conn))?;
    Ok(())
}

/// Replaces `old` with `new` (same physical TTL) if the key still holds
/// `old`: re-arms a fail-safe copy without overwriting anything newer.
pub(crate) fn rearm(cache: &Cache, value_key: &str, old: &[u8], new: &[u8]) -> Result<bool> {
    cache.run(|conn| SCRIPTS.rearm.key(value_key).arg(old).arg(new).invoke(conn))
}

/// The scripts, hashed once per process; `invoke` sends EVALSHA and falls
/// back to EVAL after a server restart forgot them.
struct Scripts {
    relay_invalidate: Script,
    relay_invalidate_code: String,
    acquire: Script,
    fill: Script,
    release: Script,
    renew: Script,
    register_writer: Script,
    write_through: Script,
    discard: Script,
    rearm: Script,
    write_behind: Script,
    settle: Script,
    settle_code: String,
    still_current: Script,
    still_current_code: String,
}

/// Versions are compared as decimal strings (length, then text), exact for
/// any u64; Lua numbers are doubles, which round above 2^53.
pub(crate) const OLDER: &str = r"
local function older(a, b)
  a = string.gsub(a, '^0+', ''); b = string.gsub(b, '^0+', '')
  if #a ~= #b then return #a < #b end
  return a < b
end
";

static SCRIPTS: once_cell::sync::Lazy<Scripts> = once_cell::sync::Lazy::new(|| {
    // KEYS: value, lease, writers, floor, pending. ARGV: the changed row's
    // version, or ''.
    // With a version, the writers registered now keep their slots: each
    // holds this very change or a later one, or an earlier one, and the
    // floor (raised to this version for as long as the newest writer may
    // live) tells write-through which. Revoking them all instead would drop
    // the write-through of the change being relayed whenever the relay is
    // faster than the writer, and leave the key empty.
    // A pending write-behind change older than the captured version was
    // enqueued before that write (versions of writes that bypass the
    // library are stamped with the clock, the unit of sequence numbers):
    // the write supersedes it, as a write-through does, or reads would keep
    // returning the change until its flush, which skips it.
    let relay_invalidate_code = format!(
        r"{OLDER}
        if ARGV[1] ~= '' then
          if redis.call('TYPE', KEYS[5]).ok == 'hash' then
            local seq = redis.call('HGET', KEYS[5], 's')
            if seq and older(seq, ARGV[1]) then redis.call('DEL', KEYS[5]) end
          end
          if redis.call('TYPE', KEYS[1]).ok == 'string' then
            local kind, v = string.match(redis.call('GET', KEYS[1]), '^ca1 (%a) (%d+) ')
            if kind == 'v' and v and not older(v, ARGV[1]) then return 0 end
          end
          local live = redis.call('PTTL', KEYS[3])
          if live > 0 then
            local floor = nil
            if redis.call('TYPE', KEYS[4]).ok == 'string' then
              floor = string.match(redis.call('GET', KEYS[4]), '^%d+$')
            end
            if not floor or older(floor, ARGV[1]) then
              redis.call('SET', KEYS[4], ARGV[1], 'PX', live)
            end
          end
          redis.call('DEL', KEYS[1], KEYS[2])
          return 1
        end
        redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4])
        return 1
        "
    );
    // KEYS: value, lease, pending. ARGV: seq, 'applied' | 'dead'.
    let settle_code = format!(
        r"{OLDER}
        local pt = redis.call('TYPE', KEYS[3]).ok
        if pt == 'hash' then
          local pending = redis.call('HGET', KEYS[3], 's')
          if pending and older(ARGV[1], pending) then return 0 end
          redis.call('DEL', KEYS[3])
        elseif pt ~= 'none' then
          redis.call('DEL', KEYS[3])
        end
        if ARGV[2] == 'dead' then
          redis.call('DEL', KEYS[1], KEYS[2])
          return 1
        end
        if redis.call('TYPE', KEYS[1]).ok == 'string' then
          local v = string.match(redis.call('GET', KEYS[1]), '^ca1 %a (%d+) ')
          if v and older(ARGV[1], v) then return 1 end
        end
        redis.call('DEL', KEYS[1])
        return 1
        "
    );
    // KEYS: pending, writers. ARGV: seq. 1: apply, 0: skip, 2: wait.
    let still_current_code = r"
        if redis.call('TYPE', KEYS[1]).ok ~= 'hash' then return 0 end
        if redis.call('HGET', KEYS[1], 's') ~= ARGV[1] then return 0 end
        if redis.call('TYPE', KEYS[2]).ok == 'set' and redis.call('SCARD', KEYS[2]) > 0 then
          return 2
        end
        return 1
        "
    .to_owned();
    Scripts {
        still_current: Script::new(&still_current_code),
        still_current_code,
        relay_invalidate: Script::new(&relay_invalidate_code),
        relay_invalidate_code,
        // KEYS: value, lease, lock, pending. ARGV: mode, token, lease_ms,
        // lock_ms, now_ms.
        // A value past its logical expiry (a fail-safe copy) counts as missing.
        // A pending write-behind change is newer than any row a load could
        // read: it is stored again as the value (fresh for its TTL) and
        // returned as if it had been cached; an early refresh is skipped.
        // Retrying with the same token finds what the first attempt took.
        acquire: Script::new(
            r"
        local function sweep(key)
          local t = redis.call('TYPE', key).ok
          if t ~= 'none' and (t ~= 'string' or redis.call('PTTL', key) < 0) then
            redis.call('DEL', key)
          end
        end
        sweep(KEYS[2]); sweep(KEYS[3])
        local mode, token = ARGV[1], ARGV[2]
        if mode ~= 'refresh' then
          local t = redis.call('TYPE', KEYS[1]).ok
          if t == 'string' then
            local v = redis.call('GET', KEYS[1])
            local expires = tonumber(string.match(v, '^ca1 %a %d+ %d+ (%d+)\n'))
            if not expires or expires > tonumber(ARGV[5]) then return v end
          elseif t ~= 'none' then
            redis.call('DEL', KEYS[1])
          end
        end
        local pt = redis.call('TYPE', KEYS[4]).ok
        if pt == 'hash' then
          if mode == 'refresh' then return 0 end
          local p = redis.call('HMGET', KEYS[4], 's', 'v', 't', 'p')
          local ttl, physical = tonumber(p[3]), tonumber(p[4])
          if p[1] and p[2] and ttl and physical then
            local v = 'ca1 v ' .. p[1] .. ' 0 ' ..
              string.format('%.0f', tonumber(ARGV[5]) + ttl) .. '\n' .. p[2]
            redis.call('SET', KEYS[1], v, 'PX', physical)
            return v
          end
          redis.call('DEL', KEYS[4])
        elseif pt ~= 'none' then
          redis.call('DEL', KEYS[4])
        end
        if mode == 'lease' or mode == 'takeover' then
          local holder = redis.call('GET', KEYS[2])
          if holder and holder ~= token and mode == 'lease' then return 0 end
          redis.call('SET', KEYS[2], token, 'PX', ARGV[3])
          return 1
        end
        local locker = redis.call('GET', KEYS[3])
        if locker == token then return 1 end
        if locker or redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
        redis.call('SET', KEYS[3], token, 'PX', ARGV[4])
        redis.call('SET', KEYS[2], token, 'PX', ARGV[3])
        return 1
        ",
        ),
        // KEYS: value, lease, lock, pending. ARGV: token, entry, ttl_ms.
        // The lease check is what drops a stale fill: an invalidation after our
        // read deleted the lease (or a newer reader took it over). A pending
        // write-behind change is newer than what the load read (an enqueue
        // revokes leases too; this holds also for a lease taken after it).
        fill: Script::new(
            r"
        local stored = 0
        if redis.call('GET', KEYS[2]) == ARGV[1] then
          if redis.call('EXISTS', KEYS[4]) == 0 then
            redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
            stored = 1
          end
          redis.call('DEL', KEYS[2])
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
        // KEYS: lease, lock. ARGV: token, lease_ms, lock_ms. Compare-and-expire;
        // returns 1 for the lease, 2 for the lock, 3 for both, 0 for nothing.
        renew: Script::new(
            r"
        local held = 0
        if redis.call('GET', KEYS[1]) == ARGV[1] then
          redis.call('PEXPIRE', KEYS[1], ARGV[2]); held = held + 1
        end
        if redis.call('GET', KEYS[2]) == ARGV[1] then
          redis.call('PEXPIRE', KEYS[2], ARGV[3]); held = held + 2
        end
        return held
        ",
        ),
        // KEYS: writers. ARGV: token, ttl_ms. The set lives as long as its
        // newest writer may.
        register_writer: Script::new(
            r"
        redis.call('SADD', KEYS[1], ARGV[1])
        redis.call('PEXPIRE', KEYS[1], ARGV[2])
        return 1
        ",
        ),
        // KEYS: value, lease, writers, pending, floor. ARGV: token, entry,
        // version, ttl_ms.
        // The invariant: once a write has returned, no cached entry is older.
        // - A pending write-behind change was enqueued before this write
        //   committed (or while it ran: either order is right): this write
        //   supersedes it. Its record and the value built from it go, and the
        //   workers skip it (while this writer was registered they held it).
        // - Registered (no invalidation since this writer registered): store
        //   unless the cached version is the same or newer, or the relay has
        //   seen a newer change of the row (the floor).
        // - Revoked by an invalidation whose write may be newer than ours
        //   (plain updates and deletes leave no version behind): whatever is
        //   cached now was filled after that invalidation, so it reflects that
        //   write or a later one. Replacing it is right only when it provably
        //   predates ours: a present row of a lower version (it was loaded
        //   before our commit, and so after nothing newer). Never an absent
        //   entry: a delete may have made it, after our write. Never an empty
        //   key: we cannot tell who is newer; and then every other writer is
        //   revoked too, since any of them may be older than ours and must not
        //   fill the key we left empty.
        write_through: Script::new(&format!(
            r"{OLDER}
        redis.call('DEL', KEYS[2])
        local registered = redis.call('SREM', KEYS[3], ARGV[1]) == 1
        if registered and redis.call('TYPE', KEYS[5]).ok == 'string' then
          local floor = string.match(redis.call('GET', KEYS[5]), '^%d+$')
          if floor and older(ARGV[3], floor) then return 0 end
        end
        if redis.call('EXISTS', KEYS[4]) == 1 then
          redis.call('DEL', KEYS[4], KEYS[1])
        end
        local t = redis.call('TYPE', KEYS[1]).ok
        if t ~= 'string' and t ~= 'none' then redis.call('DEL', KEYS[1]) end
        local cur = redis.call('GET', KEYS[1])
        if cur then
          local kind, v = string.match(cur, '^ca1 (%a) (%d+) ')
          if registered then
            if v and not older(v, ARGV[3]) then return 0 end
          elseif kind ~= 'v' or not v or not older(v, ARGV[3]) then
            return 0
          end
        elseif not registered then
          redis.call('DEL', KEYS[3])
          return 0
        end
        redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[4])
        return 1
        "
        )),
        // KEYS: value. ARGV: the raw bytes read.
        discard: Script::new(
            r"
        local t = redis.call('TYPE', KEYS[1]).ok
        if t == 'none' then return 0 end
        if t ~= 'string' or redis.call('GET', KEYS[1]) == ARGV[1] then
          return redis.call('DEL', KEYS[1])
        end
        return 0
        ",
        ),
        // KEYS: value. ARGV: old, new.
        rearm: Script::new(
            r"
        if redis.call('GET', KEYS[1]) == ARGV[1] then
          redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL')
          return 1
        end
        return 0
        ",
        ),
        // KEYS: value, lease, pending, stream, seq. ARGV: key, head, tail,
        // sequenced ('1': the JSON is head .. seq .. tail), floor,
        // expires_at_ms, ttl_ms, physical_ms, max_backlog, group,
        // seq_floor_ttl_ms.
        // Lua numbers are doubles: sequences stay below 2^53 (Redis's clock
        // in microseconds reaches it in the year 2255).
        write_behind: Script::new(
            r"
        if redis.call('XLEN', KEYS[4]) >= tonumber(ARGV[9]) then return -1 end
        local now = redis.call('TIME')
        local seq = tonumber(now[1]) * 1000000 + tonumber(now[2])
        local function after(v)
          local n = tonumber(v)
          if n and n >= seq then seq = n + 1 end
        end
        after(ARGV[5])
        local pt = redis.call('TYPE', KEYS[3]).ok
        if pt == 'hash' then
          after(redis.call('HGET', KEYS[3], 's'))
        elseif pt ~= 'none' then
          redis.call('DEL', KEYS[3])
        end
        local vt = redis.call('TYPE', KEYS[1]).ok
        if vt == 'string' then
          after(string.match(redis.call('GET', KEYS[1]), '^ca1 %a (%d+) '))
        elseif vt ~= 'none' then
          redis.call('DEL', KEYS[1])
        end
        local st = redis.call('TYPE', KEYS[5]).ok
        if st == 'string' then
          after(string.match(redis.call('GET', KEYS[5]), '^%d+$'))
        elseif st ~= 'none' then
          redis.call('DEL', KEYS[5])
        end
        if seq >= 9007199254740992 then
          return redis.error_reply('write-behind sequence beyond 2^53')
        end
        local s = string.format('%.0f', seq)
        local json = ARGV[2]
        if ARGV[4] == '1' then json = ARGV[2] .. s .. ARGV[3] end
        redis.call('SET', KEYS[1], 'ca1 v ' .. s .. ' 0 ' .. ARGV[6] .. '\n' .. json,
          'PX', ARGV[8])
        redis.call('DEL', KEYS[2])
        redis.call('HSET', KEYS[3], 's', s, 'v', json, 't', ARGV[7], 'p', ARGV[8])
        redis.call('SET', KEYS[5], s, 'PX', ARGV[11])
        local new_stream = redis.call('EXISTS', KEYS[4]) == 0
        local id = redis.call('XADD', KEYS[4], '*', 'k', ARGV[1], 's', s, 'v', json)
        if new_stream then
          -- From the start, so workers started later read this entry too.
          redis.call('XGROUP', 'CREATE', KEYS[4], ARGV[10], '0')
        end
        return {s, id}
        ",
        ),
        settle: Script::new(&settle_code),
        settle_code,
    }
});

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_unique() {
        assert_ne!(new_token(), new_token());
    }
}
