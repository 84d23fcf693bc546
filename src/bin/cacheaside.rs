//! `cacheaside`: the operator's command, built on the library.
//!
//! ```text
//! cargo run --features cli --bin cacheaside -- stats
//! ```
//!
//! Reads `DATABASE_URL` and `REDIS_URL` as the library does
//! (`Config::from_env`), the namespace from `CACHEASIDE_NAMESPACE` and the
//! outbox table from `CACHEASIDE_OUTBOX` (or `--namespace`, `--outbox`).
//! Prints tables for a person, or JSON with `--json`. Exit status: 0 when
//! all is well, 1 on an error, 2 on a usage error, 3 when `inspect` found
//! stale entries. It never runs a relay or write-behind workers.

use std::io::{BufRead, IsTerminal, Write};
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cacheaside::{CacheAside, Config, Error};
use serde_json::{Value, json};

const USAGE: &str = "usage: cacheaside [--json] [--namespace NS] [--outbox TABLE] COMMAND
commands:
  stats                         keys of the namespace, write-behind backlog, dead letters, outbox
  get KEY                       a cache entry: header, version, TTL, lease/lock/writers state
  inspect [--sample N]          compare N sampled entries (default 100) with Postgres
  outbox                        the relay's horizon, pending rows and lag, per consumer
  dead-letters list [--count N] the oldest N dead letters (default 100)
  dead-letters replay [--count N]
                                enqueue the oldest N again, then remove them
  dead-letters drop ID...       remove dead letters unreplayed
  namespace delete [--yes]      delete the namespace's cache entries (asks first)
environment: DATABASE_URL, REDIS_URL, CACHEASIDE_NAMESPACE, CACHEASIDE_OUTBOX
exit status: 0 fine, 1 error, 2 usage, 3 inspect found stale entries";

/// What went wrong: a usage error (status 2) or any other (status 1).
enum Trouble {
    Usage(String),
    Failed(String),
}

impl From<Error> for Trouble {
    fn from(err: Error) -> Trouble {
        Trouble::Failed(err.chain())
    }
}

type Outcome = Result<u8, Trouble>;

/// The global options and the command's words.
struct Args {
    json: bool,
    namespace: Option<String>,
    outbox: Option<String>,
    words: Vec<String>,
}

fn parse(raw: Vec<String>) -> Result<Args, Trouble> {
    let mut args = Args {
        json: false,
        namespace: None,
        outbox: None,
        words: Vec::new(),
    };
    let mut it = raw.into_iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--json" => args.json = true,
            "--namespace" | "--outbox" => {
                let value = it
                    .next()
                    .ok_or_else(|| Trouble::Usage(format!("{arg} needs a value")))?;
                if arg == "--namespace" {
                    args.namespace = Some(value);
                } else {
                    args.outbox = Some(value);
                }
            }
            _ => args.words.push(arg),
        }
    }
    Ok(args)
}

fn main() -> ExitCode {
    let outcome = parse(std::env::args().skip(1).collect()).and_then(run);
    match outcome {
        Ok(code) => ExitCode::from(code),
        Err(Trouble::Usage(why)) => {
            eprintln!("cacheaside: {why}\n{USAGE}");
            ExitCode::from(2)
        }
        Err(Trouble::Failed(why)) => {
            eprintln!("cacheaside: error: {why}");
            ExitCode::from(1)
        }
    }
}

/// The config: the environment's servers, the namespace and outbox asked
/// for, no relay and no inspector of its own.
fn config(args: &Args) -> Result<Config, Trouble> {
    let mut config = Config::from_env();
    let namespace = args
        .namespace
        .clone()
        .or_else(|| std::env::var("CACHEASIDE_NAMESPACE").ok())
        .unwrap_or_default();
    config.set_namespace(&namespace)?;
    if let Some(outbox) = args
        .outbox
        .clone()
        .or_else(|| std::env::var("CACHEASIDE_OUTBOX").ok())
    {
        config.outbox_table = outbox;
    }
    config.invalidation_relay = false;
    config.inspect_every = Duration::ZERO;
    config.background_threads = 0;
    config.cache_pool_size = 2;
    config.db_pool_size = 2;
    Ok(config)
}

