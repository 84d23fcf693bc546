//! Server-side sessions: unguessable ids, any serde value as data, a sliding
//! idle expiry renewed by every read, and an absolute lifetime no amount of
//! reading extends.
//!
//! What it guarantees, and how:
//!
//! - **Unguessable ids.** 256 bits from the operating system's CSPRNG
//!   (`getrandom`), written as 43 characters of unpadded base64url, safe in
//!   URLs and cookies.
//! - **One round trip per read.** A Lua script reads the session and renews
//!   its idle expiry in the same step (the article's version sends `GET`
//!   then `EXPIRE`: two round trips on every request that reads a session).
//! - **A bounded life.** The session stores its deadline (creation time plus
//!   its maximum lifetime, on the Redis server's clock); every renewal is
//!   clamped to the time left before it, so a session read forever still
//!   ends at its deadline (the article's sessions live as long as someone
//!   keeps reading them, which is how a stolen session id stays useful).
//! - **Unknown is not found.** An unknown, deleted or expired id reads as
//!   `None`; an id that cannot be one of ours (empty, over 128 characters,
//!   outside the base64url alphabet) is an `InvalidArgument` error, before
//!   any I/O.
//!
//! A session is the Redis string `{namespace}{session:<id>}`: a header
//! (`cas1 <idle_ms> <deadline_ms> `) followed by the data's JSON.

use std::time::Duration;

use once_cell::sync::Lazy;
use redis::{Script, Value};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::cache::Cache;
use crate::config::Config;
use crate::error::{Error, ErrorKind, Result, json_error};

/// Bytes of randomness in a session id.
const ID_BYTES: usize = 32;
/// The longest session id [`Sessions`] accepts, so ids of a future,
/// longer format still read.
const MAX_ID_LEN: usize = 128;

/// Creates, reads and deletes sessions with one idle TTL and one maximum
/// lifetime.
///
/// Each session keeps the idle TTL and deadline it was created with, so a
/// `Sessions` handle with other settings reads it by its own rules; the
/// handle's settings apply to the sessions it creates.
///
/// Cheap to clone; every method blocks for one Redis round trip and is safe
/// from many threads.
///
/// ```no_run
/// use std::time::Duration;
/// use cacheaside::{Client, Config, Sessions};
///
/// let client = Client::open(&Config::from_env())?;
/// // Lives 30 minutes after its last read, and never more than 12 hours.
/// let sessions = Sessions::new(client.cache(), Duration::from_secs(1800), Duration::from_secs(12 * 3600))?;
/// let id = sessions.create(&serde_json::json!({"user_id": 42}))?;
/// let data: Option<serde_json::Value> = sessions.get(&id)?;
/// assert_eq!(data.unwrap()["user_id"], 42);
/// assert!(sessions.delete(&id)?);
/// assert_eq!(sessions.get::<serde_json::Value>(&id)?, None);
/// # Ok::<(), cacheaside::Error>(())
/// ```
#[derive(Clone)]
pub struct Sessions {
    cache: Cache,
    idle_ttl: Duration,
    max_lifetime: Duration,
}

impl Sessions {
    /// Characters in a session id this type creates (43): 32 random bytes
    /// as unpadded base64url, 6 bits a character.
    // (Written as an expression, which cbindgen does not copy into the C
    // header as a stray `Sessions_ID_LEN`; C has CACHEASIDE_SESSION_ID_LEN.)
    pub const ID_LEN: usize = (ID_BYTES * 8).div_ceil(6);
    /// The longest idle TTL or maximum lifetime: 366 days.
    pub const MAX_LIFETIME: Duration = Duration::from_secs(366 * 24 * 60 * 60);
    /// The idle TTL of [`Client::sessions`](crate::Client::sessions): 30 minutes.
    pub const DEFAULT_IDLE_TTL: Duration = Duration::from_secs(30 * 60);

