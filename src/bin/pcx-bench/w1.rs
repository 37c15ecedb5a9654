//! W1, a compile session: records, entries, edits and one stitch, every change durable,
//! pipelined through the library as an orchestrator would.

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Result};
use serde_json::{json, Value};

use pcx::actor::{CreateCacheEntries, Edit, EditArtifact, RecordArtifact, RecordEntry};
use pcx::core::model::{Artifact, DynamoCacheEntry, DynamoCodeEntry};
use pcx::Context;

use super::*;

/// W1's sizes.
#[derive(Clone, Copy, Debug)]
pub(crate) struct W1Size {
    pub(crate) backends: usize,
    pub(crate) entries: usize,
    pub(crate) codes: usize,
    pub(crate) ids: usize,
    pub(crate) edits: usize,
    pub(crate) size: usize,
}

impl W1Size {
    pub(crate) fn new(quick: bool) -> W1Size {
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

pub(crate) fn w1_entry(i: usize, keys: &[String], s: W1Size) -> DynamoCacheEntry {
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
pub(crate) const WINDOW: usize = 4096;

/// Sends the messages through a [`pcx::context::Pipeline`], up to [`WINDOW`] in flight (as
/// an orchestrator with many changes under way does): the time until the last is durable.
/// Each answer is checked and dropped as it arrives, as a caller that uses it would, rather
/// than all 10,000 loaded entries being held to the end.
pub(crate) async fn pipelined<M, T>(ctx: &Context, msgs: impl IntoIterator<Item = M>) -> Result<()>
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
pub(crate) fn w1(quick: bool) -> Result<(Value, tempfile::TempDir)> {
    w1_with(quick, "eager", None)
}

/// W1 with artifacts of `kind` (edits then use the plugin's `clear_backend_id`).
pub(crate) fn w1_with(
    quick: bool,
    kind: &str,
    plugins: Option<&Path>,
) -> Result<(Value, tempfile::TempDir)> {
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
                    expected: None,
                }
            }),
        )
        .await?;
        let t3 = Instant::now();
        let stitched = ctx
            .addr()
            .send(CreateCacheEntries { trace: false })
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
