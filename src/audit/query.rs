//! Questions an auditor asks of the log alone: what happened (`log`), what happened to this
//! key (`history`), what the context looked like then (`state_at`), what changed between two
//! points (`diff`), and whether anyone altered the history (`verify`). Nothing here writes.
//!
//! Every answer is computed by walking records in order with the same checks replay makes and
//! folding them through the same `State::apply`; memory is the folded state (references to
//! content, not content), and content is read only when asked for.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde_json::{json, Map, Value};

use crate::core::event::Event;
use crate::core::model::{stitch_entry, ArtifactRef, Digest};
use crate::core::state::State;
use crate::store::error::StoreError;
use crate::store::journal::Journal;
use crate::store::record::{decode_lost_tail, decode_snapshot, Envelope, LostTail};
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
            AuditError::Backwards { .. } => "invalid_request",
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

/// The keys an event names (artifact and entry keys). `Cleared` names none: it touches the
/// keys present when it happened.
pub fn event_keys(event: &Event) -> Vec<String> {
    let mut keys: Vec<String> = Vec::new();
    let mut add = |k: &String| {
        if !keys.contains(k) {
            keys.push(k.clone());
        }
    };
    match event {
        Event::ArtifactRecorded { key, .. }
        | Event::ArtifactEdited { key, .. }
        | Event::ArtifactTaken { key }
        | Event::DynamoEntryRecorded { key, .. } => add(key),
        Event::Cleared => {}
        Event::Stitched {
            produced,
            bypassed,
            failed,
        } => {
            produced.iter().for_each(&mut add);
            for b in bypassed {
                add(&b.key);
                add(&b.missing_backend);
            }
            failed.iter().for_each(|f| add(&f.key));
        }
        Event::SavedToDynamoCache { entries } => {
            for (k, e) in entries {
                add(k);
                e.backends.keys().for_each(&mut add);
            }
        }
        Event::EntryLoaded { key, backends } => {
            add(key);
            backends.keys().for_each(&mut add);
        }
    }
    keys
}

fn content_json(r: &ArtifactRef) -> Value {
    json!({ "kind": r.kind, "digest": r.digest.to_hex(), "size": r.size })
}

/// One event as a JSON line: sequence number, time, name, keys, content digest and size,
/// edit label, stitch outcome.
pub fn log_line(e: &Envelope) -> Value {
    let mut m = Map::new();
    m.insert("seq".into(), json!(e.seq));
    m.insert("time".into(), json!(format_time(e.time_ms)));
    m.insert("origin".into(), json!(e.origin));
    m.insert("event".into(), json!(e.event.name()));
    m.insert("keys".into(), json!(event_keys(&e.event)));
    match &e.event {
        Event::ArtifactRecorded {
            kind, digest, size, ..
        } => {
            m.insert("kind".into(), json!(kind));
            m.insert("digest".into(), json!(digest.to_hex()));
            m.insert("size".into(), json!(size));
        }
        Event::ArtifactEdited {
            label,
            digest,
            size,
            ..
        } => {
            m.insert("label".into(), json!(label));
            m.insert("digest".into(), json!(digest.to_hex()));
            m.insert("size".into(), json!(size));
        }
        Event::DynamoEntryRecorded { entry, .. } => {
            m.insert("num_codes".into(), json!(entry.codes.len()));
            m.insert("backend_ids".into(), json!(entry.backend_ids()));
        }
        Event::Stitched {
            produced,
            bypassed,
            failed,
        } => {
            m.insert(
                "outcome".into(),
                json!({ "produced": produced, "bypassed": bypassed, "failed": failed }),
            );
        }
        Event::SavedToDynamoCache { entries } => {
            m.insert("saved".into(), json!(entries.keys().collect::<Vec<_>>()));
        }
        Event::EntryLoaded { backends, .. } => {
            let b: Map<String, Value> = backends
                .iter()
                .map(|(k, r)| (k.clone(), content_json(r)))
                .collect();
            m.insert("backends".into(), Value::Object(b));
        }
        Event::ArtifactTaken { .. } | Event::Cleared => {}
    }
    Value::Object(m)
}

/// Which events `log` shows. All bounds are inclusive. The same fields are the CLI's flags
/// and the batch request's keys.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Deserialize, clap::Args)]
pub struct LogFilter {
    /// Events from this sequence number.
    #[serde(default)]
    #[arg(long)]
    pub from: Option<u64>,
    /// Events up to this sequence number.
    #[serde(default)]
    #[arg(long)]
    pub to: Option<u64>,
    /// Events at or after this RFC 3339 time.
    #[serde(default)]
    #[arg(long)]
    pub since: Option<String>,
    /// Events at or before this RFC 3339 time.
    #[serde(default)]
    #[arg(long)]
    pub until: Option<String>,
    /// Events touching this artifact or entry key (a clear, if the key was there).
    #[serde(default)]
    #[arg(long)]
    pub key: Option<String>,
    /// Events of this name (e.g. ArtifactEdited).
    #[serde(default)]
    #[arg(long)]
    pub event: Option<String>,
    /// At most this many events.
    #[serde(default)]
    #[arg(long)]
    pub limit: Option<u64>,
}

