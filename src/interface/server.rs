//! `pcx serve`: the context as a service for many clients at once.
//!
//! Listens on a Unix domain socket (mode 0600), and optionally on loopback TCP with a token.
//! Each connection reads frames ([`crate::interface::wire`]), hands each request to the one context actor
//! at once (so requests from every connection share group commits) and writes the answers
//! back in order, each only once its change is durable. Queues are bounded end to end: a
//! connection keeps at most `max_in_flight_per_connection` requests in flight and stops
//! reading until answers drain, so a flood slows its sender down instead of growing memory;
//! it also stops reading while `max_unread_answer_bytes_per_connection` bytes of answers wait
//! to be written, so large answers a client does not read are bounded by size, not by count.
//! A frame over the limit is refused and that connection closed; everyone else is served.
//! Large frames (over 64 KiB) share one budget of memory across all connections,
//! `max_frame_bytes_total`: a frame waits for its share before its body is read, so many
//! clients sending large artifacts at once are served in turn instead of holding
//! `max_connections` × `max_frame_bytes` between them (or being refused for want of memory).
//!
//! Descriptors are a resource like memory: at most `max_connections` connections are open (one
//! more gets a `too_many_connections` error and is closed at once), a TCP connection that does
//! not authenticate within `tcp_auth_timeout_ms` is closed, and when accepting fails for want
//! of descriptors the accept loop backs off instead of spinning, warning once a second at most.
//!
//! Shutdown (the future given to [`run`]): stop accepting, stop reading new frames, finish
//! and write every answer already accepted, then return; the caller closes the context. A
//! server with no TCP listener does the same once its socket file is removed or replaced.

use std::cell::Cell;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch};

use crate::context::Context;
use crate::interface::protocol::{
    parse_value, refused, submit, submit_from, with_id, AnswerFuture, Request, RequestError,
};
use crate::interface::wire::{
    body_len, decode_body, encode_frame, to_json, to_msgpack, HEADER_LEN,
};

/// How long, after a shutdown signal, connections may take to write their last answers.
pub const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(5);
/// The first pause of the accept loop after accepting failed for want of a resource, and the
/// longest: it doubles from one to the other while accepting keeps failing.
const ACCEPT_BACKOFF: (Duration, Duration) = (Duration::from_millis(10), Duration::from_secs(1));
/// At most one "accept failed" warning per this long; the others are counted in the next one.
const ACCEPT_WARN_EVERY: Duration = Duration::from_secs(1);
/// Descriptors kept for the data directory's own files (log, blobs, snapshots, plugins) when
/// `max_connections` is derived from the descriptor limit (at most half the limit).
const DESCRIPTOR_HEADROOM: u64 = 64;

/// How often a server with no TCP listener checks that its socket file is still the one it
/// bound (see [`run`]).
const SOCKET_CHECK_EVERY: Duration = Duration::from_secs(1);

/// Bytes read from a connection at a time (frames larger than this are read in pieces).
const READ_BUFFER: usize = 64 << 10;

/// How the server listens.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub socket_path: PathBuf,
    /// Loopback TCP address, if any; needs a token.
    pub tcp: Option<(SocketAddr, String)>,
    pub max_frame_bytes: u64,
    pub max_in_flight_per_connection: usize,
    /// Bytes of answers a connection may have waiting to be written before its reading stops.
    pub max_unread_answer_bytes_per_connection: u64,
    /// Connections open at once; 0 derives it from the descriptor limit.
    pub max_connections: usize,
    /// How long a TCP connection may take to authenticate.
    pub tcp_auth_timeout: Duration,
    /// Bytes of large frames all connections may hold at once (see [`FrameBudget`]); 0 derives
    /// it from the memory the process may use.
    pub max_frame_bytes_total: u64,
    /// How long a large frame holding its share of that budget may go without a byte.
    pub frame_stall_timeout: Duration,
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("a live pcx server is already listening on {0}")]
    Live(PathBuf),
    #[error("cannot listen on {what}: {source}")]
    Listen {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("TCP address {0} is not a loopback address: pcx only listens on loopback")]
    NotLoopback(SocketAddr),
    #[error("TCP needs a token (tcp_token in the config)")]
    NoToken,
    #[error("the TCP token is {0} bytes long: it must be at least {min} bytes", min = crate::config::MIN_TOKEN_BYTES)]
    ShortToken(usize),
}

/// Connection counts, shared by every connection task.
#[derive(Debug, Default)]
pub struct Counters {
    pub open: AtomicU64,
    pub total: AtomicU64,
    pub refused_frames: AtomicU64,
    /// Connections closed at once because `max_connections` were open.
    pub refused_connections: AtomicU64,
    /// Large frames that had to wait for their share of `max_frame_bytes_total`.
    pub frames_waited: AtomicU64,
    /// The most bytes of large frames held at once.
    pub frame_bytes_held_peak: AtomicU64,
}

/// What every connection task shares.
struct Shared {
    counters: Arc<Counters>,
    frames: FrameBudget,
}

