//! `cacheaside_config`: an owned [`Config`] that C fills in with setters.

use std::ffi::c_char;
use std::time::Duration;

use super::cacheaside_status::{self, *};
use super::error::fail;
use crate::config::Config;
use crate::error::Result;

/// Settings for `cacheaside_client_open()` (opaque).
///
/// Ownership: created by `cacheaside_config_new()`, freed by
/// `cacheaside_config_free()`. A client copies what it needs, so the config
/// may be freed (or reused for another client) as soon as
/// `cacheaside_client_open()` returns.
///
/// Thread safety: not synchronized; use one config from one thread at a time.
pub struct cacheaside_config {
    pub(crate) inner: Config,
}

/// Applies `change` to a copy of the config and keeps it only if every
/// setting is still valid on its own, so the checks stay in [`Config`].
/// Settings that must fit together (timeouts) are checked when the client
/// opens, so setters may be called in any order.
pub(super) fn update(
    config: &mut cacheaside_config,
    change: impl FnOnce(&mut Config) -> Result<()>,
) -> cacheaside_status {
    let mut next = config.inner.clone();
    match change(&mut next).and_then(|()| next.validate_each()) {
        Ok(()) => {
            config.inner = next;
            CACHEASIDE_OK
        }
        Err(err) => fail(&err),
    }
}

/// Creates a config holding the defaults, with `DATABASE_URL`,
/// `REDIS_URL` and `DATABASE_REPLICA_URL` taken from the environment when
/// set.
///
/// Defaults: `postgres://postgres@127.0.0.1:5432/test`,
/// `redis://127.0.0.1:6379/`, table `users`, namespace `""`, TTL 60 s
/// (see the setters for the others).
///
/// Ownership: the caller owns the result and frees it with
/// `cacheaside_config_free()`. Returns NULL only if the library failed
/// internally (see `cacheaside_last_error()`).
#[unsafe(no_mangle)]
pub extern "C" fn cacheaside_config_new() -> *mut cacheaside_config {
    ffi_panic_boundary! {
        Box::into_raw(Box::new(cacheaside_config {
            inner: Config::from_env(),
        }))
    }
}

/// Frees a config. NULL is a no-op.
///
/// # Safety
/// `config` is NULL or came from `cacheaside_config_new()` and was not freed
/// yet; it must not be used afterwards.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_config_free(config: *mut cacheaside_config) {
    ffi_panic_boundary! {
        if !config.is_null() {
            // SAFETY: the caller hands back a pointer from Box::into_raw.
            drop(unsafe { Box::from_raw(config) });
        }
    }
}

/// Sets the PostgreSQL URL, e.g. `postgres://user@host:5432/db`.
/// Defaults to `DATABASE_URL`, else `postgres://postgres@127.0.0.1:5432/test`.
///
/// The URL is parsed by `cacheaside_client_open()`, which returns
/// `CACHEASIDE_INVALID_ARGUMENT` for one that does not parse.
///
/// Returns `CACHEASIDE_INVALID_ARGUMENT` for a NULL pointer or a URL that is
/// not UTF-8 (the config is then unchanged).
///
/// # Safety
/// `config` is NULL or a live config; `url` is NULL or a NUL-terminated
/// string. The string is copied.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_config_set_database_url(
    config: *mut cacheaside_config,
    url: *const c_char,
) -> cacheaside_status {
    ffi_panic_boundary! {
        let config = non_null!(mut config);
        let url = non_null!(str url);
        update(config, |c| {
            c.database_url = url.to_owned();
            Ok(())
        })
    }
}

/// Sets the Redis URL, e.g. `redis://host:6379/0`, or
/// `redis://user:password@host:6379/` for a server that wants an ACL user
/// and password. Several URLs separated by commas
/// (`redis://10.0.0.1:7000,redis://10.0.0.2:7000`) select Redis Cluster:
/// they are seed nodes. `redis+sentinel://HOST:PORT[,HOST:PORT...]/MASTER_NAME`
/// names a master through Redis Sentinel (credentials in it are the
/// master's; a malformed one is refused here). Defaults to `REDIS_URL`,
/// else `redis://127.0.0.1:6379/`.
///
/// The URL is parsed by `cacheaside_client_open()`, which returns
/// `CACHEASIDE_INVALID_ARGUMENT` for one that does not parse.
///
/// Returns `CACHEASIDE_INVALID_ARGUMENT` for a NULL pointer or a URL that is
/// not UTF-8 (the config is then unchanged).
///
/// # Safety
/// As `cacheaside_config_set_database_url()`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_config_set_redis_url(
    config: *mut cacheaside_config,
    url: *const c_char,
) -> cacheaside_status {
    ffi_panic_boundary! {
        let config = non_null!(mut config);
        let url = non_null!(str url);
        update(config, |c| {
            c.redis_url = url.to_owned();
            Ok(())
        })
    }
}

