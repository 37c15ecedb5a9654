//! The PostgreSQL-backed journal (cargo feature `postgres`): the event log of one named
//! journal in a PostgreSQL database, for a compile fleet that outgrows one machine. pcx adds
//! no replication of its own: durability across machines is PostgreSQL's synchronous
//! streaming replication (`synchronous_commit = on` with synchronous standbys), so a group is
//! acknowledged only once its transaction's WAL is flushed on the primary and the standbys
//! the database requires.
//!
//! Records keep their exact bytes and sequence numbers (the hash chain is in the bytes, made
//! above), so replay, `verify`, `log` and every audit query work unchanged. One group commit
//! is one transaction: a compare-and-set of the journal's head (sequence number **and** the
//! writer's epoch **and** an unexpired lease, all judged by the database's clock), then the
//! contents, records, snapshot and cache view.
//!
//! **One writer, fenced.** Opening takes the journal's lease: a new epoch, granted only when
//! no live holder has it. Every commit checks the epoch and the lease in the same statement
//! that moves the head, so a holder that was paused or cut off past its lease cannot write,
//! even if it believes it still holds it ([`StoreError::Fenced`]). A thread renews the lease
//! every third of its period on its own connection.
//!
//! **A lost acknowledgement is resolved, not guessed.** When the connection breaks while a
//! group commits, the outcome is learned from the database: once the old session is gone
//! (its transaction then either committed or did not), the head and the stored newest record
//! (byte for byte) say whether the group landed, and a landed group is answered only after a
//! later commit that writes WAL has passed through replication ([`wait_for_standbys`]), so
//! that an acknowledgement never rests on WAL only the primary has.
//!
//! Contents are content-addressed and stored once for the whole database (every journal of
//! the cluster shares them), in parts of [`PART_BYTES`], so no single value is huge. The
//! dynamo cache is shared too (`pcx_dynamo_cache`, by namespace and key, written in the
//! same transaction as the events that change it): an entry any journal saved loads in
//! every other (see `crate::actor::shared_cache`).

mod bare;
mod binding;
mod db;
mod group;
mod lease;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use postgres::Client;

use crate::core::model::Digest;
use crate::store::error::{OpenError, StoreError};
use crate::store::journal::{Bytes, Commit, Journal, Records, SharedEntry};

use db::*;
use group::*;
use lease::*;

pub use bare::BareWriter;
pub use db::{redact, PgSettings, PART_BYTES, SCHEMA_VERSION};

/// Records read per query when replaying.
const PAGE_ROWS: i64 = 1024;

/// The key of the compaction anchor in `pcx_meta`.
const ANCHOR_KEY: &str = "anchor";

/// Sets a journal's compaction anchor (journal, key, bytes): by compaction and by an import.
const SET_ANCHOR: &str = "INSERT INTO pcx_meta (journal, key, bytes) VALUES ($1, $2, $3) \
                          ON CONFLICT (journal, key) DO UPDATE SET bytes = EXCLUDED.bytes";

/// The PostgreSQL journal; see the module's documentation.
pub struct PgJournal {
    settings: PgSettings,
    db: DbThread,
    /// The sequence number of the newest committed record (0: none), as this writer knows it.
    head: Mutex<u64>,
    lease: Option<Lease>,
}

fn open_err(settings: &PgSettings) -> impl Fn(StoreError) -> OpenError + '_ {
    move |e| OpenError::Database {
        url: redact(&settings.url),
        what: e.to_string(),
    }
}

