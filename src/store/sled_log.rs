//! Checking sled's log before sled opens it: damage in the middle of the log is refused, a
//! tail a crash cut short is let through.
//!
//! Why: sled 0.34.7, opening its data file `db`, reads the log written since its last open and
//! takes the first record that fails its checks for the end of a write a crash cut short. It
//! stops there, zeroes the rest of that segment and every later segment, and serves the
//! shorter log as whole. So one damaged record in the middle of the log (a flipped bit, a bad
//! sector) silently drops every later record, and the events they held with them; pcx then
//! sees a sound, shorter history unless a snapshot of its own names a later event. sled cannot
//! be asked to tell the two apart, so this module reads `db` itself, read-only, before sled
//! does, the way sled's recovery reads it, and refuses ([`OpenError::SledLogDamaged`]) when a
//! record fails its checks at a place sled had already made durable.
//!
//! How a torn tail is told from damage: every segment of the log (512 KiB by default, the
//! size is in sled's `conf`) begins with a header holding the segment's log position and the
//! position up to which the log was durable (written and synced) when the segment was begun.
//! Whatever lies below the highest such position was on disk, whole, before the last segment
//! was started; no crash afterwards can tear it. A record failing its checks there is damage.
//! A failure above it (in the writes that had not been synced when the process died) is a
//! torn tail, and sled's own recovery is left to cut it, as before. A log position that no
//! segment claims, below that mark, is a lost segment header: damage too.
//!
//! What is read mirrors sled's recovery (sled 0.34.7, `pagecache/iterator.rs`,
//! `pagecache/snapshot.rs`, `pagecache/logger.rs`; the version is pinned in Cargo.toml):
//! - only segments at or past the position of sled's newest page-table snapshot `snap.N` (its
//!   file name is the position, in hex): older ones sled does not scan when it opens, and a
//!   failure it meets reading them later is an error, not a silent cut;
//! - a segment header: 20 bytes, a CRC-32 (stored inverted) of the next 16, then the
//!   segment's position and the durable position, each a little-endian i64 xor
//!   `0x7FFF_FFFF_FFFF_FFFF`;
//! - a record: a CRC-32 (little-endian, inverted, of the body then the rest of the header),
//!   its kind (a byte, 1 to 11), then its length, its segment number and its page id, each as
//!   sled's variable-length integers; the body follows. A segment ends with a `Cap` record
//!   or when fewer than 32 bytes are left in it.
//!
//! Cost: one sequential read of the segments written since sled's last open (sled reads them
//! too, as it opens), a CRC-32 over each record, and a 20-byte read per segment for headers.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::store::error::OpenError;

/// Length of a segment header.
const SEG_HEADER_LEN: u64 = 20;
/// The longest a record header may be; no record starts in a segment's last this many bytes.
const MAX_MSG_HEADER_LEN: u64 = 32;
/// How much of a record is read to decode its header (as sled does).
const HEADER_READ: usize = 128;
/// The record kind that caps a full segment.
const KIND_CAP: u8 = 2;
/// The record kinds whose body is the log position naming a large-value file `blobs/N`
/// (`BlobMeta`, `BlobNode`, `BlobLink`).
const BLOB_KINDS: [u8; 3] = [7, 9, 11];
/// The highest record kind sled 0.34 writes (`BlobLink`); 0 and anything above are "corrupted".
const KIND_MAX: u8 = 11;
/// The xor mask of positions in a segment header.
const LSN_MASK: i64 = 0x7FFF_FFFF_FFFF_FFFF;

