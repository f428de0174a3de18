//! Plugin configuration: the JSON object given as the plugin configuration (Envoy
//! `StringValue`, or Istio WasmPlugin `pluginConfig`).
//!
//! Keys and defaults follow `CONTRACT.md`; a few tuning knobs (batching, correlation
//! store, tick period) are added with safe defaults. Unknown keys are refused
//! (`deny_unknown_fields`) and every validation error names the offending field, so a
//! typo in a manifest shows up as one log line in Envoy and a refused configuration.
//!
//! Parsed with `serde_json` (lists such as `tag_aliases` and strings with escapes need a
//! real JSON parser). serde_json's messages for a wrong type or value give only a line
//! and column, so [`key_at`] finds the top-level key whose value holds that position
//! (a few lines of scanning, where a path-tracking deserializer wrapper cost ~12 KB of
//! the module).

use serde::Deserialize;

/// Which side of the sidecar this plugin instance runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// SIDECAR_INBOUND: requests arriving at this workload.
    Inbound,
    /// SIDECAR_OUTBOUND: requests the workload's app sends.
    Outbound,
}

impl Direction {
    /// `inbound` / `outbound`.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        }
    }
}

/// When to append the annotation header to responses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Annotate {
    /// Never annotate.
    Never,
    /// When Envoy set response flags or the status is 5xx.
    OnError,
    /// Every response.
    Always,
    /// Only when the request carried `debug_header`.
    Debug,
}

/// One more place a request may carry the tag (`tag_aliases`), parsed from
/// `"header:NAME"`, `"cookie:NAME"` or `"baggage:KEY"` when the configuration is read.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum TagAlias {
    /// Another request header (lowercase name).
    Header(String),
    /// A cookie of the `cookie` request headers.
    Cookie(String),
    /// A member of the W3C `baggage` request headers.
    Baggage(String),
}

/// Most entries accepted in `tag_aliases` and `correlation_headers` (each one is looked
/// for on every request).
pub const MAX_ALIASES: usize = 8;

/// An RFC 7230 token (cookie names, baggage keys): visible ASCII without separators.
pub fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 256
        && s.bytes().all(|b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'!' | b'#'
                        | b'$'
                        | b'%'
                        | b'&'
                        | b'\''
                        | b'*'
                        | b'+'
                        | b'-'
                        | b'.'
                        | b'^'
                        | b'_'
                        | b'`'
                        | b'|'
                        | b'~'
                )
        })
}

impl TryFrom<String> for TagAlias {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        let (kind, name) = s.split_once(':').ok_or_else(|| {
            format!("{s:?}: expected \"header:NAME\", \"cookie:NAME\" or \"baggage:KEY\"")
        })?;
        match kind {
            "header" if is_valid_header_name(name) => Ok(TagAlias::Header(name.into())),
            "header" => Err(format!(
                "{s:?}: the header name must be a non-empty lowercase HTTP header name"
            )),
            "cookie" if is_token(name) => Ok(TagAlias::Cookie(name.into())),
            "cookie" => Err(format!(
                "{s:?}: the cookie name must be a non-empty token (no spaces, `=`, `;`, quotes)"
            )),
            "baggage" if is_token(name) => Ok(TagAlias::Baggage(name.into())),
            "baggage" => Err(format!(
                "{s:?}: the baggage key must be a non-empty token (no spaces, `=`, `,`, `;`)"
            )),
            _ => Err(format!(
                "{s:?}: unknown alias kind {kind:?} (expected header, cookie or baggage)"
            )),
        }
    }
}

