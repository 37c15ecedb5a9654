//! W3's Redis peer: `redis-server` with `appendonly yes`, `appendfsync always` and no RDB
//! saves, driven with `SET key <value>` in RESP over TCP, spoken here (one command and the
//! `+OK` it must answer need no client library).

use std::io::{Read as _, Write as _};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Result};
use serde_json::{json, Map, Value};

use super::*;
use crate::usage::Usage;

/// The loopback ports Redis may listen on: the first free one of 100 from here.
const REDIS_PORTS: u16 = 56_000;

pub(super) fn run(
    clients: usize,
    per: usize,
    alone: usize,
) -> Result<(String, Map<String, Value>)> {
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
        let requests = set_requests(&format!("m{size}"), clients, per, size);
        let cpu_before = Usage::now();
        let many = redis_clients(port, requests)?;
        if size == 256 {
            // Whose CPU a SET cost, as pcx's run reports its own.
            let cpu = cpu_before.per_record(&Usage::now(), (clients * per) as f64, many.0, prefix);
            out.extend(cpu.into_iter().map(|(k, v)| (k, json!(v))));
        }
        let (_, one) = redis_clients(port, set_requests(&format!("a{size}"), 1, alone, size))?;
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

/// Each client's `SET key value` commands, in RESP.
fn set_requests(tag: &str, clients: usize, per: usize, size: usize) -> Vec<Vec<Vec<u8>>> {
    kv_requests(tag, clients, per, size)
        .into_iter()
        .map(|c| {
            c.iter()
                .map(|(k, v)| resp(&[b"SET", k.as_bytes(), v]))
                .collect()
        })
        .collect()
}

/// Closed-loop clients sending `requests` (`SET`s), each answer required to be `+OK`.
fn redis_clients(port: u16, requests: Vec<Vec<Vec<u8>>>) -> Result<(f64, Vec<f64>)> {
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
        let fine =
            redis_clients(fake_redis(b"+OK\r\n"), set_requests("t", 1, 3, 16)).expect("three SETs");
        assert_eq!(fine.1.len(), 3, "a latency per request");
        let e = redis_clients(
            fake_redis(b"-ERR out of memory\r\n"),
            set_requests("t", 1, 3, 16),
        )
        .expect_err("an error answer fails the client");
        assert!(format!("{e:#}").contains("-ERR out of memory"), "{e:#}");
    }
}
