//! `cacheaside_engine`: the generic engine ([`CacheAside`]) from C, for
//! caching a table of your own: change capture, single-flight and plain
//! reads, versioned reads and write-through, invalidation, the relay and
//! the counters. Opening one registers nothing for the lab's users table.
//!
//! Also the lab client's generic reads (`cacheaside_client_get_or_load`,
//! `cacheaside_client_invalidate`), which share the loader plumbing.

use std::ffi::{c_char, c_void};
use std::time::Duration;

use super::bytes::{
    cacheaside_bytes, cacheaside_loader, cacheaside_versioned_loader, call_loader,
    call_versioned_loader,
};
use super::cacheaside_status::{self, *};
use super::client::{cacheaside_client, cacheaside_stats, status, write_stats};
use super::config::cacheaside_config;
use super::error::fail;
use super::value::Value;
use crate::Mode;
use crate::aside::CacheAside;
use crate::error::{Error, Result};

/// The cache-aside engine, for any table or key of yours (opaque): Redis
/// in front of your loaders, with leases against stale fills,
/// single-flight, XFetch early refresh, change capture through the
/// invalidation relay, write-through with versions.
///
/// Ownership: created by `cacheaside_engine_open()`, freed by
/// `cacheaside_engine_free()`.
///
/// Thread safety: share one engine between all threads; every function
/// taking a `const cacheaside_engine *` may be called concurrently, without
/// external locking. Every such function blocks the calling thread.
pub struct cacheaside_engine {
    pub(super) inner: CacheAside,
}

// The header promises that one engine serves many threads at once.
const _: () = {
    const fn shared_between_threads<T: Send + Sync>() {}
    shared_between_threads::<cacheaside_engine>();
};

/// Opens an engine for PostgreSQL and Redis as `config` says and stores
/// it in `*out`. The config's users table and `ttl` are the lab's and not
/// used: each read names its own TTL (absences are cached for the
/// config's negative TTL).
///
/// Does not wait for either server: connections open lazily, so this
/// returns at once and succeeds while a server is down; calls then degrade
/// or fail with the cause. The invalidation relay starts with
/// `cacheaside_engine_capture_changes()` (or
/// `cacheaside_engine_start_relay()`).
///
/// `*out` is set to NULL first and to the engine on success only.
///
/// Returns `CACHEASIDE_INVALID_ARGUMENT` for a NULL pointer or an invalid
/// config (a setting out of range, settings that do not fit together, an
/// unparsable URL, an unreadable CA file), with the reason in
/// `cacheaside_last_error()`.
///
/// Ownership: the caller owns `*out` and frees it with
/// `cacheaside_engine_free()`. The config is only read; the caller keeps it
/// (and may free it at once).
///
/// ```c
/// cacheaside_config *config = cacheaside_config_new();
/// cacheaside_config_set_namespace(config, "shop:");
/// cacheaside_engine *engine = NULL;
/// if (cacheaside_engine_open(config, &engine) != CACHEASIDE_OK) {
///     fprintf(stderr, "%s\n", cacheaside_last_error());
/// }
/// cacheaside_config_free(config);
/// ```
///
/// # Safety
/// `config` is NULL or a live config not being changed by another thread;
/// `out` is NULL or points to writable storage for one pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_engine_open(
    config: *const cacheaside_config,
    out: *mut *mut cacheaside_engine,
) -> cacheaside_status {
    ffi_panic_boundary! {
        let out = non_null!(out out);
        let config = non_null!(config);
        match CacheAside::open(&config.inner) {
            Ok(inner) => {
                *out = Box::into_raw(Box::new(cacheaside_engine { inner }));
                CACHEASIDE_OK
            }
            Err(err) => fail(&err),
        }
    }
}

/// Stops the engine's relay and write-behind workers, closes its
/// connections and frees it. NULL is a no-op.
///
/// # Safety
/// `engine` is NULL or came from `cacheaside_engine_open()` and was not
/// freed yet; every other call using it has returned, and none starts
/// afterwards.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_engine_free(engine: *mut cacheaside_engine) {
    ffi_panic_boundary! {
        if !engine.is_null() {
            // SAFETY: the caller hands back a pointer from Box::into_raw.
            drop(unsafe { Box::from_raw(engine) });
        }
    }
}