/// Names a PEM file with the certificate(s) of the CA that signed the Redis
/// servers' certificates, for `rediss://` URLs (TLS, through rustls) with a
/// self-signed or private CA. The file is read by
/// `cacheaside_client_open()`, which returns `CACHEASIDE_INVALID_ARGUMENT`
/// when it cannot read it. An empty string goes back to the default: the
/// system's root certificates.
///
/// Returns `CACHEASIDE_INVALID_ARGUMENT` for a NULL pointer or a path that
/// is not UTF-8 (the config is then unchanged).
///
/// # Safety
/// As `cacheaside_config_set_database_url()`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_config_set_redis_ca_file(
    config: *mut cacheaside_config,
    path: *const c_char,
) -> cacheaside_status {
    ffi_panic_boundary! {
        let config = non_null!(mut config);
        let path = non_null!(str path);
        update(config, |c| {
            c.redis_ca_file = (!path.is_empty()).then(|| path.into());
            Ok(())
        })
    }
}

/// Names a PEM file with the certificate(s) of the CA that signed the
/// Postgres server's certificate, for `sslmode=require` in the database URL
/// (TLS through rustls, which always checks the certificate and the host
/// name, as libpq's `verify-full`). The file is read by
/// `cacheaside_client_open()`, which returns `CACHEASIDE_INVALID_ARGUMENT`
/// when it cannot read it, or when the database URL does not say
/// `sslmode=require` (the connection would not be encrypted). An empty
/// string goes back to the default: the system's root certificates.
///
/// Returns `CACHEASIDE_INVALID_ARGUMENT` for a NULL pointer or a path that
/// is not UTF-8 (the config is then unchanged).
///
/// # Safety
/// As `cacheaside_config_set_database_url()`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_config_set_database_ca_file(
    config: *mut cacheaside_config,
    path: *const c_char,
) -> cacheaside_status {
    ffi_panic_boundary! {
        let config = non_null!(mut config);
        let path = non_null!(str path);
        update(config, |c| {
            c.database_ca_file = (!path.is_empty()).then(|| path.into());
            Ok(())
        })
    }
}

/// Sets the users table: an SQL identifier (`[A-Za-z_][A-Za-z0-9_]*`, at
/// most 63 bytes), optionally schema-qualified (`app.users`). Defaults to
/// `users`.
///
/// Returns `CACHEASIDE_INVALID_ARGUMENT` for NULL, non-UTF-8 or a name that
/// is not an identifier (the config is then unchanged).
///
/// # Safety
/// `config` is NULL or a live config; `table` is NULL or a NUL-terminated
/// string. The string is copied.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_config_set_users_table(
    config: *mut cacheaside_config,
    table: *const c_char,
) -> cacheaside_status {
    ffi_panic_boundary! {
        let config = non_null!(mut config);
        let table = non_null!(str table);
        update(config, |c| c.set_users_table(table))
    }
}

/// Sets the prefix of every Redis key the client touches, e.g. `"myapp:"`.
/// Defaults to `""`.
///
/// Returns `CACHEASIDE_INVALID_ARGUMENT` for NULL, non-UTF-8, or a
/// namespace holding `{`, `}` or a control character (the config is then
/// unchanged).
///
/// # Safety
/// `config` is NULL or a live config; `ns` is NULL or a NUL-terminated
/// string. The string is copied.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_config_set_namespace(
    config: *mut cacheaside_config,
    ns: *const c_char,
) -> cacheaside_status {
    ffi_panic_boundary! {
        let config = non_null!(mut config);
        let ns = non_null!(str ns);
        update(config, |c| c.set_namespace(ns))
    }
}

