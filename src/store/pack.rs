//! How the journal packs many records, and many contents, into one sled value each.
//!
//! sled costs about the same per key for small values (a tree descent, a node copy and a log
//! reservation), so a group commit writes its records as **pages** and its contents as
//! **packs** of about [`SLED_VALUE_TARGET`] bytes each, with **index** values saying where
//! each content sits. A W1 group of 1,024 records (its 1 MiB of content goes to a content
//! file) is then about 40 sled keys instead of 2,048. The layouts are plain length-prefixed
//! frames, pure functions here, so they can be tested without sled and read back by tests
//! that damage them.
//!
//! - page: `(seq: u64 BE, len: u32 BE, record: len bytes)*`
//! - pack: the contents, back to back (a sled value, or a stretch of a content file)
//! - index: `(digest: 32 bytes, place: u8, pack: u64 BE, offset: u64 BE, len: u64 BE,
//!   crc: u32 BE)*`, where place 0 is a sled pack and 1 a content file ([`crate::store::content`]);
//!   the CRC-32 of a content is checked on every read (a pack's too: sled's own checksums
//!   catch damage on the disk, not a value altered through sled), so damage is an error,
//!   never wrong bytes served as a compiled artifact

use crate::core::model::Digest;

/// The size each sled value this journal writes is cut to (pages, packs, index values).
///
/// sled 0.34 keeps values inside its tree's leaf nodes, splits a leaf only past 16 items, and
/// rewrites a leaf whole every 10 changes (and on each split). A rewrite larger than a
/// quarter of its 512 KiB log segment (128 KiB) goes to a file of its own under `blobs/`,
/// which the journal must then sync on its own: with values of 64–96 KiB, W1's groups each
/// wrote two such files of 0.5–0.8 MiB and synced them one by one, four `fdatasync`s a
/// group instead of two (`strace`, 2026-12-04). At this size a full leaf (17 values) stays
/// under 128 KiB, so every leaf is written inside sled's log and made durable by the one
/// sync of its file. Values written by older versions keep being read as they are.
pub const SLED_VALUE_TARGET: usize = 6 * 1024;

/// Contents are gathered into packs of about this size, so that reading one content (which
/// reads its pack) stays cheap. A content larger than this gets a pack of its own.
pub const PACK_TARGET: usize = SLED_VALUE_TARGET;

/// A group with at least this much new content writes it to a content file instead of sled:
/// below it, the content file's own `fdatasync` would cost more than sled writing it along
/// with the group's events.
pub const FILE_THRESHOLD: usize = 64 * 1024;

/// A group's records are cut into pages of about this size.
pub const PAGE_TARGET: usize = SLED_VALUE_TARGET;

/// Index entries in one sled value of `pack_index`.
pub const INDEX_ENTRIES_PER_VALUE: usize = SLED_VALUE_TARGET / INDEX_ENTRY;

const FRAME_HEAD: usize = 8 + 4;
/// The bytes of one index entry.
pub const INDEX_ENTRY: usize = 32 + 1 + 8 + 8 + 8 + 4;

/// Which store holds a content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// A value of sled's `packs` tree, keyed by pack number.
    Sled,
    /// A content file, by file number.
    File,
}

/// Where one content is stored: which pack (or file), and its byte range in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Loc {
    pub place: Place,
    pub pack: u64,
    pub offset: u64,
    pub len: u64,
    /// CRC-32 of the content. 0 for contents packed in sled before packs carried one: those
    /// are checked against their digest instead, as is any content whose CRC-32 is 0.
    pub crc: u32,
}

impl Loc {
    /// The content's bytes in `pack`, or `None` if the pack is too short for it.
    pub fn slice<'a>(&self, pack: &'a [u8]) -> Option<&'a [u8]> {
        let start = usize::try_from(self.offset).ok()?;
        let end = start.checked_add(usize::try_from(self.len).ok()?)?;
        pack.get(start..end)
    }
}

/// Appends one record to a page.
pub fn page_push(page: &mut Vec<u8>, seq: u64, record: &[u8]) {
    page.extend_from_slice(&seq.to_be_bytes());
    // Records are bounded far below 4 GiB by the request limits; a longer one would not
    // frame, so it is cut to what the frame can say and fails its own hash check on reading.
    let len = u32::try_from(record.len()).unwrap_or(u32::MAX);
    page.extend_from_slice(&len.to_be_bytes());
    page.extend_from_slice(&record[..len as usize]);
}

