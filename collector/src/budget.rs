//! Byte budgets of the collector's in-memory stores.
//!
//! Every store that grows with what the filters send (open traces, recently analysed
//! traces, the string table, the findings, the per-workload stats, the cross-trace
//! indexes) counts the bytes it holds — the heap sizes of its strings and vectors plus a
//! per-entry overhead estimate for the hash-map slots and allocator headers — and, when
//! a new entry would take it over its budget, evicts its least recently used entries
//! (counted per store). The count limits stay as well: whichever bound is hit first acts.
//!
//! The per-entry overheads were checked against the RSS probes
//! (`cargo run -p hopwatch-bench --release --bin collector-probes`, figures in
//! docs/BENCHMARKS.md): the probes' peak RSS is 1.1-1.4x the stores' accounted bytes
//! (the rest: allocator pages kept after eviction churn, the process itself).
//!
//! # Defaults (the shipped collector pod has a 1 GiB memory limit)
//!
//! | store            | flag                          | default |
//! |------------------|-------------------------------|---------|
//! | open traces      | `--max-open-bytes`            | 320 MiB |
//! | recent traces    | `--max-recent-bytes`          |  48 MiB |
//! | string table     | `--max-string-bytes`          |  32 MiB |
//! | findings         | `--max-findings-bytes`        | 160 MiB |
//! | workload stats   | `--max-workload-stats-bytes`  |  16 MiB |
//! | cross-trace idx  | `--max-pod-index-bytes`       |  64 MiB |
//!
//! 320 + 48 + 32 + 160 + 16 + 64 = 640 MiB accounted, leaving ~384 MiB of the 1 GiB
//! limit for what is not accounted: allocator fragmentation and free lists (the probes
//! show 10-30 %), in-flight Report batches (up to 16 MiB each, decoded twice), traces
//! being analysed outside the lock, the redb page cache, the tokio/tonic runtime and
//! the binary itself (~30 MiB).
//!
//! What the parts hold: open traces ~1,000,000 hops of multi-hop traces (~320 bytes a
//! hop: at 450,000 hops/s, 2.3 s of traffic, more than the 2 s after which an evicted
//! trace is still analysed in full) or ~330,000 one-hop traces; findings ~72,000 of the
//! probe's shape (~2.3 KB each with their metric series; `--retention-count`, 100,000,
//! binds first for shorter ones); strings ~250,000 names of 40 bytes (details are cut
//! to 256 bytes); the pod index ~1,300 pods with a full 512-request window.
//!
//! The cross-trace index budget is shared by four indexes in fixed parts (each has its
//! own lock): the per-pod inbound index 1/2, the request-id fragment index 1/4, the
//! service graph 1/8, the instance registry 1/8.

use std::fmt;

pub const KIB: usize = 1024;
pub const MIB: usize = 1024 * KIB;
pub const GIB: usize = 1024 * MIB;

/// Allocator header plus rounding of one heap allocation (glibc: 8-16 bytes, chunks
/// rounded up to 16).
pub const ALLOC_OVERHEAD: usize = 16;

/// Heap bytes of a boxed string (0 when it is empty: no allocation).
pub fn str_heap(len: usize) -> usize {
    if len == 0 {
        0
    } else {
        len.next_multiple_of(16) + ALLOC_OVERHEAD
    }
}

/// Bytes of one hash-map slot holding `entry` bytes (hashbrown: the slot, one control
/// byte, at most 1/8 empty slots at the maximum load factor, on average ~1/4 spare).
pub fn map_slot(entry: usize) -> usize {
    (entry + 1) * 5 / 4
}

/// Byte budgets of the stores (see the module docs for the defaults' arithmetic).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budgets {
    pub open: usize,
    pub recent: usize,
    pub strings: usize,
    pub findings: usize,
    pub workload_stats: usize,
    pub pod_index: usize,
}

impl Default for Budgets {
    fn default() -> Self {
        Budgets {
            open: 320 * MIB,
            recent: 48 * MIB,
            strings: 32 * MIB,
            findings: 160 * MIB,
            workload_stats: 16 * MIB,
            pod_index: 64 * MIB,
        }
    }
}

