//! Disk full: the real collector binary with its data dir on a 16 MB tmpfs that a filler
//! file fills and then frees. While full, /healthz answers 503 (saying why), /livez 200,
//! and persisting fails; once freed, /healthz is 200 again without a restart and every
//! finding reported during the episode is in the database (counted after a restart
//! with the WAL off, so only the database speaks). Then a SIGTERM during an episode:
//! shutdown retries, and persists everything once space comes back in its window.
//!
//! Needs root (mount). If the tmpfs cannot be mounted the test FAILS with the reason.

mod common;
mod durability;

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use durability::*;

/// The collector restarted on `data` with the WAL off, so that only the database speaks:
/// the findings it holds (sample trace ids) and their number.
async fn reopen_without_wal(data: &Path, log: &Path) -> (Proc, HashSet<String>, usize) {
    let mut p = Proc::spawn(data, log, &[FLAGS, &["--no-wal"]].concat());
    let _ = p.ready().await;
    let (samples, n) = p.samples().await;
    (p, samples, n)
}

/// The mounted tmpfs; unmounted on drop (also when the test fails).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        let o = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .unwrap_or_else(|e| {
                panic!("cannot run mount: {e} (this test needs root and mount(8))")
            });
        assert!(
            o.status.success(),
            "cannot mount a {size} tmpfs on {} (this test needs root / CAP_SYS_ADMIN): {}",
            dir.display(),
            String::from_utf8_lossy(&o.stderr)
        );
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let o = Command::new("umount").arg(&self.0).output();
        if !o.as_ref().is_ok_and(|o| o.status.success()) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

/// Fills the filesystem of `path` with one file; returns its size.
fn fill(path: &Path) -> u64 {
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![0x5au8; 64 * 1024];
    let mut n = 0u64;
    loop {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(k) => n += k as u64,
            Err(e) if e.raw_os_error() == Some(libc_enospc()) => break,
            Err(e) => panic!("filling {}: {e}", path.display()),
        }
    }
    let _ = f.flush();
    n
}

fn libc_enospc() -> i32 {
    28 // ENOSPC on Linux
}

const FLAGS: &[&str] = &["--trace-quiet", "300ms"];

