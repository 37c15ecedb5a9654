//! A data directory replaced whole (compaction, import), and the lock that keeps every other
//! opener out while it is.
//!
//! Compaction and import build a new data directory beside `DIR` (`DIR.compacting`,
//! `DIR.importing`) and swap it in with two renames: `DIR` → `DIR.pre-compaction`, then the
//! new one → `DIR`; then the old copy is deleted. sled's own lock cannot guard this: it is a
//! lock on `DIR/db`, so it moves with the directory, and between the two renames there is no
//! `DIR` to lock at all. An open that came in then used to "repair" the swap it saw half
//! done, delete the directory the swap was still writing, or create an empty `DIR` — and
//! the log was gone.
//!
//! So every open of a data directory first takes [`DirLock`], an flock(2) on a lock file
//! beside it (`DIR.lock`), before it looks at anything; a compaction or import takes the
//! same lock before its first read and keeps it until after its last rename. The kernel drops
//! the lock when its holder dies, so a killed process never leaves it taken.
//!
//! A crash can still stop a swap anywhere. Under the lock, [`repair`] (run by every open)
//! finishes or undoes it, and it only ever deletes a copy it knows is not the log: the new
//! directory gets a completion marker, synced, before the old one is moved aside, so
//! - `DIR` alone: nothing to do (a marker left in it is removed);
//! - `DIR` and a side directory: the swap never happened; the side directory goes;
//! - no `DIR`, the old copy and a complete side directory: the swap is finished (so it is
//!   with no old copy: a directory that was not there is replaced by a complete one);
//! - no `DIR` and the old copy (no complete side directory): the old copy is put back;
//! - `DIR` (complete) and the old copy: the new one is in place; the old copy goes;
//! - `DIR` *not* marked complete and the old copy: nobody can tell which is the log; the
//!   open is refused, naming both, and nothing is deleted.
//!
//! An open never creates `DIR` while the old copy exists: the old copy is put back first.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long taking a data directory's lock waits for its holder (then: "in use"), and a swap
/// for sled to let go of a directory it closed.
pub const LOCK_PATIENCE: Duration = Duration::from_secs(2);

/// Where a swap moves the old directory.
pub const OLD: &str = ".pre-compaction";
/// Where compaction builds the new directory.
pub const COMPACTING: &str = ".compacting";
/// Where import builds the new directory.
pub const IMPORTING: &str = ".importing";
/// The lock file beside the data directory.
pub const LOCK: &str = ".lock";
/// The completion marker: in a side directory, "everything is in and synced".
pub const COMPLETE: &str = "pcx-swap-complete";

/// Test hook: with `PCX_TEST_PAUSE=STEP` and `PCX_TEST_PAUSE_FILE=PATH` in its environment, a
/// compaction or import stops at STEP, creates PATH, and goes on once PATH is removed (or
/// after a minute). Tests use it to start another command, or kill this one, at an exact
/// point of a swap. Unset, it costs one environment lookup per step.
///
/// Steps: `compact:locked`, `compact:writing`, `import:writing`, `swap:marked`,
/// `swap:moved-aside`, `swap:moved-in`, `swap:done`.
pub fn pause_point(step: &str) {
    if std::env::var_os("PCX_TEST_PAUSE").is_none_or(|s| s != step) {
        return;
    }
    let Some(file) = std::env::var_os("PCX_TEST_PAUSE_FILE") else {
        return;
    };
    let file = PathBuf::from(file);
    if std::fs::write(&file, format!("{} {step}\n", std::process::id())).is_err() {
        return;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while file.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Why a data directory could not be locked, or its interrupted swap not settled.
#[derive(Debug, thiserror::Error)]
pub enum SwapError {
    #[error("data directory {dir} is in use: another pcx process (or context) has it open, and one writer per data directory is allowed")]
    Locked { dir: PathBuf },
    #[error("data directory {dir} does not exist: nothing has been recorded there")]
    Missing { dir: PathBuf },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "data directory {dir} and {old} both exist, and {dir} is not marked complete: an \
         interrupted compaction or import left two copies and pcx cannot tell which is the \
         log. Nothing was deleted; check both (`pcx --data-dir … verify`) and move the one \
         that is not the log out of the way"
    )]
    Unsettled { dir: PathBuf, old: PathBuf },
    #[error(
        "data directory {dir} holds files pcx did not write ({entries}): a compaction or \
         import replaces the whole directory and would delete them, so nothing was changed; \
         move them out of it and run it again"
    )]
    Foreign { dir: PathBuf, entries: String },
}

/// The names in `dir` that no pcx store has (sled's `db`, `conf`, `blobs` and `snap.*`, pcx's
/// `content`, its socket and its markers), a few of them, for a message; empty when there are
/// none or `dir` cannot be listed. A compaction or import replaces the whole directory, and
/// pcx creates its store only where it would not mix with such files.
pub fn foreign_entries(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut foreign: Vec<String> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| {
            !matches!(
                n.as_str(),
                "db" | "conf" | "blobs" | "content" | "pcx.sock" | "pcx-creating" | COMPLETE
            ) && !n.starts_with("snap.")
        })
        .collect();
    foreign.sort();
    foreign
}