/// Sets how long a cached value lives, in milliseconds. Defaults to 60000.
///
/// Returns `CACHEASIDE_INVALID_ARGUMENT` for NULL or 0.
///
/// # Safety
/// `config` is NULL or a live config.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_config_set_ttl_ms(
    config: *mut cacheaside_config,
    ttl_ms: u64,
) -> cacheaside_status {
    ffi_panic_boundary! {
        let config = non_null!(mut config);
        update(config, |c| {
            c.ttl = Duration::from_millis(ttl_ms);
            Ok(())
        })
    }
}

/// Sets how long a cached "absent" entry (a user that does not exist)
/// lives, in milliseconds. Defaults to 10000.
///
/// Returns `CACHEASIDE_INVALID_ARGUMENT` for NULL or 0.
///
/// # Safety
/// `config` is NULL or a live config.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_config_set_negative_ttl_ms(
    config: *mut cacheaside_config,
    ttl_ms: u64,
) -> cacheaside_status {
    ffi_panic_boundary! {
        let config = non_null!(mut config);
        update(config, |c| {
            c.negative_ttl = Duration::from_millis(ttl_ms);
            Ok(())
        })
    }
}

/// Sets how long a reader's lease (its right to fill a missed key) lives,
/// in milliseconds, without renewal: it is renewed while its load runs, so
/// this is how long a dead reader's lease blocks fills. Defaults to 3000.
///
/// Returns `CACHEASIDE_INVALID_ARGUMENT` for NULL or 0.
///
/// # Safety
/// `config` is NULL or a live config.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_config_set_lease_ttl_ms(
    config: *mut cacheaside_config,
    ttl_ms: u64,
) -> cacheaside_status {
    ffi_panic_boundary! {
        let config = non_null!(mut config);
        update(config, |c| {
            c.lease_ttl = Duration::from_millis(ttl_ms);
            Ok(())
        })
    }
}

/// Sets how long the cross-process rebuild lock lives if its holder dies
/// without renewal, in milliseconds: it is renewed while its load runs, so
/// this is how long a dead holder delays other processes. Defaults to 3000.
///
/// Returns `CACHEASIDE_INVALID_ARGUMENT` for NULL or 0.
///
/// # Safety
/// `config` is NULL or a live config.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_config_set_lock_ttl_ms(
    config: *mut cacheaside_config,
    ttl_ms: u64,
) -> cacheaside_status {
    ffi_panic_boundary! {
        let config = non_null!(mut config);
        update(config, |c| {
            c.lock_ttl = Duration::from_millis(ttl_ms);
            Ok(())
        })
    }
}

/// Sets the longest a reader waits for another process's rebuild of a key
/// before loading it itself, in milliseconds. Defaults to 15000.
///
/// Returns `CACHEASIDE_INVALID_ARGUMENT` for NULL.
/// `cacheaside_client_open()` also checks that it is at least the pool
/// timeout plus the statement timeout (the longest a load may take).
///
/// # Safety
/// `config` is NULL or a live config.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_config_set_lock_wait_ms(
    config: *mut cacheaside_config,
    wait_ms: u64,
) -> cacheaside_status {
    ffi_panic_boundary! {
        let config = non_null!(mut config);
        update(config, |c| {
            c.lock_wait = Duration::from_millis(wait_ms);
            Ok(())
        })
    }
}

/// Sets XFetch's early-refresh aggressiveness: 0 turns early refresh off,
/// larger values refresh earlier. Defaults to 1.0.
///
/// Returns `CACHEASIDE_INVALID_ARGUMENT` for NULL, a negative number, NaN or
/// infinity.
///
/// # Safety
/// `config` is NULL or a live config.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_config_set_beta(
    config: *mut cacheaside_config,
    beta: f64,
) -> cacheaside_status {
    ffi_panic_boundary! {
        let config = non_null!(mut config);
        update(config, |c| {
            c.beta = beta;
            Ok(())
        })
    }
}

/// Sets the most PostgreSQL connections the client opens. Defaults to 8.
///
/// Returns `CACHEASIDE_INVALID_ARGUMENT` for NULL or 0.
///
/// # Safety
/// `config` is NULL or a live config.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_config_set_db_pool_size(
    config: *mut cacheaside_config,
    size: u32,
) -> cacheaside_status {
    ffi_panic_boundary! {
        let config = non_null!(mut config);
        update(config, |c| {
            c.db_pool_size = size;
            Ok(())
        })
    }
}

