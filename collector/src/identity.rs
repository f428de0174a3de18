//! Who may report: a Report batch may only speak for the workload that sent it.
//!
//! In a mesh the sender is the collector's mTLS peer. The collector does not terminate
//! TLS itself: its own sidecar does, and tells it who the peer was in the
//! `x-forwarded-client-cert` (XFCC) header (Istio's inbound listener:
//! `forward_client_cert_details: APPEND_FORWARD` or `SANITIZE_SET` with
//! `set_current_client_cert_details: {uri: true}`). The peer's SPIFFE identity
//! `spiffe://<trust domain>/ns/<namespace>/sa/<service account>` then bounds what the batch
//! may claim: every hop's namespace and service account, and the batch's
//! `reporter_namespace` / `reporter_service_account`, must be the peer's, or the hop is
//! refused and counted. Deployments without mesh identity can require a shared token
//! (`x-hopwatch-report-token`) instead or as well.
//!
//! Independently of the sender: hops dated beyond the collector's clock plus
//! `--max-clock-skew` are refused (a hop "from the year 2508" would make a finding that
//! never expires), and a batch's `dropped_since_last_batch` claim is bounded.
//!
//! [`admit`] is what `Collector::report` calls first; [`IdentityArgs`] are the flags,
//! [`Policy`] what they resolve to.

use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use hopwatch_proto::v1::{Hop, ReportRequest};

/// The header the collector's sidecar sets with the mTLS peer's certificate details.
pub const XFCC_HEADER: &str = "x-forwarded-client-cert";
/// The gRPC metadata key of the shared report token (the filter's `report_token`).
pub const TOKEN_HEADER: &str = "x-hopwatch-report-token";
/// Default `--max-clock-skew`.
pub const DEFAULT_MAX_CLOCK_SKEW: Duration = Duration::from_secs(10 * 60);
/// The largest `--max-clock-skew`. Beyond the clock check keeping every accepted hop's
/// end below now + skew, the analysis adds join slack to hop times unchecked: the bound
/// keeps those sums far from u64 overflow whatever a sender writes.
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(24 * 3600);
/// The most reports one batch may claim its filter dropped since its previous batch.
/// A filter drops at most what it could not send in the interval between two batches;
/// a billion is far beyond any real backlog and small enough that no sum overflows.
pub const MAX_DROPPED_CLAIM: u64 = 1_000_000_000;
/// XFCC headers longer than this are refused as malformed (a sidecar writes ~200 bytes
/// per hop with `uri: true`; a whole-certificate `Cert=` element is ~2 KB).
pub const MAX_XFCC_BYTES: usize = 64 * 1024;

// ---------------------------------------------------------------------------------------
// XFCC

/// One XFCC element: what one proxy added, as `key=value` pairs (keys lowercased,
/// values unquoted).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct XfccElement {
    pub pairs: Vec<(String, String)>,
}

impl XfccElement {
    /// The values of `key` (case-insensitive), in order (an element may carry several
    /// `URI=` and `DNS=` pairs, one per SAN).
    pub fn values<'a>(&'a self, key: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.pairs
            .iter()
            .filter(move |(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v.as_str())
    }
}

/// Why an XFCC header could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum XfccError {
    #[error("x-forwarded-client-cert is empty")]
    Empty,
    #[error("x-forwarded-client-cert is {0} bytes (at most {MAX_XFCC_BYTES})")]
    TooLong(usize),
    #[error("x-forwarded-client-cert is not visible ASCII")]
    NotAscii,
    #[error("x-forwarded-client-cert: unterminated quoted value starting at byte {0}")]
    UnterminatedQuote(usize),
    #[error("x-forwarded-client-cert: `{0}` is not key=value")]
    NotKeyValue(String),
    #[error("x-forwarded-client-cert: text after a quoted value at byte {0}")]
    AfterQuote(usize),
}

