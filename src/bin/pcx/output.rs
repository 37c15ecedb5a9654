//! Where `pcx export` and `pcx salvage` write their `--output FILE`.
//!
//! Two things a careless path must not do. **Land in the data directory**: `pcx export --output
//! DIR/db` truncated sled's data file before reading a byte of it, and the whole log was gone
//! (a salvage's output there would finish off the directory it is salvaging). A path inside
//! the data directory, or one of the files beside it that swaps use (`DIR.lock`, whose
//! replacement would let two processes lock the directory at once, and `DIR.compacting`,
//! `DIR.pre-compaction`, `DIR.importing`, which hold the log during a swap), is refused before
//! anything is opened; a symbolic link is followed first. **Lose what was there on a failed run**: the
//! output is written to a temporary file beside it and renamed onto it only once complete and
//! synced, so an export that fails halfway leaves the previous file as it was.

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};

/// An output file being written (to the writer [`Output::create`] gives with it);
/// [`Output::finish`] puts it in place, and dropping it unfinished removes the partial file.
pub(crate) struct Output {
    path: PathBuf,
    partial: PathBuf,
    done: bool,
}

impl Output {
    /// Refuses `path` inside `data_dir` (or its side directories), then creates the temporary
    /// file it is written to, and gives the writer for it.
    pub(crate) fn create(data_dir: &Path, path: &Path) -> Result<(Output, BufWriter<File>)> {
        refuse_inside(data_dir, path)?;
        let name = path
            .file_name()
            .with_context(|| format!("--output {} names no file", path.display()))?;
        let mut partial_name = std::ffi::OsString::from(".");
        partial_name.push(name);
        partial_name.push(format!(".pcx-partial-{}", std::process::id()));
        let partial = path.with_file_name(partial_name);
        let file = File::create(&partial)
            .with_context(|| format!("creating {} (for {})", partial.display(), path.display()))?;
        let output = Output {
            path: path.to_path_buf(),
            partial,
            done: false,
        };
        Ok((output, BufWriter::new(file)))
    }

    /// Syncs what `file` holds and renames it onto the output's path.
    pub(crate) fn finish(mut self, file: BufWriter<File>) -> Result<()> {
        let file = file
            .into_inner()
            .map_err(|e| e.into_error())
            .with_context(|| format!("writing {}", self.partial.display()))?;
        file.sync_all()
            .with_context(|| format!("syncing {}", self.partial.display()))?;
        std::fs::rename(&self.partial, &self.path).with_context(|| {
            format!(
                "renaming {} onto {}",
                self.partial.display(),
                self.path.display()
            )
        })?;
        self.done = true;
        if let Some(parent) = non_empty_parent(&self.path) {
            if let Ok(dir) = File::open(parent) {
                let _ = dir.sync_all();
            }
        }
        Ok(())
    }
}

impl Drop for Output {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_file(&self.partial);
        }
    }
}

fn non_empty_parent(path: &Path) -> Option<&Path> {
    path.parent().filter(|p| !p.as_os_str().is_empty())
}

/// Fails if `path` (its link followed, if it is one) is inside `data_dir`, is one of the
/// files beside it that swaps use (its lock file, the old or new copy during a compaction or an
/// import), or is inside one of those.
fn refuse_inside(data_dir: &Path, path: &Path) -> Result<()> {
    use pcx::store::swap::{sibling, COMPACTING, IMPORTING, LOCK, OLD};
    let Ok(dir) = std::fs::canonicalize(data_dir) else {
        return Ok(());
    };
    let target = match std::fs::canonicalize(path) {
        Ok(existing) => existing,
        Err(_) => {
            let parent = non_empty_parent(path).unwrap_or(Path::new("."));
            match (std::fs::canonicalize(parent), path.file_name()) {
                (Ok(p), Some(name)) => p.join(name),
                // A parent that does not exist: creating the file fails and says so.
                _ => return Ok(()),
            }
        }
    };
    let beside = [OLD, COMPACTING, IMPORTING, LOCK].map(|suffix| sibling(&dir, suffix));
    if target.starts_with(&dir) || beside.iter().any(|b| target.starts_with(b)) {
        bail!(
            "--output {} is inside the data directory {} (or is a file its swaps use): \
             writing there would destroy the log it reads; write it elsewhere",
            path.display(),
            dir.display()
        );
    }
    Ok(())
}
