//! The values C callers exchange with the library (`cacheaside_bytes`),
//! and the callbacks that compute them (`cacheaside_loader`,
//! `cacheaside_versioned_loader`).
//!
//! A value is any bytes. The engine stores it as JSON (see
//! `src/ffi/value.rs`): valid UTF-8 as a JSON string, readable in Redis and
//! shared with a Rust `get_or_load::<String>` on the same key; other bytes
//! as `{"base64":"..."}`.

use std::ffi::{c_char, c_int, c_void};
use std::ptr;

use super::Zeroed;
use super::cacheaside_status::{self, *};
use super::error::fail;
use super::value::Value;
use crate::error::{Error, Result};

/// A value: `len` bytes at `data` (any bytes: text, JSON, protobuf),
/// followed by a NUL byte the library adds (not counted in `len`), so
/// `data` may be printed as a C string when it holds text without a NUL.
///
/// Ownership: `data` belongs to the library. Free it with
/// `cacheaside_bytes_free()`, never with `free()`; set it only with
/// `cacheaside_bytes_set()`. A zeroed struct (`data` NULL, `len` 0) holds
/// nothing.
#[repr(C)]
#[derive(Debug)]
pub struct cacheaside_bytes {
    /// The bytes, or NULL when the struct holds nothing.
    pub data: *mut u8,
    /// How many bytes `data` holds, not counting the trailing NUL.
    pub len: usize,
}

impl Zeroed for cacheaside_bytes {
    const ZEROED: Self = cacheaside_bytes {
        data: ptr::null_mut(),
        len: 0,
    };
}

impl cacheaside_bytes {
    /// Takes ownership of `text`, adding the trailing NUL.
    pub(crate) fn from_string(text: String) -> Self {
        cacheaside_bytes::from_vec(text.into_bytes())
    }

    /// Takes ownership of `bytes`, adding the trailing NUL.
    pub(crate) fn from_vec(mut bytes: Vec<u8>) -> Self {
        let len = bytes.len();
        bytes.push(0);
        let data = Box::into_raw(bytes.into_boxed_slice()).cast::<u8>();
        cacheaside_bytes { data, len }
    }

    /// Gives the buffer back to Rust and zeroes `self`; `None` if it held
    /// nothing.
    ///
    /// # Safety
    /// `self` is zeroed or was filled by `from_string` and not modified.
    unsafe fn take(&mut self) -> Option<Box<[u8]>> {
        let owned = std::mem::replace(self, cacheaside_bytes::ZEROED);
        if owned.data.is_null() {
            return None;
        }
        let whole = ptr::slice_from_raw_parts_mut(owned.data, owned.len + 1);
        // SAFETY: `data` and `len + 1` are exactly what `from_string` leaked.
        Some(unsafe { Box::from_raw(whole) })
    }
}

/// A loader: computes the value of `key` when the cache misses it.
///
/// It must either call `cacheaside_bytes_set(out_value, ...)` and
/// return `CACHEASIDE_OK` (the value is cached for the call's TTL), or
/// return `CACHEASIDE_NOT_FOUND` (the absence is cached for the negative
/// TTL), or return any other value to fail: every caller waiting on this
/// load then gets `CACHEASIDE_LOADER_ERROR`, and nothing is cached. It
/// returns an `int` so that any value a C function returns is well defined;
/// return `cacheaside_status` values.
///
/// Threads: it runs on the thread that called the read
/// (`cacheaside_engine_get_or_load()`, say). With a single-flight read, for
/// one key at most one loader runs at a time in this process: while it
/// runs, the key's single-flight entry is held (other threads asking for
/// the key wait on it), and no other library lock; a single-flight call for
/// the same key from inside its own loader returns
/// `CACHEASIDE_INVALID_ARGUMENT` at once (it would otherwise wait for
/// itself). With `cacheaside_engine_get_or_load_uncoalesced()` every caller
/// that misses runs its own loader, at the same time. A loader may call the
/// library, for other keys. It must not unwind out of the callback: no C++
/// exception, no `longjmp`, no `pthread_exit` or cancellation (that would
/// leave the key held until the process ends, and an unwind through the
/// library aborts the process). The C++ wrapper catches exceptions and
/// defers cancellation around the call.
///
/// Ownership: `key` and `out_value` are borrowed for the call; `out_value`
/// arrives zeroed, and the library takes what `cacheaside_bytes_set()` put
/// there (and frees it if the loader then fails).
pub type cacheaside_loader = Option<
    unsafe extern "C" fn(
        user_data: *mut c_void,
        key: *const c_char,
        out_value: *mut cacheaside_bytes,
    ) -> c_int,
>;

