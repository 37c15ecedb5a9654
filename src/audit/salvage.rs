//! `pcx salvage --output FILE`: for a data directory that does not open (or does not replay),
//! every event that still reads and verifies, written as `pcx export` writes (so `pcx import`
//! takes it into a new data directory), and exactly where the log breaks.
//!
//! The directory is read without the normal open and changed in no way ([`crate::store::raw`]).
//! From the start of the log (the compaction anchor, or before event 1) each next event is
//! taken from the copies found of it: the first that passes replay's own checks (its hash,
//! its sequence number, the chain) and whose contents read and match their digests. The
//! first event that has none is where the log breaks: the export ends before it, and the
//! report says which event, what is wrong with it and where it was (or was not) found, and
//! how many records after it still read (they cannot be proven: the chain to them is
//! broken). Events after the break are not exported, because an import must verify.

use std::collections::HashSet;
use std::io::Write;
use std::path::Path;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde_json::{json, Value};

use crate::audit::export::{ExportError, EXPORT_VERSION};
use crate::core::model::Digest;
use crate::core::state::State;
use crate::store::raw::{read, Candidate, Found, FoundAt};
use crate::store::record::{decode_event, decode_snapshot, Snapshot, GENESIS, SCHEMA_VERSION};
use crate::store::replay::decode_anchor;
use crate::store::replay::{checked, Head};

/// Where and why the log breaks.
struct Break {
    seq: u64,
    what: String,
    found_at: Option<String>,
    file: Option<String>,
}

