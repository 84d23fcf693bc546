//! (9) The bad day: what a read costs with Redis out (the circuit breaker
//! open) against the Postgres floor, how soon hits come back after Redis
//! does, and what a fail-safe copy costs with Postgres down against a hit.
//! Each measured in this run, on servers this run owns or on ports nothing
//! listens on; the shared servers are never disturbed.

use std::fmt::Write as _;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cacheaside::{Client, Config, Db};
use serde_json::{Value, json};

use crate::BoxResult;
use crate::fixture::Bench;
use crate::measure::{TimedCall, Until, interleave, trimmed_mean_us};
use crate::report::{Section, Target};

pub struct Faults {
    rounds: usize,
    breaker_open_us: f64,
    pg_floor_us: f64,
    recovery: Option<Duration>,
    cool_off: Duration,
    stale_retry_us: f64,
    stale_throttled_us: f64,
    hit_us: f64,
}

/// A port nothing listens on: connects to it are refused.
fn refused_port() -> BoxResult<u16> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// The run's settings for a client that shares its table and namespace.
fn sibling(bench: &Bench) -> Config {
    let mut config = bench.config.clone();
    config.invalidation_relay = false;
    config
}

fn mean_us(mut ns: Vec<u64>) -> f64 {
    ns.sort_unstable();
    trimmed_mean_us(&ns)
}

pub fn measure(bench: &Bench) -> BoxResult<Faults> {
    let rounds = if bench.plan.quick { 300 } else { 3000 };
    eprintln!("bench: faults: breaker open, recovery, fail-safe...");
    let (breaker_open_us, pg_floor_us) = breaker_open(bench, rounds)?;
    let cool_off = bench.config.breaker_cool_off;
    let recovery = match recovery(bench) {
        Ok(took) => Some(took),
        Err(err) => {
            eprintln!("bench: faults: recovery not measured ({err}): is redis-server installed?");
            None
        }
    };
    let (stale_retry_us, stale_throttled_us, hit_us) = fail_safe(bench, rounds)?;
    Ok(Faults {
        rounds,
        breaker_open_us,
        pg_floor_us,
        recovery,
        cool_off,
        stale_retry_us,
        stale_throttled_us,
        hit_us,
    })
}

/// Reads with the breaker open (Redis refuses; after three failures reads
/// stop trying it), taking turns with the raw Postgres select.
fn breaker_open(bench: &Bench, rounds: usize) -> BoxResult<(f64, f64)> {
    let mut config = sibling(bench);
    config.redis_url = format!("redis://127.0.0.1:{}/", refused_port()?);
    let client = Client::open(&config)?;
    for _ in 0..5 {
        client.get_user_profile(2)?;
    }
    if !client.engine().breaker_open() {
        bench.fail("faults: the breaker did not open with Redis refusing connections");
    }
    let db = Db::connect(&bench.config)?;
    let select = format!(
        "SELECT id, name, email, plan, version FROM {} WHERE id = $1",
        bench.client().users_table()
    );
    let read: &TimedCall<'_> = &|| {
        let t = Instant::now();
        let user = client.get_user_profile(2)?.ok_or("user 2 vanished")?;
        if user.id != 2 {
            return Err("wrong row".into());
        }
        Ok(t.elapsed().as_nanos() as u64)
    };
    let floor: &TimedCall<'_> = &|| {
        let t = Instant::now();
        db.query_opt(&select, &[&2_i64])?.ok_or("no row")?;
        Ok(t.elapsed().as_nanos() as u64)
    };
    // Warm both (the floor's pool opens its connections as it goes).
    interleave(Until::Rounds(50), &[read, floor])?;
    let mut lat = interleave(Until::Rounds(rounds), &[read, floor])?;
    let floor_ns = lat.pop().unwrap_or_default();
    let read_ns = lat.pop().unwrap_or_default();
    Ok((mean_us(read_ns), mean_us(floor_ns)))
}

/// A redis-server this run owns, on a port of its own.
struct OwnRedis {
    port: u16,
    child: Child,
}

