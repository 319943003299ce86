//! `allocation-ledger serve`: its flags, their checks (before the ledger is touched), logging,
//! the async runtime and the process signals (SIGTERM, Ctrl-C) that stop the server. The server
//! itself is the library's `mcp` module.

use allocation_ledger::mcp::{self, HttpOptions, ServeOptions};
use allocation_ledger::{Config, ExitCode, Ledger, OpenOptions};
use axum::http::Uri;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

/// Environment variable holding the bearer token for `serve --http` (alternative to
/// `--token-file`).
const TOKEN_ENV: &str = "ALLOCATION_LEDGER_TOKEN";

/// Arguments of `allocation-ledger serve`.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Serve Streamable HTTP at http://ADDR/mcp instead of MCP over stdio. ADDR is HOST:PORT
    /// (e.g. 127.0.0.1:8765, [::1]:8765, localhost:8765, 0.0.0.0:8765) or just PORT, which binds
    /// 127.0.0.1. Port 0 picks a free port; the bound address is printed on stderr as
    /// `listening on http://HOST:PORT/mcp`. A non-loopback HOST requires a bearer token.
    #[arg(long, value_name = "ADDR")]
    http: Option<String>,

    /// HTTP only: file holding the bearer token clients must send as `Authorization: Bearer
    /// TOKEN` (surrounding whitespace is ignored): the global `--token-file`, which the client
    /// commands send too. The token may instead come from the environment variable
    /// ALLOCATION_LEDGER_TOKEN. Required when ADDR is not a loopback address; when given on
    /// loopback it is enforced there too.
    #[arg(skip)]
    pub(super) token_file: Option<PathBuf>,

    /// HTTP only: also accept requests whose Origin header is ORIGIN (scheme://host[:port], a
    /// port of `*` matches any port; repeatable). Always accepted: http://localhost:*,
    /// http://127.0.0.1:*, http://[::1]:*. Requests without an Origin header are accepted;
    /// any other Origin gets 403.
    #[arg(long = "allowed-origin", value_name = "ORIGIN")]
    allowed_origins: Vec<String>,

    /// HTTP only: also accept requests whose Host header names HOST (host or host:port;
    /// repeatable). Loopback names and the bound address are always accepted. Binding 0.0.0.0
    /// or [::] without any --allowed-host turns the Host check off (the token still applies).
    #[arg(long = "allowed-host", value_name = "HOST")]
    allowed_hosts: Vec<String>,

    /// HTTP only: a connection that has not sent a whole request head (request line and
    /// headers) this many seconds after it started sending one is closed.
    #[arg(long, value_name = "N", default_value_t = mcp::HEADER_TIMEOUT_SECONDS, value_parser = clap::value_parser!(u64).range(1..=3600))]
    http_header_timeout_seconds: u64,

    /// HTTP only: a request whose body has not fully arrived this many seconds after its head
    /// is answered 408 and its connection closed.
    #[arg(long, value_name = "N", default_value_t = mcp::BODY_TIMEOUT_SECONDS, value_parser = clap::value_parser!(u64).range(1..=3600))]
    http_body_timeout_seconds: u64,

    /// HTTP only: a connection with no request in progress is closed after this many seconds
    /// (a new connection that sends nothing, or a kept-alive one between requests).
    #[arg(long, value_name = "N", default_value_t = mcp::IDLE_TIMEOUT_SECONDS, value_parser = clap::value_parser!(u64).range(1..=86400))]
    http_idle_timeout_seconds: u64,

    /// HTTP only: the most connections open at once (further capped by the open-file limit).
    /// At the bound a new connection closes the oldest one that has not completed a request
    /// head, or is refused with 503 if every open connection has.
    #[arg(long, value_name = "N", default_value_t = mcp::MAX_CONNECTIONS, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    http_max_connections: u64,

    /// How often, in seconds, the server checks for allocations past their deadline and
    /// records their expiry.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=3600))]
    expiry_interval_seconds: u64,

    /// How the server's logs (on stderr) are written: `text`, one human-readable line per
    /// event, or `json`, one JSON object per line (for journald, Loki, Elasticsearch...).
    /// RUST_LOG sets what is logged (default `warn,allocation_ledger=info`).
    #[arg(long, value_name = "FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,

    /// Also serve the MCP conformance suite's fixture tools, resources and prompts
    /// (`test_simple_text`, `test://static-text`, ...), and advertise prompts and completions,
    /// so `@modelcontextprotocol/conformance` can exercise every scenario through this server.
    /// For conformance runs (tests/conformance.sh) only.
    #[arg(long, hide = true)]
    conformance_fixtures: bool,
    /// Replicated mode (docs/replication.md): the log lives on this etcd v3 cluster (client
    /// URLs, comma-separated); this server is one copy: it serves writes while it is the
    /// elected leader, reads always. Requires --http with a fixed port and --cluster.
    #[cfg(feature = "etcd")]
    #[arg(long, value_name = "URL[,URL...]", value_delimiter = ',', requires = "cluster")]
    etcd: Vec<String>,

    /// Replicated mode: the cluster's name (keys live under /NAME/ in etcd).
    #[cfg(feature = "etcd")]
    #[arg(long, value_name = "NAME", requires = "etcd")]
    cluster: Option<String>,

    /// Replicated mode: the election lease; a leader that cannot renew it for this long (paused,
    /// partitioned, dead) loses the lead to a standby.
    #[cfg(feature = "etcd")]
    #[arg(long, value_name = "N", default_value_t = 5, value_parser = clap::value_parser!(i64).range(1..=600))]
    lease_ttl_seconds: i64,

    /// Replicated mode: the URL standbys name to clients as the leader's (default:
    /// http://ADDR/mcp of --http).
    #[cfg(feature = "etcd")]
    #[arg(long, value_name = "URL")]
    advertise_url: Option<String>,
}

