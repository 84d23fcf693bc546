//! Tags and conditional refresh (issue 26): (19) a tagged hit against an
//! untagged one of the same size, taking turns call by call in the same
//! stretch of the run; `invalidate_tag` of a tag that 10,000 entries carry,
//! counted in commands on a private Redis (and checked: every entry is a
//! miss afterwards); and the bytes an early refresh sends to Redis when the
//! conditional loader finds the row unchanged, against one that finds it
//! changed, measured as `total_net_input_bytes` on that private Redis.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cacheaside::{CacheAside, Mode, Refresh, Versioned};
use serde_json::{Value, json};

use crate::BoxResult;
use crate::failover::{Dir, Node};
use crate::fixture::{Bench, bench_config};
use crate::measure::{Baseline, Series, TimedCall, Until, interleave, trimmed_mean_us};
use crate::report::{Section, Target};

const TTL: Duration = Duration::from_secs(600);
/// Entries that carry the invalidated tag.
const TAGGED_ENTRIES: u64 = 10_000;
/// The size of the value a conditional refresh keeps or rewrites.
const REFRESH_VALUE: usize = 4096;
/// Refreshes of each kind measured.
const REFRESHES: u64 = 20;

/// The section's numbers.
pub struct Tags {
    series: Vec<Series>,
    /// Commands Redis ran for one `invalidate_tag` of 10,000 entries.
    invalidate_commands: u64,
    invalidate_us: f64,
    /// Entries that were still hits after the invalidation (must be 0).
    survivors: u64,
    /// Bytes sent to Redis per early refresh, unchanged and changed.
    unchanged_bytes: f64,
    changed_bytes: f64,
}

pub fn measure(bench: &Bench) -> BoxResult<Tags> {
    let series = hits(bench)?;
    let dir = Dir::new("tags")?;
    let node = Node::spawn(&dir.0, None, &[])?;
    let private = Private::open(&node, &bench.namespace)?;
    let (invalidate_commands, invalidate_us, survivors) = invalidate_many(&private)?;
    if survivors > 0 {
        bench.fail(format!(
            "{survivors} of {TAGGED_ENTRIES} tagged entries were hits after invalidate_tag"
        ));
    }
    let (unchanged_bytes, changed_bytes) = refresh_bytes(bench, &private)?;
    eprintln!("bench: tags done");
    Ok(Tags {
        series,
        invalidate_commands,
        invalidate_us,
        survivors,
        unchanged_bytes,
        changed_bytes,
    })
}

/// (19): tagged and untagged hits of same-sized values, call by call.
fn hits(bench: &Bench) -> BoxResult<Vec<Series>> {
    let engine = bench.client().engine();
    let plan = &bench.plan;
    let value = "v".repeat(160);
    let loads = AtomicU64::new(0);
    let read = |key: &str, tags: &[&str]| -> BoxResult<u64> {
        let t = Instant::now();
        let got: Option<String> = engine.get_or_load_tagged(key, TTL, tags, || {
            loads.fetch_add(1, Ordering::Relaxed);
            Ok(Some(value.clone()))
        })?;
        let took = t.elapsed().as_nanos() as u64;
        if got.as_deref() != Some(value.as_str()) {
            return Err("a tagged read returned a wrong value".into());
        }
        Ok(took)
    };
    read("tags:hit:tagged", &["tags:category"])?;
    read("tags:hit:plain", &[])?;
    let warm = loads.load(Ordering::Relaxed);
    let base = Baseline::Paired { item: "(19u)" };
    let mut tagged = Series::new(
        "hit_tagged",
        "19",
        "hit: get_or_load_tagged (1 tag)",
        1,
        base,
    );
    let mut plain = Series::new(
        "hit_untagged",
        "19u",
        "hit: get_or_load (untagged, same size)",
        1,
        Baseline::None,
    );
    let calls: [&TimedCall; 2] = [&|| read("tags:hit:tagged", &["tags:category"]), &|| {
        read("tags:hit:plain", &[])
    }];
    for _ in 0..plan.reps {
        let lat = interleave(Until::Elapsed(plan.rep_time), &calls)?;
        let [tagged_lat, mut plain_lat] =
            <[Vec<u64>; 2]>::try_from(lat).expect("one list of latencies per call");
        plain_lat.sort_unstable();
        let base = trimmed_mean_us(&plain_lat);
        tagged.add_single_threaded(tagged_lat, Some(base));
        plain.add_single_threaded(plain_lat, None);
    }
    if loads.load(Ordering::Relaxed) != warm {
        bench.fail("a hit of the tags section called its loader");
    }
    tagged.finish();
    plain.finish();
    Ok(vec![plain, tagged])
}

