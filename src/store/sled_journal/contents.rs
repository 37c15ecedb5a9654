//! Where a group's contents go and how they are found again: small groups into sled packs,
//! large ones into a content file, each content once, with the in-memory index built from
//! `pack_index` at open. Apart from the journal because it is the one part that decides
//! placement; the journal only orders the writes and makes them durable.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use super::handles::{sled_err, Handles};
use super::SledJournal;
use crate::core::model::Digest;
use crate::store::error::StoreError;
use crate::store::pack::{
    file_locs, index_entries, index_push, pack_contents, Loc, Packed, Place, FILE_THRESHOLD,
    INDEX_ENTRIES_PER_VALUE, INDEX_ENTRY,
};
use crate::store::record::{key_seq, seq_key};

#[derive(Default)]
pub(super) struct Contents {
    pub(super) locs: HashMap<Digest, Loc>,
    pub(super) next_pack: u64,
    /// The key of the next `pack_index` value.
    pub(super) next_index: u64,
}

/// A group's new contents, laid out but not yet written.
pub(super) struct Staged<'a> {
    /// Content not stored yet, each once, in order.
    pub(super) fresh: Vec<(&'a Digest, &'a [u8])>,
    /// Content written ahead of the group ([`crate::store::journal::Journal::prewrite`]):
    /// only its index entries are left to write.
    pub(super) ahead: Vec<(Digest, Loc)>,
    /// Small groups: sled packs and where each content is in them. Large groups go to a
    /// content file, and learn where once appended.
    pub(super) packs: Option<Packed>,
    /// The key of the group's first `pack_index` value.
    pub(super) index_key: u64,
}

/// Where a staged group's contents went.
#[derive(Default)]
pub(super) struct Written {
    pub(super) locs: Vec<(Digest, Loc)>,
    pub(super) pack_keys: Vec<u64>,
    pub(super) index_keys: Vec<u64>,
}

/// Reads the content index of a data directory.
pub(super) fn load_contents(h: &Handles, dir: &Path) -> Result<Contents, String> {
    let fault = |e: sled::Error| crate::store::damage::diagnose(dir, &e);
    let mut contents = Contents::default();
    for item in h.pack_index.iter() {
        let (k, v) = item.map_err(|e| format!("cannot read it: {}", fault(e)))?;
        let at = key_seq(&k).map_or_else(|| format!("{k:?}"), |n| n.to_string());
        let entries = index_entries(&v).ok_or_else(|| {
            format!(
                "its value {at} ({} bytes) is not a whole number of well-formed entries",
                v.len()
            )
        })?;
        for (digest, loc) in entries {
            if loc.place == Place::Sled {
                contents.next_pack = contents.next_pack.max(loc.pack.saturating_add(1));
            }
            contents.locs.insert(digest, loc);
        }
        if let Some(n) = key_seq(&k) {
            contents.next_index = contents.next_index.max(n.saturating_add(1));
        }
    }
    if let Some((k, _)) = h
        .packs
        .last()
        .map_err(|e| format!("cannot read the packs: {}", fault(e)))?
    {
        if let Some(n) = key_seq(&k) {
            contents.next_pack = contents.next_pack.max(n.saturating_add(1));
        }
    }
    Ok(contents)
}

