//! In-process single-flight: of the threads that ask for one key at once,
//! one (the leader) does the work and the others wait for its outcome.
//!
//! The shape follows Go's `x/sync/singleflight`: a map from key to the
//! flight in progress, guarded by one mutex that is never held across I/O.
//!
//! Each flight is a gate: a `parking_lot::RwLock` that the leader holds for
//! writing from the moment the flight starts until it publishes, and that
//! followers wait to read. This lock is held across the leader's I/O on
//! purpose: waiting for that I/O is its whole job. We do not use a
//! Mutex + Condvar here: parking_lot's `notify_all` requeues the waiters
//! onto the mutex and wakes them one at a time, each handing off to the
//! next, which on two cores cost 57 ms for 1,000 followers (see the
//! benchmark's stampede table); releasing a write lock unparks every waiting
//! reader in one pass, and they then read the outcome side by side.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use parking_lot::{ArcRwLockWriteGuard, Mutex, RawRwLock, RwLock};

/// Per-key flights in progress. `V` is what a leader hands its waiters.
pub(crate) struct SingleFlight<V> {
    /// Guarded by its mutex: read and written only while joining a flight and
    /// when its leader closes it. Never held across I/O or a flight's gate.
    flights: Mutex<HashMap<String, Arc<Flight<V>>>>,
}

/// Write-locked by the leader until it publishes; followers block on read.
type Flight<V> = RwLock<State<V>>;

enum State<V> {
    /// The leader has not published. A follower that gets read access and
    /// still finds this knows the leader unwound (a panic) without publishing.
    Running,
    Landed(V),
}

/// What [`SingleFlight::join`] made of the caller.
pub(crate) enum Role<'a, V> {
    /// Do the work, then [`Leader::publish`] the outcome.
    Leader(Leader<'a, V>),
    /// Someone else is doing it: [`Follower::wait`] for them.
    Follower(Follower<V>),
}

/// Why a follower got no outcome.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum WaitError {
    /// The leader panicked.
    Abandoned,
    /// The deadline passed first.
    TimedOut,
}

impl<V: Clone> SingleFlight<V> {
    pub fn new() -> Self {
        SingleFlight {
            flights: Mutex::new(HashMap::new()),
        }
    }

    /// Joins the flight for `key`, starting one (as its leader) if none runs.
    pub fn join(&self, key: &str) -> Role<'_, V> {
        let mut flights = self.flights.lock();
        if let Some(flight) = flights.get(key) {
            return Role::Follower(Follower(Arc::clone(flight)));
        }
        let flight = Arc::new(RwLock::new(State::Running));
        // A new lock: taking it for writing cannot block, and it is locked
        // before any follower can find it in the map.
        let gate = flight.write_arc();
        flights.insert(key.to_owned(), flight);
        Role::Leader(Leader {
            group: self,
            key: key.to_owned(),
            gate,
        })
    }

    /// Flights in progress; 0 whenever no call is running.
    pub fn len(&self) -> usize {
        self.flights.lock().len()
    }

    /// Threads waiting on `key`'s flight (its leader not counted).
    #[cfg(feature = "test-hooks")]
    pub fn followers(&self, key: &str) -> usize {
        // Holders of the Arc: the map, the leader's gate, one per follower.
        self.flights
            .lock()
            .get(key)
            .map_or(0, |f| Arc::strong_count(f).saturating_sub(2))
    }
}

/// The one thread doing the work for a key. However it goes away (after
/// [`publish`](Leader::publish), or dropped by a panic unwinding through
/// the leader) the flight is closed and its gate opened, so nobody waits
/// for a leader that is gone; without a published outcome, followers get
/// [`WaitError::Abandoned`].
pub(crate) struct Leader<'a, V> {
    group: &'a SingleFlight<V>,
    key: String,
    gate: ArcRwLockWriteGuard<RawRwLock, State<V>>,
}

impl<V> Leader<'_, V> {
    /// Stops new callers from joining this flight: from now on they start a
    /// new one. A leader closes before it writes the cache, so that whatever
    /// that write's verdict is, it covers every thread that joined.
    pub fn close(&self) {
        let mut flights = self.group.flights.lock();
        // Only remove the entry if it is still ours: after we closed, a new
        // flight may have taken the key.
        let ours = ArcRwLockWriteGuard::rwlock(&self.gate);
        if flights.get(&self.key).is_some_and(|f| Arc::ptr_eq(f, ours)) {
            flights.remove(&self.key);
        }
    }

    /// Hands `outcome` to every follower and ends the flight.
    pub fn publish(mut self, outcome: V) {
        *self.gate = State::Landed(outcome);
        // Dropping closes the flight, then opens the gate.
    }
}

