//! Questions an auditor asks of the log alone: what happened (`log`), what happened to this
//! key (`history`), what the context looked like then (`state_at`), what changed between two
//! points (`diff`), and whether anyone altered the history (`verify`). Nothing here writes.
//!
//! Every answer is computed by walking records in order with the same checks replay makes and
//! folding them through the same `State::apply`; memory is the folded state (references to
//! content, not content), and content is read only when asked for.
//!
//! The questions are in files by kind: [`log`] (events, history), [`state`] (state at a
//! point, diff), [`verify`], [`taken`] (what a retried take took the first time) and
//! [`capped`] (a journal as of one point). This file holds what
//! they share (the error, times, the checked walk) and [`Query`], the question as asked.

mod capped;
mod log;
mod state;
mod taken;
mod verify;

pub use capped::Capped;
pub use log::{event_keys, history, log, log_line, LogFilter};
pub use state::{artifact_at_json, diff, seq_at_time, state_at, state_json};
pub use taken::taken_by;
pub(crate) use verify::snapshot_problem;
pub use verify::{lost_tail_json, verify, Unsound};

use std::time::{Duration, UNIX_EPOCH};

use serde_json::{json, Map, Value};

use crate::core::model::{ArtifactRef, Digest};
use crate::core::scope::DEFAULT;
use crate::core::state::State;
use crate::store::error::StoreError;
use crate::store::journal::Journal;
use crate::store::record::Envelope;
use crate::store::replay::{base, Base, Head, ReplayError};

/// Why an audit question could not be answered.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error(transparent)]
    Replay(#[from] ReplayError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("events up to {first_kept} were compacted away; sequence number {asked} is no longer in the log (it begins after {first_kept})")]
    Compacted { asked: u64, first_kept: u64 },
    #[error("sequence number {asked} is beyond the end of the log (the last event is {last})")]
    BeyondEnd { asked: u64, last: u64 },
    #[error("--from {from} is after --to {to}")]
    Backwards { from: u64, to: u64 },
    #[error("`at` ({at}) and `at_time` ({at_time}) were both given: ask for one point, by sequence number or by time")]
    TwoPoints { at: u64, at_time: String },
    #[error("no event is named `{0}` (the names: {names})", names = crate::core::event::EVENT_NAMES.join(", "))]
    UnknownEvent(String),
    #[error("time `{text}` is not an RFC 3339 time (e.g. 2026-11-26T03:30:00Z): {message}")]
    BadTime { text: String, message: String },
}

impl AuditError {
    /// The `snake_case` kind answers carry.
    pub fn kind(&self) -> &'static str {
        match self {
            AuditError::Replay(_) => "corrupt_log",
            AuditError::Store(_) => "storage",
            AuditError::Compacted { .. } => "compacted",
            AuditError::BeyondEnd { .. } => "beyond_end",
            AuditError::Backwards { .. }
            | AuditError::TwoPoints { .. }
            | AuditError::UnknownEvent(_) => "invalid_request",
            AuditError::BadTime { .. } => "invalid_request",
        }
    }
}

/// Reports progress: the sequence number just passed.
pub type Progress<'a> = &'a mut dyn FnMut(u64);

/// Milliseconds since the epoch of an RFC 3339 time.
pub fn parse_time(text: &str) -> Result<u64, AuditError> {
    let t = humantime::parse_rfc3339_weak(text).map_err(|e| AuditError::BadTime {
        text: text.to_string(),
        message: e.to_string(),
    })?;
    Ok(t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0))
}

