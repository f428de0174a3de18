//! The write-ahead log of accepted hops: what makes a SIGKILL (or an OOM kill, a node
//! crash) lose at most `--wal-sync-interval` (+ one fsync) of traffic instead of every
//! open trace and every finding not yet flushed.
//!
//! Layout: segment files `wal/wal-<seq, 16 hex digits>.log` under `--data-dir`. A segment
//! starts with a 4 KB block holding the 8-byte magic [`MAGIC`]; then records, each
//! `[payload length: u32 LE][CRC-32 of the payload: u32 LE][payload]`, the payload being
//! `[arrival time, ms since the epoch: u64 LE][a ReportRequest holding only the hops]`.
//! A zero length off a 4 KB boundary is padding up to the next boundary: each group
//! commit is written with `O_DIRECT` in whole 4 KB blocks (no copy into the page cache,
//! which cost the collector more CPU than encoding), where the filesystem allows it.
//!
//! Off the request path: [`Wal::append`] encodes the batch into an in-memory buffer (no
//! I/O, no syscall); one writer thread writes the buffer out and `fdatasync`s it every
//! `sync_interval` or as soon as `sync_bytes` are pending (group commit: one fsync for
//! every batch of the interval). A write error never fails a Report: the bytes stay
//! buffered (up to `max_pending_bytes`, beyond that the oldest are dropped and counted),
//! the segment is truncated back to its last whole record, and the write is retried each
//! interval; meanwhile [`Wal::problem`] says why (the collector is then not ready).
//!
//! Replay ([`Wal::replay`]) reads the segments found at start in order; a record whose
//! length runs past the end of the file or whose CRC does not match (a write torn by the
//! crash) ends that segment: it is counted, logged, and the rest of that segment ignored.
//!
//! Checkpoint: the collector seals the active segment ([`Wal::seal`]), notes which sealed
//! segments hold only hops of analysed traces (by their newest arrival time, see
//! `persist.rs`), persists the findings and then deletes those segments
//! ([`Wal::delete`]).

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hopwatch_proto::v1::{Hop, ReportRequest};
use parking_lot::{Condvar, Mutex};
use prost::Message;

/// First 8 bytes of every segment (format version 1).
pub const MAGIC: &[u8; 8] = b"HWWAL\x001\n";
/// Record header: payload length + CRC.
const HEADER: usize = 8;
/// Alignment and granularity of direct writes; the segment header's size.
const BLOCK: usize = 4096;
/// Larger payloads are corrupt by definition (a 5,000-hop batch is ~4 MB).
const MAX_RECORD: usize = 64 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum WalError {
    #[error("WAL directory {path}: {source}")]
    Dir {
        path: String,
        source: std::io::Error,
    },
    #[error("WAL segment {path}: {source}")]
    Segment {
        path: String,
        source: std::io::Error,
    },
}

/// WAL tuning (`--no-wal` turns the WAL off altogether, `--wal-sync-interval`).
#[derive(Clone, Debug)]
pub struct WalOptions {
    /// Longest time between an append and its fsync (the crash-loss bound).
    pub sync_interval: Duration,
    /// Write and fsync as soon as this many bytes are pending.
    pub sync_bytes: usize,
    /// Bytes kept buffered while writes fail; beyond, the oldest are dropped (counted).
    pub max_pending_bytes: usize,
    /// A segment is closed at this size (and at every checkpoint).
    pub segment_bytes: u64,
}

impl Default for WalOptions {
    fn default() -> Self {
        WalOptions {
            sync_interval: Duration::from_millis(200),
            sync_bytes: 8 * 1024 * 1024,
            max_pending_bytes: 256 * 1024 * 1024,
            segment_bytes: 64 * 1024 * 1024,
        }
    }
}

/// Counters exported on /metrics.
#[derive(Default)]
pub struct WalStats {
    pub records_appended: AtomicU64,
    pub records_replayed: AtomicU64,
    pub hops_replayed: AtomicU64,
    pub torn_records: AtomicU64,
    pub write_errors: AtomicU64,
    /// Bytes never written because the buffer was full while writes failed.
    pub dropped_bytes: AtomicU64,
    pub segments_deleted: AtomicU64,
    pub fsyncs: AtomicU64,
}