    /// A handle whose sessions expire `idle_ttl` after their last read (or
    /// creation), and in any case `max_lifetime` after creation. An idle
    /// TTL longer than the lifetime is simply clamped to it.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidArgument`] when either is under 1 ms or over
    /// [`Sessions::MAX_LIFETIME`].
    pub fn new(cache: &Cache, idle_ttl: Duration, max_lifetime: Duration) -> Result<Sessions> {
        check_lifetime("maximum lifetime", max_lifetime)?;
        Sessions {
            cache: cache.clone(),
            idle_ttl: max_lifetime,
            max_lifetime,
        }
        .with_idle_ttl(idle_ttl)
    }

    /// The same handle with another idle TTL (the maximum lifetime stays).
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// # let client = cacheaside::Client::open(&cacheaside::Config::from_env())?;
    /// let short = client.sessions().with_idle_ttl(Duration::from_secs(5 * 60))?;
    /// # Ok::<(), cacheaside::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`ErrorKind::InvalidArgument`] when it is under 1 ms or over
    /// [`Sessions::MAX_LIFETIME`].
    pub fn with_idle_ttl(self, idle_ttl: Duration) -> Result<Sessions> {
        check_lifetime("idle TTL", idle_ttl)?;
        Ok(Sessions { idle_ttl, ..self })
    }

    /// How long a session lives after its last read.
    pub fn idle_ttl(&self) -> Duration {
        self.idle_ttl
    }

    /// How long a session lives at most, however often it is read.
    pub fn max_lifetime(&self) -> Duration {
        self.max_lifetime
    }

    /// Stores `data` as JSON in a new session and returns its id (43
    /// URL-safe characters).
    ///
    /// # Errors
    /// [`ErrorKind::InvalidArgument`] when `data` does not serialize; cache
    /// errors and timeouts.
    pub fn create<T: Serialize + ?Sized>(&self, data: &T) -> Result<String> {
        let json = serde_json::to_string(data).map_err(|e| {
            Error::invalid_argument("session data does not serialize to JSON").with_source(e)
        })?;
        self.store(&json, 0)
    }

    /// [`create`](Self::create) for data that is JSON text already (what
    /// the C ABI uses); the text is checked and stored as it is.
    ///
    /// ```no_run
    /// # let client = cacheaside::Client::open(&cacheaside::Config::from_env())?;
    /// # let sessions = client.sessions();
    /// let id = sessions.create_json(r#"{"cart": [1, 2]}"#)?;
    /// assert_eq!(sessions.get_json(&id)?.as_deref(), Some(r#"{"cart": [1, 2]}"#));
    /// # Ok::<(), cacheaside::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`ErrorKind::InvalidArgument`] when `json` is not one JSON value;
    /// cache errors and timeouts.
    pub fn create_json(&self, json: &str) -> Result<String> {
        serde_json::from_str::<serde::de::IgnoredAny>(json).map_err(|e| {
            Error::invalid_argument("session data is not a JSON value").with_source(e)
        })?;
        self.store(json, 0)
    }

    /// Test hook: [`create_json`](Self::create_json) with its script run
    /// twice on one connection, as [`Cache`] runs it again when the
    /// connection drops after the server ran it (the reply lost).
    #[cfg(feature = "test-hooks")]
    pub fn create_json_retried(&self, json: &str) -> Result<String> {
        self.store(json, 1)
    }

    /// Reads a session's data and renews its idle expiry (clamped to its
    /// deadline), in one round trip. `Ok(None)` when no such session lives.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidArgument`] for an id that cannot be a session id;
    /// [`ErrorKind::CorruptEntry`] when the stored session is not in this
    /// module's format or its data does not decode as `T` (the message
    /// names neither the session id nor the data); cache errors and
    /// timeouts.
    pub fn get<T: DeserializeOwned>(&self, id: &str) -> Result<Option<T>> {
        let Some(json) = self.get_json(id)? else {
            return Ok(None);
        };
        serde_json::from_str(&json)
            .map(Some)
            .map_err(|e| Error::corrupt_session(json_error(&e)))
    }

