//! PostgreSQL: a pool of blocking connections with a deadline on every
//! statement, a bounded cache of prepared statements per connection, and a
//! counter of every statement sent, which is how tests prove a cache hit
//! never reaches the database.
//!
//! Bounds: a checkout waits at most `pool_timeout` for a busy pool (and fails
//! at once, with the cause, when the server refuses connections); a connect
//! at most `connect_timeout`; a statement at most `statement_timeout` on the
//! server and that plus [`CLIENT_MARGIN`](crate::config::CLIENT_MARGIN) on the client, so a server that
//! stops answering fails the call instead of hanging it.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio_postgres::{Row, Statement};

use crate::config::{CLIENT_MARGIN, Config};
use crate::error::{Error, Result};
use crate::pg::Params;
use crate::pg::PgConnection;
use crate::pool::{Conn, Connector, Pool};

/// A pooled PostgreSQL client that counts the statements it sends.
///
/// Cheap to clone; clones share the pool and the counter. Every method
/// blocks the calling thread; all are safe to call from many threads.
///
/// ```no_run
/// let db = cacheaside::Db::connect(&cacheaside::Config::from_env())?;
/// let row = db.query_opt("SELECT $1::bigint + 1", &[&41_i64])?.unwrap();
/// assert_eq!(row.get::<_, i64>(0), 42);
/// assert_eq!(db.query_count(), 1);
/// # Ok::<(), cacheaside::Error>(())
/// ```
#[derive(Clone)]
pub struct Db {
    pool: Pool<PgConnector>,
    queries: Arc<AtomicU64>,
    deadline: Duration,
    /// The read replica's pool ([`Config::replica_url`]), with its own
    /// counter; never written through.
    replica: Option<Arc<Db>>,
}

impl Db {
    /// Builds the pool for `config.database_url`. Connections open lazily
    /// (and in the background), so this succeeds while the server is down;
    /// the first statement then reports why it cannot connect.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidArgument`](crate::ErrorKind) for an unparsable URL.
    pub fn connect(config: &Config) -> Result<Db> {
        let replica = match &config.replica_url {
            Some(url) => Some(Arc::new(Db::connect_to(config, url, "replica")?)),
            None => None,
        };
        Ok(Db {
            replica,
            ..Db::connect_to(config, &config.database_url, "database")?
        })
    }

    /// The pool for one server, `url`, with `config`'s bounds; `what` names
    /// it in errors.
    fn connect_to(config: &Config, url: &str, what: &str) -> Result<Db> {
        let mut pg: tokio_postgres::Config = url.parse().map_err(|e| {
            Error::invalid_argument(format!("{what} URL does not parse")).with_source(e)
        })?;
        pg.connect_timeout(config.connect_timeout);
        // After the URL's own `options` (a `search_path`, say), which
        // would otherwise be dropped.
        let timeout = format!(
            "-c statement_timeout={}",
            config.statement_timeout.as_millis()
        );
        let options = match pg.get_options() {
            Some(theirs) if !theirs.trim().is_empty() => format!("{theirs} {timeout}"),
            _ => timeout,
        };
        pg.options(options);
        // A dead peer on an idle pooled connection is noticed by the kernel
        // (keepalives), and unacknowledged data fails a socket after
        // `tcp_user_timeout` (a partition, not a frozen server: that one
        // ACKs, and only the client-side deadline catches it).
        pg.keepalives(true);
        pg.keepalives_idle(Duration::from_secs(5));
        pg.keepalives_interval(Duration::from_secs(1));
        pg.keepalives_retries(3);
        pg.tcp_user_timeout(config.statement_timeout + CLIENT_MARGIN);
        if pg.get_application_name().is_none() {
            pg.application_name("cacheaside");
        }
        // TLS only when the URL asks for it: tokio-postgres's default,
        // `prefer`, would now try TLS against any server that offers it, and
        // fail on one whose certificate is not trusted (a snakeoil one).
        if pg.get_ssl_mode() == tokio_postgres::config::SslMode::Prefer {
            pg.ssl_mode(tokio_postgres::config::SslMode::Disable);
        }
        let tls = crate::pg::tls_connector(
            config.database_ca_file.as_deref(),
            pg.get_ssl_mode() == tokio_postgres::config::SslMode::Require,
        )?;
        let connector = PgConnector {
            config: pg,
            tls,
            connect_timeout: config.connect_timeout,
            statement_capacity: config.statement_cache_size,
        };
        Ok(Db {
            pool: Pool::new(
                connector,
                config.db_pool_size,
                config.pool_min_idle,
                config.pool_timeout,
            ),
            queries: Arc::new(AtomicU64::new(0)),
            deadline: config.statement_timeout + CLIENT_MARGIN,
            replica: None,
        })
    }

