//! The format of a cached entry: a one-line text header, then the payload.
//!
//! ```text
//! ca1 <kind> <version> <load_us> <expires_at_ms>\n<payload>
//! ca1 <kind> <version> <load_us> <expires_at_ms>\n#t\t<tag>\t<stamp>...\n<payload>
//! ```
//!
//! `kind` is `v` (a JSON value follows) or `a` (the row is absent: negative
//! caching). `version` orders write-through updates (0 when unversioned) and
//! is parsed by the write-through Lua script; `load_us` (how long the load
//! took, in microseconds: fast loads take well under a millisecond) and
//! `expires_at_ms` (Unix milliseconds) feed XFetch early refresh.
//! `expires_at_ms` is the entry's logical expiry (its TTL); with fail-safe on
//! the key lives in Redis longer, and an entry past its logical expiry is a
//! last-known-good copy: a miss, served only when a reload fails. Anything
//! else under a key of ours is corrupt and treated as a miss.
//!
//! A tagged entry (see [`crate::tags`]) has a second line before its
//! payload: `#t`, then a tab, a tag and a tab and the tag's stamp for each
//! tag (neither holds a tab: tags hold no control character, stamps are
//! tokens). No JSON value starts with `#`, and the scripts that parse
//! entries read only the first line.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

const MAGIC: &str = "ca1";

/// A row's value with its version: what a versioned loader or a
/// write-through returns, so cached values are ordered against writes.
///
/// The version is any number that grows with every write of the row (a
/// `version` column that each update bumps, as
/// [`CacheAside::capture_changes`](crate::CacheAside::capture_changes) can
/// make it). The cache keeps the newest: a delayed write-through or fill
/// of an older version does not replace it.
///
/// ```
/// use cacheaside::Versioned;
/// let v = Versioned::new("widget".to_owned(), 3);
/// assert_eq!((v.value.as_str(), v.version), ("widget", 3));
/// // The tuple form converts, for code written before this type.
/// let old: Versioned<&str> = ("widget", 3).into();
/// assert_eq!(old.version, 3);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct Versioned<T> {
    /// The row's value, as it will be cached (JSON).
    pub value: T,
    /// The row's version: higher is newer.
    pub version: u64,
}

impl<T> Versioned<T> {
    /// `value` at `version`.
    pub fn new(value: T, version: u64) -> Versioned<T> {
        Versioned { value, version }
    }

    /// `value` with no version (0, the oldest): for a key that is never
    /// written through, such as an aggregate. Any write-through of the key
    /// replaces it, even one of an older row: give rows a version.
    pub fn unversioned(value: T) -> Versioned<T> {
        Versioned { value, version: 0 }
    }
}

impl<T> From<(T, u64)> for Versioned<T> {
    fn from((value, version): (T, u64)) -> Versioned<T> {
        Versioned { value, version }
    }
}

/// What an entry says about the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Payload<'a> {
    /// The JSON encoding of the cached value.
    Value(&'a [u8]),
    /// The source has no such row.
    Absent,
}

/// A decoded entry, borrowing its payload from the raw bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Entry<'a> {
    pub version: u64,
    pub load_us: u64,
    pub expires_at_ms: u64,
    /// The tag line's content after `#t` (empty: untagged).
    pub tags: &'a [u8],
    pub payload: Payload<'a>,
}

/// What starts a tagged entry's tag line.
const TAG_LINE: &[u8] = b"#t";

impl<'a> Entry<'a> {
    /// An entry that expires `ttl` from now.
    pub fn new(payload: Payload<'a>, version: u64, load: Duration, ttl: Duration) -> Self {
        Entry {
            version,
            load_us: load.as_micros().try_into().unwrap_or(u64::MAX),
            expires_at_ms: now_ms().saturating_add(ttl.as_millis().try_into().unwrap_or(u64::MAX)),
            tags: b"",
            payload,
        }
    }

    /// This entry with `tags` as its tag line's content.
    pub fn tagged(mut self, tags: &'a [u8]) -> Self {
        self.tags = tags;
        self
    }

    pub fn encode(&self) -> Vec<u8> {
        let (kind, body): (&str, &[u8]) = match self.payload {
            Payload::Value(json) => ("v", json),
            Payload::Absent => ("a", b""),
        };
        let header = format!(
            "{MAGIC} {kind} {} {} {}\n",
            self.version, self.load_us, self.expires_at_ms
        );
        let mut out = Vec::with_capacity(header.len() + self.tags.len() + 3 + body.len());
        out.extend_from_slice(header.as_bytes());
        if !self.tags.is_empty() {
            out.extend_from_slice(TAG_LINE);
            out.extend_from_slice(self.tags);
            out.push(b'\n');
        }
        out.extend_from_slice(body);
        out
    }

    /// Parses raw bytes from Redis; `Err` says why they are not an entry.
    pub fn decode(raw: &'a [u8]) -> Result<Self, &'static str> {
        let newline = raw
            .iter()
            .position(|&b| b == b'\n')
            .ok_or("no header line")?;
        let header = std::str::from_utf8(&raw[..newline]).map_err(|_| "header is not UTF-8")?;
        let (tags, body) = split_tags(&raw[newline + 1..])?;
        let mut fields = header.split(' ');
        if fields.next() != Some(MAGIC) {
            return Err("unknown format");
        }
        let kind = fields.next().ok_or("missing kind")?;
        let mut number = || -> Result<u64, &'static str> {
            fields
                .next()
                .and_then(|f| f.parse().ok())
                .ok_or("bad header number")
        };
        let (version, load_us, expires_at_ms) = (number()?, number()?, number()?);
        if fields.next().is_some() {
            return Err("trailing header fields");
        }
        let payload = match kind {
            "v" => Payload::Value(body),
            "a" if body.is_empty() => Payload::Absent,
            _ => return Err("unknown kind"),
        };
        Ok(Entry {
            version,
            load_us,
            expires_at_ms,
            tags,
            payload,
        })
    }

