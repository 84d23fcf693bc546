//! Old names, kept one release as aliases of their renamed functions so
//! that programs built against the previous header still compile and link.
//! Each forwards to the new function and behaves exactly as it does; the
//! header marks each one deprecated and names the replacement.
//!
//! Renamed so that every name reads `cacheaside_<object>_<verb>` and every
//! config setter is named as the `Config` field it sets. The lab's own
//! workload keeps its names (`cacheaside_get_user_profile`,
//! `cacheaside_get_user_profile_singleflight`, `cacheaside_update_user_plan*`).
//!
//! To be removed in the release after the one that deprecates them.

use std::ffi::{c_char, c_void};
use std::time::Duration;

use super::bytes::{cacheaside_bytes, cacheaside_loader};
use super::cacheaside_status;
use super::client::cacheaside_client;
use super::config::{cacheaside_config, update};
use super::log::cacheaside_log_cb;

/// Deprecated: renamed `cacheaside_client_install_schema()`, which this forwards to; this name goes
/// in the next release.
///
/// # Safety
/// As `cacheaside_client_install_schema()`.
#[deprecated(note = "renamed cacheaside_client_install_schema")]
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_install_schema(
    client: *const cacheaside_client,
) -> cacheaside_status {
    ffi_panic_boundary! {
        // SAFETY: the same contract, passed on.
        unsafe { super::cacheaside_client_install_schema(client) }
    }
}

/// Deprecated: renamed `cacheaside_client_drop_schema()`, which this forwards to; this name goes
/// in the next release.
///
/// # Safety
/// As `cacheaside_client_drop_schema()`.
#[deprecated(note = "renamed cacheaside_client_drop_schema")]
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_drop_schema(
    client: *const cacheaside_client,
) -> cacheaside_status {
    ffi_panic_boundary! {
        // SAFETY: the same contract, passed on.
        unsafe { super::cacheaside_client_drop_schema(client) }
    }
}

/// Deprecated: renamed `cacheaside_client_seed_demo_users()`, which this forwards to; this name goes
/// in the next release.
///
/// # Safety
/// As `cacheaside_client_seed_demo_users()`.
#[deprecated(note = "renamed cacheaside_client_seed_demo_users")]
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_seed_demo_users(
    client: *const cacheaside_client,
) -> cacheaside_status {
    ffi_panic_boundary! {
        // SAFETY: the same contract, passed on.
        unsafe { super::cacheaside_client_seed_demo_users(client) }
    }
}

/// Deprecated: renamed `cacheaside_client_delete_namespace()`, which this forwards to; this name goes
/// in the next release.
///
/// # Safety
/// As `cacheaside_client_delete_namespace()`.
#[deprecated(note = "renamed cacheaside_client_delete_namespace")]
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_delete_namespace(
    client: *const cacheaside_client,
) -> cacheaside_status {
    ffi_panic_boundary! {
        // SAFETY: the same contract, passed on.
        unsafe { super::cacheaside_client_delete_namespace(client) }
    }
}

/// Deprecated: renamed `cacheaside_client_relay_sync()`, which this forwards to; this name goes
/// in the next release.
///
/// # Safety
/// As `cacheaside_client_relay_sync()`.
#[deprecated(note = "renamed cacheaside_client_relay_sync")]
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_relay_sync(
    client: *const cacheaside_client,
    timeout_ms: u64,
) -> cacheaside_status {
    ffi_panic_boundary! {
        // SAFETY: the same contract, passed on.
        unsafe { super::cacheaside_client_relay_sync(client, timeout_ms) }
    }
}

/// Deprecated: renamed `cacheaside_client_query_count()`, which this forwards to; this name goes
/// in the next release.
///
/// # Safety
/// As `cacheaside_client_query_count()`.
#[deprecated(note = "renamed cacheaside_client_query_count")]
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_query_count(client: *const cacheaside_client) -> u64 {
    ffi_panic_boundary! {
        // SAFETY: the same contract, passed on.
        unsafe { super::cacheaside_client_query_count(client) }
    }
}

/// Deprecated: renamed `cacheaside_client_in_flight()`, which this forwards to; this name goes
/// in the next release.
///
/// # Safety
/// As `cacheaside_client_in_flight()`.
#[deprecated(note = "renamed cacheaside_client_in_flight")]
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_in_flight(client: *const cacheaside_client) -> usize {
    ffi_panic_boundary! {
        // SAFETY: the same contract, passed on.
        unsafe { super::cacheaside_client_in_flight(client) }
    }
}

/// Deprecated: renamed `cacheaside_client_get_or_load()`, which this forwards to; this name goes
/// in the next release.
///
/// # Safety
/// As `cacheaside_client_get_or_load()`.
#[deprecated(note = "renamed cacheaside_client_get_or_load")]
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_get_or_load(
    client: *const cacheaside_client,
    key: *const c_char,
    ttl_ms: u64,
    loader: cacheaside_loader,
    user_data: *mut c_void,
    out: *mut cacheaside_bytes,
) -> cacheaside_status {
    ffi_panic_boundary! {
        // SAFETY: the same contract, passed on.
        unsafe { super::cacheaside_client_get_or_load(client, key, ttl_ms, loader, user_data, out) }
    }
}

