//! The accept loop and the life of each connection: TCP_NODELAY, the bound on open connections,
//! and the header and idle timeouts (the body timeout is the body reader's, in `http.rs`).
//!
//! Each connection is watched by its own task, which knows whether a request is in progress
//! (the service marks a request from the moment hyper hands it over until its response body
//! is dropped) and whether bytes of a new request head have arrived since the last response
//! (the socket wrapper notes the first read). From that it arms one deadline:
//! - no request in progress, no bytes: the idle timeout (a new connection, or a kept-alive one
//!   between requests);
//! - no request in progress, bytes arrived: the header timeout, from the first byte;
//! - a request in progress: none here (the body reader has its own).
//!
//! hyper's own `header_read_timeout` is not used: its timer starts whenever the connection
//! waits for a head, so it would also close every kept-alive connection after the header limit.

use axum::body::Body;
use axum::extract::Request;
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use std::collections::BTreeMap;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The timeouts and the bound that the accept loop enforces.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConnLimits {
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
}

/// What the watcher of one connection knows about it.
struct ConnState {
    id: u64,
    /// Requests handed to the service whose response body has not been dropped yet.
    in_flight: AtomicUsize,
    /// Whether any request head was ever completed on this connection.
    served: AtomicBool,
    /// Whether bytes of a new request head arrived since the connection went idle.
    head_started: AtomicBool,
    /// When the current wait (idle, or for the rest of a head) began, in ms since `epoch`.
    since_ms: AtomicU64,
    epoch: Instant,
    changed: Notify,
    evicted: CancellationToken,
}

impl ConnState {
    fn new(id: u64) -> ConnState {
        ConnState {
            id,
            in_flight: AtomicUsize::new(0),
            served: AtomicBool::new(false),
            head_started: AtomicBool::new(false),
            since_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            changed: Notify::new(),
            evicted: CancellationToken::new(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Bytes arrived on the socket.
    fn on_read(&self) {
        if self.in_flight.load(Ordering::Acquire) == 0 && !self.head_started.swap(true, Ordering::AcqRel) {
            self.since_ms.store(self.now_ms(), Ordering::Release);
            self.changed.notify_one();
        }
    }

    fn begin_request(self: &Arc<Self>) -> RequestGuard {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.served.store(true, Ordering::Release);
        self.changed.notify_one();
        RequestGuard(self.clone())
    }

    /// When the connection is to be closed if nothing changes, and whether that is the header
    /// timeout (else the idle one); `None` while a request is in progress.
    fn deadline(&self, limits: &ConnLimits) -> Option<(Instant, bool)> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let head = self.head_started.load(Ordering::Acquire);
        let since = self.epoch + Duration::from_millis(self.since_ms.load(Ordering::Acquire));
        Some((since + if head { limits.header_timeout } else { limits.idle_timeout }, head))
    }

    /// May be closed to make room: nothing in flight and no request head ever completed.
    fn evictable(&self) -> bool {
        !self.served.load(Ordering::Acquire) && self.in_flight.load(Ordering::Acquire) == 0
    }
}

/// Marks a request in progress until the response body is dropped.
struct RequestGuard(Arc<ConnState>);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        let s = &self.0;
        s.head_started.store(false, Ordering::Release);
        s.since_ms.store(s.now_ms(), Ordering::Release);
        s.in_flight.fetch_sub(1, Ordering::AcqRel);
        s.changed.notify_one();
    }
}

/// The socket, noting when bytes arrive.
struct TrackedStream {
    inner: TcpStream,
    state: Arc<ConnState>,
}

impl AsyncRead for TrackedStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.state.on_read();
        }
        r
    }
}

impl AsyncWrite for TrackedStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The open connections, oldest first.
struct Registry {
    conns: Mutex<BTreeMap<u64, Arc<ConnState>>>,
    max: usize,
}

impl Registry {
    /// Registers a new connection, closing the oldest evictable one at the bound; false if the
    /// bound is reached and no connection may be closed.
    fn admit(&self, state: &Arc<ConnState>) -> bool {
        let mut conns = self.conns.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if conns.len() >= self.max {
            let victim = conns.values().find(|c| c.evictable()).map(|c| c.id);
            match victim.and_then(|id| conns.remove(&id)) {
                Some(v) => {
                    tracing::debug!(connection = v.id, "closing the oldest connection without a request to make room");
                    v.evicted.cancel();
                }
                None => return false,
            }
        }
        conns.insert(state.id, state.clone());
        true
    }

    fn remove(&self, id: u64) {
        self.conns.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&id);
    }
}

/// What a connection refused at the bound gets before it is closed (written only if the socket
/// takes it at once).
const REFUSED_AT_BOUND: &[u8] =
    b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nContent-Type: text/plain\r\n\
Content-Length: 38\r\nRetry-After: 1\r\n\r\ntoo many open connections; retry later";