    /// [`get`](Self::get) returning the stored JSON text as it is.
    ///
    /// # Errors
    /// As [`get`](Self::get), without the decoding.
    pub fn get_json(&self, id: &str) -> Result<Option<String>> {
        validate_session_id(id)?;
        let key = self.cache.redis_key(&session_key_name(id));
        let reply: Value = self
            .cache
            .with_connection(|conn| READ.key(&key).invoke(conn))?;
        // Not the reply itself: it may hold the session's data.
        let unexpected =
            |_: &Value| Error::new(ErrorKind::Cache, "unexpected reply from the session script");
        let Value::Array(parts) = &reply else {
            return Err(unexpected(&reply));
        };
        match parts.as_slice() {
            [Value::Int(0)] => Ok(None),
            [Value::Int(1), Value::BulkString(data)] => String::from_utf8(data.clone())
                .map(Some)
                .map_err(|_| Error::corrupt_session("the data is not UTF-8")),
            [Value::Int(2)] => Err(Error::corrupt_session(
                "the key holds something else (no cas1 header)",
            )),
            _ => Err(unexpected(&reply)),
        }
    }

    /// Ends a session at once; true if it existed.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidArgument`] for an id that cannot be a session id;
    /// cache errors and timeouts.
    pub fn delete(&self, id: &str) -> Result<bool> {
        validate_session_id(id)?;
        let key = self.cache.redis_key(&session_key_name(id));
        self.cache
            .with_connection(|conn| redis::cmd("DEL").arg(&key).query::<u64>(conn))
            .map(|deleted| deleted > 0)
    }

    /// `replays`: extra runs of the script before the one whose reply
    /// counts (test hook; 0 otherwise).
    fn store(&self, json: &str, replays: usize) -> Result<String> {
        // A fresh 256-bit id colliding with a live one is not going to
        // happen; SET NX makes it an error instead of a takeover if the
        // generator were ever broken. The id is made once, outside what
        // `Cache` may run twice (after a connection that dropped once the
        // server had run the script): a retry that finds the session with
        // its own data took the first run's key, and says so.
        let id = new_session_id()?;
        let key = self.cache.redis_key(&session_key_name(&id));
        let script = |conn: &mut crate::redis_conn::RedisConnection| {
            CREATE
                .key(&key)
                .arg(self.idle_ttl.as_millis() as u64)
                .arg(self.max_lifetime.as_millis() as u64)
                .arg(json)
                .invoke::<i64>(conn)
        };
        let created: i64 = self.cache.with_connection(|conn| {
            for _ in 0..replays {
                script(conn)?;
            }
            script(conn)
        })?;
        if created != 1 {
            return Err(Error::new(
                ErrorKind::Cache,
                "a new session id is already in use (is the random generator broken?)",
            ));
        }
        Ok(id)
    }
}

impl Sessions {
    /// Sessions with the default idle TTL, capped at `config`'s
    /// [`session_max_lifetime`](Config::session_max_lifetime).
    pub(crate) fn configured(cache: &Cache, config: &Config) -> Sessions {
        let max_lifetime = config.session_max_lifetime;
        Sessions {
            cache: cache.clone(),
            // `Config::validate` (run by every `open`) kept the lifetime
            // within the limits `Sessions::new` checks.
            idle_ttl: Sessions::DEFAULT_IDLE_TTL.min(max_lifetime),
            max_lifetime,
        }
    }
}

fn check_lifetime(name: &str, value: Duration) -> Result<()> {
    if value < Duration::from_millis(1) || value > Sessions::MAX_LIFETIME {
        return Err(Error::invalid_argument(format!(
            "session {name} must be between 1 ms and 366 days"
        )));
    }
    Ok(())
}

/// A new session id: [`ID_BYTES`] from the OS CSPRNG, unpadded base64url.
///
/// # Errors
/// [`ErrorKind::Cache`] in the (on Linux, impossible) case that the OS
/// generator fails: no id is better than a guessable one.
pub(crate) fn new_session_id() -> Result<String> {
    let mut bytes = [0u8; ID_BYTES];
    getrandom::fill(&mut bytes).map_err(|e| {
        Error::new(
            ErrorKind::Cache,
            format!("the operating system's random generator failed: {e}"),
        )
    })?;
    Ok(base64url(&bytes))
}

