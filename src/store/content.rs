//! Content files: where a group commit's content goes when there is much of it.
//!
//! sled rewrites a tree node each time it consolidates one (every ten changes to it) and
//! when it splits one, and the node carries its values: measured with sled 0.34.7 on this
//! machine, 100 MiB stored as 64 KiB or 1 MiB values wrote 280–360 MiB. Content is the bulk
//! of what pcx stores (compiled kernels are megabytes), so a group holding
//! [`crate::store::pack::FILE_THRESHOLD`] bytes or more of new content appends it here instead, in
//! one vectored write and one `fdatasync`, and the journal records in sled where each
//! content landed. Files are only appended to; bytes that no index entry points at (a
//! commit that failed after its content was written, say) are dropped by compaction.
//!
//! Files are `content/NNNNNNNNNNNNNNNN.pack`, numbered in order, each up to [`FILE_LIMIT`].

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{IoSlice, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::store::error::StoreError;

/// A file is closed for appending once it reaches this size.
pub const FILE_LIMIT: u64 = 1 << 30;

/// A small read that continues where an earlier one ended reads this much and keeps it:
/// contents recorded together are read together (a stitch walks its entries' backends in the
/// order they were recorded), and one read of 128 KiB costs about as much as two of 1 KiB.
const READ_AHEAD: u64 = 128 << 10;

/// How many sequential readers are followed at once (a split stitch has two).
const STREAMS: usize = 4;

/// The content files of one data directory.
pub struct ContentFiles {
    dir: PathBuf,
    files: Mutex<Files>,
    /// Held for a whole append: a group's commit and the next group's contents written
    /// ahead of it ([`crate::store::journal::Journal::prewrite`]) append from two threads.
    appending: Mutex<()>,
}

struct Files {
    /// The file appended to, and its length: bytes below it are written and synced.
    current: u64,
    len: u64,
    writer: Option<Arc<File>>,
    /// Whether the directory entry of the current file is known durable.
    dir_synced: bool,
    readers: HashMap<u64, Arc<File>>,
    /// The readers that read on from where they ended, most recent last. Followed apart, so
    /// that two reading side by side do not take each other for random reads.
    streams: Vec<Stream>,
}

/// One sequential reader.
struct Stream {
    file: u64,
    /// Where its last read ended.
    end: u64,
    /// Its block read ahead: where in the file it starts, and its bytes.
    ahead: Option<(u64, Arc<Vec<u8>>)>,
}

impl Stream {
    /// Its block read ahead, if that holds `offset..end`: where in the block it starts.
    fn holding(&self, offset: u64, end: u64) -> Option<(&Arc<Vec<u8>>, usize)> {
        let (start, block) = self.ahead.as_ref()?;
        (offset >= *start && end <= start.saturating_add(block.len() as u64))
            .then(|| (block, (offset - start) as usize))
    }
}

impl Files {
    /// The stream a read of `file` at `offset..end` continues, made the most recent: one
    /// whose block holds it, or one that ended where it starts. `None` for a read that
    /// continues none; it starts a stream, in place of the least recent.
    fn continued(&mut self, file: u64, offset: u64, end: u64) -> Option<&mut Stream> {
        let found = self
            .streams
            .iter()
            .position(|s| s.file == file && (s.end == offset || s.holding(offset, end).is_some()));
        match found {
            Some(i) => {
                let s = self.streams.remove(i);
                self.streams.push(s);
                self.streams.last_mut()
            }
            None => {
                if self.streams.len() == STREAMS {
                    self.streams.remove(0);
                }
                self.streams.push(Stream {
                    file,
                    end,
                    ahead: None,
                });
                None
            }
        }
    }
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StoreError {
    let path = path.to_path_buf();
    move |source| StoreError::Io { op, path, source }
}

impl ContentFiles {
    /// The content files under `dir` (created if missing).
    pub fn open(dir: &Path) -> Result<ContentFiles, StoreError> {
        let dir = dir.join("content");
        std::fs::create_dir_all(&dir).map_err(io("creating", &dir))?;
        let mut current = 0;
        for entry in std::fs::read_dir(&dir).map_err(io("listing", &dir))? {
            let entry = entry.map_err(io("listing", &dir))?;
            if let Some(n) = file_number(&entry.file_name().to_string_lossy()) {
                current = current.max(n);
            }
        }
        let (len, dir_synced) = match std::fs::metadata(path_of(&dir, current)) {
            // Opening syncs the data directory's entries, this one among them.
            Ok(m) => (m.len(), true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (0, false),
            Err(e) => return Err(io("reading", &path_of(&dir, current))(e)),
        };
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(io("syncing", &dir))?;
        Ok(ContentFiles {
            dir,
            files: Mutex::new(Files {
                current,
                len,
                writer: None,
                dir_synced,
                readers: HashMap::new(),
                streams: Vec::with_capacity(STREAMS),
            }),
            appending: Mutex::new(()),
        })
    }

    /// Starts over on the content files now in the data directory (a compaction replaced it
    /// while it was open): every file held open is let go, and the one to append to is found
    /// again.
    pub fn reopen(&self) -> Result<(), StoreError> {
        let _appending = self.appending.lock().unwrap_or_else(|p| p.into_inner());
        let data_dir = self.dir.parent().unwrap_or(&self.dir);
        let fresh = ContentFiles::open(data_dir)?;
        let files = fresh.files.into_inner().unwrap_or_else(|p| p.into_inner());
        *self.files.lock().unwrap_or_else(|p| p.into_inner()) = files;
        Ok(())
    }

    /// Appends `parts` back to back and makes them durable. Gives the file and the offset
    /// of the first part; the others follow it.
    pub fn append(&self, parts: &[&[u8]]) -> Result<(u64, u64), StoreError> {
        let total: u64 = parts.iter().map(|p| p.len() as u64).sum();
        let _appending = self.appending.lock().unwrap_or_else(|p| p.into_inner());
        // The lock is not held while writing and syncing, so reads go on meanwhile. Appends
        // come one at a time (`appending`), and readers never look past `len`.
        let (writer, file, at, path) = {
            let mut f = self.files.lock().unwrap_or_else(|p| p.into_inner());
            if f.len > 0 && f.len.saturating_add(total) > FILE_LIMIT {
                f.current += 1;
                f.len = 0;
                f.writer = None;
                f.dir_synced = false;
            }
            let path = path_of(&self.dir, f.current);
            let writer = match &f.writer {
                Some(w) => w.clone(),
                None => {
                    let w = Arc::new(
                        OpenOptions::new()
                            .create(true)
                            .append(true)
                            .open(&path)
                            .map_err(io("opening", &path))?,
                    );
                    f.writer = Some(w.clone());
                    w
                }
            };
            (writer, f.current, f.len, path)
        };
        let written = write_and_sync(&writer, parts, at);
        let mut f = self.files.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = written {
            // Whatever part reached the file is garbage at its end: append after it.
            f.writer = None;
            f.len = std::fs::metadata(&path).map_or(at, |m| m.len());
            return Err(io("appending content to", &path)(e));
        }
        f.len = at + total;
        if !f.dir_synced {
            File::open(&self.dir)
                .and_then(|d| d.sync_all())
                .map_err(io("syncing", &self.dir))?;
            f.dir_synced = true;
        }
        Ok((file, at))
    }

    /// `len` bytes at `offset` of file `file`, or why not.
    pub fn read(&self, file: u64, offset: u64, len: u64) -> Result<Vec<u8>, String> {
        let end = offset.saturating_add(len);
        let (reader, read_ahead) = {
            let mut f = self.files.lock().unwrap_or_else(|p| p.into_inner());
            // Bytes of the current file past `len` may be an append in progress.
            let complete = if file == f.current { f.len } else { u64::MAX };
            let mut read_ahead = None;
            if let Some(stream) = f.continued(file, offset, end) {
                stream.end = end;
                if let Some((block, from)) = stream.holding(offset, end) {
                    // Copied once the lock is let go.
                    let block = block.clone();
                    drop(f);
                    return Ok(block[from..from + len as usize].to_vec());
                }
                if len < READ_AHEAD / 4 {
                    read_ahead = Some(READ_AHEAD.min(complete.saturating_sub(offset)));
                }
            }
            let reader = match f.readers.get(&file) {
                Some(r) => r.clone(),
                None => {
                    let path = path_of(&self.dir, file);
                    let r = Arc::new(
                        File::open(&path)
                            .map_err(|e| format!("cannot open {}: {e}", path.display()))?,
                    );
                    f.readers.insert(file, r.clone());
                    r
                }
            };
            (reader, read_ahead)
        };
        if let Some(size) = read_ahead {
            if let Some(bytes) = self.read_ahead(&reader, file, offset, len, size) {
                return Ok(bytes);
            }
        }
        let size = usize::try_from(len).map_err(|_| format!("a length of {len} bytes"))?;
        let mut buf = vec![0u8; size];
        reader.read_exact_at(&mut buf, offset).map_err(|e| {
            format!(
                "cannot read bytes {offset}..{} of {}: {e}",
                offset.saturating_add(len),
                path_of(&self.dir, file).display()
            )
        })?;
        Ok(buf)
    }

    /// Reads `size` bytes from `offset` (fewer at the end of the file), keeps them as the
    /// block of the stream that reads there, and gives the first `len`. `None` if that
    /// fails: the caller reads just what it asked for, and reports the error of that.
    fn read_ahead(
        &self,
        reader: &File,
        file: u64,
        offset: u64,
        len: u64,
        size: u64,
    ) -> Option<Vec<u8>> {
        let mut block = vec![0u8; usize::try_from(size).ok()?];
        let mut got = 0usize;
        while got < block.len() {
            match reader.read_at(&mut block[got..], offset + got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return None,
            }
        }
        if (got as u64) < len {
            return None;
        }
        block.truncate(got);
        let bytes = block[..len as usize].to_vec();
        let end = offset + len;
        let mut f = self.files.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(stream) = f
            .streams
            .iter_mut()
            .rev()
            .find(|s| s.file == file && s.end == end)
        {
            stream.ahead = Some((offset, Arc::new(block)));
        }
        Some(bytes)
    }

    /// Removes every content file (a refused import takes back what it wrote).
    pub fn remove_all(&self) -> Result<(), StoreError> {
        let mut f = self.files.lock().unwrap_or_else(|p| p.into_inner());
        f.writer = None;
        f.readers.clear();
        f.streams.clear();
        for entry in std::fs::read_dir(&self.dir).map_err(io("listing", &self.dir))? {
            let entry = entry.map_err(io("listing", &self.dir))?;
            if file_number(&entry.file_name().to_string_lossy()).is_some() {
                std::fs::remove_file(entry.path()).map_err(io("removing", &entry.path()))?;
            }
        }
        f.current = 0;
        f.len = 0;
        f.dir_synced = false;
        Ok(())
    }
}

fn path_of(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("{n:016}.pack"))
}

/// The path of content file `n` of the data directory `data_dir` (for readers that do not
/// open the store, such as `pcx salvage`).
pub fn file_path(data_dir: &Path, n: u64) -> PathBuf {
    path_of(&data_dir.join("content"), n)
}

fn file_number(name: &str) -> Option<u64> {
    name.strip_suffix(".pack")?.parse().ok()
}

/// While a large group is written, its writeback is started every this many bytes.
const WRITEBACK_STEP: usize = 8 << 20;

/// Writes `parts` (appending at `at`) and makes them durable. Writeback of what is written is
/// started every [`WRITEBACK_STEP`] bytes, so the device writes while later parts are still
/// being copied into the page cache, and the final `fdatasync` has less left to wait for: a
/// 64 MiB group took about the copy *plus* the write before, and about the longer of the two
/// now.
fn write_and_sync(w: &File, parts: &[&[u8]], at: u64) -> std::io::Result<()> {
    let (mut start, mut pos) = (0usize, at);
    while start < parts.len() {
        let (mut end, mut bytes) = (start, 0usize);
        while end < parts.len() && (end == start || bytes < WRITEBACK_STEP) {
            bytes += parts[end].len();
            end += 1;
        }
        write_all_vectored(w, &parts[start..end])?;
        if end < parts.len() {
            start_writeback(w, pos, bytes as u64);
        }
        pos += bytes as u64;
        start = end;
    }
    w.sync_data()
}

/// Asks the kernel to start writing a range out, without waiting (`sync_file_range` with
/// `SYNC_FILE_RANGE_WRITE`). Durability still comes from the `fdatasync` after.
fn start_writeback(w: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return;
    };
    // SAFETY: a plain syscall on a descriptor this file owns; its failure only leaves the
    // work to the `fdatasync` that follows.
    let _ =
        unsafe { libc::sync_file_range(w.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE) };
}

/// `write_all` for several buffers, without copying them into one.
fn write_all_vectored(mut w: &File, parts: &[&[u8]]) -> std::io::Result<()> {
    let mut slices: Vec<IoSlice<'_>> = parts.iter().map(|p| IoSlice::new(p)).collect();
    let mut rest = &mut slices[..];
    while !rest.is_empty() {
        match w.write_vectored(rest) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut rest, n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appended_parts_read_back_across_reopen() {
        let tmp = tempfile::tempdir().unwrap();
        let files = ContentFiles::open(tmp.path()).unwrap();
        let (f1, at1) = files.append(&[b"hello ", b"world"]).unwrap();
        let (f2, at2) = files.append(&[b"again"]).unwrap();
        assert_eq!((f1, at1), (0, 0));
        assert_eq!((f2, at2), (0, 11));
        assert_eq!(files.read(0, 6, 5).unwrap(), b"world");
        drop(files);
        let files = ContentFiles::open(tmp.path()).unwrap();
        assert_eq!(files.read(0, 11, 5).unwrap(), b"again");
        let (_, at3) = files.append(&[b"more"]).unwrap();
        assert_eq!(at3, 16, "appends continue after what is there");
    }

    #[test]
    fn sequential_reads_through_the_read_ahead_give_exact_bytes_across_appends() {
        let tmp = tempfile::tempdir().unwrap();
        let files = ContentFiles::open(tmp.path()).unwrap();
        let part = |i: u32| -> Vec<u8> { (0..1000u32).map(|j| (i * 7 + j) as u8).collect() };
        let first: Vec<Vec<u8>> = (0..100).map(part).collect();
        let refs: Vec<&[u8]> = first.iter().map(|p| p.as_slice()).collect();
        let (_, at) = files.append(&refs).unwrap();
        for (i, p) in first.iter().enumerate() {
            assert_eq!(&files.read(0, at + i as u64 * 1000, 1000).unwrap(), p);
        }
        // Appended after a block was read ahead: read where the block ended, and past it.
        let second: Vec<Vec<u8>> = (100..150).map(part).collect();
        let refs: Vec<&[u8]> = second.iter().map(|p| p.as_slice()).collect();
        let (_, at2) = files.append(&refs).unwrap();
        assert_eq!(at2, 100_000);
        for (i, p) in second.iter().enumerate() {
            assert_eq!(&files.read(0, at2 + i as u64 * 1000, 1000).unwrap(), p);
        }
        // Backwards, then forwards again.
        assert_eq!(files.read(0, 5000, 1000).unwrap(), part(5));
        assert_eq!(files.read(0, 6000, 1000).unwrap(), part(6));
        assert_eq!(files.read(0, 149_000, 1000).unwrap(), part(149));
    }

    #[test]
    fn readers_side_by_side_and_at_random_each_get_exact_bytes() {
        let tmp = tempfile::tempdir().unwrap();
        let files = ContentFiles::open(tmp.path()).unwrap();
        let part = |i: u64| -> Vec<u8> { (0..1000u64).map(|j| (i * 13 + j * 7) as u8).collect() };
        let parts: Vec<Vec<u8>> = (0..600).map(part).collect();
        let refs: Vec<&[u8]> = parts.iter().map(|p| p.as_slice()).collect();
        files.append(&refs).unwrap();
        let mut seed = 7u64;
        // Two streams from far apart, interleaved, with random reads between them: more
        // readers than are followed, so streams are also dropped and started again.
        for i in 0..300u64 {
            for at in [i, 300 + i] {
                assert_eq!(
                    files.read(0, at * 1000, 1000).unwrap(),
                    part(at),
                    "part {at}"
                );
            }
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let r = (seed >> 33) % 600;
            assert_eq!(
                files.read(0, r * 1000, 1000).unwrap(),
                part(r),
                "random part {r}"
            );
        }
        // From threads at once.
        std::thread::scope(|s| {
            for t in 0..3u64 {
                let (files, part) = (&files, &part);
                s.spawn(move || {
                    for i in (t * 200)..(t * 200 + 200) {
                        assert_eq!(files.read(0, i * 1000, 1000).unwrap(), part(i));
                    }
                });
            }
        });
    }

    #[test]
    fn a_read_past_the_end_says_where() {
        let tmp = tempfile::tempdir().unwrap();
        let files = ContentFiles::open(tmp.path()).unwrap();
        files.append(&[b"short"]).unwrap();
        let err = files.read(0, 2, 10).unwrap_err();
        assert!(
            err.contains("bytes 2..12") && err.contains(".pack"),
            "{err}"
        );
        let err = files.read(7, 0, 1).unwrap_err();
        assert!(err.contains("cannot open"), "{err}");
    }
}
