//! Persistence under `--data-dir`: the findings database ([`Db`], redb), its recovery
//! from write errors ([`Persist`]), the write-ahead log of hops ([`crate::wal`]) and the
//! checkpoint that ties them.
//!
//! Storage: [`redb`], a pure-Rust, ACID, copy-on-write B-tree key-value store in one file
//! (no C dependency, no background compaction threads, stable file format). Queries never
//! touch it: they are served from the in-memory index, and changed findings are written
//! in batches (one transaction per flush, every second) by a background task and on
//! shutdown. The database is read once at startup.
//!
//! **Write errors (disk full, I/O errors).** After a failed commit redb refuses every
//! later write ("previous I/O error"), so a failed write closes the database; the next
//! attempt re-opens it (repairing it if needed) and writes again. Attempts back off from
//! [`RETRY_MIN`] to [`RETRY_MAX`]. The findings of a failed write stay dirty in memory, so
//! nothing accepted is lost while the process lives; meanwhile `/healthz` answers 503 with
//! the reason (the pod leaves the Service's endpoints; the sidecars retry and buffer),
//! while `/livez` stays 200 (restarting would not free the disk). At shutdown the flush
//! is retried for at most [`SHUTDOWN_RETRY_FOR`]; what still cannot be written is logged
//! at error, and with the WAL it comes back at the next start from the replayed hops.
//!
//! **Checkpoint** (with the WAL): every flush first seals the active WAL segment (a
//! record is appended only after its hops are ingested), then, under the ingest gate (no Report between ingest and recording its evicted traces, no
//! analysis round in flight), notes the arrival time of the oldest open trace: every hop
//! that arrived before it belongs to an analysed trace whose findings are in the store.
//! Once the flush has written every dirty finding, the sealed segments whose newest hop
//! arrived before that time are deleted. A crash therefore loses nothing written to the
//! WAL; replayed traces that were analysed and persisted already (at most the last
//! flush interval + `--trace-quiet` of traffic) are counted again (`count` only: the
//! finding and its samples are the same).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use hopwatch_proto::v1::Break;
use parking_lot::{Mutex, RwLock};
use prost::Message;
use redb::{ReadableDatabase, ReadableTable, TableDefinition};

use crate::metrics::Snapshot;
use crate::service::Collector;
use crate::store::FindingStore;
use crate::wal::{Wal, WalError, WalOptions};

const FINDINGS: TableDefinition<&str, &[u8]> = TableDefinition::new("findings");

/// First retry after a failed write; doubled per failure up to [`RETRY_MAX`].
pub const RETRY_MIN: Duration = Duration::from_millis(100);
pub const RETRY_MAX: Duration = Duration::from_secs(5);
/// Findings are flushed this often while writes succeed.
pub const FLUSH_EVERY: Duration = Duration::from_secs(1);
/// How often the background loop asks [`Collector::flush_tick`] whether a flush is due.
pub const TICK: Duration = Duration::from_millis(100);
/// How long shutdown keeps retrying a failing flush (within Kubernetes' default 30 s
/// termination grace period, after the open traces are analysed).
pub const SHUTDOWN_RETRY_FOR: Duration = Duration::from_secs(10);
/// See [`Collector::flush_tick`].
const ARRIVAL_ORDER_MARGIN_MS: u64 = 2_000;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create data dir {path}: {source}")]
    DataDir {
        path: String,
        source: std::io::Error,
    },
    #[error("opening database {path}: {source}")]
    Open {
        path: String,
        source: redb::DatabaseError,
    },
    #[error("database: {0}")]
    Db(String),
    #[error("corrupt finding record {id}: {source}")]
    Decode {
        id: String,
        source: prost::DecodeError,
    },
    #[error("{0}")]
    Wal(#[from] WalError),
}

fn db_err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Db(e.to_string())
}

/// What `--no-wal` and `--wal-sync-interval` select.
#[derive(Clone, Debug)]
pub struct PersistOptions {
    /// None: no write-ahead log.
    pub wal: Option<WalOptions>,
}

impl Default for PersistOptions {
    fn default() -> Self {
        PersistOptions {
            wal: Some(WalOptions::default()),
        }
    }
}

/// The findings database under `--data-dir`.
pub struct Db {
    db: redb::Database,
}

