//! Loads from a read replica (18): a private PostgreSQL primary and a
//! streaming replica that applies every commit 500 ms late, the lab on it,
//! a writer on five users and readers on those and 200 others. Reports the
//! share of loads the replica served, the loads its fences sent to the
//! primary, and (a correctness property: it fails the run) reads older
//! than a write that had returned.
//!
//! The servers and the workload are the tests' own (`tests/common/servers.rs`,
//! `tests/common/replica.rs`), so the bench measures what
//! `tests/replica.rs` asserts. Skipped when the PostgreSQL server programs
//! (`initdb`, `pg_basebackup`) are not installed.

use std::fmt::Write as _;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::{Duration, Instant};

use cacheaside::{Client, Config};
use serde_json::{Value, json};

use crate::BoxResult;
use crate::fixture::Bench;
use crate::report::{Section, Target};

#[allow(dead_code)] // the bench uses the Postgres part only
#[path = "../../tests/common/servers.rs"]
mod servers;

#[allow(dead_code)]
#[path = "../../tests/common/replica.rs"]
mod soak;

/// What `servers` names its temp dirs with (as `tests/common`'s).
fn unique(label: &str) -> String {
    format!("{label}_{}_{:x}", std::process::id(), fastrand::u32(..))
}

/// How late the replica applies each commit.
const APPLY_DELAY: Duration = Duration::from_millis(500);
const READERS: usize = 4;

pub enum ReplicaSection {
    Skipped(String),
    Measured {
        seen: soak::Soak,
        ran: Duration,
        /// Servers started, schema installed, replica caught up.
        setup: Duration,
        /// Median `update_user_plan` (update + invalidate) in µs, with the
        /// replica configured (the fence costs a round trip) and without,
        /// taking turns on the same primary and Redis.
        write_us: (f64, f64),
        writes_timed: usize,
    },
}

pub fn measure(bench: &Bench) -> BoxResult<ReplicaSection> {
    let started = Instant::now();
    // The helpers panic with the server's output when a program is missing
    // or a server does not start: that skips the section, it is no result.
    let servers = catch_unwind(AssertUnwindSafe(|| {
        let primary = servers::PrivatePostgres::start();
        let replica = primary.start_replica(APPLY_DELAY);
        (primary, replica)
    }));
    let Ok((primary, replica)) = servers else {
        let reason = "could not start a private primary and replica (initdb, pg_basebackup)";
        eprintln!("bench: replica (18) skipped: {reason}");
        return Ok(ReplicaSection::Skipped(reason.into()));
    };
    let mut config = bench.config.clone();
    config.database_url = primary.url();
    config.replica_url = Some(replica.url());
    config.namespace = format!("{}replica:", bench.namespace);
    // Entries of users nobody writes expire often: their misses are the
    // replica's to serve.
    config.ttl = Duration::from_millis(200);
    let client = Client::open(&config)?;
    // The tables live in the private primary, which goes with the section;
    // the keys are deleted here.
    let _keys = DeleteNamespace(&client);
    client.install_schema()?;
    client.seed_demo_users()?;
    soak::add_users_and_wait_for_the_replica(&client, 1000..1200);
    client.engine().sync_relay(Duration::from_secs(30));
    let setup = started.elapsed();
    let hot: Vec<i64> = cacheaside::DEMO_USERS.iter().map(|u| u.0).collect();
    let cold: Vec<i64> = (1000..1200).collect();
    let ran = if bench.plan.quick {
        Duration::from_secs(2)
    } else {
        Duration::from_secs(8)
    };
    let seen = soak::run(&client, &hot, &cold, ran, READERS);
    if seen.stale > 0 {
        bench.fail(format!(
            "replica: {} reads older than a write that had returned",
            seen.stale
        ));
    }
    let behind = soak::cached_behind_committed(&client, &hot);
    if !behind.is_empty() {
        bench.fail(format!(
            "replica: users {behind:?} cached older than committed"
        ));
    }
    let writes_timed = if bench.plan.quick { 200 } else { 1000 };
    let write_us = write_cost(&config, &client, writes_timed)?;
    eprintln!(
        "bench: replica (18): {seen:?}, share {:.2}; update_user_plan {:.0} µs with the fence, {:.0} µs without",
        seen.replica_share(),
        write_us.0,
        write_us.1
    );
    Ok(ReplicaSection::Measured {
        seen,
        ran,
        setup,
        write_us,
        writes_timed,
    })
}

