//! What the context looked like: the state right after any event (`state --at`, by sequence
//! number or by time), one artifact as it was then, and what changed between two points
//! (`diff`). Apart from the streaming questions because each answers with a rebuilt state.

use std::collections::{HashMap, HashSet};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde_json::{json, Value};

use crate::core::event::Event;
use crate::core::model::Digest;
use crate::core::state::State;
use crate::store::error::StoreError;
use crate::store::journal::Journal;
use crate::store::record::decode_snapshot;
use crate::store::replay::{base, record_hash, Base, Head, ReplayError};

use super::{content_json, walk, AuditError, Progress, Within};

/// The state right after event `at` (0: before the first event), rebuilt from the newest
/// snapshot at or before it, or from the start of the log.
pub fn state_at(
    journal: &dyn Journal,
    at: u64,
    progress: Progress,
) -> Result<(State, Head), AuditError> {
    let mut start = base(journal)?;
    if at < start.head.seq {
        return Err(AuditError::Compacted {
            asked: at,
            first_kept: start.head.seq,
        });
    }
    let last = journal.last_seq()?.unwrap_or(start.head.seq);
    if at > last {
        return Err(AuditError::BeyondEnd { asked: at, last });
    }
    for seq in journal.snapshot_seqs()? {
        if seq > at || seq <= start.head.seq {
            continue;
        }
        if let Some(snap) = journal
            .snapshot(seq)?
            .and_then(|b| decode_snapshot(&b).ok())
        {
            if snap.seq == seq {
                // A snapshot answers for the log only if it was taken after the log's own
                // record (as an open checks): one from another log, or after a record since
                // rewritten, would otherwise be answered whole for `at == seq`.
                match record_hash(journal, seq)? {
                    Some(found) if found != snap.head => {
                        return Err(ReplayError::SnapshotContradicts {
                            seq,
                            expected: snap.head,
                            found,
                        }
                        .into())
                    }
                    Some(_) => {}
                    // The record does not read: an older start finds and names it.
                    None => continue,
                }
                start = Base {
                    state: snap.state,
                    head: Head {
                        seq,
                        hash: snap.head,
                    },
                };
                break;
            }
        }
    }
    let (state, head) = walk(journal, start, |e, _, _| {
        progress(e.seq);
        Ok(e.seq <= at)
    })?;
    if head.seq != at {
        return Err(AuditError::BeyondEnd {
            asked: at,
            last: head.seq,
        });
    }
    Ok((state, head))
}

/// The sequence number of the last event at or before `time_ms` (0 if none is).
pub fn seq_at_time(journal: &dyn Journal, time_ms: u64) -> Result<u64, AuditError> {
    let start = base(journal)?;
    let mut found = start.head.seq;
    walk(journal, start, |e, _, _| {
        if e.time_ms > time_ms {
            return Ok(false);
        }
        found = e.seq;
        Ok(true)
    })?;
    Ok(found)
}

/// `state --at`'s answer: `{"seq","state_digest","debug_info","artifacts":[{key,kind,digest,size}],"dynamo_cache":[…]}`.
pub fn state_json(state: &State, seq: u64, within: &Within) -> Value {
    let context = state.context(&within.context);
    let artifacts: Vec<Value> = context
        .artifacts
        .iter()
        .map(|(k, r)| json!({ "key": k, "kind": r.kind, "digest": r.digest.to_hex(), "size": r.size }))
        .collect();
    let mut out = json!({
        "seq": seq,
        // Of the whole state, every context and namespace: what a replay must reproduce.
        "state_digest": state.digest().to_hex(),
        "debug_info": context.debug_info(),
        "artifacts": artifacts,
        "dynamo_cache": state.cache(&within.namespace).keys().collect::<Vec<_>>(),
    });
    if !within.is_default() {
        out["context"] = json!(within.context);
        out["namespace"] = json!(within.namespace);
    }
    out
}

/// `state --at S --key K`'s answer: one artifact's content as it was then (null when it was
/// not there); content missing or not matching its digest is refused as damage.
pub fn artifact_at_json(
    journal: &dyn Journal,
    state: &State,
    seq: u64,
    key: &str,
    within: &Within,
) -> Result<Value, AuditError> {
    let artifact = match state.context(&within.context).artifacts.get(key) {
        None => Value::Null,
        Some(r) => {
            // Content that is not there, or not what the record says, is damage, never an
            // answer: an auditor would take `null` or other bytes for the artifact then.
            let damaged = |what: &str| {
                AuditError::Store(StoreError::Damaged {
                    what: format!(
                        "content {} of artifact {key} after event {seq} {what}",
                        r.digest.to_hex()
                    ),
                })
            };
            let content = match journal.blob(&r.digest)? {
                None => return Err(damaged("is missing from the content store")),
                Some(c) if Digest::of(&c) != r.digest => {
                    return Err(damaged("no longer matches its digest"))
                }
                Some(c) => c,
            };
            json!({
                "key": key, "kind": r.kind, "digest": r.digest.to_hex(), "size": r.size,
                "content_b64": B64.encode(content),
            })
        }
    };
    Ok(json!({ "seq": seq, "artifact": artifact }))
}

