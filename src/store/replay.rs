//! Rebuilding the state from the log: from the newest snapshot that decodes and continues the
//! chain, else from the first event. Every record is checked (hash, sequence, chain) as it is
//! folded, and the first bad one is named.

use crate::core::model::Digest;
use crate::core::state::State;
use crate::store::error::StoreError;
use crate::store::journal::Journal;
use crate::store::record::{
    check_snapshot, decode_event, decode_snapshot, DecodeError, Envelope, Snapshot, GENESIS,
};

/// The last record folded: where the next append continues.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Head {
    /// 0 when the log is empty; sequence numbers start at 1.
    pub seq: u64,
    pub hash: Digest,
}

impl Head {
    pub const EMPTY: Head = Head {
        seq: 0,
        hash: GENESIS,
    };
}

/// The outcome of a replay.
#[derive(Debug)]
pub struct Recovered {
    pub state: State,
    pub head: Head,
    /// The snapshot replay started from, if any.
    pub snapshot: Option<u64>,
    /// How many events were folded after it.
    pub replayed: u64,
}

/// Why the log could not be replayed.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("event {seq} is damaged: {source}")]
    Corrupt {
        seq: u64,
        #[source]
        source: DecodeError,
    },
    #[error("event log has a gap: expected event {expected}, found {found}")]
    Gap { expected: u64, found: u64 },
    #[error("event {seq} is stored under the key of event {key}")]
    MisplacedRecord { seq: u64, key: u64 },
    #[error("event {seq} does not follow the record before it (hash chain broken)")]
    BrokenChain { seq: u64 },
    #[error("the compaction anchor is damaged: {source}")]
    Anchor {
        #[source]
        source: DecodeError,
    },
    /// An anchor stands for the events a compaction removed, so it is at event 1 or later.
    #[error(
        "the compaction anchor stands at event 0, for no events: a compaction removes at least \
         one, so this anchor was put there by other means, and its state (which the events \
         after it do not give) would be served as theirs. Refusing to serve it; `pcx verify` \
         reports the log"
    )]
    AnchorAtZero,
    /// A snapshot is ahead of the log: the events it was taken after were acknowledged and
    /// have since been lost (sled writes a group's events before its snapshot, and recovers a
    /// prefix of its log, so no crash leaves a snapshot without its events).
    #[error(
        "acknowledged events were lost: snapshot {snapshot} proves the log reached event \
         {snapshot}, but the last event found is {last_found}. Refusing to serve the shorter \
         log, whose next events would reuse the lost numbers; `pcx recover --accept-lost-tail` \
         continues after event {last_found} and records the loss"
    )]
    LostTail { snapshot: u64, last_found: u64 },
    /// The journal's own record of its end (PostgreSQL's head row, moved in the same
    /// transaction as the records) is past the last record: committed records were deleted.
    #[error(
        "acknowledged events were lost: the journal's head says the log reached event {head}, \
         but the last event found is {last_found}. Refusing to serve the shorter log, whose \
         next events would reuse the lost numbers; restore the database (a backup, or a \
         standby that has them), or `pcx export` what is left and import it into a new journal"
    )]
    HeadAhead { head: u64, last_found: u64 },
    /// A snapshot is past both the last record and the journal's own head, which move with
    /// their records in one transaction (PostgreSQL): records were deleted and the head moved
    /// back with them, or an older backup of those tables restored beside newer snapshots. No
    /// crash does this, and `pcx recover --accept-lost-tail` (sled's remedy) does not apply.
    #[error(
        "acknowledged events were lost: snapshot {snapshot} proves the log reached event \
         {snapshot}, but the journal's head says {head} and the last event found is \
         {last_found} (records deleted with the head moved back, or a partial restore). \
         Refusing to serve the shorter log, whose next events would reuse the lost numbers; \
         restore the database (a backup, or a standby that has them), or `pcx export` what \
         is left and import it into a new journal"
    )]
    SnapshotAheadOfHead {
        snapshot: u64,
        head: u64,
        last_found: u64,
    },
    /// A snapshot names a record the log no longer holds: the record (or the snapshot) was
    /// altered after the snapshot was taken.
    #[error(
        "snapshot {seq} contradicts the log: it was taken after an event {seq} whose hash is \
         {expected}, but event {seq} in the log hashes to {found} (the event was rewritten \
         after the snapshot). Refusing to open; `pcx verify` reports the log"
    )]
    SnapshotContradicts {
        seq: u64,
        expected: Digest,
        found: Digest,
    },
    /// Records lie past the journal's own record of its end (PostgreSQL's head row, moved in
    /// the same transaction as the records): no writer of the journal committed them.
    #[error(
        "events {first}..={last} lie past the journal's end: the journal's head says {head}, \
         and every writer moves the head with its records, so no writer of this journal \
         committed them (rows inserted by hand, or the head restored from an older backup \
         than the records). Refusing to open, which would take them for the journal's own; \
         `pcx verify` reports the log; restore the database (a backup, or a standby), or \
         `pcx export` the log and import what you trust into a new journal"
    )]
    RecordsPastHead { head: u64, first: u64, last: u64 },
    /// Events are still in the log at or before the compaction anchor, which stands for the
    /// events it replaced: compaction removes them, so the anchor (or they) were put there
    /// by other means.
    #[error(
        "event {first} is in the log at or before its compaction anchor at event {anchor}, \
         which stands for the events it replaced: compaction removes those events, so the \
         anchor or the events were put there by other means (a forged anchor, or a partial \
         restore). Refusing to serve the anchor's state; `pcx verify` reports the log"
    )]
    EventsBeforeAnchor { first: u64, anchor: u64 },
}

