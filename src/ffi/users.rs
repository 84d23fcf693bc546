//! The lab's user functions and `cacheaside_user_profile`.

use std::ffi::{CStr, c_char};
use std::ptr;

use super::Zeroed;
use super::cacheaside_status::{self, *};
use super::client::cacheaside_client;
use super::error::fail;
use crate::error::{Error, ErrorKind, Result};
use crate::users::UserProfile;

/// One user, as read from the cache or the users table.
///
/// Ownership: the strings belong to the library; free them (all at once)
/// with `cacheaside_user_profile_free()`, never with `free()`. They share
/// one allocation (`name`, then `email`, then `plan`): a read allocates
/// once. The struct itself is the caller's (usually on the stack).
///
/// Functions that fill one zero it first, so after `CACHEASIDE_NOT_FOUND`
/// or a failure every field is 0 or NULL. They do not free what it held:
/// pass a zeroed or freed profile, or the old strings leak.
#[repr(C)]
#[derive(Debug)]
pub struct cacheaside_user_profile {
    /// Primary key.
    pub id: i64,
    /// Display name: NUL-terminated UTF-8, owned by the library.
    pub name: *mut c_char,
    /// Email address: NUL-terminated UTF-8, owned by the library.
    pub email: *mut c_char,
    /// Subscription plan, e.g. `"free"` or `"pro"`: NUL-terminated UTF-8,
    /// owned by the library.
    pub plan: *mut c_char,
    /// Starts at 1 and grows by one with every update of the row.
    pub version: i64,
}

impl Zeroed for cacheaside_user_profile {
    const ZEROED: Self = cacheaside_user_profile {
        id: 0,
        name: ptr::null_mut(),
        email: ptr::null_mut(),
        plan: ptr::null_mut(),
        version: 0,
    };
}

impl cacheaside_user_profile {
    /// Copies a profile: its three strings, each NUL-terminated, into one
    /// allocation (the only one), if none holds a NUL byte.
    fn from_profile(profile: &UserProfile) -> Result<Self> {
        let texts = [&profile.name, &profile.email, &profile.plan];
        if texts.iter().any(|t| t.as_bytes().contains(&0)) {
            return Err(Error::new(
                ErrorKind::Database,
                "user profile text holds a NUL byte",
            ));
        }
        let mut block = Vec::with_capacity(texts.iter().map(|t| t.len() + 1).sum());
        for text in texts {
            block.extend_from_slice(text.as_bytes());
            block.push(0);
        }
        // The length is not kept: `cacheaside_user_profile_free` finds it
        // again from the three NUL terminators.
        let block = Box::into_raw(block.into_boxed_slice()).cast::<c_char>();
        let (name_len, email_len) = (profile.name.len() + 1, profile.email.len() + 1);
        Ok(cacheaside_user_profile {
            id: profile.id,
            name: block,
            // SAFETY: both offsets lie inside the block just allocated.
            email: unsafe { block.add(name_len) },
            plan: unsafe { block.add(name_len + email_len) },
            version: profile.version,
        })
    }
}

/// Writes a read's outcome to a zeroed `out`.
fn found<P: std::borrow::Borrow<UserProfile>>(
    result: Result<Option<P>>,
    out: &mut cacheaside_user_profile,
) -> cacheaside_status {
    match result.and_then(|p| {
        p.map(|p| cacheaside_user_profile::from_profile(p.borrow()))
            .transpose()
    }) {
        Ok(Some(profile)) => {
            *out = profile;
            CACHEASIDE_OK
        }
        Ok(None) => CACHEASIDE_NOT_FOUND,
        Err(err) => fail(&err),
    }
}

/// Cache-aside read of one user: Redis first; on a miss one PostgreSQL
/// query, whose row (or absence) is cached. Blocks.
///
/// A hit costs one Redis round trip and no PostgreSQL statement. Under
/// concurrent misses of one user every caller queries PostgreSQL: use
/// `cacheaside_get_user_profile_singleflight()` for hot keys.
///
/// Returns `CACHEASIDE_OK` with `*out` filled, `CACHEASIDE_NOT_FOUND` when
/// no such user exists, or a failure; in the last two cases `*out` is zeroed.
///
/// Ownership: free `*out`'s strings with `cacheaside_user_profile_free()`.
/// Thread-safe.
///
/// # Safety
/// `client` is NULL or a live client; `out` is NULL or points to writable
/// storage for one profile (its old contents are not freed).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_get_user_profile(
    client: *const cacheaside_client,
    user_id: i64,
    out: *mut cacheaside_user_profile,
) -> cacheaside_status {
    ffi_panic_boundary! {
        let out = non_null!(out out);
        let client = non_null!(client);
        // Shared: an L1 hit copies the cached profile once, into `*out`.
        found(client.inner.get_user_profile_shared(user_id), out)
    }
}

