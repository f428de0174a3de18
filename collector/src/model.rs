//! Compact in-memory form of a hop.
//!
//! A prost `Hop` owns ~25 `String`s (well over 600 bytes on the heap for a typical hop). The
//! collector keeps up to a million hops in open traces, so it stores [`CHop`] instead:
//! low-cardinality strings (workload, namespace, pod, service, tags, cluster, ...) are
//! interned to a 4-byte [`Sym`], span ids are parsed to `u64`, and only the request id and
//! the path keep an owned (boxed) string. `size_of::<CHop>()` is asserted in a test.

use std::sync::Arc;

use hopwatch_proto::v1::{Direction, Hop, TagSource, TraceContext};
use rustc_hash::FxHashMap;

/// An interned string; `Sym::EMPTY` is "".
#[derive(Copy, Clone, PartialEq, Eq, Hash, Default, Debug, PartialOrd, Ord)]
pub struct Sym(pub u32);

impl Sym {
    pub const EMPTY: Sym = Sym(0);
    /// Stands for any string that arrived after the interner reached its bound.
    pub const OVERFLOW: Sym = Sym(1);
    pub fn is_empty(self) -> bool {
        self == Sym::EMPTY
    }
}

/// String interner with a bound on the number of distinct strings and on their bytes
/// (memory safety against high-cardinality garbage); past either bound new strings become
/// [`Sym::OVERFLOW`].
///
/// Reclaimed by mark and sweep ([`Interner::compact`]): the owner marks every symbol its
/// stores still hold, and the strings nobody marked are freed and their ids reused. A
/// string looked up or interned since the previous compaction (an epoch) is never freed,
/// so the hops converted just before a compaction but not yet in a store (the report
/// path converts outside the aggregator's lock) keep their names; the ingest path pays
/// one store of the epoch per lookup, nothing else.
pub struct Interner {
    strings: Vec<Arc<str>>,
    /// Per id: the epoch of its last lookup (low 31 bits), bit 31 set for free text.
    meta: Vec<u32>,
    map: FxHashMap<Arc<str>, u32>,
    /// Freed ids, reused first.
    free: Vec<u32>,
    empty: Arc<str>,
    epoch: u32,
    max: usize,
    /// Byte budget (see [`STRING_OVERHEAD`]); 0: none.
    budget: usize,
    bytes: usize,
    pub overflowed: u64,
    /// Compactions run and strings they freed.
    pub compactions: u64,
    pub freed: u64,
    /// Fields cut to their maximum length at ingest (see [`CHop::from_proto`]).
    pub truncated: u64,
    /// (cluster, authority) -> (destination service, namespace, bits), parsed once.
    dest_cache: FxHashMap<(Sym, Sym), (Sym, Sym, u8)>,
    /// authority -> first DNS label of its host.
    authority_cache: FxHashMap<Sym, Sym>,
    /// Strings interned through [`Interner::intern_capped`] (free text such as gRPC
    /// messages) and still held.
    capped: usize,
}

/// Bytes one interned string costs besides its text: the `Arc` allocation's header (16)
/// and malloc rounding (~16), the id -> string slot (16), the string -> id map slot
/// (~30 with hashbrown's control byte and load factor) and the epoch (4), plus the
/// caches' share. Checked with the 100k-detail-strings probe (collector-probes).
pub const STRING_OVERHEAD: usize = 96;

const FREE_TEXT: u32 = 1 << 31;

/// At most this many distinct free-text strings (gRPC messages) are interned: apps put ids
/// in their error messages, and the interner never forgets, so without a cap they would
/// fill it and push out the names (workloads, pods) everything else needs.
pub const MAX_FREE_TEXT_STRINGS: usize = 10_000;
/// Free text is kept up to this many bytes.
pub const MAX_FREE_TEXT_LEN: usize = 128;

/// Field caps at ingest (what a well-behaved filter never exceeds): longer values are
/// cut on a character boundary and counted ([`Interner::truncated`]), not refused. Tags
/// and paths the way the filter caps them (filter/src/tag.rs, filter/src/report.rs),
/// request ids like its `x-request-id` (filter/src/trace.rs).
pub const MAX_TAG_LEN: usize = 128;
pub const MAX_PATH_LEN: usize = 512;
pub const MAX_REQUEST_ID_LEN: usize = 128;
/// Response code details and trace details (Envoy's details are short snake_case
/// words; the trace detail is the filter's own one-line text).
pub const MAX_DETAIL_LEN: usize = 256;
/// Names: workload, namespace, pod, service, authority, method, cluster, host, address,
/// route (a DNS name is at most 253 bytes; an Istio cluster name adds a few words).
pub const MAX_NAME_LEN: usize = 256;

/// `s` cut to at most `max` bytes on a character boundary; counts a cut in `n`.
pub fn cap_len<'a>(s: &'a str, max: usize, n: &mut u64) -> &'a str {
    if s.len() <= max {
        return s;
    }
    *n += 1;
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Symbols still held by the stores, collected for [`Interner::compact`].
pub struct Marks(Vec<u64>);

