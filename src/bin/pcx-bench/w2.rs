//! W2, a cold start: W1's log opened in a fresh process, with and without a snapshot, time
//! and peak memory.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Result};
use serde_json::{json, Value};

use pcx::Context;

use super::*;

/// This process's peak resident memory: `VmHWM` of /proc/self/status, which starts afresh
/// at exec (getrusage's `ru_maxrss` carries the parent's peak across fork + exec).
pub(crate) fn peak_rss_kib() -> i64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(-1)
}

pub(crate) fn open_probe(dir: &Path) -> Result<()> {
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

pub(crate) fn probe(dir: &Path) -> Result<Value> {
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

pub(crate) fn w2(cli: &Cli) -> Result<Vec<Value>> {
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
