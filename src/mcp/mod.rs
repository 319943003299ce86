//! The MCP server: the ledger's tools over stdio (`allocation-ledger serve`) and Streamable
//! HTTP (`allocation-ledger serve --http ADDR`, path `/mcp`), built on rmcp.
//!
//! Both protocol eras rmcp speaks are served: the `2025-11-25` handshake (`initialize`, then
//! `notifications/initialized`) and the stateless `2026-07-28` style (`server/discover`, the
//! protocol version in each request's `_meta`). Logs go to stderr; on stdio, stdout carries
//! nothing but MCP messages.
//!
//! The ledger API blocks (it fsyncs), so every call runs on tokio's blocking pool; concurrent
//! calls share fsyncs inside the ledger (group commit). A timer records expiries on time while
//! the server runs. On stdin EOF (stdio), SIGTERM or Ctrl-C the server stops taking requests,
//! waits for the ledger calls in flight and drops the ledger, which releases its lock.

mod http;
mod schemas;
mod tools;

use crate::{Config, Error, Ledger, OpenOptions};
use std::path::PathBuf;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Exit codes of `serve`.
pub const EXIT_OK: i32 = 0;
pub const EXIT_OTHER: i32 = 1;
pub const EXIT_USAGE: i32 = 2;
pub const EXIT_LOCKED: i32 = 5;
pub const EXIT_DAMAGED: i32 = 6;

/// Environment variable holding the bearer token for `serve --http` (alternative to
/// `--token-file`).
pub const TOKEN_ENV: &str = "ALLOCATION_LEDGER_TOKEN";

/// Arguments of `allocation-ledger serve`.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Serve Streamable HTTP at http://ADDR/mcp instead of MCP over stdio. ADDR is HOST:PORT
    /// (e.g. 127.0.0.1:8765, [::1]:8765, localhost:8765, 0.0.0.0:8765) or just PORT, which binds
    /// 127.0.0.1. Port 0 picks a free port; the bound address is printed on stderr as
    /// `listening on http://HOST:PORT/mcp`. A non-loopback HOST requires a bearer token.
    #[arg(long, value_name = "ADDR")]
    pub http: Option<String>,

    /// HTTP only: file holding the bearer token clients must send as `Authorization: Bearer
    /// TOKEN` (surrounding whitespace is ignored). The token may instead come from the
    /// environment variable ALLOCATION_LEDGER_TOKEN. Required when ADDR is not a loopback
    /// address; when given on loopback it is enforced there too.
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,

    /// HTTP only: also accept requests whose Origin header is ORIGIN (scheme://host[:port], a
    /// port of `*` matches any port; repeatable). Always accepted: http://localhost:*,
    /// http://127.0.0.1:*, http://[::1]:*. Requests without an Origin header are accepted;
    /// any other Origin gets 403.
    #[arg(long = "allowed-origin", value_name = "ORIGIN")]
    pub allowed_origins: Vec<String>,

    /// HTTP only: also accept requests whose Host header names HOST (host or host:port;
    /// repeatable). Loopback names and the bound address are always accepted. Binding 0.0.0.0
    /// or [::] without any --allowed-host turns the Host check off (the token still applies).
    #[arg(long = "allowed-host", value_name = "HOST")]
    pub allowed_hosts: Vec<String>,

    /// HTTP only: a connection that has not sent a whole request head (request line and
    /// headers) this many seconds after it started sending one is closed.
    #[arg(long, value_name = "N", default_value_t = http::HEADER_TIMEOUT_SECONDS, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub http_header_timeout_seconds: u64,

    /// HTTP only: a request whose body has not fully arrived this many seconds after its head
    /// is answered 408 and its connection closed.
    #[arg(long, value_name = "N", default_value_t = http::BODY_TIMEOUT_SECONDS, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub http_body_timeout_seconds: u64,

    /// HTTP only: a connection with no request in progress is closed after this many seconds
    /// (a new connection that sends nothing, or a kept-alive one between requests).
    #[arg(long, value_name = "N", default_value_t = http::IDLE_TIMEOUT_SECONDS, value_parser = clap::value_parser!(u64).range(1..=86400))]
    pub http_idle_timeout_seconds: u64,

    /// HTTP only: the most connections open at once (further capped by the open-file limit).
    /// At the bound a new connection closes the oldest one that has not completed a request
    /// head, or is refused with 503 if every open connection has.
    #[arg(long, value_name = "N", default_value_t = http::MAX_CONNECTIONS, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub http_max_connections: u64,

    /// How often, in seconds, the server checks for allocations past their deadline and
    /// records their expiry.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub expiry_interval_seconds: u64,
}