/// A segment file.
#[derive(Clone, Debug)]
pub struct Segment {
    pub seq: u64,
    pub path: PathBuf,
    pub bytes: u64,
    /// Newest arrival time (ms) of its records; `u64::MAX` until known (not replayed).
    pub max_ms: u64,
}

struct Active {
    seg: Segment,
    file: File,
    /// Opened with O_DIRECT: writes in whole aligned blocks.
    direct: bool,
}

#[derive(Clone, Copy)]
#[repr(C, align(4096))]
struct Block([u8; BLOCK]);

/// A block-aligned staging buffer for direct writes.
#[derive(Default)]
struct Aligned(Vec<Block>);

impl Aligned {
    /// `data` followed by zero padding to whole blocks.
    fn stage(&mut self, data: &[u8]) -> &[u8] {
        let n = data.len().div_ceil(BLOCK);
        if self.0.len() < n {
            self.0.resize(n, Block([0; BLOCK]));
        }
        // SAFETY: `Block` is `repr(C)` plain bytes without padding; the slice covers
        // exactly the first `n` blocks of the vector, which is not touched meanwhile.
        let bytes =
            unsafe { std::slice::from_raw_parts_mut(self.0.as_mut_ptr().cast::<u8>(), n * BLOCK) };
        bytes[..data.len()].copy_from_slice(data);
        bytes[data.len()..].fill(0);
        bytes
    }
}

#[derive(Default)]
struct Segments {
    closed: Vec<Segment>,
    active: Option<Active>,
    next_seq: u64,
}

#[derive(Default)]
struct Pending {
    data: Vec<u8>,
    max_ms: u64,
}

struct Inner {
    dir: PathBuf,
    opts: WalOptions,
    pending: Mutex<Pending>,
    wake: Condvar,
    segs: Mutex<Segments>,
    stop: AtomicBool,
    stage: Mutex<Aligned>,
    /// The last write error, while writes fail.
    error: Mutex<Option<(Instant, String)>>,
    stats: WalStats,
}

/// The write-ahead log (see the module docs).
pub struct Wal {
    inner: Arc<Inner>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// Creates a segment, with O_DIRECT where the filesystem supports it.
fn open_segment(path: &Path) -> std::io::Result<(File, bool)> {
    use std::os::unix::fs::OpenOptionsExt;
    match File::options()
        .create_new(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
    {
        Ok(f) => Ok((f, true)),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            let _ = std::fs::remove_file(path);
            Ok((
                File::options().create_new(true).write(true).open(path)?,
                false,
            ))
        }
        Err(e) => Err(e),
    }
}

fn seg_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("wal-{seq:016x}.log"))
}

