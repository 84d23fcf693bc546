//! The inspector: samples cached entries of captured, versioned tables and
//! compares each with the row Postgres holds now (Uber's Cache Inspector,
//! in small).
//!
//! What a round does, and what it costs (the report counts both):
//! - It finds the captured tables where
//!   [`capture_changes`](crate::CacheAside::capture_changes) installed them:
//!   the `cacheaside_capture` triggers whose function is the outbox's, with
//!   the key prefix, key column and version column in the trigger's
//!   arguments (one catalog query). Tables captured without a version
//!   column are not inspected: nothing orders their entries.
//! - It samples value keys of the namespace with `SCAN` from a random
//!   cursor (`COUNT 1000` per call, so about one call per thousand keys in
//!   the database until the sample is full), reads them with one `MGET`,
//!   and compares them with one batched query per table (the sampled keys
//!   joined to the table on its key column).
//! - An entry is stale when its version is below the row's, when it holds
//!   a value and the row is gone, or when it caches an absence and the row
//!   exists. Each candidate is read again after the query (one pipeline for
//!   all of them) and kept only if unchanged and not pending in
//!   write-behind, so a write that landed during the round is not reported.
//!   Entries cached by the unversioned reads (version 0) are skipped, not
//!   judged.
//! - How long an entry has been stale is measured in Postgres from the
//!   outbox: the first captured change of the key to a version above the
//!   cached one (or its delete), until now. `None` when the outbox no
//!   longer holds that change.
//!
//! The inspector never changes the cache: it reports (a `warn` event per
//! finding, [`Stats::inspect_stale`](crate::Stats::inspect_stale)). On a
//! Redis Cluster it samples every master (in a random order), and reads
//! the sample per key in one cluster pipeline (one round trip per node).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::cache::Cache;
use crate::config::{MAX_INSPECT_SAMPLE, validate_table_name};
use crate::db::Db;
use crate::entry::{Entry, Payload, now_ms};
use crate::error::{Error, Result};
use crate::keys::escape_glob;
use crate::observe::{Counters, report};

/// What one inspection found. See
/// [`CacheAside::inspect`](crate::CacheAside::inspect).
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct InspectReport {
    /// Cached entries compared with their rows.
    pub inspected: u64,
    /// Sampled entries of captured, versioned tables that could not be
    /// judged: cached by an unversioned read (version 0), corrupt, or
    /// pending in write-behind.
    pub skipped: u64,
    /// The stale entries found (confirmed by a second read).
    pub stale: Vec<StaleEntry>,
    /// Captured tables with a version column (the ones inspected).
    pub tables: Vec<String>,
    /// Redis round trips the round took (`SCAN` calls, the `MGET`, the
    /// confirmation pipeline).
    pub redis_round_trips: u64,
    /// Postgres statements the round sent (the catalog query, and one per
    /// table with sampled entries).
    pub postgres_queries: u64,
    /// How long the round took.
    pub took: Duration,
}

/// A cached entry older than its row.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct StaleEntry {
    /// The cache key (without the namespace).
    pub key: String,
    /// The captured table the key belongs to.
    pub table: String,
    /// The version the entry holds; `None` when it caches an absence.
    pub cached_version: Option<u64>,
    /// The row's version now; `None` when the row is gone.
    pub row_version: Option<i64>,
    /// How long the row has been newer than the entry: since the first
    /// captured change past the cached version (Postgres's clock). `None`
    /// when the outbox no longer holds that change.
    pub stale_for: Option<Duration>,
    /// How long until the entry's TTL ends (zero when it has: a fail-safe
    /// copy).
    pub expires_in: Duration,
}

