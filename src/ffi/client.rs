//! `cacheaside_client`: an open [`Client`] (pools, engine, users table).

use super::cacheaside_status::{self, *};
use super::config::cacheaside_config;
use super::error::fail;
use crate::config::Config;
use crate::users::Client;

/// A connected client: Postgres and Redis pools, the cache-aside engine and
/// the users table (opaque).
///
/// Ownership: created by `cacheaside_client_open()`, freed by
/// `cacheaside_client_free()`.
///
/// Thread safety: share one client between all threads; every function
/// taking a `const cacheaside_client *` may be called concurrently, without
/// external locking. Every such function blocks the calling thread.
pub struct cacheaside_client {
    pub(crate) inner: Client,
}

// The header promises that one client serves many threads at once.
const _: () = {
    const fn shared_between_threads<T: Send + Sync>() {}
    shared_between_threads::<cacheaside_client>();
};

/// Maps a unit result of the safe API to a status.
pub(crate) fn status(result: crate::Result<()>) -> cacheaside_status {
    match result {
        Ok(()) => CACHEASIDE_OK,
        Err(err) => fail(&err),
    }
}

/// Opens a client for PostgreSQL and Redis and stores it in `*out`.
///
/// `config` may be NULL for the defaults (with `DATABASE_URL` and
/// `REDIS_URL` from the environment). Does not wait for either server:
/// connections open lazily (in the background, and on first use), so this
/// returns at once and succeeds while a server is down; calls then degrade
/// or fail with the cause. To check that both servers answer (a closed
/// port, a wrong password, a missing database), call
/// `cacheaside_client_ping()` after it. Starts the invalidation relay's
/// thread when the config turns it on.
///
/// `*out` is set to NULL first and to the client on success only.
///
/// Returns `CACHEASIDE_INVALID_ARGUMENT` for a NULL `out` or an invalid
/// config (a setting out of range, settings that do not fit together, an
/// unparsable URL, a CA file that cannot be read or a database CA file
/// without `sslmode=require`), with the reason in `cacheaside_last_error()`.
///
/// Ownership: the caller owns `*out` and frees it with
/// `cacheaside_client_free()`. The config is only read; the caller keeps it.
///
/// # Safety
/// `config` is NULL or a live config not being changed by another thread;
/// `out` is NULL or points to writable storage for one pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_client_open(
    config: *const cacheaside_config,
    out: *mut *mut cacheaside_client,
) -> cacheaside_status {
    ffi_panic_boundary! {
        let out = non_null!(out out);
        // SAFETY: NULL or a live config, as the caller promises.
        let defaults;
        let config = match unsafe { config.as_ref() } {
            Some(config) => &config.inner,
            None => {
                defaults = Config::from_env();
                &defaults
            }
        };
        match Client::open(config) {
            Ok(inner) => {
                *out = Box::into_raw(Box::new(cacheaside_client { inner }));
                CACHEASIDE_OK
            }
            Err(err) => fail(&err),
        }
    }
}

/// Closes a client's connections and frees it, after stopping and joining
/// its write-behind workers (what they hold stays queued for other
/// workers). NULL is a no-op.
///
/// # Safety
/// `client` is NULL or came from `cacheaside_client_open()` and was not freed
/// yet; every other call using it has returned, and none starts afterwards.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_client_free(client: *mut cacheaside_client) {
    ffi_panic_boundary! {
        if !client.is_null() {
            // SAFETY: the caller hands back a pointer from Box::into_raw.
            drop(unsafe { Box::from_raw(client) });
        }
    }
}

/// Creates the users table (and its schema, if the name is qualified)
/// unless it exists. Blocks.
///
/// Returns `CACHEASIDE_DATABASE_ERROR` or `CACHEASIDE_TIMEOUT` on failure.
///
/// # Safety
/// `client` is NULL or a live client.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_client_install_schema(
    client: *const cacheaside_client,
) -> cacheaside_status {
    ffi_panic_boundary! {
        let client = non_null!(client);
        status(client.inner.install_schema())
    }
}

/// Drops what `cacheaside_client_install_schema()` created: the users table, the
/// outbox and its cursor table, and the capture functions. For demos and
/// tests that own their tables. Idempotent. Blocks.
///
/// Returns `CACHEASIDE_DATABASE_ERROR` or `CACHEASIDE_TIMEOUT` on failure.
///
/// # Safety
/// `client` is NULL or a live client.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_client_drop_schema(
    client: *const cacheaside_client,
) -> cacheaside_status {
    ffi_panic_boundary! {
        let client = non_null!(client);
        status(client.inner.drop_schema())
    }
}

/// Inserts the lab's five demo users (ids 1 to 5) where their ids are free,
/// and invalidates their cache entries. Idempotent. Blocks.
///
/// # Safety
/// `client` is NULL or a live client.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_client_seed_demo_users(
    client: *const cacheaside_client,
) -> cacheaside_status {
    ffi_panic_boundary! {
        let client = non_null!(client);
        status(client.inner.seed_demo_users())
    }
}

