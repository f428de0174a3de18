//! A report may only speak for the workload that sent it: the peer identity the
//! collector's sidecar passes in `x-forwarded-client-cert`, the shared report token, hops
//! from the future, implausible drop claims, and undecodable batches — each over real gRPC
//! to an in-process collector, with what it refused read back from /metrics.
//!
//! (The same check behind a real Envoy terminating mTLS: test-envoy/tests/identity.rs.)

mod common;

use std::time::Duration;

use common::*;
use hopwatch_collector::identity::Policy;
use hopwatch_collector::service::Settings;
use hopwatch_proto::v1::collector_client::CollectorClient;
use hopwatch_proto::v1::query_client::QueryClient;
use hopwatch_proto::v1::{Hop, ListBreaksRequest, ReportRequest, SummaryRequest};
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tonic::Code;

/// A chain failing at its far end, every hop claiming `ns`.
fn failing_chain(t: &str, ns: &str) -> Vec<Hop> {
    let mut hops = healthy_chain(t, base_us(), "");
    hops[4].response_code = 503;
    hops[4].response_flags = 1 << 5; // UF
    hops[3].response_code = 503;
    hops[1].response_code = 503;
    hops[0].response_code = 503;
    for h in &mut hops {
        h.namespace = ns.into();
    }
    hops
}

/// What Istio's inbound sidecar of the collector sets for a caller `ns`/`sa`
/// (APPEND_FORWARD with uri: true).
fn xfcc(ns: &str, sa: &str) -> String {
    format!(
        "By=spiffe://cluster.local/ns/hopwatch/sa/hopwatch-collector;Hash=5d3c9a3e1f;Subject=\"\";URI=spiffe://cluster.local/ns/{ns}/sa/{sa}"
    )
}

