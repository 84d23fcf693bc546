//! The operator's command, `cacheaside`, run as a process against the
//! shared servers, each test on its own table, outbox and namespace.
//! (`cargo test --features cli,test-hooks --test cli`.)
#![cfg(feature = "cli")]

mod common;

use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use cacheaside::Client;
use common::{Fixture, PATIENCE};
use serde_json::Value;

/// Runs the command on the fixture's namespace and outbox, with `stdin`.
fn run_with(fx: &Fixture, args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_cacheaside"))
        .args(args)
        .env("CACHEASIDE_NAMESPACE", &fx.config.namespace)
        .env("CACHEASIDE_OUTBOX", &fx.config.outbox_table)
        .env("DATABASE_URL", &fx.config.database_url)
        .env("REDIS_URL", &fx.config.redis_url)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run cacheaside");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn run(fx: &Fixture, args: &[&str]) -> Output {
    run_with(fx, args, "")
}

/// Runs with `--json`, expects `status`, and parses the output.
fn json(fx: &Fixture, args: &[&str], status: i32) -> Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let out = run(fx, &all);
    assert_eq!(out.status.code(), Some(status), "{}", describe(&out));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", describe(&out)))
}

fn describe(out: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn cache_all(fx: &Fixture) {
    for (id, ..) in cacheaside::DEMO_USERS {
        fx.client.get_user_profile(id).unwrap().unwrap();
    }
}

#[test]
fn stats_counts_the_namespaces_entries() {
    let fx = Fixture::new("cli_stats");
    cache_all(&fx);
    let v = json(&fx, &["stats"], 0);
    assert_eq!(v["namespace"], fx.config.namespace.as_str());
    assert_eq!(v["cache_entries"], 5);
    assert_eq!(
        (v["write_behind_pending"].clone(), v["dead_letters"].clone()),
        (0.into(), 0.into())
    );
    let out = run(&fx, &["stats"]);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(stdout(&out).contains("cache entries"), "{}", describe(&out));
}

#[test]
fn get_shows_the_entry_and_its_side_keys() {
    let fx = Fixture::new("cli_get");
    fx.client.get_user_profile(1).unwrap().unwrap();
    let v = json(&fx, &["get", "user:1"], 0);
    assert_eq!(v["entry"]["kind"], "value");
    assert_eq!(v["entry"]["version"], 1);
    assert!(
        v["entry"]["value"]
            .as_str()
            .unwrap()
            .contains("Ada Lovelace")
    );
    let ttl = v["entry"]["redis_ttl_ms"].as_i64().unwrap();
    assert!(ttl > 0 && ttl <= 60_000, "{v}");
    assert_eq!(v["side_keys"]["lease"], Value::Null);
    assert_eq!(v["side_keys"]["lock"], Value::Null);
    let text = stdout(&run(&fx, &["get", "user:1"]));
    assert!(text.contains("version") && text.contains("lease"), "{text}");
    assert!(stdout(&run(&fx, &["get", "user:9"])).contains("not cached"));
    // A key no cache call accepts is an error, not a lookup.
    let out = run(&fx, &["get", "a{b"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
}

#[test]
fn inspect_reports_stale_entries_and_exits_3() {
    let fx = Fixture::new("cli_inspect");
    cache_all(&fx);
    let clean = json(&fx, &["inspect", "--sample", "50"], 0);
    assert_eq!(
        (clean["inspected"].clone(), clean["stale"].clone()),
        (5.into(), Value::Array(vec![]))
    );
    fx.set_plan_directly(3, "team");
    fx.settle();
    let expires = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
        + 60_000;
    fx.put_raw(
        &Client::user_key(3),
        format!("ca1 v 1 0 {expires}\n{{}}").as_bytes(),
    );
    let stale = json(&fx, &["inspect"], 3);
    assert_eq!(stale["stale"][0]["key"], "user:3");
    assert_eq!(stale["stale"][0]["row_version"], 2);
    let text = stdout(&run(&fx, &["inspect"]));
    assert!(
        text.contains("1 stale") && text.contains("user:3"),
        "{text}"
    );
}

#[test]
fn outbox_shows_the_horizon_pending_rows_and_lag() {
    let fx = Fixture::new("cli_outbox");
    // "Pending" is every row at or above the horizon, which trails the
    // database's oldest open transaction (the shared server's other
    // sessions' too): with the relay stopped, it stands still, and one
    // more change is one more pending row.
    fx.client.engine().stop_relay();
    let before = json(&fx, &["outbox"], 0);
    let consumer = &before["consumers"][0];
    assert_eq!(consumer["consumer"], fx.config.namespace.as_str());
    let pending = consumer["pending_rows"].as_u64().expect("a count");
    fx.set_plan_directly(2, "team");
    std::thread::sleep(Duration::from_millis(20));
    let v = json(&fx, &["outbox"], 0);
    let consumer = &v["consumers"][0];
    assert_eq!(consumer["pending_rows"], pending + 1, "{before} then {v}");
    assert!(consumer["lag_s"].as_f64().unwrap() >= 0.02, "{v}");
    let text = stdout(&run(&fx, &["outbox"]));
    assert!(
        text.contains("horizon") && text.contains("pending rows"),
        "{text}"
    );
}

#[test]
fn dead_letters_are_listed_replayed_and_dropped() {
    let mut config = common::test_config("cli_dead");
    config.write_behind_attempts = 1;
    let fx = Fixture::with(config);
    let table = &fx.config.users_table;
    let constraint =
        format!("ALTER TABLE {table} ADD CONSTRAINT no_poison CHECK (plan <> 'poison')");
    fx.client.db().batch_execute(&constraint).unwrap();
    fx.client.start_write_behind(1).unwrap();
    for id in [2, 4] {
        fx.client
            .update_user_plan_write_behind(id, "poison")
            .unwrap();
    }
    fx.client.drain_write_behind(PATIENCE).unwrap();

    let listed = json(&fx, &["dead-letters", "list"], 0);
    let letters = listed["dead_letters"].as_array().unwrap();
    let mut keys: Vec<&str> = letters.iter().map(|d| d["key"].as_str().unwrap()).collect();
    // In the order the workers gave up on them (a failed group is retried
    // key by key): either.
    keys.sort_unstable();
    assert_eq!(keys, ["user:2", "user:4"]);
    let first = letters
        .iter()
        .find(|d| d["key"] == "user:2")
        .and_then(|d| d["id"].as_str())
        .unwrap()
        .to_owned();
    assert!(stdout(&run(&fx, &["dead-letters", "list"])).contains("no_poison"));

    let dropped = json(&fx, &["dead-letters", "drop", &first], 0);
    assert_eq!(dropped["dropped"], 1);
    fx.client
        .db()
        .batch_execute(&format!("ALTER TABLE {table} DROP CONSTRAINT no_poison"))
        .unwrap();
    // The command registers no applier; the fixture's workers write it.
    let replayed = json(&fx, &["dead-letters", "replay"], 0);
    assert_eq!(
        replayed["replayed"].as_array().unwrap().len(),
        1,
        "{replayed}"
    );
    fx.client.drain_write_behind(PATIENCE).unwrap();
    let plan = |id: i64| -> String {
        let sql = format!("SELECT plan FROM {table} WHERE id = $1");
        fx.client
            .db()
            .query_opt(&sql, &[&id])
            .unwrap()
            .unwrap()
            .get(0)
    };
    assert_eq!((plan(2).as_str(), plan(4).as_str()), ("free", "poison"));
    assert!(stdout(&run(&fx, &["dead-letters", "list"])).contains("no dead letters"));
    let out = run(&fx, &["dead-letters", "drop", "not-an-id"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
}

#[test]
fn namespace_delete_asks_first_and_keeps_what_is_not_cache() {
    let fx = Fixture::new("cli_delete");
    cache_all(&fx);
    let session = fx.client.sessions().create(&"hello").unwrap();
    let out = run_with(&fx, &["namespace", "delete"], "no\n");
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("delete 5 cache entries"));
    assert!(fx.client.cache().exists(&Client::user_key(1)).unwrap());

    let v = json(&fx, &["namespace", "delete", "--yes"], 0);
    assert_eq!(v["entries"], 5);
    for (id, ..) in cacheaside::DEMO_USERS {
        assert!(!fx.client.cache().exists(&Client::user_key(id)).unwrap());
    }
    let kept: Option<String> = fx.client.sessions().get(&session).unwrap();
    assert_eq!(kept.as_deref(), Some("hello"));
}

#[test]
fn usage_errors_exit_2() {
    let fx = Fixture::new("cli_usage");
    for args in [
        &["frobnicate"][..],
        &[],
        &["inspect", "--sample", "x"],
        &["get"],
    ] {
        let out = run(&fx, args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", describe(&out));
        assert!(String::from_utf8_lossy(&out.stderr).contains("usage:"));
    }
}
