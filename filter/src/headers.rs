//! The request headers as the host hands them over: one serialized header map, read in
//! place.
//!
//! Why in place: the header map is fetched with one host call per request and only a
//! dozen of its values matter. Decoding it into owned `(String, String)` pairs cost two
//! allocations and a UTF-8 check per header on every request, most of the filter's own
//! time in the VM. [`RequestView`] instead borrows the values it needs from the
//! serialized bytes, which the stream keeps (they are already ours: the host placed
//! them in memory the module allocated) so that a reported hop can be rebuilt at the
//! end of the stream without another host call.
//!
//! Format (proxy-wasm): `u32` pair count, then per pair `u32` key length and `u32`
//! value length, then every key and value followed by a NUL byte; little endian.

use crate::trace::TraceHeaders;

fn rd_u32(b: &[u8], at: usize) -> Option<usize> {
    let s = b.get(at..at.checked_add(4)?)?;
    let a: [u8; 4] = s.try_into().ok()?;
    usize::try_from(u32::from_le_bytes(a)).ok()
}

/// Iterates the (name, value) pairs of a serialized header map. Never panics: stops at
/// the first pair that does not fit the buffer.
pub fn pairs(map: &[u8]) -> Pairs<'_> {
    let n = rd_u32(map, 0).unwrap_or(0);
    let data = n.checked_mul(8).and_then(|x| x.checked_add(4));
    match data {
        Some(data) if data <= map.len() => Pairs {
            map,
            index: 0,
            count: n,
            data,
        },
        _ => Pairs {
            map,
            index: 0,
            count: 0,
            data: 0,
        },
    }
}

/// Iterator returned by [`pairs`].
#[derive(Debug, Clone)]
pub struct Pairs<'a> {
    map: &'a [u8],
    index: usize,
    count: usize,
    data: usize,
}

impl<'a> Iterator for Pairs<'a> {
    type Item = (&'a [u8], &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        if self.index >= self.count {
            return None;
        }
        let sizes = 4 + self.index * 8;
        let (kl, vl) = (rd_u32(self.map, sizes)?, rd_u32(self.map, sizes + 4)?);
        let k = self.map.get(self.data..self.data.checked_add(kl)?)?;
        let v_at = self.data + kl + 1;
        let v = self.map.get(v_at..v_at.checked_add(vl)?)?;
        self.data = v_at + vl + 1;
        self.index += 1;
        Some((k, v))
    }
}

/// Serializes header pairs in the proxy-wasm format (tests, tools).
pub fn serialize(pairs: &[(&str, &str)]) -> Vec<u8> {
    let size: usize = pairs.iter().map(|(k, v)| k.len() + v.len() + 10).sum();
    let mut b = Vec::with_capacity(4 + size);
    b.extend_from_slice(&(pairs.len() as u32).to_le_bytes());
    for (k, v) in pairs {
        b.extend_from_slice(&(k.len() as u32).to_le_bytes());
        b.extend_from_slice(&(v.len() as u32).to_le_bytes());
    }
    for (k, v) in pairs {
        b.extend_from_slice(k.as_bytes());
        b.push(0);
        b.extend_from_slice(v.as_bytes());
        b.push(0);
    }
    b
}

/// A value that is not UTF-8 is kept as present but unreadable: every check on it
/// then fails the way a wrong value does (a tag is malformed, an id is not hex).
const NOT_UTF8: &str = "\u{fffd}";

fn text(v: &[u8]) -> &str {
    if v.is_ascii() {
        // SAFETY: ASCII is valid UTF-8. (`is_ascii` checks a word at a time, much
        // cheaper than a full UTF-8 validation on every header value of every request.)
        unsafe { std::str::from_utf8_unchecked(v) }
    } else {
        std::str::from_utf8(v).unwrap_or(NOT_UTF8)
    }
}