/// The parsed and validated plugin configuration.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginConfig {
    /// `inbound` or `outbound` (required).
    pub direction: Direction,
    /// The virtual-environment header.
    #[serde(default = "d_tag_header")]
    pub tag_header: String,
    /// Env var holding this workload's own tag.
    #[serde(default = "d_tag_env_var")]
    pub tag_env_var: String,
    /// Pod label (from `xds.node.metadata.LABELS`) used when the env var is unset.
    #[serde(default = "d_tag_label")]
    pub tag_label: String,
    /// Envoy cluster (HTTP/2) of the collector.
    #[serde(default = "d_collector_cluster")]
    pub collector_cluster: String,
    /// `:authority` of report calls; default: derived from `collector_cluster`
    /// (`outbound|9090||host` gives `host:9090`, a plain name is used as is).
    #[serde(default)]
    pub collector_authority: Option<String>,
    /// When to annotate responses.
    #[serde(default = "d_annotate")]
    pub annotate_response: Annotate,
    /// Response header carrying hop annotations.
    #[serde(default = "d_annotation_header")]
    pub annotation_header: String,
    /// Request header that turns annotation on in `debug` mode.
    #[serde(default = "d_debug_header")]
    pub debug_header: String,
    /// Fraction of traces whose hops are all reported, in `[0, 1]`.
    #[serde(default = "d_rate")]
    pub report_sample_rate: f64,
    /// Tick period of the root context (batch flush), milliseconds.
    #[serde(default = "d_tick")]
    pub tick_period_ms: u32,
    /// Hops per `ReportRequest`; a full batch is flushed without waiting for the tick.
    #[serde(default = "d_batch")]
    pub batch_size: usize,
    /// Per-worker queue bound; further hops are dropped and counted.
    #[serde(default = "d_queue")]
    pub queue_limit: usize,
    /// Concurrent report calls per worker; while at the limit, hops stay queued.
    #[serde(default = "d_inflight")]
    pub max_in_flight: usize,
    /// Timeout of one report call, milliseconds.
    #[serde(default = "d_timeout")]
    pub report_timeout_ms: u32,
    /// How long an inbound request's correlation ids are remembered, seconds.
    #[serde(default = "d_ttl")]
    pub correlation_ttl_secs: u32,
    /// With `correlation_bucket_entries`, the size of the correlation store: `buckets *
    /// bucket_entries` one-id slots (the product must be equal on the inbound and outbound
    /// side; the names are those of the bucketed layout it replaced). Each inbound request
    /// remembers up to 3 ids, so at R inbound requests/s an id survives about
    /// `slots / (3 R)` seconds on average (at most the TTL): 64 x 64 keeps ~1.4 s of
    /// history at 1000 req/s, ~14 s at 100 req/s, for ~330 KB of shared data and one
    /// ~80-byte write per id.
    #[serde(default = "d_buckets")]
    pub correlation_buckets: u32,
    /// See `correlation_buckets` (the two multiply).
    #[serde(default = "d_bucket_entries")]
    pub correlation_bucket_entries: u32,
    /// A W3C `baggage` member carrying the tag, read when the tag header is absent and
    /// written with every tag the filter stamps or restores; empty: off.
    #[serde(default)]
    pub tag_baggage_key: String,
    /// More places the tag may be, tried in order when the tag header is absent.
    #[serde(default)]
    pub tag_aliases: Vec<TagAlias>,
    /// Request headers whose exact value identifies one call chain, used as
    /// correlation ids like `x-request-id`.
    #[serde(default)]
    pub correlation_headers: Vec<String>,
    /// Whether responses to callers that are not mesh peers may carry
    /// `annotation_header`, and whether their `debug_header` is honoured (see
    /// [`crate::peer`] for who is a mesh peer). Default false: nothing leaks outside.
    #[serde(default)]
    pub annotate_external: bool,
    /// Sent as gRPC initial metadata `x-hopwatch-report-token` on every report call
    /// (empty: none). A secret: never logged, redacted from `Debug`.
    #[serde(default)]
    pub report_token: Secret,
}

/// The most hops one `ReportRequest` may carry: the collector refuses bigger batches
/// (its `max_batch_hops`), so a larger `batch_size` would lose whole batches.
pub const MAX_BATCH_HOPS: usize = 5000;

/// A configuration string that must never appear in a log line: its `Debug` prints
/// `<redacted>` (the config is `Debug`), and no error message quotes it.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_empty() {
            "\"\""
        } else {
            "<redacted>"
        })
    }
}

impl Secret {
    /// The secret value.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

fn d_tag_header() -> String {
    "x-virtual-env".into()
}
fn d_tag_env_var() -> String {
    "VIRTUAL_ENVIRONMENT_TAG".into()
}
fn d_tag_label() -> String {
    "virtual-env".into()
}
fn d_collector_cluster() -> String {
    "hopwatch-collector".into()
}
fn d_annotate() -> Annotate {
    Annotate::OnError
}
fn d_annotation_header() -> String {
    "x-hopwatch".into()
}
fn d_debug_header() -> String {
    "x-hopwatch-debug".into()
}
fn d_rate() -> f64 {
    1.0
}
fn d_tick() -> u32 {
    1000
}
fn d_batch() -> usize {
    200
}
/// ~1 KB per queued hop: at most ~4 MB per worker while the collector is slow or
/// down, and ~0.2 s of hops at 20,000 reported hops/s per worker.
fn d_queue() -> usize {
    4000
}
fn d_inflight() -> usize {
    4
}
fn d_timeout() -> u32 {
    5000
}
fn d_ttl() -> u32 {
    60
}
fn d_buckets() -> u32 {
    64
}
fn d_bucket_entries() -> u32 {
    64
}

/// Why a configuration was refused. The message always names the field.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    /// Not JSON, unknown key, missing `direction`, wrong type: the message names the
    /// key (e.g. "unknown field `tag_headr`", "field `report_sample_rate`: invalid type").
    #[error("invalid hopwatch plugin configuration: {0}")]
    Json(String),
    /// A value out of range or malformed.
    #[error("invalid hopwatch plugin configuration: field `{field}`: {reason}")]
    Invalid {
        /// The configuration key.
        field: &'static str,
        /// What is wrong with its value.
        reason: String,
    },
}

