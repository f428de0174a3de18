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
//! The store is a direct-mapped table of `correlation_buckets x correlation_bucket_entries`
//! slots (4,096 at the defaults). An id is hashed to one slot, whose shared-data key
//! `hopwatch.slot.<n>` holds exactly one entry:
//!
//! ```text
//! value  := version:u8(=3) buckets:u16le entries:u16le entry
//! entry  := expires_at_secs:u32le kind:u8 flags:u8 id_len:u8 tag_len:u8 trace:u64le id tag
//! flags  := bit 0 serving (always set), bit 1 the request carried B3, bit 2 W3C
//! trace  := FNV-1a of the request's trace id (0: none), see `Contexts::trace`
//! ```
//!
//! Remembering an id is one unconditional `set_shared_data` of about 60 bytes: no read,
//! no compare-and-swap, no rewrite of other entries. A newer id overwrites an older one in
//! its slot, exactly as in the [`LocalStore`] that answers the same-worker case, so both
//! copies hold the same history: an id survives `slots / (ids remembered per second)`
//! seconds on average (at most the TTL). Looking an id up on another worker is one read
//! of its slot, which is compared with the id.
//!
//! Why not buckets of many entries (the layout until December 2026): every inbound
//! request read and CAS-rewrote one ~3 KB bucket per id (64 entries, each UTF-8-checked
//! and re-encoded in the VM) so that an entry could be replaced and the oldest evicted.
//! In Envoy 1.40 that cost 16 us of Envoy CPU per sidecar round trip of fresh B3 ids
//! (two ids: B3 and `x-request-id`), a tenth of the whole round trip; slot writes cost
//! about 1 us (docs/BENCHMARKS.md). Shared data has no delete and no TTL, so keys are
//! bounded by the slot count (one key per slot ever written, at most ~330 bytes each).
//!
//! `buckets` and `entries` are the writer's `correlation_buckets` and
//! `correlation_bucket_entries`. Why: the inbound and outbound side must hash ids over
//! the same number of slots; configured differently, the outbound side looks in the
//! wrong slot for most ids and tag restores silently fail. A reader that finds a slot
//! written with another slot count counts `correlation_buckets_mismatch`, logs it
//! (rate-limited, [`crate::ratelimit`]) and still finds the entry in the slot the
//! writer's count gives (one more read, only while misconfigured). Slots are only read
//! by the outbound side of another worker than the inbound request's, which is exactly
//! where a mismatch loses tags.

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

/// The slot format (one entry, with the writer's store dimensions).
const VERSION: u8 = 3;
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
    /// [`trace_hash`] of the request's trace id (0: none). Why: an outbound call found
    /// through another id than its trace id (the trace id's slot was overwritten, or the
    /// app passes the request id on) still continues the request's trace when it carries
    /// the same trace id: PROPAGATED, not NEW.
    pub trace: u64,
}

/// The hash of a trace id kept with its request's entries (0 for none).
pub fn trace_hash(trace_id: &str) -> u64 {
    if trace_id.is_empty() {
        0
    } else {
        fnv1a(trace_id.as_bytes()).max(1)
    }
}

impl Contexts {
    /// No trace context at all.
    pub const NONE: Contexts = Contexts {
        b3: false,
        w3c: false,
        trace: 0,
    };

    /// Whether an outbound call with trace id hash `trace` continues the trace of the
    /// request these contexts are of.
    pub fn same_trace(self, trace: u64) -> bool {
        self.trace != 0 && self.trace == trace
    }

    /// Either context.
    pub fn traced(self) -> bool {
        self.b3 || self.w3c
    }

