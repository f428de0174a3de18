//! Realistic hop batches for the collector benchmark, generated cheaply enough that the
//! load generator does not eat the 2-core machine the collector runs on.
//!
//! A *round* is 200 traces of a call chain `frontend -> cart -> pricing` as the hopwatch
//! filters report it: the root inbound hop at frontend, then per call the caller's
//! outbound hop and the callee's inbound hop sharing the trace id, the span ids (the
//! outbound `upstream_span_id` is the callee's `span_id`) and the request id, with
//! consistent timing. A known share of each round is broken, one trace per kind, each
//! broken kind at a workload of its own per template (so distinct findings can be
//! counted): the app dropped the tag (restored by hopwatch: `TAG_NOT_PROPAGATED`), the
//! app started a new trace (`TRACE_NOT_PROPAGATED`), the connection to the callee failed
//! (`UF`, `UPSTREAM_FAILURE`), the call left with the workload's own tag
//! (`TAG_DROPPED`), the callee has no sidecar (`HOP_MISSING`).
//!
//! The hops of a round are encoded once per *template* (a `ReportRequest` of at most 200
//! hops per chunk) with sentinel trace ids, request ids and timestamps; sending a chunk
//! copies its bytes and overwrites the sentinels in place (same lengths) with the round's
//! unique ids and current times. Cost per chunk: a memcpy and a few hundred small writes.

use hopwatch_proto::v1::{Direction, Hop, ReportRequest, Sampled, TagSource, TraceContext};
use prost::Message;

/// How the traffic of a round carries its context.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Shape {
    /// B3 trace context on every hop (a mesh with a tracer): hops join by trace id and
    /// span ids.
    #[default]
    Traced,
    /// Istio's default: no tracer, only `x-request-id`. Hops carry no trace id or span
    /// ids and join by request id, with calls linked to the request they serve through
    /// the per-pod index (more work per hop for the collector than span joins).
    Untraced,
}

impl std::str::FromStr for Shape {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "traced" => Ok(Shape::Traced),
            "untraced" => Ok(Shape::Untraced),
            other => Err(format!(
                "unknown shape {other:?}: expected traced or untraced"
            )),
        }
    }
}

impl std::fmt::Display for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Shape::Traced => "traced",
            Shape::Untraced => "untraced",
        })
    }
}

/// Hops per Report batch.
pub const BATCH: usize = 200;
/// Traces per round.
pub const TRACES_PER_ROUND: usize = 200;
pub const NAMESPACE: &str = "shop";
pub const TAG: &str = "dev.proj1";

/// The planted break kinds (one trace each per round), as `BreakKind` names, with the
/// prefix of the workload where each is located.
pub const PLANTED: &[(&str, &str)] = &[
    ("TAG_NOT_PROPAGATED", "tnp"),
    ("TRACE_NOT_PROPAGATED", "tnt"),
    ("UPSTREAM_FAILURE", "uf"),
    ("TAG_DROPPED", "tdr"),
    ("HOP_MISSING", "hm"),
];

/// The workload where planted kind `k` of template `t` is located.
pub fn planted_workload(k: usize, t: usize) -> String {
    format!("{}-{t}", PLANTED[k].1)
}

const SENT_TIME_BASE: u64 = 1_000_000_000_000_000; // 8-byte varint, like real times
const SENT_TIME_STRIDE: u64 = 100_000;

