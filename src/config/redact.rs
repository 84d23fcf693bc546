//! [`redact_url`]: URLs and connection strings without their passwords,
//! for logs, messages and `Debug`.

/// `url` with every password replaced by `***`, for logs and messages:
/// the password of `scheme://user:password@host` URLs (each of a comma
/// list), `password=` and `pass=` query parameters (Postgres's and
/// `redis+unix://`'s; names compared case-insensitively after
/// percent-decoding, so `pass%77ord=` is one too), and `password` in a
/// Postgres `key = value` connection string (spaces around `=`, quoted or
/// not). A key=value string it cannot parse loses everything from the
/// first `pass` on, rather than risk showing it.
///
/// ```
/// use cacheaside::redact_url;
/// assert_eq!(redact_url("redis://app:s3cret@cache:6379/0"), "redis://app:***@cache:6379/0");
/// assert_eq!(redact_url("host=db user=app password=s3cret"), "host=db user=app password=***");
/// assert_eq!(redact_url("redis+unix:///run/redis.sock?pass=s3cret"), "redis+unix:///run/redis.sock?pass=***");
/// assert_eq!(redact_url("redis://127.0.0.1:6379/"), "redis://127.0.0.1:6379/");
/// ```
pub fn redact_url(url: &str) -> String {
    if !url.contains("://") {
        return redact_key_values(url);
    }
    let mut out = String::with_capacity(url.len());
    for (i, part) in url.split(',').enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&redact_query(&redact_one(part)));
    }
    out
}

/// The userinfo password of one `scheme://user:password@host/...` URL.
fn redact_one(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let rest = &url[scheme_end + 3..];
    let authority = &rest[..rest.find(['/', '?']).unwrap_or(rest.len())];
    let Some(at) = authority.rfind('@') else {
        return url.to_owned();
    };
    let userinfo = &authority[..at];
    match userinfo.find(':') {
        Some(colon) => format!(
            "{}://{}:***{}",
            &url[..scheme_end],
            &userinfo[..colon],
            &rest[at..]
        ),
        None => url.to_owned(),
    }
}

/// True for a parameter name that carries a password: `password` or
/// `pass`, in any case, percent-encoded or not.
fn is_password_name(name: &str) -> bool {
    let decoded = percent_decode(name.trim()).to_ascii_lowercase();
    decoded == "password" || decoded == "pass"
}

/// `%XX` sequences decoded (others kept as they are), as bytes read as
/// Latin-1: enough to compare a name with an ASCII one.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| char::from(b).to_digit(16);
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
        {
            out.push(char::from((h * 16 + l) as u8));
            i += 3;
            continue;
        }
        out.push(char::from(bytes[i]));
        i += 1;
    }
    out
}

/// The password parameters of a URL's query string (`?a=1&password=x`).
fn redact_query(url: &str) -> String {
    let Some(question) = url.find('?') else {
        return url.to_owned();
    };
    let (head, query) = url.split_at(question + 1);
    let params: Vec<String> = query
        .split('&')
        .map(|param| match param.split_once('=') {
            Some((name, _)) if is_password_name(name) => format!("{name}=***"),
            _ => param.to_owned(),
        })
        .collect();
    format!("{head}{}", params.join("&"))
}

/// The password of a Postgres `key = value` connection string; the text
/// is kept as it was around it.
fn redact_key_values(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    loop {
        // Spaces before the key.
        let key_start = rest.len() - rest.trim_start().len();
        out.push_str(&rest[..key_start]);
        rest = &rest[key_start..];
        if rest.is_empty() {
            return out;
        }
        let key_end = rest
            .find(|c: char| c == '=' || c.is_whitespace())
            .unwrap_or(rest.len());
        let key = &rest[..key_end];
        let after_key = &rest[key_end..];
        let Some(value) = after_key.trim_start().strip_prefix('=') else {
            // Not key=value: show nothing that may follow a password.
            return unparsed(out, rest);
        };
        let value = value.trim_start();
        let value_start = rest.len() - value.len();
        out.push_str(&rest[..value_start]);
        let value_len = if let Some(quoted) = value.strip_prefix('\'') {
            // A quoted value ends at the first unescaped quote.
            let mut escaped = false;
            let close = quoted.char_indices().find_map(|(i, c)| match c {
                '\\' if !escaped => {
                    escaped = true;
                    None
                }
                '\'' if !escaped => Some(i),
                _ => {
                    escaped = false;
                    None
                }
            });
            match close {
                Some(i) => i + 2,
                // Unterminated: the rest is this value.
                None if is_password_name(key) => return out + "***",
                None => return unparsed(out, value),
            }
        } else {
            value.find(char::is_whitespace).unwrap_or(value.len())
        };
        if is_password_name(key) {
            out.push_str("***");
        } else {
            out.push_str(&value[..value_len]);
        }
        rest = &value[value_len..];
    }
}

/// The end of a key=value string that did not parse: shown unless it may
/// hold a password.
fn unparsed(mut out: String, rest: &str) -> String {
    match rest.to_ascii_lowercase().find("pass") {
        Some(at) => {
            out.push_str(&rest[..at]);
            out.push_str("***");
        }
        None => out.push_str(rest),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        for (url, shown) in [
            ("redis://:pw@h:1/", "redis://:***@h:1/"),
            ("redis://alice:pw@h/0", "redis://alice:***@h/0"),
            ("redis://alice@h/0", "redis://alice@h/0"),
            ("rediss://u:p@a@h:1", "rediss://u:***@h:1"),
            (
                "redis://u:p1@h:1,redis://u:p2@h:2",
                "redis://u:***@h:1,redis://u:***@h:2",
            ),
            ("postgres://app:pw@db/test", "postgres://app:***@db/test"),
            (
                "postgres://db/test?password=pw&sslmode=require",
                "postgres://db/test?password=***&sslmode=require",
            ),
            (
                "host=db password='p w\\' x' user=a",
                "host=db password=*** user=a",
            ),
            ("host=db PASSWORD=pw", "host=db PASSWORD=***"),
        ] {
            assert_eq!(redact_url(url), shown, "{url}");
        }
    }

    #[test]
    fn every_password_form_is_redacted() {
        for (url, shown) in [
            (
                "redis+unix:///run/redis.sock?db=1&pass=s3cret",
                "redis+unix:///run/redis.sock?db=1&pass=***",
            ),
            (
                "unix:///run/redis.sock?pass=s3cret",
                "unix:///run/redis.sock?pass=***",
            ),
            (
                "host=db password = s3cret user=a",
                "host=db password = *** user=a",
            ),
            (
                "host=db password= 's3 cret' user=a",
                "host=db password= *** user=a",
            ),
            ("host=db password =s3cret", "host=db password =***"),
            (
                "postgres://db/test?pass%77ord=s3cret&sslmode=require",
                "postgres://db/test?pass%77ord=***&sslmode=require",
            ),
            (
                "postgres://db/test?%50ASSWORD=s3cret",
                "postgres://db/test?%50ASSWORD=***",
            ),
            (
                "postgres://u:p1@h1:5432,h2:5432/db?password=s3cret",
                "postgres://u:***@h1:5432,h2:5432/db?password=***",
            ),
            ("host=a,b password=s3cret,x", "host=a,b password=***"),
            ("host=db oops password=s3cret", "host=db oops ***"),
            ("host=db password='s3cret", "host=db password=***"),
        ] {
            assert_eq!(redact_url(url), shown, "{url}");
        }
    }
}
