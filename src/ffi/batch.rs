//! Batch reads and invalidation on the generic engine handle:
//! `cacheaside_engine_get_or_load_many` (with its loader,
//! `cacheaside_batch_loader`, which hands rows back through
//! `cacheaside_batch_rows_set`) and `cacheaside_engine_invalidate_many`.

use std::ffi::{CString, c_char, c_int, c_void};
use std::time::Duration;

use super::Zeroed;
use super::bytes::cacheaside_bytes;
use super::cacheaside_status::{self, *};
use super::client::status;
use super::engine::cacheaside_engine;
use super::error::fail;
use super::value::Value;
use crate::entry::Versioned;
use crate::error::{Error, Result};

/// The rows a `cacheaside_batch_loader` found (opaque): one slot per key
/// it was asked for, empty until `cacheaside_batch_rows_set()` fills it.
///
/// Ownership: the library's; a loader borrows it for its call only.
pub struct cacheaside_batch_rows {
    /// Per key asked: the value's bytes and the row's version.
    rows: Vec<Option<(Vec<u8>, u64)>>,
}

/// A batch loader: loads the rows of the `n_keys` missing `keys` (e.g. one
/// `SELECT ... WHERE id = ANY($1)`), and for each row it found calls
/// `cacheaside_batch_rows_set(rows, i, ...)`, `i` being the key's index in
/// `keys`. It returns `CACHEASIDE_OK` (a key whose row was not set is
/// cached as absent, for the negative TTL), or any other value to fail:
/// the read then returns `CACHEASIDE_LOADER_ERROR` and nothing is cached.
///
/// Threads and reentrancy: as `cacheaside_loader`. While it runs, every
/// key it was given is held by this read (other threads and processes
/// asking for those keys wait for it); it must not read one of them
/// through the library, and must not unwind out of the callback.
///
/// Ownership: `keys` (the array and its strings) and `rows` are borrowed
/// for the call.
pub type cacheaside_batch_loader = Option<
    unsafe extern "C" fn(
        user_data: *mut c_void,
        keys: *const *const c_char,
        n_keys: usize,
        rows: *mut cacheaside_batch_rows,
    ) -> c_int,
>;

/// Sets the row of key `index` (of the keys the loader was given): `len`
/// bytes at `data` (any bytes; NULL with `len` 0 is the empty value) at
/// `version` (any number that grows with every write of the row, or 0
/// for none). Setting a row twice keeps the second.
///
/// Returns `CACHEASIDE_INVALID_ARGUMENT` for a NULL `rows`, an `index` out
/// of range, or NULL `data` with a nonzero `len`.
///
/// Ownership: the library copies the bytes; the caller keeps `data`.
///
/// # Safety
/// `rows` is NULL or the pointer a batch loader was given, during its
/// call; `data` is NULL or points to `len` readable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_batch_rows_set(
    rows: *mut cacheaside_batch_rows,
    index: usize,
    data: *const c_void,
    len: usize,
    version: u64,
) -> cacheaside_status {
    ffi_panic_boundary! {
        let rows = non_null!(mut rows);
        let Some(slot) = rows.rows.get_mut(index) else {
            return fail(&Error::invalid_argument("`index` is past the keys the loader was given"));
        };
        let bytes = if len == 0 {
            Vec::new()
        } else if data.is_null() {
            return fail(&Error::invalid_argument("`data` is NULL but `len` is not 0"));
        } else {
            // SAFETY: the caller promises `len` readable bytes at `data`.
            unsafe { std::slice::from_raw_parts(data.cast::<u8>(), len) }.to_vec()
        };
        *slot = Some((bytes, version));
        CACHEASIDE_OK
    }
}

/// Reads `n_keys` keys at once: the hits in one Redis round trip, and every
/// missing key through one `loader` call (see `cacheaside_batch_loader`),
/// filled under each key's lease; single-flight per key, as
/// `cacheaside_engine_get_or_load()`. A key given twice is read once.
/// Blocks.
///
/// `out_values` points to `n_keys` `cacheaside_bytes`, which are zeroed
/// first; on success `out_values[i]` holds the value of `keys[i]`, or stays
/// zeroed (`data` NULL) when the source has no such row. (An empty value
/// has a non-NULL `data` and `len` 0.) `ttl_ms` is how long loaded values
/// stay cached (at least 1, at most the maximum TTL).
///
/// Returns `CACHEASIDE_OK`; `CACHEASIDE_LOADER_ERROR` when the loader
/// failed; `CACHEASIDE_INVALID_ARGUMENT` for NULL pointers (`keys` may be
/// NULL when `n_keys` is 0), a NULL, empty or non-UTF-8 key, a zero TTL,
/// or a loader reading a key it loads; cache and timeout statuses as
/// `cacheaside_engine_get_or_load()`. Every output is zeroed unless the
/// call succeeds.
///
/// Ownership: the caller owns each `out_values[i]` and frees it with
/// `cacheaside_bytes_free()` (freeing a zeroed one is a no-op). `keys` is
/// only read; `user_data` is only passed to the loader. Thread-safe.
///
/// ```c
/// const char *keys[] = {"product:1", "product:2", "product:3"};
/// cacheaside_bytes values[3];
/// if (cacheaside_engine_get_or_load_many(engine, keys, 3, 60000, load_products, db, values)
///         == CACHEASIDE_OK) {
///     for (size_t i = 0; i < 3; i++) {
///         if (values[i].data != NULL) puts((const char *)values[i].data);
///         cacheaside_bytes_free(&values[i]);
///     }
/// }
/// ```
///
/// # Safety
/// `engine` is NULL or a live engine; `keys` is NULL or points to `n_keys`
/// pointers, each NULL or a NUL-terminated string; `loader` is NULL or a
/// function of the documented shape; `out_values` is NULL or points to
/// writable storage for `n_keys` `cacheaside_bytes` (their old contents are
/// not freed).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_engine_get_or_load_many(
    engine: *const cacheaside_engine,
    keys: *const *const c_char,
    n_keys: usize,
    ttl_ms: u64,
    loader: cacheaside_batch_loader,
    user_data: *mut c_void,
    out_values: *mut cacheaside_bytes,
) -> cacheaside_status {
    ffi_panic_boundary! {
        let out_values = non_null!(raw out_values);
        for i in 0..n_keys {
            // SAFETY: the caller promises room for `n_keys` values; `write`
            // does not read the (maybe uninitialized) old ones.
            unsafe { out_values.add(i).write(cacheaside_bytes::ZEROED) };
        }
        let engine = non_null!(engine);
        // SAFETY: as the caller promises.
        let keys = match unsafe { key_list(keys, n_keys) } {
            Ok(keys) => keys,
            Err(err) => return fail(&err),
        };
        let Some(loader) = loader else {
            return fail(&Error::invalid_argument("`loader` is NULL"));
        };
        let options = engine.inner.entry_options().ttl(Duration::from_millis(ttl_ms));
        let result = engine.inner.get_or_load_many_with(&keys, &options, |missing| {
            // SAFETY: a loader of the documented shape.
            unsafe { call_batch_loader(loader, user_data, missing) }
        });
        match result {
            Ok(values) => {
                for (i, value) in values.into_iter().enumerate() {
                    if let Some(Value(bytes)) = value {
                        // SAFETY: zeroed above; room for `n_keys` values.
                        unsafe { *out_values.add(i) = cacheaside_bytes::from_vec(bytes) };
                    }
                }
                CACHEASIDE_OK
            }
            Err(err) => fail(&err),
        }
    }
}

