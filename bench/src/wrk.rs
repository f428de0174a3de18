//! Running `wrk` and reading its `--latency` report.

use std::process::Command;

use anyhow::{bail, Context as _, Result};

/// What one `wrk` run printed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WrkResult {
    pub requests: u64,
    pub seconds: f64,
    pub rps: f64,
    pub p50_us: f64,
    pub p75_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    /// "Non-2xx or 3xx responses".
    pub non_2xx: u64,
    /// Sum of connect/read/write/timeout socket errors.
    pub socket_errors: u64,
}

/// A duration as wrk prints it ("228.00us", "1.02ms", "2.00s", "1.00m") in microseconds.
pub fn parse_duration_us(s: &str) -> Option<f64> {
    let s = s.trim();
    let (num, mult) = if let Some(n) = s.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix("ms") {
        (n, 1e3)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1e6)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60e6)
    } else if let Some(n) = s.strip_suffix('h') {
        (n, 3600e6)
    } else {
        (s, 1.0)
    };
    num.parse::<f64>().ok().map(|v| v * mult)
}

/// Parses wrk's report (run with `--latency`).
pub fn parse(output: &str) -> Result<WrkResult> {
    let mut r = WrkResult::default();
    let mut saw_rps = false;
    for line in output.lines() {
        let t = line.trim();
        let mut words = t.split_whitespace();
        let first = words.next().unwrap_or("");
        match first {
            "50%" => r.p50_us = words.next().and_then(parse_duration_us).unwrap_or(f64::NAN),
            "75%" => r.p75_us = words.next().and_then(parse_duration_us).unwrap_or(f64::NAN),
            "90%" => r.p90_us = words.next().and_then(parse_duration_us).unwrap_or(f64::NAN),
            "99%" => r.p99_us = words.next().and_then(parse_duration_us).unwrap_or(f64::NAN),
            "Requests/sec:" => {
                r.rps = words.next().and_then(|v| v.parse().ok()).unwrap_or(0.0);
                saw_rps = true;
            }
            _ => {}
        }
        if t.contains(" requests in ") {
            // "650000 requests in 10.00s, 50.00MB read"
            r.requests = first.parse().unwrap_or(0);
            if let Some(after) = t.split(" requests in ").nth(1) {
                let d = after.split(',').next().unwrap_or("");
                r.seconds = parse_duration_us(d).map(|us| us / 1e6).unwrap_or(0.0);
            }
        }
        if let Some(n) = t.strip_prefix("Non-2xx or 3xx responses:") {
            r.non_2xx = n.trim().parse().unwrap_or(0);
        }
        if let Some(rest) = t.strip_prefix("Socket errors:") {
            // "Socket errors: connect 0, read 0, write 0, timeout 0"
            r.socket_errors = rest
                .split(',')
                .filter_map(|p| p.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum();
        }
    }
    if !saw_rps {
        bail!("no Requests/sec in wrk output:\n{output}");
    }
    Ok(r)
}

/// Load parameters.
#[derive(Debug, Clone)]
pub struct Load {
    pub connections: u32,
    pub threads: u32,
    pub seconds: u32,
    /// `taskset -c` CPU list for wrk.
    pub cpus: Option<String>,
    /// A wrk Lua script (request pool).
    pub script: Option<std::path::PathBuf>,
}

/// Runs wrk against `url` and parses its report.
pub fn run(load: &Load, url: &str) -> Result<WrkResult> {
    let mut cmd = match &load.cpus {
        Some(c) => {
            let mut cmd = Command::new("taskset");
            cmd.arg("-c").arg(c).arg("wrk");
            cmd
        }
        None => Command::new("wrk"),
    };
    cmd.arg(format!("-t{}", load.threads))
        .arg(format!("-c{}", load.connections))
        .arg(format!("-d{}s", load.seconds))
        .arg("--latency");
    if let Some(s) = &load.script {
        cmd.arg("-s").arg(s);
    }
    cmd.arg(url);
    let out = cmd.output().context("run wrk (is it installed?)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "wrk failed: {}\n{}{}",
            out.status,
            text,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    parse(&text)
}

/// One request of the pool: the ids a well-behaved app propagates.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolEntry {
    pub trace_id: String,
    /// The caller's span (the inbound request's `x-b3-spanid`).
    pub inbound_span: String,
    /// The app's client span for its outbound call (`x-b3-spanid` outbound, with the
    /// inbound span as `x-b3-parentspanid`).
    pub outbound_span: String,
    pub request_id: String,
}

/// `n` pool entries from a fixed seed with exactly `sampled` of them selected by
/// `is_sampled` (the filter's sampling rule), the others not: the share of traces a
/// given `report_sample_rate` reports is then exact, not left to chance.
pub fn request_pool(n: usize, sampled: usize, is_sampled: impl Fn(&str) -> bool) -> Vec<PoolEntry> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut yes = Vec::new();
    let mut no = Vec::new();
    while yes.len() < sampled || no.len() < n - sampled.min(n) {
        let trace_id = format!("{:016x}{:016x}", next(), next());
        let entry = PoolEntry {
            inbound_span: format!("{:016x}", next() | 1),
            outbound_span: format!("{:016x}", next() | 1),
            request_id: {
                let a = next();
                let b = next();
                format!(
                    "{:08x}-{:04x}-4{:03x}-a{:03x}-{:012x}",
                    a >> 32,
                    (a >> 16) & 0xffff,
                    a & 0xfff,
                    b >> 52,
                    b & 0xffff_ffff_ffff
                )
            },
            trace_id,
        };
        if is_sampled(&entry.trace_id) {
            if yes.len() < sampled {
                yes.push(entry);
            }
        } else if no.len() < n - sampled.min(n) {
            no.push(entry);
        }
    }
    // Spread the sampled ones through the pool.
    let mut out = no;
    let step = (n / sampled.max(1)).max(1);
    for (k, e) in yes.into_iter().enumerate() {
        let at = (k * step).min(out.len());
        out.insert(at, e);
    }
    out
}