/// Global CLI options the server needs.
#[derive(Debug, Clone)]
pub struct ServeContext {
    pub data_dir: PathBuf,
    pub config_file: Option<PathBuf>,
}

/// Runs the server until shutdown; returns the process exit code: 0 after a clean shutdown,
/// 2 for invalid arguments or config, 5 if another process holds the ledger's write lock,
/// 6 if the ledger is damaged, 1 for anything else.
pub fn serve(ctx: ServeContext, args: ServeArgs) -> i32 {
    init_logging();

    // Everything about the HTTP setup is checked before the ledger is touched.
    let http_plan = match &args.http {
        Some(addr) => match http::HttpPlan::from_args(addr, &args) {
            Ok(plan) => Some(plan),
            Err(msg) => {
                eprintln!("allocation-ledger serve: {msg}");
                return EXIT_USAGE;
            }
        },
        None => {
            if args.token_file.is_some() || !args.allowed_origins.is_empty() || !args.allowed_hosts.is_empty() {
                eprintln!(
                    "allocation-ledger serve: --token-file, --allowed-origin and --allowed-host apply to --http only; \
                     over stdio the MCP client that starts the server is the only one talking to it"
                );
                return EXIT_USAGE;
            }
            None
        }
    };

    let config = match &ctx.config_file {
        Some(path) => match Config::from_file(path) {
            Ok(c) => Some(c),
            Err(e) => {
                eprintln!("allocation-ledger serve: invalid config: {e}");
                return EXIT_USAGE;
            }
        },
        None => None,
    };

    let ledger = match Ledger::open_with(&ctx.data_dir, OpenOptions { config, ..Default::default() }) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("allocation-ledger serve: {e}");
            return exit_code_for(&e);
        }
    };
    let report = ledger.recovery_report();
    tracing::info!(
        data_dir = %ctx.data_dir.display(),
        created = report.created,
        events_replayed = report.events_replayed,
        last_seq = report.last_seq,
        torn_tail = report.torn_tail.is_some(),
        "ledger opened"
    );

    let runtime =
        match tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("allocation-ledger-mcp").build() {
            Ok(rt) => rt,
            Err(e) => {
                eprintln!("allocation-ledger serve: cannot start the async runtime: {e}");
                return EXIT_OTHER;
            }
        };

    let tasks = TaskTracker::new();
    let period = Duration::from_secs(args.expiry_interval_seconds);
    let code = runtime.block_on(run(ledger.clone(), tasks, period, http_plan));

    // Whatever is still pending (a blocking stdin read that cannot be cancelled) is abandoned;
    // the ledger calls in flight have already finished in `run`.
    runtime.shutdown_background();
    drop(ledger);
    tracing::info!("server stopped");
    code
}

async fn run(ledger: Ledger, tasks: TaskTracker, period: Duration, http_plan: Option<http::HttpPlan>) -> i32 {
    let shutdown = CancellationToken::new();
    tokio::spawn(signal_watch(shutdown.clone()));
    let expiry = tokio::spawn(expiry_loop(ledger.clone(), tasks.clone(), period, shutdown.child_token()));

    let router = tools::LedgerTools::router(&ledger.with_state(|s| s.config.clone()));
    let factory = {
        let (ledger, tasks) = (ledger.clone(), tasks.clone());
        move || tools::LedgerTools::new(ledger.clone(), tasks.clone(), router.clone())
    };
    let result = match http_plan {
        Some(plan) => http::serve_http(plan, factory, shutdown.clone()).await,
        None => serve_stdio(factory(), shutdown.clone()).await,
    };

    shutdown.cancel();
    let _ = expiry.await;
    // Let the ledger calls in flight finish: each was acknowledged only once durable, and
    // their callers may still be waiting for the answer.
    tasks.close();
    tasks.wait().await;
    match result {
        Ok(()) => EXIT_OK,
        Err(msg) => {
            eprintln!("allocation-ledger serve: {msg}");
            EXIT_OTHER
        }
    }
}

