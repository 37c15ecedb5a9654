//! `pcx compact --before SEQ`: a long-running orchestrator's log cannot grow for ever.
//!
//! Compaction writes a new data directory beside the old one holding: an *anchor* (a
//! snapshot of the state right after `SEQ - 1`, with the hash of that record, so `verify`
//! proves the rest of the chain from it), the events from `SEQ` on (their exact bytes), the
//! snapshots from `SEQ` on, only the content blobs still referenced (by the anchor's state,
//! the kept events or the kept snapshots), and the dynamo cache view. It then swaps the two
//! directories. sled never gives freed space back to the file system, so a rewrite is the
//! only way the directory really shrinks.
//!
//! The swap is two renames: `DIR` → `DIR.pre-compaction`, then `DIR.compacting` → `DIR`
//! (see [`crate::store::swap`]). Compaction holds the data directory's lock from before its first
//! read to after the old copy is removed, so no other command sees a swap half done; opening
//! a data directory (under the same lock) finishes or undoes a swap a crash interrupted, so a
//! crash at any point leaves either the old log or the new.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::audit::query::{snapshot_problem, walk, AuditError, Progress};
use crate::core::model::Digest;
use crate::store::error::{OpenError, StoreError};
use crate::store::journal::{Commit, Journal};
use crate::store::record::{decode_snapshot, encode_snapshot_of};
use crate::store::replay::{base, Base};
use crate::store::sled_journal::SledJournal;
use crate::store::swap::{pause_point, sibling, swap_in, DirLock, SwapError, COMPACTING};

