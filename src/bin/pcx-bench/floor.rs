//! W3's floors: the same closed-loop clients against servers that do only part of pcx's
//! work, measured in the same run as W3 itself.
//!
//! W3's target is a ratio to `64 / one fsync`, a bound no server reaches that must also read
//! requests and answer them over a socket on the same two cores as its clients. These floors
//! say how much of the gap belongs to the machine and to sled, and how much to pcx:
//!
//! - **socket**: each frame is answered at once, nothing stored. What the clients, the
//!   socket and one server thread cost.
//! - **file**: group commit to a bare append-only file, one `fdatasync` a group. About the
//!   least any durable server can do here.
//! - **sled**: group commit as pcx makes it durable with sled 0.34.7 (one insert a group,
//!   sled's `flush`, then `fdatasync` of sled's data file, whose write cache sled's
//!   `sync_file_range` leaves unflushed), with nothing else: no decoding, no hashing, no
//!   events, no actor.
//!
//! Each server is a thread of this process (a current-thread runtime, like pcx's server)
//! plus, when it stores, a committer thread: it takes every request queued while the last
//! group was being made durable, exactly as pcx's committer does.

use std::fs::File;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread::JoinHandle;

use anyhow::{anyhow, bail, Context as _, Result};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::device::DeviceCounts;

/// The largest frame a floor server reads (W3's frames are well under a kilobyte).
const MAX_FRAME: u64 = 1 << 20;

/// What a floor server does with each request before answering it.
#[derive(Clone, Copy, Debug)]
pub enum Floor {
    Socket,
    File,
    Sled,
}

impl Floor {
    pub const ALL: [Floor; 3] = [Floor::Socket, Floor::File, Floor::Sled];

    pub fn name(self) -> &'static str {
        match self {
            Floor::Socket => "socket",
            Floor::File => "file",
            Floor::Sled => "sled",
        }
    }
}

/// A request's body and the signal that it is durable.
type Pending = (Vec<u8>, tokio::sync::oneshot::Sender<()>);

/// Where a storing floor's committer makes groups durable.
enum Store {
    File(File),
    Sled {
        db: sled::Db,
        tree: sled::Tree,
        data_file: File,
        next: u64,
    },
}

impl Store {
    fn open(floor: Floor, dir: &Path) -> Result<Option<Store>> {
        Ok(match floor {
            Floor::Socket => None,
            Floor::File => Some(Store::File(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(dir.join("log"))
                    .context("opening the file floor's log")?,
            )),
            Floor::Sled => {
                let path = dir.join("sled");
                let db = sled::Config::new()
                    .path(&path)
                    .flush_every_ms(None)
                    .open()
                    .context("opening the sled floor's database")?;
                let tree = db.open_tree("pages")?;
                let data_file = File::open(path.join("db")).context("opening sled's data file")?;
                Some(Store::Sled {
                    db,
                    tree,
                    data_file,
                    next: 0,
                })
            }
        })
    }

    fn commit(&mut self, page: &[u8]) -> Result<()> {
        match self {
            Store::File(f) => {
                f.write_all(page)?;
                f.sync_data()?;
            }
            Store::Sled {
                db,
                tree,
                data_file,
                next,
            } => {
                tree.insert(next.to_be_bytes(), page)?;
                *next += 1;
                db.flush()?;
                data_file.sync_data()?;
            }
        }
        Ok(())
    }
}

/// Takes every request queued while the last group was committed, commits them as one page
/// and answers them all; ends when the server is gone.
fn commit_groups(queue: mpsc::Receiver<Pending>, mut store: Store) -> Result<()> {
    let mut page = Vec::new();
    while let Ok(first) = queue.recv() {
        let mut group = vec![first];
        group.extend(queue.try_iter());
        page.clear();
        for (body, _) in &group {
            page.extend_from_slice(body);
        }
        store.commit(&page)?;
        for (_, durable) in group {
            let _ = durable.send(());
        }
    }
    Ok(())
}

