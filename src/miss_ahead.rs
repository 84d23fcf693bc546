//! A miss at the cost of the naive miss: while an engine's reads mostly
//! miss ([`Streak`]), a plain read claims its lease in its lookup's round
//! trip ([`Ahead`]), and the engine hands the fill to its background pool
//! (`Engine::load_fill_behind`). The lease protocol is unchanged: the same
//! acquire and fill scripts, so a fill that raced a write is still dropped.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering::Relaxed};

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
    pub(crate) keys: Keys,
    pub(crate) token: Token,
    /// The claim's reply, until the miss path reads it (`None`: claim
    /// again, with the same token).
    pub(crate) claimed: Option<Result<Acquired>>,
}

impl Ahead {
    pub(crate) fn new(value_key: &str) -> Ahead {
        Ahead {
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

#[cfg(test)]
mod tests {
    use super::Streak;

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