/// Parses an XFCC header: elements separated by `,`, pairs by `;`, `key=value` with the
/// value optionally double-quoted (Envoy quotes values containing `,`, `;` or `=`, e.g.
/// `Subject`, and escapes `"` inside as `\"`). Empty pairs (`;;`) are skipped.
pub fn parse_xfcc(header: &str) -> Result<Vec<XfccElement>, XfccError> {
    if header.len() > MAX_XFCC_BYTES {
        return Err(XfccError::TooLong(header.len()));
    }
    if !header
        .bytes()
        .all(|b| b == b'\t' || (b' '..=b'~').contains(&b))
    {
        return Err(XfccError::NotAscii);
    }
    if header.trim().is_empty() {
        return Err(XfccError::Empty);
    }
    let b = header.as_bytes();
    let mut elements = Vec::new();
    let mut element = XfccElement::default();
    let mut i = 0;
    loop {
        // One pair: key up to '=', then a quoted or bare value.
        while i < b.len() && (b[i] == b' ' || b[i] == b'\t') {
            i += 1;
        }
        let key_start = i;
        while i < b.len() && !matches!(b[i], b'=' | b';' | b',') {
            i += 1;
        }
        let key = header[key_start..i].trim();
        if i < b.len() && b[i] == b'=' {
            if key.is_empty() {
                return Err(XfccError::NotKeyValue(header[key_start..=i].to_string()));
            }
            i += 1;
            let value = if i < b.len() && b[i] == b'"' {
                let quote = i;
                i += 1;
                let mut v = String::new();
                loop {
                    match b.get(i) {
                        None => return Err(XfccError::UnterminatedQuote(quote)),
                        Some(b'\\') if i + 1 < b.len() => {
                            v.push(b[i + 1] as char);
                            i += 2;
                        }
                        Some(b'"') => {
                            i += 1;
                            break;
                        }
                        Some(&c) => {
                            v.push(c as char);
                            i += 1;
                        }
                    }
                }
                while i < b.len() && (b[i] == b' ' || b[i] == b'\t') {
                    i += 1;
                }
                if i < b.len() && !matches!(b[i], b';' | b',') {
                    return Err(XfccError::AfterQuote(i));
                }
                v
            } else {
                let start = i;
                while i < b.len() && !matches!(b[i], b';' | b',') {
                    i += 1;
                }
                header[start..i].trim().to_string()
            };
            element.pairs.push((key.to_ascii_lowercase(), value));
        } else if !key.is_empty() {
            return Err(XfccError::NotKeyValue(key.to_string()));
        }
        // Separator or end.
        match b.get(i) {
            None => {
                if !element.pairs.is_empty() {
                    elements.push(element);
                }
                return Ok(elements);
            }
            Some(b',') => {
                if !element.pairs.is_empty() {
                    elements.push(std::mem::take(&mut element));
                }
                i += 1;
            }
            Some(_) => i += 1, // ';'
        }
    }
}

/// An Istio workload identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpiffeId {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

impl std::fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

/// `spiffe://<trust domain>/ns/<namespace>/sa/<service account>` (Istio's form; the
/// scheme is case-insensitive), else None.
pub fn parse_spiffe(uri: &str) -> Option<SpiffeId> {
    let rest = uri
        .get(..9)
        .filter(|s| s.eq_ignore_ascii_case("spiffe://"))
        .map(|_| &uri[9..])?;
    let mut parts = rest.split('/');
    let (td, ns_key, ns, sa_key, sa) = (
        parts.next()?,
        parts.next()?,
        parts.next()?,
        parts.next()?,
        parts.next()?,
    );
    if parts.next().is_some() || ns_key != "ns" || sa_key != "sa" {
        return None;
    }
    if [td, ns, sa].iter().any(|s| s.is_empty()) {
        return None;
    }
    Some(SpiffeId {
        trust_domain: td.to_string(),
        namespace: ns.to_string(),
        service_account: sa.to_string(),
    })
}

