//! The `pcx` command: flags are parsed, turned into one validated configuration, and each
//! subcommand becomes a protocol request (the same ones `pcx batch` reads).

use std::io::{self, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context as _, Result};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use clap::{Args, Parser, Subcommand};
use serde_json::{json, Value};

use pcx::config::Config;
use pcx::interface::protocol::{self, Request, WireEdit, WireEntry};
use pcx::trace::{self, LogFormat};
use pcx::Context;

/// pcx: a durable, event-sourced store for PyTorch's precompile context.
#[derive(Parser, Debug)]
#[command(name = "pcx", version, about)]
struct Cli {
    /// Data directory (default from the config: ./pcx-data).
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    /// A TOML file overriding the built-in config/default.toml.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Log lines on stderr: text for people, json for programs.
    #[arg(long, global = true, value_enum)]
    log_format: Option<LogFormat>,
    /// Load artifact-kind plugins from DIR (overrides `plugin_dir`).
    #[arg(long, global = true, conflicts_with = "no_plugins")]
    plugin_dir: Option<PathBuf>,
    /// Load no plugins: only the built-in `eager` kind.
    #[arg(long, global = true)]
    no_plugins: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Record a backend artifact (content from --file, --content-b64, --text or stdin).
    RecordArtifact {
        key: String,
        #[arg(long, default_value = "eager")]
        kind: String,
        #[command(flatten)]
        content: ContentArgs,
    },
    /// Record a dynamo cache entry given as JSON (the batch protocol's `entry`).
    RecordEntry {
        key: String,
        /// The entry's JSON; `-` or absent reads it from stdin.
        #[arg(long)]
        json: Option<String>,
    },
    /// Edit an artifact's content: replace it or append to it.
    Edit {
        key: String,
        /// Replace the content with these base64 bytes.
        #[arg(long, conflicts_with = "append_b64")]
        set_b64: Option<String>,
        /// Append these base64 bytes.
        #[arg(long)]
        append_b64: Option<String>,
    },
    /// Show an artifact (serialize_artifact_by_key).
    Get { key: String },
    /// Remove an artifact and show it (take_artifact).
    Take { key: String },
    /// Empty the context (the dynamo cache is kept).
    Clear,
    /// Show dump_debug_info.
    DebugInfo,
    /// Stitch every entry with its artifacts (create_cache_entries).
    Stitch,
    /// Stitch and save every entry to the dynamo cache (save_to_dynamo_cache).
    Save,
    /// Load a saved entry (load_cache_entry).
    Load {
        key: String,
        /// The loader's system info as JSON, checked against the entry's.
        #[arg(long)]
        system_info: Option<String>,
    },
    /// JSON requests on stdin, one a line; JSON answers on stdout, in order, streamed.
    Batch,
    /// A guided tour: record, stitch, save, restart, load, on the data directory.
    Demo,
    /// Artifact-kind plugins.
    #[command(subcommand)]
    Plugins(PluginsCommand),
    /// Audit: events as JSON lines, filtered (bounds inclusive).
    Log {
        #[command(flatten)]
        filter: pcx::audit::query::LogFilter,
    },
    /// Audit: every event that touched KEY, oldest first, as JSON lines.
    History { key: String },
    /// Audit: the context right after an event (the latest by default), rebuilt from the log.
    State {
        #[arg(long, conflicts_with = "at_time")]
        at: Option<u64>,
        /// The last event at or before this RFC 3339 time.
        #[arg(long)]
        at_time: Option<String>,
        /// Show this artifact's content as it was then.
        #[arg(long)]
        key: Option<String>,
    },
    /// Audit: what was added, changed, taken or cleared between two points.
    Diff {
        #[arg(long)]
        from: u64,
        #[arg(long)]
        to: u64,
    },
    /// Audit: check the whole log (records, sequence, hash chain, blobs, snapshots).
    Verify,
    /// The whole log as JSON lines (to stdout, or --output FILE).
    Export {
        #[arg(long, value_enum, default_value = "inline")]
        content: pcx::audit::export::ContentMode,
        #[arg(long)]
        output: Option<PathBuf>,
    },
    /// Read an export (stdin, or --input FILE) into an empty data directory.
    Import {
        #[arg(long)]
        input: Option<PathBuf>,
    },
    /// Serve the context on a Unix socket (and optionally loopback TCP) until SIGINT/SIGTERM.
    Serve {
        /// The socket path (default: socket_path, or DATA_DIR/pcx.sock).
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Also listen on this loopback TCP address (needs tcp_token).
        #[arg(long)]
        tcp: Option<String>,
    },
    /// JSON lines on stdin → a running server → JSON lines on stdout (as `batch`).
    Client {
        #[arg(long, conflicts_with = "tcp")]
        socket: Option<PathBuf>,
        /// Connect over TCP instead (sends the token first).
        #[arg(long)]
        tcp: Option<String>,
        /// Read the TCP token from this file (a final newline is not part of it). Without it,
        /// the token is tcp_token from the config (e.g. the variable PCX_TCP_TOKEN).
        #[arg(long, conflicts_with = "token")]
        token_file: Option<PathBuf>,
        /// The TCP token itself. Discouraged: other users of the machine can read a command
        /// line (ps, /proc); use --token-file or PCX_TCP_TOKEN.
        #[arg(long)]
        token: Option<String>,
    },
    /// Drop the events before SEQ (and content no longer referenced), keeping the state.
    Compact {
        #[arg(long)]
        before: u64,
    },
    /// For a data directory that does not open: write every event that still reads and
    /// verifies to FILE (as `export` does, for `import`), and say where the log breaks.
    /// Changes nothing in the data directory.
    Salvage {
        #[arg(long)]
        output: PathBuf,
        /// Also scan sled's raw files for records when sled reads its trees whole.
        #[arg(long)]
        scan: bool,
    },
    /// After opening was refused for a lost tail (exit 3): give up the events that a
    /// snapshot proves existed after the last one found, record what was given up, and let
    /// the log continue after its last event.
    Recover {
        /// Accept the loss (required: nothing else is done without it).
        #[arg(long, required = true)]
        accept_lost_tail: bool,
    },
}

