//! Virtual-environment tags: validation and resolution.
//!
//! A tag is at most [`MAX_TAG_LEN`] bytes of `[A-Za-z0-9._-]`. Resolution on the
//! outbound side, in order: the request's own valid tag (kept, never overwritten), the
//! tag of the inbound request this one is correlated with, the workload's own tag, none.
//! When the tag header is absent, a tag found elsewhere on the request (the
//! `tag_baggage_key` baggage member, a `tag_aliases` entry: [`Found`]) takes the
//! header's place, on both sides, and is set as the tag header.

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
    /// Where the tag was found when not in the tag header (`BAGGAGE` / `ALIAS_*`).
    pub found_in: Option<FoundIn>,
}

/// Where on the request a [`Found`] tag was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FoundIn {
    /// The `tag_baggage_key` member of `baggage`.
    Baggage,
    /// Entry `i` of `tag_aliases`.
    Alias(usize),
}

/// A tag value found elsewhere than the tag header, with its source
/// (`BAGGAGE` / `ALIAS_*`). Not yet validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// The value as found (decoded).
    pub value: String,
    /// How it will be reported.
    pub source: TagSource,
    /// Where it was.
    pub found_in: FoundIn,
}

/// A valid tag, its source and where it was found (`None`: the tag header).
type Picked = (Rc<str>, TagSource, Option<FoundIn>);

/// The tag header when present, else a valid `found` tag (`Ok`), else whether a found
/// value was invalid (`Err(Some(value))`).
fn header_or_found(
    received: Option<&str>,
    found: Option<Found>,
) -> Result<Option<Picked>, Option<String>> {
    match (received, found) {
        (Some(r), _) if is_valid(r) => Ok(Some((Rc::from(r), TagSource::Request, None))),
        (Some(_), _) => Err(None),
        (None, Some(f)) if is_valid(&f.value) => Ok(Some((
            Rc::from(f.value.as_str()),
            f.source,
            Some(f.found_in),
        ))),
        (None, Some(f)) => Err(Some(truncate(&f.value))),
        (None, None) => Ok(None),
    }
}

/// Outbound resolution with the places besides the tag header: `found` (baggage
/// member or alias, looked for only when the header is absent), and the source of the
/// correlated tag (`CORRELATED`, or `CORRELATED_*` for the other tracers' ids).
pub fn resolve_outbound_found(
    received: Option<&str>,
    found: Option<Found>,
    correlated: Option<(&Rc<str>, TagSource)>,
    own: Option<&Rc<str>>,
) -> TagDecision {
    let from_found = received.is_none();
    match header_or_found(received, found) {
        Ok(Some((t, source, found_in))) if from_found => TagDecision {
            received: String::new(),
            malformed: false,
            edit: TagEdit::Set(t.clone()),
            sent: t,
            source,
            found_in,
        },
        Err(Some(bad)) => {
            let mut d = resolve_outbound_source(None, correlated, own);
            d.received = bad;
            d.malformed = true;
            d
        }
        _ => resolve_outbound_source(received, correlated, own),
    }
}

/// Inbound resolution with the places besides the tag header (see
/// [`resolve_outbound_found`]); the inbound side still never stamps.
pub fn resolve_inbound_found(received: Option<&str>, found: Option<Found>) -> TagDecision {
    if received.is_some() {
        return resolve_inbound(received);
    }
    match header_or_found(None, found) {
        Ok(Some((t, source, found_in))) => TagDecision {
            received: String::new(),
            malformed: false,
            edit: TagEdit::Set(t.clone()),
            sent: t,
            source,
            found_in,
        },
        Err(Some(bad)) => TagDecision {
            received: bad,
            malformed: true,
            sent: Rc::from(""),
            source: TagSource::None,
            edit: TagEdit::Keep,
            found_in: None,
        },
        _ => resolve_inbound(None),
    }
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
    resolve_outbound_source(
        received,
        correlated.map(|c| (c, TagSource::Correlated)),
        own,
    )
}

/// [`resolve_outbound`] with the source a correlated tag is reported with.
pub fn resolve_outbound_source(
    received: Option<&str>,
    correlated: Option<(&Rc<str>, TagSource)>,
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
                found_in: None,
            };
        }
    }
    let pick = |t: &Rc<str>, source| TagDecision {
        received: received_s.clone(),
        malformed,
        sent: t.clone(),
        source,
        edit: TagEdit::Set(t.clone()),
        found_in: None,
    };
    if let Some((c, source)) = correlated.filter(|(c, _)| is_valid(c)) {
        return pick(c, source);
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
        found_in: None,
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
            found_in: None,
        },
        Some(r) => TagDecision {
            received: truncate(r),
            malformed: true,
            sent: Rc::from(""),
            source: TagSource::None,
            edit: TagEdit::Remove,
            found_in: None,
        },
        None => TagDecision {
            received: String::new(),
            malformed: false,
            sent: Rc::from(""),
            source: TagSource::None,
            edit: TagEdit::Keep,
            found_in: None,
        },
    }
}

/// The first valid value of a repeated tag header, else the first value (reported as
/// malformed). Why the first valid one: a client or app that appended its tag to a copy
/// the request already had still meant a tag; the later copies are noise.
pub fn first_valid<'a>(values: &[&'a str]) -> Option<&'a str> {
    values
        .iter()
        .copied()
        .find(|v| is_valid(v))
        .or_else(|| values.first().copied())
}

/// The edit of a request whose tag header appeared several times: it leaves with one
/// value (the decided tag) or none, never with the copies Envoy would forward as they
/// are (50 duplicates reached the app before). An edit already decided is kept.
pub fn collapse_repeated(d: &TagDecision) -> TagEdit {
    match &d.edit {
        TagEdit::Keep if d.sent.is_empty() => TagEdit::Remove,
        TagEdit::Keep => TagEdit::Set(d.sent.clone()),
        other => other.clone(),
    }
}

/// Lowercase name of a tag source, for metrics.
pub fn source_name(s: TagSource) -> &'static str {
    match s {
        TagSource::Request => "request",
        TagSource::Correlated
        | TagSource::CorrelatedSw8
        | TagSource::CorrelatedUber
        | TagSource::CorrelatedDatadog
        | TagSource::CorrelatedHeader => "correlated",
        TagSource::Environment => "environment",
        TagSource::Baggage => "baggage",
        TagSource::AliasHeader | TagSource::AliasCookie | TagSource::AliasBaggage => "alias",
        TagSource::None | TagSource::Unspecified => "none",
    }
}
