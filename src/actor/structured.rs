//! Structured trace events, as PyTorch's `trace_structured` emits them: the stitch builds them
//! (pure, in the core), the actor sends them out here, on target `pcx::structured` with the
//! fields `artifact` (the event's name), `encoding` (`json`) and `payload` (the JSON text).

use crate::core::stitch::Structured;

/// The target structured events use.
pub const STRUCTURED_TARGET: &str = "pcx::structured";

/// Whether structured trace events are logged at all (so their payloads are worth building).
pub fn enabled() -> bool {
    tracing::enabled!(target: STRUCTURED_TARGET, tracing::Level::INFO)
}

/// Emits one structured trace event.
pub fn emit(event: &Structured) {
    if !enabled() {
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