impl Db {
    pub fn open(dir: &Path) -> Result<Db, StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::DataDir {
            path: dir.display().to_string(),
            source,
        })?;
        let path = dir.join("findings.redb");
        let db = redb::Database::create(&path).map_err(|source| StoreError::Open {
            path: path.display().to_string(),
            source,
        })?;
        let tx = db.begin_write().map_err(db_err)?;
        tx.open_table(FINDINGS).map_err(db_err)?;
        tx.commit().map_err(db_err)?;
        Ok(Db { db })
    }

    pub fn load(&self, into: &mut FindingStore) -> Result<usize, StoreError> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let table = tx.open_table(FINDINGS).map_err(db_err)?;
        let mut n = 0;
        for row in table.iter().map_err(db_err)? {
            let (k, v) = row.map_err(db_err)?;
            let b = Break::decode(v.value()).map_err(|source| StoreError::Decode {
                id: k.value().to_string(),
                source,
            })?;
            into.insert_raw(b);
            n += 1;
        }
        Ok(n)
    }

    /// Writes changed findings and deletes removed ones in one transaction.
    pub fn write(&self, changed: &[Break], removed: &[String]) -> Result<(), StoreError> {
        if changed.is_empty() && removed.is_empty() {
            return Ok(());
        }
        let tx = self.db.begin_write().map_err(db_err)?;
        {
            let mut t = tx.open_table(FINDINGS).map_err(db_err)?;
            for b in changed {
                t.insert(b.id.as_str(), b.encode_to_vec().as_slice())
                    .map_err(db_err)?;
            }
            for id in removed {
                t.remove(id.as_str()).map_err(db_err)?;
            }
        }
        tx.commit().map_err(db_err)?;
        Ok(())
    }
}

struct Failure {
    since: Instant,
    error: String,
    delay: Duration,
    next_try: Instant,
}

/// The database plus its recovery state (see the module docs).
pub struct Persist {
    dir: PathBuf,
    /// None after a failed write: re-opened by the next attempt.
    db: Mutex<Option<Db>>,
    failure: Mutex<Option<Failure>>,
    last_flush: Mutex<Instant>,
    healthy: AtomicBool,
    pub reopens: AtomicU64,
}

impl Persist {
    pub fn open(dir: &Path) -> Result<Persist, StoreError> {
        Ok(Persist {
            dir: dir.to_path_buf(),
            db: Mutex::new(Some(Db::open(dir)?)),
            failure: Mutex::new(None),
            last_flush: Mutex::new(Instant::now()),
            healthy: AtomicBool::new(true),
            reopens: AtomicU64::new(0),
        })
    }

    pub fn load(&self, into: &mut FindingStore) -> Result<usize, StoreError> {
        match &*self.db.lock() {
            Some(db) => db.load(into),
            None => Ok(0),
        }
    }

    /// One write attempt (re-opening the database first if the last one failed).
    pub fn write(&self, changed: &[Break], removed: &[String]) -> Result<(), StoreError> {
        let mut g = self.db.lock();
        let db = match g.take() {
            Some(db) => db,
            None => {
                let db = Db::open(&self.dir)?;
                self.reopens.fetch_add(1, Relaxed);
                tracing::info!(dir = %self.dir.display(), "findings database re-opened");
                db
            }
        };
        let r = db.write(changed, removed);
        if r.is_ok() {
            *g = Some(db);
        }
        // On error `db` is dropped here: redb refuses every write after an I/O error.
        r
    }

    pub fn healthy(&self) -> bool {
        self.healthy.load(Relaxed)
    }

    /// A flush wrote everything.
    pub fn succeeded(&self) {
        *self.last_flush.lock() = Instant::now();
        if let Some(f) = self.failure.lock().take() {
            tracing::info!(
                after = ?f.since.elapsed(),
                "findings persisted again (the database recovered)"
            );
        }
        self.healthy.store(true, Relaxed);
    }

    /// A flush failed: back off.
    pub fn failed(&self, e: &StoreError) {
        self.healthy.store(false, Relaxed);
        let mut g = self.failure.lock();
        let now = Instant::now();
        let (since, delay) = match &*g {
            Some(f) => (f.since, (f.delay * 2).min(RETRY_MAX)),
            None => (now, RETRY_MIN),
        };
        tracing::error!(error = %e, retry_in = ?delay, failing_for = ?since.elapsed(),
            "persisting findings failed: kept in memory, database re-opened and the write retried");
        *g = Some(Failure {
            since,
            error: e.to_string(),
            delay,
            next_try: now + delay,
        });
    }