fn sentinel_trace(variant: u32, idx: usize) -> String {
    format!("fee1dead{variant:08x}{idx:016x}")
}
fn sentinel_request(variant: u32, idx: usize) -> String {
    format!("fee1dead-{variant:04x}-4000-8000-{idx:012x}")
}
fn sentinel_time(idx: usize, delta_us: u64) -> u64 {
    SENT_TIME_BASE + idx as u64 * SENT_TIME_STRIDE + delta_us
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum PatchKind {
    Trace { variant: u32, idx: u32 },
    Request { variant: u32, idx: u32 },
    Time { delta_us: u32 },
}

#[derive(Debug, Clone, Copy)]
struct Patch {
    offset: u32,
    kind: PatchKind,
}

/// One encoded chunk of a round template with the places to patch.
#[derive(Debug, Clone)]
pub struct Chunk {
    bytes: Vec<u8>,
    patches: Vec<Patch>,
    pub hops: usize,
}

/// All chunks of one round template.
#[derive(Debug, Clone)]
pub struct RoundTemplate {
    pub chunks: Vec<Chunk>,
    pub hops: usize,
    /// Traces per planted kind in this round (index into [`PLANTED`]).
    pub planted: Vec<usize>,
}

/// Times are spread over `round_step_us` per round: the hops of round r start at
/// `t0 + r * round_step_us`.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    pub t0_us: u64,
    pub round_step_us: u64,
}

/// Per-run identity: trace ids of different runs never collide.
#[derive(Debug, Clone, Copy)]
pub struct RunIds {
    /// Top bit clear (the collector's trace-id key space).
    pub nonce: u64,
}

impl RunIds {
    pub fn trace_id(&self, variant: u32, seq: u64) -> String {
        format!("{:016x}{:016x}", self.nonce, seq * 4 + variant as u64)
    }
}

struct HopSpec<'a> {
    dir: Direction,
    workload: &'a str,
    pod: String,
    own_tag: &'a str,
    trace_variant: u32,
    span: &'a str,
    parent: &'a str,
    upstream_span: &'a str,
    tag_received: &'a str,
    tag_sent: &'a str,
    tag_source: TagSource,
    correlated: &'a str,
    tctx: TraceContext,
    missing: Vec<String>,
    dest: &'a str,
    delta_us: u64,
    duration_us: u64,
    code: u32,
    flags: u64,
    details: &'a str,
    upstream_host: &'a str,
}

/// Removes what a tracer would have added: the trace id, span ids, the trace-context
/// verdicts (an untraced hop has no trace headers at all).
fn untraced(mut h: Hop) -> Hop {
    h.trace_id.clear();
    h.span_id.clear();
    h.parent_span_id.clear();
    h.upstream_span_id.clear();
    h.sampled = Sampled::Unspecified as i32;
    h.trace_context = TraceContext::Missing as i32;
    h.missing_trace_headers.clear();
    h
}

fn hop(idx: usize, s: HopSpec<'_>) -> Hop {
    let outbound = s.dir == Direction::Outbound;
    let (cluster, authority, service, route) = if outbound {
        (
            format!("outbound|8080||{}.{NAMESPACE}.svc.cluster.local", s.dest),
            format!("{}.{NAMESPACE}.svc.cluster.local:8080", s.dest),
            s.workload.to_string(),
            "8080".to_string(),
        )
    } else {
        (
            "inbound|8080||".to_string(),
            format!("{}.{NAMESPACE}.svc.cluster.local:8080", s.workload),
            s.workload.to_string(),
            "default".to_string(),
        )
    };
    Hop {
        trace_id: sentinel_trace(s.trace_variant, idx),
        span_id: s.span.into(),
        parent_span_id: s.parent.into(),
        sampled: Sampled::Yes as i32,
        request_id: sentinel_request(s.trace_variant, idx),
        w3c_trace_id: String::new(),
        upstream_span_id: s.upstream_span.into(),
        direction: s.dir as i32,
        workload: s.workload.into(),
        namespace: NAMESPACE.into(),
        pod: s.pod,
        service,
        own_tag: s.own_tag.into(),
        tag_received: s.tag_received.into(),
        tag_sent: s.tag_sent.into(),
        tag_source: s.tag_source as i32,
        tag_malformed: false,
        correlated_tag: s.correlated.into(),
        trace_context: s.tctx as i32,
        trace_detail: String::new(),
        missing_trace_headers: s.missing,
        authority,
        method: "GET".into(),
        path: format!("/api/v1/{}", if outbound { s.dest } else { s.workload }),
        response_code: s.code,
        response_flags: s.flags,
        response_flag_names: flag_names(s.flags),
        response_code_details: s.details.into(),
        upstream_cluster: cluster,
        upstream_host: if outbound {
            s.upstream_host.into()
        } else {
            "127.0.0.6:8080".into()
        },
        downstream_remote_address: if outbound {
            "10.1.0.9:41234".into()
        } else {
            "10.1.0.3:52110".into()
        },
        downstream_local_address: if outbound {
            "10.96.12.4:8080".into()
        } else {
            "10.1.0.9:8080".into()
        },
        upstream_local_address: if outbound {
            "10.1.0.9:39876".into()
        } else {
            "127.0.0.6:44321".into()
        },
        route_name: route,
        start_time_unix_micros: sentinel_time(idx, s.delta_us),
        duration_micros: s.duration_us,
        sampled_report: true,
        ..Default::default()
    }
}

