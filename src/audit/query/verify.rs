//! Whether anyone altered the history (`verify`): every record, the sequence, the hash chain,
//! every referenced content and every snapshot checked, and the accepted lost tails listed.
//! Apart because it is the one question that must read everything and trust nothing.

use std::collections::HashSet;

use serde_json::{json, Value};

use crate::core::model::Digest;
use crate::core::state::State;
use crate::store::error::StoreError;
use crate::store::journal::Journal;
use crate::store::record::{decode_lost_tail, decode_snapshot, Envelope, LostTail};
use crate::store::replay::{base, ReplayError};

use super::{format_time, walk, AuditError, Progress};

/// What `verify` found wrong first.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("event {seq}: {what}")]
pub struct Unsound {
    pub seq: u64,
    pub what: String,
}

/// Walks the whole log: every record decodes, sequence numbers have no gaps, the hash chain
/// holds, every referenced blob exists and matches its digest, and every snapshot matches a
/// replay of the events it covers. Gives a summary, or the first bad sequence number.
pub fn verify(
    journal: &dyn Journal,
    progress: Progress,
) -> Result<Result<Value, Unsound>, StoreError> {
    // Before the records (see `committed_end`): a live writer may add records meanwhile.
    let committed_end = journal.committed_end()?;
    let start = match base(journal) {
        Ok(b) => b,
        Err(ReplayError::Store(e)) => return Err(e),
        Err(e) => {
            let seq = match &e {
                ReplayError::EventsBeforeAnchor { first, .. } => *first,
                _ => 0,
            };
            return Ok(Err(Unsound {
                seq,
                what: e.to_string(),
            }));
        }
    };
    let anchored = start.head.seq;
    let snapshots: HashSet<u64> = journal.snapshot_seqs()?.into_iter().collect();
    let mut checked_blobs: HashSet<Digest> = HashSet::new();
    // The anchor's own state refers to content too.
    let mut pending: Vec<(u64, Digest)> = start
        .state
        .content_refs()
        .into_iter()
        .map(|d| (anchored, d))
        .collect();
    let mut check_blob = |seq: u64, d: Digest| -> Result<Option<Unsound>, StoreError> {
        if !checked_blobs.insert(d) {
            return Ok(None);
        }
        let stored = match journal.blob(&d) {
            Err(StoreError::Damaged { what }) => {
                return Ok(Some(Unsound {
                    seq,
                    what: format!("content blob {d} it refers to is damaged: {what}"),
                }))
            }
            other => other?,
        };
        Ok(match stored {
            None => Some(Unsound {
                seq,
                what: format!("content blob {d} it refers to is missing"),
            }),
            Some(c) if Digest::of(&c) != d => Some(Unsound {
                seq,
                what: format!("content blob {d} it refers to does not match its digest"),
            }),
            Some(_) => None,
        })
    };
    for (seq, d) in pending.drain(..) {
        if let Some(bad) = check_blob(seq, d)? {
            return Ok(Err(bad));
        }
    }
    let mut events = 0u64;
    let mut snapshots_checked = 0u64;
    let mut first_bad: Option<Unsound> = None;
    let walked = walk(journal, start, |e, hash, before| {
        progress(e.seq);
        for d in e.event.content_refs() {
            if let Some(bad) = check_blob(e.seq, d)? {
                first_bad = Some(bad);
                return Ok(false);
            }
        }
        events += 1;
        if snapshots.contains(&e.seq) {
            if let Some(what) = snapshot_problem(journal, e, hash, before)? {
                first_bad = Some(Unsound { seq: e.seq, what });
                return Ok(false);
            }
            snapshots_checked += 1;
        }
        Ok(true)
    });
    let (state, head) = match walked {
        Ok(x) => x,
        Err(AuditError::Store(e)) | Err(AuditError::Replay(ReplayError::Store(e))) => {
            return Err(e)
        }
        Err(AuditError::Replay(e)) => {
            let seq = match &e {
                ReplayError::Corrupt { seq, .. } | ReplayError::BrokenChain { seq } => *seq,
                ReplayError::Gap { expected, .. } => *expected,
                ReplayError::MisplacedRecord { key, .. } => *key,
                _ => 0,
            };
            return Ok(Err(Unsound {
                seq,
                what: e.to_string(),
            }));
        }
        Err(e) => {
            return Ok(Err(Unsound {
                seq: 0,
                what: e.to_string(),
            }))
        }
    };
    if let Some(bad) = first_bad {
        return Ok(Err(bad));
    }
    if let Some(ahead) = snapshots.iter().filter(|s| **s > head.seq).min() {
        return Ok(Err(Unsound {
            seq: *ahead,
            what: format!(
                "snapshot at {ahead} is ahead of the log's last event {}",
                head.seq
            ),
        }));
    }
    if let Some(end) = committed_end.filter(|e| *e > head.seq) {
        return Ok(Err(Unsound {
            seq: head.seq + 1,
            what: format!(
                "events {}..={end} are missing: the journal's head says the log reached event \
                 {end}, but it ends at event {}",
                head.seq + 1,
                head.seq
            ),
        }));
    }
    // Read again after the records: a record past the head as it is now was not committed by
    // a writer of the journal (each moves the head with its records).
    if let Some(end) = journal
        .committed_end()?
        .filter(|e| events > 0 && *e < head.seq)
    {
        return Ok(Err(Unsound {
            seq: end + 1,
            what: format!(
                "events {}..={} lie past the journal's head, which says the log reached event \
                 {end}: every writer moves the head with its records, so no writer of this \
                 journal committed them (rows inserted by hand, or the head restored from an \
                 older backup than the records)",
                end + 1,
                head.seq
            ),
        }));
    }
    // Losses an operator accepted are not faults of the log, but an auditor must see them.
    let mut lost_tails = Vec::new();
    for (i, bytes) in journal.lost_tails()?.iter().enumerate() {
        match decode_lost_tail(bytes) {
            Ok(lost) => lost_tails.push(lost_tail_json(&lost)),
            Err(e) => {
                return Ok(Err(Unsound {
                    seq: 0,
                    what: format!("the record of accepted lost tail {i} is damaged: {e}"),
                }))
            }
        }
    }
    Ok(Ok(json!({
        "ok": true,
        "first_seq": if events == 0 { Value::Null } else { json!(anchored + 1) },
        "last_seq": head.seq,
        // The chain's tip: kept where the store's writers cannot change it, it pins every
        // event up to `last_seq` (docs/auditing.md, what the hash chain proves).
        "last_hash": if head.seq == 0 { Value::Null } else { json!(head.hash.to_hex()) },
        "events": events,
        "anchored_at": if anchored == 0 { Value::Null } else { json!(anchored) },
        "snapshots_checked": snapshots_checked,
        "blobs_checked": checked_blobs.len(),
        "state_digest": state.digest().to_hex(),
        "lost_tails": lost_tails,
    })))
}

