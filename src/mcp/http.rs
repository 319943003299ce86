//! Streamable HTTP at `/mcp`: address and token checks, bearer authentication, the Origin and
//! Host checks against DNS rebinding (every header value here, then rmcp's service), the
//! JSON-RPC envelope, the limits against slow and malformed clients (`conn`), graceful
//! shutdown.

mod checks;
mod conn;

use super::tools::LedgerTools;
use super::{ServeArgs, TOKEN_ENV};
use axum::extract::Request;
use axum::http::{header, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::session::SessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Default `--http-header-timeout-seconds`: how long a request head may take to arrive, from
/// its first byte.
pub(crate) const HEADER_TIMEOUT_SECONDS: u64 = 10;
/// Default `--http-body-timeout-seconds`: how long a request body may take to arrive, from
/// the end of its head.
pub(crate) const BODY_TIMEOUT_SECONDS: u64 = 30;
/// Default `--http-idle-timeout-seconds`: how long a connection may stay open with no request
/// in progress.
pub(crate) const IDLE_TIMEOUT_SECONDS: u64 = 60;
/// Default `--http-max-connections`. Also capped by the open-file limit (less
/// `RESERVED_FILE_DESCRIPTORS`); the server raises its soft limit to the hard one at start.
pub(crate) const MAX_CONNECTIONS: u64 = 10_000;
/// Descriptors kept for the ledger's files, the listener and the runtime.
const RESERVED_FILE_DESCRIPTORS: u64 = 256;

/// Origins accepted without configuration: pages served from this machine.
const DEFAULT_ORIGINS: [&str; 3] = ["http://localhost:*", "http://127.0.0.1:*", "http://[::1]:*"];
const LOOPBACK_HOSTS: [&str; 3] = ["localhost", "127.0.0.1", "::1"];
/// The largest request body accepted (rmcp's own default, set explicitly so both checks agree).
const MAX_REQUEST_BODY_BYTES: usize = 4 * 1024 * 1024;
/// The most of a refused request's body that is read so that its connection stays usable.
const REFUSED_BODY_DRAIN_BYTES: usize = 64 * 1024;
/// How long a refused request's body may take to arrive before the refusal is sent anyway.
const REFUSED_BODY_DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// A checked HTTP setup: where to bind, the token, the Origin and Host allow-lists.
#[derive(Debug)]
pub(crate) struct HttpPlan {
    addr: SocketAddr,
    token: Option<String>,
    allowed_origins: Vec<String>,
    /// Empty turns the Host check off.
    allowed_hosts: Vec<String>,
    header_timeout: Duration,
    body_timeout: Duration,
    idle_timeout: Duration,
    max_connections: u64,
}

impl HttpPlan {
    pub(crate) fn from_args(addr: &str, args: &ServeArgs) -> Result<HttpPlan, String> {
        let addr = parse_addr(addr)?;
        let token = read_token(args)?;
        let loopback = addr.ip().is_loopback();
        if !loopback && token.is_none() {
            return Err(format!(
                "refusing to serve on {addr}, which is not a loopback address, without a bearer token: \
                 put a token in a file and pass --token-file FILE, or set {TOKEN_ENV} (or bind 127.0.0.1)"
            ));
        }
        let mut allowed_origins: Vec<String> = DEFAULT_ORIGINS.iter().map(|s| s.to_string()).collect();
        for o in &args.allowed_origins {
            check_origin(o)?;
            allowed_origins.push(o.trim().to_string());
        }
        let mut allowed_hosts: Vec<String> = LOOPBACK_HOSTS.iter().map(|s| s.to_string()).collect();
        if !addr.ip().is_unspecified() {
            allowed_hosts.push(addr.ip().to_string());
        }
        for h in &args.allowed_hosts {
            let h = h.trim();
            if h.is_empty() || h.contains('/') || h.chars().any(char::is_whitespace) {
                return Err(format!("--allowed-host {h:?} is not a host name or host:port"));
            }
            allowed_hosts.push(h.to_string());
        }
        if addr.ip().is_unspecified() && args.allowed_hosts.is_empty() {
            tracing::warn!(
                "bound to {addr} without --allowed-host: accepting any Host header (the bearer token is still required)"
            );
            allowed_hosts.clear();
        }
        Ok(HttpPlan {
            addr,
            token,
            allowed_origins,
            allowed_hosts,
            header_timeout: Duration::from_secs(args.http_header_timeout_seconds),
            body_timeout: Duration::from_secs(args.http_body_timeout_seconds),
            idle_timeout: Duration::from_secs(args.http_idle_timeout_seconds),
            max_connections: args.http_max_connections,
        })
    }
}

/// `HOST:PORT`, `[V6]:PORT`, or a bare `PORT` (bound on 127.0.0.1).
fn parse_addr(text: &str) -> Result<SocketAddr, String> {
    let text = text.trim();
    if let Ok(port) = text.parse::<u16>() {
        return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port));
    }
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let bad = || format!("--http {text:?} is not an address: use HOST:PORT (e.g. 127.0.0.1:8765) or a port");
    let (host, port) = text.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    if host.eq_ignore_ascii_case("localhost") {
        return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port));
    }
    (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("--http {text:?}: cannot resolve {host:?}: {e}"))?
        .next()
        .ok_or_else(|| format!("--http {text:?}: {host:?} resolves to no address"))
}