/// Checks that both servers answer (a Redis `PING`, a PostgreSQL
/// `SELECT 1`): where a misconfiguration shows (a closed port, a wrong
/// password, a missing database), with a message naming the server and the
/// cause. Blocks, at most the connect timeouts.
///
/// # Safety
/// `engine` is NULL or a live engine.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_engine_ping(
    engine: *const cacheaside_engine,
) -> cacheaside_status {
    ffi_panic_boundary! {
        let engine = non_null!(engine);
        status(engine.inner.ping())
    }
}

/// Captures the changes of `table` for the invalidation relay: installs
/// (idempotently) the outbox (`cacheaside_config_set_outbox_table()`) and a
/// trigger that, in the same transaction as every insert, update or delete
/// of a row, records the cache key `key_prefix` followed by the row's
/// `key_column` (old and new), and notifies the relay; then starts the
/// relay. After this, a write to `table` from anywhere (psql, another
/// service, a migration) invalidates its key within about a round trip.
/// Capturing a table again replaces its triggers. Blocks.
///
/// `version_column` (NULL: none) names the column your versioned reads and
/// write-throughs use: the relay then leaves alone a key whose cached row
/// is already at the changed row's version or newer, and every update bumps
/// that column if the writer did not.
///
/// Returns `CACHEASIDE_INVALID_ARGUMENT` for a NULL pointer (but
/// `version_column`), a table or column that is not an SQL identifier
/// (empty included), or an empty prefix or one holding `{`, `}` or control
/// characters; `CACHEASIDE_DATABASE_ERROR` or `CACHEASIDE_TIMEOUT` when
/// PostgreSQL fails.
///
/// Row id 7 of `products` becomes key `product:7`:
///
/// ```c
/// cacheaside_engine_capture_changes(engine, "products", "product:", "id", "version");
/// ```
///
/// Thread-safe.
///
/// # Safety
/// `engine` is NULL or a live engine; each string is NULL or
/// NUL-terminated.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_engine_capture_changes(
    engine: *const cacheaside_engine,
    table: *const c_char,
    key_prefix: *const c_char,
    key_column: *const c_char,
    version_column: *const c_char,
) -> cacheaside_status {
    ffi_panic_boundary! {
        // SAFETY: as this function's.
        unsafe { capture(engine, table, key_prefix, key_column, version_column, None) }
    }
}

/// The body of both capture functions; `tag`: the tag prefix and column.
///
/// # Safety
/// As `cacheaside_engine_capture_changes()`.
unsafe fn capture(
    engine: *const cacheaside_engine,
    table: *const c_char,
    key_prefix: *const c_char,
    key_column: *const c_char,
    version_column: *const c_char,
    tag: Option<(&str, &str)>,
) -> cacheaside_status {
    let engine = non_null!(engine);
    let table = non_null!(str table);
    let key_prefix = non_null!(str key_prefix);
    let key_column = non_null!(str key_column);
    let version_column = if version_column.is_null() {
        None
    } else {
        Some(non_null!(str version_column))
    };
    if key_prefix.is_empty() {
        // Every key of the namespace would be a bare row id, shared by
        // every table captured so.
        return fail(&Error::invalid_argument("`key_prefix` is empty"));
    }
    let inner = &engine.inner;
    status(match tag {
        None => inner.capture_changes(table, key_prefix, key_column, version_column),
        Some((prefix, column)) => inner.capture_changes_tagged(
            table,
            key_prefix,
            key_column,
            version_column,
            prefix,
            column,
        ),
    })
}

