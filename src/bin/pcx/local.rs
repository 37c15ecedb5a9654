//! The commands that run a context in this process: `pcx batch` (JSON lines through the
//! context) and `pcx demo`.

use std::io::{self, Write};
use std::process::ExitCode;

use anyhow::{Context as _, Result};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde_json::{json, Value};

use crate::report::answer_error;
use pcx::config::Config;
use pcx::interface::protocol::{self};
use pcx::Context;

pub(crate) async fn batch(config: Config) -> Result<ExitCode> {
    // Answers go out on a copy of stdout, line by line as stdout would; what a plugin prints
    // on stdout goes to stderr.
    let mut stdout = io::LineWriter::new(crate::plugins_cmd::answer_channel()?);
    let ctx =
        Context::open(&config).with_context(|| format!("opening {}", config.data_dir.display()))?;
    let stdin = io::BufReader::with_capacity(1 << 16, io::stdin());
    let summary = pcx::interface::batch::run(
        &ctx,
        stdin,
        &mut stdout,
        config.max_request_bytes,
        config.max_in_flight,
    )
    .await;
    let closed = ctx.close().await;
    let summary = summary.context("batch input/output")?;
    if let Err(e) = closed {
        anyhow::bail!("closing the data directory: {e}");
    }
    tracing::info!(
        answered = summary.answered,
        failed = summary.failed,
        "batch done"
    );
    Ok(ExitCode::SUCCESS)
}

/// The newcomer's tour: every step is a protocol request, shown with its answer.
pub(crate) async fn demo(config: Config) -> Result<ExitCode> {
    let mut out = io::stdout().lock();
    let dir = config.data_dir.display().to_string();
    writeln!(out, "pcx demo on data directory {dir}\n")?;
    let step = |title: &str| format!("\n== {title}");
    let entry = json!({
        "fn_name": "forward", "fn_first_lineno": 3, "device_type": "cpu",
        "codes": [
            {"backend_ids": ["demo_b1", "demo_b2"], "python_module": "model"},
            {"backend_ids": ["demo_b3", "demo_b1"], "python_module": "model"}
        ]
    });
    let first: Vec<Value> = vec![
        json!({"op":"record_artifact","key":"demo_b1","kind":"eager","content_b64":B64.encode("kernel one")}),
        json!({"op":"record_artifact","key":"demo_b2","kind":"eager","content_b64":B64.encode("kernel two")}),
        json!({"op":"edit_artifact","key":"demo_b2","edit":{"append_b64":B64.encode(" (tuned)")}}),
        json!({"op":"record_dynamo_cache_entry","key":"demo_entry","entry":entry}),
        json!({"op":"dump_debug_info"}),
        json!({"op":"create_cache_entries"}),
        json!({"op":"save_to_dynamo_cache"}),
        json!({"op":"clear"}),
    ];
    let ctx = Context::open(&config).with_context(|| format!("opening {dir}"))?;
    let others = not_the_demos(&ctx).await;
    if !others.is_empty() {
        ctx.close()
            .await
            .map_err(|e| anyhow::anyhow!("closing: {e}"))?;
        return Ok(answer_error(
            "demo_refused",
            &format!(
                "{dir} holds artifacts or saved entries that are not the demo's ({}): the demo \
                 clears the context it runs on, so it was not run; give it a directory of its \
                 own (`pcx --data-dir /tmp/pcx-demo demo`)",
                pcx::store::swap::some_of(&others)
            ),
        ));
    }
    writeln!(out, "{}", step("1. record two artifacts, edit one, record an entry that also names a missing demo_b3, stitch, save, clear"))?;
    for req in first {
        show(&mut out, &ctx, req).await?;
    }
    ctx.close()
        .await
        .map_err(|e| anyhow::anyhow!("closing: {e}"))?;
    writeln!(out, "{}", step("2. restart: the context is closed and opened again; its state is replayed from the log"))?;
    let ctx = Context::open(&config).with_context(|| format!("reopening {dir}"))?;
    for req in [
        json!({"op":"dump_debug_info"}),
        json!({"op":"load_cache_entry","key":"demo_entry"}),
        json!({"op":"serialize_artifact_by_key","key":"demo_b2"}),
        json!({"op":"load_cache_entry","key":"no_such_entry"}),
    ] {
        show(&mut out, &ctx, req).await?;
    }
    ctx.close()
        .await
        .map_err(|e| anyhow::anyhow!("closing: {e}"))?;
    // Where it is: the data directory, or the journal in the cluster (the same settings,
    // in the environment, reach it again).
    let (place, again, settings) = match config.journal {
        pcx::config::JournalBackend::Sled => (dir.clone(), format!("pcx --data-dir {dir}"), ""),
        _ => (
            format!("the journal {} in PostgreSQL", config.journal_name),
            "pcx".to_string(),
            " (with the same PCX_JOURNAL* settings)",
        ),
    };
    writeln!(
        out,
        "{}\nEverything above is in {place}: run `{again} debug-info`, or pipe requests into `{again} batch`{settings}.",
        step("done")
    )?;
    Ok(ExitCode::SUCCESS)
}

/// The keys of `ctx`'s artifacts and saved entries that the demo did not make (its keys start
/// with `demo_`): the demo clears the context it runs on, and must not clear someone's work.
async fn not_the_demos(ctx: &Context) -> Vec<String> {
    let state = protocol::submit(
        ctx,
        protocol::Request::State {
            at: None,
            at_time: None,
            key: None,
        },
    )
    .await;
    let keys = |field: &str| -> Vec<String> {
        state["state"][field]
            .as_array()
            .map(|items| {
                items
                    .iter()
                    .filter_map(|i| i["key"].as_str().or_else(|| i.as_str()))
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut others: Vec<String> = keys("artifacts")
        .into_iter()
        .chain(keys("dynamo_cache"))
        .filter(|k| !k.starts_with("demo_"))
        .collect();
    others.sort();
    others
}

pub(crate) async fn show(out: &mut impl Write, ctx: &Context, request: Value) -> Result<()> {
    writeln!(out, "-> {request}")?;
    let (id, parsed) = protocol::parse(request.to_string().as_bytes());
    let answer = match parsed {
        Ok(r) => protocol::with_id(id, protocol::submit(ctx, r).await),
        Err(e) => protocol::refused(&e),
    };
    writeln!(out, "<- {answer}")?;
    Ok(())
}
