//! The teaching lab's workload: a `users` table behind the cache, and its
//! three functions, as thin users of the generic engine.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_postgres::Row;

use crate::aside::CacheAside;
use crate::cache::Cache;
use crate::config::Config;
use crate::db::{Db, Transaction};
use crate::engine::Mode;
use crate::error::{Error, Result};
use crate::events::Events;
use crate::ratelimit::{RateLimitDecision, RateLimiter};
use crate::sessions::Sessions;
use crate::write_behind::WriteBehindChange;

/// One row of the users table, as cached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserProfile {
    /// Primary key.
    pub id: i64,
    /// Display name.
    pub name: String,
    /// Email address.
    pub email: String,
    /// Subscription plan, e.g. `"free"` or `"pro"`.
    pub plan: String,
    /// Starts at 1 and grows with every update: by one for a direct update,
    /// to the change's sequence number for a write-behind one
    /// ([`Client::update_user_plan_write_behind`]). Orders cached copies.
    pub version: i64,
}

/// The lab's five demo users: `(id, name, email, plan)`.
pub const DEMO_USERS: [(i64, &str, &str, &str); 5] = [
    (1, "Ada Lovelace", "ada@example.com", "pro"),
    (2, "Alan Turing", "alan@example.com", "free"),
    (3, "Grace Hopper", "grace@example.com", "enterprise"),
    (4, "Edsger Dijkstra", "edsger@example.com", "free"),
    (5, "Barbara Liskov", "barbara@example.com", "pro"),
];

/// The lab's client: a [`CacheAside`] engine plus the users table.
///
/// Thread-safe and cheap to clone (an `Arc` inside): give each thread its
/// own clone; every clone is the same client, with the same engine. Every
/// method blocks.
///
/// ```no_run
/// use cacheaside::{Client, Config};
///
/// let client = Client::open(&Config::from_env())?;
/// client.install_schema()?;
/// client.seed_demo_users()?;
/// let before = client.db().query_count();
/// let ada = client.get_user_profile(1)?.expect("seeded"); // miss: 1 query
/// let again = client.get_user_profile(1)?;                 // hit: 0 queries
/// assert_eq!(client.db().query_count() - before, 1);
/// assert_eq!(again.as_ref(), Some(&ada));
/// client.update_user_plan(1, "enterprise")?;               // write, then invalidate
/// assert_eq!(client.get_user_profile(1)?.unwrap().plan, "enterprise");
/// # Ok::<(), cacheaside::Error>(())
/// ```
#[derive(Clone)]
pub struct Client {
    engine: CacheAside,
    ttl: Duration,
    sql: Arc<Sql>,
}

/// The statements, built once from the validated table name (an identifier
/// cannot be a bind parameter; every value is one).
struct Sql {
    table: String,
    select: String,
    update: String,
    update_returning: String,
    insert: String,
    /// The write-behind applier's: one statement per batch, each row only
    /// if its version is older than the change (a replayed or overtaken
    /// change updates nothing); the version becomes the change's sequence
    /// number.
    write_behind: String,
}

impl Sql {
    fn new(table: &str) -> Sql {
        const COLUMNS: &str = "id, name, email, plan, version";
        Sql {
            table: table.to_owned(),
            select: format!("SELECT {COLUMNS} FROM {table} WHERE id = $1"),
            update: format!(
                "UPDATE {table} SET plan = $2, updated_at = now(), version = version + 1 WHERE id = $1"
            ),
            update_returning: format!(
                "UPDATE {table} SET plan = $2, updated_at = now(), version = version + 1 WHERE id = $1 RETURNING {COLUMNS}"
            ),
            insert: format!(
                "INSERT INTO {table} (id, name, email, plan) VALUES ($1, $2, $3, $4) ON CONFLICT (id) DO NOTHING"
            ),
            write_behind: format!(
                "UPDATE {table} AS u SET plan = c.plan, version = c.seq, updated_at = now()
                 FROM unnest($1::bigint[], $2::text[], $3::bigint[]) AS c(id, plan, seq)
                 WHERE u.id = c.id AND u.version < c.seq"
            ),
        }
    }
}