/// The memory every connection's large frames share: a frame over [`FIRST_BODY_BUFFER`]
/// takes its length from it once that much of its body has come, before reading more, and
/// gives it back once the request is decoded. A frame that cannot have it yet waits (its connection is not read: the client is
/// held by TCP's own backpressure); one that has it and stops arriving for
/// `frame_stall_timeout` is dropped, so a stalled client cannot keep the others waiting.
/// Small frames, and the first [`FIRST_BODY_BUFFER`] of large ones, are not counted: they are
/// bounded per connection, like the read buffers.
pub struct FrameBudget {
    /// Permits of one KiB each, handed out first come, first served.
    kib: tokio::sync::Semaphore,
    held: AtomicU64,
}

impl FrameBudget {
    pub fn new(bytes: u64) -> FrameBudget {
        let kib = usize::try_from(bytes.div_ceil(1024))
            .unwrap_or(usize::MAX)
            .min(tokio::sync::Semaphore::MAX_PERMITS);
        FrameBudget {
            kib: tokio::sync::Semaphore::new(kib),
            held: AtomicU64::new(0),
        }
    }

    /// Takes `len` bytes, waiting for them if need be; `None` if the budget can never hold
    /// them (the configuration checks it can hold `max_frame_bytes`).
    async fn take(&self, len: u64, counters: &Counters) -> Option<FrameShare<'_>> {
        let kib = u32::try_from(len.div_ceil(1024)).ok()?;
        let permit = match self.kib.try_acquire_many(kib) {
            Ok(p) => p,
            Err(tokio::sync::TryAcquireError::NoPermits) => {
                counters.frames_waited.fetch_add(1, Ordering::Relaxed);
                self.kib.acquire_many(kib).await.ok()?
            }
            Err(tokio::sync::TryAcquireError::Closed) => return None,
        };
        let held = self.held.fetch_add(len, Ordering::Relaxed) + len;
        counters
            .frame_bytes_held_peak
            .fetch_max(held, Ordering::Relaxed);
        Some(FrameShare {
            _permit: permit,
            len,
            held: &self.held,
        })
    }
}

/// A large frame's share of the [`FrameBudget`], given back when dropped.
struct FrameShare<'a> {
    _permit: tokio::sync::SemaphorePermit<'a>,
    len: u64,
    held: &'a AtomicU64,
}

impl Drop for FrameShare<'_> {
    fn drop(&mut self) {
        self.held.fetch_sub(self.len, Ordering::Relaxed);
    }
}

/// The budget `max_frame_bytes_total` = 0 stands for: a quarter of the memory the process may
/// use (the machine's, or its address-space limit if lower), and never less than one frame.
pub fn frame_budget_bytes(configured: u64, max_frame_bytes: u64) -> u64 {
    if configured > 0 {
        return configured;
    }
    // SAFETY: sysconf and getrlimit only read system values into what they are given.
    let physical = unsafe {
        let pages = libc::sysconf(libc::_SC_PHYS_PAGES);
        let page = libc::sysconf(libc::_SC_PAGESIZE);
        u64::try_from(pages)
            .unwrap_or(0)
            .saturating_mul(u64::try_from(page).unwrap_or(0))
    };
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: as above.
    let address_space = if unsafe { libc::getrlimit(libc::RLIMIT_AS, &mut limit) } == 0
        && limit.rlim_cur != libc::RLIM_INFINITY
    {
        limit.rlim_cur
    } else {
        u64::MAX
    };
    let memory = match physical {
        0 => address_space,
        p => p.min(address_space),
    };
    (memory / 4).max(max_frame_bytes)
}

/// An flock(2) on the directory that holds a socket path, held while a server finds out
/// whether the socket file there is a live server's, replaces a stale one and binds, and
/// while it removes its own at shutdown. Without it two servers started at once on one path
/// (a SIGKILLed server's socket file left there) both found the file stale, and the later
/// one's removal deleted the socket the earlier had just bound: both ran, the earlier one
/// holding its data directory and reachable by no one. Released when dropped.
struct SocketDirLock {
    _held: std::fs::File,
}

impl SocketDirLock {
    /// Takes the lock, waiting at most [`crate::store::swap::LOCK_PATIENCE`] for another
    /// server to let go. `None` where the directory cannot be locked at all (a file system
    /// without flock on directories, such as some NFS homes): the socket is then handled as
    /// before, unlocked, rather than not served.
    fn take(socket: &Path) -> Result<Option<SocketDirLock>, ServeError> {
        use std::os::unix::io::AsRawFd;
        let dir = socket
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let Ok(file) = std::fs::File::open(dir) else {
            return Ok(None);
        };
        let deadline = Instant::now() + crate::store::swap::LOCK_PATIENCE;
        loop {
            // SAFETY: flock only locks the descriptor this function owns.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                return Ok(Some(SocketDirLock { _held: file }));
            }
            let e = std::io::Error::last_os_error();
            match e.kind() {
                std::io::ErrorKind::Interrupted => continue,
                std::io::ErrorKind::WouldBlock if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                std::io::ErrorKind::WouldBlock => {
                    return Err(ServeError::Listen {
                        what: format!(
                            "{} (another pcx server has held its lock for {:?} while binding \
                             a socket in it)",
                            dir.display(),
                            crate::store::swap::LOCK_PATIENCE
                        ),
                        source: e,
                    })
                }
                _ => {
                    tracing::debug!(dir = %dir.display(), error = %e, "cannot lock the socket's directory; binding unlocked");
                    return Ok(None);
                }
            }
        }
    }
}

