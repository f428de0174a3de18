//! POLICY_DENIED: a request a policy refused before it was routed (RBAC, JWT, ext_authz,
//! a fault abort, a local rate limit), recognised from the refusing sidecar's response
//! code details.
//!
//! Istio puts those filters before any EnvoyFilter inserted before the router, so the
//! hopwatch filter never sees such a request on its request path; Envoy still calls its
//! `on_log`, and the hop arrives marked `answered_before_filter`. The code details say
//! which filter answered and, for RBAC, which policy (Istio names RBAC policies
//! `ns[<namespace>]-policy[<AuthorizationPolicy>]-rule[<n>]`).
//!
//! Severity: WARNING. A policy did what it was configured to do; whether that was meant is
//! for the operator to decide, and the finding says which object to look at. (A denied
//! request is not an outage of the mesh, unlike UPSTREAM_FAILURE.)
//!
//! `workload` is the sidecar that refused; `peer` is the caller for an inbound refusal
//! (an AuthorizationPolicy on the callee) and the callee for an outbound one (a
//! VirtualService fault is applied by the caller's sidecar).

use hopwatch_proto::v1::{BreakKind, Severity};

use crate::analysis::{Finding, Node};
use crate::model::{CHop, Interner};

/// Which kind of policy refused a request, from Envoy's response code details.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Policy {
    /// `rbac_access_denied_matched_policy[NAME]` (NAME `none`: no ALLOW policy matched).
    Rbac(String),
    /// `jwt_authn_access_denied{REASON}`.
    Jwt(String),
    /// `ext_authz_denied` / `ext_authz_error`.
    ExtAuthz(String),
    /// `fault_filter_abort`.
    FaultAbort,
    /// `local_rate_limited` / `request_rate_limited`.
    RateLimit(String),
}

impl Policy {
    /// Recognises the code details of a policy refusal.
    pub fn of(details: &str) -> Option<Policy> {
        let d = details.trim();
        if let Some(rest) = d.strip_prefix("rbac_access_denied_matched_policy[") {
            let name = rest.strip_suffix(']').unwrap_or(rest);
            return Some(Policy::Rbac(name.to_string()));
        }
        if d.starts_with("rbac_access_denied") {
            return Some(Policy::Rbac(String::new()));
        }
        if let Some(rest) = d.strip_prefix("jwt_authn_access_denied") {
            let reason = rest.trim_start_matches('{').trim_end_matches('}');
            return Some(Policy::Jwt(reason.replace('_', " ")));
        }
        if d.starts_with("ext_authz_denied") || d.starts_with("ext_authz_error") {
            return Some(Policy::ExtAuthz(d.to_string()));
        }
        if d == "fault_filter_abort" {
            return Some(Policy::FaultAbort);
        }
        if d == "local_rate_limited" || d == "request_rate_limited" {
            return Some(Policy::RateLimit(d.to_string()));
        }
        None
    }

    /// How the refusal is named in a summary.
    pub fn describe(&self) -> String {
        match self {
            Policy::Rbac(name) if name.is_empty() || name == "none" => {
                "RBAC (no ALLOW policy matched)".to_string()
            }
            Policy::Rbac(name) => format!("RBAC policy {name}"),
            Policy::Jwt(reason) if reason.is_empty() => "JWT authentication".to_string(),
            Policy::Jwt(reason) => format!("JWT authentication ({reason})"),
            Policy::ExtAuthz(d) => format!("external authorization ({d})"),
            Policy::FaultAbort => "a fault injection abort".to_string(),
            Policy::RateLimit(d) => format!("a rate limit ({d})"),
        }
    }

    /// Which Istio object to look at.
    pub fn hint(&self, namespace: &str, workload: &str) -> String {
        match self {
            Policy::Rbac(name) => match istio_policy_name(name) {
                Some((ns, policy)) => format!(
                    "Check the AuthorizationPolicy {policy} in namespace {ns} (kubectl get authorizationpolicy -n {ns} {policy} -o yaml): its rules refused this caller; if the request should pass, add an ALLOW rule for the caller's principal / path, or narrow the DENY rule"
                ),
                None => format!(
                    "Check the AuthorizationPolicies that select {workload} in namespace {namespace} and the root namespace (kubectl get authorizationpolicy -A): with any ALLOW policy in place, a request no rule allows is denied"
                ),
            },
            Policy::Jwt(_) => format!(
                "Check the RequestAuthentication of {workload} (issuer, jwksUri, audiences) and the token the caller sends; an AuthorizationPolicy with requestPrincipals then decides who may pass"
            ),
            Policy::ExtAuthz(_) => format!(
                "The external authorizer refused the request: check the AuthorizationPolicy with action CUSTOM selecting {workload}, its provider in the mesh config (extensionProviders) and the authorizer's own logs"
            ),
            Policy::FaultAbort => format!(
                "A fault injection is active: check the VirtualService of the destination for http[].fault.abort (remove it when the test is over); applied by {workload}'s sidecar"
            ),
            Policy::RateLimit(_) => format!(
                "A rate limit refused the request: check the EnvoyFilter (local_ratelimit) or the global rate limit service configured for {workload}, and the caller's request rate"
            ),
        }
    }
}

