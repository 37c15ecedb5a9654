//! The command line: every subcommand and flag, as clap parses them.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use pcx::trace::LogFormat;

/// pcx: a durable, event-sourced store for PyTorch's precompile context.
#[derive(Parser, Debug)]
#[command(name = "pcx", version, about)]
pub(crate) struct Cli {
    /// Data directory (default from the config: ./pcx-data).
    #[arg(long, global = true)]
    pub(crate) data_dir: Option<PathBuf>,
    /// A TOML file overriding the built-in config/default.toml.
    #[arg(long, global = true)]
    pub(crate) config: Option<PathBuf>,
    /// Log lines on stderr: text for people, json for programs.
    #[arg(long, global = true, value_enum)]
    pub(crate) log_format: Option<LogFormat>,
    /// Load artifact-kind plugins from DIR (overrides `plugin_dir`).
    #[arg(long, global = true, conflicts_with = "no_plugins")]
    pub(crate) plugin_dir: Option<PathBuf>,
    /// Load no plugins: only the built-in `eager` kind.
    #[arg(long, global = true)]
    pub(crate) no_plugins: bool,
    /// The context a single-request command acts in, and `history`, `state` and `diff`
    /// describe (default: the default one; `pcx contexts` lists them, torch's are
    /// `torch@HOST:PID:MS`).
    #[arg(long, global = true)]
    pub(crate) context: Option<String>,
    /// The namespace of the dynamo cache a single-request command acts in (save, load), and
    /// `state` and `diff` describe.
    #[arg(long, global = true)]
    pub(crate) namespace: Option<String>,
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Subcommand, Debug)]
pub(crate) enum Command {
    /// List the contexts that hold something, with their counts (list_contexts).
    Contexts,
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
    #[command(group(clap::ArgGroup::new("edit").required(true).args(["set_b64", "append_b64"])))]
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
    History {
        key: String,
        /// From the global `--context` and `--namespace`.
        #[arg(skip)]
        within: pcx::audit::query::Within,
    },
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
        /// From the global `--context` and `--namespace`.
        #[arg(skip)]
        within: pcx::audit::query::Within,
    },
    /// Audit: what was added, changed, taken or cleared between two points.
    Diff {
        #[arg(long)]
        from: u64,
        #[arg(long)]
        to: u64,
        /// From the global `--context` and `--namespace`.
        #[arg(skip)]
        within: pcx::audit::query::Within,
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
    /// With `journal = "postgres"`: who holds the configured journal and where it serves, as
    /// one JSON line (`pcx client` and the Python client follow it).
    Holder,
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
pub(crate) enum PluginsCommand {
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
pub(crate) struct ContentArgs {
    /// Read the content from this file.
    #[arg(long, group = "content")]
    pub(crate) file: Option<PathBuf>,
    /// The content as base64.
    #[arg(long, group = "content")]
    pub(crate) content_b64: Option<String>,
    /// The content as UTF-8 text.
    #[arg(long, group = "content")]
    pub(crate) text: Option<String>,
}