    /// The read replica's pool, when [`Config::replica_url`] is set: a
    /// [`Db`] of its own, with its own [`query_count`](Self::query_count).
    /// Nothing fences what it reads here: a cached load should go through
    /// [`CacheAside::get_or_load_versioned_from_replica`](crate::CacheAside::get_or_load_versioned_from_replica),
    /// which re-reads a row older than a finished write from the primary.
    /// Never write through it (a hot standby refuses writes anyway).
    ///
    /// ```no_run
    /// let mut config = cacheaside::Config::from_env();
    /// config.replica_url = Some("postgres://postgres@127.0.0.1:5433/test".into());
    /// let db = cacheaside::Db::connect(&config)?;
    /// let replica = db.replica().expect("replica_url is set");
    /// let row = replica.query_opt("SELECT pg_is_in_recovery()", &[])?.unwrap();
    /// assert!(row.get::<_, bool>(0));
    /// # Ok::<(), cacheaside::Error>(())
    /// ```
    pub fn replica(&self) -> Option<&Db> {
        self.replica.as_deref()
    }

    /// Runs a statement that returns at most one row; `Ok(None)` for no row
    /// (tokio-postgres's `query_opt`).
    ///
    /// The statement is prepared once per pooled connection and reused (see
    /// [`Config::statement_cache_size`]).
    ///
    /// ```no_run
    /// # let db = cacheaside::Db::connect(&cacheaside::Config::from_env())?;
    /// let row = db.query_opt("SELECT 1::int WHERE $1", &[&true])?;
    /// assert_eq!(row.map(|r| r.get::<_, i32>(0)), Some(1));
    /// # Ok::<(), cacheaside::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`ErrorKind::Database`](crate::ErrorKind) when Postgres refuses it or
    /// it returns more than one row; [`ErrorKind::Timeout`](crate::ErrorKind)
    /// for a pool checkout, `statement_timeout` or the client-side deadline.
    pub fn query_opt(&self, sql: &str, params: Params<'_>) -> Result<Option<Row>> {
        self.with_conn(|conn| conn.query_opt(sql, params))
    }

    /// [`query_opt`](Self::query_opt) under its old name, which promised a
    /// row where it returns an `Option` (tokio-postgres's `query_one` fails
    /// unless exactly one row comes back). Behaves as before for one
    /// release.
    ///
    /// # Errors
    /// As [`Db::query_opt`].
    #[deprecated(since = "0.2.0", note = "returns an Option: call `query_opt`")]
    pub fn query_one(&self, sql: &str, params: Params<'_>) -> Result<Option<Row>> {
        self.query_opt(sql, params)
    }

    /// Runs a statement and returns all its rows.
    ///
    /// # Errors
    /// As [`Db::query_opt`].
    pub fn query(&self, sql: &str, params: Params<'_>) -> Result<Vec<Row>> {
        self.with_conn(|conn| conn.query(sql, params))
    }

    /// Runs a statement and returns how many rows it changed.
    ///
    /// # Errors
    /// As [`Db::query_opt`].
    pub fn execute(&self, sql: &str, params: Params<'_>) -> Result<u64> {
        self.with_conn(|conn| conn.execute(sql, params))
    }

    /// Runs one or more `;`-separated statements without parameters (schema
    /// set-up). Counts as one statement.
    ///
    /// # Errors
    /// As [`Db::query_opt`].
    pub fn batch_execute(&self, sql: &str) -> Result<()> {
        self.with_conn(|conn| conn.batch_execute(sql))
    }

