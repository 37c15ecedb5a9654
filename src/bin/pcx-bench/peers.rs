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
use std::io::{Read as _, Write as _};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use serde_json::{json, Map, Value};

use super::harness::{drive, percentile};
use super::{payload, temp_dir};

/// The loopback ports each peer may listen on (a range of 100 from here): the first free one,
/// from an offset by process id, so that two benches at once do not collide.
const REDIS_PORTS: u16 = 56_000;
#[cfg(feature = "postgres")]
const POSTGRES_PORTS: u16 = 56_100;

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
    add(&mut out, "redis", redis(clients, per, alone));
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

/// The first free loopback port of `base .. base + 100`.
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

// ---------------------------------------------------------------------------------------
// Redis

fn redis(clients: usize, per: usize, alone: usize) -> Result<(String, Map<String, Value>)> {
    let exe = on_path("redis-server").ok_or_else(|| {
        NotInstalled("redis-server not found on PATH (Debian package redis-server)".to_string())
    })?;
    let version = version(&exe, 2).trim_start_matches("v=").to_string();
    let user = is_root().then(|| account("redis")).flatten();
    let (place, reachable) = place(temp_dir("peer-redis")?, user.as_ref())?;
    // Redis allows root: as root, it runs as the redis user where that user can reach the
    // measured disk, and as root otherwise.
    let (owner, runs_as) = match user {
        Some(a) if reachable => (Some(a), "the redis user"),
        Some(_) => (
            None,
            "root (the redis user cannot reach the bench's directory)",
        ),
        None if is_root() => (None, "root (there is no redis user)"),
        None => (None, "the bench's own user"),
    };
    let port = free_port(REDIS_PORTS)?;
    let mut cmd = Command::new(&exe);
    cmd.arg("--port")
        .arg(port.to_string())
        .args(["--bind", "127.0.0.1", "--dir"])
        .arg(&place.data)
        .args([
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--save",
            "",
        ])
        .args(["--daemonize", "no", "--logfile", ""]);
    let mut server = Running::spawn(cmd, place, owner.as_ref())?;
    server.wait_ready("redis-server", || {
        redis_expect(port, &[b"PING"], b"+PONG\r\n")
    })?;
    // What the server runs with, as it says, not as it was asked.
    for (name, value) in [
        ("appendonly", "yes"),
        ("appendfsync", "always"),
        ("save", ""),
    ] {
        let answer = format!(
            "*2\r\n${}\r\n{name}\r\n${}\r\n{value}\r\n",
            name.len(),
            value.len()
        );
        redis_expect(
            port,
            &[b"CONFIG", b"GET", name.as_bytes()],
            answer.as_bytes(),
        )?;
    }
    let mut out = Map::new();
    for (prefix, size) in [("peer_redis", 256), ("peer_redis_1k", 1024)] {
        let many = redis_clients(port, &format!("m{size}"), clients, per, size)?;
        let (_, one) = redis_clients(port, &format!("a{size}"), 1, alone, size)?;
        figures(&mut out, prefix, clients * per, many, one);
    }
    server.finish()?;
    let about = format!(
        "redis-server {version} as {runs_as}, port {port}: appendonly yes, appendfsync always, save \"\"; SET of 256 B (1 KiB in peer_redis_1k)"
    );
    Ok((about, out))
}

/// A command in RESP, the protocol Redis speaks: an array of bulk strings.
fn resp(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Sends one command on a fresh connection and checks the answer is exactly `expected`.
fn redis_expect(port: u16, args: &[&[u8]], expected: &[u8]) -> Result<()> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(&resp(args))?;
    let mut got = Vec::new();
    let mut chunk = [0u8; 256];
    while got.len() < expected.len() {
        match s.read(&mut chunk)? {
            0 => break,
            n => got.extend_from_slice(&chunk[..n]),
        }
    }
    if got != expected {
        bail!(
            "redis answered {:?} to {:?}, not {:?}",
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(&args.join(&b' ')),
            String::from_utf8_lossy(expected)
        );
    }
    Ok(())
}