/// Reads sled's log in `dir` as sled's recovery will, before sled opens it, and refuses a log
/// damaged before its end. A directory sled has not written yet (no `conf`, or no `db`) and
/// a `conf` that does not parse (sled refuses it itself) are let through. Changes nothing.
pub fn check(dir: &Path) -> Result<(), OpenError> {
    let Some(segment_size) = segment_size(dir) else {
        return Ok(());
    };
    let path = dir.join("db");
    let file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(source) => return Err(OpenError::SledLogUnreadable { file: path, source }),
    };
    let unreadable = |source| OpenError::SledLogUnreadable {
        file: path.clone(),
        source,
    };
    let file_len = file.metadata().map_err(unreadable)?.len();
    let snapshot = snapshot_position(dir).unwrap_or(0);
    let blobs = dir.join("blobs");
    let log = Log {
        file: &file,
        file_len,
        segment_size,
        blobs: &blobs,
    };
    let started = std::time::Instant::now();
    let found = log.first_damage(snapshot).map_err(unreadable)?;
    tracing::debug!(
        file = %path.display(),
        file_bytes = file_len,
        from_position = snapshot,
        damaged = found.is_some(),
        took_us = started.elapsed().as_micros() as u64,
        "checked sled's log before opening it"
    );
    match found {
        None => Ok(()),
        Some(Damage {
            offset,
            durable,
            blob: Some(blob),
            ..
        }) => Err(OpenError::SledBlobDamaged {
            blob,
            file: path,
            offset,
            durable,
        }),
        Some(d) => Err(OpenError::SledLogDamaged {
            file: path,
            offset: d.offset,
            what: d.what,
            durable: d.durable,
        }),
    }
}

/// Damage found in the log.
#[derive(Debug, PartialEq, Eq)]
struct Damage {
    /// Byte offset in `db`.
    offset: u64,
    what: String,
    /// The log position up to which sled had made the log durable.
    durable: i64,
    /// The large-value file that fails its checksum, when that is the damage (`offset` is
    /// then the record pointing to it).
    blob: Option<std::path::PathBuf>,
}

/// One segment, as its header says.
#[derive(Clone, Copy, Debug)]
struct Segment {
    /// Its byte offset in `db`.
    offset: u64,
    /// Its log position.
    lsn: i64,
    /// The position the log was durable up to when it was begun.
    durable: i64,
}

/// How a segment's records end.
#[derive(Debug, PartialEq, Eq)]
enum End {
    /// With a `Cap`, or too near the segment's end for another record: written whole.
    Full,
    /// At the record at this offset in the segment: it fails a check, or nothing was written
    /// there (the end of the log).
    Stopped { at: u64, why: &'static str },
    /// The record at this offset, below the durable mark, points to a large-value file that
    /// is there but fails its checksum: sled's recovery would end the log at that record.
    BadBlob { at: u64, blob: std::path::PathBuf },
}

struct Log<'a> {
    file: &'a File,
    file_len: u64,
    segment_size: u64,
    /// sled's large-value files, `blobs/N` (N the log position of the record pointing to it).
    blobs: &'a Path,
}

