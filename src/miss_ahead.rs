//! A miss at the cost of the naive miss: while an engine's reads mostly
//! miss ([`Streak`]), a plain read claims its lease in its lookup's round
//! trip ([`Ahead`]), and the engine hands the fill to its background pool
//! (`Engine::load_fill_behind`). The lease protocol is unchanged: the same
//! acquire and fill scripts, so a fill that raced a write is still dropped.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::time::Instant;

use parking_lot::{Condvar, Mutex};

use crate::cache::{Cache, Raw};
use crate::entry::now_ms;
use crate::error::Result;
use crate::keeper::Keeper;
use crate::keys::Keys;
use crate::lease::{self, Acquired, Token, Ttls, new_token};

/// A plain read that claims its lease in its lookup's round trip
/// ([`lease::lookup_and_lease`]): a miss then costs the `GET`, the load and
/// the fill, as the naive miss does, instead of a separate claim first. On
/// a hit the claim took nothing (the script returns a fresh value instead),
/// so only reads of an engine whose reads mostly miss ([`Streak`]) do it.
pub(crate) struct Ahead {
    /// [`Behind::landings`] before the lookup.
    landings: u64,
    keys: Keys,
    token: Token,
    /// The claim's reply, until the miss path reads it (`None`: claim
    /// again, with the same token).
    pub(crate) claimed: Option<Result<Acquired>>,
}

/// What an [`Ahead`] lookup hands the miss path.
pub(crate) struct AheadClaim {
    pub(crate) token: Token,
    /// The claim's reply if still unread (`None`: claim again, same token).
    pub(crate) claimed: Option<Result<Acquired>>,
    /// [`Behind::landings`] before the lookup.
    pub(crate) landings: u64,
}

impl Ahead {
    /// The keys, and what the miss path needs of the claim.
    pub(crate) fn into_parts(self) -> (Keys, AheadClaim) {
        let claim = AheadClaim {
            token: self.token,
            claimed: self.claimed,
            landings: self.landings,
        };
        (self.keys, claim)
    }

    pub(crate) fn new(value_key: &str, landings: u64) -> Ahead {
        Ahead {
            landings,
            keys: Keys::for_value(value_key.to_owned()),
            token: new_token(),
            claimed: None,
        }
    }

    /// The lookup, with the claim behind it.
    pub(crate) fn lookup(&mut self, cache: &Cache, ttls: Ttls) -> Result<Raw> {
        match lease::lookup_and_lease(cache, &self.keys, &self.token, ttls, now_ms()) {
            Ok((raw, claimed)) => {
                self.claimed = Some(claimed);
                Ok(raw)
            }
            // The claim may have run on the server: the read goes on
            // without Redis, and `unused` releases it when Redis answers.
            Err(err) => Err(err),
        }
    }

    /// The read ended without a miss through Redis: give back what the
    /// claim may have taken (a value deleted between the GET and the
    /// script leaves a lease).
    pub(crate) fn unused(self, keeper: &Arc<Keeper>) {
        if !matches!(self.claimed, Some(Ok(Acquired::Cached(_)))) {
            keeper.orphan(&self.keys, self.token);
        }
    }
}

/// Whether an engine's reads mostly miss Redis lately: a score that a miss
/// raises by two and a hit lowers by one, within `0..=MAX`; at `ON` or more
/// a plain read claims its lease ahead ([`Ahead`]). It stays up while more
/// than a third of reads miss. Read and written with plain loads and
/// stores: a lost update only delays the switch by a read.
#[derive(Default)]
pub(crate) struct Streak(AtomicU32);

impl Streak {
    const MAX: u32 = 16;
    const ON: u32 = 8;

    pub(crate) fn expects_miss(&self) -> bool {
        self.0.load(Relaxed) >= Self::ON
    }

    pub(crate) fn miss(&self) {
        let s = self.0.load(Relaxed);
        if s < Self::MAX {
            self.0.store((s + 2).min(Self::MAX), Relaxed);
        }
    }