fn run(args: Args) -> Outcome {
    let words: Vec<&str> = args.words.iter().map(String::as_str).collect();
    let Some((&command, rest)) = words.split_first() else {
        return Err(Trouble::Usage("a command is missing".into()));
    };
    if matches!(command, "-h" | "--help" | "help") {
        println!("{USAGE}");
        return Ok(0);
    }
    let known = [
        "stats",
        "get",
        "inspect",
        "outbox",
        "dead-letters",
        "namespace",
    ];
    if !known.contains(&command) {
        return Err(Trouble::Usage(format!("unknown command {command:?}")));
    }
    let config = config(&args)?;
    let engine = CacheAside::open(&config)?;
    let out = Out { json: args.json };
    match (command, rest) {
        ("stats", []) => stats(&engine, &out),
        ("get", [key]) => get(&engine, &out, key),
        ("inspect", rest) => {
            let sample = number_option(rest, "--sample", 100)?;
            inspect(&engine, &out, sample)
        }
        ("outbox", []) => outbox(&engine, &out),
        ("dead-letters", ["list", rest @ ..]) => {
            dead_letters_list(&engine, &out, number_option(rest, "--count", 100)?)
        }
        ("dead-letters", ["replay", rest @ ..]) => {
            dead_letters_replay(&engine, &out, number_option(rest, "--count", 100)?)
        }
        ("dead-letters", ["drop", ids @ ..]) if !ids.is_empty() => {
            let removed = engine.drop_dead_letters(ids)?;
            out.print(
                json!({"dropped": removed, "asked": ids.len()}),
                format!("dropped {removed} of {} dead letters", ids.len()),
            );
            Ok(0)
        }
        ("namespace", ["delete", rest @ ..]) => match rest {
            [] => namespace_delete(&engine, &out, false),
            ["--yes"] => namespace_delete(&engine, &out, true),
            _ => Err(Trouble::Usage("namespace delete takes only --yes".into())),
        },
        _ => Err(Trouble::Usage(format!(
            "wrong arguments for {command}: {rest:?}"
        ))),
    }
}

/// `[--NAME N]`, or `default`.
fn number_option(rest: &[&str], name: &str, default: usize) -> Result<usize, Trouble> {
    match rest {
        [] => Ok(default),
        [flag, n] if flag == &name => n
            .parse()
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| Trouble::Usage(format!("{name} needs a positive number, not {n:?}"))),
        _ => Err(Trouble::Usage(format!("expected [{name} N], got {rest:?}"))),
    }
}

/// Where results go: a table for a person, or one JSON document.
struct Out {
    json: bool,
}

impl Out {
    fn print(&self, json: Value, text: String) {
        if self.json {
            println!("{json}");
        } else {
            println!("{text}");
        }
    }
}

