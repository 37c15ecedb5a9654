//! The sled-backed journal (sled 0.34.7): records one page per group commit, contents in
//! packs or content files, snapshots, the dynamo cache view and the compaction anchor, made
//! durable by sled's flush plus an explicit `fdatasync` of its files.
//!
//! The journal is four files: this one (the journal itself: opening, commits, durability,
//! and the `Journal` trait's reads and writes), [`handles`] (opening sled and its trees, and
//! the file-system facts a commit needs), [`contents`] (where contents go: sled packs or
//! content files, and the in-memory index of them) and [`in_place`] (replacing the directory
//! while the journal is open: a running server's compaction).

mod contents;
mod handles;
mod in_place;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::core::model::Digest;
use crate::store::content::ContentFiles;
use crate::store::error::{OpenError, StoreError};
use crate::store::journal::{Bytes, Commit, Journal, Records};
use crate::store::pack::{page_records, pages};
use crate::store::record::{key_seq, seq_key};

use contents::{load_contents, Contents, Staged, Written};
use handles::{free_bytes, open_handles, sled_err, sync_dir, Handles};

/// The key of the compaction anchor in the `meta` tree.
const ANCHOR_KEY: &[u8] = b"anchor";

/// The prefix of the keys of accepted lost tails in the `meta` tree (then a big-endian u64
/// counting them from 0).
const LOST_TAIL_PREFIX: &[u8] = b"lost_tail/";

/// Free space kept in reserve for sled's own bookkeeping (a few of its 512 KiB segments).
const SPACE_MARGIN: u64 = 4 << 20;

/// How many snapshots are kept: the newest, and one before it to fall back to.
const SNAPSHOTS_KEPT: usize = 2;

///
/// sled keeps the first write error it meets (a full disk, say) and fails everything after
/// it until the database is opened again; [`Journal::reset`] does that, so the context recovers
/// without a restart once the cause is gone.
pub struct SledJournal {
    handles: std::sync::RwLock<Option<std::sync::Arc<Handles>>>,
    dir: PathBuf,
    cache_capacity: u64,
    /// The highest sled blob file already synced (sled names them by log sequence number and
    /// never syncs them itself).
    synced_blob_files: Mutex<u64>,
    /// Where every packed content is, read from `pack_index` at open: a read goes straight to
    /// its pack, and a content already stored is not stored again.
    contents: std::sync::RwLock<Contents>,
    /// Writers of packs take turns, so two never number a pack alike.
    writer: Mutex<()>,
    files: ContentFiles,
    /// Contents written and synced to a content file ahead of their group
    /// ([`Journal::prewrite`]), not yet in the index: the group that stores them writes
    /// their index entries instead of writing them again.
    prewritten: Mutex<std::collections::HashMap<Digest, crate::store::pack::Loc>>,
    /// Held (shared) by whatever reads or writes contents through the index and the content
    /// files together (`blob`, contents written ahead), and exclusively while the directory
    /// under them is replaced ([`in_place`]), so none of them mixes the old directory's index
    /// with the new one's files.
    swapping: std::sync::RwLock<()>,
    /// The data directory's lock, held as long as the journal (none for the side directories
    /// a compaction or import writes under the lock it holds itself). Last, so it goes last.
    _lock: Option<crate::store::swap::DirLock>,
}

impl SledJournal {
    /// Opens (creating if missing) the data directory. Takes its lock first (see
    /// [`crate::store::swap`]), then finishes or undoes a compaction or import a crash interrupted.
    pub fn open(dir: &Path, cache_capacity: u64) -> Result<SledJournal, OpenError> {
        SledJournal::open_locking(dir, cache_capacity, true)
    }

    /// Opens the data directory as [`SledJournal::open`] does, but never creates it: a
    /// missing one is [`OpenError::Missing`] (what read-only commands want).
    pub fn open_existing(dir: &Path, cache_capacity: u64) -> Result<SledJournal, OpenError> {
        SledJournal::open_locking(dir, cache_capacity, false)
    }

    fn open_locking(
        dir: &Path,
        cache_capacity: u64,
        create: bool,
    ) -> Result<SledJournal, OpenError> {
        let dir = &crate::store::swap::resolve(dir);
        let lock =
            crate::store::swap::DirLock::acquire(dir, crate::store::swap::LOCK_PATIENCE, create)?;
        crate::store::swap::repair(dir, &lock)?;
        if !create && !dir.exists() {
            return Err(OpenError::Missing {
                path: dir.to_path_buf(),
            });
        }
        let mut journal = SledJournal::open_held(dir, cache_capacity)?;
        journal._lock = Some(lock);
        Ok(journal)
    }

