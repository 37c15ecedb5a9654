//! Replacing the data directory under an open journal: how a running server compacts its log
//! without stopping.
//!
//! Compaction writes a new directory beside the old one and swaps it in
//! ([`crate::store::swap`]). Offline it holds the directory's lock from start to end; a
//! server already holds that lock (its journal does), and must go on answering meanwhile. So
//! the journal does the swap itself, under the lock it holds:
//!
//! 1. commits are held off (the writer's mutex) while `rewrite` reads this journal and
//!    writes the replacement, so the log it copies is the whole durable log, and nothing is
//!    answered that the copy lacks; reads go on;
//! 2. reads and contents written ahead are held off (`swapping`) while sled's handles are let
//!    go, the directories swapped and everything taken up again on the new one: the handles,
//!    the content index, the content files, and the record of what was synced;
//! 3. commits resume, on the new directory.
//!
//! A crash at any point leaves the old log or the new one, as offline ([`swap_in`] and the
//! `repair` every open runs). A swap that fails takes up whatever is in place.

use std::path::Path;

use crate::store::error::StoreError;
use crate::store::swap::{repair, swap_in, SwapError};

use super::contents::load_contents;
use super::handles::open_handles;
use super::{Handles, SledJournal};

type Slot = Option<std::sync::Arc<Handles>>;

/// Links the sockets in `dir` (a server's `pcx.sock`, by default in its data directory) into
/// `side` under the same names, before `side` replaces `dir`: the server listens on the file,
/// not on its name, so with the link its clients reach it at the same path afterwards, and it
/// does not take the swap for its socket being removed.
fn keep_sockets(dir: &Path, side: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::FileTypeExt;
    let io = |op: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| StoreError::Io { op, path, source }
    };
    for entry in std::fs::read_dir(dir).map_err(io("listing", dir))? {
        let entry = entry.map_err(io("listing", dir))?;
        if entry.file_type().is_ok_and(|t| t.is_socket()) {
            let link = side.join(entry.file_name());
            std::fs::hard_link(entry.path(), &link).map_err(io("linking the socket to", &link))?;
        }
    }
    Ok(())
}

impl SledJournal {
    /// Replaces this journal's data directory with the one `rewrite` writes into `side` from
    /// this journal, commits held off from the first read to the swap, and goes on on it.
    /// Only the journal that holds its data directory's lock can (a server's, a batch's).
    pub fn replace_in_place<T, E>(
        &self,
        side: &Path,
        rewrite: impl FnOnce(&SledJournal) -> Result<T, E>,
    ) -> Result<T, E>
    where
        E: From<StoreError> + From<SwapError>,
    {
        let Some(lock) = self._lock.as_ref() else {
            return Err(StoreError::Io {
                op: "replacing in place",
                path: self.dir.clone(),
                source: std::io::Error::other("this journal does not hold the directory's lock"),
            }
            .into());
        };
        let _writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let rewritten = match rewrite(self) {
            Ok(t) => t,
            Err(e) => {
                // Nothing was swapped: the side directory's space goes back now.
                if let Err(r) = std::fs::remove_dir_all(side) {
                    if r.kind() != std::io::ErrorKind::NotFound {
                        tracing::warn!(error = %r, dir = %side.display(), "could not remove");
                    }
                }
                return Err(e);
            }
        };
        if let Err(e) = keep_sockets(&self.dir, side) {
            let _ = std::fs::remove_dir_all(side);
            return Err(e.into());
        }
        let _swapping = self.swapping.write().unwrap_or_else(|p| p.into_inner());
        let mut slot = self.handles.write().unwrap_or_else(|p| p.into_inner());
        // sled closes once the last handle goes (`swap_in` waits for that: an audit reading
        // the log still holds one).
        *slot = None;
        let swapped = swap_in(&self.dir, side, lock);
        if let Err(e) = &swapped {
            tracing::warn!(error = %e, dir = %self.dir.display(), "a swap in place failed");
            // Finished or undone, as the next open would.
            repair(&self.dir, lock)?;
        }
        // The new log, or the old one after a swap that did not happen.
        self.take_up(&mut slot)?;
        swapped?;
        tracing::info!(dir = %self.dir.display(), "data directory replaced in place");
        Ok(rewritten)
    }

    /// Opens sled on the data directory again, with its content index, its content files and
    /// what of it is synced, into `slot` (the handles' lock, held by the caller with the
    /// writer's): after a failure, or a swap. All of it every time: a swap whose take-up
    /// failed is taken up by the next reset, and content files still open from the directory
    /// before would take appends into a file no longer there.
    pub(super) fn take_up(&self, slot: &mut Slot) -> Result<(), StoreError> {
        // Never made again here: a directory removed under the running process (`rm -rf`)
        // would be healed into an empty log, and every client would read its changes gone.
        if !self.dir.is_dir() {
            return Err(StoreError::Removed {
                path: self.dir.join("db"),
            });
        }
        self.files.reopen()?;
        // sled numbers the files of large values from its own log; a new directory's restart.
        *self
            .synced_blob_files
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = 0;
        let reopened =
            open_handles(&self.dir, self.cache_capacity).map_err(|e| StoreError::Io {
                op: "reopening the event log in",
                path: self.dir.clone(),
                source: std::io::Error::other(e.to_string()),
            })?;
        let contents =
            load_contents(&reopened, &self.dir).map_err(|what| StoreError::Damaged { what })?;
        *self.contents_mut() = contents;
        // Written again by their groups rather than trusted across a failure or a swap.
        self.prewritten_mut().clear();
        *slot = Some(std::sync::Arc::new(reopened));
        Ok(())
    }
}