    fn from_flags(flags: u8, trace: u64) -> Contexts {
        Contexts {
            b3: flags & FLAG_B3 != 0,
            w3c: flags & FLAG_W3C != 0,
            trace,
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
    /// `correlation_buckets`.
    pub buckets: u32,
    /// `correlation_bucket_entries`.
    pub per_bucket: usize,
    /// Entry lifetime, seconds.
    pub ttl_secs: u32,
}

impl StoreConfig {
    /// The number of slots: `buckets x per_bucket` (at least 1).
    pub fn slots(&self) -> u32 {
        let per = u32::try_from(self.per_bucket).unwrap_or(u32::MAX);
        self.buckets.saturating_mul(per).max(1)
    }

    /// The dimensions a slot written by this store carries.
    pub fn dims(&self) -> Dims {
        Dims {
            buckets: u16::try_from(self.buckets).unwrap_or(u16::MAX),
            entries: u16::try_from(self.per_bucket).unwrap_or(u16::MAX),
        }
    }
}

/// The store dimensions a slot was written with (`correlation_buckets`,
/// `correlation_bucket_entries` of the writer).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Dims {
    /// The writer's `correlation_buckets`.
    pub buckets: u16,
    /// The writer's `correlation_bucket_entries`.
    pub entries: u16,
}

impl Dims {
    /// The writer's slot count.
    pub fn slots(self) -> u32 {
        (u32::from(self.buckets) * u32::from(self.entries)).max(1)
    }
}

/// The [`LocalStore`]'s hash of an id. Ids are random hex (or UUIDs): a word-at-a-time
/// multiplicative hash spreads them well and costs a few instructions per 8 bytes. A
/// slot is only a hint: the id itself is compared.
fn local_hash(kind: IdKind, id: &str) -> u64 {
    let mut h: u64 = u64::from(kind as u8);
    for chunk in id.as_bytes().chunks(8) {
        let mut w = [0u8; 8];
        if let Some(dst) = w.get_mut(..chunk.len()) {
            dst.copy_from_slice(chunk);
        }
        h = (h.rotate_left(5) ^ u64::from_le_bytes(w)).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
    h >> 32
}

/// The shared slot of an id in a table of `slots` slots. Why another hash than the
/// [`LocalStore`]'s: the two tables are both direct-mapped and, at the defaults, of the
/// same size; with one hash, two ids that collide locally would collide in shared data
/// too, and the shared copy would never answer the local misses it is there for. With
/// independent hashes a lookup misses only when both slots were overwritten.
fn slot_in(slots: u32, kind: IdKind, id: &str) -> u32 {
    let h = fnv1a(id.as_bytes()) ^ u64::from(kind as u8);
    (h % u64::from(slots.max(1))) as u32
}

/// The shared slot of an id.
pub fn slot_of(cfg: &StoreConfig, kind: IdKind, id: &str) -> u32 {
    slot_in(cfg.slots(), kind, id)
}

/// Shared-data key of a slot.
pub fn slot_key(slot: u32) -> String {
    let mut k = String::with_capacity(20);
    k.push_str("hopwatch.slot.");
    crate::flags::push_u64(&mut k, u64::from(slot));
    k
}

/// The encoded slot value of one entry written by a store of `dims`; `None` when the id
/// or the tag is longer than 255 bytes (such ids are not remembered).
fn encode_parts(
    dims: Dims,
    expires_at: u32,
    kind: IdKind,
    id: &str,
    tag: &str,
    contexts: Contexts,
) -> Option<Vec<u8>> {
    let (id, tag) = (id.as_bytes(), tag.as_bytes());
    let id_len = u8::try_from(id.len()).ok()?;
    let tag_len = u8::try_from(tag.len()).ok()?;
    let mut out = Vec::with_capacity(HEAD + id.len() + tag.len());
    out.push(VERSION);
    out.extend_from_slice(&dims.buckets.to_le_bytes());
    out.extend_from_slice(&dims.entries.to_le_bytes());
    out.extend_from_slice(&expires_at.to_le_bytes());
    out.push(kind as u8);
    out.push(entry_flags(contexts));
    out.push(id_len);
    out.push(tag_len);
    out.extend_from_slice(&contexts.trace.to_le_bytes());
    out.extend_from_slice(id);
    out.extend_from_slice(tag);
    Some(out)
}

/// Bytes of a slot value before its id and tag.
const HEAD: usize = 21;

/// Serialises a slot holding `entry`, written by a store of `dims` (`None`: the id or
/// the tag is over 255 bytes).
pub fn encode(entry: &Entry, dims: Dims) -> Option<Vec<u8>> {
    encode_parts(
        dims,
        entry.expires_at,
        entry.kind,
        &entry.id,
        &entry.tag,
        entry.contexts,
    )
}

/// One slot value, borrowed.
struct RawSlot<'b> {
    dims: Dims,
    expires_at: u32,
    kind: u8,
    flags: u8,
    trace: u64,
    id: &'b [u8],
    tag: &'b [u8],
}

/// Reads a slot value in place; `None` for anything else than one whole entry of the
/// current version (never panics).
fn raw_slot(bytes: &[u8]) -> Option<RawSlot<'_>> {
    let (head, rest) = bytes.split_first_chunk::<HEAD>()?;
    let [v, b0, b1, e0, e1, x0, x1, x2, x3, kind, flags, id_len, tag_len, t @ ..] = *head;
    if v != VERSION {
        return None;
    }
    let (id_len, tag_len) = (usize::from(id_len), usize::from(tag_len));
    if rest.len() != id_len + tag_len {
        return None;
    }
    let (id, tag) = rest.split_at(id_len);
    Some(RawSlot {
        dims: Dims {
            buckets: u16::from_le_bytes([b0, b1]),
            entries: u16::from_le_bytes([e0, e1]),
        },
        expires_at: u32::from_le_bytes([x0, x1, x2, x3]),
        kind,
        flags,
        trace: u64::from_le_bytes(t),
        id,
        tag,
    })
}

