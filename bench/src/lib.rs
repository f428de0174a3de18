//! Shared pieces of hopwatch's benchmarks (`filter-bench`, `collector-bench`): child
//! processes pinned to CPUs, memory from `/proc`, a tiny HTTP/1.0 client for admin and
//! metrics endpoints, `wrk` output parsing, percentiles and plain-text tables.
//!
//! Nothing here asserts on time: the benchmarks print figures, they do not fail on them.

pub mod envoy;
pub mod gen;
pub mod h2load;
pub mod shapes;
pub mod wrk;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};

/// A child process that is terminated (SIGTERM, then SIGKILL) when dropped.
pub struct Proc {
    pub name: String,
    child: Child,
    pub log: PathBuf,
}

impl Proc {
    /// Spawns `program args` pinned to `cpus` (a `taskset -c` list) when given, with
    /// stdout and stderr appended to `log`.
    pub fn spawn(
        name: &str,
        cpus: Option<&str>,
        program: &Path,
        args: &[String],
        envs: &[(&str, &str)],
        log: &Path,
    ) -> Result<Proc> {
        let out =
            std::fs::File::create(log).with_context(|| format!("create {}", log.display()))?;
        let err = out.try_clone()?;
        let mut cmd = match cpus {
            Some(cpus) => {
                let mut c = Command::new("taskset");
                c.arg("-c").arg(cpus).arg(program);
                c
            }
            None => Command::new(program),
        };
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err));
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("spawn {} ({})", name, program.display()))?;
        Ok(Proc {
            name: name.to_string(),
            child,
            log: log.to_path_buf(),
        })
    }

    /// The process id (taskset execs the program, so this is the program's own pid).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The last lines of the log, for error messages.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL.
    pub fn stop(&mut self, grace: Duration) {
        if !self.alive() {
            return;
        }
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid().to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if !self.alive() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(3));
    }
}

/// A field of `/proc/<pid>/status` in KiB (`VmRSS`, `VmHWM`).
pub fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|line| {
        let rest = line.strip_prefix(field)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// Resident set size in MiB.
pub fn rss_mib(pid: u32) -> Option<f64> {
    proc_status_kib(pid, "VmRSS").map(|k| k as f64 / 1024.0)
}

/// A loopback port free right now, from the local mesh's port reservation (below the
/// kernel's ephemeral range, so that the Envoys' own upstream connections cannot take a
/// listener port between the probe and the bind; a per-process cursor, so consecutive
/// calls never return the same port).
pub fn free_port() -> Result<u16> {
    let ports =
        hopwatch_test_envoy::plan::reserve_ports(1, &hopwatch_test_envoy::plan::PortSource::Free)?;
    ports.first().copied().context("no free loopback port")
}

/// `GET path` (HTTP/1.1, `Connection: close`) on 127.0.0.1:`port`: (status, body).
pub fn http_get(port: u16, path: &str) -> Result<(u16, String)> {
    http_request(port, path, &[])
}

/// `GET path` with extra request headers: (status, body).
pub fn http_request(port: u16, path: &str, headers: &[(&str, &str)]) -> Result<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("no HTTP status line")?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// Polls `f` every 50 ms until it returns true or `timeout` passes.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until something accepts TCP connections on 127.0.0.1:`port`.
pub fn wait_for_port(port: u16, timeout: Duration) -> Result<()> {
    if wait_until(timeout, || TcpStream::connect(("127.0.0.1", port)).is_ok()) {
        Ok(())
    } else {
        bail!("nothing listening on 127.0.0.1:{port} after {timeout:?}")
    }
}

/// The value at quantile `q` (0..=1) of sorted samples (nearest rank).
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The median of unsorted values.
pub fn median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Reads a Prometheus text exposition into (name with labels, value) pairs.
pub fn parse_prometheus(text: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.trim().to_string(), value.trim().parse().ok()?))
        })
        .collect()
}

/// A plain-text table with right-aligned columns (left-aligned first column), printed as
/// Markdown so it can be pasted into docs/BENCHMARKS.md as is.
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Table {
        Table {
            header: header.iter().map(|s| s.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let cols = self.header.len();
        let mut width = vec![0; cols];
        for r in std::iter::once(&self.header).chain(&self.rows) {
            for (i, c) in r.iter().enumerate().take(cols) {
                width[i] = width[i].max(c.chars().count());
            }
        }
        let line = |r: &Vec<String>| {
            let cells: Vec<String> = (0..cols)
                .map(|i| {
                    let c = r.get(i).map(String::as_str).unwrap_or("");
                    if i == 0 {
                        format!("{c:<w$}", w = width[i])
                    } else {
                        format!("{c:>w$}", w = width[i])
                    }
                })
                .collect();
            format!("| {} |", cells.join(" | "))
        };
        let mut out = line(&self.header);
        out.push('\n');
        let sep: Vec<String> = (0..cols)
            .map(|i| {
                if i == 0 {
                    "-".repeat(width[i])
                } else {
                    format!("{}:", "-".repeat(width[i] - 1))
                }
            })
            .collect();
        out.push_str(&format!("| {} |\n", sep.join(" | ")));
        for r in &self.rows {
            out.push_str(&line(r));
            out.push('\n');
        }
        out
    }
}

/// "PASS" or "MISS".
pub fn verdict(ok: bool) -> &'static str {
    if ok {
        "PASS"
    } else {
        "MISS"
    }
}

/// A scratch directory for configs and logs, removed on drop unless `keep`.
pub struct ScratchDir {
    pub path: PathBuf,
    pub keep: bool,
}

impl ScratchDir {
    pub fn new(prefix: &str, keep: bool) -> Result<ScratchDir> {
        let path = std::env::temp_dir().join(format!(
            "{prefix}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis())
                .unwrap_or(0)
        ));
        std::fs::create_dir_all(&path)?;
        Ok(ScratchDir { path, keep })
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// CPU time (user + system, all threads) a process has used, in seconds.
pub fn proc_cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state); utime and stime are fields 14 and 15.
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0) // USER_HZ is 100 on Linux
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_use_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.5), 50.0);
        assert_eq!(quantile(&v, 0.99), 99.0);
        assert_eq!(quantile(&v, 1.0), 100.0);
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }

    #[test]
    fn prometheus_lines_parse() {
        let m = parse_prometheus("# HELP x y\nfoo_total 12\nbar{a=\"b c\"} 3.5\n\n");
        assert_eq!(
            m,
            vec![("foo_total".into(), 12.0), ("bar{a=\"b c\"}".into(), 3.5)]
        );
    }

    #[test]
    fn tables_render_as_markdown() {
        let mut t = Table::new(&["config", "req/s"]);
        t.row(vec!["none".into(), "66000".into()]);
        let s = t.render();
        assert!(
            s.starts_with("| config | req/s |\n| ------ | ----: |\n"),
            "{s}"
        );
        assert!(s.contains("| none   | 66000 |"), "{s}");
    }

    #[test]
    fn proc_status_reads_own_rss() {
        assert!(proc_status_kib(std::process::id(), "VmRSS").unwrap() > 0);
    }
}