/// Median `update_user_plan` time (µs) through `client` (replica
/// configured: each write raises a fence first) and through a client
/// without the replica, `rounds` each, taking turns on the cold users.
fn write_cost(config: &Config, client: &Client, rounds: usize) -> BoxResult<(f64, f64)> {
    let mut plain_config = config.clone();
    plain_config.replica_url = None;
    plain_config.invalidation_relay = false;
    let plain = Client::open(&plain_config)?;
    let (mut with, mut without) = (Vec::with_capacity(rounds), Vec::with_capacity(rounds));
    for i in 0..rounds {
        let id = 1000 + (i % 200) as i64;
        for (who, into) in [(client, &mut with), (&plain, &mut without)] {
            let started = Instant::now();
            who.update_user_plan(id, "timed")?;
            into.push(started.elapsed().as_secs_f64() * 1e6);
        }
    }
    Ok((median(&mut with), median(&mut without)))
}

fn median(samples: &mut [f64]) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples.get(samples.len() / 2).copied().unwrap_or(f64::NAN)
}

struct DeleteNamespace<'a>(&'a Client);

impl Drop for DeleteNamespace<'_> {
    fn drop(&mut self) {
        let _ = self.0.cache().delete_namespace();
    }
}

impl Section for ReplicaSection {
    fn markdown(&self, md: &mut String) {
        let _ = writeln!(
            md,
            "\n### Replica (18): loads from a streaming replica {} ms behind, fenced by committed versions\n",
            APPLY_DELAY.as_millis()
        );
        match self {
            ReplicaSection::Skipped(why) => {
                let _ = writeln!(md, "Skipped: {why}.");
            }
            ReplicaSection::Measured {
                seen,
                ran,
                setup,
                write_us,
                writes_timed,
            } => {
                md.push_str(
                    "| writes | reads | loads from the replica | fenced (read the primary) | skipped (no fence readable) | replica share | stale reads |\n|---:|---:|---:|---:|---:|---:|---:|\n",
                );
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {} | {} | {:.0}% | {} |",
                    seen.writes,
                    seen.reads,
                    seen.replica_loads,
                    seen.fenced,
                    seen.skipped,
                    seen.replica_share() * 100.0,
                    seen.stale
                );
                let _ = writeln!(
                    md,
                    "\nOne writer on 5 users (plain update + invalidate and write-through in turn), {READERS} readers on those and 200 others (TTL 200 ms) for {:.0} s; set-up (two servers, schema, replica caught up) {:.1} s. A fenced load is one the replica answered with a row older than the key's fence (or whose fence was closed by a write of unknown version): it was read again from the primary.",
                    ran.as_secs_f64(),
                    setup.as_secs_f64()
                );
                let _ = writeln!(
                    md,
                    "\nWhat the fence costs a write: `update_user_plan` (UPDATE + invalidate) {:.0} µs median with the replica configured against {:.0} µs without ({:.2}×; {writes_timed} writes each, taking turns): the fence is one Redis round trip before the invalidation.",
                    write_us.0,
                    write_us.1,
                    write_us.0 / write_us.1
                );
            }
        }
    }

    fn targets(&self) -> Vec<Target> {
        let ReplicaSection::Measured { seen, .. } = self else {
            return Vec::new();
        };
        let share = seen.replica_share();
        vec![
            Target {
                name: "replica: share of loads the replica served (writer beside readers)".into(),
                value: format!("{:.0}%", share * 100.0),
                limit: "≥ 50%".into(),
                met: Some(share >= 0.5),
            },
            Target {
                name: "replica: reads older than a write that had returned".into(),
                value: seen.stale.to_string(),
                limit: "0".into(),
                met: Some(seen.stale == 0),
            },
        ]
    }

    fn json(&self) -> Option<(&'static str, Value)> {
        let value = match self {
            ReplicaSection::Skipped(why) => json!({ "skipped": why }),
            ReplicaSection::Measured {
                seen,
                ran,
                setup,
                write_us,
                writes_timed,
            } => json!({
                "apply_delay_ms": APPLY_DELAY.as_millis() as u64,
                "seconds": ran.as_secs_f64(),
                "setup_seconds": setup.as_secs_f64(),
                "writes": seen.writes,
                "reads": seen.reads,
                "replica_loads": seen.replica_loads,
                "fenced": seen.fenced,
                "skipped": seen.skipped,
                "replica_share": seen.replica_share(),
                "stale_reads": seen.stale,
                "update_user_plan_us": {"with_fence": write_us.0, "without": write_us.1, "writes": writes_timed},
            }),
        };
        Some(("replica", value))
    }
}