/// The records of a page, in order. A frame that does not fit (a damaged page) ends the page
/// with one last item: the rest of the page as the record that was expected next, so the
/// record check reports it as a damaged event with its sequence number.
pub fn page_records(page: &[u8], first_seq: u64) -> Vec<(u64, &[u8])> {
    let mut out = Vec::new();
    let mut rest = page;
    let mut expected = first_seq;
    while !rest.is_empty() {
        let framed = rest.get(..FRAME_HEAD).and_then(|head| {
            let seq = u64::from_be_bytes(head[..8].try_into().ok()?);
            let len = u32::from_be_bytes(head[8..].try_into().ok()?) as usize;
            let record = rest.get(FRAME_HEAD..FRAME_HEAD.checked_add(len)?)?;
            Some((seq, record, FRAME_HEAD + len))
        });
        match framed {
            Some((seq, record, used)) => {
                out.push((seq, record));
                expected = seq.saturating_add(1);
                rest = &rest[used..];
            }
            None => {
                out.push((expected, rest));
                break;
            }
        }
    }
    out
}

/// Appends one index entry.
pub fn index_push(index: &mut Vec<u8>, digest: &Digest, loc: Loc) {
    index.extend_from_slice(&digest.0);
    index.push(match loc.place {
        Place::Sled => 0,
        Place::File => 1,
    });
    index.extend_from_slice(&loc.pack.to_be_bytes());
    index.extend_from_slice(&loc.offset.to_be_bytes());
    index.extend_from_slice(&loc.len.to_be_bytes());
    index.extend_from_slice(&loc.crc.to_be_bytes());
}

/// The entries of an index value, or `None` if it is not a whole number of well-formed
/// entries.
pub fn index_entries(index: &[u8]) -> Option<Vec<(Digest, Loc)>> {
    if index.len() % INDEX_ENTRY != 0 {
        return None;
    }
    let u64_at = |e: &[u8], at: usize| -> Option<u64> {
        Some(u64::from_be_bytes(e.get(at..at + 8)?.try_into().ok()?))
    };
    index
        .chunks_exact(INDEX_ENTRY)
        .map(|e| {
            let digest = Digest(e.get(..32)?.try_into().ok()?);
            let place = match e.get(32)? {
                0 => Place::Sled,
                1 => Place::File,
                _ => return None,
            };
            let loc = Loc {
                place,
                pack: u64_at(e, 33)?,
                offset: u64_at(e, 41)?,
                len: u64_at(e, 49)?,
                crc: u32::from_be_bytes(e.get(57..61)?.try_into().ok()?),
            };
            Some((digest, loc))
        })
        .collect()
}

/// Contents laid out in packs: the packs by number, and where each content went.
pub type Packed = (Vec<(u64, Vec<u8>)>, Vec<(Digest, Loc)>);

/// Lays contents out in packs starting at pack number `first_pack`: returns the packs (by
/// number) and where each content went, in the order given.
pub fn pack_contents<'a>(
    contents: impl IntoIterator<Item = (&'a Digest, &'a [u8])>,
    first_pack: u64,
) -> Packed {
    let mut packs: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut locs = Vec::new();
    let mut current: Vec<u8> = Vec::new();
    let mut number = first_pack;
    for (digest, content) in contents {
        if !current.is_empty() && current.len() + content.len() > PACK_TARGET {
            packs.push((number, std::mem::take(&mut current)));
            number += 1;
        }
        locs.push((
            *digest,
            Loc {
                place: Place::Sled,
                pack: number,
                offset: current.len() as u64,
                len: content.len() as u64,
                crc: crc32fast::hash(content),
            },
        ));
        current.extend_from_slice(content);
    }
    if !locs.is_empty() {
        packs.push((number, current));
    }
    (packs, locs)
}

/// Where contents land when appended back to back at `offset` of content file `file`.
pub fn file_locs<'a>(
    contents: impl IntoIterator<Item = (&'a Digest, &'a [u8])>,
    file: u64,
    offset: u64,
) -> Vec<(Digest, Loc)> {
    let mut at = offset;
    contents
        .into_iter()
        .map(|(digest, content)| {
            let loc = Loc {
                place: Place::File,
                pack: file,
                offset: at,
                len: content.len() as u64,
                crc: crc32fast::hash(content),
            };
            at += content.len() as u64;
            (*digest, loc)
        })
        .collect()
}