    pub(crate) fn hit(&self) {
        let s = self.0.load(Relaxed);
        if s > 0 {
            self.0.store(s - 1, Relaxed);
        }
    }
}

/// The fills an engine handed to its background pool that have not landed,
/// by value key: a read of this process that finds such a fill's lease held
/// waits for it (within its deadline) and reads what it stored, instead of
/// loading again. So a read right after a miss in the same process costs
/// no second query, as when the fill ran on the caller's path.
#[derive(Default)]
pub(crate) struct Behind {
    /// Held only to insert, look up and remove; never across I/O.
    fills: Mutex<HashMap<Box<str>, Arc<Landing>>>,
    /// Fills landed so far: a read that finds a lease held though no fill
    /// of its key is pending notes whether one landed since it began (its
    /// own key's fill may have landed between its claim and its look).
    landed: AtomicU64,
}

/// One fill's landing: `landed` (guarded by its mutex) turns true when the
/// fill's job ends, on every path (its [`Pending`] drops).
#[derive(Default)]
struct Landing {
    landed: Mutex<bool>,
    wake: Condvar,
}

/// A fill not landed yet; dropping it (when the job ends, or if the job is
/// dropped unrun) marks it landed and wakes its waiters.
pub(crate) struct Pending {
    behind: Arc<Behind>,
    key: Box<str>,
    landing: Arc<Landing>,
}

impl Behind {
    /// Notes a fill of `value_key` handed off now.
    pub(crate) fn start(self: &Arc<Self>, value_key: &str) -> Pending {
        let landing = Arc::new(Landing::default());
        self.fills
            .lock()
            .insert(value_key.into(), Arc::clone(&landing));
        Pending {
            behind: Arc::clone(self),
            key: value_key.into(),
            landing,
        }
    }

    /// Fills landed so far.
    pub(crate) fn landings(&self) -> u64 {
        self.landed.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Waits until the pending fill of `value_key`, if any, has landed;
    /// false if there was none or `deadline` came first.
    pub(crate) fn wait(&self, value_key: &str, deadline: Instant) -> bool {
        let Some(landing) = self.fills.lock().get(value_key).cloned() else {
            return false;
        };
        let mut landed = landing.landed.lock();
        while !*landed {
            if landing.wake.wait_until(&mut landed, deadline).timed_out() {
                return *landed;
            }
        }
        true
    }

    /// Fills not landed yet.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.fills.lock().len()
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.behind
            .landed
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        *self.landing.landed.lock() = true;
        self.landing.wake.notify_all();
        let mut fills = self.behind.fills.lock();
        // Only if still ours: a later fill of the key may have replaced it.
        if fills
            .get(&self.key)
            .is_some_and(|l| Arc::ptr_eq(l, &self.landing))
        {
            fills.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Arc, Behind, Instant, Streak};
    use std::time::Duration;

    #[test]
    fn landed_fills_leave_the_map_and_are_counted() {
        let behind = Arc::new(Behind::default());
        assert!(!behind.wait("k", Instant::now()), "nothing pending");
        let first = behind.start("k");
        let second = behind.start("k");
        assert!(!behind.wait("k", Instant::now() + Duration::from_millis(1)));
        drop(first);
        assert_eq!(behind.len(), 1, "the later fill is still pending");
        let landings = behind.landings();
        drop(second);
        assert_eq!(behind.len(), 0);
        assert_eq!(behind.landings(), landings + 1);
        assert!(!behind.wait("k", Instant::now() + Duration::from_secs(30)));
    }

    #[test]
    fn streak_turns_on_past_a_third_of_misses_and_off_under_hits() {
        let streak = Streak::default();
        for _ in 0..3 {
            streak.miss();
        }
        assert!(!streak.expects_miss());
        streak.miss();
        assert!(streak.expects_miss());
        // One miss in three keeps it where it is.
        for _ in 0..10 {
            streak.miss();
            streak.hit();
            streak.hit();
        }
        assert!(streak.expects_miss());
        for _ in 0..Streak::MAX {
            streak.hit();
        }
        assert!(!streak.expects_miss());
    }
}
