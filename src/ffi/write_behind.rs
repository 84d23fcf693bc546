//! Write-behind from C: enqueue a user's plan change, run workers, drain.
//!
//! Every function takes the client as `const cacheaside_client *`, like the
//! rest of the API: the client synchronizes itself, so a caller holding a
//! `cacheaside_client *` passes it unchanged.

use std::ffi::c_char;
use std::time::Duration;

use super::cacheaside_status::{self, *};
use super::client::{cacheaside_client, status};
use super::error::fail;

/// Write-behind: sets a user's plan in the cache at once (every reader, in
/// every process, sees it from now on) and queues its write to PostgreSQL,
/// in one Redis script. Returns once Redis holds the change; a worker
/// (`cacheaside_write_behind_start()`, in this or any process) writes it
/// later, and the profile's `version` becomes the change's sequence number.
/// Blocks (a cache read of the profile, then one Redis round trip).
///
/// Returns `CACHEASIDE_NOT_FOUND` if no such user exists (nothing is
/// enqueued), `CACHEASIDE_BACKLOG_FULL` when the backlog is full (nothing is
/// enqueued: retry later), `CACHEASIDE_INVALID_ARGUMENT` for a NULL, empty
/// or non-UTF-8 plan, `CACHEASIDE_CACHE_ERROR` or `CACHEASIDE_TIMEOUT` when
/// Redis fails (after a timeout the change may or may not be enqueued).
///
/// Thread-safe.
///
/// # Safety
/// `client` is NULL or a live client; `plan` is NULL or a NUL-terminated
/// string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_update_user_plan_write_behind(
    client: *const cacheaside_client,
    user_id: i64,
    plan: *const c_char,
) -> cacheaside_status {
    ffi_panic_boundary! {
        let client = non_null!(client);
        let plan = non_null!(str plan);
        match client.inner.update_user_plan_write_behind(user_id, plan) {
            Ok(Some(_)) => CACHEASIDE_OK,
            Ok(None) => CACHEASIDE_NOT_FOUND,
            Err(err) => fail(&err),
        }
    }
}

/// Starts `workers` write-behind worker threads (1 to 64) owned by the
/// client: they write queued changes (from any process of the namespace)
/// to PostgreSQL in batches, and are stopped and joined by
/// `cacheaside_write_behind_stop()` or `cacheaside_client_free()`.
///
/// Returns `CACHEASIDE_INVALID_ARGUMENT` for 0 or more than 64 workers, or
/// when the client's workers already run.
///
/// Thread-safe.
///
/// # Safety
/// `client` is NULL or a live client.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_write_behind_start(
    client: *const cacheaside_client,
    workers: u32,
) -> cacheaside_status {
    ffi_panic_boundary! {
        let client = non_null!(client);
        status(client.inner.start_write_behind(workers))
    }
}

/// Stops the client's write-behind workers and waits for them (each
/// finishes the batch in hand). Changes not yet written stay queued for
/// any other worker. A no-op when none run. Blocks.
///
/// Thread-safe.
///
/// # Safety
/// `client` is NULL or a live client.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_write_behind_stop(
    client: *const cacheaside_client,
) -> cacheaside_status {
    ffi_panic_boundary! {
        let client = non_null!(client);
        client.inner.stop_write_behind();
        CACHEASIDE_OK
    }
}

/// Waits until every write-behind change enqueued (by any process) before
/// this call is in PostgreSQL (or in the dead-letter stream, which the
/// `write_behind_dead_lettered` counter of `cacheaside_stats` reports), at
/// most `timeout_ms` milliseconds. Workers may run in any process. Blocks.
///
/// Returns `CACHEASIDE_TIMEOUT` when changes from before the call are still
/// pending at the timeout.
///
/// Thread-safe.
///
/// # Safety
/// `client` is NULL or a live client.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_write_behind_drain(
    client: *const cacheaside_client,
    timeout_ms: u64,
) -> cacheaside_status {
    ffi_panic_boundary! {
        let client = non_null!(client);
        status(client.inner.drain_write_behind(Duration::from_millis(timeout_ms)))
    }
}

/// Writes to `*out` how many write-behind changes (of any process) wait to
/// reach PostgreSQL: the backlog that `cacheaside_config_set_write_behind_max_backlog()`
/// bounds. `*out` is set to 0 first and to the count on success only.
/// Blocks (one Redis round trip).
///
/// Thread-safe.
///
/// # Safety
/// `client` is NULL or a live client; `out` is NULL or points to writable
/// storage for one `uint64_t`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_write_behind_pending(
    client: *const cacheaside_client,
    out: *mut u64,
) -> cacheaside_status {
    ffi_panic_boundary! {
        let out = non_null!(out out);
        let client = non_null!(client);
        match client.inner.write_behind_pending() {
            Ok(pending) => {
                *out = pending;
                CACHEASIDE_OK
            }
            Err(err) => fail(&err),
        }
    }
}

/// Replays the oldest `count` dead letters of the client's namespace: each
/// is enqueued again through the normal write-behind path (for a worker of
/// any process to write), then removed from the dead-letter stream. A
/// letter whose key got a newer change since (replaying it would take the
/// key back in time), or that has no replayable key or value, is left.
/// Writes to `*replayed` how many were replayed and to `*left` how many
/// were left; both are set to 0 first. Blocks (Redis round trips).
///
/// Returns `CACHEASIDE_INVALID_ARGUMENT` for a NULL output,
/// `CACHEASIDE_CACHE_ERROR` or `CACHEASIDE_TIMEOUT` when Redis fails (the
/// letters replayed before the failure stay replayed).
///
/// Thread-safe.
///
/// # Safety
/// `client` is NULL or a live client; `replayed` and `left` are NULL or
/// point to writable storage for one `uint64_t` each.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_write_behind_replay_dead_letters(
    client: *const cacheaside_client,
    count: usize,
    replayed: *mut u64,
    left: *mut u64,
) -> cacheaside_status {
    ffi_panic_boundary! {
        let replayed = non_null!(out replayed);
        let left = non_null!(out left);
        let client = non_null!(client);
        match client.inner.engine().replay_dead_letters(count) {
            Ok(report) => {
                *replayed = report.replayed.len() as u64;
                *left = (report.superseded.len() + report.unreadable.len()) as u64;
                CACHEASIDE_OK
            }
            Err(err) => fail(&err),
        }
    }
}