impl<V> Drop for Leader<'_, V> {
    fn drop(&mut self) {
        self.close();
        // `gate` is dropped after this, which wakes every follower.
    }
}

/// A thread waiting for another's outcome.
pub(crate) struct Follower<V>(Arc<Flight<V>>);

impl<V: Clone> Follower<V> {
    /// Blocks until the leader publishes, gives up, or `deadline` passes.
    pub fn wait(&self, deadline: Instant) -> Result<V, WaitError> {
        let state = self.0.try_read_until(deadline).ok_or(WaitError::TimedOut)?;
        match &*state {
            State::Landed(value) => Ok(value.clone()),
            State::Running => Err(WaitError::Abandoned),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Barrier;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    fn far() -> Instant {
        Instant::now() + Duration::from_secs(30)
    }

    #[test]
    fn one_leader_many_followers() {
        let group = SingleFlight::<u32>::new();
        let runs = AtomicUsize::new(0);
        let threads = 16;
        let start = Barrier::new(threads);
        // The leader only publishes once every thread has joined, so the
        // count below is exact rather than timing-dependent.
        let joined = AtomicUsize::new(0);
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads)
                .map(|_| {
                    s.spawn(|| {
                        start.wait();
                        match group.join("k") {
                            Role::Leader(leader) => {
                                joined.fetch_add(1, Ordering::SeqCst);
                                runs.fetch_add(1, Ordering::SeqCst);
                                while joined.load(Ordering::SeqCst) < threads {
                                    std::thread::yield_now();
                                }
                                leader.publish(7);
                                7
                            }
                            Role::Follower(f) => {
                                joined.fetch_add(1, Ordering::SeqCst);
                                f.wait(far()).unwrap()
                            }
                        }
                    })
                })
                .collect();
            for h in handles {
                assert_eq!(h.join().unwrap(), 7);
            }
        });
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert_eq!(group.len(), 0);
    }

    #[test]
    fn dropped_leader_abandons_followers_and_frees_the_key() {
        let group = SingleFlight::<u32>::new();
        let Role::Leader(leader) = group.join("k") else {
            panic!("first caller must lead")
        };
        let Role::Follower(follower) = group.join("k") else {
            panic!("second caller must follow")
        };
        drop(leader);
        assert_eq!(follower.wait(far()), Err(WaitError::Abandoned));
        assert_eq!(group.len(), 0);
        assert!(matches!(group.join("k"), Role::Leader(_)));
    }

    #[test]
    fn panicking_leader_wakes_followers() {
        let group = SingleFlight::<u32>::new();
        let (led, followed) = (Barrier::new(2), Barrier::new(2));
        std::thread::scope(|s| {
            let leader = s.spawn(|| {
                let Role::Leader(_leader) = group.join("k") else {
                    panic!("first caller must lead")
                };
                led.wait();
                followed.wait();
                panic!("loader blew up");
            });
            led.wait();
            let Role::Follower(follower) = group.join("k") else {
                panic!("second caller must follow")
            };
            followed.wait();
            assert_eq!(follower.wait(far()), Err(WaitError::Abandoned));
            assert!(leader.join().is_err());
        });
        assert_eq!(group.len(), 0);
    }

    #[test]
    fn closed_flight_takes_no_new_followers() {
        let group = SingleFlight::<u32>::new();
        let Role::Leader(first) = group.join("k") else {
            panic!("first caller must lead")
        };
        first.close();
        let Role::Leader(second) = group.join("k") else {
            panic!("after close a caller must start a new flight")
        };
        // Publishing the first must not remove the second's entry.
        first.publish(1);
        assert_eq!(group.len(), 1);
        second.publish(2);
        assert_eq!(group.len(), 0);
    }

    #[test]
    fn follower_times_out() {
        let group = SingleFlight::<u32>::new();
        let Role::Leader(_leader) = group.join("k") else {
            panic!("first caller must lead")
        };
        let Role::Follower(follower) = group.join("k") else {
            panic!("second caller must follow")
        };
        let deadline = Instant::now() + Duration::from_millis(20);
        assert_eq!(follower.wait(deadline), Err(WaitError::TimedOut));
    }
}
