//! `pcx-bench`: the workloads of `../shared/bench/WORKLOADS.md`, each on a fresh temporary
//! data directory, with its reference measured in the same run (the disk's figures swing
//! tenfold with the neighbours' load, so results are ratios).
//!
//! ```text
//! pcx-bench disk | w1 | w2 | w3 | w4 | w5 | compare-torch  [--quick] [--runs N] [--json]
//! ```

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};
use serde_json::{json, Value};

use pcx::actor::{
    CreateCacheEntries, Edit, EditArtifact, LoadCacheEntry, RecordArtifact, RecordEntry,
    SaveToDynamoCache,
};
use pcx::core::model::{Artifact, DynamoCacheEntry, DynamoCodeEntry};
use pcx::{Config, Context};

mod floor;

#[derive(Parser, Debug)]
#[command(
    name = "pcx-bench",
    about = "pcx's workloads W1–W5 beside their references"
)]
struct Cli {
    /// Small sizes, for CI: every workload runs, figures are not meaningful.
    #[arg(long, global = true)]
    quick: bool,
    /// Runs per figure (the median is reported).
    #[arg(long, global = true, default_value_t = 3)]
    runs: usize,
    /// One JSON object per run on stdout instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Workload,
}

#[derive(Subcommand, Debug, Clone)]
enum Workload {
    /// fsync latency of a small append, and sequential write + fsync bandwidth.
    Disk,
    /// A compile session: records, entries, edits, one stitch; every change durable.
    W1,
    /// Cold start of W1's log in a fresh process, with and without a snapshot.
    W2,
    /// 64 closed-loop clients over the socket server, 256-byte records; then its floors.
    W3,
    /// 1 MiB artifacts: bandwidth against sequential write + fsync.
    W4,
    /// Loads of saved entries: eager against a plugin-served kind.
    W5,
    /// W1 in pcx and in PyTorch, alternately, 3 times each.
    CompareTorch {
        #[arg(long)]
        python: Option<PathBuf>,
    },
    /// (internal) Opens DIR, answers one query, prints time and peak memory.
    #[command(hide = true)]
    OpenProbe { dir: PathBuf },
}

/// W1's sizes.
#[derive(Clone, Copy, Debug)]
struct W1Size {
    backends: usize,
    entries: usize,
    codes: usize,
    ids: usize,
    edits: usize,
    size: usize,
}

impl W1Size {
    fn new(quick: bool) -> W1Size {
        if quick {
            W1Size {
                backends: 2_000,
                entries: 200,
                codes: 3,
                ids: 3,
                edits: 200,
                size: 1024,
            }
        } else {
            W1Size {
                backends: 100_000,
                entries: 10_000,
                codes: 3,
                ids: 3,
                edits: 10_000,
                size: 1024,
            }
        }
    }
}

/// See [`pcx::alloc`].
#[global_allocator]
static ALLOCATOR: pcx::alloc::Allocator = mimalloc::MiMalloc;

fn main() -> ExitCode {
    pcx::alloc::small_pages();
    let cli = Cli::parse();
    pcx::trace::init(pcx::trace::LogFormat::Text, "error");
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pcx-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: &Cli) -> Result<()> {
    // `--runs` runs of one workload, each a JSON object of its figures.
    let runs = |workload: fn(bool) -> Result<Value>| -> Result<Vec<Value>> {
        (0..cli.runs).map(|_| workload(cli.quick)).collect()
    };
    match &cli.command {
        Workload::Disk => report(cli, "disk", runs(disk)?),
        Workload::W1 => report(cli, "w1", runs(|quick| w1(quick).map(|r| r.0))?),
        Workload::W2 => report(cli, "w2", w2(cli)?),
        Workload::W3 => report(cli, "w3", runs(w3)?),
        Workload::W4 => report(cli, "w4", runs(w4)?),
        Workload::W5 => report(cli, "w5", runs(w5)?),
        Workload::CompareTorch { python } => compare_torch(cli, python.clone()),
        Workload::OpenProbe { dir } => open_probe(dir),
    }
}

