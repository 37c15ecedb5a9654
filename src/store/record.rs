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

use crate::core::event::{Event, SavedEntry};
use crate::core::model::Digest;
use crate::core::state::State;

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
    decode_snapshot_body(body)
}

fn decode_snapshot_body(body: &[u8]) -> Result<Snapshot, DecodeError> {
    let snapshot: Snapshot = decode_body(body)?;
    check_schema(snapshot.schema)?;
    Ok(snapshot)
}

fn check_schema(found: u32) -> Result<(), DecodeError> {
    if found > SCHEMA_VERSION {
        return Err(DecodeError::UnsupportedSchema {
            found,
            supported: SCHEMA_VERSION,
        });
    }
    Ok(())
}

/// Where a snapshot record stands in the log: the sequence number it was taken at and the
/// hash of the record there, from a record whose own hash holds.
///
/// Opening weighs every stored snapshot against the log but starts from one: decoding the
/// state of each (as the weighing did at first) cost W2 half its time again. The fields are
/// read from the front of the record, where [`encode_snapshot_of`] writes them before the
/// state; a record laid out otherwise is decoded whole, so the answer is the same.
pub fn snapshot_place(bytes: &[u8]) -> Result<(u64, Digest), DecodeError> {
    let (body, _) = unframe(bytes)?;
    match leading_place(body) {
        Some((schema, seq, head)) => {
            check_schema(schema)?;
            Ok((seq, head))
        }
        None => decode_snapshot_body(body).map(|s| (s.seq, s.head)),
    }
}

/// A snapshot record whose hash held, with its place in the log ([`check_snapshot`]).
/// Decoding it does not hash its bytes again: opening hashed the snapshot it started from
/// twice, once to weigh it and once to decode it (19 MB in W2: about 3 ms of its 240).
pub struct CheckedSnapshot<B> {
    bytes: B,
    pub seq: u64,
    pub head: Digest,
}

impl<B: std::ops::Deref<Target = [u8]>> CheckedSnapshot<B> {
    /// The snapshot, decoded from the bytes whose hash was checked.
    pub fn decode(&self) -> Result<Snapshot, DecodeError> {
        // check_snapshot took only records longer than their hash.
        decode_snapshot_body(&self.bytes[..self.bytes.len() - HASH_LEN])
    }
}

/// Checks a snapshot record's hash and reads its place ([`snapshot_place`]), keeping the
/// bytes (however the journal holds them) for [`CheckedSnapshot::decode`].
pub fn check_snapshot<B: std::ops::Deref<Target = [u8]>>(
    bytes: B,
) -> Result<CheckedSnapshot<B>, DecodeError> {
    let (seq, head) = snapshot_place(&bytes)?;
    Ok(CheckedSnapshot { bytes, seq, head })
}

/// `schema`, `seq` and `head`, if they are the first three fields of the snapshot's map.
fn leading_place(body: &[u8]) -> Option<(u32, u64, Digest)> {
    let mut rd = body;
    if rmp::decode::read_map_len(&mut rd).ok()? < 3 {
        return None;
    }
    let key = |rd: &mut &[u8], want: &str| -> Option<()> {
        let (k, rest) = rmp::decode::read_str_from_slice(*rd).ok()?;
        *rd = rest;
        (k == want).then_some(())
    };
    key(&mut rd, "schema")?;
    let schema: u32 = rmp::decode::read_int(&mut rd).ok()?;
    key(&mut rd, "seq")?;
    let seq: u64 = rmp::decode::read_int(&mut rd).ok()?;
    key(&mut rd, "head")?;
    let len = rmp::decode::read_bin_len(&mut rd).ok()?;
    let head: [u8; 32] = rd.get(..32).filter(|_| len == 32)?.try_into().ok()?;
    Some((schema, seq, Digest(head)))
}

/// What an operator gave up with `pcx recover --accept-lost-tail`: the log ended at
/// `last_found` while stored snapshots proved it had reached `snapshot`. The numbers after
/// `last_found` are then written again, so this is kept beside the chain (not in it), with
/// the snapshots that proved the loss exactly as they were, for an auditor to see what was
/// lost, when and by whom.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LostTail {
    pub schema: u32,
    /// Wall-clock milliseconds since the Unix epoch when the loss was accepted.
    pub time_ms: u64,
    /// Who accepted it (the configured `origin`).
    pub origin: String,
    /// The last event the log still held, and its hash.
    pub last_found: u64,
    pub last_found_hash: Digest,
    /// The newest snapshot ahead of the log: the last event known to have existed.
    pub snapshot: u64,
    /// The snapshots that were ahead of the log, newest first: `(seq, snapshot record)`.
    pub snapshots: Vec<(u64, serde_bytes::ByteBuf)>,
}

/// Encodes the record of an accepted lost tail (same framing as a record).
pub fn encode_lost_tail(lost: &LostTail) -> Result<Vec<u8>, EncodeError> {
    frame("lost tail record", lost, RECORD_CAPACITY).map(|(bytes, _)| bytes)
}

/// Decodes the record of an accepted lost tail.
pub fn decode_lost_tail(bytes: &[u8]) -> Result<LostTail, DecodeError> {
    let (body, _) = unframe(bytes)?;
    let lost: LostTail = decode_body(body)?;
    if lost.schema > SCHEMA_VERSION {
        return Err(DecodeError::UnsupportedSchema {
            found: lost.schema,
            supported: SCHEMA_VERSION,
        });
    }
    Ok(lost)
}

/// Which framed values [`find_framed`] looks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framed {
    /// Event records (an envelope: a map of six fields, `schema` first).
    Event,
    /// Snapshot records, the compaction anchor among them (a map of four, `schema` first).
    Snapshot,
}

