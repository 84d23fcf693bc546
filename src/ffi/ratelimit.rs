//! The sliding-window rate limiter from C: `cacheaside_rate_limit`.

use std::ffi::c_char;
use std::time::Duration;

use super::Zeroed;
use super::cacheaside_status::{self, *};
use super::client::cacheaside_client;
use super::error::fail;

/// The decision `cacheaside_rate_limit()` made for one request.
///
/// Ownership: plain data, the caller's (usually on the stack). It is zeroed
/// unless the call succeeds.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct cacheaside_rate_limit_result {
    /// Whether the request may go ahead. An allowed request was counted; a
    /// rejected one was not, and does not delay later requests.
    pub allowed: bool,
    /// How many more requests the window allows right now.
    pub remaining: u32,
    /// Milliseconds until the next request would be allowed: 0 while
    /// `remaining` is above 0; otherwise at least 1 and at most the window
    /// (rounded up, so waiting this long is always enough, unless another
    /// client takes the slot first).
    pub retry_after_ms: u64,
}

impl Zeroed for cacheaside_rate_limit_result {
    const ZEROED: Self = cacheaside_rate_limit_result {
        allowed: false,
        remaining: 0,
        retry_after_ms: 0,
    };
}

/// Decides whether one request of `subject` may go ahead, allowing at most
/// `limit` requests in any sliding window of `window_ms` milliseconds, and
/// counts it if so. Blocks for one Redis round trip.
///
/// The check is exact and atomic across threads and processes (one Lua
/// script evicts, counts and adds), uses the Redis server's clock, and
/// counts only allowed requests: a client that keeps retrying while limited
/// is allowed again once the window slides. The subject's entries live in
/// the sorted set `<namespace>{rate_limit:<limit>/<window_ms>ms:<subject>}`,
/// one per limit and window, so two limits on one subject never reset each
/// other; memory per subject is at most `limit` entries per limit.
///
/// Returns `CACHEASIDE_OK` with the decision in `*out` (a rejection is
/// `CACHEASIDE_OK` with `out->allowed == false`);
/// `CACHEASIDE_INVALID_ARGUMENT` for NULL pointers, `limit` 0, `window_ms`
/// 0 or over 366 days, or a subject that is empty, longer than 512 bytes,
/// not UTF-8, or holds `{`, `}` or a control character;
/// `CACHEASIDE_CACHE_ERROR` or `CACHEASIDE_TIMEOUT` when Redis fails (the
/// request was then not counted). `*out` is zeroed unless the call
/// succeeds.
///
/// Thread-safe.
///
/// # Safety
/// `client` is NULL or a live client; `subject` is NULL or a NUL-terminated
/// string; `out` is NULL or points to writable storage for one
/// `cacheaside_rate_limit_result`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_rate_limit(
    client: *const cacheaside_client,
    subject: *const c_char,
    limit: u32,
    window_ms: u64,
    out: *mut cacheaside_rate_limit_result,
) -> cacheaside_status {
    ffi_panic_boundary! {
        let out = non_null!(out out);
        let client = non_null!(client);
        let subject = non_null!(str subject);
        match client.inner.rate_limit(subject, limit, Duration::from_millis(window_ms)) {
            Ok(decision) => {
                *out = cacheaside_rate_limit_result {
                    allowed: decision.allowed,
                    remaining: decision.remaining,
                    retry_after_ms: decision.retry_after.as_millis() as u64,
                };
                CACHEASIDE_OK
            }
            Err(err) => fail(&err),
        }
    }
}
