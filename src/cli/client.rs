//! The CLI as a client of a running `allocation-ledger serve --http` (like kubectl or
//! etcdctl): `--server URL` (or `ALLOCATION_LEDGER_SERVER`) sends a command to that server;
//! without it a write whose data dir is held by a local `serve --http` (its `server.json`, see
//! [`server_file`]) goes there by itself. It speaks MCP over Streamable HTTP with rmcp's client
//! and calls the same tools an agent does; their results are the report types the local mode
//! prints, so the output, `--json` and the exit codes are the same. A tool's error carries its
//! kind, which maps back to the exit code.
//!
//! An unusable token (missing or wrong) exits 2 like any other bad input; a server that
//! cannot be reached exits 1 (kind `io`), except that a server found through `server.json`
//! which does not answer is taken for stale, and the command runs locally.

use super::{config, default_data_dir, Cli, Command, Out};
use allocation_ledger::{Error, ExitCode};
use rmcp::model::CallToolRequestParams;
use rmcp::service::{ClientInitializeError, RoleClient, RunningService};
use rmcp::transport::streamable_http_client::{AuthRequiredError, StreamableHttpClientTransportConfig};
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::ServiceExt;
use serde_json::{Map, Value};
use std::path::Path;
use std::time::Duration;

mod commands;
pub(super) mod server_file;

/// The environment variable naming the server (`--server`).
pub(super) const SERVER_ENV: &str = "ALLOCATION_LEDGER_SERVER";
/// The bearer token's environment variable: the one `serve --http` reads too.
const TOKEN_ENV: &str = "ALLOCATION_LEDGER_TOKEN";
/// How long connecting and the MCP handshake may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// How long one tool call may take (a write waits for its fsync).
const CALL_TIMEOUT: Duration = Duration::from_secs(120);