/// What is wrong with the snapshot stored at the event `e` (whose record hashes to `hash`,
/// and which `before` is the state before), if anything: it does not decode, does not point
/// at this record, or does not match the replay of the events it covers.
pub(crate) fn snapshot_problem(
    journal: &dyn Journal,
    e: &Envelope,
    hash: Digest,
    before: &State,
) -> Result<Option<String>, StoreError> {
    let Some(bytes) = journal.snapshot(e.seq)? else {
        return Ok(None);
    };
    let seq = e.seq;
    Ok(match decode_snapshot(&bytes) {
        Err(err) => Some(format!("snapshot at {seq} does not decode: {err}")),
        Ok(s) if s.head != hash || s.seq != seq => {
            Some(format!("snapshot at {seq} does not point at this record"))
        }
        Ok(s) => {
            let mut after = before.clone();
            after.apply(e.event.clone());
            (s.state.digest() != after.digest()).then(|| {
                format!("snapshot at {seq} does not match a replay of the events it covers")
            })
        }
    })
}

/// What an accepted lost tail gave up, as `verify` and `pcx recover` show it.
pub fn lost_tail_json(lost: &LostTail) -> Value {
    json!({
        "last_found": lost.last_found,
        "snapshot": lost.snapshot,
        "lost_events": {"from": lost.last_found + 1, "to": lost.snapshot},
        "snapshots_kept": lost.snapshots.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        "accepted_at": format_time(lost.time_ms),
        "origin": lost.origin,
    })
}