/// One capture: a table whose changes the outbox records.
#[derive(Debug, Clone)]
struct Capture {
    table: String,
    key_prefix: String,
    key_column: String,
    version_column: String,
    /// How the sampled keys are compared with the key column.
    key_kind: KeyKind,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum KeyKind {
    /// smallint, integer, bigint: keys that are integers, cast.
    Integer,
    /// text, varchar, char: compared as they are.
    Text,
    /// Anything else: the column cast to text (no index).
    Other,
}

/// A sampled entry, decoded.
struct Sampled {
    /// The cache key without the namespace (`order:7`).
    key: String,
    redis_key: String,
    raw: Vec<u8>,
    absent: bool,
    version: u64,
    expires_at_ms: u64,
}

/// A stale candidate, before its confirmation.
struct Candidate {
    sampled: usize,
    table: String,
    row_version: Option<i64>,
    stale_for: Option<Duration>,
}

/// Inspects up to `sample` entries of the namespace of `cache` against the
/// captured tables of `outbox`; counts into `counters`.
pub(crate) fn inspect(
    db: &Db,
    cache: &Cache,
    counters: &Counters,
    outbox: &str,
    sample: usize,
) -> Result<InspectReport> {
    let started = Instant::now();
    if sample == 0 || sample > MAX_INSPECT_SAMPLE {
        return Err(Error::invalid_argument(format!(
            "an inspection samples 1 to {MAX_INSPECT_SAMPLE} entries"
        )));
    }
    validate_table_name(outbox)?;
    let mut report = InspectReport::default();
    let captures = captures(db, outbox)?;
    report.postgres_queries += 1;
    report.tables = captures.iter().map(|c| c.table.clone()).collect();
    if captures.is_empty() {
        report.took = started.elapsed();
        return Ok(report);
    }
    let (keys, scans) = sample_keys(cache, &captures, sample)?;
    report.redis_round_trips += scans;
    let sampled = read_entries(cache, &keys, &mut report)?;
    let mut candidates = Vec::new();
    for capture in &captures {
        let mine: Vec<usize> = (0..sampled.len())
            .filter(|&i| {
                owner(&captures, &sampled[i].key).is_some_and(|c| c.table == capture.table)
            })
            .collect();
        if mine.is_empty() {
            continue;
        }
        compare(
            db,
            outbox,
            capture,
            &sampled,
            &mine,
            &mut report,
            &mut candidates,
        )?;
    }
    confirm(cache, &sampled, candidates, &mut report)?;
    counters.inspected.add(report.inspected);
    counters.inspect_stale.add(report.stale.len() as u64);
    for stale in &report.stale {
        report!(
            warn,
            "inspector: cached entry of {} is stale (cached version {:?}, row version {:?}, stale for {:?})",
            stale.table,
            stale.cached_version,
            stale.row_version,
            stale.stale_for
        );
        // Keys only at debug: nothing at warn names one.
        report!(debug, "inspector: stale entry {:?}", stale.key);
    }
    report.took = started.elapsed();
    Ok(report)
}

/// The captures of `outbox` with a version column, from their triggers.
fn captures(db: &Db, outbox: &str) -> Result<Vec<Capture>> {
    let rows = db.query(
        "SELECT t.tgrelid::regclass::text, t.tgargs,
                (SELECT format_type(a.atttypid, a.atttypmod) FROM pg_attribute a
                 WHERE a.attrelid = t.tgrelid AND NOT a.attisdropped
                   AND a.attname = split_part(encode(t.tgargs, 'escape'), '\\000', 2))
         FROM pg_trigger t
         WHERE t.tgname = 'cacheaside_capture' AND t.tgfoid = to_regproc($1)::oid
         ORDER BY 1",
        &[&format!("{outbox}_capture")],
    )?;
    let mut out = Vec::new();
    for row in rows {
        let table: String = row.get(0);
        let args: Vec<u8> = row.get(1);
        let key_type: Option<String> = row.get(2);
        // Arguments are NUL-terminated: prefix, key column, version column
        // (and whatever a later version of the trigger adds after them).
        let args: Vec<String> = args
            .split(|&b| b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let [prefix, key_column, version_column, ..] = args.as_slice() else {
            continue;
        };
        if version_column.is_empty()
            || validate_table_name(&table).is_err()
            || validate_table_name(key_column).is_err()
            || validate_table_name(version_column).is_err()
            || crate::keys::check_tag_safe("key prefix", prefix).is_err()
        {
            continue;
        }
        let key_kind = match key_type.as_deref() {
            Some("smallint" | "integer" | "bigint") => KeyKind::Integer,
            Some(t) if t == "text" || t.starts_with("character") => KeyKind::Text,
            _ => KeyKind::Other,
        };
        out.push(Capture {
            table,
            key_prefix: prefix.clone(),
            key_column: key_column.clone(),
            version_column: version_column.clone(),
            key_kind,
        });
    }
    Ok(out)
}

/// The capture a cache key belongs to: the longest matching prefix.
fn owner<'a>(captures: &'a [Capture], key: &str) -> Option<&'a Capture> {
    captures
        .iter()
        .filter(|c| key.starts_with(&c.key_prefix))
        .max_by_key(|c| c.key_prefix.len())
}

