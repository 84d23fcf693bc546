//! Pub/sub from C: publish, subscribe with a callback, and the opaque
//! `cacheaside_subscription` handle.

use std::ffi::{CString, c_char, c_void};
use std::ptr;

use super::cacheaside_status::{self, *};
use super::client::cacheaside_client;
use super::error::fail;
use crate::error::Error;
use crate::events::{Event, Events, Subscription};

/// Receives a subscription's events, on the subscription's own thread.
///
/// A message: `channel` is the channel it was published to (without the
/// client's namespace), `payload` its `len` bytes (followed by a NUL the
/// library adds, not counted in `len`, so text payloads print as C
/// strings).
///
/// A gap notice: `channel` is NULL. The subscription's connection broke and
/// has just been restored; messages published in between may have been
/// lost (Redis pub/sub delivers at most once), and every message published
/// from now on is delivered. `payload` is a NUL-terminated description of
/// what broke, `len` bytes long. Re-read whatever state the messages
/// describe from its source of truth; for delivery that survives
/// disconnects, use Redis Streams instead of pub/sub.
///
/// Threads: calls for one subscription come one at a time, in publish
/// order, on that subscription's thread (not the thread that subscribed);
/// `user_data` must be usable there. While the callback runs, that
/// subscription's later messages wait. It may call the library, including
/// `cacheaside_subscription_free()` on its own subscription (see there). It
/// must not unwind (throw a C++ exception or `longjmp`) out of the call.
///
/// Ownership: `channel` and `payload` are borrowed for the call only; copy
/// what you keep.
pub type cacheaside_message_cb = Option<
    unsafe extern "C" fn(
        user_data: *mut c_void,
        channel: *const c_char,
        payload: *const c_char,
        len: usize,
    ),
>;

/// A live subscription: a thread with its own Redis connection, delivering
/// events to a `cacheaside_message_cb` (opaque).
///
/// Ownership: created by `cacheaside_subscribe()` or
/// `cacheaside_psubscribe()`, freed by `cacheaside_subscription_free()`. It
/// does not borrow its client: it may outlive it.
///
/// Thread safety: it may be freed from any thread, including its own
/// callback's.
pub struct cacheaside_subscription {
    _inner: Subscription,
}

/// The callback and its argument, moved to the subscription's thread.
struct Target {
    callback: unsafe extern "C" fn(*mut c_void, *const c_char, *const c_char, usize),
    user_data: *mut c_void,
}

// SAFETY: `cacheaside_subscribe()`'s contract makes the caller promise that
// `user_data` may be used from the subscription's thread; the function
// pointer is plain code.
unsafe impl Send for Target {}

impl Target {
    fn deliver(&self, event: Event<'_>) {
        match event {
            Event::Message {
                channel, payload, ..
            } => {
                // Our channels hold no NUL (they are checked); another
                // client's channel matching a pattern might.
                let channel = CString::new(channel.replace('\0', "\\0")).unwrap_or_default();
                let mut bytes = Vec::with_capacity(payload.len() + 1);
                bytes.extend_from_slice(payload);
                bytes.push(0);
                // SAFETY: a function of the documented shape, as the caller
                // of `cacheaside_subscribe` promised; the pointers live for
                // the call.
                unsafe {
                    (self.callback)(
                        self.user_data,
                        channel.as_ptr(),
                        bytes.as_ptr().cast(),
                        payload.len(),
                    );
                }
            }
            Event::Gap { cause, .. } => {
                let text = CString::new(cause.chain().replace('\0', "\\0")).unwrap_or_default();
                let len = text.as_bytes().len();
                // SAFETY: as above; a NULL channel marks the gap notice.
                unsafe { (self.callback)(self.user_data, ptr::null(), text.as_ptr(), len) };
            }
        }
    }
}

