//! The shared dynamo cache's rows bound to their saver's record (schema version 2).
//!
//! A row of `pcx_dynamo_cache` names its saver (`journal/context`) and, since version 2, the
//! place and hash of the record in that journal's log whose event saved it (`saver_seq`,
//! `saver_hash`). A loader in another journal takes a row up only when that record is there,
//! its own hash holds and equals the row's, and deriving the row again from its event (the
//! same [`SharedCacheOp::of_event`] the saver wrote it with) gives exactly the row: its
//! entry's bytes, key, namespace and saver. A row altered in the database (its entry
//! re-framed with a recomputed hash, its `saved_by` changed, its binding pointed elsewhere)
//! no longer matches and is refused; forging one that matches takes forging the saver's log,
//! whose hash chain `pcx verify` checks. A saver's log compacted past the record is checked
//! against the compaction anchor's state instead (the entry, and the context that saved it).

use std::collections::HashMap;

use postgres::Transaction;

use crate::core::model::Digest;
use crate::core::scope::DEFAULT;
use crate::store::journal::SharedCacheOp;
use crate::store::record::{decode_event, decode_snapshot, encode_saved_entry};

/// A sequence number as the database holds it (as `db::i64_of`: this module is below `db`,
/// whose schema upgrade calls it, so it does not import from there).
fn i64_of(seq: u64) -> i64 {
    i64::try_from(seq).unwrap_or(i64::MAX)
}

/// A sequence number from the database (as `db::u64_of`).
fn u64_of(seq: i64) -> u64 {
    u64::try_from(seq).unwrap_or(0)
}

/// What the database holds to check a row against.
pub(super) enum Proof {
    /// The saver's record at the row's `saver_seq`.
    Record(Vec<u8>),
    /// A record there, but past the saver journal's head: not part of its log (a row bound
    /// to a record slipped in past the end, where no replay or `verify` of it looks, proves
    /// nothing).
    PastHead(u64),
    /// No record there, but the saver's compaction anchor (its log was compacted past it).
    Anchor(Vec<u8>),
    /// Neither.
    Missing,
}

/// A row of `pcx_dynamo_cache` as a loader reads it.
pub(super) struct Row<'a> {
    pub(super) namespace: &'a str,
    pub(super) key: &'a str,
    pub(super) entry: &'a [u8],
    pub(super) saved_by: &'a str,
    /// `None` for a row written before version 2 that the upgrade could not bind.
    pub(super) binding: Option<(u64, Digest)>,
}

/// The journal a row's `saved_by` (`journal/context`) names; a context name has no `/`.
pub(super) fn saver_journal(saved_by: &str) -> Option<&str> {
    saved_by.rsplit_once('/').map(|(journal, _)| journal)
}

/// Whether `row` is what its saver's record (or anchor) says was saved; why not, in words.
pub(super) fn check(row: &Row<'_>, proof: &Proof) -> Result<(), String> {
    let Some(journal) = saver_journal(row.saved_by) else {
        return Err(format!("its saved_by {:?} names no journal", row.saved_by));
    };
    let Some((seq, hash)) = row.binding else {
        return Err(
            "it is bound to no record of its saver (written before schema version 2, or by an \
             older pcx, and not found in its saver's log when the schema was upgraded)"
                .into(),
        );
    };
    match proof {
        Proof::Record(bytes) => {
            let (envelope, stored) = decode_event(bytes)
                .map_err(|e| format!("its saver's record {journal}#{seq} is damaged: {e}"))?;
            if stored != hash || envelope.seq != seq {
                return Err(format!(
                    "it names record {journal}#{seq} with hash {}, but that record's hash is {}",
                    hash.to_hex(),
                    stored.to_hex()
                ));
            }
            let ops =
                SharedCacheOp::of_event(&envelope.event, journal, DEFAULT, DEFAULT, (seq, hash))
                    .map_err(|e| e.to_string())?;
            let wanted = SharedCacheOp::Put {
                namespace: row.namespace.to_string(),
                key: row.key.to_string(),
                entry: row.entry.to_vec(),
                saved_by: row.saved_by.to_string(),
                saver_seq: seq,
                saver_hash: hash,
            };
            if ops.contains(&wanted) {
                Ok(())
            } else {
                Err(format!(
                    "its saver's record {journal}#{seq} did not save this entry as {} (the row \
                     differs from what that record saved)",
                    row.saved_by
                ))
            }
        }
        Proof::Anchor(bytes) => {
            let snapshot = decode_snapshot(bytes)
                .map_err(|e| format!("its saver's compaction anchor is damaged: {e}"))?;
            if snapshot.seq < seq {
                return Err(format!(
                    "its saver's record {journal}#{seq} is not in the database (the journal's \
                     anchor is at #{})",
                    snapshot.seq
                ));
            }
            let context = row
                .saved_by
                .rsplit_once('/')
                .map_or("", |(_, context)| context);
            let held = snapshot
                .state
                .cache(row.namespace)
                .get(row.key)
                .map(encode_saved_entry)
                .transpose()
                .map_err(|e| e.to_string())?;
            if held.as_deref() == Some(row.entry)
                && snapshot.state.saver(row.namespace, row.key) == context
            {
                Ok(())
            } else {
                Err(format!(
                    "its saver's record {journal}#{seq} was compacted away, and the state at the \
                     journal's anchor (#{}) does not hold this entry as saved by {}",
                    snapshot.seq, row.saved_by
                ))
            }
        }
        Proof::PastHead(head) => Err(format!(
            "its saver's record {journal}#{seq} is past that journal's head (#{head}): not part \
             of its log"
        )),
        Proof::Missing => Err(format!(
            "its saver's record {journal}#{seq} is not in the database"
        )),
    }
}