    /// Whether a flush is due (every [`FLUSH_EVERY`], or at the backoff's next try).
    pub fn due(&self) -> bool {
        let now = Instant::now();
        match &*self.failure.lock() {
            Some(f) => now >= f.next_try,
            None => now >= *self.last_flush.lock() + FLUSH_EVERY,
        }
    }

    /// Why findings cannot be persisted (None: they can).
    pub fn problem(&self) -> Option<String> {
        self.failure.lock().as_ref().map(|f| {
            format!(
                "findings cannot be persisted for {:.1?} (retrying every {:?}): {}",
                f.since.elapsed(),
                f.delay,
                f.error
            )
        })
    }
}

/// A collector's persistence: the database, the WAL, and the gate of the checkpoint.
pub struct Durable {
    pub db: Persist,
    pub wal: Option<Wal>,
    /// Read-held from ingest until the findings of the traces it evicted are recorded,
    /// and by each analysis round; write-held by the checkpoint while it notes which
    /// hops are analysed.
    gate: RwLock<()>,
}

impl Durable {
    /// Opens the database under `dir`, loads its findings into `store` and opens the WAL
    /// (its segments are replayed by [`Collector::replay_wal`]).
    pub fn open(
        dir: &Path,
        opts: &PersistOptions,
        store: &mut FindingStore,
    ) -> Result<Durable, StoreError> {
        let db = Persist::open(dir)?;
        let n = db.load(store)?;
        tracing::info!(findings = n, dir = %dir.display(), "loaded findings");
        let wal = match &opts.wal {
            Some(o) => Some(Wal::open(&dir.join("wal"), o.clone())?),
            None => None,
        };
        Ok(Durable {
            db,
            wal,
            gate: RwLock::new(()),
        })
    }
}

/// A guard of the checkpoint gate (a no-op without persistence).
pub struct Gate<'a>(#[allow(dead_code)] Option<parking_lot::RwLockReadGuard<'a, ()>>);