/// Binds the Unix socket: a stale socket file (no server answering) is replaced, a live one
/// is an error; the socket is created with mode 0600. All of it under [`SocketDirLock`].
fn bind_unix(path: &Path) -> Result<tokio::net::UnixListener, ServeError> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|source| ServeError::Listen {
            what: parent.display().to_string(),
            source,
        })?;
    }
    let _lock = SocketDirLock::take(path)?;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if !meta.file_type().is_socket() {
            return Err(ServeError::Listen {
                what: path.display().to_string(),
                source: std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "a file that is not a socket is in the way; pcx will not delete it",
                ),
            });
        }
        if crate::interface::unix_path::connect(path).is_ok() {
            return Err(ServeError::Live(path.to_path_buf()));
        }
        crate::store::swap::pause_point("serve:stale-found");
        std::fs::remove_file(path).map_err(|source| ServeError::Listen {
            what: format!("{} (removing a stale socket)", path.display()),
            source,
        })?;
    }
    // SAFETY: umask only changes this process's file-creation mask; it is set for the bind
    // and restored right after, at start-up, before any other thread creates files.
    let old = unsafe { libc::umask(0o177) };
    let bound =
        crate::interface::unix_path::with_short_path(path, |p| tokio::net::UnixListener::bind(p));
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    bound.map_err(|source| ServeError::Listen {
        what: path.display().to_string(),
        source,
    })
}

/// Serves until `shutdown` completes, then finishes what was accepted and returns.
pub async fn run(
    ctx: Context,
    config: ServerConfig,
    counters: Arc<Counters>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    // Check everything that can refuse the start before creating the socket file.
    let tcp = match &config.tcp {
        None => None,
        Some((addr, token)) => {
            if !addr.ip().is_loopback() {
                return Err(ServeError::NotLoopback(*addr));
            }
            if token.is_empty() {
                return Err(ServeError::NoToken);
            }
            if token.len() < crate::config::MIN_TOKEN_BYTES {
                return Err(ServeError::ShortToken(token.len()));
            }
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| ServeError::Listen {
                    what: addr.to_string(),
                    source,
                })?;
            Some((l, token.clone()))
        }
    };
    let unix = bind_unix(&config.socket_path)?;
    // What is at the socket path now is this server's socket; at shutdown only that is removed
    // (a server started meanwhile may have put its own there).
    let bound = socket_identity(&config.socket_path);
    let max_connections = connection_limit(config.max_connections);
    let max_frame_bytes_total =
        frame_budget_bytes(config.max_frame_bytes_total, config.max_frame_bytes);
    let shared = Arc::new(Shared {
        counters: counters.clone(),
        frames: FrameBudget::new(max_frame_bytes_total),
    });
    tracing::info!(socket = %config.socket_path.display(), tcp = ?config.tcp.as_ref().map(|t| t.0), max_connections, max_frame_bytes_total, "pcx serving");
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = Vec::new();
    let mut backoff: Option<Duration> = None;
    let mut warnings = AcceptWarnings::default();
    // A server reachable only through its socket file stops once that file is gone or is
    // another's (removed by hand as "stale", or with the whole data directory): before, it
    // ran on reachable by no one and holding its data directory, so every server started
    // there next failed "in use" (the Python client's embedded default with it).
    let mut socket_check = tokio::time::interval(SOCKET_CHECK_EVERY);
    let watch_socket = tcp.is_none() && bound.is_some();
    let mut socket_missed = false;
    tokio::pin!(shutdown);
    loop {
        if let Some(pause) = backoff {
            tokio::select! {
                _ = &mut shutdown => break,
                _ = tokio::time::sleep(pause) => {}
            }
        }
        let accepted = tokio::select! {
            _ = &mut shutdown => break,
            _ = socket_check.tick(), if watch_socket => {
                // Gone at two checks running: a compaction in place swaps the data directory
                // (and the socket file in it, linked into the new one) in two renames, between
                // which the path names nothing for a moment.
                let lost = socket_lost(&config.socket_path, bound);
                let gone = lost && socket_missed;
                socket_missed = lost;
                if gone {
                    tracing::warn!(socket = %config.socket_path.display(),
                        "this server's socket file was removed or replaced, so no client can \
                         reach it: shutting down, letting go of the data directory");
                    break;
                }
                continue;
            }
            a = unix.accept() => a.map(|(stream, _)| Connection::Unix(stream)),
            a = async { match &tcp { Some((l, _)) => l.accept().await, None => std::future::pending().await } } => {
                a.map(|(stream, _)| Connection::Tcp(stream))
            }
        };
        let conn = match accepted {
            Ok(conn) => {
                backoff = None;
                conn
            }
            Err(e) => {
                warnings.failed(&e);
                // A failure of one connection (it was reset before it was accepted) says
                // nothing of the next; anything else (no descriptors, no memory) would fail
                // again at once, and the listener stays ready: pause, longer each time.
                if !is_connection_error(&e) {
                    backoff =
                        Some(backoff.map_or(ACCEPT_BACKOFF.0, |b| (b * 2).min(ACCEPT_BACKOFF.1)));
                }
                continue;
            }
        };
        if counters.open.load(Ordering::Relaxed) >= max_connections as u64 {
            counters.refused_connections.fetch_add(1, Ordering::Relaxed);
            refuse(conn, max_connections);
            continue;
        }
        let token = match &conn {
            Connection::Tcp(_) => tcp.as_ref().map(|t| t.1.clone()),
            Connection::Unix(_) => None,
        };
        let (ctx, config, shared, stop) =
            (ctx.clone(), config.clone(), shared.clone(), stop_rx.clone());
        counters.open.fetch_add(1, Ordering::Relaxed);
        counters.total.fetch_add(1, Ordering::Relaxed);
        tasks.push(actix_rt::spawn(async move {
            let client = Client {
                peer: conn.peer(),
                token,
                own_user: conn.own_user(),
            };
            let result = match conn {
                Connection::Unix(s) => {
                    let (r, w) = s.into_split();
                    serve_connection(&ctx, r, w, &config, client, &shared, stop).await
                }
                Connection::Tcp(s) => {
                    let (r, w) = s.into_split();
                    serve_connection(&ctx, r, w, &config, client, &shared, stop).await
                }
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            shared.counters.open.fetch_sub(1, Ordering::Relaxed);
        }));
        tasks.retain(|t| !t.is_finished());
    }
    tracing::info!(
        connections = tasks.len(),
        "shutting down: finishing accepted requests"
    );
    drop(unix);
    drop(tcp);
    let _ = stop_tx.send(true);
    // Accepted changes are durable whether or not their answers get out; a client that does
    // not read its answers is not allowed to hold the shutdown up for long.
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, futures::future::join_all(tasks)).await;
    if drained.is_err() {
        tracing::warn!(
            "some connections did not take their answers within the grace period; closing them"
        );
    }
    // Under the lock, so a server replacing this one's socket as stale meanwhile cannot have
    // its own removed between the check and the removal.
    let _lock = SocketDirLock::take(&config.socket_path);
    if bound.is_some() && socket_identity(&config.socket_path) == bound {
        let _ = std::fs::remove_file(&config.socket_path);
    }
    Ok(())
}