/// The peer the nearest proxy (the collector's own sidecar) saw: the first Istio SPIFFE
/// `URI` of the header's **last** element. Earlier elements were added by proxies further
/// away, or written by the client itself (APPEND_FORWARD keeps what the client sent and
/// appends), so they prove nothing. `Ok(None)`: the last element names no SPIFFE identity.
pub fn peer_from_xfcc(header: &str) -> Result<Option<SpiffeId>, XfccError> {
    let elements = parse_xfcc(header)?;
    Ok(elements
        .last()
        .and_then(|e| e.values("uri").find_map(parse_spiffe)))
}

// ---------------------------------------------------------------------------------------
// Flags and policy

/// `--peer-identity`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum PeerIdentityMode {
    /// Read the peer from `x-forwarded-client-cert` (set by the collector's sidecar) and
    /// check batches against it when the header is present.
    #[default]
    Xfcc,
    /// Ignore any peer identity.
    None,
}

/// A shared report token. Never printed (Debug shows `<redacted>`).
#[derive(Clone, PartialEq, Eq)]
pub struct ReportToken(String);

impl ReportToken {
    /// Constant-time comparison (for equal lengths; the length itself is not secret
    /// enough to matter): no early exit on the first differing byte.
    pub fn matches(&self, given: &[u8]) -> bool {
        let want = self.0.as_bytes();
        let mut diff = (want.len() != given.len()) as u8;
        for (i, w) in want.iter().enumerate() {
            diff |= w ^ given.get(i).copied().unwrap_or(0);
        }
        diff == 0
    }
}

impl std::fmt::Debug for ReportToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReportToken(<redacted>)")
    }
}

impl std::str::FromStr for ReportToken {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.trim().is_empty() {
            return Err("the report token is empty (omit --report-token / HOPWATCH_REPORT_TOKEN to accept reports without one)".into());
        }
        if !s.bytes().all(|b| (b'!'..=b'~').contains(&b)) {
            return Err("the report token must be visible ASCII without spaces (it travels as gRPC metadata)".into());
        }
        Ok(ReportToken(s.to_string()))
    }
}

fn parse_skew(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 30s, 10m, 1h)"))?;
    if d > MAX_CLOCK_SKEW {
        return Err(format!(
            "{s} is more than the maximum clock skew of 24h (hops from further in the future are never real)"
        ));
    }
    Ok(d)
}

/// The collector's flags about who may report.
#[derive(clap::Args, Debug, Clone)]
pub struct IdentityArgs {
    /// Where the sender's identity comes from: `xfcc` (the x-forwarded-client-cert header
    /// the collector's sidecar sets; batches are checked against it when it is present)
    /// or `none`.
    #[arg(long, value_enum, default_value = "xfcc")]
    pub peer_identity: PeerIdentityMode,
    /// Refuse (UNAUTHENTICATED) Report calls that carry no peer identity.
    #[arg(long)]
    pub require_peer_identity: bool,
    /// Only accept Report calls whose metadata `x-hopwatch-report-token` equals this
    /// (the filter's `report_token`). Prefer the environment variable: a command line is
    /// visible to every process on the node.
    #[arg(long, env = "HOPWATCH_REPORT_TOKEN", hide_env_values = true)]
    pub report_token: Option<ReportToken>,
    /// Hops that end later than the collector's clock plus this are refused.
    #[arg(long, default_value = "10m", value_parser = parse_skew)]
    pub max_clock_skew: Duration,
    /// Only peers of this SPIFFE trust domain may report (default: any).
    #[arg(long)]
    pub trust_domain: Option<String>,
}

impl IdentityArgs {
    pub fn policy(&self) -> Policy {
        Policy {
            mode: self.peer_identity,
            require_peer: self.require_peer_identity,
            token: self.report_token.clone(),
            max_clock_skew: self.max_clock_skew,
            trust_domain: self.trust_domain.clone(),
            max_dropped_claim: MAX_DROPPED_CLAIM,
        }
    }
}

