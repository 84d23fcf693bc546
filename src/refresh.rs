//! Conditional refresh: a loader told the version it would replace may
//! answer that the row has not changed, and the cached entry's expiry is
//! then extended inside Redis ([`crate::lease::touch`]) instead of the
//! value being loaded, encoded and sent again.
//!
//! The loader is told a version when the read has a cached copy to
//! refresh: an early refresh (XFetch) of a fresh entry, or the reload of a
//! fail-safe copy past its TTL. The extension is lease-guarded like a
//! fill, and applies only while the entry is still at that version: a write
//! during the load revokes the lease, and a newer write-through changes
//! the version, so an "unchanged" answer never extends an older row.

use std::marker::PhantomData;
use std::sync::Arc;

use serde::Serialize;

use crate::engine::{Load, LoadResult, encoded};
use crate::entry::{Entry, Payload, Versioned};
use crate::error::{Error, Result};
use crate::observe::Counters;

/// What a conditional loader found
/// ([`CacheAside::get_or_load_conditional`](crate::CacheAside::get_or_load_conditional)).
///
/// ```
/// use cacheaside::{Refresh, Versioned};
/// // `cached`: the version the cache holds, if it has one to refresh.
/// fn load(cached: Option<u64>, row: Option<(String, u64)>) -> Refresh<String> {
///     match (cached, row) {
///         (Some(v), Some((_, version))) if version == v => Refresh::Unchanged,
///         (_, row) => Refresh::Loaded(row.map(|(name, version)| Versioned::new(name, version))),
///     }
/// }
/// assert!(matches!(load(Some(3), Some(("a".into(), 3))), Refresh::Unchanged));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Refresh<T> {
    /// The row as the source holds it now (`None`: it is gone), with its
    /// version: cached as any load is.
    Loaded(Option<Versioned<T>>),
    /// The row is still at the version the loader was given: the cached
    /// value is kept, and its expiry extended. Answering this when no
    /// version was given is an [`ErrorKind::InvalidArgument`](crate::ErrorKind).
    Unchanged,
}

/// A conditional loader as the engine runs it (on the calling thread).
pub(crate) struct Conditional<T, F> {
    load: F,
    counters: Arc<Counters>,
    /// The cached row the loader may find unchanged: its version and JSON.
    cached: Option<(u64, Vec<u8>)>,
    _value: PhantomData<fn() -> T>,
}

impl<T, F> Conditional<T, F> {
    pub(crate) fn new(counters: Arc<Counters>, load: F) -> Self {
        Conditional {
            load,
            counters,
            cached: None,
            _value: PhantomData,
        }
    }
}

impl<T, F> Load for Conditional<T, F>
where
    T: Serialize,
    F: FnOnce(Option<u64>) -> Result<Refresh<T>>,
{
    fn run(self) -> LoadResult {
        let given = self.cached.as_ref().map(|(version, _)| *version);
        let mut unchanged = false;
        let mut loaded = encoded(&self.counters, || match (self.load)(given)? {
            Refresh::Loaded(row) => Ok(row.map(|row| (row.value, row.version))),
            Refresh::Unchanged => {
                unchanged = true;
                Ok(None)
            }
        })?;
        if unchanged {
            let Some((version, json)) = self.cached else {
                return Err(Error::invalid_argument(
                    "the loader answered Refresh::Unchanged, but it was given no cached version",
                ));
            };
            loaded.json = Some(json);
            loaded.version = version;
            loaded.unchanged = true;
        }
        Ok(loaded)
    }

    fn detach(self) -> std::result::Result<Box<dyn FnOnce() -> LoadResult + Send>, Self> {
        Err(self)
    }

    /// Only a versioned value can be found unchanged: an absent entry or
    /// one of version 0 (unversioned) is loaded as usual.
    fn with_cached(mut self, raw: &[u8]) -> Self {
        self.cached = match Entry::decode(raw) {
            Ok(Entry {
                version,
                payload: Payload::Value(json),
                ..
            }) if version > 0 => Some((version, json.to_vec())),
            _ => None,
        };
        self
    }
}