impl Collector {
    /// Holds off the checkpoint (see [`Durable`]'s gate).
    pub(crate) fn gate(&self) -> Gate<'_> {
        Gate(self.durable.as_ref().map(|d| d.gate.read()))
    }

    /// Appends accepted hops to the WAL (after they are ingested: see the checkpoint).
    pub(crate) fn wal_append(&self, hops: &[hopwatch_proto::v1::Hop], now_ms: u64) {
        if let Some(w) = self.durable.as_ref().and_then(|d| d.wal.as_ref()) {
            w.append(hops, now_ms);
        }
    }

    /// Re-ingests the hops of the WAL left by the previous run (before serving).
    pub(crate) fn replay_wal(&self) {
        let Some(w) = self.durable.as_ref().and_then(|d| d.wal.as_ref()) else {
            return;
        };
        let t = Instant::now();
        let (records, hops) = w.replay(|ms, hops| {
            self.ingest_accepted(&hops, ms);
        });
        if records > 0 || w.stats().torn_records.load(Relaxed) > 0 {
            tracing::info!(
                records,
                hops,
                torn = w.stats().torn_records.load(Relaxed),
                took = ?t.elapsed(),
                open_traces = self.core.lock().open_traces(),
                "replayed the write-ahead log"
            );
        }
    }

    /// The background loop's persistence step (every [`TICK`]): flushes when due (every
    /// second, or at the next retry while writes fail), then checkpoints the WAL.
    pub fn flush_tick(&self) {
        let Some(d) = &self.durable else {
            let _ = self.store.write().take_dirty();
            return;
        };
        if !d.db.due() {
            return;
        }
        let (analysed_before, sealed) = match &d.wal {
            Some(w) => {
                // Every record in a sealed segment was appended after its Report's hops
                // were ingested and their evicted traces recorded.
                w.seal();
                let sealed = w.closed();
                // The gate without making Reports queue behind a waiting writer while an
                // analysis round holds it: try for a while, then wait.
                let t = Instant::now();
                let _g = loop {
                    if let Some(g) = d.gate.try_write() {
                        break g;
                    }
                    if t.elapsed() > Duration::from_millis(50) {
                        break d.gate.write();
                    }
                    std::thread::sleep(Duration::from_micros(500));
                };
                // Reports take their arrival time before they reach the aggregator, so
                // its queue is ordered only to within the time a report takes to get
                // there: a margin covers it.
                let oldest = self
                    .core
                    .lock()
                    .oldest_open_ms()
                    .map_or(u64::MAX, |t| t.saturating_sub(ARRIVAL_ORDER_MARGIN_MS));
                (oldest, sealed)
            }
            None => (0, Vec::new()),
        };
        if self.flush().is_err() {
            return;
        }
        if let Some(w) = &d.wal {
            let done: Vec<u64> = sealed
                .iter()
                .filter(|s| s.max_ms < analysed_before)
                .map(|s| s.seq)
                .collect();
            w.delete(&done);
        }
    }

    /// Shutdown's flush: retried for at most [`SHUTDOWN_RETRY_FOR`]; then the WAL is
    /// closed, and deleted if every finding is persisted.
    pub(crate) fn persist_at_shutdown(&self) -> Result<(), StoreError> {
        let Some(d) = &self.durable else {
            return Ok(());
        };
        let deadline = Instant::now() + SHUTDOWN_RETRY_FOR;
        let mut delay = RETRY_MIN;
        let result = loop {
            match self.flush() {
                Ok(_) => break Ok(()),
                Err(e) if Instant::now() + delay > deadline => break Err(e),
                Err(_) => {
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(RETRY_MAX);
                }
            }
        };
        let unwritten_wal = d.wal.as_ref().map_or(0, |w| {
            w.close(if result.is_ok() {
                Duration::ZERO
            } else {
                Duration::from_secs(2)
            })
        });
        match &result {
            Ok(()) => {
                if let Some(w) = &d.wal {
                    let all: Vec<u64> = w.closed().iter().map(|s| s.seq).collect();
                    w.delete(&all);
                }
            }
            Err(e) => {
                let changed = {
                    let mut s = self.store.write();
                    let (c, r) = s.take_dirty();
                    s.restore_dirty(&c, &r);
                    c.len() + r.len()
                };
                match &d.wal {
                    Some(w) if unwritten_wal == 0 => {
                        tracing::error!(error = %e, findings_unwritten = changed,
                        wal_dir = %w.dir().display(),
                        "SHUTDOWN COULD NOT PERSIST FINDINGS: they are not in the database; the WAL keeps their hops, which are replayed and analysed again at the next start")
                    }
                    _ => {
                        tracing::error!(error = %e, findings_unwritten = changed, wal_bytes_unwritten = unwritten_wal,
                        "SHUTDOWN COULD NOT PERSIST FINDINGS: these findings are LOST (neither in the database nor in the WAL)")
                    }
                }
            }
        }
        result
    }

    /// Why the collector is not ready (`/healthz` 503), None when it is.
    pub fn not_ready(&self) -> Option<String> {
        let d = self.durable.as_ref()?;
        let mut why: Vec<String> = d.db.problem().into_iter().collect();
        why.extend(d.wal.as_ref().and_then(|w| w.problem()));
        (!why.is_empty()).then(|| why.join("; "))
    }

    /// The persistence and WAL figures of `/metrics`.
    pub(crate) fn persist_metrics(&self, s: &mut Snapshot) {
        let (healthy, reopens) = match &self.durable {
            Some(d) => (d.db.healthy(), d.db.reopens.load(Relaxed)),
            None => (true, 0),
        };
        s.gauge(
            "hopwatch_persist_healthy",
            "1 while findings can be persisted (the last flush succeeded), else 0 (/healthz answers 503).",
            healthy as u64,
        );
        s.counter(
            "hopwatch_persist_reopens",
            "Re-openings of the findings database after a failed write.",
            reopens,
        );
        let Some(w) = self.durable.as_ref().and_then(|d| d.wal.as_ref()) else {
            return;
        };
        let st = w.stats();
        let l = |a: &AtomicU64| a.load(Relaxed);
        s.gauge(
            "hopwatch_wal_bytes",
            "Bytes of write-ahead log segments on disk.",
            w.bytes(),
        );
        s.gauge(
            "hopwatch_wal_pending_bytes",
            "Bytes appended to the write-ahead log but not written yet.",
            w.pending_bytes(),
        );
        s.gauge(
            "hopwatch_wal_healthy",
            "1 while the write-ahead log can be written, else 0 (/healthz answers 503).",
            w.problem().is_none() as u64,
        );
        s.counter(
            "hopwatch_wal_records_appended",
            "Report batches appended to the write-ahead log.",
            l(&st.records_appended),
        );
        s.counter(
            "hopwatch_wal_records_replayed",
            "Write-ahead log records (Report batches) replayed at start.",
            l(&st.records_replayed),
        );
        s.counter(
            "hopwatch_wal_hops_replayed",
            "Hops re-ingested from the write-ahead log at start.",
            l(&st.hops_replayed),
        );
        s.counter(
            "hopwatch_wal_torn_records",
            "Write-ahead log records found torn (cut short or CRC mismatch) at replay, ignored with the rest of their segment.",
            l(&st.torn_records),
        );
        s.counter(
            "hopwatch_wal_write_errors",
            "Failed write-ahead log writes (retried; Reports still accepted).",
            l(&st.write_errors),
        );
        s.counter(
            "hopwatch_wal_dropped_bytes",
            "Write-ahead log bytes dropped because the buffer was full while writes failed.",
            l(&st.dropped_bytes),
        );
        s.counter(
            "hopwatch_wal_fsyncs",
            "Write-ahead log group commits (write + fdatasync).",
            l(&st.fsyncs),
        );
        s.counter(
            "hopwatch_wal_segments_deleted",
            "Write-ahead log segments deleted by checkpoints.",
            l(&st.segments_deleted),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::{now_ms, Settings};
    use hopwatch_proto::v1::{Direction, Hop, ReportRequest};

    fn req(trace: &str, now: u64) -> ReportRequest {
        ReportRequest {
            hops: vec![Hop {
                trace_id: trace.into(),
                span_id: "a000000000000001".into(),
                request_id: format!("req-{trace}"),
                direction: Direction::Inbound as i32,
                workload: "w".into(),
                namespace: "ns".into(),
                service: "s".into(),
                response_code: 200,
                start_time_unix_micros: now * 1000,
                duration_micros: 1000,
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn wait_written(c: &Collector) {
        let w = c.durable.as_ref().unwrap().wal.as_ref().unwrap();
        let t = Instant::now();
        while w.pending_bytes() > 0 || w.bytes() == 0 {
            assert!(t.elapsed() < Duration::from_secs(5), "WAL not written");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn wal(c: &Collector) -> &Wal {
        c.durable.as_ref().unwrap().wal.as_ref().unwrap()
    }

    /// A segment is deleted only once its traces are analysed and the findings flushed;
    /// before, a restart replays it.
    #[test]
    fn checkpoint_waits_for_analysis() {
        let dir = tempfile::tempdir().unwrap();
        let mut settings = Settings::default();
        settings.limits.trace_quiet = Duration::from_secs(3600);
        let c = Collector::open(settings.clone(), dir.path()).unwrap();
        let now = now_ms();
        c.report(&req("4bf92f3577b34da6a3ce929d0e0e4736", now), now)
            .unwrap();
        wait_written(&c);
        std::thread::sleep(FLUSH_EVERY + TICK);
        c.flush_tick();
        assert_eq!(wal(&c).closed().len(), 1, "sealed, kept: its trace is open");
        drop(c);
        let c = Collector::open(settings, dir.path()).unwrap();
        assert_eq!(c.core.lock().open_traces(), 1, "replayed");
        assert_eq!(wal(&c).stats().hops_replayed.load(Relaxed), 1);
        // Analysed, then flushed: deleted.
        assert_eq!(c.poll(now_ms() + 3_700_000), 1);
        std::thread::sleep(FLUSH_EVERY + TICK);
        c.flush_tick();
        assert!(wal(&c).closed().is_empty());
        c.report(&req("4bf92f3577b34da6a3ce929d0e0e4737", now), now)
            .unwrap();
        // Shutdown analyses every open trace, persists, and deletes the whole WAL.
        c.shutdown(now_ms()).unwrap();
        assert!(wal(&c).closed().is_empty());
        assert_eq!(
            std::fs::read_dir(dir.path().join("wal")).unwrap().count(),
            0
        );
    }
}
