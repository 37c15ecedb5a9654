//! Observability: the structured trace events PyTorch emits, and the subscriber set-up.
//!
//! Structured events go out on target `pcx::structured` with the fields `artifact` (the
//! event's name, e.g. `dynamo_cache_bypass`), `encoding` (`json`) and `payload` (the JSON
//! text). With `--log-format json` every line on stderr is one JSON object, so a program can
//! pick them out by `fields.artifact` and parse `fields.payload`.

use tracing_subscriber::EnvFilter;

use crate::stitch::Structured;

/// The target structured events use.
pub const STRUCTURED_TARGET: &str = "pcx::structured";

/// Whether structured trace events are logged at all (so their payloads are worth building).
pub fn structured_enabled() -> bool {
    tracing::enabled!(target: STRUCTURED_TARGET, tracing::Level::INFO)
}

/// Emits one structured trace event.
pub fn structured(event: &Structured) {
    if !structured_enabled() {
        return;
    }
    let payload = event.payload.to_string();
    tracing::info!(
        target: STRUCTURED_TARGET,
        artifact = event.name,
        encoding = "json",
        payload = %payload,
        "{}",
        event.name
    );
}

/// How log lines are written to stderr.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// Installs the process's subscriber: `filter` is an `EnvFilter` directive (overridden by
/// `RUST_LOG` when set). Safe to call more than once; later calls do nothing.
pub fn init(format: LogFormat, filter: &str) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(filter))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().with_current_span(false).try_init(),
    };
}
