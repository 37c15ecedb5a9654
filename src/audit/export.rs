//! `pcx export` / `pcx import`: the log as JSON lines, and back into an empty data directory
//! (or an empty journal in PostgreSQL).
//!
//! An import is written into a side directory (`DIR.importing`) and swapped in whole at the
//! end, under the data directory's lock (as compaction is, see [`crate::store::swap`]): a killed
//! import leaves the directory as it found it (empty), never a part of the log that
//! `verify` would call sound. Into PostgreSQL the same, with a side journal taken over in one
//! transaction ([`import_postgres`]).
//!
//! Records travel as their exact bytes (base64), so the imported log has the same hash chain
//! and verifies; each line also names its event for people reading the file. Format:
//!
//! ```text
//! {"pcx_export":1,"schema":1,"content":"inline"|"digest","anchor_b64":B|null}
//! {"blob":HEX,"content_b64":B}            (inline only; before the first record using it)
//! {"seq":N,"event":NAME,"record_b64":B}
//! …
//! {"end":true,"events":N,"last_seq":N,"state_digest":HEX}
//! ```

use std::collections::HashSet;
use std::io::{BufRead, Write};
use std::path::Path;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde_json::{json, Value};

use crate::audit::query::{walk, AuditError, Progress};
use crate::core::model::Digest;
use crate::core::state::State;
use crate::store::error::{OpenError, StoreError};
use crate::store::journal::{Commit, Journal};
use crate::store::record::{decode_event, encode_snapshot_of, SCHEMA_VERSION};
use crate::store::replay::{base, decode_anchor, Head};
use crate::store::sled_journal::SledJournal;

/// The export format's version.
pub const EXPORT_VERSION: u64 = 1;

/// How content travels in an export.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ContentMode {
    /// Each blob once, as base64, before the first record that refers to it.
    #[default]
    Inline,
    /// Only digests (in the records): an audit trail without content; cannot be imported.
    Digest,
}

/// Why an export or import failed.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Audit(#[from] AuditError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Open(#[from] OpenError),
    #[error("writing the export: {0}")]
    Write(#[source] std::io::Error),
    #[error("reading the import: {0}")]
    Read(#[source] std::io::Error),
    #[error("import line {line}: {message}")]
    Bad { line: u64, message: String },
    #[error(
        "cannot import into {dir}: it already holds a log (import needs an empty data directory)"
    )]
    NotEmpty { dir: String },
    #[error(
        "cannot import into journal {journal}: it already holds a log (import needs an empty or new journal)"
    )]
    NotEmptyJournal { journal: String },
    #[error(
        "cannot import into {dir}: it holds files but no pcx data directory, and an import \
         replaces the directory whole (import into a new or empty directory)"
    )]
    Foreign { dir: String },
    #[error(transparent)]
    Output(#[from] crate::audit::output::OutputError),
}

fn write_line(out: &mut dyn Write, v: &Value) -> Result<(), ExportError> {
    serde_json::to_writer(&mut *out, v).map_err(|e| ExportError::Write(e.into()))?;
    out.write_all(b"\n").map_err(ExportError::Write)
}

/// Writes the whole log, as [`export`] does, to the file `output`: beside it first, renamed onto
/// it once complete and synced, and never inside `data_dir` (the journal's data directory)
/// ([`crate::audit::output`]). The protocol's `export` op, a backup of a live context that its
/// server writes. Gives `{"output", "events", "last_seq", "bytes"}`.
pub fn export_to(
    journal: &dyn Journal,
    mode: ContentMode,
    data_dir: Option<&std::path::Path>,
    output: &std::path::Path,
    progress: Progress,
) -> Result<Value, ExportError> {
    let (written, mut file) = crate::audit::output::Output::create(data_dir, output)?;
    let events = export(journal, mode, &mut file, progress)?;
    written.finish(file)?;
    let bytes = std::fs::metadata(output).map(|m| m.len()).unwrap_or(0);
    Ok(json!({
        "output": output.display().to_string(),
        "events": events,
        "last_seq": journal.last_seq()?,
        "bytes": bytes,
    }))
}