/// What changed between the state after `from` and the state after `to`.
pub fn diff(
    journal: &dyn Journal,
    from: u64,
    to: u64,
    within: &Within,
    progress: Progress,
) -> Result<Value, AuditError> {
    if from > to {
        return Err(AuditError::Backwards { from, to });
    }
    let (a, head) = state_at(journal, from, progress)?;
    let mut removed_by: HashMap<String, &'static str> = HashMap::new();
    let mut clears = Vec::new();
    let (b, end) = walk(
        journal,
        Base {
            state: a.clone(),
            head,
        },
        |e, _, before| {
            if e.seq > to {
                return Ok(false);
            }
            progress(e.seq);
            let (context, _, change) = e.event.scoped_change();
            match change {
                Event::ArtifactTaken { key } if context == within.context => {
                    removed_by.insert(key.clone(), "taken");
                }
                Event::Cleared if context == within.context => {
                    clears.push(e.seq);
                    for k in before.context(context).artifacts.keys() {
                        removed_by.insert(k.clone(), "cleared");
                    }
                }
                // Dropping a context empties it, as a clear does.
                Event::ContextDropped { context } if *context == within.context => {
                    clears.push(e.seq);
                    for k in before.context(context).artifacts.keys() {
                        removed_by.insert(k.clone(), "cleared");
                    }
                }
                _ => {}
            }
            Ok(true)
        },
    )?;
    if end.seq != to {
        return Err(AuditError::BeyondEnd {
            asked: to,
            last: end.seq,
        });
    }
    let (a_context, b_context) = (a.context(&within.context), b.context(&within.context));
    let (a_cache, b_cache) = (a.cache(&within.namespace), b.cache(&within.namespace));
    let mut added = Vec::new();
    let mut changed = Vec::new();
    for (k, r) in b_context.artifacts {
        match a_context.artifacts.get(k) {
            None => added.push(
                json!({ "key": k, "kind": r.kind, "digest": r.digest.to_hex(), "size": r.size }),
            ),
            Some(old) if old != r => {
                changed.push(json!({ "key": k, "from": content_json(old), "to": content_json(r) }))
            }
            Some(_) => {}
        }
    }
    let (mut taken, mut cleared) = (Vec::new(), Vec::new());
    for k in a_context
        .artifacts
        .keys()
        .filter(|k| !b_context.artifacts.contains_key(*k))
    {
        match removed_by.get(k) {
            Some(&"taken") => taken.push(k.clone()),
            _ => cleared.push(k.clone()),
        }
    }
    fn keys_diff<'a>(
        old: Vec<&'a String>,
        new: Vec<(&'a String, bool)>,
    ) -> (Vec<&'a String>, Vec<&'a String>) {
        let old: HashSet<&String> = old.into_iter().collect();
        let added = new
            .iter()
            .filter(|(k, _)| !old.contains(k))
            .map(|(k, _)| *k)
            .collect();
        let changed = new
            .iter()
            .filter(|(k, same)| old.contains(k) && !same)
            .map(|(k, _)| *k)
            .collect();
        (added, changed)
    }
    let (entries_added, entries_changed) = keys_diff(
        a_context.entries.keys().collect(),
        b_context
            .entries
            .iter()
            .map(|(k, e)| (k, a_context.entries.get(k) == Some(e)))
            .collect(),
    );
    let entries_removed: Vec<&String> = a_context
        .entries
        .keys()
        .filter(|k| !b_context.entries.contains_key(*k))
        .collect();
    let (cache_added, cache_changed) = keys_diff(
        a_cache.keys().collect(),
        b_cache
            .iter()
            .map(|(k, e)| (k, a_cache.get(k) == Some(e)))
            .collect(),
    );
    let mut out = json!({
        "from": from,
        "to": to,
        "artifacts": { "added": added, "changed": changed, "taken": taken, "cleared": cleared },
        "entries": { "added": entries_added, "changed": entries_changed, "removed": entries_removed },
        "dynamo_cache": { "added": cache_added, "changed": cache_changed },
        "clears": clears,
    });
    if !within.is_default() {
        out["context"] = json!(within.context);
        out["namespace"] = json!(within.namespace);
    }
    Ok(out)
}