/// An engine on the private Redis, and a way to count what that server did.
struct Private<'a> {
    node: &'a Node,
    engine: CacheAside,
}

impl Private<'_> {
    fn open<'a>(node: &'a Node, namespace: &str) -> BoxResult<Private<'a>> {
        let mut config = bench_config(namespace)?;
        config.redis_url = format!("redis://127.0.0.1:{}/", node.port);
        // Every hit refreshes early (XFetch), so a conditional refresh
        // follows each read of the refresh measurement.
        config.beta = 1e9;
        // Nothing else on this server: its commands and bytes are counted.
        config.invalidation_relay = false;
        Ok(Private {
            node,
            engine: CacheAside::open(&config)?,
        })
    }

    fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> BoxResult<T> {
        let mut conn = redis::Client::open(format!("redis://127.0.0.1:{}/", self.node.port))?
            .get_connection_with_timeout(Duration::from_secs(2))?;
        Ok(cmd.query(&mut conn)?)
    }

    /// Commands run since the last `CONFIG RESETSTAT` (INFO and CONFIG,
    /// the counting's own, left out).
    fn commands(&self) -> BoxResult<u64> {
        let info: String = self.query(redis::cmd("INFO").arg("commandstats"))?;
        Ok(info
            .lines()
            .filter_map(|line| {
                let (name, rest) = line.strip_prefix("cmdstat_")?.split_once(':')?;
                let calls: u64 = rest
                    .strip_prefix("calls=")?
                    .split(',')
                    .next()?
                    .parse()
                    .ok()?;
                (!name.starts_with("info") && !name.starts_with("config")).then_some(calls)
            })
            .sum())
    }

    /// `total_net_input_bytes`: every byte clients sent the server.
    fn input_bytes(&self) -> BoxResult<u64> {
        let info: String = self.query(redis::cmd("INFO").arg("stats"))?;
        info.lines()
            .find_map(|l| l.strip_prefix("total_net_input_bytes:"))
            .and_then(|n| n.trim().parse().ok())
            .ok_or_else(|| "no total_net_input_bytes in INFO".into())
    }
}

/// Fills 10,000 entries tagged alike, invalidates the tag, and returns the
/// commands that took, its latency, and the entries still hits after it.
fn invalidate_many(p: &Private<'_>) -> BoxResult<(u64, f64, u64)> {
    let engine = &p.engine;
    let read = |id: u64, loads: &AtomicU64| -> BoxResult<()> {
        let got: Option<u64> =
            engine.get_or_load_tagged(&format!("tags:p:{id}"), TTL, &["tags:big"], || {
                loads.fetch_add(1, Ordering::Relaxed);
                Ok(Some(id))
            })?;
        if got != Some(id) {
            return Err("a tagged read returned a wrong value".into());
        }
        Ok(())
    };
    let filled = AtomicU64::new(0);
    std::thread::scope(|s| -> BoxResult<()> {
        let workers: Vec<_> = (0..8)
            .map(|t| {
                let (read, filled) = (&read, &filled);
                s.spawn(move || -> Result<(), String> {
                    for id in (t..TAGGED_ENTRIES).step_by(8) {
                        read(id, filled).map_err(|e| e.to_string())?;
                    }
                    Ok(())
                })
            })
            .collect();
        for w in workers {
            w.join().map_err(|_| "a filling thread panicked")??;
        }
        Ok(())
    })?;
    p.query::<()>(redis::cmd("CONFIG").arg("RESETSTAT"))?;
    let t = Instant::now();
    engine.invalidate_tag("tags:big")?;
    let took_us = t.elapsed().as_secs_f64() * 1e6;
    let commands = p.commands()?;
    // Its latency, in the median of more calls (the first may have
    // checked a connection out of a cold pool).
    let mut lat: Vec<f64> = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        engine.invalidate_tag("tags:big")?;
        lat.push(t.elapsed().as_secs_f64() * 1e6);
    }
    lat.sort_by(f64::total_cmp);
    let took_us = lat.get(lat.len() / 2).copied().unwrap_or(took_us);
    let reloads = AtomicU64::new(0);
    for id in 0..TAGGED_ENTRIES {
        read(id, &reloads)?;
    }
    let survivors = TAGGED_ENTRIES - reloads.load(Ordering::Relaxed);
    eprintln!(
        "bench: invalidate_tag of {TAGGED_ENTRIES} entries: {commands} command(s), {took_us:.0} µs"
    );
    Ok((commands, took_us, survivors))
}

