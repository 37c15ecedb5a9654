//! W3's peers: the servers a user would run instead of pcx for durable small writes, driven by
//! the same closed-loop clients ([`drive`]) in the same run, so `pcx / peer` is a ratio of
//! figures taken on the same disk under the same neighbours.
//!
//! - **Redis** (`redis-server`, Debian's package) with `appendonly yes` and `appendfsync
//!   always`: every write is in the append-only file and `fsync`ed before it is answered, the
//!   durability pcx promises (PyTorch's remote caches use Redis). `save ""`: no RDB snapshots,
//!   which would only add writes. `SET key <value>`, 256 bytes and, in a second row, 1 KiB.
//! - **PostgreSQL 15** (Debian's package) with `fsync = on` and `synchronous_commit = on`: a
//!   commit is answered once its WAL is flushed. One `INSERT` of the same 256 bytes a request,
//!   autocommit, on a table `(key text PRIMARY KEY, value bytea)`; only with cargo feature
//!   `postgres` (its client, tokio-postgres, comes with it).
//!
//! Each server is started here, on a loopback port, with its data in a fresh directory on the
//! measured disk (beside pcx's), and stopped by its process id when done; its directory is
//! removed. A peer that is not installed is reported as such, and one that fails says why: the
//! bench goes on either way, with pcx's own figures.

use std::fs::File;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use serde_json::{json, Map, Value};

use super::harness::{drive, percentile};
use super::{payload, temp_dir};

#[cfg(feature = "postgres")]
mod postgres;
mod redis;

/// How long a peer may take to answer its first request, and to shut down.
const START_LIMIT: Duration = Duration::from_secs(60);
const STOP_LIMIT: Duration = Duration::from_secs(30);

/// A peer that is not on this machine: reported as "not installed", not as a failure.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct NotInstalled(String);

/// Runs the clients (`clients` × `per`, then one alone for `alone`) against every peer and
/// gives their figures by name, and for each peer a `peer_<name>` string saying what ran (or
/// why nothing did).
pub(crate) fn measure(clients: usize, per: usize, alone: usize) -> Map<String, Value> {
    let mut out = Map::new();
    add(&mut out, "redis", redis::run(clients, per, alone));
    #[cfg(feature = "postgres")]
    add(&mut out, "postgres", postgres::run(clients, per, alone));
    #[cfg(not(feature = "postgres"))]
    out.insert(
        "peer_postgres".to_string(),
        json!("not built: this pcx-bench was built without cargo feature `postgres` (cargo build --release --features postgres)"),
    );
    out
}

fn add(out: &mut Map<String, Value>, name: &str, result: Result<(String, Map<String, Value>)>) {
    match result {
        Ok((about, figures)) => {
            out.insert(format!("peer_{name}"), json!(about));
            out.extend(figures);
        }
        Err(e) => {
            let why = match e.downcast_ref::<NotInstalled>() {
                Some(n) => format!("not installed: {n}"),
                None => format!("failed: {e:#}"),
            };
            eprintln!("pcx-bench: the {name} peer: {why}");
            out.insert(format!("peer_{name}"), json!(why));
        }
    }
}

/// A peer's figures under `prefix`, as pcx's own are named.
fn figures(
    out: &mut Map<String, Value>,
    prefix: &str,
    count: usize,
    (secs, lat): (f64, Vec<f64>),
    alone: Vec<f64>,
) {
    out.insert(
        format!("{prefix}_records_per_s"),
        json!(count as f64 / secs),
    );
    out.insert(
        format!("{prefix}_p50_ms"),
        json!(percentile(lat.clone(), 0.5)),
    );
    out.insert(format!("{prefix}_p99_ms"), json!(percentile(lat, 0.99)));
    out.insert(
        format!("{prefix}_one_client_p50_ms"),
        json!(percentile(alone, 0.5)),
    );
}