/// Copies `len` bytes from `data` into `*out`, which then owns the copy.
/// Whatever `*out` held before is freed after the copy, so `data` may point
/// into `*out`'s own bytes.
///
/// Any bytes (they need not be UTF-8); `data` may be NULL when `len` is 0
/// (the empty value). This is how a loader hands back its value, so no
/// memory crosses between allocators.
///
/// Returns `CACHEASIDE_INVALID_ARGUMENT` (leaving `*out` zeroed) for a NULL
/// `out` or NULL `data` with a nonzero `len`.
///
/// Ownership: the caller keeps `data`; free `*out` with
/// `cacheaside_bytes_free()` (inside a loader, the library does that).
///
/// # Safety
/// `out` is NULL or points to a zeroed or library-filled `cacheaside_bytes`;
/// `data` is NULL or points to `len` readable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_bytes_set(
    out: *mut cacheaside_bytes,
    data: *const c_void,
    len: usize,
) -> cacheaside_status {
    ffi_panic_boundary! {
        let out = non_null!(mut out);
        // Copy first, free after: `data` may point into `*out` itself (a
        // caller re-setting a value from its own bytes).
        let copied = if len == 0 {
            Ok(Vec::new())
        } else if data.is_null() {
            Err(Error::invalid_argument("`data` is NULL but `len` is not 0"))
        } else {
            // SAFETY: the caller promises `len` readable bytes at `data`.
            Ok(unsafe { std::slice::from_raw_parts(data.cast::<u8>(), len) }.to_vec())
        };
        // SAFETY: zeroed or library-filled, as the caller promises.
        drop(unsafe { out.take() });
        match copied {
            Ok(bytes) => {
                *out = cacheaside_bytes::from_vec(bytes);
                CACHEASIDE_OK
            }
            Err(err) => fail(&err),
        }
    }
}

/// Frees a value's bytes and zeroes it (the struct itself is not freed).
/// NULL is a no-op; freeing a zeroed or already freed value is a no-op, so
/// calling it twice is safe.
///
/// # Safety
/// `bytes` is NULL or points to a zeroed or library-filled
/// `cacheaside_bytes` (not modified since).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_bytes_free(bytes: *mut cacheaside_bytes) {
    ffi_panic_boundary! {
        // SAFETY: NULL or a valid struct, as the caller promises.
        if let Some(bytes) = unsafe { bytes.as_mut() } {
            // SAFETY: zeroed or library-filled, as the caller promises.
            drop(unsafe { bytes.take() });
        }
    }
}

/// A versioned loader: computes the value of `key` and its version (any
/// number that grows with every write of the row, e.g. a `version`
/// column), for `cacheaside_engine_get_or_load_versioned()`; and a writer:
/// writes the row and returns its new value and version (an
/// `UPDATE ... RETURNING`), for `cacheaside_engine_write_through()`.
///
/// Like `cacheaside_loader`, plus `out_version`: it must either call
/// `cacheaside_bytes_set(out_value, ...)`, set `*out_version` and return
/// `CACHEASIDE_OK`, or return `CACHEASIDE_NOT_FOUND` (no such row), or
/// return any other value to fail (`CACHEASIDE_LOADER_ERROR` for its
/// callers; nothing is cached). Threads, reentrancy and unwinding: as
/// `cacheaside_loader`.
///
/// Ownership: `key`, `out_value` and `out_version` are borrowed for the
/// call; `out_value` arrives zeroed and `*out_version` 0.
pub type cacheaside_versioned_loader = Option<
    unsafe extern "C" fn(
        user_data: *mut c_void,
        key: *const c_char,
        out_value: *mut cacheaside_bytes,
        out_version: *mut u64,
    ) -> c_int,
>;

/// A `cacheaside_loader`'s function pointer.
pub(crate) type LoaderFn =
    unsafe extern "C" fn(*mut c_void, *const c_char, *mut cacheaside_bytes) -> c_int;

/// A `cacheaside_versioned_loader`'s function pointer.
pub(crate) type VersionedLoaderFn =
    unsafe extern "C" fn(*mut c_void, *const c_char, *mut cacheaside_bytes, *mut u64) -> c_int;

/// Runs a C loader and turns what it returned into the engine's terms.
///
/// # Safety
/// `loader` is a function of the shape `cacheaside_loader` documents; `key`
/// is a live C string.
pub(crate) unsafe fn call_loader(
    loader: LoaderFn,
    user_data: *mut c_void,
    key: *const c_char,
) -> Result<Option<Value>> {
    let mut value = cacheaside_bytes::ZEROED;
    // SAFETY: as the caller promises; `value` outlives the call.
    let code = unsafe { loader(user_data, key, &mut value) };
    // SAFETY: `value` was zeroed, and the loader may only fill it through
    // `cacheaside_bytes_set`.
    unsafe { loaded(code, value) }
}

