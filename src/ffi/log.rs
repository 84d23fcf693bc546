//! `cacheaside_log_set_callback`: the library's log events (circuit breaker
//! transitions, relay trouble, fills that failed) delivered to a C
//! callback.
//!
//! The library logs through the `log` facade. The first call here installs
//! a forwarding logger as the process's `log` logger (a process has one);
//! if the host program installed its own first (a Rust program using
//! `env_logger`, say), the call fails with `CACHEASIDE_INVALID_ARGUMENT` and
//! the events go to that logger instead.

use std::ffi::{CString, c_char, c_void};

use parking_lot::RwLock;

use super::cacheaside_status::{self, *};
use super::error::fail;
use crate::error::Error;

/// How much a log event matters, from most to least.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum cacheaside_log_level {
    /// Something failed that the library could not work around.
    CACHEASIDE_LOG_ERROR = 1,
    /// Something failed and the library worked around it (Redis unreachable:
    /// the circuit breaker opened).
    CACHEASIDE_LOG_WARN = 2,
    /// A state change worth knowing (the breaker closed again).
    CACHEASIDE_LOG_INFO = 3,
    /// Detail for debugging (a relay round that will be retried).
    CACHEASIDE_LOG_DEBUG = 4,
}

/// Receives one log event: its level, and its message (NUL-terminated
/// UTF-8, valid only during the call: copy it to keep it).
///
/// Threads: it runs on whichever library thread logged (a caller's, the
/// relay's, the keeper's); it must be thread-safe and must not call
/// `cacheaside_log_set_callback`. It must not unwind.
pub type cacheaside_log_cb = Option<
    unsafe extern "C" fn(
        user_data: *mut c_void,
        level: cacheaside_log_level,
        message: *const c_char,
    ),
>;

/// The registered callback. Guarded by its lock: read on every event,
/// written by `cacheaside_log_set_callback`.
static SINK: RwLock<Option<Sink>> = RwLock::new(None);

struct Sink {
    callback: unsafe extern "C" fn(*mut c_void, cacheaside_log_level, *const c_char),
    user_data: *mut c_void,
    level: cacheaside_log_level,
}

// SAFETY: `user_data` is the caller's, who promises (in the function's
// docs) that the callback may be called with it from any thread.
unsafe impl Send for Sink {}
unsafe impl Sync for Sink {}

struct Forward;

impl log::Log for Forward {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.target().starts_with("cacheaside")
            && SINK
                .read()
                .as_ref()
                .is_some_and(|sink| level_of(metadata.level()) <= sink.level)
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let Ok(message) = CString::new(record.args().to_string().replace('\0', "\\0")) else {
            return;
        };
        if let Some(sink) = SINK.read().as_ref() {
            // SAFETY: a callback of the documented shape; the message lives
            // for the call.
            unsafe { (sink.callback)(sink.user_data, level_of(record.level()), message.as_ptr()) };
        }
    }

    fn flush(&self) {}
}

fn level_of(level: log::Level) -> cacheaside_log_level {
    match level {
        log::Level::Error => cacheaside_log_level::CACHEASIDE_LOG_ERROR,
        log::Level::Warn => cacheaside_log_level::CACHEASIDE_LOG_WARN,
        log::Level::Info => cacheaside_log_level::CACHEASIDE_LOG_INFO,
        log::Level::Debug | log::Level::Trace => cacheaside_log_level::CACHEASIDE_LOG_DEBUG,
    }
}

/// Delivers the library's log events at `min_level` or more important to
/// `callback(user_data, level, message)`; a NULL `callback` stops them.
/// `min_level` is a `cacheaside_log_level` value (`CACHEASIDE_LOG_ERROR`
/// to `CACHEASIDE_LOG_DEBUG`), passed as an integer so that any value is
/// safe to pass. Replaces any callback set before. Process-wide (every
/// client and engine).
///
/// Returns `CACHEASIDE_INVALID_ARGUMENT` for a `min_level` that is not a
/// `cacheaside_log_level` (nothing changes then), or when another logger
/// already owns the process's `log` facade (a Rust host installed one):
/// the events go there.
///
/// Thread safety: may be called from any thread, but not from inside the
/// callback. Once it returns, the old callback is not called again.
///
/// ```c
/// cacheaside_log_set_callback(CACHEASIDE_LOG_WARN, on_log, NULL);
/// ```
///
/// # Safety
/// `callback` is NULL or a function of the shape `cacheaside_log_cb`
/// documents; it may be called with `user_data` from any thread until it is
/// replaced.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_log_set_callback(
    min_level: u32,
    callback: cacheaside_log_cb,
    user_data: *mut c_void,
) -> cacheaside_status {
    ffi_panic_boundary! {
        let Some(level) = level_from(min_level) else {
            return fail(&Error::invalid_argument(format!(
                "`min_level` {min_level} is not a cacheaside_log_level (1 to 4)"
            )));
        };
        static INSTALLED: once_cell::sync::OnceCell<bool> = once_cell::sync::OnceCell::new();
        let ours = *INSTALLED.get_or_init(|| {
            let installed = log::set_logger(&Forward).is_ok();
            if installed {
                log::set_max_level(log::LevelFilter::Debug);
            }
            installed
        });
        if !ours {
            return fail(&Error::invalid_argument(
                "another logger owns this process's log facade",
            ));
        }
        *SINK.write() = callback.map(|callback| Sink {
            callback,
            user_data,
            level,
        });
        CACHEASIDE_OK
    }
}

/// The level a C integer names, if any.
fn level_from(value: u32) -> Option<cacheaside_log_level> {
    use cacheaside_log_level::*;
    [
        CACHEASIDE_LOG_ERROR,
        CACHEASIDE_LOG_WARN,
        CACHEASIDE_LOG_INFO,
        CACHEASIDE_LOG_DEBUG,
    ]
    .into_iter()
    .find(|level| *level as u32 == value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_levels_outside_the_enum_are_invalid() {
        for bad in [0, 5, u32::MAX] {
            // SAFETY: no callback is registered by a refused call.
            let status = unsafe { cacheaside_log_set_callback(bad, None, std::ptr::null_mut()) };
            assert_eq!(status, CACHEASIDE_INVALID_ARGUMENT, "{bad}");
        }
        assert_eq!(
            level_from(1),
            Some(cacheaside_log_level::CACHEASIDE_LOG_ERROR)
        );
        assert_eq!(
            level_from(4),
            Some(cacheaside_log_level::CACHEASIDE_LOG_DEBUG)
        );
    }
}