/// Where a command goes.
enum Route {
    /// A tool of the server answers it.
    Remote,
    /// It runs here whatever the server (nothing of the ledger: completions, man, demo...).
    Local,
    /// It reads or writes the data dir itself; the server has no equivalent.
    NoServer(&'static str),
}

fn route(command: &Command) -> Route {
    match command {
        Command::Request { .. }
        | Command::Cancel { .. }
        | Command::Release { .. }
        | Command::Renew(_)
        | Command::Capacity { .. }
        | Command::Get { .. }
        | Command::List { .. }
        | Command::CleanupExpired { .. }
        | Command::Snapshot => Route::Remote,
        Command::Demo | Command::Completions { .. } | Command::Man => Route::Local,
        #[cfg(feature = "server")]
        Command::Serve(_) => Route::Local,
        Command::Log { .. } => Route::NoServer("log"),
        Command::History(_) => Route::NoServer("history"),
        Command::Usage(_) => Route::NoServer("usage"),
        Command::Timeline(_) => Route::NoServer("timeline"),
        Command::Replay(_) => Route::NoServer("replay"),
        Command::WhatIf(_) => Route::NoServer("what-if"),
        Command::Verify(_) => Route::NoServer("verify"),
        Command::Repair { .. } => Route::NoServer("repair"),
        Command::Init => Route::NoServer("init"),
        Command::Config(config::ConfigCommand::Apply { .. }) => Route::Remote,
        Command::Config(_) => Route::NoServer("config show"),
        Command::Pool(_) | Command::Reserve(_) | Command::Reservations { .. } | Command::Reservation(_) => {
            Route::Remote
        }
    }
}

/// Whether the command writes (only writes find the ledger locked; reads open it read-only
/// beside the server and stay local unless `--server` is given).
fn writes(command: &Command) -> bool {
    matches!(
        command,
        Command::Request { .. }
            | Command::Cancel { .. }
            | Command::Release { .. }
            | Command::Renew(_)
            | Command::CleanupExpired { .. }
            | Command::Snapshot
            | Command::Config(config::ConfigCommand::Apply { .. })
            | Command::Reserve(_)
            | Command::Reservation(_)
    ) || matches!(command, Command::Pool(p) if p.writes())
}

/// Sends the command to a server when `--server` names one, or when it writes and the data
/// dir's writer is a live local `serve --http`. `None`: run it locally.
pub(super) fn dispatch(cli: &Cli, out: &Out) -> Option<ExitCode> {
    // An empty ALLOCATION_LEDGER_SERVER (or --server "") names no server.
    if let Some(url) = cli.server.as_deref().map(str::trim).filter(|u| !u.is_empty()) {
        return match route(&cli.command) {
            Route::Remote => Some(match Server::connect_explicit(url, cli.token_file.as_deref()) {
                Ok(server) => server.run(cli, out),
                Err(e) => out.error(&e),
            }),
            Route::Local => None,
            Route::NoServer(name) => Some(out.error(&Error::invalid(
                "server",
                format!(
                    "`{name}` has no server equivalent: it works on the data dir itself. Run it without --server \
                     (and without {SERVER_ENV}) on the machine that holds the ledger; reads work beside a running server"
                ),
            ))),
        };
    }
    if !writes(&cli.command) {
        return None;
    }
    let dir = cli.data_dir.clone().unwrap_or_else(default_data_dir);
    let found = server_file::live(&dir)?;
    match Server::connect_found(&found, cli.token_file.as_deref()) {
        Ok(Some(server)) => Some(server.run(cli, out)),
        Ok(None) => None,
        Err(e) => Some(out.error(&e)),
    }
}

/// After a local command failed: if the ledger is locked by a local server, says on stderr
/// which and what to do (the command itself has no server equivalent, or it would have gone
/// there).
pub(super) fn explain_locked(e: &Error, dir: &Path) {
    if !matches!(e, Error::Locked { .. }) {
        return;
    }
    if let Some(f) = server_file::live(dir) {
        eprintln!(
            "note: the ledger is held by `allocation-ledger serve --http` (pid {}) at {}. This command has no server \
             equivalent: stop the server (SIGTERM), run the command, then start the server again. request, release, \
             renew, cleanup-expired, capacity, get and list go to the server (by themselves for writes, or with --server {}).",
            f.pid, f.url, f.url
        );
    }
}

/// A connected MCP session with the server, and the runtime it lives on.
struct Server {
    runtime: tokio::runtime::Runtime,
    client: RunningService<RoleClient, ()>,
    url: String,
    /// The token sent, sent again to the leader when this server names one.
    token: Option<String>,
    /// A replica that is not the leader named it: the session with the leader, to which this
    /// command's calls go from then on (followed once, never further).
    leader: std::cell::OnceCell<Box<Server>>,
}

/// Why connecting failed.
enum ConnectError {
    /// The server refused the token (or wanted one).
    Auth,
    /// Anything else: not reachable, not an MCP server, timed out.
    Other(String),
}

impl Server {
    /// `--server URL`: failing to connect is an error.
    fn connect_explicit(url: &str, token_file: Option<&Path>) -> Result<Server, Error> {
        let url = endpoint(url)?;
        let token = read_token(token_file)?;
        Self::connect(&url, token.clone()).map_err(|e| connect_error(&url, token.is_some(), e))
    }

    /// A server found in `server.json`: one that does not answer is stale (`Ok(None)`: run
    /// locally), one that refuses the token is an error.
    fn connect_found(found: &server_file::ServerFile, token_file: Option<&Path>) -> Result<Option<Server>, Error> {
        // Connecting first, even without a token the server requires: a stale file's URL does
        // not answer (run locally), a live server refuses (say what token it wants).
        let token = read_token(token_file)?;
        match Self::connect(&found.url, token.clone()) {
            Ok(server) => Ok(Some(server)),
            Err(ConnectError::Auth) => Err(connect_error(&found.url, token.is_some(), ConnectError::Auth)),
            Err(ConnectError::Other(why)) => {
                eprintln!(
                    "note: {} names a server at {} (pid {}) that does not answer ({why}); running locally",
                    server_file::FILE_NAME,
                    found.url,
                    found.pid
                );
                Ok(None)
            }
        }
    }

