//! Checks made before rmcp's service sees a request, over every header value (rmcp reads only
//! the first `Host` and `Origin`) and over the body's JSON-RPC envelope (rmcp answers 415 to
//! anything it cannot decode).
//!
//! The Host and Origin matching follows rmcp's (which still runs after these): hosts compare
//! case-insensitively without brackets, an allowed host without a port matches any port; an
//! allowed origin's `:*` matches any port, no port matches any port, an explicit port matches
//! that port (the scheme's default when the origin names none).

use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::value::RawValue;

/// A host (lowercase, without brackets) and its port, if named.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Authority {
    host: String,
    port: Option<u16>,
}

fn authority_of(text: &str) -> Option<Authority> {
    let a: axum::http::uri::Authority = text.trim().parse().ok()?;
    if a.as_str().contains('@') {
        return None;
    }
    Some(Authority { host: a.host().trim_matches(['[', ']']).to_ascii_lowercase(), port: a.port_u16() })
}

fn default_port(scheme: &str) -> Option<u16> {
    match scheme {
        "http" => Some(80),
        "https" => Some(443),
        _ => None,
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Origin {
    Null,
    Tuple { scheme: String, host: String, port: Option<u16> },
}

fn parse_origin(text: &str) -> Option<Origin> {
    let text = text.trim();
    if text.eq_ignore_ascii_case("null") {
        return Some(Origin::Null);
    }
    let uri: Uri = text.parse().ok()?;
    let scheme = uri.scheme_str()?.to_ascii_lowercase();
    let a = authority_of(uri.authority()?.as_str())?;
    Some(Origin::Tuple { scheme, host: a.host, port: a.port })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AllowedPort {
    Any,
    Exact(u16),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum AllowedOrigin {
    Null,
    Tuple { scheme: String, host: String, port: AllowedPort },
}

fn parse_allowed_origin(text: &str) -> Option<AllowedOrigin> {
    let text = text.trim();
    let (base, wildcard) = match text.strip_suffix(":*") {
        Some(base) => (base, true),
        None => (text, false),
    };
    Some(match parse_origin(base)? {
        Origin::Null if !wildcard => AllowedOrigin::Null,
        Origin::Null => return None,
        Origin::Tuple { port: Some(_), .. } if wildcard => return None,
        Origin::Tuple { scheme, host, port } => {
            AllowedOrigin::Tuple { scheme, host, port: port.map_or(AllowedPort::Any, AllowedPort::Exact) }
        }
    })
}

/// The allow-lists, parsed once.
#[derive(Debug)]
pub(super) struct Checks {
    /// Empty: any host.
    hosts: Vec<Authority>,
    origins: Vec<AllowedOrigin>,
}

/// Middleware (`axum::middleware::from_fn_with_state`) that answers 403 to a request whose
/// Host header `checks` does not allow: the ops routes and `/events` (`/mcp` has rmcp's own).
pub(super) async fn host_check(
    axum::extract::State(checks): axum::extract::State<std::sync::Arc<Checks>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if checks.host_header_allowed(req.headers()) {
        next.run(req).await
    } else {
        (StatusCode::FORBIDDEN, "Forbidden: Host header is not allowed\n").into_response()
    }
}

impl Checks {
    pub(super) fn new(allowed_hosts: &[String], allowed_origins: &[String]) -> Checks {
        Checks {
            hosts: allowed_hosts.iter().filter_map(|h| authority_of(h)).collect(),
            origins: allowed_origins.iter().filter_map(|o| parse_allowed_origin(o)).collect(),
        }
    }

    /// The Host header check rmcp makes for `/mcp`, for the routes beside it (`ops.rs`).
    pub(super) fn host_header_allowed(&self, headers: &HeaderMap) -> bool {
        let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).and_then(authority_of);
        host.map_or(self.hosts.is_empty(), |a| self.host_allowed(&a))
    }

    fn host_allowed(&self, a: &Authority) -> bool {
        self.hosts.is_empty() || self.hosts.iter().any(|h| h.host == a.host && h.port.is_none_or(|p| a.port == Some(p)))
    }

    fn origin_allowed(&self, text: &str) -> bool {
        let Some(origin) = parse_origin(text) else { return false };
        self.origins.iter().any(|allowed| match (allowed, &origin) {
            (AllowedOrigin::Null, Origin::Null) => true,
            (AllowedOrigin::Tuple { scheme, host, port }, Origin::Tuple { scheme: s, host: h, port: p }) => {
                scheme == s
                    && host == h
                    && match port {
                        AllowedPort::Any => true,
                        AllowedPort::Exact(want) => p.or_else(|| default_port(s)) == Some(*want),
                    }
            }
            _ => false,
        })
    }

    /// The Host header (exactly one), the host of an absolute-form request target (allowed,
    /// and the same as the Host header's), and every Origin header.
    /// The refusal, if any.
    pub(super) fn check_headers(&self, uri: &Uri, headers: &HeaderMap) -> Option<Response> {
        let mut hosts = headers.get_all(header::HOST).iter();
        let host_header = hosts.next();
        if hosts.next().is_some() {
            return Some(refuse(StatusCode::BAD_REQUEST, "Bad Request: more than one Host header"));
        }
        if let Some(target) = uri.authority() {
            let scheme = uri.scheme_str().unwrap_or("http").to_ascii_lowercase();
            let with_port = |a: Authority| Authority { port: a.port.or_else(|| default_port(&scheme)), ..a };
            let Some(target) = authority_of(target.as_str()) else {
                return Some(refuse(StatusCode::BAD_REQUEST, "Bad Request: invalid request target"));
            };
            if !self.host_allowed(&target) {
                return Some(refuse(StatusCode::FORBIDDEN, "Forbidden: the request target's host is not allowed"));
            }
            let host = host_header.and_then(|h| h.to_str().ok()).and_then(authority_of);
            if host.map(with_port) != Some(with_port(target)) {
                return Some(refuse(
                    StatusCode::BAD_REQUEST,
                    "Bad Request: the request target's host differs from the Host header",
                ));
            }
        }
        for origin in headers.get_all(header::ORIGIN) {
            if !origin.to_str().is_ok_and(|o| self.origin_allowed(o)) {
                return Some(refuse(StatusCode::FORBIDDEN, "Forbidden: Origin header is not allowed"));
            }
        }
        None
    }
}

fn refuse(status: StatusCode, message: &'static str) -> Response {
    (status, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], message).into_response()
}

/// Whether the request's Content-Type is JSON (rmcp refuses anything else with 415).
pub(super) fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(';').next().unwrap_or("").trim().eq_ignore_ascii_case("application/json"))
}