/// Publishes `len` bytes at `payload` on `channel` (stored under the
/// client's namespace: namespace `app:` and channel `orders` publish to the
/// Redis channel `app:{orders}`; the braces keep namespaces that share a
/// prefix, such as `app:` and `app:v2:`, from hearing each other), and stores in `*receivers` how many
/// subscribers received it (0: nobody was listening, and the message is
/// gone). Blocks for one Redis round trip.
///
/// Returns `CACHEASIDE_INVALID_ARGUMENT` for NULL pointers (`payload` may
/// be NULL only with `len` 0) or a channel that is empty, longer than 512
/// bytes, not UTF-8, or holds `{`, `}` or a control character;
/// `CACHEASIDE_CACHE_ERROR` or `CACHEASIDE_TIMEOUT` when Redis fails.
/// `*receivers` is 0 unless the call succeeds.
///
/// Ownership: the caller keeps `payload` (any bytes). Thread-safe.
///
/// # Safety
/// `client` is NULL or a live client; `channel` is NULL or a NUL-terminated
/// string; `payload` is NULL or points to `len` readable bytes; `receivers`
/// is NULL or points to writable storage for one `uint64_t`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_publish(
    client: *const cacheaside_client,
    channel: *const c_char,
    payload: *const c_char,
    len: usize,
    receivers: *mut u64,
) -> cacheaside_status {
    ffi_panic_boundary! {
        let receivers = non_null!(out receivers);
        let client = non_null!(client);
        let channel = non_null!(str channel);
        let payload: &[u8] = if len == 0 {
            &[]
        } else {
            let payload = non_null!(raw payload);
            // SAFETY: the caller promises `len` readable bytes at `payload`.
            unsafe { std::slice::from_raw_parts(payload.cast::<u8>(), len) }
        };
        match events(client).and_then(|events| events.publish(channel, payload)) {
            Ok(count) => {
                *receivers = count;
                CACHEASIDE_OK
            }
            Err(err) => fail(&err),
        }
    }
}

/// Subscribes to `channel` (under the client's namespace) and calls
/// `callback(user_data, channel, payload, len)` for every message published
/// to it, on a thread of the subscription's own, until the subscription is
/// freed. Stores the subscription in `*out`.
///
/// Returns once Redis has confirmed the subscription: a message published
/// after this returns is delivered. The subscription has its own Redis
/// connection (named `cacheaside-sub-...` in `CLIENT LIST`), opened with the
/// client's connect and I/O timeouts. When it breaks, the subscription
/// reconnects with exponential backoff (25 ms doubling to 5 s, with
/// jitter), subscribes again, and then calls `callback` once with
/// `channel == NULL`: the gap notice described at `cacheaside_message_cb`.
///
/// Returns `CACHEASIDE_INVALID_ARGUMENT` for NULL pointers or a bad channel
/// name (as for `cacheaside_publish()`); `CACHEASIDE_CACHE_ERROR` or
/// `CACHEASIDE_TIMEOUT` when the first connection or subscription fails.
/// `*out` is set to NULL first and to the subscription on success only.
///
/// Ownership: the caller owns `*out` and frees it with
/// `cacheaside_subscription_free()`; `user_data` stays the caller's, and
/// must stay valid until then. Thread-safe.
///
/// # Safety
/// `client` is NULL or a live client; `channel` is NULL or a NUL-terminated
/// string; `callback` is NULL or a function of the shape
/// `cacheaside_message_cb` documents; `user_data` may be used from another
/// thread; `out` is NULL or points to writable storage for one pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_subscribe(
    client: *const cacheaside_client,
    channel: *const c_char,
    callback: cacheaside_message_cb,
    user_data: *mut c_void,
    out: *mut *mut cacheaside_subscription,
) -> cacheaside_status {
    ffi_panic_boundary! {
        let out = non_null!(out out);
        let client = non_null!(client);
        let channel = non_null!(str channel);
        let Some(callback) = callback else {
            return fail(&Error::invalid_argument("`callback` is NULL"));
        };
        let target = Target { callback, user_data };
        let subscribed = events(client)
            .and_then(|events| events.subscribe(&[channel], move |event| target.deliver(event)));
        hand_out(subscribed, out)
    }
}

