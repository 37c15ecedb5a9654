//! Reading what still reads in a data directory that does not open: its records, its anchor
//! and its contents, each found on its own, with where it was found. `pcx salvage` builds on
//! this; nothing here decides what makes a log (the caller follows the hash chain).
//!
//! Two sources:
//! - sled's own trees, read on a *copy* of sled's files (sled writes while it opens: it may
//!   cut a damaged tail or write a page-table snapshot, and the damaged directory must stay
//!   as it was for whoever looks next). Each tree is read on its own, and a failure is noted
//!   with the file it names and the rest read on.
//! - a scan of sled's raw files (`db`, `blobs/*`) for records framed as pcx frames them
//!   ([`find_framed`]): a record carries its own hash, so one found anywhere is whole. A scan
//!   also finds copies sled had let go (older versions of its nodes, even records of a
//!   commit that failed and was taken back), so they are kept apart from sled's, and the
//!   caller picks, by the chain, the record that continues it.
//!
//! Content is found through the content index (sled's, or index entries found in the raw
//! files by the digest they start with), in a sled pack or a content file, and always
//! checked against its digest.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use crate::core::model::Digest;
use crate::store::content::file_path;
use crate::store::damage::{blob_files, diagnose, sled_fault};
use crate::store::pack::{index_entries, page_records, Loc, Place, INDEX_ENTRY};
use crate::store::record::{find_framed, key_seq, seq_key, Framed};

/// One stored copy of a record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub bytes: Vec<u8>,
    /// Where it was found: the sled key of its page, or a file and byte offset.
    pub place: FoundAt,
}

/// Where a record was found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FoundAt {
    /// In sled's tree `pages`, in the page under this key (its first sequence number).
    Page { key: u64 },
    /// In sled's tree `events` (the first layout), under its own sequence number.
    Legacy { key: u64 },
    /// Found by scanning one of sled's files, at this byte.
    Scanned { file: PathBuf, offset: usize },
}

impl std::fmt::Display for FoundAt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FoundAt::Page { key } => write!(f, "sled tree `pages`, the page under key {key}"),
            FoundAt::Legacy { key } => write!(f, "sled tree `events`, key {key}"),
            FoundAt::Scanned { file, offset } => {
                write!(f, "{} at byte {offset} (found by scanning)", file.display())
            }
        }
    }
}

/// Everything found in a data directory.
pub struct Found {
    pub dir: PathBuf,
    /// Whether sled opened (a copy of) its files.
    pub sled_opened: bool,
    /// Whether sled read its log's trees without a failure.
    pub sled_whole: bool,
    /// The records in sled's trees, by the sequence number their page (or key) gives them.
    pub records: BTreeMap<u64, Vec<Candidate>>,
    /// The records found by scanning sled's files, by their own sequence number: each copy
    /// that differs from those in sled's trees.
    pub scanned: BTreeMap<u64, Vec<Candidate>>,
    /// The compaction anchor, if sled's tree `meta` holds one.
    pub anchor: Option<Vec<u8>>,
    /// The snapshot records in sled's tree `snapshots`.
    pub snapshots: Vec<Vec<u8>>,
    /// Snapshot records found by scanning sled's files (the anchor among them, when sled
    /// does not open; also copies sled had let go).
    pub scanned_snapshots: Vec<Vec<u8>>,
    /// What went wrong while reading, in words naming the file.
    pub faults: Vec<String>,
    sled: Option<Sled>,
    /// Where each content is, from sled's content index (the values that still parse).
    locs: HashMap<Digest, Loc>,
    /// sled's files, read whole, when scanned.
    raw: Vec<(PathBuf, Vec<u8>)>,
}

/// sled opened on a copy of the directory's sled files (removed when dropped).
struct Sled {
    db: sled::Db,
    _copy: tempfile::TempDir,
}

/// Reads what it can of `dir`, changing nothing in it: sled's trees, and a scan of sled's
/// files.
pub fn read(dir: &Path) -> Found {
    let mut found = Found {
        dir: dir.to_path_buf(),
        sled_opened: false,
        sled_whole: false,
        records: BTreeMap::new(),
        scanned: BTreeMap::new(),
        anchor: None,
        snapshots: Vec::new(),
        scanned_snapshots: Vec::new(),
        faults: Vec::new(),
        sled: None,
        locs: HashMap::new(),
        raw: Vec::new(),
    };
    match open_copy(dir) {
        Ok(sled) => {
            found.sled_opened = true;
            found.sled_whole = found.read_trees(&sled.db);
            found.sled = Some(sled);
        }
        Err(fault) => found.faults.push(fault),
    }
    // Always: sled, opening a log damaged in the middle, may take the damage for a torn tail
    // and cut the log there without an error; only the raw files show what it cut.
    found.scan();
    found
}

