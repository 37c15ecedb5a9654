//! W4, 1 MiB artifacts: bandwidth against sequential write + fsync.

use std::time::Instant;

use anyhow::Result;
use serde_json::{json, Value};

use pcx::actor::RecordArtifact;
use pcx::core::model::Artifact;
use pcx::Context;

use super::*;

pub(crate) fn w4(quick: bool) -> Result<Value> {
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
