//! The event log's storage seam: append a group of records atomically and durably, read
//! records back in order, keep snapshots, and hold content blobs by digest.
//!
//! The [`Journal`] trait is the seam: [`crate::store::sled_journal::SledJournal`] is the
//! product (a second backend is a new file beside it), [`ClosedJournal`] stands in once a
//! context is closed, and [`FaultyJournal`] wraps any journal to inject failures in tests.
//! The journal stores bytes made by [`crate::store::record`] and never looks inside them.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::core::event::Event;
use crate::core::model::Digest;
use crate::store::error::StoreError;
use crate::store::record::{encode_saved_entry, EncodeError};

/// One group commit: event records (by sequence number), dynamo cache view writes, and an
/// optional snapshot. Applied all together or not at all, and durable once `commit` returns.
#[derive(Debug, Default)]
pub struct Commit {
    /// Content staged by the group's changes, stored by digest before its events.
    pub blobs: Vec<(Digest, std::sync::Arc<Vec<u8>>)>,
    pub records: Vec<(u64, Vec<u8>)>,
    pub cache_puts: Vec<(String, Vec<u8>)>,
    pub snapshot: Option<(u64, Vec<u8>)>,
    /// The group's changes to the dynamo cache, every namespace, for a journal whose cache
    /// is shared by a cluster (the PostgreSQL journal); the sled journal keeps its own view.
    pub shared_cache: Vec<SharedCacheOp>,
}

/// One change to a cluster's shared dynamo cache.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SharedCacheOp {
    /// An entry saved (its encoded bytes) by a context of this journal, bound to the record
    /// of the event that saved it (its sequence number and hash in this journal's log), so
    /// that a loader in another journal can check the cluster's row against that record
    /// before it takes the entry up (a row altered in the database is then refused).
    Put {
        namespace: String,
        key: String,
        entry: Vec<u8>,
        saved_by: String,
        saver_seq: u64,
        saver_hash: Digest,
    },
    Delete {
        namespace: String,
        key: String,
    },
    Clear {
        namespace: String,
    },
}

impl SharedCacheOp {
    /// What `event`, staged in `context` and `namespace`, changes in the shared cache; `journal`
    /// is this journal's name in the cluster, `seq` and `hash` place the event's record in its
    /// log. A loader checks a row by deriving it again from the saver's record: the same
    /// function on both sides, so what is checked is exactly what was written.
    pub fn of_event(
        event: &Event,
        journal: &str,
        context: &str,
        namespace: &str,
        (seq, hash): (u64, Digest),
    ) -> Result<Vec<SharedCacheOp>, EncodeError> {
        Ok(match event {
            Event::Requested { event, .. } => {
                return SharedCacheOp::of_event(event, journal, context, namespace, (seq, hash))
            }
            Event::Scoped {
                context,
                namespace,
                event,
            } => return SharedCacheOp::of_event(event, journal, context, namespace, (seq, hash)),
            Event::SavedToDynamoCache { entries } => entries
                .iter()
                .map(|(key, entry)| {
                    Ok(SharedCacheOp::Put {
                        namespace: namespace.to_string(),
                        key: key.clone(),
                        entry: encode_saved_entry(entry)?,
                        saved_by: format!("{journal}/{context}"),
                        saver_seq: seq,
                        saver_hash: hash,
                    })
                })
                .collect::<Result<_, EncodeError>>()?,
            // A copy adopted from the cluster (its saver names a journal) is not told back.
            Event::CacheEntryPut {
                namespace,
                key,
                entry,
                saved_by,
            } if !saved_by.contains('/') => vec![SharedCacheOp::Put {
                namespace: namespace.clone(),
                key: key.clone(),
                entry: encode_saved_entry(entry)?,
                saved_by: format!("{journal}/{saved_by}"),
                saver_seq: seq,
                saver_hash: hash,
            }],
            Event::CacheEntryDeleted { namespace, key } => vec![SharedCacheOp::Delete {
                namespace: namespace.clone(),
                key: key.clone(),
            }],
            Event::DynamoCacheCleared { namespace } => vec![SharedCacheOp::Clear {
                namespace: namespace.clone(),
            }],
            _ => Vec::new(),
        })
    }
}