/// Checks that both servers answer (a Redis `PING`, a PostgreSQL
/// `SELECT 1`, not counted by `cacheaside_client_query_count()`). Reads keep
/// working while Redis is down, so this is where a misconfiguration shows:
/// a closed port, a wrong password, a missing database each fail with a
/// message naming the server and the cause (never the password). Blocks,
/// at most the connect timeouts.
///
/// Returns `CACHEASIDE_CACHE_ERROR` or `CACHEASIDE_DATABASE_ERROR` with the
/// cause, `CACHEASIDE_TIMEOUT` for a server that does not answer.
///
/// # Safety
/// `client` is NULL or a live client.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_client_ping(
    client: *const cacheaside_client,
) -> cacheaside_status {
    ffi_panic_boundary! {
        let client = non_null!(client);
        status(client.inner.engine().ping())
    }
}

/// Waits until the invalidation relay has applied every change committed
/// before this call (to the users table or any captured table), at most
/// `timeout_ms` milliseconds. For tests and demos that want the relay's
/// invalidations of earlier writes behind them. Blocks.
///
/// Returns `CACHEASIDE_OK` when it has, `CACHEASIDE_TIMEOUT` when it has not
/// within the timeout or no relay runs (see
/// `cacheaside_config_set_invalidation_relay()`).
///
/// # Safety
/// `client` is NULL or a live client.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_client_relay_sync(
    client: *const cacheaside_client,
    timeout_ms: u64,
) -> cacheaside_status {
    ffi_panic_boundary! {
        let client = non_null!(client);
        super::engine::relay_sync(client.inner.engine(), timeout_ms)
    }
}

/// How many statements this client has sent to PostgreSQL since it opened.
/// A cache hit does not change it. Returns 0 for a NULL client.
///
/// # Safety
/// `client` is NULL or a live client.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_client_query_count(client: *const cacheaside_client) -> u64 {
    ffi_panic_boundary! {
        let client = non_null!(client);
        client.inner.db().query_count()
    }
}

/// How many keys have a single-flight load in progress in this process: 0
/// when no call is running (per-key state is freed when its load ends).
/// Returns 0 for a NULL client.
///
/// # Safety
/// `client` is NULL or a live client.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_client_in_flight(client: *const cacheaside_client) -> usize {
    ffi_panic_boundary! {
        let client = non_null!(client);
        client.inner.engine().in_flight()
    }
}

/// Deletes every Redis key under the client's namespace (values, leases,
/// locks): for demos and tests that own their namespace. Blocks; uses
/// `SCAN`, so cost grows with the size of the Redis database.
///
/// Returns `CACHEASIDE_INVALID_ARGUMENT` when the namespace is empty (that
/// would be every key of the database).
///
/// # Safety
/// `client` is NULL or a live client.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_client_delete_namespace(
    client: *const cacheaside_client,
) -> cacheaside_status {
    ffi_panic_boundary! {
        let client = non_null!(client);
        status(client.inner.cache().delete_namespace().map(drop))
    }
}

/// Counters of what a client has done since it opened.
///
/// ABI: set `size` to `sizeof(cacheaside_stats)` before calling
/// `cacheaside_client_stats()`. The library fills at most that many bytes
/// and sets `size` to how many it filled, so a program compiled against an
/// older, shorter struct keeps working with a newer library, and a newer
/// program learns which fields an older library filled. Fields are only
/// ever added at the end.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct cacheaside_stats {
    /// In: `sizeof(cacheaside_stats)`. Out: bytes filled.
    pub size: u64,
    /// Statements sent to PostgreSQL (as `cacheaside_client_query_count()`).
    pub queries: u64,
    /// Reads answered from the cache (values and cached absences).
    pub hits: u64,
    /// Reads that found no usable entry in the cache.
    pub misses: u64,
    /// Reads that skipped the cache because the circuit breaker was open.
    pub bypassed: u64,
    /// Hits that XFetch reloaded ahead of expiry.
    pub early_refreshes: u64,
    /// Fills refused because a write revoked their lease (stale rows not cached).
    pub fills_dropped: u64,
    /// Fills that failed (Redis unreachable, out of memory).
    pub fills_failed: u64,
    /// Entries that did not decode; each was deleted and reloaded.
    pub corrupt_entries: u64,
    /// Fail-safe copies served because a reload failed or was too slow.
    pub stale_served: u64,
    /// Redis calls that failed because Redis was unavailable.
    pub cache_errors: u64,
    /// Times the circuit breaker opened.
    pub breaker_opened: u64,
    /// Times the circuit breaker closed again.
    pub breaker_closed: u64,
    /// Invalidations that could not reach Redis.
    pub invalidations_failed: u64,
    /// Invalidations the relay applied from the outbox.
    pub relay_invalidations: u64,
    /// Relay rounds that read the outbox to the end.
    pub relay_rounds: u64,
    /// Relay rounds that failed and were retried.
    pub relay_errors: u64,
    /// Times the relay emptied its namespace after being away too long.
    pub relay_resets: u64,
    /// Keys with a single-flight load in progress now.
    pub in_flight: u64,
    /// Write-behind changes this client enqueued.
    pub write_behind_enqueued: u64,
    /// Write-behind changes this client's workers committed to PostgreSQL.
    pub write_behind_applied: u64,
    /// Write-behind changes written as part of a newer change of their key.
    pub write_behind_coalesced: u64,
    /// Write-behind writes put off for a retry (PostgreSQL unreachable, or
    /// refusing the write).
    pub write_behind_retried: u64,
    /// Write-behind changes moved to the dead-letter stream.
    pub write_behind_dead_lettered: u64,
    /// Write-behind changes claimed from a dead (or slow) worker.
    pub write_behind_claimed: u64,
    /// Enqueue-to-commit time of the oldest change in the last batch this
    /// client's workers committed, in milliseconds.
    pub write_behind_lag_ms: u64,
    /// Reads answered from the near cache (L1) in process memory, with no
    /// network call (not counted in `hits`).
    pub local_hits: u64,
    /// Reads L1, being on, could not answer (not held, expired, or dark).
    pub local_misses: u64,
    /// L1 entries evicted because Redis said their key changed.
    pub local_invalidations: u64,
    /// Times L1 was emptied because its tracking connection broke.
    pub local_clears: u64,
}