/// Up to `sample` value keys of captured tables (without the namespace),
/// from a random cursor on; and the `SCAN` calls it took.
fn sample_keys(cache: &Cache, captures: &[Capture], sample: usize) -> Result<(Vec<String>, u64)> {
    let namespace = cache.namespace();
    let pattern = format!("{}{{*", escape_glob(namespace));
    let mut seen = HashSet::new();
    let mut keys = Vec::new();
    // Takes a page of Redis keys; true once the sample is full.
    let mut take = |batch: Vec<String>| -> bool {
        for redis_key in batch {
            // Value keys are `namespace{key}`; side keys go on after the `}`.
            let Some(key) = redis_key
                .strip_prefix(namespace)
                .and_then(|k| k.strip_prefix('{'))
                .and_then(|k| k.strip_suffix('}'))
            else {
                continue;
            };
            if owner(captures, key).is_some() && seen.insert(key.to_owned()) {
                keys.push(key.to_owned());
            }
        }
        keys.len() >= sample
    };
    if cache.is_cluster() {
        // SCAN is not one command: a connection of its own, no retry.
        let mut conn = cache.dedicated(Duration::from_secs(5))?;
        let calls = match &mut *conn {
            crate::redis_conn::RedisConnection::Cluster(cluster) => {
                crate::redis_conn::scan_cluster(cluster, &pattern, &mut take)
                    .map_err(crate::error::Error::from)?
            }
            _ => 0,
        };
        keys.truncate(sample);
        return Ok((keys, calls));
    }
    let start: u64 = fastrand::u64(..1 << 20);
    let mut cursor = start;
    let mut wrapped = start == 0;
    let mut calls = 0;
    loop {
        let (next, batch): (u64, Vec<String>) = cache.run(|conn| {
            redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query(conn)
        })?;
        calls += 1;
        if take(batch) {
            break;
        }
        if next == 0 {
            if wrapped {
                break;
            }
            wrapped = true;
        }
        cursor = next;
    }
    keys.truncate(sample);
    Ok((keys, calls))
}

/// Reads the sampled keys in one `MGET` and decodes them.
fn read_entries(
    cache: &Cache,
    keys: &[String],
    report: &mut InspectReport,
) -> Result<Vec<Sampled>> {
    if keys.is_empty() {
        return Ok(Vec::new());
    }
    let redis_keys: Vec<String> = keys.iter().map(|k| cache.redis_key(k)).collect();
    let raws: Vec<Option<Vec<u8>>> = cache.run(|conn| match conn {
        // The keys span slots: one GET each, a pipeline per node.
        crate::redis_conn::RedisConnection::Cluster(cluster) => {
            let mut pipe = redis::cluster::cluster_pipe();
            for key in &redis_keys {
                pipe.get(key);
            }
            pipe.query(cluster)
        }
        conn => redis::cmd("MGET").arg(&redis_keys).query(conn),
    })?;
    report.redis_round_trips += 1;
    let mut out = Vec::new();
    for ((key, redis_key), raw) in keys.iter().zip(redis_keys).zip(raws) {
        let Some(raw) = raw else { continue }; // expired since the scan
        let Ok(entry) = Entry::decode(&raw) else {
            report.skipped += 1;
            continue;
        };
        let absent = entry.payload == Payload::Absent;
        if !absent && entry.version == 0 {
            report.skipped += 1; // an unversioned read's: nothing to order by
            continue;
        }
        let (version, expires_at_ms) = (entry.version, entry.expires_at_ms);
        out.push(Sampled {
            key: key.clone(),
            redis_key,
            raw,
            absent,
            version,
            expires_at_ms,
        });
    }
    Ok(out)
}

