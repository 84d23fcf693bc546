//! The seed's write-behind exercise (`shared/seeds/003`), done durably.
//!
//! ```text
//! cargo run --release --example write_behind
//! ```
//!
//! 1. The seed's two profiles, `user:1001` Alice (30) and `user:1002` Bob
//!    (25), in Postgres and read through the cache.
//! 2. The seed's update, Alice's age to 31, written behind: readers see it
//!    at once, Postgres does not have it yet.
//! 3. A worker applies it.
//! 4. What the seed's version loses: its worker `RPOP`s the update from the
//!    list and dies before the database write, and the update is gone. Here
//!    a worker process is SIGKILLed in the middle of its batch (inside the
//!    transaction); a worker started afterwards claims the change and
//!    applies it: nothing is lost.
//!
//! It works on its own table and namespace (`cacheaside_demo_profiles`,
//! `cacheaside-write-behind:`) and removes both when it ends.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use cacheaside::{CacheAside, Config, Error, Result, Transaction, WriteBehindChange};
use serde::{Deserialize, Serialize};

const TABLE: &str = "cacheaside_demo_profiles";
const TTL: Duration = Duration::from_secs(60);

/// A profile as the seed's hash held it (`{"name":"Alice","age":"30"}`),
/// with the age as a number.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Profile {
    name: String,
    age: i32,
}

fn config() -> Result<Config> {
    let mut config = Config::from_env();
    config.set_namespace("cacheaside-write-behind:")?;
    // A dead worker's changes move to another worker after a second.
    config.write_behind_claim_after = Duration::from_secs(1);
    Ok(config)
}

/// The write a worker runs for `user:*` keys: an upsert that only moves
/// forward (`seq` is the change's sequence number), so a change delivered
/// twice, or after a newer one, changes nothing.
fn apply(tx: &mut Transaction<'_>, changes: &[WriteBehindChange<'_>]) -> Result<()> {
    let sql = format!(
        "INSERT INTO {TABLE} (id, name, age, seq) VALUES ($1, $2, $3, $4)
         ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name, age = EXCLUDED.age, seq = EXCLUDED.seq
         WHERE {TABLE}.seq < EXCLUDED.seq"
    );
    for change in changes {
        let id: i64 = change.key["user:".len()..]
            .parse()
            .map_err(Error::invalid_argument)?;
        let p: Profile = serde_json::from_slice(change.json).map_err(Error::invalid_argument)?;
        tx.execute(&sql, &[&id, &p.name, &p.age, &(change.seq as i64)])?;
    }
    Ok(())
}

fn read(engine: &CacheAside, id: i64) -> Result<Option<Profile>> {
    let sql = format!("SELECT name, age FROM {TABLE} WHERE id = $1");
    engine.get_or_load(&format!("user:{id}"), TTL, || {
        let row = engine.db().query_opt(&sql, &[&id])?;
        Ok(row.map(|r| Profile {
            name: r.get(0),
            age: r.get(1),
        }))
    })
}

/// Alice's age as Postgres has it, read around the cache.
fn age_in_postgres(engine: &CacheAside) -> Result<i32> {
    let row = engine
        .db()
        .query_opt(&format!("SELECT age FROM {TABLE} WHERE id = 1001"), &[])?;
    Ok(row.map_or(-1, |r| r.get(0)))
}

