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
//!
//! Who may take an outcome. Each flight counts the reads of the source its
//! leader begins (a cache lookup, a load, a fill: anything whose result it
//! may publish). A follower notes the count when it joins; an outcome
//! produced by read `n` is valid for the followers that joined before read
//! `n` began, since that read happened during their calls. Later joiners
//! must read again: a write may have returned between the read and their
//! call. That is what lets a leader's row reach every early follower even
//! when a write made its fill be dropped, without handing anyone a row
//! older than a write that finished before they asked.
//!
//! Guarantees: the leader publishes on every exit path (a drop guard does
//! it, panics included), a flight's map entry is removed only by its own
//! leader, and a thread that calls back into the same key while it leads
//! that key's flight is told so instead of waiting for itself.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::ThreadId;
use std::time::Instant;

use parking_lot::{ArcRwLockWriteGuard, Mutex, RawRwLock, RwLock};

/// Per-key flights in progress. `V` is what a leader hands its followers.
/// Cheap to clone; clones share the map.
pub(crate) struct SingleFlight<V> {
    /// Guarded by its mutex: read and written only while joining a flight and
    /// when its leader leaves. Never held across I/O or a flight's gate.
    flights: Arc<Mutex<HashMap<String, Entry<V>>>>,
}

impl<V> Clone for SingleFlight<V> {
    fn clone(&self) -> Self {
        SingleFlight {
            flights: Arc::clone(&self.flights),
        }
    }
}

struct Entry<V> {
    flight: Flight<V>,
    /// The thread running the leader's work now; `None` while the work
    /// waits in a queue for a thread (so the thread that queued it is free
    /// to read the key: it follows, as any other thread would).
    leader: Option<ThreadId>,
}

struct Flight<V> {
    /// Write-locked by the leader until it publishes; followers block on read.
    gate: Arc<RwLock<State<V>>>,
    /// Reads of the source the leader has begun, and whether this process
    /// wrote the key while the flight was open.
    marks: Marks,
}

impl<V> Clone for Flight<V> {
    fn clone(&self) -> Self {
        Flight {
            gate: Arc::clone(&self.gate),
            marks: self.marks.clone(),
        }
    }
}

/// What a flight's leader (or the work it moved to another thread) records
/// for its followers: the reads it began, and whether this process wrote
/// the key meanwhile.
#[derive(Clone, Default)]
pub(crate) struct Marks {
    reads: Arc<AtomicU64>,
    written: Arc<AtomicBool>,
}

impl Marks {
    /// Notes the start of a read of the source; returns its number.
    pub fn begin_read(&self) -> u64 {
        self.reads.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// True if this process wrote (invalidated) the key since the flight
    /// began.
    pub fn written(&self) -> bool {
        self.written.load(Ordering::SeqCst)
    }
}

enum State<V> {
    /// The leader has not published. A follower that gets read access and
    /// still finds this knows the leader unwound (a panic) without publishing.
    Running,
    Landed(Landed<V>),
}

/// A published outcome and the read that produced it.
struct Landed<V> {
    value: V,
    /// Followers that noted fewer reads than this when they joined may take
    /// `value`; `u64::MAX` makes it valid for all.
    valid_before: u64,
}

/// What [`SingleFlight::join`] made of the caller.
pub(crate) enum Role<V> {
    /// Do the work, then [`Leader::publish`] the outcome.
    Leader(Leader<V>),
    /// Someone else is doing it: [`Follower::wait`] for them.
    Follower(Follower<V>),
    /// This very thread leads the key's flight: it was called back from its
    /// own work (a loader that reads the key it is loading).
    Reentrant,
}

/// Why a follower got no outcome.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum WaitError {
    /// The leader panicked.
    Abandoned,
    /// The deadline passed first.
    TimedOut,
}

/// What a follower got.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Waited<V> {
    /// An outcome valid for this follower.
    Outcome(V),
    /// An outcome of a read that began before this follower joined: it may
    /// predate a write that returned before the follower's call, so the
    /// follower must read for itself.
    TooOld(V),
}

