//! A writer and readers on the lab's users while loads go to a lagging read
//! replica: the workload of `tests/replica.rs` and of the benchmark's
//! `replica` section (which includes this file), so both measure the same
//! thing.

use std::collections::HashMap;
use std::sync::Barrier;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cacheaside::Client;
use parking_lot::Mutex;

/// What one run saw.
#[derive(Debug, Clone, Copy, Default)]
pub struct Soak {
    pub writes: u64,
    pub reads: u64,
    /// Reads that returned a version older than a write of their user that
    /// had returned before the read began (each one a pre-write row that a
    /// read returned, or a cache entry held).
    pub stale: u64,
    /// From `Stats`: loads the replica served, loads a fence sent to the
    /// primary, loads that read the primary for want of a fence.
    pub replica_loads: u64,
    pub fenced: u64,
    pub skipped: u64,
}

impl Soak {
    /// The share of loads the replica served.
    pub fn replica_share(&self) -> f64 {
        let all = self.replica_loads + self.fenced + self.skipped;
        if all == 0 {
            0.0
        } else {
            self.replica_loads as f64 / all as f64
        }
    }
}

/// Polls `done` until it holds, at most 20 s (a replica replays what the
/// primary committed `recovery_min_apply_delay` later): it waits for a
/// state, it does not sleep to make anything pass.
pub fn until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Inserts users `ids` behind the library's back (no fence, no
/// invalidation) and waits until the replica has all of the table's rows.
pub fn add_users_and_wait_for_the_replica(client: &Client, ids: std::ops::Range<i64>) {
    let table = client.users_table();
    client
        .db()
        .execute(
            &format!(
                "INSERT INTO {table} (id, name, email, plan) \
                 SELECT i, 'user ' || i, 'u' || i || '@example.com', 'free' \
                 FROM generate_series($1::bigint, $2::bigint) AS i"
            ),
            &[&ids.start, &(ids.end - 1)],
        )
        .expect("insert users");
    let count = format!("SELECT count(*) FROM {table}");
    let rows = |db: &cacheaside::Db| -> i64 {
        db.query_opt(&count, &[])
            .ok()
            .flatten()
            .map_or(-1, |r| r.get(0))
    };
    let on_primary = rows(client.db());
    let on_replica = client.db().replica().expect("replica_url is set");
    until("the replica to have every user", || {
        rows(on_replica) == on_primary
    });
}

/// The committed version of a user, from the primary.
fn version_of(client: &Client, id: i64) -> i64 {
    let sql = format!("SELECT version FROM {} WHERE id = $1", client.users_table());
    client
        .db()
        .query_opt(&sql, &[&id])
        .expect("read a version")
        .expect("the user exists")
        .get(0)
}

/// One writer on the `hot` users (plain update + invalidate and
/// write-through, in turn) and `readers` threads reading hot and `cold`
/// users half and half (plain and single-flight in turn) for `duration`.
/// Each read is checked against the newest write of its user that had
/// returned before it began.
pub fn run(client: &Client, hot: &[i64], cold: &[i64], duration: Duration, readers: usize) -> Soak {
    let returned: Mutex<HashMap<i64, i64>> =
        Mutex::new(hot.iter().map(|&id| (id, version_of(client, id))).collect());
    let stop = AtomicBool::new(false);
    let (reads, stale, writes) = (AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0));
    let start = Barrier::new(readers + 1);
    let before = client.engine().stats();
    std::thread::scope(|s| {
        s.spawn(|| {
            start.wait();
            let until = Instant::now() + duration;
            let mut n = 0_u64;
            while Instant::now() < until {
                let id = hot[n as usize % hot.len()];
                let plan = format!("p{n}");
                let version = if n.is_multiple_of(2) {
                    assert!(client.update_user_plan(id, &plan).expect("update"));
                    // Only this thread writes: the committed version is ours.
                    version_of(client, id)
                } else {
                    let row = client.update_user_plan_write_through(id, &plan);
                    row.expect("write through")
                        .expect("the user exists")
                        .version
                };
                returned.lock().insert(id, version);
                n += 1;
            }
            writes.store(n, Ordering::Relaxed);
            stop.store(true, Ordering::Relaxed);
        });
        for r in 0..readers {
            let (returned, stop, reads, stale, start) = (&returned, &stop, &reads, &stale, &start);
            s.spawn(move || {
                start.wait();
                let mut rng = fastrand::Rng::with_seed(r as u64);
                while !stop.load(Ordering::Relaxed) {
                    let id = if rng.bool() {
                        hot[rng.usize(..hot.len())]
                    } else {
                        cold[rng.usize(..cold.len())]
                    };
                    // What this read must not be older than.
                    let floor = returned.lock().get(&id).copied().unwrap_or(1);
                    let profile = if rng.bool() {
                        client.get_user_profile(id)
                    } else {
                        client.get_user_profile_singleflight(id)
                    };
                    let profile = profile.expect("read").expect("the user exists");
                    if profile.version < floor {
                        stale.fetch_add(1, Ordering::Relaxed);
                    }
                    reads.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    });
    let after = client.engine().stats();
    Soak {
        writes: writes.into_inner(),
        reads: reads.into_inner(),
        stale: stale.into_inner(),
        replica_loads: after.replica_loads - before.replica_loads,
        fenced: after.replica_fenced - before.replica_fenced,
        skipped: after.replica_skipped - before.replica_skipped,
    }
}

/// Users whose cached profile is not the committed row (a pre-write row
/// left in the cache), among `ids`, once every write has returned.
pub fn cached_behind_committed(client: &Client, ids: &[i64]) -> Vec<i64> {
    ids.iter()
        .copied()
        .filter(|&id| {
            let cached = client.get_user_profile(id).expect("read").expect("exists");
            cached.version != version_of(client, id)
        })
        .collect()
}
