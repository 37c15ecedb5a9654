//! How a failed command reads: each cause said once, what the user can do about it, and
//! the exit code that tells a script what happened.

use std::process::ExitCode;

use serde_json::json;

/// Exit codes beyond 0 (success), 1 (a failed request or command) and 2 (bad flags or
/// configuration): opening the data directory was refused because a snapshot proves the log
/// lost acknowledged events (see `pcx recover --accept-lost-tail`)...
pub(crate) const EXIT_LOST_TAIL: u8 = 3;
/// ...or because an event no longer matches the snapshot taken after it (it was rewritten).
pub(crate) const EXIT_SNAPSHOT_CONTRADICTS: u8 = 4;

/// The error and its causes, each said once: a cause whose words are already in the message
/// (thiserror's `{source}`) is not repeated, nor is sled's own text, which the message gives
/// in words naming the file. Then what the user can do about it.
pub(crate) fn error_text(e: &anyhow::Error) -> String {
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
    } else if let Some(dir) = e.chain().find_map(held_directory) {
        text.push_str(".\n");
        text.push_str(&in_use_hint(&dir));
    }
    text
}

/// The data directory another process holds, for the errors that say so.
fn held_directory(cause: &(dyn std::error::Error + 'static)) -> Option<String> {
    use pcx::context::ContextOpenError;
    use pcx::store::error::OpenError;
    use pcx::store::swap::SwapError;
    // `ContextOpenError::Open` is transparent: the chain skips the open error itself.
    if let Some(ContextOpenError::Open(e)) = cause.downcast_ref::<ContextOpenError>() {
        return held_directory(e);
    }
    if let Some(OpenError::Locked { path }) = cause.downcast_ref::<OpenError>() {
        return Some(path.display().to_string());
    }
    match cause.downcast_ref::<SwapError>() {
        Some(SwapError::Locked { dir }) => Some(dir.display().to_string()),
        _ => None,
    }
}

/// What to do about a data directory a server holds: the usual holder is a `pcx serve` (the
/// one `pcx.torch.install()` starts, say), which answers the same requests, audits included.
fn in_use_hint(dir: &str) -> String {
    format!(
        "If a `pcx serve` holds it, send the requests to the server instead, the audit queries \
         too: `echo '{{\"op\":\"log\"}}' | pcx --data-dir {dir} client` (likewise \
         `history`, `state`, `diff`, `verify`; an export is \
         `{{\"op\":\"export\",\"output\":\"/absolute/path\"}}`, which the server writes); or \
         stop the server (SIGTERM) first."
    )
}

/// What to do about a damaged data directory, for the errors that say it is.
pub(crate) fn damage_hint(cause: &(dyn std::error::Error + 'static)) -> Option<&'static str> {
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
            | OpenError::DataFileMissing { .. }
            | OpenError::SledLogDamaged { .. }
            | OpenError::SledBlobDamaged { .. } => Some(DAMAGED),
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
pub(crate) fn exit_code(e: &anyhow::Error) -> ExitCode {
    use pcx::store::replay::ReplayError;
    for cause in e.chain() {
        match cause.downcast_ref::<ReplayError>() {
            Some(
                ReplayError::LostTail { .. }
                | ReplayError::HeadAhead { .. }
                | ReplayError::SnapshotAheadOfHead { .. },
            ) => return ExitCode::from(EXIT_LOST_TAIL),
            Some(ReplayError::SnapshotContradicts { .. }) => {
                return ExitCode::from(EXIT_SNAPSHOT_CONTRADICTS)
            }
            _ => {}
        }
    }
    ExitCode::FAILURE
}

pub(crate) fn answer_error(kind: &str, message: &str) -> ExitCode {
    println!(
        "{}",
        json!({"ok": false, "error": {"kind": kind, "message": message}})
    );
    ExitCode::FAILURE
}