/// A row of a cluster's shared dynamo cache, as a loader finds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SharedEntry {
    /// The entry's encoded bytes.
    pub entry: Vec<u8>,
    /// Who saved it, as `journal/context`.
    pub saved_by: String,
    /// Why the row is not what its saver's record saved (altered, forged, or bound to no
    /// record), so that it must not be taken up; `None` when the record vouches for it.
    pub unsound: Option<String>,
}

/// Stored records in order: `(sequence number, record bytes)`.
pub type Records<'a> = Box<dyn Iterator<Item = Result<(u64, Vec<u8>), StoreError>> + 'a>;

/// Bytes as a journal holds them (sled's own shared buffer, a database row's vector), handed
/// on without a copy: the snapshot opening starts from was copied out of sled whole (19 MB in
/// W2) before it was read.
pub struct Bytes(Box<dyn AsRef<[u8]> + Send + Sync>);

impl Bytes {
    pub fn new(bytes: impl AsRef<[u8]> + Send + Sync + 'static) -> Bytes {
        Bytes(Box::new(bytes))
    }
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        (*self.0).as_ref()
    }
}

impl PartialEq for Bytes {
    fn eq(&self, other: &Bytes) -> bool {
        **self == **other
    }
}

impl Default for Bytes {
    fn default() -> Bytes {
        Bytes::new(Vec::new())
    }
}

impl std::fmt::Debug for Bytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Bytes({} bytes)", self.len())
    }
}

