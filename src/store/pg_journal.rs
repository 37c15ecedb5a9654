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
//! later synchronous commit (the lease renewal) has passed through replication, so that an
//! acknowledgement never rests on WAL only the primary has.
//!
//! Contents are content-addressed and stored once for the whole database (every journal of
//! the cluster shares them), in parts of [`PART_BYTES`], so no single value is huge. The
//! dynamo cache is shared too (`pcx_dynamo_cache`, by namespace and key, written in the
//! same transaction as the events that change it): an entry any journal saved loads in
//! every other (see `crate::actor::shared_cache`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use postgres::{Client, NoTls};

use crate::core::model::Digest;
use crate::store::error::{OpenError, StoreError};
use crate::store::journal::{Commit, Journal, Records, SharedCacheOp};

/// The version of the schema this build creates and reads.
pub const SCHEMA_VERSION: i32 = 1;

/// Contents are stored in parts of this size (the last one shorter).
pub const PART_BYTES: usize = 1 << 20;

/// How many snapshots are kept, as in the sled journal: the newest and one before it.
const SNAPSHOTS_KEPT: i64 = 2;

/// Records read per query when replaying.
const PAGE_ROWS: i64 = 1024;

/// How long a commit whose outcome is in doubt waits for its old session to end.
const RESOLVE_PATIENCE: Duration = Duration::from_secs(30);

/// The schema, created on first use under an advisory lock (so that two pcx processes starting
/// at once do not race), and versioned in `pcx_schema`.
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS pcx_schema (version integer NOT NULL);
CREATE TABLE IF NOT EXISTS pcx_heads (
    journal text PRIMARY KEY,
    head bigint NOT NULL,
    epoch bigint NOT NULL,
    holder text NOT NULL,
    address text NOT NULL DEFAULT '',
    lease_until timestamptz NOT NULL
);
CREATE TABLE IF NOT EXISTS pcx_records (
    journal text NOT NULL, seq bigint NOT NULL, bytes bytea NOT NULL,
    PRIMARY KEY (journal, seq)
);
CREATE TABLE IF NOT EXISTS pcx_snapshots (
    journal text NOT NULL, seq bigint NOT NULL, bytes bytea NOT NULL,
    PRIMARY KEY (journal, seq)
);
CREATE TABLE IF NOT EXISTS pcx_contents (digest bytea PRIMARY KEY, len bigint NOT NULL, parts integer NOT NULL);
CREATE TABLE IF NOT EXISTS pcx_content_parts (
    digest bytea NOT NULL, part integer NOT NULL, bytes bytea NOT NULL,
    PRIMARY KEY (digest, part)
);
CREATE TABLE IF NOT EXISTS pcx_cache_view (
    journal text NOT NULL, key text NOT NULL, bytes bytea NOT NULL,
    PRIMARY KEY (journal, key)
);
CREATE TABLE IF NOT EXISTS pcx_dynamo_cache (
    namespace text NOT NULL, key text NOT NULL, entry bytea NOT NULL, saved_by text NOT NULL,
    PRIMARY KEY (namespace, key)
);
CREATE TABLE IF NOT EXISTS pcx_meta (
    journal text NOT NULL, key text NOT NULL, bytes bytea NOT NULL,
    PRIMARY KEY (journal, key)
);
";

/// The key of the compaction anchor in `pcx_meta`.
const ANCHOR_KEY: &str = "anchor";

/// Where a PostgreSQL journal lives and how its writer behaves.
#[derive(Clone, Debug)]
pub struct PgSettings {
    /// A libpq connection string or URL; several hosts with `target_session_attrs=read-write`
    /// follow a promoted standby.
    pub url: String,
    /// The journal's name: one writer at a time per name.
    pub journal: String,
    /// Who holds the lease (shown to a second pcx that finds it taken).
    pub holder: String,
    /// Where the holder serves, for clients that look it up.
    pub address: String,
    /// How long a lease lasts without renewal.
    pub lease: Duration,
    /// How long to wait for a live holder's lease to end before giving up (zero: at once).
    pub wait: Duration,
}

/// The journal's lease as one writer holds it.
struct Lease {
    epoch: i64,
    /// Set by the renewer (or a refused commit) once the lease is known lost.
    lost: Arc<Mutex<Option<String>>>,
    stop: Arc<AtomicBool>,
}