/// Deprecated: renamed `cacheaside_client_invalidate()`, which this forwards to; this name goes
/// in the next release.
///
/// # Safety
/// As `cacheaside_client_invalidate()`.
#[deprecated(note = "renamed cacheaside_client_invalidate")]
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_invalidate(
    client: *const cacheaside_client,
    key: *const c_char,
) -> cacheaside_status {
    ffi_panic_boundary! {
        // SAFETY: the same contract, passed on.
        unsafe { super::cacheaside_client_invalidate(client, key) }
    }
}

/// Deprecated: renamed `cacheaside_log_set_callback()`, which this forwards to; this name goes
/// in the next release.
///
/// # Safety
/// As `cacheaside_log_set_callback()`.
#[deprecated(note = "renamed cacheaside_log_set_callback")]
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_set_log_callback(
    min_level: u32,
    callback: cacheaside_log_cb,
    user_data: *mut c_void,
) -> cacheaside_status {
    ffi_panic_boundary! {
        // SAFETY: the same contract, passed on.
        unsafe { super::cacheaside_log_set_callback(min_level, callback, user_data) }
    }
}

/// Deprecated: renamed `cacheaside_config_set_fail_safe_max_ms()`, which this forwards to; this name goes
/// in the next release.
///
/// # Safety
/// As `cacheaside_config_set_fail_safe_max_ms()`.
#[deprecated(note = "renamed cacheaside_config_set_fail_safe_max_ms")]
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_config_set_fail_safe_ms(
    config: *mut cacheaside_config,
    ms: u64,
) -> cacheaside_status {
    ffi_panic_boundary! {
        // SAFETY: the same contract, passed on.
        unsafe { super::cacheaside_config_set_fail_safe_max_ms(config, ms) }
    }
}

/// Deprecated: renamed `cacheaside_config_set_write_behind_max_backlog()`, which this forwards to; this name goes
/// in the next release.
///
/// # Safety
/// As `cacheaside_config_set_write_behind_max_backlog()`.
#[deprecated(note = "renamed cacheaside_config_set_write_behind_max_backlog")]
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_config_set_write_behind_backlog(
    config: *mut cacheaside_config,
    max_backlog: u64,
) -> cacheaside_status {
    ffi_panic_boundary! {
        // SAFETY: the same contract, passed on.
        unsafe { super::cacheaside_config_set_write_behind_max_backlog(config, max_backlog) }
    }
}

/// Deprecated: renamed `cacheaside_config_set_write_behind_claim_after_ms()`, which this forwards to; this name goes
/// in the next release.
///
/// # Safety
/// As `cacheaside_config_set_write_behind_claim_after_ms()`.
#[deprecated(note = "renamed cacheaside_config_set_write_behind_claim_after_ms")]
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_config_set_write_behind_claim_ms(
    config: *mut cacheaside_config,
    ms: u64,
) -> cacheaside_status {
    ffi_panic_boundary! {
        // SAFETY: the same contract, passed on.
        unsafe { super::cacheaside_config_set_write_behind_claim_after_ms(config, ms) }
    }
}

/// Deprecated: split into `cacheaside_config_set_write_behind_attempts()`
/// and `cacheaside_config_set_write_behind_retry_backoff_ms()` (one setter
/// per field); sets both, or neither when either is invalid. This name goes
/// in the next release.
///
/// # Safety
/// `config` is NULL or a live config.
#[deprecated(
    note = "use cacheaside_config_set_write_behind_attempts and cacheaside_config_set_write_behind_retry_backoff_ms"
)]
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_config_set_write_behind_retries(
    config: *mut cacheaside_config,
    attempts: u32,
    backoff_ms: u64,
) -> cacheaside_status {
    ffi_panic_boundary! {
        let config = non_null!(mut config);
        update(config, |c| {
            c.write_behind_attempts = attempts;
            c.write_behind_retry_backoff = Duration::from_millis(backoff_ms);
            Ok(())
        })
    }
}

/// Deprecated: split into `cacheaside_config_set_breaker_failures()` and
/// `cacheaside_config_set_breaker_cool_off_ms()` (one setter per field);
/// sets both, or neither when either is invalid. This name goes in the
/// next release.
///
/// # Safety
/// `config` is NULL or a live config.
#[deprecated(
    note = "use cacheaside_config_set_breaker_failures and cacheaside_config_set_breaker_cool_off_ms"
)]
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_config_set_breaker(
    config: *mut cacheaside_config,
    failures: u32,
    cool_off_ms: u64,
) -> cacheaside_status {
    ffi_panic_boundary! {
        let config = non_null!(mut config);
        update(config, |c| {
            c.breaker_failures = failures;
            c.breaker_cool_off = Duration::from_millis(cool_off_ms);
            Ok(())
        })
    }
}
