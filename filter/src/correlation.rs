//! The correlation store: what the inbound side remembers for the outbound side.
//!
//! For every inbound request, each of its correlation ids (B3 trace id, W3C trace id,
//! `x-request-id`; the other tracers' trace ids and the `correlation_headers` values
//! when the request carries them) is remembered with the tag the request carried (possibly none) and a
//! "serving" marker: an entry exists exactly when this workload is serving that trace.
//! The outbound side looks its own ids up to restore the tag (`correlated`) and to tell
//! PROPAGATED from NEW.
//!
//! Entries live in proxy-wasm shared data (seen by every worker) and, for the ids this
//! VM's own inbound side wrote, in a [`LocalStore`] that answers the outbound side
//! without a host call when the app's call lands on the same worker.
//!
//! ## Layout in proxy-wasm shared data (process-wide per `vm_id`)
//!
//! Ids are hashed (FNV-1a) to one of `buckets` keys `hopwatch.corr.<n>`. Each key holds
//! a compact binary list of at most `per_bucket` entries:
//!
//! ```text
//! value  := version:u8(=2) buckets:u16le entry*      (version 1: no `buckets`)
//! entry  := expires_at_secs:u32le kind:u8 flags:u8 id_len:u8 tag_len:u8 id tag
//! flags  := bit 0 serving (always set), bit 1 the request carried B3, bit 2 W3C
//! ```
//!
//! `buckets` is the writer's `correlation_buckets`. Why: the inbound and outbound side
//! must hash ids over the same number of buckets; configured differently, the outbound
//! side looks in the wrong bucket for most ids and tag restores silently fail. With the
//! count in the data, a reader or writer that finds another count than its own counts
//! `correlation_buckets_mismatch`, logs it (rate-limited, [`crate::ratelimit`]) and the
//! outbound side still finds the entry in the bucket the writer's count gives (one more
//! read, only while misconfigured). Version 1 values (written by older filters during
//! an upgrade) are still read; they carry no count, so they are never a mismatch.
//!
//! Why: one key per id would cost a host call per id and leave expired keys behind
//! forever (shared data has no TTL and no delete); one key for everything would copy
//! the whole store on every request and make every worker contend on one CAS token. A
//! small fixed number of buckets bounds memory (`buckets * per_bucket` entries of at
//! most 264 bytes), costs one read + one CAS write per distinct bucket touched on the
//! inbound side and one read per id on the outbound side, and spreads CAS contention.
//! Writes drop expired entries, replace an entry with the same id, and evict the entry
//! closest to expiry when the bucket is full; a CAS mismatch is retried a bounded
//! number of times, then given up (counted), never blocking the request.

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use crate::host::{Host, SetStatus};
use crate::sampling::fnv1a;

/// Which correlation id an entry is keyed by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum IdKind {
    /// B3 trace id.
    B3 = 1,
    /// W3C trace id.
    W3c = 2,
    /// `x-request-id`.
    RequestId = 3,
    /// SkyWalking trace id (decoded from `sw8`).
    Sw8 = 4,
    /// Jaeger trace id (`uber-trace-id`).
    Uber = 5,
    /// Datadog trace id (`x-datadog-trace-id`).
    Datadog = 6,
    /// The exact value of one of the `correlation_headers`.
    Header = 7,
}

impl IdKind {
    fn from_u8(b: u8) -> Option<IdKind> {
        match b {
            1 => Some(IdKind::B3),
            2 => Some(IdKind::W3c),
            3 => Some(IdKind::RequestId),
            4 => Some(IdKind::Sw8),
            5 => Some(IdKind::Uber),
            6 => Some(IdKind::Datadog),
            7 => Some(IdKind::Header),
            _ => None,
        }
    }

    /// True for trace ids (B3 / W3C / the other tracers'), which mark "serving this
    /// trace".
    pub fn is_trace(self) -> bool {
        matches!(
            self,
            IdKind::B3 | IdKind::W3c | IdKind::Sw8 | IdKind::Uber | IdKind::Datadog
        )
    }
}

/// One remembered id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Expiry, seconds since the epoch.
    pub expires_at: u32,
    /// Kind of id.
    pub kind: IdKind,
    /// The id (at most 255 bytes).
    pub id: String,
    /// The tag the inbound request carried (empty: none).
    pub tag: String,
    /// The trace contexts the inbound request carried.
    pub contexts: Contexts,
}