/// What a Report call must satisfy (from [`IdentityArgs`]).
#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    pub mode: PeerIdentityMode,
    pub require_peer: bool,
    pub token: Option<ReportToken>,
    pub max_clock_skew: Duration,
    pub trust_domain: Option<String>,
    pub max_dropped_claim: u64,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            mode: PeerIdentityMode::Xfcc,
            require_peer: false,
            token: None,
            max_clock_skew: DEFAULT_MAX_CLOCK_SKEW,
            trust_domain: None,
            max_dropped_claim: MAX_DROPPED_CLAIM,
        }
    }
}

impl Policy {
    /// With a token required.
    pub fn with_token(mut self, token: &str) -> Result<Policy, String> {
        self.token = Some(token.parse()?);
        Ok(self)
    }
}

// ---------------------------------------------------------------------------------------
// The check

/// What the transport says about the sender of one Report call.
#[derive(Clone, Debug, Default)]
pub struct Sender {
    /// The XFCC header (several header lines joined with `,`, as HTTP defines).
    pub xfcc: Option<String>,
    /// The `x-hopwatch-report-token` metadata value.
    pub token: Option<Vec<u8>>,
}

impl Sender {
    pub fn from_metadata(md: &tonic::metadata::MetadataMap) -> Sender {
        let xfcc: Vec<String> = md
            .get_all(XFCC_HEADER)
            .iter()
            // Not visible ASCII: kept as a marker so that the check refuses it as
            // malformed instead of ignoring it.
            .map(|v| {
                v.to_str()
                    .map(str::to_string)
                    .unwrap_or_else(|_| "\u{1}".into())
            })
            .collect();
        Sender {
            xfcc: (!xfcc.is_empty()).then(|| xfcc.join(",")),
            token: md.get(TOKEN_HEADER).map(|v| v.as_bytes().to_vec()),
        }
    }

    /// A sender presenting `spiffe` as its sidecar's peer (tests, probes).
    pub fn spiffe(spiffe: &str) -> Sender {
        Sender {
            xfcc: Some(format!(
                "By=spiffe://cluster.local/ns/hopwatch/sa/hopwatch-collector;Hash=00;URI={spiffe}"
            )),
            token: None,
        }
    }
}

/// Refusal and plausibility counters (`hopwatch_reports_refused_total`,
/// `hopwatch_hops_refused_total`, `hopwatch_dropped_claims_implausible_total`).
#[derive(Debug, Default)]
pub struct Counters {
    pub reports_refused_token: AtomicU64,
    pub reports_refused_identity: AtomicU64,
    pub hops_refused_identity: AtomicU64,
    pub hops_refused_clock_skew: AtomicU64,
    pub dropped_claims_implausible: AtomicU64,
}

/// Why a whole Report call was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Refusal {
    #[error("missing report token: this collector requires the metadata `x-hopwatch-report-token` (the filter's `report_token`)")]
    TokenMissing,
    #[error("wrong report token in `x-hopwatch-report-token`")]
    TokenWrong,
    #[error("missing peer identity: this collector requires an mTLS peer, reported by its sidecar in x-forwarded-client-cert with a spiffe://<trust domain>/ns/<ns>/sa/<sa> URI (--require-peer-identity)")]
    IdentityMissing,
    #[error("unreadable peer identity: {0}")]
    IdentityMalformed(XfccError),
    #[error("peer {peer} is not of the trust domain {want}")]
    TrustDomain { peer: String, want: String },
    #[error("every hop of the batch was refused ({identity} for the sender's identity, {clock_skew} for the clock skew); the first: {first}")]
    AllHops {
        identity: u32,
        clock_skew: u32,
        first: String,
    },
}

impl Refusal {
    /// UNAUTHENTICATED for a missing or wrong credential, PERMISSION_DENIED when the
    /// sender is known but may not say this, INVALID_ARGUMENT for a batch of hops dated
    /// out of range.
    pub fn code(&self) -> tonic::Code {
        match self {
            Refusal::TokenMissing
            | Refusal::TokenWrong
            | Refusal::IdentityMissing
            | Refusal::IdentityMalformed(_) => tonic::Code::Unauthenticated,
            Refusal::TrustDomain { .. } => tonic::Code::PermissionDenied,
            Refusal::AllHops { identity, .. } if *identity > 0 => tonic::Code::PermissionDenied,
            Refusal::AllHops { .. } => tonic::Code::InvalidArgument,
        }
    }
}

