//! An exact sliding-window rate limiter: at most `limit` requests per
//! subject are allowed in any window of `window` length, across every
//! thread and process that shares the Redis server.
//!
//! What it guarantees, and how:
//!
//! - **Exact and atomic.** One Lua script (one round trip) evicts the
//!   entries older than the window, counts the rest, and adds the request
//!   only if the count is under the limit. Nothing runs between the check
//!   and the add, so concurrent callers can never overshoot the limit.
//! - **Rejected requests cost nothing.** Only allowed requests are recorded,
//!   so a client that keeps retrying while it is limited is allowed again as
//!   soon as the window slides past its earlier requests (the article's
//!   version records every attempt, and a client retrying faster than
//!   `limit / window` is locked out for ever). It also bounds the memory of
//!   a subject to `limit` entries.
//! - **Every request counts, once.** Each entry's member is unique (a
//!   random per-process token and a counter; the score is the server time),
//!   so two requests in the same microsecond are two entries, not one. The
//!   member is chosen before the script is sent, so a script that `Cache`
//!   runs again after a dropped connection finds its request already
//!   counted and does not count it twice.
//! - **One clock.** Time is the Redis server's (`TIME` inside the script),
//!   so processes on machines with skewed clocks agree on the window.
//! - **A truthful `retry_after`.** A rejected call says how long until a
//!   slot frees: never zero, never more than the window.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use once_cell::sync::Lazy;
use redis::Script;

use crate::cache::Cache;
use crate::error::{Error, ErrorKind, Result};
use crate::keys::validate_name;
use crate::redis_conn::RedisConnection;

/// A sliding-window limit, `limit` requests per `window`, applied to any
/// number of subjects (a user id, an API key, an IP address...).
///
/// Each subject's recent requests live in one Redis sorted set per limit,
/// `{namespace}{rate_limit:<limit>/<window_ms>ms:<subject>}`, which expires
/// when the window has passed since its last allowed request. Memory per
/// subject is at most `limit` entries per limit. Keying the set by its limit
/// and window keeps limits apart: a 100-per-second API limit on an IP
/// address neither trims nor expires the entries of a 5-per-15-minutes
/// login limit on the same address (one shared set would let each API call
/// reset the login limit).
///
/// Cheap to clone; [`check`](Self::check) blocks for one Redis round trip
/// and is safe from many threads and processes at once.
///
/// ```no_run
/// use std::time::Duration;
/// use cacheaside::{Client, Config, RateLimiter};
///
/// let client = Client::open(&Config::from_env())?;
/// let limiter = RateLimiter::new(client.cache(), 100, Duration::from_secs(60))?;
/// let decision = limiter.check("user:42")?;
/// if !decision.allowed {
///     println!("slow down: try again in {:?}", decision.retry_after);
/// }
/// # Ok::<(), cacheaside::Error>(())
/// ```
#[derive(Clone)]
pub struct RateLimiter {
    cache: Cache,
    limit: u32,
    window: Duration,
}

/// What [`RateLimiter::check`] decided for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct RateLimitDecision {
    /// Whether the request may go ahead (it was counted) or not (it was
    /// not counted, and does not delay later requests).
    pub allowed: bool,
    /// How many more requests the window allows right now.
    pub remaining: u32,
    /// How long until the next request would be allowed: zero while
    /// `remaining` is above zero; otherwise the time until the oldest
    /// counted request leaves the window, rounded up to a millisecond (at
    /// least 1 ms, at most the window).
    pub retry_after: Duration,
    /// The Redis server's clock when the decision was made (microseconds
    /// since the Unix epoch): the time the request was recorded at.
    pub server_time_us: u64,
}

impl RateLimitDecision {
    /// [`server_time_us`](Self::server_time_us) as a [`SystemTime`].
    pub fn server_time(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_micros(self.server_time_us)
    }
}

impl RateLimiter {
    /// The longest window a limiter accepts: 366 days.
    pub const MAX_WINDOW: Duration = Duration::from_secs(366 * 24 * 60 * 60);

    /// A limiter allowing `limit` requests per subject in any `window`.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidArgument`] when `limit` is 0, or `window` is
    /// under 1 ms or over [`RateLimiter::MAX_WINDOW`].
    pub fn new(cache: &Cache, limit: u32, window: Duration) -> Result<RateLimiter> {
        if limit == 0 {
            return Err(Error::invalid_argument("rate limit must be at least 1"));
        }
        if window < Duration::from_millis(1) || window > RateLimiter::MAX_WINDOW {
            return Err(Error::invalid_argument(
                "rate-limit window must be between 1 ms and 366 days",
            ));
        }
        Ok(RateLimiter {
            cache: cache.clone(),
            limit,
            window,
        })
    }

    /// The number of requests allowed per window.
    pub fn limit(&self) -> u32 {
        self.limit
    }

    /// The window's length.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// Decides whether one request of `subject` may go ahead now, and
    /// counts it if so. One round trip; atomic across processes.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidArgument`] for a subject that is empty, longer
    /// than 512 bytes, or holds `{`, `}` or a control character; cache
    /// errors and timeouts (the request is then not counted).
    pub fn check(&self, subject: &str) -> Result<RateLimitDecision> {
        self.run(subject, None, 0)
    }

    /// Test hook: [`check`](Self::check) as if the server clock read
    /// `server_time_us`, to put two requests in the same microsecond.
    #[cfg(feature = "test-hooks")]
    pub fn check_at(&self, subject: &str, server_time_us: u64) -> Result<RateLimitDecision> {
        self.run(subject, Some(server_time_us), 0)
    }