/// Writes the whole log to `out`. Returns how many events were written.
pub fn export(
    journal: &dyn Journal,
    mode: ContentMode,
    out: &mut dyn Write,
    progress: Progress,
) -> Result<u64, ExportError> {
    let start = base(journal).map_err(AuditError::from)?;
    let anchor = journal.anchor()?;
    write_line(
        out,
        &json!({
            "pcx_export": EXPORT_VERSION, "schema": SCHEMA_VERSION,
            "content": match mode { ContentMode::Inline => "inline", ContentMode::Digest => "digest" },
            "anchor_b64": anchor.map(|a| B64.encode(a)),
        }),
    )?;
    let mut sent: HashSet<Digest> = HashSet::new();
    // Content that is missing or not what its records say is damage: an export without it
    // is a backup that no import takes, found out only when it is needed.
    let mut send_blob = |out: &mut dyn Write, seq: u64, d: Digest| -> Result<(), ExportError> {
        if mode == ContentMode::Digest || !sent.insert(d) {
            return Ok(());
        }
        let damaged = |what: &str| {
            ExportError::Store(StoreError::Damaged {
                what: format!(
                    "content {d} that event {seq} refers to {what}: the log is damaged \
                     (`pcx verify` reports it; `pcx salvage` exports what still verifies, \
                     `--content digest` the log without content)"
                ),
            })
        };
        let content = match journal.blob(&d)? {
            None => return Err(damaged("is missing from the content store")),
            Some(c) if Digest::of(&c) != d => return Err(damaged("does not match its digest")),
            Some(c) => c,
        };
        write_line(
            out,
            &json!({ "blob": d.to_hex(), "content_b64": B64.encode(content) }),
        )
    };
    for d in start.state.content_refs() {
        send_blob(out, start.head.seq, d)?;
    }
    let mut events = 0u64;
    let mut failure: Option<ExportError> = None;
    let (state, head) = walk(journal, start, |e, _, _| {
        progress(e.seq);
        let result = (|| {
            for d in e.event.content_refs() {
                send_blob(out, e.seq, d)?;
            }
            let bytes = journal
                .records(e.seq)
                .next()
                .transpose()?
                .map(|(_, b)| b)
                .unwrap_or_default();
            write_line(
                out,
                &json!({ "seq": e.seq, "event": e.event.name(), "record_b64": B64.encode(bytes) }),
            )
        })();
        match result {
            Ok(()) => {
                events += 1;
                Ok(true)
            }
            Err(err) => {
                failure = Some(err);
                Ok(false)
            }
        }
    })?;
    if let Some(err) = failure {
        return Err(err);
    }
    write_line(
        out,
        &json!({ "end": true, "events": events, "last_seq": head.seq, "state_digest": state.digest().to_hex() }),
    )?;
    out.flush().map_err(ExportError::Write)?;
    Ok(events)
}

/// What an import did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Imported {
    pub events: u64,
    pub last_seq: u64,
    pub state_digest: Digest,
}

const CHUNK: usize = 1024;

/// Reads an export into the data directory `dir`, which must hold no log (it is created if
/// missing). Every record is checked as replay would (hash, sequence, chain), every blob
/// against its digest, and the final state against the export's digest; a snapshot of the
/// final state is written. The log goes into `DIR.importing` and is swapped in once all of it
/// is in, all under the directory's lock: a refused, failed or killed import leaves `dir`
/// holding no log.
pub fn import(
    dir: &Path,
    cache_capacity: u64,
    input: &mut dyn BufRead,
    progress: Progress,
) -> Result<Imported, ExportError> {
    use crate::store::swap::{
        repair, resolve, sibling, swap_in, DirLock, IMPORTING, LOCK_PATIENCE,
    };
    let dir = &resolve(dir);
    let lock = DirLock::acquire(dir, LOCK_PATIENCE, true).map_err(OpenError::from)?;
    repair(dir, &lock).map_err(OpenError::from)?;
    // The swap replaces `dir` whole: never a directory of someone else's files.
    let foreign = std::fs::read_dir(dir)
        .map(|mut entries| entries.next().is_some() && !dir.join("db").exists())
        .unwrap_or(false);
    if foreign {
        return Err(ExportError::Foreign {
            dir: dir.display().to_string(),
        });
    }
    {
        let target = SledJournal::open_held(dir, cache_capacity)?;
        if target.last_seq()?.is_some() || target.anchor()?.is_some() {
            return Err(ExportError::NotEmpty {
                dir: dir.display().to_string(),
            });
        }
    }
    let side = sibling(dir, IMPORTING);
    let imported = SledJournal::open_held(&side, cache_capacity)
        .map_err(ExportError::from)
        .and_then(|journal| import_into(&journal, &|a| journal.set_anchor(a), input, progress));
    let imported = match imported {
        Ok(i) => i,
        Err(e) => {
            // Nothing was swapped in: `dir` holds no log, as before.
            match std::fs::remove_dir_all(&side) {
                Err(r) if r.kind() != std::io::ErrorKind::NotFound => {
                    tracing::warn!(error = %r, dir = %side.display(), "could not remove");
                }
                _ => {}
            }
            return Err(e);
        }
    };
    swap_in(dir, &side, &lock).map_err(OpenError::from)?;
    Ok(imported)
}

