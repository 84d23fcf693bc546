//! (5) a miss with the row present: invalidate, then read (only the read is
//! timed), plain and single-flight, taking turns call by call (in a random
//! order per round) with the two floors, so the ratio to (1)+(2) compares
//! numbers from the same stretch of the run; and the correctness property
//! that a miss sends exactly one query.

use std::time::Instant;

use cacheaside::Client;

use crate::BoxResult;
use crate::fixture::{Bench, USER_ID};
use crate::measure::{Baseline, Series, TimedCall, Until, interleave, timed, trimmed_mean_us};
use crate::report::Section;

/// The misses' rows of the latency table.
pub struct Misses {
    series: Vec<Series>,
}

pub fn measure(bench: &Bench) -> BoxResult<Misses> {
    let client = bench.client();
    let plan = &bench.plan;
    let [floor_redis, floor_pg] = bench.floors.ops(client);
    let key = Client::user_key(USER_ID);
    let floors = Baseline::Paired { item: "(1)+(2)" };
    let mut plain = Series::new(
        "miss",
        "5",
        "miss: get_user_profile (cold, row present)",
        1,
        floors,
    );
    let mut sf = Series::new(
        "miss_singleflight",
        "5",
        "miss: get_user_profile_singleflight (cold)",
        1,
        floors,
    );
    let miss = |single_flight: bool| -> BoxResult<u64> {
        client.engine().invalidate(&key)?;
        let t = Instant::now();
        let p = if single_flight {
            client.get_user_profile_singleflight(USER_ID)?
        } else {
            client.get_user_profile(USER_ID)?
        };
        let took = t.elapsed().as_nanos() as u64;
        if p.map(|p| p.id) != Some(USER_ID) {
            return Err("a miss returned the wrong profile".into());
        }
        Ok(took)
    };
    let calls: [&TimedCall; 4] = [
        &|| miss(false),
        &|| miss(true),
        &|| timed(&*floor_redis.call),
        &|| timed(&*floor_pg.call),
    ];
    for _ in 0..plan.reps {
        let before = client.db().query_count();
        let lat = interleave(Until::Rounds(plan.misses), &calls)?;
        // One query per miss and one per Postgres floor call.
        let queries = client.db().query_count() - before;
        if queries != 3 * plan.misses as u64 {
            return Err(format!(
                "{} rounds of two misses and a Postgres select sent {queries} queries, expected {}",
                plan.misses,
                3 * plan.misses
            )
            .into());
        }
        let [plain_lat, sf_lat, mut redis_lat, mut pg_lat] =
            <[Vec<u64>; 4]>::try_from(lat).expect("one list of latencies per call");
        redis_lat.sort_unstable();
        pg_lat.sort_unstable();
        let floors = trimmed_mean_us(&redis_lat) + trimmed_mean_us(&pg_lat);
        plain.add_single_threaded(plain_lat, Some(floors));
        sf.add_single_threaded(sf_lat, Some(floors));
    }
    plain.finish();
    sf.finish();
    eprintln!("bench: misses done");
    Ok(Misses {
        series: vec![plain, sf],
    })
}

impl Section for Misses {
    fn latency(&self) -> &[Series] {
        &self.series
    }
}