/// The events matching `filter`, oldest first, each given to `out` as it is found. An empty
/// range is an empty answer; asking to start inside a compacted range is an error.
pub fn log(
    journal: &dyn Journal,
    filter: &LogFilter,
    out: &mut dyn FnMut(Value),
) -> Result<u64, AuditError> {
    let since = filter.since.as_deref().map(parse_time).transpose()?;
    let until = filter.until.as_deref().map(parse_time).transpose()?;
    let start = base(journal)?;
    if let Some(from) = filter.from {
        if from > 0 && from <= start.head.seq && filter.to.is_none_or(|to| from <= to) {
            return Err(AuditError::Compacted {
                asked: from,
                first_kept: start.head.seq,
            });
        }
    }
    let limit = filter.limit.unwrap_or(u64::MAX);
    let mut shown = 0u64;
    if limit == 0 || matches!((filter.from, filter.to), (Some(f), Some(t)) if f > t) {
        return Ok(0);
    }
    walk(journal, start, |e, _, before| {
        if filter.to.is_some_and(|to| e.seq > to) {
            return Ok(false);
        }
        let wanted = filter.from.is_none_or(|f| e.seq >= f)
            && since.is_none_or(|s| e.time_ms >= s)
            && until.is_none_or(|u| e.time_ms <= u)
            && filter.event.as_deref().is_none_or(|n| n == e.event.name())
            && filter.key.as_deref().is_none_or(|k| {
                // A clear touches a key only if the key was there to be cleared.
                if matches!(e.event, Event::Cleared) {
                    before.artifacts.contains_key(k) || before.entries.contains_key(k)
                } else {
                    event_keys(&e.event).iter().any(|x| x == k)
                }
            });
        if wanted {
            out(log_line(e));
            shown += 1;
        }
        Ok(shown < limit)
    })?;
    Ok(shown)
}