/// Prints each run (JSON) or the medians (a table), with the reference beside each figure.
fn report(cli: &Cli, name: &str, runs: Vec<Value>) -> Result<()> {
    if cli.json {
        for r in &runs {
            println!(
                "{}",
                json!({ "workload": name, "quick": cli.quick, "run": r })
            );
        }
        return Ok(());
    }
    println!(
        "{name}: median of {} run(s){}",
        runs.len(),
        if cli.quick {
            " (--quick: sizes too small to mean much)"
        } else {
            ""
        }
    );
    let Some(Value::Object(first)) = runs.first() else {
        return Ok(());
    };
    for key in first.keys() {
        let values: Vec<f64> = runs.iter().filter_map(|r| r[key].as_f64()).collect();
        if values.len() == runs.len() {
            println!("  {key:<34} {}", fmt_num(median(values)));
        } else {
            println!("  {key:<34} {}", first[key]);
        }
    }
    Ok(())
}

fn fmt_num(x: f64) -> String {
    if x.abs() >= 100.0 || x == x.trunc() {
        format!("{x:.0}")
    } else {
        format!("{x:.4}")
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

fn temp_dir(tag: &str) -> Result<tempfile::TempDir> {
    // Under the working directory's file system (the disk being measured), not /tmp's tmpfs.
    let base = std::env::var_os("PCX_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    tempfile::Builder::new()
        .prefix(&format!("pcx-bench-{tag}-"))
        .tempdir_in(base)
        .context("making a temporary directory")
}

// ---------------------------------------------------------------------------------------
// disk

/// fsync latency of a 256-byte append (median of many) and sequential write + fsync MiB/s.
fn disk(quick: bool) -> Result<Value> {
    let dir = temp_dir("disk")?;
    let path = dir.path().join("probe");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)?;
    let n = if quick { 50 } else { 200 };
    let mut lat = Vec::with_capacity(n);
    let buf = [7u8; 256];
    for _ in 0..n {
        let t = Instant::now();
        f.write_all(&buf)?;
        f.sync_data()?;
        lat.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let mib = if quick { 8 } else { 64 };
    let chunk = vec![0x5au8; 1 << 20];
    let big = dir.path().join("seq");
    let t = Instant::now();
    let mut g = std::fs::File::create(&big)?;
    for i in 0..mib {
        let mut c = chunk.clone();
        c[0] = i as u8;
        g.write_all(&c)?;
    }
    g.sync_all()?;
    let secs = t.elapsed().as_secs_f64();
    Ok(json!({ "fsync_ms": median(lat), "seq_write_fsync_mib_s": mib as f64 / secs }))
}

/// Sequential write bandwidth for `mib` MiB written 1 MiB at a time with an `fdatasync` every
/// 64 MiB and at the end, as W4's group commits write. This disk writes its first few
/// hundred MiB at about the 64 MiB figure and then about four times slower (a burst
/// allowance: per-commit times in W4 went from 45 ms to 200 ms per 64 MiB, and `dd` showed
/// the same), so a workload writing 1,000 MiB is compared with the disk writing as much.
fn stream_bandwidth(mib: usize) -> Result<f64> {
    let dir = temp_dir("stream")?;
    let mut f = std::fs::File::create(dir.path().join("stream"))?;
    let mut seed = 99u64;
    let chunks: Vec<Vec<u8>> = (0..8)
        .map(|i| payload(&format!("chunk{i}"), 1 << 20, &mut seed))
        .collect();
    let t = Instant::now();
    for i in 0..mib {
        f.write_all(&chunks[i % chunks.len()])?;
        if (i + 1) % 64 == 0 {
            f.sync_data()?;
        }
    }
    f.sync_data()?;
    Ok(mib as f64 / t.elapsed().as_secs_f64())
}

// ---------------------------------------------------------------------------------------
// W1

fn config_for(dir: &Path) -> Result<Config> {
    let mut c = Config::load(None, std::env::vars())?;
    c.data_dir = dir.to_path_buf();
    Ok(c)
}

/// Distinct, incompressible content: the key's bytes, then seeded pseudo-random bytes.
fn payload(key: &str, size: usize, seed: &mut u64) -> Vec<u8> {
    let mut v = key.as_bytes().to_vec();
    while v.len() < size {
        // xorshift64*: deterministic and fast enough not to be measured.
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        v.extend_from_slice(&seed.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    v.truncate(size);
    v
}

fn w1_entry(i: usize, keys: &[String], s: W1Size) -> DynamoCacheEntry {
    let per_entry = s.codes * s.ids;
    DynamoCacheEntry {
        codes: (0..s.codes)
            .map(|c| DynamoCodeEntry {
                python_module: "m".into(),
                backend_ids: (0..s.ids)
                    .map(|j| keys[(i * per_entry + c * s.ids + j) % keys.len()].clone())
                    .collect(),
                ..Default::default()
            })
            .collect(),
        device_type: "cpu".into(),
        fn_name: Some(format!("f{i}")),
        fn_first_lineno: Some(i as i64),
        ..Default::default()
    }
}

/// How many requests [`pipelined`] keeps in flight: four commit groups' worth, enough to keep
/// the committer busy.
const WINDOW: usize = 4096;

/// Sends the messages through a [`pcx::context::Pipeline`], up to [`WINDOW`] in flight (as
/// an orchestrator with many changes under way does): the time until the last is durable.
/// Each answer is checked and dropped as it arrives, as a caller that uses it would, rather
/// than all 10,000 loaded entries being held to the end.
async fn pipelined<M, T>(ctx: &Context, msgs: impl IntoIterator<Item = M>) -> Result<()>
where
    M: Send + 'static,
    T: Send + 'static,
    pcx::actor::ContextActor: actix::Handler<pcx::actor::Tagged<M, T>>,
{
    let mut pipeline = ctx.pipeline::<T>();
    let mut answers = Vec::with_capacity(WINDOW);
    let mut msgs = msgs.into_iter();
    loop {
        while pipeline.in_flight() < WINDOW {
            match msgs.next() {
                Some(m) => pipeline.send(m),
                None => break,
            };
        }
        if pipeline.answers(&mut answers, WINDOW).await == 0 {
            return Ok(());
        }
        for (_, answer) in answers.drain(..) {
            if let Err(e) = answer {
                bail!("{e}");
            }
        }
    }
}

/// Runs W1 on a fresh directory; gives the figures and keeps the directory for W2/W5.
fn w1(quick: bool) -> Result<(Value, tempfile::TempDir)> {
    w1_with(quick, "eager", None)
}

/// W1 with artifacts of `kind` (edits then use the plugin's `clear_backend_id`).
fn w1_with(quick: bool, kind: &str, plugins: Option<&Path>) -> Result<(Value, tempfile::TempDir)> {
    let s = W1Size::new(quick);
    let dir = temp_dir("w1")?;
    let mut config = config_for(dir.path())?;
    if let Some(p) = plugins {
        config.plugin_dir = p.to_path_buf();
    }
    let mut seed = 82961u64;
    let keys: Vec<String> = (0..s.backends)
        .map(|i| format!("__compiled_fn_{i}_{:016x}", i as u64 * 0x9e37_79b9))
        .collect();
    let contents: Vec<Vec<u8>> = if kind == "eager" {
        keys.iter().map(|k| payload(k, s.size, &mut seed)).collect()
    } else {
        keys.iter()
            .map(|k| bundle_doc(k, s.size, &mut seed))
            .collect()
    };
    let entries: Vec<DynamoCacheEntry> = (0..s.entries).map(|i| w1_entry(i, &keys, s)).collect();
    let kind = kind.to_string();
    let figures = actix::System::new().block_on(async move {
        let ctx = Context::open(&config)?;
        let t0 = Instant::now();
        pipelined(
            &ctx,
            keys.iter().zip(contents).map(|(k, c)| RecordArtifact {
                artifact: Artifact {
                    key: k.clone(),
                    kind: kind.clone(),
                    content: c,
                },
            }),
        )
        .await?;
        let t1 = Instant::now();
        pipelined(
            &ctx,
            entries.into_iter().enumerate().map(|(i, e)| RecordEntry {
                key: format!("entry_{i}"),
                entry: e,
            }),
        )
        .await?;
        let t2 = Instant::now();
        let edit_keys: Vec<String> = (0..s.edits).map(|i| keys[i % keys.len()].clone()).collect();
        let edit_kind = kind.clone();
        pipelined(
            &ctx,
            edit_keys.into_iter().map(|k| {
                let edit = if edit_kind == "eager" {
                    Edit::Apply(Box::new(|mut c: Vec<u8>| {
                        c.push(b'!');
                        Ok(c)
                    }))
                } else {
                    Edit::Plugin {
                        op: "clear_backend_id".into(),
                        args: Vec::new(),
                    }
                };
                EditArtifact {
                    key: k,
                    label: "append".into(),
                    edit,
                }
            }),
        )
        .await?;
        let t3 = Instant::now();
        let stitched = ctx
            .addr()
            .send(CreateCacheEntries {})
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let t4 = Instant::now();
        if stitched.value.entries.len() != s.entries {
            bail!(
                "stitch produced {} entries, expected {}",
                stitched.value.entries.len(),
                s.entries
            );
        }
        ctx.close().await.map_err(|e| anyhow::anyhow!("{e}"))?;
        let secs = |a: Instant, b: Instant| (b - a).as_secs_f64();
        let ops = s.backends + s.entries + s.edits + 1;
        Ok::<Value, anyhow::Error>(json!({
            "record_artifacts_s": secs(t0, t1),
            "record_entries_s": secs(t1, t2),
            "edits_s": secs(t2, t3),
            "stitch_s": secs(t3, t4),
            "total_s": secs(t0, t4),
            "ops_per_s": ops as f64 / secs(t0, t4),
            "reference_torch_total_s (WORKLOADS.md)": 1.66,
            "ratio_to_reference_torch": secs(t0, t4) / 1.66,
        }))
    })?;
    Ok((figures, dir))
}

// ---------------------------------------------------------------------------------------
// W2

/// This process's peak resident memory: `VmHWM` of /proc/self/status, which starts afresh
/// at exec (getrusage's `ru_maxrss` carries the parent's peak across fork + exec).
fn peak_rss_kib() -> i64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(-1)
}

fn open_probe(dir: &Path) -> Result<()> {
    let config = config_for(dir)?;
    let t = Instant::now();
    let answered = actix::System::new().block_on(async move {
        let ctx = Context::open(&config)?;
        let info = ctx
            .dump_debug_info()
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        ctx.close().await.map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok::<usize, anyhow::Error>(info.value.backends.len())
    })?;
    println!(
        "{}",
        json!({ "first_answer_s": t.elapsed().as_secs_f64(), "peak_rss_mib": peak_rss_kib() as f64 / 1024.0, "artifacts": answered })
    );
    Ok(())
}

fn probe(dir: &Path) -> Result<Value> {
    let exe = std::env::current_exe()?;
    let out = Command::new(exe)
        .arg("open-probe")
        .arg(dir)
        .stderr(Stdio::inherit())
        .output()?;
    if !out.status.success() {
        bail!(
            "open-probe failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn w2(cli: &Cli) -> Result<Vec<Value>> {
    let (w1_figures, dir) = w1(cli.quick)?;
    let torch_build = 1.08 + 0.24 + 0.01;
    let mut runs = Vec::new();
    for _ in 0..cli.runs {
        let with = probe(dir.path())?;
        runs.push((with, Value::Null));
    }
    // Without a snapshot: the same log with its snapshots removed.
    {
        let db = sled::open(dir.path())?;
        db.open_tree("snapshots")?.clear()?;
        db.flush()?;
    }
    let mut out = Vec::new();
    for (with, _) in runs {
        let without = probe(dir.path())?;
        out.push(json!({
            "snapshot_first_answer_s": with["first_answer_s"],
            "snapshot_peak_rss_mib": with["peak_rss_mib"],
            "no_snapshot_first_answer_s": without["first_answer_s"],
            "no_snapshot_peak_rss_mib": without["peak_rss_mib"],
            "artifacts": with["artifacts"],
            "reference_torch_build_s (records+entries+edits)": torch_build,
            "ratio_snapshot_to_torch_build": with["first_answer_s"].as_f64().unwrap_or(f64::NAN) / torch_build,
            "w1_total_s": w1_figures["total_s"],
        }));
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// W3

struct Server {
    child: std::process::Child,
    socket: PathBuf,
}

impl Server {
    fn start(dir: &Path, extra_env: &[(&str, String)]) -> Result<Server> {
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
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            if Instant::now() > deadline {
                bail!("the server did not start listening within 30 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Server { child, socket })
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

fn frame(v: &Value) -> Vec<u8> {
    pcx::interface::wire::encode_frame(&pcx::interface::wire::to_msgpack(v))
}

/// Closed-loop clients: each sends its next record only after the answer to the previous.
///
/// The clients are tasks on one thread of their own (like a Python worker pool behind one
/// event loop) rather than 64 threads: on this 2-core machine 64 client threads spent more
/// CPU on being scheduled than the server spent serving, which measured the harness. Every
/// request is encoded before the clock starts; each latency runs from its write to its answer.
fn closed_loop(
    socket: &Path,
    clients: usize,
    per_client: usize,
    size: usize,
) -> Result<(f64, Vec<f64>)> {
    let requests: Vec<Vec<Vec<u8>>> = (0..clients)
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
        .collect();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?;
    runtime.block_on(async move {
        let start = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for (c, frames) in requests.into_iter().enumerate() {
            let socket = socket.to_path_buf();
            tasks.spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut s = tokio::net::UnixStream::connect(&socket).await?;
                let mut lat = Vec::with_capacity(frames.len());
                let mut body = Vec::new();
                for f in frames {
                    let t = Instant::now();
                    s.write_all(&f).await?;
                    let mut h = [0u8; 4];
                    s.read_exact(&mut h).await?;
                    body.resize(pcx::interface::wire::body_len(h) as usize, 0);
                    s.read_exact(&mut body).await?;
                    lat.push(t.elapsed().as_secs_f64() * 1e3);
                    let a =
                        pcx::interface::wire::to_json(pcx::interface::wire::decode_answer(&body)?)?;
                    if a["ok"] != true {
                        bail!("client {c}: {a}");
                    }
                }
                Ok::<Vec<f64>, anyhow::Error>(lat)
            });
        }
        let mut all = Vec::new();
        while let Some(done) = tasks.join_next().await {
            all.extend(done.map_err(|e| anyhow::anyhow!("a client task failed: {e}"))??);
        }
        Ok((start.elapsed().as_secs_f64(), all))
    })
}

fn base64_of(b: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(b)
}

fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn w3(quick: bool) -> Result<Value> {
    let (clients, per) = if quick { (8, 50) } else { (64, 1000) };
    let d = disk(true)?;
    let fsync_ms = d["fsync_ms"].as_f64().unwrap_or(f64::NAN);
    let dir = temp_dir("w3")?;
    let server = Server::start(dir.path(), &[])?;
    let (secs, lat) = closed_loop(&server.socket, clients, per, 256)?;
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
    if let (Some(run), Value::Object(floors)) = (run.as_object_mut(), floors) {
        run.extend(floors);
    }
    Ok(run)
}

// ---------------------------------------------------------------------------------------
// W4

fn w4(quick: bool) -> Result<Value> {
    let n = if quick { 16 } else { 1000 };
    let d = disk(quick)?;
    let bw = d["seq_write_fsync_mib_s"].as_f64().unwrap_or(f64::NAN);
    let stream_before = stream_bandwidth(n)?;
    let dir = temp_dir("w4")?;
    let config = config_for(dir.path())?;
    let mut seed = 4u64;
    let artifacts: Vec<Artifact> = (0..n)
        .map(|i| {
            let key = format!("big_{i}");
            let content = payload(&key, 1 << 20, &mut seed);
            Artifact {
                key,
                kind: "eager".into(),
                content,
            }
        })
        .collect();
    let secs = actix::System::new().block_on(async move {
        let ctx = Context::open(&config)?;
        let t = Instant::now();
        pipelined(
            &ctx,
            artifacts
                .into_iter()
                .map(|artifact| RecordArtifact { artifact }),
        )
        .await?;
        let secs = t.elapsed().as_secs_f64();
        ctx.close().await.map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok::<f64, anyhow::Error>(secs)
    })?;
    let mib_s = n as f64 / secs;
    let stream = (stream_before + stream_bandwidth(n)?) / 2.0;
    Ok(json!({
        "mib_s": mib_s,
        "seq_write_fsync_mib_s (64 MiB, same run)": bw,
        "fraction_of_disk": mib_s / bw,
        "same_volume_write_fsync_mib_s (before and after)": stream,
        "fraction_of_same_volume": mib_s / stream,
    }))
}

// ---------------------------------------------------------------------------------------
// W5

/// A `bundled_aot_autograd` document of about `size` bytes.
fn bundle_doc(key: &str, size: usize, seed: &mut u64) -> Vec<u8> {
    let code = payload(key, size.saturating_sub(160).max(16), seed);
    let doc = rmpv::Value::Map(vec![
        ("format_version".into(), 1.into()),
        ("guards_expr".into(), "L['x'].size()[0] == 8".into()),
        ("precompile_backend_id".into(), key.into()),
        (
            "kernels".into(),
            rmpv::Value::Array(vec![rmpv::Value::Map(vec![
                ("name".into(), "triton_poi_0".into()),
                ("code".into(), rmpv::Value::Binary(code)),
            ])]),
        ),
        (
            "meta".into(),
            rmpv::Value::Map(vec![("device".into(), "cpu".into())]),
        ),
    ]);
    let mut out = Vec::new();
    let _ = rmpv::encode::write_value(&mut out, &doc);
    out
}

/// The example plugin, built beside this binary by `cargo build --release --workspace`.
fn plugin_dir() -> Result<tempfile::TempDir> {
    let lib = match std::env::var_os("PCX_BENCH_PLUGIN") {
        Some(p) => PathBuf::from(p),
        None => std::env::current_exe()?
            .with_file_name(format!("libaot_bundle.{}", std::env::consts::DLL_EXTENSION)),
    };
    if !lib.exists() {
        bail!(
            "{} not found: build the workspace (`cargo build --release --workspace`)",
            lib.display()
        );
    }
    let dir = temp_dir("plugins")?;
    std::fs::copy(&lib, dir.path().join(lib.file_name().unwrap_or_default()))?;
    Ok(dir)
}

/// Loads every entry of a W1 directory once (after saving them): loads per second.
fn w5_loads(quick: bool, dir: &Path, plugins: Option<&Path>) -> Result<f64> {
    let mut config = config_for(dir)?;
    if let Some(p) = plugins {
        config.plugin_dir = p.to_path_buf();
    }
    let entries = W1Size::new(quick).entries;
    actix::System::new().block_on(async move {
        let ctx = Context::open(&config)?;
        ctx.addr()
            .send(SaveToDynamoCache {})
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let t = Instant::now();
        pipelined(
            &ctx,
            (0..entries).map(|i| LoadCacheEntry {
                key: format!("entry_{i}"),
                system_info: None,
            }),
        )
        .await?;
        let secs = t.elapsed().as_secs_f64();
        ctx.close().await.map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok::<f64, anyhow::Error>(entries as f64 / secs)
    })
}

/// W5: both W1 directories are made first; then eager and plugin loads take turns, five
/// rounds, so that both meet the same disk and cache; the ratio is of the medians. (With
/// three, one round slowed by a neighbour moved the ratio by a tenth.)
fn w5(quick: bool) -> Result<Value> {
    let plugins = plugin_dir()?;
    let (_, eager_dir) = w1_with(quick, "eager", None)?;
    let (_, plugin_dir) = w1_with(quick, "bundled_aot_autograd", Some(plugins.path()))?;
    let (mut eager, mut plugin) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        eager.push(w5_loads(quick, eager_dir.path(), None)?);
        plugin.push(w5_loads(quick, plugin_dir.path(), Some(plugins.path()))?);
    }
    let rounds = json!({ "eager": eager.clone(), "plugin": plugin.clone() });
    let (eager, plugin) = (median(eager), median(plugin));
    Ok(
        json!({ "eager_loads_per_s": eager, "plugin_loads_per_s": plugin, "plugin_time_over_eager": eager / plugin, "rounds_loads_per_s": rounds }),
    )
}

// ---------------------------------------------------------------------------------------
// compare-torch

fn compare_torch(cli: &Cli, python: Option<PathBuf>) -> Result<()> {
    let python = python.unwrap_or_else(|| {
        let venv = PathBuf::from("/tmp/torchenv/bin/python");
        if venv.exists() {
            venv
        } else {
            PathBuf::from("python3")
        }
    });
    let script = [
        "../shared/bench/torch_reference.py",
        "../../shared/bench/torch_reference.py",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists());
    let has_torch = Command::new(&python)
        .args(["-c", "import torch"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let Some(script) = script.filter(|_| has_torch) else {
        println!("PyTorch is not installed for {} (or ../shared/bench/torch_reference.py is missing): run ../shared/bench/setup_torch_reference.sh, then pass --python /tmp/torchenv/bin/python", python.display());
        return Ok(());
    };
    let s = W1Size::new(cli.quick);
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        let (f, _) = w1(cli.quick)?;
        ours.push(f["total_s"].as_f64().unwrap_or(f64::NAN));
        let out = Command::new(&python)
            .arg(&script)
            .args([
                "bench",
                "--backends",
                &s.backends.to_string(),
                "--entries",
                &s.entries.to_string(),
                "--edits",
                &s.edits.to_string(),
            ])
            .output()?;
        let v: Value = serde_json::from_slice(out.stdout.trim_ascii())
            .with_context(|| String::from_utf8_lossy(&out.stderr).to_string())?;
        theirs.push(v["total_s"].as_f64().unwrap_or(f64::NAN));
        println!(
            "pcx {:.3} s   torch {:.3} s",
            ours.last().unwrap_or(&f64::NAN),
            theirs.last().unwrap_or(&f64::NAN)
        );
    }
    println!("ratio pcx/torch: {:.2}", median(ours) / median(theirs));
    Ok(())
}