/// Each client's keys and values: distinct, incompressible values like pcx's clients send.
fn kv_requests(tag: &str, clients: usize, per: usize, size: usize) -> Vec<Vec<(String, Vec<u8>)>> {
    (0..clients)
        .map(|c| {
            let mut seed = 1 + c as u64;
            (0..per)
                .map(|i| {
                    let key = format!("{tag}_c{c}_r{i}");
                    let value = payload(&key, size, &mut seed);
                    (key, value)
                })
                .collect()
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// Running a server

/// A system account a server runs as when the bench runs as root.
struct Account {
    name: &'static str,
    uid: u32,
    gid: u32,
}

fn account(name: &'static str) -> Option<Account> {
    let cname = std::ffi::CString::new(name).ok()?;
    // SAFETY: getpwnam_r writes only into `pwd` and `buf`, both ours and sized as given.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 << 10];
    let mut found = std::ptr::null_mut();
    let rc = unsafe {
        libc::getpwnam_r(
            cname.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr(),
            buf.len(),
            &mut found,
        )
    };
    (rc == 0 && !found.is_null()).then_some(Account {
        name,
        uid: pwd.pw_uid,
        gid: pwd.pw_gid,
    })
}

fn is_root() -> bool {
    // SAFETY: geteuid cannot fail and touches no memory.
    unsafe { libc::geteuid() == 0 }
}

/// The first executable `name` on PATH.
fn on_path(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| {
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// The first free loopback port of `base .. base + 100` (each peer's range), from an offset by
/// process id, so that two benches at once do not collide.
fn free_port(base: u16) -> Result<u16> {
    let offset = (std::process::id() % 100) as u16;
    (0..100)
        .map(|i| base + (offset + i) % 100)
        .find(|&p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok())
        .with_context(|| format!("no free loopback port in {base}..{}", base + 100))
}

/// A peer's directory: `data` (the server's, mode 0700, owned by `owner` if given) and `log`
/// (the bench's, the server's output).
struct Place {
    dir: tempfile::TempDir,
    data: PathBuf,
}

/// Prepares `dir` for a server run as `owner`, and says whether `owner` can write its data
/// directory (every parent must let it through: a parent closed to it is not ours to open).
fn place(dir: tempfile::TempDir, owner: Option<&Account>) -> Result<(Place, bool)> {
    use std::os::unix::fs::PermissionsExt as _;
    let mode = |p: &Path, m| std::fs::set_permissions(p, std::fs::Permissions::from_mode(m));
    mode(dir.path(), 0o755)?;
    let data = dir.path().join("data");
    std::fs::create_dir(&data).with_context(|| format!("making {}", data.display()))?;
    mode(&data, 0o700)?;
    let mut reachable = true;
    if let Some(a) = owner {
        std::os::unix::fs::chown(&data, Some(a.uid), Some(a.gid))
            .with_context(|| format!("giving {} to the {} user", data.display(), a.name))?;
        reachable = Command::new("test")
            .arg("-w")
            .arg(&data)
            .arg("-a")
            .arg("-x")
            .arg(&data)
            .uid(a.uid)
            .gid(a.gid)
            .status()
            .is_ok_and(|s| s.success());
    }
    Ok((Place { dir, data }, reachable))
}

/// A server the bench started. [`Running::finish`] (or dropping it) stops it by its process
/// id (SIGTERM, up to [`STOP_LIMIT`] to shut down, then SIGKILL) and removes its directory.
struct Running {
    child: Child,
    place: Option<Place>,
}

impl Running {
    fn spawn(mut cmd: Command, place: Place, owner: Option<&Account>) -> Result<Running> {
        let log = File::create(place.dir.path().join("log"))?;
        if let Some(a) = owner {
            cmd.uid(a.uid).gid(a.gid);
        }
        let child = cmd
            .current_dir(place.dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {:?}", cmd.get_program()))?;
        Ok(Running {
            child,
            place: Some(place),
        })
    }

    /// The last lines of the server's output, for an error.
    fn log_tail(&self) -> String {
        let Some(place) = &self.place else {
            return String::new();
        };
        let text = std::fs::read_to_string(place.dir.path().join("log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(8)..].join(" | ")
    }

    /// Polls `probe` until it succeeds, the server exits, or [`START_LIMIT`] passes.
    fn wait_ready<T>(&mut self, what: &str, mut probe: impl FnMut() -> Result<T>) -> Result<T> {
        let deadline = Instant::now() + START_LIMIT;
        loop {
            let e = match probe() {
                Ok(t) => return Ok(t),
                Err(e) => e,
            };
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "{what} exited ({status}) before it answered; its log: {}",
                    self.log_tail()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "{what} did not answer within {START_LIMIT:?} ({e:#}); its log: {}",
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn stop(&mut self) -> Result<()> {
        if self.child.try_wait()?.is_none() {
            // SAFETY: sending SIGTERM to our own child, not yet reaped, so its id is still its.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + STOP_LIMIT;
            while self.child.try_wait()?.is_none() {
                if Instant::now() > deadline {
                    self.child.kill()?;
                    self.child.wait()?;
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        if let Some(place) = self.place.take() {
            let path = place.dir.path().to_path_buf();
            place
                .dir
                .close()
                .with_context(|| format!("removing {}", path.display()))?;
        }
        Ok(())
    }

    /// Stops the server and removes its directory, reporting a failure of either.
    fn finish(mut self) -> Result<()> {
        self.stop()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            eprintln!("pcx-bench: stopping a peer: {e:#}");
        }
    }
}

/// The version a server's `--version` prints, as its word at `word`.
fn version(exe: &Path, word: usize) -> String {
    Command::new(exe)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            let text = String::from_utf8_lossy(&o.stdout).to_string();
            text.split_whitespace().nth(word).map(str::to_string)
        })
        .unwrap_or_else(|| "(version unknown)".to_string())
}