    /// Opens (creating if missing) a directory whose lock the caller holds: a compaction or
    /// import's own opens of the data directory and of the side directory it writes.
    pub(crate) fn open_held(dir: &Path, cache_capacity: u64) -> Result<SledJournal, OpenError> {
        // Readable by its user only, as the server's socket is: compiled artifacts and the
        // model sources in entries are there in the clear (a directory made 0755 let every
        // user of the machine read what the 0600 socket kept from them). An existing
        // directory keeps the mode it has.
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| OpenError::CreateDir {
                path: dir.to_path_buf(),
                source,
            })?;
        let handles = open_handles(dir, cache_capacity)?;
        let contents = load_contents(&handles, dir).map_err(|what| OpenError::Damaged {
            path: dir.to_path_buf(),
            what,
        })?;
        let files = ContentFiles::open(dir).map_err(|e| OpenError::DataFile {
            path: dir.join("content"),
            source: std::io::Error::other(e.to_string()),
        })?;
        // The directory entries of sled's files must survive power loss too.
        sync_dir(dir).map_err(|source| OpenError::DataFile {
            path: dir.to_path_buf(),
            source,
        })?;
        Ok(SledJournal {
            handles: std::sync::RwLock::new(Some(std::sync::Arc::new(handles))),
            dir: dir.to_path_buf(),
            cache_capacity,
            synced_blob_files: Mutex::new(0),
            contents: std::sync::RwLock::new(contents),
            writer: Mutex::new(()),
            prewritten: Mutex::new(std::collections::HashMap::new()),
            files,
            swapping: std::sync::RwLock::new(()),
            _lock: None,
        })
    }

    /// A failed read of sled, said with the damaged file.
    fn read_err(&self, op: &'static str) -> impl FnOnce(sled::Error) -> StoreError + '_ {
        move |source| StoreError::SledRead {
            op,
            what: crate::store::damage::diagnose(&self.dir, &source),
            source,
        }
    }

    /// The writer's turn, then sled's handles, in that order: a write waiting for its turn
    /// must not hold on to the handles of a directory a compaction in place is replacing.
    fn writers_turn(
        &self,
    ) -> Result<(std::sync::MutexGuard<'_, ()>, std::sync::Arc<Handles>), StoreError> {
        let writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        Ok((writer, self.h()?))
    }

    /// sled's handles, or an error while they are being reopened.
    fn h(&self) -> Result<std::sync::Arc<Handles>, StoreError> {
        self.handles
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or(StoreError::Unavailable)
    }

    /// Refuses a write that would leave less than a margin free: sled poisons itself on a
    /// failed write, and refusing before it writes keeps reads working on a full disk.
    fn ensure_space(&self, bytes: u64) -> Result<(), StoreError> {
        let Some(available) = free_bytes(&self.dir) else {
            return Ok(());
        };
        let needed = bytes.saturating_mul(2).saturating_add(SPACE_MARGIN);
        if available < needed {
            return Err(StoreError::NoSpace { needed, available });
        }
        Ok(())
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The cache size sled was opened with (a copy of the directory is opened alike).
    pub fn cache_capacity(&self) -> u64 {
        self.cache_capacity
    }

    /// Sets the compaction anchor and makes it durable (compaction and import only).
    pub fn set_anchor(&self, snapshot: &[u8]) -> Result<(), StoreError> {
        let h = self.h()?;
        h.meta
            .insert(ANCHOR_KEY, snapshot)
            .map_err(sled_err("writing the anchor"))?;
        self.make_durable()
    }

    /// Records an accepted lost tail and removes the snapshots ahead of the log that proved
    /// it (`record` keeps them), durably. The record is written first, so no crash leaves
    /// the snapshots gone without it.
    pub fn accept_lost_tail(&self, record: &[u8], ahead: &[u64]) -> Result<(), StoreError> {
        let (_writer, h) = self.writers_turn()?;
        let n = h.meta.scan_prefix(LOST_TAIL_PREFIX).count() as u64;
        let mut key = LOST_TAIL_PREFIX.to_vec();
        key.extend_from_slice(&seq_key(n));
        h.meta
            .insert(key, record)
            .map_err(sled_err("recording the lost tail"))?;
        for seq in ahead {
            h.snapshots
                .remove(seq_key(*seq))
                .map_err(sled_err("removing a snapshot ahead of the log"))?;
        }
        self.make_durable()
    }

    /// Empties every tree (a refused import takes back what it wrote).
    pub fn wipe(&self) -> Result<(), StoreError> {
        let (_writer, h) = self.writers_turn()?;
        let trees = [
            &h.pages,
            &h.packs,
            &h.pack_index,
            &h.legacy_events,
            &h.legacy_blobs,
            &h.snapshots,
            &h.cache,
            &h.meta,
        ];
        for tree in trees {
            tree.clear()
                .map_err(sled_err("emptying the data directory"))?;
        }
        *self.contents_mut() = Contents::default();
        self.files.remove_all()?;
        self.make_durable()
    }

    /// Every stored blob digest (compaction only).
    pub fn blob_digests(&self) -> Result<Vec<Digest>, StoreError> {
        let h = self.h()?;
        let mut all: Vec<Digest> = self.contents_ref().locs.keys().copied().collect();
        for k in h.legacy_blobs.iter().keys() {
            let k = k.map_err(self.read_err("listing blobs"))?;
            if let Ok(a) = <[u8; 32]>::try_from(k.as_ref()) {
                all.push(Digest(a));
            }
        }
        Ok(all)
    }
}

impl SledJournal {
    /// Flush sled, then `fdatasync` its data file and any new large-value files.
    fn make_durable(&self) -> Result<(), StoreError> {
        let h = self.h()?;
        h.db.flush().map_err(sled_err("flushing the log"))?;
        h.data_file.sync_data().map_err(|source| StoreError::Io {
            op: "syncing",
            path: self.dir.join("db"),
            source,
        })?;
        self.sync_blob_files()?;
        // Last, so that a removal before the answer is seen: sled writes on through its open
        // file after `rm -rf` of the directory, and every flush succeeds, into nothing.
        Self::still_linked(&h.data_file, &self.dir.join("db"))
    }

    /// A refusal once `file` (open at `path`) has no name left on disk.
    fn still_linked(file: &File, path: &Path) -> Result<(), StoreError> {
        use std::os::unix::fs::MetadataExt;
        let meta = file.metadata().map_err(|source| StoreError::Io {
            op: "checking",
            path: path.to_path_buf(),
            source,
        })?;
        if meta.nlink() == 0 {
            return Err(StoreError::Removed {
                path: path.to_path_buf(),
            });
        }
        Ok(())
    }

    /// sled writes values too large for a log segment to files under `blobs/` without syncing
    /// them; sync every one newer than the last synced, then the directory.
    fn sync_blob_files(&self) -> Result<(), StoreError> {
        let dir = self.dir.join("blobs");
        let io = |op, path: &Path| {
            let path = path.to_path_buf();
            move |source| StoreError::Io { op, path, source }
        };
        let mut synced = self
            .synced_blob_files
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let mut newest = *synced;
        let listing = match std::fs::read_dir(&dir) {
            Ok(l) => l,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io("listing", &dir)(e)),
        };
        let mut any = false;
        for entry in listing {
            let entry = entry.map_err(io("listing", &dir))?;
            let Some(lsn) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u64>().ok())
            else {
                continue;
            };
            if lsn <= *synced {
                continue;
            }
            let path = entry.path();
            match File::open(&path) {
                Ok(f) => f.sync_data().map_err(io("syncing", &path))?,
                // sled may have garbage-collected it meanwhile.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io("opening", &path)(e)),
            }
            newest = newest.max(lsn);
            any = true;
        }
        if any {
            sync_dir(&dir).map_err(io("syncing", &dir))?;
            *synced = newest;
        }
        Ok(())
    }

    fn try_commit(
        &self,
        h: &Handles,
        c: &Commit,
        staged: &Staged<'_>,
        written: &mut Written,
    ) -> Result<(), StoreError> {
        let bytes: usize = staged.fresh.iter().map(|p| p.1.len()).sum::<usize>()
            + c.records.iter().map(|r| r.1.len()).sum::<usize>()
            + c.cache_puts.iter().map(|p| p.1.len()).sum::<usize>()
            + c.snapshot.as_ref().map_or(0, |s| s.1.len());
        self.ensure_space(bytes as u64)?;
        // One key at a time, in an order that makes every prefix whole: sled recovers a
        // prefix of its log (one writer, in order), so after a crash an event has its content
        // and its page's predecessors, and whatever else of this group survives (snapshot,
        // cache view) has its events. No `apply_batch`: in sled 0.34.7 each batch waits on
        // the log (about 50 µs before the flush, measured) and doubles the flush that
        // follows, and a prefix of a group is never answered, so its atomicity buys nothing.
        self.write_contents(h, staged, written)?;
        for (first, page) in pages(&c.records) {
            h.pages
                .insert(seq_key(first), page)
                .map_err(sled_err("appending events"))?;
        }
        if let Some((seq, bytes)) = &c.snapshot {
            h.snapshots
                .insert(seq_key(*seq), bytes.as_slice())
                .map_err(sled_err("writing a snapshot"))?;
            // (A snapshot written again at the same place replaces that one.)
            let older: Vec<u64> = self
                .snapshot_seqs()?
                .into_iter()
                .filter(|s| s != seq)
                .skip(SNAPSHOTS_KEPT - 1)
                .collect();
            for s in older {
                h.snapshots
                    .remove(seq_key(s))
                    .map_err(sled_err("dropping an old snapshot"))?;
            }
        }
        // The view is checked against the events at open and rewritten if it differs.
        for (key, bytes) in &c.cache_puts {
            h.cache
                .insert(key.as_bytes(), bytes.as_slice())
                .map_err(sled_err("writing the dynamo cache"))?;
        }
        self.make_durable()
    }
}

