//! The `pcx` command: flags are parsed, turned into one validated configuration, and each
//! subcommand becomes a protocol request (the same ones `pcx batch` reads).
//!
//! Its files: [`args`] (the command line), [`local`] (batch and demo), [`remote`] (serve and
//! client), [`audit_cmd`] (the commands over a stopped data directory), [`plugins_cmd`], and
//! [`report`] (how failures read, and exit codes).

mod args;
mod audit_cmd;
mod local;
mod plugins_cmd;
mod remote;
mod report;

use std::io::{self};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context as _, Result};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use clap::Parser;
use serde_json::{json, Value};

use crate::args::Cli;
use crate::args::Command;
use crate::audit_cmd::{audit_command, salvage};
use crate::local::{batch, demo};
use crate::plugins_cmd::plugins_command;
use crate::remote::{client, serve};
use crate::report::error_text;
use crate::report::exit_code;
use pcx::config::Config;
use pcx::core::scope::{valid_name, Scope};
use pcx::interface::protocol::{self, refused, Request, RequestError, WireEdit};
use pcx::trace::{self};
use pcx::Context;

/// See [`pcx::alloc`].
#[global_allocator]
static ALLOCATOR: pcx::alloc::Allocator = mimalloc::MiMalloc;

fn main() -> ExitCode {
    pcx::alloc::small_pages();
    // Every plugin library is loaded first in a child process, this binary run again.
    pcx::plugins::probe::register_executable(std::env::current_exe());
    let cli = Cli::parse();
    let config = match configure(&cli) {
        Ok(c) => c,
        Err(e) => {
            // Each cause once: a config error's message already carries its source's words.
            eprintln!("pcx: {}", error_text(&e));
            return ExitCode::from(2);
        }
    };
    let (command, scope) = match scoped(cli.command, cli.context, cli.namespace) {
        Ok(c) => c,
        Err(message) => {
            eprintln!("pcx: {message}");
            return ExitCode::from(2);
        }
    };
    trace::init(config.log_format, &config.log_filter);
    let system = actix::System::new();
    match system.block_on(run(command, config, scope)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("pcx: {}", error_text(&e));
            exit_code(&e)
        }
    }
}

fn configure(cli: &Cli) -> Result<Config> {
    let mut config = Config::load(cli.config.as_deref(), std::env::vars())?;
    if let Some(dir) = &cli.data_dir {
        config.data_dir = dir.clone();
    }
    if let Some(format) = cli.log_format {
        config.log_format = format;
    }
    if let Some(dir) = &cli.plugin_dir {
        config.plugin_dir = dir.clone();
    }
    if cli.no_plugins {
        config.plugin_dir = PathBuf::new();
    }
    Ok(config)
}

/// `command` with the global `--context` and `--namespace` given to it: to `history`,
/// `state` and `diff` as what they describe, and to a single-request command as the scope
/// its request is sent in. Refused (exit 2) for a name that is not one, or for a command that
/// reads or serves every context, where it would be ignored without a word.
fn scoped(
    mut command: Command,
    context: Option<String>,
    namespace: Option<String>,
) -> Result<(Command, Option<Scope>), String> {
    if context.is_none() && namespace.is_none() {
        return Ok((command, None));
    }
    let mut scope = Scope::default();
    for (flag, given, slot) in [
        ("--context", context, &mut scope.context),
        ("--namespace", namespace, &mut scope.namespace),
    ] {
        if let Some(name) = given {
            if !valid_name(&name) {
                return Err(format!(
                    "{flag} {name:?} is not a name: 1 to 128 characters from [A-Za-z0-9_.:@+-]"
                ));
            }
            *slot = name;
        }
    }
    let within = pcx::audit::query::Within::from(&scope);
    match &mut command {
        Command::History { within: w, .. }
        | Command::State { within: w, .. }
        | Command::Diff { within: w, .. } => {
            *w = within;
            Ok((command, None))
        }
        Command::RecordArtifact { .. }
        | Command::RecordEntry { .. }
        | Command::Edit { .. }
        | Command::Get { .. }
        | Command::Take { .. }
        | Command::Clear
        | Command::DebugInfo
        | Command::Stitch
        | Command::Save
        | Command::Load { .. } => Ok((command, Some(scope))),
        _ => Err(
            "--context and --namespace go with the single-request commands (record-artifact, \
             get, take, save, load, …) and with history, state and diff; this command reads \
             or serves every context (each `log` line names its context; a batch or client \
             request carries its own \"context\" and \"namespace\")"
                .to_string(),
        ),
    }
}

