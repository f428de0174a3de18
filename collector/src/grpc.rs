//! gRPC status codes as the detectors use them: names, which codes are server-side
//! errors, how a failure is worded, and the hints that depend on the code.
//!
//! Why a module: a gRPC failure is an HTTP 200 whose `grpc-status` is not OK, so every
//! detector that asks "did this hop fail, and how do I say it" needs the same answers.

use crate::model::CHop;

/// The canonical name of a gRPC status code.
pub fn code_name(code: u32) -> &'static str {
    match code {
        0 => "OK",
        1 => "CANCELLED",
        2 => "UNKNOWN",
        3 => "INVALID_ARGUMENT",
        4 => "DEADLINE_EXCEEDED",
        5 => "NOT_FOUND",
        6 => "ALREADY_EXISTS",
        7 => "PERMISSION_DENIED",
        8 => "RESOURCE_EXHAUSTED",
        9 => "FAILED_PRECONDITION",
        10 => "ABORTED",
        11 => "OUT_OF_RANGE",
        12 => "UNIMPLEMENTED",
        13 => "INTERNAL",
        14 => "UNAVAILABLE",
        15 => "DATA_LOSS",
        16 => "UNAUTHENTICATED",
        _ => "UNKNOWN_CODE",
    }
}

/// Codes that mean "the server failed" (the gRPC analogue of a 5xx): UNKNOWN,
/// DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS. The others
/// (INVALID_ARGUMENT, NOT_FOUND, PERMISSION_DENIED, ...) are answers about the request,
/// like a 4xx: not errors of the service.
pub fn is_server_error(code: u32) -> bool {
    matches!(code, 2 | 4 | 12 | 13 | 14 | 15)
}

/// The hop answered a server-side error: an HTTP 5xx, or a gRPC server error status.
pub fn hop_server_error(h: &CHop) -> bool {
    h.response_code >= 500 || h.grpc().is_some_and(is_server_error)
}

/// How a hop's response is worded in a summary: `503`, or for gRPC
/// `gRPC UNAVAILABLE (14, HTTP 200)`, with the gRPC message when there is one.
pub fn describe_response(h: &CHop, message: &str) -> String {
    let http = if h.response_code == 0 {
        "no response".to_string()
    } else {
        h.response_code.to_string()
    };
    match h.grpc() {
        Some(g) => {
            let msg = if message.is_empty() {
                String::new()
            } else {
                format!(" {message:?}")
            };
            format!("gRPC {} ({g}, HTTP {http}){msg}", code_name(g))
        }
        None => http,
    }
}

/// A hint specific to a gRPC code and the flags Envoy set, when there is one: what the
/// code means for that flag (UNAVAILABLE with UF vs UH vs URX, DEADLINE_EXCEEDED with or
/// without UT). `None`: the flag hints alone say it.
pub fn code_hint(code: u32, flags: &[String], peer: &str) -> Option<String> {
    let has = |f: &str| flags.iter().any(|x| x == f);
    match code {
        14 if has("UH") => Some(format!(
            "gRPC UNAVAILABLE from the sidecar itself (UH): no endpoint of {peer} was ready, the call never reached an app; a gRPC client retries UNAVAILABLE, so look at the endpoints (kubectl get endpoints, DestinationRule subsets), not at the app's code"
        )),
        14 if has("UF") => Some(format!(
            "gRPC UNAVAILABLE from the sidecar itself (UF): {peer}'s port refused the connection; check that its gRPC server listens on 0.0.0.0 on the target port and that the Service port is named grpc-*"
        )),
        14 if has("URX") => Some(format!(
            "gRPC UNAVAILABLE after retries (URX): every attempt to {peer} failed; look at the deeper hops of this trace for the first failure"
        )),
        14 if has("UC") || has("UR") => Some(format!(
            "gRPC UNAVAILABLE, connection reset ({}): often an HTTP/1.1 vs HTTP/2 mismatch (a gRPC port not named grpc-* or http2-*) or an mTLS mismatch towards {peer}",
            flags.join(",")
        )),
        4 if has("UT") => Some(format!(
            "gRPC DEADLINE_EXCEEDED from the sidecar (UT): the route timeout fired before {peer} answered; raise the VirtualService timeout or speed up {peer}"
        )),
        4 => Some(format!(
            "gRPC DEADLINE_EXCEEDED without UT: the client's own deadline (grpc-timeout) expired, not the route timeout; check the caller's deadline against {peer}'s latency"
        )),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(f: &[&str]) -> Vec<String> {
        f.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn server_errors_are_the_5xx_analogues() {
        for c in [2, 4, 12, 13, 14, 15] {
            assert!(is_server_error(c), "{c}");
        }
        for c in [0, 1, 3, 5, 6, 7, 8, 9, 10, 11, 16, 99] {
            assert!(!is_server_error(c), "{c}");
        }
        assert_eq!(code_name(14), "UNAVAILABLE");
        assert_eq!(code_name(77), "UNKNOWN_CODE");
    }

    #[test]
    fn hints_depend_on_code_and_flag() {
        let uh = code_hint(14, &flags(&["UH"]), "cart").unwrap();
        let uf = code_hint(14, &flags(&["UF"]), "cart").unwrap();
        let urx = code_hint(14, &flags(&["URX", "UF"]), "cart").unwrap();
        assert!(uh.contains("no endpoint of cart"), "{uh}");
        assert!(uf.contains("refused the connection"), "{uf}");
        // UF wins over URX when both are set: the connection failure is the cause.
        assert!(urx.contains("refused"), "{urx}");
        let urx = code_hint(14, &flags(&["URX"]), "cart").unwrap();
        assert!(urx.contains("after retries"), "{urx}");
        assert!(code_hint(4, &flags(&["UT"]), "cart")
            .unwrap()
            .contains("route timeout fired"));
        assert!(code_hint(4, &[], "cart")
            .unwrap()
            .contains("client's own deadline"));
        assert_eq!(code_hint(13, &[], "cart"), None);
    }

    #[test]
    fn responses_are_worded_with_the_code() {
        let h = CHop {
            response_code: 200,
            grpc_status_plus_one: 15,
            ..CHop::default()
        };
        assert_eq!(
            describe_response(&h, "no healthy upstream"),
            "gRPC UNAVAILABLE (14, HTTP 200) \"no healthy upstream\""
        );
        let h = CHop {
            response_code: 503,
            ..CHop::default()
        };
        assert_eq!(describe_response(&h, ""), "503");
        assert!(hop_server_error(&h));
    }
}
