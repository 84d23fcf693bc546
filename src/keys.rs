//! The Redis key layout, and the one rule for names that go inside a hash
//! tag.
//!
//! Layout. A cache key `k` lives at `{namespace}{k}` (a Redis Cluster hash
//! tag); beside it `…:lease` (the one reader allowed to fill it: a token),
//! `…:lock` (the cross-process rebuild lock: a token), `…:writers` (the
//! write-through writers in progress: a set of tokens), `…:floor` (the
//! lowest version a registered writer may still store, once the relay has
//! seen a newer one), `…:pending` (the newest write-behind change not yet
//! in the source: a hash), `…:seq` (the last write-behind sequence
//! number the key got, kept for a while after it) and `…:fence` (the
//! newest committed version a read replica must have before a load from
//! it counts, or `*`: see [`crate::fence`]). All share one slot.
//! A tag `t` has one key, `{namespace}{t}:tag` (its current stamp: see
//! [`crate::tags`]), in the slot of its own name; no cache key has a
//! `:tag` side key, so it collides with nothing.
//!
//! Names. Everything a caller places inside a hash tag or in front of one
//! (a cache key, a namespace, a capture or write-behind key prefix, a
//! rate-limit subject, a pub/sub channel) holds no `{`, `}` or control
//! character: a brace would end or nest the hash tag (the side keys of such
//! an entry could land in another cluster slot than its value), and a
//! control character has no business in a key or a log line. The same rule
//! holds on a single server, so data and code move to a cluster unchanged.
//! Subjects and channels are also non-empty and at most [`MAX_NAME_LEN`]
//! bytes.

use crate::error::{Error, Result};

/// The Redis keys that belong to one cache key.
#[derive(Debug, Clone)]
pub(crate) struct Keys {
    pub value: String,
    pub lease: String,
    pub lock: String,
    pub writers: String,
    pub floor: String,
    pub pending: String,
    /// The last write-behind sequence number given to the key: a floor for
    /// the next one that outlives the pending record.
    pub seq: String,
    /// A tagged read's tags, with the stamps taken before its load once
    /// they are (`None`: an untagged read).
    pub tags: Option<std::sync::Arc<Tags>>,
}

/// The tags of one tagged read: names, their Redis keys, and the stamps
/// read before the load (empty until then). Each name is checked by
/// [`validate_name`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Tags {
    pub names: Vec<String>,
    pub keys: Vec<String>,
    pub stamps: Vec<String>,
}

/// The Redis key of tag `tag`'s stamp in `namespace`.
pub(crate) fn tag_key(namespace: &str, tag: &str) -> String {
    format!("{}:tag", value_key(namespace, tag))
}

impl Keys {
    /// The side keys of a value key (a hit needs only the value key, so the
    /// read path builds these on a miss).
    pub fn for_value(value: String) -> Keys {
        Keys {
            lease: format!("{value}:lease"),
            lock: format!("{value}:lock"),
            writers: format!("{value}:writers"),
            floor: format!("{value}:floor"),
            pending: format!("{value}:pending"),
            seq: format!("{value}:seq"),
            value,
            tags: None,
        }
    }
}

/// The fence of a value key (in its slot): see [`crate::fence`]. Not in
/// [`Keys`]: only reads and writes with a replica configured build it.
pub(crate) fn fence_key(value: &str) -> String {
    format!("{value}:fence")
}

/// The Redis key of `key`'s value in `namespace`: the key in a hash tag.
pub(crate) fn value_key(namespace: &str, key: &str) -> String {
    // Built by hand: `format!` costs ten times as many instructions, once
    // per key of every read (a batch of 100 keys spent a sixth of its time
    // there).
    let mut value = String::with_capacity(namespace.len() + key.len() + 2);
    value.push_str(namespace);
    value.push('{');
    value.push_str(key);
    value.push('}');
    value
}

/// The one hash-tag rule: `text` holds no `{`, `}` or control character.
/// `what` names it in the error.
pub(crate) fn check_tag_safe(what: &str, text: &str) -> Result<()> {
    if text.chars().any(|c| c == '{' || c == '}' || c.is_control()) {
        return Err(Error::invalid_argument(format!(
            "{what} {text:?} may not contain '{{', '}}' or control characters \
             (braces delimit the Redis Cluster hash tag)"
        )));
    }
    Ok(())
}

/// Rejects a cache key that is empty or breaks the hash tag
/// [`Cache::redis_key`](crate::Cache::redis_key) wraps it in.
pub(crate) fn check_key(key: &str) -> Result<()> {
    if key.is_empty() {
        return Err(Error::invalid_argument("cache key must not be empty"));
    }
    check_tag_safe("cache key", key)?;
    check_not_reserved(key)
}

/// Key names the patterns own: sessions, rate-limit windows and the
/// write-behind streams live in the cache's key space, and a cache call on
/// one of them (a read that finds "a corrupt entry", an `invalidate`, the
/// relay given such a key by a row in the outbox) would delete a session or
/// reset a limit. `write_behind` is the streams' base key.
pub(crate) const RESERVED_KEY_PREFIXES: [&str; 4] =
    ["session:", "rate_limit:", "write_behind:", "write_behind"];