/// Which side of the sidecar the pool's requests arrive at.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Side {
    /// As the caller's sidecar sends them: trace headers and the tag `tag`.
    Inbound { tag: &'static str },
    /// As the app sends them while serving the inbound request: the trace headers
    /// propagated (client span, parent = the inbound span), the tag NOT copied (the
    /// problem the Lua filter and hopwatch exist for).
    Outbound,
}

/// A wrk script cycling through the pool. `host` is the `:authority`.
pub fn pool_script(pool: &[PoolEntry], side: Side, host: &str, path: &str) -> String {
    let mut s = String::from(
        "-- hopwatch filter-bench request pool (generated)\nlocal pool = {}\nlocal reqs = {\n",
    );
    for e in pool {
        let line = match side {
            Side::Inbound { tag } => format!(
                "  {{ [\"x-request-id\"] = \"{}\", [\"x-b3-traceid\"] = \"{}\", [\"x-b3-spanid\"] = \"{}\", [\"x-b3-sampled\"] = \"1\", [\"x-virtual-env\"] = \"{}\" }},\n",
                e.request_id, e.trace_id, e.inbound_span, tag
            ),
            Side::Outbound => format!(
                "  {{ [\"x-request-id\"] = \"{}\", [\"x-b3-traceid\"] = \"{}\", [\"x-b3-spanid\"] = \"{}\", [\"x-b3-parentspanid\"] = \"{}\", [\"x-b3-sampled\"] = \"1\" }},\n",
                e.request_id, e.trace_id, e.outbound_span, e.inbound_span
            ),
        };
        s.push_str(&line);
    }
    s.push_str(&format!(
        r#"}}
local n = 0
local idx = 0
function init(args)
  for i, h in ipairs(reqs) do
    h["Host"] = "{host}"
    h["user-agent"] = "bench-app/1.0"
    pool[i] = wrk.format("GET", "{path}", h)
  end
  n = #pool
end
function request()
  idx = idx % n + 1
  return pool[idx]
end
"#
    ));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "Running 10s test @ http://127.0.0.1:10000/
  1 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   242.34us   50.10us   4.00ms   90.00%
    Req/Sec    66.00k     1.00k   68.00k    70.00%
  Latency Distribution
     50%  228.00us
     75%  260.00us
     90%  300.00us
     99%    1.02ms
  660000 requests in 10.00s, 50.00MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 5
Requests/sec:  66000.50
Transfer/sec:      5.00MB
";

    #[test]
    fn parses_wrk_latency_report() {
        let r = parse(SAMPLE).unwrap();
        assert_eq!(r.requests, 660000);
        assert_eq!(r.seconds, 10.0);
        assert_eq!(r.rps, 66000.5);
        assert_eq!(r.p50_us, 228.0);
        assert_eq!(r.p99_us, 1020.0);
        assert_eq!(r.non_2xx, 5);
        assert_eq!(r.socket_errors, 3);
    }

    #[test]
    fn durations_parse_in_all_units() {
        assert_eq!(parse_duration_us("12.5us"), Some(12.5));
        assert_eq!(parse_duration_us("1.5ms"), Some(1500.0));
        assert_eq!(parse_duration_us("2.00s"), Some(2e6));
        assert_eq!(parse_duration_us("1.00m"), Some(60e6));
    }

    #[test]
    fn output_without_rps_is_an_error() {
        assert!(parse("garbage").is_err());
    }

    #[test]
    fn pool_has_exactly_the_sampled_share_and_distinct_ids() {
        let pool = request_pool(200, 2, |t| t.ends_with('0'));
        assert_eq!(pool.len(), 200);
        assert_eq!(pool.iter().filter(|e| e.trace_id.ends_with('0')).count(), 2);
        let ids: std::collections::HashSet<_> = pool.iter().map(|e| &e.trace_id).collect();
        assert_eq!(ids.len(), 200);
        assert_eq!(
            pool,
            request_pool(200, 2, |t| t.ends_with('0')),
            "deterministic"
        );
    }

    #[test]
    fn pool_scripts_carry_the_tag_inbound_only() {
        let pool = request_pool(3, 0, |_| false);
        let out = pool_script(&pool, Side::Outbound, "svc:8080", "/x");
        let inb = pool_script(&pool, Side::Inbound { tag: "dev.a" }, "svc:8080", "/x");
        assert!(out.contains("x-b3-parentspanid") && !out.contains("x-virtual-env"));
        assert!(inb.contains("[\"x-virtual-env\"] = \"dev.a\""));
        assert!(out.contains(&pool[2].trace_id) && inb.contains(&pool[2].request_id));
    }
}