/// Refuses a directory holding anything pcx did not write ([`foreign_entries`]), naming some
/// of it: a swap replaces the directory whole and would delete it.
pub fn only_ours(dir: &Path) -> Result<(), SwapError> {
    let foreign = foreign_entries(dir);
    if foreign.is_empty() {
        return Ok(());
    }
    Err(SwapError::Foreign {
        dir: dir.to_path_buf(),
        entries: some_of(&foreign),
    })
}

/// `names`, the first few of them, for a message.
pub fn some_of(names: &[String]) -> String {
    let mut shown = names.iter().take(5).cloned().collect::<Vec<_>>().join(", ");
    if names.len() > 5 {
        shown.push_str(&format!(" and {} more", names.len() - 5));
    }
    shown
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> SwapError {
    let path = path.to_path_buf();
    move |source| SwapError::Io { op, path, source }
}

/// The directory a data directory's path names, absolute, with a symbolic link in its last
/// component followed (to at most 40 links; a dangling one is followed as far as it goes).
///
/// Absolute because the files pcx opens later (content files, sled's files for large values)
/// are opened by path: a process embedding pcx that changed its working directory after
/// opening a relative `pcx-data` had its reads fail as damage and its next files go to
/// another directory. The link followed because a swap renames the directory and the lock
/// lives beside it, so both must be those of the directory itself: through
/// `DATA -> /disk/pcx`, a compaction renamed its new copy onto the link, left the whole old
/// log at `/disk/pcx`, and the two paths locked different files.
pub fn resolve(dir: &Path) -> PathBuf {
    let Ok(absolute) = std::path::absolute(dir) else {
        return dir.to_path_buf();
    };
    // "data/" and "data/." name what "data" names; only then is the last component the link.
    let mut path: PathBuf = absolute.components().collect();
    for _ in 0..40 {
        let Ok(target) = std::fs::read_link(&path) else {
            break;
        };
        path = match path.parent() {
            Some(parent) => parent.join(target).components().collect(),
            None => target,
        };
    }
    path
}

/// `DIR` + `suffix`, beside `DIR`. Works on the absolute path, so `.` and `..` have a name.
pub fn sibling(dir: &Path, suffix: &str) -> PathBuf {
    let mut dir = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
    if dir.file_name().is_none() {
        dir = dir.canonicalize().unwrap_or(dir);
    }
    let mut name = dir
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(suffix);
    dir.with_file_name(name)
}

/// The exclusive lock on a data directory: an flock(2) on `DIR.lock`, released when dropped
/// or when the process dies. Every open takes it before looking at the directory; compaction
/// and import hold it across their renames.
#[derive(Debug)]
pub struct DirLock {
    file: File,
    path: PathBuf,
}

impl DirLock {
    /// Takes the lock, waiting at most `patience` for another holder to let go. With `create`
    /// the directory's parent is created if missing (the lock file lives there); without,
    /// a missing parent means a missing data directory.
    pub fn acquire(dir: &Path, patience: Duration, create: bool) -> Result<DirLock, SwapError> {
        let path = sibling(dir, LOCK);
        if create {
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(io_err("creating", parent))?;
            }
        }
        let deadline = Instant::now() + patience;
        let mut told = false;
        loop {
            let file = match std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
            {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && !create => {
                    return Err(SwapError::Missing {
                        dir: dir.to_path_buf(),
                    })
                }
                Err(e) => {
                    return Err(io_err(
                        "creating the data directory's lock file (pcx writes it beside the \
                         directory, so it needs write access to the directory's parent)",
                        &path,
                    )(e))
                }
            };
            // SAFETY: flock on a descriptor this function owns; no memory is involved.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                // The holder before us may have removed the file as it let go: then we locked
                // a file nobody else will look at, and must lock the one at the path.
                if same_file(&file, &path) {
                    return Ok(DirLock { file, path });
                }
            } else {
                let e = std::io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EWOULDBLOCK) => {}
                    Some(libc::EINTR) => continue,
                    _ => return Err(io_err("locking", &path)(e)),
                }
            }
            if Instant::now() >= deadline {
                return Err(SwapError::Locked {
                    dir: dir.to_path_buf(),
                });
            }
            if !told {
                tracing::info!(dir = %dir.display(), patience = ?patience,
                    "the data directory is locked by another pcx process; waiting for it");
                told = true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for DirLock {
    fn drop(&mut self) {
        // Removed while still held, so it does not pile up beside the directory; whoever
        // waits on this file sees it gone once they lock it, and locks a new one.
        if same_file(&self.file, &self.path) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn same_file(file: &File, path: &Path) -> bool {
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

fn sync_dir(dir: &Path) -> Result<(), SwapError> {
    File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(io_err("syncing", dir))
}

/// Makes a rename or removal beside `dir` durable.
fn sync_parent(dir: &Path) -> Result<(), SwapError> {
    match sibling(dir, "").parent() {
        Some(parent) => sync_dir(parent),
        None => Ok(()),
    }
}

fn is_complete(dir: &Path) -> bool {
    dir.join(COMPLETE).is_file()
}

fn remove(path: &Path) -> Result<(), SwapError> {
    match std::fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("removing", path)(e)),
    }
}

/// Finishes or undoes a swap a crash interrupted (see the module's table). Needs the lock.
pub fn repair(dir: &Path, _held: &DirLock) -> Result<(), SwapError> {
    let old = sibling(dir, OLD);
    let sides = [sibling(dir, COMPACTING), sibling(dir, IMPORTING)];
    if !dir.exists() {
        if let Some(new) = sides.iter().find(|s| is_complete(s)) {
            // Complete and synced before the old copy was moved aside: finish the swap.
            std::fs::rename(new, dir).map_err(io_err("moving into place", new))?;
            sync_parent(dir)?;
            tracing::warn!(dir = %dir.display(), from = %new.display(),
                "finished a swap that a crash interrupted");
        } else if old.exists() {
            // The new copy never got in place: the old copy is the log.
            std::fs::rename(&old, dir).map_err(io_err("putting back", &old))?;
            sync_parent(dir)?;
            tracing::warn!(dir = %dir.display(), from = %old.display(),
                "put back the log that an interrupted swap had moved aside");
        }
    }
    let mut removed = false;
    if dir.exists() && old.exists() {
        if !is_complete(dir) {
            return Err(SwapError::Unsettled {
                dir: dir.to_path_buf(),
                old,
            });
        }
        remove(&old)?;
        removed = true;
    }
    // Whatever side directory is left never got swapped in (or never got complete).
    for side in &sides {
        if side.exists() {
            remove(side)?;
            removed = true;
        }
    }
    if removed {
        sync_parent(dir)?;
    }
    if is_complete(dir) {
        let marker = dir.join(COMPLETE);
        std::fs::remove_file(&marker).map_err(io_err("removing", &marker))?;
        sync_dir(dir)?;
    }
    Ok(())
}

/// Waits (at most `patience`) until no sled handle has `dir` open any more: sled's IO threads
/// hold its lock on `dir/db` for a moment after the last handle is dropped, and a directory
/// is renamed only once nothing writes into it.
pub fn wait_for_sled(dir: &Path, patience: Duration) -> Result<(), SwapError> {
    let db = dir.join("db");
    let file = match File::open(&db) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err("opening", &db)(e)),
    };
    let deadline = Instant::now() + patience;
    loop {
        // SAFETY: flock on a descriptor this function owns; closing it releases the lock.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(io_err("waiting for sled to close", dir)(
                std::io::Error::other(format!("its files are still open after {patience:?}")),
            ));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Swaps `new` (complete, and closed) in as `dir`, under the lock. When it returns Ok, `dir`
