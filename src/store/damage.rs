//! Saying which of a data directory's files is damaged when sled fails.
//!
//! sled 0.34.7 names a place for some damage (`Corruption { at: Some(ptr) }`: a byte offset
//! of its data file `db`, or a large-value file `blobs/N`) and none for the rest: everything
//! it finds while opening its files says only "Read corrupted data at file offset None", and a
//! missing large-value file only "No such file or directory". A user cannot act on that. So
//! the place sled gives is put in words, and when it gives none, the files sled protects with
//! a checksum of their own (its configuration `conf`, its newest page-table snapshot
//! `snap.N`, each `blobs/N`) are checked here the way sled checks them; failing that, the
//! damage is in `db`, the file that holds everything else.
//!
//! The layouts checked are sled 0.34.7's (pinned in Cargo.toml): `conf` is text lines then a
//! CRC-32 (little-endian) of them; `snap.N` ends with its length (u64) and a CRC-32 of what
//! precedes them; `blobs/N` begins with a CRC-32 of the rest.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};

/// The place a sled error names, in words, with paths under `dir` (give an empty path for
/// names relative to the data directory). Does no IO.
pub fn sled_fault(dir: &Path, e: &sled::Error) -> String {
    let file = |name: &str| name_in(dir, name);
    match e {
        sled::Error::Corruption {
            at: Some(sled::DiskPtr::Inline(offset)),
            ..
        } => format!(
            "sled's data file {} is damaged at byte {offset}",
            file("db")
        ),
        sled::Error::Corruption {
            at: Some(sled::DiskPtr::Blob(_, lsn)),
            ..
        } => format!(
            "sled's large-value file {} is damaged (it fails its checksum)",
            file(&format!("blobs/{lsn}"))
        ),
        sled::Error::Corruption { at: None, .. } => format!(
            "sled found damaged data in its files and does not say where (its data file {}, \
             or a large-value file under {})",
            file("db"),
            file("blobs/")
        ),
        sled::Error::Io(io) if io.kind() == ErrorKind::NotFound => format!(
            "a file sled needs is missing ({io}): one of its large-value files under {}",
            file("blobs/")
        ),
        sled::Error::Io(io) if dir.as_os_str().is_empty() => {
            format!("sled's files cannot be read or written: {io}")
        }
        sled::Error::Io(io) => format!(
            "sled's files in {} cannot be read or written: {io}",
            dir.display()
        ),
        other => format!("sled failed: {other}"),
    }
}

/// Like [`sled_fault`], but when sled names no place, finds it: checks the files sled
/// protects with checksums of their own, as sled does. Reads the directory (only after a
/// failure).
pub fn diagnose(dir: &Path, e: &sled::Error) -> String {
    let unplaced = matches!(e, sled::Error::Corruption { at: None, .. })
        || matches!(e, sled::Error::Io(io) if io.kind() == ErrorKind::NotFound);
    if !unplaced {
        return sled_fault(dir, e);
    }
    let db = dir.join("db");
    if !db.exists() {
        return format!("sled's data file {} is missing", db.display());
    }
    if let Some(found) = damaged_checksummed_file(dir) {
        return found;
    }
    match e {
        sled::Error::Io(io) => format!(
            "a file sled needs is missing ({io}): one of its large-value files under {} (present: {})",
            dir.join("blobs").display(),
            blob_files(dir)
                .iter()
                .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        _ => format!(
            "sled's data file {} is damaged (sled found data failing its checks there and does \
             not say at which byte)",
            db.display()
        ),
    }
}

/// Whether sled's data file is missing from a directory sled has written before (its
/// configuration is there): sled would make a new, empty one, and the log would be served as
/// empty. Ask before sled opens it.
pub fn data_file_missing(dir: &Path) -> bool {
    dir.join("conf").exists() && !dir.join("db").exists()
}

fn name_in(dir: &Path, name: &str) -> String {
    if dir.as_os_str().is_empty() {
        format!("`{name}` (in the data directory)")
    } else {
        dir.join(name).display().to_string()
    }
}

/// The first of sled's checksummed files that fails its check, described.
fn damaged_checksummed_file(dir: &Path) -> Option<String> {
    let conf = dir.join("conf");
    if let Ok(bytes) = std::fs::read(&conf) {
        if !conf_is_sound(&bytes) {
            return Some(format!(
                "sled's configuration file {} is damaged",
                conf.display()
            ));
        }
    }
    if let Some(snap) = newest_snapshot_file(dir) {
        let sound = std::fs::read(&snap).is_ok_and(|b| snapshot_is_sound(&b));
        if !sound {
            return Some(format!(
                "sled's page-table snapshot {} is damaged (it fails its checksum)",
                snap.display()
            ));
        }
    }
    for blob in blob_files(dir) {
        let sound = std::fs::read(&blob).is_ok_and(|b| blob_is_sound(&b));
        if !sound {
            return Some(format!(
                "sled's large-value file {} is damaged (it fails its checksum)",
                blob.display()
            ));
        }
    }
    None
}

/// sled's `conf`: `key: value` lines naming the segment size, compression and version,
/// then a CRC-32 sled only warns about; a line it cannot parse stops it.
fn conf_is_sound(bytes: &[u8]) -> bool {
    let Some(text) = bytes
        .len()
        .checked_sub(4)
        .and_then(|n| std::str::from_utf8(&bytes[..n]).ok())
    else {
        return false;
    };
    let value = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(": "))
    };
    let version_ok = value("version").is_some_and(|v| {
        let mut parts = v.split('.');
        parts.next().is_some_and(|m| m.parse::<usize>().is_ok())
            && parts.next().is_some_and(|m| m.parse::<usize>().is_ok())
    });
    text.lines().all(|l| l.contains(": "))
        && value("segment_size").is_some_and(|v| v.parse::<usize>().is_ok())
        && value("use_compression").is_some_and(|v| v.parse::<bool>().is_ok())
        && version_ok
}