/// `serve --log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event.
    Text,
    /// One JSON object per line: `timestamp`, `level`, `target`, `fields`.
    Json,
}

/// Runs the server until shutdown; returns the process exit code: 0 after a clean shutdown,
/// 2 for invalid arguments or config, 5 if another process holds the ledger's write lock,
/// 6 if the ledger is damaged, 1 for anything else.
pub fn serve(data_dir: PathBuf, config_file: Option<PathBuf>, args: ServeArgs) -> ExitCode {
    init_logging(args.log_format);
    // Everything about the HTTP setup is checked before the ledger is touched.
    let http = match http_options(&args) {
        Ok(http) => http,
        Err(msg) => {
            eprintln!("allocation-ledger serve: {msg}");
            return ExitCode::InvalidInput;
        }
    };
    let config = match &config_file {
        Some(path) => match Config::from_file(path) {
            Ok(c) => Some(c),
            Err(e) => {
                eprintln!("allocation-ledger serve: invalid config: {e}");
                return ExitCode::InvalidInput;
            }
        },
        None => None,
    };
    let opts = match replication(OpenOptions { config, ..Default::default() }, &args, http.as_ref()) {
        Ok(opts) => opts,
        Err(msg) => {
            eprintln!("allocation-ledger serve: {msg}");
            return ExitCode::InvalidInput;
        }
    };
    let ledger = match Ledger::open_with(&data_dir, opts) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("allocation-ledger serve: {e}");
            return e.exit_code();
        }
    };
    if let Err(e) = super::config::check_recorded(&ledger, &config_file) {
        eprintln!("allocation-ledger serve: {e}");
        return e.exit_code();
    }
    let report = ledger.recovery_report();
    tracing::info!(
        data_dir = %data_dir.display(),
        created = report.created,
        events_replayed = report.events_replayed,
        last_seq = report.last_seq,
        torn_tail = report.torn_tail.is_some(),
        "ledger opened"
    );
    let mut opts = ServeOptions::default();
    opts.expiry_interval = Duration::from_secs(args.expiry_interval_seconds);
    opts.conformance_fixtures = args.conformance_fixtures;
    let code = run(ledger, opts, http);
    tracing::info!("server stopped");
    code
}

