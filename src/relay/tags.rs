//! Tag rows of the outbox: a captured table with a tag column writes, with
//! each changed row's keys, the tags the row had and has
//! ([`super::Outbox::capture`]); the relay replaces each tag's stamp, as
//! [`CacheAside::invalidate_tag`](crate::CacheAside::invalidate_tag) does.

use crate::cache::Cache;
use crate::error::Result;
use crate::observe::report;

/// Invalidates each distinct tag of `tags` (names read from the outbox)
/// once; returns how many it invalidated. A name that is not a valid tag
/// (anyone who can write the table or the outbox chooses it) is skipped and
/// logged: it can be on no entry. A Redis error stops it (the round is
/// retried; invalidating a tag again is harmless).
pub(super) fn apply<'a>(cache: &Cache, tags: impl Iterator<Item = &'a str>) -> Result<u64> {
    let mut seen: Vec<&str> = Vec::new();
    let mut invalidated = 0;
    for tag in tags {
        if seen.contains(&tag) {
            continue;
        }
        seen.push(tag);
        if let Err(err) = crate::tags::check_tag(tag) {
            report!(
                warn,
                "invalidation relay skips a captured tag: {}",
                err.chain()
            );
            continue;
        }
        crate::tags::invalidate(cache, tag)?;
        invalidated += 1;
    }
    Ok(invalidated)
}