/// Copies sled's files (`conf`, `db`, `snap.*`, `blobs/*`) of `dir` aside and opens sled on
/// the copy.
fn open_copy(dir: &Path) -> Result<Sled, String> {
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty());
    let copy = parent
        .and_then(|p| {
            tempfile::Builder::new()
                .prefix(".pcx-salvage-")
                .tempdir_in(p)
                .ok()
        })
        .map_or_else(
            || {
                tempfile::Builder::new()
                    .prefix("pcx-salvage-")
                    .tempdir()
                    .map_err(|e| format!("cannot make a place to copy sled's files to: {e}"))
            },
            Ok,
        )?;
    let entries =
        std::fs::read_dir(dir).map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let text = name.to_string_lossy();
        if text == "conf" || text == "db" || text.starts_with("snap.") {
            let to = copy.path().join(&name);
            std::fs::copy(entry.path(), &to)
                .map_err(|e| format!("cannot copy {}: {e}", entry.path().display()))?;
        }
    }
    let blobs = copy.path().join("blobs");
    std::fs::create_dir_all(&blobs).map_err(|e| format!("cannot copy sled's files: {e}"))?;
    for blob in blob_files(dir) {
        if let Some(name) = blob.file_name() {
            std::fs::copy(&blob, blobs.join(name))
                .map_err(|e| format!("cannot copy {}: {e}", blob.display()))?;
        }
    }
    if !copy.path().join("db").exists() {
        return Err(format!(
            "sled's data file {} is missing",
            dir.join("db").display()
        ));
    }
    let db = sled::Config::new()
        .path(copy.path())
        .flush_every_ms(None)
        .open()
        .map_err(|e| {
            format!(
                "sled cannot open its files: {}",
                // The copy fails as the original would; name the original's files.
                diagnose(dir, &e)
            )
        })?;
    Ok(Sled { db, _copy: copy })
}

impl Found {
    /// Reads sled's trees. True when the log's trees read without a failure.
    fn read_trees(&mut self, db: &sled::Db) -> bool {
        let dir = self.dir.clone();
        let fault = |what: &str, e: &sled::Error| format!("{what}: {}", sled_fault(&dir, e));
        let mut whole = true;
        let open = |name: &str| {
            db.open_tree(name)
                .map_err(|e| fault(&format!("opening sled tree `{name}`"), &e))
        };
        match open("meta") {
            Ok(meta) => match meta.get(b"anchor") {
                Ok(anchor) => self.anchor = anchor.map(|a| a.to_vec()),
                Err(e) => self.faults.push(fault("reading the compaction anchor", &e)),
            },
            Err(f) => self.faults.push(f),
        }
        match open("events") {
            Ok(legacy) => {
                let mut last = 0;
                for item in legacy.iter() {
                    match item {
                        Ok((k, v)) => {
                            let key = key_seq(&k).unwrap_or(u64::MAX);
                            last = key;
                            self.add(key, v.to_vec(), FoundAt::Legacy { key });
                        }
                        Err(e) => {
                            self.faults.push(fault(
                                &format!("reading sled tree `events` after key {last}"),
                                &e,
                            ));
                            whole = false;
                            break;
                        }
                    }
                }
            }
            Err(f) => {
                self.faults.push(f);
                whole = false;
            }
        }
        match open("pages") {
            Ok(pages) => {
                let mut last = None;
                for item in pages.iter() {
                    match item {
                        Ok((k, v)) => {
                            let key = key_seq(&k).unwrap_or(u64::MAX);
                            last = Some(key);
                            for (seq, record) in page_records(&v, key) {
                                self.add(seq, record.to_vec(), FoundAt::Page { key });
                            }
                        }
                        Err(e) => {
                            let after = last.map_or("at its start".to_string(), |k| {
                                format!("after the page under key {k}")
                            });
                            self.faults
                                .push(fault(&format!("reading sled tree `pages` {after}"), &e));
                            whole = false;
                            break;
                        }
                    }
                }
            }
            Err(f) => {
                self.faults.push(f);
                whole = false;
            }
        }
        match open("snapshots") {
            Ok(snapshots) => {
                for item in snapshots.iter().values() {
                    match item {
                        Ok(v) => self.snapshots.push(v.to_vec()),
                        Err(e) => {
                            self.faults.push(fault("reading sled tree `snapshots`", &e));
                            break;
                        }
                    }
                }
            }
            Err(f) => self.faults.push(f),
        }
        match open("pack_index") {
            Ok(index) => {
                for item in index.iter() {
                    match item {
                        Ok((k, v)) => match index_entries(&v) {
                            Some(entries) => self.locs.extend(entries),
                            None => self.faults.push(format!(
                                "the content index value under key {} ({} bytes) is damaged",
                                key_seq(&k).map_or_else(|| format!("{k:?}"), |n| n.to_string()),
                                v.len()
                            )),
                        },
                        Err(e) => {
                            self.faults
                                .push(fault("reading sled tree `pack_index`", &e));
                            break;
                        }
                    }
                }
            }
            Err(f) => self.faults.push(f),
        }
        whole
    }

