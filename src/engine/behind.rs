//! The engine's side of a miss at the cost of the naive miss
//! ([`crate::miss_ahead`]): a loader built only on a miss, the fill handed
//! to the background pool, and a read that finds the lease of this
//! process's own pending fill waiting for it.

use super::{Answer, Engine, Load, LoadResult, Miss, answer_of};
use crate::background::Background;
use crate::cache::Raw;
use crate::error::Result;
use crate::keeper::Hold;

/// An owned loader built only when a read misses, by the function it
/// holds: a hit clones nothing (no `Arc` of the pool or the SQL) for a
/// loader it does not run.
pub(crate) struct Deferred<M>(pub(crate) M);

impl<M, F> Load for Deferred<M>
where
    M: FnOnce() -> F,
    F: FnOnce() -> LoadResult + Send + 'static,
{
    fn run(self) -> LoadResult {
        (self.0)()()
    }

    fn detach(self) -> Result<Box<dyn FnOnce() -> LoadResult + Send>, Self> {
        Ok(Box::new((self.0)()))
    }
}

impl Engine {
    /// A plain miss of a mostly-missing engine ([`Ahead`]) loads, hands the
    /// fill (under the lease `hold`, as ever) to the background pool and
    /// returns the row: the caller does not wait for the fill's round trip.
    /// A plain miss has no followers to hand the row to; a read that comes
    /// before the fill lands finds the lease held and loads for itself, as
    /// concurrent plain misses do. (With a fail-safe copy the miss stays on
    /// the caller's path, where the soft timeout is handled.)
    pub(super) fn load_fill_behind<L: Load>(
        &self,
        bg: &Background,
        m: &Miss<'_>,
        load: L,
        hold: Hold,
    ) -> Result<Answer> {
        let loaded = load.run();
        #[cfg(feature = "test-hooks")]
        self.hooks.after_load(m.key);
        let loaded = match loaded {
            Ok(loaded) => loaded,
            // The hold drops and releases the lease.
            Err(err) => return self.load_failed(m, err),
        };
        let answer = answer_of(&loaded);
        let engine = self.clone();
        let (keys, opts) = (m.keys.clone(), m.opts);
        let pending = self.behind.start(&keys.value);
        let fill = Box::new(move || {
            engine.fill(&keys, &opts, hold, &loaded);
            drop(pending);
        });
        if let Err(fill) = bg.spawn(fill) {
            fill();
        }
        Ok(answer)
    }

    /// True if a miss of a mostly-missing engine that found `m`'s lease
    /// held may have found its own process's fill: one is pending (waited
    /// for, within the call's deadline) or one landed since the read began
    /// (`landings` noted before its lookup).
    pub(super) fn own_fill_landed(&self, m: &Miss<'_>, landings: u64) -> bool {
        self.behind.wait(&m.keys.value, m.deadline) || self.behind.landings() != landings
    }

    /// Reads what our own fill stored; loads (uncached) if it is not there.
    pub(super) fn read_own_fill<L: Load>(&self, m: &Miss<'_>, load: L) -> Result<Answer> {
        match self.cache.lookup(&m.keys.value) {
            Ok(Raw::Bytes(raw)) => match self.fresh_answer(m, &raw) {
                Some(answer) => Ok(answer),
                None => self.load_uncached(m, load),
            },
            Ok(_) => self.load_uncached(m, load),
            Err(err) => {
                self.cache_failed(m.permit, &err);
                self.load_uncached(m, load)
            }
        }
    }
}
