//! Envoy response flags (`response.flags` bitmask) decoded to Envoy's short names.
//!
//! Bit i of the mask is `FLAG_NAMES[i]` (Envoy 1.40 order, which is also Envoy's print
//! order). Bits beyond the table decode as `UNKNOWN(bit N)`; nothing here can panic.

/// Short names by bit position.
pub const FLAG_NAMES: [&str; 30] = [
    "LH", "UH", "UT", "LR", "UR", "UF", "UC", "UO", "NR", "DI", "FI", "RL", "UAEX", "RLSE", "DC",
    "URX", "SI", "IH", "DPE", "UMSDR", "RFCF", "NFCF", "DT", "UPE", "NC", "OM", "DF", "DO", "DR",
    "UDO",
];

/// Names of the set bits, in print order; unknown bits as `UNKNOWN(bit N)`.
pub fn decode(mask: u64) -> Vec<String> {
    let mut out = Vec::new();
    for bit in 0..64u32 {
        if mask & (1u64 << bit) == 0 {
            continue;
        }
        match FLAG_NAMES.get(bit as usize) {
            Some(n) => out.push((*n).to_string()),
            None => out.push(unknown_name(bit)),
        }
    }
    out
}

fn unknown_name(bit: u32) -> String {
    let mut s = String::from("UNKNOWN(bit ");
    push_u64(&mut s, u64::from(bit));
    s.push(')');
    s
}

/// Appends the decimal form of `v` (avoids `format!` machinery).
pub fn push_u64(s: &mut String, v: u64) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    let mut v = v;
    loop {
        i = i.saturating_sub(1);
        if let Some(slot) = buf.get_mut(i) {
            *slot = b'0' + (v % 10) as u8;
        }
        v /= 10;
        if v == 0 || i == 0 {
            break;
        }
    }
    for &b in buf.get(i..).unwrap_or_default() {
        s.push(char::from(b));
    }
}

/// Envoy's printed form: names joined with ",", "-" when none is set.
pub fn format(mask: u64) -> String {
    if mask == 0 {
        return "-".into();
    }
    decode(mask).join(",")
}

/// Bit position of a short name, if known.
pub fn bit_of(name: &str) -> Option<u32> {
    FLAG_NAMES.iter().position(|n| *n == name).map(|p| p as u32)
}

/// A `:status` value (3 ASCII digits) as a number; 0 when it is not one.
pub fn parse_status(v: &[u8]) -> u64 {
    if v.is_empty() || v.len() > 3 {
        return 0;
    }
    let mut n = 0u64;
    for &b in v {
        if !b.is_ascii_digit() {
            return 0;
        }
        n = n * 10 + u64::from(b - b'0');
    }
    n
}