fn flag_names(flags: u64) -> Vec<String> {
    if flags & 32 != 0 {
        vec!["UF".into()]
    } else {
        vec![]
    }
}

/// The hops of one trace of a round: kind `None` healthy, `Some(k)` planted kind `k`.
/// `t` is the template number (distinct workloads per template), `i` the trace index.
fn trace_hops(t: usize, i: usize, kind: Option<usize>) -> Vec<(usize, Hop)> {
    let mid = match kind {
        Some(k) => planted_workload(k, t),
        None => "cart".to_string(),
    };
    let pod = |w: &str, n: usize| format!("{w}-5d8f7c9b4-{:05x}", n);
    // A few pods per healthy workload; broken workloads have one pod per template.
    let pa = pod("frontend", (t * 7 + i) % 16);
    let pb = if kind.is_some() {
        pod(&mid, 0)
    } else {
        pod("cart", (t * 3 + i) % 16)
    };
    let pc = pod("pricing", (t * 5 + i) % 16);
    let (s0, s1, s3, s3new) = (
        "a1b2c3d4e5f60001",
        "a1b2c3d4e5f60002",
        "a1b2c3d4e5f60003",
        "b7c8d9e0f1a20004",
    );
    let mut hops = Vec::new();
    // h0: frontend inbound (root).
    let uf = kind == Some(2);
    let code_up = if uf { 503 } else { 200 };
    hops.push((
        0,
        hop(
            i,
            HopSpec {
                dir: Direction::Inbound,
                workload: "frontend",
                pod: pa.clone(),
                own_tag: TAG,
                trace_variant: 0,
                span: s0,
                parent: "",
                upstream_span: "",
                tag_received: TAG,
                tag_sent: TAG,
                tag_source: TagSource::Request,
                correlated: "",
                tctx: TraceContext::Valid,
                missing: vec![],
                dest: "",
                delta_us: 0,
                duration_us: 4000,
                code: code_up,
                flags: 0,
                details: "via_upstream",
                upstream_host: "",
            },
        ),
    ));
    // h1: frontend -> mid outbound.
    hops.push((
        1,
        hop(
            i,
            HopSpec {
                dir: Direction::Outbound,
                workload: "frontend",
                pod: pa,
                own_tag: TAG,
                trace_variant: 0,
                span: s1,
                parent: s0,
                upstream_span: s1,
                tag_received: TAG,
                tag_sent: TAG,
                tag_source: TagSource::Request,
                correlated: TAG,
                tctx: TraceContext::Propagated,
                missing: vec![],
                dest: &mid,
                delta_us: 200,
                duration_us: 3500,
                code: code_up,
                flags: 0,
                details: "via_upstream",
                upstream_host: "10.1.0.21:8080",
            },
        ),
    ));
    // h2: mid inbound.
    let mid_own = if kind == Some(3) { "dev" } else { TAG };
    hops.push((
        2,
        hop(
            i,
            HopSpec {
                dir: Direction::Inbound,
                workload: &mid,
                pod: pb.clone(),
                own_tag: mid_own,
                trace_variant: 0,
                span: s1,
                parent: s0,
                upstream_span: "",
                tag_received: TAG,
                tag_sent: TAG,
                tag_source: TagSource::Request,
                correlated: "",
                tctx: TraceContext::Valid,
                missing: vec![],
                dest: "",
                delta_us: 250,
                duration_us: 3300,
                code: code_up,
                flags: 0,
                details: "via_upstream",
                upstream_host: "",
            },
        ),
    ));
    // h3: mid -> pricing outbound (where the planted breaks are).
    let mut h3 = HopSpec {
        dir: Direction::Outbound,
        workload: &mid,
        pod: pb,
        own_tag: mid_own,
        trace_variant: 0,
        span: s3,
        parent: s1,
        upstream_span: s3,
        tag_received: TAG,
        tag_sent: TAG,
        tag_source: TagSource::Request,
        correlated: TAG,
        tctx: TraceContext::Propagated,
        missing: vec![],
        dest: "pricing",
        delta_us: 400,
        duration_us: 2000,
        code: 200,
        flags: 0,
        details: "via_upstream",
        upstream_host: "10.1.0.33:8080",
    };
    let mut h4_variant = 0;
    let mut h4_span = s3;
    let mut h4_parent = s1;
    let mut with_h4 = true;
    match kind {
        Some(0) => {
            // The app dropped the tag; hopwatch restored it from the trace.
            h3.tag_received = "";
            h3.tag_source = TagSource::Correlated;
        }
        Some(1) => {
            // The app started a new trace (kept the tag): its call and the callee's
            // inbound hop are in another trace.
            h3.trace_variant = 1;
            h3.span = s3new;
            h3.parent = "";
            h3.upstream_span = s3new;
            h3.tctx = TraceContext::New;
            h3.correlated = "";
            h3.missing = vec!["x-b3-parentspanid".into()];
            h4_variant = 1;
            h4_span = s3new;
            h4_parent = "";
        }
        Some(2) => {
            // Connection to pricing refused: Envoy answered 503 UF; no inbound hop.
            h3.code = 503;
            h3.flags = 32;
            h3.details = "upstream_reset_before_response_started{remote_connection_failure}";
            h3.duration_us = 300;
            with_h4 = false;
        }
        Some(3) => {
            // The call left with the workload's own tag instead of the received one.
            h3.tag_received = "";
            h3.tag_sent = "dev";
            h3.tag_source = TagSource::Environment;
            h3.correlated = "";
        }
        Some(4) => {
            // pricing answered but reported no inbound hop (no sidecar / no filter).
            with_h4 = false;
        }
        _ => {}
    }
    hops.push((3, hop(i, h3)));
    if with_h4 {
        hops.push((
            4,
            hop(
                i,
                HopSpec {
                    dir: Direction::Inbound,
                    workload: "pricing",
                    pod: pc,
                    own_tag: TAG,
                    trace_variant: h4_variant,
                    span: h4_span,
                    parent: h4_parent,
                    upstream_span: "",
                    tag_received: TAG,
                    tag_sent: TAG,
                    tag_source: TagSource::Request,
                    correlated: "",
                    tctx: TraceContext::Valid,
                    missing: vec![],
                    dest: "",
                    delta_us: 450,
                    duration_us: 1800,
                    code: 200,
                    flags: 0,
                    details: "via_upstream",
                    upstream_host: "",
                },
            ),
        ));
    }
    hops
}

