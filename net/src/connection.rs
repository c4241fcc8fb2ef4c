//! One served connection: hyper's HTTP/1.1 over the prepared stream, and the timeouts
//! [`crate::Limits`] sets, kept here rather than by hyper (see [`serve_connection`]).

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::connect_info::ConnectInfo;
use axum::Router;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;
use tracing::debug;

use crate::{ConnStats, Limits};

/// Serves one connection until it closes, times out or the server shuts down.
///
/// The timeouts are this loop's, not hyper's (hyper's header-read timer also runs while a
/// keep-alive connection waits for its next request, which would cut keep-alive to the
/// header-read timeout): [`Activity::deadline`] says which applies now.
pub(crate) async fn serve_connection<S, Info>(
    stream: S,
    info: Info,
    app: Router,
    limits: Limits,
    stats: &ConnStats,
    stop: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    Info: Clone + Send + Sync + 'static,
{
    let activity = Arc::new(Activity::new());
    let io = Watched { io: stream, activity: Arc::clone(&activity) };
    let on_request = Arc::clone(&activity);
    let service = hyper::service::service_fn(move |mut request: hyper::Request<hyper::body::Incoming>| {
        request.extensions_mut().insert(ConnectInfo(info.clone()));
        let guard = InFlight::start(Arc::clone(&on_request));
        let answer = app.clone().oneshot(request);
        async move {
            let response = answer.await?;
            Ok::<_, std::convert::Infallible>(response.map(|body| Guarded { body, _guard: guard }))
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(None)
        .serve_connection(hyper_util::rt::TokioIo::new(io), service);
    let mut conn = std::pin::pin!(conn);
    let mut draining = false;
    // The keep-alive ran out and hyper was asked to close: it does once its last answer is
    // flushed; only a peer that stops reading it meets the idle timeout then.
    let mut closing = false;
    let deadline = |closing: bool| {
        if closing {
            (activity.at(activity.last_ms.load(Relaxed)) + limits.idle_timeout, Expiry::Idle)
        } else {
            activity.deadline(&limits)
        }
    };
    loop {
        let (at, _) = deadline(closing);
        let changed = activity.changed.notified();
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            () = tokio::time::sleep_until(at) => {
                let (at, expired) = deadline(closing);
                if at <= Instant::now() {
                    match expired {
                        Expiry::Head => {
                            stats.header_timeouts.fetch_add(1, Relaxed);
                            debug!("connection closed: no complete request head in time");
                        }
                        Expiry::Idle => {
                            if !closing {
                                stats.idle_closed.fetch_add(1, Relaxed);
                            }
                            debug!("connection closed: idle");
                        }
                        Expiry::KeepAlive => {
                            stats.idle_closed.fetch_add(1, Relaxed);
                            debug!("connection closing: idle between requests");
                            conn.as_mut().graceful_shutdown();
                            (closing, draining) = (true, true);
                            continue;
                        }
                    }
                    return;
                }
            }
            () = changed => {}
            () = stop.cancelled(), if !draining => {
                conn.as_mut().graceful_shutdown();
                draining = true;
            }
        }
    }
}

/// Which timeout a connection's deadline is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expiry {
    /// Waiting for a request head (the first, or one whose first byte arrived).
    Head,
    /// A request in flight and no byte moving.
    Idle,
    /// Answered, idle between requests.
    KeepAlive,
}

/// No time recorded (in the millisecond fields of [`Activity`]).
const NEVER: u64 = u64::MAX;

/// When a connection last moved a byte, and where it is between requests.
#[derive(Debug)]
struct Activity {
    base: Instant,
    /// Milliseconds after `base`.
    last_ms: AtomicU64,
    /// Requests whose answer is not completely handed to hyper yet.
    in_flight: AtomicU64,
    /// Requests received.
    served: AtomicU64,
    /// When the last answer was complete (milliseconds after `base`).
    idle_since_ms: AtomicU64,
    /// When the first byte after that arrived ([`NEVER`]: none yet).
    head_started_ms: AtomicU64,
    /// Woken when the deadline may have moved earlier.
    changed: tokio::sync::Notify,
}

impl Activity {
    fn new() -> Self {
        Activity {
            base: Instant::now(),
            last_ms: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            served: AtomicU64::new(0),
            idle_since_ms: AtomicU64::new(0),
            head_started_ms: AtomicU64::new(NEVER),
            changed: tokio::sync::Notify::new(),
        }
    }

    /// Milliseconds since `base`, rounded up: a deadline computed from it is never early (the
    /// truncated value let a stalled head close 0.2 ms before its header-read timeout).
    fn now_ms(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_micros().div_ceil(1000)).unwrap_or(NEVER - 1)
    }

    fn at(&self, ms: u64) -> Instant {
        self.base + Duration::from_millis(ms)
    }

    /// Bytes moved; `read`: bytes came in.
    fn touch(&self, read: bool) {
        let now = self.now_ms();
        self.last_ms.store(now, Relaxed);
        if read
            && self.in_flight.load(Relaxed) == 0
            && self.head_started_ms.compare_exchange(NEVER, now, Relaxed, Relaxed).is_ok()
        {
            // The next request started: its head has the header-read timeout from now on.
            self.changed.notify_one();
        }
    }

    /// When the connection is to be closed if nothing changes, and why.
    fn deadline(&self, limits: &Limits) -> (Instant, Expiry) {
        if self.in_flight.load(Relaxed) > 0 {
            return (self.at(self.last_ms.load(Relaxed)) + limits.idle_timeout, Expiry::Idle);
        }
        if self.served.load(Relaxed) == 0 {
            return (self.base + limits.header_read_timeout, Expiry::Head);
        }
        match self.head_started_ms.load(Relaxed) {
            NEVER => {
                (self.at(self.idle_since_ms.load(Relaxed)) + limits.keep_alive_timeout, Expiry::KeepAlive)
            }
            started => (self.at(started) + limits.header_read_timeout, Expiry::Head),
        }
    }
}

/// A request in flight on a connection, from its complete head until its answer's body is
/// dropped (hyper drops it once written, or with the connection).
struct InFlight(Arc<Activity>);

impl InFlight {
    fn start(activity: Arc<Activity>) -> Self {
        activity.in_flight.fetch_add(1, Relaxed);
        activity.served.fetch_add(1, Relaxed);
        activity.head_started_ms.store(NEVER, Relaxed);
        activity.changed.notify_one();
        InFlight(activity)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let now = self.0.now_ms();
        self.0.idle_since_ms.store(now, Relaxed);
        if self.0.in_flight.fetch_sub(1, Relaxed) == 1 {
            self.0.changed.notify_one();
        }
    }
}

/// An answer's body, holding its request's [`InFlight`] until hyper drops it.
struct Guarded {
    body: axum::body::Body,
    _guard: InFlight,
}

impl hyper::body::Body for Guarded {
    type Data = hyper::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// A stream that records when bytes last moved through it.
struct Watched<S> {
    io: S,
    activity: Arc<Activity>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.touch(true);
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch(false);
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch(false);
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