    fn connect(url: &str, token: Option<String>) -> Result<Server, ConnectError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| ConnectError::Other(format!("cannot start the async runtime: {e}")))?;
        let mut config = StreamableHttpClientTransportConfig::with_uri(url.to_string());
        let config_token = token.clone();
        if let Some(token) = token {
            config = config.auth_header(token);
        }
        let client = runtime.block_on(async {
            let transport = StreamableHttpClientTransport::from_config(config);
            match tokio::time::timeout(CONNECT_TIMEOUT, ().serve(transport)).await {
                Err(_) => Err(ConnectError::Other(format!("no answer within {} s", CONNECT_TIMEOUT.as_secs()))),
                Ok(Err(e)) if e.auth_challenge().is_some() || is_auth(&e) => Err(ConnectError::Auth),
                Ok(Err(ClientInitializeError::TransportError { error, .. })) => {
                    Err(ConnectError::Other(root_cause(error.error.as_ref())))
                }
                Ok(Err(e)) => Err(ConnectError::Other(describe(&e))),
                Ok(Ok(client)) => Ok(client),
            }
        })?;
        Ok(Server { runtime, client, url: url.to_string(), token: config_token, leader: std::cell::OnceCell::new() })
    }

    /// Runs the command through the server's tools, prints its answer as the local mode
    /// would, closes the session.
    fn run(self, cli: &Cli, out: &Out) -> ExitCode {
        let code = match commands::run(&self, cli, out) {
            Ok(code) => code,
            Err(failure) => report(out, failure),
        };
        self.close();
        code
    }

    /// Closes the session (and the leader's, if a call was sent there).
    fn close(self) {
        let Server { runtime, client, leader, .. } = self;
        if let Some(leader) = leader.into_inner() {
            leader.close();
        }
        runtime.block_on(async {
            let _ = tokio::time::timeout(Duration::from_secs(5), client.cancel()).await;
        });
    }

    /// Calls `tool`: its structured result, or its error as the failure it reports.
    fn call(&self, tool: &'static str, args: Map<String, Value>) -> Result<Value, Failure> {
        self.call_for(tool, args, CALL_TIMEOUT)
    }

    /// [`Server::call`] that waits up to `timeout` for the answer (`request --wait`).
    /// A replica that is not the leader and names it ("not the leader, the leader is X") gets
    /// the call sent on to X once, said on stderr, so a write through any replica works.
    fn call_for(&self, tool: &'static str, args: Map<String, Value>, timeout: Duration) -> Result<Value, Failure> {
        if let Some(leader) = self.leader.get() {
            return leader.call_here(tool, args, timeout);
        }
        match self.call_here(tool, args.clone(), timeout) {
            Err(Failure::Tool(v)) => match leader_named(&v).filter(|url| *url != self.url) {
                Some(url) => {
                    let leader = Self::connect(&url, self.token.clone())
                        .map_err(|e| Failure::Ledger(connect_error(&url, self.token.is_some(), e)))?;
                    eprintln!("note: {} is not the leader; sent the call to the leader at {url}", self.url);
                    self.leader.get_or_init(|| Box::new(leader)).call_here(tool, args, timeout)
                }
                None => Err(Failure::Tool(v)),
            },
            other => other,
        }
    }

    /// [`Server::call_for`] on this server only.
    fn call_here(&self, tool: &'static str, args: Map<String, Value>, timeout: Duration) -> Result<Value, Failure> {
        let mut params = CallToolRequestParams::new(tool);
        params.arguments = Some(args);
        let result =
            self.runtime.block_on(async { tokio::time::timeout(timeout, self.client.call_tool(params)).await });
        let result = match result {
            Err(_) => return Err(self.transport_failure(&format!("no answer within {} s", timeout.as_secs()))),
            Ok(Err(e)) => return Err(self.transport_failure(&describe(&e))),
            Ok(Ok(r)) => r,
        };
        let value = result.structured_content.unwrap_or(Value::Null);
        if result.is_error == Some(true) {
            Err(Failure::Tool(value))
        } else {
            Ok(value)
        }
    }

    fn transport_failure(&self, why: &str) -> Failure {
        Failure::Ledger(Error::io(
            format!(
                "the call to the allocation-ledger server at {} failed (it may or may not have been applied)",
                self.url
            ),
            std::io::Error::other(why.to_string()),
        ))
    }
}

