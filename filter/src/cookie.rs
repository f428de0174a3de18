//! Cookies of the `cookie` request headers (RFC 6265 `cookie-string`), for the
//! `cookie:NAME` tag alias: gateways and browsers often carry the environment key in a
//! cookie (KtEnv matched one at the gateway).
//!
//! A request may carry several `cookie` headers (HTTP/2 splits them, one per pair), each
//! with several `name=value` pairs separated by `;`. A value may be quoted
//! (`name="value"`); the quotes are not part of it. The first pair of that name wins;
//! pairs without `=` are skipped (browsers send them for nameless cookies).

/// The value of the first cookie `name` in `headers` (the `cookie` header values, in
/// order), unquoted. `None`: no such cookie.
pub fn get<'a>(headers: &[&'a str], name: &str) -> Option<&'a str> {
    for h in headers {
        for pair in h.split(';') {
            let Some((n, v)) = pair.split_once('=') else {
                continue;
            };
            if n.trim_matches([' ', '\t']) != name {
                continue;
            }
            let v = v.trim_matches([' ', '\t']);
            let unquoted = v
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .unwrap_or(v);
            return Some(unquoted);
        }
    }
    None
}
