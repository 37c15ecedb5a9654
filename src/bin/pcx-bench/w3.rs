//! W3, closed-loop clients over the socket server (64, and one alone), 256-byte records.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use serde_json::{json, Value};

use super::*;

pub(crate) struct Server {
    child: std::process::Child,
    pub(crate) socket: PathBuf,
}

impl Server {
    /// Starts `pcx serve` on `dir` and waits until it listens.
    pub(crate) fn start(dir: &Path, extra_env: &[(&str, String)]) -> Result<Server> {
        let server = Server::spawn(dir, extra_env)?;
        server.wait_ready(Duration::from_secs(30))?;
        Ok(server)
    }

    /// Starts `pcx serve` on `dir` (data in `dir/data`, socket `dir/s.sock`) without waiting.
    pub(crate) fn spawn(dir: &Path, extra_env: &[(&str, String)]) -> Result<Server> {
        let exe = std::env::current_exe()?;
        let pcx = exe.with_file_name("pcx");
        if !pcx.exists() {
            bail!("{} not found: build it with `cargo build --release` (pcx-bench runs the real server)", pcx.display());
        }
        let socket = dir.join("s.sock");
        let mut cmd = Command::new(&pcx);
        cmd.arg("--data-dir")
            .arg(dir.join("data"))
            .arg("serve")
            .arg("--socket")
            .arg(&socket);
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()?;
        Ok(Server { child, socket })
    }

