//! What happened: the events as JSON lines (`log`, filtered) and every event that touched
//! one key (`history`). Apart from the other questions because these stream events one by
//! one rather than answer with one state.

use serde_json::{json, Map, Value};

use crate::core::event::Event;
use crate::core::model::stitch_entry;
use crate::store::journal::Journal;
use crate::store::record::Envelope;
use crate::store::replay::base;

use super::{content_json, format_time, parse_time, walk, AuditError, Progress, Within};

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
        | Event::DynamoEntryRecorded { key, .. }
        | Event::DynamoEntryExtended { key, .. } => add(key),
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
        Event::Scoped { event, .. } | Event::Requested { event, .. } => return event_keys(event),
        Event::CacheEntryPut { key, entry, .. } => {
            add(key);
            entry.backends.keys().for_each(&mut add);
        }
        Event::CacheEntryDeleted { key, .. } => add(key),
        Event::ContextDropped { .. } | Event::DynamoCacheCleared { .. } => {}
    }
    keys
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
    event_fields(&e.event, &mut m);
    Value::Object(m)
}

/// What an event says beyond its name and keys, into `m`.
fn event_fields(event: &Event, m: &mut Map<String, Value>) {
    match event {
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
        Event::DynamoEntryExtended { kept, entry, .. } => {
            m.insert("kept_codes".into(), json!(kept));
            m.insert("new_codes".into(), json!(entry.codes.len()));
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
        Event::Scoped {
            context,
            namespace,
            event,
        } => {
            m.insert("context".into(), json!(context));
            m.insert("namespace".into(), json!(namespace));
            event_fields(event, m);
        }
        Event::Requested {
            request_id, event, ..
        } => {
            m.insert("request_id".into(), json!(request_id));
            event_fields(event, m);
        }
        Event::ContextDropped { context } => {
            m.insert("context".into(), json!(context));
        }
        Event::CacheEntryPut {
            namespace,
            entry,
            saved_by,
            ..
        } => {
            m.insert("namespace".into(), json!(namespace));
            m.insert("context".into(), json!(saved_by));
            let b: Map<String, Value> = entry
                .backends
                .iter()
                .map(|(k, r)| (k.clone(), content_json(r)))
                .collect();
            m.insert("backends".into(), Value::Object(b));
        }
        Event::CacheEntryDeleted { namespace, .. } | Event::DynamoCacheCleared { namespace } => {
            m.insert("namespace".into(), json!(namespace));
        }
    }
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
/// range is an empty answer; asking to start (or, from the beginning, to end) inside a
/// compacted range is an error.
pub fn log(
    journal: &dyn Journal,
    filter: &LogFilter,
    out: &mut dyn FnMut(Value),
) -> Result<u64, AuditError> {
    let since = filter.since.as_deref().map(parse_time).transpose()?;
    let until = filter.until.as_deref().map(parse_time).transpose()?;
    // A misspelt name would match nothing: an empty answer, read as "no such event happened".
    if let Some(name) = filter
        .event
        .as_deref()
        .filter(|n| !crate::core::event::EVENT_NAMES.contains(n))
    {
        return Err(AuditError::UnknownEvent(name.to_string()));
    }
    let start = base(journal)?;
    if let Some(from) = filter.from {
        if from > 0 && from <= start.head.seq && filter.to.is_none_or(|to| from <= to) {
            return Err(AuditError::Compacted {
                asked: from,
                first_kept: start.head.seq,
            });
        }
    }
    // A range that ends inside the compacted events is theirs whole: not an empty answer,
    // which reads as "nothing happened then".
    if let (None, Some(to)) = (filter.from, filter.to) {
        if to > 0 && to <= start.head.seq {
            return Err(AuditError::Compacted {
                asked: to,
                first_kept: start.head.seq,
            });
        }
    }
    let limit = filter.limit.unwrap_or(u64::MAX);
    let mut shown = 0u64;
    if limit == 0 || matches!((filter.from, filter.to), (Some(f), Some(t)) if f > t) {
        return Ok(0);
    }
    walk(journal, start, |e, hash, before| {
        if filter.to.is_some_and(|to| e.seq > to) {
            return Ok(false);
        }
        let wanted = filter.from.is_none_or(|f| e.seq >= f)
            && since.is_none_or(|s| e.time_ms >= s)
            && until.is_none_or(|u| e.time_ms <= u)
            && filter.event.as_deref().is_none_or(|n| n == e.event.name())
            && filter.key.as_deref().is_none_or(|k| {
                // A clear touches a key only if the key was there to be cleared, in the
                // context it cleared.
                if let (context, _, Event::Cleared) = e.event.scoped_change() {
                    let there = before.context(context);
                    there.artifacts.contains_key(k) || there.entries.contains_key(k)
                } else {
                    event_keys(&e.event).iter().any(|x| x == k)
                }
            });
        if wanted {
            let mut line = log_line(e);
            // The record's place in the chain: what an auditor compares with a hash kept
            // elsewhere (docs/auditing.md, what the hash chain proves).
            line["hash"] = json!(hash.to_hex());
            out(line);
            shown += 1;
        }
        Ok(shown < limit)
    })?;
    Ok(shown)
}

/// Every event that touched `key` (as an artifact or an entry) in the context `within`
/// names, oldest first, with each content version's size and digest, and for artifacts
/// which stitches and saves included or bypassed it.
pub fn history(
    journal: &dyn Journal,
    key: &str,
    within: &Within,
    progress: Progress,
) -> Result<Vec<Value>, AuditError> {
    let mut lines = Vec::new();
    walk(journal, base(journal)?, |e, _, state| {
        progress(e.seq);
        let (context, _, change) = e.event.scoped_change();
        let mine = match change {
            // Stored unscoped, naming the context it drops.
            Event::ContextDropped { context } => *context == within.context,
            _ => context == within.context,
        };
        if !mine {
            return Ok(true);
        }
        // The context as it was before this event.
        let before = state.context(&within.context);
        let mut line = Map::new();
        let mut touched = false;
        match change {
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
            // Dropping a context empties it, as a clear does.
            Event::Cleared | Event::ContextDropped { .. } => {
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