impl Client {
    /// Connects to Postgres and Redis as `config` says, and starts the
    /// invalidation relay when [`Config::invalidation_relay`] is on. Does not
    /// touch the table: see [`install_schema`](Self::install_schema).
    ///
    /// Neither server needs to be up: connections open lazily, and calls
    /// degrade (or fail, with the cause) while one is down.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidArgument`](crate::ErrorKind) for an invalid config
    /// (e.g. a table name that is not an identifier, or an unparsable URL).
    pub fn open(config: &Config) -> Result<Client> {
        let engine = CacheAside::open(config)?;
        let sql = Arc::new(Sql::new(&config.users_table));
        let applier_sql = Arc::clone(&sql);
        engine.register_write_behind(USER_PREFIX, move |tx, changes| {
            apply_plans(tx, &applier_sql, changes)
        })?;
        engine.start_relay();
        Ok(Client {
            engine,
            ttl: config.ttl,
            sql,
        })
    }

    /// The settings this client was opened with.
    pub(crate) fn config(&self) -> &Config {
        self.engine.config()
    }

    /// Checks that both servers answer; see [`CacheAside::ping`].
    ///
    /// # Errors
    /// [`ErrorKind::Cache`](crate::ErrorKind) or
    /// [`ErrorKind::Database`](crate::ErrorKind) with the cause; timeouts.
    pub fn ping(&self) -> Result<()> {
        self.engine.ping()
    }

    /// The generic engine under this client, for caching anything else.
    pub fn engine(&self) -> &CacheAside {
        &self.engine
    }

    /// The Postgres pool; [`Db::query_count`] proves hits skip it.
    pub fn db(&self) -> &Db {
        self.engine.db()
    }

    /// The Redis pool.
    pub fn cache(&self) -> &Cache {
        self.engine.cache()
    }

    /// The users table this client reads and writes.
    pub fn users_table(&self) -> &str {
        &self.sql.table
    }

    /// The cache key of a user: `user:{id}`.
    pub fn user_key(user_id: i64) -> String {
        format!("{USER_PREFIX}{user_id}")
    }

    /// Creates the users table (and its schema, if qualified) unless it
    /// exists, and captures its changes for the invalidation relay: a
    /// trigger writes every changed user's key to the outbox
    /// ([`Config::outbox_table`]) in the same transaction, so a write that
    /// bypasses this library (psql, another service) invalidates the cache
    /// too. Idempotent.
    ///
    /// # Errors
    /// Database errors and timeouts.
    pub fn install_schema(&self) -> Result<()> {
        let table = &self.sql.table;
        let schema = match table.split_once('.') {
            Some((schema, _)) => format!("CREATE SCHEMA IF NOT EXISTS {schema};"),
            None => String::new(),
        };
        self.db().batch_execute(&format!(
            "{schema}
             CREATE TABLE IF NOT EXISTS {table} (
                 id         bigint PRIMARY KEY,
                 name       text NOT NULL,
                 email      text NOT NULL,
                 plan       text NOT NULL,
                 updated_at timestamptz NOT NULL DEFAULT now(),
                 version    bigint NOT NULL DEFAULT 1
             )"
        ))?;
        self.engine
            .capture_changes(table, "user:", "id", Some("version"))
    }

    /// Drops what [`install_schema`](Self::install_schema) created: the users
    /// table, the outbox and its cursor table, and the capture functions.
    /// For demos and tests that own their tables; the users' rows are gone
    /// afterwards. Idempotent.
    ///
    /// # Errors
    /// Database errors and timeouts.
    pub fn drop_schema(&self) -> Result<()> {
        let outbox = &self.engine.config().outbox_table;
        // Nothing may write the tables (or the namespace) afterwards.
        self.engine.stop_write_behind();
        self.engine.stop_relay();
        // In the order every other path locks them (a writer: users, then
        // the outbox through the trigger; a relay round: cursors, then the
        // outbox), so a drop never deadlocks with either.
        self.db().batch_execute(&format!(
            "DROP TABLE IF EXISTS {users}, {outbox}_cursors, {outbox};
             DROP FUNCTION IF EXISTS {outbox}_capture(), {outbox}_bump(), {outbox}_reset();",
            users = self.sql.table
        ))
    }