/// `pcx import` into a journal in PostgreSQL, which must hold no log (it is made if missing).
/// The same checks as [`import`]; the promise too: a refused, failed or killed import leaves
/// the journal holding no log. Its writer takes the journal's lease first (so nothing else
/// writes it meanwhile); the log is written into a side journal (`NAME.importing`, emptied
/// first: a killed import may have left one) and taken over **in one transaction**
/// ([`PgJournal::adopt_log_of`](crate::store::pg_journal::PgJournal::adopt_log_of)), so the
/// journal is either empty or holds the whole log. The imported entries of the dynamo cache
/// are the journal's own, as they were in the exported log; they are not saved into the
/// cluster's shared cache (an import restores a log, it saves nothing anew).
#[cfg(feature = "postgres")]
pub fn import_postgres(
    settings: &crate::store::pg_journal::PgSettings,
    input: &mut dyn BufRead,
    progress: Progress,
) -> Result<Imported, ExportError> {
    use crate::store::pg_journal::{PgJournal, PgSettings};
    let target = PgJournal::open(settings.clone())?;
    let not_empty = || ExportError::NotEmptyJournal {
        journal: settings.journal.clone(),
    };
    if target.last_seq()?.is_some() || target.anchor()?.is_some() {
        return Err(not_empty());
    }
    let side = PgJournal::open(PgSettings {
        journal: format!("{}{IMPORTING_JOURNAL}", settings.journal),
        ..settings.clone()
    })?;
    side.wipe(false)?;
    let imported = match import_into(&side, &|a| side.set_anchor(a), input, progress) {
        Ok(i) => i,
        Err(e) => {
            // Nothing was taken over: the journal holds no log, as before.
            if let Err(w) = side.wipe(true) {
                tracing::warn!(error = %w, journal = side.name(), "could not remove the side journal of a failed import");
            }
            return Err(e);
        }
    };
    let side_name = side.name().to_string();
    // Its writer goes first (a clean release), so that nothing of it writes the side journal
    // while its log changes hands.
    drop(side);
    crate::store::swap::pause_point("import:taking-over");
    match target.adopt_log_of(&side_name)? {
        Ok(_) => Ok(imported),
        Err(why) => {
            tracing::warn!(journal = %settings.journal, %why, "the import was not taken over");
            Err(not_empty())
        }
    }
}

/// The suffix of the side journal an import into a journal in PostgreSQL writes.
pub const IMPORTING_JOURNAL: &str = ".importing";