impl PgJournal {
    /// Opens the journal as its one writer: connects, creates or checks the schema, and takes
    /// the lease (waiting up to `settings.wait` for a live holder's to end).
    pub fn open(settings: PgSettings) -> Result<PgJournal, OpenError> {
        let db = Self::start(&settings)?;
        // A writer paused (SIGSTOP, a frozen VM) between two statements of a transaction
        // holds the lock on its head row: the next writer's request for the lease waits on
        // that lock, and before this no one took the journal over until the paused process
        // ran again or died. The database now ends such a transaction once it has been idle
        // for the lease (the paused writer's lease has run out by then; its write did not
        // land, and it learns so when it runs again).
        let setup = format!(
            "SET idle_in_transaction_session_timeout = {}",
            settings.lease.as_millis().max(1)
        );
        db.run(move |db| {
            db.setup = Some(setup);
            db.set_up = false;
            db.client().map(drop)
        })
        .map_err(open_err(&settings))?;
        let deadline = Instant::now() + settings.wait;
        let (Granted { epoch, head, made }, asked) = loop {
            let s = settings.clone();
            let asked = Instant::now();
            let grant = db
                .run(move |db| acquire(db.client()?, &s).map_err(db_err("taking the lease")))
                .map_err(open_err(&settings))?;
            match grant {
                Ok(granted) => break (granted, asked),
                Err((holder, remaining_ms)) => {
                    let now = Instant::now();
                    if now >= deadline {
                        return Err(OpenError::LeaseHeld {
                            journal: settings.journal.clone(),
                            holder,
                            remaining_ms,
                        });
                    }
                    let pause = Duration::from_millis(remaining_ms.clamp(20, 250) as u64);
                    std::thread::sleep(pause.min(deadline - now));
                }
            }
        };
        if made && head > 0 {
            // A head row made now over records already there: it had been deleted.
            tracing::warn!(journal = %settings.journal, head,
                "the journal had records but no head row (deleted?): its head is taken from its last record");
        }
        tracing::info!(journal = %settings.journal, epoch, head, "took the journal's lease");
        let lease = Lease::start(&settings, epoch, asked).map_err(open_err(&settings))?;
        Ok(PgJournal {
            settings,
            db,
            head: Mutex::new(u64_of(head)),
            lease: Some(lease),
        })
    }

    /// Opens the journal to read it only (the audit commands): no lease, no writes.
    pub fn open_reader(settings: PgSettings) -> Result<PgJournal, OpenError> {
        let db = Self::start(&settings)?;
        Ok(PgJournal {
            settings,
            db,
            head: Mutex::new(0),
            lease: None,
        })
    }

    /// Makes every later read of this reader one of the same snapshot of the database (a
    /// read-only repeatable-read transaction, kept open while it reads), for a command that
    /// reads the whole journal (`verify`, `export`, `log` …). Before, each page of records,
    /// each snapshot and content was read as the database was at that moment, so a
    /// compaction committed while `verify` walked the log (it deleted the events before its
    /// anchor) made a sound journal fail `event log has a gap: expected event 4097, found
    /// 15000`, and an export fail the same way. A broken connection then fails the command
    /// rather than reading on from another moment.
    pub fn read_one_snapshot(&self) -> Result<(), StoreError> {
        if self.lease.is_some() {
            return Ok(());
        }
        self.db.run(|db| {
            db.client()?
                .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SELECT 1")
                .map_err(db_err("starting a read of one snapshot"))?;
            db.pinned = true;
            Ok(())
        })
    }

    /// Starts the database thread, connects, and creates (or checks) the schema.
    fn start(settings: &PgSettings) -> Result<DbThread, OpenError> {
        let db = DbThread::start(settings.url.clone()).map_err(open_err(settings))?;
        let version = db
            .run(|db| ensure_schema(db.client()?).map_err(db_err("creating the schema")))
            .map_err(open_err(settings))?;
        match version {
            Some(v) if v > SCHEMA_VERSION => Err(OpenError::Database {
                url: redact(&settings.url),
                what: format!(
                    "its pcx schema is version {v}, newer than this pcx's {SCHEMA_VERSION}: upgrade pcx"
                ),
            }),
            _ => Ok(db),
        }
    }

