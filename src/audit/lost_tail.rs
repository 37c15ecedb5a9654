//! `pcx recover --accept-lost-tail`: the operator's explicit decision to go on with a log
//! that lost acknowledged events.
//!
//! Opening refuses a log that a stored snapshot proves was longer (the newest page of events
//! is gone, say): serving it silently would hand the lost sequence numbers to new events, and
//! `verify` would fail for ever on the snapshot that remembers the old ones. Only a person
//! can decide that the lost events are gone for good. This does what they decided, and no
//! more: it checks that the log up to its last event replays, writes a record of the loss
//! (the last event found, the snapshots that proved more, kept byte for byte, the time and
//! who) beside the chain, then removes those snapshots from the snapshot tree, durably and in
//! that order. New events then continue after the last event found, `verify` passes again,
//! and its summary lists every accepted loss.

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::Value;

use crate::audit::query::lost_tail_json;
use crate::store::error::StoreError;
use crate::store::journal::Journal;
use crate::store::record::{encode_lost_tail, EncodeError, LostTail, SCHEMA_VERSION};
use crate::store::replay::{recover_past_lost_tail, ReplayError};
use crate::store::sled_journal::SledJournal;

/// Why a lost tail was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum AcceptError {
    #[error("nothing to accept: no snapshot is ahead of the log (its last event is {last})")]
    NothingLost { last: u64 },
    /// The log up to its last event does not replay: that is other damage, which accepting
    /// a lost tail must not paper over.
    #[error("the log before the lost tail does not replay, so the loss was not accepted: {0}")]
    Replay(#[from] ReplayError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Encode(#[from] EncodeError),
}

impl AcceptError {
    /// The `snake_case` kind answers carry.
    pub fn kind(&self) -> &'static str {
        match self {
            AcceptError::NothingLost { .. } => "nothing_lost",
            AcceptError::Replay(_) => "corrupt_log",
            AcceptError::Store(_) | AcceptError::Encode(_) => "storage",
        }
    }
}

/// Accepts the loss of the events after the log's last one that snapshots prove existed.
/// Gives the record of what was given up, as JSON.
pub fn accept_lost_tail(journal: &SledJournal, origin: &str) -> Result<Value, AcceptError> {
    let (recovered, ahead) = recover_past_lost_tail(journal)?;
    let head = recovered.head;
    let Some(&snapshot) = ahead.first() else {
        return Err(AcceptError::NothingLost { last: head.seq });
    };
    let mut snapshots = Vec::with_capacity(ahead.len());
    for seq in &ahead {
        let bytes = journal.snapshot(*seq)?.unwrap_or_default();
        snapshots.push((*seq, serde_bytes::ByteBuf::from(bytes.to_vec())));
    }
    let lost = LostTail {
        schema: SCHEMA_VERSION,
        time_ms: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
        origin: origin.to_string(),
        last_found: head.seq,
        last_found_hash: head.hash,
        snapshot,
        snapshots,
    };
    journal.accept_lost_tail(&encode_lost_tail(&lost)?, &ahead)?;
    tracing::warn!(
        dir = %journal.dir().display(),
        last_found = head.seq,
        snapshot,
        lost_from = head.seq + 1,
        lost_to = snapshot,
        origin,
        "accepted the loss of acknowledged events: the log continues after its last event \
         found, and the snapshots ahead of it are kept only in the record of the loss"
    );
    Ok(lost_tail_json(&lost))
}
