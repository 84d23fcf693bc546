//! The C ABI, declared in the generated `include/cacheaside.h`.
//!
//! A thin layer: each function converts its pointers, calls the safe API
//! ([`Client`](crate::Client), [`CacheAside`](crate::CacheAside),
//! [`Config`](crate::Config)) and maps the outcome to a [`cacheaside_status`].
//! No cache-aside logic lives here. Every rule the header promises is kept in
//! one place each:
//!
//! - no panic crosses the boundary: every body runs inside
//!   `ffi_panic_boundary!`, which turns a panic into [`CACHEASIDE_PANIC`];
//! - every pointer goes through `non_null!`, which turns NULL (and, for
//!   strings, invalid UTF-8) into [`CACHEASIDE_INVALID_ARGUMENT`];
//! - one `match` maps [`ErrorKind`](crate::ErrorKind) to a status
//!   (`error::status_of`), and the message goes to `cacheaside_last_error()`.
//!
//! [`CACHEASIDE_PANIC`]: cacheaside_status::CACHEASIDE_PANIC
//! [`CACHEASIDE_INVALID_ARGUMENT`]: cacheaside_status::CACHEASIDE_INVALID_ARGUMENT

// The C names are the API; they follow C's conventions, not Rust's.
#![allow(non_camel_case_types)]

use std::ffi::c_char;

/// Runs an extern function's body, turning a panic into the function's
/// failure value ([`cacheaside_status::CACHEASIDE_PANIC`] for functions that
/// return a status) with the panic message in `cacheaside_last_error()`.
///
/// Since Rust 1.81 a panic that reaches an `extern "C"` frame aborts the
/// whole host process, so every extern body goes through this. `return`
/// inside the body returns from the function.
macro_rules! ffi_panic_boundary {
    ($($body:tt)*) => {{
        let outcome = ::std::panic::catch_unwind(::std::panic::AssertUnwindSafe(move || {
            $($body)*
        }));
        match outcome {
            Ok(value) => value,
            Err(payload) => $crate::ffi::Failure::failure($crate::ffi::error::record_panic(payload)),
        }
    }};
}

/// Checks a pointer argument and returns early, with
/// [`cacheaside_status::CACHEASIDE_INVALID_ARGUMENT`] (or the function's
/// failure value) and a message naming the argument, when it is NULL.
///
/// - `non_null!(p)`: `&T` from `*const T`;
/// - `non_null!(mut p)`: `&mut T` from `*mut T` (which must be initialized);
/// - `non_null!(out p)`: zeroes `*p` first (it may be uninitialized), then
///   `&mut T`, so every later failure leaves the output zeroed;
/// - `non_null!(raw p)`: `p` itself, for pointers only passed on (`void *`);
/// - `non_null!(str p)`: `&str` from a NUL-terminated `*const c_char`, also
///   rejecting bytes that are not UTF-8.
///
/// Only for use inside `ffi_panic_boundary!` in an `unsafe extern "C" fn`
/// whose `# Safety` section makes the caller promise the pointer is valid
/// when not NULL.
macro_rules! non_null {
    (@null $ptr:ident) => {
        return $crate::ffi::Failure::failure($crate::ffi::error::fail(
            &$crate::Error::invalid_argument(concat!("`", stringify!($ptr), "` is NULL")),
        ))
    };
    (out $ptr:ident) => {{
        if $ptr.is_null() {
            non_null!(@null $ptr);
        }
        // SAFETY: not NULL, and the caller promises it points to writable
        // memory for one value; `write` does not read the (maybe
        // uninitialized) old value.
        unsafe {
            $ptr.write($crate::ffi::Zeroed::ZEROED);
            &mut *$ptr
        }
    }};
    (raw $ptr:ident) => {{
        if $ptr.is_null() {
            non_null!(@null $ptr);
        }
        $ptr
    }};
    (mut $ptr:ident) => {
        // SAFETY: the caller promises a valid, initialized value or NULL.
        match unsafe { $ptr.as_mut() } {
            Some(value) => value,
            None => non_null!(@null $ptr),
        }
    };
    (str $ptr:ident) => {{
        if $ptr.is_null() {
            non_null!(@null $ptr);
        }
        // SAFETY: not NULL, and the caller promises a NUL-terminated string
        // that outlives this call.
        match unsafe { ::std::ffi::CStr::from_ptr($ptr) }.to_str() {
            Ok(text) => text,
            Err(_) => {
                return $crate::ffi::Failure::failure($crate::ffi::error::fail(
                    &$crate::Error::invalid_argument(concat!(
                        "`",
                        stringify!($ptr),
                        "` is not valid UTF-8"
                    )),
                ))
            }
        }
    }};
    ($ptr:ident) => {
        // SAFETY: the caller promises a valid value or NULL.
        match unsafe { $ptr.as_ref() } {
            Some(value) => value,
            None => non_null!(@null $ptr),
        }
    };
}