/// Sets the most Redis connections the client opens. Defaults to 16.
///
/// Returns `CACHEASIDE_INVALID_ARGUMENT` for NULL or 0.
///
/// # Safety
/// `config` is NULL or a live config.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_config_set_cache_pool_size(
    config: *mut cacheaside_config,
    size: u32,
) -> cacheaside_status {
    ffi_panic_boundary! {
        let config = non_null!(mut config);
        update(config, |c| {
            c.cache_pool_size = size;
            Ok(())
        })
    }
}

/// Sets how long a call waits for a free PostgreSQL connection when every
/// pooled one is busy, in milliseconds (a server that refuses connections
/// fails the call at once instead). Defaults to 5000.
///
/// Returns `CACHEASIDE_INVALID_ARGUMENT` for NULL or 0.
/// `cacheaside_client_open()` also checks that it is at least the cache
/// timeout.
///
/// # Safety
/// `config` is NULL or a live config.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_config_set_pool_timeout_ms(
    config: *mut cacheaside_config,
    ms: u64,
) -> cacheaside_status {
    ffi_panic_boundary! {
        let config = non_null!(mut config);
        update(config, |c| {
            c.pool_timeout = Duration::from_millis(ms);
            Ok(())
        })
    }
}

/// Sets the bound on opening one PostgreSQL connection (TCP connect,
/// startup, authentication), in milliseconds. Defaults to 3000.
///
/// Returns `CACHEASIDE_INVALID_ARGUMENT` for NULL or 0.
///
/// # Safety
/// `config` is NULL or a live config.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_config_set_connect_timeout_ms(
    config: *mut cacheaside_config,
    ms: u64,
) -> cacheaside_status {
    ffi_panic_boundary! {
        let config = non_null!(mut config);
        update(config, |c| {
            c.connect_timeout = Duration::from_millis(ms);
            Ok(())
        })
    }
}

/// Sets the bound on everything Redis does for one command (connecting,
/// waiting for a pooled connection, each read and write), in milliseconds.
/// A frozen Redis costs a call at most this, and nothing once the circuit
/// breaker has opened. Defaults to 250.
///
/// Returns `CACHEASIDE_INVALID_ARGUMENT` for NULL or 0.
/// `cacheaside_client_open()` also checks that it is at most the pool
/// timeout and at most a third of the lease and lock TTLs.
///
/// # Safety
/// `config` is NULL or a live config.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_config_set_cache_timeout_ms(
    config: *mut cacheaside_config,
    ms: u64,
) -> cacheaside_status {
    ffi_panic_boundary! {
        let config = non_null!(mut config);
        update(config, |c| {
            c.cache_timeout = Duration::from_millis(ms);
            Ok(())
        })
    }
}

/// Sets PostgreSQL's `statement_timeout`, in milliseconds; the client gives
/// up 500 ms later on a server that does not answer at all. Defaults to
/// 10000.
///
/// Returns `CACHEASIDE_INVALID_ARGUMENT` for NULL or 0.
/// `cacheaside_client_open()` also checks that the lock wait is at least
/// the pool timeout plus this.
///
/// # Safety
/// `config` is NULL or a live config.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_config_set_statement_timeout_ms(
    config: *mut cacheaside_config,
    ms: u64,
) -> cacheaside_status {
    ffi_panic_boundary! {
        let config = non_null!(mut config);
        update(config, |c| {
            c.statement_timeout = Duration::from_millis(ms);
            Ok(())
        })
    }
}

/// Sets how often a reader waiting on another process's rebuild looks for
/// the value, in milliseconds. Defaults to 2.
///
/// Returns `CACHEASIDE_INVALID_ARGUMENT` for NULL or 0.
///
/// # Safety
/// `config` is NULL or a live config.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_config_set_lock_poll_ms(
    config: *mut cacheaside_config,
    ms: u64,
) -> cacheaside_status {
    ffi_panic_boundary! {
        let config = non_null!(mut config);
        update(config, |c| {
            c.lock_poll = Duration::from_millis(ms);
            Ok(())
        })
    }
}

