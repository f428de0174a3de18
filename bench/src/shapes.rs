//! Traffic shapes of the filter benchmark: what the requests a sidecar sees carry.
//!
//! A mesh does not send one kind of request. Istio's default carries only `x-request-id`
//! (no tracer since 1.22), a Zipkin mesh B3 ids, an OpenTelemetry mesh W3C `traceparent`,
//! and every real mesh a few failures. Each shape is a `wrk` Lua script; the `fresh`
//! shapes make new random ids for every request (in wrk's LuaJIT, on the load CPU), so
//! the filter's correlation store and sampling meet what they meet in a cluster: every
//! request a new trace. `pool` is the older shape: 200 traces cycled, their inbound
//! requests sent first ("primed"), so outbound calls find what they belong to.

use std::fmt::Write as _;

use anyhow::{bail, Result};

/// The tag a caller's sidecar sends (the environment the chain runs in).
pub const RECEIVED_TAG: &str = "dev.proj1.alice";

/// Path of the requests a shape fails on purpose (the routes answer it 503).
pub const FAIL_PATH: &str = "/fail";

/// The gRPC method of the gRPC shape (any unary method: the benchmark's upstream serves
/// `hopwatch.v1.Collector/Report`).
pub const GRPC_PATH: &str = "/hopwatch.v1.Collector/Report";

/// The headers of the gRPC shape's calls (`name: value`, as h2load takes them).
pub fn grpc_headers(arrival: Arrival) -> Vec<String> {
    let mut h = vec![
        "content-type: application/grpc".to_string(),
        "te: trailers".to_string(),
        "x-request-id: 6f1d2c1e-8d3b-4c1a-9e7f-2b5a4c3d2e1f".to_string(),
        "x-b3-traceid: 4bf92f3577b34da6a3ce929d0e0e4736".to_string(),
        "x-b3-sampled: 1".to_string(),
    ];
    match arrival {
        Arrival::Inbound => {
            h.push("x-b3-spanid: 00f067aa0ba902b7".to_string());
            h.push(format!("x-virtual-env: {RECEIVED_TAG}"));
        }
        Arrival::Outbound => {
            h.push("x-b3-spanid: 53995c3f42cd8ad8".to_string());
            h.push("x-b3-parentspanid: 00f067aa0ba902b7".to_string());
        }
    }
    h
}

/// One traffic shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Shape {
    /// 200 traces (B3) cycled, primed through the inbound listener (the issue-6 shape).
    Pool,
    /// Fresh random B3 multi-header ids per request, sampled.
    B3,
    /// Fresh random W3C `traceparent` per request, sampled.
    W3c,
    /// Only a fresh `x-request-id` per request: Istio's default, no tracer.
    Untraced,
    /// B3 fresh ids, 1 % of the requests to a path the route answers 503.
    Mix,
    /// Unary gRPC calls over h2c (grpc-status in trailers), sent by h2load: the same
    /// B3 ids on every call (h2load repeats its headers). Proxied routes only.
    Grpc,
}

impl Shape {
    /// Every shape, in the order tables print them.
    pub const ALL: [Shape; 6] = [
        Shape::Pool,
        Shape::B3,
        Shape::W3c,
        Shape::Untraced,
        Shape::Mix,
        Shape::Grpc,
    ];

    /// Parses a shape name (`pool`, `b3`, `w3c`, `untraced`, `mix`).
    pub fn parse(name: &str) -> Result<Shape> {
        Ok(match name {
            "pool" => Shape::Pool,
            "b3" => Shape::B3,
            "w3c" => Shape::W3c,
            "untraced" => Shape::Untraced,
            "mix" => Shape::Mix,
            "grpc" => Shape::Grpc,
            other => bail!("unknown traffic shape {other:?} (pool, b3, w3c, untraced, mix, grpc)"),
        })
    }

    /// The name used on the command line and in tables.
    pub fn name(self) -> &'static str {
        match self {
            Shape::Pool => "pool",
            Shape::B3 => "b3",
            Shape::W3c => "w3c",
            Shape::Untraced => "untraced",
            Shape::Mix => "mix",
            Shape::Grpc => "grpc",
        }
    }

    /// A one-line description for table titles.
    pub fn describe(self) -> &'static str {
        match self {
            Shape::Pool => "pool (200 B3 traces cycled, inbound requests primed)",
            Shape::B3 => "b3 (fresh random B3 ids per request)",
            Shape::W3c => "w3c (fresh random traceparent per request)",
            Shape::Untraced => "untraced (only x-request-id: Istio's default, no tracer)",
            Shape::Mix => "mix (fresh B3 ids, 1% of requests answered 503)",
            Shape::Grpc => {
                "grpc (unary calls over h2c, grpc-status in trailers, h2load: constant B3 ids)"
            }
        }
    }

    /// Whether the shape runs on `route`: gRPC needs an upstream that answers with
    /// trailers, which a `direct_response` cannot.
    pub fn runs_on(self, route: &str) -> bool {
        self != Shape::Grpc || route.ends_with("proxied")
    }

    /// Whether the requests carry a trace context.
    pub fn traced(self) -> bool {
        !matches!(self, Shape::Untraced)
    }
}