/// Reads an export into `journal` (empty): every record checked as replay would, every
/// content against its digest, the final state against the export's digest; `set_anchor`
/// stores a compacted export's anchor.
fn import_into(
    journal: &dyn Journal,
    set_anchor: &dyn Fn(&[u8]) -> Result<(), StoreError>,
    input: &mut dyn BufRead,
    progress: Progress,
) -> Result<Imported, ExportError> {
    let mut line_no = 0u64;
    let mut next = |input: &mut dyn BufRead| -> Result<Option<Value>, ExportError> {
        let mut text = String::new();
        loop {
            text.clear();
            if input.read_line(&mut text).map_err(ExportError::Read)? == 0 {
                return Ok(None);
            }
            line_no += 1;
            if !text.trim().is_empty() {
                break;
            }
        }
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| ExportError::Bad {
                line: line_no,
                message: format!("not JSON: {e}"),
            })
    };
    let bad = |line: u64, message: String| ExportError::Bad { line, message };
    let header = next(input)?.ok_or_else(|| bad(0, "the input is empty".into()))?;
    if header["content"] == json!("digest") {
        return Err(bad(
            1,
            "this export carries only digests (--content digest): it cannot be imported".into(),
        ));
    }
    if header["pcx_export"] != json!(EXPORT_VERSION) {
        return Err(bad(
            1,
            format!("not a pcx export of version {EXPORT_VERSION}: {header}"),
        ));
    }
    let mut state = State::default();
    let mut head = Head::EMPTY;
    let mut anchor_refs = Vec::new();
    if let Some(a) = header["anchor_b64"].as_str() {
        let bytes = B64
            .decode(a)
            .map_err(|e| bad(1, format!("anchor_b64: {e}")))?;
        let snap = decode_anchor(&bytes).map_err(|e| bad(1, format!("anchor: {e}")))?;
        set_anchor(&bytes)?;
        anchor_refs = snap.state.content_refs();
        state = snap.state;
        head = Head {
            seq: snap.seq,
            hash: snap.head,
        };
    }
    let anchored = head.seq;
    let mut have: HashSet<Digest> = HashSet::new();
    let mut pending = Commit::default();
    let mut pending_bytes = 0usize;
    let mut line = 1u64;
    let trailer = loop {
        let Some(v) = next(input)? else {
            return Err(bad(
                line,
                "the export ends without its closing line (truncated?)".into(),
            ));
        };
        line += 1;
        if let Some(hex) = v["blob"].as_str() {
            let content = B64
                .decode(v["content_b64"].as_str().unwrap_or_default())
                .map_err(|e| bad(line, format!("content_b64: {e}")))?;
            let d = Digest::of(&content);
            if d.to_hex() != hex {
                return Err(bad(line, format!("blob {hex} does not match its content")));
            }
            // Content goes with the records' commits (a few sled keys or one file append
            // per commit, not one per content).
            pending_bytes += content.len();
            pending.blobs.push((d, std::sync::Arc::new(content)));
            have.insert(d);
            if pending_bytes >= crate::store::pack::MAX_GROUP_BYTES {
                journal.commit(&std::mem::take(&mut pending))?;
                pending_bytes = 0;
            }
        } else if let Some(seq) = v["seq"].as_u64() {
            let bytes = B64
                .decode(v["record_b64"].as_str().unwrap_or_default())
                .map_err(|e| bad(line, format!("record_b64: {e}")))?;
            let (env, hash) =
                decode_event(&bytes).map_err(|e| bad(line, format!("event {seq}: {e}")))?;
            if env.seq != seq || seq != head.seq + 1 {
                return Err(bad(
                    line,
                    format!("event {seq} is out of order (expected {})", head.seq + 1),
                ));
            }
            if env.prev != head.hash {
                return Err(bad(
                    line,
                    format!("event {seq} does not follow the one before it (hash chain broken)"),
                ));
            }
            for d in env.event.content_refs() {
                if !have.contains(&d) && journal.blob(&d)?.is_none() {
                    return Err(bad(line, format!(
                        "event {seq} refers to content {d} that the export does not carry (exported with --content digest?)"
                    )));
                }
            }
            state.apply(env.event.clone());
            head = Head { seq, hash };
            progress(seq);
            pending.records.push((seq, bytes));
            if pending.records.len() >= CHUNK {
                journal.commit(&std::mem::take(&mut pending))?;
                pending_bytes = 0;
                if head.seq - anchored == CHUNK as u64 {
                    crate::store::swap::pause_point("import:writing");
                }
            }
        } else if v["end"] == json!(true) {
            break v;
        } else {
            return Err(bad(line, format!("unknown line: {v}")));
        }
    };
    // The closing line closes the export: a line after it (a second export concatenated, a
    // hand edit) would otherwise be dropped without a word, its changes never imported.
    if let Some(after) = next(input)? {
        let what = if after.get("pcx_export").is_some() {
            "the header of another export (exports concatenated?): import each into a data \
             directory of its own"
                .to_string()
        } else {
            format!("{after}")
        };
        return Err(bad(
            line + 1,
            format!("the export goes on after its closing line (line {line}): {what}"),
        ));
    }
    for d in anchor_refs.into_iter().chain(state.content_refs()) {
        if !have.contains(&d) && journal.blob(&d)?.is_none() {
            return Err(bad(
                line,
                format!("the export does not carry content {d} that the state refers to"),
            ));
        }
    }
    // The closing line counts the records: records cut out before it (a bad copy, a hand
    // edit) that left the state as it was would otherwise pass the digest below.
    let events = head.seq - anchored;
    if trailer["events"].as_u64() != Some(events) || trailer["last_seq"].as_u64() != Some(head.seq)
    {
        return Err(bad(
            line,
            format!(
                "the export holds {events} events (the last is event {}), but its closing line \
                 says {} events, the last event {}: records are missing (a cut or damaged copy?)",
                head.seq, trailer["events"], trailer["last_seq"]
            ),
        ));
    }
    if trailer["state_digest"].as_str() != Some(&state.digest().to_hex()) {
        return Err(bad(
            line,
            "the imported log does not replay to the export's state digest".into(),
        ));
    }
    if head.seq > anchored {
        pending.snapshot = Some((
            head.seq,
            encode_snapshot_of(head.seq, head.hash, &state, 0)
                .map_err(|e| bad(line, e.to_string()))?,
        ));
    }
    journal.commit(&pending)?;
    let view: Vec<(String, Vec<u8>)> = state
        .dynamo_cache
        .iter()
        .map(|(k, e)| crate::store::record::encode_saved_entry(e).map(|b| (k.clone(), b)))
        .collect::<Result<_, _>>()
        .map_err(|e| bad(line, e.to_string()))?;
    journal.rewrite_cache_view(&view)?;
    Ok(Imported {
        events: head.seq - anchored,
        last_seq: head.seq,
        state_digest: state.digest(),
    })
}
