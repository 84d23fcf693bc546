//! (3) `get_user_profile`, (4) `get_user_profile_singleflight` and (7) the
//! C ABI's `cacheaside_get_user_profile` on a cache hit, side by side with
//! the floors (1) and (2), at 1 and 50 threads; and the correctness property
//! that a hit never reaches Postgres.

use std::path::{Path, PathBuf};

use crate::c_abi::CAbi;
use crate::fixture::{Bench, USER_ID, check_profile};
use crate::measure::{self, Baseline, Operation, Series};
use crate::report::{Section, Target};
use crate::{BoxResult, plots};

/// The hits' rows of the latency table, the floors' included.
pub struct Hits {
    series: Vec<Series>,
}

pub fn measure(bench: &Bench) -> BoxResult<Hits> {
    let client = bench.client();
    // (7): a second client, opened and read through the C ABI.
    let c_abi = CAbi::open(&bench.config)?;
    let [floor_redis, floor_pg] = bench.floors.ops(client);
    let floor = Baseline::Series {
        id: "floor_redis",
        item: "(1)",
    };
    let ops = [
        floor_redis,
        floor_pg,
        Operation {
            id: "hit",
            item: "3",
            label: "get_user_profile (hit)",
            baseline: floor,
            call: Box::new(|| check_profile(client.get_user_profile(USER_ID)?)),
        },
        Operation {
            id: "hit_singleflight",
            item: "4",
            label: "get_user_profile_singleflight (hit)",
            baseline: floor,
            call: Box::new(|| check_profile(client.get_user_profile_singleflight(USER_ID)?)),
        },
        Operation {
            id: "hit_c_abi",
            item: "7",
            label: "C ABI cacheaside_get_user_profile (hit)",
            baseline: Baseline::Series {
                id: "hit",
                item: "(3)",
            },
            call: Box::new(|| match c_abi.get_user_profile_id(USER_ID)? {
                Some(USER_ID) => Ok(()),
                other => Err(format!("C ABI read returned user {other:?}").into()),
            }),
        },
    ];

    // A hit never reaches Postgres: a correctness property, checked here.
    let queries_before = client.db().query_count();
    for _ in 0..1000 {
        check_profile(client.get_user_profile(USER_ID)?)?;
        check_profile(client.get_user_profile_singleflight(USER_ID)?)?;
    }
    if client.db().query_count() != queries_before {
        return Err("cache hits sent Postgres queries".into());
    }
    let mut series = Vec::new();
    for threads in [1, 50] {
        // The C ABI has no pool-size setters, so its client has the
        // library's default 16 Redis connections: at 50 threads it would be
        // measured against a pool a quarter the size of the Rust client's.
        // Its target is single-threaded; it runs at 1 thread only.
        let active: Vec<&Operation> = ops
            .iter()
            .filter(|op| threads == 1 || op.id != "hit_c_abi")
            .collect();
        series.extend(measure::side_by_side(&active, threads, &bench.plan)?);
        eprintln!("bench: hits at {threads} thread(s) done");
    }
    Ok(Hits { series })
}

impl Section for Hits {
    fn latency(&self) -> &[Series] {
        &self.series
    }

    fn targets(&self) -> Vec<Target> {
        let ratio = |id, threads| measure::median_ratio(&self.series, id, threads);
        vec![
            Target::at_most(
                "hit (3) latency vs floor (1), 1 thread",
                ratio("hit", 1),
                1.10,
            ),
            Target::at_least(
                "hit (3) throughput vs floor (1), 50 threads",
                ratio("hit", 50),
                0.90,
            ),
            Target::at_most(
                "single-flight hit (4) latency vs floor (1), 1 thread",
                ratio("hit_singleflight", 1),
                1.15,
            ),
            Target::at_most(
                "C ABI hit (7) latency vs Rust hit (3), 1 thread",
                ratio("hit_c_abi", 1),
                1.10,
            ),
        ]
    }

    fn plot(&self, dir: &Path) -> BoxResult<Vec<PathBuf>> {
        let path = dir.join("bench-latency.png");
        plots::latency(&path, &self.series)?;
        Ok(vec![path])
    }
}