impl Budgets {
    /// The sum of all budgets (what the defaults' arithmetic adds up).
    pub fn total(&self) -> usize {
        self.open
            + self.recent
            + self.strings
            + self.findings
            + self.workload_stats
            + self.pod_index
    }
    /// The per-pod inbound index's part of `pod_index`.
    pub fn pods(&self) -> usize {
        self.pod_index / 2
    }
    /// The fragment index's part of `pod_index`.
    pub fn fragments(&self) -> usize {
        self.pod_index / 4
    }
    /// The service graph's part of `pod_index`.
    pub fn graph(&self) -> usize {
        self.pod_index / 8
    }
    /// The instance registry's part of `pod_index`.
    pub fn registry(&self) -> usize {
        self.pod_index / 8
    }
}

/// A store's byte figure as /metrics shows it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreBytes {
    pub bytes: usize,
    pub budget: usize,
    pub evictions: u64,
}

/// A byte size given on the command line: `268435456`, `256MiB`, `64MB`, `1GiB`, `512k`.
/// Decimal units (kB, MB, GB) are powers of 1000, binary ones (KiB, MiB, GiB, and the
/// bare letters k, m, g) powers of 1024.
pub fn parse_size(s: &str) -> Result<usize, SizeError> {
    let t = s.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '_')
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let num: String = num.chars().filter(|c| *c != '_').collect();
    let n: usize = num.parse().map_err(|_| SizeError(s.to_string()))?;
    let mul: usize = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => KIB,
        "m" | "mib" => MIB,
        "g" | "gib" => GIB,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        _ => return Err(SizeError(s.to_string())),
    };
    n.checked_mul(mul).ok_or_else(|| SizeError(s.to_string()))
}

/// A size that [`parse_size`] does not take.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid size {0:?} (examples: 268435456, 256MiB, 64MB, 1GiB)")]
pub struct SizeError(pub String);

/// Prints bytes the way the flags take them (`256MiB`), exact.
pub struct Size(pub usize);

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        if n >= GIB && n.is_multiple_of(GIB) {
            write!(f, "{}GiB", n / GIB)
        } else if n >= MIB && n.is_multiple_of(MIB) {
            write!(f, "{}MiB", n / MIB)
        } else if n >= KIB && n.is_multiple_of(KIB) {
            write!(f, "{}KiB", n / KIB)
        } else {
            write!(f, "{n}")
        }
    }
}

/// The keys of the least recently used entries whose bytes add up to at least
/// `to_free`: `entries` yields (last use, key, bytes). For stores without an LRU list:
/// a full scan, so callers free down to [`low_water`] of their budget at once (the scan
/// is paid once per ~1/8 of the budget, not per entry).
pub fn oldest<K>(entries: impl Iterator<Item = (u64, K, usize)>, to_free: usize) -> Vec<K> {
    if to_free == 0 {
        return Vec::new();
    }
    let mut v: Vec<(u64, K, usize)> = entries.collect();
    v.sort_unstable_by_key(|e| e.0);
    let mut freed = 0;
    let mut out = Vec::new();
    for (_, k, b) in v {
        if freed >= to_free {
            break;
        }
        freed += b;
        out.push(k);
    }
    out
}

/// What a scanned store frees down to when it is over `budget`: 7/8 of it.
pub fn low_water(budget: usize) -> usize {
    budget - budget / 8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_size("256MiB"), Ok(256 * MIB));
        assert_eq!(parse_size("256mib"), Ok(256 * MIB));
        assert_eq!(parse_size("1GiB"), Ok(GIB));
        assert_eq!(parse_size("64MB"), Ok(64_000_000));
        assert_eq!(parse_size("512k"), Ok(512 * KIB));
        assert_eq!(parse_size("1_000"), Ok(1000));
        assert_eq!(parse_size(" 4096 "), Ok(4096));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("12 parsecs").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("99999999999999999999GiB").is_err());
        assert_eq!(Size(256 * MIB).to_string(), "256MiB");
        assert_eq!(Size(1000).to_string(), "1000");
    }

    #[test]
    fn defaults_fit_the_shipped_pod() {
        let t = Budgets::default().total();
        assert_eq!(t, 640 * MIB);
        // The shipped pod's limit is 1 GiB: 40 % of it stays unaccounted headroom.
        assert!(t <= GIB * 64 / 100, "{t}");
    }

    #[test]
    fn oldest_takes_the_least_recently_used_first() {
        let e = vec![(5u64, "e", 10), (1, "a", 10), (3, "c", 10), (2, "b", 10)];
        assert_eq!(oldest(e.clone().into_iter(), 15), vec!["a", "b"]);
        assert_eq!(oldest(e.clone().into_iter(), 0), Vec::<&str>::new());
        assert_eq!(oldest(e.into_iter(), 1000).len(), 4);
    }
}
