//! `GET /events?from_seq=N`: the log as a resumable Server-Sent Events stream, after Nomad's
//! `/v1/event/stream`. Each event is one SSE event whose `id` is its sequence number and whose
//! `data` is the event as `log --json` prints it, so a client that reconnects with
//! `Last-Event-ID: K` resumes at `K + 1` (the header wins over `from_seq`). Only durable events
//! are sent: the stream reads the segment files through a [`LogFollower`] up to the ledger's
//! durable sequence number, which it looks at every [`POLL_INTERVAL`] (a brief lock; the files
//! are read only when it moved), so the core library needs no hook and no tokio.
//!
//! A `from_seq` the log no longer holds is 410 Gone with a JSON body naming the oldest
//! sequence number it can serve; more than [`MAX_EVENT_STREAMS`] streams at once is 503. The
//! bearer token and the Host check apply as to `/mcp` (`http.rs` layers them over every route).

use super::checks::Checks;
use crate::{format_micros, Ledger, LogFollower, LoggedEvent};
use axum::extract::Request;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use hyper::body::{Bytes, Frame};
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

/// At most this many `/events` streams at once (each holds a connection, a task and a poll of
/// the files); one more is refused with 503 and `Retry-After`.
pub const MAX_EVENT_STREAMS: usize = 64;

/// How often a stream looks for newly durable events: the most an event waits before it is
/// sent.
pub const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// A comment line is sent after this long without an event, so that proxies and clients see
/// the stream is alive.
pub const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// At most this many events are read from the files per poll.
const BATCH: usize = 1024;

/// What every stream shares.
struct Streams {
    ledger: Ledger,
    slots: Arc<Semaphore>,
    shutdown: CancellationToken,
}

/// The route `/events` on `ledger`, behind the Host check (as `ops.rs`'s routes); its streams
/// end when `shutdown` is cancelled.
pub(super) fn routes(ledger: Ledger, checks: Checks, shutdown: CancellationToken) -> axum::Router {
    let streams = Arc::new(Streams { ledger, slots: Arc::new(Semaphore::new(MAX_EVENT_STREAMS)), shutdown });
    let checks = Arc::new(checks);
    axum::Router::new()
        .route("/events", axum::routing::get(move |req: Request| events(streams.clone(), req)))
        .route_layer(axum::middleware::from_fn_with_state(checks, super::checks::host_check))
}

/// A JSON error body with `status`.
fn refuse(status: StatusCode, kind: &str, message: &str, extra: Option<(&str, u64)>) -> Response {
    let mut body = serde_json::json!({"error": {"kind": kind, "message": message}});
    if let Some((k, v)) = extra {
        body["error"][k] = v.into();
    }
    (status, [(header::CONTENT_TYPE, "application/json")], format!("{body}\n")).into_response()
}

/// The first sequence number to send: after `Last-Event-ID`, else `from_seq`, else 1.
fn start_seq(req: &Request) -> Result<u64, &'static str> {
    if let Some(last) = req.headers().get("last-event-id") {
        let last = last.to_str().ok().and_then(|v| v.trim().parse::<u64>().ok());
        return last.map(|k| k.saturating_add(1)).ok_or("Last-Event-ID must be a sequence number");
    }
    let query = req.uri().query().unwrap_or("");
    match query.split('&').find_map(|kv| kv.strip_prefix("from_seq=")) {
        Some(v) => v.parse::<u64>().map(|n| n.max(1)).map_err(|_| "from_seq must be a sequence number (1 or more)"),
        None => Ok(1),
    }
}