/// `ns[NS]-policy[NAME]-rule[N]` (Istio's RBAC policy names) -> (NS, NAME).
pub fn istio_policy_name(name: &str) -> Option<(&str, &str)> {
    let rest = name.strip_prefix("ns[")?;
    let (ns, rest) = rest.split_once("]-policy[")?;
    let (policy, _) = rest.rsplit_once("]-rule[")?;
    Some((ns, policy))
}

/// The policy that refused this hop's request, if one did.
pub fn denial(h: &CHop, it: &Interner) -> Option<Policy> {
    if h.code_details.is_empty() {
        return None;
    }
    Policy::of(it.resolve(h.code_details))
}

/// One finding per refused hop. `caller[i]` is the outbound hop that sent inbound hop
/// `i` (`u32::MAX`: none); `dest` names an outbound hop's destination.
pub fn detect(
    hops: &[CHop],
    nodes: &[Node],
    caller: &[u32],
    it: &Interner,
    dest: &dyn Fn(&CHop) -> String,
    seen_ms: &dyn Fn(&CHop) -> u64,
) -> Vec<(u32, Finding)> {
    let mut out = Vec::new();
    for (nid, node) in nodes.iter().enumerate() {
        // The deepest refusal of the call: the callee's inbound sidecar, else the caller's
        // outbound one.
        for h in [node.inb, node.out].into_iter().flatten() {
            let hh = &hops[h as usize];
            let Some(policy) = denial(hh, it) else {
                continue;
            };
            let workload = it.resolve(hh.workload);
            let namespace = it.resolve(hh.namespace);
            let (peer, whom) = if hh.is_inbound() {
                let c = caller.get(h as usize).copied().unwrap_or(u32::MAX);
                let peer = hops
                    .get(c as usize)
                    .map(|o| it.resolve(o.workload).to_string())
                    .unwrap_or_default();
                let whom = if peer.is_empty() {
                    "a caller outside the mesh".to_string()
                } else {
                    peer.clone()
                };
                (peer, format!("the request from {whom}"))
            } else {
                let peer = dest(hh);
                (peer.clone(), format!("{workload}'s call to {peer}"))
            };
            let side = if hh.is_inbound() {
                "inbound"
            } else {
                "outbound"
            };
            let response = crate::grpc::describe_response(hh, it.resolve(hh.grpc_message));
            out.push((
                nid as u32,
                Finding {
                    kind: BreakKind::PolicyDenied,
                    severity: Severity::Warning,
                    workload: workload.to_string(),
                    namespace: namespace.to_string(),
                    peer,
                    flags: crate::model::flag_names(hh.response_flags),
                    summary: format!(
                        "The {side} sidecar of {workload} refused {whom} before routing it: {response} by {}",
                        policy.describe()
                    ),
                    hint: policy.hint(namespace, workload),
                    seen_ms: seen_ms(hh),
                },
            ));
            break;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_details_name_the_policy() {
        assert_eq!(
            Policy::of("rbac_access_denied_matched_policy[ns[shop]-policy[deny-cart]-rule[0]]"),
            Some(Policy::Rbac("ns[shop]-policy[deny-cart]-rule[0]".into()))
        );
        assert_eq!(
            Policy::of("rbac_access_denied_matched_policy[none]"),
            Some(Policy::Rbac("none".into()))
        );
        assert_eq!(
            Policy::of("jwt_authn_access_denied{Jwt_is_missing}"),
            Some(Policy::Jwt("Jwt is missing".into()))
        );
        assert!(matches!(
            Policy::of("ext_authz_denied"),
            Some(Policy::ExtAuthz(_))
        ));
        assert_eq!(Policy::of("fault_filter_abort"), Some(Policy::FaultAbort));
        assert!(matches!(
            Policy::of("local_rate_limited"),
            Some(Policy::RateLimit(_))
        ));
        for other in [
            "via_upstream",
            "upstream_reset_before_response_started{remote_connection_failure}",
            "no_healthy_upstream",
            "route_not_found",
            "",
        ] {
            assert_eq!(Policy::of(other), None, "{other}");
        }
    }

    #[test]
    fn hints_name_the_istio_object() {
        let p = Policy::Rbac("ns[shop]-policy[deny-cart]-rule[0]".into());
        assert_eq!(
            p.describe(),
            "RBAC policy ns[shop]-policy[deny-cart]-rule[0]"
        );
        let h = p.hint("shop", "cart");
        assert!(
            h.contains("AuthorizationPolicy deny-cart in namespace shop"),
            "{h}"
        );
        assert!(Policy::Rbac("none".into())
            .hint("shop", "cart")
            .contains("AuthorizationPolicies that select cart"));
        assert!(Policy::Jwt(String::new())
            .hint("shop", "cart")
            .contains("RequestAuthentication"));
        assert!(Policy::FaultAbort
            .hint("shop", "frontend")
            .contains("VirtualService"));
        assert!(Policy::ExtAuthz("ext_authz_denied".into())
            .hint("shop", "cart")
            .contains("CUSTOM"));
        assert_eq!(
            istio_policy_name("ns[a-b]-policy[x]-rule[12]"),
            Some(("a-b", "x"))
        );
        assert_eq!(istio_policy_name("my-own-policy"), None);
    }
}