    /// Inserts the lab's five [`DEMO_USERS`] where their ids are free, and
    /// invalidates their cache entries (an "absent" entry may be cached).
    /// Idempotent.
    ///
    /// # Errors
    /// Database and cache errors, timeouts.
    pub fn seed_demo_users(&self) -> Result<()> {
        for (id, name, email, plan) in DEMO_USERS {
            self.insert_user(id, name, email, plan)?;
        }
        Ok(())
    }

    /// Inserts a user unless the id is taken (then nothing changes), and
    /// invalidates the id's cache entry so a cached "absent" goes away.
    /// Returns whether a row was inserted.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidArgument`](crate::ErrorKind) for an empty plan;
    /// database and cache errors, timeouts.
    pub fn insert_user(&self, user_id: i64, name: &str, email: &str, plan: &str) -> Result<bool> {
        check_plan(plan)?;
        let inserted = self
            .db()
            .execute(&self.sql.insert, &[&user_id, &name, &email, &plan])?;
        self.invalidate_written(user_id)?;
        Ok(inserted == 1)
    }

    /// Cache-aside read: Redis first; on a miss one Postgres query, whose
    /// row (or absence) is cached. `Ok(None)` when the user does not exist.
    ///
    /// A hit costs one Redis round trip and no Postgres statement. Under
    /// concurrent misses every caller queries Postgres; use
    /// [`get_user_profile_singleflight`](Self::get_user_profile_singleflight)
    /// for hot keys.
    ///
    /// # Errors
    /// Database and cache errors, timeouts.
    pub fn get_user_profile(&self, user_id: i64) -> Result<Option<UserProfile>> {
        self.read(user_id, Mode::Plain)
    }

    /// Stampede-safe read: however many threads (and processes) miss one
    /// user at once, Postgres sees one query; the others reuse its row.
    ///
    /// # Errors
    /// As [`get_user_profile`](Self::get_user_profile); a failed load's error
    /// reaches every thread that waited on it.
    pub fn get_user_profile_singleflight(&self, user_id: i64) -> Result<Option<UserProfile>> {
        self.read(user_id, Mode::SingleFlight)
    }

    /// Sets a user's plan in Postgres (bumping `version` and `updated_at`),
    /// then invalidates the cached profile. `Ok(false)` if no such user.
    ///
    /// Once this returns, no read that starts afterwards sees the old plan:
    /// a reader that loaded the old row before the write loses its lease and
    /// cannot cache it. It supersedes a pending write-behind change of the
    /// user: it registers as a writer before its `UPDATE` (one Redis round
    /// trip, so a worker cannot flush the change between this commit and the
    /// invalidation), and the invalidation drops the change.
    ///
    /// When Redis cannot be reached (against a frozen one, the registration
    /// and the invalidation may each cost a cache timeout), the update still succeeds while the
    /// invalidation relay runs: the trigger's outbox row, committed with the
    /// update, invalidates the key once Redis answers, and until then this
    /// process reads around the cache (its breaker is open).
    ///
    /// # Errors
    /// [`ErrorKind::InvalidArgument`](crate::ErrorKind) for an empty plan;
    /// database errors and timeouts; cache errors only without the relay (the
    /// update has committed then, but the cache may keep the old row until
    /// its TTL).
    pub fn update_user_plan(&self, user_id: i64, plan: &str) -> Result<bool> {
        check_plan(plan)?;
        // A pending write-behind change of the user must not be flushed
        // between this commit and the invalidation that supersedes it.
        let announced = self.engine.announce_write(&Client::user_key(user_id));
        let updated = self.db().execute(&self.sql.update, &[&user_id, &plan])?;
        #[cfg(feature = "test-hooks")]
        self.engine.hooks().after_write(&Client::user_key(user_id));
        self.invalidate_written(user_id)?;
        if let Some(announced) = announced {
            announced.finished();
        }
        Ok(updated == 1)
    }

