//! One group commit of the PostgreSQL journal: the transaction (one statement for the common
//! group of events and contents), and, when the connection breaks during it, learning from
//! the database whether it landed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use postgres::error::SqlState;
use postgres::Client;

use crate::core::model::Digest;
use crate::store::error::StoreError;
use crate::store::journal::SharedCacheOp;

use super::db::*;
use super::lease::*;

/// How many snapshots are kept, as in the sled journal: the newest and one before it.
pub(super) const SNAPSHOTS_KEPT: i64 = 2;

/// A group of events and their contents in one statement (see
/// `Group::write_in_one_statement`): data-modifying CTEs that insert only when the head's
/// compare-and-set (epoch, head, unexpired lease) moved it; answers 1 if it did, else 0.
///
/// A content the cluster already holds is compared with the stored one, in the database: a
/// part that is missing or differs, and a length or part count that differs, is written
/// again from the group's bytes (`m`, and `f`'s upsert). Taking the digest's word for it
/// answered the record and left every read of it failing, though the bytes had been sent.
/// A content new to the cluster has its parts inserted plainly (`p`): an upsert of every
/// part, the first way this was written, cost W6's statement floor about a fifth of its
/// throughput (three runs each, alternately) and pcx about an eighth. One the cluster
/// holds intact costs an index probe a part and one for its length, and takes no lock.
pub(super) const GROUP_SQL: &str = "WITH h AS ( \
               UPDATE pcx_heads SET head = $1 \
               WHERE journal = $2 AND epoch = $3 AND head = $4 AND lease_until > clock_timestamp() \
               RETURNING 1 \
             ), c AS ( \
               INSERT INTO pcx_contents (digest, len, parts) \
               SELECT * FROM unnest($5::bytea[], $6::bigint[], $7::integer[]) WHERE EXISTS (SELECT 1 FROM h) \
               ON CONFLICT (digest) DO NOTHING RETURNING digest \
             ), m AS ( \
               UPDATE pcx_contents pc SET len = x.l, parts = x.n \
               FROM unnest($5::bytea[], $6::bigint[], $7::integer[]) AS x(d, l, n) \
               WHERE EXISTS (SELECT 1 FROM h) AND x.d NOT IN (SELECT digest FROM c) \
                 AND pc.digest = x.d AND (pc.len, pc.parts) IS DISTINCT FROM (x.l, x.n) \
             ), p AS ( \
               INSERT INTO pcx_content_parts (digest, part, bytes) \
               SELECT t.d, t.n, t.b FROM unnest($8::bytea[], $9::integer[], $10::bytea[]) AS t(d, n, b) \
               WHERE t.d IN (SELECT digest FROM c) \
             ), f AS ( \
               INSERT INTO pcx_content_parts (digest, part, bytes) \
               SELECT t.d, t.n, t.b FROM unnest($8::bytea[], $9::integer[], $10::bytea[]) AS t(d, n, b) \
               WHERE EXISTS (SELECT 1 FROM h) AND t.d NOT IN (SELECT digest FROM c) AND NOT EXISTS ( \
                 SELECT 1 FROM pcx_content_parts s WHERE s.digest = t.d AND s.part = t.n AND s.bytes = t.b) \
               ON CONFLICT (digest, part) DO UPDATE SET bytes = EXCLUDED.bytes \
             ), r AS ( \
               INSERT INTO pcx_records (journal, seq, bytes) \
               SELECT $2, t.s, t.b FROM unnest($11::bigint[], $12::bytea[]) AS t(s, b) WHERE EXISTS (SELECT 1 FROM h) \
             ) \
             SELECT count(*) FROM h";

/// How many times a group the database rolled back to break a deadlock or a serialization
/// conflict is tried in all.
const CONFLICT_TRIES: u64 = 5;

/// How long a commit whose outcome is in doubt waits for its old session to end.
pub(super) const RESOLVE_PATIENCE: Duration = Duration::from_secs(30);