impl SledJournal {
    pub(super) fn contents_ref(&self) -> std::sync::RwLockReadGuard<'_, Contents> {
        self.contents.read().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn contents_mut(&self) -> std::sync::RwLockWriteGuard<'_, Contents> {
        self.contents.write().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn prewritten_mut(&self) -> std::sync::MutexGuard<'_, HashMap<Digest, Loc>> {
        self.prewritten.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The content `digest` stored at `loc`, or why it cannot be had: its bytes are checked
    /// against their checksum (see [`Loc::crc`]), so damaged bytes are never served.
    pub(super) fn read_at(
        &self,
        h: &Handles,
        digest: &Digest,
        loc: Loc,
    ) -> Result<Vec<u8>, StoreError> {
        if loc.place == Place::File {
            let damaged = |why: String| StoreError::Damaged {
                what: format!("content {} in a content file: {why}", digest.to_hex()),
            };
            let bytes = self
                .files
                .read(loc.pack, loc.offset, loc.len)
                .map_err(damaged)?;
            if crc32fast::hash(&bytes) != loc.crc {
                return Err(damaged(format!(
                    "bytes {}..{} of file {} fail their checksum",
                    loc.offset,
                    loc.offset + loc.len,
                    loc.pack
                )));
            }
            return Ok(bytes);
        }
        let pack = h
            .packs
            .get(seq_key(loc.pack))
            .map_err(self.read_err("reading a blob"))?;
        match pack.as_deref().map(|p| (p.len(), loc.slice(p))) {
            // sled's checksums catch a pack damaged on the disk, not one altered through
            // sled: its CRC-32 does (far cheaper than the digest, and a stitch reads
            // thousands of small contents), or its digest for packs written without one.
            Some((_, Some(content)))
                if (loc.crc != 0 && crc32fast::hash(content) == loc.crc)
                    || (loc.crc == 0 && Digest::of(content) == *digest) =>
            {
                Ok(content.to_vec())
            }
            Some((_, Some(_))) => Err(StoreError::Damaged {
                what: format!(
                    "content {} at bytes {}..{} of pack {} {}",
                    digest.to_hex(),
                    loc.offset,
                    loc.offset.saturating_add(loc.len),
                    loc.pack,
                    if loc.crc == 0 {
                        "does not hash to its digest"
                    } else {
                        "fails its checksum"
                    }
                ),
            }),
            Some((len, None)) => Err(StoreError::Damaged {
                what: format!(
                    "content {} is indexed at bytes {}..{} of pack {}, which has {len} bytes",
                    digest.to_hex(),
                    loc.offset,
                    loc.offset.saturating_add(loc.len),
                    loc.pack
                ),
            }),
            None => Err(StoreError::Damaged {
                what: format!(
                    "content {} is indexed in pack {}, which is missing",
                    digest.to_hex(),
                    loc.pack
                ),
            }),
        }
    }

