//! Virtual-environment tags: validation and resolution.
//!
//! A tag is at most [`MAX_TAG_LEN`] bytes of `[A-Za-z0-9._-]`. Resolution on the
//! outbound side, in order: the request's own valid tag (kept, never overwritten), the
//! tag of the inbound request this one is correlated with, the workload's own tag, none.

use std::rc::Rc;

use hopwatch_proto::v1::TagSource;

/// Longest accepted tag, in bytes.
pub const MAX_TAG_LEN: usize = 128;

/// True when `tag` is a non-empty, at most [`MAX_TAG_LEN`] bytes string of
/// `[A-Za-z0-9._-]`.
pub fn is_valid(tag: &str) -> bool {
    !tag.is_empty()
        && tag.len() <= MAX_TAG_LEN
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// `s` cut to at most [`MAX_TAG_LEN`] bytes on a char boundary (for reporting a
/// malformed value verbatim).
pub fn truncate(s: &str) -> String {
    if s.len() <= MAX_TAG_LEN {
        return s.to_string();
    }
    let mut end = MAX_TAG_LEN;
    while end > 0 && !s.is_char_boundary(end) {
        end -= 1;
    }
    s.get(..end).unwrap_or_default().to_string()
}

/// The outcome of tag resolution for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagDecision {
    /// The tag header as received (truncated), empty if absent.
    pub received: String,
    /// The received value was present but invalid.
    pub malformed: bool,
    /// The tag the request leaves with (empty: none). Shared with the correlation
    /// store's copy or the workload's own tag: stamping a tag allocates nothing.
    pub sent: Rc<str>,
    /// How `sent` was decided.
    pub source: TagSource,
    /// What the filter must do to the request's tag header.
    pub edit: TagEdit,
}

/// The header change resolution asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TagEdit {
    /// Leave the request as it is.
    Keep,
    /// Set the tag header to this value.
    Set(Rc<str>),
    /// Remove the (invalid) tag header.
    Remove,
}

/// Outbound resolution: `received` is the request's tag header (if any),
/// `correlated` the tag of the correlated inbound request (if any, already valid),
/// `own` this workload's own tag (if any, already valid).
pub fn resolve_outbound(
    received: Option<&str>,
    correlated: Option<&Rc<str>>,
    own: Option<&Rc<str>>,
) -> TagDecision {
    let (received_s, malformed) = match received {
        Some(r) => (truncate(r), !is_valid(r)),
        None => (String::new(), false),
    };
    if let Some(r) = received {
        if !malformed {
            return TagDecision {
                received: received_s,
                malformed,
                sent: Rc::from(r),
                source: TagSource::Request,
                edit: TagEdit::Keep,
            };
        }
    }
    let pick = |t: &Rc<str>, source| TagDecision {
        received: received_s.clone(),
        malformed,
        sent: t.clone(),
        source,
        edit: TagEdit::Set(t.clone()),
    };
    if let Some(c) = correlated.filter(|c| is_valid(c)) {
        return pick(c, TagSource::Correlated);
    }
    if let Some(o) = own.filter(|o| is_valid(o)) {
        return pick(o, TagSource::Environment);
    }
    TagDecision {
        received: received_s.clone(),
        malformed,
        sent: Rc::from(""),
        source: TagSource::None,
        edit: if malformed {
            TagEdit::Remove
        } else {
            TagEdit::Keep
        },
    }
}

/// Inbound resolution: a valid tag is kept (source `REQUEST`), an invalid one removed,
/// none left as none. The inbound side never stamps.
pub fn resolve_inbound(received: Option<&str>) -> TagDecision {
    match received {
        Some(r) if is_valid(r) => TagDecision {
            received: r.to_string(),
            malformed: false,
            sent: Rc::from(r),
            source: TagSource::Request,
            edit: TagEdit::Keep,
        },
        Some(r) => TagDecision {
            received: truncate(r),
            malformed: true,
            sent: Rc::from(""),
            source: TagSource::None,
            edit: TagEdit::Remove,
        },
        None => TagDecision {
            received: String::new(),
            malformed: false,
            sent: Rc::from(""),
            source: TagSource::None,
            edit: TagEdit::Keep,
        },
    }
}

/// Lowercase name of a tag source, for metrics.
pub fn source_name(s: TagSource) -> &'static str {
    match s {
        TagSource::Request => "request",
        TagSource::Correlated => "correlated",
        TagSource::Environment => "environment",
        TagSource::None | TagSource::Unspecified => "none",
    }
}