/// is the new directory; on an error, `dir` is the old one, or the next open finishes the
/// swap (see [`repair`]).
pub fn swap_in(dir: &Path, new: &Path, _held: &DirLock) -> Result<(), SwapError> {
    // The old directory is deleted once the new one is in: only if it holds nothing but the
    // log (a compaction of a directory holding a user's notes deleted them).
    only_ours(dir)?;
    let patience = LOCK_PATIENCE;
    wait_for_sled(new, patience)?;
    if dir.exists() {
        wait_for_sled(dir, patience)?;
    }
    // Everything in `new` is synced (its journal synced each commit); the marker says so, and
    // is itself durable before the old copy is moved aside.
    let marker = new.join(COMPLETE);
    File::create(&marker)
        .and_then(|mut f| {
            f.write_all(b"complete: swap this directory in\n")?;
            f.sync_all()
        })
        .map_err(io_err("writing", &marker))?;
    sync_dir(new)?;
    pause_point("swap:marked");

    let old = sibling(dir, OLD);
    let had_old = dir.exists();
    if had_old {
        // The new copy takes the mode the directory was given (a chmod the operator made).
        let mode = std::fs::metadata(dir)
            .map_err(io_err("reading", dir))?
            .permissions();
        std::fs::set_permissions(new, mode).map_err(io_err("setting the mode of", new))?;
        std::fs::rename(dir, &old).map_err(io_err("moving aside", dir))?;
        sync_parent(dir)?;
        pause_point("swap:moved-aside");
    }
    if let Err(e) = std::fs::rename(new, dir) {
        // Put the old copy back rather than leave no log in place.
        if had_old && std::fs::rename(&old, dir).is_ok() {
            let _ = sync_parent(dir);
        }
        return Err(io_err("moving into place", new)(e));
    }
    sync_parent(dir)?;
    pause_point("swap:moved-in");

    // The new log is in place: what is left is tidying, which the next open redoes if it
    // fails here (the marker goes only once the old copy is gone).
    let tidied = if had_old {
        remove(&old).and_then(|()| sync_parent(dir))
    } else {
        Ok(())
    }
    .and_then(|()| {
        let marker = dir.join(COMPLETE);
        std::fs::remove_file(&marker).map_err(io_err("removing", &marker))?;
        sync_dir(dir)
    });
    if let Err(e) = tidied {
        tracing::warn!(error = %e, dir = %dir.display(), "could not tidy up after a swap");
    }
    pause_point("swap:done");
    Ok(())
}