/// Storage for the event log, snapshots, content blobs and the dynamo cache view.
pub trait Journal: Send + Sync + 'static {
    /// Reads content by digest.
    fn blob(&self, digest: &Digest) -> Result<Option<Vec<u8>>, StoreError>;
    /// Applies a group atomically and makes it durable. On error nothing of it remains.
    fn commit(&self, commit: &Commit) -> Result<(), StoreError>;
    /// Writes and syncs, ahead of their group, the contents a later [`Journal::commit`] will
    /// store, while the group before it commits: a journal whose contents go to a file of
    /// their own (the sled journal, for large groups) overlaps that file's sync with the
    /// previous group's. Nothing refers to what it writes until the group that stores those
    /// contents commits, so it may be skipped, and a failure is left to that commit to meet
    /// and report.
    fn prewrite(&self, _blobs: &[(Digest, std::sync::Arc<Vec<u8>>)]) {}
    /// Event records with sequence number `>= from`, in order.
    fn records(&self, from: u64) -> Records<'_>;
    /// The sequence number of the last stored event, if any.
    fn last_seq(&self) -> Result<Option<u64>, StoreError>;
    /// Sequence numbers of stored snapshots, newest first.
    fn snapshot_seqs(&self) -> Result<Vec<u64>, StoreError>;
    /// One stored snapshot record, as the journal holds it (not copied: a snapshot holds the
    /// whole state, 19 MB in W1).
    fn snapshot(&self, seq: u64) -> Result<Option<Bytes>, StoreError>;
    /// Lets go of the storage and takes it up again after a failure that may have left it
    /// unusable (sled keeps its first write error until reopened).
    fn reset(&self) -> Result<(), StoreError>;
    /// The compaction anchor (a snapshot record), if the log was compacted.
    fn anchor(&self) -> Result<Option<Vec<u8>>, StoreError>;
    /// Replaces the dynamo cache view with exactly these entries.
    fn rewrite_cache_view(&self, entries: &[(String, Vec<u8>)]) -> Result<(), StoreError>;
    /// The dynamo cache view's entries, in key order.
    fn cache_view(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError>;
    /// The records of lost tails an operator accepted (`pcx recover --accept-lost-tail`),
    /// oldest first: what was given up, for auditors. None unless the journal keeps them.
    fn lost_tails(&self) -> Result<Vec<Vec<u8>>, StoreError> {
        Ok(Vec::new())
    }
    /// A cluster's shared dynamo cache entry (its encoded bytes, and who saved it, as
    /// `journal/context`), for a journal that shares one with other journals. None when the
    /// cluster has no such entry, or the journal shares no cache (the sled journal).
    fn shared_cache_entry(
        &self,
        _namespace: &str,
        _key: &str,
    ) -> Result<Option<SharedEntry>, StoreError> {
        Ok(None)
    }
    /// This journal's name in a cluster (None for a journal of its own).
    fn cluster_name(&self) -> Option<&str> {
        None
    }
    /// The data directory the journal lives in (None for a journal in a database): where an
    /// export the journal's server writes must not go.
    fn data_dir(&self) -> Option<&std::path::Path> {
        None
    }
    /// Whether a commit is worth waiting a little for a fuller group: true for a journal whose
    /// commit is a network round trip of milliseconds (PostgreSQL with synchronous standbys),
    /// where closed-loop clients that send their next request as their answer arrives
    /// otherwise split into a group of one and a group of the rest, each a whole commit.
    /// False for a local disk, whose commit is short enough that waiting costs more than it
    /// gathers (measured on W3: it lowered throughput).
    fn gathers_groups(&self) -> bool {
        false
    }
    /// The last sequence number the journal records as committed apart from the records
    /// themselves (PostgreSQL's head row, moved in the same transaction as the records), so a
    /// log whose newest records were deleted is told from a log that ended there. None for
    /// a journal whose records are its only account of its end (sled).
    fn committed_end(&self) -> Result<Option<u64>, StoreError> {
        Ok(None)
    }
    /// Whether this process may still answer from what it holds in memory: always for a
    /// journal of its own. A journal a fleet shares says no once its writer's lease is lost
    /// or may have run out (a paused or cut-off holder), since another process may have
    /// written the journal meanwhile and the state here may be stale.
    fn check_held(&self) -> Result<(), StoreError> {
        Ok(())
    }
    /// The epoch of this writer's lease on a journal a fleet shares (None otherwise).
    fn lease_epoch(&self) -> Option<i64> {
        None
    }
    /// The journal itself, for what only one backend does, to be downcast to it: a running
    /// server's compaction in place (the sled journal replaces its directory under itself, the
    /// PostgreSQL journal compacts in one transaction). `None` for a wrapper that must not be
    /// gone around (a capped view), and the test doubles forward it.
    fn backend(&self) -> Option<&dyn std::any::Any> {
        None
    }
}

/// What a closed context holds in place of its journal: every operation says it is closed.
pub struct ClosedJournal;

impl Journal for ClosedJournal {
    fn blob(&self, _: &Digest) -> Result<Option<Vec<u8>>, StoreError> {
        Err(StoreError::Closed)
    }
    fn commit(&self, _: &Commit) -> Result<(), StoreError> {
        Err(StoreError::Closed)
    }
    fn records(&self, _: u64) -> Records<'_> {
        Box::new(std::iter::once(Err(StoreError::Closed)))
    }
    fn last_seq(&self) -> Result<Option<u64>, StoreError> {
        Err(StoreError::Closed)
    }
    fn snapshot_seqs(&self) -> Result<Vec<u64>, StoreError> {
        Err(StoreError::Closed)
    }
    fn snapshot(&self, _: u64) -> Result<Option<Bytes>, StoreError> {
        Err(StoreError::Closed)
    }
    fn reset(&self) -> Result<(), StoreError> {
        Err(StoreError::Closed)
    }
    fn anchor(&self) -> Result<Option<Vec<u8>>, StoreError> {
        Err(StoreError::Closed)
    }
    fn rewrite_cache_view(&self, _: &[(String, Vec<u8>)]) -> Result<(), StoreError> {
        Err(StoreError::Closed)
    }
    fn cache_view(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        Err(StoreError::Closed)
    }
}