/// Accepts connections until `shutdown`, then waits for the connections' requests in flight
/// (those without one are closed at once).
pub(crate) async fn serve(
    listener: TcpListener,
    router: axum::Router,
    limits: ConnLimits,
    shutdown: CancellationToken,
) -> Result<(), String> {
    let registry = Arc::new(Registry { conns: Mutex::new(BTreeMap::new()), max: limits.max_connections });
    let tasks = TaskTracker::new();
    let mut next_id = 0u64;
    let mut refused = 0u64;
    loop {
        let (stream, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors or memory: wait a little rather than spin; anything
                    // else concerns only the connection that failed.
                    if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)) {
                        tracing::warn!("accept failed: {e}; retrying in 10 ms");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    } else {
                        tracing::debug!("accept failed: {e}");
                    }
                    continue;
                }
            },
        };
        // The SSE response goes out in several writes; with Nagle's algorithm the later ones
        // wait for the client's delayed ACK (~40 ms per call on a kept-alive connection).
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!("cannot set TCP_NODELAY for {peer}: {e}");
        }
        next_id += 1;
        let state = Arc::new(ConnState::new(next_id));
        if !registry.admit(&state) {
            // Logged at 1, 2, 4, 8, ... refusals: a flood must not flood the log too.
            refused += 1;
            if refused.is_power_of_two() {
                tracing::warn!(
                    max_connections = limits.max_connections,
                    refused_so_far = refused,
                    "refusing a connection from {peer}: every open connection has completed a request"
                );
            }
            let _ = stream.try_write(REFUSED_AT_BOUND);
            continue;
        }
        tasks.spawn(serve_connection(stream, state, router.clone(), limits, shutdown.clone(), registry.clone()));
    }
    drop(listener);
    tasks.close();
    tasks.wait().await;
    Ok(())
}

async fn serve_connection(
    stream: TcpStream,
    state: Arc<ConnState>,
    router: axum::Router,
    limits: ConnLimits,
    shutdown: CancellationToken,
    registry: Arc<Registry>,
) {
    let io = TokioIo::new(TrackedStream { inner: stream, state: state.clone() });
    let service = {
        let state = state.clone();
        hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
            let guard = state.begin_request();
            let router = router.clone();
            async move {
                let response = tower::ServiceExt::oneshot(router, req.map(Body::new)).await?;
                // The guard lives as long as the response body: the request is in progress
                // until hyper has written it all (or dropped it).
                Ok::<_, std::convert::Infallible>(response.map(move |body| {
                    Body::new(body.map_frame(move |frame| {
                        let _ = &guard;
                        frame
                    }))
                }))
            }
        })
    };
    let conn = hyper::server::conn::http1::Builder::new()
        // The response head and the first body frame in one write where possible.
        .writev(false)
        .serve_connection(io, service);
    tokio::pin!(conn);
    let mut graceful = false;
    loop {
        let deadline = state.deadline(&limits);
        let sleep = async {
            match deadline {
                Some((at, _)) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(connection = state.id, "connection ended: {e}");
                }
                break;
            }
            () = state.changed.notified() => {}
            () = sleep => {
                // Closed only if nothing changed meanwhile.
                if let Some((at, header)) = state.deadline(&limits) {
                    if at <= Instant::now() {
                        if header {
                            tracing::debug!(connection = state.id, "closing: the request head did not arrive in time");
                        }
                        break;
                    }
                }
            }
            () = state.evicted.cancelled() => break,
            () = shutdown.cancelled(), if !graceful => {
                // Nothing to finish: close now. Otherwise hyper closes once the response is out.
                if state.in_flight.load(Ordering::Acquire) == 0 {
                    break;
                }
                conn.as_mut().graceful_shutdown();
                graceful = true;
            }
        }
    }
    registry.remove(state.id);
}

/// Raises the soft limit on open files to the hard limit (each connection holds a descriptor);
/// returns the soft limit in force afterwards, if it can be read.
#[cfg(not(unix))]
pub(crate) fn raise_open_file_limit() -> Option<u64> {
    None
}

/// Raises the soft limit on open files to the hard limit (each connection holds a descriptor);
/// returns the soft limit in force afterwards, if it can be read.
#[cfg(unix)]
pub(crate) fn raise_open_file_limit() -> Option<u64> {
    // SAFETY: getrlimit/setrlimit only read and write the struct passed to them.
    unsafe {
        let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return None;
        }
        if lim.rlim_cur < lim.rlim_max {
            // An unlimited hard limit cannot be the soft one for descriptors (Linux caps it at
            // fs.nr_open); 1M is what that usually is.
            let target = if lim.rlim_max == libc::RLIM_INFINITY { 1 << 20 } else { lim.rlim_max };
            let raised = libc::rlimit { rlim_cur: target, rlim_max: lim.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim.rlim_cur = target;
            } else {
                tracing::warn!(
                    "cannot raise the open-file limit from {} to {target}: {}",
                    lim.rlim_cur,
                    io::Error::last_os_error()
                );
            }
        }
        #[allow(clippy::unnecessary_cast)] // rlim_t is not u64 everywhere
        Some(lim.rlim_cur as u64)
    }
}