/// Where a log that was compacted begins: the state right after `head`.
#[derive(Clone, Debug)]
pub struct Base {
    pub state: State,
    pub head: Head,
}

/// The start of the log: the compaction anchor, or the empty state before event 1. A log
/// that still holds an event at or before its anchor is refused
/// ([`ReplayError::EventsBeforeAnchor`]): the anchor's state could not be told from a forgery
/// those events refute.
pub fn base(journal: &dyn Journal) -> Result<Base, ReplayError> {
    match journal.anchor()? {
        None => Ok(Base {
            state: State::default(),
            head: Head::EMPTY,
        }),
        Some(bytes) => {
            let snap = decode_anchor(&bytes)?;
            if let Some(first) = journal.records(1).next() {
                let (first, _) = first?;
                if first <= snap.seq {
                    return Err(ReplayError::EventsBeforeAnchor {
                        first,
                        anchor: snap.seq,
                    });
                }
            }
            Ok(Base {
                state: snap.state,
                head: Head {
                    seq: snap.seq,
                    hash: snap.head,
                },
            })
        }
    }
}

/// Decodes a compaction anchor: a snapshot at event 1 or later.
pub fn decode_anchor(bytes: &[u8]) -> Result<Snapshot, ReplayError> {
    let snap = decode_snapshot(bytes).map_err(|source| ReplayError::Anchor { source })?;
    if snap.seq == 0 {
        return Err(ReplayError::AnchorAtZero);
    }
    Ok(snap)
}

/// Replays the whole log (through snapshots where they hold). Refuses a log that a stored
/// snapshot proves was longer ([`ReplayError::LostTail`]) or different
/// ([`ReplayError::SnapshotContradicts`]): serving it would reuse lost sequence numbers, or
/// let the next snapshot written over the contradicting one erase the evidence.
pub fn recover(journal: &dyn Journal) -> Result<Recovered, ReplayError> {
    recover_with(journal, false)
}

/// Replays the log up to its last event, leaving aside the snapshots ahead of it: for the
/// operator who accepted their loss (`pcx recover --accept-lost-tail`). Gives the replay and
/// those snapshots, newest first.
pub fn recover_past_lost_tail(journal: &dyn Journal) -> Result<(Recovered, Vec<u64>), ReplayError> {
    let start = base(journal)?;
    let last = last_event(journal, &start)?;
    let ahead: Vec<u64> = journal
        .snapshot_seqs()?
        .into_iter()
        .filter(|s| *s > last)
        .collect();
    Ok((recover_with(journal, true)?, ahead))
}

/// The sequence number of the log's last event (the anchor's when none follows it).
fn last_event(journal: &dyn Journal, start: &Base) -> Result<u64, ReplayError> {
    Ok(journal.last_seq()?.unwrap_or(0).max(start.head.seq))
}