/// Parses a slot value: its entry and the writer's dimensions (`None`: empty,
/// unreadable, another format).
pub fn decode(bytes: &[u8]) -> Option<(Entry, Dims)> {
    let r = raw_slot(bytes)?;
    Some((
        Entry {
            expires_at: r.expires_at,
            kind: IdKind::from_u8(r.kind)?,
            id: std::str::from_utf8(r.id).ok()?.to_string(),
            tag: std::str::from_utf8(r.tag).ok()?.to_string(),
            contexts: Contexts::from_flags(r.flags, r.trace),
        },
        r.dims,
    ))
}

/// The dimensions of the store that wrote a slot value (`None`: unreadable).
pub fn written_dims(bytes: &[u8]) -> Option<Dims> {
    raw_slot(bytes).map(|r| r.dims)
}

/// The tag and trace contexts of a slot value when it holds a live entry for (kind, id),
/// read in place.
pub fn find_encoded_entry<'b>(
    bytes: &'b [u8],
    kind: IdKind,
    id: &str,
    now: u32,
) -> Option<(&'b str, Contexts)> {
    let r = raw_slot(bytes)?;
    if r.kind != kind as u8 || r.id != id.as_bytes() || r.expires_at <= now {
        return None;
    }
    Some((
        std::str::from_utf8(r.tag).ok()?,
        Contexts::from_flags(r.flags, r.trace),
    ))
}

/// Like [`find_encoded_entry`], the tag only.
pub fn find_encoded<'b>(bytes: &'b [u8], kind: IdKind, id: &str, now: u32) -> Option<&'b str> {
    find_encoded_entry(bytes, kind, id, now).map(|(tag, _)| tag)
}

/// Remembers ids with `tag` (inbound side), in this VM's `local` copy and in shared
/// data (one write per id, see the module docs); `contexts`: the trace contexts the
/// request carried. Returns the number of writes that failed. Ids longer than 255
/// bytes or empty are skipped.
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
    if tag.len() > 255 {
        return 0;
    }
    let shared_tag: Rc<str> = Rc::from(tag);
    let (dims, slots) = (cfg.dims(), cfg.slots());
    let mut failures = 0;
    for &(kind, id) in ids {
        if id.is_empty() {
            continue;
        }
        local.put(kind, id, &shared_tag, contexts, expires_at);
        let Some(value) = encode_parts(dims, expires_at, kind, id, tag, contexts) else {
            continue;
        };
        // cas 0: unconditional. A concurrent writer of the same slot on another worker
        // wins or loses as a newer id would: nothing to retry.
        let key = slot_key(slot_in(slots, kind, id));
        if host.shared_set(&key, &value, 0) != SetStatus::Ok {
            failures += 1;
        }
    }
    failures
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
/// Why: reading a shared-data slot costs the outbound side a host call that returns
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
    /// Slots found written with other store dimensions since the last
    /// [`LocalStore::take_mismatch`], and the last such dimensions.
    mismatches: Cell<(u64, Dims)>,
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
            mismatches: Cell::new((0, Dims::default())),
        }
    }

    /// Notes a slot written by a store of other dimensions (`theirs`).
    pub fn note_mismatch(&self, theirs: Dims) {
        let (n, _) = self.mismatches.get();
        self.mismatches.set((n.saturating_add(1), theirs));
    }

    /// Mismatches noted since the last call, with the last other dimensions seen.
    pub fn take_mismatch(&self) -> Option<(u64, Dims)> {
        let (n, d) = self.mismatches.replace((0, Dims::default()));
        (n > 0).then_some((n, d))
    }

    fn index(&self, kind: IdKind, id: &str) -> usize {
        local_hash(kind, id) as usize & self.mask
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
/// up in this VM's `local` copy first and in its shared slot only when it is not there.
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
        let slot = slot_of(cfg, kind, id);
        let Some((bytes, _)) = host.shared_get(&slot_key(slot)) else {
            continue;
        };
        if let Some((tag, contexts)) = find_encoded_entry(&bytes, kind, id, now) {
            return Some(hit(kind, tag, contexts));
        }
        // Written by a store of another size: the id is in the slot that size gives (the
        // other side hashed it over its own count). Look there too, so that the
        // misconfiguration costs a log line and a read, not the tag.
        if let Some(theirs) = check_dims(host, local, cfg, &bytes) {
            let s = slot_in(theirs.slots(), kind, id);
            if s != slot {
                if let Some((bytes, _)) = host.shared_get(&slot_key(s)) {
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

/// Compares the slot count a slot value was written with to this store's; on a
/// mismatch counts it (`correlation_buckets_mismatch`), notes it for the rate-limited
/// log line and returns the other dimensions.
fn check_dims<H: Host + ?Sized>(
    host: &H,
    local: &LocalStore,
    cfg: &StoreConfig,
    bytes: &[u8],
) -> Option<Dims> {
    let theirs = written_dims(bytes).filter(|d| d.slots() != cfg.slots())?;
    host.count(crate::metrics::CORRELATION_BUCKETS_MISMATCH, 1);
    local.note_mismatch(theirs);
    Some(theirs)
}
