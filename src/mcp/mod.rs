//! The MCP server: the ledger's tools over stdio ([`serve_stdio`](crate::mcp::serve_stdio),
//! `allocation-ledger serve`) and Streamable HTTP ([`serve_http`](crate::mcp::serve_http),
//! `allocation-ledger serve --http ADDR`, path `/mcp`), built on rmcp.
//!
//! Both protocol eras rmcp speaks are served: the `2025-11-25` handshake (`initialize`, then
//! `notifications/initialized`) and the stateless `2026-07-28` style (`server/discover`, the
//! protocol version in each request's `_meta`). Logs are `tracing` events (the CLI writes
//! them to stderr); on stdio, stdout carries nothing but MCP messages.
//!
//! The ledger API blocks (it fsyncs), so every call runs on tokio's blocking pool; concurrent
//! calls share fsyncs inside the ledger (group commit). A timer records expiries on time while
//! the server runs. On stdin EOF (stdio) or when the caller's shutdown future completes (the
//! CLI completes it on SIGTERM or Ctrl-C) the server stops taking requests and waits for the
//! ledger calls in flight; the caller then drops the ledger, which releases its lock.
//!
//! This is a plain library API: argument parsing, logging setup, the runtime and process
//! signals belong to the caller (the CLI's `serve` subcommand).

mod fixtures;
mod http;
mod resources;
mod schemas;
mod tools;

pub use http::{HttpOptions, BODY_TIMEOUT_SECONDS, HEADER_TIMEOUT_SECONDS, IDLE_TIMEOUT_SECONDS, MAX_CONNECTIONS};

use crate::Ledger;
use std::future::Future;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Options of both transports.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ServeOptions {
    /// How often the server checks for allocations past their deadline and records their
    /// expiry (the CLI's `--expiry-interval-seconds`, default 1 s).
    pub expiry_interval: Duration,
    /// Also serve the MCP conformance suite's fixture tools, resources and prompts
    /// (`test_simple_text`, `test://static-text`, ...), for conformance runs only.
    pub conformance_fixtures: bool,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions { expiry_interval: Duration::from_secs(1), conformance_fixtures: false }
    }
}

/// A failure that ended the server (a failed tool call is an answer to its client instead).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ServeError(String);

/// Serves MCP over this process's stdin and stdout until stdin closes or `shutdown`
/// completes, then waits for the ledger calls in flight. Must run inside a tokio runtime;
/// the caller should shut that runtime down without waiting (`shutdown_background`), since a
/// blocking stdin read cannot be cancelled.
pub async fn serve_stdio(
    ledger: Ledger,
    opts: ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    run(ledger, opts, None, shutdown).await
}

/// Serves Streamable HTTP at `http://ADDR/mcp` until `shutdown` completes, then closes the
/// connections gracefully and waits for the ledger calls in flight. Prints the bound address
/// on stderr as `allocation-ledger: listening on http://HOST:PORT/mcp`. Must run inside a
/// tokio runtime; it raises the process's soft open-file limit to the hard one, since each
/// connection holds a descriptor.
pub async fn serve_http(
    ledger: Ledger,
    opts: ServeOptions,
    http: HttpOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let plan = http::HttpPlan::new(http)?;
    run(ledger, opts, Some(plan), shutdown).await
}

async fn run(
    ledger: Ledger,
    opts: ServeOptions,
    http_plan: Option<http::HttpPlan>,
    shutdown_when: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let tasks = TaskTracker::new();
    let shutdown = CancellationToken::new();
    tokio::spawn(cancel_when(shutdown_when, shutdown.clone()));
    let expiry = tokio::spawn(expiry_loop(ledger.clone(), tasks.clone(), opts.expiry_interval, shutdown.child_token()));

    let hub = resources::Hub::new(shutdown.child_token());
    let watcher = tokio::spawn(resources::watch(ledger.clone(), hub.clone(), tasks.clone(), shutdown.child_token()));
    let fixtures = opts.conformance_fixtures;
    let router = tools::LedgerTools::router(&ledger.with_state(|s| s.config.clone()), fixtures);
    let factory = {
        let (ledger, tasks) = (ledger.clone(), tasks.clone());
        move || {
            let watch = resources::Session::new(hub.clone());
            tools::LedgerTools::new(ledger.clone(), tasks.clone(), router.clone(), watch, fixtures)
        }
    };
    let result = match http_plan {
        Some(plan) => http::serve_http(plan, ledger.clone(), factory, shutdown.clone()).await,
        None => stdio(factory(), shutdown.clone()).await,
    };

    shutdown.cancel();
    let _ = expiry.await;
    let _ = watcher.await;
    // Let the ledger calls in flight finish: each was acknowledged only once durable, and
    // their callers may still be waiting for the answer.
    tasks.close();
    tasks.wait().await;
    result.map_err(ServeError)
}

/// Cancels `token` when `shutdown` completes; gives up waiting once the server stopped by
/// itself (stdin closed).
async fn cancel_when(shutdown: impl Future<Output = ()>, token: CancellationToken) {
    tokio::select! {
        () = shutdown => token.cancel(),
        () = token.cancelled() => {}
    }
}

async fn stdio(handler: tools::LedgerTools, shutdown: CancellationToken) -> Result<(), String> {
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
        () = shutdown.cancelled() => return Ok(()),
    };
    let service_token = running.cancellation_token();
    tokio::select! {
        r = running.waiting() => {
            let reason = r.map_err(|e| format!("the MCP service failed: {e}"))?;
            tracing::info!(?reason, "stdio session ended");
        }
        () = shutdown.cancelled() => service_token.cancel(),
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
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        // Snapshots are written in the background of writes, which succeed without them.
        let snapshot_error = ledger.status().last_snapshot_error;
        if snapshot_error != last_snapshot_error {
            match &snapshot_error {
                Some(e) => {
                    tracing::error!("writing a snapshot failed (the log is intact; opens replay more of it): {e}");
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