impl Log<'_> {
    /// The first damage at or below the durable mark in the segments at or after the
    /// position `snapshot` of sled's newest page-table snapshot.
    fn first_damage(&self, snapshot: i64) -> std::io::Result<Option<Damage>> {
        let size = self.segment_size as i64;
        let from = snapshot.max(0) / size * size;
        let (segments, bad_headers) = self.segments(from)?;
        // Below the snapshot's position, the log was read whole at sled's last open.
        let durable = segments
            .iter()
            .map(|s| s.durable)
            .fold(snapshot - 1, std::cmp::Ord::max);
        let mut buf = Vec::new();
        for s in &segments {
            if s.lsn > durable {
                break;
            }
            match self.walk(s, durable, &mut buf)? {
                End::Stopped { at, why } if s.lsn + at as i64 <= durable => {
                    return Ok(Some(Damage {
                        offset: s.offset + at,
                        what: format!("a record of sled's log {why}"),
                        durable,
                        blob: None,
                    }));
                }
                End::BadBlob { at, blob } => {
                    return Ok(Some(Damage {
                        offset: s.offset + at,
                        what: format!("the large-value file {} fails its checksum", blob.display()),
                        durable,
                        blob: Some(blob),
                    }));
                }
                _ => {}
            }
        }
        // A segment whose header fails while its first record names a durable position no
        // other header claims: that segment's header is damaged (sled would skip the
        // segment, or end the log before it). A zeroed or reused slot does not look so.
        for &offset in &bad_headers {
            let Some(lsn) = self.claimed_position(offset, &mut buf)? else {
                continue;
            };
            let claimed = segments.binary_search_by_key(&lsn, |s| s.lsn).is_ok();
            if lsn >= from && lsn <= durable && !claimed {
                return Ok(Some(Damage {
                    offset,
                    what: format!(
                        "the header of the segment at log position {lsn} fails its checksum"
                    ),
                    durable,
                    blob: None,
                }));
            }
        }
        Ok(None)
    }

    /// The log position the first record of the slot at `offset` names, when that record
    /// passes its checks.
    fn claimed_position(&self, offset: u64, buf: &mut Vec<u8>) -> std::io::Result<Option<i64>> {
        let size = self.segment_size;
        let mut first = [0u8; HEADER_READ];
        let have = (SEG_HEADER_LEN + HEADER_READ as u64)
            .min(self.file_len.saturating_sub(offset))
            .saturating_sub(SEG_HEADER_LEN) as usize;
        self.file
            .read_exact_at(&mut first[..have], offset + SEG_HEADER_LEN)?;
        if first[4] == 0 || first[4] > KIND_MAX {
            return Ok(None);
        }
        self.read_slot(offset, buf)?;
        Ok(read_record(buf, SEG_HEADER_LEN, size)
            .ok()
            .and_then(|r| i64::try_from(r.segment.checked_mul(size)?).ok()))
    }

    /// The segments whose headers pass their check, at or past `from`, by log position; and
    /// the offsets of the headers that fail theirs.
    fn segments(&self, from: i64) -> std::io::Result<(Vec<Segment>, Vec<u64>)> {
        let size = self.segment_size;
        // As sled counts them: a last piece too short for a header is not a segment.
        let count = self.file_len / size + u64::from(self.file_len % size >= SEG_HEADER_LEN);
        let mut found = Vec::new();
        let mut bad = Vec::new();
        for i in 0..count {
            let offset = i * size;
            let mut h = [0u8; SEG_HEADER_LEN as usize];
            self.file.read_exact_at(&mut h, offset)?;
            match parse_segment_header(&h) {
                Some((lsn, durable)) if lsn >= from && lsn % size as i64 == 0 => {
                    found.push(Segment {
                        offset,
                        lsn,
                        durable,
                    })
                }
                Some(_) => {}
                None => bad.push(offset),
            }
        }
        found.sort_by_key(|s| s.lsn);
        found.dedup_by_key(|s| s.lsn);
        Ok((found, bad))
    }

    /// Reads the slot at `offset` (a segment, as far as the file holds it) into `buf`.
    fn read_slot(&self, offset: u64, buf: &mut Vec<u8>) -> std::io::Result<()> {
        let len = self.segment_size.min(self.file_len.saturating_sub(offset));
        buf.resize(len as usize, 0);
        self.file.read_exact_at(buf, offset)
    }

    /// Reads the records of segment `s` until one fails or the segment is full, checking the
    /// large-value file of each record at or below `durable` that points to one (as sled's
    /// recovery reads it; a missing one sled skips, and so does this).
    fn walk(&self, s: &Segment, durable: i64, buf: &mut Vec<u8>) -> std::io::Result<End> {
        let size = self.segment_size;
        self.read_slot(s.offset, buf)?;
        let number = s.lsn as u64 / size;
        let mut at = SEG_HEADER_LEN;
        while at + MAX_MSG_HEADER_LEN <= size {
            match read_record(buf, at, size) {
                Ok(r) if r.segment != number => {
                    return Ok(End::Stopped {
                        at,
                        why: "belongs to another segment",
                    })
                }
                Ok(r) if r.kind == KIND_CAP => return Ok(End::Full),
                Ok(r) => {
                    if BLOB_KINDS.contains(&r.kind) && s.lsn + at as i64 <= durable {
                        if let Some(blob) = self.bad_blob(&buf[r.body.clone()])? {
                            return Ok(End::BadBlob { at, blob });
                        }
                    }
                    at = r.next
                }
                Err(why) => return Ok(End::Stopped { at, why }),
            }
        }
        Ok(End::Full)
    }
}