    /// Sets a user's plan and writes the new row through to the cache, unless
    /// the cache already holds a newer version. Returns the new row, or
    /// `Ok(None)` if no such user.
    ///
    /// # Errors
    /// As [`update_user_plan`](Self::update_user_plan).
    pub fn update_user_plan_write_through(
        &self,
        user_id: i64,
        plan: &str,
    ) -> Result<Option<UserProfile>> {
        check_plan(plan)?;
        self.engine
            .write_through(&Client::user_key(user_id), self.ttl, || {
                // No row: nothing to cache (a cached "absent" stays right).
                let row = self
                    .db()
                    .query_opt(&self.sql.update_returning, &[&user_id, &plan])?;
                versioned_profile(row)
            })
    }

    /// Write-behind: sets a user's plan in the cache at once and queues the
    /// write to Postgres, in one Redis script; returns the change's sequence
    /// number (which becomes the profile's `version`), or `Ok(None)` if no
    /// such user exists. It costs a read of the profile (a cache hit,
    /// usually) and one Redis round trip, and no Postgres statement.
    ///
    /// From the moment it returns, every read of the user, in every process,
    /// sees the new plan (also if the cached entry is evicted or deleted
    /// meanwhile), until the write is in Postgres, which a worker
    /// ([`start_write_behind`](Self::start_write_behind), in any process)
    /// does: changes of one user are coalesced, written in batches,
    /// conditional on the sequence number (`version < seq`), so a change is
    /// written once in effect, and a newer one is never overwritten by an
    /// older one. A synchronous write of the same user
    /// ([`update_user_plan`](Self::update_user_plan),
    /// [`update_user_plan_write_through`](Self::update_user_plan_write_through))
    /// supersedes a change enqueued before it: reads get the synchronous
    /// write, and the change is never written over it.
    ///
    /// ```no_run
    /// # let client = cacheaside::Client::open(&cacheaside::Config::from_env())?;
    /// client.start_write_behind(2)?;
    /// let seq = client.update_user_plan_write_behind(1, "team")?.expect("user 1 exists");
    /// let now = client.get_user_profile(1)?.unwrap();
    /// assert_eq!((now.plan.as_str(), now.version as u64), ("team", seq));
    /// client.drain_write_behind(std::time::Duration::from_secs(5))?; // now in Postgres
    /// # Ok::<(), cacheaside::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`ErrorKind::BacklogFull`](crate::ErrorKind) when the backlog is full
    /// (nothing was enqueued: retry later, or use `update_user_plan`);
    /// [`ErrorKind::InvalidArgument`](crate::ErrorKind) for an empty plan;
    /// cache errors (write-behind needs Redis, and is refused while this
    /// process's circuit breaker is open) and timeouts; database errors
    /// of the read when the profile is not cached.
    pub fn update_user_plan_write_behind(&self, user_id: i64, plan: &str) -> Result<Option<u64>> {
        check_plan(plan)?;
        let Some(current) = self.get_user_profile(user_id)? else {
            return Ok(None);
        };
        let floor = u64::try_from(current.version).unwrap_or(0);
        let changed = UserProfile {
            plan: plan.to_owned(),
            version: 0,
            ..current
        };
        let json = serde_json::to_vec(&changed)
            .map_err(|e| Error::invalid_argument("profile does not serialize").with_source(e))?;
        let (head, tail) = split_version(&json)?;
        self.engine
            .write_behind_sequenced(&Client::user_key(user_id), self.ttl, head, tail, floor)
            .map(Some)
    }