/// A batch after the sender checks: the hops it may speak for.
#[derive(Debug)]
pub struct Admitted<'a> {
    pub peer: Option<SpiffeId>,
    pub hops: Cow<'a, [Hop]>,
    /// The `dropped_since_last_batch` to count (0 when implausible).
    pub dropped: u64,
    pub refused_identity: u32,
    pub refused_clock_skew: u32,
    /// The first refusal, for the log and the status message.
    pub first_refusal: Option<String>,
}

/// Checks the sender (token, peer identity), then screens the batch's hops: those the
/// peer may not speak for, and those dated beyond the clock skew, are dropped and counted.
/// `Err` refuses the whole call (counted in `hopwatch_reports_refused_total`).
pub fn admit<'a>(
    policy: &Policy,
    sender: &Sender,
    req: &'a ReportRequest,
    now_ms: u64,
    counters: &Counters,
) -> Result<Admitted<'a>, Refusal> {
    if let Some(want) = &policy.token {
        let ok = match &sender.token {
            None => Err(Refusal::TokenMissing),
            Some(t) if want.matches(t) => Ok(()),
            Some(_) => Err(Refusal::TokenWrong),
        };
        if let Err(e) = ok {
            counters.reports_refused_token.fetch_add(1, Relaxed);
            return Err(e);
        }
    }
    let peer = match (policy.mode, &sender.xfcc) {
        (PeerIdentityMode::None, _) | (_, None) => None,
        (PeerIdentityMode::Xfcc, Some(h)) => match peer_from_xfcc(h) {
            Ok(p) => p,
            Err(e) => {
                counters.reports_refused_identity.fetch_add(1, Relaxed);
                return Err(Refusal::IdentityMalformed(e));
            }
        },
    };
    if peer.is_none() && policy.require_peer {
        counters.reports_refused_identity.fetch_add(1, Relaxed);
        return Err(Refusal::IdentityMissing);
    }
    if let (Some(p), Some(td)) = (&peer, &policy.trust_domain) {
        if !p.trust_domain.eq_ignore_ascii_case(td) {
            counters.reports_refused_identity.fetch_add(1, Relaxed);
            return Err(Refusal::TrustDomain {
                peer: p.to_string(),
                want: td.clone(),
            });
        }
    }

    let dropped = if req.dropped_since_last_batch > policy.max_dropped_claim {
        counters.dropped_claims_implausible.fetch_add(1, Relaxed);
        0
    } else {
        req.dropped_since_last_batch
    };

    // The whole batch speaks for the reporter: a reporter field that is not the peer's
    // makes every hop unacceptable.
    let reporter_mismatch = peer.as_ref().and_then(|p| {
        mismatch(
            p,
            &req.reporter_namespace,
            &req.reporter_service_account,
            "reporter",
        )
    });
    let latest_end_us = now_ms
        .saturating_add(policy.max_clock_skew.min(MAX_CLOCK_SKEW).as_millis() as u64)
        .saturating_mul(1000);
    let mut first_refusal = None;
    let (mut refused_identity, mut refused_clock_skew) = (0u32, 0u32);
    let mut keep: Option<Vec<Hop>> = None;
    for (i, h) in req.hops.iter().enumerate() {
        let why = if let Some(m) = &reporter_mismatch {
            refused_identity += 1;
            Some(m.clone())
        } else if let Some(m) = peer
            .as_ref()
            .and_then(|p| mismatch(p, &h.namespace, &h.service_account, "hop"))
        {
            refused_identity += 1;
            Some(format!("hop {i}: {m}"))
        } else if h.start_time_unix_micros.saturating_add(h.duration_micros) > latest_end_us {
            refused_clock_skew += 1;
            Some(format!(
                "hop {i}: ends at {} µs since the epoch, more than {:?} after the collector's clock ({} ms)",
                h.start_time_unix_micros.saturating_add(h.duration_micros),
                policy.max_clock_skew,
                now_ms
            ))
        } else {
            None
        };
        match why {
            Some(w) => {
                if keep.is_none() {
                    keep = Some(req.hops[..i].to_vec());
                }
                first_refusal.get_or_insert(w);
            }
            None => {
                if let Some(k) = &mut keep {
                    k.push(h.clone());
                }
            }
        }
    }
    counters
        .hops_refused_identity
        .fetch_add(refused_identity as u64, Relaxed);
    counters
        .hops_refused_clock_skew
        .fetch_add(refused_clock_skew as u64, Relaxed);
    Ok(Admitted {
        peer,
        hops: match keep {
            Some(k) => Cow::Owned(k),
            None => Cow::Borrowed(&req.hops),
        },
        dropped,
        refused_identity,
        refused_clock_skew,
        first_refusal,
    })
}