/// The frame of `answer`, or, for an answer longer than a frame can carry, the frame of an
/// error saying so (with the request's `id`): the client gets an answer either way, and the
/// stream stays in step.
fn answer_frame(answer: Value) -> Vec<u8> {
    match encode_frame(&to_msgpack(&answer)) {
        Ok(frame) => frame,
        Err(e) => {
            let refusal = json!({ "ok": false, "error": { "kind": e.kind(), "message": format!(
                "the answer is too long: {e}; ask for less (`log` with `limit` or a range, \
                 `state` with `key`)"
            ) } });
            let refusal = match answer.get("id") {
                Some(id) => with_id(Some(id.clone()), refusal),
                None => refusal,
            };
            encode_frame(&to_msgpack(&refusal)).unwrap_or_default()
        }
    }
}

/// Why only the server's own user may ask for `request`, if so: `export` has the server write
/// a file of the client's choosing, `compact` deletes history.
fn owners_only(request: &Request) -> Option<&'static str> {
    match request {
        Request::Export { .. } => Some("`export` writes a file with the server's rights"),
        Request::Compact { .. } => Some("`compact` deletes the log's history"),
        Request::Scoped { request, .. } => owners_only(request),
        _ => None,
    }
}

/// The device and inode of the file at `path` (not following a link), if any.
fn socket_identity(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

/// Whether the socket file at `path` is known to be gone, or to be another file than the one
/// bound (`bound`); a look that fails for another reason (a permission changed for a moment)
/// proves nothing, and a server is not stopped on it.
fn socket_lost(path: &Path, bound: Option<(u64, u64)>) -> bool {
    use std::os::unix::fs::MetadataExt;
    match std::fs::symlink_metadata(path) {
        Ok(m) => Some((m.dev(), m.ino())) != bound,
        Err(e) => e.kind() == std::io::ErrorKind::NotFound,
    }
}

enum Connection {
    Unix(tokio::net::UnixStream),
    Tcp(tokio::net::TcpStream),
}

/// One connection's client: who it is, the token it must send first (TCP), and whether it
/// runs as the server's own user (or root) on its Unix socket.
struct Client {
    peer: String,
    token: Option<String>,
    own_user: bool,
}

impl Connection {
    /// Whether the client runs as the server's user (or as root) on its Unix socket, as the
    /// kernel says: only such a client may have the server write a file (`export`), which
    /// it could write itself. Never a TCP client, whoever holds the token.
    fn own_user(&self) -> bool {
        match self {
            Connection::Unix(s) => s.peer_cred().is_ok_and(|c| {
                // SAFETY: geteuid has no preconditions and cannot fail.
                let server = unsafe { libc::geteuid() };
                c.uid() == server || c.uid() == 0
            }),
            Connection::Tcp(_) => false,
        }
    }

    /// Who is at the other end, as the kernel says: the user and process of a Unix socket's
    /// client (SO_PEERCRED, which the client cannot choose), a TCP client's address. Named
    /// in the origin of every event the connection's requests write ([`Scope::peer`]), so a
    /// log written through one server says which client changed what.
    ///
    /// [`Scope::peer`]: crate::core::scope::Scope::peer
    fn peer(&self) -> String {
        match self {
            Connection::Unix(s) => match s.peer_cred() {
                Ok(c) => match c.pid() {
                    Some(pid) => format!("unix socket: uid {}, pid {pid}", c.uid()),
                    None => format!("unix socket: uid {}", c.uid()),
                },
                Err(_) => "unix socket".to_string(),
            },
            Connection::Tcp(s) => match s.peer_addr() {
                Ok(a) => format!("tcp {a}"),
                Err(_) => "tcp".to_string(),
            },
        }
    }
}

/// `max_connections`, or (0) the descriptor limit less what the server needs besides its
/// connections, so that connections run out before descriptors do.
fn connection_limit(configured: usize) -> usize {
    if configured > 0 {
        return configured;
    }
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes only the struct it is given.
    let descriptors = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
        limit.rlim_cur
    } else {
        1024
    };
    let headroom = DESCRIPTOR_HEADROOM.min(descriptors / 2);
    usize::try_from(descriptors.saturating_sub(headroom).clamp(1, 1 << 20)).unwrap_or(1 << 20)
}