/// The session a commit ran on, to tell after a broken connection whether it is gone.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Session {
    pid: i32,
    /// When that server started (µs): a reconnect to another server (a promoted standby) or
    /// to a restarted one has no in-flight transaction of the old session to wait for.
    server_started: i64,
}

/// The connection, owned by the journal's database thread.
struct Db {
    url: String,
    conn: Option<(Client, Session)>,
}

impl Db {
    /// The connection, made again if it was lost.
    fn client(&mut self) -> Result<&mut Client, StoreError> {
        if self.conn.as_ref().is_none_or(|(c, _)| c.is_closed()) {
            self.conn = Some(connect(&self.url).map_err(db_err("connecting"))?);
        }
        match self.conn.as_mut() {
            Some((c, _)) => Ok(c),
            None => Err(StoreError::Unavailable),
        }
    }
}

type Job = Box<dyn FnOnce(&mut Db) + Send>;

/// The thread that talks to the database. The `postgres` client drives its own Tokio
/// runtime, which cannot run inside the actor's; the journal's callers block on this thread's
/// answers instead, as they block on sled's flush.
struct DbThread {
    jobs: Mutex<std::sync::mpsc::Sender<Job>>,
}

impl DbThread {
    fn start(url: String) -> Result<DbThread, StoreError> {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("pcx-postgres".into())
            .spawn(move || {
                let mut db = Db { url, conn: None };
                for job in rx {
                    job(&mut db);
                }
            })
            .map_err(|e| StoreError::Database {
                op: "starting the database thread",
                what: e.to_string(),
            })?;
        Ok(DbThread {
            jobs: Mutex::new(tx),
        })
    }

    /// Runs `f` on the database thread and waits for its answer.
    fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Db) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let job: Job = Box::new(move |db| {
            let _ = tx.send(f(db));
        });
        self.jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(job)
            .map_err(|_| StoreError::Unavailable)?;
        rx.recv().map_err(|_| StoreError::Unavailable)?
    }
}

/// The PostgreSQL journal; see the module's documentation.
pub struct PgJournal {
    settings: PgSettings,
    db: DbThread,
    /// The sequence number of the newest committed record (0: none), as this writer knows it.
    head: Mutex<u64>,
    lease: Option<Lease>,
}

fn db_err(op: &'static str) -> impl FnOnce(postgres::Error) -> StoreError {
    move |e| StoreError::Database {
        op,
        what: describe(&e),
    }
}

/// PostgreSQL's error in words: its own message for a server error, else the client's.
fn describe(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => e.to_string(),
    }
}

/// The connection string without its password, for messages.
pub fn redact(url: &str) -> String {
    let words: Vec<String> = url
        .split_whitespace()
        .map(|w| {
            if w.starts_with("password=") {
                "password=***".to_string()
            } else {
                w.to_string()
            }
        })
        .collect();
    let joined = words.join(" ");
    // postgres://user:secret@host/...
    match (joined.find("://"), joined.find('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let creds = &joined[scheme + 3..at];
            match creds.find(':') {
                Some(colon) => format!(
                    "{}{}:***{}",
                    &joined[..scheme + 3],
                    &creds[..colon],
                    &joined[at..]
                ),
                None => joined,
            }
        }
        _ => joined,
    }
}

fn connect(url: &str) -> Result<(Client, Session), postgres::Error> {
    let mut client = Client::connect(url, NoTls)?;
    let row = client.query_one(
        "SELECT pg_backend_pid(), \
         (extract(epoch FROM pg_postmaster_start_time()) * 1000000)::bigint",
        &[],
    )?;
    Ok((
        client,
        Session {
            pid: row.get(0),
            server_started: row.get(1),
        },
    ))
}

fn ensure_schema(client: &mut Client) -> Result<Option<i32>, postgres::Error> {
    let mut tx = client.transaction()?;
    tx.execute("SELECT pg_advisory_xact_lock(7367823)", &[])?;
    tx.batch_execute(SCHEMA)?;
    let version: Option<i32> = tx
        .query_one("SELECT max(version) FROM pcx_schema", &[])?
        .get(0);
    if version.is_none() {
        tx.execute(
            "INSERT INTO pcx_schema (version) VALUES ($1)",
            &[&SCHEMA_VERSION],
        )?;
    }
    tx.commit()?;
    Ok(version)
}

fn i64_of(seq: u64) -> i64 {
    i64::try_from(seq).unwrap_or(i64::MAX)
}

fn u64_of(seq: i64) -> u64 {
    u64::try_from(seq).unwrap_or(0)
}

