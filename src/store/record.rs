//! The on-disk record format: pure functions from values to bytes and back, no IO.
//!
//! A record is the MessagePack encoding (named fields) of an envelope, followed by the 32-byte
//! blake3 hash of that encoding:
//!
//! ```text
//! +--------------------------------------------+----------------------------+
//! | body: MessagePack map (to_vec_named)        | blake3(body): 32 bytes     |
//! |   schema, seq, time_ms, origin, prev, event |                            |
//! +--------------------------------------------+----------------------------+
//! ```
//!
//! The trailing hash catches a damaged record on its own; `prev` (the previous record's
//! trailing hash) chains the records, so a removed, reordered or altered record breaks the
//! chain at the first bad sequence number. Snapshots use the same framing around a snapshot
//! body. The sled layer stores these bytes and never looks inside them.

use serde::{Deserialize, Serialize};

use crate::event::{Event, SavedEntry};
use crate::model::Digest;
use crate::state::State;

/// The schema version this build writes. Every older version must keep decoding.
pub const SCHEMA_VERSION: u32 = 1;

/// The `prev` of the first record: there is nothing before it.
pub const GENESIS: Digest = Digest([0; 32]);

const HASH_LEN: usize = 32;

/// One event with its place in the log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    pub schema: u32,
    pub seq: u64,
    /// Wall-clock milliseconds since the Unix epoch when the change was accepted.
    pub time_ms: u64,
    /// Who made the change (the configured `origin`), for auditing.
    pub origin: String,
    /// The trailing hash of the record before this one ([`GENESIS`] for the first).
    pub prev: Digest,
    pub event: Event,
}

/// A snapshot of the folded state right after `seq`; `head` is the hash of the record at `seq`,
/// so replay can check that the records after the snapshot continue its chain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub schema: u32,
    pub seq: u64,
    pub head: Digest,
    pub state: State,
}

/// Why bytes are not a valid record. A torn tail (bytes cut short) is told apart from a
/// corrupt record (bytes present but wrong).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("record is truncated: {len} bytes, too short to hold its body and hash")]
    Truncated { len: usize },
    #[error("record is corrupt: its hash does not match its body")]
    HashMismatch,
    #[error("record is corrupt: {0}")]
    Malformed(String),
    #[error("record has schema version {found}, this build reads up to {supported}")]
    UnsupportedSchema { found: u32, supported: u32 },
}

/// Why a value could not be encoded (not expected for well-formed values; reported, not
/// panicked on).
#[derive(Debug, thiserror::Error)]
#[error("could not encode {what}: {source}")]
pub struct EncodeError {
    what: &'static str,
    #[source]
    source: rmp_serde::encode::Error,
}

/// Most records (an artifact recorded or edited) fit in 256 bytes with their hash: one
/// allocation instead of five growing ones.
const RECORD_CAPACITY: usize = 256;

fn frame<T: Serialize>(
    what: &'static str,
    value: &T,
    capacity: usize,
) -> Result<(Vec<u8>, Digest), EncodeError> {
    let mut bytes = Vec::with_capacity(capacity);
    value
        .serialize(&mut rmp_serde::Serializer::new(&mut bytes).with_struct_map())
        .map_err(|source| EncodeError { what, source })?;
    let hash = Digest::of(&bytes);
    bytes.extend_from_slice(&hash.0);
    Ok((bytes, hash))
}

fn unframe(bytes: &[u8]) -> Result<(&[u8], Digest), DecodeError> {
    if bytes.len() <= HASH_LEN {
        return Err(DecodeError::Truncated { len: bytes.len() });
    }
    let (body, hash) = bytes.split_at(bytes.len() - HASH_LEN);
    let mut stored = [0u8; HASH_LEN];
    stored.copy_from_slice(hash);
    let stored = Digest(stored);
    if Digest::of(body) != stored {
        return Err(DecodeError::HashMismatch);
    }
    Ok((body, stored))
}

/// The deepest nesting a record may have: real ones are under ten levels, and a shallow
/// bound keeps a crafted record from exhausting a small thread stack.
const MAX_RECORD_DEPTH: usize = 64;

fn decode_body<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, DecodeError> {
    let mut de = rmp_serde::Deserializer::from_read_ref(body);
    de.set_max_depth(MAX_RECORD_DEPTH);
    T::deserialize(&mut de).map_err(|e| DecodeError::Malformed(e.to_string()))
}

/// Encodes an envelope; returns the record bytes and the record's hash (the next `prev`).
pub fn encode_event(envelope: &Envelope) -> Result<(Vec<u8>, Digest), EncodeError> {
    frame("event record", envelope, RECORD_CAPACITY)
}

/// Decodes a record; returns the envelope and the record's hash.
pub fn decode_event(bytes: &[u8]) -> Result<(Envelope, Digest), DecodeError> {
    let (body, hash) = unframe(bytes)?;
    let envelope: Envelope = decode_body(body)?;
    if envelope.schema > SCHEMA_VERSION {
        return Err(DecodeError::UnsupportedSchema {
            found: envelope.schema,
            supported: SCHEMA_VERSION,
        });
    }
    Ok((envelope, hash))
}