impl Journal for SledJournal {
    fn data_dir(&self) -> Option<&Path> {
        Some(&self.dir)
    }
    fn backend(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }
    fn blob(&self, digest: &Digest) -> Result<Option<Vec<u8>>, StoreError> {
        let _swapping = self.swapping.read().unwrap_or_else(|p| p.into_inner());
        let h = self.h()?;
        let loc = self.contents_ref().locs.get(digest).copied();
        let Some(loc) = loc else {
            let found = h
                .legacy_blobs
                .get(digest.0)
                .map_err(self.read_err("reading a blob"))?;
            return match found {
                Some(c) if Digest::of(&c) != *digest => Err(StoreError::Damaged {
                    what: format!(
                        "content {} in sled tree `blobs` does not hash to its digest",
                        digest.to_hex()
                    ),
                }),
                found => Ok(found.map(|c| c.to_vec())),
            };
        };
        self.read_at(&h, digest, loc).map(Some)
    }

    fn commit(&self, c: &Commit) -> Result<(), StoreError> {
        let (_writer, h) = self.writers_turn()?;
        let staged = self.stage(&h, c.blobs.iter().map(|(d, b)| (d, b.as_slice())));
        let mut written = Written::default();
        match self.try_commit(&h, c, &staged, &mut written) {
            Ok(()) => {
                self.publish(written);
                Ok(())
            }
            Err(e) => {
                // Take back whatever part of the group reached sled, so a failed change is
                // not made durable by a later flush. The cache view is rebuilt by the caller.
                // The snapshot goes first: sled recovers a prefix of its log, and a prefix
                // that took back the events but not their snapshot would leave a snapshot
                // ahead of the log, which opening refuses as a lost tail.
                if let Some((seq, _)) = &c.snapshot {
                    let _ = h.snapshots.remove(seq_key(*seq));
                }
                let mut batch = sled::Batch::default();
                for (first, _) in pages(&c.records) {
                    batch.remove(&seq_key(first));
                }
                let _ = h.pages.apply_batch(batch);
                Self::unwrite_contents(&h, &written);
                let _ = h.db.flush();
                Err(e)
            }
        }
    }