/// The current bucket format (with the writer's bucket count).
const VERSION: u8 = 2;
/// The format before the bucket count was carried (read, never written).
const VERSION_1: u8 = 1;
const FLAG_SERVING: u8 = 1;
/// The inbound request carried a B3 trace context.
const FLAG_B3: u8 = 2;
/// The inbound request carried a W3C trace context.
const FLAG_W3C: u8 = 4;

/// Which trace contexts an inbound request carried, as its filter saw it (before the
/// sidecar's own tracer added one of its own).
///
/// Why it is remembered: an outbound call correlated to a request that had a context,
/// but sent without one, lost it in the app; without any (a mesh with no tracer, where
/// requests carry only `x-request-id`) there was nothing to lose. And a second context
/// of the other kind on the app's call, one the request did not have, was added by the
/// sidecar's tracer, not made up by the app.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Contexts {
    /// B3 (`x-b3-*` or `b3`).
    pub b3: bool,
    /// W3C `traceparent`.
    pub w3c: bool,
}

impl Contexts {
    /// No trace context at all.
    pub const NONE: Contexts = Contexts {
        b3: false,
        w3c: false,
    };

    /// Either context.
    pub fn traced(self) -> bool {
        self.b3 || self.w3c
    }

    fn from_flags(flags: u8) -> Contexts {
        Contexts {
            b3: flags & FLAG_B3 != 0,
            w3c: flags & FLAG_W3C != 0,
        }
    }
}

/// The entry flags byte of an inbound request with these contexts.
fn entry_flags(ctx: Contexts) -> u8 {
    let mut f = FLAG_SERVING;
    if ctx.b3 {
        f |= FLAG_B3;
    }
    if ctx.w3c {
        f |= FLAG_W3C;
    }
    f
}

/// Store dimensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreConfig {
    /// Number of bucket keys.
    pub buckets: u32,
    /// Entries per bucket.
    pub per_bucket: usize,
    /// Entry lifetime, seconds.
    pub ttl_secs: u32,
}

/// Max CAS attempts per bucket write.
pub const CAS_ATTEMPTS: usize = 4;

/// Bucket index of an id.
pub fn bucket_of(cfg: &StoreConfig, kind: IdKind, id: &str) -> u32 {
    let h = fnv1a(id.as_bytes()) ^ u64::from(kind as u8);
    (h % u64::from(cfg.buckets.max(1))) as u32
}

/// Shared-data key of a bucket.
pub fn bucket_key(bucket: u32) -> String {
    let mut k = String::from("hopwatch.corr.");
    crate::flags::push_u64(&mut k, u64::from(bucket));
    k
}

/// Appends one encoded entry; skips it when the id or tag is longer than 255 bytes.
fn push_entry(out: &mut Vec<u8>, expires_at: u32, kind: IdKind, id: &str, tag: &str, flags: u8) {
    let (id, tag) = (id.as_bytes(), tag.as_bytes());
    if id.len() > 255 || tag.len() > 255 {
        return;
    }
    out.extend_from_slice(&expires_at.to_le_bytes());
    out.push(kind as u8);
    out.push(flags);
    out.push(id.len() as u8);
    out.push(tag.len() as u8);
    out.extend_from_slice(id);
    out.extend_from_slice(tag);
}

/// The bucket value header: the version and the writer's bucket count.
fn push_header(out: &mut Vec<u8>, buckets: u32) {
    out.push(VERSION);
    out.extend_from_slice(&u16::try_from(buckets).unwrap_or(u16::MAX).to_le_bytes());
}

/// The bucket count the writer of an encoded bucket was configured with (`None`: empty,
/// unreadable, or a version 1 value, which carries none).
pub fn written_buckets(bytes: &[u8]) -> Option<u32> {
    match bytes {
        [VERSION, a, b, ..] => Some(u32::from(u16::from_le_bytes([*a, *b]))),
        _ => None,
    }
}

/// Serialises a bucket written by a store of `buckets` buckets.
pub fn encode(entries: &[Entry], buckets: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(3 + entries.len() * 48);
    push_header(&mut out, buckets);
    for e in entries {
        push_entry(
            &mut out,
            e.expires_at,
            e.kind,
            &e.id,
            &e.tag,
            entry_flags(e.contexts),
        );
    }
    out
}

