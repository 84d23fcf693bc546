//! Batch reads and invalidations: many keys in one call
//! ([`crate::batch`]).

use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{CacheAside, pair};
use crate::batch::Row;
use crate::config::EntryOptions;
use crate::engine::to_json;
use crate::entry::Versioned;
use crate::error::Result;

impl CacheAside {
    /// Reads many keys at once: one answer per key, in the order of `keys`
    /// (`None` for a row the source does not have). The hits cost one Redis
    /// round trip (`MGET`; on a Redis Cluster a pipeline per node, sent
    /// together), and one
    /// `load` call loads every missing key: `load` gets the list of missing
    /// keys and returns the rows it found as `(key, value)` pairs, in any
    /// order; a key it does not return is cached as absent (for the
    /// negative TTL), as [`get_or_load`](Self::get_or_load) caches a `None`.
    /// The misses' leases are claimed in one pipelined round trip, and the
    /// loaded rows filled in another, each under its own key's lease.
    ///
    /// Every rule of the single-key read holds per key: a key another
    /// caller (a thread, or another process) is loading is waited for, not
    /// loaded again; a write that invalidates one key while the batch loads
    /// drops that key's fill, not the others'; an entry that does not decode
    /// as `T` is a miss. A key given twice is read once and answered twice.
    /// With the near cache on, it answers first. `load` is called once,
    /// unless another process held some keys' rebuild locks past
    /// [`Config::lock_wait`](crate::Config::lock_wait) (they are then loaded in another call), or a
    /// write sent some keys back to be read again. Early refresh (XFetch)
    /// and the soft timeout do not apply to batches.
    ///
    /// Blocks the calling thread; from async code call it inside
    /// `tokio::task::spawn_blocking`.
    ///
    /// # Errors
    /// As [`get_or_load`](Self::get_or_load), for the first key that
    /// failed (the whole call fails then; keys with a fail-safe copy get
    /// the copy instead).
    ///
    /// ```no_run
    /// # let engine = cacheaside::CacheAside::open(&cacheaside::Config::from_env())?;
    /// use std::time::Duration;
    /// let keys = ["product:1", "product:2", "product:3"];
    /// let names: Vec<Option<String>> =
    ///     engine.get_or_load_many(&keys, Duration::from_secs(60), |missing| {
    ///         let ids: Vec<i64> = missing.iter().filter_map(|k| k[8..].parse().ok()).collect();
    ///         let rows = engine.db().query("SELECT id, name FROM products WHERE id = ANY($1)", &[&ids])?;
    ///         Ok(rows.iter().map(|r| (format!("product:{}", r.get::<_, i64>(0)), r.get(1))).collect())
    ///     })?;
    /// assert_eq!(names.len(), 3);
    /// # Ok::<(), cacheaside::Error>(())
    /// ```
    pub fn get_or_load_many<K, T, F>(
        &self,
        keys: &[K],
        ttl: Duration,
        mut load: F,
    ) -> Result<Vec<Option<T>>>
    where
        K: AsRef<str>,
        T: Serialize + DeserializeOwned,
        F: FnMut(&[&str]) -> Result<Vec<(String, T)>>,
    {
        let options = self.entry_options().ttl(ttl);
        self.read_many(keys, &options, |missing| {
            let rows = load(missing)?;
            Ok(rows
                .into_iter()
                .map(|(k, v)| (k, Versioned::unversioned(v))))
        })
    }

    /// [`get_or_load_many`](Self::get_or_load_many) with entry options of
    /// this call's own (its TTLs and fail-safe; see
    /// [`get_or_load_with`](Self::get_or_load_with)), and rows with their
    /// versions ([`Versioned`]), for keys that are also written through.
    ///
    /// # Errors
    /// As [`get_or_load_many`](Self::get_or_load_many), and
    /// [`ErrorKind::InvalidArgument`](crate::ErrorKind::InvalidArgument) for options out of range.
    ///
    /// ```no_run
    /// # let engine = cacheaside::CacheAside::open(&cacheaside::Config::from_env())?;
    /// use cacheaside::Versioned;
    /// let options = engine.entry_options().ttl(std::time::Duration::from_secs(30));
    /// let prices: Vec<Option<i64>> = engine.get_or_load_many_with(&["price:A1", "price:B2"], &options, |missing| {
    ///     Ok(missing.iter().map(|k| (k.to_string(), Versioned::new(999_i64, 1))).collect())
    /// })?;
    /// # Ok::<(), cacheaside::Error>(())
    /// ```
    pub fn get_or_load_many_with<K, T, V, F>(
        &self,
        keys: &[K],
        options: &EntryOptions,
        mut load: F,
    ) -> Result<Vec<Option<T>>>
    where
        K: AsRef<str>,
        T: Serialize + DeserializeOwned,
        V: Into<Versioned<T>>,
        F: FnMut(&[&str]) -> Result<Vec<(String, V)>>,
    {
        self.read_many(keys, options, |missing| Ok(load(missing)?.into_iter()))
    }

    /// The batch read behind the `get_or_load_many*` methods: encodes what
    /// `load` returns as the engine stores it.
    fn read_many<K, T, V, I, F>(
        &self,
        keys: &[K],
        options: &EntryOptions,
        mut load: F,
    ) -> Result<Vec<Option<T>>>
    where
        K: AsRef<str>,
        T: Serialize + DeserializeOwned,
        V: Into<Versioned<T>>,
        I: Iterator<Item = (String, V)>,
        F: FnMut(&[&str]) -> Result<I>,
    {
        let keys: Vec<&str> = keys.iter().map(AsRef::as_ref).collect();
        let mut encoded = |missing: &[&str]| -> Result<Vec<Row>> {
            load(missing)?
                .map(|(key, row)| {
                    let (value, version) = pair(row);
                    Ok(Row {
                        key,
                        json: to_json(&value)?,
                        version,
                    })
                })
                .collect()
        };
        self.inner.engine.read_many(&keys, *options, &mut encoded)
    }

    /// [`invalidate`](Self::invalidate) for many keys at once: one Redis
    /// round trip on a single server (on a cluster, one per node, sent
    /// together).
    /// Call it after the write to the source has committed.
    ///
    /// # Errors
    /// Cache errors and timeouts (the circuit breaker then opens, as for
    /// one key); [`ErrorKind::InvalidArgument`](crate::ErrorKind::InvalidArgument) for an empty key or one
    /// holding `{` or `}` (then nothing is invalidated).
    ///
    /// ```no_run
    /// # let engine = cacheaside::CacheAside::open(&cacheaside::Config::from_env())?;
    /// engine.invalidate_many(&["product:1", "product:2"])?;
    /// # Ok::<(), cacheaside::Error>(())
    /// ```
    pub fn invalidate_many<K: AsRef<str>>(&self, keys: &[K]) -> Result<()> {
        let keys: Vec<&str> = keys.iter().map(AsRef::as_ref).collect();
        self.inner.engine.invalidate_many(&keys)
    }
}
