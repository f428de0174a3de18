//! A minimal proxy-wasm ABI 0.2.1 layer: the host imports hopwatch uses, wrapped so that
//! no host status can panic, and helpers for the exports.
//!
//! Why not the proxy-wasm Rust SDK: Cargo never applies LTO to a library whose crate
//! types include `rlib` (and this crate must be an `rlib` too, for native users of
//! [`crate::config`]); without LTO the SDK alone (its context dispatcher, ~30 exports,
//! hashbrown tables) cost ~68 KB (the budget was 150 KB then). The SDK also panics on host
//! statuses it does not expect (BadArgument from `dispatch_grpc_call`, map access
//! outside the phases it anticipates), and a panic kills the VM of a worker. This layer
//! implements only the callbacks the filter needs and turns every status into a value.

use std::ptr::{null, null_mut};

/// Header maps (proxy-wasm `MapType`).
#[derive(Debug, Clone, Copy)]
#[repr(u32)]
pub enum MapType {
    /// Request headers.
    RequestHeaders = 0,
    /// Response headers.
    ResponseHeaders = 2,
    /// Response trailers.
    ResponseTrailers = 3,
}

/// Log levels.
#[derive(Debug, Clone, Copy)]
#[repr(u32)]
pub enum LogLevel {
    /// debug
    Debug = 1,
    /// info
    Info = 2,
    /// warn
    Warn = 3,
    /// error
    Error = 4,
}

/// proxy-wasm status codes used here.
pub const OK: u32 = 0;
/// NotFound
pub const NOT_FOUND: u32 = 1;
/// BadArgument
pub const BAD_ARGUMENT: u32 = 2;
/// CasMismatch
pub const CAS_MISMATCH: u32 = 8;

const BUFFER_PLUGIN_CONFIGURATION: u32 = 7;
const METRIC_COUNTER: u32 = 0;

mod ffi {
    #[link(wasm_import_module = "env")]
    extern "C" {
        pub fn proxy_log(level: u32, msg: *const u8, len: usize) -> u32;
        pub fn proxy_get_current_time_nanoseconds(out: *mut u64) -> u32;
        pub fn proxy_set_tick_period_milliseconds(period: u32) -> u32;
        pub fn proxy_get_buffer_bytes(
            buffer: u32,
            start: usize,
            max: usize,
            out: *mut *mut u8,
            out_len: *mut usize,
        ) -> u32;
        pub fn proxy_get_header_map_pairs(map: u32, out: *mut *mut u8, out_len: *mut usize) -> u32;
        pub fn proxy_get_header_map_value(
            map: u32,
            key: *const u8,
            key_len: usize,
            out: *mut *mut u8,
            out_len: *mut usize,
        ) -> u32;
        pub fn proxy_replace_header_map_value(
            map: u32,
            key: *const u8,
            key_len: usize,
            value: *const u8,
            value_len: usize,
        ) -> u32;
        pub fn proxy_add_header_map_value(
            map: u32,
            key: *const u8,
            key_len: usize,
            value: *const u8,
            value_len: usize,
        ) -> u32;
        pub fn proxy_remove_header_map_value(map: u32, key: *const u8, key_len: usize) -> u32;
        pub fn proxy_get_property(
            path: *const u8,
            path_len: usize,
            out: *mut *mut u8,
            out_len: *mut usize,
        ) -> u32;
        pub fn proxy_get_shared_data(
            key: *const u8,
            key_len: usize,
            out: *mut *mut u8,
            out_len: *mut usize,
            cas: *mut u32,
        ) -> u32;
        pub fn proxy_set_shared_data(
            key: *const u8,
            key_len: usize,
            value: *const u8,
            value_len: usize,
            cas: u32,
        ) -> u32;
        pub fn proxy_grpc_call(
            upstream: *const u8,
            upstream_len: usize,
            service: *const u8,
            service_len: usize,
            method: *const u8,
            method_len: usize,
            metadata: *const u8,
            metadata_len: usize,
            message: *const u8,
            message_len: usize,
            timeout_ms: u32,
            token: *mut u32,
        ) -> u32;
        pub fn proxy_define_metric(kind: u32, name: *const u8, len: usize, id: *mut u32) -> u32;
        pub fn proxy_increment_metric(id: u32, offset: i64) -> u32;
    }
}