    fn add(&mut self, seq: u64, bytes: Vec<u8>, place: FoundAt) {
        let copies = self.records.entry(seq).or_default();
        if !copies.iter().any(|c| c.bytes == bytes) {
            copies.push(Candidate { bytes, place });
        }
    }

    /// Scans sled's raw files for framed records and snapshots.
    fn scan(&mut self) {
        let mut files = vec![self.dir.join("db")];
        files.extend(blob_files(&self.dir));
        for path in files {
            match std::fs::read(&path) {
                Ok(bytes) => self.raw.push((path, bytes)),
                Err(e) => self
                    .faults
                    .push(format!("cannot read {} to scan it: {e}", path.display())),
            }
        }
        let mut found = Vec::new();
        let mut snapshots = Vec::new();
        for (path, bytes) in &self.raw {
            for range in find_framed(bytes, Framed::Event) {
                let record = bytes[range.clone()].to_vec();
                if let Ok((envelope, _)) = crate::store::record::decode_event(&record) {
                    let place = FoundAt::Scanned {
                        file: path.clone(),
                        offset: range.start,
                    };
                    found.push((envelope.seq, record, place));
                }
            }
            for range in find_framed(bytes, Framed::Snapshot) {
                snapshots.push(bytes[range].to_vec());
            }
        }
        for (seq, bytes, place) in found {
            let known = |copies: Option<&Vec<Candidate>>| {
                copies.is_some_and(|c| c.iter().any(|c| c.bytes == bytes))
            };
            if !known(self.records.get(&seq)) && !known(self.scanned.get(&seq)) {
                self.scanned
                    .entry(seq)
                    .or_default()
                    .push(Candidate { bytes, place });
            }
        }
        for snapshot in snapshots {
            if !self.scanned_snapshots.contains(&snapshot) {
                self.scanned_snapshots.push(snapshot);
            }
        }
    }

    /// A content by digest, checked against it; or why it cannot be had.
    pub fn content(&self, digest: &Digest) -> Result<Vec<u8>, String> {
        let mut tried = Vec::new();
        if let Some(loc) = self.locs.get(digest) {
            match self.at(loc, digest) {
                Ok(c) => return Ok(c),
                Err(why) => tried.push(why),
            }
        }
        if let Some(sled) = &self.sled {
            match sled.db.open_tree("blobs").map(|t| t.get(digest.0)) {
                Ok(Ok(Some(c))) if Digest::of(&c) == *digest => return Ok(c.to_vec()),
                Ok(Ok(Some(_))) => {
                    tried.push("its copy in sled tree `blobs` does not match its digest".into())
                }
                Ok(Ok(None)) => {}
                Ok(Err(e)) | Err(e) => tried.push(format!(
                    "reading sled tree `blobs`: {}",
                    sled_fault(&self.dir, &e)
                )),
            }
        }
        for (_, bytes) in &self.raw {
            let mut from = 0;
            while let Some(i) = find(&bytes[from..], &digest.0).map(|i| i + from) {
                from = i + 1;
                let Some(loc) = bytes
                    .get(i..i + INDEX_ENTRY)
                    .and_then(index_entries)
                    .and_then(|e| e.first().map(|(_, l)| *l))
                else {
                    continue;
                };
                let found = match loc.place {
                    Place::File => self.at(&loc, digest).ok(),
                    Place::Sled => self.scan_pack(bytes, i, &loc, digest),
                };
                if let Some(c) = found {
                    return Ok(c);
                }
            }
        }
        if tried.is_empty() {
            tried.push(
                "no index entry for it was found, neither in sled nor by scanning sled's files"
                    .into(),
            );
        }
        Err(tried.join("; "))
    }