    /// Runs `work` in one transaction on one connection: committed when it
    /// returns `Ok`, rolled back when it returns `Err` (or panics, or a
    /// deadline breaks the connection). `BEGIN` and `COMMIT` are not counted
    /// as statements; what `work` runs is.
    ///
    /// ```no_run
    /// # let db = cacheaside::Db::connect(&cacheaside::Config::from_env())?;
    /// let moved = db.transaction(|tx| {
    ///     tx.execute("UPDATE accounts SET cents = cents - 100 WHERE id = $1", &[&1_i64])?;
    ///     tx.execute("UPDATE accounts SET cents = cents + 100 WHERE id = $1", &[&2_i64])
    /// })?;
    /// # Ok::<(), cacheaside::Error>(())
    /// ```
    ///
    /// A transaction Postgres aborted (a statement in it failed, and `work`
    /// went on and returned `Ok`) is rolled back and reported as an error,
    /// never as committed.
    ///
    /// # Errors
    /// What `work` returns; database errors and timeouts of `BEGIN` and
    /// `COMMIT`; [`ErrorKind::Database`](crate::ErrorKind) when Postgres
    /// had aborted the transaction.
    pub fn transaction<T>(
        &self,
        work: impl FnOnce(&mut Transaction<'_>) -> Result<T>,
    ) -> Result<T> {
        crate::pg::refuse_async_context()?;
        let mut conn = self.pool.get("database")?;
        conn.pg.batch_execute("BEGIN", self.deadline)?;
        let mut tx = Transaction {
            conn: &mut conn,
            db: self,
            finished: false,
        };
        let outcome = work(&mut tx);
        let finished = tx.finish(outcome.is_ok());
        let value = outcome?;
        finished?;
        Ok(value)
    }

    /// How many statements this pool has sent to Postgres since it opened
    /// (executions; the one-time prepare of each SQL text is not counted).
    pub fn query_count(&self) -> u64 {
        self.queries.load(Ordering::Relaxed)
    }

    /// The same pool with a counter of its own: for the library's own
    /// statements (the relay's), which [`Db::query_count`] must not show.
    pub(crate) fn uncounted(&self) -> Db {
        Db {
            queries: Arc::new(AtomicU64::new(0)),
            ..self.clone()
        }
    }

    /// A connection of its own, outside the pool, for a long-lived use
    /// (the relay's session: its lease and its looks at the snapshot),
    /// bounded like every other and named `application_name` in
    /// `pg_stat_activity`.
    pub(crate) fn dedicated(&self, application_name: &str) -> Result<DbConn> {
        Ok(DbConn {
            conn: self
                .pool
                .fresh_with(|connector| connector.connect_named(application_name))?,
            db: self.clone(),
        })
    }

    fn with_conn<T>(&self, work: impl FnOnce(&mut DbConn) -> Result<T>) -> Result<T> {
        // Before the pool: a checkout may connect.
        crate::pg::refuse_async_context()?;
        let mut conn = DbConn {
            conn: self.pool.get("database")?,
            db: self.clone(),
        };
        work(&mut conn)
    }
}

/// One checked-out connection with the pool's counter and deadline.
pub(crate) struct DbConn {
    conn: Conn<PgConnector>,
    db: Db,
}

impl DbConn {
    fn statement(&mut self, sql: &str) -> Result<Statement> {
        let deadline = self.db.deadline;
        self.conn.statement(sql, deadline)
    }