fn read_token(args: &ServeArgs) -> Result<Option<String>, String> {
    let token = match &args.token_file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read --token-file {}: {e}", path.display()))?;
            let t = text.trim().to_string();
            if t.is_empty() {
                return Err(format!("--token-file {} is empty", path.display()));
            }
            Some(t)
        }
        None => match std::env::var(TOKEN_ENV) {
            Ok(v) if !v.trim().is_empty() => Some(v.trim().to_string()),
            _ => None,
        },
    };
    if let Some(t) = &token {
        if t.chars().any(|c| c.is_control() || c == ' ') || !t.is_ascii() {
            return Err("the bearer token must be printable ASCII without spaces".into());
        }
    }
    Ok(token)
}

fn check_origin(o: &str) -> Result<(), String> {
    let o = o.trim();
    let base = o.strip_suffix(":*").unwrap_or(o);
    let ok = o == "null"
        || base
            .parse::<Uri>()
            .ok()
            .is_some_and(|u| u.scheme().is_some() && u.host().is_some() && matches!(u.path(), "" | "/"));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "--allowed-origin {o:?} is not an origin: use scheme://host[:port], with port * for any port (e.g. https://app.example.com, http://localhost:*)"
        ))
    }
}

/// Constant-time comparison of the presented token with the expected one.
fn token_matches(presented: &str, expected: &str) -> bool {
    let (a, b) = (presented.as_bytes(), expected.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn require_bearer(token: Arc<String>, req: Request, next: Next) -> Response {
    let presented = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| {
        let (scheme, rest) = v.trim().split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
    });
    let refusal = match presented {
        Some(t) if token_matches(t, &token) => return next.run(req).await,
        Some(_) => unauthorized("error=\"invalid_token\"", "invalid bearer token"),
        None => unauthorized("", "missing bearer token: send Authorization: Bearer <token>"),
    };
    drain_then(req, refusal).await
}

/// The body length the request's `Content-Length` declares, if any.
fn declared_body_bytes(req: &Request) -> Option<u64> {
    req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse().ok())
}

/// Answers a refused request after reading what is left of its body, so that the client may
/// reuse the connection (hyper closes one whose unread body has not arrived yet, and the
/// client's next request on it fails). A body past `REFUSED_BODY_DRAIN_BYTES` is not read
/// (an unauthenticated client must not make the server buffer megabytes), nor one that does not
/// arrive within `REFUSED_BODY_DRAIN_TIMEOUT`; the connection is closed instead.
async fn drain_then(req: Request, mut refusal: Response) -> Response {
    let declared_bytes = declared_body_bytes(&req);
    let drained = declared_bytes.is_none_or(|n| n <= REFUSED_BODY_DRAIN_BYTES as u64)
        && tokio::time::timeout(
            REFUSED_BODY_DRAIN_TIMEOUT,
            axum::body::to_bytes(req.into_body(), REFUSED_BODY_DRAIN_BYTES),
        )
        .await
        .is_ok_and(|read| read.is_ok());
    if !drained {
        refusal.headers_mut().insert(header::CONNECTION, header::HeaderValue::from_static("close"));
    }
    refusal
}