/// Why compaction did not happen.
#[derive(Debug, thiserror::Error)]
pub enum CompactError {
    #[error(transparent)]
    Open(#[from] OpenError),
    #[error(transparent)]
    Audit(#[from] AuditError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("nothing to compact before {before}: the log already begins after event {first_kept}")]
    Nothing { before: u64, first_kept: u64 },
    #[error("cannot compact before {before}: the log's last event is {last}, so the events kept can begin at {} at the latest", last + 1)]
    BeyondEnd { before: u64, last: u64 },
    #[error("data directory {0} does not exist: nothing has been recorded there")]
    Missing(PathBuf),
    /// The compacted copy does not replay to the state and head the log does: it is not
    /// swapped in, and the log is as it was.
    #[error("the compacted copy in {side} replays to {got}, the log to {expected}: it was not swapped in, and the log is as it was")]
    Mismatch {
        side: PathBuf,
        got: String,
        expected: String,
    },
    /// A snapshot among the events compaction would remove is not what they replay to: the
    /// log is damaged (or forged), and compacting would remove the evidence with them.
    #[error("{0}: the log is damaged, and compacting would remove the evidence with the events it covers; nothing was compacted (`pcx verify` reports the log)")]
    Unsound(String),
    /// A server asked to compact a journal that is not a data directory it holds.
    #[error("{0}")]
    NotHere(String),
}

impl From<SwapError> for CompactError {
    fn from(e: SwapError) -> Self {
        match e {
            SwapError::Missing { dir } => CompactError::Missing(dir),
            other => CompactError::Open(other.into()),
        }
    }
}

/// The bytes a directory's files take.
pub fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// Adds to a compaction's report the bytes `dir` took before (`bytes_before`) and takes now.
fn sizes(report: &mut Value, bytes_before: u64, dir: &Path) {
    let bytes_after = dir_bytes(dir);
    report["bytes_before"] = json!(bytes_before);
    report["bytes_after"] = json!(bytes_after);
    report["reclaimed_bytes"] = json!(bytes_before.saturating_sub(bytes_after));
}

/// Compacts the log in `dir` so it begins after event `before - 1`. Returns a JSON report.
pub fn compact(
    dir: &Path,
    before: u64,
    cache_capacity: u64,
    progress: Progress,
) -> Result<Value, CompactError> {
    let dir = &crate::store::swap::resolve(dir);
    // Held to the end: no other command opens the directory until the swap is over.
    let lock = DirLock::acquire(dir, crate::store::swap::LOCK_PATIENCE, false)?;
    crate::store::swap::repair(dir, &lock)?;
    if !dir.exists() {
        return Err(CompactError::Missing(dir.to_path_buf()));
    }
    // The swap replaces `dir` whole (and checks this again): said before any work is done.
    crate::store::swap::only_ours(dir)?;
    pause_point("compact:locked");
    let bytes_before = dir_bytes(dir);
    let new_dir = sibling(dir, COMPACTING);
    let written = SledJournal::open_held(dir, cache_capacity)
        .map_err(CompactError::from)
        .and_then(|old| {
            let anchor = anchor_of(&old, before, &mut *progress)?;
            write_compacted(&old, &new_dir, anchor, cache_capacity, progress)
        });
    let mut report = match written {
        Ok(report) => report,
        Err(e) => {
            // Nothing was swapped: the log is as it was. The side directory's space goes back
            // now (on a full disk, say), not at the next open.
            match std::fs::remove_dir_all(&new_dir) {
                Err(r) if r.kind() != std::io::ErrorKind::NotFound => {
                    tracing::warn!(error = %r, dir = %new_dir.display(), "could not remove");
                }
                _ => {}
            }
            return Err(e);
        }
    };
    swap_in(dir, &new_dir, &lock)?;
    sizes(&mut report, bytes_before, dir);
    drop(lock);
    Ok(report)
}

/// The event the anchor of `compact --before BEFORE` stands at (`BEFORE - 1`), or why there is
/// none: the log already begins after it, or it is past the log's last event.
fn anchor_for(journal: &dyn Journal, start: &Base, before: u64) -> Result<u64, CompactError> {
    let anchor_seq = before.saturating_sub(1);
    if anchor_seq <= start.head.seq {
        return Err(CompactError::Nothing {
            before,
            first_kept: start.head.seq,
        });
    }
    let last = journal.last_seq()?.unwrap_or(start.head.seq);
    if anchor_seq > last {
        return Err(CompactError::BeyondEnd { before, last });
    }
    Ok(anchor_seq)
}

/// What the anchor of `compact --before BEFORE` holds: the state right after event
/// `BEFORE - 1` and that record's head, and how many events it stands for.
struct Anchor {
    state: crate::core::state::State,
    head: crate::store::replay::Head,
    removed: u64,
}

/// The anchor of `compact --before BEFORE`, replayed from the log's beginning: never taken
/// from a snapshot, since compaction removes the events that would refute one. Every record
/// among those events is checked as it is read, and every snapshot against the replay; one
/// that does not match refuses the compaction ([`CompactError::Unsound`]).
fn anchor_of(
    journal: &dyn Journal,
    before: u64,
    progress: Progress,
) -> Result<Anchor, CompactError> {
    let start = base(journal).map_err(AuditError::from)?;
    let anchor_seq = anchor_for(journal, &start, before)?;
    let first = start.head.seq;
    let snapshots: HashSet<u64> = journal.snapshot_seqs()?.into_iter().collect();
    let mut unsound = None;
    let (state, head) = walk(journal, start, |e, hash, before| {
        if e.seq > anchor_seq {
            return Ok(false);
        }
        progress(e.seq);
        if snapshots.contains(&e.seq) {
            unsound = snapshot_problem(journal, e, hash, before)?;
        }
        Ok(unsound.is_none())
    })?;
    if let Some(what) = unsound {
        return Err(CompactError::Unsound(what));
    }
    if head.seq != anchor_seq {
        return Err(AuditError::BeyondEnd {
            asked: anchor_seq,
            last: head.seq,
        }
        .into());
    }
    Ok(Anchor {
        state,
        head,
        removed: anchor_seq - first,
    })
}

/// Compacts the log of a running server (or batch) in its data directory, as [`compact`]
/// does offline: its journal replaces the directory under itself
/// ([`SledJournal::replace_in_place`]), holding commits off while the copy is written, so
/// the server goes on answering reads and takes up writes again on the compacted log.
pub fn compact_in_place(
    journal: &dyn Journal,
    before: u64,
    progress: Progress,
) -> Result<Value, CompactError> {
    let backend = journal.backend();
    #[cfg(feature = "postgres")]
    if let Some(pg) = backend.and_then(|b| b.downcast_ref::<crate::store::pg_journal::PgJournal>())
    {
        // One transaction, under this holder's lease: commits go on beside it.
        return compact_postgres(pg, before, progress);
    }
    let Some(sled) = backend.and_then(|b| b.downcast_ref::<SledJournal>()) else {
        return Err(CompactError::NotHere(
            "this context's journal is neither a data directory nor a journal in PostgreSQL".into(),
        ));
    };
    let dir = sled.dir();
    // The swap replaces `dir` whole (and checks this again): said before any work is done.
    crate::store::swap::only_ours(dir)?;
    let bytes_before = dir_bytes(dir);
    let side = sibling(dir, COMPACTING);
    let cache_capacity = sled.cache_capacity();
    // The events the anchor stands for do not change: they are replayed before commits are
    // held off for the copy.
    let anchor = anchor_of(sled, before, &mut *progress)?;
    let mut report = sled.replace_in_place(&side, |old| {
        write_compacted(old, &side, anchor, cache_capacity, progress)
    })?;
    sizes(&mut report, bytes_before, dir);
    Ok(report)
}

/// Writes the compacted log of `old` into `new_dir` (under the lock the caller holds),
/// checks that it replays to what `old` does, and closes it.
fn write_compacted(
    old: &SledJournal,
    new_dir: &Path,
    anchor: Anchor,
    cache_capacity: u64,
    progress: Progress,
) -> Result<Value, CompactError> {
    let io = |op: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| CompactError::Io { op, path, source }
    };
    let Anchor {
        state: anchor_state,
        head: anchor_head,
        removed: events_removed,
    } = anchor;
    let anchor_seq = anchor_head.seq;

    if new_dir.exists() {
        std::fs::remove_dir_all(new_dir).map_err(io("removing", new_dir))?;
    }
    let new = SledJournal::open_held(new_dir, cache_capacity)?;
    let anchor =
        encode_snapshot_of(anchor_seq, anchor_head.hash, &anchor_state, 0).map_err(|e| {
            StoreError::Io {
                op: "encoding the anchor",
                path: new_dir.to_path_buf(),
                source: std::io::Error::other(e.to_string()),
            }
        })?;
    new.set_anchor(&anchor)?;
    // Losses an operator accepted stay on record for auditors.
    for lost in old.lost_tails()? {
        new.accept_lost_tail(&lost, &[])?;
    }
    pause_point("compact:writing");

    // The kept events, their exact bytes; and what they refer to.
    let mut keep: HashSet<Digest> = anchor_state.content_refs().into_iter().collect();
    let mut batch = Commit::default();
    let mut kept_events = 0u64;
    let mut failure: Option<StoreError> = None;
    walk(
        old,
        Base {
            state: anchor_state,
            head: anchor_head,
        },
        |e, _, _| {
            progress(e.seq);
            keep.extend(e.event.content_refs());
            let bytes = match old.records(e.seq).next().transpose() {
                Ok(Some((_, b))) => b,
                Ok(None) => Vec::new(),
                Err(err) => {
                    failure = Some(err);
                    return Ok(false);
                }
            };
            batch.records.push((e.seq, bytes));
            kept_events += 1;
            if batch.records.len() >= 1024 {
                if let Err(err) = new.commit(&std::mem::take(&mut batch)) {
                    failure = Some(err);
                    return Ok(false);
                }
            }
            Ok(true)
        },
    )?;
    if let Some(err) = failure {
        return Err(err.into());
    }
    new.commit(&batch)?;
    for seq in old
        .snapshot_seqs()?
        .into_iter()
        .rev()
        .filter(|s| *s > anchor_seq)
    {
        if let Some(bytes) = old.snapshot(seq)? {
            if let Ok(s) = decode_snapshot(&bytes) {
                keep.extend(s.state.content_refs());
                new.commit(&Commit {
                    snapshot: Some((seq, bytes.to_vec())),
                    ..Commit::default()
                })?;
            }
        }
    }
    let (mut blobs_removed, mut blob_bytes_removed) = (0u64, 0u64);
    // Kept content is written in groups, as commits write it.
    let (mut kept, mut kept_bytes) = (Commit::default(), 0usize);
    for d in old.blob_digests()? {
        let Some(content) = old.blob(&d)? else {
            continue;
        };
        if keep.contains(&d) {
            kept_bytes += content.len();
            kept.blobs.push((d, std::sync::Arc::new(content)));
            if kept.blobs.len() >= 1024 || kept_bytes >= crate::store::pack::MAX_GROUP_BYTES {
                new.commit(&std::mem::take(&mut kept))?;
                kept_bytes = 0;
            }
        } else {
            blobs_removed += 1;
            blob_bytes_removed += content.len() as u64;
        }
    }
    new.commit(&kept)?;
    new.rewrite_cache_view(&old.cache_view()?)?;
    same_replay(old, &new, new_dir)?;
    drop(new);
    Ok(json!({
        "ok": true,
        "anchored_at": anchor_seq,
        "events_removed": events_removed,
        "events_kept": kept_events,
        "blobs_removed": blobs_removed,
        "blob_bytes_removed": blob_bytes_removed,
    }))
}

/// Refuses a compacted copy that does not replay to the state and head its log does: what
/// is swapped in must be the same log, shorter.
fn same_replay(old: &dyn Journal, new: &dyn Journal, new_dir: &Path) -> Result<(), CompactError> {
    let replay = |j: &dyn Journal| {
        crate::store::replay::recover(j)
            .map(|r| (r.state.digest(), r.head))
            .map_err(AuditError::from)
    };
    let (expected, got) = (replay(old)?, replay(new)?);
    if expected != got {
        let say = |(d, h): (Digest, crate::store::replay::Head)| {
            format!(
                "state {} at event {} ({})",
                d.to_hex(),
                h.seq,
                h.hash.to_hex()
            )
        };
        return Err(CompactError::Mismatch {
            side: new_dir.to_path_buf(),
            got: say(got),
            expected: say(expected),
        });
    }
    Ok(())
}

/// `pcx compact --before SEQ` on a journal in PostgreSQL, as its writer: the anchor (the state
/// right after `SEQ - 1`, with that record's hash) is set and the events and snapshots before
/// it are deleted **in one transaction**, so the journal is either as it was or compacted.
/// Contents stay: the cluster shares them, and one journal cannot tell whether another
/// still refers to one.
#[cfg(feature = "postgres")]
pub fn compact_postgres(
    journal: &crate::store::pg_journal::PgJournal,
    before: u64,
    progress: Progress,
) -> Result<Value, CompactError> {
    let Anchor {
        state: anchor_state,
        head: anchor_head,
        ..
    } = anchor_of(journal, before, progress)?;
    let anchor_seq = anchor_head.seq;
    let anchor =
        encode_snapshot_of(anchor_seq, anchor_head.hash, &anchor_state, 0).map_err(|e| {
            StoreError::Damaged {
                what: format!("the anchor does not encode: {e}"),
            }
        })?;
    let (events_removed, snapshots_removed) = journal.compact_before(anchor_seq, &anchor)?;
    Ok(json!({
        "ok": true,
        "anchored_at": anchor_seq,
        "events_removed": events_removed,
        "snapshots_removed": snapshots_removed,
    }))
}
