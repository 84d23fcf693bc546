//! A blocking PostgreSQL connection with a deadline on everything it does.
//!
//! Guarantees: connecting (TCP, startup, authentication) finishes within
//! `connect_timeout`, and every statement within its deadline, whatever the
//! server or the network does. `statement_timeout` is only asked of the
//! server; a server that is frozen, or a network path that silently drops
//! everything, never answers it, and the kernel would keep a read waiting for
//! a quarter of an hour. So the deadline is kept here, on the client: a
//! statement that misses it fails with [`ErrorKind::Timeout`] and marks the
//! connection broken (its protocol state is unknown), so the pool drops it.
//! TCP keepalives and `tcp_user_timeout` are set as well: they notice a dead
//! peer on an idle pooled connection, which no statement deadline can.
//!
//! The shape is the `postgres` crate's: a current-thread tokio runtime per
//! connection, driven only while a call blocks on it. That crate has no
//! per-call deadline, and its `connect_timeout` covers the TCP connect only,
//! so this module drives `tokio-postgres` itself.
//!
//! [`ErrorKind::Timeout`]: crate::ErrorKind::Timeout

use std::future::{Future, poll_fn};
use std::pin::pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::{AsyncMessage, Row, Socket, Statement};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::error::{Error, ErrorKind, Result};
use crate::observe::report;

/// Query parameters: values bound to `$1`, `$2`, ... never formatted into SQL.
pub type Params<'a> = &'a [&'a (dyn tokio_postgres::types::ToSql + Sync)];

/// A connection's stream: TLS through rustls when the URL asks for it
/// (`sslmode=require`), plain TCP otherwise (the same type either way).
type Stream = <MakeRustlsConnect as MakeTlsConnect<Socket>>::Stream;

/// One open connection. Not `Sync`: a pool hands it to one thread at a time.
pub(crate) struct PgConnection {
    client: tokio_postgres::Client,
    driver: Driver,
}

/// Drives the connection's socket while a call waits (what the server sends
/// unasked, notices and notifications, is read and dropped: nothing here
/// listens).
struct Driver {
    runtime: tokio::runtime::Runtime,
    connection: tokio_postgres::Connection<Socket, Stream>,
    /// The connection reported its end (closed or failed); polling it again
    /// is not allowed.
    ended: bool,
    /// A deadline passed mid-statement: the protocol state is unknown.
    broken: bool,
}

/// Refuses a blocking call on a thread that runs a tokio runtime's async
/// tasks: blocking on our runtime there would panic ("Cannot start a
/// runtime from within a runtime"), and block the caller's executor
/// anyway. Outside any runtime, and on a runtime's blocking threads
/// (`spawn_blocking`), it passes.
///
/// # Errors
/// [`ErrorKind::InvalidArgument`] naming `spawn_blocking`.
pub(crate) fn refuse_async_context() -> Result<()> {
    if in_async_task() {
        return Err(Error::invalid_argument(
            "called from an async task of a tokio runtime, where this blocking call \
             would stall the executor: run it in tokio::task::spawn_blocking",
        ));
    }
    Ok(())
}

/// True while a tokio runtime polls an async task on this thread (a
/// worker, or a `block_on`).
fn in_async_task() -> bool {
    if tokio::runtime::Handle::try_current().is_err() {
        return false;
    }
    // The runtime's handle is current on its blocking threads too, where
    // blocking is what they are for. What tells them apart is the task
    // budget: tokio constrains it (at most 128 units) while it polls an
    // async task and leaves it unconstrained elsewhere. Spend it to see
    // whether it runs out, then give every unit back: a `RestoreOnPending`
    // dropped without `made_progress` restores the budget it saw, so
    // dropping them newest first leaves the budget as it was.
    let mut cx = Context::from_waker(std::task::Waker::noop());
    let mut spent = Vec::with_capacity(129);
    let constrained = loop {
        match tokio::task::coop::poll_proceed(&mut cx) {
            Poll::Ready(unit) => spent.push(unit),
            Poll::Pending => break true,
        }
        if spent.len() > 128 {
            break false;
        }
    };
    while let Some(unit) = spent.pop() {
        drop(unit);
    }
    constrained
}

impl PgConnection {
    /// Connects, with `timeout` bounding the whole handshake (TLS
    /// included, when `config` asks for it).
    pub fn connect(
        config: &tokio_postgres::Config,
        tls: &MakeRustlsConnect,
        timeout: Duration,
    ) -> Result<PgConnection> {
        refuse_async_context()?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| {
                Error::new(ErrorKind::Database, "cannot start a runtime").with_source(e)
            })?;
        // Timers need the runtime's context: build them inside block_on.
        let connected = runtime
            .block_on(async { tokio::time::timeout(timeout, config.connect(tls.clone())).await });
        match connected {
            Ok(Ok((client, connection))) => Ok(PgConnection {
                client,
                driver: Driver {
                    runtime,
                    connection,
                    ended: false,
                    broken: false,
                },
            }),
            Ok(Err(err)) => Err(connect_error(err)),
            Err(_) => Err(Error::timeout(format!(
                "connecting to the database (no answer within {} ms)",
                timeout.as_millis()
            ))),
        }
    }

    /// True once the connection cannot be used again: closed by the server,
    /// failed, or abandoned mid-statement at a deadline.
    pub fn is_broken(&self) -> bool {
        self.driver.broken || self.driver.ended || self.client.is_closed()
    }

    /// Makes the pool drop this connection (its state is unknown).
    pub fn mark_broken(&mut self) {
        self.driver.broken = true;
    }

    pub fn prepare(&mut self, sql: &str, timeout: Duration) -> Result<Statement> {
        let future = self.client.prepare(sql);
        self.driver.block_on(timeout, future)
    }

    pub fn query_opt(
        &mut self,
        statement: &Statement,
        params: Params<'_>,
        timeout: Duration,
    ) -> Result<Option<Row>> {
        let future = self.client.query_opt(statement, params);
        self.driver.block_on(timeout, future)
    }

    pub fn query(
        &mut self,
        statement: &Statement,
        params: Params<'_>,
        timeout: Duration,
    ) -> Result<Vec<Row>> {
        let future = self.client.query(statement, params);
        self.driver.block_on(timeout, future)
    }

    pub fn execute(
        &mut self,
        statement: &Statement,
        params: Params<'_>,
        timeout: Duration,
    ) -> Result<u64> {
        let future = self.client.execute(statement, params);
        self.driver.block_on(timeout, future)
    }

    /// Runs `;`-separated statements without parameters (simple protocol).
    pub fn batch_execute(&mut self, sql: &str, timeout: Duration) -> Result<()> {
        let future = self.client.batch_execute(sql);
        self.driver.block_on(timeout, future)
    }
}