/// Builds round template `t`: traces 0..5 are the planted kinds, the rest healthy.
pub fn round_template(t: usize) -> RoundTemplate {
    round_template_shaped(t, Shape::Traced)
}

/// [`round_template`] in traffic shape `shape`. Untraced, the planted kind
/// TRACE_NOT_PROPAGATED is an app that dropped `x-request-id` (Envoy made a new one):
/// the same hops with the request id of variant 1 from the call on.
pub fn round_template_shaped(t: usize, shape: Shape) -> RoundTemplate {
    let mut all: Vec<(usize, usize, Hop)> = Vec::new();
    let mut planted = vec![0; PLANTED.len()];
    for i in 0..TRACES_PER_ROUND {
        // Planted traces spread through the round.
        let kind = (i % 40 == 7).then_some((i / 40) % PLANTED.len());
        if let Some(k) = kind {
            planted[k] += 1;
        }
        for (pos, h) in trace_hops(t, i, kind) {
            let h = match shape {
                Shape::Traced => h,
                Shape::Untraced => untraced(h),
            };
            all.push((pos, i, h));
        }
    }
    // Chunks of 200 hops in reporting order: all frontend hops, then cart's, then
    // pricing's (a sidecar batches its own hops).
    all.sort_by_key(|(pos, i, _)| (*pos, *i));
    let hops = all.len();
    let chunks = all
        .chunks(BATCH)
        .map(|c| {
            let req = ReportRequest {
                reporter_pod: c[0].2.pod.clone(),
                reporter_namespace: NAMESPACE.into(),
                dropped_since_last_batch: 0,
                hops: c.iter().map(|(_, _, h)| h.clone()).collect(),
                ..Default::default()
            };
            let bytes = req.encode_to_vec();
            let patches = find_patches(&bytes);
            Chunk {
                bytes,
                patches,
                hops: c.len(),
            }
        })
        .collect();
    RoundTemplate {
        chunks,
        hops,
        planted,
    }
}

