//! (20) batch reads, `get_or_load_many`: 100 keys that all hit against one
//! raw pooled Redis `GET` (1) measured in the same run, and against 100
//! single-key hits; 100 cold keys: loader calls, Postgres statements and
//! Redis round trips (counted by a proxy between the engine and Redis: a
//! round trip is a request sent after the last reply, per connection);
//! 50 threads asking overlapping batches of a cold page: loads per key.
//!
//! Its engines use the run's namespace (keys `batch:…`), no table: the
//! loader's one statement selects from `generate_series`.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::Duration;

use cacheaside::{CacheAside, Error};
use serde_json::{Value, json};

use crate::BoxResult;
use crate::fixture::Bench;
use crate::measure::{self, Baseline, Operation, Series};
use crate::report::{Section, Target};

const KEYS: usize = 100;
const THREADS: usize = 50;
/// Keys each of the overlapping threads asks for.
const PER_THREAD: usize = 20;
const TTL: Duration = Duration::from_secs(600);

pub struct Batch {
    series: Vec<Series>,
    /// Round trips of the first cold batch on this engine, and the
    /// connections opened meanwhile (each new one's handshake counts).
    first: (u64, u64),
    /// Per cold repetition: loader calls, statements, Redis round trips.
    cold: Vec<(u32, u64, u64)>,
    /// Per overlapping repetition: the fewest and most loads of a key.
    overlap: Vec<(u32, u32)>,
}

/// The loader every batch here runs: one statement for all the missing
/// keys (`…:<n>` is row n of a 100-row series).
fn load(engine: &CacheAside, missing: &[&str]) -> Result<Vec<(String, String)>, Error> {
    let ids: Vec<i32> = missing
        .iter()
        .filter_map(|k| k.rsplit(':').next()?.parse().ok())
        .collect();
    let rows = engine.db().query(
        "SELECT g, 'value-' || g FROM generate_series(1, 100) g WHERE g = ANY($1)",
        &[&ids],
    )?;
    let prefix = missing
        .first()
        .and_then(|k| k.rsplit_once(':'))
        .map_or("", |(p, _)| p);
    Ok(rows
        .iter()
        .map(|r| (format!("{prefix}:{}", r.get::<_, i32>(0)), r.get(1)))
        .collect())
}

fn keys(prefix: &str) -> Vec<String> {
    (1..=KEYS).map(|i| format!("{prefix}:{i}")).collect()
}

fn check(got: &[Option<String>], keys: &[String]) -> BoxResult<()> {
    for (value, key) in got.iter().zip(keys) {
        let want = format!("value-{}", key.rsplit(':').next().unwrap_or(""));
        if value.as_deref() != Some(want.as_str()) {
            return Err(format!("batch read {key:?} as {value:?}").into());
        }
    }
    if got.len() != keys.len() {
        return Err("a batch answered another number of keys".into());
    }
    Ok(())
}

