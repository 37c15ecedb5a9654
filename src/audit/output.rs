//! Where an export or a salvage writes its output file: `pcx export --output FILE`,
//! `pcx salvage --output FILE`, and the protocol's `export` op, which a server runs for a
//! client (a backup of a live context).
//!
//! Two things a careless path must not do. **Land in the data directory**: `pcx export --output
//! DIR/db` truncated sled's data file before reading a byte of it, and the whole log was gone
//! (a salvage's output there would finish off the directory it is salvaging). A path inside
//! the data directory, or one of the files beside it that swaps use (`DIR.lock`, whose
//! replacement would let two processes lock the directory at once, and `DIR.compacting`,
//! `DIR.pre-compaction`, `DIR.importing`, which hold the log during a swap), is refused before
//! anything is opened; a symbolic link is followed first. **Lose what was there on a failed
//! run**: the output is written to a temporary file beside it and renamed onto it only once
//! complete and synced, so an export that fails halfway leaves the previous file as it was
//! (a device or a pipe, which a rename would replace, is written into).

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

/// Why an output file was refused or could not be written.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error(
        "output {output} is inside the data directory {dir} (or is a file its swaps use): \
         writing there would destroy the log it reads; write it elsewhere"
    )]
    Inside { output: PathBuf, dir: PathBuf },
    #[error("output {0} names no file")]
    NoFile(PathBuf),
    #[error("output {0} is a directory")]
    Directory(PathBuf),
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> OutputError {
    let path = path.to_path_buf();
    move |source| OutputError::Io { op, path, source }
}

/// An output file being written (to the writer [`Output::create`] gives with it);
/// [`Output::finish`] puts it in place, and dropping it unfinished removes the partial file.
pub struct Output {
    path: PathBuf,
    /// The temporary file beside `path`; None when `path` is written straight into (a device or
    /// a pipe).
    partial: Option<PathBuf>,
    done: bool,
}

impl Output {
    /// Refuses `path` inside `data_dir` (or its side directories), then creates the temporary
    /// file it is written to, and gives the writer for it.
    pub fn create(
        data_dir: Option<&Path>,
        path: &Path,
    ) -> Result<(Output, BufWriter<File>), OutputError> {
        if let Some(dir) = data_dir {
            refuse_inside(dir, path)?;
        }
        // A device, a pipe or a socket (`/dev/null`, `/dev/stdout`, a FIFO, links to them) is
        // written into: renamed onto, it would be replaced by a regular file (as root,
        // `--output /dev/null` replaced the machine's /dev/null).
        match std::fs::metadata(path) {
            Ok(m) if m.is_dir() => return Err(OutputError::Directory(path.to_path_buf())),
            Ok(m) if !m.is_file() => {
                let file = std::fs::OpenOptions::new()
                    .write(true)
                    .open(path)
                    .map_err(io("opening", path))?;
                let output = Output {
                    path: path.to_path_buf(),
                    partial: None,
                    done: false,
                };
                return Ok((output, BufWriter::new(file)));
            }
            _ => {}
        }
        // A link is followed to the file it names: the rename replaces that file, not the link
        // (`--output /dev/stdout`, with stdout sent to a file, replaced the link in /dev).
        let resolved = crate::store::swap::resolve(path);
        let path = resolved.as_path();
        let name = path
            .file_name()
            .ok_or_else(|| OutputError::NoFile(path.to_path_buf()))?;
        // One temporary file per output being written, even two of one process to one path
        // (a server asked for two backups to the same file at once): with the process id
        // alone they shared it, wrote into each other's, and one was renamed into place
        // holding both, answered ok. `create_new` refuses a leftover of the same name.
        static OUTPUTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = OUTPUTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut partial_name = std::ffi::OsString::from(".");
        partial_name.push(name);
        partial_name.push(format!(".pcx-partial-{}-{n}", std::process::id()));
        let partial = path.with_file_name(partial_name);
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&partial)
            .map_err(io("creating", &partial))?;
        let output = Output {
            path: path.to_path_buf(),
            partial: Some(partial),
            done: false,
        };
        Ok((output, BufWriter::new(file)))
    }

    /// Syncs what `file` holds and renames it onto the output's path.
    pub fn finish(mut self, file: BufWriter<File>) -> Result<(), OutputError> {
        let Some(partial) = self.partial.clone() else {
            file.into_inner()
                .map_err(|e| io("writing", &self.path)(e.into_error()))?;
            self.done = true;
            return Ok(());
        };
        let file = file
            .into_inner()
            .map_err(|e| io("writing", &partial)(e.into_error()))?;
        file.sync_all().map_err(io("syncing", &partial))?;
        std::fs::rename(&partial, &self.path).map_err(io("renaming into place", &self.path))?;
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
        if let (false, Some(partial)) = (self.done, &self.partial) {
            let _ = std::fs::remove_file(partial);
        }
    }
}

fn non_empty_parent(path: &Path) -> Option<&Path> {
    path.parent().filter(|p| !p.as_os_str().is_empty())
}

/// Fails if `path` (its link followed, if it is one) is inside `data_dir`, is one of the
/// files beside it that swaps use (its lock file, the old or new copy during a compaction or an
/// import), or is inside one of those.
fn refuse_inside(data_dir: &Path, path: &Path) -> Result<(), OutputError> {
    use crate::store::swap::{sibling, COMPACTING, IMPORTING, LOCK, OLD};
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
        return Err(OutputError::Inside {
            output: path.to_path_buf(),
            dir,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn two_outputs_to_one_path_at_once_are_written_apart_and_the_last_finished_is_whole() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("backup.jsonl");
        let (first, mut a) = Output::create(None, &path).unwrap();
        let (second, mut b) = Output::create(None, &path).unwrap();
        a.write_all(b"first backup, line 1\nfirst backup, line 2\n")
            .unwrap();
        b.write_all(b"second backup\n").unwrap();
        first.finish(a).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "first backup, line 1\nfirst backup, line 2\n"
        );
        second.finish(b).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "second backup\n");
        let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
        assert_eq!(left.len(), 1, "a temporary file was left behind");
    }
}