/// What a lease request found: granted `(epoch, head)`, or held by `(holder, ms left)`.
type Grant = Result<(i64, i64), (String, i64)>;

/// Takes the lease if nobody live holds it.
fn acquire(client: &mut Client, s: &PgSettings) -> Result<Grant, postgres::Error> {
    let lease_ms = s.lease.as_millis() as f64;
    let granted = client.query_opt(
        "INSERT INTO pcx_heads AS h (journal, head, epoch, holder, address, lease_until) \
         VALUES ($1, 0, 1, $2, $3, clock_timestamp() + $4::float8 * interval '1 millisecond') \
         ON CONFLICT (journal) DO UPDATE \
           SET epoch = h.epoch + 1, holder = EXCLUDED.holder, address = EXCLUDED.address, \
               lease_until = EXCLUDED.lease_until \
           WHERE h.lease_until < clock_timestamp() \
         RETURNING epoch, head",
        &[&s.journal, &s.holder, &s.address, &lease_ms],
    )?;
    if let Some(row) = granted {
        return Ok(Ok((row.get(0), row.get(1))));
    }
    let row = client.query_one(
        "SELECT holder, greatest(0, extract(epoch FROM lease_until - clock_timestamp()) * 1000)::bigint \
         FROM pcx_heads WHERE journal = $1",
        &[&s.journal],
    )?;
    Ok(Err((row.get(0), row.get(1))))
}

/// Why the head could not be moved: the epoch moved on, the lease ran out, or the head is
/// not where this writer left it.
fn why_fenced(client: &mut Client, journal: &str, epoch: i64, old: u64) -> String {
    let row = client.query_opt(
        "SELECT epoch, holder, head, lease_until < clock_timestamp() FROM pcx_heads WHERE journal = $1",
        &[&journal],
    );
    match row {
        Ok(Some(r)) => {
            let (now_epoch, holder, head, expired): (i64, String, i64, bool) =
                (r.get(0), r.get(1), r.get(2), r.get(3));
            if now_epoch != epoch {
                format!("another writer ({holder}) took it over at epoch {now_epoch}; this one held epoch {epoch}")
            } else if expired {
                format!("this writer's lease (epoch {epoch}) ran out before the commit")
            } else {
                format!("its head is {head}, not {old} as this writer left it")
            }
        }
        Ok(None) => "its lease row is gone".into(),
        Err(e) => format!("the lease could not be checked: {}", describe(&e)),
    }
}

/// One group, as the database thread writes it.
struct Group {
    journal: String,
    epoch: i64,
    old: u64,
    new: u64,
    blobs: Vec<(Digest, Arc<Vec<u8>>)>,
    records: Vec<(u64, Vec<u8>)>,
    cache_puts: Vec<(String, Vec<u8>)>,
    snapshot: Option<(u64, Vec<u8>)>,
    shared_cache: Vec<SharedCacheOp>,
}

/// How a group's commit ended.
enum Outcome {
    Landed,
    /// The head did not move: fenced, with why.
    Refused(String),
    /// The connection broke: the outcome was learned from the database (`true`: landed).
    Resolved(bool, String),
}