impl ConfigError {
    /// The offending field, when known.
    pub fn field(&self) -> Option<&str> {
        match self {
            ConfigError::Invalid { field, .. } => Some(field),
            ConfigError::Json(m) => m.split('`').nth(1),
        }
    }
}

/// A serde_json error, with the key it is about in front when serde's message does not
/// already name it (type errors only give a line and column).
fn json_error(bytes: &[u8], e: serde_json::Error) -> ConfigError {
    let key = match e.classify() {
        // A wrong type or value, or bad JSON inside a value (`"direction":1` on an enum
        // is reported as "expected value"): name the key whose value it is.
        serde_json::error::Category::Data | serde_json::error::Category::Syntax => {
            key_at(bytes, e.line(), e.column())
        }
        _ => None,
    };
    let inner = e.to_string();
    match key {
        Some(k) if !inner.contains(&format!("`{k}`")) => {
            ConfigError::Json(format!("field `{k}`: {inner}"))
        }
        _ => ConfigError::Json(inner),
    }
}

/// The top-level key of the JSON object in `bytes` whose value contains the position
/// (`line`, `column`: one-based, as serde_json reports them). Strings and nesting are
/// tracked, so a `:` or a quote inside a value or a nested list does not mislead it.
pub fn key_at(bytes: &[u8], line: usize, column: usize) -> Option<String> {
    let mut offset = 0usize;
    for _ in 1..line {
        let nl = bytes.get(offset..)?.iter().position(|&b| b == b'\n')?;
        offset += nl + 1;
    }
    let end = offset.saturating_add(column).min(bytes.len());
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    let (mut string_start, mut last_string, mut key) = (0usize, None, None);
    for (i, &b) in bytes.get(..end)?.iter().enumerate() {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => {
                    in_string = false;
                    last_string = (depth == 1).then_some((string_start, i));
                }
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => {
                in_string = true;
                string_start = i + 1;
            }
            b'{' | b'[' => depth += 1,
            b'}' | b']' => depth = depth.saturating_sub(1),
            b':' if depth == 1 => key = last_string,
            b' ' | b'\t' | b'\r' | b'\n' => {}
            _ => last_string = None,
        }
    }
    let (a, z) = key?;
    bytes
        .get(a..z)
        .and_then(|k| std::str::from_utf8(k).ok())
        .map(str::to_string)
}

fn invalid(field: &'static str, reason: &str) -> ConfigError {
    ConfigError::Invalid {
        field,
        reason: reason.into(),
    }
}

/// A valid HTTP header name as Envoy stores it: non-empty, lowercase token characters.
pub fn is_valid_header_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 256
        && name.bytes().all(|b| {
            b.is_ascii_lowercase()
                || b.is_ascii_digit()
                || matches!(
                    b,
                    b'!' | b'#'
                        | b'$'
                        | b'%'
                        | b'&'
                        | b'\''
                        | b'*'
                        | b'+'
                        | b'-'
                        | b'.'
                        | b'^'
                        | b'_'
                        | b'`'
                        | b'|'
                        | b'~'
                )
        })
}

/// A valid `:authority` value: host characters and an optional port.
fn is_valid_authority(a: &str) -> bool {
    !a.is_empty()
        && a.len() <= 255
        && a.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b':' | b'[' | b']')
        })
}

