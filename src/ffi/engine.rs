//! The generic engine from C: get-or-load with a C loader callback, and the
//! byte buffers it exchanges.
//!
//! Values are UTF-8 text (JSON, say) stored in the engine as a Rust
//! `String`, so the cached entry is readable in Redis and a Rust caller of
//! `get_or_load::<String>` on the same key sees the same value. Binary data
//! must be encoded (e.g. base64) by the caller.

use std::ffi::{c_char, c_int, c_void};
use std::ptr;
use std::time::Duration;

use super::Zeroed;
use super::cacheaside_status::{self, *};
use super::client::{cacheaside_client, status};
use super::error::fail;
use crate::error::{Error, Result};

/// A value: `len` bytes of UTF-8 text at `data`, followed by a NUL byte the
/// library adds (not counted in `len`), so `data` may be printed as a C
/// string when the text holds no NUL.
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
        let mut bytes = text.into_bytes();
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
/// It must either call `cacheaside_bytes_set(out_value, ...)` once and
/// return `CACHEASIDE_OK` (the value is cached for the call's TTL), or
/// return `CACHEASIDE_NOT_FOUND` (the absence is cached for the negative
/// TTL), or return any other value to fail: every caller waiting on this
/// load then gets `CACHEASIDE_LOADER_ERROR`, and nothing is cached. It
/// returns an `int` so that any value a C function returns is well defined;
/// return `cacheaside_status` values.
///
/// Threads: it runs on the thread that called `cacheaside_get_or_load()`.
/// For one key at most one loader runs at a time in this process: while it
/// runs, the key's single-flight entry is held (other threads asking for
/// the key wait on it), and no other library lock. It may call the
/// library, for other keys; a call for the same key from inside its own
/// loader returns `CACHEASIDE_INVALID_ARGUMENT` at once (it would otherwise
/// wait for itself). It must not unwind out of the callback: no C++
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
/// The bytes must be valid UTF-8; `data` may be NULL when `len` is 0 (the
/// empty value). This is how a `cacheaside_loader` hands back its value, so
/// no memory crosses between allocators.
///
/// Returns `CACHEASIDE_INVALID_ARGUMENT` (leaving `*out` zeroed) for a NULL
/// `out`, NULL `data` with a nonzero `len`, or bytes that are not UTF-8.
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
            Ok(String::new())
        } else if data.is_null() {
            Err(Error::invalid_argument("`data` is NULL but `len` is not 0"))
        } else {
            // SAFETY: the caller promises `len` readable bytes at `data`.
            let bytes = unsafe { std::slice::from_raw_parts(data.cast::<u8>(), len) };
            std::str::from_utf8(bytes)
                .map(str::to_owned)
                .map_err(|_| Error::invalid_argument("value bytes are not valid UTF-8"))
        };
        // SAFETY: zeroed or library-filled, as the caller promises.
        drop(unsafe { out.take() });
        match copied {
            Ok(text) => {
                *out = cacheaside_bytes::from_string(text);
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

/// Cache-aside read of any key through a C loader, with the single-flight
/// guarantee: however many threads (and processes) miss `key` at once, one
/// loader call runs and every caller gets its value. Blocks.
///
/// `key` is the cache key (non-empty UTF-8; stored under the client's
/// namespace); `ttl_ms` is how long a loaded value stays cached (at least
/// 1). On a miss `loader(user_data, key, out_value)` runs on this thread
/// (see `cacheaside_loader`); followers never call their own loader, and
/// get the leader's outcome.
///
/// Returns `CACHEASIDE_OK` with the value in `*out`, `CACHEASIDE_NOT_FOUND`
/// when the loader reported absence (now or, cached, earlier),
/// `CACHEASIDE_LOADER_ERROR` when the loader failed,
/// `CACHEASIDE_INVALID_ARGUMENT` for NULL pointers, an empty or non-UTF-8
/// key, or a zero TTL. `*out` is zeroed unless the call succeeds.
///
/// Ownership: the caller owns `*out` and frees it with
/// `cacheaside_bytes_free()`. `user_data` is only passed to the loader.
/// Thread-safe.
///
/// # Safety
/// `client` is NULL or a live client; `key` is NULL or a NUL-terminated
/// string; `loader` is NULL or a function of the documented shape;
/// `out` is NULL or points to writable storage for one `cacheaside_bytes`
/// (its old contents are not freed).
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
        let out = non_null!(out out);
        let client = non_null!(client);
        let key_text = non_null!(str key);
        let Some(loader) = loader else {
            return fail(&Error::invalid_argument("`loader` is NULL"));
        };
        let ttl = Duration::from_millis(ttl_ms);
        let result = client.inner.engine().get_or_load_singleflight(key_text, ttl, || {
            // SAFETY: the caller promises a loader of the documented shape;
            // `key` is live for this whole call.
            unsafe { call_loader(loader, user_data, key) }
        });
        match result {
            Ok(Some(text)) => {
                *out = cacheaside_bytes::from_string(text);
                CACHEASIDE_OK
            }
            Ok(None) => CACHEASIDE_NOT_FOUND,
            Err(err) => fail(&err),
        }
    }
}

/// Runs a C loader and turns what it returned into the engine's terms.
///
/// # Safety
/// `loader` is a function of the shape `cacheaside_loader` documents; `key`
/// is a live C string.
unsafe fn call_loader(
    loader: unsafe extern "C" fn(*mut c_void, *const c_char, *mut cacheaside_bytes) -> c_int,
    user_data: *mut c_void,
    key: *const c_char,
) -> Result<Option<String>> {
    let mut value = cacheaside_bytes::ZEROED;
    // SAFETY: as the caller promises; `value` outlives the call.
    let code = unsafe { loader(user_data, key, &mut value) };
    // SAFETY: `value` was zeroed, and the loader may only fill it through
    // `cacheaside_bytes_set`. Taking it here frees it on every path.
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
    // `cacheaside_bytes_set` checked the bytes; a loader that wrote into
    // the buffer itself may have broken them.
    String::from_utf8(bytes)
        .map(Some)
        .map_err(|_| loader_failed("the loader's value is not valid UTF-8".to_owned()))
}

/// Removes `key`'s cached value and revokes any reader's lease on it, so a
/// load that started before this call cannot fill it afterwards. Call it
/// after the write to the source has committed. Blocks.
///
/// Returns `CACHEASIDE_INVALID_ARGUMENT` for NULL pointers or an empty or
/// non-UTF-8 key; `CACHEASIDE_CACHE_ERROR` or `CACHEASIDE_TIMEOUT` when
/// Redis fails (the old value then lives until its TTL).
///
/// Thread-safe.
///
/// # Safety
/// `client` is NULL or a live client; `key` is NULL or a NUL-terminated
/// string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_invalidate(
    client: *const cacheaside_client,
    key: *const c_char,
) -> cacheaside_status {
    ffi_panic_boundary! {
        let client = non_null!(client);
        let key = non_null!(str key);
        status(client.inner.engine().invalidate(key))
    }
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

        // Replacing frees the old buffer (Miri/valgrind would see a leak).
        let bad = [0xff_u8, 0xfe];
        // SAFETY: valid pointers for the call.
        let status = unsafe { cacheaside_bytes_set(&mut value, bad.as_ptr().cast(), bad.len()) };
        assert_eq!(status, CACHEASIDE_INVALID_ARGUMENT);
        assert!(value.data.is_null());

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