/// `cacheaside_subscribe()` to every channel matching `pattern`, a Redis
/// glob (`*`, `?`, `[...]`, `\` escapes) within the client's namespace (the
/// namespace itself is matched literally). `channel` in the callback is the
/// channel a message was published to, without the namespace.
///
/// Returns, owns and promises as `cacheaside_subscribe()`; on a Redis
/// Cluster, whose pub/sub is sharded and has no patterns,
/// `CACHEASIDE_INVALID_ARGUMENT`.
///
/// # Safety
/// As `cacheaside_subscribe()`, with `pattern` for `channel`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_psubscribe(
    client: *const cacheaside_client,
    pattern: *const c_char,
    callback: cacheaside_message_cb,
    user_data: *mut c_void,
    out: *mut *mut cacheaside_subscription,
) -> cacheaside_status {
    ffi_panic_boundary! {
        let out = non_null!(out out);
        let client = non_null!(client);
        let pattern = non_null!(str pattern);
        let Some(callback) = callback else {
            return fail(&Error::invalid_argument("`callback` is NULL"));
        };
        let target = Target { callback, user_data };
        let subscribed = events(client)
            .and_then(|events| events.psubscribe(&[pattern], move |event| target.deliver(event)));
        hand_out(subscribed, out)
    }
}

/// Stores a new subscription in `*out` (already NULL), or records the error.
fn hand_out(
    subscribed: crate::Result<crate::Subscription>,
    out: &mut *mut cacheaside_subscription,
) -> cacheaside_status {
    match subscribed {
        Ok(inner) => {
            *out = Box::into_raw(Box::new(cacheaside_subscription { _inner: inner }));
            CACHEASIDE_OK
        }
        Err(err) => fail(&err),
    }
}

/// Unsubscribes, closes the subscription's connection, stops its thread
/// and frees it. NULL is a no-op.
///
/// From any other thread, it waits for the thread to finish (at most about
/// 50 ms when idle, or until the callback in progress returns): once it
/// returns, the callback is not running and is never called again, so
/// `user_data` may be freed.
///
/// From inside the subscription's own callback, it cannot wait for itself:
/// it returns at once, and the callback call in progress is the last one
/// (the thread ends when it returns). The callback may free `user_data`
/// after this call, as long as it does not use it afterwards.
///
/// # Safety
/// `subscription` is NULL or came from `cacheaside_subscribe()` or
/// `cacheaside_psubscribe()` and was not freed yet.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cacheaside_subscription_free(subscription: *mut cacheaside_subscription) {
    ffi_panic_boundary! {
        if !subscription.is_null() {
            // SAFETY: the caller hands back a pointer from Box::into_raw.
            drop(unsafe { Box::from_raw(subscription) });
        }
    }
}

fn events(client: &cacheaside_client) -> crate::Result<Events> {
    client.inner.events()
}

#[cfg(test)]
mod tests {
    use std::ffi::CStr;

    use super::*;

    /// What the test callback saw: (channel, payload bytes, len).
    type Seen = Vec<(Option<String>, Vec<u8>, usize)>;

    unsafe extern "C" fn record(
        user_data: *mut c_void,
        channel: *const c_char,
        payload: *const c_char,
        len: usize,
    ) {
        // SAFETY: the test passes a `Seen`; the library passes live
        // pointers, and `payload` has `len` bytes plus a NUL.
        unsafe {
            let seen = &mut *user_data.cast::<Seen>();
            let channel = (!channel.is_null())
                .then(|| CStr::from_ptr(channel).to_string_lossy().into_owned());
            let bytes = std::slice::from_raw_parts(payload.cast::<u8>(), len + 1).to_vec();
            seen.push((channel, bytes, len));
        }
    }

    #[test]
    fn messages_and_gaps_reach_the_c_callback() {
        let mut seen: Seen = Vec::new();
        let target = Target {
            callback: record,
            user_data: (&mut seen as *mut Seen).cast(),
        };
        target.deliver(Event::Message {
            channel: "news",
            payload: b"a\0b",
        });
        let cause = Error::invalid_argument("connection reset");
        target.deliver(Event::Gap { cause: &cause });
        assert_eq!(seen[0], (Some("news".to_owned()), b"a\0b\0".to_vec(), 3));
        let (channel, reason, len) = &seen[1];
        assert_eq!(*channel, None, "a gap has a NULL channel");
        assert_eq!(reason.last(), Some(&0), "NUL-terminated");
        assert_eq!(&reason[..*len], cause.chain().as_bytes());
    }
}
