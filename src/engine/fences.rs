//! Fences, for loads from a read replica ([`crate::fence`]).

use super::Engine;
use crate::error::Result;
use crate::fence::Source;
use crate::lease::Keys;
use crate::observe::report;

impl Engine {
    /// Raises the fences of `keys` to their committed versions (`None`:
    /// unknown) before a write's cache step reaches them; nothing without a
    /// replica.
    pub(crate) fn raise_fences<'k>(
        &self,
        keys: impl IntoIterator<Item = (&'k Keys, Option<u64>)>,
    ) -> Result<()> {
        let Some(ttl) = self.settings.fence else {
            return Ok(());
        };
        let fences: Vec<(&str, Option<u64>)> = keys
            .into_iter()
            .map(|(keys, version)| (keys.value.as_str(), version))
            .collect();
        match crate::fence::raise(&self.cache, &fences, ttl) {
            // Redis answered but refused the write (out of memory): the
            // invalidation must still go (a DEL is accepted), or the old
            // row would stay cached, and the relay would retry for ever.
            // No fill can land on a Redis that refuses writes either; a
            // read around the cache may find the replica behind (the limit
            // docs/replicas.md states).
            Err(err) if !err.is_outage() && !err.is_timeout() => {
                report!(warn, "a replica fence was refused: {}", err.chain());
                Ok(())
            }
            raised => raised,
        }
    }

    /// [`raise_fences`](Self::raise_fences) for changes the relay read
    /// from the outbox, each with its captured version (none for a delete
    /// or a table without a version column).
    pub(crate) fn raise_captured_fences(&self, changes: &[(Keys, Option<i64>)]) -> Result<()> {
        self.raise_fences(
            changes
                .iter()
                .map(|(keys, version)| (keys, version.and_then(|v| u64::try_from(v).ok()))),
        )
    }

    /// Where a load of `key` reads: the replica under the key's fence, or
    /// the primary when there is no replica.
    pub(crate) fn source(&self, key: &str) -> Source {
        Source::new(
            &self.db,
            &self.cache,
            key,
            &self.breaker,
            &self.counters,
            &self.replica_lag,
        )
    }
}