/// Why `namespace` / `service_account` (empty: not stated) are not `peer`'s.
fn mismatch(peer: &SpiffeId, namespace: &str, service_account: &str, what: &str) -> Option<String> {
    if !namespace.is_empty() && namespace != peer.namespace {
        return Some(format!(
            "{what} namespace {namespace:?} is not the sender's (identity {peer})"
        ));
    }
    if !service_account.is_empty() && service_account != peer.service_account {
        return Some(format!(
            "{what} service account {service_account:?} is not the sender's (identity {peer})"
        ));
    }
    None
}

/// Adds `v` to `c` without wrapping (a counter stays at `u64::MAX` rather than restart).
pub fn saturating_add(c: &AtomicU64, v: u64) {
    let _ = c.fetch_update(Relaxed, Relaxed, |x| Some(x.saturating_add(v)));
}

#[cfg(test)]
mod tests {
    use super::*;

    const ISTIO: &str = "By=spiffe://cluster.local/ns/hopwatch/sa/hopwatch-collector;Hash=9ba61d6425303443c0748a02dd8de688468ed33be74eee6556d90c0149c1309e;Subject=\"\";URI=spiffe://cluster.local/ns/shop/sa/cart";

    fn hop(ns: &str, sa: &str, start_us: u64) -> Hop {
        Hop {
            trace_id: "t".into(),
            direction: 1,
            namespace: ns.into(),
            service_account: sa.into(),
            start_time_unix_micros: start_us,
            duration_micros: 1000,
            ..Default::default()
        }
    }

