//! Shared by crash.rs and disk_full.rs: the real `hopwatch-collector` binary as a child
//! process on 127.0.0.1, planted broken traces, and reading /metrics, /healthz, ListBreaks.
#![allow(dead_code)]

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use hopwatch_proto::v1::collector_client::CollectorClient;
use hopwatch_proto::v1::query_client::QueryClient;
use hopwatch_proto::v1::{Hop, ListBreaksRequest, ReportRequest, TagSource};

use crate::common::{base_us, healthy_chain, trace_id};

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A planted broken trace: ratings answers 503 UF, reviews' app dropped the tag (the
/// filter restored it). Workload names carry `i`, so every trace makes its own findings.
pub fn planted(i: u32) -> Vec<Hop> {
    let t = trace_id(i);
    let mut hops = healthy_chain(&t, base_us(), "dev.proj1");
    for h in &mut hops {
        h.workload = format!("{}-{i}", h.workload);
        h.pod = format!("{}-pod", h.workload);
    }
    hops[4].response_code = 503;
    hops[4].response_flags = 1 << 5; // UF
    hops[3].response_code = 503;
    hops[3].tag_source = TagSource::Correlated as i32;
    hops
}

/// A healthy trace (no finding), ids above the planted ones.
pub fn healthy(i: u32) -> Vec<Hop> {
    healthy_chain(&trace_id(1_000_000 + i), base_us(), "dev.proj1")
}

/// The collector binary, killed on drop.
pub struct Proc {
    pub child: Option<Child>,
    pub grpc: u16,
    pub http: u16,
    pub log: PathBuf,
}

impl Proc {
    /// Starts `hopwatch-collector --data-dir dir` with `extra` flags; its output goes to
    /// `log` (keep it off a filesystem the test fills).
    pub fn spawn(dir: &Path, log: &Path, extra: &[&str]) -> Proc {
        let (grpc, http) = (free_port(), free_port());
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_hopwatch-collector"))
            .args([
                "--listen",
                &format!("127.0.0.1:{grpc}"),
                "--http-listen",
                &format!("127.0.0.1:{http}"),
            ])
            .arg("--data-dir")
            .arg(dir)
            .args(extra)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("spawn hopwatch-collector");
        Proc {
            child: Some(child),
            grpc,
            http,
            log: log.to_path_buf(),
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.grpc)
    }

    /// Waits until gRPC answers (bounded).
    pub async fn ready(&mut self) -> CollectorClient<tonic::transport::Channel> {
        for _ in 0..300 {
            if let Ok(c) = CollectorClient::connect(self.url()).await {
                return c;
            }
            if let Some(st) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "collector exited ({st}) before serving:\n{}",
                    self.log_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("collector did not start:\n{}", self.log_text());
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill(); // SIGKILL
            let _ = c.wait();
        }
    }

    /// SIGTERM; waits at most `within` for the exit.
    pub fn term(&mut self, within: Duration) -> (ExitStatus, Duration) {
        let mut c = self.child.take().expect("running");
        let t = Instant::now();
        let st = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status()
            .unwrap();
        assert!(st.success());
        loop {
            if let Some(st) = c.try_wait().unwrap() {
                return (st, t.elapsed());
            }
            if t.elapsed() > within {
                let _ = c.kill();
                let _ = c.wait();
                panic!("collector did not exit within {within:?} of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// (status, body) of an HTTP GET.
    pub async fn http_get(&self, path: &str) -> (u16, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", self.http))
            .await
            .unwrap();
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        let status = out
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = out
            .split_once("\r\n\r\n")
            .map_or("", |(_, b)| b)
            .to_string();
        (status, body)
    }

    /// The value of an unlabelled sample of /metrics (0 if absent).
    pub async fn metric(&self, name: &str) -> f64 {
        let (_, body) = self.http_get("/metrics").await;
        body.lines()
            .find_map(|l| {
                let (n, v) = l.split_once(' ')?;
                (n == name).then(|| v.trim().parse().ok())?
            })
            .unwrap_or(0.0)
    }

    /// Sample trace ids of every stored finding, and the number of findings.
    pub async fn samples(&self) -> (HashSet<String>, usize) {
        let mut q = QueryClient::connect(self.url()).await.unwrap();
        let breaks = q
            .list_breaks(ListBreaksRequest {
                limit: 10_000,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .breaks;
        let n = breaks.len();
        (breaks.into_iter().flat_map(|b| b.trace_ids).collect(), n)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Reports `traces` in batches of at most 1,000 traces (acked each).
pub async fn report(c: &mut CollectorClient<tonic::transport::Channel>, traces: &[Vec<Hop>]) {
    for chunk in traces.chunks(1_000) {
        let hops: Vec<Hop> = chunk.iter().flatten().cloned().collect();
        c.report(ReportRequest {
            hops,
            ..Default::default()
        })
        .await
        .expect("report accepted");
    }
}

/// How many of the planted traces `ids` are a sample of some stored finding.
pub fn survived(samples: &HashSet<String>, ids: impl IntoIterator<Item = u32>) -> (usize, usize) {
    let mut n = 0;
    let mut of = 0;
    for i in ids {
        of += 1;
        if samples.contains(&trace_id(i)) {
            n += 1;
        }
    }
    (n, of)
}

/// Polls `f` every 50 ms until it is true or `within` passes; returns whether it became
/// true.
pub async fn until<F, Fut>(within: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let t = Instant::now();
    while t.elapsed() < within {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}