pub(super) const PARSE_ERROR: i64 = -32700;
pub(super) const INVALID_REQUEST: i64 = -32600;

#[derive(serde::Deserialize)]
struct Envelope<'a> {
    #[serde(borrow)]
    jsonrpc: Option<&'a RawValue>,
    #[serde(borrow)]
    id: Option<&'a RawValue>,
}

/// Checks that `body` is one JSON-RPC 2.0 message: JSON (else -32700), an object, not a
/// batch, with `"jsonrpc": "2.0"` (else -32600). The refusal is HTTP 400 with a JSON-RPC error.
pub(super) fn check_envelope(body: &[u8]) -> Option<Response> {
    let first = body.iter().find(|b| !b.is_ascii_whitespace()).copied();
    match serde_json::from_slice::<Envelope>(body) {
        Ok(env) if env.jsonrpc.is_some_and(|v| v.get() == "\"2.0\"") => None,
        Ok(env) => {
            // Echo the id when it is one JSON-RPC allows (a string or a number).
            let id = env
                .id
                .and_then(|id| serde_json::from_str::<serde_json::Value>(id.get()).ok())
                .filter(|id| id.is_string() || id.is_number())
                .unwrap_or(serde_json::Value::Null);
            Some(rpc_error(id, INVALID_REQUEST, "Invalid Request: \"jsonrpc\" must be \"2.0\"".into()))
        }
        Err(e) if e.is_syntax() || e.is_eof() => {
            Some(rpc_error(serde_json::Value::Null, PARSE_ERROR, format!("Parse error: the body is not JSON: {e}")))
        }
        Err(_) if first == Some(b'[') => Some(rpc_error(
            serde_json::Value::Null,
            INVALID_REQUEST,
            "Invalid Request: JSON-RPC batches are not supported; send one message per request".into(),
        )),
        Err(e) => Some(rpc_error(
            serde_json::Value::Null,
            INVALID_REQUEST,
            format!("Invalid Request: the body must be one JSON-RPC 2.0 message (an object): {e}"),
        )),
    }
}