fn recover_with(journal: &dyn Journal, past_lost_tail: bool) -> Result<Recovered, ReplayError> {
    // Read before the records: the head moves with its records in one transaction, so every
    // record up to it is there to be read after it (a live writer may add more meanwhile).
    let committed_end = journal.committed_end()?;
    let start = base(journal)?;
    let last_record = journal.last_seq()?;
    let last = last_record.unwrap_or(0).max(start.head.seq);
    // Read again after the records: every record committed by then is at or below it, so a
    // record past it was not committed by a writer of the journal.
    if let (Some(head), Some(last_record)) = (journal.committed_end()?, last_record) {
        if last_record > head {
            return Err(ReplayError::RecordsPastHead {
                head,
                first: head + 1,
                last: last_record,
            });
        }
    }
    let seqs: Vec<u64> = journal
        .snapshot_seqs()?
        .into_iter()
        .filter(|s| *s > start.head.seq && !(past_lost_tail && *s > last))
        .collect();
    // Every stored snapshot is weighed against the log before any is used (two are kept, and
    // each costs its hash and one page read; only the one started from is decoded).
    // The head first: where a journal keeps one (PostgreSQL), it says how far the log went
    // whether or not a snapshot survived, and its error names that journal's remedies.
    if let Some(head) = committed_end.filter(|h| *h > last) {
        return Err(ReplayError::HeadAhead {
            head,
            last_found: last,
        });
    }
    if let Some(&ahead) = seqs.iter().find(|s| **s > last) {
        return Err(match committed_end {
            Some(head) => ReplayError::SnapshotAheadOfHead {
                snapshot: ahead,
                head,
                last_found: last,
            },
            None => ReplayError::LostTail {
                snapshot: ahead,
                last_found: last,
            },
        });
    }
    // Newest first: each is weighed by its place in the log; the first sound one is decoded
    // and started from (and if it does not decode after all, the next).
    let mut sound = Vec::new();
    for seq in seqs {
        let Some(bytes) = journal.snapshot(seq)? else {
            continue;
        };
        match check_snapshot(bytes) {
            Ok(checked) if checked.seq == seq => match record_hash(journal, seq)? {
                Some(found) if found != checked.head => {
                    return Err(ReplayError::SnapshotContradicts {
                        seq,
                        expected: checked.head,
                        found,
                    })
                }
                Some(_) => sound.push((seq, sound.is_empty().then_some(checked))),
                // The record is missing or damaged: the fold from an older start names it.
                None => tracing::warn!(
                    snapshot = seq,
                    "the record the snapshot was taken after does not read; falling back"
                ),
            },
            Ok(_) => tracing::warn!(
                snapshot = seq,
                "snapshot is stored under the wrong key; falling back"
            ),
            Err(e) => {
                tracing::warn!(snapshot = seq, error = %e, "snapshot does not decode; falling back")
            }
        }
    }
    for (seq, kept) in sound {
        // The one kept was hashed as it was weighed; one read again is checked again.
        let decoded = match kept {
            Some(checked) => checked.decode(),
            None => match journal.snapshot(seq)? {
                Some(bytes) => decode_snapshot(&bytes),
                None => continue,
            },
        };
        let snap = match decoded {
            Ok(snap) => snap,
            Err(e) => {
                tracing::warn!(snapshot = seq, error = %e, "snapshot does not decode; falling back");
                continue;
            }
        };
        let head = Head {
            seq: snap.seq,
            hash: snap.head,
        };
        let (state, head, replayed) = fold(journal, snap.state, head, None)?;
        return Ok(Recovered {
            state,
            head,
            snapshot: Some(seq),
            replayed,
        });
    }
    let anchored = (start.head.seq > 0).then_some(start.head.seq);
    let (state, head, replayed) = fold(journal, start.state, start.head, None)?;
    Ok(Recovered {
        state,
        head,
        snapshot: anchored,
        replayed,
    })
}

/// The hash of the record at `seq`, if it is there and its own hash holds.
pub fn record_hash(journal: &dyn Journal, seq: u64) -> Result<Option<Digest>, StoreError> {
    let Some(item) = journal.records(seq).next() else {
        return Ok(None);
    };
    let (key, bytes) = item?;
    if key != seq {
        return Ok(None);
    }
    Ok(decode_event(&bytes)
        .ok()
        .filter(|(envelope, _)| envelope.seq == seq)
        .map(|(_, hash)| hash))
}

/// Checks the record stored under `key` as the one after `head`: its sequence number (no
/// gap, not misplaced), its own hash, and the chain. Replay and every audit walk use this.
pub fn checked(head: &Head, key: u64, bytes: &[u8]) -> Result<(Envelope, Digest), ReplayError> {
    let expected = head.seq + 1;
    if key != expected {
        return Err(ReplayError::Gap {
            expected,
            found: key,
        });
    }
    let (envelope, hash) =
        decode_event(bytes).map_err(|source| ReplayError::Corrupt { seq: key, source })?;
    if envelope.seq != key {
        return Err(ReplayError::MisplacedRecord {
            seq: envelope.seq,
            key,
        });
    }
    if envelope.prev != head.hash {
        return Err(ReplayError::BrokenChain { seq: key });
    }
    Ok((envelope, hash))
}

/// Folds the records after `head` into `state`, up to `until` (inclusive) if given. Returns
/// the state, the new head and how many events were folded.
pub fn fold(
    journal: &dyn Journal,
    mut state: State,
    mut head: Head,
    until: Option<u64>,
) -> Result<(State, Head, u64), ReplayError> {
    let mut replayed = 0;
    for item in journal.records(head.seq + 1) {
        let (key, bytes) = item?;
        if until.is_some_and(|u| key > u) {
            break;
        }
        let (envelope, hash) = checked(&head, key, &bytes)?;
        state.apply(envelope.event);
        head = Head { seq: key, hash };
        replayed += 1;
    }
    Ok((state, head, replayed))
}