/// `cacheaside_engine_capture_changes()` of a table whose rows carry a tag:
/// every insert, update or delete of a row also invalidates the tag
/// `tag_prefix` followed by the row's `tag_column` (the tag the row had
/// and the one it has), as `cacheaside_engine_invalidate_tag()` does. A
/// NULL tag column is no tag; a row whose tag is not a valid tag name is
/// skipped by the relay (logged). A `TRUNCATE` invalidates no tag.
/// Blocks.
///
/// Returns `CACHEASIDE_INVALID_ARGUMENT` as
/// `cacheaside_engine_capture_changes()` does, and for a NULL `tag_prefix`
/// or `tag_column`, a `tag_column` that is not an SQL identifier, or a
/// `tag_prefix` holding `{`, `}` or control characters (it may be empty);
/// `CACHEASIDE_DATABASE_ERROR` or `CACHEASIDE_TIMEOUT` when PostgreSQL
/// fails.
///
/// Ownership: every string is only read during the call; the caller keeps
/// it.
///
/// Row id 7 of `products`, in category 3, is key `product:7` and tag
/// `category:3`:
///
/// ```c
/// cacheaside_engine_capture_changes_tagged(engine, "products", "product:", "id",
///                                          "version", "category:", "category_id");
/// ```
///
/// Thread-safe.
///
/// # Safety
/// `engine` is NULL or a live engine; each string is NULL or
/// NUL-terminated.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_engine_capture_changes_tagged(
    engine: *const cacheaside_engine,
    table: *const c_char,
    key_prefix: *const c_char,
    key_column: *const c_char,
    version_column: *const c_char,
    tag_prefix: *const c_char,
    tag_column: *const c_char,
) -> cacheaside_status {
    ffi_panic_boundary! {
        let tag_prefix = non_null!(str tag_prefix);
        let tag_column = non_null!(str tag_column);
        let tag = Some((tag_prefix, tag_column));
        // SAFETY: as this function's.
        unsafe { capture(engine, table, key_prefix, key_column, version_column, tag) }
    }
}

/// Starts the invalidation relay if it is not running (and the config did
/// not turn it off): for a process that reads tables another process
/// captured. `cacheaside_engine_capture_changes()` starts it too.
///
/// Thread-safe.
///
/// # Safety
/// `engine` is NULL or a live engine.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_engine_start_relay(
    engine: *const cacheaside_engine,
) -> cacheaside_status {
    ffi_panic_boundary! {
        let engine = non_null!(engine);
        engine.inner.start_relay();
        CACHEASIDE_OK
    }
}

/// Cache-aside read of `key` through a C loader, single-flight: however
/// many threads (and processes) miss `key` at once, one loader call runs
/// and every caller gets its value. A hit calls no loader. Blocks.
///
/// `key` is the cache key (non-empty UTF-8, without `{` or `}`; stored
/// under the config's namespace); `ttl_ms` is how long a loaded value
/// stays cached (at least 1, at most the maximum TTL). On a miss
/// `loader(user_data, key, out_value)` runs on this thread (see
/// `cacheaside_loader`); followers never call their own loader, and get the
/// leader's outcome. Values are any bytes.
///
/// Returns `CACHEASIDE_OK` with the value in `*out`; `CACHEASIDE_NOT_FOUND`
/// when the loader reported absence (now or, cached for the negative TTL,
/// earlier); `CACHEASIDE_LOADER_ERROR` when the loader failed;
/// `CACHEASIDE_INVALID_ARGUMENT` for NULL pointers, an empty or non-UTF-8
/// key, a zero TTL, or a loader reading its own key. `*out` is zeroed
/// unless the call succeeds.
///
/// Ownership: the caller owns `*out` and frees it with
/// `cacheaside_bytes_free()`. `user_data` is only passed to the loader.
/// Thread-safe.
///
/// ```c
/// cacheaside_bytes value = {0};
/// if (cacheaside_engine_get_or_load(engine, "product:7", 60000, load_product, db, &value)
///         == CACHEASIDE_OK) {
///     fwrite(value.data, 1, value.len, stdout);
///     cacheaside_bytes_free(&value);
/// }
/// ```
///
/// # Safety
/// `engine` is NULL or a live engine; `key` is NULL or a NUL-terminated
/// string; `loader` is NULL or a function of the documented shape; `out` is
/// NULL or points to writable storage for one `cacheaside_bytes` (its old
/// contents are not freed).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_engine_get_or_load(
    engine: *const cacheaside_engine,
    key: *const c_char,
    ttl_ms: u64,
    loader: cacheaside_loader,
    user_data: *mut c_void,
    out: *mut cacheaside_bytes,
) -> cacheaside_status {
    ffi_panic_boundary! {
        let out = non_null!(out out);
        let engine = non_null!(engine);
        // SAFETY: as the caller promises.
        unsafe { read(&engine.inner, key, ttl_ms, Mode::SingleFlight, loader, user_data, out) }
    }
}