/// Accept errors that belong to one connection (gone before it was accepted), not the server.
fn is_connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | ConnectionRefused | Interrupted | WouldBlock
    )
}

/// "accept failed" warnings, at most one per [`ACCEPT_WARN_EVERY`], each counting the ones
/// held back since the last: a loop failing thousands of times a second must not flood the log.
#[derive(Default)]
struct AcceptWarnings {
    last: Option<Instant>,
    held_back: u64,
}

impl AcceptWarnings {
    fn failed(&mut self, e: &std::io::Error) {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|last| now.duration_since(last) < ACCEPT_WARN_EVERY)
        {
            self.held_back += 1;
            return;
        }
        let exhausted = matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE));
        tracing::warn!(
            error = %e,
            more_since_last_warning = self.held_back,
            "accept failed{}",
            if exhausted {
                " (out of file descriptors: raise the limit (ulimit -n) or lower max_connections)"
            } else {
                ""
            }
        );
        self.last = Some(now);
        self.held_back = 0;
    }
}

/// Answers a connection over `max_connections` with an error and closes it, without waiting
/// on it: the frame fits in an empty socket buffer, and what the client already sent is read
/// away first so that closing does not reset the connection under the error.
fn refuse(conn: Connection, max_connections: usize) {
    let answer = json!({ "ok": false, "error": { "kind": "too_many_connections", "message": format!(
        "the server has max_connections ({max_connections}) connections open; try again later"
    ) } });
    // A short answer always fits in a frame.
    let frame = encode_frame(&to_msgpack(&answer)).unwrap_or_default();
    // Plain non-blocking calls on the socket itself: tokio's `try_*` would not even try before
    // its driver has seen the new socket ready.
    match conn {
        Connection::Unix(s) => {
            if let Ok(s) = s.into_std() {
                refuse_on(s, &frame);
            }
        }
        Connection::Tcp(s) => {
            if let Ok(s) = s.into_std() {
                refuse_on(s, &frame);
            }
        }
    }
}

fn refuse_on(mut socket: impl std::io::Read + std::io::Write, frame: &[u8]) {
    let mut sink = [0u8; 4096];
    // Reads at most 64 KiB away: a client sending without pause cannot keep the loop here.
    for _ in 0..16 {
        if !matches!(socket.read(&mut sink), Ok(n) if n > 0) {
            break;
        }
    }
    let _ = socket.write(frame);
}

/// What the reader side found in one frame.
enum Frame<'b> {
    /// A frame's body, and its share of the frame budget if it is a large one.
    Body(Vec<u8>, Option<FrameShare<'b>>),
    TooLarge(u64),
    /// A frame within the limit whose body the process could not get the memory for.
    Unaffordable(u64),
    /// A large frame whose bytes stopped coming: its length and what came of it.
    Stalled(u64, u64),
    End,
}

/// The most a frame's body buffer first holds: it grows (doubling) as bytes arrive, never to
/// the length a header only claims.
const FIRST_BODY_BUFFER: usize = 64 << 10;

