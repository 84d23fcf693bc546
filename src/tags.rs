//! Tags: groups of entries invalidated together, lazily.
//!
//! Each tag has one Redis key holding its current *stamp*, a token unique
//! across processes ([`crate::keys::tag_key`]). A tagged fill reads the
//! stamps of its tags before its load (creating a stamp where a tag has
//! none) and writes them into the entry's tag line ([`crate::entry`]).
//! [`invalidate`] replaces the tag's stamp: one `SET`, however many entries
//! carry the tag. A read that finds a tagged entry compares the entry's
//! stamps with the current ones and treats any difference (or a tag key
//! that is gone) as a miss, deleting the entry.
//!
//! Guarantees:
//! - No read returns a tagged entry filled before an [`invalidate`] of one
//!   of its tags that returned before the read began, in any process: the
//!   read compares against stamps it reads after it began, and stamps never
//!   come back (tokens are unique; a lost tag key makes its entries miss).
//! - A fill whose load raced an [`invalidate`] of one of its tags is not
//!   kept: the stamps it took before the load differ after its fill, which
//!   then takes its entry back out ([`moved`]) and counts as dropped.
//!
//! Cost. On a single server a read that names its tags fetches the value
//! and the stamps in one `MGET`; an untagged read stays one `GET`, and pays
//! a second round trip only when the entry it finds turns out to be tagged
//! (a key read both ways). On a Redis Cluster each tag key lives in its
//! own slot: a tagged read is one `GET` for the value and one per tag.

use std::sync::Arc;

use crate::cache::{Cache, Raw};
use crate::entry::{Entry, is_tagged};
use crate::error::{Error, ErrorKind, Result};
use crate::keys::{Tags, tag_key, validate_name};
use crate::lease::{self, new_token};

/// At most this many tags per entry (each costs a key in every read).
pub(crate) const MAX_TAGS: usize = 32;

/// The checked, deduplicated tags of a read (`None`: no tags).
pub(crate) fn tag_set(namespace: &str, tags: &[&str]) -> Result<Option<Arc<Tags>>> {
    if tags.len() > MAX_TAGS {
        return Err(Error::invalid_argument(format!(
            "{} tags on one entry; at most {MAX_TAGS} are allowed",
            tags.len()
        )));
    }
    let mut names: Vec<String> = Vec::with_capacity(tags.len());
    for tag in tags {
        validate_name("tag", tag)?;
        if !names.iter().any(|n| n == tag) {
            names.push((*tag).to_owned());
        }
    }
    if names.is_empty() {
        return Ok(None);
    }
    let keys = names.iter().map(|n| tag_key(namespace, n)).collect();
    Ok(Some(Arc::new(Tags {
        names,
        keys,
        stamps: Vec::new(),
    })))
}

/// Checks a tag name as [`tag_set`] does.
pub(crate) fn check_tag(tag: &str) -> Result<()> {
    validate_name("tag", tag)
}

/// Makes every entry tagged `tag` a miss: one `SET` of a new stamp.
pub(crate) fn invalidate(cache: &Cache, tag: &str) -> Result<()> {
    let key = tag_key(cache.namespace(), tag);
    cache.run(|conn| {
        redis::cmd("SET")
            .arg(&key)
            .arg(&*new_token())
            .query::<()>(conn)
    })
}

/// The tag line of an entry filled under `tags`' stamps.
pub(crate) fn line(tags: &Tags) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, stamp) in tags.names.iter().zip(&tags.stamps) {
        for part in [name, stamp] {
            out.push(b'\t');
            out.extend_from_slice(part.as_bytes());
        }
    }
    out
}

/// The `(tag, stamp)` pairs of a tag line; `None` if it is malformed.
fn parse(line: &[u8]) -> Option<Vec<(&str, &str)>> {
    let text = std::str::from_utf8(line).ok()?.strip_prefix('\t')?;
    let parts: Vec<&str> = text.split('\t').collect();
    if !parts.len().is_multiple_of(2) || parts.iter().any(|p| p.is_empty()) {
        return None;
    }
    Some(parts.chunks(2).map(|pair| (pair[0], pair[1])).collect())
}