/// Writes every event of `dir` that still reads and verifies to `out` in the export format.
/// Gives the report (`"ok"` is true when the whole log was written and nothing proves that it
/// was longer). `scan`: also scan sled's raw files when sled reads its trees whole.
pub fn salvage(dir: &Path, scan: bool, out: &mut dyn Write) -> Result<Value, ExportError> {
    let found = read(dir);
    // Copies found only by scanning are used when sled's trees cannot be read whole, or
    // when asked: otherwise a copy sled had let go (a failed commit's) is not trusted over
    // sled's view, only reported.
    let use_scan = scan || !found.sled_opened || !found.sled_whole;
    let copies_of = |seq: u64| -> Vec<&Candidate> {
        let scanned = found.scanned.get(&seq).filter(|_| use_scan);
        found
            .records
            .get(&seq)
            .into_iter()
            .chain(scanned)
            .flatten()
            .collect()
    };
    let db = dir.join("db").display().to_string();
    let mut broken: Option<Break> = None;
    let (anchor, start) = match start_of(&found, &copies_of) {
        Ok(s) => s,
        Err(what) => {
            broken = Some(Break {
                seq: 0,
                what,
                found_at: Some("sled tree `meta`, key `anchor`".into()),
                file: Some(db.clone()),
            });
            (None, None)
        }
    };
    let (mut state, mut head) = match &start {
        Some(s) => (
            s.state.clone(),
            Head {
                seq: s.seq,
                hash: s.head,
            },
        ),
        None => (State::default(), Head::EMPTY),
    };
    let anchored = head.seq;
    write_line(
        out,
        &json!({
            "pcx_export": EXPORT_VERSION, "schema": SCHEMA_VERSION, "content": "inline",
            "anchor_b64": anchor.as_ref().map(|a| B64.encode(a)),
        }),
    )?;
    let mut sent: HashSet<Digest> = HashSet::new();
    let mut send = |out: &mut dyn Write, d: Digest| -> Result<Result<(), String>, ExportError> {
        if sent.contains(&d) {
            return Ok(Ok(()));
        }
        match found.content(&d) {
            Ok(content) => {
                write_line(
                    out,
                    &json!({ "blob": d.to_hex(), "content_b64": B64.encode(content) }),
                )?;
                sent.insert(d);
                Ok(Ok(()))
            }
            Err(why) => Ok(Err(why)),
        }
    };
    for d in state.content_refs() {
        if broken.is_some() {
            break;
        }
        if let Err(why) = send(out, d)? {
            broken = Some(Break {
                seq: anchored,
                what: format!(
                    "the anchor's state refers to content {d}, which cannot be read: {why}"
                ),
                found_at: None,
                file: None,
            });
        }
    }
    let mut events = 0u64;
    let mut scanned_events = 0u64;
    while broken.is_none() {
        let seq = head.seq + 1;
        let copies = copies_of(seq);
        if copies.is_empty() {
            // Past the last record found the log ends, unless records after it were found,
            // or nothing was found in files sled does not open.
            let later = found.records.range(seq..).next().is_some()
                || (use_scan && found.scanned.range(seq..).next().is_some());
            if later || (!found.sled_opened && seq == 1) {
                broken = Some(Break {
                    seq,
                    what: format!("event {seq} is missing"),
                    found_at: Some(missing_where(&found, use_scan)),
                    file: Some(db.clone()),
                });
            }
            break;
        }
        let mut problem: Option<Break> = None;
        let mut next = None;
        'copies: for copy in copies.iter().copied() {
            let (envelope, hash) = match checked(&head, seq, &copy.bytes) {
                Ok(x) => x,
                Err(e) => {
                    problem.get_or_insert_with(|| at(seq, e.to_string(), &copy.place, &db));
                    continue;
                }
            };
            for d in envelope.event.content_refs() {
                if let Err(why) = send(out, d)? {
                    problem.get_or_insert_with(|| {
                        at(
                            seq,
                            format!(
                                "event {seq} refers to content {d}, which cannot be read: {why}"
                            ),
                            &copy.place,
                            &db,
                        )
                    });
                    continue 'copies;
                }
            }
            next = Some((envelope, hash, copy));
            break;
        }
        let Some((envelope, hash, copy)) = next else {
            broken = problem;
            break;
        };
        write_line(
            out,
            &json!({ "seq": seq, "event": envelope.event.name(), "record_b64": B64.encode(&copy.bytes) }),
        )?;
        if matches!(copy.place, FoundAt::Scanned { .. }) {
            scanned_events += 1;
        }
        state.apply(envelope.event);
        head = Head { seq, hash };
        events += 1;
    }
    write_line(
        out,
        &json!({ "end": true, "events": events, "last_seq": head.seq, "state_digest": state.digest().to_hex() }),
    )?;
    out.flush().map_err(ExportError::Write)?;

    // Without the scan's copies, a scanned copy that continues where the export ends means
    // sled's trees lack records its files hold (a log sled cut at damage, say).
    let continued_by_scan = !use_scan
        && found.scanned.get(&(head.seq + 1)).is_some_and(|c| {
            c.iter()
                .any(|c| checked(&head, head.seq + 1, &c.bytes).is_ok())
        });
    let readable_after = |from: u64| -> Vec<u64> {
        let mut seqs: Vec<u64> = found
            .records
            .range(from..)
            .chain(found.scanned.range(from..))
            .filter(|(_, copies)| copies.iter().any(|c| decode_event(&c.bytes).is_ok()))
            .map(|(s, _)| *s)
            .collect();
        seqs.sort_unstable();
        seqs.dedup();
        seqs
    };
    let beyond = continued_by_scan.then(|| {
        let seqs = readable_after(head.seq + 1);
        json!({
            "records": seqs.len(),
            "first_seq": seqs.first(),
            "last_seq": seqs.last(),
            "note": "sled's files hold records that continue the chain past the last event in sled's trees (sled may have cut its log where its data is damaged); `pcx salvage --scan` exports them",
        })
    });
    if let Some(b) = broken
        .as_mut()
        .filter(|b| b.seq == head.seq + 1 && continued_by_scan)
    {
        b.what.push_str("; a copy found by scanning sled's files continues the chain (`pcx salvage --scan` exports from it)");
    }
    let after_break = broken.as_ref().and_then(|b| {
        let readable = readable_after(b.seq + 1);
        (!readable.is_empty()).then(|| {
            json!({
                "records": readable.len(),
                "first_seq": readable.first(),
                "last_seq": readable.last(),
                "note": "these records still read, but the chain to them is broken, so they cannot be verified and are not exported",
            })
        })
    });
    // A snapshot in sled's tree beyond the last event written proves the log was longer.
    let snapshot_beyond = found
        .snapshots
        .iter()
        .filter_map(|b| decode_snapshot(b).ok())
        .map(|s| s.seq)
        .filter(|s| *s > head.seq)
        .max();
    let lost_tail = match (&broken, snapshot_beyond) {
        (None, Some(snapshot)) => json!({
            "snapshot": snapshot,
            "last_found": head.seq,
            "note": format!("snapshot {snapshot} proves the log reached event {snapshot}: events {} to {snapshot} are lost", head.seq + 1),
        }),
        _ => Value::Null,
    };
    let read_by = match (found.sled_opened, use_scan) {
        (true, false) => "sled",
        (true, true) => "sled, and a scan of its files",
        (false, _) => "a scan of sled's files (sled does not open them)",
    };
    Ok(json!({
        "ok": broken.is_none() && lost_tail.is_null() && beyond.is_none(),
        "events": events,
        "first_seq": if events == 0 { Value::Null } else { json!(anchored + 1) },
        "last_seq": head.seq,
        "anchored_at": if anchored == 0 { Value::Null } else { json!(anchored) },
        "state_digest": state.digest().to_hex(),
        "read_by": read_by,
        "events_found_by_scanning": scanned_events,
        "break": broken.map(|b| json!({"seq": b.seq, "what": b.what, "found_at": b.found_at, "file": b.file})),
        "after_break": after_break,
        "beyond_sled_log": beyond,
        "lost_tail": lost_tail,
        "faults": found.faults,
    }))
}