    /// The content at `loc`, checked against its digest.
    fn at(&self, loc: &Loc, digest: &Digest) -> Result<Vec<u8>, String> {
        let bytes = match loc.place {
            Place::File => {
                let path = file_path(&self.dir, loc.pack);
                read_at(&path, loc.offset, loc.len)
                    .map_err(|e| format!("reading {}: {e}", path.display()))?
            }
            Place::Sled => {
                let Some(sled) = &self.sled else {
                    return Err(format!("pack {} is in sled, which does not open", loc.pack));
                };
                let pack = sled
                    .db
                    .open_tree("packs")
                    .and_then(|t| t.get(seq_key(loc.pack)))
                    .map_err(|e| {
                        format!("reading pack {}: {}", loc.pack, sled_fault(&self.dir, &e))
                    })?
                    .ok_or_else(|| format!("pack {} is missing", loc.pack))?;
                loc.slice(&pack)
                    .ok_or_else(|| format!("pack {} is too short for it", loc.pack))?
                    .to_vec()
            }
        };
        if Digest::of(&bytes) != *digest {
            return Err(format!(
                "its bytes in {} do not match its digest",
                match loc.place {
                    Place::File => file_path(&self.dir, loc.pack).display().to_string(),
                    Place::Sled => format!("pack {}", loc.pack),
                }
            ));
        }
        Ok(bytes)
    }

    /// Finds a content of a sled pack in the raw files, from its index entry found at
    /// `entry` of `index_bytes`. The entries after it in the same index value give the pack's
    /// length, and sled stores a value as its length (sled's varint) then its bytes.
    fn scan_pack(
        &self,
        index_bytes: &[u8],
        entry: usize,
        loc: &Loc,
        digest: &Digest,
    ) -> Option<Vec<u8>> {
        let mut end = loc.offset.checked_add(loc.len)?;
        let mut next = entry + INDEX_ENTRY;
        while let Some((_, l)) = index_bytes
            .get(next..next + INDEX_ENTRY)
            .and_then(index_entries)
            .and_then(|e| e.first().copied())
        {
            if l.place != Place::Sled || l.pack != loc.pack || l.offset != end {
                break;
            }
            end = end.checked_add(l.len)?;
            next += INDEX_ENTRY;
        }
        let head = sled_varint(end);
        let (offset, len) = (
            usize::try_from(loc.offset).ok()?,
            usize::try_from(loc.len).ok()?,
        );
        for (_, bytes) in &self.raw {
            let mut from = 0;
            while let Some(i) = find(&bytes[from..], &head).map(|i| i + from) {
                from = i + 1;
                let start = i + head.len() + offset;
                if let Some(content) = bytes.get(start..start + len) {
                    if Digest::of(content) == *digest {
                        return Some(content.to_vec());
                    }
                }
            }
        }
        None
    }
}

fn read_at(path: &Path, offset: u64, len: u64) -> std::io::Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::open(path)?;
    let mut buf = vec![0; usize::try_from(len).map_err(std::io::Error::other)?];
    file.read_exact_at(&mut buf, offset)?;
    Ok(buf)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// sled 0.34.7's encoding of a length (its `u64` serialization), which precedes every value
/// it stores.
fn sled_varint(n: u64) -> Vec<u8> {
    let le = n.to_le_bytes();
    match n {
        0..=240 => vec![n as u8],
        241..=2287 => vec![((n - 240) / 256 + 241) as u8, ((n - 240) % 256) as u8],
        2288..=67823 => vec![249, ((n - 2288) / 256) as u8, ((n - 2288) % 256) as u8],
        _ => {
            // The fewest little-endian bytes that hold it, at least three.
            let width = (8 - n.leading_zeros() as usize / 8).max(3);
            let mut out = vec![247 + width as u8];
            out.extend_from_slice(&le[..width]);
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_are_encoded_as_sled_encodes_them() {
        assert_eq!(sled_varint(9), vec![9]);
        assert_eq!(sled_varint(241), vec![241, 1]);
        assert_eq!(sled_varint(2287), vec![248, 255]);
        assert_eq!(sled_varint(2288), vec![249, 0, 0]);
        assert_eq!(sled_varint(67824), vec![250, 0xF0, 0x08, 0x01]);
        assert_eq!(sled_varint(0x1_0000_0000), vec![252, 0, 0, 0, 0, 1]);
    }
}