/// Runs a C versioned loader (or writer) and turns what it returned into
/// the engine's terms.
///
/// # Safety
/// `loader` is a function of the shape `cacheaside_versioned_loader`
/// documents; `key` is a live C string.
pub(crate) unsafe fn call_versioned_loader(
    loader: VersionedLoaderFn,
    user_data: *mut c_void,
    key: *const c_char,
) -> Result<Option<(Value, u64)>> {
    let mut value = cacheaside_bytes::ZEROED;
    let mut version = 0_u64;
    // SAFETY: as the caller promises; `value` and `version` outlive the call.
    let code = unsafe { loader(user_data, key, &mut value, &mut version) };
    // SAFETY: `value` was zeroed, and the loader may only fill it through
    // `cacheaside_bytes_set`.
    Ok(unsafe { loaded(code, value) }?.map(|value| (value, version)))
}

/// What a loader's status code and value mean. Takes (and so frees, on
/// every path) the value.
///
/// # Safety
/// `value` is zeroed or was filled by `cacheaside_bytes_set`.
unsafe fn loaded(code: c_int, mut value: cacheaside_bytes) -> Result<Option<Value>> {
    // SAFETY: as the caller promises.
    let bytes = unsafe { value.take() };
    let loader_failed = |why: String| Error::loader(std::io::Error::other(why));
    if code == CACHEASIDE_NOT_FOUND as c_int {
        return Ok(None);
    }
    if code != CACHEASIDE_OK as c_int {
        return Err(loader_failed(format!("the loader returned status {code}")));
    }
    let Some(bytes) = bytes else {
        return Err(loader_failed(
            "the loader returned CACHEASIDE_OK without calling cacheaside_bytes_set".to_owned(),
        ));
    };
    let mut bytes = Vec::from(bytes);
    bytes.pop(); // the trailing NUL
    Ok(Some(Value(bytes)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_set_copies_validates_and_frees() {
        let mut value = cacheaside_bytes::ZEROED;
        let text = b"hello";
        // SAFETY: valid pointers for the call.
        let status = unsafe { cacheaside_bytes_set(&mut value, text.as_ptr().cast(), text.len()) };
        assert_eq!(status, CACHEASIDE_OK);
        assert_eq!(value.len, 5);
        // SAFETY: library-filled, len + 1 bytes with a trailing NUL.
        let stored = unsafe { std::slice::from_raw_parts(value.data, value.len + 1) };
        assert_eq!(stored, b"hello\0");

        // Replacing frees the old buffer (Miri/valgrind would see a leak);
        // bytes need not be UTF-8.
        let binary = [0xff_u8, 0x00, 0xfe];
        // SAFETY: valid pointers for the call.
        let status =
            unsafe { cacheaside_bytes_set(&mut value, binary.as_ptr().cast(), binary.len()) };
        assert_eq!(status, CACHEASIDE_OK);
        // SAFETY: library-filled, len + 1 bytes with a trailing NUL.
        let stored = unsafe { std::slice::from_raw_parts(value.data, value.len + 1) };
        assert_eq!(stored, [0xff, 0x00, 0xfe, 0x00]);

        // SAFETY: NULL data with len 0 is the empty value.
        let status = unsafe { cacheaside_bytes_set(&mut value, ptr::null(), 0) };
        assert_eq!(status, CACHEASIDE_OK);
        assert!(!value.data.is_null());
        assert_eq!(value.len, 0);

        // SAFETY: library-filled; then zeroed, so twice is fine.
        unsafe {
            cacheaside_bytes_free(&mut value);
            cacheaside_bytes_free(&mut value);
            cacheaside_bytes_free(ptr::null_mut());
        }
        assert!(value.data.is_null());
        // SAFETY: NULL data with nonzero len is rejected, not read.
        let status = unsafe { cacheaside_bytes_set(&mut value, ptr::null(), 3) };
        assert_eq!(status, CACHEASIDE_INVALID_ARGUMENT);
    }

    #[test]
    fn bytes_set_from_its_own_bytes_copies_before_freeing() {
        let mut value = cacheaside_bytes::ZEROED;
        let text = b"same bytes";
        // SAFETY: valid pointers for the call.
        unsafe { cacheaside_bytes_set(&mut value, text.as_ptr().cast(), text.len()) };
        // SAFETY: `value.data` holds `value.len` bytes; the call must read
        // them before it frees them (Miri/valgrind see a use after free
        // otherwise, and the content below would be garbage).
        let status = unsafe { cacheaside_bytes_set(&mut value, value.data.cast(), value.len) };
        assert_eq!(status, CACHEASIDE_OK);
        // SAFETY: library-filled.
        let stored = unsafe { std::slice::from_raw_parts(value.data, value.len) };
        assert_eq!(stored, text);
        // SAFETY: library-filled.
        unsafe { cacheaside_bytes_free(&mut value) };
    }
}