async fn health(p: &Proc) -> (u16, String) {
    p.http_get("/healthz").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_full_then_freed_loses_nothing() {
    let mnt = tempfile::tempdir().unwrap();
    let logs = tempfile::tempdir().unwrap();
    let fs = Tmpfs::mount(mnt.path(), "16m");
    let data = fs.0.join("data");
    let filler = fs.0.join("filler");
    let log = logs.path().join("collector.log");

    let mut p = Proc::spawn(&data, &log, FLAGS);
    let mut c = p.ready().await;
    assert_eq!(health(&p).await.0, 200);
    // Some findings before the episode.
    let before: Vec<_> = (0..200).map(planted).collect();
    report(&mut c, &before).await;
    assert!(
        until(Duration::from_secs(20), || async {
            p.metric("hopwatch_findings_persisted_total").await >= 400.0
        })
        .await,
        "{}",
        p.log_text()
    );

    // Episode 1: full.
    let filled = fill(&filler);
    let during: Vec<_> = (200..3_200).map(planted).collect();
    report(&mut c, &during).await;
    let t = Instant::now();
    let went_unready = until(Duration::from_secs(20), || async {
        health(&p).await.0 == 503
    })
    .await;
    let h = health(&p).await;
    assert!(
        went_unready,
        "/healthz stays {h:?} on a full disk: {}",
        p.log_text()
    );
    let unready_after = t.elapsed();
    assert!(h.1.contains("not ready"), "{h:?}");
    assert_eq!(p.http_get("/livez").await.0, 200, "/livez stays 200");
    // Findings writes fail (not only the WAL).
    assert!(
        until(Duration::from_secs(20), || async {
            p.metric("hopwatch_persist_healthy").await == 0.0
        })
        .await,
        "{}",
        p.log_text()
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let errors = p.metric("hopwatch_persist_errors_total").await;
    let wal_errors = p.metric("hopwatch_wal_write_errors_total").await;
    let (_, body) = health(&p).await;
    assert!(errors >= 2.0, "writes retried: {errors}");
    println!(
        "full ({filled} filler bytes): /healthz 503 after {unready_after:?}: {}  persist errors {errors}, WAL write errors {wal_errors}",
        body.trim()
    );
    // Still accepting reports while full.
    report(&mut c, &(3_200..3_300).map(planted).collect::<Vec<_>>()).await;

    // Freed: ready again without a restart.
    std::fs::remove_file(&filler).unwrap();
    let t = Instant::now();
    let ready = until(Duration::from_secs(30), || async {
        health(&p).await.0 == 200 && p.metric("hopwatch_persist_healthy").await == 1.0
    })
    .await;
    assert!(ready, "{:?}: {}", health(&p).await, p.log_text());
    let recovered_after = t.elapsed();
    let reopens = p.metric("hopwatch_persist_reopens_total").await;
    assert!(reopens >= 1.0, "database re-opened: {reopens}");
    let expect = 3_300 * 2;
    assert!(
        until(Duration::from_secs(20), || async {
            p.samples().await.1 >= expect
        })
        .await
    );
    let (st, took) = p.term(Duration::from_secs(30));
    assert!(st.success(), "{}", p.log_text());
    println!("freed: /healthz 200 after {recovered_after:?}, {reopens} re-opens; SIGTERM exit in {took:?}");

    // Every finding in the database (the WAL off: only the database can have them).
    let (mut p, samples, n) = reopen_without_wal(&data, &log).await;
    let s = survived(&samples, 0..3_300);
    println!(
        "disk full then freed: survived/planted {}/{} ({n} findings stored)",
        s.0, s.1
    );
    assert_eq!(s, (3_300, 3_300));
    assert_eq!(n, expect);
    let (st, _) = p.term(Duration::from_secs(30));
    assert!(st.success());

    // Episode 2: SIGTERM while full; space comes back within shutdown's retry window.
    let mut p = Proc::spawn(&data, &log, FLAGS);
    let mut c = p.ready().await;
    let filled = fill(&filler);
    report(&mut c, &(5_000..6_000).map(planted).collect::<Vec<_>>()).await;
    assert!(
        until(Duration::from_secs(20), || async {
            p.metric("hopwatch_persist_healthy").await == 0.0
        })
        .await,
        "{}",
        p.log_text()
    );
    let free_later = {
        let filler = filler.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(2));
            std::fs::remove_file(filler).unwrap();
        })
    };
    let (st, took) = p.term(Duration::from_secs(40));
    free_later.join().unwrap();
    assert!(st.success(), "{}", p.log_text());
    let (p, samples, n) = reopen_without_wal(&data, &log).await;
    let s = survived(&samples, 5_000..6_000);
    println!(
        "SIGTERM while full ({filled} filler bytes), freed 2 s later: exit 0 after {took:?}, survived/planted {}/{} ({n} findings stored)",
        s.0, s.1
    );
    assert_eq!(s, (1_000, 1_000));
    drop(p);

    // Episode 3: SIGTERM while full and it stays full: a bounded retry, then a loud
    // error naming what could not be written, and a non-zero exit.
    let mut p = Proc::spawn(&data, &log, FLAGS);
    let mut c = p.ready().await;
    let _ = fill(&filler);
    report(&mut c, &(7_000..7_500).map(planted).collect::<Vec<_>>()).await;
    assert!(
        until(Duration::from_secs(20), || async {
            p.metric("hopwatch_persist_healthy").await == 0.0
        })
        .await
    );
    let (st, took) = p.term(Duration::from_secs(40));
    let text = p.log_text();
    let loud = text
        .lines()
        .find(|l| l.contains("SHUTDOWN COULD NOT PERSIST FINDINGS"))
        .unwrap_or_else(|| panic!("no loud shutdown error: {text}"))
        .to_string();
    assert!(!st.success(), "exit status says it failed");
    assert!(loud.contains("findings_unwritten=1000"), "{loud}");
    println!("SIGTERM while full, stays full: exit {st} after {took:?}: {loud}");
    drop(p);
    std::fs::remove_file(&filler).unwrap();
    drop(fs);
}