pub fn measure(bench: &Bench) -> BoxResult<Batch> {
    let client = bench.client();
    let engine = client.engine();
    let hot = keys("batch:hot");
    let got = engine.get_or_load_many(&hot, TTL, |missing| load(engine, missing))?;
    check(&got, &hot)?;
    let hot_redis: Vec<String> = hot.iter().map(|k| engine.cache().redis_key(k)).collect();
    let [floor_redis, _] = bench.floors.ops(client);
    let floor = Baseline::Series {
        id: "floor_redis",
        item: "(1)",
    };
    let all_hits = |_: &[&str]| -> Result<Vec<(String, String)>, Error> {
        Err(Error::invalid_argument("a key of the hit loop missed"))
    };
    let ops = [
        floor_redis,
        Operation {
            id: "batch_hits",
            item: "19",
            label: "get_or_load_many, 100 keys (all hits)",
            baseline: floor,
            call: Box::new(|| check(&engine.get_or_load_many(&hot, TTL, all_hits)?, &hot)),
        },
        Operation {
            id: "raw_mget",
            item: "19b",
            label: "floor: pooled redis MGET of the 100 keys",
            baseline: floor,
            call: Box::new(|| {
                let raw: Vec<Option<Vec<u8>>> = engine
                    .cache()
                    .with_connection(|c| redis::cmd("MGET").arg(&hot_redis).query(c))?;
                match raw.iter().filter(|r| r.is_some()).count() {
                    KEYS => Ok(()),
                    n => Err(format!("MGET found {n} of {KEYS} keys").into()),
                }
            }),
        },
        Operation {
            id: "single_hits",
            item: "19a",
            label: "100 × get_or_load (all hits)",
            baseline: floor,
            call: Box::new(|| {
                let got = hot
                    .iter()
                    .map(|k| engine.get_or_load(k, TTL, || all_hits(&[]).map(|_| None)))
                    .collect::<Result<Vec<Option<String>>, Error>>()?;
                check(&got, &hot)
            }),
        },
    ];
    let active: Vec<&Operation> = ops.iter().collect();
    let series = measure::side_by_side(&active, 1, &bench.plan)?;
    eprintln!("bench: batch hits done");

    let reps = bench.plan.reps;
    let mut cold = Vec::new();
    let proxy = Proxy::start(&bench.config.redis_url)?;
    let mut config = bench.config.clone();
    config.redis_url = proxy.url.clone();
    let counted = CacheAside::open(&config)?;
    // Opens the pool's connection (its handshake is not the batch's), and
    // a first cold batch has Redis load the claim and fill scripts: a
    // pipelined EVALSHA has no EVAL fallback, so the first batch after
    // Redis forgot them (a restart) costs two round trips more per script.
    counted.ping()?;
    let first = proxy.round_trips();
    let opened = proxy.connections();
    let warm = keys("batch:cold:warm");
    check(
        &counted.get_or_load_many(&warm, TTL, |missing| load(&counted, missing))?,
        &warm,
    )?;
    let first = (proxy.round_trips() - first, proxy.connections() - opened);
    for rep in 0..reps {
        let cold_keys = keys(&format!("batch:cold:{rep}"));
        let calls = AtomicU32::new(0);
        let statements = counted.db().query_count();
        let trips = proxy.round_trips();
        let got = counted.get_or_load_many(&cold_keys, TTL, |missing| {
            calls.fetch_add(1, Ordering::SeqCst);
            load(&counted, missing)
        })?;
        let trips = proxy.round_trips() - trips;
        check(&got, &cold_keys)?;
        cold.push((
            calls.load(Ordering::SeqCst),
            counted.db().query_count() - statements,
            trips,
        ));
    }
    drop(counted);
    drop(proxy);
    eprintln!("bench: batch cold page done");

    let mut overlap = Vec::new();
    for rep in 0..reps {
        let prefix = format!("batch:page:{rep}");
        let page = keys(&prefix);
        let loads: HashMap<&str, AtomicU32> = page
            .iter()
            .map(|k| (k.as_str(), AtomicU32::new(0)))
            .collect();
        let barrier = Barrier::new(THREADS);
        thread::scope(|s| -> BoxResult<()> {
            let handles: Vec<_> = (0..THREADS)
                .map(|t| {
                    let (page, loads, barrier) = (&page, &loads, &barrier);
                    s.spawn(move || -> BoxResult<()> {
                        let mine: Vec<String> = (0..PER_THREAD)
                            .map(|i| page[(2 * t + i) % KEYS].clone())
                            .collect();
                        barrier.wait();
                        let got = engine.get_or_load_many(&mine, TTL, |missing| {
                            for k in missing {
                                if let Some(n) = loads.get(k) {
                                    n.fetch_add(1, Ordering::SeqCst);
                                }
                            }
                            load(engine, missing)
                        })?;
                        check(&got, &mine)
                    })
                })
                .collect();
            for handle in handles {
                handle.join().map_err(|_| "a batch thread panicked")??;
            }
            Ok(())
        })?;
        let counts: Vec<u32> = loads.values().map(|n| n.load(Ordering::SeqCst)).collect();
        let (min, max) = (
            counts.iter().copied().min().unwrap_or(0),
            counts.iter().copied().max().unwrap_or(0),
        );
        if (min, max) != (1, 1) {
            bench.fail(format!(
                "overlapping batches loaded a key {min}..{max} times (must be once)"
            ));
        }
        overlap.push((min, max));
    }
    if engine.in_flight() != 0 {
        bench.fail("a batch left a key in flight");
    }
    eprintln!("bench: batch overlapping pages done");
    Ok(Batch {
        series,
        first,
        cold,
        overlap,
    })
}