/// Memory the host fills for us comes from this export. Not zeroed: the host writes
/// all `size` bytes before handing them over (this runs on every host call that
/// returns data, e.g. the request headers).
#[no_mangle]
pub extern "C" fn proxy_on_memory_allocate(size: usize) -> *mut u8 {
    let mut v: Vec<u8> = Vec::with_capacity(size);
    let p = v.as_mut_ptr();
    if v.capacity() != size {
        // `take` rebuilds the Vec with capacity == len == size; never the case for u8
        // in practice, but never build a Vec with a wrong capacity.
        return std::ptr::null_mut();
    }
    std::mem::forget(v);
    p
}

/// Takes ownership of host-returned memory.
fn take(ptr: *mut u8, len: usize) -> Vec<u8> {
    if ptr.is_null() || len == 0 {
        return Vec::new();
    }
    // SAFETY: the host allocated `len` bytes through `proxy_on_memory_allocate`
    // (a boxed slice of exactly `len` bytes) and hands the ownership to us.
    unsafe { Vec::from_raw_parts(ptr, len, len) }
}

/// Logs a message.
pub fn log(level: LogLevel, msg: &str) {
    // SAFETY: pointer/length of a live str.
    unsafe {
        ffi::proxy_log(level as u32, msg.as_ptr(), msg.len());
    }
}

/// Wall clock in ns since the epoch (0 on error).
pub fn now_nanos() -> u64 {
    let mut t = 0u64;
    // SAFETY: valid out pointer.
    if unsafe { ffi::proxy_get_current_time_nanoseconds(&mut t) } == OK {
        t
    } else {
        0
    }
}

/// Sets the tick period of the current (or the current stream's) root context.
pub fn set_tick_period_ms(ms: u32) {
    // SAFETY: plain value.
    unsafe {
        ffi::proxy_set_tick_period_milliseconds(ms);
    }
}

/// The plugin configuration bytes.
pub fn plugin_configuration() -> Vec<u8> {
    let (mut p, mut n) = (null_mut(), 0usize);
    // SAFETY: valid out pointers.
    let st = unsafe {
        ffi::proxy_get_buffer_bytes(BUFFER_PLUGIN_CONFIGURATION, 0, usize::MAX, &mut p, &mut n)
    };
    if st == OK {
        take(p, n)
    } else {
        Vec::new()
    }
}

/// All headers of a map, serialized (see [`crate::headers`]), in one host call.
pub fn get_map_bytes(map: MapType) -> Vec<u8> {
    let (mut p, mut n) = (null_mut(), 0usize);
    // SAFETY: valid out pointers.
    if unsafe { ffi::proxy_get_header_map_pairs(map as u32, &mut p, &mut n) } != OK {
        return Vec::new();
    }
    take(p, n)
}

/// One header value, as bytes.
pub fn get_map_value_bytes(map: MapType, key: &str) -> Option<Vec<u8>> {
    let (mut p, mut n) = (null_mut(), 0usize);
    // SAFETY: valid pointers.
    let st = unsafe {
        ffi::proxy_get_header_map_value(map as u32, key.as_ptr(), key.len(), &mut p, &mut n)
    };
    if st != OK {
        return None;
    }
    Some(take(p, n))
}

/// One header value (lossy UTF-8).
pub fn get_map_value(map: MapType, key: &str) -> Option<String> {
    get_map_value_bytes(map, key).map(|b| String::from_utf8_lossy(&b).into_owned())
}