    /// Lays out the contents of `blobs` not stored intact yet (each once).
    ///
    /// A content already stored is compared with the stored copy, which is read back: one
    /// whose copy was damaged (a flipped byte in a content file, a pack cut or altered in
    /// sled) is written again, and its new index entry, at a later key, is the one found from
    /// then on. Taking the digest's word for it would answer the new record and leave every
    /// read of it failing (`content_unavailable`) although the caller had sent the bytes.
    pub(super) fn stage<'a>(
        &self,
        h: &Handles,
        blobs: impl IntoIterator<Item = (&'a Digest, &'a [u8])>,
    ) -> Staged<'a> {
        let known = self.contents_ref();
        let mut prewritten = self.prewritten_mut();
        let mut seen = HashSet::new();
        let mut ahead = Vec::new();
        let mut fresh: Vec<(&Digest, &[u8])> = Vec::new();
        for (d, c) in blobs {
            if !seen.insert(*d) {
                continue;
            }
            if let Some(loc) = known.locs.get(d) {
                match self.read_at(h, d, *loc) {
                    Ok(stored) if stored == c => {
                        // Stored meanwhile by the group before (a content both groups hold):
                        // the copy written ahead is never referred to.
                        prewritten.remove(d);
                        continue;
                    }
                    Ok(_) => tracing::warn!(
                        digest = %d.to_hex(),
                        "the stored copy of a content recorded again differs from it: writing it again"
                    ),
                    Err(e) => tracing::warn!(
                        digest = %d.to_hex(),
                        error = %e,
                        "the stored copy of a content recorded again cannot be read: writing it again"
                    ),
                }
            }
            match prewritten.get(d) {
                Some(loc) => ahead.push((*d, *loc)),
                None => fresh.push((d, c)),
            }
        }
        let bytes: usize = fresh.iter().map(|(_, c)| c.len()).sum();
        let packs =
            (bytes < FILE_THRESHOLD).then(|| pack_contents(fresh.iter().copied(), known.next_pack));
        Staged {
            fresh,
            ahead,
            packs,
            index_key: known.next_index,
        }
    }

    /// Appends to a content file, and syncs, the contents of a group still to commit that
    /// would go there ([`crate::store::journal::Journal::prewrite`]); their group then writes
    /// only their index entries. Contents its group would keep in sled are left to it.
    pub(super) fn write_ahead<'a>(
        &self,
        blobs: impl IntoIterator<Item = (&'a Digest, &'a [u8])>,
    ) -> Result<(), StoreError> {
        let _swapping = self.swapping.read().unwrap_or_else(|p| p.into_inner());
        let h = self.h()?;
        let staged = self.stage(&h, blobs);
        if staged.packs.is_some() || staged.fresh.is_empty() {
            return Ok(());
        }
        let bytes: usize = staged.fresh.iter().map(|(_, c)| c.len()).sum();
        self.ensure_space(bytes as u64)?;
        let parts: Vec<&[u8]> = staged.fresh.iter().map(|(_, c)| *c).collect();
        let (file, at) = self.files.append(&parts)?;
        self.prewritten_mut()
            .extend(file_locs(staged.fresh.iter().copied(), file, at));
        Ok(())
    }

    /// Writes staged contents (to sled packs or a content file) and their index entry. sled's
    /// part is durable with the next flush; a content file is synced here, before the events
    /// that refer to it are written.
    pub(super) fn write_contents(
        &self,
        h: &Handles,
        staged: &Staged<'_>,
        written: &mut Written,
    ) -> Result<(), StoreError> {
        if staged.fresh.is_empty() && staged.ahead.is_empty() {
            return Ok(());
        }
        let mut locs = match &staged.packs {
            Some((packs, locs)) => {
                for (n, pack) in packs {
                    written.pack_keys.push(*n);
                    h.packs
                        .insert(seq_key(*n), pack.as_slice())
                        .map_err(sled_err("writing content"))?;
                }
                locs.clone()
            }
            None => {
                let parts: Vec<&[u8]> = staged.fresh.iter().map(|(_, c)| *c).collect();
                let (file, at) = self.files.append(&parts)?;
                file_locs(staged.fresh.iter().copied(), file, at)
            }
        };
        locs.extend(staged.ahead.iter().copied());
        // Cut like pages and packs (see `SLED_VALUE_TARGET`), at consecutive keys.
        for (key, chunk) in (staged.index_key..).zip(locs.chunks(INDEX_ENTRIES_PER_VALUE)) {
            let mut index = Vec::with_capacity(chunk.len() * INDEX_ENTRY);
            for (d, loc) in chunk {
                index_push(&mut index, d, *loc);
            }
            written.index_keys.push(key);
            h.pack_index
                .insert(seq_key(key), index)
                .map_err(sled_err("writing the content index"))?;
        }
        written.locs = locs;
        Ok(())
    }

    /// Takes back the sled part of contents written by a group that failed. (Bytes in a
    /// content file stay, unreferenced, until compaction.)
    pub(super) fn unwrite_contents(h: &Handles, written: &Written) {
        let mut batch = sled::Batch::default();
        for n in &written.pack_keys {
            batch.remove(&seq_key(*n));
        }
        let _ = h.packs.apply_batch(batch);
        for k in &written.index_keys {
            let _ = h.pack_index.remove(seq_key(*k));
        }
    }

    /// Makes written contents findable.
    pub(super) fn publish(&self, written: Written) {
        let mut contents = self.contents_mut();
        if let Some(k) = written.index_keys.last() {
            contents.next_index = contents.next_index.max(k + 1);
        }
        if let Some(n) = written.pack_keys.last() {
            contents.next_pack = contents.next_pack.max(n + 1);
        }
        let mut prewritten = self.prewritten_mut();
        for (d, _) in &written.locs {
            prewritten.remove(d);
        }
        contents.locs.extend(written.locs);
    }
}