fn request(
    batch: ReportRequest,
    headers: &[(&'static str, &str)],
) -> tonic::Request<ReportRequest> {
    let mut r = tonic::Request::new(batch);
    for (k, v) in headers {
        r.metadata_mut()
            .insert(*k, MetadataValue::try_from(*v).unwrap());
    }
    r
}

/// The value of one /metrics line (`name{labels}`), 0 when absent.
fn metric(m: &str, line: &str) -> u64 {
    m.lines()
        .find_map(|l| l.strip_prefix(line)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0)
}

async fn breaks_in(q: &mut QueryClient<Channel>, ns: &str) -> usize {
    q.list_breaks(ListBreaksRequest {
        namespace: ns.into(),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .breaks
    .len()
}

async fn wait_breaks(q: &mut QueryClient<Channel>, ns: &str) -> usize {
    for _ in 0..100 {
        let n = breaks_in(q, ns).await;
        if n > 0 {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_speaks_only_for_its_own_namespace_and_service_account() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(fast_settings(), dir.path()).await;
    let mut c = CollectorClient::connect(s.url()).await.unwrap();
    let mut q = QueryClient::connect(s.url()).await.unwrap();
    let cart = xfcc("shop", "cart");

    // cart forging a whole prod batch (reporter prod/payments): refused, nothing accepted.
    let forged = ReportRequest {
        hops: failing_chain(&trace_id(1), "prod"),
        reporter_pod: "payments-7d9f".into(),
        reporter_namespace: "prod".into(),
        reporter_service_account: "payments".into(),
        ..Default::default()
    };
    let e = c
        .report(request(forged, &[("x-forwarded-client-cert", &cart)]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(
        e.message().contains("reporter namespace \"prod\"")
            && e.message()
                .contains("spiffe://cluster.local/ns/shop/sa/cart"),
        "{}",
        e.message()
    );

    // cart's own batch with forged prod hops mixed in: the rest is accepted.
    let mut hops = failing_chain(&trace_id(2), "shop");
    let own = hops.len() as u32;
    hops.extend(failing_chain(&trace_id(3), "prod"));
    let mut wrong_sa = failing_chain(&trace_id(4), "shop");
    for h in &mut wrong_sa {
        h.service_account = "payments".into();
    }
    hops.extend(wrong_sa);
    let r = c
        .report(request(
            ReportRequest {
                hops,
                reporter_namespace: "shop".into(),
                reporter_service_account: "cart".into(),
                ..Default::default()
            },
            &[("x-forwarded-client-cert", &cart)],
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.accepted, own);

    // A client writing its own XFCC element first: the sidecar's (last) one counts.
    let spoofed = format!("URI=spiffe://cluster.local/ns/prod/sa/payments,{cart}");
    let e = c
        .report(request(
            ReportRequest {
                hops: failing_chain(&trace_id(5), "prod"),
                ..Default::default()
            },
            &[("x-forwarded-client-cert", &spoofed)],
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    // An unreadable header: UNAUTHENTICATED.
    let e = c
        .report(request(
            ReportRequest {
                hops: failing_chain(&trace_id(6), "shop"),
                ..Default::default()
            },
            &[(
                "x-forwarded-client-cert",
                "URI=\"spiffe://cluster.local/ns/shop",
            )],
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(e.message().contains("unterminated"), "{}", e.message());

    // Findings: shop's, never prod's.
    assert!(wait_breaks(&mut q, "shop").await > 0);
    assert_eq!(breaks_in(&mut q, "prod").await, 0);
    let m = http_get(s.http, "/metrics").await;
    let refused = metric(&m, "hopwatch_hops_refused_total{reason=\"identity\"}");
    // 5 (whole forged batch) + 5 (forged prod hops) + 5 (wrong service account) + 5 (spoofed).
    assert_eq!(refused, 20, "{m}");
    assert_eq!(
        metric(&m, "hopwatch_reports_refused_total{reason=\"identity\"}"),
        1
    );
    println!("identity: {refused} forged hops refused, {own} own hops accepted");
    s.stop().await;
}

/// The test settings with `--require-peer-identity`.
fn requiring_peer() -> Settings {
    Settings {
        identity: Policy {
            require_peer: true,
            ..Policy::default()
        },
        ..fast_settings()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_peer_identity_refuses_anonymous_batches() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(requiring_peer(), dir.path()).await;
    let mut c = CollectorClient::connect(s.url()).await.unwrap();
    let batch = ReportRequest {
        hops: failing_chain(&trace_id(1), "shop"),
        ..Default::default()
    };
    let e = c.report(batch.clone()).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(
        e.message().contains("missing peer identity"),
        "{}",
        e.message()
    );
    let r = c
        .report(request(
            batch,
            &[("x-forwarded-client-cert", &xfcc("shop", "cart"))],
        ))
        .await
        .unwrap();
    assert_eq!(r.into_inner().accepted, 5);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_report_token_is_required_when_configured() {
    let dir = tempfile::tempdir().unwrap();
    let settings = Settings {
        identity: Policy::default().with_token("k8s-secret-1").unwrap(),
        ..fast_settings()
    };
    let s = TestServer::start(settings, dir.path()).await;
    let mut c = CollectorClient::connect(s.url()).await.unwrap();
    let batch = ReportRequest {
        hops: failing_chain(&trace_id(1), "shop"),
        ..Default::default()
    };
    let e = c.report(batch.clone()).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(
        e.message().contains("missing report token")
            && e.message().contains("x-hopwatch-report-token"),
        "{}",
        e.message()
    );
    let e = c
        .report(request(
            batch.clone(),
            &[("x-hopwatch-report-token", "k8s-secret-2")],
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(!e.message().contains("k8s-secret"), "{}", e.message());
    let r = c
        .report(request(
            batch,
            &[("x-hopwatch-report-token", "k8s-secret-1")],
        ))
        .await
        .unwrap();
    assert_eq!(r.into_inner().accepted, 5);
    let m = http_get(s.http, "/metrics").await;
    assert_eq!(
        metric(&m, "hopwatch_reports_refused_total{reason=\"token\"}"),
        2,
        "{m}"
    );
    assert_eq!(metric(&m, "hopwatch_hops_received_total"), 5);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hops_from_the_future_are_refused_and_drop_claims_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(fast_settings(), dir.path()).await;
    let mut c = CollectorClient::connect(s.url()).await.unwrap();
    let mut q = QueryClient::connect(s.url()).await.unwrap();

    // 2508-06-01: a finding from it would never expire.
    let y2508_us: u64 = 16_990_732_800 * 1_000_000;
    let mut future = failing_chain(&trace_id(1), "shop");
    for h in &mut future {
        h.start_time_unix_micros = y2508_us;
    }
    let e = c
        .report(ReportRequest {
            hops: future,
            dropped_since_last_batch: u64::MAX,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("after the collector's clock"),
        "{}",
        e.message()
    );

    // One hop in the future among a real chain: the rest is accepted.
    let mut hops = failing_chain(&trace_id(2), "shop");
    hops.push(Hop {
        start_time_unix_micros: y2508_us,
        ..hops[0].clone()
    });
    let r = c
        .report(ReportRequest {
            hops,
            dropped_since_last_batch: u64::MAX,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(r.into_inner().accepted, 5);
    // A plausible claim twice, no overflow.
    for _ in 0..2 {
        c.report(ReportRequest {
            hops: failing_chain(&trace_id(3), "shop"),
            dropped_since_last_batch: 1_000_000_000,
            ..Default::default()
        })
        .await
        .unwrap();
    }
    assert!(wait_breaks(&mut q, "shop").await > 0);
    let newest = q
        .list_breaks(ListBreaksRequest::default())
        .await
        .unwrap()
        .into_inner()
        .breaks
        .iter()
        .map(|b| b.last_seen_unix_ms)
        .max()
        .unwrap();
    assert!(newest < hopwatch_collector::service::now_ms() + 60_000);
    let m = http_get(s.http, "/metrics").await;
    assert_eq!(
        metric(&m, "hopwatch_hops_refused_total{reason=\"clock_skew\"}"),
        6,
        "{m}"
    );
    assert_eq!(metric(&m, "hopwatch_dropped_claims_implausible_total"), 2);
    let sum = q.summary(SummaryRequest {}).await.unwrap().into_inner();
    assert_eq!(sum.reports_dropped_by_filters, 2_000_000_000);
    s.stop().await;
}

/// Sends raw bytes as the body of a unary gRPC call (a codec with no protobuf in it).
mod raw {
    use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
    use tonic::Status;

    #[derive(Default)]
    pub struct RawCodec;
    pub struct RawEnc;
    pub struct RawDec;
    impl Codec for RawCodec {
        type Encode = Vec<u8>;
        type Decode = Vec<u8>;
        type Encoder = RawEnc;
        type Decoder = RawDec;
        fn encoder(&mut self) -> RawEnc {
            RawEnc
        }
        fn decoder(&mut self) -> RawDec {
            RawDec
        }
    }
    impl Encoder for RawEnc {
        type Item = Vec<u8>;
        type Error = Status;
        fn encode(&mut self, item: Vec<u8>, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
            use bytes::BufMut;
            buf.put_slice(&item);
            Ok(())
        }
    }
    impl Decoder for RawDec {
        type Item = Vec<u8>;
        type Error = Status;
        fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
            use bytes::Buf;
            Ok(Some(buf.copy_to_bytes(buf.remaining()).to_vec()))
        }
    }
}

/// Raw bytes as a unary call to `path`.
pub async fn raw_call(
    url: &str,
    path: &'static str,
    body: Vec<u8>,
) -> Result<Vec<u8>, tonic::Status> {
    let ch = Channel::from_shared(url.to_string())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut g = tonic::client::Grpc::new(ch);
    g.ready().await.unwrap();
    g.unary(
        tonic::Request::new(body),
        tonic::codegen::http::uri::PathAndQuery::from_static(path),
        raw::RawCodec,
    )
    .await
    .map(|r| r.into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_batches_are_invalid_argument_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(fast_settings(), dir.path()).await;
    let before = hopwatch_proto::codec::decode_errors();
    let cases: [(&str, Vec<u8>); 4] = [
        // Field 1 (hops), length 100, 2 bytes present.
        ("truncated", vec![0x0a, 100, 0x08, 0x01]),
        // Field 2 (reporter_pod) with invalid UTF-8.
        ("utf8", vec![0x12, 2, 0xff, 0xfe]),
        // Wire type 7 does not exist.
        ("wire type", vec![0x0f]),
        // A varint of 11 bytes.
        (
            "varint",
            vec![
                0x20, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
            ],
        ),
    ];
    for (what, body) in cases {
        let e = raw_call(&s.url(), "/hopwatch.v1.Collector/Report", body)
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{what}: {e:?}");
        assert!(
            e.message().starts_with("malformed ReportRequest: "),
            "{what}: {}",
            e.message()
        );
        println!("{what}: {}", e.message());
    }
    // A query message that does not decode is INVALID_ARGUMENT too.
    let e = raw_call(&s.url(), "/hopwatch.v1.Query/ListBreaks", vec![0x0f])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().starts_with("malformed ListBreaksRequest"),
        "{}",
        e.message()
    );
    // An empty body is a valid (empty) ReportRequest: the collector's own check answers.
    let e = raw_call(&s.url(), "/hopwatch.v1.Collector/Report", vec![])
        .await
        .unwrap_err();
    assert!(e.message().contains("empty batch"), "{}", e.message());

    let after = hopwatch_proto::codec::decode_errors();
    assert_eq!(after.report_request - before.report_request, 4);
    let m = http_get(s.http, "/metrics").await;
    assert!(
        metric(&m, "hopwatch_reports_refused_total{reason=\"decode\"}") >= 4,
        "{m}"
    );
    s.stop().await;
}

#[test]
fn flags() {
    use clap::Parser;
    use hopwatch_collector::identity::PeerIdentityMode;
    use hopwatch_collector::server::ServerArgs;
    let a = ServerArgs::parse_from(["hopwatch-collector"]);
    let p = a.settings().identity;
    assert_eq!(p, Policy::default());
    assert_eq!(p.mode, PeerIdentityMode::Xfcc);
    assert_eq!(p.max_clock_skew, Duration::from_secs(600));
    let a = ServerArgs::parse_from([
        "hopwatch-collector",
        "--peer-identity",
        "none",
        "--require-peer-identity",
        "--report-token",
        "tok-123",
        "--max-clock-skew",
        "30s",
        "--trust-domain",
        "cluster.local",
    ]);
    let p = a.settings().identity;
    assert_eq!(p.mode, PeerIdentityMode::None);
    assert!(p.require_peer && p.token.as_ref().unwrap().matches(b"tok-123"));
    assert_eq!(p.max_clock_skew, Duration::from_secs(30));
    // The token never shows in a debug print of the flags.
    assert!(!format!("{a:?}").contains("tok-123"));
    let e = ServerArgs::try_parse_from(["hopwatch-collector", "--report-token", ""]).unwrap_err();
    assert!(e.to_string().contains("report token is empty"), "{e}");
    assert!(ServerArgs::try_parse_from(["hopwatch-collector", "--peer-identity", "jwt"]).is_err());
    let e =
        ServerArgs::try_parse_from(["hopwatch-collector", "--max-clock-skew", "2d"]).unwrap_err();
    assert!(e.to_string().contains("maximum clock skew of 24h"), "{e}");
}

/// The collector behind a real Envoy sidecar terminating mTLS with SPIFFE certificates and
/// setting XFCC as Istio's inbound does; two callers, each through its own sidecar.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_real_mtls_sidecar_a_caller_speaks_only_for_itself() {
    use hopwatch_test_envoy::collector_sidecar::{Caller, CollectorSidecar};
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(requiring_peer(), dir.path()).await;
    let callers = [Caller::new("shop", "cart"), Caller::new("prod", "payments")];
    let tls = dir.path().join("tls");
    let grpc = s.grpc;
    let sidecar =
        tokio::task::spawn_blocking(move || CollectorSidecar::start(&tls, grpc, &callers))
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("collector sidecar: {e}"));
    let mut cart = CollectorClient::connect(sidecar.url_for(0)).await.unwrap();
    let mut payments = CollectorClient::connect(sidecar.url_for(1)).await.unwrap();
    let mut q = QueryClient::connect(s.url()).await.unwrap();
    let batch = |t: u32, ns: &str, sa: &str| ReportRequest {
        hops: failing_chain(&trace_id(t), ns),
        reporter_pod: format!("{sa}-5f7c"),
        reporter_namespace: ns.into(),
        reporter_service_account: sa.into(),
        ..Default::default()
    };

    // cart claiming to be prod/payments: refused.
    let e = cart.report(batch(1, "prod", "payments")).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(
        e.message()
            .contains("spiffe://cluster.local/ns/shop/sa/cart"),
        "{}",
        e.message()
    );
    // cart's own batch, and payments' own: accepted.
    let r = cart.report(batch(2, "shop", "cart")).await.unwrap();
    assert_eq!(r.into_inner().accepted, 5);
    let r = payments.report(batch(3, "prod", "payments")).await.unwrap();
    assert_eq!(r.into_inner().accepted, 5);
    // cart's app writing its own XFCC header naming payments: the sidecar appends the
    // real peer after it, and that one counts.
    let forged_xfcc = "By=spiffe://cluster.local/ns/hopwatch/sa/hopwatch-collector;URI=spiffe://cluster.local/ns/prod/sa/payments";
    let e = cart
        .report(request(
            batch(4, "prod", "payments"),
            &[("x-forwarded-client-cert", forged_xfcc)],
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    // Bypassing the sidecar (plain text straight to the collector): no peer, refused.
    let mut direct = CollectorClient::connect(s.url()).await.unwrap();
    let e = direct.report(batch(5, "shop", "cart")).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);

    // prod's findings are payments' trace only; shop's are cart's.
    assert!(wait_breaks(&mut q, "prod").await > 0);
    assert!(wait_breaks(&mut q, "shop").await > 0);
    let prod = q
        .list_breaks(ListBreaksRequest {
            namespace: "prod".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .breaks;
    for b in &prod {
        assert_eq!(b.trace_ids, [trace_id(3)], "{b:?}");
    }
    let m = http_get(s.http, "/metrics").await;
    let refused = metric(&m, "hopwatch_hops_refused_total{reason=\"identity\"}");
    assert_eq!(refused, 10, "{m}");
    assert_eq!(
        metric(&m, "hopwatch_reports_refused_total{reason=\"identity\"}"),
        1
    );
    assert_eq!(metric(&m, "hopwatch_hops_received_total"), 10);
    // Every call went through the TLS listener with a verified client certificate.
    let handshakes =
        sidecar.stat(&format!("listener.{}.ssl.handshake", sidecar.inbound).replace(':', "_"));
    assert!(
        handshakes >= 2,
        "{handshakes} TLS handshakes on the inbound listener"
    );
    println!(
        "behind Envoy mTLS: {refused} forged hops refused (2 batches), 10 own hops accepted, 1 sidecar-bypassing batch refused"
    );
    drop(sidecar);
    s.stop().await;
}