/// Sets for how long a fail-safe copy served after a failed reload is then
/// served as if fresh, in milliseconds, so the next callers do not all
/// retry the database. Defaults to 5000.
///
/// Returns `CACHEASIDE_INVALID_ARGUMENT` for NULL.
///
/// # Safety
/// `config` is NULL or a live config.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_config_set_fail_safe_throttle_ms(
    config: *mut cacheaside_config,
    ms: u64,
) -> cacheaside_status {
    ffi_panic_boundary! {
        let config = non_null!(mut config);
        update(config, |c| {
            c.fail_safe_throttle = Duration::from_millis(ms);
            Ok(())
        })
    }
}

/// Sets the soft timeout, in milliseconds: with a fail-safe copy at hand, a
/// reader waits at most this for a reload and then takes the copy. 0 (the
/// default) waits for the reload. (A C loader runs on its caller's thread,
/// so the caller that runs it waits for it; the callers waiting on it do
/// not.)
///
/// Returns `CACHEASIDE_INVALID_ARGUMENT` for NULL.
///
/// # Safety
/// `config` is NULL or a live config.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_config_set_soft_timeout_ms(
    config: *mut cacheaside_config,
    ms: u64,
) -> cacheaside_status {
    ffi_panic_boundary! {
        let config = non_null!(mut config);
        update(config, |c| {
            c.soft_timeout = Duration::from_millis(ms);
            Ok(())
        })
    }
}

/// Turns the invalidation relay on or off. With it on (the default) the
/// client runs a thread that applies the outbox the capture trigger fills
/// (`cacheaside_client_install_schema()` installs it on the users table;
/// `cacheaside_engine_capture_changes()` on yours): writes
/// that bypass the library invalidate the cache too, and an update whose
/// invalidation could not reach Redis still succeeds (the relay applies it
/// once Redis answers).
///
/// Returns `CACHEASIDE_INVALID_ARGUMENT` for NULL.
///
/// # Safety
/// `config` is NULL or a live config.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_config_set_invalidation_relay(
    config: *mut cacheaside_config,
    on: bool,
) -> cacheaside_status {
    ffi_panic_boundary! {
        let config = non_null!(mut config);
        update(config, |c| {
            c.invalidation_relay = on;
            Ok(())
        })
    }
}

/// Sets the outbox table the capture trigger writes and the relay reads: an
/// SQL identifier, optionally schema-qualified. Defaults to
/// `cacheaside_invalidations`.
///
/// Returns `CACHEASIDE_INVALID_ARGUMENT` for NULL, non-UTF-8 or a name that
/// is not an identifier.
///
/// # Safety
/// `config` is NULL or a live config; `table` is NULL or a NUL-terminated
/// string. The string is copied.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_config_set_outbox_table(
    config: *mut cacheaside_config,
    table: *const c_char,
) -> cacheaside_status {
    ffi_panic_boundary! {
        let config = non_null!(mut config);
        let table = non_null!(str table);
        update(config, |c| {
            c.outbox_table = table.to_owned();
            Ok(())
        })
    }
}

/// Sets the longest the relay waits between two looks at the outbox, in
/// milliseconds: it looks every 5 ms while changes arrive and backs off to
/// this when none do, so a change after a quiet spell is applied within
/// about this. Defaults to 50.
///
/// Returns `CACHEASIDE_INVALID_ARGUMENT` for NULL or 0.
///
/// # Safety
/// `config` is NULL or a live config.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_config_set_relay_poll_ms(
    config: *mut cacheaside_config,
    ms: u64,
) -> cacheaside_status {
    ffi_panic_boundary! {
        let config = non_null!(mut config);
        update(config, |c| {
            c.relay_poll = Duration::from_millis(ms);
            Ok(())
        })
    }
}

/// Sets the longest a session lives, in milliseconds, however often it is
/// read: `cacheaside_session_get()` renews a session's idle TTL only up to
/// its creation time plus this. Applies to sessions created afterwards by
/// clients opened with this config. Defaults to 86400000 (24 hours).
///
/// Returns `CACHEASIDE_INVALID_ARGUMENT` for NULL or 0.
///
/// # Safety
/// `config` is NULL or a live config.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_config_set_session_max_lifetime_ms(
    config: *mut cacheaside_config,
    max_lifetime_ms: u64,
) -> cacheaside_status {
    ffi_panic_boundary! {
        let config = non_null!(mut config);
        update(config, |c| {
            c.session_max_lifetime = Duration::from_millis(max_lifetime_ms);
            Ok(())
        })
    }
}