async fn run(command: Command, config: Config, scope: Option<Scope>) -> Result<ExitCode> {
    let request = match command {
        Command::Batch => return batch(config).await,
        Command::Demo => return demo(config).await,
        Command::Plugins(p) => return plugins_command(p, &config),
        Command::Serve { socket, tcp } => return serve(config, socket, tcp).await,
        Command::Client {
            socket,
            tcp,
            token_file,
            token,
        } => return client(&config, socket, tcp, token_file, token),
        Command::Holder => return crate::remote::print_holder(&config),
        Command::Salvage { output, scan } => return salvage(&config, &output, scan),
        c @ (Command::Log { .. }
        | Command::History { .. }
        | Command::State { .. }
        | Command::Diff { .. }
        | Command::Verify
        | Command::Export { .. }
        | Command::Import { .. }
        | Command::Compact { .. }
        | Command::Recover { .. }) => return audit_command(c, &config),
        Command::Contexts => Request::ListContexts,
        other => match request_of(other, &config)? {
            Ok(request) => match scope {
                Some(scope) => Request::Scoped {
                    scope,
                    request: Box::new(request),
                },
                None => request,
            },
            // A request the batch protocol would refuse gets batch's answer, before any open.
            Err(answer) => {
                println!("{answer}");
                return Ok(ExitCode::FAILURE);
            }
        },
    };
    // What a plugin loaded here prints on stdout goes to stderr, not after the answer.
    let mut out = crate::plugins_cmd::answer_channel()?;
    let ctx =
        Context::open(&config).with_context(|| format!("opening {}", config.data_dir.display()))?;
    let answer = protocol::submit(&ctx, request).await;
    let closed = ctx.close().await;
    {
        use std::io::Write as _;
        writeln!(out, "{answer}").context("writing the answer")?;
    }
    if let Err(e) = closed {
        anyhow::bail!("closing the data directory: {e}");
    }
    Ok(if answer.get("ok") == Some(&Value::Bool(true)) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The one request a single-request command makes, or the answer `batch` gives a request it
/// refuses (entry or system info JSON that is not valid), or an error outside the protocol
/// (a file or stdin that cannot be read).
fn request_of(command: Command, config: &Config) -> Result<Result<Request, Value>> {
    Ok(Ok(match command {
        Command::RecordArtifact { key, kind, content } => {
            let limit = config.max_content_bytes;
            let read = match (content.file, content.content_b64, content.text) {
                (Some(f), _, _) => {
                    let file = std::fs::File::open(&f)
                        .with_context(|| format!("reading {}", f.display()))?;
                    let what = format!("the content of {key} ({})", f.display());
                    let size = file.metadata().map(|m| m.len()).unwrap_or(0);
                    read_bounded(file, size, limit, "max_content_bytes", &what)
                        .with_context(|| format!("reading {}", f.display()))?
                }
                (_, Some(b), _) => {
                    return Ok(Ok(Request::RecordArtifact {
                        key,
                        kind,
                        content_b64: b,
                    }))
                }
                (_, _, Some(t)) => Ok(t.into_bytes()),
                _ => read_stdin(limit, "max_content_bytes", &format!("the content of {key}"))?,
            };
            let bytes = match read {
                Ok(bytes) => bytes,
                Err(answer) => return Ok(Err(answer)),
            };
            Request::RecordArtifact {
                key,
                kind,
                content_b64: B64.encode(bytes),
            }
        }
        Command::RecordEntry { key, json } => {
            let text = match json.as_deref() {
                None | Some("-") => {
                    let what = format!("the entry JSON of {key}");
                    match read_stdin(config.max_request_bytes, "max_request_bytes", &what)? {
                        Ok(bytes) => {
                            String::from_utf8(bytes).context("the entry JSON is not UTF-8")?
                        }
                        Err(answer) => return Ok(Err(answer)),
                    }
                }
                Some(j) => j.to_string(),
            };
            return Ok(as_batch_would(
                |entry| json!({"op": "record_dynamo_cache_entry", "key": key, "entry": entry}),
                &text,
            ));
        }
        Command::Edit {
            key,
            set_b64,
            append_b64,
        } => {
            let edit = match (set_b64, append_b64) {
                (Some(s), _) => WireEdit::SetB64(s),
                (_, Some(a)) => WireEdit::AppendB64(a),
                _ => anyhow::bail!("edit needs --set-b64 or --append-b64"),
            };
            Request::EditArtifact {
                key,
                edit,
                expected_digest: None,
            }
        }
        Command::Get { key } => Request::SerializeArtifactByKey { key },
        Command::Take { key } => Request::TakeArtifact { key },
        Command::Clear => Request::Clear,
        Command::DebugInfo => Request::DumpDebugInfo,
        Command::Stitch => Request::CreateCacheEntries { trace: false },
        Command::Save => Request::SaveToDynamoCache { trace: false },
        Command::Load {
            key,
            system_info: Some(info),
        } => {
            return Ok(as_batch_would(
                |info| json!({"op": "load_cache_entry", "key": key, "system_info": info}),
                &info,
            ));
        }
        Command::Load {
            key,
            system_info: None,
        } => Request::LoadCacheEntry {
            key,
            system_info: None,
        },
        _ => {
            anyhow::bail!("not a single request")
        }
    }))
}

/// The request a command line's JSON text (an entry, system info) makes, placed in a batch
/// request by `request`, or the answer batch gives when it refuses it.
fn as_batch_would(request: impl FnOnce(Value) -> Value, text: &str) -> Result<Request, Value> {
    let value = serde_json::from_str::<Value>(text)
        .map_err(|e| refused(&RequestError::BadJson(e.to_string())))?;
    protocol::parse_value(request(value))
        .1
        .map_err(|e| refused(&e))
}

fn read_stdin(limit: u64, key: &str, what: &str) -> Result<Result<Vec<u8>, Value>> {
    read_bounded(io::stdin(), 0, limit, key, what).context("reading stdin")
}

/// Reads `source` to its end, or gives the `too_large` answer once it holds more than `limit`
/// bytes (the config key `key`), reading no further. `--file /dev/zero`, or a stdin piped from
/// a stream that never ends, was read until the machine's memory was gone. `size`, when known,
/// is the size to expect: a file is then read into one buffer of its size.
fn read_bounded(
    source: impl io::Read,
    size: u64,
    limit: u64,
    key: &str,
    what: &str,
) -> io::Result<Result<Vec<u8>, Value>> {
    let expect = size.min(limit.saturating_add(1));
    let mut buf = Vec::with_capacity(usize::try_from(expect).unwrap_or(0));
    io::Read::read_to_end(&mut source.take(limit.saturating_add(1)), &mut buf)?;
    if buf.len() as u64 > limit {
        let message = format!(
            "{what} is over the limit of {limit} bytes ({key}): read no further, nothing recorded"
        );
        return Ok(Err(pcx::interface::answer::failed("too_large", &message)));
    }
    Ok(Ok(buf))
}
