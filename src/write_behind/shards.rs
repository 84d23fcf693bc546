//! Where write-behind's streams live: one stream on a single server; on a
//! Redis Cluster, one per hash slot.
//!
//! The enqueue script writes a key's value, pending record and sequence
//! floor and appends to a stream in one atomic step, so on a cluster the
//! stream must share the key's slot. A key's stream is the stream of its
//! slot, `{namespace}{write_behind:N}:stream`, where `write_behind:N` is the
//! first name of that form that hashes to the slot (found once per process,
//! as rueidisaside precomputes a hash tag per slot); its dead-letter stream
//! is `…:dead` beside it. `write_behind:` is a reserved key prefix, so no
//! cache key can collide with them. Every change of a key goes to the same
//! stream, so per-key order is the stream's order, as on one server; and
//! the stream moves with its slot when the slot migrates.
//!
//! Workers must find the streams: a cluster-wide `SCAN` would cost too much
//! on a large cache, so a set, `{namespace}{write_behind}:streams`, lists the
//! slots that have one. A process adds a slot to it before its first enqueue
//! there (and again every [`REREGISTER_EVERY`], in case the set was lost), so
//! a stream is listed before it holds a change; workers read the set every
//! [`REFRESH_EVERY`].

use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::cache::Cache;
use crate::error::Result;
use crate::keys::{SLOTS, slot_of_tag};

/// How often a worker reads the list of streams again.
pub(super) const REFRESH_EVERY: Duration = Duration::from_millis(250);

/// How long a process trusts that a slot it listed is still listed.
const REREGISTER_EVERY: Duration = Duration::from_secs(10);

/// One stream of changes and its dead-letter stream, in one slot.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(super) struct StreamNames {
    /// The slot, on a cluster; `None` on a single server.
    pub(super) slot: Option<u16>,
    pub(super) stream: String,
    pub(super) dead: String,
}

/// The stream layout of one namespace.
pub(super) struct Streams {
    /// `{namespace}{write_behind}`: the single server's streams, and the
    /// base of the registry and the liveness keys.
    base: String,
    namespace: String,
    cluster: bool,
    /// The cluster's registry of slots with a stream.
    registry: String,
    /// Slots this process listed, and since when. Guarded by its mutex;
    /// never held across I/O.
    listed: Mutex<(Instant, Vec<bool>)>,
}

/// For each slot, the `N` of the first `write_behind:N` that hashes to it.
static SLOT_TAGS: once_cell::sync::Lazy<Vec<u32>> = once_cell::sync::Lazy::new(|| {
    let mut tags = vec![u32::MAX; usize::from(SLOTS)];
    let mut missing = usize::from(SLOTS);
    let mut n: u32 = 0;
    while missing > 0 {
        let slot = usize::from(slot_of_tag(&format!("write_behind:{n}")));
        if tags[slot] == u32::MAX {
            tags[slot] = n;
            missing -= 1;
        }
        n += 1;
    }
    tags
});

impl Streams {
    pub(super) fn new(cache: &Cache) -> Streams {
        let base = cache.redis_key("write_behind");
        Streams {
            registry: format!("{base}:streams"),
            base,
            namespace: cache.namespace().to_owned(),
            cluster: cache.is_cluster(),
            listed: Mutex::new((Instant::now(), vec![false; usize::from(SLOTS)])),
        }
    }

    /// `{namespace}{write_behind}`.
    pub(super) fn base(&self) -> &str {
        &self.base
    }

    /// True on a cluster (one stream per slot).
    pub(super) fn sharded(&self) -> bool {
        self.cluster
    }

    /// The streams of `slot` (cluster), or the one stream.
    pub(super) fn names(&self, slot: Option<u16>) -> StreamNames {
        let base = match slot {
            Some(slot) => crate::keys::value_key(
                &self.namespace,
                &format!("write_behind:{}", SLOT_TAGS[usize::from(slot)]),
            ),
            None => self.base.clone(),
        };
        StreamNames {
            slot,
            stream: format!("{base}:stream"),
            dead: format!("{base}:dead"),
        }
    }

    /// The streams `key`'s changes go to.
    pub(super) fn for_key(&self, key: &str) -> StreamNames {
        self.names(self.cluster.then(|| slot_of_tag(key)))
    }

    /// Lists `key`'s stream in the registry (cluster; once per
    /// [`REREGISTER_EVERY`] per slot and process), before a change goes
    /// onto it.
    pub(super) fn register(&self, cache: &Cache, key: &str) -> Result<()> {
        if !self.cluster {
            return Ok(());
        }
        let slot = slot_of_tag(key);
        {
            let mut listed = self.listed.lock();
            if listed.0.elapsed() > REREGISTER_EVERY {
                *listed = (Instant::now(), vec![false; usize::from(SLOTS)]);
            }
            if listed.1[usize::from(slot)] {
                return Ok(());
            }
        }
        cache.run(|conn| {
            redis::cmd("SADD")
                .arg(&self.registry)
                .arg(slot)
                .query::<i64>(conn)
        })?;
        self.listed.lock().1[usize::from(slot)] = true;
        Ok(())
    }

    /// Every stream of the namespace: the one, or those the registry lists.
    pub(super) fn all(&self, cache: &Cache) -> Result<Vec<StreamNames>> {
        Ok(self
            .slots(cache)?
            .into_iter()
            .map(|slot| self.names(slot))
            .collect())
    }

    /// The slots of [`all`](Self::all) (`None`: the single server's one
    /// stream), sorted.
    pub(super) fn slots(&self, cache: &Cache) -> Result<Vec<Option<u16>>> {
        if !self.cluster {
            return Ok(vec![None]);
        }
        let members: Vec<String> =
            cache.run(|conn| redis::cmd("SMEMBERS").arg(&self.registry).query(conn))?;
        let mut slots: Vec<u16> = members
            .iter()
            .filter_map(|m| m.parse::<u16>().ok())
            .filter(|slot| *slot < SLOTS)
            .collect();
        slots.sort_unstable();
        slots.dedup();
        Ok(slots.into_iter().map(Some).collect())
    }

    /// A dead letter's id as callers see it: the stream id, and on a
    /// cluster `@slot` after it (ids repeat across streams).
    pub(super) fn letter_id(names: &StreamNames, id: &str) -> String {
        match names.slot {
            Some(slot) => format!("{id}@{slot}"),
            None => id.to_owned(),
        }
    }

    /// The dead-letter stream and stream id of a letter id from
    /// [`letter_id`](Self::letter_id); `None` if it is not one.
    pub(super) fn parse_letter_id(&self, letter: &str) -> Option<(StreamNames, String)> {
        let (id, slot) = match (self.cluster, letter.split_once('@')) {
            (true, Some((id, slot))) => (id, Some(slot.parse::<u16>().ok()?)),
            (false, None) => (letter, None),
            _ => return None,
        };
        if slot.is_some_and(|s| s >= SLOTS) {
            return None;
        }
        let (ms, n) = id.split_once('-')?;
        ms.parse::<u64>().ok()?;
        n.parse::<u64>().ok()?;
        Some((self.names(slot), id.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_slot_has_a_tag_that_hashes_to_it() {
        for (slot, n) in SLOT_TAGS.iter().enumerate() {
            assert_eq!(usize::from(slot_of_tag(&format!("write_behind:{n}"))), slot);
        }
    }
}