/// Turns on the near cache (L1) in process memory: up to `max_entries`
/// entries (0 turns it off, the default), each served at most
/// `max_staleness_ms` milliseconds after it was read from Redis. A hit
/// there costs no network call; Redis tells every process when a key
/// changes (see docs/near-cache.md for the coherence bound).
///
/// Returns `CACHEASIDE_INVALID_ARGUMENT` for NULL, or, with `max_entries`
/// above 0, for a `max_staleness_ms` of 0 or beyond the maximum TTL.
///
/// # Safety
/// `config` is NULL or a live config.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_config_set_local_cache(
    config: *mut cacheaside_config,
    max_entries: u64,
    max_staleness_ms: u64,
) -> cacheaside_status {
    ffi_panic_boundary! {
        let config = non_null!(mut config);
        update(config, |c| {
            c.local_cache =
                crate::LocalCache::new(max_entries, Duration::from_millis(max_staleness_ms));
            Ok(())
        })
    }
}

/// Turns fail-safe on: entries stay in Redis `ms` milliseconds past their
/// TTL, and a copy past its TTL is served (instead of an error) when the
/// reload fails. 0 turns it off, the default.
///
/// Returns `CACHEASIDE_INVALID_ARGUMENT` for NULL or more than ten years.
/// `cacheaside_client_open()` also checks that it is at least the fail-safe
/// throttle.
///
/// # Safety
/// `config` is NULL or a live config.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_config_set_fail_safe_max_ms(
    config: *mut cacheaside_config,
    ms: u64,
) -> cacheaside_status {
    ffi_panic_boundary! {
        let config = non_null!(mut config);
        update(config, |c| {
            c.fail_safe_max = Duration::from_millis(ms);
            Ok(())
        })
    }
}

/// Sets the write-behind backlog bound: the most changes that may wait to
/// reach PostgreSQL (across every process of the namespace) before
/// `cacheaside_update_user_plan_write_behind()` returns
/// `CACHEASIDE_BACKLOG_FULL` (and enqueues nothing). Defaults to 100000.
///
/// Returns `CACHEASIDE_INVALID_ARGUMENT` for NULL or 0.
///
/// # Safety
/// `config` is NULL or a live config.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_config_set_write_behind_max_backlog(
    config: *mut cacheaside_config,
    max_backlog: u64,
) -> cacheaside_status {
    ffi_panic_boundary! {
        let config = non_null!(mut config);
        update(config, |c| {
            c.write_behind_max_backlog = max_backlog;
            Ok(())
        })
    }
}

/// Sets how long a write-behind change may stay with a worker without
/// being acknowledged before another worker claims it, in milliseconds:
/// how long a dead worker delays its changes. Keep it longer than a batch's
/// transaction may take. Defaults to 30000.
///
/// Returns `CACHEASIDE_INVALID_ARGUMENT` for NULL or 0.
///
/// # Safety
/// `config` is NULL or a live config.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_config_set_write_behind_claim_after_ms(
    config: *mut cacheaside_config,
    ms: u64,
) -> cacheaside_status {
    ffi_panic_boundary! {
        let config = non_null!(mut config);
        update(config, |c| {
            c.write_behind_claim_after = Duration::from_millis(ms);
            Ok(())
        })
    }
}

/// Sets how many times a write-behind write that PostgreSQL refuses is
/// tried before the change goes to the dead-letter stream (an unreachable
/// PostgreSQL does not count). Defaults to 5.
///
/// Returns `CACHEASIDE_INVALID_ARGUMENT` for NULL or 0.
///
/// # Safety
/// `config` is NULL or a live config.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_config_set_write_behind_attempts(
    config: *mut cacheaside_config,
    attempts: u32,
) -> cacheaside_status {
    ffi_panic_boundary! {
        let config = non_null!(mut config);
        update(config, |c| {
            c.write_behind_attempts = attempts;
            Ok(())
        })
    }
}

/// Sets the wait before the first retry of a refused write-behind write,
/// in milliseconds (doubled with every attempt). Defaults to 100.
///
/// Returns `CACHEASIDE_INVALID_ARGUMENT` for NULL or 0.
///
/// # Safety
/// `config` is NULL or a live config.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_config_set_write_behind_retry_backoff_ms(
    config: *mut cacheaside_config,
    ms: u64,
) -> cacheaside_status {
    ffi_panic_boundary! {
        let config = non_null!(mut config);
        update(config, |c| {
            c.write_behind_retry_backoff = Duration::from_millis(ms);
            Ok(())
        })
    }
}

