//! Connections: the accept loop, under caps on the connections open in total and from one client
//! address, and each connection served by hyper (HTTP/1.1, plain or after its TLS handshake) under
//! two deadlines: a request's header must arrive within the header-read timeout (counted from the
//! connection's start, or from the first byte of a request that follows another), and a
//! keep-alive connection with no request in progress is closed after the idle timeout. So sockets
//! that never finish a request, or sit idle, are closed, and one client cannot use up the
//! process's file descriptors.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::Request;
use axum::Router;
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tower_service::Service;

use crate::peer::Peer;
use crate::tls::Tls;

/// How long a client has to send a request's header, unless told otherwise.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a keep-alive connection may wait for its next request, unless told otherwise.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Connections open at once, in total, unless told otherwise (and unless the file descriptor
/// limit allows fewer).
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Connections open at once from one client address, unless told otherwise.
pub const DEFAULT_MAX_CONNECTIONS_PER_ADDRESS: usize = 1_000;
/// File descriptors kept for the rest of the process (database, files, outgoing connections)
/// when the connection cap is sized from the descriptor limit.
const RESERVED_FDS: u64 = 256;
/// At most one log line per cap in this interval, with the count of refusals since the last.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// The timeouts and caps of a server's connections.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// A connection's request header must be complete this long after the connection opened
    /// (TLS handshake included) or after the first byte of a later request arrived.
    pub header_read_timeout: Duration,
    /// A connection with no request in progress is closed after this long without a new one.
    pub idle_timeout: Duration,
    /// Connections open at once, in total; past it new connections are closed at once. Lowered
    /// to what the process's file descriptor limit allows.
    pub max_connections: usize,
    /// Connections open at once from one client IP address; 0: no cap per address.
    pub max_per_address: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_per_address: DEFAULT_MAX_CONNECTIONS_PER_ADDRESS,
        }
    }
}

/// Why a connection was refused or closed, for metrics and logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The cap on connections in total was reached.
    Total,
    /// The cap on connections from one address was reached.
    PerAddress,
}

/// The connections of one server: its limits, what is open, and the counts for `/metrics`.
pub struct Gate {
    limits: Limits,
    /// The cap in force: `limits.max_connections`, or less where file descriptors are fewer.
    max_connections: usize,
    open: AtomicUsize,
    per_address: Mutex<HashMap<IpAddr, usize>>,
    accepted: AtomicU64,
    refused_total: AtomicU64,
    refused_per_address: AtomicU64,
    header_timeouts: AtomicU64,
    idle_timeouts: AtomicU64,
    /// When each cap was last logged, and refusals since.
    logged: Mutex<[(Option<Instant>, u64); 2]>,
}