    /// Starts `workers` write-behind worker threads in this process: they
    /// write the changes of
    /// [`update_user_plan_write_behind`](Self::update_user_plan_write_behind)
    /// (from any process of this namespace) to Postgres. See
    /// [`CacheAside::start_write_behind`].
    ///
    /// # Errors
    /// As [`CacheAside::start_write_behind`].
    pub fn start_write_behind(&self, workers: u32) -> Result<()> {
        self.engine.start_write_behind(workers)
    }

    /// Stops this process's write-behind workers and joins them (see
    /// [`CacheAside::stop_write_behind`]).
    pub fn stop_write_behind(&self) {
        self.engine.stop_write_behind();
    }

    /// Waits until every write-behind change enqueued before this call is in
    /// Postgres (or dead-lettered), at most `timeout`.
    ///
    /// # Errors
    /// As [`CacheAside::drain_write_behind`].
    pub fn drain_write_behind(&self, timeout: Duration) -> Result<()> {
        self.engine.drain_write_behind(timeout)
    }

    /// Write-behind changes not yet in Postgres (the backlog).
    ///
    /// # Errors
    /// As [`CacheAside::write_behind_pending`].
    pub fn write_behind_pending(&self) -> Result<u64> {
        self.engine.write_behind_pending()
    }

    fn read(&self, user_id: i64, mode: Mode) -> Result<Option<UserProfile>> {
        let key = Client::user_key(user_id);
        // The replica when one is configured, fenced (see crate::fence).
        let (source, sql) = (self.engine.source(&key), Arc::clone(&self.sql));
        self.engine
            .get_or_load_owned_cloned(&key, self.ttl, mode, move || {
                source.load(|db| versioned_profile(db.query_opt(&sql.select, &[&user_id])?))
            })
    }

    /// Invalidates a user after a committed write of the captured users
    /// table.
    fn invalidate_written(&self, user_id: i64) -> Result<()> {
        self.engine.invalidate_captured(&Client::user_key(user_id))
    }
}

/// The prefix of users' cache keys, and of their write-behind applier.
const USER_PREFIX: &str = "user:";

