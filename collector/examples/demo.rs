//! Sends a few constructed call chains (one healthy, one per typical break) to a running
//! collector, for trying the CLI:
//!   cargo run -p hopwatch-collector --example demo -- http://127.0.0.1:9090
//!   hopwatch breaks; hopwatch trace 4bf92f3577b34da6a3ce929d0e0e0002

use hopwatch_proto::v1::collector_client::CollectorClient;
use hopwatch_proto::v1::{Direction, Hop, ReportRequest, TagSource, TraceContext};

fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

#[allow(clippy::too_many_arguments)]
fn hop(
    dir: Direction,
    trace: &str,
    wl: &str,
    svc: &str,
    span: &str,
    up: &str,
    dest: &str,
    start: u64,
    dur: u64,
    tag: &str,
) -> Hop {
    let outbound = dir == Direction::Outbound;
    Hop {
        trace_id: trace.into(),
        span_id: span.into(),
        upstream_span_id: up.into(),
        request_id: format!("{trace}-{}", if outbound { up } else { span }),
        direction: dir as i32,
        workload: wl.into(),
        namespace: "shop".into(),
        pod: format!("{wl}-5d9c7b8f4-x2x7q"),
        service: svc.into(),
        tag_received: tag.into(),
        tag_sent: tag.into(),
        tag_source: if tag.is_empty() {
            TagSource::None
        } else {
            TagSource::Request
        } as i32,
        correlated_tag: if outbound { tag.into() } else { String::new() },
        trace_context: if outbound {
            TraceContext::Propagated
        } else {
            TraceContext::Valid
        } as i32,
        authority: format!("{}:8080", if outbound { dest } else { svc }),
        method: "GET".into(),
        path: format!("/api/{}", if outbound { dest } else { svc }),
        response_code: 200,
        upstream_cluster: if outbound {
            format!("outbound|8080||{dest}.shop.svc.cluster.local")
        } else {
            "inbound|8080||".into()
        },
        upstream_host: "10.244.1.17:8080".into(),
        start_time_unix_micros: start,
        duration_micros: dur,
        sampled_report: true,
        ..Default::default()
    }
}

/// frontend → cart → pricing, tagged `tag`.
fn chain(trace: &str, base: u64, tag: &str) -> Vec<Hop> {
    use Direction::{Inbound as I, Outbound as O};
    vec![
        hop(
            I,
            trace,
            "frontend",
            "frontend",
            "a000000000000001",
            "",
            "",
            base,
            20_000,
            tag,
        ),
        hop(
            O,
            trace,
            "frontend",
            "frontend",
            "a000000000000001",
            "a000000000000002",
            "cart",
            base + 1_000,
            15_000,
            tag,
        ),
        hop(
            I,
            trace,
            "cart-v1",
            "cart",
            "a000000000000002",
            "",
            "",
            base + 1_200,
            14_000,
            tag,
        ),
        hop(
            O,
            trace,
            "cart-v1",
            "cart",
            "a000000000000002",
            "a000000000000003",
            "pricing",
            base + 3_000,
            8_000,
            tag,
        ),
        hop(
            I,
            trace,
            "pricing-v1",
            "pricing",
            "a000000000000003",
            "",
            "",
            base + 3_200,
            7_500,
            tag,
        ),
    ]
}

#[tokio::main]
async fn main() {
    let url = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "http://127.0.0.1:9090".into());
    let mut c = CollectorClient::connect(url).await.expect("connect");
    let base = now_us() - 1_000_000;
    let mut hops = chain("4bf92f3577b34da6a3ce929d0e0e0001", base, "dev.proj1");
    // cart's app drops the tag; its sidecar re-stamps cart's own "dev".
    let mut t = chain("4bf92f3577b34da6a3ce929d0e0e0002", base, "dev.proj1");
    t[3].tag_received.clear();
    t[3].correlated_tag.clear();
    t[3].tag_sent = "dev".into();
    t[3].tag_source = TagSource::Environment as i32;
    t[4].tag_received = "dev".into();
    t[4].tag_sent = "dev".into();
    hops.extend(t);
    // pricing's app does not listen on 0.0.0.0: its inbound sidecar answers 503 UF.
    let mut t = chain("4bf92f3577b34da6a3ce929d0e0e0003", base, "");
    t[4].response_code = 503;
    t[4].response_flags = 1 << 5;
    t[4].response_flag_names = vec!["UF".into()];
    t[4].response_code_details =
        "upstream_reset_before_response_started{remote_connection_failure}".into();
    for h in &mut t[..4] {
        h.response_code = 503;
    }
    hops.extend(t);
    // pricing has no sidecar: cart's call is answered but never reported inbound.
    let mut t = chain("4bf92f3577b34da6a3ce929d0e0e0004", base, "");
    t.pop();
    hops.extend(t);
    let r = c
        .report(ReportRequest {
            hops,
            reporter_pod: "demo".into(),
            reporter_namespace: "shop".into(),
            dropped_since_last_batch: 0,
            ..Default::default()
        })
        .await
        .expect("report");
    println!(
        "accepted {} hops; findings appear after --trace-quiet",
        r.into_inner().accepted
    );
}
