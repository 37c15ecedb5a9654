//! Rebuilding the state from the log: from the newest snapshot that decodes and continues the
//! chain, else from the first event. Every record is checked (hash, sequence, chain) as it is
//! folded, and the first bad one is named.

use crate::journal::{Journal, StoreError};
use crate::model::Digest;
use crate::record::{decode_event, decode_snapshot, DecodeError, Envelope, GENESIS};
use crate::state::State;

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
}

/// Where a log that was compacted begins: the state right after `head`.
#[derive(Clone, Debug)]
pub struct Base {
    pub state: State,
    pub head: Head,
}

/// The start of the log: the compaction anchor, or the empty state before event 1.
pub fn base(journal: &dyn Journal) -> Result<Base, ReplayError> {
    match journal.anchor()? {
        None => Ok(Base {
            state: State::default(),
            head: Head::EMPTY,
        }),
        Some(bytes) => {
            let snap = decode_snapshot(&bytes).map_err(|source| ReplayError::Anchor { source })?;
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

/// Replays the whole log (through snapshots where they hold).
pub fn recover(journal: &dyn Journal) -> Result<Recovered, ReplayError> {
    let start = base(journal)?;
    for seq in journal.snapshot_seqs()? {
        if seq <= start.head.seq {
            continue;
        }
        let Some(bytes) = journal.snapshot(seq)? else {
            continue;
        };
        match decode_snapshot(&bytes) {
            // A snapshot counts only when the log holds the record it was taken after: a
            // crash may keep a snapshot and lose its group's events, and replaying from a
            // state the log does not contain would leave a permanent gap.
            Ok(snap) if snap.seq == seq && record_hash(journal, seq) != Some(snap.head) => {
                tracing::warn!(
                    snapshot = seq,
                    "snapshot is not backed by the log; falling back"
                );
            }
            Ok(snap) if snap.seq == seq => {
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
            Ok(_) => tracing::warn!(
                snapshot = seq,
                "snapshot is stored under the wrong key; falling back"
            ),
            Err(e) => {
                tracing::warn!(snapshot = seq, error = %e, "snapshot does not decode; falling back")
            }
        }
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

/// The hash of the record at `seq`, if it is there and sound.
fn record_hash(journal: &dyn Journal, seq: u64) -> Option<Digest> {
    let (key, bytes) = journal.records(seq).next()?.ok()?;
    if key != seq {
        return None;
    }
    decode_event(&bytes).ok().map(|(_, hash)| hash)
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