/// Reads the whole request body before rmcp's service sees it. Its refusals (Origin, Host,
/// Accept) would otherwise answer with the body unread, and hyper then closes the connection if
/// the body has not arrived yet: the client's next request on the kept-alive connection fails.
/// Runs after the bearer check, so only an authenticated (or loopback) client gets this far.
/// Then the checks rmcp does not make: every Host and Origin header, the host of an
/// absolute-form target, the JSON-RPC envelope, DELETE of an unknown session.
async fn read_whole_body(shared: Arc<Shared>, req: Request, next: Next) -> Response {
    let too_large = || {
        let message = format!("the request body is larger than the limit of {MAX_REQUEST_BODY_BYTES} bytes");
        (StatusCode::PAYLOAD_TOO_LARGE, [(header::CONNECTION, "close")], message).into_response()
    };
    let declared_bytes = declared_body_bytes(&req);
    // Refused before reading: nothing of it has been sent to us yet that we would have to drain.
    if declared_bytes.is_some_and(|n| n > MAX_REQUEST_BODY_BYTES as u64) {
        return too_large();
    }
    let (parts, body) = req.into_parts();
    let bytes =
        match tokio::time::timeout(shared.body_timeout, axum::body::to_bytes(body, MAX_REQUEST_BODY_BYTES)).await {
            Ok(Ok(bytes)) => bytes,
            // A chunked body past the limit, or a client that stopped sending: the rest of the
            // connection's bytes cannot be trusted to start a request, so it is closed.
            Ok(Err(e)) if std::error::Error::source(&e).is_some_and(|s| s.is::<http_body_util::LengthLimitError>()) => {
                return too_large()
            }
            Ok(Err(e)) => {
                let message = format!("cannot read the request body: {e}");
                return (StatusCode::BAD_REQUEST, [(header::CONNECTION, "close")], message).into_response();
            }
            Err(_) => {
                let message = format!(
                    "the request body did not arrive within {} s (--http-body-timeout-seconds)",
                    shared.body_timeout.as_secs()
                );
                return (StatusCode::REQUEST_TIMEOUT, [(header::CONNECTION, "close")], message).into_response();
            }
        };
    if let Some(refusal) = shared.checks.check_headers(&parts.uri, &parts.headers) {
        return refusal;
    }
    if parts.method == axum::http::Method::POST && checks::is_json(&parts.headers) {
        if let Some(refusal) = checks::check_envelope(&bytes) {
            return refusal;
        }
    }
    if parts.method == axum::http::Method::DELETE {
        if let Some(id) = parts.headers.get("mcp-session-id").and_then(|v| v.to_str().ok()) {
            if !shared.sessions.has_session(&id.into()).await.unwrap_or(true) {
                return (StatusCode::NOT_FOUND, "Not Found: no session with this Mcp-Session-Id").into_response();
            }
        }
    }
    next.run(Request::from_parts(parts, axum::body::Body::from(bytes))).await
}

/// What the body reader and its checks share across requests.
struct Shared {
    body_timeout: Duration,
    checks: checks::Checks,
    sessions: Arc<LocalSessionManager>,
}

fn unauthorized(param: &str, message: &str) -> Response {
    let challenge = if param.is_empty() {
        "Bearer realm=\"allocation-ledger\"".to_string()
    } else {
        format!("Bearer realm=\"allocation-ledger\", {param}")
    };
    (StatusCode::UNAUTHORIZED, [(header::WWW_AUTHENTICATE, challenge)], message.to_string()).into_response()
}