impl Marks {
    pub fn mark(&mut self, s: Sym) {
        let i = s.0 as usize;
        if let Some(w) = self.0.get_mut(i / 64) {
            *w |= 1 << (i % 64);
        }
    }
    fn is_marked(&self, i: usize) -> bool {
        self.0.get(i / 64).is_some_and(|w| w & (1 << (i % 64)) != 0)
    }
}

impl Interner {
    pub fn new(max: usize) -> Self {
        Self::with_budget(max, 0)
    }
    /// At most `max` strings and `budget` bytes (0: no byte bound).
    pub fn with_budget(max: usize, budget: usize) -> Self {
        let empty: Arc<str> = Arc::from("");
        let mut i = Interner {
            strings: Vec::new(),
            meta: Vec::new(),
            map: FxHashMap::default(),
            free: Vec::new(),
            empty,
            epoch: 1,
            max: max.max(16),
            budget,
            bytes: 0,
            overflowed: 0,
            compactions: 0,
            freed: 0,
            truncated: 0,
            dest_cache: FxHashMap::default(),
            authority_cache: FxHashMap::default(),
            capped: 0,
        };
        i.force("", 0);
        i.force("<overflow>", 0);
        i
    }
    fn cost(s: &str) -> usize {
        s.len() + STRING_OVERHEAD
    }
    fn force(&mut self, s: &str, flag: u32) -> Sym {
        let a: Arc<str> = Arc::from(s);
        self.bytes += Self::cost(s);
        let id = match self.free.pop() {
            Some(id) => {
                self.strings[id as usize] = a.clone();
                self.meta[id as usize] = self.epoch | flag;
                id
            }
            None => {
                let id = self.strings.len() as u32;
                self.strings.push(a.clone());
                self.meta.push(self.epoch | flag);
                id
            }
        };
        self.map.insert(a, id);
        Sym(id)
    }
    fn hit(&mut self, s: &str) -> Option<Sym> {
        let &id = self.map.get(s)?;
        let m = &mut self.meta[id as usize];
        *m = (*m & FREE_TEXT) | self.epoch;
        Some(Sym(id))
    }
    fn touch(&mut self, s: Sym) {
        if let Some(m) = self.meta.get_mut(s.0 as usize) {
            *m = (*m & FREE_TEXT) | self.epoch;
        }
    }
    fn insert(&mut self, s: &str, flag: u32) -> Sym {
        let full = self.live() >= self.max
            || (self.budget > 0 && self.bytes + Self::cost(s) > self.budget);
        if full {
            self.overflowed += 1;
            return Sym::OVERFLOW;
        }
        self.force(s, flag)
    }
    pub fn intern(&mut self, s: &str) -> Sym {
        if s.is_empty() {
            return Sym::EMPTY;
        }
        if let Some(sym) = self.hit(s) {
            return sym;
        }
        self.insert(s, 0)
    }
    /// Interns free text (truncated to [`MAX_FREE_TEXT_LEN`] bytes) while fewer than `cap`
    /// such strings are held; past that, known strings still resolve and new ones
    /// become [`Sym::EMPTY`] (dropped, not an overflow of the names).
    pub fn intern_capped(&mut self, s: &str, cap: usize) -> Sym {
        let s = cap_len(s, MAX_FREE_TEXT_LEN, &mut self.truncated);
        if s.is_empty() {
            return Sym::EMPTY;
        }
        if let Some(sym) = self.hit(s) {
            return sym;
        }
        if self.capped >= cap {
            return Sym::EMPTY;
        }
        let sym = self.insert(s, FREE_TEXT);
        if sym != Sym::OVERFLOW {
            self.capped += 1;
        }
        sym
    }