/// The users' write-behind applier: one `UPDATE ... FROM unnest(...)` for
/// the whole batch.
fn apply_plans(
    tx: &mut Transaction<'_>,
    sql: &Sql,
    changes: &[WriteBehindChange<'_>],
) -> Result<()> {
    let (mut ids, mut plans, mut seqs) = (Vec::new(), Vec::new(), Vec::new());
    for change in changes {
        let profile: UserProfile = serde_json::from_slice(change.json).map_err(|e| {
            Error::invalid_argument(format!("{:?} is not a user profile: {e}", change.key))
        })?;
        // The row written is the key's: whoever can write the stream must
        // not aim a change at another row through the JSON.
        let id: Option<i64> = change
            .key
            .strip_prefix(USER_PREFIX)
            .and_then(|id| id.parse().ok());
        if id != Some(profile.id) {
            return Err(Error::invalid_argument(format!(
                "the change of {:?} names user {}: refused",
                change.key, profile.id
            )));
        }
        check_plan(&profile.plan)?;
        let seq = i64::try_from(change.seq)
            .map_err(|_| Error::invalid_argument("sequence number beyond bigint"))?;
        ids.push(profile.id);
        plans.push(profile.plan);
        seqs.push(seq);
    }
    tx.execute(&sql.write_behind, &[&ids, &plans, &seqs])?;
    Ok(())
}

/// Splits a profile's JSON (serialized with `version` 0) around that 0, so
/// the enqueue script can put the change's sequence number there.
fn split_version(json: &[u8]) -> Result<(&[u8], &[u8])> {
    const END: &[u8] = br#","version":0}"#;
    if !json.ends_with(END) {
        return Err(Error::invalid_argument(
            "a profile's JSON must end with its version",
        ));
    }
    let at = json.len() - 2; // before "0}"
    Ok((&json[..at], &json[at + 1..]))
}

/// A row as the engine caches it: the profile and the version that orders it.
fn versioned_profile(row: Option<Row>) -> Result<Option<(UserProfile, u64)>> {
    let profile = row.as_ref().map(profile_from_row).transpose()?;
    Ok(profile.map(|p| {
        let version = u64::try_from(p.version).unwrap_or(0);
        (p, version)
    }))
}

fn profile_from_row(row: &Row) -> Result<UserProfile> {
    let column = |e: tokio_postgres::Error| Error::from(e);
    Ok(UserProfile {
        id: row.try_get(0).map_err(column)?,
        name: row.try_get(1).map_err(column)?,
        email: row.try_get(2).map_err(column)?,
        plan: row.try_get(3).map_err(column)?,
        version: row.try_get(4).map_err(column)?,
    })
}

fn check_plan(plan: &str) -> Result<()> {
    if plan.trim().is_empty() {
        return Err(Error::invalid_argument("plan must not be empty"));
    }
    Ok(())
}

/// The patterns beside the engine, reached from the lab's client.
impl Client {
    /// Sessions that expire [`Sessions::DEFAULT_IDLE_TTL`] (30 minutes) after
    /// their last read (change it with [`Sessions::with_idle_ttl`]), and at
    /// the latest [`Config::session_max_lifetime`](crate::Config::session_max_lifetime)
    /// after creation (24 hours unless configured).
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// # let client = cacheaside::Client::open(&cacheaside::Config::from_env())?;
    /// let sessions = client.sessions();
    /// let id = sessions.create(&("user", 42))?;
    /// let data: Option<(String, u32)> = sessions.get(&id)?;
    /// # Ok::<(), cacheaside::Error>(())
    /// ```
    pub fn sessions(&self) -> Sessions {
        Sessions::configured(self.cache(), self.config())
    }
}

impl Client {
    /// Checks and counts one request of `subject` against `limit` requests
    /// per sliding `window`: a one-off [`RateLimiter`] (build one to reuse
    /// the same limit).
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// # let client = cacheaside::Client::open(&cacheaside::Config::from_env())?;
    /// let decision = client.rate_limit("ip:203.0.113.9", 10, Duration::from_secs(1))?;
    /// assert!(decision.allowed || !decision.retry_after.is_zero());
    /// # Ok::<(), cacheaside::Error>(())
    /// ```
    ///
    /// # Errors
    /// As [`RateLimiter::new`] and [`RateLimiter::check`].
    pub fn rate_limit(
        &self,
        subject: &str,
        limit: u32,
        window: Duration,
    ) -> Result<RateLimitDecision> {
        RateLimiter::new(self.cache(), limit, window)?.check(subject)
    }
}

impl Client {
    /// Pub/sub under this client's namespace, connecting subscriptions with
    /// the settings the client was opened with.
    ///
    /// ```no_run
    /// # let client = cacheaside::Client::open(&cacheaside::Config::from_env())?;
    /// let receivers = client.events()?.publish("news", "hello")?;
    /// # Ok::<(), cacheaside::Error>(())
    /// ```
    ///
    /// # Errors
    /// As [`Events::new`].
    pub fn events(&self) -> Result<Events> {
        Events::new(self.cache(), self.config())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sequence_number_goes_where_the_version_was() {
        let profile = UserProfile {
            id: 7,
            name: "A \"quoted\" name".into(),
            email: "a@example.com".into(),
            plan: "version\":0}".into(),
            version: 0,
        };
        let json = serde_json::to_vec(&profile).unwrap();
        let (head, tail) = split_version(&json).unwrap();
        let spliced = [head, b"1234567890123456", tail].concat();
        let back: UserProfile = serde_json::from_slice(&spliced).unwrap();
        assert_eq!(
            back,
            UserProfile {
                version: 1_234_567_890_123_456,
                ..profile
            }
        );
    }
}
