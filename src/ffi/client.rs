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

/// Connects to PostgreSQL and Redis and stores the new client in `*out`.
///
/// `config` may be NULL for the defaults (with `DATABASE_URL` and
/// `REDIS_URL` from the environment). Blocks until both pools have their
/// first connection, or until the pool timeout (5 s by default) passes.
///
/// `*out` is set to NULL first and to the client on success only.
///
/// Returns `CACHEASIDE_INVALID_ARGUMENT` for a NULL `out` or an unparsable
/// URL, `CACHEASIDE_TIMEOUT` when a server does not answer.
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

/// Closes a client's connections and frees it. NULL is a no-op.
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
pub unsafe extern "C" fn cacheaside_install_schema(
    client: *const cacheaside_client,
) -> cacheaside_status {
    ffi_panic_boundary! {
        let client = non_null!(client);
        status(client.inner.install_schema())
    }
}

/// Inserts the lab's five demo users (ids 1 to 5) where their ids are free,
/// and invalidates their cache entries. Idempotent. Blocks.
///
/// # Safety
/// `client` is NULL or a live client.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_seed_demo_users(
    client: *const cacheaside_client,
) -> cacheaside_status {
    ffi_panic_boundary! {
        let client = non_null!(client);
        status(client.inner.seed_demo_users())
    }
}

/// How many statements this client has sent to PostgreSQL since it opened.
/// A cache hit does not change it. Returns 0 for a NULL client.
///
/// # Safety
/// `client` is NULL or a live client.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_query_count(client: *const cacheaside_client) -> u64 {
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
pub unsafe extern "C" fn cacheaside_in_flight(client: *const cacheaside_client) -> usize {
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
pub unsafe extern "C" fn cacheaside_delete_namespace(
    client: *const cacheaside_client,
) -> cacheaside_status {
    ffi_panic_boundary! {
        let client = non_null!(client);
        status(client.inner.cache().delete_namespace().map(drop))
    }
}