fn main() {
    let worker_mode = std::env::args().nth(1).as_deref() == Some("--worker-that-dies");
    let outcome = if worker_mode { dying_worker() } else { run() };
    if let Err(err) = outcome {
        eprintln!("write_behind failed: {}", err.chain());
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let engine = CacheAside::open(&config()?)?;
    engine.register_write_behind("user:", apply)?;
    engine.cache().delete_namespace()?;
    engine.db().batch_execute(&format!(
        "DROP TABLE IF EXISTS {TABLE};
         CREATE TABLE {TABLE} (id bigint PRIMARY KEY, name text NOT NULL, age int NOT NULL,
                               seq bigint NOT NULL DEFAULT 0);
         INSERT INTO {TABLE} (id, name, age) VALUES (1001, 'Alice', 30), (1002, 'Bob', 25)"
    ))?;
    let result = walk_through(&engine);
    engine.stop_write_behind();
    engine
        .db()
        .batch_execute(&format!("DROP TABLE IF EXISTS {TABLE}"))?;
    engine.cache().delete_namespace()?;
    result
}

fn walk_through(engine: &CacheAside) -> Result<()> {
    println!("1. the seed's profiles, read through the cache");
    println!("   user:1001 {:?}", read(engine, 1001)?);
    println!("   user:1002 {:?}", read(engine, 1002)?);

    println!("\n2. the seed's update, written behind: Alice's age to 31");
    let seq = engine.write_behind(
        "user:1001",
        TTL,
        &Profile {
            name: "Alice".into(),
            age: 31,
        },
    )?;
    println!("   enqueued as change {seq} (one Redis script: cache + stream)");
    println!("   read now:          {:?}", read(engine, 1001)?);
    println!(
        "   Postgres now:      age {}   (pending: {})",
        age_in_postgres(engine)?,
        engine.write_behind_pending()?
    );

    println!("\n3. a worker applies it");
    engine.start_write_behind(1)?;
    engine.drain_write_behind(Duration::from_secs(10))?;
    engine.stop_write_behind();
    println!(
        "   Postgres now:      age {}   (pending: {})",
        age_in_postgres(engine)?,
        engine.write_behind_pending()?
    );

    println!("\n4a. the seed's list queue: its worker dies between RPOP and the write");
    let queue = format!("{}:write_queue", engine.cache().redis_key("seed"));
    let popped: Option<String> = engine.cache().with_connection(|c| {
        redis::cmd("LPUSH")
            .arg(&queue)
            .arg(r#"update:user:1001:{"age":"32"}"#)
            .query::<i64>(c)?;
        redis::cmd("RPOP").arg(&queue).query(c)
    })?;
    println!("   RPOP -> {popped:?}, then the worker dies");
    let left: i64 = engine
        .cache()
        .with_connection(|c| redis::cmd("LLEN").arg(&queue).query(c))?;
    println!(
        "   queue length {left}, Postgres age {}: the update is gone",
        age_in_postgres(engine)?
    );

    println!("\n4b. here: a worker process is killed in the middle of its batch");
    let seq = engine.write_behind(
        "user:1001",
        TTL,
        &Profile {
            name: "Alice".into(),
            age: 32,
        },
    )?;
    println!("   enqueued change {seq}: Alice's age to 32");
    let mut child = Command::new(std::env::current_exe().map_err(Error::loader)?)
        .arg("--worker-that-dies")
        .stdout(Stdio::piped())
        .spawn()
        .map_err(Error::loader)?;
    let stdout = child.stdout.take().expect("piped");
    let mut lines = BufReader::new(stdout).lines();
    match lines.next() {
        Some(Ok(line)) => println!("   worker process: {line}"),
        _ => return Err(Error::invalid_argument("the worker process said nothing")),
    }
    child.kill().map_err(Error::loader)?; // SIGKILL, mid-transaction
    let status = child.wait().map_err(Error::loader)?;
    println!("   worker process killed ({status})");
    println!(
        "   Postgres age {} (its transaction rolled back), pending {}, read {:?}",
        age_in_postgres(engine)?,
        engine.write_behind_pending()?,
        read(engine, 1001)?
    );
    engine.start_write_behind(1)?;
    engine.drain_write_behind(Duration::from_secs(10))?;
    let stats = engine.stats();
    println!(
        "   a worker here claimed {} change(s) after the claim timeout; Postgres age {}: nothing lost",
        stats.write_behind_claimed,
        age_in_postgres(engine)?
    );
    Ok(())
}

/// The worker process of step 4b: its applier announces the batch and then
/// hangs inside the transaction until the process is killed.
fn dying_worker() -> Result<()> {
    let engine = CacheAside::open(&config()?)?;
    engine.register_write_behind("user:", |tx, changes| {
        apply(tx, changes)?;
        let mut out = std::io::stdout();
        let _ = writeln!(
            out,
            "writing {} change(s), not yet committed",
            changes.len()
        );
        let _ = out.flush();
        std::thread::sleep(Duration::from_secs(60));
        Ok(())
    })?;
    engine.start_write_behind(1)?;
    std::thread::sleep(Duration::from_secs(60));
    Ok(())
}