impl<V: Clone> SingleFlight<V> {
    pub fn new() -> Self {
        SingleFlight {
            flights: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// Joins the flight for `key`, starting one (as its leader) if none runs.
    pub fn join(&self, key: &str) -> Role<V> {
        let mut flights = self.flights.lock();
        if let Some(entry) = flights.get(key) {
            if entry.leader == Some(std::thread::current().id()) {
                return Role::Reentrant;
            }
            let flight = entry.flight.clone();
            // Noted after joining (and before the lock is released, though
            // that is not needed): a count read later is only ever larger,
            // which makes the follower more careful, never less.
            let seen = flight.marks.reads.load(Ordering::SeqCst);
            return Role::Follower(Follower { flight, seen });
        }
        let flight = Flight {
            gate: Arc::new(RwLock::new(State::Running)),
            marks: Marks::default(),
        };
        // A new lock: taking it for writing cannot block, and it is locked
        // before any follower can find it in the map.
        let gate = flight.gate.write_arc();
        flights.insert(
            key.to_owned(),
            Entry {
                flight: flight.clone(),
                leader: Some(std::thread::current().id()),
            },
        );
        Role::Leader(Leader {
            group: self.clone(),
            key: key.to_owned(),
            flight,
            gate,
        })
    }

    /// Notes that this process wrote `key` (its write has committed and it
    /// invalidates the key now): a flight open on it must not hand the row
    /// it loads to followers that joined after the load began, unless the
    /// cache proves it fresh.
    pub fn note_write(&self, key: &str) {
        if let Some(entry) = self.flights.lock().get(key) {
            entry.flight.marks.written.store(true, Ordering::SeqCst);
        }
    }

    /// As [`note_write`](Self::note_write), for every key starting with
    /// `prefix` (a table truncated).
    pub fn note_write_prefix(&self, prefix: &str) {
        for (key, entry) in self.flights.lock().iter() {
            if key.starts_with(prefix) {
                entry.flight.marks.written.store(true, Ordering::SeqCst);
            }
        }
    }

    /// Flights in progress; 0 whenever no call is running.
    pub fn len(&self) -> usize {
        self.flights.lock().len()
    }

    /// Threads waiting on `key`'s flight (its leader not counted).
    #[cfg(feature = "test-hooks")]
    pub fn followers(&self, key: &str) -> usize {
        // Holders of the gate's Arc: the map entry, the leader's guard and
        // its own copy of the flight, one per follower.
        self.flights
            .lock()
            .get(key)
            .map_or(0, |e| Arc::strong_count(&e.flight.gate).saturating_sub(3))
    }
}

/// The one thread doing the work for a key. However it goes away (after
/// [`publish`](Leader::publish), or dropped by a panic unwinding through
/// the leader) the flight leaves the map and its gate opens, so nobody waits
/// for a leader that is gone; without a published outcome, followers get
/// [`WaitError::Abandoned`]. It may move to another thread (a background
/// refresh): call [`Leader::adopt`] there.
pub(crate) struct Leader<V> {
    group: SingleFlight<V>,
    key: String,
    flight: Flight<V>,
    gate: ArcRwLockWriteGuard<RawRwLock, State<V>>,
}

impl<V> Leader<V> {
    /// Notes that the leader begins a read of the source (a lookup, a load,
    /// a fill) whose result it may publish; returns that read's number, to
    /// pass to [`publish`](Leader::publish).
    pub fn begin_read(&self) -> u64 {
        self.flight.marks.begin_read()
    }

    /// The flight's marks, for work that moved to another thread.
    pub fn marks(&self) -> Marks {
        self.flight.marks.clone()
    }

    /// The current thread now runs this leader's work (it moved here).
    pub fn adopt(&self) {
        self.set_thread(Some(std::thread::current().id()));
    }

    /// The leader's work is queued for another thread: until one
    /// [`adopt`](Self::adopt)s it, no thread runs it, and the one that
    /// queued it may read the key (as a follower) without being taken for
    /// a loader that reads its own key.
    pub fn hand_off(&self) {
        self.set_thread(None);
    }

    fn set_thread(&self, thread: Option<ThreadId>) {
        let mut flights = self.group.flights.lock();
        if let Some(entry) = flights.get_mut(&self.key)
            && Arc::ptr_eq(&entry.flight.gate, &self.flight.gate)
        {
            entry.leader = thread;
        }
    }

    /// Hands `value` to the followers that joined before read `valid_before`
    /// began (`u64::MAX`: to all), and ends the flight.
    pub fn publish(mut self, value: V, valid_before: u64) {
        *self.gate = State::Landed(Landed {
            value,
            valid_before,
        });
        // Dropping leaves the map, then opens the gate.
    }
}

impl<V> Drop for Leader<V> {
    fn drop(&mut self) {
        let mut flights = self.group.flights.lock();
        // Only remove the entry if it is still ours.
        if flights
            .get(&self.key)
            .is_some_and(|e| Arc::ptr_eq(&e.flight.gate, &self.flight.gate))
        {
            flights.remove(&self.key);
        }
        // `gate` is dropped after this, which wakes every follower.
    }
}

/// A thread waiting for another's outcome.
pub(crate) struct Follower<V> {
    flight: Flight<V>,
    /// Reads the leader had begun when this follower joined.
    seen: u64,
}

impl<V: Clone> Follower<V> {
    /// Blocks until the leader publishes, gives up, or `deadline` passes.
    pub fn wait(&self, deadline: Instant) -> Result<Waited<V>, WaitError> {
        let state = self
            .flight
            .gate
            .try_read_until(deadline)
            .ok_or(WaitError::TimedOut)?;
        match &*state {
            State::Landed(landed) if self.seen < landed.valid_before => {
                Ok(Waited::Outcome(landed.value.clone()))
            }
            State::Landed(landed) => Ok(Waited::TooOld(landed.value.clone())),
            State::Running => Err(WaitError::Abandoned),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Barrier;
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    fn far() -> Instant {
        Instant::now() + Duration::from_secs(30)
    }

    fn lead(group: &SingleFlight<u32>) -> Leader<u32> {
        match group.join("k") {
            Role::Leader(leader) => leader,
            _ => panic!("expected to lead"),
        }
    }

    /// Joins from another thread (the leader's own thread would be told it
    /// is calling back into its own flight).
    fn follow(group: &SingleFlight<u32>) -> Follower<u32> {
        let role = std::thread::scope(|s| s.spawn(|| group.join("k")).join().unwrap());
        match role {
            Role::Follower(follower) => follower,
            _ => panic!("expected to follow"),
        }
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
                                leader.publish(7, u64::MAX);
                                7
                            }
                            Role::Follower(f) => {
                                joined.fetch_add(1, Ordering::SeqCst);
                                match f.wait(far()).unwrap() {
                                    Waited::Outcome(v) => v,
                                    Waited::TooOld(_) => panic!("valid for all"),
                                }
                            }
                            Role::Reentrant => panic!("different threads"),
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
    fn only_followers_that_joined_before_the_read_may_take_its_outcome() {
        let group = SingleFlight::<u32>::new();
        let leader = lead(&group);
        let early = follow(&group);
        let read = leader.begin_read();
        let late = follow(&group);
        leader.publish(1, read);
        assert_eq!(early.wait(far()), Ok(Waited::Outcome(1)));
        assert_eq!(late.wait(far()), Ok(Waited::TooOld(1)));
    }

    #[test]
    fn a_write_of_the_key_marks_its_open_flight() {
        let group = SingleFlight::<u32>::new();
        let leader = lead(&group);
        assert!(!leader.marks().written());
        group.note_write("other");
        assert!(!leader.marks().written());
        group.note_write("k");
        assert!(leader.marks().written());
        leader.publish(1, u64::MAX);
        group.note_write("k"); // no flight: nothing to mark
    }

    #[test]
    fn a_leader_calling_back_into_its_own_key_is_told() {
        let group = SingleFlight::<u32>::new();
        let leader = lead(&group);
        assert!(matches!(group.join("k"), Role::Reentrant));
        // Moved to another thread, the old thread is a follower again.
        std::thread::scope(|s| {
            s.spawn(|| leader.adopt());
        });
        assert!(matches!(group.join("k"), Role::Follower(_)));
        drop(leader);
    }

    #[test]
    fn dropped_leader_abandons_followers_and_frees_the_key() {
        let group = SingleFlight::<u32>::new();
        let leader = lead(&group);
        let follower = follow(&group);
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
                let _leader = lead(&group);
                led.wait();
                followed.wait();
                panic!("loader blew up");
            });
            led.wait();
            let follower = follow(&group);
            followed.wait();
            assert_eq!(follower.wait(far()), Err(WaitError::Abandoned));
            assert!(leader.join().is_err());
        });
        assert_eq!(group.len(), 0);
    }

    #[test]
    fn a_finished_flight_never_removes_its_successor() {
        let group = SingleFlight::<u32>::new();
        let first = lead(&group);
        // Simulate the first leaving the map (as on publish) while a second
        // flight starts before the first's guard is gone.
        group.flights.lock().remove("k");
        let second = lead(&group);
        first.publish(1, u64::MAX);
        assert_eq!(group.len(), 1);
        second.publish(2, u64::MAX);
        assert_eq!(group.len(), 0);
    }

    #[test]
    fn follower_times_out() {
        let group = SingleFlight::<u32>::new();
        let _leader = lead(&group);
        let follower = follow(&group);
        let deadline = Instant::now() + Duration::from_millis(20);
        assert_eq!(follower.wait(deadline), Err(WaitError::TimedOut));
    }
}
