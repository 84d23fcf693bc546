//! The near cache's tracking on a Redis Cluster: one tracking connection
//! per master.
//!
//! Broadcast tracking is per node: a master reports the changes of the keys
//! it serves. So a session opens, on every master the slot map names, the
//! same pair as on a single server (a connection tracking the namespace's
//! prefix, redirected to itself and subscribed to the invalidations and a
//! heartbeat channel; a second one that publishes the heartbeats), and
//! reads each on a thread of its own. L1 serves only while *every* master's
//! tracker has read back a heartbeat sent less than [`BOUND`] ago: the
//! bound holds per master, so it holds for every key.
//!
//! The slot map is read again every [`TOPOLOGY_EVERY`]. When it changed (a
//! slot migrated, a replica took over), or any master's connection breaks
//! or its heartbeat is overdue, the session ends: L1 is cleared and dark
//! until a new session tracks every master of the new map. Tracking is by
//! prefix, not by slot, so a key that moved to another tracked master is
//! reported by its new master at once; the clear covers the rest (the
//! entries of a slot whose master changed), coarsely: every slot's entries
//! go, not just the moved one's.

use std::time::{Duration, Instant};

use parking_lot::Mutex;
use redis::Value;

use super::{BEAT, INVALIDATE, Near, pump, start_tracking, tracker_name};
use crate::cache::Cache;
use crate::config::Config;
use crate::error::{Error, ErrorKind, Result};

/// How often a session reads the slot map to see whether it changed.
const TOPOLOGY_EVERY: Duration = Duration::from_millis(100);

/// What the threads of one session share. Guarded by its mutex, which also
/// orders every change of `near`'s liveness made by the session: no thread
/// can make L1 live after another found the session broken.
struct Shared {
    /// Per master, when the newest heartbeat it read back was sent.
    confirmed: Vec<Option<Instant>>,
    /// Set once a master's tracker failed (or the map changed): L1 is dark.
    broken: bool,
}

/// One tracking session over every master, from connect to break (`Err`)
/// or stop (`Ok`); `connected` is set once every master tracks.
pub(super) fn session(
    near: &Near,
    cache: &Cache,
    config: &Config,
    io_timeout: Duration,
    connected: &mut bool,
) -> Result<()> {
    let map = cache.slot_map()?;
    let mut masters: Vec<(String, u16)> = Vec::new();
    for (_, _, host, port) in &map {
        if !masters.iter().any(|(h, p)| h == host && p == port) {
            masters.push((host.clone(), *port));
        }
    }
    if masters.is_empty() {
        return Err(Error::new(ErrorKind::Cache, "the cluster has no master"));
    }
    let name = tracker_name();
    // Every master tracks and is subscribed before the flush below.
    let mut links = Vec::new();
    for (i, (host, port)) in masters.iter().enumerate() {
        let client = crate::redis_conn::node_client(config, host, *port, false)?;
        let connect = || -> Result<redis::Connection> {
            let conn = client.get_connection_with_timeout(io_timeout)?;
            conn.set_read_timeout(Some(io_timeout))?;
            conn.set_write_timeout(Some(io_timeout))?;
            Ok(conn)
        };
        let (mut sub, beat) = (connect()?, connect()?);
        let channel = format!("__cacheaside_near__:{name}:{i}");
        start_tracking(near, &mut sub, &format!("{name}-{i}"), cache.namespace())?;
        // The first confirmation says the command ran; the second is read
        // (and skipped) with the messages.
        redis::cmd("SUBSCRIBE")
            .arg(INVALIDATE)
            .arg(&channel)
            .query::<Value>(&mut sub)?;
        links.push((sub, beat, channel));
    }
    // As on a single server: reads that went to Redis while L1 was dark
    // may hold values replaced before tracking began; refuse their fills.
    near.flush();
    *connected = true;
    let shared = Mutex::new(Shared {
        confirmed: vec![None; links.len()],
        broken: false,
    });
    let outcome: Mutex<Option<Error>> = Mutex::new(None);
    let fail = |err: Error| {
        broken(near, &shared);
        outcome.lock().get_or_insert(err);
    };
    std::thread::scope(|s| {
        for (i, (mut sub, mut beat, channel)) in links.into_iter().enumerate() {
            let (shared, fail) = (&shared, &fail);
            s.spawn(move || {
                if let Err(err) = link(near, shared, i, &mut sub, &mut beat, &channel, io_timeout) {
                    fail(err);
                }
            });
        }
        // Until stopped, broken, or the slot map changed.
        let mut next_check = Instant::now() + TOPOLOGY_EVERY;
        while !near.stopped() && !shared.lock().broken {
            std::thread::sleep(BEAT);
            if Instant::now() < next_check {
                continue;
            }
            next_check = Instant::now() + TOPOLOGY_EVERY;
            match cache.slot_map() {
                Ok(now) if now == map => {}
                Ok(_) => fail(Error::new(
                    ErrorKind::Cache,
                    "the cluster's slot map changed",
                )),
                Err(err) => fail(err),
            }
        }
    });
    match outcome.into_inner() {
        Some(err) => Err(err),
        None => Ok(()),
    }
}

/// Ends the session's serving: L1 dark and cleared, and no thread of the
/// session may make it live again.
fn broken(near: &Near, shared: &Mutex<Shared>) {
    let mut shared = shared.lock();
    shared.broken = true;
    near.lost();
}

/// One master's tracker: reads its invalidations and heartbeats until the
/// session stops or breaks (`Ok`) or its connection fails (`Err`).
fn link(
    near: &Near,
    shared: &Mutex<Shared>,
    i: usize,
    sub: &mut redis::Connection,
    beat: &mut redis::Connection,
    channel: &str,
    io_timeout: Duration,
) -> Result<()> {
    let mut pubsub = sub.as_pubsub();
    pubsub.set_read_timeout(Some(BEAT))?;
    let broken = || shared.lock().broken;
    pump(
        near,
        &mut pubsub,
        beat,
        channel,
        io_timeout,
        || near.stopped() || broken(),
        |at| {
            let mut shared = shared.lock();
            if shared.broken {
                return false;
            }
            shared.confirmed[i] = Some(at);
            let oldest = shared
                .confirmed
                .iter()
                .copied()
                .collect::<Option<Vec<Instant>>>()
                .and_then(|all| all.into_iter().min());
            if let Some(oldest) = oldest {
                near.confirmed_everywhere(oldest);
            }
            true
        },
    )
}
