//! The store's errors: what failed while storing or reading ([`StoreError`]) and why a data
//! directory could not be opened ([`OpenError`]). Defined here, where they arise; the actor
//! wraps them in its own error for callers.

use std::path::{Path, PathBuf};

/// A storage failure, with what was being done.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage failed while {op}: {}", relative_fault(.source))]
    Sled {
        op: &'static str,
        #[source]
        source: sled::Error,
    },
    /// A read failed inside sled (`what` names the damaged file, as
    /// [`crate::store::damage::diagnose`] found it).
    #[error("storage failed while {op}: {what}")]
    SledRead {
        op: &'static str,
        what: String,
        #[source]
        source: sled::Error,
    },
    /// Reading the log failed inside sled; every event up to `after` was read.
    #[error("storage failed while reading the events after event {after}: {what}")]
    SledEvents {
        after: u64,
        /// Which of sled's files is damaged, as [`crate::store::damage::diagnose`] found.
        what: String,
        #[source]
        source: sled::Error,
    },
    #[error("storage failed while {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the data directory is closed")]
    Closed,
    /// The log's file was unlinked while in use (the data directory removed under a running
    /// pcx): what is written now goes to a file no one can open again, so it is refused.
    #[error(
        "the event log {path} was deleted while in use (its data directory removed?): \
         nothing written now would survive, so nothing was acknowledged; restart pcx on a data \
         directory that is there"
    )]
    Removed { path: PathBuf },
    #[error("No space left on device: a write needs about {needed} bytes free, {available} are")]
    NoSpace { needed: u64, available: u64 },
    #[error("the event log is being reopened after a storage failure; try again")]
    Unavailable,
    #[error("storage failed while {op}: injected fault")]
    Injected { op: &'static str },
    #[error("the content store is damaged: {what}")]
    Damaged { what: String },
    /// The database (the PostgreSQL journal) failed or could not be reached.
    #[error("the database failed while {op}: {what}")]
    Database { op: &'static str, what: String },
    /// This writer may no longer write the journal: its lease ran out or another writer took
    /// the journal over (PostgreSQL journal). Nothing of the refused group was stored.
    #[error("journal {journal} is fenced: {why}; nothing was written")]
    Fenced { journal: String, why: String },
}

impl StoreError {
    /// True when the failure is the disk being full.
    pub fn is_no_space(&self) -> bool {
        if matches!(self, StoreError::NoSpace { .. }) {
            return true;
        }
        let io = match self {
            StoreError::Io { source, .. } => Some(source),
            StoreError::Sled {
                source: sled::Error::Io(e),
                ..
            } => Some(e),
            _ => None,
        };
        io.is_some_and(|e| e.raw_os_error() == Some(28) || e.to_string().contains("No space left"))
    }
}

/// sled's error in words naming its file, relative to the data directory.
fn relative_fault(e: &sled::Error) -> String {
    crate::store::damage::sled_fault(Path::new(""), e)
}

/// Why a data directory could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cannot create data directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("data directory {path} is in use: another pcx process (or context) has it open, and one writer per data directory is allowed")]
    Locked { path: PathBuf },
    #[error("cannot open the event log in {path}: {what}")]
    Sled {
        path: PathBuf,
        /// Which of sled's files is damaged, as [`crate::store::damage::diagnose`] found.
        what: String,
        #[source]
        source: sled::Error,
    },
    #[error("the content index in {path} is damaged: {what}")]
    Damaged { path: PathBuf, what: String },
    /// sled's data file is gone from a directory sled has written (its configuration is
    /// there): opening would start an empty log in its place and serve it as this one.
    #[error(
        "sled's data file {path} is missing: the data directory's log is gone (opening would \
         start an empty one in its place)"
    )]
    DataFileMissing { path: PathBuf },
    /// sled's log fails its checks before its end, at a place sled had made durable: not a
    /// write a crash cut short but damage, past which sled would silently drop the rest of
    /// the log (see [`crate::store::sled_log`]). Found before sled opened; nothing changed.
    #[error(
        "sled's data file {file} is damaged at byte {offset}: {what}, yet the log goes on \
         after it (sled had made it durable up to log position {durable}), so this is not a \
         write a crash cut short; opening would silently drop everything after byte {offset}, \
         so the data directory is not opened and nothing in it was changed (`pcx salvage \
         --scan` finds every event that still verifies, past the damage too)"
    )]
    SledLogDamaged {
        file: PathBuf,
        offset: u64,
        /// What fails there.
        what: String,
        /// The log position (sled's) up to which the log was on disk, whole, before.
        durable: i64,
    },
    /// A large-value file fails its checksum, and the log record pointing to it lies where
    /// sled had made the log durable: sled, opening, would end the log at that record and
    /// silently drop everything after it. Found before sled opened; nothing changed.
    #[error(
        "sled's large-value file {blob} is damaged (it fails its checksum); the record of \
         sled's log pointing to it, at byte {offset} of {file}, lies where the log was durable \
         (up to log position {durable}), and opening would silently drop everything after it, \
         so the data directory is not opened and nothing in it was changed (`pcx salvage \
         --scan` finds every event that still verifies)"
    )]
    SledBlobDamaged {
        blob: PathBuf,
        file: PathBuf,
        offset: u64,
        durable: i64,
    },
    #[error("cannot read sled's data file {file} to check its log before opening: {source}")]
    SledLogUnreadable {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open {path} for syncing: {source}")]
    DataFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open the journal in the database {url}: {what}")]
    Database { url: String, what: String },
    /// `journal = "postgres"` asked of a build without the `postgres` feature.
    #[error("the journal is configured in PostgreSQL (`journal` = \"postgres\"), but this pcx was built without PostgreSQL support: build it with `--features postgres`")]
    NoPostgresSupport,
    #[error("journal {journal} is served by {holder}, whose lease has {remaining_ms} ms to run: one writer per journal (wait for it with journal_wait_ms)")]
    LeaseHeld {
        journal: String,
        holder: String,
        remaining_ms: i64,
    },
    #[error("data directory {path} does not exist: nothing has been recorded there")]
    Missing { path: PathBuf },
    /// The lock beside the directory, or an interrupted compaction or import left there.
    #[error(transparent)]
    Swap(crate::store::swap::SwapError),
}

impl From<crate::store::swap::SwapError> for OpenError {
    fn from(e: crate::store::swap::SwapError) -> Self {
        use crate::store::swap::SwapError;
        match e {
            SwapError::Locked { dir } => OpenError::Locked { path: dir },
            SwapError::Missing { dir } => OpenError::Missing { path: dir },
            other => OpenError::Swap(other),
        }
    }
}
