//! Errors across the boundary: the one `ErrorKind` → status mapping, and the
//! per-thread message behind `cacheaside_last_error()`.

use std::any::Any;
use std::cell::RefCell;
use std::ffi::{CString, c_char};

use super::cacheaside_status::{self, *};
use crate::error::{Error, ErrorKind};

thread_local! {
    /// This thread's last failure message. Only this thread reads or writes
    /// it, so no lock; the pointer `cacheaside_last_error()` hands out stays
    /// valid until the next failure on this thread replaces it.
    static LAST_ERROR: RefCell<Option<CString>> = const { RefCell::new(None) };
}

/// The status C callers see for each kind of error. Exhaustive on purpose:
/// a new `ErrorKind` does not compile until it has a status here.
pub(crate) fn status_of(kind: ErrorKind) -> cacheaside_status {
    match kind {
        ErrorKind::Database => CACHEASIDE_DATABASE_ERROR,
        ErrorKind::Cache => CACHEASIDE_CACHE_ERROR,
        ErrorKind::Timeout => CACHEASIDE_TIMEOUT,
        ErrorKind::InvalidArgument => CACHEASIDE_INVALID_ARGUMENT,
        ErrorKind::CorruptEntry => CACHEASIDE_CORRUPT_ENTRY,
        ErrorKind::Loader => CACHEASIDE_LOADER_ERROR,
        ErrorKind::Panicked => CACHEASIDE_PANIC,
        ErrorKind::BacklogFull => CACHEASIDE_BACKLOG_FULL,
    }
}

/// Records `err` as this thread's last error and returns its status.
pub(crate) fn fail(err: &Error) -> cacheaside_status {
    set_last_error(err.chain());
    status_of(err.kind())
}

/// Records a caught panic as this thread's last error.
pub(crate) fn record_panic(payload: Box<dyn Any + Send>) -> cacheaside_status {
    let what = if let Some(text) = payload.downcast_ref::<&str>() {
        (*text).to_owned()
    } else if let Some(text) = payload.downcast_ref::<String>() {
        text.clone()
    } else {
        "(no message)".to_owned()
    };
    set_last_error(format!("panic inside cacheaside (a bug): {what}"));
    CACHEASIDE_PANIC
}

fn set_last_error(message: String) {
    // A message cannot carry a NUL through a C string; show it instead.
    let message = CString::new(message.replace('\0', "\\0")).unwrap_or_default();
    // `try_with` fails only while the thread is exiting; the message is lost
    // then, which nobody could read anyway.
    let _ = LAST_ERROR.try_with(|last| *last.borrow_mut() = Some(message));
}

/// This thread's last failure message, or `""` if no call on this thread
/// has failed yet.
///
/// A call that fails (returns a status other than `CACHEASIDE_OK` and
/// `CACHEASIDE_NOT_FOUND`) sets it; calls that succeed leave it alone, like
/// `errno`, so read it right after the failing call.
///
/// Ownership: the string belongs to the library; do not free it. It stays
/// valid until the next failing call on the same thread, or until the
/// thread exits; copy it to keep it longer.
///
/// Thread safety: each thread has its own message.
#[unsafe(no_mangle)]
pub extern "C" fn cacheaside_last_error() -> *const c_char {
    ffi_panic_boundary! {
        LAST_ERROR
            .try_with(|last| last.borrow().as_ref().map(|m| m.as_ptr()))
            .ok()
            .flatten()
            .unwrap_or(c"".as_ptr())
    }
}

#[cfg(test)]
mod tests {
    use std::ffi::CStr;

    use super::*;

    fn last_error() -> String {
        // SAFETY: cacheaside_last_error always returns a valid C string.
        unsafe { CStr::from_ptr(cacheaside_last_error()) }
            .to_string_lossy()
            .into_owned()
    }

    #[test]
    fn last_error_is_per_thread_and_starts_empty() {
        let failing = std::thread::spawn(|| {
            assert_eq!(last_error(), "");
            let status = fail(&Error::invalid_argument("plan must not be empty"));
            assert_eq!(status, CACHEASIDE_INVALID_ARGUMENT);
            assert_eq!(last_error(), "invalid argument: plan must not be empty");
        });
        assert!(failing.join().is_ok());
        let other = std::thread::spawn(|| assert_eq!(last_error(), ""));
        assert!(other.join().is_ok());
    }

    #[test]
    fn panics_become_a_status_and_a_message() {
        fn boom() -> cacheaside_status {
            ffi_panic_boundary! {
                panic!("kaboom")
            }
        }
        assert_eq!(boom(), CACHEASIDE_PANIC);
        assert!(last_error().contains("kaboom"), "{}", last_error());
    }

    #[test]
    fn messages_with_nul_survive() {
        fail(&Error::invalid_argument("a\0b"));
        assert_eq!(last_error(), "invalid argument: a\\0b");
    }
}