/// `--etcd`: the options of a replicated copy (checked before the ledger is touched).
#[cfg(feature = "etcd")]
fn replication(opts: OpenOptions, args: &ServeArgs, http: Option<&HttpOptions>) -> Result<OpenOptions, String> {
    let Some(cluster) = args.cluster.as_ref().filter(|_| !args.etcd.is_empty()) else { return Ok(opts) };
    let Some(http) = http else { return Err("--etcd needs --http (standbys name the leader's URL to clients)".into()) };
    if http.addr.port() == 0 && args.advertise_url.is_none() {
        return Err("--etcd needs a fixed --http port (or --advertise-url): standbys name it to clients".into());
    }
    let url = args.advertise_url.clone().unwrap_or_else(|| format!("http://{}/mcp", http.addr));
    let mut etcd = allocation_ledger::EtcdOptions::new(args.etcd.clone(), cluster.clone(), url);
    etcd.lease_ttl_seconds = args.lease_ttl_seconds;
    Ok(opts.etcd(etcd))
}

/// Without the `etcd` feature there is no replicated mode.
#[cfg(not(feature = "etcd"))]
#[allow(clippy::unnecessary_wraps, reason = "the same signature as with the feature")]
fn replication(opts: OpenOptions, _: &ServeArgs, _: Option<&HttpOptions>) -> Result<OpenOptions, String> {
    Ok(opts)
}

/// Runs the server on its own runtime, then drops the ledger (releasing its lock).
fn run(ledger: Ledger, opts: ServeOptions, http: Option<HttpOptions>) -> ExitCode {
    let runtime =
        match tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("allocation-ledger-mcp").build() {
            Ok(rt) => rt,
            Err(e) => {
                eprintln!("allocation-ledger serve: cannot start the async runtime: {e}");
                return ExitCode::Other;
            }
        };
    let dir = ledger.dir().to_path_buf();
    let result = runtime.block_on(async {
        match http {
            Some(mut http) => {
                http.listening = Some(record_listening(&dir, http.token.is_some()));
                mcp::serve_http(ledger.clone(), opts, http, signalled()).await
            }
            None => mcp::serve_stdio(ledger.clone(), opts, signalled()).await,
        }
    });
    // Clients stop finding this server before it lets go of the lock.
    super::client::server_file::remove_own(&dir);
    // Whatever is still pending (a blocking stdin read that cannot be cancelled) is abandoned;
    // the ledger calls in flight have already finished.
    runtime.shutdown_background();
    drop(ledger);
    match result {
        Ok(()) => ExitCode::Ok,
        Err(e) => {
            eprintln!("allocation-ledger serve: {e}");
            ExitCode::Other
        }
    }
}

/// The sender the HTTP server tells its bound address: `server.json` in `dir` records it, so
/// that CLI writes finding the ledger locked come here (src/cli/client.rs). Must be called on
/// the runtime.
fn record_listening(dir: &std::path::Path, token_required: bool) -> tokio::sync::mpsc::UnboundedSender<SocketAddr> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<SocketAddr>();
    let dir = dir.to_path_buf();
    tokio::spawn(async move {
        if let Some(bound) = rx.recv().await {
            let written = tokio::task::spawn_blocking(move || {
                super::client::server_file::write(&dir, bound, token_required).map_err(|e| (dir, e))
            })
            .await;
            if let Ok(Err((dir, e))) = written {
                tracing::warn!(
                    "cannot write {}/{}: {e}; CLI writes will not find this server by themselves (use --server)",
                    dir.display(),
                    super::client::server_file::FILE_NAME
                );
            }
        }
    });
    tx
}

/// Completes on Ctrl-C (SIGINT) or SIGTERM: the server then shuts down gracefully.
async fn signalled() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!("cannot watch SIGTERM: {e}");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("interrupted; shutting down"),
        () = term => tracing::info!("SIGTERM received; shutting down"),
    }
}