/// How a remote command failed.
enum Failure {
    /// A failure the local mode reports the same way.
    Ledger(Error),
    /// A tool's error result (its structured content), not yet mapped.
    Tool(Value),
    /// A tool error of a kind without a local value to rebuild (damaged, poisoned, io...).
    Remote {
        /// The error's kind as the server spelt it.
        kind: String,
        /// The server's message.
        message: String,
    },
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        Failure::Ledger(e)
    }
}

/// The leader a replicated copy names when it refuses a write (`unavailable`: "not the
/// leader, the leader is URL").
fn leader_named(v: &Value) -> Option<String> {
    if v["kind"].as_str() != Some("unavailable") {
        return None;
    }
    let url = v["error"].as_str()?.split("not the leader, the leader is ").nth(1)?.trim();
    (url.starts_with("http://") || url.starts_with("https://")).then(|| url.to_string())
}

/// A tool's error result as the error the local mode would have reported.
fn from_tool_error(v: &Value) -> Failure {
    let text = |k: &str| v[k].as_str().unwrap_or_default().to_string();
    let message = text("error");
    match v["kind"].as_str().unwrap_or("other") {
        "invalid_input" => {
            let field = text("field");
            let prefix = format!("invalid {field}: ");
            let message = message.strip_prefix(&prefix).unwrap_or(&message).to_string();
            Failure::Ledger(Error::InvalidInput { field, message })
        }
        "not_found" if v["allocation_id"].is_string() => Failure::Ledger(Error::NotFound(text("allocation_id"))),
        "conflict" => Failure::Ledger(Error::Conflict {
            expected_seq: v["expected_seq"].as_u64().unwrap_or_default(),
            current_seq: v["current_seq"].as_u64().unwrap_or_default(),
        }),
        "not_active" => {
            Failure::Ledger(Error::NotActive { allocation_id: text("allocation_id"), state: text("state") })
        }
        kind => Failure::Remote { kind: kind.to_string(), message },
    }
}

/// Prints a failure as the local mode would; its exit code.
fn report(out: &Out, failure: Failure) -> ExitCode {
    match failure {
        Failure::Ledger(e) => out.error(&e),
        Failure::Tool(v) => match from_tool_error(&v) {
            Failure::Ledger(e) => out.error(&e),
            Failure::Remote { kind, message } => remote_error(out, &kind, &message),
            Failure::Tool(_) => remote_error(out, "other", &v.to_string()),
        },
        Failure::Remote { kind, message } => remote_error(out, &kind, &message),
    }
}

/// The exit code of an error kind (as [`Error::exit_code`] maps the variants).
fn exit_code_of(kind: &str) -> ExitCode {
    match kind {
        "invalid_input" => ExitCode::InvalidInput,
        "not_found" | "no_ledger" => ExitCode::NotFound,
        "locked" => ExitCode::Locked,
        "damaged" => ExitCode::Damaged,
        "conflict" => ExitCode::Conflict,
        "not_active" => ExitCode::NotActive,
        _ => ExitCode::Other,
    }
}

/// Prints a server error of a kind the local mode has no value for, as `Out::error` would.
fn remote_error(out: &Out, kind: &str, message: &str) -> ExitCode {
    let code = exit_code_of(kind);
    if out.json {
        println!("{}", serde_json::json!({"error": {"kind": kind, "message": message, "exit_code": code.code()}}));
    } else {
        eprintln!("error: {message}");
    }
    code
}

/// The MCP endpoint of `--server`: `http://HOST:PORT/mcp`, where a bare `http://HOST:PORT`
/// gets the `/mcp` path `serve --http` uses.
fn endpoint(url: &str) -> Result<String, Error> {
    let Some(rest) = url.strip_prefix("http://") else {
        return Err(Error::invalid(
            "server",
            format!(
                "{url:?} is not an http:// URL: use http://HOST:PORT/mcp, as `serve --http` prints it (https is not \
                 built in: put the server behind a TLS-terminating proxy on the server's side)"
            ),
        ));
    };
    Ok(if rest.is_empty() || rest.contains('/') { url.to_string() } else { format!("{url}/mcp") })
}