/// Closed-loop clients of `SET key value`, each answer required to be `+OK`.
fn redis_clients(
    port: u16,
    tag: &str,
    clients: usize,
    per: usize,
    size: usize,
) -> Result<(f64, Vec<f64>)> {
    let requests: Vec<Vec<Vec<u8>>> = kv_requests(tag, clients, per, size)
        .into_iter()
        .map(|c| {
            c.iter()
                .map(|(k, v)| resp(&[b"SET", k.as_bytes(), v]))
                .collect()
        })
        .collect();
    drive(
        requests,
        move |_| async move {
            let s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
            s.set_nodelay(true)?;
            Ok((s, Vec::with_capacity(64)))
        },
        |(mut s, mut reply): (tokio::net::TcpStream, Vec<u8>), req: Vec<u8>| async move {
            use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
            s.write_all(&req).await?;
            reply.clear();
            let mut chunk = [0u8; 256];
            while !reply.ends_with(b"\r\n") {
                let n = s.read(&mut chunk).await?;
                if n == 0 {
                    bail!(
                        "redis closed the connection after {:?}",
                        String::from_utf8_lossy(&reply)
                    );
                }
                reply.extend_from_slice(&chunk[..n]);
            }
            if reply != b"+OK\r\n" {
                bail!(
                    "redis answered {:?} to a SET",
                    String::from_utf8_lossy(&reply)
                );
            }
            Ok((s, reply))
        },
    )
}

// ---------------------------------------------------------------------------------------
// PostgreSQL

#[cfg(feature = "postgres")]
mod postgres {
    use super::*;

    /// The role the bench's clients connect as (the cluster's superuser, trusted on loopback).
    const ROLE: &str = "pcx_bench";

    fn bin() -> Option<PathBuf> {
        let debian = PathBuf::from("/usr/lib/postgresql/15/bin");
        if debian.join("postgres").is_file() && debian.join("initdb").is_file() {
            return Some(debian);
        }
        on_path("initdb").and_then(|p| p.parent().map(Path::to_path_buf))
    }

    pub(super) fn run(
        clients: usize,
        per: usize,
        alone: usize,
    ) -> Result<(String, Map<String, Value>)> {
        let bin = bin().ok_or_else(|| {
            NotInstalled(
                "no /usr/lib/postgresql/15/bin/postgres (Debian package postgresql-15) and no initdb on PATH"
                    .to_string(),
            )
        })?;
        let version = version(&bin.join("postgres"), 2);
        // PostgreSQL refuses to run as root.
        let owner = match is_root() {
            true => Some(account("postgres").context(
                "running as root, and there is no postgres user to run PostgreSQL as (it refuses root)",
            )?),
            false => None,
        };
        let (mut here, reachable) = place(temp_dir("peer-postgres")?, owner.as_ref())?;
        let mut runs_in = "the bench's directory".to_string();
        if !reachable {
            // A parent closed to the postgres user (such as /root): the system temp directory.
            drop(here);
            let temp = std::env::temp_dir();
            let dir = tempfile::Builder::new()
                .prefix("pcx-bench-peer-postgres-")
                .tempdir_in(&temp)
                .context("making a temporary directory")?;
            let (fallback, reachable) = place(dir, owner.as_ref())?;
            if !reachable {
                bail!(
                    "the postgres user can reach neither the bench's directory nor {}: set PCX_BENCH_DIR to a directory it can",
                    temp.display()
                );
            }
            here = fallback;
            runs_in = format!(
                "{} (the postgres user cannot reach the bench's directory)",
                temp.display()
            );
        }
        let mut initdb = Command::new(bin.join("initdb"));
        initdb
            .arg("-D")
            .arg(&here.data)
            .args(["-U", ROLE, "--auth=trust", "--encoding=UTF8", "--locale=C"])
            .args(["--no-sync", "--no-instructions"])
            .current_dir(here.dir.path());
        if let Some(a) = &owner {
            initdb.uid(a.uid).gid(a.gid);
        }
        let made = initdb.output().context("running initdb")?;
        if !made.status.success() {
            bail!("initdb failed: {}", String::from_utf8_lossy(&made.stderr));
        }
        let port = free_port(POSTGRES_PORTS)?;
        // Its own socket directory (its data directory), where a socket's path fits.
        let sockets = match here.data.as_os_str().len() < 80 {
            true => here.data.display().to_string(),
            false => String::new(),
        };
        let mut cmd = Command::new(bin.join("postgres"));
        cmd.arg("-D").arg(&here.data);
        for setting in [
            "listen_addresses=127.0.0.1".to_string(),
            format!("port={port}"),
            format!("unix_socket_directories={sockets}"),
            "fsync=on".to_string(),
            "synchronous_commit=on".to_string(),
            format!("max_connections={}", (clients + 10).max(100)),
        ] {
            cmd.arg("-c").arg(setting);
        }
        let runs_as = match &owner {
            Some(a) => format!("the {} user", a.name),
            None => "the bench's own user".to_string(),
        };
        let mut server = Running::spawn(cmd, here, owner.as_ref())?;
        let url = format!("host=127.0.0.1 port={port} user={ROLE} dbname=postgres");
        let mut setup = server.wait_ready("postgres", || {
            Ok(::postgres::Client::connect(&url, ::postgres::NoTls)?)
        })?;
        // What the server runs with, as it says, not as it was asked.
        for name in ["fsync", "synchronous_commit"] {
            let value: String = setup.query_one(&format!("SHOW {name}"), &[])?.get(0);
            if value != "on" {
                bail!("postgres runs with {name} = {value}, not on");
            }
        }
        setup.batch_execute("CREATE TABLE peer (key text PRIMARY KEY, value bytea NOT NULL)")?;
        let many = clients_of(&url, "m", clients, per)?;
        let (_, one) = clients_of(&url, "a", 1, alone)?;
        // Every INSERT answered is a row.
        let rows: i64 = setup.query_one("SELECT count(*) FROM peer", &[])?.get(0);
        if rows != (clients * per + alone) as i64 {
            bail!("{rows} rows after {} INSERTs", clients * per + alone);
        }
        drop(setup);
        let mut out = Map::new();
        figures(&mut out, "peer_postgres", clients * per, many, one);
        server.finish()?;
        let about = format!(
            "PostgreSQL {version} as {runs_as} in {runs_in}, port {port}: fsync on, synchronous_commit on; one INSERT of 256 B a request, autocommit"
        );
        Ok((about, out))
    }