    /// Whether the journal exists: a writer opened it once (taking its lease made its row in
    /// `pcx_heads`), or it holds records or an anchor (its head row deleted, say to clear
    /// what looked like a stuck lease: the log is still there to be read). The reading
    /// commands ask first, so that a mistyped `journal_name` is said to be missing rather
    /// than read as an empty, sound log.
    pub fn exists(&self) -> Result<bool, StoreError> {
        self.read("looking the journal up", |client, journal| {
            Ok(client
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM pcx_heads WHERE journal = $1) \
                     OR EXISTS (SELECT 1 FROM pcx_records WHERE journal = $1) \
                     OR EXISTS (SELECT 1 FROM pcx_meta WHERE journal = $1)",
                    &[&journal],
                )?
                .get(0))
        })
    }

    /// The journal's name in the database.
    pub fn name(&self) -> &str {
        &self.settings.journal
    }

    /// The epoch this writer holds (none for a reader).
    pub fn epoch(&self) -> Option<i64> {
        self.lease.as_ref().map(|l| l.epoch)
    }

    /// Who holds the journal's lease and where they serve: `(holder, address, epoch)`.
    pub fn holder(&self) -> Result<Option<(String, String, i64)>, StoreError> {
        let journal = self.settings.journal.clone();
        self.db.run(move |db| {
            let row = db
                .client()?
                .query_opt(
                    "SELECT holder, address, epoch FROM pcx_heads WHERE journal = $1",
                    &[&journal],
                )
                .map_err(db_err("reading the lease"))?;
            Ok(row.map(|r| (r.get(0), r.get(1), r.get(2))))
        })
    }

    fn fenced(&self) -> Result<i64, StoreError> {
        let Some(lease) = &self.lease else {
            return Err(StoreError::Fenced {
                journal: self.settings.journal.clone(),
                why: "it was opened to read only".into(),
            });
        };
        let lost = lease.lost.lock().unwrap_or_else(|p| p.into_inner());
        match lost.as_ref() {
            Some(why) => Err(StoreError::Fenced {
                journal: self.settings.journal.clone(),
                why: why.clone(),
            }),
            None => Ok(lease.epoch),
        }
    }

    /// Marks the lease lost, for every later write.
    fn lose(&self, why: String) -> StoreError {
        if let Some(lease) = &self.lease {
            let mut lost = lease.lost.lock().unwrap_or_else(|p| p.into_inner());
            lost.get_or_insert(why.clone());
        }
        tracing::error!(journal = %self.settings.journal, %why, "the journal's lease is lost: no more writes");
        StoreError::Fenced {
            journal: self.settings.journal.clone(),
            why,
        }
    }

    /// A write outside a group (the cache view, the anchor, a compaction, a wipe, an import's
    /// takeover), in one transaction that first checks this writer still holds the lease.
    ///
    /// Its outcome is resolved as a group's is when the connection breaks: the transaction
    /// also stores a token of its own in `pcx_writes`, so once the old session is gone the
    /// token's row says whether it committed. Tokens are kept a day (a resolution takes
    /// seconds), not only the last: a writer that took the journal over meanwhile may have
    /// written outside a group too, and that must not make a landed write look lost. Before,
    /// such a write was reported failed though it may have committed (a compaction done,
    /// answered as not).
    fn write_held(
        &self,
        op: &'static str,
        f: impl FnOnce(&mut postgres::Transaction<'_>, &str) -> Result<(), postgres::Error>
            + Send
            + 'static,
    ) -> Result<(), StoreError> {
        let epoch = self.fenced()?;
        let journal = self.settings.journal.clone();
        let old = *self.head.lock().unwrap_or_else(|p| p.into_inner());
        let token = write_token();
        let refused = self.db.run(move |db| {
            db.client()?;
            let Some((client, session)) = db.conn.as_mut() else {
                return Err(StoreError::Unavailable);
            };
            let session = *session;
            take_warning();
            let attempt = (|| -> Result<Option<String>, postgres::Error> {
                let mut tx = client.transaction()?;
                let held = tx.execute(
                    "UPDATE pcx_heads SET head = head \
                     WHERE journal = $1 AND epoch = $2 AND lease_until > clock_timestamp()",
                    &[&journal, &epoch],
                )?;
                if held != 1 {
                    drop(tx);
                    return Ok(Some(why_fenced(client, &journal, epoch, old)));
                }
                f(&mut tx, &journal)?;
                tx.execute(
                    "DELETE FROM pcx_writes \
                     WHERE journal = $1 AND at < clock_timestamp() - interval '1 day'",
                    &[&journal],
                )?;
                tx.execute(
                    "INSERT INTO pcx_writes (journal, token) VALUES ($1, $2)",
                    &[&journal, &token.as_slice()],
                )?;
                tx.commit()?;
                Ok(None)
            })();
            match attempt {
                Ok(None) => {
                    settle_replication(client, &journal)?;
                    Ok(None)
                }
                Ok(refused) => Ok(refused),
                Err(e) => {
                    let broken = db
                        .conn
                        .as_ref()
                        .is_none_or(|(c, _)| connection_broke(c, &e));
                    if !broken {
                        return Err(db_err(op)(e));
                    }
                    let what = describe(&e);
                    db.set_conn(None);
                    if resolve_write(db, session, &journal, &token)? {
                        tracing::warn!(%journal, op, %what,
                            "a write's connection broke; the database says it landed");
                        Ok(None)
                    } else {
                        Err(StoreError::Database {
                            op,
                            what: format!(
                                "{what} (the write did not land: nothing of it was stored)"
                            ),
                        })
                    }
                }
            }
        })?;
        match refused {
            Some(why) => Err(self.lose(why)),
            None => Ok(()),
        }
    }

    /// Compaction's write, one transaction under the lease: sets the anchor (a snapshot record
    /// at `anchor_seq`) and deletes the events and snapshots up to it. Gives how many of each
    /// were deleted.
    pub fn compact_before(&self, anchor_seq: u64, anchor: &[u8]) -> Result<(u64, u64), StoreError> {
        let anchor = anchor.to_vec();
        let counts = Arc::new(Mutex::new((0u64, 0u64)));
        let out = counts.clone();
        self.write_held("compacting", move |tx, journal| {
            tx.execute(SET_ANCHOR, &[&journal, &ANCHOR_KEY, &anchor])?;
            let events = tx.execute(
                "DELETE FROM pcx_records WHERE journal = $1 AND seq <= $2",
                &[&journal, &i64_of(anchor_seq)],
            )?;
            let snapshots = tx.execute(
                "DELETE FROM pcx_snapshots WHERE journal = $1 AND seq <= $2",
                &[&journal, &i64_of(anchor_seq)],
            )?;
            *out.lock().unwrap_or_else(|p| p.into_inner()) = (events, snapshots);
            Ok(())
        })?;
        let done = *counts.lock().unwrap_or_else(|p| p.into_inner());
        Ok(done)
    }

    /// Sets the compaction anchor (a snapshot record) under the lease: an import of a
    /// compacted export starts from it.
    pub fn set_anchor(&self, anchor: &[u8]) -> Result<(), StoreError> {
        let anchor = anchor.to_vec();
        self.write_held("setting the anchor", move |tx, journal| {
            tx.execute(SET_ANCHOR, &[&journal, &ANCHOR_KEY, &anchor])?;
            Ok(())
        })
    }

    /// Empties the journal under the lease (records, snapshots, cache view, anchor; head 0):
    /// what an import's side journal does first, in case a killed import left one behind.
    /// With `remove`, its row in `pcx_heads` goes too and this writer stops writing: an
    /// import that failed leaves no side journal.
    pub fn wipe(&self, remove: bool) -> Result<(), StoreError> {
        if remove {
            // No renewal of a row about to go (it would report the lease lost).
            if let Some(lease) = &self.lease {
                lease.stop.store(true, Ordering::SeqCst);
            }
        }
        self.write_held("emptying the journal", move |tx, journal| {
            for table in ["pcx_records", "pcx_snapshots", "pcx_cache_view", "pcx_meta"] {
                tx.execute(
                    &format!("DELETE FROM {table} WHERE journal = $1"),
                    &[&journal],
                )?;
            }
            let heads = if remove {
                "DELETE FROM pcx_heads WHERE journal = $1"
            } else {
                "UPDATE pcx_heads SET head = 0 WHERE journal = $1"
            };
            tx.execute(heads, &[&journal])?;
            Ok(())
        })?;
        *self.head.lock().unwrap_or_else(|p| p.into_inner()) = 0;
        if remove {
            if let Some(lease) = &self.lease {
                lease
                    .lost
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get_or_insert_with(|| "the journal was removed".into());
            }
        }
        Ok(())
    }

    /// Takes the whole log of the journal `side` (an import written there; its writer gone)
    /// as this journal's, **in one transaction** under this writer's lease: its records,
    /// snapshots, cache view and anchor change journals, this head becomes its head, and
    /// `side` is removed. Gives the new head, or why nothing changed (this journal holds a log
    /// by then, or `side` is gone). Contents are the cluster's already.
    pub fn adopt_log_of(&self, side: &str) -> Result<Result<u64, String>, StoreError> {
        let side = side.to_string();
        let outcome: Arc<Mutex<Result<u64, String>>> =
            Arc::new(Mutex::new(Err("the transaction did not run".into())));
        let out = outcome.clone();
        self.write_held("taking the imported log", move |tx, journal| {
            let set = |r: Result<u64, String>| *out.lock().unwrap_or_else(|p| p.into_inner()) = r;
            let holds: bool = tx
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM pcx_records WHERE journal = $1) \
                     OR EXISTS (SELECT 1 FROM pcx_meta WHERE journal = $1 AND key = $2)",
                    &[&journal, &ANCHOR_KEY],
                )?
                .get(0);
            if holds {
                set(Err(format!("journal {journal} holds a log")));
                return Ok(());
            }
            let Some(head) = tx.query_opt(
                "DELETE FROM pcx_heads WHERE journal = $1 RETURNING head",
                &[&side],
            )?
            else {
                set(Err(format!("the imported journal {side} is gone")));
                return Ok(());
            };
            let head: i64 = head.get(0);
            tx.execute("DELETE FROM pcx_writes WHERE journal = $1", &[&side])?;
            for table in ["pcx_snapshots", "pcx_cache_view", "pcx_meta"] {
                tx.execute(
                    &format!("DELETE FROM {table} WHERE journal = $1"),
                    &[&journal],
                )?;
            }
            for table in ["pcx_records", "pcx_snapshots", "pcx_cache_view", "pcx_meta"] {
                tx.execute(
                    &format!("UPDATE {table} SET journal = $1 WHERE journal = $2"),
                    &[&journal, &side],
                )?;
            }
            tx.execute(
                "UPDATE pcx_heads SET head = $2 WHERE journal = $1",
                &[&journal, &head],
            )?;
            set(Ok(u64_of(head)));
            Ok(())
        })?;
        let outcome = outcome.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Ok(head) = outcome {
            *self.head.lock().unwrap_or_else(|p| p.into_inner()) = head;
        }
        Ok(outcome)
    }

    /// Gives up the lease at once (a clean shutdown), so that a standby takes over without
    /// waiting for it to run out.
    pub fn release(&self) {
        let Some(lease) = &self.lease else { return };
        lease.stop.store(true, Ordering::SeqCst);
        let (journal, epoch) = (self.settings.journal.clone(), lease.epoch);
        let _ = self.db.run(move |db| {
            db.client()?
                .execute(
                    "UPDATE pcx_heads SET lease_until = clock_timestamp() WHERE journal = $1 AND epoch = $2",
                    &[&journal, &epoch],
                )
                .map_err(db_err("releasing the lease"))
        });
    }

    /// One read on the database thread.
    fn read<T: Send + 'static>(
        &self,
        op: &'static str,
        f: impl FnOnce(&mut Client, &str) -> Result<T, postgres::Error> + Send + 'static,
    ) -> Result<T, StoreError> {
        let journal = self.settings.journal.clone();
        self.db
            .run(move |db| f(db.client()?, &journal).map_err(db_err(op)))
    }
}