/// Cuts records into pages of about [`PAGE_TARGET`] bytes: `(first seq, page)`.
pub fn pages<'a>(records: impl IntoIterator<Item = &'a (u64, Vec<u8>)>) -> Vec<(u64, Vec<u8>)> {
    let mut out: Vec<(u64, Vec<u8>)> = Vec::new();
    for (seq, record) in records {
        match out.last_mut() {
            Some((_, page)) if page.len() + record.len() + FRAME_HEAD <= PAGE_TARGET => {
                page_push(page, *seq, record)
            }
            _ => {
                let mut page = Vec::with_capacity(PAGE_TARGET.min(record.len() + FRAME_HEAD));
                page_push(&mut page, *seq, record);
                out.push((*seq, page));
            }
        }
    }
    out
}

/// sled applies a group of a thousand or so records fastest; a larger queue is cut into
/// groups at request boundaries.
pub const MAX_GROUP_EVENTS: usize = 1024;

/// A group is also cut once it carries this much content: written and synced in pieces of
/// this size, large content streams to the disk at its sequential speed, while one huge
/// group would sit in the page cache and then stall in a single long sync.
pub const MAX_GROUP_BYTES: usize = 64 << 20;

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn pages_give_back_their_records(records in prop::collection::vec(
            prop::collection::vec(any::<u8>(), 0..20_000), 0..40), first in 0u64..1_000_000) {
            let numbered: Vec<(u64, Vec<u8>)> = records
                .iter()
                .enumerate()
                .map(|(i, r)| (first + i as u64, r.clone()))
                .collect();
            let mut back = Vec::new();
            for (page_first, page) in pages(&numbered) {
                let in_page = page_records(&page, page_first);
                prop_assert_eq!(in_page.first().map(|r| r.0), Some(page_first));
                back.extend(in_page.into_iter().map(|(s, r)| (s, r.to_vec())));
            }
            prop_assert_eq!(back, numbered);
        }

        #[test]
        fn packed_contents_are_found_where_the_index_says(contents in prop::collection::vec(
            prop::collection::vec(any::<u8>(), 0..40_000), 0..12), first in 0u64..1000) {
            let digests: Vec<Digest> = contents.iter().map(|c| Digest::of(c)).collect();
            let (packs, locs) = pack_contents(
                digests.iter().zip(contents.iter().map(|c| c.as_slice())), first);
            let mut index = Vec::new();
            for (d, l) in &locs {
                index_push(&mut index, d, *l);
            }
            let entries = index_entries(&index).expect("a whole index");
            prop_assert_eq!(&entries, &locs);
            for ((d, loc), content) in entries.iter().zip(&contents) {
                prop_assert_eq!(d, &Digest::of(content));
                let pack = &packs.iter().find(|p| p.0 == loc.pack).expect("its pack").1;
                prop_assert_eq!(loc.slice(pack), Some(content.as_slice()));
            }
            for (_, pack) in &packs {
                // Only a content bigger than the target makes a pack bigger than it.
                let biggest = contents.iter().map(Vec::len).max().unwrap_or(0);
                prop_assert!(pack.len() <= PACK_TARGET.max(biggest));
            }
        }
    }

    #[test]
    fn a_damaged_frame_becomes_the_next_expected_record() {
        let mut page = Vec::new();
        page_push(&mut page, 7, b"seven");
        page_push(&mut page, 8, b"eight");
        page.truncate(page.len() - 2);
        let back = page_records(&page, 7);
        assert_eq!(back[0], (7, &b"seven"[..]));
        assert_eq!(back.len(), 2);
        assert_eq!(
            back[1].0, 8,
            "the damage is named as the record expected next"
        );
    }

    #[test]
    fn an_index_of_broken_length_is_refused() {
        let mut index = Vec::new();
        let loc = Loc {
            place: Place::File,
            pack: 1,
            offset: 0,
            len: 1,
            crc: crc32fast::hash(b"x"),
        };
        index_push(&mut index, &Digest::of(b"x"), loc);
        assert_eq!(index_entries(&index), Some(vec![(Digest::of(b"x"), loc)]));
        let mut unknown_place = index.clone();
        unknown_place[32] = 9;
        assert_eq!(index_entries(&unknown_place), None);
        index.pop();
        assert_eq!(index_entries(&index), None);
    }
}