/// A journal that fails on demand: for tests of what a failed commit or read does.
pub struct FaultyJournal<J> {
    inner: J,
    fail_commits: AtomicBool,
    fail_blob_reads: AtomicBool,
    poisoned: AtomicBool,
    commits: AtomicU64,
    resets: AtomicU64,
    /// Contents handed over to be written ahead of their group.
    prewrites: AtomicU64,
    /// Acting as a remote journal: each commit takes this many milliseconds, and groups are
    /// gathered (0: the inner journal's own behaviour).
    remote_ms: AtomicU64,
}

impl<J: Journal> FaultyJournal<J> {
    pub fn new(inner: J) -> Self {
        FaultyJournal {
            inner,
            fail_commits: AtomicBool::new(false),
            fail_blob_reads: AtomicBool::new(false),
            poisoned: AtomicBool::new(false),
            commits: AtomicU64::new(0),
            resets: AtomicU64::new(0),
            prewrites: AtomicU64::new(0),
            remote_ms: AtomicU64::new(0),
        }
    }
    /// From now on, behaves as a journal across a network: every commit takes `ms` more
    /// milliseconds, and the journal [gathers groups](Journal::gathers_groups).
    pub fn act_remote(&self, ms: u64) {
        self.remote_ms.store(ms, Ordering::SeqCst);
    }
    /// Behaves as sled after a failed write: the next commit fails with an IO error, and so
    /// does every commit and read after it, until the journal is reset (reopened).
    pub fn poison(&self) {
        self.poisoned.store(true, Ordering::SeqCst);
    }
    /// How many times the journal was reset.
    pub fn resets(&self) -> u64 {
        self.resets.load(Ordering::SeqCst)
    }
    fn sled_failure(&self, op: &'static str) -> Result<(), StoreError> {
        if self.poisoned.load(Ordering::SeqCst) {
            return Err(StoreError::Sled {
                op,
                source: sled::Error::Io(std::io::Error::other(
                    "injected: sled keeps its first write error",
                )),
            });
        }
        Ok(())
    }
    /// From now on, every commit fails (and leaves nothing behind) until set back.
    pub fn fail_commits(&self, on: bool) {
        self.fail_commits.store(on, Ordering::SeqCst);
    }
    /// From now on, reading a blob fails until set back.
    pub fn fail_blob_reads(&self, on: bool) {
        self.fail_blob_reads.store(on, Ordering::SeqCst);
    }
    /// How many commits succeeded.
    pub fn commits(&self) -> u64 {
        self.commits.load(Ordering::SeqCst)
    }
    /// How many groups' contents were handed over to be written ahead.
    pub fn prewrites(&self) -> u64 {
        self.prewrites.load(Ordering::SeqCst)
    }
}