fn snapshot_is_sound(bytes: &[u8]) -> bool {
    let len = bytes.len();
    if len <= 12 {
        return false;
    }
    let mut crc = [0u8; 4];
    crc.copy_from_slice(&bytes[len - 4..]);
    crc32fast::hash(&bytes[..len - 12]) == u32::from_le_bytes(crc)
}

/// Whether a large-value file `blobs/N` passes sled's check: a CRC-32 of the rest first.
pub fn blob_is_sound(bytes: &[u8]) -> bool {
    if bytes.len() < 5 {
        return false;
    }
    let mut crc = [0u8; 4];
    crc.copy_from_slice(&bytes[..4]);
    crc32fast::hash(&bytes[4..]) == u32::from_le_bytes(crc)
}

/// The page-table snapshot sled reads when it opens: the `snap.*` file last in name order.
fn newest_snapshot_file(dir: &Path) -> Option<PathBuf> {
    let mut snaps: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("snap.") && !n.ends_with(".in___motion"))
        })
        .collect();
    snaps.sort();
    snaps.pop()
}

/// sled's large-value files, in name order.
pub fn blob_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir.join("blobs"))
        .map(|l| {
            l.flatten()
                .map(|e| e.path())
                .filter(|p| p.is_file())
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conf(text: &str) -> Vec<u8> {
        let mut bytes = text.as_bytes().to_vec();
        bytes.extend_from_slice(&crc32fast::hash(text.as_bytes()).to_le_bytes());
        bytes
    }

    #[test]
    fn a_conf_is_sound_only_when_sled_can_parse_it() {
        assert!(conf_is_sound(&conf(
            "segment_size: 524288\nuse_compression: false\nversion: 0.34\n"
        )));
        assert!(!conf_is_sound(&conf(
            "segment_size: 5x4288\nuse_compression: false\nversion: 0.34\n"
        )));
        assert!(!conf_is_sound(&conf(
            "segment_size: 524288\nversion: 0.34\n"
        )));
        assert!(!conf_is_sound(b"ab"));
    }

    #[test]
    fn a_blob_file_is_sound_when_its_checksum_holds() {
        let mut blob = crc32fast::hash(b"\x01value").to_le_bytes().to_vec();
        blob.extend_from_slice(b"\x01value");
        assert!(blob_is_sound(&blob));
        let last = blob.len() - 1;
        blob[last] ^= 1;
        assert!(!blob_is_sound(&blob));
    }

    #[test]
    fn a_place_sled_names_is_said_with_its_file() {
        let dir = Path::new("/data");
        let e = sled::Error::Corruption {
            at: Some(sled::DiskPtr::Inline(4096)),
            bt: (),
        };
        assert_eq!(
            sled_fault(dir, &e),
            "sled's data file /data/db is damaged at byte 4096"
        );
        let e = sled::Error::Corruption {
            at: Some(sled::DiskPtr::Blob(0, 739271)),
            bt: (),
        };
        assert!(sled_fault(dir, &e).contains("/data/blobs/739271"));
        assert!(sled_fault(Path::new(""), &e).contains("`blobs/739271` (in the data directory)"));
    }
}