/// Reads one frame; a large one takes its share of `budget` first (`None`: the frame is
/// small by its limit, as the TCP authentication frame is).
async fn read_frame<'b>(
    r: &mut (impl AsyncRead + Unpin),
    limit: u64,
    budget: Option<(&'b FrameBudget, &Counters, Duration)>,
) -> std::io::Result<Frame<'b>> {
    let mut header = [0u8; HEADER_LEN];
    match r.read_exact(&mut header).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(Frame::End),
        Err(e) => return Err(e),
    }
    let len = body_len(header);
    if len > limit {
        return Ok(Frame::TooLarge(len));
    }
    // The buffer grows with the bytes that arrive: a header alone (a client that stalls, or
    // thousands of them) costs nothing, and a failed allocation is this frame's refusal, not
    // an abort of the server.
    let Ok(len) = usize::try_from(len) else {
        return Ok(Frame::Unaffordable(len));
    };
    let mut body: Vec<u8> = Vec::new();
    let mut share = None;
    let mut stall = None;
    while body.len() < len {
        if body.len() == body.capacity() {
            // A large frame takes its share once its first buffer is full, not at its header:
            // a header alone (a client that stalls, or thousands of them) holds nothing, as
            // it costs nothing.
            if let (Some((budget, counters, timeout)), None) = (budget, &share) {
                if body.len() >= FIRST_BODY_BUFFER {
                    match budget.take(len as u64, counters).await {
                        Some(taken) => share = Some(taken),
                        None => return Ok(Frame::Unaffordable(len as u64)),
                    }
                    stall = Some(timeout);
                }
            }
            let grow = body.capacity().max(FIRST_BODY_BUFFER).min(len - body.len());
            if body.try_reserve_exact(grow).is_err() {
                return Ok(Frame::Unaffordable(len as u64));
            }
        }
        let room = (body.capacity() - body.len()) as u64;
        let mut piece = (&mut *r).take(room);
        let read = piece.read_buf(&mut body);
        let n = match stall {
            None => read.await?,
            Some(stall) => match tokio::time::timeout(stall, read).await {
                Ok(n) => n?,
                Err(_) => return Ok(Frame::Stalled(len as u64, body.len() as u64)),
            },
        };
        // A client that vanished mid-frame (0 bytes: end of stream): nothing was accepted
        // from it.
        if n == 0 {
            return Ok(Frame::End);
        }
    }
    Ok(Frame::Body(body, share))
}

fn ready(value: Value) -> AnswerFuture {
    Box::pin(std::future::ready(value))
}

/// Turns one frame body into the future of its answer.
fn answer_for(
    ctx: &Context,
    body: &[u8],
    counters: &Arc<Counters>,
    peer: &str,
    own_user: bool,
) -> AnswerFuture {
    let value = match decode_body(body).and_then(to_json) {
        Ok(v) => v,
        Err(e) => {
            return ready(
                json!({ "ok": false, "error": { "kind": e.kind(), "message": e.to_string() } }),
            )
        }
    };
    let (id, request) = parse_value(value);
    match request {
        Err(e) => ready(with_id(id, refused(&e))),
        Ok(r) if !own_user && owners_only(&r).is_some() => ready(with_id(
            id,
            json!({ "ok": false, "error": { "kind": "unauthorized", "message": format!(
                "{}, so only a client of the server's own user on its Unix socket may ask for \
                 it (this one: {peer}); ask over the Unix socket, or run the command where the \
                 data directory is",
                owners_only(&r).unwrap_or_default()
            ) } }),
        )),
        Ok(Request::Stats) => {
            let fut = submit(ctx, Request::Stats);
            let counters = counters.clone();
            Box::pin(async move {
                let mut answer = fut.await;
                if let Some(stats) = answer.get_mut("stats") {
                    stats["connections_open"] = json!(counters.open.load(Ordering::Relaxed));
                    stats["connections_total"] = json!(counters.total.load(Ordering::Relaxed));
                    stats["refused_frames"] =
                        json!(counters.refused_frames.load(Ordering::Relaxed));
                    stats["refused_connections"] =
                        json!(counters.refused_connections.load(Ordering::Relaxed));
                    stats["frames_waited"] = json!(counters.frames_waited.load(Ordering::Relaxed));
                    stats["frame_bytes_held_peak"] =
                        json!(counters.frame_bytes_held_peak.load(Ordering::Relaxed));
                }
                with_id(id, answer)
            })
        }
        Ok(r) => {
            let fut = submit_from(ctx, r, Some(peer));
            Box::pin(async move { with_id(id, fut.await) })
        }
    }
}

