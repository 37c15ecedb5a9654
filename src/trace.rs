//! Observability: the subscriber set-up. The structured trace events PyTorch emits are
//! emitted by the actor ([`crate::actor::structured`]).
//!
//! Structured events go out on target `pcx::structured` with the fields `artifact` (the
//! event's name, e.g. `dynamo_cache_bypass`), `encoding` (`json`) and `payload` (the JSON
//! text). With `--log-format json` every line on stderr is one JSON object, so a program can
//! pick them out by `fields.artifact` and parse `fields.payload`.

use tracing_subscriber::EnvFilter;

pub use crate::actor::structured::STRUCTURED_TARGET;

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