#[derive(Subcommand, Debug)]
enum PluginsCommand {
    /// The plugins the plugin directory provides (name, version, ABI, kinds, path), and what
    /// is wrong with those that do not load.
    List,
    /// Load a candidate plugin in a child process and say exactly what is wrong with it.
    Check { path: PathBuf },
    /// (internal) Load PATH in this process and report; what `check` runs in its child.
    #[command(hide = true)]
    Probe { path: PathBuf },
}

#[derive(Args, Debug)]
struct ContentArgs {
    /// Read the content from this file.
    #[arg(long, group = "content")]
    file: Option<PathBuf>,
    /// The content as base64.
    #[arg(long, group = "content")]
    content_b64: Option<String>,
    /// The content as UTF-8 text.
    #[arg(long, group = "content")]
    text: Option<String>,
}

/// Exit codes beyond 0 (success), 1 (a failed request or command) and 2 (bad flags or
/// configuration): opening the data directory was refused because a snapshot proves the log
/// lost acknowledged events (see `pcx recover --accept-lost-tail`)...
const EXIT_LOST_TAIL: u8 = 3;
/// ...or because an event no longer matches the snapshot taken after it (it was rewritten).
const EXIT_SNAPSHOT_CONTRADICTS: u8 = 4;

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
            eprintln!("pcx: {e:#}");
            return ExitCode::from(2);
        }
    };
    trace::init(config.log_format, &config.log_filter);
    let system = actix::System::new();
    match system.block_on(run(cli.command, config)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("pcx: {}", error_text(&e));
            exit_code(&e)
        }
    }
}

/// The error and its causes, each said once: a cause whose words are already in the message
/// (thiserror's `{source}`) is not repeated, nor is sled's own text, which the message gives
/// in words naming the file. Then what the user can do about it.
fn error_text(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let said = cause.to_string();
        if cause.downcast_ref::<sled::Error>().is_some() || text.contains(&said) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&said);
    }
    if let Some(hint) = e.chain().find_map(damage_hint) {
        text.push_str(".\n");
        text.push_str(hint);
    }
    text
}