impl Log<'_> {
    /// The large-value file a blob record's body points to, if it is there and fails its
    /// checksum.
    fn bad_blob(&self, body: &[u8]) -> std::io::Result<Option<std::path::PathBuf>> {
        let Ok(id) = <[u8; 8]>::try_from(body) else {
            return Ok(None);
        };
        let path = self.blobs.join(i64::from_le_bytes(id).to_string());
        match std::fs::read(&path) {
            Ok(bytes) if crate::store::damage::blob_is_sound(&bytes) => Ok(None),
            Ok(_) => Ok(Some(path)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// A record that passes its checksum.
struct Record {
    kind: u8,
    /// Where its body lies in the segment.
    body: std::ops::Range<usize>,
    /// The segment number it names.
    segment: u64,
    /// Where the next record begins in the segment.
    next: u64,
}

/// The record at `at` of a segment (`seg`, as far as it is in the file; `size` long when
/// whole), or why it fails.
fn read_record(seg: &[u8], at: u64, size: u64) -> Result<Record, &'static str> {
    let start = at as usize;
    let mut header = [0u8; HEADER_READ];
    let have = seg.len().saturating_sub(start).min(HEADER_READ);
    if have == 0 {
        return Err("is missing (the file ends before it)");
    }
    header[..have].copy_from_slice(&seg[start..start + have]);
    let mut cur: &[u8] = &header;
    let crc = take_u32(&mut cur).ok_or("has a truncated header")?;
    let kind = take_u8(&mut cur).ok_or("has a truncated header")?;
    let len = take_varint(&mut cur).ok_or("has a truncated header")?;
    let seg_number = take_varint(&mut cur).ok_or("has a truncated header")?;
    let _page = take_varint(&mut cur).ok_or("has a truncated header")?;
    let header_len = (HEADER_READ - cur.len()) as u64;
    if len > size - at - header_len {
        return Err("has an impossible length");
    }
    if kind == 0 || kind > KIND_MAX {
        return Err("has no valid kind");
    }
    let body_start = start + header_len as usize;
    let body_end = body_start + len as usize;
    let body = seg
        .get(body_start..body_end)
        .ok_or("is cut short (the file ends inside it)")?;
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(body);
    hasher.update(&header[4..header_len as usize]);
    if hasher.finalize() ^ 0xFFFF_FFFF != crc {
        return Err("fails its checksum");
    }
    Ok(Record {
        kind,
        body: body_start..body_end,
        segment: seg_number,
        next: at + header_len + len,
    })
}

/// A segment header's log position and durable position, if its checksum holds.
fn parse_segment_header(h: &[u8; SEG_HEADER_LEN as usize]) -> Option<(i64, i64)> {
    let word = |r: std::ops::Range<usize>| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&h[r]);
        i64::from_le_bytes(b) ^ LSN_MASK
    };
    let mut crc = [0u8; 4];
    crc.copy_from_slice(&h[..4]);
    (crc32fast::hash(&h[4..]) == u32::from_le_bytes(crc) ^ 0xFFFF_FFFF)
        .then(|| (word(4..12), word(12..20)))
}

fn take_u8(cur: &mut &[u8]) -> Option<u8> {
    let (&b, rest) = cur.split_first()?;
    *cur = rest;
    Some(b)
}

fn take_u32(cur: &mut &[u8]) -> Option<u32> {
    let b = cur.get(..4)?;
    let v = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    *cur = &cur[4..];
    Some(v)
}

