//! `pcx-bench`: the workloads of `../shared/bench/WORKLOADS.md`, each on a fresh temporary
//! data directory, with its reference measured in the same run (the disk's figures swing
//! tenfold with the neighbours' load, so results are ratios).
//!
//! ```text
//! pcx-bench disk | w1 | w2 | w3 | w4 | w5 | w6 | compare-torch  [--quick] [--runs N] [--json]
//! ```

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};
use serde_json::{json, Value};

use pcx::Config;

mod device;
mod disk;
mod floor;
mod harness;
mod peers;
mod torch;
mod usage;
mod w1;
mod w2;
mod w3;
mod w4;
mod w5;
#[cfg(feature = "postgres")]
mod w6;

use disk::*;
use harness::*;
use torch::*;
use w1::*;
use w2::*;
use w3::*;
use w4::*;
use w5::*;
#[cfg(feature = "postgres")]
use w6::*;

#[derive(Parser, Debug)]
#[command(
    name = "pcx-bench",
    about = "pcx's workloads W1–W6 beside their references"
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
    /// A fleet on PostgreSQL (a pcx built with `--features postgres`): 4 pcx processes, 16
    /// clients each, on a 3-node cluster, beside a bare PostgreSQL floor; then a takeover.
    W6,
    /// W1 in pcx and in PyTorch, alternately, 3 times each.
    CompareTorch {
        #[arg(long)]
        python: Option<PathBuf>,
    },
    /// (internal) Opens DIR, answers one query, prints time and peak memory.
    #[command(hide = true)]
    OpenProbe { dir: PathBuf },
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
        #[cfg(feature = "postgres")]
        Workload::W6 => report(cli, "w6", runs(w6)?),
        #[cfg(not(feature = "postgres"))]
        Workload::W6 => anyhow::bail!(
            "W6 needs PostgreSQL support: build with `cargo build --release --features postgres`"
        ),
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