impl Group {
    /// The group's transaction; `Ok(false)` when the head's compare-and-set failed.
    fn write(&self, client: &mut Client) -> Result<bool, postgres::Error> {
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
        for (digest, bytes) in &self.blobs {
            put_content(&mut tx, digest, bytes)?;
        }
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
                } => tx.execute(
                    "INSERT INTO pcx_dynamo_cache (namespace, key, entry, saved_by) VALUES ($1, $2, $3, $4) \
                     ON CONFLICT (namespace, key) DO UPDATE SET entry = EXCLUDED.entry, saved_by = EXCLUDED.saved_by",
                    &[namespace, key, entry, saved_by],
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

    /// Commits on the database thread, resolving a broken connection's outcome.
    fn commit(self, db: &mut Db) -> Result<Outcome, StoreError> {
        db.client()?;
        let Some((client, session)) = db.conn.as_mut() else {
            return Err(StoreError::Unavailable);
        };
        let session = *session;
        match self.write(client) {
            Ok(true) => Ok(Outcome::Landed),
            Ok(false) => Ok(Outcome::Refused(why_fenced(
                client,
                &self.journal,
                self.epoch,
                self.old,
            ))),
            Err(e) if client.is_closed() || e.is_closed() || e.as_db_error().is_none() => {
                let what = describe(&e);
                db.conn = None;
                let landed = self.resolve(db, session)?;
                Ok(Outcome::Resolved(landed, what))
            }
            Err(e) => Err(db_err("committing")(e)),
        }
    }

    /// The connection broke while the group committed: learn from the database whether it
    /// landed (`true`: it did, and is replicated as the database requires).
    fn resolve(&self, db: &mut Db, old: Session) -> Result<bool, StoreError> {
        let (mut client, session) =
            connect(&db.url).map_err(db_err("reconnecting after a broken commit"))?;
        if session.server_started == old.server_started {
            // The same server: wait until the old session has ended, so that its transaction
            // is decided; end it if it lingers.
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
        } else if head == self.new {
            // The record's bytes carry the hash chain: equal bytes are this group's record.
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
            // waited for its standbys): a later synchronous commit makes it as replicated as
            // any answered write before it is answered.
            client
                .execute(
                    "UPDATE pcx_heads SET lease_until = lease_until WHERE journal = $1 AND epoch = $2",
                    &[&self.journal, &self.epoch],
                )
                .map_err(db_err("replicating a commit whose answer was lost"))?;
        }
        db.conn = Some((client, session));
        Ok(landed)
    }
}

/// Stores one content once for the cluster, in parts.
fn put_content(
    tx: &mut postgres::Transaction<'_>,
    digest: &Digest,
    bytes: &[u8],
) -> Result<(), postgres::Error> {
    let parts = bytes.len().div_ceil(PART_BYTES).max(1);
    let inserted = tx.execute(
        "INSERT INTO pcx_contents (digest, len, parts) VALUES ($1, $2, $3) ON CONFLICT (digest) DO NOTHING",
        &[&digest.0.as_slice(), &(bytes.len() as i64), &(parts as i32)],
    )?;
    if inserted == 0 {
        return Ok(());
    }
    if bytes.is_empty() {
        tx.execute(
            "INSERT INTO pcx_content_parts (digest, part, bytes) VALUES ($1, 0, ''::bytea)",
            &[&digest.0.as_slice()],
        )?;
    }
    for (i, chunk) in bytes.chunks(PART_BYTES).enumerate() {
        tx.execute(
            "INSERT INTO pcx_content_parts (digest, part, bytes) VALUES ($1, $2, $3)",
            &[&digest.0.as_slice(), &(i as i32), &chunk],
        )?;
    }
    Ok(())
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
        let deadline = Instant::now() + settings.wait;
        let (epoch, head) = loop {
            let s = settings.clone();
            let grant = db
                .run(move |db| acquire(db.client()?, &s).map_err(db_err("taking the lease")))
                .map_err(open_err(&settings))?;
            match grant {
                Ok(granted) => break granted,
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
        tracing::info!(journal = %settings.journal, epoch, head, "took the journal's lease");
        let lease = Lease::start(&settings, epoch).map_err(open_err(&settings))?;
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

    /// A write outside a group (the cache view, the anchor, a wipe), in one transaction that
    /// first checks this writer still holds the lease.
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
        let refused = self.db.run(move |db| {
            let client = db.client()?;
            let mut tx = client.transaction().map_err(db_err(op))?;
            let held = tx
                .execute(
                    "UPDATE pcx_heads SET head = head \
                     WHERE journal = $1 AND epoch = $2 AND lease_until > clock_timestamp()",
                    &[&journal, &epoch],
                )
                .map_err(db_err(op))?;
            if held != 1 {
                drop(tx);
                return Ok(Some(why_fenced(client, &journal, epoch, old)));
            }
            f(&mut tx, &journal).map_err(db_err(op))?;
            tx.commit().map_err(db_err(op))?;
            Ok(None)
        })?;
        match refused {
            Some(why) => Err(self.lose(why)),
            None => Ok(()),
        }
    }

    /// Sets the compaction anchor (compaction and import only).
    pub fn set_anchor(&self, snapshot: &[u8]) -> Result<(), StoreError> {
        let snapshot = snapshot.to_vec();
        self.write_held("writing the anchor", move |tx, journal| {
            tx.execute(
                "INSERT INTO pcx_meta (journal, key, bytes) VALUES ($1, $2, $3) \
                 ON CONFLICT (journal, key) DO UPDATE SET bytes = EXCLUDED.bytes",
                &[&journal, &ANCHOR_KEY, &snapshot],
            )
            .map(|_| ())
        })
    }

    /// Removes this journal's records, snapshots, cache view and anchor (contents are shared
    /// by the cluster and stay).
    pub fn wipe(&self) -> Result<(), StoreError> {
        self.write_held("emptying the journal", |tx, journal| {
            for table in ["pcx_records", "pcx_snapshots", "pcx_cache_view", "pcx_meta"] {
                tx.execute(
                    &format!("DELETE FROM {table} WHERE journal = $1"),
                    &[&journal],
                )?;
            }
            tx.execute(
                "UPDATE pcx_heads SET head = 0 WHERE journal = $1",
                &[&journal],
            )?;
            Ok(())
        })?;
        *self.head.lock().unwrap_or_else(|p| p.into_inner()) = 0;
        Ok(())
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

impl Lease {
    /// Starts renewing the lease every third of its period, on a connection of its own.
    fn start(s: &PgSettings, epoch: i64) -> Result<Lease, StoreError> {
        let lost: Arc<Mutex<Option<String>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (lost2, stop2, s2) = (lost.clone(), stop.clone(), s.clone());
        let every = s.lease / 3;
        std::thread::Builder::new()
            .name("pcx-lease".into())
            .spawn(move || {
                let lease_ms = s2.lease.as_millis() as f64;
                let mut client: Option<Client> = None;
                while !stop2.load(Ordering::SeqCst) {
                    std::thread::sleep(every);
                    if stop2.load(Ordering::SeqCst) {
                        break;
                    }
                    if client.as_ref().is_none_or(|c| c.is_closed()) {
                        match connect(&s2.url) {
                            Ok((c, _)) => client = Some(c),
                            Err(e) => {
                                tracing::warn!(error = %describe(&e), "cannot reach the database to renew the lease");
                                continue;
                            }
                        }
                    }
                    let Some(c) = client.as_mut() else { continue };
                    match c.execute(
                        "UPDATE pcx_heads SET lease_until = clock_timestamp() + $3::float8 * interval '1 millisecond' \
                         WHERE journal = $1 AND epoch = $2 AND lease_until > clock_timestamp()",
                        &[&s2.journal, &epoch, &lease_ms],
                    ) {
                        Ok(1) => {}
                        Ok(_) => {
                            let why = format!("its lease (epoch {epoch}) ran out or was taken over before it was renewed");
                            tracing::error!(journal = %s2.journal, epoch, "lost the journal's lease");
                            lost2.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(why);
                            break;
                        }
                        Err(e) => tracing::warn!(error = %describe(&e), "renewing the lease failed; retrying"),
                    }
                }
            })
            .map_err(|e| StoreError::Database {
                op: "starting the lease thread",
                what: e.to_string(),
            })?;
        Ok(Lease { epoch, lost, stop })
    }
}

impl Drop for PgJournal {
    fn drop(&mut self) {
        self.release();
    }
}

impl Journal for PgJournal {
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
            let rows = client.query(
                "SELECT bytes FROM pcx_content_parts WHERE digest = $1 ORDER BY part",
                &[&d.0.as_slice()],
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
        let group = Group {
            journal: self.settings.journal.clone(),
            epoch,
            old,
            new,
            blobs: c.blobs.clone(),
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

    fn snapshot(&self, seq: u64) -> Result<Option<Vec<u8>>, StoreError> {
        self.read("reading a snapshot", move |client, journal| {
            let row = client.query_opt(
                "SELECT bytes FROM pcx_snapshots WHERE journal = $1 AND seq = $2",
                &[&journal, &i64_of(seq)],
            )?;
            Ok(row.map(|r| r.get(0)))
        })
    }

    fn reset(&self) -> Result<(), StoreError> {
        self.fenced()?;
        // A new connection, and the head as the database has it: a commit whose outcome
        // was in doubt is settled by the replay that follows.
        let journal = self.settings.journal.clone();
        let head = self.db.run(move |db| {
            db.conn = None;
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
    ) -> Result<Option<(Vec<u8>, String)>, StoreError> {
        let (namespace, key) = (namespace.to_string(), key.to_string());
        self.read("reading the cluster's dynamo cache", move |client, _| {
            let row = client.query_opt(
                "SELECT entry, saved_by FROM pcx_dynamo_cache WHERE namespace = $1 AND key = $2",
                &[&namespace, &key],
            )?;
            Ok(row.map(|r| (r.get(0), r.get(1))))
        })
    }

    fn cluster_name(&self) -> Option<&str> {
        Some(&self.settings.journal)
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