/// Waits until everything the primary committed so far is as replicated as an answered write
/// must be: a commit that writes WAL (a fresh token in `pcx_writes`) waits for the synchronous
/// standbys, and WAL is replicated in order. A statement that changes no row writes no WAL and
/// waits for nothing: the head row touched by the writer's epoch, the first way this was done,
/// matched no row once the journal had been taken over, and a group whose answer was lost was
/// answered while only the primary had it.
///
/// A commit whose wait for the standbys was cancelled passes with a warning (see
/// [`take_warning`]): this is tried again until one passes without, so that it waits for the
/// standbys however often an operator cancels it.
pub(super) fn wait_for_standbys(client: &mut Client, journal: &str) -> Result<(), StoreError> {
    loop {
        take_warning();
        client
            .execute(
                "INSERT INTO pcx_writes (journal, token) VALUES ($1, $2)",
                &[&journal, &write_token().as_slice()],
            )
            .map_err(db_err("waiting for the standbys"))?;
        if !take_warning() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// After a commit that passed: if the database warned meanwhile (a cancelled wait for the
/// synchronous standbys passes with a warning, committed on the primary alone), waits for
/// the standbys before the commit is answered. Before, such a group was answered, and a
/// failover then lost an answered write.
pub(super) fn settle_replication(client: &mut Client, journal: &str) -> Result<(), StoreError> {
    if take_warning() {
        wait_for_standbys(client, journal)?;
    }
    Ok(())
}

/// A token no other write has: this process, the time and a counter, hashed.
fn write_token() -> [u8; 32] {
    static COUNT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let n = COUNT.fetch_add(1, Ordering::SeqCst);
    Digest::of(format!("{} {nanos} {n}", std::process::id()).as_bytes()).0
}

/// A write outside a group whose connection broke: once its session is gone, whether it
/// landed is whether `pcx_writes` holds its token. A landed write is answered only after
/// [`wait_for_standbys`], so that the answer never rests on WAL only the primary has, as for a
/// group.
fn resolve_write(
    db: &mut Db,
    old: Session,
    journal: &str,
    token: &[u8; 32],
) -> Result<bool, StoreError> {
    let (mut client, session) = reconnect_once_decided(&db.url, old)?;
    let landed = client
        .query_opt(
            "SELECT 1 FROM pcx_writes WHERE journal = $1 AND token = $2",
            &[&journal, &token.as_slice()],
        )
        .map_err(db_err("reading a write's token after its connection broke"))?
        .is_some();
    if landed {
        wait_for_standbys(&mut client, journal)?;
    }
    db.set_conn(Some((client, session)));
    Ok(landed)
}

impl Drop for PgJournal {
    fn drop(&mut self) {
        self.release();
    }
}

impl Journal for PgJournal {
    fn backend(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }
    fn blob(&self, digest: &Digest) -> Result<Option<Vec<u8>>, StoreError> {
        let d = *digest;
        let found = self.read("reading a content", move |client, _| {
            let Some(meta) = client.query_opt(
                "SELECT len, parts FROM pcx_contents WHERE digest = $1",
                &[&d.0.as_slice()],
            )?
            else {
                return Ok(None);
            };
            let (len, parts): (i64, i32) = (meta.get(0), meta.get(1));
            let mut out = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
            // Parts past the count (left by a content written again shorter) are not its.
            let rows = client.query(
                "SELECT bytes FROM pcx_content_parts \
                 WHERE digest = $1 AND part >= 0 AND part < $2 ORDER BY part",
                &[&d.0.as_slice(), &parts],
            )?;
            for row in &rows {
                out.extend_from_slice(row.get::<_, &[u8]>(0));
            }
            Ok(Some((out, len, parts, rows.len())))
        })?;
        let Some((out, len, parts, seen)) = found else {
            return Ok(None);
        };
        if seen as i32 != parts.max(1) || out.len() as i64 != len || Digest::of(&out) != *digest {
            return Err(StoreError::Damaged {
                what: format!(
                    "content {} in the database: {seen} of {parts} parts, {} of {len} bytes, or its digest differs",
                    digest.to_hex(),
                    out.len()
                ),
            });
        }
        Ok(Some(out))
    }

    fn commit(&self, c: &Commit) -> Result<(), StoreError> {
        let epoch = self.fenced()?;
        let mut head = self.head.lock().unwrap_or_else(|p| p.into_inner());
        let old = *head;
        let new = c.records.last().map_or(old, |r| r.0);
        // Contents are shared by every journal of the cluster: inserted in one order (by
        // digest) everywhere, two writers storing the same contents wait for each other
        // instead of deadlocking (W6's four writers, storing the same contents in the orders
        // their clients' requests arrived, had commits fail with 40P01).
        let mut blobs = c.blobs.clone();
        blobs.sort_unstable_by_key(|b| b.0 .0);
        blobs.dedup_by(|a, b| a.0 == b.0);
        let group = Group {
            journal: self.settings.journal.clone(),
            epoch,
            old,
            new,
            blobs,
            records: c.records.clone(),
            cache_puts: c.cache_puts.clone(),
            snapshot: c.snapshot.clone(),
            shared_cache: c.shared_cache.clone(),
        };
        match self.db.run(move |db| group.commit(db))? {
            Outcome::Landed | Outcome::Resolved(true, _) => {
                *head = new;
                Ok(())
            }
            Outcome::Refused(why) => Err(self.lose(why)),
            Outcome::Resolved(false, what) => Err(StoreError::Database {
                op: "committing",
                what: format!("{what} (the group did not land: nothing of it was stored)"),
            }),
        }
    }

    fn records(&self, from: u64) -> Records<'_> {
        let mut next = from;
        let mut page: std::vec::IntoIter<(u64, Vec<u8>)> = Vec::new().into_iter();
        let mut done = false;
        Box::new(std::iter::from_fn(move || loop {
            if let Some(r) = page.next() {
                next = r.0 + 1;
                return Some(Ok(r));
            }
            if done {
                return None;
            }
            let from = i64_of(next);
            let rows = self.read("reading events", move |client, journal| {
                client
                    .query(
                        "SELECT seq, bytes FROM pcx_records WHERE journal = $1 AND seq >= $2 ORDER BY seq LIMIT $3",
                        &[&journal, &from, &PAGE_ROWS],
                    )
                    .map(|rows| {
                        rows.into_iter()
                            .map(|r| (u64_of(r.get(0)), r.get::<_, Vec<u8>>(1)))
                            .collect::<Vec<_>>()
                    })
            });
            match rows {
                Ok(rows) => {
                    done = (rows.len() as i64) < PAGE_ROWS;
                    page = rows.into_iter();
                }
                Err(e) => {
                    done = true;
                    return Some(Err(e));
                }
            }
        }))
    }

    fn last_seq(&self) -> Result<Option<u64>, StoreError> {
        self.read("reading the last event", |client, journal| {
            let row = client.query_one(
                "SELECT max(seq) FROM pcx_records WHERE journal = $1",
                &[&journal],
            )?;
            Ok(row.get::<_, Option<i64>>(0).map(u64_of))
        })
    }

    fn snapshot_seqs(&self) -> Result<Vec<u64>, StoreError> {
        self.read("listing snapshots", |client, journal| {
            let rows = client.query(
                "SELECT seq FROM pcx_snapshots WHERE journal = $1 ORDER BY seq DESC",
                &[&journal],
            )?;
            Ok(rows.iter().map(|r| u64_of(r.get(0))).collect())
        })
    }

    fn snapshot(&self, seq: u64) -> Result<Option<Bytes>, StoreError> {
        let bytes: Option<Vec<u8>> = self.read("reading a snapshot", move |client, journal| {
            let row = client.query_opt(
                "SELECT bytes FROM pcx_snapshots WHERE journal = $1 AND seq = $2",
                &[&journal, &i64_of(seq)],
            )?;
            Ok(row.map(|r| r.get(0)))
        })?;
        Ok(bytes.map(Bytes::new))
    }

    fn reset(&self) -> Result<(), StoreError> {
        self.fenced()?;
        // A new connection, and the head as the database has it: a commit whose outcome
        // was in doubt is settled by the replay that follows.
        let journal = self.settings.journal.clone();
        let head = self.db.run(move |db| {
            db.set_conn(None);
            let row = db
                .client()?
                .query_opt("SELECT head FROM pcx_heads WHERE journal = $1", &[&journal])
                .map_err(db_err("reading the head"))?;
            Ok(row.map(|r| u64_of(r.get(0))))
        })?;
        if let Some(h) = head {
            *self.head.lock().unwrap_or_else(|p| p.into_inner()) = h;
        }
        Ok(())
    }

    fn anchor(&self) -> Result<Option<Vec<u8>>, StoreError> {
        self.read("reading the anchor", |client, journal| {
            let row = client.query_opt(
                "SELECT bytes FROM pcx_meta WHERE journal = $1 AND key = $2",
                &[&journal, &ANCHOR_KEY],
            )?;
            Ok(row.map(|r| r.get(0)))
        })
    }

    fn rewrite_cache_view(&self, entries: &[(String, Vec<u8>)]) -> Result<(), StoreError> {
        let entries = entries.to_vec();
        self.write_held("rewriting the dynamo cache view", move |tx, journal| {
            tx.execute("DELETE FROM pcx_cache_view WHERE journal = $1", &[&journal])?;
            for (key, bytes) in &entries {
                tx.execute(
                    "INSERT INTO pcx_cache_view (journal, key, bytes) VALUES ($1, $2, $3)",
                    &[&journal, key, bytes],
                )?;
            }
            Ok(())
        })
    }

    fn shared_cache_entry(
        &self,
        namespace: &str,
        key: &str,
    ) -> Result<Option<SharedEntry>, StoreError> {
        let (ns, k) = (namespace.to_string(), key.to_string());
        let found = self.read("reading the cluster's dynamo cache", move |client, me| {
            let Some(row) = client.query_opt(
                "SELECT entry, saved_by, saver_seq, saver_hash FROM pcx_dynamo_cache \
                 WHERE namespace = $1 AND key = $2",
                &[&ns, &k],
            )?
            else {
                return Ok(None);
            };
            let (entry, saved_by): (Vec<u8>, String) = (row.get(0), row.get(1));
            let (seq, hash): (Option<i64>, Option<Vec<u8>>) = (row.get(2), row.get(3));
            let binding = seq.zip(hash.and_then(|h| <[u8; 32]>::try_from(h).ok()));
            let binding = binding.map(|(s, h)| (u64_of(s), Digest(h)));
            // This journal's own rows are never taken up here (it holds its own copies).
            let proof = match (binding, binding::saver_journal(&saved_by)) {
                (Some((seq, _)), Some(journal)) if journal != me => {
                    Some(binding::proof_of(client, journal, seq)?)
                }
                _ => None,
            };
            Ok(Some((entry, saved_by, binding, proof)))
        })?;
        let Some((entry, saved_by, binding, proof)) = found else {
            return Ok(None);
        };
        let row = binding::Row {
            namespace,
            key,
            entry: &entry,
            saved_by: &saved_by,
            binding,
        };
        let unsound = match (&proof, binding) {
            (Some(proof), _) => binding::check(&row, proof).err(),
            // Unbound: refused whoever it names (a row naming this journal is not taken up).
            (None, None) => binding::check(&row, &binding::Proof::Missing).err(),
            (None, Some(_)) => None,
        };
        Ok(Some(SharedEntry {
            entry,
            saved_by,
            unsound,
        }))
    }

    fn cluster_name(&self) -> Option<&str> {
        Some(&self.settings.journal)
    }

    fn lease_epoch(&self) -> Option<i64> {
        self.epoch()
    }

    /// A writer answers from its state only while its lease surely runs: once the lease is
    /// lost, or was not renewed in time (the process paused, or cut off from the database),
    /// another pcx may have taken the journal over and written it, and answering a read from
    /// what this one holds would serve a stale state. Before, such a holder, resumed after a
    /// takeover, went on answering reads (an artifact the new holder had replaced, a dynamo
    /// entry it had deleted) for as long as it ran. A reader (no lease) reads the database.
    fn check_held(&self) -> Result<(), StoreError> {
        let Some(lease) = &self.lease else {
            return Ok(());
        };
        self.fenced()?;
        let valid_until = *lease.valid_until.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if now < valid_until {
            return Ok(());
        }
        Err(StoreError::Fenced {
            journal: self.settings.journal.clone(),
            why: format!(
                "its lease (epoch {}) has not been renewed for {} ms, longer than journal_lease_ms ({} ms): \
                 another pcx may hold the journal, so this one answers nothing from what it holds \
                 until the lease is renewed",
                lease.epoch,
                (now - valid_until + self.settings.lease).as_millis(),
                self.settings.lease.as_millis()
            ),
        })
    }

    fn gathers_groups(&self) -> bool {
        true
    }

    fn committed_end(&self) -> Result<Option<u64>, StoreError> {
        self.read("reading the head", |client, journal| {
            let row =
                client.query_opt("SELECT head FROM pcx_heads WHERE journal = $1", &[&journal])?;
            Ok(row.map(|r| u64_of(r.get(0))))
        })
    }

    fn cache_view(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.read("reading the dynamo cache view", |client, journal| {
            let rows = client.query(
                "SELECT key, bytes FROM pcx_cache_view WHERE journal = $1 ORDER BY key COLLATE \"C\"",
                &[&journal],
            )?;
            Ok(rows.into_iter().map(|r| (r.get(0), r.get(1))).collect())
        })
    }
}