impl Driver {
    /// Blocks until `future` resolves or `timeout` passes, driving the socket
    /// meanwhile.
    fn block_on<T>(
        &mut self,
        timeout: Duration,
        future: impl Future<Output = Result<T, tokio_postgres::Error>>,
    ) -> Result<T> {
        refuse_async_context()?;
        let mut future = pin!(future);
        let (connection, ended) = (&mut self.connection, &mut self.ended);
        let outcome = self.runtime.block_on(async {
            tokio::time::timeout(
                timeout,
                poll_fn(|cx| {
                    // A connection that failed or closed fails the call at
                    // once: its in-flight statement's reply can never come.
                    if let Err(err) = Driver::pump(connection, ended, cx) {
                        return Poll::Ready(Err(db_error(err)));
                    }
                    match future.as_mut().poll(cx) {
                        Poll::Ready(result) => Poll::Ready(result.map_err(db_error)),
                        Poll::Pending if *ended => Poll::Ready(Err(Error::new(
                            ErrorKind::Database,
                            "the database closed the connection",
                        ))),
                        Poll::Pending => Poll::Pending,
                    }
                }),
            )
            .await
        });
        match outcome {
            Ok(result) => {
                if result.is_err() && *ended {
                    self.broken = true;
                }
                result
            }
            Err(_) => {
                self.broken = true;
                Err(Error::timeout(format!(
                    "database statement (no answer within {} ms)",
                    timeout.as_millis()
                )))
            }
        }
    }

    /// Reads what the server sent until the socket has nothing more.
    fn pump(
        connection: &mut tokio_postgres::Connection<Socket, Stream>,
        ended: &mut bool,
        cx: &mut Context<'_>,
    ) -> Result<(), tokio_postgres::Error> {
        while !*ended {
            match connection.poll_message(cx) {
                Poll::Ready(Some(Ok(AsyncMessage::Notice(notice)))) => log_notice(&notice),
                Poll::Ready(Some(Ok(_))) => {}
                Poll::Ready(Some(Err(err))) => {
                    *ended = true;
                    return Err(err);
                }
                Poll::Ready(None) => *ended = true,
                Poll::Pending => break,
            }
        }
        Ok(())
    }
}

