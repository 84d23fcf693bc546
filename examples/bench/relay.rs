//! (10) The invalidation relay: how long after a commit that bypasses the
//! library its key is gone from Redis, with the default settings (the
//! relay looks every 5 ms while changes arrive, backing off to
//! `relay_poll`, 50 ms, when idle: these are isolated commits, so mostly
//! the idle case) and with a slow poll (`relay_poll` = 200 ms, no lease);
//! and what the capture trigger adds to an UPDATE, against the same UPDATE
//! on a table without it.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use cacheaside::{Client, Db};
use serde_json::{Value, json};

use crate::BoxResult;
use crate::fixture::Bench;
use crate::measure::{TimedCall, Until, interleave, quantile_us, trimmed_mean_us};
use crate::report::{Section, Target};

pub struct Relay {
    notify_ms: Vec<f64>,
    poll_ms: Vec<f64>,
    poll_every: Duration,
    update_rounds: usize,
    captured_us: f64,
    plain_us: f64,
}

/// The user whose row the section updates.
const USER: i64 = 5;

pub fn measure(bench: &Bench) -> BoxResult<Relay> {
    let quick = bench.plan.quick;
    let client = bench.client();
    let outsider = Db::connect(&bench.config)?;
    eprintln!("bench: relay: commit-to-invalidation latency, trigger overhead...");
    let notify_ms = latencies(client, &outsider, if quick { 20 } else { 200 })?;

    // A slow poll without the lease (as behind a transaction pooler),
    // alone on the outbox.
    let poll_every = Duration::from_millis(200);
    client.engine().stop_relay();
    let mut config = bench.config.clone();
    config.relay_listen = false;
    config.relay_poll = poll_every;
    let poller = Client::open(&config)?;
    let poll_ms = latencies(&poller, &outsider, if quick { 5 } else { 40 });
    drop(poller);
    client.engine().start_relay();
    let poll_ms = poll_ms?;

    let update_rounds = if quick { 300 } else { 3000 };
    let (captured_us, plain_us) = trigger_overhead(client, &outsider, update_rounds)?;
    Ok(Relay {
        notify_ms,
        poll_ms,
        poll_every,
        update_rounds,
        captured_us,
        plain_us,
    })
}

/// `samples` times: cache the row, update it on another connection, and
/// time from the commit to its key's disappearance from Redis.
fn latencies(client: &Client, outsider: &Db, samples: usize) -> BoxResult<Vec<f64>> {
    let key = client.cache().redis_key(&Client::user_key(USER));
    let update = format!(
        "UPDATE {} SET plan = $1 WHERE id = $2",
        client.users_table()
    );
    let mut out = Vec::with_capacity(samples);
    for i in 0..samples {
        client.get_user_profile(USER)?;
        outsider.execute(&update, &[&format!("relay-{i}"), &USER])?;
        let committed = Instant::now();
        loop {
            let cached: bool = client
                .cache()
                .with_connection(|c| redis::cmd("EXISTS").arg(&key).query(c))?;
            if !cached {
                break;
            }
            if committed.elapsed() > Duration::from_secs(10) {
                return Err("the relay did not invalidate within 10 s".into());
            }
            std::thread::sleep(Duration::from_micros(100));
        }
        out.push(committed.elapsed().as_secs_f64() * 1e3);
    }
    Ok(out)
}

/// The same UPDATE on the captured users table and on a copy without the
/// triggers, taking turns; means without the slowest 1%, in µs.
fn trigger_overhead(client: &Client, db: &Db, rounds: usize) -> BoxResult<(f64, f64)> {
    let users = client.users_table();
    let plain = format!("{users}_plain");
    db.batch_execute(&format!(
        "DROP TABLE IF EXISTS {plain};
         CREATE TABLE {plain} (LIKE {users} INCLUDING ALL);
         INSERT INTO {plain} SELECT * FROM {users};"
    ))?;
    let update = |table: &str| format!("UPDATE {table} SET plan = $1 WHERE id = $2");
    let (on_captured, on_plain) = (update(users), update(&plain));
    let timed = |sql: &str| -> BoxResult<u64> {
        let t = Instant::now();
        db.execute(sql, &[&"overhead", &4_i64])?;
        Ok(t.elapsed().as_nanos() as u64)
    };
    let captured: &TimedCall<'_> = &|| timed(&on_captured);
    let bare: &TimedCall<'_> = &|| timed(&on_plain);
    let measured = interleave(Until::Rounds(rounds), &[captured, bare]);
    db.batch_execute(&format!("DROP TABLE IF EXISTS {plain}"))?;
    let mut lat = measured?;
    let mut plain_ns = lat.pop().unwrap_or_default();
    let mut captured_ns = lat.pop().unwrap_or_default();
    captured_ns.sort_unstable();
    plain_ns.sort_unstable();
    Ok((trimmed_mean_us(&captured_ns), trimmed_mean_us(&plain_ns)))
}

fn percentile_ms(ms: &[f64], q: f64) -> f64 {
    let mut ns: Vec<u64> = ms.iter().map(|m| (m * 1e6) as u64).collect();
    ns.sort_unstable();
    quantile_us(&ns, q) / 1e3
}

impl Section for Relay {
    fn markdown(&self, md: &mut String) {
        let _ = writeln!(
            md,
            "\n### Relay (10): a commit that bypasses the library, until its key is gone from Redis\n"
        );
        md.push_str("| path | samples | p50 ms | p99 ms | max ms |\n|---|---:|---:|---:|---:|\n");
        for (path, ms) in [
            ("default (adaptive poll, 5–50 ms)", &self.notify_ms),
            ("relay_poll = 200 ms", &self.poll_ms),
        ] {
            let max = ms.iter().copied().fold(0.0, f64::max);
            let _ = writeln!(
                md,
                "| {path} | {} | {:.2} | {:.2} | {:.2} |",
                ms.len(),
                percentile_ms(ms, 0.5),
                percentile_ms(ms, 0.99),
                max
            );
        }
        let _ = writeln!(
            md,
            "\nThe second path backs off to {} ms here (the default is 50 ms). The capture trigger makes an UPDATE of one row cost {:.1} µs against {:.1} µs without it: {:.2}× ({} rounds taking turns).",
            self.poll_every.as_millis(),
            self.captured_us,
            self.plain_us,
            self.captured_us / self.plain_us,
            self.update_rounds
        );
    }

    fn targets(&self) -> Vec<Target> {
        let p99 = percentile_ms(&self.notify_ms, 0.99);
        vec![Target {
            name: "relay: commit-to-invalidation p99 (default settings)".into(),
            value: format!("{p99:.1} ms"),
            limit: "≤ 1000 ms".into(),
            met: Some(p99 <= 1000.0),
        }]
    }

    fn json(&self) -> Option<(&'static str, Value)> {
        Some((
            "relay",
            json!({
                "notify_ms": {"p50": percentile_ms(&self.notify_ms, 0.5), "p99": percentile_ms(&self.notify_ms, 0.99), "samples": self.notify_ms.len()},
                "poll_ms": {"p50": percentile_ms(&self.poll_ms, 0.5), "p99": percentile_ms(&self.poll_ms, 0.99), "samples": self.poll_ms.len(), "every_ms": self.poll_every.as_millis() as u64},
                "update_with_trigger_us": self.captured_us,
                "update_without_trigger_us": self.plain_us,
            }),
        ))
    }
}
