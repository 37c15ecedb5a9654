//! compare-torch: W1 in pcx and in PyTorch's own in-memory context, alternately.

use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{Context as _, Result};
use serde_json::Value;

use super::*;

pub(crate) fn compare_torch(cli: &Cli, python: Option<PathBuf>) -> Result<()> {
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
