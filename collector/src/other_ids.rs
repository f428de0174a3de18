//! The correlation ids besides B3 / W3C / `x-request-id` that a hop may carry: the other
//! tracers' trace ids (`sw8`, `uber-trace-id`, `x-datadog-trace-id`, decoded by the
//! filter) and the value of a custom pass-through header (`correlation_headers`).
//!
//! Why: an app that propagates only its own tracer's context, or only a custom id,
//! leaves its hops without a B3 / W3C trace id, and Envoy gives each of its outbound
//! requests a fresh `x-request-id`. Grouped by request id, the inbound hop it served
//! and the outbound hops it made would then fall into different traces and nobody could
//! tell "propagated" from "dropped". Grouping by the id the app did copy keeps them in
//! one trace; the filter already classifies such hops (PROPAGATED / NEW) and restores
//! the tag through the same ids (`TAG_SOURCE_CORRELATED_*`).

use hopwatch_proto::v1::{Hop, TagSource};

/// The other tracers' trace id of a hop (sw8, else uber, else datadog); empty if none.
pub fn other_trace_id(h: &Hop) -> &str {
    [&h.sw8_trace_id, &h.uber_trace_id, &h.datadog_trace_id]
        .into_iter()
        .find(|s| !s.is_empty())
        .map(String::as_str)
        .unwrap_or_default()
}

/// The id a hop's trace group is keyed by: its B3 / W3C trace id, else another tracer's,
/// else its custom correlation id; empty: group by request id.
pub fn group_id(h: &Hop) -> &str {
    if !h.trace_id.is_empty() {
        return &h.trace_id;
    }
    let other = other_trace_id(h);
    if !other.is_empty() {
        return other;
    }
    &h.correlation_id
}

/// Whether the hop carries a trace id of any tracer (B3 / W3C or another's).
pub fn has_trace_id(h: &Hop) -> bool {
    !h.trace_id.is_empty() || !other_trace_id(h).is_empty()
}

/// The tag sources that restored a tag through correlation, with what the app copied.
pub fn restored_through(s: TagSource) -> Option<&'static str> {
    match s {
        TagSource::Correlated => Some("the trace ids or x-request-id"),
        TagSource::CorrelatedSw8 => Some("the SkyWalking sw8 header"),
        TagSource::CorrelatedUber => Some("the Jaeger uber-trace-id header"),
        TagSource::CorrelatedDatadog => Some("the Datadog x-datadog-trace-id header"),
        TagSource::CorrelatedHeader => Some("its pass-through correlation header"),
        _ => None,
    }
}

/// The tag sources where the request itself carried the tag (the header, or a place the
/// filter was told to look in: a baggage member, an alias).
pub fn carried_by_request(s: TagSource) -> bool {
    matches!(
        s,
        TagSource::Request
            | TagSource::Baggage
            | TagSource::AliasHeader
            | TagSource::AliasCookie
            | TagSource::AliasBaggage
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_id_prefers_trace_ids_then_other_tracers_then_custom() {
        let mut h = Hop {
            correlation_id: "my-trace-id=abc".into(),
            request_id: "r".into(),
            ..Hop::default()
        };
        assert_eq!(group_id(&h), "my-trace-id=abc");
        assert!(!has_trace_id(&h));
        h.datadog_trace_id = "123".into();
        assert_eq!(group_id(&h), "123");
        h.uber_trace_id = "00000000000000ab".into();
        assert_eq!(group_id(&h), "00000000000000ab");
        h.sw8_trace_id = "a.b.c".into();
        assert_eq!(group_id(&h), "a.b.c");
        assert!(has_trace_id(&h));
        h.trace_id = "463ac35c9f6413ad".into();
        assert_eq!(group_id(&h), "463ac35c9f6413ad");
    }

    #[test]
    fn sources_restored_and_carried() {
        assert!(restored_through(TagSource::CorrelatedSw8).is_some());
        assert!(restored_through(TagSource::Request).is_none());
        assert!(carried_by_request(TagSource::AliasCookie));
        assert!(!carried_by_request(TagSource::CorrelatedHeader));
    }
}