/// One batched query for the entries `mine` of `capture`'s table: each
/// entry's row version, and for the stale ones since when.
fn compare(
    db: &Db,
    outbox: &str,
    capture: &Capture,
    sampled: &[Sampled],
    mine: &[usize],
    report: &mut InspectReport,
    candidates: &mut Vec<Candidate>,
) -> Result<()> {
    let mut ids = Vec::new();
    let mut versions = Vec::new();
    let mut absents = Vec::new();
    let mut index = HashMap::new();
    for &i in mine {
        let id = &sampled[i].key[capture.key_prefix.len()..];
        if capture.key_kind == KeyKind::Integer && id.parse::<i64>().is_err() {
            report.skipped += 1; // no such row can exist; not ours to judge
            continue;
        }
        index.insert(id.to_owned(), i);
        ids.push(id.to_owned());
        versions.push(i64::try_from(sampled[i].version).unwrap_or(i64::MAX));
        absents.push(sampled[i].absent);
    }
    if ids.is_empty() {
        return Ok(());
    }
    let (table, key, ver) = (&capture.table, &capture.key_column, &capture.version_column);
    let join = match capture.key_kind {
        KeyKind::Integer => format!("t.{key} = s.k::bigint"),
        KeyKind::Text => format!("t.{key} = s.k"),
        KeyKind::Other => format!("t.{key}::text = s.k"),
    };
    let sql = format!(
        "WITH s(k, v, a) AS (SELECT * FROM unnest($1::text[], $2::int8[], $3::bool[]))
         SELECT s.k, t.{ver}::int8, t.{key} IS NOT NULL,
                extract(epoch FROM now() - CASE
                    WHEN t.{key} IS NULL AND NOT s.a THEN
                        (SELECT max(o.created_at) FROM {outbox} o
                         WHERE o.cache_key = $4 || s.k AND o.version IS NULL)
                    WHEN t.{key} IS NOT NULL AND (s.a OR t.{ver}::int8 > s.v) THEN
                        (SELECT min(o.created_at) FROM {outbox} o
                         WHERE o.cache_key = $4 || s.k AND o.version > s.v)
                END)::float8
         FROM s LEFT JOIN {table} t ON {join}"
    );
    let rows = db.query(&sql, &[&ids, &versions, &absents, &capture.key_prefix])?;
    report.postgres_queries += 1;
    report.inspected += ids.len() as u64;
    for row in rows {
        let id: String = row.get(0);
        let Some(&i) = index.get(&id) else { continue };
        let row_version: Option<i64> = row.get(1);
        let present: bool = row.get(2);
        let since: Option<f64> = row.get(3);
        let entry = &sampled[i];
        let stale = match (present, entry.absent) {
            (false, absent) => !absent,
            (true, true) => true,
            (true, false) => row_version.is_some_and(|v| v > 0 && (v as u64) > entry.version),
        };
        if stale {
            candidates.push(Candidate {
                sampled: i,
                table: table.clone(),
                row_version: if present { row_version } else { None },
                stale_for: since
                    .filter(|s| s.is_finite() && *s >= 0.0)
                    .map(Duration::from_secs_f64),
            });
        }
    }
    Ok(())
}

/// Reads every candidate again (its value and its pending write-behind
/// record, one pipeline): only an entry that did not change while the
/// round ran, and that no write-behind change is ahead of, is stale.
fn confirm(
    cache: &Cache,
    sampled: &[Sampled],
    candidates: Vec<Candidate>,
    report: &mut InspectReport,
) -> Result<()> {
    if candidates.is_empty() {
        return Ok(());
    }
    // A key and its pending record share a slot; the candidates span many
    // (a pipeline per node on a cluster).
    let (mut pipe, mut cluster_pipe) = (redis::pipe(), redis::cluster::cluster_pipe());
    for c in &candidates {
        let redis_key = &sampled[c.sampled].redis_key;
        let pending = format!("{redis_key}:pending");
        pipe.get(redis_key).exists(&pending);
        cluster_pipe.get(redis_key).exists(&pending);
    }
    let replies: Vec<(Option<Vec<u8>>, bool)> = cache.run(|conn| match conn {
        crate::redis_conn::RedisConnection::Cluster(cluster) => cluster_pipe.query(cluster),
        conn => pipe.query(conn),
    })?;
    report.redis_round_trips += 1;
    let now = now_ms();
    for (c, (raw, pending)) in candidates.into_iter().zip(replies) {
        let entry = &sampled[c.sampled];
        if pending {
            report.skipped += 1;
            continue;
        }
        if raw.as_deref() != Some(entry.raw.as_slice()) {
            continue; // replaced or removed meanwhile: not stale now
        }
        report.stale.push(StaleEntry {
            key: entry.key.clone(),
            table: c.table,
            cached_version: (!entry.absent).then_some(entry.version),
            row_version: c.row_version,
            stale_for: c.stale_for,
            expires_in: Duration::from_millis(entry.expires_at_ms.saturating_sub(now)),
        });
    }
    Ok(())
}

/// The background inspector: a thread that inspects a sample every period
/// until stopped (or dropped).
pub(crate) struct Inspector {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Inspector {
    pub(crate) fn start(
        db: Db,
        cache: Cache,
        counters: Arc<Counters>,
        outbox: String,
        every: Duration,
        sample: usize,
    ) -> Option<Inspector> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        // The inspector's statements are not the application's queries.
        let db = db.uncounted();
        let thread = std::thread::Builder::new()
            .name("cacheaside-inspector".into())
            .spawn(move || {
                let mut next = Instant::now() + every;
                while !flag.load(Ordering::SeqCst) {
                    if Instant::now() < next {
                        std::thread::sleep(Duration::from_millis(25));
                        continue;
                    }
                    next = Instant::now() + every;
                    if let Err(err) = inspect(&db, &cache, &counters, &outbox, sample) {
                        report!(debug, "inspector round failed: {}", err.chain());
                    }
                }
            })
            .map_err(|e| report!(warn, "cannot start the inspector: {e}"))
            .ok()?;
        Some(Inspector {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Inspector {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