async fn events(streams: Arc<Streams>, req: Request) -> Response {
    let from_seq = match start_seq(&req) {
        Ok(n) => n,
        Err(why) => return refuse(StatusCode::BAD_REQUEST, "invalid_input", why, None),
    };
    let Ok(permit) = streams.slots.clone().try_acquire_owned() else {
        let message = format!("at most {MAX_EVENT_STREAMS} event streams at once; try again later");
        let mut r = refuse(StatusCode::SERVICE_UNAVAILABLE, "busy", &message, None);
        r.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from_static("5"));
        return r;
    };
    let dir = streams.ledger.dir().to_path_buf();
    let opened = tokio::task::spawn_blocking(move || match crate::oldest_servable_seq(&dir)? {
        Some(oldest) if from_seq < oldest => Ok(Err(oldest)),
        _ => LogFollower::new(&dir, from_seq).map(Ok),
    })
    .await;
    let follower = match opened {
        Ok(Ok(Ok(f))) => f,
        Ok(Ok(Err(oldest))) => {
            let message = crate::gone_error(from_seq, oldest).to_string();
            return refuse(StatusCode::GONE, "gone", &message, Some(("oldest_seq", oldest)));
        }
        Ok(Err(e)) => return refuse(StatusCode::INTERNAL_SERVER_ERROR, e.kind().as_str(), &e.to_string(), None),
        Err(e) => return refuse(StatusCode::INTERNAL_SERVER_ERROR, "io", &e.to_string(), None),
    };
    let (tx, rx) = mpsc::channel::<Bytes>(4);
    tokio::spawn(pump(streams, follower, tx, permit));
    let mut headers = HeaderMap::new();
    headers.insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/event-stream"));
    headers.insert(header::CACHE_CONTROL, header::HeaderValue::from_static("no-cache"));
    headers.insert("x-accel-buffering", header::HeaderValue::from_static("no"));
    (StatusCode::OK, headers, axum::body::Body::new(ChannelBody { rx })).into_response()
}

/// One SSE event per logged event: `id` its sequence number, `data` the event as `log --json`
/// prints it (with `at`, its timestamp in RFC 3339).
fn sse_event(e: &LoggedEvent) -> String {
    let mut v = serde_json::to_value(e).unwrap_or_default();
    if let Some(obj) = v.as_object_mut() {
        obj.insert("at".into(), format_micros(e.event.ts_us).into());
    }
    format!("id: {}\ndata: {v}\n\n", e.seq)
}

/// Sends the stream's events as they become durable until the client goes, the server shuts
/// down or the log cannot be read (an `error` event, then the end).
async fn pump(
    streams: Arc<Streams>,
    mut follower: LogFollower,
    tx: mpsc::Sender<Bytes>,
    _permit: OwnedSemaphorePermit,
) {
    let hello = format!("retry: 1000\n: events from sequence number {}\n\n", follower.next_seq());
    if tx.send(Bytes::from(hello)).await.is_err() {
        return;
    }
    let mut quiet_since = Instant::now();
    loop {
        // A read-only ledger's durable point does not move: its files are followed as they are.
        let ledger = &streams.ledger;
        let upto = (!ledger.is_read_only()).then(|| ledger.status().durable_seq);
        let mut text = String::new();
        if upto.is_none_or(|u| u >= follower.next_seq()) {
            let polled = tokio::task::spawn_blocking(move || {
                let events = follower.poll(upto, BATCH);
                (follower, events)
            })
            .await;
            let Ok((back, events)) = polled else { return };
            follower = back;
            match events {
                Ok(events) => text = events.iter().map(sse_event).collect(),
                Err(e) => {
                    let body = serde_json::json!({"error": {"kind": e.kind().as_str(), "message": e.to_string()}});
                    let _ = tx.send(Bytes::from(format!("event: error\ndata: {body}\n\n"))).await;
                    return;
                }
            }
        }
        if text.is_empty() && quiet_since.elapsed() >= KEEP_ALIVE {
            text = ": keep-alive\n\n".into();
        }
        if !text.is_empty() {
            quiet_since = Instant::now();
            if tx.send(Bytes::from(text)).await.is_err() {
                return;
            }
            continue;
        }
        tokio::select! {
            () = streams.shutdown.cancelled() => return,
            () = tx.closed() => return,
            () = tokio::time::sleep(POLL_INTERVAL) => {}
        }
    }
}

/// A response body fed by the stream's task; it ends when the task drops its sender.
struct ChannelBody {
    rx: mpsc::Receiver<Bytes>,
}

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.rx.poll_recv(cx).map(|chunk| chunk.map(|bytes| Ok(Frame::data(bytes))))
    }
}