/// Every event that touched `key` (as an artifact or an entry), oldest first, with each
/// content version's size and digest, and for artifacts which stitches and saves included or
/// bypassed it.
pub fn history(
    journal: &dyn Journal,
    key: &str,
    progress: Progress,
) -> Result<Vec<Value>, AuditError> {
    let mut lines = Vec::new();
    walk(journal, base(journal)?, |e, _, before| {
        progress(e.seq);
        let mut line = Map::new();
        let mut touched = false;
        match &e.event {
            Event::ArtifactRecorded {
                key: k,
                kind,
                digest,
                size,
            } if k == key => {
                touched = true;
                line.insert(
                    "content".into(),
                    json!({ "kind": kind, "digest": digest.to_hex(), "size": size }),
                );
            }
            Event::ArtifactEdited {
                key: k,
                label,
                digest,
                size,
            } if k == key => {
                touched = true;
                line.insert("label".into(), json!(label));
                line.insert(
                    "content".into(),
                    json!({ "digest": digest.to_hex(), "size": size }),
                );
            }
            Event::ArtifactTaken { key: k } if k == key => touched = true,
            Event::Cleared => {
                touched = before.artifacts.contains_key(key) || before.entries.contains_key(key)
            }
            Event::DynamoEntryRecorded { key: k, entry } if k == key => {
                touched = true;
                line.insert("num_codes".into(), json!(entry.codes.len()));
                line.insert("backend_ids".into(), json!(entry.backend_ids()));
            }
            Event::Stitched {
                produced,
                bypassed,
                failed,
            } => {
                if produced.iter().any(|p| p == key) {
                    touched = true;
                    line.insert("stitch".into(), json!("produced"));
                }
                if let Some(f) = failed.iter().find(|f| f.key == key) {
                    touched = true;
                    line.insert("stitch".into(), json!("failed"));
                    line.insert("error".into(), json!(f.error));
                }
                let own: Vec<&crate::core::event::StitchBypass> =
                    bypassed.iter().filter(|b| b.key == key).collect();
                if !own.is_empty() {
                    touched = true;
                    line.insert("bypassed_codes".into(), json!(own));
                }
                // As an artifact: which produced entries took it in, and which were bypassed
                // for lack of it. The stitch is a pure function of the state before it.
                let mut included = Vec::new();
                for p in produced {
                    if let Some(entry) = before.entries.get(p) {
                        let (s, _) = stitch_entry(entry, |id| before.artifacts.get(id).cloned());
                        if s.backends.contains_key(key) {
                            included.push(p.clone());
                        }
                    }
                }
                let missing_in: Vec<Value> = bypassed
                    .iter()
                    .filter(|b| b.missing_backend == key)
                    .map(|b| json!({ "entry": b.key, "code_index": b.code_index }))
                    .collect();
                if !included.is_empty() || !missing_in.is_empty() {
                    touched = true;
                    line.insert("included_in".into(), json!(included));
                    line.insert("bypassed_in".into(), json!(missing_in));
                }
            }
            Event::SavedToDynamoCache { entries } => {
                if entries.contains_key(key) {
                    touched = true;
                    line.insert("saved".into(), json!(true));
                }
                let in_entries: Vec<&String> = entries
                    .iter()
                    .filter(|(_, s)| s.backends.contains_key(key))
                    .map(|(k, _)| k)
                    .collect();
                if !in_entries.is_empty() {
                    touched = true;
                    line.insert("saved_in".into(), json!(in_entries));
                }
            }
            Event::EntryLoaded { key: k, backends } => {
                if k == key {
                    touched = true;
                    line.insert("loaded".into(), json!(true));
                }
                if let Some(r) = backends.get(key) {
                    touched = true;
                    line.insert("loaded_from".into(), json!(k));
                    line.insert("content".into(), content_json(r));
                }
            }
            _ => {}
        }
        if touched {
            let mut out = Map::new();
            out.insert("seq".into(), json!(e.seq));
            out.insert("time".into(), json!(format_time(e.time_ms)));
            out.insert("origin".into(), json!(e.origin));
            out.insert("event".into(), json!(e.event.name()));
            out.extend(line);
            lines.push(Value::Object(out));
        }
        Ok(true)
    })?;
    Ok(lines)
}

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
pub fn state_json(state: &State, seq: u64) -> Value {
    let artifacts: Vec<Value> = state
        .artifacts
        .iter()
        .map(|(k, r)| json!({ "key": k, "kind": r.kind, "digest": r.digest.to_hex(), "size": r.size }))
        .collect();
    json!({
        "seq": seq,
        "state_digest": state.digest().to_hex(),
        "debug_info": state.debug_info(),
        "artifacts": artifacts,
        "dynamo_cache": state.dynamo_cache.keys().collect::<Vec<_>>(),
    })
}

