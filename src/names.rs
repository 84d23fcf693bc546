//! Names callers choose for the patterns' Redis keys and channels
//! (rate-limit subjects, pub/sub channels and patterns), and the one check
//! that keeps each of them inside its namespace's cluster hash tag.
//!
//! A name is non-empty, at most [`MAX_NAME_LEN`] bytes, and holds no `{`,
//! `}` or control character: a brace would end or nest the hash tag that
//! [`Cache::redis_key`](crate::Cache::redis_key) wraps it in, and a control
//! character has no business in a key or a log line.

use crate::error::{Error, Result};

/// The longest subject or channel name, in bytes.
pub(crate) const MAX_NAME_LEN: usize = 512;

/// Checks a subject, channel or pattern; `what` names it in the error.
pub(crate) fn validate_name(what: &str, name: &str) -> Result<()> {
    if name.is_empty() {
        return Err(Error::invalid_argument(format!("{what} must not be empty")));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(Error::invalid_argument(format!(
            "{what} is {} bytes long; at most {MAX_NAME_LEN} are allowed",
            name.len()
        )));
    }
    if name.chars().any(|c| c == '{' || c == '}' || c.is_control()) {
        return Err(Error::invalid_argument(format!(
            "{what} {name:?} may not contain '{{', '}}' or control characters"
        )));
    }
    Ok(())
}

/// Escapes the characters a Redis glob (`PSUBSCRIBE`, `SCAN MATCH`) treats
/// as a pattern, so a namespace is matched literally.
pub(crate) fn escape_glob(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        for ok in [
            "user:42",
            "a",
            "ip:127.0.0.1",
            "ünïcode",
            &"x".repeat(MAX_NAME_LEN),
        ] {
            assert!(validate_name("subject", ok).is_ok(), "{ok}");
        }
        let long = "x".repeat(MAX_NAME_LEN + 1);
        for bad in ["", "a{b", "a}b", "a\nb", "\0", &long] {
            let err = validate_name("subject", bad).unwrap_err();
            assert_eq!(err.kind(), crate::ErrorKind::InvalidArgument, "{bad:?}");
            assert!(err.to_string().contains("subject"), "{err}");
        }
    }

    #[test]
    fn globs_are_escaped() {
        assert_eq!(escape_glob("app[1]:*?\\"), "app\\[1\\]:\\*\\?\\\\");
        assert_eq!(escape_glob("plain:"), "plain:");
    }
}