fn find_patches(b: &[u8]) -> Vec<Patch> {
    let mut out = Vec::new();
    let mut i = 0;
    while i + 10 <= b.len() {
        if b[i..].starts_with(b"fee1dead") {
            if b.get(i + 8) == Some(&b'-') && i + 36 <= b.len() {
                let s = std::str::from_utf8(&b[i..i + 36]).expect("ascii sentinel");
                let variant = u32::from_str_radix(&s[9..13], 16).expect("variant");
                let idx = u32::from_str_radix(&s[24..36], 16).expect("idx");
                out.push(Patch {
                    offset: i as u32,
                    kind: PatchKind::Request { variant, idx },
                });
                i += 36;
                continue;
            } else if i + 32 <= b.len() {
                let s = std::str::from_utf8(&b[i..i + 32]).expect("ascii sentinel");
                let variant = u32::from_str_radix(&s[8..16], 16).expect("variant");
                let idx = u32::from_str_radix(&s[16..32], 16).expect("idx");
                out.push(Patch {
                    offset: i as u32,
                    kind: PatchKind::Trace { variant, idx },
                });
                i += 32;
                continue;
            }
        }
        // start_time_unix_micros: field 70, varint: tag bytes 0xB0 0x04.
        if b[i] == 0xB0 && b[i + 1] == 0x04 {
            if let Some((v, len)) = read_varint(&b[i + 2..]) {
                if len == 8
                    && (SENT_TIME_BASE..SENT_TIME_BASE + SENT_TIME_STRIDE * TRACES_PER_ROUND as u64)
                        .contains(&v)
                {
                    let delta = (v - SENT_TIME_BASE) % SENT_TIME_STRIDE;
                    out.push(Patch {
                        offset: (i + 2) as u32,
                        kind: PatchKind::Time {
                            delta_us: delta as u32,
                        },
                    });
                    i += 10;
                    continue;
                }
            }
        }
        i += 1;
    }
    out
}

fn read_varint(b: &[u8]) -> Option<(u64, usize)> {
    let mut v = 0u64;
    for (n, &byte) in b.iter().enumerate().take(10) {
        v |= ((byte & 0x7f) as u64) << (7 * n);
        if byte & 0x80 == 0 {
            return Some((v, n + 1));
        }
    }
    None
}