/// What to do about a damaged data directory, for the errors that say it is.
fn damage_hint(cause: &(dyn std::error::Error + 'static)) -> Option<&'static str> {
    use pcx::context::ContextOpenError;
    use pcx::store::error::{OpenError, StoreError};
    use pcx::store::replay::ReplayError;
    const DAMAGED: &str = "The data directory is damaged. `pcx verify` names the first bad \
        event and `pcx export` writes out the log, if the store still opens; `pcx salvage \
        --output FILE` exports every event that still reads and verifies even when it does not \
        (to load with `pcx import` into a new data directory), and says where the log breaks.";
    // `ContextOpenError::Open` is transparent: the chain goes from it to the open error's
    // own cause.
    match cause.downcast_ref::<ContextOpenError>() {
        Some(ContextOpenError::Open(e)) => return damage_hint(e),
        Some(ContextOpenError::Replay(e)) => return damage_hint(e),
        _ => {}
    }
    if let Some(e) = cause.downcast_ref::<OpenError>() {
        return match e {
            OpenError::Sled { .. }
            | OpenError::Damaged { .. }
            | OpenError::DataFileMissing { .. } => Some(DAMAGED),
            _ => None,
        };
    }
    if let Some(e) = cause.downcast_ref::<ReplayError>() {
        // `ReplayError::Store` is transparent too.
        return match e {
            ReplayError::Store(e) => damage_hint(e),
            _ => Some(DAMAGED),
        };
    }
    match cause.downcast_ref::<StoreError>() {
        Some(
            StoreError::Sled { .. }
            | StoreError::SledRead { .. }
            | StoreError::SledEvents { .. }
            | StoreError::Damaged { .. },
        ) => Some(DAMAGED),
        _ => None,
    }
}

/// The exit code of a failed command: [`EXIT_LOST_TAIL`] and [`EXIT_SNAPSHOT_CONTRADICTS`]
/// for an open refused for those reasons, else 1.
fn exit_code(e: &anyhow::Error) -> ExitCode {
    use pcx::store::replay::ReplayError;
    for cause in e.chain() {
        match cause.downcast_ref::<ReplayError>() {
            Some(ReplayError::LostTail { .. }) => return ExitCode::from(EXIT_LOST_TAIL),
            Some(ReplayError::SnapshotContradicts { .. }) => {
                return ExitCode::from(EXIT_SNAPSHOT_CONTRADICTS)
            }
            _ => {}
        }
    }
    ExitCode::FAILURE
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

async fn run(command: Command, config: Config) -> Result<ExitCode> {
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
        other => request_of(other)?,
    };
    let ctx =
        Context::open(&config).with_context(|| format!("opening {}", config.data_dir.display()))?;
    let answer = protocol::submit(&ctx, request).await;
    let closed = ctx.close().await;
    println!("{answer}");
    if let Err(e) = closed {
        anyhow::bail!("closing the data directory: {e}");
    }
    Ok(if answer.get("ok") == Some(&Value::Bool(true)) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn request_of(command: Command) -> Result<Request> {
    Ok(match command {
        Command::RecordArtifact { key, kind, content } => {
            let bytes = match (content.file, content.content_b64, content.text) {
                (Some(f), _, _) => {
                    std::fs::read(&f).with_context(|| format!("reading {}", f.display()))?
                }
                (_, Some(b), _) => {
                    return Ok(Request::RecordArtifact {
                        key,
                        kind,
                        content_b64: b,
                    })
                }
                (_, _, Some(t)) => t.into_bytes(),
                _ => read_stdin()?,
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
                    String::from_utf8(read_stdin()?).context("the entry JSON is not UTF-8")?
                }
                Some(j) => j.to_string(),
            };
            let entry: WireEntry =
                serde_json::from_str(&text).context("the entry JSON is not a valid entry")?;
            Request::RecordDynamoCacheEntry { key, entry }
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
            Request::EditArtifact { key, edit }
        }
        Command::Get { key } => Request::SerializeArtifactByKey { key },
        Command::Take { key } => Request::TakeArtifact { key },
        Command::Clear => Request::Clear,
        Command::DebugInfo => Request::DumpDebugInfo,
        Command::Stitch => Request::CreateCacheEntries,
        Command::Save => Request::SaveToDynamoCache,
        Command::Load { key, system_info } => {
            let system_info = system_info
                .map(|s| {
                    serde_json::from_str(&s).context("--system-info is not valid system info JSON")
                })
                .transpose()?;
            Request::LoadCacheEntry { key, system_info }
        }
        _ => {
            anyhow::bail!("not a single request")
        }
    })
}

fn read_stdin() -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    io::Read::read_to_end(&mut io::stdin(), &mut buf).context("reading stdin")?;
    Ok(buf)
}

async fn batch(config: Config) -> Result<ExitCode> {
    let ctx =
        Context::open(&config).with_context(|| format!("opening {}", config.data_dir.display()))?;
    let stdin = io::BufReader::with_capacity(1 << 16, io::stdin());
    let mut stdout = io::stdout().lock();
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
async fn demo(config: Config) -> Result<ExitCode> {
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
    writeln!(out, "{}", step("1. record two artifacts, edit one, record an entry that also names a missing demo_b3, stitch, save, clear"))?;
    let ctx = Context::open(&config).with_context(|| format!("opening {dir}"))?;
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
    writeln!(
        out,
        "{}\nEverything above is in {dir}: run `pcx --data-dir {dir} debug-info`, or pipe requests into `pcx --data-dir {dir} batch`.",
        step("done")
    )?;
    Ok(ExitCode::SUCCESS)
}

async fn show(out: &mut impl Write, ctx: &Context, request: Value) -> Result<()> {
    writeln!(out, "-> {request}")?;
    let (id, parsed) = protocol::parse(request.to_string().as_bytes());
    let answer = match parsed {
        Ok(r) => protocol::with_id(id, protocol::submit(ctx, r).await),
        Err(e) => protocol::refused(&e),
    };
    writeln!(out, "<- {answer}")?;
    Ok(())
}

fn plugin_json(p: &pcx::plugins::loader::LoadedPlugin) -> Value {
    json!({
        "name": p.name, "version": p.version, "abi": format!("{}.{}", p.abi_major, p.abi_minor),
        "kinds": p.kinds, "edits": p.edits, "target": p.target, "path": p.path,
    })
}

fn plugins_command(command: PluginsCommand, config: &Config) -> Result<ExitCode> {
    match command {
        PluginsCommand::List => {
            let Some(dir) = config.plugin_dir() else {
                println!(
                    "{}",
                    json!({"plugin_dir": null, "plugins": [], "problems": []})
                );
                return Ok(ExitCode::SUCCESS);
            };
            let timeout = std::time::Duration::from_millis(config.plugin_call_timeout_ms);
            let kinds = pcx::plugins::kinds::Kinds::load_with(&dir, usize::MAX, timeout);
            let plugins: Vec<Value> = kinds.plugins().iter().map(|p| plugin_json(p)).collect();
            let problems: Vec<String> = kinds.problems().iter().map(|e| e.to_string()).collect();
            println!(
                "{}",
                json!({"plugin_dir": dir, "plugins": plugins, "problems": problems})
            );
            Ok(if problems.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        PluginsCommand::Probe { path } => {
            let answer = match probe(&path) {
                Ok(p) => json!({"ok": true, "plugin": plugin_json(&p)}),
                Err(e) => json!({"ok": false, "error": e}),
            };
            println!("{answer}");
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

/// Loads one candidate in this process, with every check registration would make.
fn probe(path: &std::path::Path) -> Result<pcx::plugins::loader::LoadedPlugin, String> {
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
fn check_in_child(path: &std::path::Path, config: &Config) -> Result<Value> {
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

/// A progress bar on stderr for a walk up to `total`: drawn only on a terminal and with text
/// logs, never into a pipe or a JSON log.
fn progress_bar(config: &Config, total: u64, what: &str) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if config.log_format != LogFormat::Text || !io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total);
    if let Ok(style) =
        indicatif::ProgressStyle::with_template("{msg} {wide_bar} {pos}/{len} events ({eta})")
    {
        bar.set_style(style);
    }
    bar.set_message(what.to_string());
    bar
}

fn answer_error(kind: &str, message: &str) -> ExitCode {
    println!(
        "{}",
        json!({"ok": false, "error": {"kind": kind, "message": message}})
    );
    ExitCode::FAILURE
}

/// The audit and maintenance commands: they read (or rewrite) the data directory directly.
fn audit_command(command: Command, config: &Config) -> Result<ExitCode> {
    use pcx::audit::query::{self, Query};
    let dir = &config.data_dir;
    // Whether the directory exists is asked under its lock, once an interrupted compaction
    // is settled (it may have moved the directory aside): by the opens below.
    if let Command::Compact { before } = command {
        let bar = progress_bar(config, before, "compacting");
        let report =
            pcx::audit::compact::compact(dir, before, config.cache_capacity_bytes, &mut |s| {
                bar.set_position(s)
            });
        bar.finish_and_clear();
        return Ok(match report {
            Ok(r) => {
                println!("{r}");
                ExitCode::SUCCESS
            }
            Err(e @ pcx::audit::compact::CompactError::Missing(_)) => {
                answer_error("no_data_directory", &e.to_string())
            }
            Err(e) => answer_error("compact_failed", &e.to_string()),
        });
    }
    if let Command::Import { input } = command {
        let bar = progress_bar(config, 0, "importing");
        let mut reader: Box<dyn io::BufRead> = match &input {
            Some(path) => Box::new(io::BufReader::new(
                std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?,
            )),
            None => Box::new(io::stdin().lock()),
        };
        let result =
            pcx::audit::export::import(dir, config.cache_capacity_bytes, &mut reader, &mut |s| {
                bar.set_position(s)
            });
        bar.finish_and_clear();
        return Ok(match result {
            Ok(i) => {
                println!(
                    "{}",
                    json!({"ok": true, "events": i.events, "last_seq": i.last_seq, "state_digest": i.state_digest.to_hex()})
                );
                ExitCode::SUCCESS
            }
            Err(e) => answer_error("import_failed", &e.to_string()),
        });
    }
    let journal = match pcx::store::sled_journal::SledJournal::open_existing(
        dir,
        config.cache_capacity_bytes,
    ) {
        Ok(j) => j,
        Err(e @ pcx::store::error::OpenError::Missing { .. }) => {
            return Ok(answer_error("no_data_directory", &error_text(&e.into())))
        }
        Err(e) => return Ok(answer_error("open_failed", &error_text(&e.into()))),
    };
    if let Command::Recover { .. } = command {
        return Ok(
            match pcx::audit::lost_tail::accept_lost_tail(&journal, &config.origin()) {
                Ok(accepted) => {
                    println!("{}", json!({"ok": true, "accepted": accepted}));
                    ExitCode::SUCCESS
                }
                Err(e) => answer_error(e.kind(), &error_text(&e.into())),
            },
        );
    }
    let total = pcx::store::journal::Journal::last_seq(&journal)
        .ok()
        .flatten()
        .unwrap_or(0);
    let mut out = io::stdout().lock();
    let query = match command {
        Command::Log { filter } => {
            let mut failed = None;
            let result = query::log(&journal, &filter, &mut |line| {
                if failed.is_none() {
                    if let Err(e) = writeln!(out, "{line}") {
                        failed = Some(e);
                    }
                }
            });
            if let Some(e) = failed {
                return Err(e).context("writing the log");
            }
            return Ok(match result {
                Ok(_) => ExitCode::SUCCESS,
                Err(e) => answer_error(e.kind(), &e.to_string()),
            });
        }
        Command::History { key } => Query::History { key },
        Command::State { at, at_time, key } => Query::State { at, at_time, key },
        Command::Diff { from, to } => Query::Diff { from, to },
        Command::Verify => Query::Verify,
        Command::Export { content, output } => {
            let bar = progress_bar(config, total, "exporting");
            let mut sink: Box<dyn Write> = match &output {
                Some(path) => Box::new(io::BufWriter::new(
                    std::fs::File::create(path)
                        .with_context(|| format!("creating {}", path.display()))?,
                )),
                None => Box::new(io::BufWriter::new(out)),
            };
            let result = pcx::audit::export::export(&journal, content, &mut sink, &mut |s| {
                bar.set_position(s)
            });
            bar.finish_and_clear();
            return Ok(match result {
                Ok(_) => ExitCode::SUCCESS,
                Err(e) => answer_error("export_failed", &e.to_string()),
            });
        }
        _ => anyhow::bail!("not an audit command"),
    };
    let bar = progress_bar(config, total, "replaying");
    let result = query.run(&journal, &mut |s| bar.set_position(s));
    bar.finish_and_clear();
    let fields = match result {
        Ok(f) => f,
        Err(e) => return Ok(answer_error(e.kind(), &e.to_string())),
    };
    let sound = fields.get("verify").is_none_or(|v| v["ok"] == true);
    for (_, value) in fields {
        match value {
            Value::Array(lines) => {
                for line in lines {
                    writeln!(out, "{line}")?;
                }
            }
            Value::String(_) => {}
            other => writeln!(out, "{other}")?,
        }
    }
    Ok(if sound {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `pcx salvage`: reads the data directory without opening it as a store.
fn salvage(config: &Config, output: &std::path::Path, scan: bool) -> Result<ExitCode> {
    let dir = &config.data_dir;
    if !dir.is_dir() {
        return Ok(answer_error(
            "no_data_directory",
            &format!("data directory {} does not exist", dir.display()),
        ));
    }
    let file =
        std::fs::File::create(output).with_context(|| format!("creating {}", output.display()))?;
    let mut sink = io::BufWriter::new(file);
    let mut report = match pcx::audit::salvage::salvage(dir, scan, &mut sink) {
        Ok(r) => r,
        Err(e) => return Ok(answer_error("salvage_failed", &e.to_string())),
    };
    report["output"] = json!(output);
    let complete = report["ok"] == true;
    if !complete {
        tracing::warn!(dir = %dir.display(), "salvage: the log breaks or was longer; see the report");
    }
    println!("{report}");
    Ok(if complete {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn serve(config: Config, socket: Option<PathBuf>, tcp: Option<String>) -> Result<ExitCode> {
    let tcp_addr = tcp.unwrap_or_else(|| config.tcp_listen.clone());
    let tcp = if tcp_addr.is_empty() {
        None
    } else {
        let addr = tcp_addr
            .parse()
            .with_context(|| format!("--tcp {tcp_addr} is not an address like 127.0.0.1:7411"))?;
        Some((addr, config.tcp_token.clone()))
    };
    let server = pcx::interface::server::ServerConfig {
        socket_path: socket.unwrap_or_else(|| config.socket()),
        tcp,
        max_frame_bytes: config.max_frame_bytes,
        max_in_flight_per_connection: config.max_in_flight_per_connection,
        max_unread_answer_bytes_per_connection: config.max_unread_answer_bytes_per_connection,
        max_connections: config.max_connections,
        tcp_auth_timeout: std::time::Duration::from_millis(config.tcp_auth_timeout_ms),
    };
    // Signal handlers first, so a signal during start-up is a clean shutdown, not a death.
    use tokio::signal::unix::{signal, SignalKind};
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let plugin_stop = std::sync::Arc::new(std::sync::OnceLock::new());
    stop_plugin_calls_after_signal(plugin_stop.clone());
    let ctx =
        Context::open(&config).with_context(|| format!("opening {}", config.data_dir.display()))?;
    let _ = plugin_stop.set(ctx.clone());
    let shutdown = async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
    };
    let counters = std::sync::Arc::new(pcx::interface::server::Counters::default());
    let served = pcx::interface::server::run(ctx.clone(), server, counters, shutdown).await;
    let closed = ctx.close().await;
    served?;
    closed.map_err(|e| anyhow::anyhow!("closing the data directory: {e}"))?;
    tracing::info!("pcx server stopped");
    Ok(ExitCode::SUCCESS)
}

/// A plugin call that does not return holds the context actor, and with it this thread, where
/// the server and its signal handlers run, until the call's deadline. So a thread of its own
/// also waits for SIGINT/SIGTERM, and once the server's grace period is over makes the context
/// give up its plugin calls: shutdown then ends in time whatever a plugin does (the stuck
/// plugin thread is left to die with the process). Everything answered is durable already;
/// the requests left waiting for a plugin fail.
fn stop_plugin_calls_after_signal(ctx: std::sync::Arc<std::sync::OnceLock<Context>>) {
    use tokio::signal::unix::{signal, SignalKind};
    let (ready, started) = std::sync::mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name("pcx-signals".into())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            let signalled = runtime.map(|rt| {
                rt.block_on(async {
                    let (int, term) = (
                        signal(SignalKind::interrupt()),
                        signal(SignalKind::terminate()),
                    );
                    let _ = ready.send(());
                    let (Ok(mut int), Ok(mut term)) = (int, term) else {
                        return false;
                    };
                    tokio::select! {
                        _ = int.recv() => true,
                        _ = term.recv() => true,
                    }
                })
            });
            if let Ok(true) = signalled {
                std::thread::sleep(pcx::interface::server::SHUTDOWN_GRACE);
                if let Some(ctx) = ctx.get() {
                    tracing::warn!("still shutting down after the grace period: abandoning plugin calls");
                    ctx.stop_plugin_calls();
                }
            } else {
                tracing::warn!("cannot watch for signals beside the server: a plugin call can hold up shutdown until its deadline");
            }
        });
    match spawned {
        // Once it listens, a signal is seen by it as well as by the server.
        Ok(_) => {
            let _ = started.recv();
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot start the signal thread: a plugin call can hold up shutdown until its deadline")
        }
    }
}

fn client(
    config: &Config,
    socket: Option<PathBuf>,
    tcp: Option<String>,
    token_file: Option<PathBuf>,
    token: Option<String>,
) -> Result<ExitCode> {
    let stdin = io::BufReader::with_capacity(1 << 16, io::stdin());
    let mut stdout = io::stdout().lock();
    let (limit, in_flight) = (config.max_request_bytes, config.max_in_flight);
    match tcp {
        Some(addr) => {
            let mut stream = std::net::TcpStream::connect(&addr)
                .with_context(|| format!("connecting to {addr}"))?;
            let token = client_token(config, token_file, token)?;
            let hello = pcx::interface::client::exchange(
                &mut stream,
                &json!({"op": "auth", "token": token}),
            )?;
            if hello["ok"] != true {
                anyhow::bail!("the server refused the token: {hello}");
            }
            pcx::interface::client::run(stream, stdin, &mut stdout, limit, in_flight)?;
        }
        None => {
            let path = socket.unwrap_or_else(|| config.socket());
            let stream = std::os::unix::net::UnixStream::connect(&path).with_context(|| {
                format!("connecting to {} (is `pcx serve` running?)", path.display())
            })?;
            pcx::interface::client::run(stream, stdin, &mut stdout, limit, in_flight)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The token `pcx client --tcp` sends: from `--token-file`, `--token` (with a warning), or the
/// config's `tcp_token`.
fn client_token(
    config: &Config,
    token_file: Option<PathBuf>,
    token: Option<String>,
) -> Result<String> {
    if let Some(path) = token_file {
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading the token file {}", path.display()))?;
        let token = text.strip_suffix('\n').unwrap_or(&text);
        return Ok(token.strip_suffix('\r').unwrap_or(token).to_string());
    }
    if let Some(token) = token {
        tracing::warn!(
            "--token puts the token on the command line, which every user of this machine can \
             read (ps, /proc); use --token-file FILE or the variable PCX_TCP_TOKEN instead"
        );
        return Ok(token);
    }
    Ok(config.tcp_token.clone())
}