/// Parses a bucket; tolerant: anything unreadable ends the list (never panics).
pub fn decode(bytes: &[u8]) -> Vec<Entry> {
    readable_entries(bytes)
        .filter_map(|e| {
            Some(Entry {
                expires_at: e.expires_at,
                kind: IdKind::from_u8(e.kind)?,
                id: std::str::from_utf8(e.id).ok()?.to_string(),
                tag: std::str::from_utf8(e.tag).ok()?.to_string(),
                contexts: Contexts::from_flags(e.flags),
            })
        })
        .collect()
}

/// Remembers ids with `tag` (inbound side), in this VM's `local` copy and in shared
/// data; `contexts`: the trace contexts the request carried. Returns the number
/// of bucket writes given up. Ids longer than 255 bytes or empty are skipped.
pub fn remember<H: Host + ?Sized>(
    host: &H,
    local: &LocalStore,
    cfg: &StoreConfig,
    ids: &[(IdKind, &str)],
    tag: &str,
    contexts: Contexts,
    now: u32,
) -> u32 {
    let expires_at = now.saturating_add(cfg.ttl_secs);
    if contexts.traced() {
        local.saw_traced_inbound(expires_at);
    }
    if tag.len() <= 255 {
        let shared_tag: Rc<str> = Rc::from(tag);
        for &(kind, id) in ids {
            local.put(kind, id, &shared_tag, contexts, expires_at);
        }
    }
    if tag.len() > 255 {
        return 0;
    }
    // Group ids by bucket so each bucket is read and written once.
    let mut groups: Vec<(u32, Vec<(IdKind, &str)>)> = Vec::with_capacity(ids.len());
    for &(kind, id) in ids {
        if id.is_empty() || id.len() > 255 {
            continue;
        }
        let b = bucket_of(cfg, kind, id);
        match groups.iter_mut().find(|(gb, _)| *gb == b) {
            Some((_, v)) => v.push((kind, id)),
            None => groups.push((b, vec![(kind, id)])),
        }
    }
    let mut failures = 0;
    for (b, new_ids) in groups {
        let key = bucket_key(b);
        let mut done = false;
        for attempt in 0..CAS_ATTEMPTS {
            let (old, cas) = host.shared_get(&key).unwrap_or_default();
            if attempt == 0 {
                check_buckets(host, local, cfg, &old);
            }
            let value = upsert_encoded(
                &old,
                &new_ids,
                tag,
                contexts,
                expires_at,
                now,
                cfg.per_bucket,
                cfg.buckets,
            );
            match host.shared_set(&key, &value, cas) {
                SetStatus::Ok => {
                    done = true;
                    break;
                }
                SetStatus::CasMismatch => continue,
                SetStatus::Failed => break,
            }
        }
        if !done {
            failures += 1;
        }
    }
    failures
}

/// One entry of an encoded bucket, borrowed.
struct RawEntry<'b> {
    expires_at: u32,
    kind: u8,
    flags: u8,
    id: &'b [u8],
    tag: &'b [u8],
    /// The whole encoded entry (header, id, tag), copied as is when kept.
    bytes: &'b [u8],
}

impl RawEntry<'_> {
    /// A known kind and UTF-8 id and tag: what [`decode`] accepts.
    fn readable(&self) -> bool {
        IdKind::from_u8(self.kind).is_some()
            && std::str::from_utf8(self.id).is_ok()
            && std::str::from_utf8(self.tag).is_ok()
    }
}

/// The entries of an encoded bucket, in order, read in place; ends at the first entry
/// that does not fit the bytes (a bucket of another format, or a truncated one).
struct RawEntries<'b> {
    rest: &'b [u8],
}

fn raw_entries(bytes: &[u8]) -> RawEntries<'_> {
    match bytes {
        [VERSION, _, _, rest @ ..] | [VERSION_1, rest @ ..] => RawEntries { rest },
        _ => RawEntries { rest: &[] },
    }
}

/// The entries up to the first unreadable one (where [`decode`] stops).
fn readable_entries(bytes: &[u8]) -> impl Iterator<Item = RawEntry<'_>> {
    raw_entries(bytes).take_while(RawEntry::readable)
}

