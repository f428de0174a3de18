//! Helpers shared by the local-mesh scenario tests of both runtimes (`e2e.rs`: processes,
//! `pods.rs`: pods): how many meshes run at once, reading the demo app's replies, and
//! reading the findings `hopwatch breaks --output json` printed.
#![allow(dead_code)]

use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use hopwatch_test_envoy::collector_cli::CliOutput;
use serde_json::Value;

// ---------------------------------------------------------------- mesh slots

/// Bounds how many meshes run at once (each is several Envoys, or several containers, on a
/// 2-core machine), whatever `--test-threads` is.
struct Slots {
    used: Mutex<usize>,
    freed: Condvar,
}
static SLOTS: Slots = Slots {
    used: Mutex::new(0),
    freed: Condvar::new(),
};

/// One running mesh's slot; dropping it frees the slot.
pub struct Permit;
impl Permit {
    /// Waits for a slot: at most `$jobs_env` (default 2) meshes at once.
    pub fn acquire(jobs_env: &str) -> Permit {
        let limit = std::env::var(jobs_env)
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(2)
            .max(1);
        let mut used = SLOTS.used.lock().unwrap_or_else(|e| e.into_inner());
        while *used >= limit {
            used = SLOTS.freed.wait(used).unwrap_or_else(|e| e.into_inner());
        }
        *used += 1;
        Permit
    }
}
impl Drop for Permit {
    fn drop(&mut self) {
        let mut used = SLOTS.used.lock().unwrap_or_else(|e| e.into_inner());
        *used -= 1;
        SLOTS.freed.notify_one();
    }
}

// ---------------------------------------------------------------- replies

/// The response of the `path`-th nested call (`[0, 0]`: the first call of the first call).
pub fn call<'a>(body: &'a Value, path: &[usize]) -> &'a Value {
    let mut v = body;
    for (n, i) in path.iter().enumerate() {
        v = &v["calls"][*i];
        if n + 1 < path.len() {
            v = &v["body"];
        }
    }
    v
}

// ---------------------------------------------------------------- findings

pub fn kind(b: &Value) -> &str {
    b["kind"].as_str().unwrap_or("")
}

pub fn of_kind<'a>(breaks: &'a [Value], k: &str) -> Vec<&'a Value> {
    breaks.iter().filter(|b| kind(b) == k).collect()
}

pub fn has(breaks: &[Value], k: &str, workload: &str) -> bool {
    breaks
        .iter()
        .any(|b| kind(b) == k && b["workload"].as_str() == Some(workload))
}

pub fn flags(b: &Value) -> Vec<String> {
    b["flags"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|f| f.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// One line per finding, for assertion messages.
pub fn summary(breaks: &[Value]) -> String {
    breaks
        .iter()
        .map(|b| {
            format!(
                "{}@{}->{} {:?}: {}",
                kind(b),
                b["workload"],
                b["peer"],
                flags(b),
                b["summary"]
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// No finding of kind `k` at all (the message lists what was reported).
pub fn assert_no_finding(breaks: &[Value], k: &str) {
    assert!(of_kind(breaks, k).is_empty(), "{}", summary(breaks));
}

/// No finding of kind `k` at `workload`.
pub fn assert_no_finding_at(breaks: &[Value], k: &str, workload: &str) {
    assert!(!has(breaks, k, workload), "{}", summary(breaks));
}

/// A healthy chain: no ERROR finding, none of the five break kinds a healthy chain must
/// not show, and the trace view (`analysed`, from [`wait_analysed`]) with no break.
pub fn assert_healthy(breaks: &[Value], analysed: &Value) {
    let errors: Vec<&Value> = breaks.iter().filter(|b| b["severity"] == "ERROR").collect();
    assert!(
        errors.is_empty(),
        "healthy chain produced errors: {}",
        summary(breaks)
    );
    for k in [
        "TRACE_NOT_PROPAGATED",
        "TAG_DROPPED",
        "TAG_NOT_PROPAGATED",
        "HOP_MISSING",
        "UPSTREAM_FAILURE",
    ] {
        assert!(
            of_kind(breaks, k).is_empty(),
            "unexpected {k}: {}",
            summary(breaks)
        );
    }
    assert_eq!(
        analysed["breaks"].as_array().map(Vec::len),
        Some(0),
        "trace view: {analysed}"
    );
}

/// Waits until the collector has analysed `trace_id` with at least `min_hops` hops, so
/// that the absence of a finding means something. `cli` runs the `hopwatch` CLI against
/// the mesh's collector.
pub fn wait_analysed(
    cli: impl Fn(&[&str]) -> Result<CliOutput, String>,
    trace_id: &str,
    min_hops: u64,
    deadline: Duration,
) -> Value {
    let start = Instant::now();
    let mut last;
    loop {
        match cli(&["trace", trace_id, "--output", "json"]) {
            Ok(out) if out.success => {
                let v: Value = serde_json::from_str(&out.stdout).unwrap_or(Value::Null);
                if v["open"] == Value::Bool(false)
                    && v["hop_count"].as_u64().unwrap_or(0) >= min_hops
                {
                    return v;
                }
                last = out.stdout;
            }
            Ok(out) => last = out.stderr,
            Err(e) => last = e,
        }
        assert!(
            start.elapsed() < deadline,
            "trace {trace_id} not analysed with >= {min_hops} hops in {deadline:?}; last: {last}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}