fn rpc_error(id: serde_json::Value, code: i64, message: String) -> Response {
    let body = serde_json::json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}});
    (StatusCode::BAD_REQUEST, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checks() -> Checks {
        Checks::new(
            &["localhost".into(), "127.0.0.1".into(), "::1".into(), "example.com:8080".into()],
            &["http://localhost:*".into(), "https://app.example.com".into(), "https://x.example:8443".into()],
        )
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
        }
        h
    }

    fn status(uri: &str, pairs: &[(&str, &str)]) -> u16 {
        match checks().check_headers(&uri.parse().unwrap(), &headers(pairs)) {
            None => 200,
            Some(r) => r.status().as_u16(),
        }
    }

    #[test]
    fn hosts() {
        assert_eq!(status("/mcp", &[("host", "127.0.0.1:9")]), 200);
        assert_eq!(status("/mcp", &[("host", "127.0.0.1"), ("host", "evil.example")]), 400);
        assert_eq!(status("/mcp", &[("host", "127.0.0.1"), ("host", "127.0.0.1")]), 400);
        assert_eq!(status("http://127.0.0.1:9/mcp", &[("host", "127.0.0.1:9")]), 200);
        assert_eq!(status("http://LOCALHOST/mcp", &[("host", "localhost:80")]), 200);
        assert_eq!(status("http://evil.example/mcp", &[("host", "127.0.0.1")]), 403);
        assert_eq!(status("http://localhost:9/mcp", &[("host", "127.0.0.1:9")]), 400);
        assert_eq!(status("http://example.com:8080/mcp", &[("host", "example.com:8080")]), 200);
        assert_eq!(status("http://example.com:8081/mcp", &[("host", "example.com:8081")]), 403);
    }

    #[test]
    fn origins() {
        let o = |v: &[&str]| {
            let pairs: Vec<(&str, &str)> = v.iter().map(|v| ("origin", *v)).collect();
            status("/mcp", &pairs)
        };
        assert_eq!(o(&["http://localhost:3000"]), 200);
        assert_eq!(o(&["http://localhost:3000", "http://evil.example"]), 403);
        assert_eq!(o(&["http://evil.example", "http://localhost:3000"]), 403);
        assert_eq!(o(&["https://app.example.com", "https://app.example.com:444"]), 200);
        assert_eq!(o(&["https://x.example"]), 403);
        assert_eq!(o(&["https://x.example:8443"]), 200);
        assert_eq!(o(&["null"]), 403);
        assert_eq!(o(&["not an origin"]), 403);
    }

    #[test]
    fn envelopes() {
        let code = |body: &str| match check_envelope(body.as_bytes()) {
            None => 0,
            Some(r) => {
                assert_eq!(r.status(), 400);
                -1
            }
        };
        assert_eq!(code(r#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#), 0);
        assert_eq!(code(r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#), 0);
        for bad in
            ["{", "", "nonsense", r#"[{"jsonrpc":"2.0","id":1,"method":"ping"}]"#, r#"{"jsonrpc":"1.0","id":1}"#, "3"]
        {
            assert_eq!(code(bad), -1, "{bad}");
        }
    }
}