/// One group, as the database thread writes it.
pub(super) struct Group {
    pub(super) journal: String,
    pub(super) epoch: i64,
    pub(super) old: u64,
    pub(super) new: u64,
    pub(super) blobs: Vec<(Digest, Arc<Vec<u8>>)>,
    pub(super) records: Vec<(u64, Vec<u8>)>,
    pub(super) cache_puts: Vec<(String, Vec<u8>)>,
    pub(super) snapshot: Option<(u64, Vec<u8>)>,
    pub(super) shared_cache: Vec<SharedCacheOp>,
}

/// How a group's commit ended.
pub(super) enum Outcome {
    Landed,
    /// The head did not move: fenced, with why.
    Refused(String),
    /// The connection broke: the outcome was learned from the database (`true`: landed).
    Resolved(bool, String),
}

impl Group {
    /// The group's transaction; `Ok(false)` when the head's compare-and-set failed.
    pub(super) fn write(
        &self,
        client: &mut Client,
        group: &postgres::Statement,
    ) -> Result<bool, postgres::Error> {
        if self.snapshot.is_none() && self.cache_puts.is_empty() && self.shared_cache.is_empty() {
            return self.write_in_one_statement(client, group);
        }
        let mut tx = client.transaction()?;
        let moved = tx.execute(
            "UPDATE pcx_heads SET head = $1 \
             WHERE journal = $2 AND epoch = $3 AND head = $4 AND lease_until > clock_timestamp()",
            &[
                &i64_of(self.new),
                &self.journal,
                &self.epoch,
                &i64_of(self.old),
            ],
        )?;
        if moved != 1 {
            return Ok(false);
        }
        put_contents(&mut tx, &self.blobs)?;
        if !self.records.is_empty() {
            let seqs: Vec<i64> = self.records.iter().map(|r| i64_of(r.0)).collect();
            let bytes: Vec<&[u8]> = self.records.iter().map(|r| r.1.as_slice()).collect();
            tx.execute(
                "INSERT INTO pcx_records (journal, seq, bytes) \
                 SELECT $1, s, b FROM unnest($2::bigint[], $3::bytea[]) AS t(s, b)",
                &[&self.journal, &seqs, &bytes],
            )?;
        }
        if let Some((seq, bytes)) = &self.snapshot {
            tx.execute(
                "INSERT INTO pcx_snapshots (journal, seq, bytes) VALUES ($1, $2, $3) \
                 ON CONFLICT (journal, seq) DO UPDATE SET bytes = EXCLUDED.bytes",
                &[&self.journal, &i64_of(*seq), bytes],
            )?;
            tx.execute(
                "DELETE FROM pcx_snapshots WHERE journal = $1 AND seq NOT IN \
                 (SELECT seq FROM pcx_snapshots WHERE journal = $1 ORDER BY seq DESC LIMIT $2)",
                &[&self.journal, &SNAPSHOTS_KEPT],
            )?;
        }
        for (key, bytes) in &self.cache_puts {
            tx.execute(
                "INSERT INTO pcx_cache_view (journal, key, bytes) VALUES ($1, $2, $3) \
                 ON CONFLICT (journal, key) DO UPDATE SET bytes = EXCLUDED.bytes",
                &[&self.journal, key, bytes],
            )?;
        }
        for op in &self.shared_cache {
            match op {
                SharedCacheOp::Put {
                    namespace,
                    key,
                    entry,
                    saved_by,
                    saver_seq,
                    saver_hash,
                } => tx.execute(
                    "INSERT INTO pcx_dynamo_cache (namespace, key, entry, saved_by, saver_seq, saver_hash) \
                     VALUES ($1, $2, $3, $4, $5, $6) \
                     ON CONFLICT (namespace, key) DO UPDATE SET entry = EXCLUDED.entry, saved_by = EXCLUDED.saved_by, \
                     saver_seq = EXCLUDED.saver_seq, saver_hash = EXCLUDED.saver_hash",
                    &[namespace, key, entry, saved_by, &i64_of(*saver_seq), &saver_hash.0.as_slice()],
                )?,
                SharedCacheOp::Delete { namespace, key } => tx.execute(
                    "DELETE FROM pcx_dynamo_cache WHERE namespace = $1 AND key = $2",
                    &[namespace, key],
                )?,
                SharedCacheOp::Clear { namespace } => tx.execute(
                    "DELETE FROM pcx_dynamo_cache WHERE namespace = $1",
                    &[namespace],
                )?,
            };
        }
        tx.commit()?;
        Ok(true)
    }