/// Bytes sent to Redis per read that refreshes early, with the loader
/// answering unchanged and changed (a 4 KiB value).
fn refresh_bytes(bench: &Bench, p: &Private<'_>) -> BoxResult<(f64, f64)> {
    let engine = &p.engine;
    let value = "r".repeat(REFRESH_VALUE - 2);
    let version = AtomicU64::new(1);
    let read = |change: bool| -> BoxResult<Option<u64>> {
        let mut given = None;
        let got: Option<String> =
            engine.get_or_load_conditional("tags:refresh", TTL, Mode::SingleFlight, |cached| {
                given = cached;
                // XFetch refreshes only loads that took measurable time.
                std::thread::sleep(Duration::from_millis(1));
                if cached.is_some() && !change {
                    return Ok(Refresh::Unchanged);
                }
                let v = version.fetch_add(u64::from(change), Ordering::Relaxed) + 1;
                Ok(Refresh::Loaded(Some(Versioned::new(value.clone(), v))))
            })?;
        if got.as_deref() != Some(value.as_str()) {
            return Err("a conditional read returned a wrong value".into());
        }
        Ok(given)
    };
    // The first fill, and one refresh of each kind (scripts loaded).
    read(true)?;
    read(false)?;
    read(true)?;
    // INFO's own request, measured alone.
    let (a, b) = (p.input_bytes()?, p.input_bytes()?);
    let info_bytes = b - a;
    let per_refresh = |change: bool| -> BoxResult<f64> {
        let before = p.input_bytes()?;
        for _ in 0..REFRESHES {
            if read(change)?.is_none() {
                bench.fail("an early refresh of a versioned entry was given no version");
            }
        }
        let sent = p.input_bytes()? - before - info_bytes;
        Ok(sent as f64 / REFRESHES as f64)
    };
    let unchanged = per_refresh(false)?;
    let changed = per_refresh(true)?;
    eprintln!(
        "bench: conditional refresh sends {unchanged:.0} B unchanged, {changed:.0} B changed \
         ({REFRESH_VALUE} B value)"
    );
    Ok((unchanged, changed))
}

impl Section for Tags {
    fn latency(&self) -> &[Series] {
        &self.series
    }

    fn markdown(&self, md: &mut String) {
        let _ = writeln!(md, "\n## Tags and conditional refresh\n");
        let _ = writeln!(md, "| measure | value |\n|---|---|");
        let _ = writeln!(
            md,
            "| `invalidate_tag` of a tag on {TAGGED_ENTRIES} entries | {} command(s), {:.0} µs; \
             {} entries still hits after it |",
            self.invalidate_commands, self.invalidate_us, self.survivors
        );
        let _ = writeln!(
            md,
            "| bytes sent to Redis per early refresh, row unchanged | {:.0} B (value {REFRESH_VALUE} B) |",
            self.unchanged_bytes
        );
        let _ = writeln!(
            md,
            "| bytes sent to Redis per early refresh, row changed | {:.0} B |",
            self.changed_bytes
        );
    }

    fn targets(&self) -> Vec<Target> {
        let hit_ratio = crate::measure::find(&self.series, "hit_tagged", 1)
            .and_then(|s| s.ratio(&self.series))
            .map(|(spread, _)| spread.median);
        vec![
            Target::at_most("(19) tagged hit ÷ untagged hit", hit_ratio, 1.15),
            Target {
                name: format!("invalidate_tag of {TAGGED_ENTRIES} tagged entries: commands"),
                value: self.invalidate_commands.to_string(),
                limit: "= 1".into(),
                met: Some(self.invalidate_commands == 1 && self.survivors == 0),
            },
            Target {
                name: "unchanged conditional refresh: bytes sent to Redis".into(),
                value: format!("{:.0} B", self.unchanged_bytes),
                limit: format!("< {REFRESH_VALUE} B (no value)"),
                met: Some(self.unchanged_bytes < REFRESH_VALUE as f64),
            },
        ]
    }

    fn json(&self) -> Option<(&'static str, Value)> {
        Some((
            "tags",
            json!({
                "latency": self.series.iter().map(Series::json).collect::<Vec<_>>(),
                "invalidate_tag": {
                    "entries": TAGGED_ENTRIES,
                    "commands": self.invalidate_commands,
                    "us": self.invalidate_us,
                    "survivors": self.survivors,
                },
                "conditional_refresh": {
                    "value_bytes": REFRESH_VALUE,
                    "unchanged_bytes_per_refresh": self.unchanged_bytes,
                    "changed_bytes_per_refresh": self.changed_bytes,
                },
            }),
        ))
    }
}