    /// True until the entry's TTL (its logical expiry) has passed.
    pub fn is_fresh(&self, now_ms: u64) -> bool {
        self.expires_at_ms > now_ms
    }

    /// This entry again, fresh for `period` from now (same payload, version
    /// and load time): a fail-safe copy re-armed after a failed reload.
    pub fn rearmed(&self, period: Duration) -> Vec<u8> {
        let mut again = *self;
        again.expires_at_ms =
            now_ms().saturating_add(period.as_millis().try_into().unwrap_or(u64::MAX));
        again.encode()
    }

    /// XFetch (Vattani et al., VLDB 2015): refresh early when
    /// `now - load * beta * ln(u) >= expiry`, `u` uniform in (0, 1]. The
    /// chance rises smoothly towards expiry, and faster for slow loads, so
    /// one caller (usually) refreshes before the key vanishes.
    pub fn should_refresh_early(&self, beta: f64, uniform: f64) -> bool {
        if beta <= 0.0 || self.load_us == 0 {
            return false;
        }
        let load_ms = self.load_us as f64 / 1e3;
        let head_start = -load_ms * beta * uniform.max(f64::MIN_POSITIVE).ln();
        now_ms() as f64 + head_start >= self.expires_at_ms as f64
    }
}

/// Splits a tag line (if any) off the text after the header.
fn split_tags(rest: &[u8]) -> Result<(&[u8], &[u8]), &'static str> {
    let Some(line) = rest.strip_prefix(TAG_LINE) else {
        return Ok((b"", rest));
    };
    let end = line
        .iter()
        .position(|&b| b == b'\n')
        .ok_or("unterminated tag line")?;
    if end == 0 {
        return Err("empty tag line");
    }
    Ok((&line[..end], &line[end + 1..]))
}

/// True if `raw` is a tagged entry (a cheap look, before any decoding).
pub(crate) fn is_tagged(raw: &[u8]) -> bool {
    raw.iter()
        .position(|&b| b == b'\n')
        .is_some_and(|newline| raw[newline + 1..].starts_with(TAG_LINE))
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let entry = Entry::new(
            Payload::Value(br#"{"a":1}"#),
            7,
            Duration::from_millis(12),
            Duration::from_secs(60),
        );
        let raw = entry.encode();
        assert_eq!(Entry::decode(&raw), Ok(entry));
        let absent = Entry::new(Payload::Absent, 0, Duration::ZERO, Duration::from_secs(1));
        assert_eq!(Entry::decode(&absent.encode()), Ok(absent));
        assert!(!is_tagged(&raw));
    }

    #[test]
    fn tagged_round_trip() {
        let line = b"\tcategory:7\t1:ab:3";
        for payload in [Payload::Value(br#"{"a":1}"#), Payload::Absent] {
            let entry = Entry::new(payload, 2, Duration::ZERO, Duration::from_secs(9)).tagged(line);
            let raw = entry.encode();
            assert!(is_tagged(&raw));
            assert_eq!(Entry::decode(&raw), Ok(entry));
        }
        for bad in [
            &b"ca1 v 1 2 3\n#t\tx\t1"[..],
            b"ca1 v 1 2 3\n#t\n{}",
            b"ca1 a 1 2 3\n#t\tx\t1\n{}",
        ] {
            assert!(Entry::decode(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn freshness_is_the_logical_expiry() {
        let entry = Entry::new(Payload::Absent, 3, Duration::ZERO, Duration::from_secs(1));
        assert!(entry.is_fresh(now_ms()));
        assert!(!entry.is_fresh(entry.expires_at_ms));
        let raw = entry.rearmed(Duration::from_secs(60));
        let again = Entry::decode(&raw).unwrap();
        assert_eq!((again.version, again.payload), (3, Payload::Absent));
        assert!(again.expires_at_ms >= entry.expires_at_ms + 59_000);
    }

    #[test]
    fn rejects_garbage() {
        for raw in [
            &b""[..],
            b"{\"a\":1}",
            b"ca1 v 1 2\n{}",
            b"ca1 v 1 2 3 4\n{}",
            b"ca1 x 1 2 3\n{}",
            b"ca1 a 1 2 3\nbody",
            b"ca1 v -1 2 3\n{}",
            b"ca2 v 1 2 3\n{}",
            b"ca1 v 1 2 \xff\n{}",
        ] {
            assert!(Entry::decode(raw).is_err(), "{raw:?}");
        }
    }

    #[test]
    fn xfetch_never_refreshes_fresh_entries_and_always_expired_ones() {
        let fresh = Entry::new(
            Payload::Absent,
            0,
            Duration::from_millis(5),
            Duration::from_secs(60),
        );
        assert!(!fresh.should_refresh_early(1.0, 0.5));
        assert!(!fresh.should_refresh_early(0.0, 1e-300));
        let mut stale = fresh;
        stale.expires_at_ms = now_ms().saturating_sub(1);
        assert!(stale.should_refresh_early(1.0, 1.0));
        // Close to expiry, an unlucky draw refreshes and a lucky one does not.
        let mut near = fresh;
        near.expires_at_ms = now_ms() + 10;
        assert!(near.should_refresh_early(1.0, 1e-6)); // head start ~69 ms
        assert!(!near.should_refresh_early(1.0, 0.99)); // head start ~0.05 ms
    }
}