fn write_varint8(dst: &mut [u8], mut v: u64) {
    for (n, d) in dst.iter_mut().enumerate().take(8) {
        let low = (v & 0x7f) as u8;
        v >>= 7;
        *d = if n < 7 { low | 0x80 } else { low };
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn write_hex(dst: &mut [u8], mut v: u64, digits: usize) {
    for k in (0..digits).rev() {
        dst[k] = HEX[(v & 0xf) as usize];
        v >>= 4;
    }
}

impl Chunk {
    /// The chunk of round `round` (trace `i` gets sequence number round * 200 + i).
    pub fn render(&self, ids: RunIds, round: u64, clock: Clock) -> Vec<u8> {
        let mut b = self.bytes.clone();
        let base_us = clock.t0_us + round * clock.round_step_us;
        for p in &self.patches {
            let o = p.offset as usize;
            match p.kind {
                PatchKind::Trace { variant, idx } => {
                    let seq = round * TRACES_PER_ROUND as u64 + idx as u64;
                    write_hex(&mut b[o..o + 16], ids.nonce, 16);
                    write_hex(&mut b[o + 16..o + 32], seq * 4 + variant as u64, 16);
                }
                PatchKind::Request { variant, idx } => {
                    let seq = round * TRACES_PER_ROUND as u64 + idx as u64;
                    // xxxxxxxx-vvvv-4000-8000-ssssssssssss
                    write_hex(&mut b[o..o + 8], ids.nonce >> 32, 8);
                    write_hex(&mut b[o + 9..o + 13], variant as u64, 4);
                    write_hex(&mut b[o + 24..o + 36], seq, 12);
                }
                PatchKind::Time { delta_us } => {
                    write_varint8(&mut b[o..o + 8], base_us + delta_us as u64);
                }
            }
        }
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_patch_into_valid_unique_reports() {
        let t = round_template(3);
        assert_eq!(t.planted, vec![1; PLANTED.len()]);
        assert_eq!(t.chunks.iter().map(|c| c.hops).sum::<usize>(), t.hops);
        assert!(t.chunks.iter().all(|c| c.hops <= BATCH));
        let ids = RunIds {
            nonce: 0x1234_5678_9abc_def0,
        };
        let clock = Clock {
            t0_us: 1_795_000_000_000_000,
            round_step_us: 1000,
        };
        let mut traces = std::collections::HashSet::new();
        let mut hops = 0;
        for c in &t.chunks {
            let req = ReportRequest::decode(&c.render(ids, 7, clock)[..]).unwrap();
            for h in &req.hops {
                hops += 1;
                assert!(h.trace_id.starts_with("123456789abcdef0"), "{}", h.trace_id);
                assert!(!h.request_id.contains("fee1dead"));
                assert!(h.start_time_unix_micros >= clock.t0_us + 7000);
                assert!(h.start_time_unix_micros < clock.t0_us + 7000 + 10_000);
                traces.insert(h.trace_id.clone());
            }
        }
        assert_eq!(hops, t.hops);
        // 200 traces + one new trace started by the TRACE_NOT_PROPAGATED app.
        assert_eq!(traces.len(), TRACES_PER_ROUND + 1);
        // Another round: other ids.
        let other = ReportRequest::decode(&t.chunks[0].render(ids, 8, clock)[..]).unwrap();
        assert!(!traces.contains(&other.hops[0].trace_id));
    }

    #[test]
    fn untraced_rounds_carry_request_ids_only() {
        let t = round_template_shaped(3, Shape::Untraced);
        assert_eq!(t.planted, vec![1; PLANTED.len()]);
        let ids = RunIds {
            nonce: 0x0abc_def0_1234_5678,
        };
        let clock = Clock {
            t0_us: 1_795_000_000_000_000,
            round_step_us: 1000,
        };
        let mut requests = std::collections::HashSet::new();
        for c in &t.chunks {
            let req = ReportRequest::decode(&c.render(ids, 2, clock)[..]).unwrap();
            for h in &req.hops {
                assert!(h.trace_id.is_empty() && h.span_id.is_empty());
                assert_eq!(h.trace_context, TraceContext::Missing as i32);
                assert!(h.request_id.starts_with("0abcdef0-"), "{}", h.request_id);
                requests.insert(h.request_id.clone());
            }
        }
        // One request id per chain + the new one after the app that dropped it.
        assert_eq!(requests.len(), TRACES_PER_ROUND + 1);
    }
}