impl<'b> Iterator for RawEntries<'b> {
    type Item = RawEntry<'b>;

    fn next(&mut self) -> Option<RawEntry<'b>> {
        let (head, tail) = self.rest.split_first_chunk::<8>()?;
        let [a, b, c, d, kind, flags, id_len, tag_len] = *head;
        let (id_len, tag_len) = (usize::from(id_len), usize::from(tag_len));
        let len = 8 + id_len + tag_len;
        let (Some(id), Some(tag), Some(bytes)) = (
            tail.get(..id_len),
            tail.get(id_len..id_len + tag_len),
            self.rest.get(..len),
        ) else {
            self.rest = &[];
            return None;
        };
        self.rest = self.rest.get(len..).unwrap_or_default();
        Some(RawEntry {
            expires_at: u32::from_le_bytes([a, b, c, d]),
            kind,
            flags,
            id,
            tag,
            bytes,
        })
    }
}

/// One entry of the rewritten bucket: (expiry, a kept entry, or a new id).
type BucketSlot<'e, 'b> = (u32, Option<&'e RawEntry<'b>>, Option<(IdKind, &'e str)>);

/// The new value of an encoded bucket after remembering `ids` with `tag` (and the
/// request's trace `contexts`): expired
/// entries and the entries of the same ids dropped, the new entries appended, then the
/// entries closest to expiry evicted beyond `cap` (the earliest first among equals).
/// Computed on the bytes: the kept entries are copied as they are, nothing is decoded
/// into owned strings; this runs on every inbound request, for every bucket its ids
/// fall in. The value is written in the current format, with `buckets` (the writer's
/// bucket count) in its header.
#[allow(clippy::too_many_arguments)]
pub fn upsert_encoded(
    old: &[u8],
    ids: &[(IdKind, &str)],
    tag: &str,
    contexts: Contexts,
    expires_at: u32,
    now: u32,
    cap: usize,
    buckets: u32,
) -> Vec<u8> {
    let cap = cap.max(1);
    let mut kept: Vec<RawEntry<'_>> = readable_entries(old).collect();
    kept.retain(|e| {
        e.expires_at > now
            && !ids
                .iter()
                .any(|&(k, id)| k as u8 == e.kind && id.as_bytes() == e.id)
    });
    // The bucket in order: the kept entries, then the new ones.
    let mut all: Vec<BucketSlot<'_, '_>> = kept
        .iter()
        .map(|e| (e.expires_at, Some(e), None))
        .chain(ids.iter().map(|&n| (expires_at, None, Some(n))))
        .collect();
    // Over capacity: drop the entries closest to expiry, the earliest first among equals.
    while all.len() > cap {
        let oldest = all
            .iter()
            .enumerate()
            .min_by_key(|(_, (exp, _, _))| *exp)
            .map(|(i, _)| i);
        match oldest {
            Some(i) => {
                all.remove(i);
            }
            None => break,
        }
    }
    let size: usize = kept.iter().map(|e| e.bytes.len()).sum::<usize>()
        + ids
            .iter()
            .map(|(_, id)| 8 + id.len() + tag.len())
            .sum::<usize>();
    let mut out = Vec::with_capacity(3 + size);
    push_header(&mut out, buckets);
    for (_, old_entry, new_id) in &all {
        if let Some(e) = old_entry {
            out.extend_from_slice(e.bytes);
        }
        if let Some((kind, id)) = new_id {
            push_entry(&mut out, expires_at, *kind, id, tag, entry_flags(contexts));
        }
    }
    out
}

/// The live entry for (kind, id) in an encoded bucket, read in place: the tag is
/// borrowed from `bytes` (no entry is decoded into owned strings on the lookup path).
pub fn find_encoded<'b>(bytes: &'b [u8], kind: IdKind, id: &str, now: u32) -> Option<&'b str> {
    find_encoded_entry(bytes, kind, id, now).map(|(tag, _)| tag)
}

/// Like [`find_encoded`], with the trace contexts of the inbound request.
pub fn find_encoded_entry<'b>(
    bytes: &'b [u8],
    kind: IdKind,
    id: &str,
    now: u32,
) -> Option<(&'b str, Contexts)> {
    raw_entries(bytes)
        .find(|e| e.kind == kind as u8 && e.id == id.as_bytes() && e.expires_at > now)
        .and_then(|e| {
            Some((
                std::str::from_utf8(e.tag).ok()?,
                Contexts::from_flags(e.flags),
            ))
        })
}