/// The request headers hopwatch looks at, borrowed from the serialized map.
#[derive(Debug, Default, Clone, Copy)]
pub struct RequestView<'a> {
    /// Trace headers.
    pub trace: TraceHeaders<'a>,
    /// The tag header (`tag_header`).
    pub tag: Option<&'a str>,
    /// The request carried `debug_header`.
    pub debug: bool,
    /// `:authority`
    pub authority: Option<&'a str>,
    /// `:method`
    pub method: Option<&'a str>,
    /// `:path`
    pub path: Option<&'a str>,
    /// `content-type` (a gRPC request is known by it, see [`RequestView::is_grpc`]).
    pub content_type: Option<&'a str>,
    /// A `baggage` header was present (all of them are read again with [`values`] only
    /// when the configuration uses baggage).
    pub baggage: bool,
    /// A `cookie` header was present (as `baggage`).
    pub cookie: bool,
    /// `x-envoy-external-address` was present: a gateway marked the original caller as
    /// outside the mesh (see [`crate::peer`]).
    pub external_address: bool,
    /// The tag header appeared more than once (the request leaves with one value).
    pub tag_repeated: bool,
}

/// Every value of header `name` in a serialized map, in order (for the headers a request
/// may repeat: `baggage`, `cookie`). Names are compared as Envoy gives them (lowercase).
pub fn values<'a>(map: &'a [u8], name: &str) -> Vec<&'a str> {
    pairs(map)
        .filter(|(k, _)| *k == name.as_bytes())
        .map(|(_, v)| text(v))
        .collect()
}

/// The first value of header `name` in a serialized map.
pub fn first<'a>(map: &'a [u8], name: &str) -> Option<&'a str> {
    pairs(map)
        .find(|(k, _)| *k == name.as_bytes())
        .map(|(_, v)| text(v))
}

impl<'a> RequestView<'a> {
    /// One pass over the serialized map; the first occurrence of a name wins. Names
    /// are compared as Envoy gives them (lowercase); `tag_header` and `debug_header`
    /// come from the configuration, which lowercases them.
    pub fn parse(map: &'a [u8], tag_header: &str, debug_header: &str) -> Self {
        let mut v = RequestView::default();
        let t = &mut v.trace;
        for (k, val) in pairs(map) {
            // Grouped by length first: one integer switch, then at most three
            // comparisons, for every header of every request.
            let slot = match (k.len(), k) {
                (2, b"b3") => &mut t.b3_single,
                (3, b"sw8") => &mut t.sw8,
                (6, b"cookie") => {
                    v.cookie = true;
                    continue;
                }
                (7, b"baggage") => {
                    v.baggage = true;
                    continue;
                }
                (13, b"uber-trace-id") => &mut t.uber_trace_id,
                (18, b"x-datadog-trace-id") => &mut t.datadog_trace_id,
                (24, b"x-envoy-external-address") => {
                    v.external_address = true;
                    continue;
                }
                (5, b":path") => &mut v.path,
                (7, b":method") => &mut v.method,
                (10, b":authority") => &mut v.authority,
                (10, b"x-b3-flags") => &mut t.b3_flags,
                (11, b"x-b3-spanid") => &mut t.b3_span_id,
                (11, b"traceparent") => &mut t.traceparent,
                (12, b"x-b3-traceid") => &mut t.b3_trace_id,
                (12, b"x-request-id") => &mut t.request_id,
                (12, b"x-b3-sampled") => &mut t.b3_sampled,
                (12, b"content-type") => &mut v.content_type,
                (17, b"x-b3-parentspanid") => &mut t.b3_parent_span_id,
                _ if k == tag_header.as_bytes() => {
                    if v.tag.is_some() {
                        v.tag_repeated = true;
                    }
                    &mut v.tag
                }
                _ => {
                    if k == debug_header.as_bytes() {
                        v.debug = true;
                    }
                    continue;
                }
            };
            if slot.is_none() {
                *slot = Some(text(val));
            }
        }
        v
    }

    /// Whether the request is gRPC: `content-type` is `application/grpc`, alone or with
    /// a `+format` or `;parameters` suffix (gRPC over HTTP/2's definition). gRPC-Web
    /// (`application/grpc-web...`) is not: its status travels in the body.
    pub fn is_grpc(&self) -> bool {
        self.content_type.is_some_and(is_grpc_content_type)
    }
}

/// See [`RequestView::is_grpc`].
pub fn is_grpc_content_type(ct: &str) -> bool {
    const GRPC: &str = "application/grpc";
    let Some(head) = ct.get(..GRPC.len()) else {
        return false;
    };
    if !head.eq_ignore_ascii_case(GRPC) {
        return false;
    }
    matches!(
        ct.as_bytes().get(GRPC.len()),
        None | Some(b'+') | Some(b';')
    )
}
