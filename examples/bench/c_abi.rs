//! (7) the C ABI hit path: a client opened and read through
//! `cacheaside::ffi`, called from Rust exactly as a C program calls the
//! header: a `cacheaside_config` filled by setters, a client from
//! `cacheaside_client_open`, a read into a caller-owned
//! `cacheaside_user_profile`, its strings freed with
//! `cacheaside_user_profile_free`. So the measured cost is the whole
//! boundary: panic guard, NULL checks, the three C strings allocated and
//! freed per read.

use std::ffi::{CStr, CString, c_char};
use std::ptr;

use cacheaside::Config;
use cacheaside::ffi::{
    cacheaside_client, cacheaside_client_free, cacheaside_client_open, cacheaside_client_stats,
    cacheaside_config, cacheaside_config_free, cacheaside_config_new,
    cacheaside_config_set_invalidation_relay, cacheaside_config_set_local_cache,
    cacheaside_config_set_namespace, cacheaside_config_set_ttl_ms,
    cacheaside_config_set_users_table, cacheaside_get_user_profile, cacheaside_last_error,
    cacheaside_stats, cacheaside_status, cacheaside_user_profile, cacheaside_user_profile_free,
};

use crate::BoxResult;

/// A client opened through the C ABI; freed on drop.
pub struct CAbi(*mut cacheaside_client);

// SAFETY: the header documents `cacheaside_client` as safe to share
// between threads for every function taking `const cacheaside_client *`
// (the only kind used through `&self`); `cacheaside_client_free` runs in
// `drop`, when no other reference is left.
unsafe impl Send for CAbi {}
unsafe impl Sync for CAbi {}

fn check(status: cacheaside_status, what: &str) -> BoxResult<()> {
    if status == cacheaside_status::CACHEASIDE_OK {
        return Ok(());
    }
    // SAFETY: a static or thread-local NUL-terminated string.
    let message = unsafe { CStr::from_ptr(cacheaside_last_error()) };
    Err(format!("{what}: {status:?}: {}", message.to_string_lossy()).into())
}

/// Frees a config however `open` leaves.
struct ConfigGuard(*mut cacheaside_config);

impl Drop for ConfigGuard {
    fn drop(&mut self) {
        // SAFETY: from cacheaside_config_new, freed only here.
        unsafe { cacheaside_config_free(self.0) };
    }
}

impl CAbi {
    /// Opens a client on the same servers, table, namespace, TTL and near
    /// cache setting as the Rust client (the URLs come from the
    /// environment in both).
    pub fn open(config: &Config) -> BoxResult<CAbi> {
        let c_config = ConfigGuard(cacheaside_config_new());
        if c_config.0.is_null() {
            return Err("cacheaside_config_new returned NULL".into());
        }
        let namespace = CString::new(config.namespace.as_str())?;
        let table = CString::new(config.users_table.as_str())?;
        let ttl_ms = u64::try_from(config.ttl.as_millis())?;
        let mut client: *mut cacheaside_client = ptr::null_mut();
        // SAFETY: a live config and NUL-terminated strings that outlive
        // the calls; `client` is writable storage for one pointer.
        unsafe {
            check(
                cacheaside_config_set_namespace(c_config.0, namespace.as_ptr()),
                "set namespace",
            )?;
            check(
                cacheaside_config_set_users_table(c_config.0, table.as_ptr()),
                "set users table",
            )?;
            check(cacheaside_config_set_ttl_ms(c_config.0, ttl_ms), "set ttl")?;
            if config.local_cache.is_on() {
                let staleness_ms = u64::try_from(config.local_cache.max_staleness.as_millis())?;
                check(
                    cacheaside_config_set_local_cache(
                        c_config.0,
                        config.local_cache.max_entries,
                        staleness_ms,
                    ),
                    "set local cache",
                )?;
            }
            // The Rust client's relay serves the table; one is enough.
            check(
                cacheaside_config_set_invalidation_relay(c_config.0, false),
                "turn the relay off",
            )?;
            check(
                cacheaside_client_open(c_config.0, &mut client),
                "open client",
            )?;
        }
        Ok(CAbi(client))
    }

    /// One read as a C caller does it; returns the profile's id.
    pub fn get_user_profile_id(&self, user_id: i64) -> BoxResult<Option<i64>> {
        let mut profile = cacheaside_user_profile {
            id: 0,
            name: ptr::null_mut::<c_char>(),
            email: ptr::null_mut(),
            plan: ptr::null_mut(),
            version: 0,
        };
        // SAFETY: a live client and a zeroed profile on our stack, whose
        // strings are freed (once) right after.
        let status = unsafe { cacheaside_get_user_profile(self.0, user_id, &mut profile) };
        let id = profile.id;
        unsafe { cacheaside_user_profile_free(&mut profile) };
        match status {
            cacheaside_status::CACHEASIDE_NOT_FOUND => Ok(None),
            other => check(other, "cacheaside_get_user_profile").map(|()| Some(id)),
        }
    }
}

impl CAbi {
    /// The client's counters, as a C caller reads them.
    pub fn stats(&self) -> BoxResult<cacheaside_stats> {
        let mut stats = cacheaside_stats {
            size: std::mem::size_of::<cacheaside_stats>() as u64,
            ..Default::default()
        };
        // SAFETY: a live client and a struct of the size we say.
        check(
            unsafe { cacheaside_client_stats(self.0, &mut stats) },
            "cacheaside_client_stats",
        )?;
        Ok(stats)
    }
}

impl Drop for CAbi {
    fn drop(&mut self) {
        // SAFETY: from cacheaside_client_open; every read has returned.
        unsafe { cacheaside_client_free(self.0) };
    }
}