/// sled's variable-length integer: one byte up to 240, two up to 2287, three up to 67823,
/// else a byte 250..=255 saying how many little-endian bytes (3 to 8) follow.
fn take_varint(cur: &mut &[u8]) -> Option<u64> {
    let first = *cur.first()?;
    let (value, used) = match first {
        0..=240 => (u64::from(first), 1),
        241..=248 => (
            240 + 256 * (u64::from(first) - 241) + u64::from(*cur.get(1)?),
            2,
        ),
        249 => (
            2288 + 256 * u64::from(*cur.get(1)?) + u64::from(*cur.get(2)?),
            3,
        ),
        _ => {
            let n = usize::from(first) - 247;
            let mut b = [0u8; 8];
            b[..n].copy_from_slice(cur.get(1..=n)?);
            (u64::from_le_bytes(b), n + 1)
        }
    };
    *cur = &cur[used..];
    Some(value)
}

/// The segment size sled's `conf` names, if it names one.
fn segment_size(dir: &Path) -> Option<u64> {
    let bytes = std::fs::read(dir.join("conf")).ok()?;
    let text = String::from_utf8_lossy(&bytes[..bytes.len().checked_sub(4)?]).into_owned();
    let size = text
        .lines()
        .find_map(|l| l.strip_prefix("segment_size: "))?
        .parse::<u64>()
        .ok()?;
    (size >= 2 * (SEG_HEADER_LEN + MAX_MSG_HEADER_LEN)).then_some(size)
}

