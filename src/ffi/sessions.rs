//! Sessions from C: create, read (renewing the idle TTL) and delete.

use std::ffi::c_char;
use std::time::Duration;

use super::bytes::cacheaside_bytes;
use super::cacheaside_status::{self, *};
use super::client::{cacheaside_client, status};
use super::error::fail;
use crate::error::Error;
use crate::sessions::Sessions;

/// Characters in a session id `cacheaside_session_create()` returns, not
/// counting the trailing NUL.
pub const CACHEASIDE_SESSION_ID_LEN: usize = 43;

const _: () = assert!(CACHEASIDE_SESSION_ID_LEN == Sessions::ID_LEN);

/// Creates a session holding `len` bytes of JSON at `data`, and stores its
/// id in `*out_id`: 43 characters of unpadded base64url (256 bits from the
/// operating system's CSPRNG), NUL-terminated. Blocks for one Redis round
/// trip.
///
/// The session expires `ttl_ms` milliseconds after its creation or last
/// `cacheaside_session_get()`, and in any case at its absolute deadline:
/// creation plus the client's session maximum lifetime
/// (`cacheaside_config_set_session_max_lifetime_ms()`, 24 hours by
/// default). A `ttl_ms` longer than that lifetime is clamped to it. The
/// TTL and the deadline are stored with the session, on the Redis server's
/// clock.
///
/// Returns `CACHEASIDE_INVALID_ARGUMENT` for NULL pointers (`data` may be
/// NULL only with `len` 0, which is not JSON either), `ttl_ms` 0 or over
/// 366 days, or bytes that are not one UTF-8 JSON value;
/// `CACHEASIDE_CACHE_ERROR` or `CACHEASIDE_TIMEOUT` when Redis fails.
/// `*out_id` is zeroed unless the call succeeds.
///
/// Ownership: the caller keeps `data`; it owns `*out_id` and frees it with
/// `cacheaside_bytes_free()`. Thread-safe.
///
/// # Safety
/// `client` is NULL or a live client; `data` is NULL or points to `len`
/// readable bytes; `out_id` is NULL or points to writable storage for one
/// `cacheaside_bytes` (its old contents are not freed).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_session_create(
    client: *const cacheaside_client,
    data: *const c_char,
    len: usize,
    ttl_ms: u64,
    out_id: *mut cacheaside_bytes,
) -> cacheaside_status {
    ffi_panic_boundary! {
        let out_id = non_null!(out out_id);
        let client = non_null!(client);
        let bytes: &[u8] = if len == 0 {
            &[]
        } else {
            let data = non_null!(raw data);
            // SAFETY: the caller promises `len` readable bytes at `data`.
            unsafe { std::slice::from_raw_parts(data.cast::<u8>(), len) }
        };
        let Ok(json) = std::str::from_utf8(bytes) else {
            return fail(&Error::invalid_argument("session data is not valid UTF-8"));
        };
        let created = client
            .inner
            .sessions()
            .with_idle_ttl(Duration::from_millis(ttl_ms))
            .and_then(|sessions| sessions.create_json(json));
        match created {
            Ok(id) => {
                *out_id = cacheaside_bytes::from_string(id);
                CACHEASIDE_OK
            }
            Err(err) => fail(&err),
        }
    }
}

/// Reads a session's JSON into `*out_data` and renews its idle TTL (never
/// past its absolute deadline), in one Redis round trip. Blocks.
///
/// Returns `CACHEASIDE_OK` with the data; `CACHEASIDE_NOT_FOUND` when no
/// such session lives (unknown, deleted or expired id);
/// `CACHEASIDE_INVALID_ARGUMENT` for NULL pointers or an id that cannot be
/// a session id (empty, over 128 characters, or outside `A-Z a-z 0-9 - _`);
/// `CACHEASIDE_CORRUPT_ENTRY` when the key holds something that is not a
/// session; `CACHEASIDE_CACHE_ERROR` or `CACHEASIDE_TIMEOUT` when Redis
/// fails. `*out_data` is zeroed unless the call succeeds.
///
/// Ownership: the caller owns `*out_data` and frees it with
/// `cacheaside_bytes_free()`. Thread-safe.
///
/// # Safety
/// `client` is NULL or a live client; `session_id` is NULL or a
/// NUL-terminated string; `out_data` is NULL or points to writable storage
/// for one `cacheaside_bytes` (its old contents are not freed).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_session_get(
    client: *const cacheaside_client,
    session_id: *const c_char,
    out_data: *mut cacheaside_bytes,
) -> cacheaside_status {
    ffi_panic_boundary! {
        let out_data = non_null!(out out_data);
        let client = non_null!(client);
        let session_id = non_null!(str session_id);
        match client.inner.sessions().get_json(session_id) {
            Ok(Some(json)) => {
                *out_data = cacheaside_bytes::from_string(json);
                CACHEASIDE_OK
            }
            Ok(None) => CACHEASIDE_NOT_FOUND,
            Err(err) => fail(&err),
        }
    }
}

/// Ends a session at once. Blocks for one Redis round trip.
///
/// Returns `CACHEASIDE_OK` when it existed, `CACHEASIDE_NOT_FOUND` when it
/// did not (unknown, already deleted or expired: the outcome is the same);
/// `CACHEASIDE_INVALID_ARGUMENT` for NULL pointers or an id that cannot be
/// a session id; `CACHEASIDE_CACHE_ERROR` or `CACHEASIDE_TIMEOUT` when
/// Redis fails. Thread-safe.
///
/// # Safety
/// `client` is NULL or a live client; `session_id` is NULL or a
/// NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_session_delete(
    client: *const cacheaside_client,
    session_id: *const c_char,
) -> cacheaside_status {
    ffi_panic_boundary! {
        let client = non_null!(client);
        let session_id = non_null!(str session_id);
        match client.inner.sessions().delete(session_id) {
            Ok(true) => CACHEASIDE_OK,
            Ok(false) => CACHEASIDE_NOT_FOUND,
            Err(err) => status(Err(err)),
        }
    }
}