    /// Looks a string up without interning it.
    pub fn get(&self, s: &str) -> Option<Sym> {
        if s.is_empty() {
            return Some(Sym::EMPTY);
        }
        self.map.get(s).map(|&id| Sym(id))
    }
    pub fn resolve(&self, s: Sym) -> &str {
        self.strings.get(s.0 as usize).map(|a| &**a).unwrap_or("")
    }
    /// Strings held (freed ids excluded).
    pub fn len(&self) -> usize {
        self.live()
    }
    fn live(&self) -> usize {
        self.strings.len() - self.free.len()
    }
    /// Accounted bytes: the strings' text plus [`STRING_OVERHEAD`] each, plus the caches.
    pub fn bytes(&self) -> usize {
        self.bytes
            + crate::budget::map_slot(20) * self.dest_cache.len()
            + crate::budget::map_slot(8) * self.authority_cache.len()
            + 4 * self.free.len()
    }
    pub fn budget(&self) -> usize {
        self.budget
    }
    /// Worth compacting: over 3/4 of the byte budget or of the count bound.
    pub fn wants_compaction(&self) -> bool {
        (self.budget > 0 && self.bytes() > self.budget / 4 * 3) || self.live() > self.max / 4 * 3
    }
    /// An empty mark set for [`Interner::compact`].
    pub fn marks(&self) -> Marks {
        Marks(vec![0; self.strings.len().div_ceil(64)])
    }
    /// Frees every string that is not in `marks` and was not looked up in the current
    /// epoch, drops the cache entries naming a freed string, and starts a new epoch.
    /// Returns how many strings were freed.
    pub fn compact(&mut self, marks: &Marks) -> usize {
        let mut n = 0;
        for i in 2..self.strings.len() {
            let m = self.meta[i];
            if marks.is_marked(i) || m & !FREE_TEXT >= self.epoch || self.strings[i].is_empty() {
                continue;
            }
            let s = std::mem::replace(&mut self.strings[i], self.empty.clone());
            self.map.remove(&*s);
            self.bytes -= Self::cost(&s);
            if m & FREE_TEXT != 0 {
                self.capped -= 1;
            }
            self.meta[i] = 0;
            self.free.push(i as u32);
            n += 1;
        }
        let live = |s: &Sym, strings: &[Arc<str>]| {
            s.0 < 2 || strings.get(s.0 as usize).is_some_and(|a| !a.is_empty())
        };
        let strings = &self.strings;
        self.dest_cache
            .retain(|(c, a), (s, ns, _)| [c, a, s, ns].iter().all(|x| live(x, strings)));
        self.authority_cache
            .retain(|a, s| live(a, strings) && live(s, strings));
        // Shrink the tables when most of them is free.
        if self.map.capacity() > 4 * self.map.len().max(1024) {
            self.map.shrink_to_fit();
        }
        self.epoch = (self.epoch + 1) & !FREE_TEXT;
        self.compactions += 1;
        self.freed += n as u64;
        n
    }
    /// [`destination`] of interned strings, cached (bounded like the interner).
    pub fn destination(&mut self, cluster: Sym, authority: Sym) -> (Sym, Sym, u8) {
        if let Some(&d) = self.dest_cache.get(&(cluster, authority)) {
            // The cached names must survive a compaction like a lookup of them.
            self.touch(d.0);
            self.touch(d.1);
            return d;
        }
        let (svc, ns, bits) = destination(self.resolve(cluster), self.resolve(authority));
        let d = (self.intern(&svc), self.intern(&ns), bits);
        if self.dest_cache.len() < self.max {
            self.dest_cache.insert((cluster, authority), d);
        }
        d
    }
    pub fn authority_service(&mut self, authority: Sym) -> Sym {
        if let Some(&d) = self.authority_cache.get(&authority) {
            self.touch(d);
            return d;
        }
        let label = first_label(host_of(self.resolve(authority))).to_string();
        let d = self.intern(&label);
        if self.authority_cache.len() < self.max {
            self.authority_cache.insert(authority, d);
        }
        d
    }
    pub fn is_empty(&self) -> bool {
        self.live() <= 2
    }
}

/// The trace headers `missing_trace_headers` may name, as a bitmask in [`CHop`].
pub const TRACE_HEADERS: &[&str] = &[
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-sampled",
    "b3",
    "traceparent",
    "x-request-id",
    "x-b3-parentspanid",
    "tracestate",
];

pub const BIT_TAG_MALFORMED: u8 = 1;
pub const BIT_SAMPLED_REPORT: u8 = 2;
/// The destination is an in-mesh Kubernetes service (`<svc>.<ns>.svc.<domain>` cluster).
pub const BIT_DEST_IN_MESH: u8 = 4;
/// The destination is outside the mesh (PassthroughCluster, BlackHoleCluster, external host).
pub const BIT_DEST_EXTERNAL: u8 = 8;
/// Only `on_log` saw the request: a filter before hopwatch answered it (Hop field
/// `answered_before_filter`).
pub const BIT_ANSWERED_BEFORE_FILTER: u8 = 16;

/// One hop, compactly.
#[derive(Clone, Debug, Default)]
pub struct CHop {
    pub span_id: u64,
    pub parent_span_id: u64,
    pub upstream_span_id: u64,
    pub start_us: u64,
    pub response_flags: u64,
    pub request_id: Option<Box<str>>,
    pub path: Option<Box<str>>,
    pub duration_us: u32,
    pub workload: Sym,
    pub namespace: Sym,
    pub pod: Sym,
    pub service: Sym,
    pub own_tag: Sym,
    pub tag_received: Sym,
    pub tag_sent: Sym,
    pub correlated_tag: Sym,
    pub trace_detail: Sym,
    pub authority: Sym,
    pub method: Sym,
    pub code_details: Sym,
    pub upstream_cluster: Sym,
    pub upstream_host: Sym,
    pub downstream_local: Sym,
    pub route_name: Sym,
    /// Outbound: the destination service (from the cluster name, else the authority).
    pub dest_service: Sym,
    pub dest_namespace: Sym,
    /// Inbound: the first DNS label of the authority host (joins by authority).
    pub authority_service: Sym,
    pub response_code: u16,
    pub direction: u8,
    pub tag_source: u8,
    pub trace_context: u8,
    pub sampled: u8,
    pub missing_headers: u8,
    pub bits: u8,
    /// `hopwatch.v1.Protocol`.
    pub protocol: u8,
    /// The gRPC status plus one (0: the hop carried none, so a default hop is not
    /// gRPC); codes above 253 are clamped. Read it through [`CHop::grpc`].
    pub grpc_status_plus_one: u8,
    pub grpc_message: Sym,
    /// The hop carried a trace id (else it is grouped by request id).
    pub has_trace_id: bool,
}