fn at(seq: u64, what: String, place: &FoundAt, db: &str) -> Break {
    let file = match place {
        FoundAt::Scanned { file, .. } => file.display().to_string(),
        _ => db.to_string(),
    };
    Break {
        seq,
        what,
        found_at: Some(place.to_string()),
        file: Some(file),
    }
}

fn missing_where(found: &Found, use_scan: bool) -> String {
    match (found.sled_opened, use_scan) {
        (true, false) => "in no page of sled tree `pages` (nor in tree `events`)".into(),
        (true, true) => "in no page of sled's trees, nor anywhere in sled's files (scanned)".into(),
        (false, _) => "nowhere in sled's files (scanned: sled does not open them)".into(),
    }
}

/// The start of the log: the compaction anchor (sled's, or a snapshot found by scanning that
/// the first record found continues), or before event 1.
fn start_of<'a>(
    found: &'a Found,
    copies_of: &dyn Fn(u64) -> Vec<&'a Candidate>,
) -> Result<(Option<Vec<u8>>, Option<Snapshot>), String> {
    if let Some(bytes) = &found.anchor {
        let snap = decode_anchor(bytes).map_err(|e| e.to_string())?;
        return Ok((Some(bytes.clone()), Some(snap)));
    }
    let begins_at_one = copies_of(1)
        .iter()
        .any(|c| decode_event(&c.bytes).is_ok_and(|(e, _)| e.prev == GENESIS));
    if found.sled_opened || begins_at_one {
        return Ok((None, None));
    }
    // sled did not open, so its anchor could only be found by scanning: a snapshot that a
    // record found continues.
    for bytes in &found.scanned_snapshots {
        let Ok(snap) = decode_snapshot(bytes) else {
            continue;
        };
        let continued = copies_of(snap.seq + 1)
            .iter()
            .any(|c| decode_event(&c.bytes).is_ok_and(|(e, _)| e.prev == snap.head));
        if continued {
            return Ok((Some(bytes.clone()), Some(snap)));
        }
    }
    Ok((None, None))
}

fn write_line(out: &mut dyn Write, v: &Value) -> Result<(), ExportError> {
    serde_json::to_writer(&mut *out, v).map_err(|e| ExportError::Write(e.into()))?;
    out.write_all(b"\n").map_err(ExportError::Write)
}