/// The log position of the page-table snapshot sled will read: of the files named `snap.`
/// something (but not `*.in___motion`), the last in name order, whose name goes on with the
/// position in 16 hex digits.
fn snapshot_position(dir: &Path) -> Option<i64> {
    let newest = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with("snap.") && !n.ends_with(".in___motion"))
        .max()?;
    i64::from_str_radix(newest.get(5..21)?, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIZE: u64 = 4096;

    /// sled's variable-length integer, written as sled writes it.
    fn varint(v: u64) -> Vec<u8> {
        match v {
            0..=240 => vec![v as u8],
            241..=2287 => vec![((v - 240) / 256 + 241) as u8, ((v - 240) % 256) as u8],
            2288..=67823 => vec![249, ((v - 2288) / 256) as u8, ((v - 2288) % 256) as u8],
            _ => {
                let n = (8 - v.leading_zeros() as usize / 8).max(3);
                let mut b = vec![247 + n as u8];
                b.extend_from_slice(&v.to_le_bytes()[..n]);
                b
            }
        }
    }

    fn record(kind: u8, segment: u64, body: &[u8]) -> Vec<u8> {
        let mut rest = vec![kind];
        rest.extend(varint(body.len() as u64));
        rest.extend(varint(segment));
        rest.extend(varint(7));
        let mut h = crc32fast::Hasher::new();
        h.update(body);
        h.update(&rest);
        let mut r = (h.finalize() ^ 0xFFFF_FFFF).to_le_bytes().to_vec();
        r.extend(rest);
        r.extend_from_slice(body);
        r
    }

    /// A segment at `lsn`, begun when the log was durable up to `durable`, holding `n`
    /// records of 100 bytes, capped when `full`.
    fn segment(lsn: i64, durable: i64, n: usize, full: bool) -> Vec<u8> {
        let mut s = vec![0u8; 4];
        s.extend_from_slice(&(lsn ^ LSN_MASK).to_le_bytes());
        s.extend_from_slice(&(durable ^ LSN_MASK).to_le_bytes());
        let crc = crc32fast::hash(&s[4..]) ^ 0xFFFF_FFFF;
        s[..4].copy_from_slice(&crc.to_le_bytes());
        let number = lsn as u64 / SIZE;
        for i in 0..n {
            s.extend(record(10, number, &[i as u8; 100]));
        }
        if full {
            let pad = SIZE as usize - s.len() - 12;
            let mut cap = record(KIND_CAP, number, &vec![0; pad]);
            cap.resize(SIZE as usize - s.len(), 0);
            s.extend(cap);
        }
        s.resize(SIZE as usize, 0);
        s
    }

    /// The first damage in a log of these slots (sled's newest snapshot at `snapshot`).
    fn damage(slots: &[Vec<u8>], snapshot: i64) -> Option<Damage> {
        let mut f = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut f, &slots.concat()).unwrap();
        let log = Log {
            file: &f,
            file_len: SIZE * slots.len() as u64,
            segment_size: SIZE,
            blobs: Path::new("/nonexistent/blobs"),
        };
        log.first_damage(snapshot).unwrap()
    }

    #[test]
    fn varints_read_as_sled_writes_them() {
        for v in [
            0,
            240,
            241,
            2287,
            2288,
            67823,
            67824,
            1 << 24,
            1 << 40,
            u64::MAX,
        ] {
            let bytes = varint(v);
            let mut cur = bytes.as_slice();
            assert_eq!(take_varint(&mut cur), Some(v), "{bytes:?}");
            assert!(cur.is_empty());
        }
        assert_eq!(take_varint(&mut [250u8, 1].as_slice()), None);
    }

    /// Three segments in log order, the first two full and the last being written.
    fn log() -> Vec<Vec<u8>> {
        vec![
            segment(0, -1, 10, true),
            segment(SIZE as i64, 3000, 10, true),
            segment(2 * SIZE as i64, SIZE as i64 + 3000, 10, false),
        ]
    }

    #[test]
    fn a_sound_log_and_a_torn_tail_pass() {
        assert_eq!(damage(&log(), 0), None);
        // The last write cut short: the rest of the newest segment never written.
        let mut torn = log();
        torn[2][600..].fill(0);
        assert_eq!(damage(&torn, 0), None);
        // ...or written, but not all of it: a hole before later records of that write.
        let mut holed = log();
        holed[2][300..400].fill(0);
        assert_eq!(damage(&holed, 0), None);
    }

    #[test]
    fn a_record_failing_where_the_log_was_durable_is_damage() {
        let mut slots = log();
        slots[1][500] ^= 1;
        let found = damage(&slots, 0).expect("damage found");
        // The fifth record (each 8 bytes of header and 100 of body) of the second segment.
        assert_eq!(found.offset, SIZE + SEG_HEADER_LEN + 4 * 108);
        assert_eq!(found.durable, SIZE as i64 + 3000);
        assert!(found.what.contains("fails its checksum"), "{}", found.what);
        // Past the durable mark, the same failure may be a write torn while the next
        // segment was being begun: let through.
        let mut slots = log();
        slots[2] = segment(2 * SIZE as i64, SIZE as i64 + 500, 10, false);
        slots[1][1000] ^= 1;
        assert_eq!(damage(&slots, 0), None);
        slots[1][400] ^= 1;
        assert_eq!(damage(&slots, 0).map(|d| d.offset), Some(SIZE + 344));
    }

    #[test]
    fn segments_are_read_in_log_order_not_file_order() {
        let mut slots = log();
        slots.swap(0, 2);
        assert_eq!(damage(&slots, 0), None);
        slots[2][100] ^= 1;
        assert_eq!(damage(&slots, 0).map(|d| d.offset), Some(2 * SIZE + 20));
    }

    #[test]
    fn only_what_sled_reads_as_it_opens_is_checked() {
        // Before sled's snapshot: sled does not read it as it opens (a read later fails).
        let mut slots = log();
        slots[0][100] ^= 1;
        assert_eq!(damage(&slots, SIZE as i64 + 20).map(|d| d.offset), None);
        assert_eq!(damage(&slots, 0).map(|d| d.offset), Some(20));
        // Below the snapshot's position, sled read the log whole when it last opened.
        let mut slots = vec![segment(0, -1, 10, false)];
        slots[0][100] ^= 1;
        assert_eq!(damage(&slots, 0), None);
        assert_eq!(damage(&slots, 500).map(|d| d.offset), Some(20));
    }

    #[test]
    fn a_damaged_segment_header_is_damage_when_its_records_say_where_it_was() {
        let mut slots = log();
        slots[1][6] ^= 1;
        let found = damage(&slots, 0).expect("damage found");
        assert_eq!(found.offset, SIZE);
        assert!(found.what.contains("header"), "{}", found.what);
        // A slot sled zeroed, or one no header claims, is not.
        let mut slots = log();
        slots.push(vec![0; SIZE as usize]);
        assert_eq!(damage(&slots, 0), None);
    }
}