/// Sets after how many consecutive Redis failures the circuit breaker
/// opens (reads then go straight to PostgreSQL); 0 turns the breaker off.
/// Defaults to 3.
///
/// Returns `CACHEASIDE_INVALID_ARGUMENT` for NULL.
///
/// # Safety
/// `config` is NULL or a live config.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_config_set_breaker_failures(
    config: *mut cacheaside_config,
    failures: u32,
) -> cacheaside_status {
    ffi_panic_boundary! {
        let config = non_null!(mut config);
        update(config, |c| {
            c.breaker_failures = failures;
            Ok(())
        })
    }
}

/// Sets how long an open circuit breaker waits before one call probes
/// Redis again, in milliseconds. Defaults to 1000.
///
/// Returns `CACHEASIDE_INVALID_ARGUMENT` for NULL or 0.
///
/// # Safety
/// `config` is NULL or a live config.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_config_set_breaker_cool_off_ms(
    config: *mut cacheaside_config,
    ms: u64,
) -> cacheaside_status {
    ffi_panic_boundary! {
        let config = non_null!(mut config);
        update(config, |c| {
            c.breaker_cool_off = Duration::from_millis(ms);
            Ok(())
        })
    }
}

/// Sets how many idle connections each pool (PostgreSQL, Redis) keeps open,
/// opened in the background. At least 1: with none, every call would open
/// a connection of its own. Defaults to 1.
///
/// Returns `CACHEASIDE_INVALID_ARGUMENT` for NULL or 0.
///
/// # Safety
/// `config` is NULL or a live config.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_config_set_pool_min_idle(
    config: *mut cacheaside_config,
    count: u32,
) -> cacheaside_status {
    ffi_panic_boundary! {
        let config = non_null!(mut config);
        update(config, |c| {
            c.pool_min_idle = count;
            Ok(())
        })
    }
}

/// Sets how many threads the background pool runs (early refreshes, slow
/// reloads past the soft timeout); 0 runs that work on the calling thread.
/// Defaults to 2.
///
/// Returns `CACHEASIDE_INVALID_ARGUMENT` for NULL.
///
/// # Safety
/// `config` is NULL or a live config.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_config_set_background_threads(
    config: *mut cacheaside_config,
    threads: u32,
) -> cacheaside_status {
    ffi_panic_boundary! {
        let config = non_null!(mut config);
        update(config, |c| {
            c.background_threads = threads;
            Ok(())
        })
    }
}

/// Turns the relay's `LISTEN` on or off. On (the default), a notification
/// wakes the relay at once after each captured change; off, the relay only
/// polls (every `cacheaside_config_set_relay_poll_ms()`), which is what a
/// PgBouncer in transaction mode needs (it cannot hold a `LISTEN`).
///
/// Returns `CACHEASIDE_INVALID_ARGUMENT` for NULL.
///
/// # Safety
/// `config` is NULL or a live config.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_config_set_relay_listen(
    config: *mut cacheaside_config,
    on: bool,
) -> cacheaside_status {
    ffi_panic_boundary! {
        let config = non_null!(mut config);
        update(config, |c| {
            c.relay_listen = on;
            Ok(())
        })
    }
}

/// Sets how long outbox rows are kept, in milliseconds. A relay that was
/// away longer cannot know what it missed, and empties its namespace of
/// cached entries instead. Defaults to 86400000 (24 hours).
///
/// Returns `CACHEASIDE_INVALID_ARGUMENT` for NULL or 0.
///
/// # Safety
/// `config` is NULL or a live config.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_config_set_outbox_retention_ms(
    config: *mut cacheaside_config,
    ms: u64,
) -> cacheaside_status {
    ffi_panic_boundary! {
        let config = non_null!(mut config);
        update(config, |c| {
            c.outbox_retention = Duration::from_millis(ms);
            Ok(())
        })
    }
}

