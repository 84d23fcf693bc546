//! PostgreSQL: a pool of blocking connections, prepared statements, and a
//! counter of every statement sent, which is how tests prove a cache hit
//! never reaches the database.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use postgres::types::ToSql;
use postgres::{NoTls, Row, Statement};
use r2d2::ManageConnection;
use r2d2_postgres::PostgresConnectionManager;

use crate::config::Config;
use crate::error::{Error, Result, pool_timeout};

/// Query parameters: values bound to `$1`, `$2`, ... never formatted into SQL.
pub type Params<'a> = &'a [&'a (dyn ToSql + Sync)];

/// A pooled PostgreSQL client that counts the statements it sends.
///
/// Cheap to clone; clones share the pool and the counter. Every method
/// blocks the calling thread; all are safe to call from many threads.
///
/// ```no_run
/// let db = cacheaside::Db::connect(&cacheaside::Config::from_env())?;
/// let row = db.query_one("SELECT $1::bigint + 1", &[&41_i64])?.unwrap();
/// assert_eq!(row.get::<_, i64>(0), 42);
/// assert_eq!(db.query_count(), 1);
/// # Ok::<(), cacheaside::Error>(())
/// ```
#[derive(Clone)]
pub struct Db {
    pool: r2d2::Pool<PgManager>,
    queries: Arc<AtomicU64>,
}

impl Db {
    /// Opens the pool (and its first idle connection) for `config.database_url`.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidArgument`](crate::ErrorKind) for an unparsable URL;
    /// [`ErrorKind::Timeout`](crate::ErrorKind) when no connection could be
    /// made within `pool_timeout`.
    pub fn connect(config: &Config) -> Result<Db> {
        let mut pg: postgres::Config = config
            .database_url
            .parse()
            .map_err(|e| Error::invalid_argument("database URL").with_source(e))?;
        pg.connect_timeout(config.connect_timeout);
        pg.options(&format!(
            "-c statement_timeout={}",
            config.statement_timeout.as_millis()
        ));
        let manager = PgManager(PostgresConnectionManager::new(pg, NoTls));
        let pool = r2d2::Pool::builder()
            .max_size(config.db_pool_size)
            .min_idle(Some(config.pool_min_idle.min(config.db_pool_size)))
            .connection_timeout(config.pool_timeout)
            // No validation query on checkout: it would cost a round trip per
            // statement. A connection that broke is seen by `has_broken` when
            // it comes back, and the statement that found it fails with a
            // database error the caller can retry.
            .test_on_check_out(false)
            .build(manager)
            .map_err(|e| pool_timeout("database", e))?;
        Ok(Db {
            pool,
            queries: Arc::new(AtomicU64::new(0)),
        })
    }

    /// Runs a statement that returns at most one row; `Ok(None)` for no row.
    ///
    /// The statement is prepared once per pooled connection and reused.
    ///
    /// # Errors
    /// [`ErrorKind::Database`](crate::ErrorKind) when Postgres refuses it or
    /// it returns more than one row; [`ErrorKind::Timeout`](crate::ErrorKind)
    /// for a pool checkout or `statement_timeout`.
    pub fn query_one(&self, sql: &str, params: Params<'_>) -> Result<Option<Row>> {
        self.with_statement(sql, |client, stmt| client.query_opt(stmt, params))
    }

    /// Runs a statement and returns all its rows.
    ///
    /// # Errors
    /// As [`Db::query_one`].
    pub fn query(&self, sql: &str, params: Params<'_>) -> Result<Vec<Row>> {
        self.with_statement(sql, |client, stmt| client.query(stmt, params))
    }

    /// Runs a statement and returns how many rows it changed.
    ///
    /// # Errors
    /// As [`Db::query_one`].
    pub fn execute(&self, sql: &str, params: Params<'_>) -> Result<u64> {
        self.with_statement(sql, |client, stmt| client.execute(stmt, params))
    }

    /// Runs one or more `;`-separated statements without parameters (schema
    /// set-up). Counts as one statement.
    ///
    /// # Errors
    /// As [`Db::query_one`].
    pub fn batch_execute(&self, sql: &str) -> Result<()> {
        let mut conn = self.checkout()?;
        self.queries.fetch_add(1, Ordering::Relaxed);
        conn.client.batch_execute(sql)?;
        Ok(())
    }

    /// How many statements this pool has sent to Postgres since it opened
    /// (executions; the one-time prepare of each SQL text is not counted).
    pub fn query_count(&self) -> u64 {
        self.queries.load(Ordering::Relaxed)
    }

    fn checkout(&self) -> Result<r2d2::PooledConnection<PgManager>> {
        self.pool.get().map_err(|e| pool_timeout("database", e))
    }

    fn with_statement<T>(
        &self,
        sql: &str,
        run: impl FnOnce(&mut postgres::Client, &Statement) -> Result<T, postgres::Error>,
    ) -> Result<T> {
        let mut conn = self.checkout()?;
        let PgConn { client, statements } = &mut *conn;
        let stmt = match statements.get(sql) {
            Some(stmt) => stmt.clone(),
            None => {
                let stmt = client.prepare(sql)?;
                statements.insert(sql.to_owned(), stmt.clone());
                stmt
            }
        };
        self.queries.fetch_add(1, Ordering::Relaxed);
        Ok(run(client, &stmt)?)
    }
}

/// A pooled connection with the statements prepared on it.
pub(crate) struct PgConn {
    client: postgres::Client,
    statements: HashMap<String, Statement>,
}

/// `r2d2_postgres`'s manager, extended with a per-connection statement cache
/// so a miss costs one round trip (bind + execute), not two (prepare too).
struct PgManager(PostgresConnectionManager<NoTls>);

impl ManageConnection for PgManager {
    type Connection = PgConn;
    type Error = postgres::Error;

    fn connect(&self) -> Result<PgConn, postgres::Error> {
        Ok(PgConn {
            client: self.0.connect()?,
            statements: HashMap::new(),
        })
    }

    fn is_valid(&self, conn: &mut PgConn) -> Result<(), postgres::Error> {
        self.0.is_valid(&mut conn.client)
    }

    fn has_broken(&self, conn: &mut PgConn) -> bool {
        self.0.has_broken(&mut conn.client)
    }
}