async fn serve_stdio(handler: tools::LedgerTools, shutdown: CancellationToken) -> Result<(), String> {
    use rmcp::ServiceExt;
    tracing::info!("serving MCP over stdio");
    // `serve` returns once the client has sent `initialize` (2025-11-25 and older) or its
    // first request carrying 2026-07-28 `_meta`; `server/discover` is answered before that.
    let running = tokio::select! {
        r = handler.serve(rmcp::transport::stdio_pipes()) => match r {
            Ok(running) => running,
            Err(e) => {
                // Typically stdin closed before the client said anything.
                tracing::info!("stdio session ended before it started: {e}");
                return Ok(());
            }
        },
        _ = shutdown.cancelled() => return Ok(()),
    };
    let service_token = running.cancellation_token();
    tokio::select! {
        r = running.waiting() => {
            let reason = r.map_err(|e| format!("the MCP service failed: {e}"))?;
            tracing::info!(?reason, "stdio session ended");
        }
        _ = shutdown.cancelled() => service_token.cancel(),
    }
    Ok(())
}

/// Records expiries while the server runs: whenever the earliest deadline has passed, writes
/// the expiry events (the same as the `cleanup_expired` tool).
async fn expiry_loop(ledger: Ledger, tasks: TaskTracker, period: Duration, stop: CancellationToken) {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_error: Option<String> = None;
    let mut last_snapshot_error: Option<String> = None;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        // Snapshots are written in the background of writes, which succeed without them.
        let snapshot_error = ledger.status().last_snapshot_error;
        if snapshot_error != last_snapshot_error {
            match &snapshot_error {
                Some(e) => {
                    tracing::error!("writing a snapshot failed (the log is intact; opens replay more of it): {e}")
                }
                None => tracing::info!("snapshots are written again"),
            }
            last_snapshot_error = snapshot_error;
        }
        let due = ledger.next_deadline().is_some_and(|d| d <= ledger.now_micros());
        if !due {
            continue;
        }
        let l = ledger.clone();
        match tasks.spawn_blocking(move || l.cleanup_expired()).await {
            Ok(Ok(report)) => {
                last_error = None;
                if report.count > 0 {
                    let ids: Vec<String> = report.cleaned_up.iter().map(ToString::to_string).collect();
                    tracing::info!(count = report.count, ids = ?ids, "recorded expiries");
                }
            }
            Ok(Err(e)) => {
                let msg = e.to_string();
                if last_error.as_deref() != Some(msg.as_str()) {
                    tracing::error!("recording expiries failed: {msg}");
                }
                last_error = Some(msg);
            }
            Err(e) => tracing::error!("the expiry task failed: {e}"),
        }
    }
}

async fn signal_watch(shutdown: CancellationToken) {
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
                std::future::pending::<()>().await
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("interrupted; shutting down"),
        _ = term => tracing::info!("SIGTERM received; shutting down"),
        _ = shutdown.cancelled() => return,
    }
    shutdown.cancel();
}

fn exit_code_for(e: &Error) -> i32 {
    match e {
        Error::Locked { .. } => EXIT_LOCKED,
        Error::Damaged(_) | Error::Inconsistent { .. } => EXIT_DAMAGED,
        Error::InvalidInput { .. } => EXIT_USAGE,
        _ => EXIT_OTHER,
    }
}

/// Logs go to stderr (stdout is the stdio transport). `RUST_LOG` sets the filter, e.g.
/// `RUST_LOG=debug` or `RUST_LOG=warn,allocation_ledger=debug`.
fn init_logging() {
    use tracing_subscriber::filter::Targets;
    use tracing_subscriber::prelude::*;
    const DEFAULT: &str = "warn,allocation_ledger=info";
    let filter: Targets = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| DEFAULT.parse().expect("the default filter parses"));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(false);
    let _ = tracing_subscriber::registry().with(fmt).with(filter).try_init();
}