mod batch;
mod bytes;
mod client;
mod config;
mod deprecated;
mod engine;
mod error;
mod events;
mod log;
mod ratelimit;
mod sessions;
mod users;
mod value;
mod write_behind;

pub use batch::*;
pub use bytes::*;
pub use client::*;
pub use config::*;
pub use deprecated::*;
pub use engine::*;
pub use error::cacheaside_last_error;
pub use events::*;
pub use log::*;
pub use ratelimit::*;
pub use sessions::*;
pub use users::*;
pub use write_behind::*;

/// The outcome of a call.
///
/// Every function that can fail returns one. `CACHEASIDE_OK` (0) is success;
/// `CACHEASIDE_NOT_FOUND` is not a failure (the thing asked for does not
/// exist); every other value is a failure whose message
/// `cacheaside_last_error()` returns on the same thread.
///
/// Values are never renumbered; new ones are added at the end, so a
/// `switch` over them should have a `default:` branch.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum cacheaside_status {
    /// Success.
    CACHEASIDE_OK = 0,
    /// No such row (user, or value of a get-or-load). Outputs are zeroed.
    CACHEASIDE_NOT_FOUND = 1,
    /// A NULL pointer, a string that is not UTF-8, an empty plan, a table
    /// name that is not an SQL identifier, an unusable setting or URL.
    CACHEASIDE_INVALID_ARGUMENT = 2,
    /// PostgreSQL refused or failed a statement, or a connection broke.
    CACHEASIDE_DATABASE_ERROR = 3,
    /// Redis refused or failed a command, or a connection broke.
    CACHEASIDE_CACHE_ERROR = 4,
    /// A connect, I/O, statement, pool checkout or rebuild-lock deadline
    /// passed; retrying later may succeed.
    CACHEASIDE_TIMEOUT = 5,
    /// A panic inside the library was caught at the boundary (a bug: please
    /// report it with the `cacheaside_last_error()` message), or the thread
    /// loading a key for this call's single-flight group panicked.
    CACHEASIDE_PANIC = 6,
    /// A cache entry could not be decoded.
    CACHEASIDE_CORRUPT_ENTRY = 7,
    /// A `cacheaside_loader` callback reported a failure (or returned
    /// `CACHEASIDE_OK` without setting a value).
    CACHEASIDE_LOADER_ERROR = 8,
    /// The write-behind backlog is full: the change was not enqueued (and
    /// nothing was dropped). Retry once the workers have caught up (see
    /// `cacheaside_write_behind_pending()`), or write the change directly.
    CACHEASIDE_BACKLOG_FULL = 9,
}

/// The name of a status, e.g. `"CACHEASIDE_NOT_FOUND"`, for logs and
/// exception messages; `"CACHEASIDE_UNKNOWN_STATUS"` for a value this
/// library does not define (one from a newer library, say).
///
/// Ownership: a static string; do not free it. Never NULL. Thread-safe.
///
/// ```c
/// fprintf(stderr, "%s: %s\n", cacheaside_status_str(status), cacheaside_last_error());
/// ```
#[unsafe(no_mangle)]
pub extern "C" fn cacheaside_status_str(status: StatusArg) -> *const c_char {
    ffi_panic_boundary! {
        status_name(status.0).as_ptr()
    }
}

