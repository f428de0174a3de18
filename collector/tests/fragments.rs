//! A trace that broke into pieces (an app copied x-request-id but not the trace headers):
//! the TRACE_NOT_PROPAGATED finding's sample is the trace id of the piece the app served
//! (usable with GetTrace / `hopwatch trace`), and GetTrace links the pieces both ways by
//! request id (`fragments`, "continued in" / "continued from").

mod common;

use std::time::{Duration, Instant};

use common::*;
use hopwatch_proto::v1::collector_client::CollectorClient;
use hopwatch_proto::v1::query_client::QueryClient;
use hopwatch_proto::v1::{BreakKind, GetTraceRequest, ListBreaksRequest, ReportRequest};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_trace_pieces_are_linked_and_sampled_by_trace_id() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(fast_settings(), dir.path()).await;
    let t1 = trace_id(61);
    let rid = "5a0d1c52-1f6e-4c4e-9f3b-0c8a4d9e7b21";
    let base = base_us();
    // cart serves a traced request, and calls pricing with only x-request-id copied.
    let mut served = inbound(
        &t1,
        "cart-v1",
        "cart",
        "c000000000000001",
        base,
        10_000,
        "dev",
    );
    served.request_id = rid.into();
    let mut call = outbound(
        "",
        "cart-v1",
        "cart",
        "",
        "",
        "pricing",
        base + 1_000,
        2_000,
        "dev",
    );
    call.request_id = rid.into();
    let mut callee = inbound("", "pricing-v1", "pricing", "", base + 1_100, 1_800, "dev");
    callee.request_id = rid.into();
    let mut c = CollectorClient::connect(s.url()).await.unwrap();
    c.report(ReportRequest {
        hops: vec![served, call, callee],
        ..Default::default()
    })
    .await
    .unwrap();
    let mut q = QueryClient::connect(s.url()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let tnp = loop {
        let bs = q
            .list_breaks(ListBreaksRequest::default())
            .await
            .unwrap()
            .into_inner()
            .breaks;
        if let Some(b) = bs
            .into_iter()
            .find(|b| b.kind == BreakKind::TraceNotPropagated as i32)
        {
            break b;
        }
        assert!(Instant::now() < deadline, "no TRACE_NOT_PROPAGATED");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(tnp.workload, "cart-v1");
    // The sample is the trace id, not the request id.
    assert_eq!(tnp.trace_ids, vec![t1.clone()], "{tnp:?}");
    // The traced piece links on to the piece after the break...
    let first = q
        .get_trace(GetTraceRequest {
            trace_id: t1.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.fragments.len(), 1, "{:?}", first.fragments);
    assert_eq!(first.fragments[0].trace_id, rid);
    assert_eq!(first.fragments[0].relation, "continued_in");
    assert_eq!(first.fragments[0].request_id, rid);
    // ...which links back, and holds the break.
    let second = q
        .get_trace(GetTraceRequest {
            trace_id: rid.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(second.fragments.len(), 1, "{:?}", second.fragments);
    assert_eq!(second.fragments[0].trace_id, t1);
    assert_eq!(second.fragments[0].relation, "continued_from");
    assert!(
        second
            .breaks
            .iter()
            .any(|b| b.kind == BreakKind::TraceNotPropagated as i32),
        "{:?}",
        second.breaks
    );
    // A trace that did not break has no fragments.
    c.report(ReportRequest {
        hops: healthy_chain(&trace_id(62), base_us(), "dev"),
        ..Default::default()
    })
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match q
            .get_trace(GetTraceRequest {
                trace_id: trace_id(62),
            })
            .await
        {
            Ok(t) => {
                assert!(t.into_inner().fragments.is_empty());
                break;
            }
            Err(_) => {
                assert!(Instant::now() < deadline, "trace 62 not held");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    s.stop().await;
}