impl CHop {
    pub fn is_outbound(&self) -> bool {
        self.direction == Direction::Outbound as u8
    }
    pub fn is_inbound(&self) -> bool {
        self.direction == Direction::Inbound as u8
    }
    pub fn end_us(&self) -> u64 {
        self.start_us + self.duration_us as u64
    }
    pub fn sampled_report(&self) -> bool {
        self.bits & BIT_SAMPLED_REPORT != 0
    }
    pub fn tag_malformed(&self) -> bool {
        self.bits & BIT_TAG_MALFORMED != 0
    }
    pub fn answered_before_filter(&self) -> bool {
        self.bits & BIT_ANSWERED_BEFORE_FILTER != 0
    }
    /// The gRPC status, if the hop carried one.
    pub fn grpc(&self) -> Option<u32> {
        self.grpc_status_plus_one.checked_sub(1).map(u32::from)
    }
    pub fn tag_source(&self) -> TagSource {
        TagSource::try_from(self.tag_source as i32).unwrap_or(TagSource::Unspecified)
    }
    pub fn trace_context(&self) -> TraceContext {
        TraceContext::try_from(self.trace_context as i32).unwrap_or(TraceContext::Unspecified)
    }
    /// The tag the app received (inbound): `tag_sent`, else a well-formed `tag_received`.
    pub fn inbound_tag(&self) -> Sym {
        if !self.tag_sent.is_empty() {
            self.tag_sent
        } else if !self.tag_malformed() {
            self.tag_received
        } else {
            Sym::EMPTY
        }
    }
    pub fn missing_header_names(&self) -> Vec<String> {
        TRACE_HEADERS
            .iter()
            .enumerate()
            .filter(|(i, _)| self.missing_headers & (1 << i) != 0)
            .map(|(_, h)| h.to_string())
            .collect()
    }

    /// Converts a wire hop (validated: direction set) into the compact form. Over-long
    /// fields are cut to the `MAX_*_LEN` caps (counted in [`Interner::truncated`]).
    pub fn from_proto(h: &Hop, it: &mut Interner) -> CHop {
        let mut cut = 0u64;
        let mut name = |s: &str, it: &mut Interner| it.intern(cap_len(s, MAX_NAME_LEN, &mut cut));
        let upstream_cluster = name(&h.upstream_cluster, it);
        let authority = name(&h.authority, it);
        let workload = name(&h.workload, it);
        let namespace = name(&h.namespace, it);
        let pod = name(&h.pod, it);
        let service = name(&h.service, it);
        let method = name(&h.method, it);
        let upstream_host = name(&h.upstream_host, it);
        let downstream_local = name(&h.downstream_local_address, it);
        let route_name = name(&h.route_name, it);
        let mut tag = |s: &str, it: &mut Interner| it.intern(cap_len(s, MAX_TAG_LEN, &mut cut));
        let own_tag = tag(&h.own_tag, it);
        let tag_received = tag(&h.tag_received, it);
        let tag_sent = tag(&h.tag_sent, it);
        let correlated_tag = tag(&h.correlated_tag, it);
        let trace_detail = it.intern(cap_len(&h.trace_detail, MAX_DETAIL_LEN, &mut cut));
        let code_details = it.intern(cap_len(&h.response_code_details, MAX_DETAIL_LEN, &mut cut));
        let path = non_empty_box(cap_len(&h.path, MAX_PATH_LEN, &mut cut));
        let request_id = non_empty_box(cap_len(
            &request_id_key(&h.request_id),
            MAX_REQUEST_ID_LEN,
            &mut cut,
        ));
        it.truncated += cut;
        let (dest_service, dest_namespace, dest_bits) = if h.direction == Direction::Outbound as i32
        {
            it.destination(upstream_cluster, authority)
        } else {
            (Sym::EMPTY, Sym::EMPTY, 0)
        };
        let authority_service = it.authority_service(authority);
        let mut missing = 0u8;
        for m in &h.missing_trace_headers {
            if let Some(i) = TRACE_HEADERS.iter().position(|k| k.eq_ignore_ascii_case(m)) {
                missing |= 1 << i;
            }
        }
        let mut bits = dest_bits;
        if h.tag_malformed {
            bits |= BIT_TAG_MALFORMED;
        }
        if h.sampled_report {
            bits |= BIT_SAMPLED_REPORT;
        }
        if h.answered_before_filter {
            bits |= BIT_ANSWERED_BEFORE_FILTER;
        }
        CHop {
            span_id: span_u64(&h.span_id),
            parent_span_id: span_u64(&h.parent_span_id),
            upstream_span_id: span_u64(&h.upstream_span_id),
            start_us: h.start_time_unix_micros,
            response_flags: h.response_flags,
            // The join form: hops of one request compare equal whatever digit Envoy's
            // UUID extension wrote.
            request_id,
            path,
            duration_us: h.duration_micros.min(u32::MAX as u64) as u32,
            workload,
            namespace,
            pod,
            service,
            own_tag,
            tag_received,
            tag_sent,
            correlated_tag,
            trace_detail,
            authority,
            method,
            code_details,
            upstream_cluster,
            upstream_host,
            downstream_local,
            route_name,
            dest_service,
            dest_namespace,
            authority_service,
            response_code: h.response_code.min(u16::MAX as u32) as u16,
            direction: h.direction.clamp(0, 255) as u8,
            tag_source: h.tag_source.clamp(0, 255) as u8,
            trace_context: h.trace_context.clamp(0, 255) as u8,
            sampled: h.sampled.clamp(0, 255) as u8,
            missing_headers: missing,
            bits,
            protocol: h.protocol.clamp(0, 255) as u8,
            grpc_status_plus_one: h.grpc_status.map(|g| g.min(253) as u8 + 1).unwrap_or(0),
            grpc_message: it.intern_capped(&h.grpc_message, MAX_FREE_TEXT_STRINGS),
            has_trace_id: crate::other_ids::has_trace_id(h),
        }
    }