/// The token from `--token-file`, else `ALLOCATION_LEDGER_TOKEN` (as `serve` reads it).
fn read_token(token_file: Option<&Path>) -> Result<Option<String>, Error> {
    match token_file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| Error::invalid("token", format!("cannot read --token-file {}: {e}", path.display())))?;
            let token = text.trim();
            if token.is_empty() {
                return Err(Error::invalid("token", format!("--token-file {} is empty", path.display())));
            }
            Ok(Some(token.to_string()))
        }
        None => Ok(std::env::var(TOKEN_ENV).ok().map(|t| t.trim().to_string()).filter(|t| !t.is_empty())),
    }
}

fn connect_error(url: &str, token_sent: bool, e: ConnectError) -> Error {
    match e {
        ConnectError::Auth if token_sent => Error::invalid(
            "token",
            format!("the allocation-ledger server at {url} refused the bearer token: check --token-file or {TOKEN_ENV}"),
        ),
        ConnectError::Auth => Error::invalid(
            "token",
            format!(
                "the allocation-ledger server at {url} requires a bearer token: pass --token-file FILE or set {TOKEN_ENV}"
            ),
        ),
        ConnectError::Other(why) => Error::io(
            format!("cannot reach the allocation-ledger server at {url}"),
            std::io::Error::other(format!("{why} (is `allocation-ledger serve --http` running there?)")),
        ),
    }
}

/// Whether the server answered 401 (rmcp's `AuthRequired`, somewhere in the error's chain).
fn is_auth(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(e);
    while let Some(err) = next {
        if err.downcast_ref::<AuthRequiredError>().is_some() {
            return true;
        }
        next = err.source();
    }
    false
}

/// The innermost cause (e.g. `Connection refused`), without the transport's type names.
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut last = e;
    while let Some(next) = last.source() {
        last = next;
    }
    last.to_string()
}

/// The error with its causes, for a message.
fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![e.to_string()];
    let mut next = e.source();
    while let Some(err) = next {
        let s = err.to_string();
        if !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
        next = err.source();
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_map_to_the_local_exit_codes() {
        for (e, kind) in [
            (Error::invalid("f", "m"), "invalid_input"),
            (Error::NotFound("alloc-x".into()), "not_found"),
            (Error::Locked { path: "d".into() }, "locked"),
            (Error::Conflict { expected_seq: 1, current_seq: 2 }, "conflict"),
            (Error::NotActive { allocation_id: "a".into(), state: "expired".into() }, "not_active"),
            (Error::Poisoned("x".into()), "poisoned"),
        ] {
            assert_eq!(e.kind().as_str(), kind);
            assert_eq!(exit_code_of(kind), e.exit_code(), "{kind}");
        }
    }

    #[test]
    fn server_urls() {
        assert_eq!(endpoint("http://127.0.0.1:8765").unwrap(), "http://127.0.0.1:8765/mcp");
        assert_eq!(endpoint("http://h:1/mcp").unwrap(), "http://h:1/mcp");
        assert!(endpoint("https://h:1/mcp").is_err());
        assert!(endpoint("127.0.0.1:8765").is_err());
    }

    #[test]
    fn tool_errors_become_the_local_errors() {
        let v = serde_json::json!({"status": "error", "error": "invalid workers: 99 is too many", "kind": "invalid_input", "field": "workers"});
        let Failure::Ledger(Error::InvalidInput { field, message }) = from_tool_error(&v) else {
            panic!("invalid input")
        };
        assert_eq!((field.as_str(), message.as_str()), ("workers", "99 is too many"));
        let v = serde_json::json!({"status": "error", "error": "x", "kind": "damaged"});
        assert!(matches!(from_tool_error(&v), Failure::Remote { kind, .. } if kind == "damaged"));
    }
}
