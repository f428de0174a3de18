//! Crash loss: the real collector binary, SIGKILLed at several points, restarted on the
//! same data dir. Every planted break whose hops were acked more than ~1 s before the
//! kill must be found again (its finding, with the planted trace among the samples).
//! Prints survived/planted per point; `--no-wal` is run once to show what the WAL saves.

mod common;
mod durability;

use std::io::Write;
use std::time::{Duration, Instant};

use durability::*;

/// Flags of every run: traces analysed 2 s after their last hop.
const FLAGS: &[&str] = &["--trace-quiet", "2s"];

/// Restarts on `dir` and waits until the findings of `expect` planted traces are back
/// (at most 30 s); returns the sample set and the number of findings.
async fn restart_and_count(
    dir: &std::path::Path,
    log: &std::path::Path,
    extra: &[&str],
    expect: usize,
) -> (Proc, std::collections::HashSet<String>, usize) {
    let mut p = Proc::spawn(dir, log, &[FLAGS, extra].concat());
    let _ = p.ready().await;
    let mut last = (Default::default(), 0);
    let t = Instant::now();
    // Replayed traces are analysed once quiet (2 s); then the findings stop changing.
    while t.elapsed() < Duration::from_secs(30) {
        last = p.samples().await;
        if last.1 >= expect && t.elapsed() > Duration::from_secs(3) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    (p, last.0, last.1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_loses_at_most_the_last_second() {
    let logs = tempfile::tempdir().unwrap();
    let mut report_lines = Vec::new();

    // Baseline: findings per planted trace (graceful SIGTERM, everything persisted).
    let dir = tempfile::tempdir().unwrap();
    let log = logs.path().join("baseline.log");
    let mut p = Proc::spawn(dir.path(), &log, FLAGS);
    let mut c = p.ready().await;
    let planted_a: Vec<_> = (0..50).map(planted).collect();
    report(&mut c, &planted_a).await;
    let (st, _) = p.term(Duration::from_secs(20));
    assert!(st.success(), "{}", p.log_text());
    let (p, samples, findings) = restart_and_count(dir.path(), &log, &[], 100).await;
    let per_trace = findings / 50;
    assert!(
        per_trace >= 1 && findings == per_trace * 50,
        "each planted trace makes its own findings: {findings} for 50"
    );
    assert_eq!(survived(&samples, 0..50), (50, 50));
    drop(p);
    println!("baseline: {per_trace} findings per planted trace (SIGTERM: 50/50)");

    // 1. Right after reporting: batch A acked, 1.2 s later batch B acked and at once
    //    SIGKILL (every trace still open: quiet 2 s). Plus a torn record at the WAL's end.
    let (na, nb) = (2_000u32, 500u32);
    for wal in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let log = logs.path().join(format!("after-report-wal-{wal}.log"));
        let extra: &[&str] = if wal { &[] } else { &["--no-wal"] };
        let mut p = Proc::spawn(dir.path(), &log, &[FLAGS, extra].concat());
        let mut c = p.ready().await;
        let a: Vec<_> = (0..na).map(planted).collect();
        let b: Vec<_> = (na..na + nb).map(planted).collect();
        report(&mut c, &a).await;
        tokio::time::sleep(Duration::from_millis(1_200)).await;
        report(&mut c, &b).await;
        p.kill9();
        if wal {
            // A write torn by the crash: half a record after the last whole one.
            let mut segs: Vec<_> = std::fs::read_dir(dir.path().join("wal"))
                .unwrap()
                .map(|e| e.unwrap().path())
                .collect();
            segs.sort();
            let last = segs.last().expect("a WAL segment").clone();
            let mut f = std::fs::OpenOptions::new().append(true).open(last).unwrap();
            f.write_all(&[200, 0, 0, 0, 1, 2, 3, 4, 9, 9]).unwrap();
        }
        let expect = if wal { na as usize * per_trace } else { 0 };
        let (p, samples, _) = restart_and_count(dir.path(), &log, extra, expect).await;
        let sa = survived(&samples, 0..na);
        let sb = survived(&samples, na..na + nb);
        let replayed = p.metric("hopwatch_wal_records_replayed_total").await;
        let torn = p.metric("hopwatch_wal_torn_records_total").await;
        let line = format!(
            "after reporting (wal {}): acked >1 s before the kill {}/{}, acked just before {}/{}; WAL records replayed {replayed}, torn {torn}",
            if wal { "on" } else { "off" },
            sa.0, sa.1, sb.0, sb.1
        );
        println!("{line}");
        report_lines.push(line);
        if wal {
            assert_eq!(sa, (na as usize, na as usize), "{}", p.log_text());
            assert_eq!(torn, 1.0, "the torn tail is counted");
            assert!(replayed >= 2.0);
        } else {
            assert_eq!(sa.0, 0, "without the WAL open traces die with the process");
        }
    }

    // 2. Mid-analysis: 1,000 planted + 15,000 healthy traces; SIGKILL as soon as the
    //    first analysis round finished some but not all of them.
    {
        let dir = tempfile::tempdir().unwrap();
        let log = logs.path().join("mid-analysis.log");
        let mut p = Proc::spawn(dir.path(), &log, FLAGS);
        let mut c = p.ready().await;
        let n = 1_000u32;
        let mut traces: Vec<_> = (0..n).map(planted).collect();
        traces.extend((0..15_000).map(healthy));
        let total = traces.len() as f64;
        report(&mut c, &traces).await;
        let t = Instant::now();
        let mut analysed = 0.0;
        while t.elapsed() < Duration::from_secs(20) {
            analysed = p.metric("hopwatch_traces_analysed_total").await;
            if analysed > 0.0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        p.kill9();
        let (p, samples, _) =
            restart_and_count(dir.path(), &log, &[], n as usize * per_trace).await;
        let s = survived(&samples, 0..n);
        let line = format!(
            "mid-analysis (killed with {analysed}/{total} traces analysed{}): {}/{}",
            if analysed < total {
                ""
            } else {
                ", analysis had finished"
            },
            s.0,
            s.1
        );
        println!("{line}");
        report_lines.push(line);
        assert!(analysed > 0.0, "analysis started");
        assert_eq!(s, (n as usize, n as usize), "{}", p.log_text());
    }

    // 3. After a flush: the findings are in the database, SIGKILL.
    {
        let dir = tempfile::tempdir().unwrap();
        let log = logs.path().join("after-flush.log");
        let mut p = Proc::spawn(dir.path(), &log, FLAGS);
        let mut c = p.ready().await;
        let n = 2_000u32;
        let traces: Vec<_> = (0..n).map(planted).collect();
        report(&mut c, &traces).await;
        let want = (n as usize * per_trace) as f64;
        let flushed = until(Duration::from_secs(30), || async {
            p.metric("hopwatch_findings_persisted_total").await >= want
        })
        .await;
        assert!(flushed, "findings flushed: {}", p.log_text());
        p.kill9();
        let (p, samples, findings) =
            restart_and_count(dir.path(), &log, &[], n as usize * per_trace).await;
        let s = survived(&samples, 0..n);
        let line = format!("after a flush: {}/{} ({findings} findings)", s.0, s.1);
        println!("{line}");
        report_lines.push(line);
        assert_eq!(s, (n as usize, n as usize), "{}", p.log_text());
    }
    println!("\nsurvived/planted:\n  {}", report_lines.join("\n  "));
}