impl Gate {
    pub fn new(limits: Limits) -> Self {
        let max_connections = sized_to_fds(limits.max_connections, fd_limit());
        if max_connections < limits.max_connections {
            tracing::warn!(
                configured = limits.max_connections,
                used = max_connections,
                "the open file limit (ulimit -n) allows fewer connections than --max-connections: raise it to \
                 serve more"
            );
        }
        Self {
            limits,
            max_connections,
            open: AtomicUsize::new(0),
            per_address: Mutex::new(HashMap::new()),
            accepted: AtomicU64::new(0),
            refused_total: AtomicU64::new(0),
            refused_per_address: AtomicU64::new(0),
            header_timeouts: AtomicU64::new(0),
            idle_timeouts: AtomicU64::new(0),
            logged: Mutex::new([(None, 0); 2]),
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The cap on connections in total in force.
    pub fn max_connections(&self) -> usize {
        self.max_connections
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Connections accepted since the start.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Connections refused since the start because of `why`.
    pub fn refused(&self, why: Refusal) -> u64 {
        match why {
            Refusal::Total => self.refused_total.load(Ordering::Relaxed),
            Refusal::PerAddress => self.refused_per_address.load(Ordering::Relaxed),
        }
    }

    /// Connections closed since the start because a header did not arrive in time (`header`) or
    /// because they stayed idle (`idle`).
    pub fn timeouts(&self) -> (u64, u64) {
        (self.header_timeouts.load(Ordering::Relaxed), self.idle_timeouts.load(Ordering::Relaxed))
    }

    /// Admits a connection from `ip`, or says which cap refuses it. The slot frees its place
    /// when dropped.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Slot, Refusal> {
        let ip = ip.to_canonical();
        if self.open.fetch_add(1, Ordering::Relaxed) >= self.max_connections {
            self.open.fetch_sub(1, Ordering::Relaxed);
            self.refuse(Refusal::Total, ip);
            return Err(Refusal::Total);
        }
        if self.limits.max_per_address > 0 {
            let mut map = self.per_address.lock().unwrap_or_else(|p| p.into_inner());
            let n = map.entry(ip).or_insert(0);
            if *n >= self.limits.max_per_address {
                drop(map);
                self.open.fetch_sub(1, Ordering::Relaxed);
                self.refuse(Refusal::PerAddress, ip);
                return Err(Refusal::PerAddress);
            }
            *n += 1;
        }
        self.accepted.fetch_add(1, Ordering::Relaxed);
        Ok(Slot { gate: Arc::clone(self), ip })
    }

    fn refuse(&self, why: Refusal, ip: IpAddr) {
        let (counter, i) = match why {
            Refusal::Total => (&self.refused_total, 0),
            Refusal::PerAddress => (&self.refused_per_address, 1),
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let mut logged = self.logged.lock().unwrap_or_else(|p| p.into_inner());
        let (last, since) = &mut logged[i];
        *since += 1;
        if last.is_some_and(|t| t.elapsed() < LOG_EVERY) {
            return;
        }
        let refused = std::mem::take(since);
        *last = Some(Instant::now());
        drop(logged);
        match why {
            Refusal::Total => tracing::warn!(
                addr = %ip, open = self.open(), max_connections = self.max_connections, refused,
                "connection refused: the server has as many connections open as --max-connections allows"
            ),
            Refusal::PerAddress => tracing::warn!(
                addr = %ip, max_per_address = self.limits.max_per_address, refused,
                "connection refused: this address has as many connections open as \
                 --max-connections-per-address allows"
            ),
        }
    }
}

/// A connection's place under the caps, freed when dropped.
pub struct Slot {
    gate: Arc<Gate>,
    ip: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.gate.open.fetch_sub(1, Ordering::Relaxed);
        if self.gate.limits.max_per_address > 0 {
            let mut map = self.gate.per_address.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(n) = map.get_mut(&self.ip) {
                *n -= 1;
                if *n == 0 {
                    map.remove(&self.ip);
                }
            }
        }
    }
}

/// The process's open file limit (the soft `RLIMIT_NOFILE`), when known: read from
/// `/proc/self/limits` on Linux.
fn fd_limit() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    parse_fd_limit(&text)
}

fn parse_fd_limit(limits: &str) -> Option<u64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..].split_whitespace().next()?.parse().ok()
}

/// The connection cap that leaves [`RESERVED_FDS`] (or a quarter of the limit, if less) of the
/// descriptor limit to the rest of the process.
fn sized_to_fds(configured: usize, fds: Option<u64>) -> usize {
    let Some(fds) = fds else { return configured.max(1) };
    let spare = fds.saturating_sub(RESERVED_FDS.min(fds / 4));
    configured.min(usize::try_from(spare).unwrap_or(usize::MAX)).max(1)
}

/// Serves `app` on `listener` (over TLS with `tls`) until `shutdown` resolves, then lets the
/// connections finish their requests and waits for them. Handlers see each connection's
/// [`Peer`] as `ConnectInfo<Peer>`.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    tls: Option<Tls>,
    gate: Arc<Gate>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        let (tcp, addr) = match accepted {
            Ok(accepted) => accepted,
            Err(e) if is_connection_error(&e) => continue,
            Err(e) => {
                // Out of file descriptors, most likely: wait for some to be freed.
                tracing::error!(error = %e, "cannot accept connections");
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(100)) => continue,
                    () = &mut shutdown => break,
                }
            }
        };
        let Ok(slot) = gate.admit(addr.ip()) else { continue };
        let mut tcp = tcp;
        crate::set_nodelay(&mut tcp);
        let (app, tls, gate, stop) = (app.clone(), tls.clone(), Arc::clone(&gate), stop_rx.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let started = Instant::now();
            match tls {
                None => serve_connection(tcp, Peer { addr, client_cert: None }, app, &gate, stop, started).await,
                Some(tls) => {
                    if let Some((stream, peer)) = tls.handshake(tcp, addr).await {
                        serve_connection(stream, peer, app, &gate, stop, started).await;
                    }
                }
            }
        });
    }
    drop(listener);
    stop_tx.send_replace(true);
    drop(stop_rx);
    // Every connection holds a receiver: they are all gone when the channel closes.
    stop_tx.closed().await;
    Ok(())
}

fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
    )
}

/// One connection, until the client closes it, a deadline passes, or the server stops.
async fn serve_connection<I>(
    io: I,
    peer: Peer,
    app: Router,
    gate: &Gate,
    mut stop: watch::Receiver<bool>,
    started: Instant,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let activity = Arc::new(Activity::new(started));
    let io = TokioIo::new(Watched { io, activity: Arc::clone(&activity) });
    let addr = peer.addr;
    let info = ConnectInfo(peer);
    let requests = Arc::clone(&activity);
    let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
        req.extensions_mut().insert(info.clone());
        let request = requests.begin();
        let mut app = app.clone();
        async move {
            let resp = match app.call(req).await {
                Ok(resp) => resp,
                Err(never) => match never {},
            };
            Ok::<_, Infallible>(resp.map(|body| Body::new(Tracked { body, _request: request })))
        }
    });
    let conn = hyper::server::conn::http1::Builder::new().serve_connection(io, service);
    tokio::pin!(conn);
    let limits = gate.limits();
    let mut stopping = false;
    loop {
        let deadline = activity.deadline(limits);
        tokio::select! {
            done = conn.as_mut() => {
                if let Err(e) = done {
                    tracing::debug!(%addr, error = %e, "connection ended with an error");
                }
                return;
            }
            () = tokio::time::sleep_until(deadline.into()) => {
                if let Some(kind) = activity.expired(limits, Instant::now()) {
                    match kind {
                        Expiry::Header => gate.header_timeouts.fetch_add(1, Ordering::Relaxed),
                        Expiry::Idle => gate.idle_timeouts.fetch_add(1, Ordering::Relaxed),
                    };
                    tracing::debug!(%addr, ?kind, "connection closed: timeout");
                    // Dropping the connection closes the socket; no request is in progress.
                    return;
                }
            }
            _ = stop.wait_for(|s| *s), if !stopping => {
                stopping = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

/// Which deadline closed a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expiry {
    Header,
    Idle,
}

const NONE: u64 = u64::MAX;

/// What a connection is doing, for its deadlines. Times are milliseconds since its start.
struct Activity {
    start: Instant,
    /// Requests whose response is not sent yet.
    busy: AtomicU32,
    /// A request was received: between requests the idle timeout applies.
    served: AtomicBool,
    /// When the last response was sent.
    idle_since: AtomicU64,
    /// When the first byte of the next request arrived ([`NONE`]: not yet).
    first_byte: AtomicU64,
}

impl Activity {
    fn new(start: Instant) -> Self {
        Self {
            start,
            busy: AtomicU32::new(0),
            served: AtomicBool::new(false),
            idle_since: AtomicU64::new(0),
            first_byte: AtomicU64::new(NONE),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(NONE - 1)
    }

    /// Bytes arrived.
    fn read(&self) {
        if self.busy.load(Ordering::Relaxed) == 0 && self.first_byte.load(Ordering::Relaxed) == NONE {
            self.first_byte.store(self.now_ms(), Ordering::Relaxed);
        }
    }

    /// A request's header arrived; its response is sent when the guard is dropped.
    fn begin(self: &Arc<Self>) -> InFlight {
        self.busy.fetch_add(1, Ordering::Relaxed);
        self.served.store(true, Ordering::Relaxed);
        self.first_byte.store(NONE, Ordering::Relaxed);
        InFlight(Arc::clone(self))
    }

    /// When to look again: the deadline that applies now (a busy connection has none, and is
    /// looked at again an idle timeout later).
    fn deadline(&self, limits: &Limits) -> Instant {
        let at = |ms: u64, after: Duration| self.start + Duration::from_millis(ms) + after;
        if self.busy.load(Ordering::Relaxed) > 0 {
            return Instant::now() + limits.idle_timeout;
        }
        match self.first_byte.load(Ordering::Relaxed) {
            NONE if !self.served.load(Ordering::Relaxed) => at(0, limits.header_read_timeout),
            NONE => at(self.idle_since.load(Ordering::Relaxed), limits.idle_timeout),
            first => at(first, limits.header_read_timeout),
        }
    }

    /// Which deadline has passed at `now`, if any.
    fn expired(&self, limits: &Limits, now: Instant) -> Option<Expiry> {
        if self.busy.load(Ordering::Relaxed) > 0 || self.deadline(limits) > now {
            return None;
        }
        let idle = self.served.load(Ordering::Relaxed) && self.first_byte.load(Ordering::Relaxed) == NONE;
        Some(if idle { Expiry::Idle } else { Expiry::Header })
    }
}

/// A request in progress; dropped when its response was sent (or abandoned).
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let a = &self.0;
        if a.busy.fetch_sub(1, Ordering::Relaxed) == 1 {
            a.idle_since.store(a.now_ms(), Ordering::Relaxed);
            a.first_byte.store(NONE, Ordering::Relaxed);
        }
    }
}

/// A response body that ends its request when it is dropped (hyper drops it once sent).
struct Tracked {
    body: Body,
    _request: InFlight,
}

impl http_body::Body for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The connection's I/O, noting when bytes arrive.
struct Watched<I> {
    io: I,
    activity: Arc<Activity>,
}

impl<I: AsyncRead + Unpin> AsyncRead for Watched<I> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.read();
        }
        polled
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Watched<I> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn the_cap_leaves_descriptors_to_the_rest_of_the_process() {
        assert_eq!(sized_to_fds(10_000, None), 10_000);
        assert_eq!(sized_to_fds(10_000, Some(1_048_576)), 10_000);
        assert_eq!(sized_to_fds(10_000, Some(1024)), 768);
        assert_eq!(sized_to_fds(10_000, Some(100)), 75);
        assert_eq!(sized_to_fds(0, Some(100)), 1);
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max open files            1024                 524288               files     \n";
        assert_eq!(parse_fd_limit(limits), Some(1024));
        assert_eq!(parse_fd_limit("Max open files            unlimited            unlimited            files"), None);
    }

    #[test]
    fn caps_refuse_past_the_limit_and_free_places_on_drop() {
        let gate = Arc::new(Gate::new(Limits { max_connections: 3, max_per_address: 2, ..Limits::default() }));
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let a1 = gate.admit(a).unwrap();
        let _a2 = gate.admit(a).unwrap();
        assert_eq!(gate.admit(a).err(), Some(Refusal::PerAddress));
        let _b1 = gate.admit(b).unwrap();
        assert_eq!(gate.admit(b).err(), Some(Refusal::Total));
        assert_eq!((gate.open(), gate.refused(Refusal::PerAddress), gate.refused(Refusal::Total)), (3, 1, 1));
        drop(a1);
        assert_eq!(gate.open(), 2);
        let _a3 = gate.admit("::ffff:10.0.0.1".parse().unwrap()).unwrap();
        assert_eq!(gate.admit(a).err(), Some(Refusal::Total));
    }

    #[test]
    fn deadlines_follow_what_the_connection_does() {
        let limits = Limits {
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            ..Limits::default()
        };
        let start = Instant::now() - Duration::from_secs(30);
        let a = Arc::new(Activity::new(start));
        // Nothing sent for 30 s: past the header deadline.
        assert_eq!(a.expired(&limits, Instant::now()), Some(Expiry::Header));
        let req = a.begin();
        assert_eq!(a.expired(&limits, Instant::now()), None, "a request in progress never expires");
        drop(req);
        // Idle just now: the idle deadline is a minute away.
        assert_eq!(a.expired(&limits, Instant::now()), None);
        assert_eq!(a.expired(&limits, Instant::now() + Duration::from_secs(61)), Some(Expiry::Idle));
        // The first byte of a request: the header deadline counts from it.
        a.read();
        assert_eq!(a.expired(&limits, Instant::now() + Duration::from_secs(11)), Some(Expiry::Header));
    }
}