impl OwnRedis {
    fn start(port: u16) -> BoxResult<OwnRedis> {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let redis = OwnRedis { port, child };
        let client = redis::Client::open(redis.url())?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while client
            .get_connection_with_timeout(Duration::from_millis(100))
            .is_err()
        {
            if Instant::now() > deadline {
                return Err("redis-server did not start".into());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(redis)
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        // Only the process this run started.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Redis killed under reads, then started again: the time from its first
/// answer to the first hit (the breaker's cool-off, its probe, the relay
/// catching up, and one fill).
fn recovery(bench: &Bench) -> BoxResult<Duration> {
    let port = refused_port()?;
    let redis = OwnRedis::start(port)?;
    let mut config = bench.config.clone();
    config.redis_url = redis.url();
    let client = Client::open(&config)?;
    for id in 1..=5 {
        client.get_user_profile(id)?;
    }
    drop(redis); // killed
    while !client.engine().breaker_open() {
        client.get_user_profile(1)?;
    }
    let _redis = OwnRedis::start(port)?;
    let back = Instant::now();
    let hits = client.engine().stats().hits;
    while client.engine().stats().hits == hits {
        client.get_user_profile(1)?;
        if back.elapsed() > Duration::from_secs(30) {
            return Err("no hit 30 s after Redis came back".into());
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    Ok(back.elapsed())
}

/// Postgres refuses connections; entries are past their TTL. A read that
/// retries Postgres and serves the copy (the throttle has passed), and one
/// within the throttle period (the re-armed copy), each against a hit.
fn fail_safe(bench: &Bench, rounds: usize) -> BoxResult<(f64, f64, f64)> {
    let ttl = Duration::from_millis(50);
    let mut good = sibling(bench);
    good.ttl = ttl;
    good.fail_safe_max = Duration::from_secs(600);
    good.fail_safe_throttle = Duration::from_millis(1);
    let filler = Client::open(&good)?;
    let mut down = good.clone();
    // Any URL whose port refuses connections: Postgres is "down".
    down.database_url = format!("postgres://postgres@127.0.0.1:{}/test", refused_port()?);
    // Every read retries Postgres (the throttle is 1 ms).
    let retrying = Client::open(&down)?;
    // Reads within a long throttle period take the re-armed copy.
    down.fail_safe_throttle = Duration::from_secs(600);
    let throttled = Client::open(&down)?;
    // Hits, on a key that stays fresh.
    let hitter = Client::open(&sibling(bench))?;
    hitter.get_user_profile(1)?;
    for id in [3, 4] {
        filler.get_user_profile(id)?;
    }
    std::thread::sleep(ttl * 2);
    throttled.get_user_profile(4)?; // re-armed for its 600 s
    let stale_before = retrying.engine().stats().stale_served;
    let timed = |client: &Client, id: i64| -> BoxResult<u64> {
        let t = Instant::now();
        let user = client.get_user_profile(id)?.ok_or("no copy served")?;
        if user.id != id {
            return Err("wrong row".into());
        }
        Ok(t.elapsed().as_nanos() as u64)
    };
    let retry: &TimedCall<'_> = &|| {
        std::thread::sleep(Duration::from_millis(2)); // past the 1 ms throttle
        timed(&retrying, 3)
    };
    let in_throttle: &TimedCall<'_> = &|| timed(&throttled, 4);
    let hit: &TimedCall<'_> = &|| timed(&hitter, 1);
    interleave(Until::Rounds(20), &[retry, in_throttle, hit])?;
    let mut lat = interleave(Until::Rounds(rounds / 3), &[retry, in_throttle, hit])?;
    let hit_ns = lat.pop().unwrap_or_default();
    let throttled_ns = lat.pop().unwrap_or_default();
    let retry_ns = lat.pop().unwrap_or_default();
    if retrying.engine().stats().stale_served <= stale_before {
        bench.fail("faults: no fail-safe copy was served with Postgres down");
    }
    Ok((mean_us(retry_ns), mean_us(throttled_ns), mean_us(hit_ns)))
}

impl Faults {
    fn breaker_ratio(&self) -> f64 {
        self.breaker_open_us / self.pg_floor_us
    }

    fn stale_ratio(&self) -> f64 {
        self.stale_throttled_us / self.hit_us
    }
}

impl Section for Faults {
    fn markdown(&self, md: &mut String) {
        let _ = writeln!(
            md,
            "\n### Faults (9): Redis out, Redis back, Postgres down ({} rounds, calls taking turns; means without the slowest 1%)\n",
            self.rounds
        );
        md.push_str("| measurement | µs | ratio |\n|---|---:|---|\n");
        let _ = writeln!(
            md,
            "| read with the breaker open (Redis refused) | {:.1} | {:.3}× the Postgres floor |",
            self.breaker_open_us,
            self.breaker_ratio()
        );
        let _ = writeln!(
            md,
            "| Postgres floor: pooled PK select | {:.1} | |",
            self.pg_floor_us
        );
        let _ = writeln!(
            md,
            "| fail-safe copy, Postgres retried (refused) first | {:.1} | {:.3}× a hit |",
            self.stale_retry_us,
            self.stale_retry_us / self.hit_us
        );
        let _ = writeln!(
            md,
            "| fail-safe copy within its throttle period (re-armed) | {:.1} | {:.3}× a hit |",
            self.stale_throttled_us,
            self.stale_ratio()
        );
        let _ = writeln!(md, "| hit | {:.1} | |", self.hit_us);
        match self.recovery {
            Some(took) => {
                let _ = writeln!(
                    md,
                    "\nRedis killed, then started again: the first hit came {:.0} ms after it answered (breaker cool-off {} ms, then one probe, the relay's catch-up, a fill).",
                    took.as_secs_f64() * 1e3,
                    self.cool_off.as_millis()
                );
            }
            None => md.push_str("\nRecovery not measured (no redis-server to start).\n"),
        }
    }

    fn targets(&self) -> Vec<Target> {
        vec![
            Target::at_most(
                "faults: read with the breaker open vs the Postgres floor",
                Some(self.breaker_ratio()),
                1.2,
            ),
            Target::at_most(
                "faults: fail-safe read (re-armed copy) vs a hit",
                Some(self.stale_ratio()),
                1.1,
            ),
        ]
    }

    fn json(&self) -> Option<(&'static str, Value)> {
        Some((
            "faults",
            json!({
                "breaker_open_read_us": self.breaker_open_us,
                "postgres_floor_us": self.pg_floor_us,
                "recovery_to_first_hit_ms": self.recovery.map(|d| d.as_secs_f64() * 1e3),
                "breaker_cool_off_ms": self.cool_off.as_millis() as u64,
                "stale_after_retry_us": self.stale_retry_us,
                "stale_in_throttle_us": self.stale_throttled_us,
                "hit_us": self.hit_us,
            }),
        ))
    }
}
