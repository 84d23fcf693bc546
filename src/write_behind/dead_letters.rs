//! What an operator does with the dead-letter stream: replay a change
//! (enqueue it again through the normal path, then remove it from the
//! stream) or drop it.
//!
//! Guarantees:
//! - A replay never takes a key back in time: a dead letter whose key has
//!   been given a newer write-behind change since (the key's sequence
//!   record is past the letter's number) is left in the stream and reported
//!   as superseded. (A synchronous write of the key since the letter is not
//!   seen: replaying is the operator's decision that the letter's value is
//!   the one to keep.)
//! - A replayed change is enqueued before its letter is removed: a crash in
//!   between leaves the letter, and replaying it again finds it superseded
//!   by its own copy. Nothing is lost.
//! - A letter whose key or value cannot be replayed (a poison entry: no
//!   key, a reserved key, a value that is not JSON, or was cut) is left
//!   and reported as unreadable.

use std::collections::BTreeMap;
use std::time::Duration;

use super::{MAX_VALUE_BYTES, WriteBehind, refuse_while_bypassing};
use crate::cache::{Cache, check_key};
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::lease::Json;

/// What [`CacheAside::replay_dead_letters`](crate::CacheAside::replay_dead_letters)
/// did with each dead letter it looked at (by dead-letter stream id).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReplayReport {
    /// Enqueued again and removed from the dead-letter stream.
    pub replayed: Vec<String>,
    /// Left in the stream: the key has a newer write-behind change.
    pub superseded: Vec<String>,
    /// Left in the stream: no replayable key or JSON value.
    pub unreadable: Vec<String>,
}

impl WriteBehind {
    /// Replays the oldest `count` dead letters, each cached for `ttl`.
    pub fn replay_dead_letters(
        &self,
        engine: &Engine,
        count: usize,
        ttl: Duration,
    ) -> Result<ReplayReport> {
        refuse_while_bypassing(engine)?;
        let mut report = ReplayReport::default();
        for letter in self.dead_letters(&engine.cache, count)? {
            let (Some(key), Some(json)) = (&letter.key, &letter.json) else {
                report.unreadable.push(letter.id);
                continue;
            };
            let parses = serde_json::from_str::<serde::de::IgnoredAny>(json).is_ok();
            if check_key(key).is_err() || !parses || json.len() > MAX_VALUE_BYTES {
                report.unreadable.push(letter.id);
                continue;
            }
            let floor = letter.seq.unwrap_or(0);
            let seq_key = engine.cache.keys(key).seq;
            let last: Option<u64> = engine
                .cache
                .run(|conn| redis::cmd("GET").arg(&seq_key).query(conn))?;
            if last.is_some_and(|last| last > floor) {
                report.superseded.push(letter.id);
                continue;
            }
            self.enqueue_registered(engine, key, ttl, Json::Whole(json.as_bytes()), floor)?;
            self.remove_dead_letters(&engine.cache, &[letter.id.as_str()])?;
            report.replayed.push(letter.id);
        }
        Ok(report)
    }

    /// Removes the dead letters `ids` (stream ids, `<ms>-<n>`; on a
    /// cluster `<ms>-<n>@<slot>`, as [`WriteBehind::dead_letters`] names
    /// them); returns how many were there.
    pub fn remove_dead_letters(&self, cache: &Cache, ids: &[&str]) -> Result<u64> {
        let mut by_stream: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for id in ids {
            let Some((names, id)) = self.shared.streams.parse_letter_id(id) else {
                let form = if self.shared.streams.sharded() {
                    "<milliseconds>-<sequence>@<slot>"
                } else {
                    "<milliseconds>-<sequence>"
                };
                return Err(Error::invalid_argument(format!(
                    "{id:?} is not a dead letter's id ({form})"
                )));
            };
            by_stream.entry(names.dead).or_default().push(id);
        }
        let mut removed = 0;
        for (dead, ids) in by_stream {
            removed +=
                cache.run(|conn| redis::cmd("XDEL").arg(&dead).arg(&ids).query::<u64>(conn))?;
        }
        Ok(removed)
    }
}