/// Reads the client's counters into `*out`; see `cacheaside_stats` for how
/// `size` makes the struct safe to grow.
///
/// Returns `CACHEASIDE_INVALID_ARGUMENT` for a NULL pointer or a `size`
/// too small to hold any counter (`*out` is then unchanged).
///
/// Thread-safe; the counters are read one by one, not as one snapshot.
///
/// # Safety
/// `client` is NULL or a live client; `out` is NULL or points to `size`
/// writable bytes that begin with the `size` field.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_client_stats(
    client: *const cacheaside_client,
    out: *mut cacheaside_stats,
) -> cacheaside_status {
    ffi_panic_boundary! {
        let client = non_null!(client);
        let out = non_null!(raw out);
        // SAFETY: as the caller promises.
        unsafe { write_stats(client.inner.engine(), out) }
    }
}

/// Fills `*out` with `engine`'s counters, up to the caller's `size`.
///
/// # Safety
/// `out` is not NULL and points to `size` writable bytes that begin with
/// the `size` field.
pub(crate) unsafe fn write_stats(
    engine: &crate::CacheAside,
    out: *mut cacheaside_stats,
) -> cacheaside_status {
    {
        // SAFETY: the caller promises at least the `size` field is there.
        let room = unsafe { std::ptr::addr_of!((*out).size).read_unaligned() };
        let ours = std::mem::size_of::<cacheaside_stats>() as u64;
        if room < 16 {
            return fail(&crate::Error::invalid_argument(
                "stats `size` must be set to sizeof(cacheaside_stats)",
            ));
        }
        let s = engine.stats();
        let filled = room.min(ours);
        let stats = cacheaside_stats {
            size: filled,
            queries: engine.db().query_count(),
            hits: s.hits,
            misses: s.misses,
            bypassed: s.bypassed,
            early_refreshes: s.early_refreshes,
            fills_dropped: s.fills_dropped,
            fills_failed: s.fills_failed,
            corrupt_entries: s.corrupt_entries,
            stale_served: s.stale_served,
            cache_errors: s.cache_errors,
            breaker_opened: s.breaker_opened,
            breaker_closed: s.breaker_closed,
            invalidations_failed: s.invalidations_failed,
            relay_invalidations: s.relay_invalidations,
            relay_rounds: s.relay_rounds,
            relay_errors: s.relay_errors,
            relay_resets: s.relay_resets,
            in_flight: engine.in_flight() as u64,
            write_behind_enqueued: s.write_behind_enqueued,
            write_behind_applied: s.write_behind_applied,
            write_behind_coalesced: s.write_behind_coalesced,
            write_behind_retried: s.write_behind_retried,
            write_behind_dead_lettered: s.write_behind_dead_lettered,
            write_behind_claimed: s.write_behind_claimed,
            write_behind_lag_ms: s.write_behind_lag_ms,
            local_hits: s.local_hits,
            local_misses: s.local_misses,
            local_invalidations: s.local_invalidations,
            local_clears: s.local_clears,
        };
        // SAFETY: `filled` bytes are writable at `out` (the caller's `size`),
        // and our struct is all u64 fields: no padding bytes are read.
        unsafe {
            std::ptr::copy_nonoverlapping(
                std::ptr::addr_of!(stats).cast::<u8>(),
                out.cast::<u8>(),
                filled as usize,
            );
        }
        CACHEASIDE_OK
    }
}
