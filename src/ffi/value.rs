//! How a C value (any bytes) is stored in the engine's JSON entries.
//!
//! Text stays readable: bytes that are valid UTF-8 are stored as a JSON
//! string, exactly what a Rust `get_or_load::<String>` on the same key
//! stores, so C and Rust callers share such keys. Other bytes (protobuf,
//! msgpack, a compressed blob) are stored as `{"base64":"<standard,
//! padded base64>"}`: a JSON string cannot hold them, and a JSON array of
//! numbers would take up to four bytes per byte where base64 takes 4/3.
//! The two forms cannot be confused (a string is not an object), so every
//! value reads back as the bytes it was set from.

use serde::{Deserialize, Serialize};

/// A C value as the engine caches it; see the module docs for the format.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "Stored", into = "Stored")]
pub(crate) struct Value(pub(crate) Vec<u8>);

/// The JSON forms of a [`Value`].
#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum Stored {
    Text(String),
    Binary { base64: String },
}

impl From<Value> for Stored {
    fn from(value: Value) -> Stored {
        match String::from_utf8(value.0) {
            Ok(text) => Stored::Text(text),
            Err(not_text) => Stored::Binary {
                base64: encode(not_text.as_bytes()),
            },
        }
    }
}

impl TryFrom<Stored> for Value {
    type Error = &'static str;

    /// Fails for a `base64` field that is not base64: a corrupt entry,
    /// which the engine deletes and reloads.
    fn try_from(stored: Stored) -> Result<Value, Self::Error> {
        match stored {
            Stored::Text(text) => Ok(Value(text.into_bytes())),
            Stored::Binary { base64 } => decode(&base64).map(Value),
        }
    }
}

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 (RFC 4648 §4) with `=` padding.
fn encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The inverse of [`encode`]; rejects anything it would not produce.
fn decode(text: &str) -> Result<Vec<u8>, &'static str> {
    const BAD: &str = "a binary value is not valid base64";
    let text = text.as_bytes();
    if !text.len().is_multiple_of(4) {
        return Err(BAD);
    }
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    let quads = text.len() / 4;
    for (index, quad) in text.chunks(4).enumerate() {
        let padding = quad.iter().rev().take_while(|&&c| c == b'=').count();
        if padding > 2 || (padding > 0 && index + 1 != quads) {
            return Err(BAD);
        }
        let mut n = 0_u32;
        for &c in &quad[..4 - padding] {
            let digit = ALPHABET.iter().position(|&a| a == c).ok_or(BAD)?;
            n = (n << 6) | digit as u32;
        }
        n <<= 6 * padding as u32;
        let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        // Bits the padding hides must be zero, as `encode` leaves them.
        if bytes[3 - padding..].iter().any(|&b| b != 0) {
            return Err(BAD);
        }
        out.extend_from_slice(&bytes[..3 - padding]);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc_4648_vectors() {
        let vectors = [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ];
        for (plain, coded) in vectors {
            assert_eq!(encode(plain.as_bytes()), coded);
            assert_eq!(decode(coded).unwrap(), plain.as_bytes());
        }
        for bad in ["Zg=", "Zg===", "Z===", "Zm9v!A==", "Zg==Zm9v", "Zh=="] {
            assert!(decode(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn text_is_a_json_string_and_other_bytes_are_base64() {
        let text = serde_json::to_string(&Value(b"{\"total\":42}".to_vec())).unwrap();
        assert_eq!(text, r#""{\"total\":42}""#);
        let binary = serde_json::to_string(&Value(vec![0xff, 0x00, 0xfe])).unwrap();
        assert_eq!(binary, r#"{"base64":"/wD+"}"#);
        for json in [text, binary] {
            let back: Value = serde_json::from_str(&json).unwrap();
            assert_eq!(serde_json::to_string(&back).unwrap(), json);
        }
        // Every byte value survives.
        let all: Vec<u8> = (0..=255).collect();
        let json = serde_json::to_vec(&Value(all.clone())).unwrap();
        assert_eq!(serde_json::from_slice::<Value>(&json).unwrap().0, all);
        // A Rust `String` reader sees the text form as its string.
        let json = serde_json::to_vec(&Value(b"hello".to_vec())).unwrap();
        assert_eq!(serde_json::from_slice::<String>(&json).unwrap(), "hello");
    }

    #[test]
    fn a_corrupt_binary_value_does_not_decode() {
        assert!(serde_json::from_str::<Value>(r#"{"base64":"!!"}"#).is_err());
        assert!(serde_json::from_str::<Value>("42").is_err());
    }
}