/// Checks that `id` could be a session id: 1 to [`MAX_ID_LEN`]
/// characters of the base64url alphabet (`A-Z a-z 0-9 - _`).
pub(crate) fn validate_session_id(id: &str) -> Result<()> {
    if id.is_empty() {
        return Err(Error::invalid_argument("session id must not be empty"));
    }
    if id.len() > MAX_ID_LEN {
        return Err(Error::invalid_argument(format!(
            "session id is {} characters long; at most {} are allowed",
            id.len(),
            MAX_ID_LEN
        )));
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(Error::invalid_argument(
            "session id may only hold base64url characters (A-Z, a-z, 0-9, '-', '_')",
        ));
    }
    Ok(())
}

fn session_key_name(id: &str) -> String {
    format!("session:{id}")
}

/// Unpadded base64url (RFC 4648 §5).
fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        // 1 byte gives 2 characters, 2 give 3, 3 give 4.
        for i in 0..=chunk.len() {
            out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
        }
    }
    out
}

// KEYS[1]: the session. ARGV: idle_ms, max_lifetime_ms, JSON data.
// The deadline is taken on the server's clock, like every later renewal.
// A key already holding this data under this idle TTL is this creation's
// own first run (retried after a lost reply; the id is 256 random bits):
// 1, not a collision.
static CREATE: Lazy<Script> = Lazy::new(|| {
    Script::new(
        r"
        local t = redis.call('TIME')
        local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
        local idle = tonumber(ARGV[1])
        local max = tonumber(ARGV[2])
        local ttl = idle
        if max < ttl then ttl = max end
        local value = 'cas1 ' .. ARGV[1] .. ' ' .. string.format('%.0f', now + max) .. ' ' .. ARGV[3]
        if redis.call('SET', KEYS[1], value, 'NX', 'PX', string.format('%.0f', ttl)) then
          return 1
        end
        local held = redis.call('GET', KEYS[1])
        if held then
          local idle, start = string.match(held, '^cas1 (%d+) %d+ ()')
          if idle == ARGV[1] and string.sub(held, start) == ARGV[3] then
            return 1
          end
        end
        return 0
        ",
    )
});

// KEYS[1]: the session. Returns {0} (no session), {1, data}, or {2} (the
// key holds something else). The renewal is min(idle, time to deadline):
// sliding expiry that never passes the absolute lifetime.
static READ: Lazy<Script> = Lazy::new(|| {
    Script::new(
        r"
        local v = redis.call('GET', KEYS[1])
        if not v then return {0} end
        local idle, deadline, start = string.match(v, '^cas1 (%d+) (%d+) ()')
        if not idle then return {2} end
        local t = redis.call('TIME')
        local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
        local left = tonumber(deadline) - now
        if left <= 0 then
          redis.call('DEL', KEYS[1])
          return {0}
        end
        local ttl = tonumber(idle)
        if left < ttl then ttl = left end
        redis.call('PEXPIRE', KEYS[1], string.format('%.0f', ttl))
        return {1, string.sub(v, start)}
        ",
    )
});

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64url_matches_rfc_4648_vectors() {
        // RFC 4648 §10, with the URL-safe alphabet and no padding.
        for (input, want) in [
            ("", ""),
            ("f", "Zg"),
            ("fo", "Zm8"),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg"),
            ("fooba", "Zm9vYmE"),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64url(input.as_bytes()), want, "{input}");
        }
        assert_eq!(base64url(&[0xfb, 0xff]), "-_8");
    }

    #[test]
    fn ids_are_43_url_safe_characters_and_differ() {
        let a = new_session_id().unwrap();
        let b = new_session_id().unwrap();
        assert_eq!(a.len(), Sessions::ID_LEN);
        assert!(validate_session_id(&a).is_ok());
        assert_ne!(a, b);
    }

    #[test]
    fn bad_ids_are_rejected() {
        let long = "a".repeat(MAX_ID_LEN + 1);
        for bad in ["", "abc=", "a/b", "a+b", "a b", "é", "a\0b", &long] {
            let err = validate_session_id(bad).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{bad:?}");
        }
        assert!(validate_session_id(&"a".repeat(MAX_ID_LEN)).is_ok());
        assert!(validate_session_id("Zm9v-_").is_ok());
    }
}