    /// Every interned symbol of the hop (for [`Interner::compact`]'s marks).
    pub fn mark(&self, m: &mut Marks) {
        for s in [
            self.workload,
            self.namespace,
            self.pod,
            self.service,
            self.own_tag,
            self.tag_received,
            self.tag_sent,
            self.correlated_tag,
            self.trace_detail,
            self.authority,
            self.method,
            self.code_details,
            self.upstream_cluster,
            self.upstream_host,
            self.downstream_local,
            self.route_name,
            self.dest_service,
            self.dest_namespace,
            self.authority_service,
            self.grpc_message,
        ] {
            m.mark(s);
        }
    }

    /// Accounted bytes of the hop: its size plus the heap of its request id and path.
    pub fn bytes(&self) -> usize {
        use crate::budget::str_heap;
        std::mem::size_of::<CHop>()
            + str_heap(self.request_id.as_deref().map_or(0, str::len))
            + str_heap(self.path.as_deref().map_or(0, str::len))
    }

    /// Back to the wire form (for GetTrace). Fields the collector does not keep
    /// (downstream_remote_address, upstream_local_address, w3c_trace_id) are empty; span
    /// ids are printed as 16 hex digits.
    pub fn to_proto(&self, trace_id: &str, it: &Interner) -> Hop {
        let r = |s: Sym| it.resolve(s).to_string();
        let span = |v: u64| {
            if v == 0 {
                String::new()
            } else {
                format!("{v:016x}")
            }
        };
        Hop {
            trace_id: if self.has_trace_id {
                trace_id.to_string()
            } else {
                String::new()
            },
            span_id: span(self.span_id),
            parent_span_id: span(self.parent_span_id),
            sampled: self.sampled as i32,
            request_id: self.request_id.as_deref().unwrap_or("").to_string(),
            w3c_trace_id: String::new(),
            upstream_span_id: span(self.upstream_span_id),
            direction: self.direction as i32,
            workload: r(self.workload),
            namespace: r(self.namespace),
            pod: r(self.pod),
            service: r(self.service),
            own_tag: r(self.own_tag),
            tag_received: r(self.tag_received),
            tag_sent: r(self.tag_sent),
            tag_source: self.tag_source as i32,
            tag_malformed: self.tag_malformed(),
            correlated_tag: r(self.correlated_tag),
            trace_context: self.trace_context as i32,
            trace_detail: r(self.trace_detail),
            missing_trace_headers: self.missing_header_names(),
            authority: r(self.authority),
            method: r(self.method),
            path: self.path.as_deref().unwrap_or("").to_string(),
            response_code: self.response_code as u32,
            response_flags: self.response_flags,
            response_flag_names: flag_names(self.response_flags),
            response_code_details: r(self.code_details),
            upstream_cluster: r(self.upstream_cluster),
            upstream_host: r(self.upstream_host),
            downstream_remote_address: String::new(),
            downstream_local_address: r(self.downstream_local),
            upstream_local_address: String::new(),
            route_name: r(self.route_name),
            start_time_unix_micros: self.start_us,
            duration_micros: self.duration_us as u64,
            sampled_report: self.sampled_report(),
            protocol: self.protocol as i32,
            grpc_status: self.grpc(),
            grpc_message: r(self.grpc_message),
            answered_before_filter: self.answered_before_filter(),
            // Not kept either: the other tracers' ids and the custom correlation id
            // (they only key the trace group), and where an aliased tag was found.
            ..Hop::default()
        }
    }
}

fn non_empty_box(s: &str) -> Option<Box<str>> {
    if s.is_empty() {
        None
    } else {
        Some(s.into())
    }
}

/// Span ids are 16 hex digits; anything else (longer ids, garbage) is hashed so it can
/// still be compared. 0 means "none".
pub fn span_u64(s: &str) -> u64 {
    if s.is_empty() {
        return 0;
    }
    if s.len() <= 16 {
        if let Ok(v) = u64::from_str_radix(s, 16) {
            return v;
        }
    }
    hash64(s.as_bytes(), 0x9e37_79b9_7f4a_7c15) | 1
}

