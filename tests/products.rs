//! The README's short path, run: `examples/products.rs` (the same code) on
//! a products table, outbox and namespace of this test's own.

mod common;

#[allow(dead_code)] // its `main` is the example's
#[path = "../examples/products.rs"]
mod products;

use cacheaside::{CacheAside, Client};
use products::Product;

#[test]
fn the_products_example_caches_a_table_of_your_own() {
    let config = common::test_config("products");
    let table = format!("{}_products", config.users_table);
    let engine = CacheAside::open(&config).expect("open (are the services up?)");
    let report = products::run(&engine, &table);
    // Leave nothing behind: the table, the outbox and its functions (the
    // lab's drop_schema drops the outbox of its config), the keys.
    engine.stop_relay();
    engine
        .db()
        .batch_execute(&format!("DROP TABLE IF EXISTS {table}"))
        .unwrap();
    Client::open(&config).unwrap().drop_schema().unwrap();
    engine.cache().delete_namespace().unwrap();

    let report = report.unwrap();
    assert_eq!(report.cold_queries, 1, "50 cold readers, one query");
    assert_eq!(report.hit_queries, 0);
    let cheaper = Product {
        id: 1,
        name: "kettle".into(),
        price_cents: 1999,
    };
    assert_eq!(report.after_write_through, (Some(cheaper), 0));
    let (seen, after) = report.after_update;
    assert_eq!(
        seen.map(|p| p.name).as_deref(),
        Some("teapot"),
        "after {after:?}"
    );
    assert!(after < std::time::Duration::from_secs(1), "{after:?}");
    assert_eq!(report.after_delete, None);
    assert!(report.stats.relay_invalidations >= 2, "{:?}", report.stats);
}