/// Where in `bytes` values framed as this module frames them lie, each a whole body and its
/// trailing hash, which holds: for reading records out of a data directory's raw files when
/// the store does not open (`pcx salvage`). Found by the start every such body has (the map
/// header, then the field name `schema`), so bytes around them may be anything. Pure.
pub fn find_framed(bytes: &[u8], what: Framed) -> Vec<std::ops::Range<usize>> {
    let start: &[u8] = match what {
        Framed::Event => b"\x86\xa6schema",
        Framed::Snapshot => b"\x84\xa6schema",
    };
    let mut found = Vec::new();
    let mut at = 0;
    while let Some(i) = find(&bytes[at..], start).map(|i| i + at) {
        at = i + 1;
        let mut de = rmp_serde::Deserializer::new(std::io::Cursor::new(&bytes[i..]));
        de.set_max_depth(MAX_RECORD_DEPTH);
        if serde::de::IgnoredAny::deserialize(&mut de).is_err() {
            continue;
        }
        let Ok(body_len) = usize::try_from(de.position()) else {
            continue;
        };
        let body_end = i + body_len;
        let Some(hash) = bytes.get(body_end..body_end + HASH_LEN) else {
            continue;
        };
        if Digest::of(&bytes[i..body_end]).0 == hash {
            found.push(i..body_end + HASH_LEN);
            at = body_end + HASH_LEN;
        }
    }
    found
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
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

    /// A snapshot record at 7 of a state with one artifact: the state, the head, the bytes.
    fn snapshot_at_7() -> (State, Digest, Vec<u8>) {
        let mut state = State::default();
        state.apply(crate::core::event::Event::ArtifactRecorded {
            key: "k".into(),
            kind: "eager".into(),
            digest: Digest::of(b"c"),
            size: 1,
        });
        let head = Digest::of(b"head");
        let bytes = encode_snapshot_of(7, head, &state, 0).unwrap();
        (state, head, bytes)
    }

    /// A snapshot's place in the log is read from the front of its record, equal to what
    /// decoding it whole says; a record laid out another way gives the same answer decoded
    /// whole; a damaged one is refused by its hash.
    #[test]
    fn a_snapshots_place_is_read_without_its_state_and_agrees_with_decoding_it() {
        let (state, head, bytes) = snapshot_at_7();
        let whole = decode_snapshot(&bytes).unwrap();
        assert_eq!(snapshot_place(&bytes).unwrap(), (whole.seq, whole.head));
        assert_eq!(snapshot_place(&bytes).unwrap(), (7, head));
        assert!(leading_place(&bytes[..bytes.len() - HASH_LEN]).is_some());

        // The state first: not read from the front, decoded whole, same answer.
        #[derive(Serialize)]
        struct StateFirst<'a> {
            state: &'a State,
            schema: u32,
            seq: u64,
            head: Digest,
        }
        let (reordered, _) = frame(
            "snapshot",
            &StateFirst {
                state: &state,
                schema: SCHEMA_VERSION,
                seq: 7,
                head,
            },
            0,
        )
        .unwrap();
        assert!(leading_place(&reordered[..reordered.len() - HASH_LEN]).is_none());
        assert_eq!(snapshot_place(&reordered).unwrap(), (7, head));

        let mut damaged = bytes.clone();
        damaged[5] ^= 1;
        assert_eq!(snapshot_place(&damaged), Err(DecodeError::HashMismatch));
    }

    #[test]
    fn a_checked_snapshot_decodes_as_a_whole_decode_does_and_a_damaged_one_is_not_checked() {
        let (state, head, bytes) = snapshot_at_7();
        let whole = decode_snapshot(&bytes).unwrap();
        let checked = check_snapshot(bytes.clone()).unwrap();
        assert_eq!((checked.seq, checked.head), (7, head));
        let decoded = checked.decode().unwrap();
        assert_eq!((decoded.seq, decoded.head), (whole.seq, whole.head));
        assert_eq!(decoded.state.digest(), state.digest());
        // No byte of it can be changed and still reach decode().
        for at in [0, bytes.len() / 2, bytes.len() - 1] {
            let mut damaged = bytes.clone();
            damaged[at] ^= 1;
            assert!(check_snapshot(damaged).is_err(), "byte {at} flipped");
        }
        assert_eq!(
            check_snapshot(vec![0; HASH_LEN]).err(),
            Some(DecodeError::Truncated { len: HASH_LEN })
        );
    }

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
    fn framed_records_are_found_among_other_bytes_and_damaged_ones_are_not() {
        let (one, _) = encode_event(&envelope()).unwrap();
        let mut e = envelope();
        e.seq = 8;
        let (two, _) = encode_event(&e).unwrap();
        let mut bytes = b"\x00\x86\xa6schema junk".to_vec();
        let first = bytes.len()..bytes.len() + one.len();
        bytes.extend_from_slice(&one);
        bytes.extend_from_slice(b"sled's own bytes");
        let mut damaged = two.clone();
        flip(&mut damaged);
        bytes.extend_from_slice(&damaged);
        let second = bytes.len()..bytes.len() + two.len();
        bytes.extend_from_slice(&two);
        assert_eq!(find_framed(&bytes, Framed::Event), vec![first, second]);
        assert!(find_framed(&bytes, Framed::Snapshot).is_empty());
        let snap = encode_snapshot_of(3, GENESIS, &State::default(), 0).unwrap();
        assert_eq!(find_framed(&snap, Framed::Snapshot), vec![0..snap.len()]);
    }

    fn flip(bytes: &mut [u8]) {
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x55;
    }

    #[test]
    fn seq_keys_sort_in_log_order() {
        assert!(seq_key(255) < seq_key(256));
        assert_eq!(key_seq(&seq_key(42)), Some(42));
        assert_eq!(key_seq(b"short"), None);
    }
}