    /// Waits until the server accepts connections.
    pub(crate) fn wait_ready(&self, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        while std::os::unix::net::UnixStream::connect(&self.socket).is_err() {
            if Instant::now() > deadline {
                bail!("the server did not start listening within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }

    /// SIGKILLs the server (a crash) and reaps it (W6's takeover).
    #[cfg(feature = "postgres")]
    pub(crate) fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // SAFETY: sending SIGTERM to our own child process.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn frame(v: &Value) -> Vec<u8> {
    // The bench's requests are small: always one frame.
    pcx::interface::wire::encode_frame(&pcx::interface::wire::to_msgpack(v)).unwrap_or_default()
}

/// pcx's closed-loop clients ([`drive`]): `clients` connections over the socket server, each
/// recording `per_client` artifacts of `size` bytes one after another.
pub(crate) fn closed_loop(
    socket: &Path,
    clients: usize,
    per_client: usize,
    size: usize,
) -> Result<(f64, Vec<f64>)> {
    send_records(socket, record_requests(clients, per_client, size))
}

/// The framed requests of [`closed_loop`]'s clients, built apart so that a caller measuring
/// the CPU of the run can build them first.
pub(crate) fn record_requests(clients: usize, per_client: usize, size: usize) -> Vec<Vec<Vec<u8>>> {
    (0..clients)
        .map(|c| {
            let mut seed = 1 + c as u64;
            (0..per_client)
                .map(|i| {
                    let key = format!("c{c}_r{i}");
                    let content = payload(&key, size, &mut seed);
                    frame(&json!({"op": "record_artifact", "key": key, "kind": "eager", "content_b64": base64_of(&content)}))
                })
                .collect()
        })
        .collect()
}

/// Runs `requests[c]` as client `c`'s requests over the socket server ([`drive`]).
pub(crate) fn send_records(socket: &Path, requests: Vec<Vec<Vec<u8>>>) -> Result<(f64, Vec<f64>)> {
    let socket = socket.to_path_buf();
    drive(
        requests,
        move |_| {
            let socket = socket.clone();
            async move {
                let s = tokio::net::UnixStream::connect(&socket).await?;
                Ok((tokio::io::BufReader::new(s), Vec::new()))
            }
        },
        |(mut s, mut body): (tokio::io::BufReader<tokio::net::UnixStream>, Vec<u8>), f: Vec<u8>| async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            s.get_mut().write_all(&f).await?;
            // Through a buffer, an answer's header and body come in one read, as the server
            // reads requests: the clients share the machine with the server they measure.
            let mut h = [0u8; 4];
            s.read_exact(&mut h).await?;
            body.resize(pcx::interface::wire::body_len(h) as usize, 0);
            s.read_exact(&mut body).await?;
            let answer = pcx::interface::wire::decode_answer(&body)?;
            if !is_ok(&answer) {
                bail!("{}", pcx::interface::wire::to_json(answer)?);
            }
            Ok((s, body))
        },
    )
}

/// Whether an answer says `"ok": true`, read from its MessagePack map as it is.
fn is_ok(answer: &rmpv::Value) -> bool {
    answer.as_map().is_some_and(|m| {
        m.iter()
            .any(|(k, v)| k.as_str() == Some("ok") && v.as_bool() == Some(true))
    })
}

pub(crate) fn base64_of(b: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(b)
}

pub(crate) fn w3(quick: bool) -> Result<Value> {
    let (clients, per) = if quick { (8, 50) } else { (64, 1000) };
    let d = disk(true)?;
    let fsync_ms = d["fsync_ms"].as_f64().unwrap_or(f64::NAN);
    let dir = temp_dir("w3")?;
    let server = Server::start(dir.path(), &[])?;
    let requests = record_requests(clients, per, 256);
    let cpu_before = super::usage::Usage::now();
    let (secs, lat) = send_records(&server.socket, requests)?;
    let cpu = cpu_before.per_record(
        &super::usage::Usage::now(),
        (clients * per) as f64,
        secs,
        "pcx_run",
    );
    let alone_n = if quick { 50 } else { 500 };
    let (_, alone) = closed_loop(&server.socket, 1, alone_n, 256)?;
    drop(server);
    let floors = floor::measure(
        dir.path(),
        clients,
        per,
        alone_n,
        |socket, clients, per| closed_loop(socket, clients, per, 256),
        percentile,
    )?;
    let throughput = (clients * per) as f64 / secs;
    let limit = clients as f64 / (fsync_ms / 1e3);
    let alone_p50 = percentile(alone, 0.5);
    let sled_floor = floors["floor_sled_records_per_s"]
        .as_f64()
        .unwrap_or(f64::NAN);
    let mut run = json!({
        "clients": clients,
        "records_per_s": throughput,
        "fsync_ms (same run)": fsync_ms,
        "closed_loop_limit_per_s (clients/fsync)": limit,
        "fraction_of_limit": throughput / limit,
        "p50_ms": percentile(lat.clone(), 0.5),
        "p99_ms": percentile(lat, 0.99),
        "one_client_p50_ms": alone_p50,
        "one_client_p50_over_fsync": alone_p50 / fsync_ms,
        "fraction_of_sled_floor": throughput / sled_floor,
    });
    for (k, v) in cpu {
        run[k] = json!(v);
    }
    let peers = peers::measure(clients, per, alone_n);
    if let (Some(run), Value::Object(floors)) = (run.as_object_mut(), floors) {
        run.extend(floors);
        run.extend(peers);
        let ratios = ratios(run, throughput, alone_p50);
        run.extend(ratios);
    }
    Ok(run)
}

/// pcx's figures over its peers' and the file floor's, from the same run. A ratio whose peer
/// has no figure (not installed, or failed: its `peer_…` field says which) is left out.
fn ratios(
    run: &serde_json::Map<String, Value>,
    throughput: f64,
    alone_p50: f64,
) -> Vec<(String, Value)> {
    let figure = |name: &str| run.get(name).and_then(Value::as_f64);
    let mut out = Vec::new();
    let redis = figure("peer_redis_records_per_s");
    let postgres = figure("peer_postgres_records_per_s");
    for (name, peer) in [("pcx_over_redis", redis), ("pcx_over_postgres", postgres)] {
        if let Some(peer) = peer {
            out.push((name.to_string(), json!(throughput / peer)));
        }
    }
    if let Some(better) = [redis, postgres].into_iter().flatten().reduce(f64::max) {
        out.push((
            "pcx_over_better_peer".to_string(),
            json!(throughput / better),
        ));
    }
    if let Some(p50) = figure("peer_redis_one_client_p50_ms") {
        out.push((
            "one_client_p50_over_redis".to_string(),
            json!(alone_p50 / p50),
        ));
    }
    if let Some(file) = figure("floor_file_records_per_s") {
        out.push(("pcx_over_file_floor".to_string(), json!(throughput / file)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_answer_that_says_ok_true_passes_the_clients_check() {
        let answer = |v: Value| pcx::interface::wire::to_msgpack(&v);
        assert!(is_ok(&answer(json!({"ok": true, "id": 3}))));
        assert!(is_ok(&answer(json!({"id": 3, "ok": true}))));
        assert!(!is_ok(&answer(
            json!({"ok": false, "error": {"kind": "key_not_found"}})
        )));
        assert!(!is_ok(&answer(json!({"ok": "true"}))));
        assert!(!is_ok(&answer(json!({"error": "no ok"}))));
        assert!(!is_ok(&answer(json!([true]))));
    }
}