    /// Test hook: [`check`](Self::check) with its script run twice on one
    /// connection, as [`Cache`] runs it again when the connection drops
    /// after the server ran it (the reply lost): the second decision.
    #[cfg(feature = "test-hooks")]
    pub fn check_retried(&self, subject: &str) -> Result<RateLimitDecision> {
        self.run(subject, None, 1)
    }

    /// `replays`: extra runs of the script before the one whose reply
    /// counts (test hook; 0 otherwise).
    fn run(
        &self,
        subject: &str,
        pinned_time_us: Option<u64>,
        replays: usize,
    ) -> Result<RateLimitDecision> {
        validate_name("rate-limit subject", subject)?;
        let window_ms = self.window.as_millis() as u64;
        let key = self
            .cache
            .redis_key(&window_key(self.limit, window_ms, subject));
        // Made once, outside what `Cache` may run twice (after a connection
        // that dropped once the server had run the script): a retry names
        // the same request, which the script counts once.
        let id = request_id();
        let script = |conn: &mut RedisConnection| {
            let mut call = SLIDING_WINDOW.key(&key);
            call.arg(self.limit).arg(window_ms).arg(&id);
            if let Some(now) = pinned_time_us {
                call.arg(now);
            }
            call.invoke(conn)
        };
        let (allowed, remaining, retry_us, now_us): (i64, i64, i64, i64) =
            self.cache.with_connection(|conn| {
                for _ in 0..replays {
                    script(conn)?;
                }
                script(conn)
            })?;
        if !(allowed == 0 || allowed == 1) || remaining < 0 || retry_us < 0 || now_us < 0 {
            return Err(Error::new(
                ErrorKind::Cache,
                format!(
                    "unexpected reply from the rate-limit script: {allowed} {remaining} {retry_us} {now_us}"
                ),
            ));
        }
        let retry_after = if retry_us == 0 {
            Duration::ZERO
        } else {
            // Round up, so waiting `retry_after` is always enough; clamp, so
            // a server clock that stepped back cannot ask for more than a
            // window.
            let ms = (retry_us as u64).div_ceil(1000).clamp(1, window_ms);
            Duration::from_millis(ms)
        };
        Ok(RateLimitDecision {
            allowed: allowed == 1,
            remaining: u32::try_from(remaining).unwrap_or(u32::MAX),
            retry_after,
            server_time_us: now_us as u64,
        })
    }
}

/// The key name of `subject`'s window under one limit: the limit and the
/// window are part of it, so two limits on one subject never share (and
/// trim, or expire) each other's entries.
fn window_key(limit: u32, window_ms: u64, subject: &str) -> String {
    format!("rate_limit:{limit}/{window_ms}ms:{subject}")
}

/// A member no other request, in any process, has: a random per-process
/// token and a counter. (The score is the server time.)
fn request_id() -> String {
    static PROCESS: Lazy<String> = Lazy::new(|| {
        let mut bytes = [0u8; 12];
        // The OS generator; if it fails (it does not on Linux), fall back
        // to fastrand: uniqueness, not secrecy, is what matters here.
        if getrandom::fill(&mut bytes).is_err() {
            bytes.iter_mut().for_each(|b| *b = fastrand::u8(..));
        }
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    });
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!("{}:{}", *PROCESS, NEXT.fetch_add(1, Ordering::Relaxed))
}

// KEYS[1]: the subject's sorted set; members are request ids, scores the
// server time in microseconds. ARGV: limit, window_ms, request id, and (test
// hook only) a pinned server time in microseconds. A request id already in
// the set is a retry of a run whose reply was lost: it counted then.
//
// The window at time `now` is (now - window, now]. Numbers go back to Redis
// through string.format('%.0f'): Lua would print a 16-digit microsecond
// time as "%.14g" and round it. Returns {allowed, remaining, retry_us, now}.
static SLIDING_WINDOW: Lazy<Script> = Lazy::new(|| {
    Script::new(
        r"
        local limit = tonumber(ARGV[1])
        local window_ms = tonumber(ARGV[2])
        local window = window_ms * 1000
        local now
        if ARGV[4] then
          now = tonumber(ARGV[4])
        else
          local t = redis.call('TIME')
          now = tonumber(t[1]) * 1000000 + tonumber(t[2])
        end
        redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('%.0f', now - window))
        local count = redis.call('ZCARD', KEYS[1])
        local allowed = 0
        if redis.call('ZSCORE', KEYS[1], ARGV[3]) then
          allowed = 1
        elseif count < limit then
          local at = string.format('%.0f', now)
          redis.call('ZADD', KEYS[1], at, ARGV[3])
          redis.call('PEXPIRE', KEYS[1], ARGV[2])
          count = count + 1
          allowed = 1
        end
        local retry = 0
        if count >= limit then
          -- The entry whose leaving brings the count under the limit (the
          -- oldest: the key belongs to this one limit and window).
          local entry = redis.call('ZRANGE', KEYS[1], count - limit, count - limit, 'WITHSCORES')
          retry = tonumber(entry[2]) + window - now
          if retry < 1 then retry = 1 end
        end
        local remaining = limit - count
        if remaining < 0 then remaining = 0 end
        return {allowed, remaining, retry, now}
        ",
    )
});

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_keys_name_the_limit_and_the_window() {
        assert_eq!(window_key(5, 900_000, "ip:1"), "rate_limit:5/900000ms:ip:1");
        assert_ne!(
            window_key(5, 900_000, "ip:1"),
            window_key(100, 1000, "ip:1")
        );
    }

    #[test]
    fn request_ids_are_unique() {
        let a = request_id();
        let b = request_id();
        assert_ne!(a, b);
        assert_eq!(
            a.split(':').next(),
            b.split(':').next(),
            "same process token"
        );
    }
}