/// Refuses a key in a [reserved](RESERVED_KEY_PREFIXES) key space. (The
/// bare `write_behind` is refused exactly; `write_behindx` is anyone's.)
fn check_not_reserved(key: &str) -> Result<()> {
    let reserved = |prefix: &str| match prefix.strip_suffix(':') {
        Some(_) => key.starts_with(prefix),
        None => key == prefix,
    };
    if let Some(prefix) = RESERVED_KEY_PREFIXES.into_iter().find(|p| reserved(p)) {
        return Err(Error::invalid_argument(format!(
            "cache keys starting {prefix:?} are reserved for sessions, rate limits and \
             write-behind"
        )));
    }
    Ok(())
}

/// Rejects a namespace that breaks the hash tag after it (the empty
/// namespace is allowed).
pub(crate) fn validate_namespace(namespace: &str) -> Result<()> {
    check_tag_safe("namespace", namespace)
}

/// The longest subject or channel name, in bytes.
pub(crate) const MAX_NAME_LEN: usize = 512;

/// Checks a subject, channel or pattern; `what` names it in the error.
pub(crate) fn validate_name(what: &str, name: &str) -> Result<()> {
    if name.is_empty() {
        return Err(Error::invalid_argument(format!("{what} must not be empty")));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(Error::invalid_argument(format!(
            "{what} is {} bytes long; at most {MAX_NAME_LEN} are allowed",
            name.len()
        )));
    }
    check_tag_safe(what, name)
}

/// Escapes the characters a Redis glob (`PSUBSCRIBE`, `SCAN MATCH`) treats
/// as a pattern, so a namespace is matched literally.
pub(crate) fn escape_glob(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// How many hash slots a Redis Cluster has.
pub(crate) const SLOTS: u16 = 16384;

/// The Redis Cluster hash slot of a key whose hash tag is `tag` (for a
/// cache key `k`, stored at `{namespace}{k}`, the tag is `k`): CRC16
/// (XMODEM) of the tag, modulo [`SLOTS`], as `CLUSTER KEYSLOT` computes it.
pub(crate) fn slot_of_tag(tag: &str) -> u16 {
    let mut crc: u16 = 0;
    for byte in tag.bytes() {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % SLOTS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_the_clusters() {
        // Values from `CLUSTER KEYSLOT` on Redis 7.
        assert_eq!(slot_of_tag("123456789"), 0x31C3 % SLOTS);
        assert_eq!(slot_of_tag("foo"), 12182);
        assert_eq!(slot_of_tag("user:1"), 10778);
        assert_eq!(slot_of_tag(""), 0);
        // And as redis-rs's cluster client routes (its slot number is
        // private: compare the slots).
        use redis::cluster_routing::Slot;
        for n in 0..2000 {
            let tag = format!("write_behind:{n}");
            assert_eq!(Slot::new(slot_of_tag(&tag)), Some(Slot::for_key(&tag)));
        }
    }

    #[test]
    fn names_are_checked() {
        for ok in [
            "user:42",
            "a",
            "ip:127.0.0.1",
            "ünïcode",
            &"x".repeat(MAX_NAME_LEN),
        ] {
            assert!(validate_name("subject", ok).is_ok(), "{ok}");
        }
        let long = "x".repeat(MAX_NAME_LEN + 1);
        for bad in ["", "a{b", "a}b", "a\nb", "\0", &long] {
            let err = validate_name("subject", bad).unwrap_err();
            assert_eq!(err.kind(), crate::ErrorKind::InvalidArgument, "{bad:?}");
            assert!(err.to_string().contains("subject"), "{err}");
        }
    }

    #[test]
    fn keys_follow_the_hash_tag_rule() {
        assert!(check_key("user:1").is_ok());
        for bad in ["", "a{b", "a}b", "a\nb"] {
            assert!(check_key(bad).is_err(), "{bad:?}");
        }
        assert!(validate_namespace("").is_ok());
        assert!(validate_namespace("app:{").is_err());
        assert_eq!(value_key("ns:", "user:1"), "ns:{user:1}");
    }

    #[test]
    fn side_keys_share_the_value_keys_slot() {
        let keys = Keys::for_value(value_key("ns:", "user:1"));
        assert_eq!(keys.lease, "ns:{user:1}:lease");
        assert_eq!(keys.lock, "ns:{user:1}:lock");
        assert_eq!(keys.writers, "ns:{user:1}:writers");
        assert_eq!(keys.floor, "ns:{user:1}:floor");
        assert_eq!(keys.pending, "ns:{user:1}:pending");
        assert_eq!(keys.seq, "ns:{user:1}:seq");
        assert_eq!(tag_key("ns:", "category:7"), "ns:{category:7}:tag");
    }

    #[test]
    fn reserved_key_spaces_are_refused() {
        for bad in [
            "session:s3cret-id",
            "rate_limit:1/1000ms:x",
            "write_behind",
            "write_behind:x",
        ] {
            let err = check_key(bad).unwrap_err();
            assert_eq!(err.kind(), crate::ErrorKind::InvalidArgument, "{bad}");
            assert!(!err.to_string().contains("s3cret"), "{err}");
        }
        for ok in [
            "sessions:1",
            "user:session:1",
            "write_behindx",
            "rate_limits",
        ] {
            assert!(check_key(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn globs_are_escaped() {
        assert_eq!(escape_glob("app[1]:*?\\"), "app\\[1\\]:\\*\\?\\\\");
        assert_eq!(escape_glob("plain:"), "plain:");
        assert_eq!(escape_glob("a*b?[c]\\"), "a\\*b\\?\\[c\\]\\\\");
    }
}
