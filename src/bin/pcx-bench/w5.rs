//! W5, loads of saved entries: the built-in eager kind against a plugin-served kind.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Result};
use serde_json::{json, Value};

use pcx::actor::{LoadCacheEntry, SaveToDynamoCache};
use pcx::Context;

use super::*;

/// A `example.aot_bundle` document of about `size` bytes.
pub(crate) fn bundle_doc(key: &str, size: usize, seed: &mut u64) -> Vec<u8> {
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
pub(crate) fn plugin_dir() -> Result<tempfile::TempDir> {
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
pub(crate) fn w5_loads(quick: bool, dir: &Path, plugins: Option<&Path>) -> Result<f64> {
    let mut config = config_for(dir)?;
    if let Some(p) = plugins {
        config.plugin_dir = p.to_path_buf();
    }
    let entries = W1Size::new(quick).entries;
    actix::System::new().block_on(async move {
        let ctx = Context::open(&config)?;
        ctx.addr()
            .send(SaveToDynamoCache { trace: false })
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
pub(crate) fn w5(quick: bool) -> Result<Value> {
    let plugins = plugin_dir()?;
    let (_, eager_dir) = w1_with(quick, "eager", None)?;
    let (_, plugin_dir) = w1_with(quick, "example.aot_bundle", Some(plugins.path()))?;
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