impl PluginConfig {
    /// The `:authority` of report calls (see `collector_authority`).
    pub fn authority(&self) -> String {
        if let Some(a) = &self.collector_authority {
            return a.clone();
        }
        let c = &self.collector_cluster;
        let parts: Vec<&str> = c.split('|').collect();
        if let [_, port, _, host] = parts.as_slice() {
            if is_valid_authority(host) {
                let mut a = (*host).to_string();
                if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) {
                    a.push(':');
                    a.push_str(port);
                }
                return a;
            }
        }
        if is_valid_authority(c) {
            c.clone()
        } else {
            "hopwatch-collector".into()
        }
    }

    /// Parses and validates the plugin configuration (JSON bytes).
    pub fn parse(bytes: &[u8]) -> Result<PluginConfig, ConfigError> {
        let mut de = serde_json::Deserializer::from_slice(bytes);
        let cfg = PluginConfig::deserialize(&mut de).map_err(|e| json_error(bytes, e))?;
        // Trailing characters after the object.
        de.end().map_err(|e| ConfigError::Json(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks value ranges and header names.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (field, v) in [
            ("tag_header", &self.tag_header),
            ("annotation_header", &self.annotation_header),
            ("debug_header", &self.debug_header),
        ] {
            if !is_valid_header_name(v) {
                return Err(invalid(
                    field,
                    "must be a non-empty lowercase HTTP header name",
                ));
            }
        }
        if self.tag_env_var.is_empty()
            || !self
                .tag_env_var
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_')
        {
            return Err(invalid(
                "tag_env_var",
                "must be a non-empty environment variable name ([A-Za-z0-9_])",
            ));
        }
        if self.tag_label.is_empty() || self.tag_label.len() > 317 {
            return Err(invalid("tag_label", "must be a non-empty label key"));
        }
        if self.collector_cluster.is_empty() || self.collector_cluster.len() > 1024 {
            return Err(invalid(
                "collector_cluster",
                "must be a non-empty Envoy cluster name",
            ));
        }
        if let Some(a) = &self.collector_authority {
            if !is_valid_authority(a) {
                return Err(invalid(
                    "collector_authority",
                    "must be a host name with an optional port",
                ));
            }
        }
        if !(self.report_sample_rate >= 0.0 && self.report_sample_rate <= 1.0) {
            return Err(invalid("report_sample_rate", "must be within [0, 1]"));
        }
        if !(10..=60_000).contains(&self.tick_period_ms) {
            return Err(invalid("tick_period_ms", "must be within [10, 60000]"));
        }
        if !(1..=MAX_BATCH_HOPS).contains(&self.batch_size) {
            return Err(invalid(
                "batch_size",
                "must be within [1, 5000] (the collector refuses a report of more than 5000 hops)",
            ));
        }
        if self.queue_limit < self.batch_size || self.queue_limit > 100_000 {
            return Err(invalid(
                "queue_limit",
                "must be within [batch_size, 100000]",
            ));
        }
        if !(1..=64).contains(&self.max_in_flight) {
            return Err(invalid("max_in_flight", "must be within [1, 64]"));
        }
        if !(100..=600_000).contains(&self.report_timeout_ms) {
            return Err(invalid("report_timeout_ms", "must be within [100, 600000]"));
        }
        if !(1..=86_400).contains(&self.correlation_ttl_secs) {
            return Err(invalid("correlation_ttl_secs", "must be within [1, 86400]"));
        }
        if !(1..=1024).contains(&self.correlation_buckets) {
            return Err(invalid("correlation_buckets", "must be within [1, 1024]"));
        }
        if !(1..=1024).contains(&self.correlation_bucket_entries) {
            return Err(invalid(
                "correlation_bucket_entries",
                "must be within [1, 1024]",
            ));
        }
        let token = self.report_token.expose();
        // A header value: visible ASCII (the value itself is never quoted in the error).
        if token.len() > 4096 || !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(invalid(
                "report_token",
                "must be at most 4096 visible ASCII characters (no spaces or control characters)",
            ));
        }
        if !self.tag_baggage_key.is_empty() && !is_token(&self.tag_baggage_key) {
            return Err(invalid(
                "tag_baggage_key",
                "must be empty (off) or a W3C baggage key (a token: no spaces, `=`, `,`, `;`)",
            ));
        }
        if self.tag_aliases.len() > MAX_ALIASES {
            return Err(invalid("tag_aliases", "at most 8 entries"));
        }
        for a in &self.tag_aliases {
            if *a == TagAlias::Header(self.tag_header.clone()) {
                return Err(invalid(
                    "tag_aliases",
                    "an alias \"header:NAME\" must name another header than tag_header",
                ));
            }
        }
        if self.correlation_headers.len() > MAX_ALIASES {
            return Err(invalid("correlation_headers", "at most 8 entries"));
        }
        for h in &self.correlation_headers {
            if !is_valid_header_name(h) {
                return Err(invalid(
                    "correlation_headers",
                    "every entry must be a non-empty lowercase HTTP header name",
                ));
            }
            if *h == self.tag_header {
                return Err(invalid(
                    "correlation_headers",
                    "must not contain tag_header (the tag is not a call-chain id)",
                ));
            }
        }
        Ok(())
    }
}
