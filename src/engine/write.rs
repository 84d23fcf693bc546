//! The write side of the engine: invalidation and write-through, and
//! the guards that keep the near cache and the writers set right on every
//! path (errors and panics too).

use std::time::{Duration, Instant};

use serde::Serialize;

use super::{Engine, to_json};
use crate::breaker::Permit;
use crate::cache::Cache;
use crate::entry::{Entry, Payload};
use crate::error::{Error, Result};
use crate::lease::{self, Keys, new_token};
use crate::near::Near;

impl Engine {
    /// Evicts `key` from L1 when the guard drops: after a write's Redis
    /// command, on every path (errors and panics too), before the write
    /// returns. Evicting before the Redis command would not do: a reader of
    /// this process could put the old value back from Redis in between.
    pub(crate) fn evict_on_return(&self, key: &str) -> Option<EvictOnReturn<'_>> {
        let near = self.near.as_deref()?;
        Some(EvictOnReturn {
            near,
            key: key.to_owned(),
        })
    }

    pub(crate) fn invalidate(&self, key: &str) -> Result<()> {
        self.flights.note_write(key);
        let _evict = self.evict_on_return(key);
        let keys = self.cache.keys(key);
        // The fence before the lease goes: a reader that takes a lease
        // after this must find it raised (see crate::fence).
        self.raise_fences([(&keys, None)])
            .and_then(|()| lease::invalidate(&self.cache, &keys))
            .map_err(|err| self.invalidation_failed(err))
    }

    /// Records an invalidation that failed (`err`, handed back): counted,
    /// and this process stops trusting the cache.
    pub(crate) fn invalidation_failed(&self, err: Error) -> Error {
        self.counters.invalidations_failed.bump();
        self.cache_failed(Permit::Use, &err);
        // This process must not read what may now be stale.
        self.breaker.trip(&err);
        err
    }

    pub(crate) fn write_through<T, F>(
        &self,
        key: &str,
        ttl: Duration,
        write: F,
        covered: impl Fn() -> bool,
    ) -> Result<Option<T>>
    where
        T: Serialize,
        F: FnOnce() -> Result<Option<(T, u64)>>,
    {
        let _evict = self.evict_on_return(key);
        let keys = self.cache.keys(key);
        let token = new_token();
        let writer =
            match lease::register_writer(&self.cache, &keys, &token, self.settings.call_deadline) {
                Ok(()) => Some(Writer {
                    cache: &self.cache,
                    keys: &keys,
                    token: &token,
                }),
                Err(err) if covered() => {
                    // Redis is out; the write itself can go ahead: the outbox
                    // row it commits will invalidate the key once Redis is back.
                    self.cache_failed(Permit::Use, &err);
                    self.breaker.trip(&err);
                    None
                }
                Err(err) => {
                    self.cache_failed(Permit::Use, &err);
                    return Err(err);
                }
            };
        let started = Instant::now();
        let Some((value, version)) = write()? else {
            return Ok(None);
        };
        // The row changed: a flight of this key that loaded before the
        // commit must not hand its older row to followers that join from
        // now on. (With the cache in use they would find this write's value
        // cached first; with the breaker open they go straight to a flight.)
        self.flights.note_write(key);
        #[cfg(feature = "test-hooks")]
        self.hooks.after_write(key);
        let Some(writer) = writer else {
            return Ok(Some(value));
        };
        let json = to_json(&value)?;
        // XFetch needs a load time: the write's, with a floor, so an entry
        // written through is refreshed early like one that was loaded.
        let took = started.elapsed().max(Duration::from_millis(1));
        let raw = Entry::new(Payload::Value(&json), version, took, ttl).encode();
        let physical = ttl.saturating_add(self.settings.defaults.fail_safe_max);
        let written = self.raise_fences([(&keys, Some(version))]).and_then(|()| {
            lease::write_through(&self.cache, &keys, &token, &raw, version, physical)
        });
        match written {
            Ok(_) => {
                writer.consumed();
                Ok(Some(value))
            }
            Err(err) => {
                // The write committed, and the cache may hold the row before
                // it: remove that.
                self.cache_failed(Permit::Use, &err);
                drop(writer);
                match self.invalidate(key) {
                    Ok(()) => Ok(Some(value)),
                    Err(_) if covered() => Ok(Some(value)),
                    Err(err) => Err(err),
                }
            }
        }
    }
}

/// See [`Engine::evict_on_return`].
pub(crate) struct EvictOnReturn<'a> {
    near: &'a Near,
    /// The caller's key (L1 is keyed by it).
    key: String,
}

impl Drop for EvictOnReturn<'_> {
    fn drop(&mut self) {
        self.near.evict(&self.key);
    }
}

/// Removes a write-through writer's token on every path but success
/// (errors, panics), so tokens never pile up in the writers set.
struct Writer<'a> {
    cache: &'a Cache,
    keys: &'a Keys,
    token: &'a str,
}

impl Writer<'_> {
    /// The write-through script removed the token.
    fn consumed(self) {
        std::mem::forget(self);
    }
}

impl Drop for Writer<'_> {
    fn drop(&mut self) {
        // Best effort: a token left behind expires with its set.
        let _ = lease::unregister_writer(self.cache, self.keys, self.token);
    }
}