/// Rows as an aligned table, the first row the header.
fn table(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .map(|r| r.get(c).map_or(0, |s| s.chars().count()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut text = String::new();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        text.push_str(line.join("  ").trim_end());
        text.push('\n');
    }
    text.trim_end().to_owned()
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The Redis keys of the namespace (`namespace{…`), a `SCAN` at a time,
/// with progress on a terminal's stderr for long scans.
fn scan_namespace(engine: &CacheAside, mut each: impl FnMut(&str)) -> Result<u64, Trouble> {
    let cache = engine.cache();
    let namespace = cache.namespace();
    let escaped: String = namespace
        .chars()
        .flat_map(|c| {
            let escape = matches!(c, '*' | '?' | '[' | ']' | '\\');
            escape.then_some('\\').into_iter().chain([c])
        })
        .collect();
    let pattern = format!("{escaped}{{*");
    let progress = std::io::stderr().is_terminal();
    let (mut cursor, mut seen, mut calls) = (0_u64, 0_u64, 0_u64);
    loop {
        let (next, keys): (u64, Vec<String>) = cache.with_connection(|c| {
            redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query(c)
        })?;
        calls += 1;
        for key in &keys {
            each(key);
        }
        seen += keys.len() as u64;
        if progress && calls % 100 == 0 {
            eprint!("\rscanned {seen} keys of the namespace...");
        }
        if next == 0 {
            break;
        }
        cursor = next;
    }
    if progress && calls >= 100 {
        eprintln!();
    }
    Ok(seen)
}

/// The cache key inside a Redis key of the namespace, and the side-key
/// suffix after it (`""` for a value key).
fn split_key<'a>(namespace: &str, redis_key: &'a str) -> Option<(&'a str, &'a str)> {
    let inner = redis_key.strip_prefix(namespace)?.strip_prefix('{')?;
    let close = inner.find('}')?;
    Some((&inner[..close], &inner[close + 1..]))
}

/// Keys reserved for sessions, rate limits and write-behind: not cache
/// entries.
fn reserved(key: &str) -> bool {
    // `write_behind:N`: a cluster slot's write-behind streams.
    key.starts_with("session:")
        || key.starts_with("rate_limit:")
        || key == "write_behind"
        || key.starts_with("write_behind:")
}

fn stats(engine: &CacheAside, out: &Out) -> Outcome {
    let namespace = engine.cache().namespace().to_owned();
    let (mut values, mut side, mut other) = (0_u64, 0_u64, 0_u64);
    scan_namespace(engine, |key| match split_key(&namespace, key) {
        Some((k, _)) if reserved(k) => other += 1,
        Some((_, "")) => values += 1,
        Some(_) => side += 1,
        None => other += 1,
    })?;
    let pending = engine.write_behind_pending()?;
    let dead = engine.write_behind_dead_letter_count()?;
    let outbox = &engine.config().outbox_table;
    let outbox_rows: Option<i64> = engine
        .db()
        .query_opt(&format!("SELECT count(*) FROM {outbox}"), &[])
        .ok()
        .flatten()
        .map(|r| r.get(0));
    out.print(
        json!({
            "namespace": namespace,
            "cache_entries": values,
            "side_keys": side,
            "other_keys": other,
            "write_behind_pending": pending,
            "dead_letters": dead,
            "outbox": outbox,
            "outbox_rows": outbox_rows,
        }),
        table(&[
            vec!["namespace".into(), format!("{namespace:?}")],
            vec!["cache entries".into(), values.to_string()],
            vec![
                "side keys (lease, lock, writers, ...)".into(),
                side.to_string(),
            ],
            vec!["sessions, limits, streams".into(), other.to_string()],
            vec!["write-behind pending".into(), pending.to_string()],
            vec!["dead letters".into(), dead.to_string()],
            vec![
                format!("outbox rows ({outbox})"),
                outbox_rows.map_or("no outbox".into(), |n| n.to_string()),
            ],
        ]),
    );
    Ok(0)
}

/// A side key's state: its TTL in ms (-1 none), or `None` when absent.
fn side_state(pttl: i64) -> Option<i64> {
    (pttl != -2).then_some(pttl)
}

fn get(engine: &CacheAside, out: &Out, key: &str) -> Outcome {
    // Validates the key (empty, braces, reserved) as every cache call does.
    engine.cache().exists(key)?;
    let redis_key = engine.cache().redis_key(key);
    let suffixes = [
        "lease", "lock", "writers", "pending", "floor", "seq", "fence",
    ];
    let mut entry_pipe = redis::pipe();
    entry_pipe
        .cmd("GET")
        .arg(&redis_key)
        .cmd("PTTL")
        .arg(&redis_key)
        .cmd("GET")
        .arg(format!("{redis_key}:seq"))
        .cmd("GET")
        .arg(format!("{redis_key}:floor"))
        .cmd("GET")
        .arg(format!("{redis_key}:fence"));
    let mut side_pipe = redis::pipe();
    for s in suffixes {
        side_pipe.cmd("PTTL").arg(format!("{redis_key}:{s}"));
    }
    type Reply = (
        Option<Vec<u8>>,
        i64,
        Option<String>,
        Option<String>,
        Option<String>,
    );
    let (raw, pttl, seq, floor, fence): Reply =
        engine.cache().with_connection(|c| entry_pipe.query(c))?;
    let sides: Vec<i64> = engine.cache().with_connection(|c| side_pipe.query(c))?;
    let mut side_json = serde_json::Map::new();
    let mut rows = vec![vec!["redis key".into(), redis_key.clone()]];
    let header = raw.as_deref().map(parse_header);
    match &header {
        None => rows.push(vec!["entry".into(), "not cached".into()]),
        Some(Err(why)) => rows.push(vec!["entry".into(), format!("corrupt ({why})")]),
        Some(Ok(h)) => {
            rows.push(vec!["kind".into(), h.kind.clone()]);
            rows.push(vec!["version".into(), h.version.to_string()]);
            rows.push(vec!["load".into(), format!("{} µs", h.load_us)]);
            let now = now_ms();
            let logical = if h.expires_at_ms > now {
                format!("fresh for {} ms", h.expires_at_ms - now)
            } else {
                format!(
                    "past its TTL by {} ms (fail-safe copy)",
                    now - h.expires_at_ms
                )
            };
            rows.push(vec!["logical expiry".into(), logical]);
            rows.push(vec!["redis ttl".into(), format!("{pttl} ms")]);
            rows.push(vec!["value".into(), h.body.clone()]);
        }
    }
    for (name, pttl) in suffixes.iter().zip(&sides) {
        let state = side_state(*pttl);
        side_json.insert((*name).into(), json!(state.map(|t| json!({"ttl_ms": t}))));
        let text = match state {
            None => "none".into(),
            Some(-1) => "held (no ttl)".into(),
            Some(t) => format!("held ({t} ms left)"),
        };
        rows.push(vec![(*name).into(), text]);
    }
    if let Some(seq) = &seq {
        rows.push(vec!["last write-behind seq".into(), seq.clone()]);
    }
    if let Some(floor) = &floor {
        rows.push(vec!["floor".into(), floor.clone()]);
    }
    if let Some(fence) = &fence {
        // A read replica's loads of the key need this version ('*': none).
        rows.push(vec!["replica fence".into(), fence.clone()]);
    }
    let entry = match &header {
        None => Value::Null,
        Some(Err(why)) => json!({"corrupt": why}),
        Some(Ok(h)) => json!({
            "kind": h.kind,
            "version": h.version,
            "load_us": h.load_us,
            "expires_at_ms": h.expires_at_ms,
            "redis_ttl_ms": pttl,
            "value": h.body,
        }),
    };
    out.print(
        json!({"key": key, "redis_key": redis_key, "entry": entry, "side_keys": side_json,
               "seq": seq, "floor": floor, "fence": fence}),
        table(&rows),
    );
    Ok(0)
}

/// An entry's header (`ca1 <v|a> <version> <load_us> <expires_at_ms>`)
/// and its body as text.
struct Header {
    kind: String,
    version: u64,
    load_us: u64,
    expires_at_ms: u64,
    body: String,
}

fn parse_header(raw: &[u8]) -> Result<Header, String> {
    let newline = raw
        .iter()
        .position(|&b| b == b'\n')
        .ok_or("no header line")?;
    let head = std::str::from_utf8(&raw[..newline]).map_err(|_| "header is not UTF-8")?;
    let fields: Vec<&str> = head.split(' ').collect();
    let number = |i: usize| -> Result<u64, String> {
        fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .ok_or_else(|| format!("bad header {head:?}"))
    };
    if fields.len() != 5 || fields[0] != "ca1" {
        return Err(format!("unknown header {head:?}"));
    }
    let kind = match fields[1] {
        "v" => "value",
        "a" => "absent",
        other => return Err(format!("unknown kind {other:?}")),
    };
    Ok(Header {
        kind: kind.into(),
        version: number(2)?,
        load_us: number(3)?,
        expires_at_ms: number(4)?,
        body: String::from_utf8_lossy(&raw[newline + 1..]).into_owned(),
    })
}

fn inspect(engine: &CacheAside, out: &Out, sample: usize) -> Outcome {
    let report = engine.inspect(sample)?;
    let secs = |d: Option<Duration>| d.map(|d| d.as_secs_f64());
    let stale: Vec<Value> = report
        .stale
        .iter()
        .map(|s| {
            json!({
                "key": s.key,
                "table": s.table,
                "cached_version": s.cached_version,
                "row_version": s.row_version,
                "stale_for_s": secs(s.stale_for),
                "expires_in_s": s.expires_in.as_secs_f64(),
            })
        })
        .collect();
    let mut text = format!(
        "inspected {} entries of {} ({} skipped): {} stale\ncost: {} Redis round trips, {} Postgres queries, {:.1} ms",
        report.inspected,
        if report.tables.is_empty() {
            "no captured, versioned table".to_owned()
        } else {
            report.tables.join(", ")
        },
        report.skipped,
        report.stale.len(),
        report.redis_round_trips,
        report.postgres_queries,
        report.took.as_secs_f64() * 1e3
    );
    if !report.stale.is_empty() {
        let mut rows = vec![vec![
            "key".into(),
            "table".into(),
            "cached".into(),
            "row".into(),
            "stale for".into(),
            "expires in".into(),
        ]];
        let version = |v: Option<String>| v.unwrap_or_else(|| "-".into());
        for s in &report.stale {
            rows.push(vec![
                s.key.clone(),
                s.table.clone(),
                version(s.cached_version.map(|v| v.to_string())).replace('-', "absent"),
                version(s.row_version.map(|v| v.to_string())).replace('-', "gone"),
                s.stale_for
                    .map_or("?".into(), |d| format!("{:.3} s", d.as_secs_f64())),
                format!("{:.1} s", s.expires_in.as_secs_f64()),
            ]);
        }
        text.push_str("\n\n");
        text.push_str(&table(&rows));
    }
    out.print(
        json!({
            "inspected": report.inspected,
            "skipped": report.skipped,
            "tables": report.tables,
            "stale": stale,
            "redis_round_trips": report.redis_round_trips,
            "postgres_queries": report.postgres_queries,
            "took_ms": report.took.as_secs_f64() * 1e3,
        }),
        text,
    );
    Ok(if report.stale.is_empty() { 0 } else { 3 })
}

fn outbox(engine: &CacheAside, out: &Out) -> Outcome {
    let outbox = &engine.config().outbox_table;
    let db = engine.db();
    // Named columns only: the outbox may grow columns.
    let rows = db.query(
        &format!(
            "SELECT c.consumer, c.horizon::text,
                    extract(epoch FROM now() - c.updated_at)::float8,
                    (SELECT count(*) FROM {outbox} o WHERE o.txid >= c.horizon),
                    (SELECT extract(epoch FROM now() - min(o.created_at))::float8
                     FROM {outbox} o WHERE o.txid >= c.horizon)
             FROM {outbox}_cursors c ORDER BY c.consumer"
        ),
        &[],
    )?;
    let total: i64 = db
        .query_opt(&format!("SELECT count(*) FROM {outbox}"), &[])?
        .map_or(0, |r| r.get(0));
    let mut consumers = Vec::new();
    let mut table_rows = vec![vec![
        "consumer (namespace)".into(),
        "horizon".into(),
        "pending rows".into(),
        "lag".into(),
        "cursor moved".into(),
    ]];
    for row in rows {
        let consumer: String = row.get(0);
        let horizon: String = row.get(1);
        let moved: f64 = row.get(2);
        let pending: i64 = row.get(3);
        let lag: Option<f64> = row.get(4);
        table_rows.push(vec![
            format!("{consumer:?}"),
            horizon.clone(),
            pending.to_string(),
            lag.map_or("-".into(), |l| format!("{l:.3} s")),
            format!("{moved:.1} s ago"),
        ]);
        consumers.push(json!({
            "consumer": consumer,
            "horizon": horizon,
            "pending_rows": pending,
            "lag_s": lag,
            "cursor_age_s": moved,
        }));
    }
    out.print(
        json!({"outbox": outbox, "rows": total, "consumers": consumers}),
        format!(
            "outbox {outbox}: {total} rows (pending: at or above a consumer's horizon; lag: the oldest of them)\n\n{}",
            table(&table_rows)
        ),
    );
    Ok(0)
}

fn dead_letters_list(engine: &CacheAside, out: &Out, count: usize) -> Outcome {
    let letters = engine.write_behind_dead_letters(count)?;
    let mut rows = vec![vec![
        "id".into(),
        "key".into(),
        "seq".into(),
        "attempts".into(),
        "error".into(),
    ]];
    let mut list = Vec::new();
    for d in &letters {
        rows.push(vec![
            d.id.clone(),
            d.key.clone().unwrap_or_else(|| "-".into()),
            d.seq.map_or("-".into(), |s| s.to_string()),
            d.attempts.to_string(),
            d.error.replace(['\n', '\r'], " "),
        ]);
        list.push(json!({
            "id": d.id, "original_id": d.original_id, "key": d.key, "seq": d.seq,
            "json": d.json, "error": d.error, "attempts": d.attempts,
        }));
    }
    let text = if letters.is_empty() {
        "no dead letters".into()
    } else {
        table(&rows)
    };
    out.print(json!({"dead_letters": list}), text);
    Ok(0)
}

fn dead_letters_replay(engine: &CacheAside, out: &Out, count: usize) -> Outcome {
    let report = engine.replay_dead_letters(count)?;
    out.print(
        json!({
            "replayed": report.replayed,
            "superseded": report.superseded,
            "unreadable": report.unreadable,
        }),
        format!(
            "replayed {}; left {} superseded (a newer change of the key exists) and {} unreadable",
            report.replayed.len(),
            report.superseded.len(),
            report.unreadable.len()
        ),
    );
    Ok(0)
}

/// Deletes the namespace's cache entries (values, leases, writers): not
/// the sessions, rate limits, write-behind streams or pending records.
fn namespace_delete(engine: &CacheAside, out: &Out, yes: bool) -> Outcome {
    let namespace = engine.cache().namespace().to_owned();
    if namespace.is_empty() {
        return Err(Trouble::Failed(
            "refusing the empty namespace (that is the whole database)".into(),
        ));
    }
    let mut doomed = Vec::new();
    scan_namespace(engine, |key| {
        if let Some((k, suffix)) = split_key(&namespace, key)
            && !reserved(k)
            && matches!(suffix, "" | ":lease" | ":writers")
        {
            doomed.push(key.to_owned());
        }
    })?;
    let entries = doomed
        .iter()
        .filter(|k| split_key(&namespace, k).is_some_and(|(_, s)| s.is_empty()))
        .count();
    if !yes {
        eprint!(
            "delete {entries} cache entries ({} keys) of namespace {namespace:?}? type yes: ",
            doomed.len()
        );
        let _ = std::io::stderr().flush();
        let mut answer = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut answer)
            .map_err(|e| Trouble::Failed(format!("cannot read the answer: {e}")))?;
        if answer.trim() != "yes" {
            return Err(Trouble::Failed("not confirmed: nothing deleted".into()));
        }
    }
    let mut deleted = 0_u64;
    for chunk in doomed.chunks(500) {
        deleted += engine
            .cache()
            .with_connection(|c| redis::cmd("UNLINK").arg(chunk).query::<u64>(c))?;
    }
    out.print(
        json!({"namespace": namespace, "entries": entries, "keys_deleted": deleted}),
        format!("deleted {entries} cache entries ({deleted} keys) of namespace {namespace:?}"),
    );
    Ok(0)
}
