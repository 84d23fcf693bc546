//! Caching a table of your own: `products`. The short path, end to end:
//! capture the table's changes (with its version column), read through the
//! cache (single-flight: 50 threads on a cold key cost one query), write
//! through with versions, let a direct SQL `UPDATE` and `DELETE` reach the
//! cache through the relay, and print the stats.
//!
//! ```text
//! scripts/services.sh && cargo run --example products
//! ```
//!
//! `tests/products.rs` runs this same code on a table of its own.

use std::sync::Barrier;
use std::time::{Duration, Instant};

use cacheaside::{CacheAside, Config, Mode, Result, Row, Stats, Versioned};
use serde::{Deserialize, Serialize};

/// What the cache holds for a product: any `Serialize + DeserializeOwned`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Product {
    pub id: i64,
    pub name: String,
    pub price_cents: i64,
}

const TTL: Duration = Duration::from_secs(300);

/// The products table, cached under `product:<id>`.
pub struct Products {
    engine: CacheAside,
    select: String,
    set_price: String,
}

impl Products {
    /// Creates the table (if missing) and captures its changes: from now
    /// on a write from anywhere (psql, another service) invalidates the
    /// row's key, unless the cache already holds that version or newer.
    pub fn install(engine: &CacheAside, table: &str) -> Result<Products> {
        engine.db().batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS {table} (
                 id bigint PRIMARY KEY,
                 name text NOT NULL,
                 price_cents bigint NOT NULL,
                 version bigint NOT NULL DEFAULT 1)"
        ))?;
        engine.capture_changes(table, "product:", "id", Some("version"))?;
        Ok(Products {
            engine: engine.clone(),
            select: format!("SELECT id, name, price_cents, version FROM {table} WHERE id = $1"),
            // The capture's trigger bumps `version` on every update.
            set_price: format!(
                "UPDATE {table} SET price_cents = $2 WHERE id = $1
                 RETURNING id, name, price_cents, version"
            ),
        })
    }

    /// One product, from the cache or (once per key, however many threads
    /// ask) from Postgres; `None` when there is no such row (cached too).
    pub fn get(&self, id: i64) -> Result<Option<Product>> {
        let db = self.engine.db();
        self.engine
            .get_or_load_versioned(&key(id), TTL, Mode::SingleFlight, || {
                Ok(db.query_opt(&self.select, &[&id])?.map(versioned))
            })
    }

    /// Sets a price and caches the updated row (unless the cache already
    /// holds a newer version); `None` when there is no such product.
    pub fn set_price(&self, id: i64, cents: i64) -> Result<Option<Product>> {
        let db = self.engine.db();
        self.engine.write_through(&key(id), TTL, || {
            Ok(db
                .query_opt(&self.set_price, &[&id, &cents])?
                .map(versioned))
        })
    }
}

fn key(id: i64) -> String {
    format!("product:{id}")
}

/// A row with its version, which orders it against other writes.
fn versioned(row: Row) -> Versioned<Product> {
    let product = Product {
        id: row.get(0),
        name: row.get(1),
        price_cents: row.get(2),
    };
    Versioned::new(product, row.get::<_, i64>(3) as u64)
}

/// What one run saw.
#[derive(Debug)]
pub struct Report {
    /// Queries the 50 cold readers cost together.
    pub cold_queries: u64,
    /// Queries the hit after them cost.
    pub hit_queries: u64,
    /// What a reader saw after the write-through, and what it cost.
    pub after_write_through: (Option<Product>, u64),
    /// What a reader saw after a direct SQL `UPDATE`, and how long after
    /// the commit.
    pub after_update: (Option<Product>, Duration),
    /// What a reader saw after a direct SQL `DELETE`.
    pub after_delete: Option<Product>,
    pub stats: Stats,
}

/// The whole path on `table`, printing as it goes.
pub fn run(engine: &CacheAside, table: &str) -> Result<Report> {
    let products = Products::install(engine, table)?;
    let db = engine.db();
    db.execute(
        &format!("INSERT INTO {table} (id, name, price_cents) VALUES (1, 'kettle', 2500)"),
        &[],
    )?;
    // The insert was captured: let the relay apply it before measuring.
    assert!(engine.sync_relay(Duration::from_secs(5)), "the relay runs");

    let threads = 50;
    let barrier = Barrier::new(threads);
    let before = db.query_count();
    let cold: Vec<Option<Product>> = std::thread::scope(|s| {
        let readers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    barrier.wait();
                    products.get(1)
                })
            })
            .collect();
        readers
            .into_iter()
            .map(|r| r.join().unwrap())
            .collect::<Result<_>>()
    })?;
    let cold_queries = db.query_count() - before;
    println!(
        "{threads} threads, cold key:   queries +{cold_queries}  {:?}",
        cold[0]
    );

    let before = db.query_count();
    let hit = products.get(1)?;
    let hit_queries = db.query_count() - before;
    println!("hit:                   queries +{hit_queries}  {hit:?}");

    let written = products.set_price(1, 1999)?;
    let before = db.query_count();
    let read = products.get(1)?;
    let after_write_through = (read.clone(), db.query_count() - before);
    println!(
        "write-through 1999:    {written:?}; a read: queries +{}",
        after_write_through.1
    );

    // Writes that bypass the library: the trigger records the key, the
    // relay applies it.
    db.execute(
        &format!("UPDATE {table} SET name = 'teapot' WHERE id = 1"),
        &[],
    )?;
    let committed = Instant::now();
    let after_update = loop {
        let seen = products.get(1)?;
        let waited = committed.elapsed();
        if seen.as_ref().is_some_and(|p| p.name == "teapot") || waited > Duration::from_secs(1) {
            break (seen, waited);
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    println!(
        "UPDATE from SQL:       a reader sees {:?} after {:.1} ms",
        after_update.0,
        after_update.1.as_secs_f64() * 1e3
    );
    db.execute(&format!("DELETE FROM {table} WHERE id = 1"), &[])?;
    assert!(
        engine.sync_relay(Duration::from_secs(1)),
        "the relay caught up"
    );
    let after_delete = products.get(1)?;
    println!("DELETE from SQL:       a reader sees {after_delete:?}");

    let stats = engine.stats();
    println!(
        "stats: {} hits, {} misses, {} relay invalidations, {} fills dropped",
        stats.hits, stats.misses, stats.relay_invalidations, stats.fills_dropped
    );
    Ok(Report {
        cold_queries,
        hit_queries,
        after_write_through,
        after_update,
        after_delete,
        stats,
    })
}

fn main() -> Result<()> {
    let config = Config::builder()
        .urls_from_env() // DATABASE_URL, REDIS_URL
        .namespace("products-example:") // every Redis key starts with it
        .build()?; // validated
    let engine = CacheAside::open(&config)?;
    let table = "cacheaside_example_products";
    let report = run(&engine, table);
    // A demo: leave no rows and no keys behind (the outbox, shared by
    // every captured table, stays, as a migration would leave it).
    engine.stop_relay();
    engine
        .db()
        .batch_execute(&format!("DROP TABLE IF EXISTS {table}"))?;
    engine.cache().delete_namespace()?;
    let report = report?;
    assert_eq!(report.cold_queries, 1, "50 cold readers, one query");
    assert_eq!(report.hit_queries, 0);
    Ok(())
}