/// `cacheaside_engine_get_or_load()` without coalescing: every caller
/// that misses runs its own loader (still lease-protected, so no stale row
/// is cached). For loaders that are cheap, or must run per caller.
///
/// Returns, owns and blocks as `cacheaside_engine_get_or_load()`.
/// Thread-safe.
///
/// # Safety
/// As `cacheaside_engine_get_or_load()`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_engine_get_or_load_uncoalesced(
    engine: *const cacheaside_engine,
    key: *const c_char,
    ttl_ms: u64,
    loader: cacheaside_loader,
    user_data: *mut c_void,
    out: *mut cacheaside_bytes,
) -> cacheaside_status {
    ffi_panic_boundary! {
        let out = non_null!(out out);
        let engine = non_null!(engine);
        // SAFETY: as the caller promises.
        unsafe { read(&engine.inner, key, ttl_ms, Mode::Plain, loader, user_data, out) }
    }
}

/// `cacheaside_engine_get_or_load()` (single-flight) for a key that is
/// also written through: the loader returns the row's version with its
/// value (see `cacheaside_versioned_loader`), which orders the cached value
/// against `cacheaside_engine_write_through()` and the relay. Use it for
/// every read of such a key: an unversioned read caches version 0, which a
/// delayed write-through of an older row would replace.
///
/// Returns, owns and blocks as `cacheaside_engine_get_or_load()`.
/// Thread-safe.
///
/// # Safety
/// As `cacheaside_engine_get_or_load()`, with `loader` of the shape
/// `cacheaside_versioned_loader` documents.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_engine_get_or_load_versioned(
    engine: *const cacheaside_engine,
    key: *const c_char,
    ttl_ms: u64,
    loader: cacheaside_versioned_loader,
    user_data: *mut c_void,
    out: *mut cacheaside_bytes,
) -> cacheaside_status {
    ffi_panic_boundary! {
        let out = non_null!(out out);
        let engine = non_null!(engine);
        let key_text = non_null!(str key);
        let Some(loader) = loader else {
            return fail(&Error::invalid_argument("`loader` is NULL"));
        };
        let result = engine.inner.get_or_load_versioned(
            key_text,
            Duration::from_millis(ttl_ms),
            Mode::SingleFlight,
            // SAFETY: a loader of the documented shape; `key` is live for
            // this whole call.
            || unsafe { call_versioned_loader(loader, user_data, key) },
        );
        deliver(result, out)
    }
}

/// Writes a row and caches what the write returned: runs
/// `writer(user_data, key, out_value, out_version)` (your
/// `UPDATE ... RETURNING`, see `cacheaside_versioned_loader`), then stores
/// that value with its version unless that could leave the cache older than
/// a write that has returned (two write-throughs finishing in either order
/// leave the newer value; a plain update or a delete that commits after is
/// never overwritten). Readers' leases are revoked either way. Blocks.
///
/// Returns `CACHEASIDE_OK` with the written value in `*out`;
/// `CACHEASIDE_NOT_FOUND` when the writer reported no such row (the key is
/// invalidated); `CACHEASIDE_LOADER_ERROR` when the writer failed (nothing
/// is cached); `CACHEASIDE_INVALID_ARGUMENT` for NULL pointers, an empty
/// key or a zero TTL; `CACHEASIDE_CACHE_ERROR` or `CACHEASIDE_TIMEOUT` when
/// Redis failed after the write committed. `*out` is zeroed unless the call
/// succeeds.
///
/// Ownership: the caller owns `*out` and frees it with
/// `cacheaside_bytes_free()`. Thread-safe.
///
/// # Safety
/// As `cacheaside_engine_get_or_load_versioned()`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_engine_write_through(
    engine: *const cacheaside_engine,
    key: *const c_char,
    ttl_ms: u64,
    writer: cacheaside_versioned_loader,
    user_data: *mut c_void,
    out: *mut cacheaside_bytes,
) -> cacheaside_status {
    ffi_panic_boundary! {
        let out = non_null!(out out);
        let engine = non_null!(engine);
        let key_text = non_null!(str key);
        let Some(writer) = writer else {
            return fail(&Error::invalid_argument("`writer` is NULL"));
        };
        let result = engine.inner.write_through(
            key_text,
            Duration::from_millis(ttl_ms),
            // SAFETY: a writer of the documented shape; `key` is live for
            // this whole call.
            || unsafe { call_versioned_loader(writer, user_data, key) },
        );
        deliver(result, out)
    }
}

