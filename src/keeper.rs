//! The keeper: one thread per engine that renews the leases and locks of
//! live loads, and deletes orphans.
//!
//! Guarantees:
//! - A load keeps its lease and lock for as long as it runs: the keeper
//!   renews them every third of their TTL until the load ends or its call's
//!   deadline passes. A dead process stops renewing, so what it held expires
//!   one TTL later.
//! - A script that timed out on the client may still run on the server; its
//!   lease or lock is then an orphan, which the keeper deletes (compare and
//!   delete on the token) as soon as Redis answers, instead of letting it
//!   stall readers for a TTL.
//! - A [`Hold`] released on every exit path of a load (panics included, by
//!   `Drop`) gives up its lease and lock, or leaves them to the keeper.

use std::collections::HashMap;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::cache::Cache;
use crate::keys::Keys;
use crate::lease::{Token, Ttls, release, renew};
use crate::observe::report;

/// Renews the leases and locks of live loads, and deletes orphans.
///
/// One thread per engine, started with it and stopped (joined) when it
/// drops. It wakes every third of the shorter TTL; a load that ends before
/// the first wake-up costs it nothing but a map insert and remove.
pub(crate) struct Keeper {
    shared: Arc<KeeperShared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

struct KeeperShared {
    cache: Cache,
    ttls: Ttls,
    /// Guarded by its mutex; never held across I/O (the thread copies what
    /// it renews, then unlocks).
    state: Mutex<KeeperState>,
    wake: Condvar,
}

#[derive(Default)]
struct KeeperState {
    next_id: u64,
    live: HashMap<u64, Renewal>,
    orphans: Vec<Orphan>,
    stop: bool,
}

#[derive(Clone)]
struct Renewal {
    lease: Arc<str>,
    lock: Arc<str>,
    token: Token,
    /// Renew until then: the holder's call has given up by that time.
    until: Instant,
}

struct Orphan {
    lease: Arc<str>,
    lock: Arc<str>,
    token: Token,
    /// Expired in Redis by then anyway.
    gone_at: Instant,
}

impl Keeper {
    pub fn new(cache: Cache, ttls: Ttls) -> Keeper {
        Keeper {
            shared: Arc::new(KeeperShared {
                cache,
                ttls,
                state: Mutex::new(KeeperState::default()),
                wake: Condvar::new(),
            }),
            thread: Mutex::new(None),
        }
    }

    /// Takes responsibility for what `token` holds on `keys` until the
    /// returned [`Hold`] drops (or fills), renewing it until `until`.
    /// `generation` is the Redis server generation the claim was made in
    /// (or an earlier one): see [`Hold::generation`].
    pub fn hold(
        self: &Arc<Self>,
        keys: &Keys,
        token: Token,
        until: Instant,
        generation: u64,
    ) -> Hold {
        let (lease, lock): (Arc<str>, Arc<str>) =
            (keys.lease.as_str().into(), keys.lock.as_str().into());
        let id = {
            let mut state = self.shared.state.lock();
            state.next_id += 1;
            let id = state.next_id;
            state.live.insert(
                id,
                Renewal {
                    lease: Arc::clone(&lease),
                    lock: Arc::clone(&lock),
                    token: Arc::clone(&token),
                    until,
                },
            );
            id
        };
        self.ensure_running();
        Hold {
            keeper: Arc::clone(self),
            id,
            lease,
            lock,
            token,
            generation,
            done: false,
        }
    }

    /// A claim whose reply never came (a timeout, a dropped connection): it
    /// may have taken a lease or lock on the server. Delete them (if still
    /// `token`'s) as soon as Redis answers.
    pub fn orphan(&self, keys: &Keys, token: Token) {
        let ttl = self.shared.ttls.lease.max(self.shared.ttls.lock);
        self.shared.state.lock().orphans.push(Orphan {
            lease: keys.lease.as_str().into(),
            lock: keys.lock.as_str().into(),
            token,
            gone_at: Instant::now() + ttl,
        });
        self.ensure_running();
        self.shared.wake.notify_one();
    }