/// Stampede-safe read of one user: however many threads (and processes)
/// miss the same user at once, PostgreSQL sees one query and every caller
/// gets its row. Blocks (followers wait for the loading thread, bounded by
/// the configured timeouts).
///
/// Returns as `cacheaside_get_user_profile()`; if the one query fails, every
/// thread that waited on it gets the same failure.
///
/// Ownership: free `*out`'s strings with `cacheaside_user_profile_free()`.
/// Thread-safe.
///
/// # Safety
/// As `cacheaside_get_user_profile()`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_get_user_profile_singleflight(
    client: *const cacheaside_client,
    user_id: i64,
    out: *mut cacheaside_user_profile,
) -> cacheaside_status {
    ffi_panic_boundary! {
        let out = non_null!(out out);
        let client = non_null!(client);
        found(client.inner.get_user_profile_singleflight(user_id), out)
    }
}

/// Sets a user's plan in PostgreSQL (bumping its version), then invalidates
/// the cached profile. Once this returns, no read that starts afterwards
/// sees the old plan. Blocks.
///
/// Returns `CACHEASIDE_NOT_FOUND` if no such user exists,
/// `CACHEASIDE_INVALID_ARGUMENT` for a NULL, empty (or all-blank) or
/// non-UTF-8 plan.
///
/// Thread-safe.
///
/// # Safety
/// `client` is NULL or a live client; `plan` is NULL or a NUL-terminated
/// string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_update_user_plan(
    client: *const cacheaside_client,
    user_id: i64,
    plan: *const c_char,
) -> cacheaside_status {
    ffi_panic_boundary! {
        let client = non_null!(client);
        let plan = non_null!(str plan);
        match client.inner.update_user_plan(user_id, plan) {
            Ok(true) => CACHEASIDE_OK,
            Ok(false) => CACHEASIDE_NOT_FOUND,
            Err(err) => fail(&err),
        }
    }
}

/// Sets a user's plan in PostgreSQL and writes the new row through to the
/// cache (unless the cache already holds a newer version), returning the
/// new row in `*out`. Blocks.
///
/// Returns `CACHEASIDE_OK` with `*out` filled, `CACHEASIDE_NOT_FOUND` if no
/// such user exists, `CACHEASIDE_INVALID_ARGUMENT` for a NULL, empty or
/// non-UTF-8 plan; in all but the first case `*out` is zeroed.
///
/// Ownership: free `*out`'s strings with `cacheaside_user_profile_free()`.
/// Thread-safe.
///
/// # Safety
/// `client` is NULL or a live client; `plan` is NULL or a NUL-terminated
/// string; `out` is NULL or points to writable storage for one profile.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_update_user_plan_write_through(
    client: *const cacheaside_client,
    user_id: i64,
    plan: *const c_char,
    out: *mut cacheaside_user_profile,
) -> cacheaside_status {
    ffi_panic_boundary! {
        let out = non_null!(out out);
        let client = non_null!(client);
        let plan = non_null!(str plan);
        found(client.inner.update_user_plan_write_through(user_id, plan), out)
    }
}

/// Frees a profile's strings and zeroes it (the struct itself is not
/// freed). NULL is a no-op; freeing a zeroed or already freed profile is
/// a no-op, so calling it twice is safe.
///
/// # Safety
/// `profile` is NULL or points to a profile that is zeroed or was filled by
/// this library (and not modified since).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_user_profile_free(profile: *mut cacheaside_user_profile) {
    ffi_panic_boundary! {
        // SAFETY: NULL or a valid profile, as the caller promises.
        let Some(profile) = (unsafe { profile.as_mut() }) else {
            return;
        };
        let owned = std::mem::replace(profile, cacheaside_user_profile::ZEROED);
        if owned.name.is_null() {
            return;
        }
        // SAFETY: `name` starts the block `from_profile` allocated: three
        // NUL-terminated strings back to back (unmodified, as the caller
        // promises), so their lengths add up to the block's. Zeroed above,
        // so it is never freed twice.
        unsafe {
            let mut len = 0;
            for _ in 0..3 {
                len += CStr::from_ptr(owned.name.add(len)).to_bytes().len() + 1;
            }
            drop(Box::from_raw(ptr::slice_from_raw_parts_mut(
                owned.name.cast::<u8>(),
                len,
            )));
        }
    }
}