impl Batch {
    /// The worst repetition's loader calls, statements and round trips.
    fn cold_worst(&self) -> Option<(u32, u64, u64)> {
        let worst = |f: fn(&(u32, u64, u64)) -> u64| self.cold.iter().map(f).max();
        Some((
            worst(|c| u64::from(c.0))? as u32,
            worst(|c| c.1)?,
            worst(|c| c.2)?,
        ))
    }

    fn most_loads(&self) -> Option<u32> {
        self.overlap.iter().map(|o| o.1).max()
    }
}

/// A count that must be exactly `want` (or at most `limit`).
fn count(name: &str, value: Option<u64>, limit: u64, exact: bool) -> Target {
    Target {
        name: name.to_owned(),
        value: value.map_or("not measured".into(), |v| v.to_string()),
        limit: format!("{} {limit}", if exact { "=" } else { "≤" }),
        met: value.map(|v| if exact { v == limit } else { v <= limit }),
    }
}

impl Section for Batch {
    fn latency(&self) -> &[Series] {
        &self.series
    }

    fn markdown(&self, md: &mut String) {
        let _ = writeln!(md, "\n### Batch reads (20): get_or_load_many\n");
        let _ = writeln!(
            md,
            "(20) reads 100 cached keys in one call; (20a) reads them one `get_or_load` at a \
             time; both against one raw pooled `GET` (1). A cold page of {KEYS} keys, worst of \
             {} repetitions: loader calls, Postgres statements, Redis round trips (counted by a \
             proxy: a request sent after the last reply, per connection). {THREADS} threads \
             released together, each asking {PER_THREAD} keys of a cold {KEYS}-key page, \
             overlapping: loads per key (min..max over keys and repetitions).\n",
            self.cold.len()
        );
        let _ = writeln!(
            md,
            "The first cold batch of the engine took {} round trips, while the pool opened {} \
             connection(s) (a new connection's handshake is a few round trips of its own); the \
             repetitions below come after it.\n",
            self.first.0, self.first.1
        );
        let _ = writeln!(
            md,
            "| cold page | loader calls | statements | round trips |"
        );
        let _ = writeln!(md, "|---|---|---|---|");
        for (rep, (calls, statements, trips)) in self.cold.iter().enumerate() {
            let _ = writeln!(md, "| rep {rep} | {calls} | {statements} | {trips} |");
        }
        let loads: Vec<String> = self
            .overlap
            .iter()
            .map(|(min, max)| format!("{min}..{max}"))
            .collect();
        let _ = writeln!(
            md,
            "\nOverlapping batches, loads per key: {}",
            loads.join(", ")
        );
    }

    fn targets(&self) -> Vec<Target> {
        let ratio = |id| measure::median_ratio(&self.series, id, 1);
        let worst = self.cold_worst();
        vec![
            Target::at_most(
                "batch of 100 hits (20) latency vs one GET (1), 1 thread",
                ratio("batch_hits"),
                2.0,
            ),
            count(
                "100 cold keys: loader calls",
                worst.map(|w| u64::from(w.0)),
                1,
                true,
            ),
            count("100 cold keys: statements", worst.map(|w| w.1), 1, true),
            count(
                "100 cold keys: Redis round trips",
                worst.map(|w| w.2),
                4,
                false,
            ),
            count(
                "50 threads, overlapping cold batches: most loads of one key",
                self.most_loads().map(u64::from),
                1,
                true,
            ),
        ]
    }

