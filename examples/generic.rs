//! The generic engine on something other than users: a per-customer revenue
//! report (an aggregate query) cached with cache-aside, single-flight and
//! invalidation on write.
//!
//! ```text
//! cargo run --release --example generic
//! ```

use std::time::Duration;

use cacheaside::{CacheAside, Config, Result};
use serde::{Deserialize, Serialize};

const TABLE: &str = "cacheaside_demo_orders";

/// What the report caches: any `Serialize + DeserializeOwned` type works.
#[derive(Debug, Serialize, Deserialize)]
struct Revenue {
    customer: String,
    orders: i64,
    total_cents: i64,
}

fn revenue(engine: &CacheAside, customer: &str) -> Result<Option<Revenue>> {
    let sql = format!(
        "SELECT count(*), sum(total_cents)::bigint FROM {TABLE} WHERE customer = $1 HAVING count(*) > 0"
    );
    engine.get_or_load(
        &format!("revenue:{customer}"),
        Duration::from_secs(300),
        || {
            let row = engine.db().query_opt(&sql, &[&customer])?;
            Ok(row.map(|r| Revenue {
                customer: customer.to_owned(),
                orders: r.get(0),
                total_cents: r.get(1),
            }))
        },
    )
}

fn add_order(engine: &CacheAside, customer: &str, cents: i64) -> Result<()> {
    let sql = format!("INSERT INTO {TABLE} (customer, total_cents) VALUES ($1, $2)");
    engine.db().execute(&sql, &[&customer, &cents])?;
    // Write first, then invalidate: a report being computed right now loses
    // its lease and cannot cache the pre-insert total.
    engine.invalidate(&format!("revenue:{customer}"))
}

fn main() -> Result<()> {
    let mut config = Config::from_env();
    config.set_namespace("cacheaside-generic:")?;
    let engine = CacheAside::open(&config)?;
    engine.db().batch_execute(&format!(
        "DROP TABLE IF EXISTS {TABLE};
         CREATE TABLE {TABLE} (id bigserial PRIMARY KEY, customer text NOT NULL, total_cents bigint NOT NULL)"
    ))?;
    add_order(&engine, "acme", 12_50)?;
    add_order(&engine, "acme", 7_25)?;

    let q = engine.db().query_count();
    println!(
        "{:?}  (queries +{})",
        revenue(&engine, "acme")?,
        engine.db().query_count() - q
    );
    let q = engine.db().query_count();
    println!(
        "{:?}  (queries +{}: a hit)",
        revenue(&engine, "acme")?,
        engine.db().query_count() - q
    );
    add_order(&engine, "acme", 1_00)?;
    println!("{:?}  (after a new order)", revenue(&engine, "acme")?);
    println!(
        "{:?}  (no orders: cached as absent)",
        revenue(&engine, "nobody")?
    );

    engine.db().batch_execute(&format!("DROP TABLE {TABLE}"))?;
    engine.cache().delete_namespace()?;
    Ok(())
}