/// A correlation hit: the tag the inbound request carried (empty: none) and which id
/// matched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hit {
    /// Kind of the id that matched.
    pub kind: IdKind,
    /// The tag (empty: the inbound request had none).
    pub tag: Rc<str>,
    /// The trace contexts the inbound request carried.
    pub contexts: Contexts,
}

/// Longest id the [`LocalStore`] holds (hex trace ids are 16 or 32 bytes, a UUID
/// request id 36); longer ids are only in shared data.
pub const LOCAL_ID_MAX: usize = 40;

#[derive(Debug, Clone)]
struct Slot {
    expires_at: u32,
    kind: u8,
    id_len: u8,
    id: [u8; LOCAL_ID_MAX],
    tag: Rc<str>,
    contexts: Contexts,
}

/// This VM's own copy of the correlation entries its inbound side wrote.
///
/// Why: reading a shared-data bucket costs the outbound side a host call that returns
/// data (~1.6 us in Envoy 1.40, most of it the host calling back into the VM to
/// allocate the copy) on every request. Envoy runs one VM per worker thread and, in a
/// sidecar, the inbound and outbound plugins share it (same `vm_id`), so when the
/// app's outbound call lands on the worker that served the inbound request the answer
/// is already here. Shared data stays the source of truth across workers: a local miss
/// falls back to it. The local copy is a direct-mapped table (a newer id overwrites an
/// older one in its slot): bounded, no eviction bookkeeping, and a miss only costs the
/// shared-data read that would have been made anyway.
#[derive(Debug)]
pub struct LocalStore {
    slots: RefCell<Vec<Option<Slot>>>,
    mask: usize,
    /// Until when (seconds since the epoch) this VM's inbound side has recently seen a
    /// request with a trace context: the mesh runs a tracer, so an outbound call with
    /// none that correlates to nothing lost its context in the app. On a mesh without a
    /// tracer this stays 0 and such calls are sampled like any other.
    traced_until: Cell<u32>,
    /// Buckets found written with another bucket count since the last
    /// [`LocalStore::take_mismatch`], and the last such count.
    mismatches: Cell<(u64, u32)>,
}

impl LocalStore {
    /// A table of at least `capacity` slots (rounded up to a power of two, at most
    /// 65,536).
    pub fn new(capacity: usize) -> Self {
        let n = capacity.clamp(1, 1 << 16).next_power_of_two();
        LocalStore {
            slots: RefCell::new(vec![None; n]),
            mask: n - 1,
            traced_until: Cell::new(0),
            mismatches: Cell::new((0, 0)),
        }
    }

    /// Notes a bucket written by a store of `buckets` buckets (not this one's count).
    pub fn note_mismatch(&self, buckets: u32) {
        let (n, _) = self.mismatches.get();
        self.mismatches.set((n.saturating_add(1), buckets));
    }

    /// Mismatches noted since the last call, with the last other bucket count seen.
    pub fn take_mismatch(&self) -> Option<(u64, u32)> {
        let (n, b) = self.mismatches.replace((0, 0));
        (n > 0).then_some((n, b))
    }

    fn index(&self, kind: IdKind, id: &str) -> usize {
        // Ids are random hex (or UUIDs): a word-at-a-time multiplicative hash spreads
        // them well and costs a few instructions per 8 bytes (FNV-1a, used for the
        // shared buckets, costs a multiplication per byte). The slot is only a hint:
        // the id itself is compared.
        let mut h: u64 = u64::from(kind as u8);
        for chunk in id.as_bytes().chunks(8) {
            let mut w = [0u8; 8];
            if let Some(dst) = w.get_mut(..chunk.len()) {
                dst.copy_from_slice(chunk);
            }
            h = (h.rotate_left(5) ^ u64::from_le_bytes(w)).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
        }
        (h >> 32) as usize & self.mask
    }

    /// Notes that the inbound side saw a traced request (remembered until `expires_at`).
    pub fn saw_traced_inbound(&self, expires_at: u32) {
        if expires_at > self.traced_until.get() {
            self.traced_until.set(expires_at);
        }
    }

