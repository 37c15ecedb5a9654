//! `pcx serve`: the context as a service for many clients at once.
//!
//! Listens on a Unix domain socket (mode 0600), and optionally on loopback TCP with a token.
//! Each connection reads frames ([`crate::wire`]), hands each request to the one context actor
//! at once (so requests from every connection share group commits) and writes the answers
//! back in order, each only once its change is durable. Queues are bounded end to end: a
//! connection keeps at most `max_in_flight_per_connection` requests in flight and stops
//! reading until answers drain, so a flood slows its sender down instead of growing memory.
//! A frame over the limit is refused and that connection closed; everyone else is served.
//!
//! Shutdown (the future given to [`run`]): stop accepting, stop reading new frames, finish
//! and write every answer already accepted, then return; the caller closes the context.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch};

use crate::context::Context;
use crate::protocol::{parse_value, refused, submit, with_id, AnswerFuture, Request, RequestError};
use crate::wire::{body_len, decode_body, encode_frame, to_json, to_msgpack, HEADER_LEN};

/// How long, after a shutdown signal, connections may take to write their last answers.
pub const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(5);
/// How long a TCP connection may take to authenticate.
const AUTH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

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
}

/// Connection counts, shared by every connection task.
#[derive(Debug, Default)]
pub struct Counters {
    pub open: AtomicU64,
    pub total: AtomicU64,
    pub refused_frames: AtomicU64,
}

/// Binds the Unix socket: a stale socket file (no server answering) is replaced, a live one
/// is an error; the socket is created with mode 0600.
fn bind_unix(path: &Path) -> Result<tokio::net::UnixListener, ServeError> {
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
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(ServeError::Live(path.to_path_buf()));
        }
        std::fs::remove_file(path).map_err(|source| ServeError::Listen {
            what: format!("{} (removing a stale socket)", path.display()),
            source,
        })?;
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|source| ServeError::Listen {
            what: parent.display().to_string(),
            source,
        })?;
    }
    // SAFETY: umask only changes this process's file-creation mask; it is set for the bind
    // and restored right after, at start-up, before any other thread creates files.
    let old = unsafe { libc::umask(0o177) };
    let bound = tokio::net::UnixListener::bind(path);
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
    tracing::info!(socket = %config.socket_path.display(), tcp = ?config.tcp.as_ref().map(|t| t.0), "pcx serving");
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = Vec::new();
    tokio::pin!(shutdown);
    loop {
        let accepted: Box<dyn FnOnce() -> Connection> = tokio::select! {
            _ = &mut shutdown => break,
            a = unix.accept() => match a {
                Ok((stream, _)) => Box::new(move || Connection::Unix(stream)),
                Err(e) => { tracing::warn!(error = %e, "accept failed"); continue; }
            },
            a = async { match &tcp { Some((l, _)) => l.accept().await, None => std::future::pending().await } } => match a {
                Ok((stream, _)) => Box::new(move || Connection::Tcp(stream)),
                Err(e) => { tracing::warn!(error = %e, "accept failed"); continue; }
            },
        };
        let conn = accepted();
        let token = match &conn {
            Connection::Tcp(_) => tcp.as_ref().map(|t| t.1.clone()),
            Connection::Unix(_) => None,
        };
        let (ctx, config, counters, stop) = (
            ctx.clone(),
            config.clone(),
            counters.clone(),
            stop_rx.clone(),
        );
        counters.open.fetch_add(1, Ordering::Relaxed);
        counters.total.fetch_add(1, Ordering::Relaxed);
        tasks.push(actix_rt::spawn(async move {
            let result = match conn {
                Connection::Unix(s) => {
                    let (r, w) = s.into_split();
                    serve_connection(&ctx, r, w, &config, token, &counters, stop).await
                }
                Connection::Tcp(s) => {
                    let (r, w) = s.into_split();
                    serve_connection(&ctx, r, w, &config, token, &counters, stop).await
                }
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            counters.open.fetch_sub(1, Ordering::Relaxed);
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
    let _ = std::fs::remove_file(&config.socket_path);
    Ok(())
}

enum Connection {
    Unix(tokio::net::UnixStream),
    Tcp(tokio::net::TcpStream),
}

/// What the reader side found in one frame.
enum Frame {
    Body(Vec<u8>),
    TooLarge(u64),
    End,
}

async fn read_frame(r: &mut (impl AsyncRead + Unpin), limit: u64) -> std::io::Result<Frame> {
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
    let mut body = vec![0u8; len as usize];
    match r.read_exact(&mut body).await {
        Ok(_) => Ok(Frame::Body(body)),
        // A client that vanished mid-frame: nothing was accepted from it.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(Frame::End),
        Err(e) => Err(e),
    }
}

fn ready(value: Value) -> AnswerFuture {
    Box::pin(std::future::ready(value))
}

/// Turns one frame body into the future of its answer.
fn answer_for(ctx: &Context, body: &[u8], counters: &Arc<Counters>) -> AnswerFuture {
    let value = match decode_body(body).and_then(to_json) {
        Ok(v) => v,
        Err(e) => {
            return ready(
                json!({ "ok": false, "error": { "kind": "bad_frame", "message": e.to_string() } }),
            )
        }
    };
    let (id, request) = parse_value(value);
    match request {
        Err(e) => ready(with_id(id, refused(&e))),
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
                }
                with_id(id, answer)
            })
        }
        Ok(r) => {
            let fut = submit(ctx, r);
            Box::pin(async move { with_id(id, fut.await) })
        }
    }
}