/// A `cacheaside_status` as C passes it by value: any `unsigned int`,
/// also one this library does not define (receiving it as the Rust enum
/// would be undefined behaviour then). The header names it
/// `cacheaside_status` (cbindgen.toml renames it and does not emit it).
#[repr(transparent)]
#[derive(Debug, Clone, Copy)]
pub struct StatusArg(pub u32);

/// The statuses by value (the enum's values are 0, 1, 2, ... in order).
const STATUS_NAMES: [&std::ffi::CStr; 10] = [
    c"CACHEASIDE_OK",
    c"CACHEASIDE_NOT_FOUND",
    c"CACHEASIDE_INVALID_ARGUMENT",
    c"CACHEASIDE_DATABASE_ERROR",
    c"CACHEASIDE_CACHE_ERROR",
    c"CACHEASIDE_TIMEOUT",
    c"CACHEASIDE_PANIC",
    c"CACHEASIDE_CORRUPT_ENTRY",
    c"CACHEASIDE_LOADER_ERROR",
    c"CACHEASIDE_BACKLOG_FULL",
];

fn status_name(status: u32) -> &'static std::ffi::CStr {
    usize::try_from(status)
        .ok()
        .and_then(|i| STATUS_NAMES.get(i))
        .copied()
        .unwrap_or(c"CACHEASIDE_UNKNOWN_STATUS")
}

/// What an extern function returns when it fails before reaching the safe
/// API (NULL argument) or when its body panics.
pub(crate) trait Failure {
    fn failure(status: cacheaside_status) -> Self;
}

impl Failure for cacheaside_status {
    fn failure(status: cacheaside_status) -> Self {
        status
    }
}

impl Failure for () {
    fn failure(_: cacheaside_status) -> Self {}
}

impl Failure for u64 {
    fn failure(_: cacheaside_status) -> Self {
        0
    }
}

impl Failure for usize {
    fn failure(_: cacheaside_status) -> Self {
        0
    }
}

impl<T> Failure for *mut T {
    fn failure(_: cacheaside_status) -> Self {
        std::ptr::null_mut()
    }
}

impl Failure for *const c_char {
    fn failure(_: cacheaside_status) -> Self {
        c"".as_ptr()
    }
}

/// The value an output parameter holds when a call did not succeed.
pub(crate) trait Zeroed {
    const ZEROED: Self;
}

impl<T> Zeroed for *mut T {
    const ZEROED: Self = std::ptr::null_mut();
}

impl Zeroed for u64 {
    const ZEROED: Self = 0;
}

/// The library's version, e.g. `"0.1.0"` (the same string as the
/// `CACHEASIDE_VERSION` macro of the header it was built with).
///
/// Ownership: a static string; do not free it. Thread-safe.
#[unsafe(no_mangle)]
pub extern "C" fn cacheaside_version() -> *const c_char {
    ffi_panic_boundary! {
        concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_status_has_its_own_name() {
        use cacheaside_status::*;
        let all = [
            CACHEASIDE_OK,
            CACHEASIDE_NOT_FOUND,
            CACHEASIDE_INVALID_ARGUMENT,
            CACHEASIDE_DATABASE_ERROR,
            CACHEASIDE_CACHE_ERROR,
            CACHEASIDE_TIMEOUT,
            CACHEASIDE_PANIC,
            CACHEASIDE_CORRUPT_ENTRY,
            CACHEASIDE_LOADER_ERROR,
            CACHEASIDE_BACKLOG_FULL,
        ];
        assert_eq!(all.len(), STATUS_NAMES.len());
        for status in all {
            let name = status_name(status as u32).to_str().unwrap();
            assert_eq!(name, format!("{status:?}"));
        }
        assert_eq!(status_name(10).to_str(), Ok("CACHEASIDE_UNKNOWN_STATUS"));
        assert_eq!(
            status_name(u32::MAX).to_str(),
            Ok("CACHEASIDE_UNKNOWN_STATUS")
        );
    }
}