pub(crate) async fn serve_http(
    plan: HttpPlan,
    factory: impl Fn() -> LedgerTools + Send + Sync + 'static,
    shutdown: CancellationToken,
) -> Result<(), String> {
    let config = StreamableHttpServerConfig::default()
        .with_allowed_origins(plan.allowed_origins.clone())
        .with_allowed_hosts(plan.allowed_hosts.clone())
        .with_max_request_body_bytes(MAX_REQUEST_BODY_BYTES)
        // Cancelling closes open SSE streams, so the graceful shutdown below can finish.
        .with_cancellation_token(shutdown.child_token());
    let sessions = Arc::new(LocalSessionManager::default());
    let service: StreamableHttpService<LedgerTools, LocalSessionManager> =
        StreamableHttpService::new(move || Ok(factory()), sessions.clone(), config);

    let shared = Arc::new(Shared {
        body_timeout: plan.body_timeout,
        checks: checks::Checks::new(&plan.allowed_hosts, &plan.allowed_origins),
        sessions,
    });
    let mut app = axum::Router::new().nest_service("/mcp", service);
    // Inside the bearer check (a layer added later runs first): a refused client's body is only
    // drained up to a small limit.
    app = app
        .layer(axum::middleware::from_fn(move |req: Request, next: Next| read_whole_body(shared.clone(), req, next)));
    if let Some(token) = plan.token {
        let token = Arc::new(token);
        app = app
            .layer(axum::middleware::from_fn(move |req: Request, next: Next| require_bearer(token.clone(), req, next)));
    }

    // Each connection holds a descriptor: the usual soft limit (1024) would cap the server at
    // about a thousand connections, and at that point accept fails for everyone.
    let open_files = conn::raise_open_file_limit();
    let max_connections = match open_files {
        Some(n) => plan.max_connections.min(n.saturating_sub(RESERVED_FILE_DESCRIPTORS).max(1)),
        None => plan.max_connections,
    };
    if max_connections < plan.max_connections {
        tracing::warn!(
            "at most {max_connections} connections (the open-file limit is {}): raise the hard limit (ulimit -Hn) for more",
            open_files.unwrap_or(0)
        );
    }
    let limits = conn::ConnLimits {
        header_timeout: plan.header_timeout,
        idle_timeout: plan.idle_timeout,
        max_connections: usize::try_from(max_connections).unwrap_or(usize::MAX),
    };

    let listener =
        tokio::net::TcpListener::bind(plan.addr).await.map_err(|e| format!("cannot listen on {}: {e}", plan.addr))?;
    let bound = listener.local_addr().map_err(|e| format!("cannot read the bound address: {e}"))?;
    // Printed unconditionally (whatever RUST_LOG says): scripts and tests read the port here.
    eprintln!("allocation-ledger: listening on http://{bound}/mcp");
    conn::serve(listener, app, limits, shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> ServeArgs {
        ServeArgs {
            http: None,
            token_file: None,
            allowed_origins: vec![],
            allowed_hosts: vec![],
            http_header_timeout_seconds: HEADER_TIMEOUT_SECONDS,
            http_body_timeout_seconds: BODY_TIMEOUT_SECONDS,
            http_idle_timeout_seconds: IDLE_TIMEOUT_SECONDS,
            http_max_connections: MAX_CONNECTIONS,
            expiry_interval_seconds: 1,
        }
    }

    #[test]
    fn addresses() {
        assert_eq!(parse_addr("8765").unwrap(), "127.0.0.1:8765".parse().unwrap());
        assert_eq!(parse_addr("localhost:0").unwrap(), "127.0.0.1:0".parse().unwrap());
        assert_eq!(parse_addr("[::1]:9").unwrap(), "[::1]:9".parse().unwrap());
        assert!(parse_addr("nonsense").is_err());
        assert!(parse_addr("127.0.0.1:99999").is_err());
    }

    #[test]
    fn origins_are_checked() {
        for ok in ["https://app.example.com", "http://localhost:*", "http://[::1]:8080", "null"] {
            check_origin(ok).unwrap();
        }
        for bad in ["app.example.com", "https://x.com/path", ""] {
            assert!(check_origin(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn tokens_compare_exactly() {
        assert!(token_matches("abc", "abc"));
        assert!(!token_matches("abd", "abc"));
        assert!(!token_matches("ab", "abc"));
    }

    #[test]
    fn loopback_needs_no_token_but_other_addresses_do() {
        // The token env var is not set in unit tests; if it is, the first assertion still holds.
        assert!(HttpPlan::from_args("127.0.0.1:0", &args()).is_ok());
        if std::env::var(TOKEN_ENV).is_err() {
            let err = HttpPlan::from_args("0.0.0.0:0", &args()).unwrap_err();
            assert!(err.contains("--token-file") && err.contains(TOKEN_ENV), "{err}");
        }
    }
}
