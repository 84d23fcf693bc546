//! The inspector: cached entries of captured, versioned tables against
//! their rows in Postgres.

mod common;

use std::time::Duration;

use cacheaside::Client;
use common::Fixture;
use common::servers::PrivateCluster;

/// A raw entry as the engine writes it, with `version`, expiring in a
/// minute.
fn raw_entry(kind: &str, version: u64, body: &str) -> Vec<u8> {
    let expires = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
        + 60_000;
    format!("ca1 {kind} {version} 0 {expires}\n{body}").into_bytes()
}

/// Reads every demo user once, so all five are cached at their versions.
fn cache_all(fx: &Fixture) {
    for (id, ..) in cacheaside::DEMO_USERS {
        fx.client.get_user_profile(id).unwrap().unwrap();
    }
}

#[test]
fn a_stale_entry_planted_behind_the_leases_is_found_with_its_age() {
    finds_planted_stale_entries(&Fixture::new("inspect_stale"));
}

/// The same on a Redis Cluster: the sample comes from every master, and
/// the entries are read per key (they span slots).
#[test]
fn a_stale_entry_is_found_on_a_redis_cluster() {
    let cluster = PrivateCluster::start();
    let mut config = common::test_config("inspect_cluster");
    config.redis_url = cluster.url();
    finds_planted_stale_entries(&Fixture::with(config));
}

/// Plants stale entries behind the leases; the inspector finds exactly
/// them, with their age.
fn finds_planted_stale_entries(fx: &Fixture) {
    cache_all(fx);
    // Row 3 moves to version 2 behind the library's back, and row 5 goes;
    // the relay invalidates both.
    fx.set_plan_directly(3, "team");
    fx.client
        .db()
        .execute(
            &format!("DELETE FROM {} WHERE id = 5", fx.config.users_table),
            &[],
        )
        .unwrap();
    fx.settle();
    // A fill that skipped the leases puts the old rows back: version 1 of
    // user 3, and user 5, who is gone.
    let old = r#"{"id":3,"name":"Grace Hopper","email":"grace@example.com","plan":"enterprise","version":1}"#;
    fx.put_raw(&Client::user_key(3), &raw_entry("v", 1, old));
    fx.put_raw(&Client::user_key(5), &raw_entry("v", 1, r#"{"id":5}"#));
    // And an absence cached for user 4, who exists.
    fx.put_raw(&Client::user_key(4), &raw_entry("a", 0, ""));
    std::thread::sleep(Duration::from_millis(50)); // an age to measure

    let report = fx.client.engine().inspect(100).unwrap();
    assert_eq!(report.tables, std::slice::from_ref(&fx.config.users_table));
    assert_eq!(report.inspected, 5, "{report:?}");
    assert_eq!(report.skipped, 0, "{report:?}");
    let mut stale = report.stale.clone();
    stale.sort_by(|a, b| a.key.cmp(&b.key));
    let found: Vec<(&str, Option<u64>, Option<i64>)> = stale
        .iter()
        .map(|s| (s.key.as_str(), s.cached_version, s.row_version))
        .collect();
    assert_eq!(
        found,
        [
            ("user:3", Some(1), Some(2)),
            ("user:4", None, Some(1)),
            ("user:5", Some(1), None),
        ]
    );
    // Stale since the update (and the delete) committed: at least the
    // 50 ms slept, and less than the test has run.
    for s in [&stale[0], &stale[2]] {
        let age = s.stale_for.expect("the outbox holds the change");
        assert!(
            age >= Duration::from_millis(50) && age < Duration::from_secs(60),
            "{s:?}"
        );
        assert!(s.expires_in > Duration::from_secs(50), "{s:?}");
    }
    // Cost: one catalog query and one for the table; a SCAN or more, the
    // MGET and the confirmation.
    assert_eq!(report.postgres_queries, 2);
    assert!(report.redis_round_trips >= 3, "{report:?}");
    let stats = fx.client.engine().stats();
    assert_eq!((stats.inspected, stats.inspect_stale), (5, 3));
}

#[test]
fn a_consistent_cache_reports_nothing() {
    let fx = Fixture::new("inspect_clean");
    cache_all(&fx);
    // Writes through every synchronous path, then the relay's catch-up.
    fx.client.update_user_plan(1, "team").unwrap();
    fx.client.update_user_plan_write_through(2, "team").unwrap();
    fx.set_plan_directly(3, "team");
    fx.settle();
    cache_all(&fx);
    // An entry of an unversioned read is skipped, not judged.
    fx.put_raw(&Client::user_key(4), &raw_entry("v", 0, r#"{"id":4}"#));
    // And a key that is no user's is not sampled at all.
    fx.put_raw("other:1", &raw_entry("v", 1, "1"));

    let report = fx.client.engine().inspect(100).unwrap();
    assert_eq!(report.stale, []);
    assert_eq!((report.inspected, report.skipped), (4, 1), "{report:?}");
    let stats = fx.client.engine().stats();
    assert_eq!((stats.inspected, stats.inspect_stale), (4, 0));
}

#[test]
fn the_background_inspector_counts_what_it_finds() {
    let mut config = common::test_config("inspect_background");
    config.inspect_every = Duration::from_millis(20);
    let fx = Fixture::with(config);
    cache_all(&fx);
    fx.set_plan_directly(2, "team");
    fx.settle();
    fx.put_raw(&Client::user_key(2), &raw_entry("v", 1, r#"{"id":2}"#));
    let deadline = std::time::Instant::now() + common::PATIENCE;
    while fx.client.engine().stats().inspect_stale == 0 {
        assert!(std::time::Instant::now() < deadline, "never inspected");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(fx.client.engine().stats().inspected >= 4);
}

#[test]
fn a_sample_out_of_range_is_refused() {
    let fx = Fixture::new("inspect_range");
    for sample in [0, 10_001] {
        let err = fx.client.engine().inspect(sample).unwrap_err();
        assert_eq!(err.kind(), cacheaside::ErrorKind::InvalidArgument);
    }
}