    /// Loads whose leases and locks are being renewed now.
    pub fn live(&self) -> usize {
        self.shared.state.lock().live.len()
    }

    fn ensure_running(&self) {
        let mut thread = self.thread.lock();
        if thread.is_some() {
            return;
        }
        let shared = Arc::clone(&self.shared);
        // Best effort: without the thread, loads are not renewed (they keep
        // today's TTLs) and orphans expire on their own.
        *thread = std::thread::Builder::new()
            .name("cacheaside-keeper".into())
            .spawn(move || shared.run())
            .map_err(|e| report!(warn, "cannot start the lease keeper thread: {e}"))
            .ok();
    }
}

impl Drop for Keeper {
    fn drop(&mut self) {
        self.shared.state.lock().stop = true;
        self.shared.wake.notify_all();
        if let Some(thread) = self.thread.lock().take() {
            let _ = thread.join();
        }
    }
}

impl KeeperShared {
    fn interval(&self) -> Duration {
        self.ttls.lease.min(self.ttls.lock) / 3
    }

    fn run(&self) {
        let mut state = self.state.lock();
        loop {
            if state.stop {
                return;
            }
            let timeout = self.interval();
            if state.orphans.is_empty() {
                self.wake.wait_for(&mut state, timeout);
            } else {
                // Orphans are retried sooner: they block other readers.
                self.wake
                    .wait_for(&mut state, timeout.min(Duration::from_millis(50)));
            }
            if state.stop {
                return;
            }
            let now = Instant::now();
            let due: Vec<Renewal> = state
                .live
                .values()
                .filter(|r| r.until > now)
                .cloned()
                .collect();
            state.orphans.retain(|o| o.gone_at > now);
            let orphans: Vec<(Arc<str>, Arc<str>, Token)> = state
                .orphans
                .iter()
                .map(|o| {
                    (
                        Arc::clone(&o.lease),
                        Arc::clone(&o.lock),
                        Arc::clone(&o.token),
                    )
                })
                .collect();
            drop(state);
            for r in &due {
                if let Err(err) = renew(&self.cache, &r.lease, &r.lock, &r.token, self.ttls) {
                    report!(
                        debug,
                        "lease renewal failed (retried next round): {}",
                        err.chain()
                    );
                }
            }
            let mut released = Vec::new();
            for (lease, lock, token) in &orphans {
                if release(&self.cache, lease, lock, token).is_ok() {
                    released.push(Arc::clone(token));
                }
            }
            state = self.state.lock();
            state.orphans.retain(|o| !released.contains(&o.token));
        }
    }
}

/// What one load holds (a lease, maybe a lock), renewed while it lives.
/// Dropping it releases both if still ours, so a loader that fails or
/// panics does not hold up other readers; [`Hold::filled`] says a fill
/// script released them already.
pub(crate) struct Hold {
    keeper: Arc<Keeper>,
    id: u64,
    lease: Arc<str>,
    lock: Arc<str>,
    token: Token,
    /// The Redis server generation the claim was made in, at the latest: a
    /// fill made on another server (restarted from a snapshot, failed over)
    /// may find the lease there again though a write revoked it since.
    generation: u64,
    done: bool,
}

impl Hold {
    pub fn token(&self) -> &str {
        &self.token
    }

    /// See the field.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The fill script released the lease and lock.
    pub fn filled(mut self) {
        self.done = true;
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        let shared = &self.keeper.shared;
        shared.state.lock().live.remove(&self.id);
        if self.done {
            return;
        }
        if release(&shared.cache, &self.lease, &self.lock, &self.token).is_err() {
            // Left for the keeper: it deletes them once Redis answers.
            let ttl = shared.ttls.lease.max(shared.ttls.lock);
            shared.state.lock().orphans.push(Orphan {
                lease: Arc::clone(&self.lease),
                lock: Arc::clone(&self.lock),
                token: Arc::clone(&self.token),
                gone_at: Instant::now() + ttl,
            });
            shared.wake.notify_one();
        }
    }
}