async fn serve_connection(
    ctx: &Context,
    reader: impl AsyncRead + Unpin,
    mut writer: impl AsyncWrite + Unpin,
    config: &ServerConfig,
    token: Option<String>,
    counters: &Arc<Counters>,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    // A frame's header and body come in one read, and a client that pipelines has its
    // next frames read with them.
    let mut reader = tokio::io::BufReader::with_capacity(READ_BUFFER, reader);
    if let Some(token) = token {
        // TCP: the first frame must be {"op":"auth","token":…}.
        let first = tokio::select! {
            _ = stop.wait_for(|s| *s) => return Ok(()),
            f = tokio::time::timeout(AUTH_TIMEOUT, read_frame(&mut reader, config.max_frame_bytes.min(1 << 16))) => f,
        };
        let ok = match first {
            Err(_) | Ok(Err(_)) => false,
            Ok(Ok(frame)) => match frame {
                Frame::Body(b) => decode_body(&b)
                    .ok()
                    .and_then(|v| to_json(v).ok())
                    .is_some_and(|v| {
                        v["op"] == "auth" && v["token"].as_str() == Some(token.as_str())
                    }),
                _ => false,
            },
        };
        let answer = if ok {
            json!({ "ok": true })
        } else {
            json!({ "ok": false, "error": { "kind": "unauthorized", "message": "the first frame on TCP must be {\"op\":\"auth\",\"token\":…} with the server's token" } })
        };
        writer
            .write_all(&encode_frame(&to_msgpack(&answer)))
            .await?;
        if !ok {
            return Ok(());
        }
    }
    let (tx, mut rx) = mpsc::channel::<AnswerFuture>(config.max_in_flight_per_connection.max(1));
    let mut writer_stop = stop.clone();
    let read = async move {
        loop {
            let frame = tokio::select! {
                biased;
                _ = stop.wait_for(|s| *s) => break,
                f = read_frame(&mut reader, config.max_frame_bytes) => f,
            };
            let answer = match frame {
                Ok(Frame::Body(body)) => answer_for(ctx, &body, counters),
                Ok(Frame::TooLarge(len)) => {
                    counters.refused_frames.fetch_add(1, Ordering::Relaxed);
                    let e = RequestError::FrameTooLarge {
                        len,
                        limit: config.max_frame_bytes,
                    };
                    // The rest of this frame cannot be skipped safely: answer, then close.
                    let _ = tx.send(ready(refused(&e))).await;
                    break;
                }
                Ok(Frame::End) | Err(_) => break,
            };
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
            let frame = encode_frame(&to_msgpack(&answer.await));
            let written = tokio::select! {
                w = writer.write_all(&frame) => w,
                // After shutdown, a client that does not read cannot hold us here.
                _ = async { let _ = writer_stop.wait_for(|s| *s).await; tokio::time::sleep(SHUTDOWN_GRACE).await } => {
                    Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "client did not read its answers"))
                }
            };
            // On a failed write `rx` is dropped here, which frees a reader blocked on it.
            written?;
        }
        writer.flush().await?;
        writer.shutdown().await
    };
    let ((), written) = tokio::join!(read, write);
    written
}
