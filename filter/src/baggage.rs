//! W3C Baggage (`baggage` request headers): reading one member and rewriting one member
//! while keeping the others as they came.
//!
//! Format (W3C Baggage, HTTP header format):
//!
//! ```text
//! baggage     := list-member *( OWS "," OWS list-member )
//! list-member := key OWS "=" OWS value *( OWS ";" OWS property )
//! property    := key OWS "=" OWS value / key OWS
//! key         := token
//! value       := *baggage-octet      (anything else percent-encoded, UTF-8)
//! ```
//!
//! Limits (W3C): at most [`MAX_MEMBERS`] list-members, [`MAX_MEMBER_BYTES`] bytes per
//! member and [`MAX_BYTES`] bytes in all. Several `baggage` headers form one list (HTTP
//! list semantics), so they are read together and written back as one header.
//!
//! Why a malformed header is never repaired: the members belong to other tools (an
//! OpenTelemetry SDK, Signadot, mirrord); hopwatch reads its own member only from a
//! well-formed list, and when the list is not well-formed (or a rewrite would break a
//! limit) it leaves the header exactly as it came and only sets the tag header.

use std::borrow::Cow;

use crate::config::is_token;

/// Most list-members of a baggage list.
pub const MAX_MEMBERS: usize = 180;
/// Longest list-member (key, value and properties), bytes.
pub const MAX_MEMBER_BYTES: usize = 4096;
/// Longest baggage list, bytes (several headers counted as one list joined by `,`).
pub const MAX_BYTES: usize = 8192;

/// Why a baggage list was not read (it is then left as it came).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BaggageError {
    /// More than [`MAX_MEMBERS`] list-members.
    #[error("baggage: more than 180 list-members")]
    TooManyMembers,
    /// A list-member longer than [`MAX_MEMBER_BYTES`].
    #[error("baggage: a list-member longer than 4096 bytes")]
    MemberTooLong,
    /// The list is longer than [`MAX_BYTES`].
    #[error("baggage: longer than 8192 bytes")]
    TooLong,
    /// A list-member that is not `key=value[;properties]`.
    #[error("baggage: malformed list-member")]
    Malformed,
}

/// One list-member, borrowed from the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Member<'a> {
    /// The key (a token).
    pub key: &'a str,
    /// The value as it came (percent-encoded, OWS trimmed).
    pub value: &'a str,
    /// The properties after the first `;`, as they came (empty: none).
    pub properties: &'a str,
    /// The whole member, OWS trimmed (copied as is when the list is rewritten).
    pub raw: &'a str,
}

fn ows(s: &str) -> &str {
    s.trim_matches([' ', '\t'])
}

/// A baggage-octet: visible ASCII except DQUOTE, `,`, `;` and `\`.
fn is_baggage_octet(b: u8) -> bool {
    matches!(b, 0x21 | 0x23..=0x2B | 0x2D..=0x3A | 0x3C..=0x5B | 0x5D..=0x7E)
}

fn is_value(v: &str) -> bool {
    v.bytes().all(is_baggage_octet)
}

fn parse_member(m: &str) -> Result<Member<'_>, BaggageError> {
    if m.len() > MAX_MEMBER_BYTES {
        return Err(BaggageError::MemberTooLong);
    }
    let (kv, properties) = match m.split_once(';') {
        Some((kv, p)) => (kv, ows(p)),
        None => (m, ""),
    };
    let (key, value) = kv.split_once('=').ok_or(BaggageError::Malformed)?;
    let (key, value) = (ows(key), ows(value));
    if !is_token(key) || !is_value(value) {
        return Err(BaggageError::Malformed);
    }
    for p in properties.split(';') {
        let p = ows(p);
        let ok = match p.split_once('=') {
            Some((k, v)) => is_token(ows(k)) && is_value(ows(v)),
            None => is_token(p),
        };
        if !ok && !properties.is_empty() {
            return Err(BaggageError::Malformed);
        }
    }
    Ok(Member {
        key,
        value,
        properties,
        raw: m,
    })
}