/// Sets how many prepared statements each PostgreSQL connection keeps
/// (least recently used evicted); 0 prepares, runs and closes every
/// statement, for poolers that cannot keep prepared statements across calls
/// (PgBouncer in transaction mode before 1.21). Defaults to 256.
///
/// Returns `CACHEASIDE_INVALID_ARGUMENT` for NULL.
///
/// # Safety
/// `config` is NULL or a live config.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_config_set_statement_cache_size(
    config: *mut cacheaside_config,
    size: usize,
) -> cacheaside_status {
    ffi_panic_boundary! {
        let config = non_null!(mut config);
        update(config, |c| {
            c.statement_cache_size = size;
            Ok(())
        })
    }
}

/// Sets how many write-behind changes one worker reads from the stream at a
/// time; after coalescing they go to PostgreSQL in one transaction.
/// Defaults to 256.
///
/// Returns `CACHEASIDE_INVALID_ARGUMENT` for NULL, 0 or more than 10000.
///
/// # Safety
/// `config` is NULL or a live config.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_config_set_write_behind_batch(
    config: *mut cacheaside_config,
    batch: u32,
) -> cacheaside_status {
    ffi_panic_boundary! {
        let config = non_null!(mut config);
        update(config, |c| {
            c.write_behind_batch = batch;
            Ok(())
        })
    }
}

/// Sets how often a background thread inspects a sample of the cache
/// against Postgres, in milliseconds (counted in `cacheaside_stats`'s
/// Rust twin `Stats::inspected` and `Stats::inspect_stale`); 0 runs no
/// inspector. Defaults to 0 (off).
///
/// Returns `CACHEASIDE_INVALID_ARGUMENT` for NULL.
///
/// # Safety
/// `config` is NULL or a live config.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_config_set_inspect_every_ms(
    config: *mut cacheaside_config,
    ms: u64,
) -> cacheaside_status {
    ffi_panic_boundary! {
        let config = non_null!(mut config);
        update(config, |c| {
            c.inspect_every = Duration::from_millis(ms);
            Ok(())
        })
    }
}

/// Sets how many entries one background inspection samples: 1 to 10000.
/// Defaults to 100.
///
/// Returns `CACHEASIDE_INVALID_ARGUMENT` for NULL or a sample out of range.
///
/// # Safety
/// `config` is NULL or a live config.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_config_set_inspect_sample(
    config: *mut cacheaside_config,
    sample: u32,
) -> cacheaside_status {
    ffi_panic_boundary! {
        let config = non_null!(mut config);
        update(config, |c| {
            c.inspect_sample = sample;
            Ok(())
        })
    }
}

/// Sets a streaming read replica of the database for the loads of a miss,
/// e.g. `postgres://user@replica:5432/db`; an empty string turns it off
/// (every load reads the database URL). Never used for writes. A load from
/// it is fenced by the committed version of its key: a row older than a
/// write that returned is read again from the primary (see
/// `docs/replicas.md`). Set it in every process that writes keys loaded
/// from the replica too: writes raise the fences. The lab's reads
/// (`cacheaside_client_get_user_profile*`) use it. Defaults to
/// `DATABASE_REPLICA_URL`, else none.
///
/// Returns `CACHEASIDE_INVALID_ARGUMENT` for a NULL pointer, a URL that is
/// not UTF-8 or that does not parse (the config is then unchanged).
///
/// # Safety
/// As `cacheaside_config_set_database_url()`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_config_set_replica_url(
    config: *mut cacheaside_config,
    url: *const c_char,
) -> cacheaside_status {
    ffi_panic_boundary! {
        let config = non_null!(mut config);
        let url = non_null!(str url);
        update(config, |c| {
            c.replica_url = (!url.is_empty()).then(|| url.to_owned());
            Ok(())
        })
    }
}

/// Sets how long a write fences the replica's loads of its key, in
/// milliseconds: the worst replica lag the fences cover; while the replica
/// is measured that far behind or more, loads read the primary. Used only
/// with a replica URL. Defaults to 5000.
///
/// Returns `CACHEASIDE_INVALID_ARGUMENT` for NULL, 0, or more than ten
/// years.
///
/// # Safety
/// `config` is NULL or a live config.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_config_set_replica_max_lag_ms(
    config: *mut cacheaside_config,
    ms: u64,
) -> cacheaside_status {
    ffi_panic_boundary! {
        let config = non_null!(mut config);
        update(config, |c| {
            c.replica_max_lag = Duration::from_millis(ms);
            crate::config::check_ttl("replica_max_lag", c.replica_max_lag)
        })
    }
}
