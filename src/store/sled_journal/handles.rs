//! sled's handles on one data directory: opening sled (after the pre-open check of its log,
//! and waiting briefly for a lock a closing sled still holds), its trees, its data file, and
//! the file-system facts a commit needs (free space, syncing a directory). Apart from the
//! journal so that what sled is opened with is read in one place.

use std::fs::File;
use std::path::Path;

use crate::store::error::{OpenError, StoreError};

/// A failed sled call, named by what it was doing.
pub(super) fn sled_err(op: &'static str) -> impl FnOnce(sled::Error) -> StoreError {
    move |source| StoreError::Sled { op, source }
}

/// A failure of sled while opening `dir`, with the damaged file found.
pub(super) fn sled_open_error(dir: &Path, source: sled::Error) -> OpenError {
    OpenError::Sled {
        path: dir.to_path_buf(),
        what: crate::store::damage::diagnose(dir, &source),
        source,
    }
}

/// How long opening waits for a data directory that is locked.
const LOCK_PATIENCE: std::time::Duration = std::time::Duration::from_secs(2);

/// sled's handles on one data directory.
pub(super) struct Handles {
    pub(super) db: sled::Db,
    /// Records, one page per group commit, keyed by the page's first sequence number.
    pub(super) pages: sled::Tree,
    /// Contents, packed, keyed by pack number.
    pub(super) packs: sled::Tree,
    /// Where each content sits: one value per group commit, keyed by its first pack number.
    pub(super) pack_index: sled::Tree,
    /// Records one per key, as pcx wrote them before pages: read, never written.
    pub(super) legacy_events: sled::Tree,
    /// Contents one per key by digest, as pcx wrote them before packs: read, never written.
    pub(super) legacy_blobs: sled::Tree,
    pub(super) snapshots: sled::Tree,
    pub(super) cache: sled::Tree,
    /// Holds the compaction anchor: the snapshot the remaining log continues from.
    pub(super) meta: sled::Tree,
    /// sled's data file: flushed by sled with `sync_file_range`, which leaves the device's
    /// write cache unflushed (sled issue 1452), so we `fdatasync` it ourselves.
    pub(super) data_file: File,
}

/// Marks a directory sled is creating, from before sled's first open until its data file is
/// there for good. sled writes its `conf` before it creates `db`, and a missing `db` beside a
/// `conf` is a deleted log (refused, [`OpenError::DataFileMissing`]): a process killed between
/// the two (the crash suite's kill 0–40 ms after start found it) left a directory that held
/// nothing refused for ever as one whose log was gone. With the mark there it opens, empty.
const CREATING: &str = "pcx-creating";

/// Opens sled on `dir`. sled's IO threads hold the locked data file for a moment after a
/// close, so an open right after one (the same process restarting its context, or a reset)
/// retries briefly before calling the directory in use.
pub(super) fn open_handles(dir: &Path, cache_capacity: u64) -> Result<Handles, OpenError> {
    let creating = dir.join(CREATING);
    let file_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| OpenError::DataFile { path, source }
    };
    if !dir.join("conf").exists() && !dir.join("db").exists() {
        // sled has written nothing here yet: say so durably before it starts.
        File::create(&creating)
            .and_then(|f| f.sync_all())
            .map_err(file_err(&creating))?;
        sync_dir(dir).map_err(file_err(dir))?;
    }
    if crate::store::damage::data_file_missing(dir) && !creating.exists() {
        return Err(OpenError::DataFileMissing {
            path: dir.join("db"),
        });
    }
    crate::store::sled_log::check(dir)?;
    let deadline = std::time::Instant::now() + LOCK_PATIENCE;
    let db = loop {
        let opened = sled::Config::new()
            .path(dir)
            .cache_capacity(cache_capacity)
            .flush_every_ms(None)
            .open();
        match opened {
            Ok(db) => break db,
            Err(e) if e.to_string().contains("could not acquire lock") => {
                if std::time::Instant::now() >= deadline {
                    return Err(OpenError::Locked {
                        path: dir.to_path_buf(),
                    });
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Err(source) => return Err(sled_open_error(dir, source)),
        }
    };
    if creating.exists() {
        // sled's data file is there: its directory entry made durable before the mark goes.
        sync_dir(dir).map_err(file_err(dir))?;
        std::fs::remove_file(&creating).map_err(file_err(&creating))?;
        sync_dir(dir).map_err(file_err(dir))?;
    }
    let tree = |name: &str| {
        db.open_tree(name)
            .map_err(|source| sled_open_error(dir, source))
    };
    let (pages, packs, pack_index, legacy_events, legacy_blobs) = (
        tree("pages")?,
        tree("packs")?,
        tree("pack_index")?,
        tree("events")?,
        tree("blobs")?,
    );
    let (snapshots, cache, meta) = (tree("snapshots")?, tree("dynamo_cache")?, tree("meta")?);
    let data_path = dir.join("db");
    let data_file = File::open(&data_path).map_err(|source| OpenError::DataFile {
        path: data_path.clone(),
        source,
    })?;
    Ok(Handles {
        db,
        pages,
        packs,
        pack_index,
        legacy_events,
        legacy_blobs,
        snapshots,
        cache,
        meta,
        data_file,
    })
}

/// Free bytes for an unprivileged writer on the file system holding `dir`.
pub(super) fn free_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs fills the struct we own, from a NUL-terminated path.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

pub(super) fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}
