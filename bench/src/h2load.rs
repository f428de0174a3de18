//! Running `h2load` (nghttp2's HTTP/2 load generator) for the gRPC traffic shape, and
//! reading its report into the same [`WrkResult`] as `wrk`'s (wrk speaks HTTP/1.1 only).
//!
//! h2load sends the same headers on every request: the gRPC shape carries constant
//! trace ids, and its latency figures are means (h2load prints no percentiles).

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context as _, Result};

use crate::wrk::{parse_duration_us, WrkResult};

/// Load parameters of one h2load run.
#[derive(Debug, Clone)]
pub struct H2Load {
    pub connections: u32,
    pub threads: u32,
    pub seconds: u32,
    /// `taskset -c` CPU list for h2load.
    pub cpus: Option<String>,
    /// Request headers (`name: value`).
    pub headers: Vec<String>,
    /// Request body file (makes the requests POSTs).
    pub body: Option<PathBuf>,
}

/// Runs h2load against `url` (h2c) and parses its report.
pub fn run(load: &H2Load, url: &str) -> Result<WrkResult> {
    let mut cmd = match &load.cpus {
        Some(c) => {
            let mut cmd = Command::new("taskset");
            cmd.arg("-c").arg(c).arg("h2load");
            cmd
        }
        None => Command::new("h2load"),
    };
    cmd.arg(format!("--clients={}", load.connections))
        .arg(format!("--threads={}", load.threads))
        .arg("--max-concurrent-streams=1")
        .arg(format!("--duration={}", load.seconds));
    for h in &load.headers {
        cmd.arg("--header").arg(h);
    }
    if let Some(b) = &load.body {
        cmd.arg("--data").arg(b);
    }
    cmd.arg(url);
    let out = cmd
        .output()
        .context("run h2load (Debian package nghttp2-client)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "h2load failed: {}\n{}{}",
            out.status,
            text,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    parse(&text)
}

/// Parses h2load's report.
pub fn parse(output: &str) -> Result<WrkResult> {
    let mut r = WrkResult::default();
    let mut saw_rps = false;
    for line in output.lines() {
        let t = line.trim();
        if let Some(rest) = t.strip_prefix("finished in ") {
            // "finished in 5.00s, 12345.60 req/s, 1.20MB/s"
            let mut parts = rest.split(',').map(str::trim);
            r.seconds = parts
                .next()
                .and_then(parse_duration_us)
                .map(|us| us / 1e6)
                .unwrap_or(0.0);
            if let Some(rps) = parts
                .next()
                .and_then(|p| p.strip_suffix(" req/s"))
                .and_then(|v| v.parse().ok())
            {
                r.rps = rps;
                saw_rps = true;
            }
        } else if let Some(rest) = t.strip_prefix("requests: ") {
            // "requests: 100 total, 100 started, 100 done, 98 succeeded, 2 failed, 2 errored, 0 timeout"
            for part in rest.split(',').map(str::trim) {
                let mut w = part.split_whitespace();
                let (Some(n), Some(what)) =
                    (w.next().and_then(|n| n.parse::<u64>().ok()), w.next())
                else {
                    continue;
                };
                match what {
                    "done" => r.requests = n,
                    "failed" | "timeout" => r.socket_errors += n,
                    _ => {}
                }
            }
        } else if let Some(rest) = t.strip_prefix("status codes: ") {
            // "status codes: 100 2xx, 0 3xx, 0 4xx, 0 5xx"
            for part in rest.split(',').map(str::trim) {
                let mut w = part.split_whitespace();
                if let (Some(n), Some(class)) =
                    (w.next().and_then(|n| n.parse::<u64>().ok()), w.next())
                {
                    if class == "4xx" || class == "5xx" {
                        r.non_2xx += n;
                    }
                }
            }
        } else if let Some(rest) = t.strip_prefix("time for request:") {
            // min max mean sd +/-sd: the mean stands in for the percentiles.
            let mean = rest.split_whitespace().nth(2).and_then(parse_duration_us);
            let mean = mean.unwrap_or(f64::NAN);
            r.p50_us = mean;
            r.p75_us = mean;
            r.p90_us = mean;
            r.p99_us = mean;
        }
    }
    if !saw_rps {
        bail!("no req/s in h2load output:\n{output}");
    }
    Ok(r)
}

/// A gRPC request body: one length-prefixed message of `message` bytes (uncompressed).
pub fn grpc_frame(message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + message.len());
    out.push(0);
    out.extend_from_slice(&(message.len() as u32).to_be_bytes());
    out.extend_from_slice(message);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "starting benchmark...
spawning thread #0: 16 total client(s). 5 seconds duration

finished in 5.00s, 12345.60 req/s, 1.20MB/s
requests: 61728 total, 61744 started, 61728 done, 61700 succeeded, 28 failed, 28 errored, 0 timeout
status codes: 61700 2xx, 0 3xx, 0 4xx, 28 5xx
traffic: 6.00MB (6291456) total, 1.00MB (1048576) headers (space savings 90.00%), 1.00MB (1048576) data
                     min         max         mean         sd        +/- sd
time for request:      100us      9.50ms      1.29ms       300us    80.00%
";

    #[test]
    fn parses_h2load_report() {
        let r = parse(SAMPLE).unwrap();
        assert_eq!(r.rps, 12345.6);
        assert_eq!(r.seconds, 5.0);
        assert_eq!(r.requests, 61728);
        assert_eq!(r.non_2xx, 28);
        assert_eq!(r.socket_errors, 28);
        assert_eq!(r.p50_us, 1290.0);
    }

    #[test]
    fn report_without_rate_is_an_error() {
        assert!(parse("starting benchmark...\n").is_err());
    }

    #[test]
    fn grpc_frame_is_length_prefixed() {
        assert_eq!(grpc_frame(b"ab"), vec![0, 0, 0, 0, 2, b'a', b'b']);
    }
}
