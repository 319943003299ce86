//! Streamable HTTP at `/mcp`: address and token checks, bearer authentication, the Origin and
//! Host checks against DNS rebinding (every header value here, then rmcp's service), the
//! JSON-RPC envelope, the limits against slow and malformed clients (`conn`), graceful
//! shutdown.

mod checks;
mod conn;
mod events;
mod ops;

use super::tools::LedgerTools;
use super::ServeError;
use axum::extract::Request;
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::session::SessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Default `--http-header-timeout-seconds`: how long a request head may take to arrive, from
/// its first byte.
pub const HEADER_TIMEOUT_SECONDS: u64 = 10;
/// Default `--http-body-timeout-seconds`: how long a request body may take to arrive, from
/// the end of its head.
pub const BODY_TIMEOUT_SECONDS: u64 = 30;
/// Default `--http-idle-timeout-seconds`: how long a connection may stay open with no request
/// in progress.
pub const IDLE_TIMEOUT_SECONDS: u64 = 60;
/// Default `--http-max-connections`. Also capped by the open-file limit (less
/// `RESERVED_FILE_DESCRIPTORS`); the server raises its soft limit to the hard one at start.
pub const MAX_CONNECTIONS: u64 = 10_000;
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

/// Where and how [`serve_http`](super::serve_http) listens. The CLI's `serve --http` flags
/// fill it in after checking their syntax.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct HttpOptions {
    /// The address to bind; port 0 picks a free port.
    pub addr: SocketAddr,
    /// The bearer token every request must present; required unless `addr` is loopback.
    pub token: Option<String>,
    /// Origins accepted besides the loopback ones (`scheme://host[:port]`, a port of `*`
    /// matches any port). Requests without an Origin header are accepted.
    pub allowed_origins: Vec<String>,
    /// Host header values accepted besides the loopback names and the bound address. Left
    /// empty on an unspecified address (`0.0.0.0`, `[::]`) it turns the Host check off.
    pub allowed_hosts: Vec<String>,
    /// How long a request head may take to arrive, from its first byte.
    pub header_timeout: Duration,
    /// How long a request body may take to arrive, from the end of its head (then 408).
    pub body_timeout: Duration,
    /// How long a connection may stay open with no request in progress.
    pub idle_timeout: Duration,
    /// The most connections open at once (further capped by the open-file limit).
    pub max_connections: u64,
    /// Told the bound address once the server listens (port 0 picks one): the CLI records it
    /// in the data dir's `server.json` for the commands that find the ledger locked.
    pub listening: Option<tokio::sync::mpsc::UnboundedSender<SocketAddr>>,
}

impl HttpOptions {
    /// Options for `addr` with no token, no extra origins or hosts and the default limits.
    pub fn new(addr: SocketAddr) -> Self {
        HttpOptions {
            addr,
            token: None,
            allowed_origins: Vec::new(),
            allowed_hosts: Vec::new(),
            header_timeout: Duration::from_secs(HEADER_TIMEOUT_SECONDS),
            body_timeout: Duration::from_secs(BODY_TIMEOUT_SECONDS),
            idle_timeout: Duration::from_secs(IDLE_TIMEOUT_SECONDS),
            max_connections: MAX_CONNECTIONS,
            listening: None,
        }
    }
}

/// A checked HTTP setup: the options with the complete Origin and Host allow-lists.
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
    listening: Option<tokio::sync::mpsc::UnboundedSender<SocketAddr>>,
}

impl HttpPlan {
    pub(crate) fn new(opts: HttpOptions) -> Result<HttpPlan, ServeError> {
        let addr = opts.addr;
        // The CLI refuses this earlier with advice on its flags; a library caller gets it here.
        if !addr.ip().is_loopback() && opts.token.is_none() {
            return Err(ServeError(format!(
                "refusing to serve on {addr}, which is not a loopback address, without a bearer token"
            )));
        }
        let mut allowed_origins: Vec<String> = DEFAULT_ORIGINS.iter().map(std::string::ToString::to_string).collect();
        allowed_origins.extend(opts.allowed_origins.iter().map(|o| o.trim().to_string()));
        let mut allowed_hosts: Vec<String> = LOOPBACK_HOSTS.iter().map(std::string::ToString::to_string).collect();
        if !addr.ip().is_unspecified() {
            allowed_hosts.push(addr.ip().to_string());
        }
        allowed_hosts.extend(opts.allowed_hosts.iter().map(|h| h.trim().to_string()));
        if addr.ip().is_unspecified() && opts.allowed_hosts.is_empty() {
            tracing::warn!(
                "bound to {addr} without --allowed-host: accepting any Host header (the bearer token is still required)"
            );
            allowed_hosts.clear();
        }
        Ok(HttpPlan {
            addr,
            token: opts.token,
            allowed_origins,
            allowed_hosts,
            header_timeout: opts.header_timeout,
            body_timeout: opts.body_timeout,
            idle_timeout: opts.idle_timeout,
            max_connections: opts.max_connections,
            listening: opts.listening,
        })
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

/// `/healthz` and `/readyz` answer without the token when the server listens on a loopback
/// address (a local supervisor or probe need not hold it; they reveal no data), and need it
/// like everything else on any other address.
async fn require_bearer(token: Arc<String>, open_health: bool, req: Request, next: Next) -> Response {
    if open_health && matches!(req.uri().path(), "/healthz" | "/readyz") {
        return next.run(req).await;
    }
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
            Ok(Err(e))
                if std::error::Error::source(&e)
                    .is_some_and(<dyn std::error::Error + 'static>::is::<http_body_util::LengthLimitError>) =>
            {
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
    ledger: crate::Ledger,
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
    let ops_checks = checks::Checks::new(&plan.allowed_hosts, &plan.allowed_origins);
    let events_checks = checks::Checks::new(&plan.allowed_hosts, &plan.allowed_origins);
    let events = events::routes(ledger.clone(), events_checks, shutdown.child_token());
    let mut app =
        axum::Router::new().nest_service("/mcp", service).merge(ops::routes(ledger, ops_checks)).merge(events);
    // Inside the bearer check (a layer added later runs first): a refused client's body is only
    // drained up to a small limit.
    app = app
        .layer(axum::middleware::from_fn(move |req: Request, next: Next| read_whole_body(shared.clone(), req, next)));
    if let Some(token) = plan.token {
        let (token, open_health) = (Arc::new(token), plan.addr.ip().is_loopback());
        app = app.layer(axum::middleware::from_fn(move |req: Request, next: Next| {
            require_bearer(token.clone(), open_health, req, next)
        }));
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
    if let Some(tx) = &plan.listening {
        let _ = tx.send(bound);
    }
    conn::serve(listener, app, limits, shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_exactly() {
        assert!(token_matches("abc", "abc"));
        assert!(!token_matches("abd", "abc"));
        assert!(!token_matches("ab", "abc"));
    }

    #[test]
    fn loopback_needs_no_token_but_other_addresses_do() {
        assert!(HttpPlan::new(HttpOptions::new("127.0.0.1:0".parse().unwrap())).is_ok());
        let err = HttpPlan::new(HttpOptions::new("0.0.0.0:0".parse().unwrap())).unwrap_err();
        assert!(err.to_string().contains("not a loopback address"), "{err}");
        let mut with_token = HttpOptions::new("0.0.0.0:0".parse().unwrap());
        with_token.token = Some("t".into());
        let plan = HttpPlan::new(with_token).unwrap();
        assert!(plan.allowed_hosts.is_empty(), "no --allowed-host on 0.0.0.0 turns the Host check off");
    }
}
