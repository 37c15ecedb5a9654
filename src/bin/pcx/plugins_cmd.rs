//! `pcx plugins list|check|probe`: what the plugin directory holds, each library tried in a
//! child process first.

use std::process::ExitCode;

use anyhow::{Context as _, Result};
use serde_json::{json, Value};

use crate::args::PluginsCommand;
use pcx::config::Config;

pub(crate) fn plugin_json(p: &pcx::plugins::loader::LoadedPlugin) -> Value {
    json!({
        "name": p.name, "version": p.version, "abi": format!("{}.{}", p.abi_major, p.abi_minor),
        "kinds": p.kinds, "edits": p.edits, "target": p.target, "path": p.path,
    })
}

pub(crate) fn plugins_command(command: PluginsCommand, config: &Config) -> Result<ExitCode> {
    match command {
        PluginsCommand::List => {
            let Some(dir) = config.plugin_dir() else {
                println!(
                    "{}",
                    json!({"plugin_dir": null, "plugins": [], "problems": []})
                );
                return Ok(ExitCode::SUCCESS);
            };
            let mut out = answer_channel()?;
            let timeout = std::time::Duration::from_millis(config.plugin_call_timeout_ms);
            let kinds = pcx::plugins::kinds::Kinds::load_with(&dir, usize::MAX, timeout);
            let plugins: Vec<Value> = kinds.plugins().iter().map(|p| plugin_json(p)).collect();
            let problems: Vec<String> = kinds.problems().iter().map(|e| e.to_string()).collect();
            use std::io::Write as _;
            writeln!(
                out,
                "{}",
                json!({"plugin_dir": dir, "plugins": plugins, "problems": problems})
            )
            .context("writing the plugin list")?;
            Ok(if problems.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        PluginsCommand::Probe { path } => {
            // The answer goes out on a copy of stdout; stdout itself is pointed at stderr
            // before the library loads, so what it prints (while loading, or from a buffer
            // flushed at exit) cannot pass for, or bury, the answer.
            let mut out = answer_channel()?;
            let answer = match probe(&path) {
                Ok(p) => json!({"ok": true, "plugin": plugin_json(&p)}),
                Err(e) => json!({"ok": false, "error": e}),
            };
            use std::io::Write as _;
            writeln!(out, "{answer}").context("writing the probe's answer")?;
            out.flush().context("writing the probe's answer")?;
            Ok(if answer["ok"] == true {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        PluginsCommand::Check { path } => {
            let answer = check_in_child(&path, config)?;
            println!("{answer}");
            Ok(if answer["ok"] == true {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}

/// A copy of stdout for this process's answers, stdout itself then pointing at stderr: a
/// plugin loaded in this process that prints on stdout (while loading, or from a buffer
/// flushed at exit) cannot mix its text into the answers.
pub(crate) fn answer_channel() -> Result<std::fs::File> {
    use std::os::fd::FromRawFd as _;
    // SAFETY: dup and dup2 on the standard descriptors have no memory-safety preconditions;
    // the copy is a new descriptor owned by the `File` alone.
    unsafe {
        // Above the standard descriptors, so the copy never takes the place of a closed stderr.
        let copy = libc::fcntl(libc::STDOUT_FILENO, libc::F_DUPFD_CLOEXEC, 3);
        if copy < 0 {
            return Err(std::io::Error::last_os_error()).context("copying stdout");
        }
        let answer = std::fs::File::from_raw_fd(copy);
        // With stderr closed there is nowhere better: stdout stays as it was.
        if libc::dup2(libc::STDERR_FILENO, libc::STDOUT_FILENO) < 0 {
            tracing::debug!(error = %std::io::Error::last_os_error(), "stdout left as it was");
        }
        Ok(answer)
    }
}

/// Loads one candidate in this process, with every check registration would make.
pub(crate) fn probe(path: &std::path::Path) -> Result<pcx::plugins::loader::LoadedPlugin, String> {
    let canonical = path
        .canonicalize()
        .map_err(|e| format!("plugin {}: {e}", path.display()))?;
    let p = pcx::plugins::loader::load(&canonical).map_err(|e| e.to_string())?;
    if p.kinds.iter().any(|k| k == pcx::core::model::EAGER_KIND) {
        return Err(pcx::plugins::loader::PluginError::ClaimsEager { path: canonical }.to_string());
    }
    Ok(p)
}

/// Runs `pcx plugins probe PATH` in a child, so a plugin that crashes or hangs while loading
/// cannot take this process down, and turns how the child ended into an answer.
pub(crate) fn check_in_child(path: &std::path::Path, config: &Config) -> Result<Value> {
    use pcx::plugins::probe::Outcome;
    let exe = std::env::current_exe().context("locating the pcx executable")?;
    let timeout = std::time::Duration::from_millis(config.plugin_call_timeout_ms);
    let outcome = pcx::plugins::probe::probe_all(&exe, &[path.to_path_buf()], timeout)
        .pop()
        .unwrap_or(Outcome::NotStarted {
            message: "no check process".into(),
        });
    Ok(match outcome {
        Outcome::Answered { mut answer, .. } => {
            answer["path"] = json!(path);
            answer
        }
        Outcome::Crashed { signal } => json!({"ok": false, "path": path, "error": format!(
            "loading the plugin crashed the checking process with signal {signal} ({}); pcx would crash the same way",
            pcx::plugins::probe::signal_name(signal)
        )}),
        Outcome::TimedOut => json!({"ok": false, "path": path, "error": format!(
            "loading the plugin did not finish within {} ms (its initialisers hang?)",
            config.plugin_call_timeout_ms
        )}),
        Outcome::NoAnswer { status, stderr } => json!({"ok": false, "path": path, "error": format!(
            "the checking process exited with {status} and no answer: {stderr}"
        )}),
        Outcome::NotStarted { message } => {
            anyhow::bail!("starting the plugin check child process: {message}")
        }
    })
}