    /// Closed-loop clients, each on its own connection, one prepared INSERT a request.
    fn clients_of(url: &str, tag: &str, clients: usize, per: usize) -> Result<(f64, Vec<f64>)> {
        let url = url.to_string();
        drive(
            kv_requests(tag, clients, per, 256),
            move |_| {
                let url = url.clone();
                async move {
                    let (client, connection) =
                        tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
                    tokio::spawn(connection);
                    let insert = client
                        .prepare("INSERT INTO peer (key, value) VALUES ($1, $2)")
                        .await?;
                    Ok((client, insert))
                }
            },
            |(client, insert): (tokio_postgres::Client, tokio_postgres::Statement),
             (key, value): (String, Vec<u8>)| async move {
                let n = client.execute(&insert, &[&key, &value]).await?;
                if n != 1 {
                    bail!("the INSERT of {key} inserted {n} rows");
                }
                Ok((client, insert))
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_set_is_an_array_of_bulk_strings() {
        assert_eq!(
            resp(&[b"SET", b"k1", b"abc"]),
            b"*3\r\n$3\r\nSET\r\n$2\r\nk1\r\n$3\r\nabc\r\n".to_vec()
        );
    }

    /// A fake Redis that answers every command with `answer`, on a thread of its own.
    fn fake_redis(answer: &'static [u8]) -> u16 {
        let listener = std::net::TcpListener::bind(("127.0.0.1", 0)).expect("a port");
        let port = listener.local_addr().expect("its address").port();
        std::thread::spawn(move || {
            if let Ok((mut s, _)) = listener.accept() {
                let mut buf = [0u8; 4096];
                while s.read(&mut buf).is_ok_and(|n| n > 0) {
                    let _ = s.write_all(answer);
                }
            }
        });
        port
    }

    #[test]
    fn the_clients_take_only_ok_for_an_answer_and_show_any_other() {
        let fine = redis_clients(fake_redis(b"+OK\r\n"), "t", 1, 3, 16).expect("three SETs");
        assert_eq!(fine.1.len(), 3, "a latency per request");
        let e = redis_clients(fake_redis(b"-ERR out of memory\r\n"), "t", 1, 3, 16)
            .expect_err("an error answer fails the client");
        assert!(format!("{e:#}").contains("-ERR out of memory"), "{e:#}");
    }
}