impl Wal {
    /// Opens `dir` (created if missing), lists the segments left by the previous run (to
    /// be replayed) and starts the writer thread. New records go to a new segment.
    pub fn open(dir: &Path, opts: WalOptions) -> Result<Wal, WalError> {
        let derr = |source| WalError::Dir {
            path: dir.display().to_string(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(derr)?;
        let mut closed = Vec::new();
        for e in std::fs::read_dir(dir).map_err(derr)? {
            let e = e.map_err(derr)?;
            let name = e.file_name();
            let Some(seq) = name
                .to_str()
                .and_then(|n| n.strip_prefix("wal-"))
                .and_then(|n| n.strip_suffix(".log"))
                .and_then(|n| u64::from_str_radix(n, 16).ok())
            else {
                continue;
            };
            let bytes = e.metadata().map(|m| m.len()).unwrap_or(0);
            closed.push(Segment {
                seq,
                path: e.path(),
                bytes,
                max_ms: u64::MAX,
            });
        }
        closed.sort_by_key(|s| s.seq);
        let next_seq = closed.last().map_or(1, |s| s.seq + 1);
        let inner = Arc::new(Inner {
            dir: dir.to_path_buf(),
            opts,
            pending: Mutex::new(Pending::default()),
            wake: Condvar::new(),
            segs: Mutex::new(Segments {
                closed,
                active: None,
                next_seq,
            }),
            stop: AtomicBool::new(false),
            stage: Mutex::new(Aligned::default()),
            error: Mutex::new(None),
            stats: WalStats::default(),
        });
        let w = inner.clone();
        let handle = std::thread::Builder::new()
            .name("hopwatch-wal".into())
            .spawn(move || w.run())
            .map_err(derr)?;
        Ok(Wal {
            inner,
            writer: Mutex::new(Some(handle)),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    pub fn stats(&self) -> &WalStats {
        &self.inner.stats
    }

    /// Appends one batch of accepted hops that arrived at `now_ms` to the buffer (no I/O).
    pub fn append(&self, hops: &[Hop], now_ms: u64) {
        if hops.is_empty() {
            return;
        }
        // Encoded outside the lock: concurrent Reports only contend for the copy.
        let len: usize = 8 + hops
            .iter()
            .map(|h| prost::encoding::message::encoded_len(1, h))
            .sum::<usize>();
        let i = &self.inner;
        if len > MAX_RECORD {
            i.stats
                .dropped_bytes
                .fetch_add((HEADER + len) as u64, Relaxed);
            return;
        }
        thread_local! {
            // Reused per thread: a fresh allocation per batch costs page faults.
            static ENC: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        let full = ENC.with_borrow_mut(|rec| {
            rec.clear();
            rec.reserve(HEADER + len);
            rec.extend_from_slice(&(len as u32).to_le_bytes());
            rec.extend_from_slice(&[0; 4]);
            rec.extend_from_slice(&now_ms.to_le_bytes());
            for h in hops {
                prost::encoding::message::encode(1, h, rec);
            }
            let crc = crc32fast::hash(&rec[HEADER..]);
            rec[4..HEADER].copy_from_slice(&crc.to_le_bytes());
            let mut p = i.pending.lock();
            if p.data.len() + rec.len() > i.opts.max_pending_bytes {
                drop(p);
                i.stats.dropped_bytes.fetch_add(rec.len() as u64, Relaxed);
                return None;
            }
            p.data.extend_from_slice(rec);
            p.max_ms = p.max_ms.max(now_ms);
            let full = p.data.len() >= i.opts.sync_bytes;
            if rec.capacity() > 16 * 1024 * 1024 {
                *rec = Vec::new();
            }
            Some(full)
        });
        let Some(full) = full else {
            return;
        };
        i.stats.records_appended.fetch_add(1, Relaxed);
        if full {
            i.wake.notify_one();
        }
    }

    /// Why the WAL cannot be written right now (None: it can).
    pub fn problem(&self) -> Option<String> {
        self.inner
            .error
            .lock()
            .as_ref()
            .map(|(since, e)| format!("WAL writes failing for {:?}: {e}", since.elapsed()))
    }

    /// Bytes in segment files (closed and active).
    pub fn bytes(&self) -> u64 {
        let s = self.inner.segs.lock();
        s.closed.iter().map(|s| s.bytes).sum::<u64>() + s.active.as_ref().map_or(0, |a| a.seg.bytes)
    }

    /// Bytes appended but not written yet.
    pub fn pending_bytes(&self) -> u64 {
        self.inner.pending.lock().data.len() as u64
    }

    /// Closes the active segment (if it holds records): what is written so far becomes
    /// deletable by a checkpoint.
    pub fn seal(&self) {
        let mut s = self.inner.segs.lock();
        self.inner.close_active(&mut s);
    }

    /// The closed segments (a snapshot).
    pub fn closed(&self) -> Vec<Segment> {
        self.inner.segs.lock().closed.clone()
    }

    /// Reads every segment left by the previous run, in order, calling `f(arrival ms,
    /// hops)` per record. Returns (records, hops) replayed.
    pub fn replay(&self, mut f: impl FnMut(u64, Vec<Hop>)) -> (u64, u64) {
        let segs = self.closed();
        let (mut records, mut hops) = (0u64, 0u64);
        for seg in segs {
            let mut max_ms = 0u64;
            let mut data = Vec::new();
            if let Err(e) = File::open(&seg.path).and_then(|mut f| f.read_to_end(&mut data)) {
                tracing::error!(segment = %seg.path.display(), error = %e, "cannot read a WAL segment; its hops are lost");
                continue;
            }
            let mut off = MAGIC.len();
            if data.len() < off || &data[..off] != MAGIC || !header_block_whole(&data) {
                if !data.is_empty() {
                    self.inner.stats.torn_records.fetch_add(1, Relaxed);
                    tracing::warn!(segment = %seg.path.display(), "WAL segment without the hopwatch WAL header: ignored");
                }
                off = data.len();
            }
            while off < data.len() {
                match record_at(&data, off) {
                    Ok(None) => break,
                    Ok(Some((now_ms, req, next))) => {
                        max_ms = max_ms.max(now_ms);
                        records += 1;
                        hops += req.hops.len() as u64;
                        f(now_ms, req.hops);
                        off = next;
                    }
                    Err(why) => {
                        self.inner.stats.torn_records.fetch_add(1, Relaxed);
                        tracing::warn!(segment = %seg.path.display(), offset = off,
                            bytes_ignored = data.len() - off, reason = why,
                            "torn WAL record (a write cut short by the crash): ignored with the rest of its segment");
                        break;
                    }
                }
            }
            let mut s = self.inner.segs.lock();
            if let Some(c) = s.closed.iter_mut().find(|c| c.seq == seg.seq) {
                c.max_ms = max_ms;
            }
        }
        let st = &self.inner.stats;
        st.records_replayed.fetch_add(records, Relaxed);
        st.hops_replayed.fetch_add(hops, Relaxed);
        (records, hops)
    }

    /// Deletes closed segments by sequence number (their content is checkpointed).
    pub fn delete(&self, seqs: &[u64]) {
        if seqs.is_empty() {
            return;
        }
        let mut s = self.inner.segs.lock();
        s.closed.retain(|c| {
            if !seqs.contains(&c.seq) {
                return true;
            }
            match std::fs::remove_file(&c.path) {
                Ok(()) => {
                    self.inner.stats.segments_deleted.fetch_add(1, Relaxed);
                    false
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
                Err(e) => {
                    tracing::warn!(segment = %c.path.display(), error = %e, "cannot delete a checkpointed WAL segment (retried at the next checkpoint)");
                    true
                }
            }
        });
    }

    /// Stops the writer after it wrote what is pending (retrying for at most `retry_for`
    /// if writes fail). Returns the bytes that could not be written.
    pub fn close(&self, retry_for: Duration) -> u64 {
        let i = &self.inner;
        let deadline = Instant::now() + retry_for;
        i.stop.store(true, Relaxed);
        i.wake.notify_all();
        if let Some(h) = self.writer.lock().take() {
            let _ = h.join();
        }
        // The writer made one last attempt; retry here while it fails.
        let mut delay = Duration::from_millis(100);
        loop {
            let p = std::mem::take(&mut *i.pending.lock());
            if p.data.is_empty() {
                break;
            }
            let n = p.data.len() as u64;
            match i.write_out(p.data, p.max_ms) {
                Ok(_) => continue,
                Err(data) => i.put_back(data, p.max_ms),
            }
            if Instant::now() + delay > deadline {
                let mut s = i.segs.lock();
                i.close_active(&mut s);
                return n;
            }
            std::thread::sleep(delay);
            delay = (delay * 2).min(Duration::from_secs(1));
        }
        let mut s = i.segs.lock();
        i.close_active(&mut s);
        0
    }
}

/// The header block is whole (a segment is never shorter than it).
fn header_block_whole(data: &[u8]) -> bool {
    data.len() >= BLOCK
}

type Record = (u64, ReportRequest, usize);

/// Decodes the record at `off`: (arrival ms, request, offset of the next record); None at
/// the end (padding up to it).
fn record_at(data: &[u8], off: usize) -> Result<Option<Record>, &'static str> {
    let rest = &data[off..];
    if rest.len() < HEADER {
        return Err("header cut short");
    }
    let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
    let crc = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]);
    if len == 0 && !off.is_multiple_of(BLOCK) {
        // Padding: the next record starts at the next block.
        let next = off.next_multiple_of(BLOCK);
        return if next >= data.len() {
            Ok(None)
        } else {
            record_at(data, next)
        };
    }
    if !(8..=MAX_RECORD).contains(&len) {
        return Err("impossible length");
    }
    let Some(payload) = rest.get(HEADER..HEADER + len) else {
        return Err("payload cut short");
    };
    if crc32fast::hash(payload) != crc {
        return Err("CRC mismatch");
    }
    let mut ms = [0u8; 8];
    ms.copy_from_slice(&payload[..8]);
    let req = ReportRequest::decode(&payload[8..]).map_err(|_| "undecodable batch")?;
    Ok(Some((u64::from_le_bytes(ms), req, off + HEADER + len)))
}

impl Inner {
    fn run(&self) {
        let mut failing = false;
        // Double buffering: appends fill one buffer while the other is written; both keep
        // their capacity (no page faults on regrowing them every interval).
        let mut spare: Vec<u8> = Vec::new();
        loop {
            let max_ms = {
                let mut p = self.pending.lock();
                let stop = self.stop.load(Relaxed);
                if !stop && (failing || p.data.len() < self.opts.sync_bytes) {
                    let _ = self.wake.wait_for(&mut p, self.opts.sync_interval);
                }
                std::mem::swap(&mut p.data, &mut spare);
                std::mem::take(&mut p.max_ms)
            };
            let stop = self.stop.load(Relaxed);
            if !spare.is_empty() {
                match self.write_out(std::mem::take(&mut spare), max_ms) {
                    Ok(mut buf) => {
                        failing = false;
                        if buf.capacity() <= 4 * self.opts.sync_bytes {
                            buf.clear();
                            spare = buf;
                        }
                    }
                    Err(data) => {
                        failing = true;
                        self.put_back(data, max_ms);
                    }
                }
            }
            if stop {
                return;
            }
        }
    }

    /// Puts bytes that could not be written back in front of the buffer.
    fn put_back(&self, mut data: Vec<u8>, max_ms: u64) {
        let mut p = self.pending.lock();
        if data.len() + p.data.len() > self.opts.max_pending_bytes {
            self.stats
                .dropped_bytes
                .fetch_add(data.len() as u64, Relaxed);
            tracing::error!(
                bytes = data.len(),
                "WAL buffer full while writes fail: the oldest unwritten records are dropped"
            );
            return;
        }
        data.extend_from_slice(&p.data);
        p.data = data;
        p.max_ms = p.max_ms.max(max_ms);
    }

    /// Writes and fdatasyncs `data` (whole records) to the active segment. On failure
    /// the segment is truncated back to its last whole record and closed, and the data
    /// is handed back.
    fn write_out(&self, data: Vec<u8>, max_ms: u64) -> Result<Vec<u8>, Vec<u8>> {
        let mut s = self.segs.lock();
        let r = (|| -> Result<(), (Option<PathBuf>, std::io::Error)> {
            if s.active.is_none() {
                let seq = s.next_seq;
                let path = seg_path(&self.dir, seq);
                let (mut file, direct) = open_segment(&path).map_err(|e| (None, e))?;
                s.next_seq += 1;
                let mut header = [0u8; BLOCK];
                header[..MAGIC.len()].copy_from_slice(MAGIC);
                let r = {
                    let mut st = self.stage.lock();
                    file.write_all(st.stage(&header))
                        .and_then(|_| file.sync_data())
                };
                if let Err(e) = r {
                    drop(file);
                    let _ = std::fs::remove_file(&path);
                    return Err((Some(path), e));
                }
                // The new file's directory entry must survive a power loss too.
                if let Ok(d) = File::open(&self.dir) {
                    let _ = d.sync_all();
                }
                s.active = Some(Active {
                    seg: Segment {
                        seq,
                        path,
                        bytes: BLOCK as u64,
                        max_ms: 0,
                    },
                    file,
                    direct,
                });
            }
            let Some(a) = s.active.as_mut() else {
                return Ok(());
            };
            let (r, written) = if a.direct {
                let mut st = self.stage.lock();
                let blocks = st.stage(&data);
                (
                    a.file.write_all(blocks).and_then(|_| a.file.sync_data()),
                    blocks.len(),
                )
            } else {
                (
                    a.file.write_all(&data).and_then(|_| a.file.sync_data()),
                    data.len(),
                )
            };
            self.stats.fsyncs.fetch_add(1, Relaxed);
            if let Err(e) = r {
                // Whatever part was written is cut off: the segment ends on a whole record.
                let _ = a.file.set_len(a.seg.bytes);
                return Err((Some(a.seg.path.clone()), e));
            }
            a.seg.bytes += written as u64;
            a.seg.max_ms = a.seg.max_ms.max(max_ms);
            Ok(())
        })();
        match r {
            Ok(()) => {
                if s.active
                    .as_ref()
                    .is_some_and(|a| a.seg.bytes >= self.opts.segment_bytes)
                {
                    self.close_active(&mut s);
                }
                drop(s);
                if self.error.lock().take().is_some() {
                    tracing::info!("WAL writes succeed again");
                }
                Ok(data)
            }
            Err((path, e)) => {
                self.close_active(&mut s);
                drop(s);
                self.stats.write_errors.fetch_add(1, Relaxed);
                let msg = match path {
                    Some(p) => format!("{}: {e}", p.display()),
                    None => format!("{}: {e}", self.dir.display()),
                };
                let mut err = self.error.lock();
                if err.is_none() {
                    tracing::error!(error = %msg, "WAL write failed (Reports are still accepted; retried every sync interval)");
                }
                let since = err.as_ref().map_or_else(Instant::now, |(t, _)| *t);
                *err = Some((since, msg));
                Err(data)
            }
        }
    }

    fn close_active(&self, s: &mut Segments) {
        if let Some(a) = s.active.take() {
            if a.seg.bytes <= BLOCK as u64 {
                drop(a.file);
                let _ = std::fs::remove_file(&a.seg.path);
            } else {
                s.closed.push(a.seg);
            }
        }
    }
}

impl Drop for Wal {
    fn drop(&mut self) {
        self.inner.stop.store(true, Relaxed);
        self.inner.wake.notify_all();
        if let Some(h) = self.writer.lock().take() {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hop(t: &str) -> Hop {
        Hop {
            trace_id: t.into(),
            workload: "w".into(),
            ..Default::default()
        }
    }

    fn opts() -> WalOptions {
        WalOptions {
            sync_interval: Duration::from_millis(20),
            ..Default::default()
        }
    }

    #[test]
    fn records_survive_and_replay_in_order() {
        let dir = tempfile::tempdir().unwrap();
        {
            let w = Wal::open(dir.path(), opts()).unwrap();
            w.append(&[hop("a"), hop("b")], 10);
            w.append(&[hop("c")], 11);
            assert_eq!(w.close(Duration::ZERO), 0);
        }
        let w = Wal::open(dir.path(), opts()).unwrap();
        let mut got = Vec::new();
        let (r, h) = w.replay(|ms, hops| got.push((ms, hops.len(), hops[0].trace_id.clone())));
        assert_eq!((r, h), (2, 3));
        assert_eq!(got, [(10, 2, "a".into()), (11, 1, "c".into())]);
        assert_eq!(w.closed()[0].max_ms, 11);
        assert_eq!(w.stats().torn_records.load(Relaxed), 0);
    }

    #[test]
    fn a_torn_tail_is_ignored_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        {
            // Both records in one group commit (at close).
            let long = WalOptions {
                sync_interval: Duration::from_secs(60),
                ..Default::default()
            };
            let w = Wal::open(dir.path(), long).unwrap();
            w.append(&[hop("a")], 1);
            w.append(&[hop("b")], 2);
            w.close(Duration::ZERO);
        }
        let seg = Wal::open(dir.path(), opts()).unwrap().closed()[0]
            .path
            .clone();
        let data = std::fs::read(&seg).unwrap();
        let (_, _, second) = record_at(&data, BLOCK).unwrap().unwrap();
        let (_, _, end) = record_at(&data, second).unwrap().unwrap();
        // Cut the last record short, as a crash mid-write would.
        File::options()
            .write(true)
            .open(&seg)
            .unwrap()
            .set_len(end as u64 - 5)
            .unwrap();
        let w = Wal::open(dir.path(), opts()).unwrap();
        let (r, _) = w.replay(|_, _| {});
        assert_eq!(r, 1);
        assert_eq!(w.stats().torn_records.load(Relaxed), 1);
        // A flipped bit in the first record: CRC mismatch, nothing replayed.
        let mut data = std::fs::read(&seg).unwrap();
        data[BLOCK + HEADER + 10] ^= 0x40;
        std::fs::write(&seg, &data).unwrap();
        let w = Wal::open(dir.path(), opts()).unwrap();
        assert_eq!(w.replay(|_, _| {}).0, 0);
        assert_eq!(w.stats().torn_records.load(Relaxed), 1);
    }

    #[test]
    fn seal_and_delete() {
        let dir = tempfile::tempdir().unwrap();
        let w = Wal::open(dir.path(), opts()).unwrap();
        w.append(&[hop("a")], 1);
        let t = Instant::now();
        while w.bytes() == 0 && t.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(5));
        }
        w.seal();
        let closed = w.closed();
        assert_eq!(closed.len(), 1);
        assert_eq!(closed[0].max_ms, 1);
        w.delete(&[closed[0].seq]);
        assert!(w.closed().is_empty());
        assert!(!closed[0].path.exists());
        assert_eq!(w.bytes(), 0);
    }
}