/// The HTTP options the flags ask for (`None`: stdio), or the message that refuses them.
fn http_options(args: &ServeArgs) -> Result<Option<HttpOptions>, String> {
    let Some(addr) = &args.http else {
        if args.token_file.is_some() || !args.allowed_origins.is_empty() || !args.allowed_hosts.is_empty() {
            return Err("--token-file, --allowed-origin and --allowed-host apply to --http only; \
                 over stdio the MCP client that starts the server is the only one talking to it"
                .into());
        }
        return Ok(None);
    };
    let addr = parse_addr(addr)?;
    let token = read_token(args)?;
    if !addr.ip().is_loopback() && token.is_none() {
        return Err(format!(
            "refusing to serve on {addr}, which is not a loopback address, without a bearer token: \
             put a token in a file and pass --token-file FILE, or set {TOKEN_ENV} (or bind 127.0.0.1)"
        ));
    }
    let mut http = HttpOptions::new(addr);
    http.token = token;
    for o in &args.allowed_origins {
        check_origin(o)?;
        http.allowed_origins.push(o.trim().to_string());
    }
    for h in &args.allowed_hosts {
        let h = h.trim();
        if h.is_empty() || h.contains('/') || h.chars().any(char::is_whitespace) {
            return Err(format!("--allowed-host {h:?} is not a host name or host:port"));
        }
        http.allowed_hosts.push(h.to_string());
    }
    http.header_timeout = Duration::from_secs(args.http_header_timeout_seconds);
    http.body_timeout = Duration::from_secs(args.http_body_timeout_seconds);
    http.idle_timeout = Duration::from_secs(args.http_idle_timeout_seconds);
    http.max_connections = args.http_max_connections;
    Ok(Some(http))
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

/// The bearer token from `--token-file`, else from the environment.
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

/// `scheme://host[:port]`, `scheme://host:*` or `null`.
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

/// The filter when RUST_LOG is unset (or cannot be parsed).
const DEFAULT_LOG_FILTER: &str = "warn,allocation_ledger=info";

/// Logs go to stderr (stdout is the stdio transport). `RUST_LOG` sets the filter with
/// `EnvFilter`'s syntax, e.g. `RUST_LOG=debug` or `RUST_LOG=warn,allocation_ledger=debug`; by
/// default `warn,allocation_ledger=info`. A RUST_LOG that does not parse is reported and the
/// default used.
fn init_logging(format: LogFormat) {
    use tracing_subscriber::prelude::*;
    use tracing_subscriber::EnvFilter;
    let (filter, bad) = match std::env::var("RUST_LOG") {
        Ok(v) if !v.trim().is_empty() => match EnvFilter::try_new(&v) {
            Ok(f) => (f, None),
            Err(e) => (EnvFilter::new(DEFAULT_LOG_FILTER), Some(format!("ignoring RUST_LOG={v:?}: {e}"))),
        },
        _ => (EnvFilter::new(DEFAULT_LOG_FILTER), None),
    };
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(false);
    let fmt = match format {
        LogFormat::Text => fmt.boxed(),
        LogFormat::Json => fmt.json().flatten_event(true).boxed(),
    };
    let _ = tracing_subscriber::registry().with(fmt).with(filter).try_init();
    if let Some(why) = bad {
        tracing::warn!("{why}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Wrap {
        #[command(flatten)]
        serve: ServeArgs,
    }

    fn args(extra: &[&str]) -> ServeArgs {
        Wrap::parse_from(std::iter::once("serve").chain(extra.iter().copied())).serve
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
    fn loopback_needs_no_token_but_other_addresses_do() {
        // The token env var is not set in unit tests; if it is, the first assertion still holds.
        assert!(http_options(&args(&["--http", "127.0.0.1:0"])).is_ok());
        if std::env::var(TOKEN_ENV).is_err() {
            let err = http_options(&args(&["--http", "0.0.0.0:0"])).unwrap_err();
            assert!(err.contains("--token-file") && err.contains(TOKEN_ENV), "{err}");
        }
    }

    #[test]
    fn the_defaults_are_the_librarys() {
        let Ok(Some(http)) = http_options(&args(&["--http", "127.0.0.1:0"])) else { panic!("accepted") };
        let defaults = HttpOptions::new("127.0.0.1:0".parse().unwrap());
        assert_eq!(
            (http.header_timeout, http.body_timeout, http.idle_timeout, http.max_connections),
            (defaults.header_timeout, defaults.body_timeout, defaults.idle_timeout, defaults.max_connections)
        );
    }
}