    /// Whether this VM's inbound side saw a traced request within the entry lifetime.
    pub fn traced_recently(&self, now: u32) -> bool {
        self.traced_until.get() > now
    }

    /// Remembers `id` with `tag` (and its request's trace `contexts`) until `expires_at`.
    pub fn put(&self, kind: IdKind, id: &str, tag: &Rc<str>, contexts: Contexts, expires_at: u32) {
        if id.is_empty() || id.len() > LOCAL_ID_MAX {
            return;
        }
        let mut buf = [0u8; LOCAL_ID_MAX];
        if let Some(dst) = buf.get_mut(..id.len()) {
            dst.copy_from_slice(id.as_bytes());
        }
        let i = self.index(kind, id);
        if let Some(slot) = self.slots.borrow_mut().get_mut(i) {
            *slot = Some(Slot {
                expires_at,
                kind: kind as u8,
                id_len: id.len() as u8,
                id: buf,
                tag: tag.clone(),
                contexts,
            });
        }
    }

    /// The live tag remembered for `id`, if any.
    pub fn get(&self, kind: IdKind, id: &str, now: u32) -> Option<Rc<str>> {
        self.get_entry(kind, id, now).map(|(tag, _)| tag)
    }

    /// The live tag remembered for `id` and its request's trace contexts.
    pub fn get_entry(&self, kind: IdKind, id: &str, now: u32) -> Option<(Rc<str>, Contexts)> {
        if id.is_empty() || id.len() > LOCAL_ID_MAX {
            return None;
        }
        let slots = self.slots.borrow();
        let s = slots.get(self.index(kind, id))?.as_ref()?;
        let same = s.kind == kind as u8
            && s.id.get(..usize::from(s.id_len)) == Some(id.as_bytes())
            && s.expires_at > now;
        same.then(|| (s.tag.clone(), s.contexts))
    }
}

/// Looks ids up in order (outbound side); the first live entry wins. Each id is looked
/// up in this VM's `local` copy first and in shared data only when it is not there.
pub fn recall<H: Host + ?Sized>(
    host: &H,
    local: &LocalStore,
    cfg: &StoreConfig,
    ids: &[(IdKind, &str)],
    now: u32,
) -> Option<Hit> {
    for &(kind, id) in ids {
        if id.is_empty() || id.len() > 255 {
            continue;
        }
        if let Some((tag, contexts)) = local.get_entry(kind, id, now) {
            return Some(Hit {
                kind,
                tag,
                contexts,
            });
        }
        let bucket = bucket_of(cfg, kind, id);
        let Some((bytes, _)) = host.shared_get(&bucket_key(bucket)) else {
            continue;
        };
        if let Some((tag, contexts)) = find_encoded_entry(&bytes, kind, id, now) {
            return Some(hit(kind, tag, contexts));
        }
        // Written by a store of another size: the id is in the bucket that size gives
        // (the other side hashed it over its own count). Look there too, so that the
        // misconfiguration costs a log line and a read, not the tag.
        if let Some(other) = check_buckets(host, local, cfg, &bytes) {
            let theirs = StoreConfig {
                buckets: other,
                ..*cfg
            };
            let b = bucket_of(&theirs, kind, id);
            if b != bucket {
                if let Some((bytes, _)) = host.shared_get(&bucket_key(b)) {
                    if let Some((tag, contexts)) = find_encoded_entry(&bytes, kind, id, now) {
                        return Some(hit(kind, tag, contexts));
                    }
                }
            }
        }
    }
    None
}

fn hit(kind: IdKind, tag: &str, contexts: Contexts) -> Hit {
    Hit {
        kind,
        tag: Rc::from(tag),
        contexts,
    }
}

/// Compares the bucket count an encoded bucket was written with to this store's; on a
/// mismatch counts it (`correlation_buckets_mismatch`), notes it for the rate-limited
/// log line and returns the other count.
fn check_buckets<H: Host + ?Sized>(
    host: &H,
    local: &LocalStore,
    cfg: &StoreConfig,
    bytes: &[u8],
) -> Option<u32> {
    let theirs = written_buckets(bytes).filter(|b| *b != cfg.buckets && *b > 0)?;
    host.count(crate::metrics::CORRELATION_BUCKETS_MISMATCH, 1);
    local.note_mismatch(theirs);
    Some(theirs)
}