/// `tags` with the current stamps of its tags, read before a load: a tag
/// without a stamp gets one (`SET NX`), so every entry records a stamp that
/// a later [`invalidate`] replaces. One round trip on a single server; one
/// per tag on a cluster.
pub(crate) fn stamp(cache: &Cache, tags: &Tags) -> Result<Arc<Tags>> {
    let fresh: Vec<String> = tags.keys.iter().map(|_| new_token().to_string()).collect();
    let stamps: Vec<String> = if cache.is_cluster() {
        let mut stamps = Vec::with_capacity(tags.keys.len());
        for (key, fresh) in tags.keys.iter().zip(&fresh) {
            let stamp: Vec<String> = cache.run(|conn| STAMP.key(key).arg(fresh).invoke(conn))?;
            stamps.extend(stamp);
        }
        stamps
    } else {
        cache.run(|conn| {
            let mut call = STAMP.prepare_invoke();
            for (key, fresh) in tags.keys.iter().zip(&fresh) {
                call.key(key).arg(fresh);
            }
            call.invoke(conn)
        })?
    };
    if stamps.len() != tags.keys.len() {
        return Err(Error::new(
            ErrorKind::Cache,
            "unexpected reply from the tag stamp script",
        ));
    }
    Ok(Arc::new(Tags {
        stamps,
        ..tags.clone()
    }))
}

/// Gives a tagged read's `keys` the current stamps of its tags (as
/// [`stamp`]); untagged keys stay as they are.
pub(crate) fn stamp_keys(cache: &Cache, keys: &mut crate::keys::Keys) -> Result<()> {
    if let Some(tags) = &keys.tags {
        keys.tags = Some(stamp(cache, tags)?);
    }
    Ok(())
}

/// After a fill under `keys` stored its entry, or may have (its reply was
/// lost; `stored`: its bytes, `None` for a re-stamped one): true if the
/// fill may stand, false if one of its tags' stamps moved since the load
/// began (or cannot be read), in which case a stored entry is taken back
/// out. A re-stamped entry keeps its older stamps, so it reads as a miss
/// already.
pub(crate) fn kept(cache: &Cache, keys: &crate::keys::Keys, stored: Option<&[u8]>) -> bool {
    let Some(tags) = &keys.tags else {
        return true;
    };
    if let Ok(false) = moved(cache, tags) {
        return true;
    }
    if let Some(raw) = stored {
        let _ = lease::discard(cache, &keys.value, raw);
    }
    false
}

/// True if any of `tags`' stamps changed since [`stamp`] read them: an
/// [`invalidate`] of one of them ran meanwhile.
pub(crate) fn moved(cache: &Cache, tags: &Tags) -> Result<bool> {
    let current = current_stamps(cache, &tags.keys)?;
    Ok(current
        .iter()
        .zip(&tags.stamps)
        .any(|(now, then)| now.as_deref() != Some(then.as_bytes())))
}

/// The current stamps of `keys` (`None`: no stamp).
fn current_stamps(cache: &Cache, keys: &[String]) -> Result<Vec<Option<Vec<u8>>>> {
    if keys.is_empty() {
        return Ok(Vec::new());
    }
    if cache.is_cluster() {
        return keys
            .iter()
            .map(|key| cache.run(|conn| redis::cmd("GET").arg(key).query(conn)))
            .collect();
    }
    cache.run(|conn| redis::cmd("MGET").arg(keys).query(conn))
}

/// A read's lookup: the value, and for a tagged entry the verdict of its
/// stamps (an entry a tag invalidated is deleted and reads as missing, not
/// even a fail-safe copy). With `tags`, a single server answers the value
/// and those tags' stamps in one `MGET`; without, the lookup is one `GET`.
pub(crate) fn lookup(cache: &Cache, value_key: &str, tags: Option<&Tags>) -> Result<Raw> {
    let no_names: &[String] = &[];
    let (raw, names, stamps) = match tags {
        Some(tags) if !cache.is_cluster() => {
            let mut replies: Vec<Option<Vec<u8>>> = cache.run(|conn| {
                redis::cmd("MGET")
                    .arg(value_key)
                    .arg(&tags.keys)
                    .query(conn)
            })?;
            if replies.len() != tags.keys.len() + 1 {
                return Err(Error::new(ErrorKind::Cache, "unexpected reply to MGET"));
            }
            let raw = match replies.remove(0) {
                Some(bytes) => Raw::Bytes(bytes),
                // A value of another type: MGET answers nil for it.
                None => cache.lookup(value_key)?,
            };
            (raw, tags.names.as_slice(), replies)
        }
        _ => (cache.lookup(value_key)?, no_names, Vec::new()),
    };
    verdict(cache, value_key, raw, names, &stamps)
}

