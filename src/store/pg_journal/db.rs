//! The PostgreSQL journal's connection: the thread that owns it (the `postgres` client runs
//! its own Tokio runtime, which cannot run inside the actor's), connecting, the schema, and
//! the settings and errors every part shares.

use std::cell::Cell;
use std::sync::Mutex;
use std::time::Duration;

use postgres::{Client, NoTls};

use crate::store::error::StoreError;

/// The version of the schema this build creates and reads. Version 2 binds each row of the
/// shared dynamo cache to its saver's record (`saver_seq`, `saver_hash`; see
/// `binding`); a version 1 database is upgraded by the first pcx that opens it.
pub const SCHEMA_VERSION: i32 = 2;

/// Contents are stored in parts of this size (the last one shorter).
pub const PART_BYTES: usize = 1 << 20;

/// The schema, created on first use under an advisory lock (so that two pcx processes starting
/// at once do not race), and versioned in `pcx_schema`.
pub(super) const SCHEMA: &str = "
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
    saver_seq bigint, saver_hash bytea,
    PRIMARY KEY (namespace, key)
);
CREATE TABLE IF NOT EXISTS pcx_writes (
    journal text NOT NULL, token bytea NOT NULL, at timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (journal, token)
);
CREATE TABLE IF NOT EXISTS pcx_meta (
    journal text NOT NULL, key text NOT NULL, bytes bytea NOT NULL,
    PRIMARY KEY (journal, key)
);
";

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

/// The session a commit ran on, to tell after a broken connection whether it is gone.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct Session {
    pub(super) pid: i32,
    /// When that server started (µs): a reconnect to another server (a promoted standby) or
    /// to a restarted one has no in-flight transaction of the old session to wait for.
    pub(super) server_started: i64,
}

/// The connection, owned by the journal's database thread.
pub(super) struct Db {
    pub(super) url: String,
    pub(super) conn: Option<(Client, Session)>,
    /// The group statement, prepared once on the current connection (a statement prepared at
    /// every group cost a round trip of its own).
    pub(super) group: Option<postgres::Statement>,
    /// SQL run on every new connection before it is used (a writer's session settings).
    pub(super) setup: Option<String>,
    /// Whether `setup` ran on the current connection.
    pub(super) set_up: bool,
    /// Whether the reads on this connection are of one snapshot of the database (a reader
    /// that asked for it): a connection made again would read another, so none is.
    pub(super) pinned: bool,
}

impl Db {
    /// Replaces the connection (and forgets what was prepared on the old one).
    pub(super) fn set_conn(&mut self, conn: Option<(Client, Session)>) {
        self.conn = conn;
        self.group = None;
        self.set_up = false;
    }

    /// The connection, made again if it was lost.
    pub(super) fn client(&mut self) -> Result<&mut Client, StoreError> {
        if self.conn.as_ref().is_none_or(|(c, _)| c.is_closed()) {
            if self.pinned {
                return Err(StoreError::Database {
                    op: "reading one snapshot of the journal",
                    what: "the connection to the database broke, and another would read the \
                           journal as it is now, not as it was: run the command again"
                        .into(),
                });
            }
            self.set_conn(Some(connect(&self.url).map_err(db_err("connecting"))?));
        }
        match self.conn.as_mut() {
            Some((c, _)) => {
                if !self.set_up {
                    if let Some(setup) = &self.setup {
                        c.batch_execute(setup)
                            .map_err(db_err("setting up the session"))?;
                    }
                    self.set_up = true;
                }
                Ok(c)
            }
            None => Err(StoreError::Unavailable),
        }
    }
}

pub(super) type Job = Box<dyn FnOnce(&mut Db) + Send>;

/// The thread that talks to the database. The `postgres` client drives its own Tokio
/// runtime, which cannot run inside the actor's; the journal's callers block on this thread's
/// answers instead, as they block on sled's flush.
pub(super) struct DbThread {
    pub(super) jobs: Mutex<std::sync::mpsc::Sender<Job>>,
}