/// FNV-1a 64 with a seed.
pub fn hash64(b: &[u8], seed: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for &x in b {
        h ^= x as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The join form of an `x-request-id`: for a UUID, the version digit (char 14) reset to
/// `4`. Envoy's UUID request-id extension packs its trace decision there (`9` sampled,
/// `a`/`b` forced) and may rewrite it at every sidecar, so the hops of one request may
/// report ids that differ in that digit only. (The filter keys its correlation store the
/// same way.)
pub fn request_id_key(rid: &str) -> std::borrow::Cow<'_, str> {
    let b = rid.as_bytes();
    let uuid = b.len() == 36
        && [8usize, 13, 18, 23]
            .iter()
            .all(|&i| b.get(i) == Some(&b'-'));
    if uuid && b.get(14) != Some(&b'4') && rid.is_char_boundary(14) && rid.is_char_boundary(15) {
        let mut k = String::with_capacity(36);
        k.push_str(rid.get(..14).unwrap_or_default());
        k.push('4');
        k.push_str(rid.get(15..).unwrap_or_default());
        return std::borrow::Cow::Owned(k);
    }
    std::borrow::Cow::Borrowed(rid)
}

/// The key of a trace group: a trace id (hex, up to 32 digits, parsed) or, for hops without
/// one (a mesh without a tracer), the request id's join form (hashed, in a separate key
/// space).
pub fn group_key(trace_id: &str, request_id: &str) -> u128 {
    if !trace_id.is_empty() {
        // Hex digits parse alike in either case: no lowercase copy for the common id.
        if trace_id.len() <= 32 {
            if let Ok(v) = u128::from_str_radix(trace_id, 16) {
                // Top bit clear: trace-id space.
                if v >> 127 == 0 {
                    return v;
                }
            }
        }
        let t = trace_id.to_ascii_lowercase();
        let h = ((hash64(t.as_bytes(), 1) as u128) << 64) | hash64(t.as_bytes(), 2) as u128;
        return h & !(3u128 << 126) | (1u128 << 126);
    }
    let request_id = request_id_key(request_id);
    let h = ((hash64(request_id.as_bytes(), 3) as u128) << 64)
        | hash64(request_id.as_bytes(), 4) as u128;
    h | (1u128 << 127)
}

/// Host part of an authority ("reviews.default:9080" -> "reviews.default").
pub fn host_of(authority: &str) -> &str {
    let a = authority.trim();
    if let Some(rest) = a.strip_prefix('[') {
        return rest.split(']').next().unwrap_or("");
    }
    match a.rsplit_once(':') {
        Some((h, p)) if p.chars().all(|c| c.is_ascii_digit()) => h,
        _ => a,
    }
}

pub fn first_label(host: &str) -> &str {
    if host.parse::<std::net::IpAddr>().is_ok() {
        return host;
    }
    host.split('.').next().unwrap_or("")
}

/// The destination of an outbound hop: (service, namespace, bits). From the Istio cluster
/// name `outbound|<port>|<subset>|<svc>.<ns>.svc.cluster.local`, else the authority host.
pub fn destination(cluster: &str, authority: &str) -> (String, String, u8) {
    if matches!(
        cluster,
        "PassthroughCluster" | "BlackHoleCluster" | "InboundPassthroughCluster"
    ) {
        let h = host_of(authority);
        return (first_label(h).to_string(), String::new(), BIT_DEST_EXTERNAL);
    }
    let mut parts = cluster.split('|');
    if let (Some(dir), Some(_port), Some(_subset), Some(host)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    {
        if dir == "outbound" && !host.is_empty() {
            return classify_host(host);
        }
    }
    let h = host_of(authority);
    if h.is_empty() {
        return (String::new(), String::new(), 0);
    }
    classify_host(h)
}

fn classify_host(host: &str) -> (String, String, u8) {
    if host.parse::<std::net::IpAddr>().is_ok() {
        return (host.to_string(), String::new(), 0);
    }
    let labels: Vec<&str> = host.split('.').collect();
    let svc = labels[0].to_string();
    let ns = labels.get(1).map(|s| s.to_string()).unwrap_or_default();
    // `<svc>.<ns>.svc.<cluster domain>`: any cluster domain, not only cluster.local.
    let bits = if labels.get(2) == Some(&"svc") {
        BIT_DEST_IN_MESH
    } else if labels.len() == 1 || labels.len() == 2 {
        // Short names ("reviews", "reviews.default") resolve through the search path:
        // in-mesh as far as we can tell.
        BIT_DEST_IN_MESH
    } else {
        BIT_DEST_EXTERNAL
    };
    let ns = if bits == BIT_DEST_EXTERNAL {
        String::new()
    } else {
        ns
    };
    (svc, ns, bits)
}

/// Envoy response flag short names by bit, in print order.
pub const FLAG_NAMES: &[&str] = &[
    "LH", "UH", "UT", "LR", "UR", "UF", "UC", "UO", "NR", "DI", "FI", "RL", "UAEX", "RLSE", "DC",
    "URX", "SI", "IH", "DPE", "UMSDR", "RFCF", "NFCF", "DT", "UPE", "NC", "OM", "DF", "DO", "DR",
    "UDO",
];

pub fn flag_names(flags: u64) -> Vec<String> {
    (0..64)
        .filter(|b| flags & (1u64 << b) != 0)
        .map(|b| match FLAG_NAMES.get(b) {
            Some(n) => n.to_string(),
            None => format!("UNKNOWN(bit {b})"),
        })
        .collect()
}

pub fn flag_bit(name: &str) -> Option<u64> {
    FLAG_NAMES
        .iter()
        .position(|n| *n == name)
        .map(|b| 1u64 << b)
}

/// Match level of an instance environment `env` for a requested tag `tag`: higher is
/// better. The exact tag or a dot-prefix of it matches (longer = better); no tag is the
/// default subset (0); a non-matching tag is worse than the default (-1).
pub fn match_level(env: &str, tag: &str) -> i32 {
    if env.is_empty() {
        return 0;
    }
    if env == tag
        || (tag.len() > env.len() && tag.starts_with(env) && tag.as_bytes()[env.len()] == b'.')
    {
        1 + env.split('.').count() as i32
    } else {
        -1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_text_is_capped_and_truncated() {
        let mut it = Interner::new(1000);
        let a = it.intern_capped("db down", 2);
        assert_eq!(it.resolve(a), "db down");
        assert_eq!(
            it.intern_capped("db down", 2),
            a,
            "known strings always resolve"
        );
        let long = "x".repeat(300);
        let b = it.intern_capped(&long, 2);
        assert_eq!(it.resolve(b).len(), MAX_FREE_TEXT_LEN);
        assert_eq!(
            it.intern_capped("id 42 not found", 2),
            Sym::EMPTY,
            "cap reached"
        );
        assert_eq!(
            it.overflowed, 0,
            "dropping free text is not an overflow of names"
        );
        assert!(!it.intern("workload-a").is_empty(), "names still intern");
    }

    #[test]
    fn compaction_frees_unreferenced_strings_and_reuses_their_ids() {
        let mut it = Interner::with_budget(1000, 0);
        let keep = it.intern("reviews");
        let gone = it.intern(&"x".repeat(4000));
        let b0 = it.bytes();
        assert!(b0 >= 4000 + STRING_OVERHEAD);
        // Looked up in this epoch: kept even though unmarked (a converted hop may be on
        // its way to a store).
        let mut m = it.marks();
        m.mark(keep);
        assert_eq!(it.compact(&m), 0);
        // Next epoch: unmarked and not looked up since: freed.
        let mut m = it.marks();
        m.mark(keep);
        assert_eq!(it.compact(&m), 1);
        assert_eq!(it.resolve(keep), "reviews");
        assert_eq!(it.get(&"x".repeat(4000)), None);
        assert!(it.bytes() + 4000 <= b0, "{} vs {b0}", it.bytes());
        assert_eq!(it.compactions, 2);
        assert_eq!(it.freed, 1);
        // Its id is reused.
        let again = it.intern("ratings");
        assert_eq!(again, gone);
        assert_eq!(it.resolve(again), "ratings");
        // A string looked up in the epoch survives without a mark.
        let mut m = it.marks();
        m.mark(keep);
        it.intern("ratings");
        assert_eq!(it.compact(&m), 0);
        assert_eq!(it.intern("ratings"), again);
    }

    #[test]
    fn byte_budget_overflows_and_compaction_makes_room() {
        let mut it = Interner::with_budget(1_000_000, 64 * 1024);
        let mut syms = Vec::new();
        for i in 0..1000 {
            syms.push(it.intern(&format!("{i:04}{}", "d".repeat(200))));
        }
        assert!(it.bytes() <= 64 * 1024, "{}", it.bytes());
        assert!(it.overflowed > 0);
        assert!(it.wants_compaction());
        let m = it.marks();
        it.compact(&m);
        it.compact(&m);
        // What stays: "" and "<overflow>", the free list.
        assert!(it.bytes() < 2048, "all freed: {}", it.bytes());
        assert_ne!(it.intern("new-name"), Sym::OVERFLOW);
    }

    #[test]
    fn freed_free_text_returns_to_its_cap() {
        let mut it = Interner::new(1000);
        assert!(!it.intern_capped("m1", 1).is_empty());
        assert!(it.intern_capped("m2", 1).is_empty(), "cap reached");
        let m = it.marks();
        it.compact(&m);
        it.compact(&m);
        assert!(!it.intern_capped("m2", 1).is_empty(), "room again");
    }

    #[test]
    fn over_long_fields_are_cut_and_counted() {
        let mut it = Interner::new(1000);
        let h = Hop {
            direction: Direction::Inbound as i32,
            trace_id: "abc".into(),
            path: "/".repeat(8192),
            response_code_details: "é".repeat(3000),
            own_tag: "t".repeat(500),
            workload: "w".repeat(300),
            request_id: "r".repeat(200),
            ..Default::default()
        };
        let c = CHop::from_proto(&h, &mut it);
        assert_eq!(c.path.as_deref().map(str::len), Some(MAX_PATH_LEN));
        let d = it.resolve(c.code_details);
        assert!(d.len() <= MAX_DETAIL_LEN && d.len() >= MAX_DETAIL_LEN - 1);
        assert_eq!(it.resolve(c.own_tag).len(), MAX_TAG_LEN);
        assert_eq!(it.resolve(c.workload).len(), MAX_NAME_LEN);
        assert_eq!(
            c.request_id.as_deref().map(str::len),
            Some(MAX_REQUEST_ID_LEN)
        );
        assert_eq!(it.truncated, 5);
        let short = Hop {
            direction: Direction::Inbound as i32,
            trace_id: "abc".into(),
            path: "/a".into(),
            ..Default::default()
        };
        CHop::from_proto(&short, &mut it);
        assert_eq!(it.truncated, 5, "short fields are not counted");
    }

    #[test]
    fn compact_hop_is_small() {
        // 1,000,000 open hops must fit in 512 MB with the heap parts (request id, path) and
        // the group/index overhead.
        assert!(
            std::mem::size_of::<CHop>() <= 176,
            "{}",
            std::mem::size_of::<CHop>()
        );
    }

    #[test]
    fn destination_from_cluster_or_authority() {
        assert_eq!(
            destination("outbound|9080|v1|reviews.default.svc.cluster.local", "x"),
            ("reviews".into(), "default".into(), BIT_DEST_IN_MESH)
        );
        assert_eq!(
            destination("", "ratings.prod:9080"),
            ("ratings".into(), "prod".into(), BIT_DEST_IN_MESH)
        );
        assert_eq!(
            destination("", "ratings"),
            ("ratings".into(), String::new(), BIT_DEST_IN_MESH)
        );
        assert_eq!(
            destination("PassthroughCluster", "api.github.com:443").2,
            BIT_DEST_EXTERNAL
        );
        assert_eq!(
            destination("outbound|443||api.github.com", "").2,
            BIT_DEST_EXTERNAL
        );
        assert_eq!(destination("", "10.0.0.1:80").0, "10.0.0.1");
        assert_eq!(host_of("[::1]:80"), "::1");
        // Another cluster domain than cluster.local.
        assert_eq!(
            destination("outbound|80||reviews.shop.svc.corp.example", "x"),
            ("reviews".into(), "shop".into(), BIT_DEST_IN_MESH)
        );
        // Request ids compare in their join form.
        assert_eq!(
            request_id_key("0b1e7c5e-2d43-9f7a-9d4b-6a2d9b1c0e11"),
            "0b1e7c5e-2d43-4f7a-9d4b-6a2d9b1c0e11"
        );
        assert_eq!(request_id_key("req-1"), "req-1");
    }

    #[test]
    fn match_levels() {
        assert!(
            match_level("dev.proj1", "dev.proj1.alice") > match_level("dev", "dev.proj1.alice")
        );
        assert!(match_level("dev", "dev.proj1.alice") > match_level("", "dev.proj1.alice"));
        assert!(match_level("", "dev.proj1") > match_level("qa", "dev.proj1"));
        assert!(
            match_level("dev.proj1.alice", "dev.proj1.alice")
                > match_level("dev.proj1", "dev.proj1.alice")
        );
        assert_eq!(
            match_level("dev.pro", "dev.proj1"),
            -1,
            "prefix must end at a dot"
        );
    }

    #[test]
    fn flags_by_name_and_unknown_bits() {
        assert_eq!(flag_names((1 << 1) | (1 << 5)), vec!["UH", "UF"]);
        assert_eq!(flag_names(1 << 40), vec!["UNKNOWN(bit 40)"]);
        assert_eq!(flag_bit("URX"), Some(1 << 15));
    }

    #[test]
    fn interner_is_bounded() {
        let mut it = Interner::new(16);
        for i in 0..100 {
            it.intern(&format!("s{i}"));
        }
        assert_eq!(it.len(), 16);
        assert!(it.overflowed > 0);
        assert_eq!(it.intern("s99"), Sym::OVERFLOW);
        let a = it.intern("s0");
        assert_eq!(it.resolve(a), "s0");
    }

    #[test]
    fn group_keys_separate_trace_and_request_spaces() {
        assert_eq!(
            group_key("4BF92F3577B34DA6A3CE929D0E0E4736", ""),
            group_key("4bf92f3577b34da6a3ce929d0e0e4736", "x")
        );
        assert_ne!(group_key("abc", ""), group_key("", "abc"));
        assert_ne!(group_key("not-hex", ""), group_key("", "not-hex"));
        // Ids that are not 32 hex digits are hashed, case-insensitively too.
        assert_eq!(group_key("NOT-HEX", ""), group_key("not-hex", ""));
        assert_eq!(
            group_key(&"AB".repeat(20), ""),
            group_key(&"ab".repeat(20), "")
        );
    }
}