/// A notice the server sent with a reply (a `RAISE WARNING` in a trigger, a
/// deprecation, an implicit index): to the log, a warning at `warn`, the
/// rest at `info` (`debug` for the server's debug messages).
fn log_notice(notice: &tokio_postgres::error::DbError) {
    use tokio_postgres::error::Severity;
    let (code, message) = (notice.code().code(), notice.message());
    match notice.parsed_severity() {
        Some(Severity::Warning) => report!(warn, "postgres warning {code}: {message}"),
        Some(Severity::Debug) => report!(debug, "postgres debug {code}: {message}"),
        _ => report!(
            info,
            "postgres {} {code}: {message}",
            notice.severity().to_lowercase()
        ),
    }
}

impl From<tokio_postgres::Error> for Error {
    fn from(err: tokio_postgres::Error) -> Self {
        db_error(err)
    }
}

/// What a failed statement means to a caller.
pub(crate) fn db_error(err: tokio_postgres::Error) -> Error {
    // 57014 query_canceled is what statement_timeout raises.
    if err.code() == Some(&tokio_postgres::error::SqlState::QUERY_CANCELED) {
        return Error::new(ErrorKind::Timeout, "timed out: database statement").with_source(err);
    }
    Error::new(ErrorKind::Database, "database query failed").with_source(err)
}

/// A connect failure, worded so a misconfiguration reads as one.
fn connect_error(err: tokio_postgres::Error) -> Error {
    use tokio_postgres::error::SqlState;
    let why = match err.code() {
        Some(c) if *c == SqlState::INVALID_PASSWORD => "authentication failed",
        Some(c) if *c == SqlState::INVALID_AUTHORIZATION_SPECIFICATION => "authentication failed",
        Some(c) if *c == SqlState::INVALID_CATALOG_NAME => "no such database",
        Some(c) if *c == SqlState::TOO_MANY_CONNECTIONS => "too many connections",
        _ if error_chain(&err).contains("invalid peer certificate") => {
            "database TLS handshake failed: the server's certificate is not trusted \
             (Config::database_ca_file names the CA that signed it)"
        }
        _ => "cannot connect to the database",
    };
    Error::new(ErrorKind::Database, why).with_source(err)
}

/// `err` and its sources, joined.
fn error_chain(err: &tokio_postgres::Error) -> String {
    let mut text = err.to_string();
    let mut next = std::error::Error::source(err);
    while let Some(source) = next {
        text.push_str(": ");
        text.push_str(&source.to_string());
        next = source.source();
    }
    text
}

/// The TLS connector for `database_url`'s connections: trusting the CA
/// file when one is named, else the system's root certificates (loaded
/// only when the URL asks for TLS). rustls always checks the certificate
/// and the host name, so `sslmode=require` here means what libpq's
/// `verify-full` does.
pub(crate) fn tls_connector(
    ca_file: Option<&std::path::Path>,
    wants_tls: bool,
) -> Result<MakeRustlsConnect> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    if let Some(path) = ca_file {
        let unreadable = |e: &dyn std::fmt::Display| {
            Error::invalid_argument(format!(
                "cannot read database_ca_file {}: {e}",
                path.display()
            ))
        };
        for cert in CertificateDer::pem_file_iter(path).map_err(|e| unreadable(&e))? {
            let cert = cert.map_err(|e| unreadable(&e))?;
            roots.add(cert).map_err(|e| unreadable(&e))?;
        }
    } else if wants_tls {
        for cert in rustls_native_certs::load_native_certs().certs {
            // A system certificate rustls cannot use is skipped, as libpq
            // skips it.
            let _ = roots.add(cert);
        }
    }
    // rustls 0.23.48 deprecates ring's provider (ring has no post-quantum
    // key exchange) in favour of aws-lc-rs, which needs cmake and a long C
    // build: we keep ring on purpose (see Cargo.toml), for Postgres and
    // Redis alike.
    #[allow(deprecated)]
    let provider = rustls::crypto::ring::default_provider();
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::new(ErrorKind::Database, "cannot set up TLS").with_source(e))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(MakeRustlsConnect::new(config))
}

/// Pins for the type checker that a connection may move between threads.
const _: () = {
    const fn movable<T: Send>() {}
    movable::<PgConnection>();
};
