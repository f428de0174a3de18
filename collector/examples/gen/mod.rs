//! Synthetic hop batches shared by the bench and load examples: traces of 6 hops
//! (3 calls), every 50th trace failing with UF.

use hopwatch_proto::v1::{Direction, Hop, ReportRequest, TagSource, TraceContext};
use prost::Message;

pub fn hop(t: u64, i: u64, base: u64) -> Hop {
    let services = ["productpage", "reviews", "ratings", "details", "gateway"];
    let inbound = i.is_multiple_of(2);
    let svc = services[(i.div_ceil(2) % 5) as usize];
    let dest = services[((i / 2 + 1) % 5) as usize];
    Hop {
        trace_id: format!("{:032x}", (t as u128) << 40 | 0xabcdef),
        span_id: format!("{:016x}", t * 16 + i / 2 * 2 + 1),
        upstream_span_id: if inbound {
            String::new()
        } else {
            format!("{:016x}", t * 16 + (i / 2 + 1) * 2 + 1)
        },
        request_id: format!("{:08x}-1234-5678-9abc-{:012x}", t, i),
        direction: if inbound {
            Direction::Inbound
        } else {
            Direction::Outbound
        } as i32,
        workload: format!("{svc}-v1"),
        namespace: "default".into(),
        pod: format!("{svc}-v1-7d4f8b9c6-{}", t % 3),
        service: svc.into(),
        own_tag: "dev".into(),
        tag_received: "dev.proj1".into(),
        tag_sent: "dev.proj1".into(),
        tag_source: TagSource::Request as i32,
        correlated_tag: "dev.proj1".into(),
        trace_context: if inbound {
            TraceContext::Valid
        } else {
            TraceContext::Propagated
        } as i32,
        authority: format!("{dest}:9080"),
        method: "GET".into(),
        path: format!("/api/v1/{dest}/{}", t % 1000),
        response_code: if t.is_multiple_of(50) { 503 } else { 200 },
        response_flags: if t.is_multiple_of(50) && i == 4 {
            1 << 5
        } else {
            0
        },
        upstream_cluster: format!("outbound|9080||{dest}.default.svc.cluster.local"),
        upstream_host: format!("10.0.{}.{}:9080", t % 4, i),
        downstream_remote_address: format!("10.0.1.{}:{}", i, 30000 + t % 20000),
        downstream_local_address: "10.0.2.2:9080".into(),
        start_time_unix_micros: base + t * 10 + i * 100,
        duration_micros: 10_000 - i * 1000,
        sampled_report: true,
        ..Default::default()
    }
}

pub fn batches(n_hops: u64, base: u64) -> Vec<Vec<u8>> {
    let per_trace = 6;
    let mut out = Vec::new();
    let mut cur = Vec::with_capacity(200);
    for h in 0..n_hops {
        cur.push(hop(h / per_trace, h % per_trace, base));
        if cur.len() == 200 {
            out.push(
                ReportRequest {
                    hops: std::mem::take(&mut cur),
                    ..Default::default()
                }
                .encode_to_vec(),
            );
        }
    }
    if !cur.is_empty() {
        out.push(
            ReportRequest {
                hops: cur,
                ..Default::default()
            }
            .encode_to_vec(),
        );
    }
    out
}
