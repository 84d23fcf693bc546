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
#[derive(Clone)]
pub struct Error {
    kind: ErrorKind,
    message: String,
    /// Shared, so clones (one failed load's waiters) share it; `source()`
    /// hands out what the `Arc` holds, not the `Arc`, so it downcasts.
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

    /// An [`ErrorKind::Loader`] error wrapping what a custom loader failed
    /// with. The loader's error survives the trip through the engine (and
    /// reaches every single-flight waiter): get it back with
    /// [`downcast_ref`](Self::downcast_ref).
    ///
    /// ```
    /// let err = cacheaside::Error::loader(std::io::Error::other("upstream down"));
    /// assert_eq!(err.kind(), cacheaside::ErrorKind::Loader);
    /// let io = err.downcast_ref::<std::io::Error>().expect("the loader's own error");
    /// assert_eq!(io.to_string(), "upstream down");
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

    /// An [`ErrorKind::CorruptEntry`] error for a session: it names neither
    /// the session (its id is a credential) nor its data.
    pub(crate) fn corrupt_session(why: impl fmt::Display) -> Self {
        Error::new(ErrorKind::CorruptEntry, format!("corrupt session: {why}"))
    }

    pub(crate) fn timeout(what: impl fmt::Display) -> Self {
        Error::new(ErrorKind::Timeout, format!("timed out: {what}"))
    }

    /// The Postgres error behind this one, if there is one.
    pub(crate) fn postgres(&self) -> Option<&tokio_postgres::Error> {
        self.source.as_deref().and_then(|e| e.downcast_ref())
    }

    /// The first error of type `E` in this error's source chain: a
    /// loader's own error (see [`Error::loader`]), or the driver's
    /// (`tokio_postgres::Error`, `redis::RedisError`). `None` when there is
    /// none of that type.
    ///
    /// ```
    /// #[derive(Debug)]
    /// struct NotInStock(u32);
    /// impl std::fmt::Display for NotInStock {
    ///     fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
    ///         write!(f, "item {} is not in stock", self.0)
    ///     }
    /// }
    /// impl std::error::Error for NotInStock {}
    ///
    /// let err = cacheaside::Error::loader(NotInStock(7));
    /// assert_eq!(err.downcast_ref::<NotInStock>().map(|e| e.0), Some(7));
    /// ```
    pub fn downcast_ref<E: StdError + 'static>(&self) -> Option<&E> {
        let mut next = StdError::source(self);
        while let Some(err) = next {
            if let Some(found) = err.downcast_ref::<E>() {
                return Some(found);
            }
            next = err.source();
        }
        None
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

/// Why JSON did not decode, without the input serde quotes in its message
/// (`invalid type: string "…"`, `unknown variant "…"`): a cached value or a
/// session's data may be private, and errors reach logs and
/// `cacheaside_last_error()`.
pub(crate) fn json_error(err: &serde_json::Error) -> String {
    use serde_json::error::Category;
    let what = match err.classify() {
        Category::Io => "could not be read",
        Category::Syntax => "is not valid JSON",
        Category::Data => "does not match the requested type",
        Category::Eof => "ends early",
    };
    format!(
        "the JSON {what} (line {}, column {})",
        err.line(),
        err.column()
    )
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl StdError for Error {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        // What the Arc holds: a `&Arc<dyn Error>` would not downcast to the
        // caller's type.
        self.source
            .as_deref()
            .map(|err| err as &(dyn StdError + 'static))
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
    fn json_errors_quote_no_input() {
        let err = serde_json::from_str::<i64>(r#""s3cret""#).unwrap_err();
        assert!(err.to_string().contains("s3cret"), "serde quotes it: {err}");
        let shown = json_error(&err);
        assert_eq!(
            shown,
            "the JSON does not match the requested type (line 1, column 8)"
        );
        let err = serde_json::from_str::<i64>("{s3cret").unwrap_err();
        assert!(!json_error(&err).contains("s3cret"));
    }

    #[test]
    fn clones_share_the_source() {
        let err = Error::loader(std::io::Error::other("boom"));
        let copy = err.clone();
        assert_eq!(copy.chain(), err.chain());
        assert_eq!(copy.kind(), ErrorKind::Loader);
    }
}