    #[test]
    fn xfcc_as_envoy_writes_it() {
        let e = parse_xfcc(ISTIO).unwrap();
        assert_eq!(e.len(), 1);
        assert_eq!(
            e[0].values("URI").collect::<Vec<_>>(),
            ["spiffe://cluster.local/ns/shop/sa/cart"]
        );
        assert_eq!(e[0].values("subject").collect::<Vec<_>>(), [""]);
        // Envoy's documented examples: quoted Subject with commas, several DNS SANs,
        // two elements.
        let h = "By=http://frontend.lyft.com;Hash=468ed33be74eee6556d90c0149c1309e9ba61d6425303443c0748a02dd8de688;Subject=\"/C=US/ST=CA/L=San Francisco/OU=Lyft/CN=Test Client\";URI=http://testclient.lyft.com;DNS=lyft.com;DNS=www.lyft.com,By=http://backend.lyft.com;Hash=9ba6;URI=spiffe://cluster.local/ns/prod/sa/payments";
        let e = parse_xfcc(h).unwrap();
        assert_eq!(e.len(), 2);
        assert_eq!(
            e[0].values("subject").next(),
            Some("/C=US/ST=CA/L=San Francisco/OU=Lyft/CN=Test Client")
        );
        assert_eq!(e[0].values("dns").count(), 2);
        assert_eq!(
            peer_from_xfcc(h).unwrap().unwrap().to_string(),
            "spiffe://cluster.local/ns/prod/sa/payments"
        );
        // Escaped quotes and separators inside a quoted value.
        let e = parse_xfcc(r#"Subject="CN=a\"b,c;d=e";URI=spiffe://td/ns/a/sa/b"#).unwrap();
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].values("subject").next(), Some("CN=a\"b,c;d=e"));
    }

    #[test]
    fn the_last_element_is_the_peer() {
        // A client wrote its own XFCC claiming payments; the sidecar (APPEND_FORWARD)
        // appended the real peer.
        let h = format!("URI=spiffe://cluster.local/ns/prod/sa/payments,{ISTIO}");
        let p = peer_from_xfcc(&h).unwrap().unwrap();
        assert_eq!(
            (p.namespace.as_str(), p.service_account.as_str()),
            ("shop", "cart")
        );
        // A last element without a SPIFFE URI names nobody, even if an earlier one did.
        let h = "URI=spiffe://cluster.local/ns/prod/sa/payments,By=x;Hash=00";
        assert_eq!(peer_from_xfcc(h).unwrap(), None);
    }

    #[test]
    fn malformed_xfcc_is_an_error() {
        for (h, want) in [
            ("", XfccError::Empty),
            ("URI=\"spiffe://x", XfccError::UnterminatedQuote(4)),
            ("URI", XfccError::NotKeyValue("URI".into())),
            ("=x", XfccError::NotKeyValue("=".into())),
            ("Subject=\"a\"b", XfccError::AfterQuote(11)),
            ("URI=spiffe://a/ns/b/sa/c\u{1}", XfccError::NotAscii),
        ] {
            assert_eq!(parse_xfcc(h), Err(want), "{h:?}");
        }
        assert!(matches!(
            parse_xfcc(&"a".repeat(MAX_XFCC_BYTES + 1)),
            Err(XfccError::TooLong(_))
        ));
    }

    #[test]
    fn spiffe_ids() {
        let p = parse_spiffe("spiffe://cluster.local/ns/shop/sa/cart").unwrap();
        assert_eq!(
            (
                p.trust_domain.as_str(),
                p.namespace.as_str(),
                p.service_account.as_str()
            ),
            ("cluster.local", "shop", "cart")
        );
        for bad in [
            "http://cluster.local/ns/shop/sa/cart",
            "spiffe://cluster.local/ns/shop",
            "spiffe://cluster.local/ns//sa/cart",
            "spiffe://cluster.local/sa/cart/ns/shop",
            "spiffe://cluster.local/ns/shop/sa/cart/extra",
            "spiffe:",
            "",
        ] {
            assert_eq!(parse_spiffe(bad), None, "{bad}");
        }
    }

    #[test]
    fn tokens_compare_and_stay_secret() {
        let t: ReportToken = "s3cret".parse().unwrap();
        assert!(t.matches(b"s3cret"));
        assert!(!t.matches(b"s3cre"));
        assert!(!t.matches(b"s3cret!"));
        assert!(!t.matches(b"S3cret"));
        assert!(!t.matches(b""));
        assert_eq!(format!("{t:?}"), "ReportToken(<redacted>)");
        assert!("".parse::<ReportToken>().is_err());
        assert!("  ".parse::<ReportToken>().is_err());
        assert!("a b".parse::<ReportToken>().is_err());
    }

    #[test]
    fn admit_screens_hops_against_the_peer() {
        let now_ms = 1_800_000_000_000;
        let now_us = now_ms * 1000;
        let c = Counters::default();
        let req = ReportRequest {
            hops: vec![
                hop("shop", "cart", now_us),
                hop("prod", "payments", now_us),
                hop("shop", "payments", now_us),
                hop("shop", "", now_us),
                // The year 2508.
                hop("shop", "cart", 17_000_000_000_000_000),
            ],
            reporter_namespace: "shop".into(),
            reporter_service_account: "cart".into(),
            ..Default::default()
        };
        let sender = Sender::spiffe("spiffe://cluster.local/ns/shop/sa/cart");
        let a = admit(&Policy::default(), &sender, &req, now_ms, &c).unwrap();
        assert_eq!(a.hops.len(), 2);
        assert_eq!((a.refused_identity, a.refused_clock_skew), (2, 1));
        assert!(a
            .first_refusal
            .unwrap()
            .contains("hop 1: hop namespace \"prod\""));
        assert_eq!(c.hops_refused_identity.load(Relaxed), 2);
        assert_eq!(c.hops_refused_clock_skew.load(Relaxed), 1);

        // Without a peer nothing is compared, but the clock still is.
        let a = admit(&Policy::default(), &Sender::default(), &req, now_ms, &c).unwrap();
        assert_eq!(
            (a.hops.len(), a.refused_identity, a.refused_clock_skew),
            (4, 0, 1)
        );

        // A reporter that is not the peer: every hop is refused.
        let forged = ReportRequest {
            reporter_namespace: "prod".into(),
            ..req.clone()
        };
        let a = admit(&Policy::default(), &sender, &forged, now_ms, &c).unwrap();
        assert_eq!((a.hops.len(), a.refused_identity), (0, 5));

        // Nothing refused: the batch is borrowed, not copied.
        let ok = ReportRequest {
            hops: vec![hop("shop", "cart", now_us)],
            ..Default::default()
        };
        let a = admit(&Policy::default(), &sender, &ok, now_ms, &c).unwrap();
        assert!(matches!(a.hops, Cow::Borrowed(_)));
    }

    #[test]
    fn admit_refuses_senders() {
        let c = Counters::default();
        let req = ReportRequest::default();
        let p = Policy::default().with_token("tok").unwrap();
        let mut s = Sender::default();
        assert_eq!(
            admit(&p, &s, &req, 0, &c).unwrap_err(),
            Refusal::TokenMissing
        );
        s.token = Some(b"tik".to_vec());
        assert_eq!(admit(&p, &s, &req, 0, &c).unwrap_err(), Refusal::TokenWrong);
        s.token = Some(b"tok".to_vec());
        assert!(admit(&p, &s, &req, 0, &c).is_ok());
        assert_eq!(c.reports_refused_token.load(Relaxed), 2);

        let p = Policy {
            require_peer: true,
            ..Policy::default()
        };
        assert_eq!(
            admit(&p, &Sender::default(), &req, 0, &c).unwrap_err(),
            Refusal::IdentityMissing
        );
        let bad = Sender {
            xfcc: Some("URI=\"x".into()),
            token: None,
        };
        assert!(matches!(
            admit(&Policy::default(), &bad, &req, 0, &c),
            Err(Refusal::IdentityMalformed(_))
        ));
        let p = Policy {
            trust_domain: Some("example.org".into()),
            ..Policy::default()
        };
        let s = Sender::spiffe("spiffe://cluster.local/ns/shop/sa/cart");
        assert_eq!(
            admit(&p, &s, &req, 0, &c).unwrap_err().code(),
            tonic::Code::PermissionDenied
        );
        assert_eq!(c.reports_refused_identity.load(Relaxed), 3);
        // --peer-identity none ignores the header.
        let p = Policy {
            mode: PeerIdentityMode::None,
            ..Policy::default()
        };
        assert!(admit(&p, &bad, &req, 0, &c).unwrap().peer.is_none());
    }

    #[test]
    fn dropped_claims_are_bounded() {
        let c = Counters::default();
        let mut req = ReportRequest {
            dropped_since_last_batch: u64::MAX,
            ..Default::default()
        };
        let a = admit(&Policy::default(), &Sender::default(), &req, 0, &c).unwrap();
        assert_eq!(a.dropped, 0);
        assert_eq!(c.dropped_claims_implausible.load(Relaxed), 1);
        req.dropped_since_last_batch = 1_000;
        let a = admit(&Policy::default(), &Sender::default(), &req, 0, &c).unwrap();
        assert_eq!(a.dropped, 1_000);
        let total = AtomicU64::new(u64::MAX - 1);
        saturating_add(&total, 1_000);
        assert_eq!(total.load(Relaxed), u64::MAX);
    }
}