    fn json(&self) -> Option<(&'static str, Value)> {
        let ratio = |id| measure::median_ratio(&self.series, id, 1);
        Some((
            "batch",
            json!({
                "keys": KEYS,
                "first_cold_round_trips": self.first.0,
                "first_cold_connections_opened": self.first.1,
                "hits_over_one_get": ratio("batch_hits"),
                "single_hits_over_one_get": ratio("single_hits"),
                "cold": self.cold.iter().map(|(c, s, t)| json!({
                    "loader_calls": c, "statements": s, "round_trips": t,
                })).collect::<Vec<_>>(),
                "overlap_threads": THREADS,
                "overlap_loads_per_key": self.overlap.iter().map(|(min, max)| json!({
                    "min": min, "max": max,
                })).collect::<Vec<_>>(),
            }),
        ))
    }
}

/// A TCP proxy in front of Redis that counts round trips: on each
/// connection, a request that follows a reply (or opens the connection)
/// starts one.
struct Proxy {
    url: String,
    trips: Arc<AtomicU64>,
    /// Connections accepted so far.
    connections: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    addr: std::net::SocketAddr,
}

impl Proxy {
    /// A proxy to the Redis of `url`; `self.url` is `url` through it.
    fn start(url: &str) -> BoxResult<Proxy> {
        let (scheme, rest) = url.split_once("://").ok_or("redis_url has no scheme")?;
        let (user, rest) = rest.rsplit_once('@').map_or(("", rest), |(u, r)| (u, r));
        let (host_port, path) = rest.split_once('/').unwrap_or((rest, ""));
        let upstream = host_port.to_owned();
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let at = if user.is_empty() {
            String::new()
        } else {
            format!("{user}@")
        };
        let proxy = Proxy {
            url: format!("{scheme}://{at}{addr}/{path}"),
            trips: Arc::new(AtomicU64::new(0)),
            connections: Arc::new(AtomicU64::new(0)),
            stop: Arc::new(AtomicBool::new(false)),
            addr,
        };
        let (trips, stop) = (Arc::clone(&proxy.trips), Arc::clone(&proxy.stop));
        let connections = Arc::clone(&proxy.connections);
        thread::spawn(move || {
            for client in listener.incoming() {
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                let (Ok(client), Ok(server)) = (client, TcpStream::connect(&upstream)) else {
                    continue;
                };
                connections.fetch_add(1, Ordering::SeqCst);
                // 0: nothing yet, 1: last sent a request, 2: last a reply.
                let last = Arc::new(AtomicU8::new(0));
                let pipe = |mut from: TcpStream, mut to: TcpStream, request: bool| {
                    let (last, trips) = (Arc::clone(&last), Arc::clone(&trips));
                    thread::spawn(move || {
                        let mut buf = [0_u8; 16 * 1024];
                        while let Ok(n @ 1..) = from.read(&mut buf) {
                            // Noted before forwarding: the reply cannot come
                            // before the request reaches the server.
                            let now = if request { 1 } else { 2 };
                            if last.swap(now, Ordering::SeqCst) != now && request {
                                trips.fetch_add(1, Ordering::SeqCst);
                            }
                            if to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        let _ = to.shutdown(Shutdown::Both);
                    });
                };
                let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else {
                    continue;
                };
                pipe(client, server, true);
                pipe(s2, c2, false);
            }
        });
        Ok(proxy)
    }

    fn round_trips(&self) -> u64 {
        self.trips.load(Ordering::SeqCst)
    }

    fn connections(&self) -> u64 {
        self.connections.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop, which then sees `stop`.
        let _ = TcpStream::connect(self.addr);
    }
}