/// Removes the cached values of `n_keys` keys and revokes every reader's
/// lease on them, in one Redis round trip (on a cluster, one per node, sent
/// together); `cacheaside_engine_invalidate()` for many keys. Call it after
/// the write to the source has committed. Blocks.
///
/// Returns `CACHEASIDE_INVALID_ARGUMENT` for NULL pointers (`keys` may be
/// NULL when `n_keys` is 0) or a NULL, empty or non-UTF-8 key (nothing is
/// invalidated then); `CACHEASIDE_CACHE_ERROR` or `CACHEASIDE_TIMEOUT` when
/// Redis fails.
///
/// Ownership: `keys` is only read. Thread-safe.
///
/// # Safety
/// `engine` is NULL or a live engine; `keys` is NULL or points to `n_keys`
/// pointers, each NULL or a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_engine_invalidate_many(
    engine: *const cacheaside_engine,
    keys: *const *const c_char,
    n_keys: usize,
) -> cacheaside_status {
    ffi_panic_boundary! {
        let engine = non_null!(engine);
        // SAFETY: as the caller promises.
        match unsafe { key_list(keys, n_keys) } {
            Ok(keys) => status(engine.inner.invalidate_many(&keys)),
            Err(err) => fail(&err),
        }
    }
}

/// The keys of a C array, checked: none NULL, each UTF-8.
///
/// # Safety
/// `keys` is NULL or points to `n_keys` pointers, each NULL or a live
/// NUL-terminated string.
unsafe fn key_list<'a>(keys: *const *const c_char, n_keys: usize) -> Result<Vec<&'a str>> {
    if n_keys == 0 {
        return Ok(Vec::new());
    }
    if keys.is_null() {
        return Err(Error::invalid_argument("`keys` is NULL"));
    }
    (0..n_keys)
        .map(|i| {
            // SAFETY: `keys` holds `n_keys` pointers, as the caller promises.
            let key = unsafe { *keys.add(i) };
            if key.is_null() {
                return Err(Error::invalid_argument(format!("`keys[{i}]` is NULL")));
            }
            // SAFETY: a live NUL-terminated string, as the caller promises.
            unsafe { std::ffi::CStr::from_ptr(key) }
                .to_str()
                .map_err(|_| Error::invalid_argument(format!("`keys[{i}]` is not valid UTF-8")))
        })
        .collect()
}

/// Runs a C batch loader on `missing` and turns the rows it set into the
/// engine's terms.
///
/// # Safety
/// `loader` is a function of the shape `cacheaside_batch_loader` documents.
unsafe fn call_batch_loader(
    loader: unsafe extern "C" fn(
        *mut c_void,
        *const *const c_char,
        usize,
        *mut cacheaside_batch_rows,
    ) -> c_int,
    user_data: *mut c_void,
    missing: &[&str],
) -> Result<Vec<(String, Versioned<Value>)>> {
    // The keys came from C strings, so they hold no NUL.
    let owned: Vec<CString> = missing
        .iter()
        .map(|k| CString::new(*k).map_err(|_| Error::invalid_argument("a key holds a NUL byte")))
        .collect::<Result<_>>()?;
    let pointers: Vec<*const c_char> = owned.iter().map(|k| k.as_ptr()).collect();
    let mut rows = cacheaside_batch_rows {
        rows: vec![None; missing.len()],
    };
    // SAFETY: as the caller promises; `pointers`, `owned` and `rows`
    // outlive the call.
    let code = unsafe { loader(user_data, pointers.as_ptr(), pointers.len(), &mut rows) };
    if code != CACHEASIDE_OK as c_int {
        return Err(Error::loader(std::io::Error::other(format!(
            "the batch loader returned status {code}"
        ))));
    }
    Ok(missing
        .iter()
        .zip(rows.rows)
        .filter_map(|(key, row)| {
            let (bytes, version) = row?;
            Some(((*key).to_owned(), Versioned::new(Value(bytes), version)))
        })
        .collect())
}