    /// The common group (events and their contents, nothing else) as one statement, so one
    /// round trip to the database: data-modifying CTEs that each insert only when the head's
    /// compare-and-set moved it, in one implicit transaction that commits (and waits for the
    /// standbys) before the answer. Four round trips a group (BEGIN, head, rows, COMMIT) held
    /// W6 to a fifth of what the database takes.
    pub(super) fn write_in_one_statement(
        &self,
        client: &mut Client,
        group: &postgres::Statement,
    ) -> Result<bool, postgres::Error> {
        let digests: Vec<&[u8]> = self.blobs.iter().map(|b| b.0 .0.as_slice()).collect();
        let lens: Vec<i64> = self.blobs.iter().map(|b| b.1.len() as i64).collect();
        let counts: Vec<i32> = self
            .blobs
            .iter()
            .map(|b| b.1.len().div_ceil(PART_BYTES).max(1) as i32)
            .collect();
        let (part_digests, part_numbers, part_bytes) = parts_of(&self.blobs, |_| true);
        let seqs: Vec<i64> = self.records.iter().map(|r| i64_of(r.0)).collect();
        let bytes: Vec<&[u8]> = self.records.iter().map(|r| r.1.as_slice()).collect();
        let row = client.query_one(
            group,
            &[
                &i64_of(self.new),
                &self.journal,
                &self.epoch,
                &i64_of(self.old),
                &digests,
                &lens,
                &counts,
                &part_digests,
                &part_numbers,
                &part_bytes,
                &seqs,
                &bytes,
            ],
        )?;
        Ok(row.get::<_, i64>(0) == 1)
    }

    /// Commits on the database thread, resolving a broken connection's outcome.
    pub(super) fn commit(self, db: &mut Db) -> Result<Outcome, StoreError> {
        db.client()?;
        if db.group.is_none() {
            if let Some((client, _)) = db.conn.as_mut() {
                let prepared = client
                    .prepare(GROUP_SQL)
                    .map_err(db_err("preparing the group statement"))?;
                db.group = Some(prepared);
            }
        }
        let (Some((client, session)), Some(group)) = (db.conn.as_mut(), db.group.as_ref()) else {
            return Err(StoreError::Unavailable);
        };
        let session = *session;
        take_warning();
        let mut written = self.write(client, group);
        let mut tries = 1;
        // A transaction the database rolled back whole to break a deadlock or a serialization
        // conflict (with another journal's writer over a shared row: the dynamo cache) left
        // nothing behind and the head where it was: it is tried again, as PostgreSQL advises.
        while tries < CONFLICT_TRIES
            && written
                .as_ref()
                .err()
                .and_then(|e| e.code())
                .is_some_and(|c| {
                    *c == SqlState::T_R_DEADLOCK_DETECTED
                        || *c == SqlState::T_R_SERIALIZATION_FAILURE
                })
        {
            tracing::warn!(journal = %self.journal, tries, "a commit lost a conflict with another writer; trying again");
            std::thread::sleep(Duration::from_millis(5 * tries));
            tries += 1;
            written = self.write(client, group);
        }
        match written {
            Ok(true) => {
                super::settle_replication(client, &self.journal)?;
                Ok(Outcome::Landed)
            }
            Ok(false) => Ok(Outcome::Refused(why_fenced(
                client,
                &self.journal,
                self.epoch,
                self.old,
            ))),
            Err(e) if connection_broke(client, &e) => {
                let what = describe(&e);
                db.set_conn(None);
                let landed = self.resolve(db, session)?;
                Ok(Outcome::Resolved(landed, what))
            }
            Err(e) => Err(db_err("committing")(e)),
        }
    }