/// Serves one connection: each frame read is answered once it is durable (if stored at all).
async fn serve(
    stream: tokio::net::UnixStream,
    commit: Option<mpsc::Sender<Pending>>,
    answer: std::sync::Arc<Vec<u8>>,
) -> std::io::Result<()> {
    let (reader, mut writer) = stream.into_split();
    let mut reader = tokio::io::BufReader::with_capacity(64 << 10, reader);
    loop {
        let mut header = [0u8; pcx::interface::wire::HEADER_LEN];
        match reader.read_exact(&mut header).await {
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            other => other?,
        };
        let len = pcx::interface::wire::body_len(header);
        if len > MAX_FRAME {
            return Err(std::io::Error::other(format!("a frame of {len} bytes")));
        }
        let mut body = vec![0u8; len as usize];
        reader.read_exact(&mut body).await?;
        if let Some(queue) = &commit {
            let (durable, wait) = tokio::sync::oneshot::channel();
            let stopped = || std::io::Error::other("the committer stopped");
            queue.send((body, durable)).map_err(|_| stopped())?;
            wait.await.map_err(|_| stopped())?;
        }
        writer.write_all(&answer).await?;
    }
}

/// A running floor server.
pub struct FloorServer {
    pub socket: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<JoinHandle<Result<()>>>,
    committer: Option<JoinHandle<Result<()>>>,
}

impl FloorServer {
    /// Listens on `dir/floor.sock`, storing (if at all) under `dir`.
    pub fn start(floor: Floor, dir: &Path) -> Result<FloorServer> {
        let socket = dir.join("floor.sock");
        let listener = std::os::unix::net::UnixListener::bind(&socket)
            .with_context(|| format!("binding {}", socket.display()))?;
        listener.set_nonblocking(true)?;
        let (commit, committer) = match Store::open(floor, dir)? {
            None => (None, None),
            Some(store) => {
                let (tx, rx) = mpsc::channel();
                let thread = std::thread::Builder::new()
                    .name("floor-committer".into())
                    .spawn(move || commit_groups(rx, store))?;
                (Some(tx), Some(thread))
            }
        };
        let answer = std::sync::Arc::new(pcx::interface::wire::encode_frame(
            &pcx::interface::wire::to_msgpack(&json!({ "ok": true })),
        )?);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = std::thread::Builder::new()
            .name("floor-server".into())
            .spawn(move || -> Result<()> {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_io()
                    .build()?;
                let local = tokio::task::LocalSet::new();
                local.block_on(&runtime, async move {
                    let listener = tokio::net::UnixListener::from_std(listener)?;
                    let accept = async {
                        loop {
                            let (stream, _) = listener.accept().await?;
                            let (commit, answer) = (commit.clone(), answer.clone());
                            tokio::task::spawn_local(async move {
                                let _ = serve(stream, commit, answer).await;
                            });
                        }
                    };
                    tokio::select! {
                        _ = stopped => Ok(()),
                        failed = accept => failed,
                    }
                })
            })?;
        Ok(FloorServer {
            socket,
            stop: Some(stop),
            server: Some(server),
            committer,
        })
    }

    /// Stops the server (its clients are done) and reports a failure of either thread.
    pub fn finish(mut self) -> Result<()> {
        self.shut()
    }

    fn shut(&mut self) -> Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        // The server thread's end drops every sender of the committer's queue, ending it.
        for (what, thread) in [
            ("server", self.server.take()),
            ("committer", self.committer.take()),
        ] {
            if let Some(thread) = thread {
                thread
                    .join()
                    .map_err(|_| anyhow!("the floor {what} thread panicked"))??;
            }
        }
        Ok(())
    }
}

impl Drop for FloorServer {
    fn drop(&mut self) {
        let _ = self.shut();
    }
}

