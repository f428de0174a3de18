//! Hop reports, report requests and the response annotation text.

use hopwatch_proto::v1::{Direction as PDirection, Hop, ReportRequest};
use prost::Message;

use crate::config::Direction;
use crate::flags;

/// Longest path kept in a report.
pub const MAX_PATH_LEN: usize = 512;

/// The proto direction.
pub fn proto_direction(d: Direction) -> PDirection {
    match d {
        Direction::Inbound => PDirection::Inbound,
        Direction::Outbound => PDirection::Outbound,
    }
}

/// `:path` without the query string (and fragment), bounded.
pub fn path_without_query(path: &str) -> String {
    let end = path.find(['?', '#']).unwrap_or(path.len());
    let mut p = path.get(..end).unwrap_or_default();
    if p.len() > MAX_PATH_LEN {
        let mut cut = MAX_PATH_LEN;
        while cut > 0 && !p.is_char_boundary(cut) {
            cut -= 1;
        }
        p = p.get(..cut).unwrap_or_default();
    }
    p.to_string()
}

/// Fills the response fields of a hop.
pub fn set_response(hop: &mut Hop, code: u64, mask: u64, details: String) {
    hop.response_code = u32::try_from(code).unwrap_or(u32::MAX);
    hop.response_flags = mask;
    hop.response_flag_names = flags::decode(mask);
    hop.response_code_details = details;
}

/// Who sends a report: the sidecar's pod, namespace and service account (node metadata).
#[derive(Debug, Clone, Copy, Default)]
pub struct Reporter<'a> {
    /// `NAME`
    pub pod: &'a str,
    /// `NAMESPACE`
    pub namespace: &'a str,
    /// `SERVICE_ACCOUNT`
    pub service_account: &'a str,
}

/// The `ReportRequest` of a batch, prost-encoded.
pub fn encode_request(hops: Vec<Hop>, from: Reporter<'_>, dropped: u64) -> Vec<u8> {
    ReportRequest {
        hops,
        reporter_pod: from.pod.to_string(),
        reporter_namespace: from.namespace.to_string(),
        reporter_service_account: from.service_account.to_string(),
        dropped_since_last_batch: dropped,
    }
    .encode_to_vec()
}

/// The annotation header value of one hop:
/// `dir=outbound; workload=W; ns=N; code=503; flags=UF; details=D`; a gRPC hop has
/// `grpc_status=N` after the code (`code=200; grpc_status=14` for Envoy's own replies).
pub fn annotation(
    direction: Direction,
    workload: &str,
    namespace: &str,
    code: u64,
    grpc_status: Option<u32>,
    mask: u64,
    details: &str,
) -> String {
    let mut s = String::with_capacity(96 + details.len());
    s.push_str("dir=");
    s.push_str(direction.as_str());
    s.push_str("; workload=");
    s.push_str(or_dash(workload));
    s.push_str("; ns=");
    s.push_str(or_dash(namespace));
    s.push_str("; code=");
    flags::push_u64(&mut s, code);
    if let Some(g) = grpc_status {
        s.push_str("; grpc_status=");
        flags::push_u64(&mut s, u64::from(g));
    }
    s.push_str("; flags=");
    s.push_str(&flags::format(mask));
    s.push_str("; details=");
    // Header values must not contain control characters.
    for c in or_dash(details).chars().take(256) {
        s.push(if c.is_control() { ' ' } else { c });
    }
    s
}

fn or_dash(s: &str) -> &str {
    if s.is_empty() {
        "-"
    } else {
        s
    }
}

/// The gRPC initial metadata key carrying `report_token`.
pub const TOKEN_METADATA: &str = "x-hopwatch-report-token";

/// The initial metadata of report calls, as a serialized header map (proxy-wasm
/// format): `x-hopwatch-report-token` when a token is configured, else no pair.
pub fn report_metadata(token: &str) -> Vec<u8> {
    if token.is_empty() {
        crate::headers::serialize(&[])
    } else {
        crate::headers::serialize(&[(TOKEN_METADATA, token)])
    }
}

/// Serialises `envoy.config.core.v3.GrpcService{envoy_grpc{cluster_name, authority}}`.
///
/// Envoy first tries to parse the `upstream` argument as that message and uses it as a
/// plain cluster name only when parsing fails. Many plain names parse by accident (e.g.
/// `hopwatch-collector` is a valid protobuf byte string of unknown fields), and Envoy
/// then answers BadArgument for an empty service. Sending the encoded message always
/// names the cluster, and lets us set a valid `:authority` (Envoy defaults it to the
/// cluster name, and Istio's `outbound|9090||host` is refused by HTTP/2 servers).
pub fn grpc_service_bytes(cluster: &str, authority: &str) -> Vec<u8> {
    fn varint(out: &mut Vec<u8>, mut v: usize) {
        while v >= 0x80 {
            out.push((v as u8 & 0x7f) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }
    let mut inner = Vec::with_capacity(cluster.len() + authority.len() + 8);
    inner.push(0x0a);
    varint(&mut inner, cluster.len());
    inner.extend_from_slice(cluster.as_bytes());
    if !authority.is_empty() {
        inner.push(0x12);
        varint(&mut inner, authority.len());
        inner.extend_from_slice(authority.as_bytes());
    }
    let mut out = Vec::with_capacity(inner.len() + 4);
    out.push(0x0a);
    varint(&mut out, inner.len());
    out.extend_from_slice(&inner);
    out
}
