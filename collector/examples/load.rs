//! gRPC load generator against a running collector:
//!   cargo run -p hopwatch-collector --release --example load -- http://127.0.0.1:9090 1000000 4
//! Sends pre-encoded batches of 200 hops from N concurrent streams and prints hops/s.

mod gen;

use std::time::Instant;

use hopwatch_proto::v1::collector_client::CollectorClient;
use hopwatch_proto::v1::ReportRequest;
use prost::Message;

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let url = args
        .next()
        .unwrap_or_else(|| "http://127.0.0.1:9090".into());
    let n: u64 = args
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let conc: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(4);
    let base = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64;
    let batches: Vec<ReportRequest> = gen::batches(n, base)
        .into_iter()
        .map(|b| ReportRequest::decode(b.as_slice()).unwrap())
        .collect();
    let channel = tonic::transport::Channel::from_shared(url.clone())
        .unwrap()
        .initial_stream_window_size(4 * 1024 * 1024)
        .initial_connection_window_size(16 * 1024 * 1024)
        .connect()
        .await
        .unwrap();
    let per = batches.len().div_ceil(conc);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for chunk in batches.chunks(per).map(|c| c.to_vec()) {
        let mut client = CollectorClient::new(channel.clone()).max_encoding_message_size(64 << 20);
        tasks.push(tokio::spawn(async move {
            let mut accepted = 0u64;
            for b in chunk {
                accepted += client
                    .report(b)
                    .await
                    .expect("report")
                    .into_inner()
                    .accepted as u64;
            }
            accepted
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    let el = start.elapsed();
    println!(
        "{total} hops accepted in {el:.2?} = {:.0} hops/s ({conc} streams, batches of 200)",
        total as f64 / el.as_secs_f64()
    );
}