    fn counted(&self) {
        self.db.queries.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn query_opt(&mut self, sql: &str, params: Params<'_>) -> Result<Option<Row>> {
        let statement = self.statement(sql)?;
        self.counted();
        let deadline = self.db.deadline;
        self.conn.pg.query_opt(&statement, params, deadline)
    }

    pub(crate) fn query(&mut self, sql: &str, params: Params<'_>) -> Result<Vec<Row>> {
        let statement = self.statement(sql)?;
        self.counted();
        let deadline = self.db.deadline;
        self.conn.pg.query(&statement, params, deadline)
    }

    pub(crate) fn execute(&mut self, sql: &str, params: Params<'_>) -> Result<u64> {
        let statement = self.statement(sql)?;
        self.counted();
        let deadline = self.db.deadline;
        self.conn.pg.execute(&statement, params, deadline)
    }

    pub(crate) fn batch_execute(&mut self, sql: &str) -> Result<()> {
        self.counted();
        let deadline = self.db.deadline;
        self.conn.pg.batch_execute(sql, deadline)
    }

    pub(crate) fn is_broken(&self) -> bool {
        self.conn.pg.is_broken()
    }
}

/// Statements of one [`Db::transaction`], all on its connection.
pub struct Transaction<'a> {
    conn: &'a mut Conn<PgConnector>,
    db: &'a Db,
    /// `COMMIT` or `ROLLBACK` went through. If not (a panic in the work, a
    /// failed rollback), the connection is dropped rather than handed to the
    /// next caller in the middle of a transaction.
    finished: bool,
}

impl Transaction<'_> {
    fn run<T>(
        &mut self,
        sql: &str,
        go: impl FnOnce(&mut PgConnection, &Statement, Duration) -> Result<T>,
    ) -> Result<T> {
        let deadline = self.db.deadline;
        let statement = self.conn.statement(sql, deadline)?;
        self.db.queries.fetch_add(1, Ordering::Relaxed);
        go(&mut self.conn.pg, &statement, deadline)
    }

    fn finish(&mut self, commit: bool) -> Result<()> {
        let deadline = self.db.deadline;
        if !commit {
            self.conn.pg.batch_execute("ROLLBACK", deadline)?;
            self.finished = true;
            return Ok(());
        }
        // Postgres answers `COMMIT` of a transaction in which a statement
        // failed (and the work swallowed the error) with `ROLLBACK`, a
        // command tag tokio-postgres does not hand out: such a transaction
        // would read as committed. Any statement but `COMMIT`/`ROLLBACK`
        // fails in it (25P02), so a `SELECT` sent in the same round trip
        // tells, at no extra latency.
        match self.conn.pg.batch_execute("SELECT; COMMIT", deadline) {
            Ok(()) => {
                self.finished = true;
                Ok(())
            }
            Err(err) if in_failed_transaction(&err) => {
                self.conn.pg.batch_execute("ROLLBACK", deadline)?;
                self.finished = true;
                Err(err
                    .reworded("transaction rolled back by the database: a statement in it failed"))
            }
            Err(err) => Err(err),
        }
    }

    /// As [`Db::query_opt`], inside the transaction.
    ///
    /// # Errors
    /// As [`Db::query_opt`].
    pub fn query_opt(&mut self, sql: &str, params: Params<'_>) -> Result<Option<Row>> {
        self.run(sql, |pg, s, d| pg.query_opt(s, params, d))
    }

    /// [`query_opt`](Self::query_opt) under its old name; see
    /// [`Db::query_one`].
    ///
    /// # Errors
    /// As [`Db::query_opt`].
    #[deprecated(since = "0.2.0", note = "returns an Option: call `query_opt`")]
    pub fn query_one(&mut self, sql: &str, params: Params<'_>) -> Result<Option<Row>> {
        self.query_opt(sql, params)
    }

    /// As [`Db::query`], inside the transaction.
    ///
    /// # Errors
    /// As [`Db::query_opt`].
    pub fn query(&mut self, sql: &str, params: Params<'_>) -> Result<Vec<Row>> {
        self.run(sql, |pg, s, d| pg.query(s, params, d))
    }

    /// As [`Db::batch_execute`], inside the transaction.
    ///
    /// # Errors
    /// As [`Db::query_opt`].
    pub fn batch_execute(&mut self, sql: &str) -> Result<()> {
        self.db.queries.fetch_add(1, Ordering::Relaxed);
        self.conn.pg.batch_execute(sql, self.db.deadline)
    }

    /// As [`Db::execute`], inside the transaction.
    ///
    /// # Errors
    /// As [`Db::query_opt`].
    pub fn execute(&mut self, sql: &str, params: Params<'_>) -> Result<u64> {
        self.run(sql, |pg, s, d| pg.execute(s, params, d))
    }
}

