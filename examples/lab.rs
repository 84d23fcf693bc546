//! The lab, in plain numbers: a miss, a hit, an update and the fresh read
//! after it, a 50-thread stampede on a cold key through the plain and the
//! single-flight paths, a write that bypasses the library reaching the
//! cache through the invalidation relay, and a write-behind change readable
//! at once and in Postgres once a worker has flushed it.
//!
//! ```text
//! scripts/services.sh                      # Postgres and Redis, if not running
//! cargo run --release --example lab
//! ```
//!
//! It works on its own table and namespace (`cacheaside_lab_users`,
//! `cacheaside-lab:`) and removes both when it ends.

use std::sync::Barrier;
use std::time::{Duration, Instant};

use cacheaside::{Client, Config, Result};

const TABLE: &str = "cacheaside_lab_users";
const THREADS: usize = 50;

fn main() {
    if let Err(err) = run() {
        eprintln!("lab failed: {}", err.chain());
        if err.is_timeout() || err.kind() == cacheaside::ErrorKind::Database {
            eprintln!("are Postgres and Redis running? try scripts/services.sh");
        }
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let mut config = Config::from_env();
    config.set_users_table(TABLE)?;
    config.outbox_table = "cacheaside_lab_outbox".into();
    config.set_namespace("cacheaside-lab:")?;
    config.db_pool_size = 16;
    config.cache_pool_size = 32;
    let client = Client::open(&config)?;
    println!("cacheaside lab");
    println!(
        "  postgres {}  redis {}",
        config.database_url, config.redis_url
    );
    println!(
        "  table {TABLE}, keys under {:?}\n",
        client.cache().namespace()
    );

    // A clean slate every run: the table and namespace are the lab's own.
    client.drop_schema()?;
    client.cache().delete_namespace()?;
    client.install_schema()?;
    client.seed_demo_users()?;
    // The relay's invalidations of the seeding must not land mid-demo.
    client.engine().sync_relay(Duration::from_secs(10));
    let result = walk_through(&client);
    client.drop_schema()?;
    client.cache().delete_namespace()?;
    result
}

fn walk_through(client: &Client) -> Result<()> {
    let queries = || client.db().query_count();

    println!("1. cache-aside read");
    let q = queries();
    let (profile, took) = timed(|| client.get_user_profile(1))?;
    println!(
        "   miss  get_user_profile(1)   queries +{}  {:>8.3} ms  {profile:?}",
        queries() - q,
        ms(took)
    );
    let q = queries();
    let (_, took) = timed(|| client.get_user_profile(1))?;
    println!(
        "   hit   get_user_profile(1)   queries +{}  {:>8.3} ms",
        queries() - q,
        ms(took)
    );

    // Single calls are noisy; medians over many say what each path costs.
    let q = queries();
    let mut misses = Vec::new();
    for _ in 0..200 {
        client.engine().invalidate(&Client::user_key(1))?;
        misses.push(timed(|| client.get_user_profile(1))?.1);
    }
    let miss_queries = queries() - q;
    let q = queries();
    let mut hits = Vec::new();
    for _ in 0..2_000 {
        hits.push(timed(|| client.get_user_profile(1))?.1);
    }
    let (miss, hit) = (median(&mut misses), median(&mut hits));
    println!(
        "   median of 200 misses {:.3} ms ({miss_queries} queries), of 2000 hits {:.3} ms ({} queries): hit is {:.1}x faster\n",
        ms(miss),
        ms(hit),
        queries() - q,
        miss.as_secs_f64() / hit.as_secs_f64()
    );

    println!("2. write, then read");
    let changed = client.update_user_plan(1, "enterprise")?;
    let cached = client.cache().exists(&Client::user_key(1))?;
    println!("   update_user_plan(1, \"enterprise\") -> {changed}; still cached: {cached}");
    let q = queries();
    let fresh = client.get_user_profile(1)?;
    let plan = fresh.as_ref().map_or("(none)", |p| p.plan.as_str());
    println!(
        "   get_user_profile(1)   queries +{}  plan = {plan}\n",
        queries() - q
    );

    println!("3. {THREADS} threads read one cold key at once");
    let plain = stampede(client, 2, |c| c.get_user_profile(2))?;
    println!(
        "   plain         get_user_profile               queries: {:>3}  {:>8.3} ms",
        plain.0,
        ms(plain.1)
    );
    let flight = stampede(client, 3, |c| c.get_user_profile_singleflight(3))?;
    println!(
        "   single-flight get_user_profile_singleflight  queries: {:>3}  {:>8.3} ms",
        flight.0,
        ms(flight.1)
    );
    println!(
        "   per-key state left behind: {}\n",
        client.engine().in_flight()
    );

    println!("4. a write that bypasses the library (psql, another service)");
    client.get_user_profile(4)?; // cached
    let outsider = cacheaside::Db::connect(client.engine().config())?;
    let sql = format!("UPDATE {TABLE} SET plan = 'from-psql' WHERE id = 4");
    let committed = Instant::now();
    outsider.execute(&sql, &[])?;
    let (plan, seen) = loop {
        let plan = client.get_user_profile(4)?.map(|p| p.plan);
        if plan.as_deref() == Some("from-psql") || committed.elapsed() > Duration::from_secs(5) {
            break (plan, committed.elapsed());
        }
        std::thread::sleep(Duration::from_micros(200));
    };
    println!(
        "   UPDATE ... SET plan = 'from-psql' on another connection: a reader sees {:?} {:.1} ms after the commit",
        plan.as_deref().unwrap_or("(none)"),
        ms(seen)
    );
    println!(
        "   (the trigger wrote the key to the outbox in the same transaction; the relay deleted it)"
    );
    println!("\n5. write-behind: the cache at once, Postgres in the background");
    if client.cache().is_cluster() {
        println!("   skipped: write-behind does not support Redis Cluster yet (docs/cluster.md)");
    } else {
        write_behind(client, &outsider)?;
    }
    let stats = client.engine().stats();
    println!(
        "\nengine: {} hits, {} misses, {} stale fills dropped, {} corrupt entries, {} relay invalidations, {} write-behind changes applied",
        stats.hits,
        stats.misses,
        stats.fills_dropped,
        stats.corrupt_entries,
        stats.relay_invalidations,
        stats.write_behind_applied
    );
    Ok(())
}

/// Section 5: a write-behind change is read back from the cache at once,
/// and reaches Postgres when a worker flushes it.
fn write_behind(client: &Client, outsider: &cacheaside::Db) -> Result<()> {
    let queries = || client.db().query_count();
    let in_postgres = || -> Result<String> {
        let sql = format!("SELECT plan FROM {TABLE} WHERE id = 5");
        let row = outsider.query_opt(&sql, &[])?;
        Ok(row.map_or_else(|| "(none)".into(), |r| r.get(0)))
    };
    client.get_user_profile(5)?; // cached: the enqueue reads the profile
    let seq = client
        .update_user_plan_write_behind(5, "team")?
        .unwrap_or_default();
    let q = queries();
    let seen = client.get_user_profile(5)?.map(|p| p.plan);
    println!(
        "   update_user_plan_write_behind(5, \"team\") -> seq {seq}; a reader sees {:?} (queries +{}); Postgres still has {:?}",
        seen.as_deref().unwrap_or("(none)"),
        queries() - q,
        in_postgres()?
    );
    client.start_write_behind(1)?;
    let drained = client.drain_write_behind(Duration::from_secs(10));
    client.stop_write_behind();
    drained?;
    println!(
        "   a worker wrote it (XACK after COMMIT): Postgres has {:?}, {} changes pending",
        in_postgres()?,
        client.write_behind_pending()?
    );
    Ok(())
}

/// Releases `THREADS` threads together on `user_id`'s cold key; returns the
/// Postgres queries they cost and the wall time.
fn stampede(
    client: &Client,
    user_id: i64,
    read: impl Fn(&Client) -> Result<Option<cacheaside::UserProfile>> + Sync,
) -> Result<(u64, Duration)> {
    client.engine().invalidate(&Client::user_key(user_id))?;
    let barrier = Barrier::new(THREADS);
    let before = client.db().query_count();
    let started = Instant::now();
    let results: Vec<Result<_>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS)
            .map(|_| {
                s.spawn(|| {
                    barrier.wait();
                    read(client)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("reader thread"))
            .collect()
    });
    let took = started.elapsed();
    for result in results {
        result?;
    }
    Ok((client.db().query_count() - before, took))
}

fn timed<T>(f: impl FnOnce() -> Result<T>) -> Result<(T, Duration)> {
    let started = Instant::now();
    let value = f()?;
    Ok((value, started.elapsed()))
}

fn median(samples: &mut [Duration]) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
