//! The dead-letter stream's operator functions: replay (enqueue again, then
//! remove) and drop.

mod common;

use std::time::Duration;

use cacheaside::{Client, ErrorKind};
use common::{Fixture, PATIENCE, test_config};

/// A fixture whose users table refuses the plan `poison`, and whose
/// workers give up on a refused change at the first attempt.
fn refusing(label: &str) -> Fixture {
    let mut config = test_config(label);
    config.write_behind_attempts = 1;
    config.write_behind_retry_backoff = Duration::from_millis(10);
    let fx = Fixture::with(config);
    set_refusal(&fx, true);
    fx
}

fn set_refusal(fx: &Fixture, on: bool) {
    let table = &fx.config.users_table;
    let sql = if on {
        format!("ALTER TABLE {table} ADD CONSTRAINT no_poison CHECK (plan <> 'poison')")
    } else {
        format!("ALTER TABLE {table} DROP CONSTRAINT no_poison")
    };
    fx.client.db().batch_execute(&sql).unwrap();
}

fn plan_in_postgres(fx: &Fixture, id: i64) -> String {
    let sql = format!("SELECT plan FROM {} WHERE id = $1", fx.config.users_table);
    fx.client
        .db()
        .query_opt(&sql, &[&id])
        .unwrap()
        .unwrap()
        .get(0)
}

/// Enqueues `plan` for user `id` and lets the workers dead-letter it.
fn dead_letter(fx: &Fixture, id: i64, plan: &str) {
    fx.client.update_user_plan_write_behind(id, plan).unwrap();
    fx.client.drain_write_behind(PATIENCE).unwrap();
}

#[test]
fn a_replayed_dead_letter_reaches_postgres_and_leaves_the_stream() {
    let fx = refusing("dl_replay");
    fx.client.start_write_behind(1).unwrap();
    dead_letter(&fx, 2, "poison");
    let dead = fx.client.engine().write_behind_dead_letters(10).unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(plan_in_postgres(&fx, 2), "free");

    // The cause is fixed; the operator replays.
    set_refusal(&fx, false);
    let report = fx.client.engine().replay_dead_letters(10).unwrap();
    assert_eq!(report.replayed, [dead[0].id.clone()]);
    assert!(report.superseded.is_empty() && report.unreadable.is_empty());
    // Read at once, as any write-behind change is, and written by the
    // workers.
    assert_eq!(
        fx.client.get_user_profile(2).unwrap().unwrap().plan,
        "poison"
    );
    fx.client.drain_write_behind(PATIENCE).unwrap();
    assert_eq!(plan_in_postgres(&fx, 2), "poison");
    assert_eq!(
        fx.client.engine().write_behind_dead_letters(10).unwrap(),
        []
    );
    // Nothing left to replay.
    let again = fx.client.engine().replay_dead_letters(10).unwrap();
    assert_eq!(again, cacheaside::ReplayReport::default());
}

#[test]
fn a_dead_letter_whose_key_has_a_newer_change_is_not_replayed() {
    let fx = refusing("dl_superseded");
    fx.client.start_write_behind(1).unwrap();
    dead_letter(&fx, 3, "poison");
    // A newer change of the same key went through since.
    fx.client.update_user_plan_write_behind(3, "pro").unwrap();
    fx.client.drain_write_behind(PATIENCE).unwrap();
    assert_eq!(plan_in_postgres(&fx, 3), "pro");
    set_refusal(&fx, false);

    let dead = fx.client.engine().write_behind_dead_letters(10).unwrap();
    let report = fx.client.engine().replay_dead_letters(10).unwrap();
    assert_eq!(report.superseded, [dead[0].id.clone()]);
    assert!(report.replayed.is_empty());
    fx.client.drain_write_behind(PATIENCE).unwrap();
    assert_eq!(plan_in_postgres(&fx, 3), "pro", "not taken back in time");
    assert_eq!(
        fx.client.engine().write_behind_dead_letters(10).unwrap(),
        dead
    );
}

#[test]
fn dropped_dead_letters_are_gone_and_bad_ids_are_refused() {
    let fx = refusing("dl_drop");
    fx.client.start_write_behind(1).unwrap();
    dead_letter(&fx, 4, "poison");
    dead_letter(&fx, 5, "poison");
    let dead = fx.client.engine().write_behind_dead_letters(10).unwrap();
    assert_eq!(dead.len(), 2);

    for bad in ["", "12", "a-b", "1-2-3"] {
        let err = fx
            .client
            .engine()
            .drop_dead_letters(&[dead[0].id.as_str(), bad])
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{bad:?}");
    }
    assert_eq!(
        fx.client.engine().write_behind_dead_letters(10).unwrap(),
        dead
    );
    let removed = fx
        .client
        .engine()
        .drop_dead_letters(&[dead[0].id.as_str(), "1-1"])
        .unwrap();
    assert_eq!(removed, 1);
    assert_eq!(
        fx.client.engine().write_behind_dead_letters(10).unwrap(),
        dead[1..]
    );
    // Nothing was replayed: Postgres still has the old plan.
    assert_eq!(plan_in_postgres(&fx, 4), "free");
    assert!(!fx.client.cache().exists(&Client::user_key(4)).unwrap());
}