async fn serve_connection(
    ctx: &Context,
    reader: impl AsyncRead + Unpin,
    mut writer: impl AsyncWrite + Unpin,
    config: &ServerConfig,
    client: Client,
    shared: &Shared,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let Client {
        peer,
        token,
        own_user,
    } = client;
    let peer = peer.as_str();
    let (counters, frames) = (&shared.counters, &shared.frames);
    // A frame's header and body come in one read, and a client that pipelines has its
    // next frames read with them.
    let mut reader = tokio::io::BufReader::with_capacity(READ_BUFFER, reader);
    if let Some(token) = token {
        let deadline = tokio::time::Instant::now() + config.tcp_auth_timeout;
        let authenticated = tokio::select! {
            _ = stop.wait_for(|s| *s) => return Ok(()),
            a = authenticate(&mut reader, &mut writer, &token, deadline) => a?,
        };
        if !authenticated {
            return Ok(());
        }
    }
    let (tx, mut rx) = mpsc::channel::<AnswerFuture>(config.max_in_flight_per_connection.max(1));
    let budget = &AnswerBudget::new(config.max_unread_answer_bytes_per_connection);
    let mut writer_stop = stop.clone();
    let read = async move {
        'reading: loop {
            // Too many bytes of answers waiting for a client that does not read them: read
            // no more of its requests until the writer catches up.
            while !budget.admits() {
                tokio::select! {
                    biased;
                    _ = stop.wait_for(|s| *s) => break 'reading,
                    // The writer gave up (the client vanished): nothing more is answered.
                    _ = tx.closed() => break 'reading,
                    _ = budget.changed.notified() => {}
                }
            }
            let frame = tokio::select! {
                biased;
                _ = stop.wait_for(|s| *s) => break,
                f = read_frame(&mut reader, config.max_frame_bytes, Some((frames, counters, config.frame_stall_timeout))) => f,
            };
            let answer = match frame {
                // The share is given back once the request is decoded (the answer's future
                // holds the request, not the frame).
                Ok(Frame::Body(body, _share)) => answer_for(ctx, &body, counters, peer, own_user),
                Ok(Frame::Stalled(len, received)) => {
                    counters.refused_frames.fetch_add(1, Ordering::Relaxed);
                    let ms =
                        u64::try_from(config.frame_stall_timeout.as_millis()).unwrap_or(u64::MAX);
                    tracing::warn!(
                        len,
                        received,
                        ms,
                        "a large frame stalled; closing its connection"
                    );
                    budget.queued.set(budget.queued.get() + 1);
                    let _ = tx
                        .send(ready(refused(&RequestError::FrameStalled {
                            len,
                            received,
                            ms,
                        })))
                        .await;
                    break;
                }
                Ok(Frame::TooLarge(len)) => {
                    counters.refused_frames.fetch_add(1, Ordering::Relaxed);
                    let e = RequestError::FrameTooLarge {
                        len,
                        limit: config.max_frame_bytes,
                    };
                    // The rest of this frame cannot be skipped safely: answer, then close.
                    budget.queued.set(budget.queued.get() + 1);
                    let _ = tx.send(ready(refused(&e))).await;
                    break;
                }
                Ok(Frame::Unaffordable(len)) => {
                    counters.refused_frames.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        len,
                        "no memory for a frame's body; refusing it and closing its connection"
                    );
                    budget.queued.set(budget.queued.get() + 1);
                    let _ = tx
                        .send(ready(refused(&RequestError::FrameUnaffordable { len })))
                        .await;
                    break;
                }
                Ok(Frame::End) | Err(_) => break,
            };
            budget.queued.set(budget.queued.get() + 1);
            // A full queue (the client is not reading) holds the reader here: backpressure.
            // It lets go when the writer gives up (the client vanished) or on shutdown.
            tokio::select! {
                sent = tx.send(answer) => if sent.is_err() { break },
                _ = stop.wait_for(|s| *s) => break,
            }
        }
    };
    let write = async move {
        while let Some(answer) = rx.recv().await {
            let frame = answer_frame(answer.await);
            budget.writing(frame.len());
            let written = tokio::select! {
                w = writer.write_all(&frame) => w,
                // After shutdown, a client that does not read cannot hold us here.
                _ = async { let _ = writer_stop.wait_for(|s| *s).await; tokio::time::sleep(SHUTDOWN_GRACE).await } => {
                    Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "client did not read its answers"))
                }
            };
            budget.written();
            // On a failed write `rx` is dropped with this future, which frees a reader blocked
            // on it.
            written?;
        }
        writer.flush().await?;
        writer.shutdown().await
    };
    let ((), written) = tokio::join!(read, write);
    written
}

/// The bytes of answers one connection holds for its client, and whether its reader may take
/// another request: an answer's size is known only once it is made, so each request not yet
/// written counts at an estimate of its answer, the largest recent answer (halving with each
/// smaller one). It starts at the whole budget: a new connection's first requests go one at a
/// time until its answers show their size, then its window opens.
struct AnswerBudget {
    limit: u64,
    /// Requests read whose answers are not yet being written.
    queued: Cell<u64>,
    /// The size of the answer being written (0: none).
    writing: Cell<u64>,
    estimate: Cell<u64>,
    /// Wakes the reader when an answer has been written.
    changed: tokio::sync::Notify,
}

impl AnswerBudget {
    fn new(limit: u64) -> AnswerBudget {
        AnswerBudget {
            limit,
            queued: Cell::new(0),
            writing: Cell::new(0),
            estimate: Cell::new(limit),
            changed: tokio::sync::Notify::new(),
        }
    }

    /// Whether one more request fits: it does when nothing is waiting (so a single answer
    /// larger than the limit still goes through, alone), or when it fits in the budget.
    fn admits(&self) -> bool {
        let (queued, writing) = (self.queued.get(), self.writing.get());
        if queued == 0 && writing == 0 {
            return true;
        }
        let expected = (queued + 1).saturating_mul(self.estimate.get());
        writing.saturating_add(expected) <= self.limit
    }

    /// A queued answer is made and its frame, `len` bytes, is being written.
    fn writing(&self, len: usize) {
        let len = len as u64;
        self.queued.set(self.queued.get().saturating_sub(1));
        self.writing.set(len);
        self.estimate.set(len.max(self.estimate.get() / 2));
    }

    fn written(&self) {
        self.writing.set(0);
        self.changed.notify_one();
    }
}

