//! The traffic capture rules Istio's init container (`istio-iptables`, the default
//! `REDIRECT` mode) installs in a pod's network namespace, as an `iptables-restore` file.
//!
//! - Inbound: every TCP connection to the pod is redirected to Envoy's `virtualInbound`
//!   (15006), except the ports Istio itself excludes (15008 HBONE, 15090 Prometheus,
//!   15021 health, 15020 agent) and the pod's `traffic.sidecar.istio.io/excludeInboundPorts`.
//! - Outbound: every TCP connection the app opens is redirected to `virtualOutbound`
//!   (15001), except Envoy's own (uid/gid 1337), loopback traffic, and the inbound side's
//!   connections to the app, which Envoy makes from 127.0.0.6 so they are not captured again.

/// Envoy's uid and gid in the istio-proxy container (excluded from outbound capture).
pub const PROXY_UID: u32 = 1337;
/// `virtualOutbound`.
pub const OUTBOUND_CAPTURE_PORT: u16 = 15001;
/// `virtualInbound`.
pub const INBOUND_CAPTURE_PORT: u16 = 15006;
/// Ports `istio-iptables` never captures inbound (HBONE, Prometheus, health, agent).
pub const ISTIO_EXCLUDED_INBOUND: [u16; 4] = [15008, 15090, 15021, 15020];

/// The `iptables-restore` input of one pod; `exclude_inbound` are the ports of its
/// `excludeInboundPorts` annotation.
pub fn iptables_rules(exclude_inbound: &[u16]) -> String {
    let uid = PROXY_UID;
    let mut r = String::from(
        "# Istio's capture rules (istio-iptables, REDIRECT mode), written by hopwatch-mesh.\n\
         *nat\n\
         :ISTIO_INBOUND - [0:0]\n\
         :ISTIO_IN_REDIRECT - [0:0]\n\
         :ISTIO_OUTPUT - [0:0]\n\
         :ISTIO_REDIRECT - [0:0]\n\
         -A PREROUTING -p tcp -j ISTIO_INBOUND\n\
         -A OUTPUT -p tcp -j ISTIO_OUTPUT\n",
    );
    for port in ISTIO_EXCLUDED_INBOUND.iter().chain(exclude_inbound) {
        r.push_str(&format!(
            "-A ISTIO_INBOUND -p tcp --dport {port} -j RETURN\n"
        ));
    }
    r.push_str(&format!(
        "-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT\n\
         -A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports {INBOUND_CAPTURE_PORT}\n\
         -A ISTIO_OUTPUT -s 127.0.0.6/32 -o lo -j RETURN\n\
         -A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -p tcp -m owner --uid-owner {uid} -j ISTIO_IN_REDIRECT\n\
         -A ISTIO_OUTPUT -o lo -m owner ! --uid-owner {uid} -j RETURN\n\
         -A ISTIO_OUTPUT -m owner --uid-owner {uid} -j RETURN\n\
         -A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -p tcp -m owner --gid-owner {uid} -j ISTIO_IN_REDIRECT\n\
         -A ISTIO_OUTPUT -o lo -m owner ! --gid-owner {uid} -j RETURN\n\
         -A ISTIO_OUTPUT -m owner --gid-owner {uid} -j RETURN\n\
         -A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN\n\
         -A ISTIO_OUTPUT -j ISTIO_REDIRECT\n\
         -A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports {OUTBOUND_CAPTURE_PORT}\n\
         COMMIT\n"
    ));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_redirect_both_ways_and_exclude_envoy_and_the_excluded_ports() {
        let rules = iptables_rules(&[8081]);
        assert!(rules.contains("-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006"));
        assert!(rules.contains("-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001"));
        assert!(rules.contains("-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN"));
        assert!(rules.contains("-A ISTIO_INBOUND -p tcp --dport 8081 -j RETURN"));
        assert!(rules.contains("-A ISTIO_INBOUND -p tcp --dport 15021 -j RETURN"));
        // Exclusions come before the catch-all redirect.
        let exclusion = rules.find("--dport 8081").unwrap_or(usize::MAX);
        let catch_all = rules.find("-j ISTIO_IN_REDIRECT\n").unwrap_or(0);
        assert!(exclusion < catch_all);
        assert!(rules.trim_end().ends_with("COMMIT"));
    }
}
