//! The engine's counters and histograms in Prometheus: install the
//! exporter's recorder, open an engine, read a key twice (a miss, then a
//! hit), and print the scrape an HTTP endpoint would serve.
//!
//! ```text
//! cargo run --example metrics --features metrics
//! ```
//!
//! The recorder must be installed before the engine opens: the engine takes
//! its metric handles then. In a service, serve `handle.render()` on your
//! `/metrics` endpoint (or enable the exporter's `http-listener` feature).

use std::time::Duration;

use cacheaside::{CacheAside, Config};
use metrics_exporter_prometheus::PrometheusBuilder;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let handle = PrometheusBuilder::new()
        // Histograms as buckets, in seconds: a hit-path load is a
        // millisecond, a slow one a second.
        .set_buckets(&[0.001, 0.005, 0.025, 0.1, 0.5, 2.5])?
        .install_recorder()?;

    let mut config = Config::from_env();
    // A namespace of this run's own, removed at the end.
    config.namespace = format!("metrics_example_{}:", std::process::id());
    config.invalidation_relay = false;
    let engine = CacheAside::open(&config)?;
    let db = engine.db().clone();
    for _ in 0..2 {
        let n: Option<i64> = engine.get_or_load("answer", Duration::from_secs(60), || {
            Ok(db.query_opt("SELECT 42::bigint", &[])?.map(|r| r.get(0)))
        })?;
        assert_eq!(n, Some(42));
    }
    engine.cache().delete_namespace()?;

    let scrape = handle.render();
    print!("{scrape}");
    // The example doubles as a check (CI runs it): the miss and the hit are
    // in the scrape, with the load's histogram.
    for line in [
        "cacheaside_misses_total{namespace=",
        "cacheaside_hits_total{namespace=",
        "cacheaside_load_seconds_count{namespace=",
    ] {
        if !scrape
            .lines()
            .any(|l| l.starts_with(line) && l.ends_with(" 1"))
        {
            return Err(format!("the scrape has no `{line}...` 1").into());
        }
    }
    Ok(())
}