/// Runs W3's clients (`clients` × `per_client`, then one client alone for `alone`) against
/// each floor, and gives their figures by name.
pub fn measure(
    dir: &Path,
    clients: usize,
    per_client: usize,
    alone: usize,
    mut closed_loop: impl FnMut(&Path, usize, usize) -> Result<(f64, Vec<f64>)>,
    percentile: impl Fn(Vec<f64>, f64) -> f64,
) -> Result<Value> {
    let mut out = serde_json::Map::new();
    for floor in Floor::ALL {
        let sub = dir.join(floor.name());
        std::fs::create_dir(&sub)?;
        let server = FloorServer::start(floor, &sub)?;
        let device_before = DeviceCounts::now();
        let many = closed_loop(&server.socket, clients, per_client);
        // The device round trips a record cost, as pcx's run and the peers report theirs.
        let device = device_before.per_record(
            &DeviceCounts::now(),
            (clients * per_client) as f64,
            &format!("floor_{}", floor.name()),
        );
        let one = many.and_then(|m| Ok((m, closed_loop(&server.socket, 1, alone)?)));
        let finished = server.finish();
        let ((secs, _), (_, lat)) = match (one, finished) {
            (Ok(figures), Ok(())) => figures,
            // A thread's failure says more than the clients' broken connections.
            (_, Err(e)) | (Err(e), Ok(())) => {
                bail!("the {} floor: {e:#}", floor.name())
            }
        };
        out.insert(
            format!("floor_{}_records_per_s", floor.name()),
            json!((clients * per_client) as f64 / secs),
        );
        out.insert(
            format!("floor_{}_one_client_p50_ms", floor.name()),
            json!(percentile(lat, 0.5)),
        );
        out.extend(device.into_iter().map(|(k, v)| (k, json!(v))));
    }
    Ok(Value::Object(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read as _;

    /// One closed-loop client, synchronous: each frame's answer is read before the next is sent.
    fn send_all(socket: &Path, bodies: &[Vec<u8>]) {
        let mut s = std::os::unix::net::UnixStream::connect(socket).expect("connect");
        for body in bodies {
            let mut frame = (body.len() as u32).to_be_bytes().to_vec();
            frame.extend_from_slice(body);
            s.write_all(&frame).expect("send");
            let mut header = [0u8; pcx::interface::wire::HEADER_LEN];
            s.read_exact(&mut header).expect("answer header");
            let mut answer = vec![0u8; pcx::interface::wire::body_len(header) as usize];
            s.read_exact(&mut answer).expect("answer body");
            let answer = pcx::interface::wire::decode_answer(&answer)
                .and_then(pcx::interface::wire::to_json);
            assert_eq!(answer.expect("an answer")["ok"], true);
        }
    }

    /// sled's IO threads hold its lock for a moment after the database is dropped.
    fn reopen(path: &Path) -> sled::Db {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            match sled::Config::new().path(path).open() {
                Ok(db) => return db,
                Err(e) if std::time::Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                Err(e) => panic!("reopening {}: {e}", path.display()),
            }
        }
    }

    #[test]
    fn every_floor_answers_each_request_and_the_storing_ones_keep_every_byte_in_order() {
        let bodies: Vec<Vec<u8>> = (0..40u8).map(|i| vec![i; 50 + i as usize]).collect();
        for floor in Floor::ALL {
            let dir = tempfile::tempdir().expect("temporary directory");
            let server = FloorServer::start(floor, dir.path()).expect("a floor server");
            // Two clients, one after the other: each connection is served.
            send_all(&server.socket, &bodies[..25]);
            send_all(&server.socket, &bodies[25..]);
            server.finish().expect("a clean stop");
            let stored = match floor {
                Floor::Socket => {
                    assert!(!dir.path().join("log").exists() && !dir.path().join("sled").exists());
                    continue;
                }
                Floor::File => std::fs::read(dir.path().join("log")).expect("the log"),
                Floor::Sled => {
                    let db = reopen(&dir.path().join("sled"));
                    let pages = db.open_tree("pages").expect("pages");
                    pages
                        .iter()
                        .flat_map(|p| p.expect("a page").1.to_vec())
                        .collect()
                }
            };
            assert_eq!(
                stored,
                bodies.concat(),
                "{}: every body, in order",
                floor.name()
            );
        }
    }
}