impl<J: Journal> Journal for FaultyJournal<J> {
    fn blob(&self, digest: &Digest) -> Result<Option<Vec<u8>>, StoreError> {
        self.sled_failure("reading a blob")?;
        if self.fail_blob_reads.load(Ordering::SeqCst) {
            return Err(StoreError::Injected {
                op: "reading a blob",
            });
        }
        self.inner.blob(digest)
    }
    fn commit(&self, commit: &Commit) -> Result<(), StoreError> {
        let remote_ms = self.remote_ms.load(Ordering::SeqCst);
        if remote_ms > 0 {
            std::thread::sleep(std::time::Duration::from_millis(remote_ms));
        }
        self.sled_failure("appending events")?;
        if self.fail_commits.load(Ordering::SeqCst) {
            return Err(StoreError::Injected {
                op: "appending events",
            });
        }
        self.inner.commit(commit)?;
        self.commits.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn prewrite(&self, blobs: &[(Digest, std::sync::Arc<Vec<u8>>)]) {
        if self.sled_failure("writing content").is_ok() && !self.fail_commits.load(Ordering::SeqCst)
        {
            self.prewrites.fetch_add(1, Ordering::SeqCst);
            self.inner.prewrite(blobs)
        }
    }
    fn records(&self, from: u64) -> Records<'_> {
        if let Err(e) = self.sled_failure("reading events") {
            return Box::new(std::iter::once(Err(e)));
        }
        self.inner.records(from)
    }
    fn last_seq(&self) -> Result<Option<u64>, StoreError> {
        self.inner.last_seq()
    }
    fn snapshot_seqs(&self) -> Result<Vec<u64>, StoreError> {
        self.inner.snapshot_seqs()
    }
    fn snapshot(&self, seq: u64) -> Result<Option<Bytes>, StoreError> {
        self.inner.snapshot(seq)
    }
    fn reset(&self) -> Result<(), StoreError> {
        self.inner.reset()?;
        self.poisoned.store(false, Ordering::SeqCst);
        self.resets.fetch_add(1, Ordering::SeqCst);
        Ok(())
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
    fn shared_cache_entry(
        &self,
        namespace: &str,
        key: &str,
    ) -> Result<Option<SharedEntry>, StoreError> {
        self.inner.shared_cache_entry(namespace, key)
    }
    fn gathers_groups(&self) -> bool {
        self.remote_ms.load(Ordering::SeqCst) > 0 || self.inner.gathers_groups()
    }
    fn committed_end(&self) -> Result<Option<u64>, StoreError> {
        self.inner.committed_end()
    }
    fn cluster_name(&self) -> Option<&str> {
        self.inner.cluster_name()
    }
    fn check_held(&self) -> Result<(), StoreError> {
        self.inner.check_held()
    }
    fn lease_epoch(&self) -> Option<i64> {
        self.inner.lease_epoch()
    }
    fn backend(&self) -> Option<&dyn std::any::Any> {
        self.inner.backend()
    }
}

impl<J: Journal> Journal for std::sync::Arc<J> {
    fn blob(&self, digest: &Digest) -> Result<Option<Vec<u8>>, StoreError> {
        (**self).blob(digest)
    }
    fn commit(&self, commit: &Commit) -> Result<(), StoreError> {
        (**self).commit(commit)
    }
    fn prewrite(&self, blobs: &[(Digest, std::sync::Arc<Vec<u8>>)]) {
        (**self).prewrite(blobs)
    }
    fn records(&self, from: u64) -> Records<'_> {
        (**self).records(from)
    }
    fn last_seq(&self) -> Result<Option<u64>, StoreError> {
        (**self).last_seq()
    }
    fn snapshot_seqs(&self) -> Result<Vec<u64>, StoreError> {
        (**self).snapshot_seqs()
    }
    fn snapshot(&self, seq: u64) -> Result<Option<Bytes>, StoreError> {
        (**self).snapshot(seq)
    }
    fn reset(&self) -> Result<(), StoreError> {
        (**self).reset()
    }
    fn anchor(&self) -> Result<Option<Vec<u8>>, StoreError> {
        (**self).anchor()
    }
    fn rewrite_cache_view(&self, entries: &[(String, Vec<u8>)]) -> Result<(), StoreError> {
        (**self).rewrite_cache_view(entries)
    }
    fn cache_view(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        (**self).cache_view()
    }
    fn lost_tails(&self) -> Result<Vec<Vec<u8>>, StoreError> {
        (**self).lost_tails()
    }
    fn shared_cache_entry(
        &self,
        namespace: &str,
        key: &str,
    ) -> Result<Option<SharedEntry>, StoreError> {
        (**self).shared_cache_entry(namespace, key)
    }
    fn cluster_name(&self) -> Option<&str> {
        (**self).cluster_name()
    }
    fn gathers_groups(&self) -> bool {
        (**self).gathers_groups()
    }
    fn committed_end(&self) -> Result<Option<u64>, StoreError> {
        (**self).committed_end()
    }
    fn check_held(&self) -> Result<(), StoreError> {
        (**self).check_held()
    }
    fn lease_epoch(&self) -> Option<i64> {
        (**self).lease_epoch()
    }
    fn backend(&self) -> Option<&dyn std::any::Any> {
        (**self).backend()
    }
}