/// Removes `key`'s cached value and revokes any reader's lease on it, so a
/// load that started before this call cannot fill it afterwards. Call it
/// after the write to the source has committed (a captured table needs no
/// call: the relay does it). Blocks.
///
/// Returns `CACHEASIDE_INVALID_ARGUMENT` for NULL pointers or an empty or
/// non-UTF-8 key; `CACHEASIDE_CACHE_ERROR` or `CACHEASIDE_TIMEOUT` when
/// Redis fails (the old value then lives until its TTL, or until the relay
/// deletes it).
///
/// Thread-safe.
///
/// # Safety
/// `engine` is NULL or a live engine; `key` is NULL or a NUL-terminated
/// string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_engine_invalidate(
    engine: *const cacheaside_engine,
    key: *const c_char,
) -> cacheaside_status {
    ffi_panic_boundary! {
        let engine = non_null!(engine);
        let key = non_null!(str key);
        status(engine.inner.invalidate(key))
    }
}

/// Makes every entry tagged `tag` a miss, in every process: one Redis
/// command however many entries carry the tag (see
/// `CacheAside::invalidate_tag`; entries are tagged by the Rust API's
/// `get_or_load_tagged`). Call it after the write to the source has
/// committed. Blocks.
///
/// Returns `CACHEASIDE_INVALID_ARGUMENT` for NULL pointers or a tag that is
/// empty, longer than 512 bytes, not UTF-8, or holds `{`, `}` or a control
/// character; `CACHEASIDE_CACHE_ERROR` or `CACHEASIDE_TIMEOUT` when Redis
/// fails (the tagged entries may then still be read: retry).
///
/// Thread-safe. `tag` is borrowed for the call only.
///
/// # Safety
/// `engine` is NULL or a live engine; `tag` is NULL or a NUL-terminated
/// string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_engine_invalidate_tag(
    engine: *const cacheaside_engine,
    tag: *const c_char,
) -> cacheaside_status {
    ffi_panic_boundary! {
        let engine = non_null!(engine);
        let tag = non_null!(str tag);
        status(engine.inner.invalidate_tag(tag))
    }
}

/// Waits until the invalidation relay has applied every change committed
/// before this call, at most `timeout_ms` milliseconds (at least 1). For
/// tests and demos that want the relay's invalidations of earlier writes
/// behind them. Blocks.
///
/// Returns `CACHEASIDE_OK` when it has; `CACHEASIDE_TIMEOUT` when it has not
/// within the timeout, or no relay runs (see
/// `cacheaside_engine_capture_changes()`); `CACHEASIDE_INVALID_ARGUMENT`
/// for a NULL engine or a zero timeout.
///
/// Thread-safe.
///
/// # Safety
/// `engine` is NULL or a live engine.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_engine_relay_sync(
    engine: *const cacheaside_engine,
    timeout_ms: u64,
) -> cacheaside_status {
    ffi_panic_boundary! {
        let engine = non_null!(engine);
        if timeout_ms == 0 {
            return fail(&Error::invalid_argument("`timeout_ms` is 0"));
        }
        relay_sync(&engine.inner, timeout_ms)
    }
}

/// Reads the engine's counters into `*out`; see `cacheaside_stats` for how
/// `size` makes the struct safe to grow (`queries` counts the engine's own
/// statements, not your loaders').
///
/// Returns `CACHEASIDE_INVALID_ARGUMENT` for a NULL pointer or a `size`
/// too small to hold any counter (`*out` is then unchanged).
///
/// Thread-safe; the counters are read one by one, not as one snapshot.
///
/// # Safety
/// `engine` is NULL or a live engine; `out` is NULL or points to `size`
/// writable bytes that begin with the `size` field.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_engine_stats(
    engine: *const cacheaside_engine,
    out: *mut cacheaside_stats,
) -> cacheaside_status {
    ffi_panic_boundary! {
        let engine = non_null!(engine);
        let out = non_null!(raw out);
        // SAFETY: as the caller promises.
        unsafe { write_stats(&engine.inner, out) }
    }
}