/// Parses the list formed by all `baggage` headers of a request, in order. Empty list
/// elements (`a=1,,b=2`, allowed by HTTP's list syntax) are skipped.
pub fn parse<'a>(headers: &[&'a str]) -> Result<Vec<Member<'a>>, BaggageError> {
    let total: usize = headers.iter().map(|h| h.len()).sum::<usize>() + headers.len();
    if total > MAX_BYTES + 1 {
        return Err(BaggageError::TooLong);
    }
    let mut members = Vec::new();
    for h in headers {
        for m in h.split(',') {
            let m = ows(m);
            if m.is_empty() {
                continue;
            }
            if members.len() == MAX_MEMBERS {
                return Err(BaggageError::TooManyMembers);
            }
            members.push(parse_member(m)?);
        }
    }
    Ok(members)
}

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Percent-decodes a value; a `%` not followed by two hex digits is kept as it is, and
/// bytes that are not UTF-8 become U+FFFD (as the W3C spec asks).
pub fn percent_decode(v: &str) -> Cow<'_, str> {
    if !v.contains('%') {
        return Cow::Borrowed(v);
    }
    let b = v.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        if c == b'%' {
            let hi = b.get(i + 1).copied().and_then(hex_val);
            let lo = b.get(i + 2).copied().and_then(hex_val);
            if let (Some(hi), Some(lo)) = (hi, lo) {
                out.push(hi << 4 | lo);
                i += 3;
                continue;
            }
        }
        out.push(c);
        i += 1;
    }
    Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}

/// Percent-encodes what is not a baggage-octet (and `%` itself).
pub fn percent_encode(v: &str) -> Cow<'_, str> {
    if v.bytes().all(|b| is_baggage_octet(b) && b != b'%') {
        return Cow::Borrowed(v);
    }
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = String::with_capacity(v.len() * 3);
    for b in v.bytes() {
        if is_baggage_octet(b) && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(
                HEX.get(usize::from(b >> 4)).copied().unwrap_or(b'0'),
            ));
            out.push(char::from(
                HEX.get(usize::from(b & 15)).copied().unwrap_or(b'0'),
            ));
        }
    }
    Cow::Owned(out)
}

/// The decoded value of the first member `key` of the list, or why the list was not
/// readable. `Ok(None)`: a well-formed list without that member.
pub fn get<'a>(headers: &[&'a str], key: &str) -> Result<Option<Cow<'a, str>>, BaggageError> {
    Ok(parse(headers)?
        .into_iter()
        .find(|m| m.key == key)
        .map(|m| percent_decode(m.value)))
}

/// The list with member `key` set to `value` (percent-encoded): the first member of
/// that key gets the new value and keeps its properties, later duplicates and every
/// other member are kept as they came, in order; without such a member it is appended.
/// `None` when the list is not well-formed or the result would break a W3C limit: the
/// caller then leaves the headers as they came.
pub fn with_member(headers: &[&str], key: &str, value: &str) -> Option<String> {
    let members = parse(headers).ok()?;
    let value = percent_encode(value);
    let mut out = String::with_capacity(
        headers.iter().map(|h| h.len() + 1).sum::<usize>() + key.len() + value.len() + 2,
    );
    let mut found = false;
    let mut count = 0usize;
    for m in &members {
        if !out.is_empty() {
            out.push(',');
        }
        count += 1;
        if m.key == key && !found {
            found = true;
            let start = out.len();
            out.push_str(key);
            out.push('=');
            out.push_str(&value);
            if !m.properties.is_empty() {
                out.push(';');
                out.push_str(m.properties);
            }
            if out.len() - start > MAX_MEMBER_BYTES {
                return None;
            }
        } else {
            out.push_str(m.raw);
        }
    }
    if !found {
        if key.len() + 1 + value.len() > MAX_MEMBER_BYTES || count + 1 > MAX_MEMBERS {
            return None;
        }
        if !out.is_empty() {
            out.push(',');
        }
        out.push_str(key);
        out.push('=');
        out.push_str(&value);
    }
    (out.len() <= MAX_BYTES).then_some(out)
}