/// `raw` as a read that fetched no stamps found it (the lease claimed in
/// the `GET`'s round trip, [`crate::miss_ahead`]): a tagged entry has its
/// stamps read and checked, and is [`Raw::Missing`] (deleted) if one moved.
pub(crate) fn checked(cache: &Cache, value_key: &str, raw: Raw) -> Result<Raw> {
    verdict(cache, value_key, raw, &[], &[])
}

/// `raw`, or [`Raw::Missing`] if it is a tagged entry whose stamps are not
/// all current (`names`, `stamps`: those already read, as for [`valid`]).
fn verdict(
    cache: &Cache,
    value_key: &str,
    raw: Raw,
    names: &[String],
    stamps: &[Option<Vec<u8>>],
) -> Result<Raw> {
    let Raw::Bytes(bytes) = &raw else {
        return Ok(raw);
    };
    if !is_tagged(bytes) || valid(cache, value_key, bytes, names, stamps)? {
        Ok(raw)
    } else {
        Ok(Raw::Missing)
    }
}

/// True if a tagged entry's stamps are all current; else (or if its tag
/// line is broken) deletes it, if it is still these bytes (best effort: a
/// read that finds it again checks it again). `known`: the stamps already
/// read of the tags `names`, in order; the others are read here. What is
/// not an entry at all is left to the engine's decode, which counts and
/// deletes it.
pub(crate) fn valid(
    cache: &Cache,
    value_key: &str,
    raw: &[u8],
    names: &[String],
    known: &[Option<Vec<u8>>],
) -> Result<bool> {
    let Ok(entry) = Entry::decode(raw) else {
        return Ok(true);
    };
    let current = match parse(entry.tags) {
        None => false,
        Some(pairs) => {
            let known_stamp = |name: &str| {
                let at = names.iter().position(|n| n == name)?;
                known.get(at).map(Option::as_deref)
            };
            let unknown: Vec<String> = pairs
                .iter()
                .filter(|(name, _)| known_stamp(name).is_none())
                .map(|(name, _)| tag_key(cache.namespace(), name))
                .collect();
            let fetched = current_stamps(cache, &unknown)?;
            let mut fetched = fetched.iter().map(Option::as_deref);
            pairs.iter().all(|(name, stamp)| {
                let now = known_stamp(name).unwrap_or_else(|| fetched.next().flatten());
                now == Some(stamp.as_bytes())
            })
        }
    };
    if !current {
        let _ = lease::discard(cache, value_key, raw);
    }
    Ok(current)
}

/// KEYS: tag keys. ARGV: a fresh stamp per key, set where a key has none.
/// Returns the stamps, in order.
static STAMP: once_cell::sync::Lazy<redis::Script> = once_cell::sync::Lazy::new(|| {
    redis::Script::new(
        r"
        local out = {}
        for i, key in ipairs(KEYS) do
          if redis.call('TYPE', key).ok ~= 'string' then
            redis.call('DEL', key)
            redis.call('SET', key, ARGV[i])
          end
          out[i] = redis.call('GET', key)
        end
        return out
        ",
    )
});

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tag_lines_round_trip() {
        let tags = Tags {
            names: vec!["category:7".into(), "shop 2".into()],
            keys: vec![],
            stamps: vec!["1:a:1".into(), "1:a:2".into()],
        };
        let line = line(&tags);
        assert_eq!(
            parse(&line),
            Some(vec![("category:7", "1:a:1"), ("shop 2", "1:a:2")])
        );
        for bad in [&b""[..], b"x", b"\tonly", b"\ta\t", b"\t\tb"] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn tags_are_checked_and_deduplicated() {
        let set = tag_set("ns:", &["a", "b", "a"]).unwrap().unwrap();
        assert_eq!(set.names, ["a", "b"]);
        assert_eq!(set.keys, ["ns:{a}:tag", "ns:{b}:tag"]);
        assert!(tag_set("ns:", &[]).unwrap().is_none());
        for bad in ["", "a{b", "a\tb"] {
            assert!(tag_set("ns:", &[bad]).is_err(), "{bad:?}");
        }
        let many: Vec<String> = (0..=MAX_TAGS).map(|i| i.to_string()).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert!(tag_set("ns:", &many).is_err());
    }
}