/// Deletes every Redis key under the engine's namespace (values, leases,
/// locks): for demos and tests that own their namespace. Blocks; uses
/// `SCAN`, so cost grows with the size of the Redis database.
///
/// Returns `CACHEASIDE_INVALID_ARGUMENT` for a NULL engine or an empty
/// namespace (that would be every key of the database).
///
/// Thread-safe.
///
/// # Safety
/// `engine` is NULL or a live engine.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_engine_delete_namespace(
    engine: *const cacheaside_engine,
) -> cacheaside_status {
    ffi_panic_boundary! {
        let engine = non_null!(engine);
        status(engine.inner.cache().delete_namespace().map(drop))
    }
}

/// Cache-aside read of any key through a C loader with the lab's client,
/// single-flight; as `cacheaside_engine_get_or_load()` (which needs no lab).
///
/// # Safety
/// As `cacheaside_engine_get_or_load()`, with `client` NULL or a live
/// client.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_client_get_or_load(
    client: *const cacheaside_client,
    key: *const c_char,
    ttl_ms: u64,
    loader: cacheaside_loader,
    user_data: *mut c_void,
    out: *mut cacheaside_bytes,
) -> cacheaside_status {
    ffi_panic_boundary! {
        let out = non_null!(out out);
        let client = non_null!(client);
        let engine = client.inner.engine();
        // SAFETY: as the caller promises.
        unsafe { read(engine, key, ttl_ms, Mode::SingleFlight, loader, user_data, out) }
    }
}

/// Removes `key`'s cached value through the lab's client; as
/// `cacheaside_engine_invalidate()`.
///
/// # Safety
/// `client` is NULL or a live client; `key` is NULL or a NUL-terminated
/// string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_client_invalidate(
    client: *const cacheaside_client,
    key: *const c_char,
) -> cacheaside_status {
    ffi_panic_boundary! {
        let client = non_null!(client);
        let key = non_null!(str key);
        status(client.inner.engine().invalidate(key))
    }
}

/// One read through a C loader, in `mode`: the body of every
/// `get_or_load` call once its handle and `out` are checked.
///
/// # Safety
/// `key` is NULL or a NUL-terminated string; `loader` is NULL or a
/// function of the shape `cacheaside_loader` documents.
unsafe fn read(
    engine: &CacheAside,
    key: *const c_char,
    ttl_ms: u64,
    mode: Mode,
    loader: cacheaside_loader,
    user_data: *mut c_void,
    out: &mut cacheaside_bytes,
) -> cacheaside_status {
    let key_text = non_null!(str key);
    let Some(loader) = loader else {
        return fail(&Error::invalid_argument("`loader` is NULL"));
    };
    let ttl = Duration::from_millis(ttl_ms);
    let result = engine.get_or_load_versioned(key_text, ttl, mode, || {
        // SAFETY: as the caller promises; `key` is live for this whole call.
        Ok(unsafe { call_loader(loader, user_data, key) }?.map(|value| (value, 0)))
    });
    deliver(result, out)
}

/// Hands a read's or write's outcome to C.
fn deliver(result: Result<Option<Value>>, out: &mut cacheaside_bytes) -> cacheaside_status {
    match result {
        Ok(Some(Value(bytes))) => {
            *out = cacheaside_bytes::from_vec(bytes);
            CACHEASIDE_OK
        }
        Ok(None) => CACHEASIDE_NOT_FOUND,
        Err(err) => fail(&err),
    }
}

/// Waits for `engine`'s relay; the status says why it did not.
pub(crate) fn relay_sync(engine: &CacheAside, timeout_ms: u64) -> cacheaside_status {
    if engine.sync_relay(Duration::from_millis(timeout_ms)) {
        CACHEASIDE_OK
    } else {
        fail(&Error::timeout(if engine.relay_running() {
            "waiting for the invalidation relay"
        } else {
            "no invalidation relay runs"
        }))
    }
}