/// `state --at S --key K`'s answer: one artifact's content as it was then, or null.
pub fn artifact_at_json(
    journal: &dyn Journal,
    state: &State,
    seq: u64,
    key: &str,
) -> Result<Value, AuditError> {
    let artifact = match state.artifacts.get(key) {
        None => Value::Null,
        Some(r) => {
            let content = journal.blob(&r.digest)?;
            json!({
                "key": key, "kind": r.kind, "digest": r.digest.to_hex(), "size": r.size,
                "content_b64": content.map(|c| B64.encode(c)),
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
            match &e.event {
                Event::ArtifactTaken { key } => {
                    removed_by.insert(key.clone(), "taken");
                }
                Event::Cleared => {
                    clears.push(e.seq);
                    for k in before.artifacts.keys() {
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
    let mut added = Vec::new();
    let mut changed = Vec::new();
    for (k, r) in &b.artifacts {
        match a.artifacts.get(k) {
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
    for k in a.artifacts.keys().filter(|k| !b.artifacts.contains_key(*k)) {
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
        a.entries.keys().collect(),
        b.entries
            .iter()
            .map(|(k, e)| (k, a.entries.get(k) == Some(e)))
            .collect(),
    );
    let entries_removed: Vec<&String> = a
        .entries
        .keys()
        .filter(|k| !b.entries.contains_key(*k))
        .collect();
    let (cache_added, cache_changed) = keys_diff(
        a.dynamo_cache.keys().collect(),
        b.dynamo_cache
            .iter()
            .map(|(k, e)| (k, a.dynamo_cache.get(k) == Some(e)))
            .collect(),
    );
    Ok(json!({
        "from": from,
        "to": to,
        "artifacts": { "added": added, "changed": changed, "taken": taken, "cleared": cleared },
        "entries": { "added": entries_added, "changed": entries_changed, "removed": entries_removed },
        "dynamo_cache": { "added": cache_added, "changed": cache_changed },
        "clears": clears,
    }))
}

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
    let start = match base(journal) {
        Ok(b) => b,
        Err(ReplayError::Store(e)) => return Err(e),
        Err(e) => {
            return Ok(Err(Unsound {
                seq: 0,
                what: e.to_string(),
            }))
        }
    };
    let anchored = start.head.seq;
    let snapshots: HashSet<u64> = journal.snapshot_seqs()?.into_iter().collect();
    let mut checked_blobs: HashSet<Digest> = HashSet::new();
    // The anchor's own state refers to content too.
    let mut pending: Vec<(u64, Digest)> = start
        .state
        .artifacts
        .values()
        .map(|r| r.digest)
        .chain(
            start
                .state
                .dynamo_cache
                .values()
                .flat_map(|e| e.backends.values().map(|r| r.digest)),
        )
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
            let mut after = before.clone();
            after.apply(e.event.clone());
            let snap = journal.snapshot(e.seq)?.map(|b| decode_snapshot(&b));
            let problem = match snap {
                None => None,
                Some(Err(err)) => Some(format!("snapshot at {} does not decode: {err}", e.seq)),
                Some(Ok(s)) if s.head != hash || s.seq != e.seq => Some(format!(
                    "snapshot at {} does not point at this record",
                    e.seq
                )),
                Some(Ok(s)) if s.state.digest() != after.digest() => Some(format!(
                    "snapshot at {} does not match a replay of the events it covers",
                    e.seq
                )),
                Some(Ok(_)) => None,
            };
            if let Some(what) = problem {
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
        "events": events,
        "anchored_at": if anchored == 0 { Value::Null } else { json!(anchored) },
        "snapshots_checked": snapshots_checked,
        "blobs_checked": checked_blobs.len(),
        "state_digest": state.digest().to_hex(),
        "lost_tails": lost_tails,
    })))
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

/// A journal seen as of one point: records after `cap` do not exist. A query asked in the
/// middle of a stream answers as of its place in it, even if later writes are durable by the
/// time it runs.
pub struct Capped {
    pub inner: std::sync::Arc<dyn Journal>,
    pub cap: u64,
}

impl Journal for Capped {
    fn blob(&self, digest: &Digest) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.blob(digest)
    }
    fn commit(&self, commit: &crate::store::journal::Commit) -> Result<(), StoreError> {
        self.inner.commit(commit)
    }
    fn records(&self, from: u64) -> crate::store::journal::Records<'_> {
        let cap = self.cap;
        Box::new(
            self.inner
                .records(from)
                .take_while(move |r| r.as_ref().map_or(true, |(seq, _)| *seq <= cap)),
        )
    }
    fn last_seq(&self) -> Result<Option<u64>, StoreError> {
        Ok(self.inner.last_seq()?.map(|s| s.min(self.cap)))
    }
    fn snapshot_seqs(&self) -> Result<Vec<u64>, StoreError> {
        Ok(self
            .inner
            .snapshot_seqs()?
            .into_iter()
            .filter(|s| *s <= self.cap)
            .collect())
    }
    fn snapshot(&self, seq: u64) -> Result<Option<Vec<u8>>, StoreError> {
        if seq > self.cap {
            return Ok(None);
        }
        self.inner.snapshot(seq)
    }
    fn reset(&self) -> Result<(), StoreError> {
        self.inner.reset()
    }
    fn anchor(&self) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.anchor()
    }
    fn rewrite_cache_view(&self, entries: &[(String, Vec<u8>)]) -> Result<(), StoreError> {
        self.inner.rewrite_cache_view(entries)
    }
    fn cache_view(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.inner.cache_view()
    }
    fn lost_tails(&self) -> Result<Vec<Vec<u8>>, StoreError> {
        self.inner.lost_tails()
    }
}

/// An audit question, as the batch protocol and the CLI ask it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Query {
    Log(LogFilter),
    History {
        key: String,
    },
    State {
        at: Option<u64>,
        at_time: Option<String>,
        key: Option<String>,
    },
    Diff {
        from: u64,
        to: u64,
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
            Query::History { key } => {
                out.insert("key".into(), json!(key));
                out.insert(
                    "history".into(),
                    Value::Array(history(journal, key, progress)?),
                );
            }
            Query::State { at, at_time, key } => {
                let at = match (at, at_time) {
                    (Some(s), _) => *s,
                    (None, Some(t)) => seq_at_time(journal, parse_time(t)?)?,
                    (None, None) => journal.last_seq()?.unwrap_or(base(journal)?.head.seq),
                };
                let (state, head) = state_at(journal, at, progress)?;
                let value = match key {
                    Some(k) => artifact_at_json(journal, &state, head.seq, k)?,
                    None => state_json(&state, head.seq),
                };
                out.insert("state".into(), value);
            }
            Query::Diff { from, to } => {
                out.insert("diff".into(), diff(journal, *from, *to, progress)?);
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