    fn prewrite(&self, blobs: &[(Digest, std::sync::Arc<Vec<u8>>)]) {
        if let Err(e) = self.write_ahead(blobs.iter().map(|(d, b)| (d, b.as_slice()))) {
            // Its group writes these contents itself, and meets the failure if it stays.
            tracing::debug!(error = %e, "contents not written ahead of their group");
        }
    }

    fn records(&self, from: u64) -> Records<'_> {
        let h = match self.h() {
            Ok(h) => h,
            Err(e) => return Box::new(std::iter::once(Err(e))),
        };
        // sled's iterators hold their own handles on the trees. Keys are written only by
        // `commit`; a key of another length is itself damage, reported as sequence number
        // u64::MAX so replay names it.
        // A failure inside sled is said with the file it is in and the last event read.
        let dir = self.dir.clone();
        let failed = move |after: u64, source: sled::Error| StoreError::SledEvents {
            after,
            what: crate::store::damage::diagnose(&dir, &source),
            source,
        };
        let in_legacy = failed.clone();
        let mut legacy_read = from.saturating_sub(1);
        let legacy = h
            .legacy_events
            .range(seq_key(from)..)
            .map(move |item| match item {
                Err(e) => Err(in_legacy(legacy_read, e)),
                Ok((k, v)) => {
                    let seq = key_seq(&k).unwrap_or(u64::MAX);
                    legacy_read = seq;
                    Ok((seq, v.to_vec()))
                }
            });
        // The page holding `from` begins at or before it.
        let start = match h.pages.range(..=seq_key(from)).next_back() {
            Some(Ok((k, _))) => k.to_vec(),
            _ => seq_key(from).to_vec(),
        };
        let mut read = from.saturating_sub(1);
        let pages = h.pages.range(start..).flat_map(move |item| {
            let page: Vec<Result<(u64, Vec<u8>), StoreError>> = match item {
                Err(e) => vec![Err(failed(read, e))],
                Ok((k, v)) => page_records(&v, key_seq(&k).unwrap_or(u64::MAX))
                    .into_iter()
                    .filter(|(seq, _)| *seq >= from)
                    .map(|(seq, r)| Ok((seq, r.to_vec())))
                    .collect(),
            };
            if let Some(Ok((seq, _))) = page.last() {
                read = read.max(*seq);
            }
            page
        });
        Box::new(legacy.chain(pages))
    }

    fn last_seq(&self) -> Result<Option<u64>, StoreError> {
        let h = self.h()?;
        let legacy = h
            .legacy_events
            .last()
            .map_err(self.read_err("reading events"))?
            .and_then(|(k, _)| key_seq(&k));
        let paged = h
            .pages
            .last()
            .map_err(self.read_err("reading events"))?
            .and_then(|(k, v)| {
                let first = key_seq(&k)?;
                page_records(&v, first).last().map(|(seq, _)| *seq)
            });
        Ok(legacy.max(paged))
    }

    fn snapshot_seqs(&self) -> Result<Vec<u64>, StoreError> {
        let h = self.h()?;
        let mut seqs = Vec::new();
        for item in h.snapshots.iter().keys().rev() {
            let k = item.map_err(self.read_err("listing snapshots"))?;
            if let Some(s) = key_seq(&k) {
                seqs.push(s);
            }
        }
        Ok(seqs)
    }

    fn snapshot(&self, seq: u64) -> Result<Option<Bytes>, StoreError> {
        let h = self.h()?;
        // A large value is sled's own shared buffer: handed on, not copied.
        Ok(h.snapshots
            .get(seq_key(seq))
            .map_err(self.read_err("reading a snapshot"))?
            .map(Bytes::new))
    }

    fn reset(&self) -> Result<(), StoreError> {
        // Not in the middle of a commit: it finishes on the old handles first.
        let _writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let mut slot = self.handles.write().unwrap_or_else(|p| p.into_inner());
        // Drop ours first: sled's lock on the directory goes with its last handle (an
        // iterator still held elsewhere may keep it a moment; opening waits for that).
        *slot = None;
        self.take_up(&mut slot)?;
        tracing::info!(dir = %self.dir.display(), "event log reopened");
        Ok(())
    }

    fn anchor(&self) -> Result<Option<Vec<u8>>, StoreError> {
        let h = self.h()?;
        Ok(h.meta
            .get(ANCHOR_KEY)
            .map_err(self.read_err("reading the anchor"))?
            .map(|v| v.to_vec()))
    }

    fn rewrite_cache_view(&self, entries: &[(String, Vec<u8>)]) -> Result<(), StoreError> {
        let (_writer, h) = self.writers_turn()?;
        h.cache
            .clear()
            .map_err(sled_err("rewriting the dynamo cache"))?;
        let mut batch = sled::Batch::default();
        for (key, bytes) in entries {
            batch.insert(key.as_bytes(), bytes.as_slice());
        }
        h.cache
            .apply_batch(batch)
            .map_err(sled_err("rewriting the dynamo cache"))?;
        self.make_durable()
    }

    fn cache_view(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let h = self.h()?;
        h.cache
            .iter()
            .map(|item| {
                let (k, v) = item.map_err(self.read_err("reading the dynamo cache"))?;
                Ok((String::from_utf8_lossy(&k).into_owned(), v.to_vec()))
            })
            .collect()
    }

    fn lost_tails(&self) -> Result<Vec<Vec<u8>>, StoreError> {
        let h = self.h()?;
        h.meta
            .scan_prefix(LOST_TAIL_PREFIX)
            .values()
            .map(|v| Ok(v.map_err(self.read_err("reading the lost tails"))?.to_vec()))
            .collect()
    }
}