/// An RFC 3339 time (UTC, milliseconds) of milliseconds since the epoch.
pub fn format_time(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// Walks the records after `start`, checking each as replay does, until `f` says stop or
/// the log ends. `f` sees the envelope, the record's hash, and the state *before* the event.
pub fn walk(
    journal: &dyn Journal,
    start: Base,
    mut f: impl FnMut(&Envelope, Digest, &State) -> Result<bool, AuditError>,
) -> Result<(State, Head), AuditError> {
    let Base {
        mut state,
        mut head,
    } = start;
    for item in journal.records(head.seq + 1) {
        let (key, bytes) = item?;
        let (envelope, hash) = crate::store::replay::checked(&head, key, &bytes)?;
        if !f(&envelope, hash, &state)? {
            break;
        }
        state.apply(envelope.event);
        head = Head { seq: key, hash };
    }
    Ok((state, head))
}

/// An artifact reference as audit answers show it (`log`, `diff`).
pub(super) fn content_json(r: &ArtifactRef) -> Value {
    json!({ "kind": r.kind, "digest": r.digest.to_hex(), "size": r.size })
}

/// Which context, and which namespace of the dynamo cache, a question about content (`state`,
/// `history`, `diff`) is asked of: the request's `context` and `namespace`, the default ones
/// when not given. Questions about the log itself (`log`, `verify`) read every context.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Within {
    pub context: String,
    pub namespace: String,
}

impl Default for Within {
    fn default() -> Within {
        Within {
            context: DEFAULT.to_string(),
            namespace: DEFAULT.to_string(),
        }
    }
}

impl From<&crate::core::scope::Scope> for Within {
    /// The context and namespace a request was sent in.
    fn from(scope: &crate::core::scope::Scope) -> Within {
        Within {
            context: scope.context.clone(),
            namespace: scope.namespace.clone(),
        }
    }
}

impl Within {
    /// Whether this is the default context and namespace (answers then look as they always
    /// did; others say which context and namespace they describe).
    pub fn is_default(&self) -> bool {
        self.context == DEFAULT && self.namespace == DEFAULT
    }
}

/// An audit question, as the batch protocol and the CLI ask it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Query {
    Log(LogFilter),
    History {
        key: String,
        within: Within,
    },
    State {
        at: Option<u64>,
        at_time: Option<String>,
        key: Option<String>,
        within: Within,
    },
    Diff {
        from: u64,
        to: u64,
        within: Within,
    },
    Verify,
}

impl Query {
    /// Answers the question from the log: the fields to put in the answer.
    pub fn run(
        &self,
        journal: &dyn Journal,
        progress: Progress,
    ) -> Result<Map<String, Value>, AuditError> {
        let mut out = Map::new();
        match self {
            Query::Log(filter) => {
                let mut events = Vec::new();
                log(journal, filter, &mut |line| events.push(line))?;
                out.insert("events".into(), Value::Array(events));
            }
            Query::History { key, within } => {
                out.insert("key".into(), json!(key));
                if !within.is_default() {
                    out.insert("context".into(), json!(within.context));
                }
                out.insert(
                    "history".into(),
                    Value::Array(history(journal, key, within, progress)?),
                );
            }
            Query::State {
                at,
                at_time,
                key,
                within,
            } => {
                let at = match (at, at_time) {
                    (Some(at), Some(t)) => {
                        return Err(AuditError::TwoPoints {
                            at: *at,
                            at_time: t.clone(),
                        })
                    }
                    (Some(s), None) => *s,
                    (None, Some(t)) => seq_at_time(journal, parse_time(t)?)?,
                    (None, None) => journal.last_seq()?.unwrap_or(base(journal)?.head.seq),
                };
                let (state, head) = state_at(journal, at, progress)?;
                let value = match key {
                    Some(k) => artifact_at_json(journal, &state, head.seq, k, within)?,
                    None => state_json(&state, head.seq, within),
                };
                out.insert("state".into(), value);
            }
            Query::Diff { from, to, within } => {
                out.insert("diff".into(), diff(journal, *from, *to, within, progress)?);
            }
            Query::Verify => {
                let report = match verify(journal, progress)? {
                    Ok(summary) => summary,
                    Err(bad) => json!({ "ok": false, "seq": bad.seq, "error": bad.what }),
                };
                out.insert("verify".into(), report);
            }
        }
        Ok(out)
    }
}
