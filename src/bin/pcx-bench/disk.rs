//! The disk's own figures, the reference every workload is read against: fsync latency of
//! a small append and sequential write + fsync bandwidth.

use std::io::Write;
use std::time::Instant;

use anyhow::Result;
use serde_json::{json, Value};

use super::*;

/// fsync latency of a 256-byte append (median of many) and sequential write + fsync MiB/s.
pub(crate) fn disk(quick: bool) -> Result<Value> {
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
pub(crate) fn stream_bandwidth(mib: usize) -> Result<f64> {
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
