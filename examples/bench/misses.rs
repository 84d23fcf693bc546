//! (5) a miss with the row present: invalidate, then read (only the read is
//! timed), plain and single-flight, taking turns call by call (in a random
//! order per round) with the two floors and the naive miss (5n: a
//! hand-written `GET`, select, `SETEX`, no lease), so the ratios to
//! (1)+(2) and to (5n) compare numbers from the same stretch of the run;
//! and the correctness property that a miss sends exactly one query.

use std::time::{Duration, Instant};

use cacheaside::{Client, UserProfile};

use crate::BoxResult;
use crate::fixture::{Bench, USER_ID, check_profile};
use crate::measure::{
    Baseline, Series, Spread, TimedCall, Until, interleave, timed, trimmed_mean_us,
};
use crate::report::{Section, Target};

/// The misses' rows of the latency table.
pub struct Misses {
    series: Vec<Series>,
    /// Per repetition: the plain miss's mean latency over the naive miss's.
    over_naive: Vec<f64>,
}

/// The naive cache-aside miss, written by hand as an application would
/// without the library: `GET` (nil), the select, `SETEX` of the row's JSON.
/// No lease, no single-flight, no version: what the library's miss is
/// measured against.
fn naive_miss(client: &Client, key: &str, select: &str) -> BoxResult<u64> {
    client
        .cache()
        .with_connection(|c| redis::cmd("DEL").arg(key).query::<()>(c))?;
    let t = Instant::now();
    let cached: Option<Vec<u8>> = client
        .cache()
        .with_connection(|c| redis::cmd("GET").arg(key).query(c))?;
    if cached.is_some() {
        return Err("the naive miss hit".into());
    }
    let row = client.db().query_opt(select, &[&USER_ID])?;
    let profile = row.map(|r| UserProfile {
        id: r.get(0),
        name: r.get(1),
        email: r.get(2),
        plan: r.get(3),
        version: r.get(4),
    });
    let json = serde_json::to_vec(&profile)?;
    client.cache().with_connection(|c| {
        redis::cmd("SETEX")
            .arg(key)
            .arg(NAIVE_TTL.as_secs())
            .arg(&json)
            .query::<()>(c)
    })?;
    let took = t.elapsed().as_nanos() as u64;
    check_profile(profile)?;
    Ok(took)
}

const NAIVE_TTL: Duration = Duration::from_secs(600);

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
    let mut naive = Series::new(
        "naive_miss",
        "5n",
        "naive miss: GET + select + SETEX (hand-written, no lease)",
        1,
        floors,
    );
    let naive_key = client.cache().redis_key("naive:profile");
    let select = format!(
        "SELECT id, name, email, plan, version FROM {} WHERE id = $1",
        client.users_table()
    );
    let mut over_naive = Vec::new();
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
    let calls: [&TimedCall; 5] = [
        &|| miss(false),
        &|| miss(true),
        &|| timed(&*floor_redis.call),
        &|| timed(&*floor_pg.call),
        &|| naive_miss(client, &naive_key, &select),
    ];
    for _ in 0..plan.reps {
        let before = client.db().query_count();
        let lat = interleave(Until::Rounds(plan.misses), &calls)?;
        // One query per miss (ours and the naive one) and one per Postgres
        // floor call.
        let queries = client.db().query_count() - before;
        if queries != 4 * plan.misses as u64 {
            return Err(format!(
                "{} rounds of three misses and a Postgres select sent {queries} queries, expected {}",
                plan.misses,
                4 * plan.misses
            )
            .into());
        }
        let [
            mut plain_lat,
            sf_lat,
            mut redis_lat,
            mut pg_lat,
            mut naive_lat,
        ] = <[Vec<u64>; 5]>::try_from(lat).expect("one list of latencies per call");
        redis_lat.sort_unstable();
        pg_lat.sort_unstable();
        plain_lat.sort_unstable();
        naive_lat.sort_unstable();
        over_naive.push(trimmed_mean_us(&plain_lat) / trimmed_mean_us(&naive_lat));
        let floors = trimmed_mean_us(&redis_lat) + trimmed_mean_us(&pg_lat);
        plain.add_single_threaded(plain_lat, Some(floors));
        sf.add_single_threaded(sf_lat, Some(floors));
        naive.add_single_threaded(naive_lat, Some(floors));
    }
    plain.finish();
    sf.finish();
    naive.finish();
    client
        .cache()
        .with_connection(|c| redis::cmd("DEL").arg(&naive_key).query::<()>(c))?;
    eprintln!("bench: misses done");
    Ok(Misses {
        series: vec![plain, sf, naive],
        over_naive,
    })
}

impl Section for Misses {
    fn latency(&self) -> &[Series] {
        &self.series
    }

    fn targets(&self) -> Vec<Target> {
        let ratio = (!self.over_naive.is_empty())
            .then(|| Spread::of(self.over_naive.iter().copied()).median);
        vec![Target::at_most(
            "miss (5, plain) latency vs the naive miss (5n), 1 thread",
            ratio,
            1.2,
        )]
    }
}