/// TCP: the first frames must prove the client knows the token, by the challenge of
/// [`crate::interface::tcp_auth`] (what pcx's clients send), or by the token itself
/// (`{"op":"auth","token":…}`, from clients written before the challenge). Answers each step;
/// true once the client is in. A refusal or a deadline passed is answered `unauthorized`
/// and the caller closes the connection.
async fn authenticate(
    reader: &mut (impl AsyncRead + Unpin),
    writer: &mut (impl AsyncWrite + Unpin),
    token: &str,
    deadline: tokio::time::Instant,
) -> std::io::Result<bool> {
    use crate::interface::tcp_auth::{self, Role, NONCE_BYTES, PROOF_BYTES};
    let refuse = |message: String| json!({ "ok": false, "error": { "kind": "unauthorized", "message": message } });
    let timed_out =
        || refuse("authentication did not finish within tcp_auth_timeout_ms; closing".into());
    // A short answer always fits in a frame.
    let answer = |v: &Value| encode_frame(&to_msgpack(v)).unwrap_or_default();
    let Ok(first) = tokio::time::timeout_at(deadline, read_json(reader)).await else {
        writer.write_all(&answer(&timed_out())).await?;
        return Ok(false);
    };
    let first = first?;
    let (ok, refusal) = match first.as_ref().and_then(|v| v["op"].as_str()) {
        Some("auth") => {
            let ok = first.as_ref().is_some_and(|v| {
                v["token"]
                    .as_str()
                    .is_some_and(|t| tokens_equal(t.as_bytes(), token.as_bytes()))
            });
            (ok, "the token is not this server's")
        }
        Some("auth_challenge") => {
            let Some(client_nonce) = first
                .as_ref()
                .and_then(|v| tcp_auth::field_bytes(v, "client_nonce_b64", NONCE_BYTES))
            else {
                let message =
                    format!("auth_challenge needs client_nonce_b64: {NONCE_BYTES} bytes in base64");
                writer.write_all(&answer(&refuse(message))).await?;
                return Ok(false);
            };
            let server_nonce = tcp_auth::nonce()?;
            let challenge = json!({
                "ok": true,
                "server_nonce_b64": tcp_auth::b64(&server_nonce),
                "server_proof_b64": tcp_auth::b64(&tcp_auth::proof(token, Role::Server, &client_nonce, &server_nonce)),
            });
            writer.write_all(&answer(&challenge)).await?;
            let Ok(second) = tokio::time::timeout_at(deadline, read_json(reader)).await else {
                writer.write_all(&answer(&timed_out())).await?;
                return Ok(false);
            };
            let ok = second?.is_some_and(|v| {
                v["op"] == "auth_proof"
                    && tcp_auth::field_bytes(&v, "client_proof_b64", PROOF_BYTES).is_some_and(|p| {
                        tcp_auth::verify(token, Role::Client, &client_nonce, &server_nonce, &p)
                    })
            });
            (ok, "the proof is not one made with this server's token")
        }
        _ => (
            false,
            "the first frame on TCP must be {\"op\":\"auth_challenge\",…} (or {\"op\":\"auth\",\"token\":…}): see tcp_auth in docs/protocol.md",
        ),
    };
    let reply = if ok {
        json!({ "ok": true })
    } else {
        refuse(refusal.into())
    };
    writer.write_all(&answer(&reply)).await?;
    Ok(ok)
}

/// One small frame (authentication's) as JSON: `None` when it is not one, or the peer closed.
async fn read_json(reader: &mut (impl AsyncRead + Unpin)) -> std::io::Result<Option<Value>> {
    Ok(match read_frame(reader, 1 << 16, None).await? {
        Frame::Body(b, _) => decode_body(&b).ok().and_then(|v| to_json(v).ok()),
        _ => None,
    })
}

/// Whether two tokens are equal, in a time that does not depend on where they differ (nor on
/// their lengths): the digests are compared, and blake3's digest comparison is constant-time.
fn tokens_equal(given: &[u8], expected: &[u8]) -> bool {
    blake3::hash(given) == blake3::hash(expected)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_equal_only_when_every_byte_is() {
        assert!(tokens_equal(b"0123456789abcdef", b"0123456789abcdef"));
        assert!(!tokens_equal(b"0123456789abcdef", b"0123456789abcdeF"));
        assert!(!tokens_equal(b"0123456789abcdef", b"0123456789abcde"));
        assert!(!tokens_equal(b"", b"0123456789abcdef"));
    }

    #[test]
    fn max_connections_0_keeps_descriptors_for_the_server_itself() {
        assert_eq!(connection_limit(7), 7);
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes only the struct it is given.
        assert_eq!(
            unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) },
            0
        );
        let derived = connection_limit(0) as u64;
        assert!(derived >= 1 && derived < limit.rlim_cur.max(2), "{derived}");
    }

    #[test]
    fn the_answer_budget_admits_a_lone_large_answer_and_bounds_the_rest_by_bytes() {
        let b = AnswerBudget::new(1000);
        assert!(b.admits(), "the first request");
        b.queued.set(1);
        assert!(!b.admits(), "an unknown answer counts as the whole budget");
        b.writing(5000);
        assert!(!b.admits(), "over the budget while it is written");
        b.written();
        assert!(b.admits(), "nothing waiting: one more goes, however large");
        for _ in 0..10 {
            b.queued.set(b.queued.get() + 1);
            b.writing(10);
            b.written();
        }
        b.queued.set(50);
        assert!(b.admits(), "small answers: many in flight");
        b.queued.set(100);
        assert!(!b.admits(), "but no more than the budget holds");
    }
}
