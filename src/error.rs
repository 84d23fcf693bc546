//! The one error type of the crate.

use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;

/// Which side of the system failed, so a caller can decide what to do.
///
/// The C ABI maps each kind to one `cacheaside_status` code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// PostgreSQL refused or failed a statement, or a connection to it broke.
    Database,
    /// Redis refused or failed a command, or a connection to it broke.
    Cache,
    /// A connect, read, write, statement or pool checkout deadline passed.
    Timeout,
    /// A caller passed something unusable (bad identifier, empty plan, ...).
    InvalidArgument,
    /// A cache entry could not be decoded (the read paths treat it as a miss;
    /// only the raw [`Cache::get_json`](crate::Cache::get_json) reports it).
    CorruptEntry,
    /// A caller-supplied loader returned an error.
    Loader,
    /// A loader panicked; its single-flight waiters get this kind.
    Panicked,
    /// The write-behind backlog is full
    /// ([`Config::write_behind_max_backlog`](crate::Config::write_behind_max_backlog)
    /// changes wait to be flushed): the change was not enqueued, nothing was
    /// dropped, and the caller may retry once workers have caught up.
    BacklogFull,
}

/// The error every fallible function of the crate returns.
///
/// It carries a [`ErrorKind`], a short lowercase message, and the underlying
/// error as its [`source`](std::error::Error::source). It is cheap to clone,
/// which is how one failed single-flight load reaches every waiter.
///
/// ```
/// use cacheaside::{Error, ErrorKind};
/// let err = Error::invalid_argument("plan must not be empty");
/// assert_eq!(err.kind(), ErrorKind::InvalidArgument);
/// assert_eq!(err.to_string(), "invalid argument: plan must not be empty");
/// ```
#[derive(Clone, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    kind: ErrorKind,
    message: String,
    #[source]
    source: Option<Arc<dyn StdError + Send + Sync>>,
    /// The server is unavailable (refused, dropped, timed out, rejected our
    /// credentials), as opposed to refusing one request: what the circuit
    /// breaker counts.
    outage: bool,
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            source: None,
            outage: false,
        }
    }

    /// Marks the error as one that says the server is unavailable.
    pub(crate) fn outage(mut self) -> Self {
        self.outage = true;
        self
    }

    /// True when the server is unavailable (refused, dropped or timed out a
    /// connection, rejected the credentials), not merely refusing one
    /// request.
    pub(crate) fn is_outage(&self) -> bool {
        self.outage
    }

    pub(crate) fn with_source(mut self, source: impl StdError + Send + Sync + 'static) -> Self {
        self.source = Some(Arc::new(source));
        self
    }

    /// The same error (kind, source) under another message.
    pub(crate) fn reworded(mut self, message: impl Into<String>) -> Self {
        self.message = message.into();
        self
    }

    /// An [`ErrorKind::InvalidArgument`] error with the given explanation.
    pub fn invalid_argument(why: impl fmt::Display) -> Self {
        Error::new(
            ErrorKind::InvalidArgument,
            format!("invalid argument: {why}"),
        )
    }

    /// An [`ErrorKind::Loader`] error wrapping what a custom loader failed with.
    ///
    /// ```
    /// let err = cacheaside::Error::loader(std::io::Error::other("upstream down"));
    /// assert_eq!(err.kind(), cacheaside::ErrorKind::Loader);
    /// ```
    pub fn loader(source: impl StdError + Send + Sync + 'static) -> Self {
        Error::new(ErrorKind::Loader, "loader failed").with_source(source)
    }

    pub(crate) fn corrupt(key: &str, why: impl fmt::Display) -> Self {
        Error::new(
            ErrorKind::CorruptEntry,
            format!("corrupt cache entry at {key:?}: {why}"),
        )
    }

    pub(crate) fn timeout(what: impl fmt::Display) -> Self {
        Error::new(ErrorKind::Timeout, format!("timed out: {what}"))
    }

    /// The Postgres error behind this one, if there is one. (Through
    /// [`source`](std::error::Error::source) a caller sees the `Arc` that
    /// shares it, which does not downcast.)
    pub(crate) fn postgres(&self) -> Option<&tokio_postgres::Error> {
        self.source.as_deref().and_then(|e| e.downcast_ref())
    }

    /// Which side failed.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// True when a deadline passed (connect, I/O, statement, pool checkout or
    /// rebuild-lock wait): retrying later may succeed.
    pub fn is_timeout(&self) -> bool {
        self.kind == ErrorKind::Timeout
    }

    /// True when a write-behind enqueue was refused because the backlog is
    /// full: the change was not taken (retry later, or write it directly).
    pub fn is_backlog_full(&self) -> bool {
        self.kind == ErrorKind::BacklogFull
    }

    /// The message and every source below it, joined by `": "`; what the C ABI
    /// reports through `cacheaside_last_error()`.
    pub fn chain(&self) -> String {
        let mut text = self.message.clone();
        let mut next = self.source();
        while let Some(err) = next {
            text.push_str(": ");
            text.push_str(&err.to_string());
            next = err.source();
        }
        text
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Error")
            .field("kind", &self.kind)
            .field("message", &self.chain())
            .finish()
    }
}

impl From<tokio_postgres::Error> for Error {
    fn from(err: tokio_postgres::Error) -> Self {
        crate::pg::db_error(err)
    }
}

impl From<redis::RedisError> for Error {
    fn from(err: redis::RedisError) -> Self {
        crate::cache::classify(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_includes_sources() {
        let err = Error::loader(std::io::Error::other("boom"));
        assert_eq!(err.to_string(), "loader failed");
        assert_eq!(err.chain(), "loader failed: boom");
        assert!(!err.is_timeout());
    }

    #[test]
    fn clones_share_the_source() {
        let err = Error::loader(std::io::Error::other("boom"));
        let copy = err.clone();
        assert_eq!(copy.chain(), err.chain());
        assert_eq!(copy.kind(), ErrorKind::Loader);
    }
}