    /// The connection broke while the group committed: learn from the database whether it
    /// landed (`true`: it did, and is replicated as the database requires).
    pub(super) fn resolve(&self, db: &mut Db, old: Session) -> Result<bool, StoreError> {
        let (mut client, session) = reconnect_once_decided(&db.url, old)?;
        let head = client
            .query_opt(
                "SELECT head FROM pcx_heads WHERE journal = $1",
                &[&self.journal],
            )
            .map_err(db_err("reading the head after a broken commit"))?
            .map_or(0, |r| u64_of(r.get(0)));
        let landed = if self.new == self.old {
            // A group without records (a snapshot or the cache view only) landed if its
            // snapshot did; otherwise writing it again does no harm.
            match &self.snapshot {
                Some((seq, bytes)) => client
                    .query_opt(
                        "SELECT bytes FROM pcx_snapshots WHERE journal = $1 AND seq = $2",
                        &[&self.journal, &i64_of(*seq)],
                    )
                    .map_err(db_err("reading the snapshot after a broken commit"))?
                    .is_some_and(|r| r.get::<_, Vec<u8>>(0) == *bytes),
                None => false,
            }
        } else if head >= self.new {
            // The record's bytes carry the hash chain: equal bytes are this group's record.
            // The head may be past it: the journal was taken over meanwhile and its new holder
            // wrote on after this group (a group is one transaction: its last record there
            // means all of it is).
            let stored: Option<Vec<u8>> = client
                .query_opt(
                    "SELECT bytes FROM pcx_records WHERE journal = $1 AND seq = $2",
                    &[&self.journal, &i64_of(self.new)],
                )
                .map_err(db_err("reading the newest record after a broken commit"))?
                .map(|r| r.get(0));
            stored.as_deref() == self.records.last().map(|r| r.1.as_slice())
        } else {
            false
        };
        tracing::warn!(journal = %self.journal, landed, head, expected = self.new,
            "a commit's connection broke: its outcome was read from the database");
        if landed {
            // The group's WAL may so far be on the primary only (a commit cut off while it
            // waited for its standbys).
            super::wait_for_standbys(&mut client, &self.journal)?;
        }
        db.set_conn(Some((client, session)));
        Ok(landed)
    }
}