/// Encodes a stitched entry for the dynamo cache view (same framing as a record).
pub fn encode_saved_entry(entry: &SavedEntry) -> Result<Vec<u8>, EncodeError> {
    frame("dynamo cache entry", entry, RECORD_CAPACITY).map(|(bytes, _)| bytes)
}

/// Decodes an entry of the dynamo cache view.
pub fn decode_saved_entry(bytes: &[u8]) -> Result<SavedEntry, DecodeError> {
    let (body, _) = unframe(bytes)?;
    decode_body(body)
}

/// Encodes a snapshot of `state` right after `seq` without copying the state, into a buffer of
/// `size_hint` bytes to start with. (A snapshot of W1's state is 19 MB: growing to that by
/// doubling took half the time of encoding it.)
pub fn encode_snapshot_of(
    seq: u64,
    head: Digest,
    state: &State,
    size_hint: usize,
) -> Result<Vec<u8>, EncodeError> {
    #[derive(Serialize)]
    struct SnapshotRef<'a> {
        schema: u32,
        seq: u64,
        head: Digest,
        state: &'a State,
    }
    frame(
        "snapshot",
        &SnapshotRef {
            schema: SCHEMA_VERSION,
            seq,
            head,
            state,
        },
        size_hint.saturating_add(HASH_LEN),
    )
    .map(|(b, _)| b)
}

/// Decodes a snapshot record.
pub fn decode_snapshot(bytes: &[u8]) -> Result<Snapshot, DecodeError> {
    let (body, _) = unframe(bytes)?;
    let snapshot: Snapshot = decode_body(body)?;
    if snapshot.schema > SCHEMA_VERSION {
        return Err(DecodeError::UnsupportedSchema {
            found: snapshot.schema,
            supported: SCHEMA_VERSION,
        });
    }
    Ok(snapshot)
}

/// The sled key of a sequence number: big-endian, so sled's key order is log order.
pub fn seq_key(seq: u64) -> [u8; 8] {
    seq.to_be_bytes()
}

/// The sequence number of a sled key, if it is one.
pub fn key_seq(key: &[u8]) -> Option<u64> {
    let arr: [u8; 8] = key.try_into().ok()?;
    Some(u64::from_be_bytes(arr))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope() -> Envelope {
        Envelope {
            schema: SCHEMA_VERSION,
            seq: 7,
            time_ms: 1_700_000_000_000,
            origin: "test".into(),
            prev: GENESIS,
            event: Event::ArtifactTaken { key: "b1".into() },
        }
    }

    #[test]
    fn a_record_round_trips_and_its_hash_chains() {
        let (bytes, hash) = encode_event(&envelope()).unwrap();
        let (back, hash2) = decode_event(&bytes).unwrap();
        assert_eq!(back, envelope());
        assert_eq!(hash, hash2);
    }

    #[test]
    fn a_flipped_byte_is_corrupt_and_a_cut_record_is_torn_or_corrupt() {
        let (bytes, _) = encode_event(&envelope()).unwrap();
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x40;
            assert_eq!(
                decode_event(&bad).unwrap_err(),
                DecodeError::HashMismatch,
                "byte {i}"
            );
        }
        assert_eq!(
            decode_event(&bytes[..10]).unwrap_err(),
            DecodeError::Truncated { len: 10 }
        );
        assert!(decode_event(&bytes[..bytes.len() - 1]).is_err());
    }

    #[test]
    fn a_newer_schema_is_refused_clearly() {
        let mut e = envelope();
        e.schema = SCHEMA_VERSION + 1;
        let (bytes, _) = encode_event(&e).unwrap();
        assert!(matches!(
            decode_event(&bytes),
            Err(DecodeError::UnsupportedSchema { found, .. }) if found == SCHEMA_VERSION + 1
        ));
    }

    #[test]
    fn a_digest_is_read_from_32_bytes_only() {
        let d = Digest::of(b"x");
        let bytes = rmp_serde::to_vec(&d).unwrap();
        assert_eq!(rmp_serde::from_slice::<Digest>(&bytes).unwrap(), d);
        let as_list = rmp_serde::to_vec(&d.0.to_vec()).unwrap();
        assert_eq!(rmp_serde::from_slice::<Digest>(&as_list).unwrap(), d);
        for wrong in [&d.0[..31], &[0u8; 33][..], &[][..]] {
            let bytes = rmp_serde::to_vec(&serde_bytes::Bytes::new(wrong)).unwrap();
            assert!(
                rmp_serde::from_slice::<Digest>(&bytes).is_err(),
                "{}",
                wrong.len()
            );
        }
    }

    #[test]
    fn seq_keys_sort_in_log_order() {
        assert!(seq_key(255) < seq_key(256));
        assert_eq!(key_seq(&seq_key(42)), Some(42));
        assert_eq!(key_seq(b"short"), None);
    }
}