/// Reads what `row`'s binding points at: the saver's record, else its anchor.
pub(super) fn proof_of(
    client: &mut impl postgres::GenericClient,
    journal: &str,
    seq: u64,
) -> Result<Proof, postgres::Error> {
    if let Some(r) = client.query_opt(
        "SELECT r.bytes, h.head FROM pcx_records r LEFT JOIN pcx_heads h ON h.journal = r.journal \
         WHERE r.journal = $1 AND r.seq = $2",
        &[&journal, &i64_of(seq)],
    )? {
        // A journal whose head row was deleted (its log is still read) has no head to weigh.
        return Ok(match r.get::<_, Option<i64>>(1).map(u64_of) {
            Some(head) if head < seq => Proof::PastHead(head),
            _ => Proof::Record(r.get(0)),
        });
    }
    Ok(client
        .query_opt(
            "SELECT bytes FROM pcx_meta WHERE journal = $1 AND key = $2",
            &[&journal, &super::ANCHOR_KEY],
        )?
        .map_or(Proof::Missing, |r| Proof::Anchor(r.get(0))))
}

/// Records read per query while binding version 1's rows.
const PAGE_ROWS: i64 = 1024;

/// The upgrade from version 1, in the schema's transaction: binds each row of
/// `pcx_dynamo_cache` to the newest record in its saver's log that saved that key, when that
/// record saved exactly this row (else, with a log compacted past it, to the anchor when the
/// anchor's state holds it). A row that matches neither stays unbound, and every loader
/// refuses it: nothing vouches for it. Gives how many rows were bound and how many were not.
pub(super) fn bind_version_1_rows(tx: &mut Transaction<'_>) -> Result<(u64, u64), postgres::Error> {
    let rows = tx.query(
        "SELECT namespace, key, entry, saved_by FROM pcx_dynamo_cache WHERE saver_seq IS NULL",
        &[],
    )?;
    // By saver journal: (namespace, key) -> (entry, saved_by).
    type Wanted = HashMap<(String, String), (Vec<u8>, String)>;
    let mut by_journal: HashMap<String, Wanted> = HashMap::new();
    let mut unbound = 0u64;
    for r in &rows {
        let (namespace, key, entry, saved_by): (String, String, Vec<u8>, String) =
            (r.get(0), r.get(1), r.get(2), r.get(3));
        match saver_journal(&saved_by) {
            Some(journal) => {
                by_journal
                    .entry(journal.to_string())
                    .or_default()
                    .insert((namespace, key), (entry, saved_by));
            }
            None => unbound += 1,
        }
    }
    let mut bound = 0u64;
    for (journal, mut wanted) in by_journal {
        let mut before = i64::MAX;
        // Newest first: the newest record that saved a key decides its row.
        'pages: while !wanted.is_empty() {
            let page = tx.query(
                "SELECT seq, bytes FROM pcx_records WHERE journal = $1 AND seq < $2 \
                 ORDER BY seq DESC LIMIT $3",
                &[&journal, &before, &PAGE_ROWS],
            )?;
            for r in &page {
                before = r.get(0);
                let bytes: Vec<u8> = r.get(1);
                let Ok((envelope, hash)) = decode_event(&bytes) else {
                    continue;
                };
                let place = (u64_of(before), hash);
                let Ok(ops) =
                    SharedCacheOp::of_event(&envelope.event, &journal, DEFAULT, DEFAULT, place)
                else {
                    continue;
                };
                for op in ops.into_iter().rev() {
                    let SharedCacheOp::Put {
                        namespace,
                        key,
                        entry,
                        saved_by,
                        ..
                    } = op
                    else {
                        continue;
                    };
                    let Some((want_entry, want_by)) =
                        wanted.remove(&(namespace.clone(), key.clone()))
                    else {
                        continue;
                    };
                    if want_entry == entry && want_by == saved_by {
                        bind(tx, &namespace, &key, place)?;
                        bound += 1;
                    } else {
                        unbound += 1;
                    }
                }
            }
            if (page.len() as i64) < PAGE_ROWS {
                break 'pages;
            }
        }
        // What the log no longer holds: the anchor's state, if it was compacted.
        if wanted.is_empty() {
            continue;
        }
        let anchor: Option<Vec<u8>> = tx
            .query_opt(
                "SELECT bytes FROM pcx_meta WHERE journal = $1 AND key = $2",
                &[&journal, &super::ANCHOR_KEY],
            )?
            .map(|r| r.get(0));
        for ((namespace, key), (entry, saved_by)) in wanted {
            let at_anchor = anchor.as_ref().and_then(|a| {
                let snapshot = decode_snapshot(a).ok()?;
                let row = Row {
                    namespace: &namespace,
                    key: &key,
                    entry: &entry,
                    saved_by: &saved_by,
                    binding: Some((snapshot.seq, snapshot.head)),
                };
                check(&row, &Proof::Anchor(a.clone()))
                    .ok()
                    .map(|()| (snapshot.seq, snapshot.head))
            });
            match at_anchor {
                Some(place) => {
                    bind(tx, &namespace, &key, place)?;
                    bound += 1;
                }
                None => unbound += 1,
            }
        }
    }
    Ok((bound, unbound))
}

fn bind(
    tx: &mut Transaction<'_>,
    namespace: &str,
    key: &str,
    (seq, hash): (u64, Digest),
) -> Result<(), postgres::Error> {
    tx.execute(
        "UPDATE pcx_dynamo_cache SET saver_seq = $3, saver_hash = $4 \
         WHERE namespace = $1 AND key = $2",
        &[&namespace, &key, &i64_of(seq), &hash.0.as_slice()],
    )?;
    Ok(())
}