/// Connects again after a commit's connection broke, and waits until the broken commit's
/// transaction is decided: on the same server, until its old session has ended (ending it if
/// it lingers); on another server (a promoted standby) there is nothing to wait for.
///
/// Only a server that takes writes (not in recovery) can say whether the commit landed: a
/// standby may not have applied WAL it has acknowledged, so it would show the head as before
/// a group that landed. A URL of several hosts without `target_session_attrs=read-write`
/// reconnects to whichever answers first; before, a standby reached so was asked, and a group
/// stored on the primary was answered "did not land: nothing of it was stored" (a client
/// retrying without a request id applied it twice). Now a standby reached is let go and the
/// connection tried again, within [`RESOLVE_PATIENCE`].
pub(super) fn reconnect_once_decided(
    url: &str,
    old: Session,
) -> Result<(Client, Session), StoreError> {
    let deadline = Instant::now() + RESOLVE_PATIENCE;
    let (mut client, session) = loop {
        let (mut client, session) =
            connect(url).map_err(db_err("reconnecting after a broken commit"))?;
        let standby: bool = client
            .query_one("SELECT pg_is_in_recovery()", &[])
            .map_err(db_err("reconnecting after a broken commit"))?
            .get(0);
        if !standby {
            break (client, session);
        }
        if Instant::now() >= deadline {
            return Err(StoreError::Database {
                op: "resolving a broken commit",
                what: format!(
                    "only a standby (in recovery) answered for {RESOLVE_PATIENCE:?}, and a standby \
                     cannot tell whether the commit landed: list the hosts with \
                     target_session_attrs=read-write"
                ),
            });
        }
        tracing::warn!(
            "reconnected to a standby after a broken commit; trying again for the primary"
        );
        drop(client);
        std::thread::sleep(Duration::from_millis(100));
    };
    if session.server_started == old.server_started {
        let deadline = Instant::now() + RESOLVE_PATIENCE;
        loop {
            let alive = client
                .query_opt("SELECT 1 FROM pg_stat_activity WHERE pid = $1", &[&old.pid])
                .map_err(db_err("waiting for the broken commit's session to end"))?
                .is_some();
            if !alive {
                break;
            }
            if Instant::now() >= deadline {
                return Err(StoreError::Database {
                    op: "resolving a broken commit",
                    what: format!(
                        "its session (pid {}) did not end in {RESOLVE_PATIENCE:?}",
                        old.pid
                    ),
                });
            }
            let _ = client.execute("SELECT pg_terminate_backend($1)", &[&old.pid]);
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Ok((client, session))
}

/// Stores contents once for the cluster, in parts: three statements for the whole group
/// (the contents new to the cluster, the length and part count of those stored otherwise,
/// then every part not stored as it is here), not three round trips a content. As in
/// [`GROUP_SQL`], a content stored damaged is written again from the group's bytes.
pub(super) fn put_contents(
    tx: &mut postgres::Transaction<'_>,
    blobs: &[(Digest, Arc<Vec<u8>>)],
) -> Result<(), postgres::Error> {
    if blobs.is_empty() {
        return Ok(());
    }
    let digests: Vec<&[u8]> = blobs.iter().map(|b| b.0 .0.as_slice()).collect();
    let lens: Vec<i64> = blobs.iter().map(|b| b.1.len() as i64).collect();
    let parts: Vec<i32> = blobs
        .iter()
        .map(|b| b.1.len().div_ceil(PART_BYTES).max(1) as i32)
        .collect();
    tx.execute(
        "INSERT INTO pcx_contents (digest, len, parts) \
         SELECT * FROM unnest($1::bytea[], $2::bigint[], $3::integer[]) \
         ON CONFLICT (digest) DO NOTHING",
        &[&digests, &lens, &parts],
    )?;
    tx.execute(
        "UPDATE pcx_contents pc SET len = x.l, parts = x.n \
         FROM unnest($1::bytea[], $2::bigint[], $3::integer[]) AS x(d, l, n) \
         WHERE pc.digest = x.d AND (pc.len, pc.parts) IS DISTINCT FROM (x.l, x.n)",
        &[&digests, &lens, &parts],
    )?;
    let (d, p, b) = parts_of(blobs, |_| true);
    tx.execute(
        "INSERT INTO pcx_content_parts (digest, part, bytes) \
         SELECT * FROM unnest($1::bytea[], $2::integer[], $3::bytea[]) AS t(d, n, b) \
         WHERE NOT EXISTS (SELECT 1 FROM pcx_content_parts s \
                           WHERE s.digest = t.d AND s.part = t.n AND s.bytes = t.b) \
         ON CONFLICT (digest, part) DO UPDATE SET bytes = EXCLUDED.bytes",
        &[&d, &p, &b],
    )?;
    Ok(())
}

/// Every part of each distinct content of a group that `wanted`: digests, part numbers and
/// bytes, as three arrays (an empty content is one empty part).
pub(super) fn parts_of(
    blobs: &[(Digest, Arc<Vec<u8>>)],
    wanted: impl Fn(&[u8]) -> bool,
) -> (Vec<&[u8]>, Vec<i32>, Vec<&[u8]>) {
    let (mut d, mut p, mut b) = (Vec::new(), Vec::new(), Vec::new());
    let mut seen = std::collections::HashSet::new();
    for (digest, bytes) in blobs {
        let key = digest.0.as_slice();
        if !wanted(key) || !seen.insert(key) {
            continue;
        }
        if bytes.is_empty() {
            d.push(key);
            p.push(0);
            b.push(&[][..]);
        }
        for (i, chunk) in bytes.chunks(PART_BYTES).enumerate() {
            d.push(key);
            p.push(i as i32);
            b.push(chunk);
        }
    }
    (d, p, b)
}