impl Drop for Transaction<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.conn.pg.mark_broken();
        }
    }
}

/// 25P02 in_failed_sql_transaction: the transaction is aborted.
fn in_failed_transaction(err: &Error) -> bool {
    err.postgres().is_some_and(|pg| {
        pg.code() == Some(&tokio_postgres::error::SqlState::IN_FAILED_SQL_TRANSACTION)
    })
}

/// A pooled connection with the statements prepared on it.
pub(crate) struct PgConn {
    pg: PgConnection,
    statements: StatementCache<Statement>,
}

impl PgConn {
    fn statement(&mut self, sql: &str, deadline: Duration) -> Result<Statement> {
        if let Some(statement) = self.statements.get(sql) {
            return Ok(statement);
        }
        let statement = self.pg.prepare(sql, deadline)?;
        self.statements.insert(sql, statement.clone());
        Ok(statement)
    }
}

/// At most `capacity` prepared statements, the least recently used evicted
/// first (dropping a `Statement` closes it on the server). Keyed by SQL text,
/// so dynamic SQL cannot grow it without bound. Capacity 0 keeps none: every
/// statement is prepared, run and closed.
struct StatementCache<S> {
    capacity: usize,
    clock: u64,
    entries: HashMap<String, (S, u64)>,
}

impl<S: Clone> StatementCache<S> {
    fn new(capacity: usize) -> Self {
        StatementCache {
            capacity,
            clock: 0,
            entries: HashMap::new(),
        }
    }

    fn get(&mut self, sql: &str) -> Option<S> {
        self.clock += 1;
        let clock = self.clock;
        self.entries.get_mut(sql).map(|(statement, used)| {
            *used = clock;
            statement.clone()
        })
    }

    fn insert(&mut self, sql: &str, statement: S) {
        if self.capacity == 0 {
            return;
        }
        if self.entries.len() >= self.capacity {
            // O(capacity), and only when a new SQL text arrives at a full
            // cache: cheap next to the prepare round trip it follows.
            let oldest = self
                .entries
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(sql, _)| sql.clone());
            if let Some(oldest) = oldest {
                self.entries.remove(&oldest);
            }
        }
        self.clock += 1;
        self.entries.insert(sql.to_owned(), (statement, self.clock));
    }
}

/// Opens the pool's connections.
pub(crate) struct PgConnector {
    config: tokio_postgres::Config,
    tls: tokio_postgres_rustls::MakeRustlsConnect,
    connect_timeout: Duration,
    statement_capacity: usize,
}

impl PgConnector {
    /// A connection like the pool's, under another `application_name`.
    fn connect_named(&self, application_name: &str) -> Result<PgConn> {
        let mut config = self.config.clone();
        config.application_name(application_name);
        Ok(PgConn {
            pg: PgConnection::connect(&config, &self.tls, self.connect_timeout)?,
            statements: StatementCache::new(self.statement_capacity),
        })
    }
}

impl Connector for PgConnector {
    type Conn = PgConn;

    fn connect(&self) -> Result<PgConn> {
        Ok(PgConn {
            pg: PgConnection::connect(&self.config, &self.tls, self.connect_timeout)?,
            statements: StatementCache::new(self.statement_capacity),
        })
    }

    fn is_broken(&self, conn: &mut PgConn) -> bool {
        conn.pg.is_broken()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statement_cache_evicts_the_least_recently_used() {
        let mut cache = StatementCache::new(2);
        cache.insert("a", 1);
        cache.insert("b", 2);
        assert_eq!(cache.get("a"), Some(1)); // "b" is now the oldest
        cache.insert("c", 3);
        assert_eq!(cache.get("b"), None);
        assert_eq!(cache.get("a"), Some(1));
        assert_eq!(cache.get("c"), Some(3));
        assert_eq!(cache.entries.len(), 2);
    }

    #[test]
    fn statement_cache_of_zero_keeps_nothing() {
        let mut cache = StatementCache::new(0);
        cache.insert("a", 1);
        assert_eq!(cache.get("a"), None);
    }
}