/// Sets (replaces) a header.
pub fn replace_map_value(map: MapType, key: &str, value: &str) -> bool {
    // SAFETY: valid pointers.
    unsafe {
        ffi::proxy_replace_header_map_value(
            map as u32,
            key.as_ptr(),
            key.len(),
            value.as_ptr(),
            value.len(),
        ) == OK
    }
}

/// Appends a header.
pub fn add_map_value(map: MapType, key: &str, value: &str) -> bool {
    // SAFETY: valid pointers.
    unsafe {
        ffi::proxy_add_header_map_value(
            map as u32,
            key.as_ptr(),
            key.len(),
            value.as_ptr(),
            value.len(),
        ) == OK
    }
}

/// Removes a header.
pub fn remove_map_value(map: MapType, key: &str) -> bool {
    // SAFETY: valid pointers.
    unsafe { ffi::proxy_remove_header_map_value(map as u32, key.as_ptr(), key.len()) == OK }
}

/// A property; path segments are joined with NUL bytes.
pub fn get_property(path: &[&str]) -> Option<Vec<u8>> {
    let mut sp: Vec<u8> = Vec::with_capacity(64);
    for (i, part) in path.iter().enumerate() {
        if i > 0 {
            sp.push(0);
        }
        sp.extend_from_slice(part.as_bytes());
    }
    let (mut p, mut n) = (null_mut(), 0usize);
    // SAFETY: valid pointers.
    let st = unsafe { ffi::proxy_get_property(sp.as_ptr(), sp.len(), &mut p, &mut n) };
    if st != OK || p.is_null() {
        return None;
    }
    Some(take(p, n))
}

/// Shared data and its CAS.
pub fn get_shared_data(key: &str) -> Option<(Vec<u8>, u32)> {
    let (mut p, mut n, mut cas) = (null_mut(), 0usize, 0u32);
    // SAFETY: valid pointers.
    let st =
        unsafe { ffi::proxy_get_shared_data(key.as_ptr(), key.len(), &mut p, &mut n, &mut cas) };
    if st != OK {
        return None;
    }
    Some((take(p, n), cas))
}

/// Writes shared data; returns the host status.
pub fn set_shared_data(key: &str, value: &[u8], cas: u32) -> u32 {
    // SAFETY: valid pointers.
    unsafe { ffi::proxy_set_shared_data(key.as_ptr(), key.len(), value.as_ptr(), value.len(), cas) }
}

/// Starts a unary gRPC call; `Ok(token)` or the host status.
/// `metadata`: the call's initial metadata as a serialized header map.
pub fn grpc_call(
    upstream: &[u8],
    service: &str,
    method: &str,
    metadata: &[u8],
    message: &[u8],
    timeout_ms: u32,
) -> Result<u32, u32> {
    let mut token = 0u32;
    let meta = metadata;
    // SAFETY: valid pointers for the duration of the call.
    let st = unsafe {
        ffi::proxy_grpc_call(
            upstream.as_ptr(),
            upstream.len(),
            service.as_ptr(),
            service.len(),
            method.as_ptr(),
            method.len(),
            meta.as_ptr(),
            meta.len(),
            if message.is_empty() {
                null()
            } else {
                message.as_ptr()
            },
            message.len(),
            timeout_ms,
            &mut token,
        )
    };
    if st == OK {
        Ok(token)
    } else {
        Err(st)
    }
}

/// Defines a counter (0 on error).
pub fn define_counter(name: &str) -> u32 {
    let mut id = 0u32;
    // SAFETY: valid pointers.
    unsafe {
        ffi::proxy_define_metric(METRIC_COUNTER, name.as_ptr(), name.len(), &mut id);
    }
    id
}

/// Increments a counter.
pub fn increment_metric(id: u32, by: i64) {
    // SAFETY: plain values.
    unsafe {
        ffi::proxy_increment_metric(id, by);
    }
}