/// Which side of a sidecar the generated requests arrive at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// From the caller's sidecar: the tag [`RECEIVED_TAG`] and the trace context.
    Inbound,
    /// From the app: the trace context propagated (a client span under the inbound
    /// one), the tag not copied.
    Outbound,
}

/// A wrk script sending `shape` requests with fresh ids (not [`Shape::Pool`], whose
/// script is [`crate::wrk::pool_script`]). `host` is the `:authority`.
pub fn fresh_script(shape: Shape, arrival: Arrival, host: &str, path: &str) -> String {
    let mut s = String::from(
        "-- hopwatch filter-bench traffic shape (generated): fresh random ids per request\n",
    );
    let _ = writeln!(s, "-- shape: {}, arrival: {arrival:?}", shape.name());
    s.push_str(
        r#"local hex = {"0","1","2","3","4","5","6","7","8","9","a","b","c","d","e","f"}
local random = math.random
local concat = table.concat
local function hexid(n)
  local t = {}
  for i = 1, n do t[i] = hex[random(16)] end
  -- never all zeros (an invalid id)
  t[n] = hex[random(15) + 1]
  return concat(t)
end
local function uuid()
  local a = hexid(32)
  return a:sub(1, 8) .. "-" .. a:sub(9, 12) .. "-4" .. a:sub(14, 16) .. "-a" .. a:sub(18, 20) .. "-" .. a:sub(21, 32)
end
local n = 0
function init(args)
  math.randomseed(os.time())
end
function request()
  n = n + 1
  local h = { ["Host"] = "HOST", ["user-agent"] = "bench-app/1.0", ["x-request-id"] = uuid() }
"#,
    );
    match shape {
        Shape::B3 | Shape::Mix | Shape::Pool | Shape::Grpc => {
            s.push_str("  h[\"x-b3-traceid\"] = hexid(32)\n");
            s.push_str("  h[\"x-b3-sampled\"] = \"1\"\n");
            match arrival {
                Arrival::Inbound => s.push_str("  h[\"x-b3-spanid\"] = hexid(16)\n"),
                Arrival::Outbound => {
                    s.push_str("  h[\"x-b3-spanid\"] = hexid(16)\n");
                    s.push_str("  h[\"x-b3-parentspanid\"] = hexid(16)\n");
                }
            }
        }
        Shape::W3c => {
            s.push_str(
                "  h[\"traceparent\"] = \"00-\" .. hexid(32) .. \"-\" .. hexid(16) .. \"-01\"\n",
            );
        }
        Shape::Untraced => {}
    }
    if arrival == Arrival::Inbound {
        let _ = writeln!(s, "  h[\"x-virtual-env\"] = \"{RECEIVED_TAG}\"");
    }
    let fail_every = if shape == Shape::Mix { 100 } else { 0 };
    let _ = writeln!(s, "  local p = \"PATH\"");
    if fail_every > 0 {
        let _ = writeln!(s, "  if n % {fail_every} == 0 then p = \"{FAIL_PATH}\" end");
    }
    s.push_str("  return wrk.format(\"GET\", p, h)\nend\n");
    s.replace("HOST", host).replace("PATH", path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for s in Shape::ALL {
            assert_eq!(Shape::parse(s.name()).unwrap(), s);
        }
        assert!(Shape::parse("h3").is_err());
    }

    #[test]
    fn untraced_carries_only_a_request_id() {
        let s = fresh_script(Shape::Untraced, Arrival::Outbound, "svc:80", "/x");
        assert!(s.contains("x-request-id"));
        assert!(!s.contains("x-b3-") && !s.contains("traceparent") && !s.contains("x-virtual-env"));
        assert!(s.contains("\"svc:80\"") && s.contains("\"/x\""));
    }

    #[test]
    fn inbound_requests_carry_the_tag_and_outbound_ones_a_parent_span() {
        let inb = fresh_script(Shape::B3, Arrival::Inbound, "svc:80", "/x");
        let out = fresh_script(Shape::B3, Arrival::Outbound, "svc:80", "/x");
        assert!(inb.contains(&format!("\"{RECEIVED_TAG}\"")) && !inb.contains("parentspanid"));
        assert!(out.contains("x-b3-parentspanid") && !out.contains("x-virtual-env"));
    }

    #[test]
    fn only_mix_fails_requests_and_w3c_sends_traceparent() {
        assert!(fresh_script(Shape::Mix, Arrival::Inbound, "h", "/x").contains(FAIL_PATH));
        assert!(!fresh_script(Shape::B3, Arrival::Inbound, "h", "/x").contains(FAIL_PATH));
        let w = fresh_script(Shape::W3c, Arrival::Inbound, "h", "/x");
        assert!(w.contains("traceparent") && !w.contains("x-b3-"));
    }
}