impl DbThread {
    pub(super) fn start(url: String) -> Result<DbThread, StoreError> {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("pcx-postgres".into())
            .spawn(move || {
                let mut db = Db {
                    url,
                    conn: None,
                    group: None,
                    setup: None,
                    set_up: false,
                    pinned: false,
                };
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
    pub(super) fn run<T: Send + 'static>(
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

pub(super) fn db_err(op: &'static str) -> impl FnOnce(postgres::Error) -> StoreError {
    move |e| StoreError::Database {
        op,
        what: describe(&e),
    }
}

/// PostgreSQL's error in words: its own message for a server error, else the client's.
/// Whether `e` broke the connection (closed, or no answer from the database at all) rather
/// than being the database's refusal: a write it cut off may have committed, and is resolved.
pub(super) fn connection_broke(client: &Client, e: &postgres::Error) -> bool {
    client.is_closed() || e.is_closed() || e.as_db_error().is_none()
}

pub(super) fn describe(e: &postgres::Error) -> String {
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

thread_local! {
    /// Set when the database sent a WARNING on a connection this thread drives (the `postgres`
    /// client runs its connection, and so its notice callback, on the thread that waits for
    /// the statement). PostgreSQL answers a commit whose wait for its synchronous standbys was
    /// cancelled (`pg_cancel_backend`, an operator clearing commits that seemed stuck) with a
    /// WARNING ("canceling wait for synchronous replication …: the transaction has already
    /// committed locally, but might not have been replicated to the standby") and a success.
    static WARNED: Cell<bool> = const { Cell::new(false) };
}

/// Whether the database warned on this thread's connections since the last call (see
/// [`WARNED`]): a commit that passed with a warning may rest on the primary's WAL alone.
pub(super) fn take_warning() -> bool {
    WARNED.with(|w| w.replace(false))
}

pub(super) fn connect(url: &str) -> Result<(Client, Session), postgres::Error> {
    let mut config: postgres::Config = url.parse()?;
    config.notice_callback(|notice| {
        if notice.parsed_severity() == Some(postgres::error::Severity::Warning) {
            tracing::warn!(
                message = notice.message(),
                detail = notice.detail().unwrap_or(""),
                "the database warned: the commit is answered once the standbys have it"
            );
            WARNED.with(|w| w.set(true));
        } else {
            tracing::info!(message = notice.message(), "a notice from the database");
        }
    });
    let mut client = config.connect(NoTls)?;
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

pub(super) fn ensure_schema(client: &mut Client) -> Result<Option<i32>, postgres::Error> {
    let mut tx = client.transaction()?;
    tx.execute("SELECT pg_advisory_xact_lock(7367823)", &[])?;
    tx.batch_execute(SCHEMA)?;
    let version: Option<i32> = tx
        .query_one("SELECT max(version) FROM pcx_schema", &[])?
        .get(0);
    match version {
        None => {
            tx.execute(
                "INSERT INTO pcx_schema (version) VALUES ($1)",
                &[&SCHEMA_VERSION],
            )?;
        }
        Some(1) => upgrade_from_1(&mut tx)?,
        Some(_) => {}
    }
    tx.commit()?;
    Ok(version)
}

/// Version 1 to 2, in the schema's transaction under its advisory lock (so whichever pcx
/// opens the database first upgrades it, whole or not at all, and the others find version
/// 2): the shared dynamo cache's rows gain their binding to the saver's record, made from the
/// saver's log for every row that log vouches for. A row it does not vouch for (its saver's
/// log holds no record that saved exactly it) stays unbound, and loaders refuse it.
fn upgrade_from_1(tx: &mut postgres::Transaction<'_>) -> Result<(), postgres::Error> {
    tx.batch_execute(
        "ALTER TABLE pcx_dynamo_cache ADD COLUMN IF NOT EXISTS saver_seq bigint, \
         ADD COLUMN IF NOT EXISTS saver_hash bytea",
    )?;
    let (bound, unbound) = super::binding::bind_version_1_rows(tx)?;
    tx.execute("UPDATE pcx_schema SET version = $1", &[&SCHEMA_VERSION])?;
    if unbound > 0 {
        tracing::warn!(bound, unbound,
            "upgraded the pcx schema to version 2: shared dynamo cache rows no saver's log vouches for are refused by every load");
    } else {
        tracing::info!(bound, "upgraded the pcx schema to version 2");
    }
    Ok(())
}

pub(super) fn i64_of(seq: u64) -> i64 {
    i64::try_from(seq).unwrap_or(i64::MAX)
}

pub(super) fn u64_of(seq: i64) -> u64 {
    u64::try_from(seq).unwrap_or(0)
}
