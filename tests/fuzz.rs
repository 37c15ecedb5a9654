//! Fuzzing (proptest over arbitrary and mutated bytes) of everything that decodes untrusted
//! input: the record decoders, the request parser, the socket frame decoder and the bounded
//! line reader. No panic, no unbounded allocation.
//!
//! Case counts are bounded so the whole file runs in a few seconds in a debug build; raise
//! them with `PROPTEST_CASES=100000 cargo test --release --test fuzz` for a longer run.
//!
//! Allocation is measured by a counting global allocator, per thread (tests run in parallel),
//! and the process's peak RSS is checked after the hostile-header loop.
//!
//! The plugin descriptor validator (`src/plugin.rs`, `validate`) is private and needs a loaded
//! library; it is covered by the hostile fixtures of `tests/plugins.rs`. Here only the cheap
//! public part before `dlopen` is fuzzed: [`pcx::plugins::loader::load`] on arbitrary bytes that are
//! not ELF, and on 64-bit ELF headers whose tables reach past the end of the file.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::BufReader;
use std::time::{Duration, Instant};

use indexmap::IndexMap;
use pcx::core::event::{Event, SavedEntry, StitchBypass, StitchFailure};
use pcx::core::model::{
    ArtifactRef, Digest, DynamoCacheEntry, DynamoCodeEntry, PrecompileCacheEntry,
};
use pcx::core::state::State;
use pcx::interface::batch::{read_bounded_line, Line};
use pcx::interface::wire::{decode_body, encode_frame, to_json, to_msgpack};
use pcx::store::record::{
    decode_event, decode_saved_entry, decode_snapshot, encode_event, encode_saved_entry,
    encode_snapshot_of, Envelope, GENESIS, SCHEMA_VERSION,
};
use proptest::prelude::*;
use serde_json::{json, Value};

// ---------------------------------------------------------------------------------------------
// allocation accounting

/// The system allocator, counting the bytes each thread holds and its peak.
struct Counting;

thread_local! {
    static HELD: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn track(delta: isize) {
    // `try_with`: the allocator also runs while a thread's locals are being torn down.
    let _ = HELD.try_with(|held| {
        let now = held.get() + delta;
        held.set(now);
        let _ = PEAK.try_with(|peak| {
            if now > peak.get() {
                peak.set(now);
            }
        });
    });
}

// SAFETY: every call is forwarded to `System` unchanged; only counters are updated.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            track(layout.size() as isize);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            track(layout.size() as isize);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        track(-(layout.size() as isize));
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            track(new_size as isize - layout.size() as isize);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Runs `f` and gives what it returned, the most bytes it held at once on this thread beyond
/// what the thread held before, and how long it took.
fn measured<T>(f: impl FnOnce() -> T) -> (T, usize, Duration) {
    let before = HELD.with(Cell::get);
    PEAK.with(|p| p.set(before));
    let started = Instant::now();
    let out = f();
    let elapsed = started.elapsed();
    let peak = PEAK.with(Cell::get);
    (out, usize::try_from(peak - before).unwrap_or(0), elapsed)
}

/// The process's peak resident set size, in bytes.
fn peak_rss() -> u64 {
    // SAFETY: getrusage writes one `rusage` into the zeroed value given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above; RUSAGE_SELF with a valid pointer.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    assert_eq!(rc, 0, "getrusage failed");
    // Linux reports kilobytes.
    u64::try_from(usage.ru_maxrss).unwrap_or(0) * 1024
}

const MIB: usize = 1024 * 1024;

// ---------------------------------------------------------------------------------------------
// valid values to mutate

fn code(ids: &[&str]) -> DynamoCodeEntry {
    DynamoCodeEntry {
        python_module: "model".into(),
        function_names: vec!["forward".into()],
        backend_ids: ids.iter().map(|s| s.to_string()).collect(),
        code_source: Some("def forward(x): ...".into()),
        payload: vec![1, 2, 3, 0xc1],
        ..Default::default()
    }
}

fn entry() -> DynamoCacheEntry {
    DynamoCacheEntry {
        codes: vec![code(&["b1", "b2"]), code(&["b3"])],
        device_type: "cuda".into(),
        fn_name: Some("forward".into()),
        fn_first_lineno: Some(12),
        ..Default::default()
    }
}

fn artifact_ref(content: &[u8]) -> ArtifactRef {
    ArtifactRef {
        kind: "eager".into(),
        digest: Digest::of(content),
        size: content.len() as u64,
    }
}

fn saved_entry() -> SavedEntry {
    let mut backends = IndexMap::new();
    backends.insert("b1".to_string(), artifact_ref(b"one"));
    backends.insert("b3".to_string(), artifact_ref(b"three"));
    PrecompileCacheEntry {
        dynamo: entry(),
        backends,
    }
}

fn events() -> Vec<Event> {
    let mut entries = IndexMap::new();
    entries.insert("e1".to_string(), saved_entry());
    vec![
        Event::ArtifactRecorded {
            key: "__compiled_fn_1".into(),
            kind: "eager".into(),
            digest: Digest::of(b"content"),
            size: 7,
        },
        Event::DynamoEntryRecorded {
            key: "e1".into(),
            entry: entry(),
        },
        Event::ArtifactEdited {
            key: "b1".into(),
            label: "plugin:clear_backend_id".into(),
            digest: Digest::of(b"edited"),
            size: 6,
        },
        Event::ArtifactTaken { key: "b2".into() },
        Event::Cleared,
        Event::Stitched {
            produced: vec!["e1".into()],
            bypassed: vec![StitchBypass {
                key: "e1".into(),
                code_index: 1,
                missing_backend: "b9".into(),
                reason: "backend artifact b9 missing at save time".into(),
            }],
            failed: vec![StitchFailure {
                key: "e2".into(),
                error: "boom".into(),
            }],
        },
        Event::SavedToDynamoCache { entries },
        Event::EntryLoaded {
            key: "e1".into(),
            backends: saved_entry().backends,
        },
    ]
}

/// Valid event records, one per event variant.
fn valid_records() -> Vec<Vec<u8>> {
    events()
        .into_iter()
        .enumerate()
        .map(|(i, event)| {
            let envelope = Envelope {
                schema: SCHEMA_VERSION,
                seq: i as u64 + 1,
                time_ms: 1_700_000_000_000,
                origin: "fuzz".into(),
                prev: GENESIS,
                event,
            };
            encode_event(&envelope).expect("a valid envelope encodes").0
        })
        .collect()
}

fn valid_snapshot() -> Vec<u8> {
    let mut state = State::default();
    for e in events() {
        state.apply(e);
    }
    encode_snapshot_of(8, Digest::of(b"head"), &state, 0).expect("a state encodes")
}

fn valid_saved_entry() -> Vec<u8> {
    encode_saved_entry(&saved_entry()).expect("an entry encodes")
}

/// Splits a record into its body, applies the edits, and frames it again with a correct
/// trailing hash, so the decoder gets past the hash check and reads the mutated body.
fn reframe(record: &[u8], edits: &[Mutation]) -> Vec<u8> {
    let mut body = record[..record.len() - 32].to_vec();
    for m in edits {
        m.apply(&mut body);
    }
    let hash = Digest::of(&body);
    body.extend_from_slice(&hash.0);
    body
}

/// One byte-level change.
#[derive(Clone, Debug)]
enum Mutation {
    Flip { at: usize, mask: u8 },
    Set { at: usize, byte: u8 },
    Insert { at: usize, bytes: Vec<u8> },
    Remove { at: usize, len: usize },
    Truncate { at: usize },
}

impl Mutation {
    fn apply(&self, b: &mut Vec<u8>) {
        let pos = |at: usize, len: usize| if len == 0 { 0 } else { at % (len + 1) };
        match self {
            Mutation::Flip { at, mask } if !b.is_empty() => {
                let i = at % b.len();
                b[i] ^= mask;
            }
            Mutation::Set { at, byte } if !b.is_empty() => {
                let i = at % b.len();
                b[i] = *byte;
            }
            Mutation::Insert { at, bytes } => {
                let i = pos(*at, b.len());
                b.splice(i..i, bytes.iter().copied());
            }
            Mutation::Remove { at, len } => {
                let i = pos(*at, b.len());
                let end = (i + len).min(b.len());
                b.drain(i..end);
            }
            Mutation::Truncate { at } => {
                let i = pos(*at, b.len());
                b.truncate(i);
            }
            _ => {}
        }
    }
}

/// Bytes that MessagePack decoders find interesting: markers of every width, lengths near the
/// limits, and plain data.
fn interesting_byte() -> impl Strategy<Value = u8> {
    prop_oneof![
        4 => any::<u8>(),
        1 => prop::sample::select(vec![
            0xc0, 0xc1, 0xc2, 0xc3, 0xc4, 0xc5, 0xc6, 0xc7, 0xc8, 0xc9, 0xca, 0xcb, 0xcc, 0xcd,
            0xce, 0xcf, 0xd0, 0xd3, 0xd4, 0xd8, 0xd9, 0xda, 0xdb, 0xdc, 0xdd, 0xde, 0xdf, 0x80,
            0x8f, 0x90, 0x9f, 0xa0, 0xbf, 0xff, 0x00, 0x7f,
        ]),
    ]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        3 => (any::<usize>(), 1u8..=255).prop_map(|(at, mask)| Mutation::Flip { at, mask }),
        3 => (any::<usize>(), interesting_byte()).prop_map(|(at, byte)| Mutation::Set { at, byte }),
        2 => (any::<usize>(), prop::collection::vec(interesting_byte(), 1..8))
            .prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        1 => (any::<usize>(), 1usize..16).prop_map(|(at, len)| Mutation::Remove { at, len }),
        1 => any::<usize>().prop_map(|at| Mutation::Truncate { at }),
    ]
}

fn mutations() -> impl Strategy<Value = Vec<Mutation>> {
    prop::collection::vec(mutation(), 1..6)
}

/// Arbitrary bytes, followed by their blake3 hash half the time (past the hash check).
fn framed_or_raw_bytes() -> impl Strategy<Value = Vec<u8>> {
    (
        prop::collection::vec(interesting_byte(), 0..512),
        any::<bool>(),
    )
        .prop_map(|(mut bytes, frame)| {
            if frame {
                let hash = Digest::of(&bytes);
                bytes.extend_from_slice(&hash.0);
            }
            bytes
        })
}

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        // A failure is a panic or a broken property; keep shrinking short.
        max_shrink_iters: 2_000,
        // Failures are reported with their input; nothing is written into the source tree.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------------------------
// record decoders

proptest! {
    #![proptest_config(config(1_000))]

    #[test]
    fn record_decoders_never_panic_on_arbitrary_bytes(bytes in framed_or_raw_bytes()) {
        let _ = decode_event(&bytes);
        let _ = decode_snapshot(&bytes);
        let _ = decode_saved_entry(&bytes);
    }

    #[test]
    fn record_decoders_never_panic_on_mutated_records(
        which in 0usize..8,
        edits in mutations(),
        rehash in any::<bool>(),
    ) {
        let records = valid_records();
        let record = &records[which % records.len()];
        let snapshot = valid_snapshot();
        let saved = valid_saved_entry();
        for original in [record, &snapshot, &saved] {
            let bytes = if rehash {
                reframe(original, &edits)
            } else {
                let mut b = original.clone();
                for m in &edits {
                    m.apply(&mut b);
                }
                b
            };
            let ((), held, took) = measured(|| {
                let _ = decode_event(&bytes);
                let _ = decode_snapshot(&bytes);
                let _ = decode_saved_entry(&bytes);
            });
            prop_assert!(held < 16 * MIB, "decoding {} bytes held {held} bytes", bytes.len());
            prop_assert!(took < Duration::from_secs(2), "decoding took {took:?}");
        }
    }
}

#[test]
fn the_valid_records_decode_and_a_changed_byte_is_caught() {
    for record in valid_records() {
        decode_event(&record).expect("a valid record decodes");
        let mut bad = record.clone();
        bad[3] ^= 1;
        assert!(decode_event(&bad).is_err());
    }
    decode_snapshot(&valid_snapshot()).expect("a valid snapshot decodes");
    decode_saved_entry(&valid_saved_entry()).expect("a valid saved entry decodes");
}

// ---------------------------------------------------------------------------------------------
// request parser

/// Arbitrary JSON values, small.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        "[a-z_0-9+/=]{0,12}".prop_map(Value::String),
        any::<String>().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((field_name(), inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// Field names the protocol knows, and others.
fn field_name() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(vec![
            "op", "id", "key", "kind", "content_b64", "entry", "edit", "set_b64", "append_b64",
            "plugin", "args_b64", "system_info", "codes", "backend_ids", "device_type",
            "fn_name", "fn_first_lineno", "payload_b64", "from", "to", "since", "until",
            "event", "limit", "at", "at_time", "python_version", "torch_version",
        ])
        .prop_map(String::from),
        1 => "[a-z_]{0,10}",
    ]
}

/// A request-shaped object: a known (or unknown) op and arbitrary fields.
fn request_like() -> impl Strategy<Value = Value> {
    let op = prop_oneof![
        4 => prop::sample::select(pcx::interface::protocol::OPS.to_vec()).prop_map(Value::from),
        1 => json_value(),
    ];
    (
        op,
        prop::collection::vec((field_name(), json_value()), 0..6),
    )
        .prop_map(|(op, fields)| {
            let mut map: serde_json::Map<String, Value> = fields.into_iter().collect();
            map.insert("op".into(), op);
            Value::Object(map)
        })
}

proptest! {
    #![proptest_config(config(1_000))]

    #[test]
    fn parse_never_panics_on_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = pcx::interface::protocol::parse(&bytes);
    }

    #[test]
    fn parse_never_panics_on_json_ish_text(text in r#"[\[\]{}":,0-9a-z_ .\-+eE\\]{0,160}"#) {
        let _ = pcx::interface::protocol::parse(text.as_bytes());
    }

    #[test]
    fn parse_never_panics_on_request_shaped_json(value in request_like()) {
        let text = serde_json::to_vec(&value).expect("a JSON value serializes");
        let (_, direct) = pcx::interface::protocol::parse_value(value.clone());
        let (_, parsed) = pcx::interface::protocol::parse(&text);
        // Parsing the text and parsing the value agree on acceptance.
        prop_assert_eq!(direct.is_ok(), parsed.is_ok(), "{}", value);
    }

    #[test]
    fn parse_never_panics_on_mutated_requests(
        which in 0usize..6,
        edits in mutations(),
    ) {
        let requests = [
            json!({"op": "record_artifact", "key": "b1", "content_b64": "AAEC", "id": 1}),
            json!({"op": "record_dynamo_cache_entry", "key": "e1", "entry": {
                "device_type": "cpu", "fn_name": "f", "codes": [{"backend_ids": ["b1"], "payload_b64": "AA=="}]}}),
            json!({"op": "edit_artifact", "key": "b1", "edit": {"append_b64": "AQ=="}}),
            json!({"op": "edit_artifact", "key": "b1", "edit": {"plugin": {"op": "clear_backend_id"}}}),
            json!({"op": "load_cache_entry", "key": "e1", "system_info": {"python_version": "3.11", "torch_version": "2.9"}}),
            json!({"op": "log", "from": 1, "to": 9, "since": "2024-01-01T00:00:00Z", "limit": 5}),
        ];
        let mut bytes = serde_json::to_vec(&requests[which % requests.len()]).expect("serializes");
        for m in &edits {
            m.apply(&mut bytes);
        }
        let _ = pcx::interface::protocol::parse(&bytes);
    }
}

// ---------------------------------------------------------------------------------------------
// socket frames

proptest! {
    #![proptest_config(config(1_000))]

    #[test]
    fn frame_decoding_never_panics_on_arbitrary_bytes(
        bytes in prop::collection::vec(interesting_byte(), 0..512),
    ) {
        let (_, held, took) = measured(|| decode_body(&bytes).and_then(to_json));
        prop_assert!(held < 16 * MIB, "{} bytes held {held} bytes", bytes.len());
        prop_assert!(took < Duration::from_secs(2), "took {took:?}");
    }

    #[test]
    fn frame_decoding_never_panics_on_mutated_frames(value in request_like(), edits in mutations()) {
        let frame = encode_frame(&to_msgpack(&value)).unwrap();
        let mut body = frame[4..].to_vec();
        // Unmutated, a frame comes back as the same JSON (floats aside, which may round).
        if let Ok(back) = decode_body(&body).and_then(to_json) {
            if !value.to_string().contains('.') && !value.to_string().contains('e') {
                prop_assert_eq!(&back, &value);
            }
        }
        for m in &edits {
            m.apply(&mut body);
        }
        let (_, held, took) = measured(|| decode_body(&body).and_then(to_json));
        prop_assert!(held < 16 * MIB, "{} bytes held {held} bytes", body.len());
        prop_assert!(took < Duration::from_secs(2), "took {took:?}");
    }
}

/// MessagePack headers that claim the largest arrays, maps, strings, binaries and extensions
/// their width allows, with (almost) nothing after them.
fn hostile_headers() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let claims: &[(&str, &[u8])] = &[
        ("array32", &[0xdd, 0xff, 0xff, 0xff, 0xff]),
        ("array16", &[0xdc, 0xff, 0xff]),
        ("map32", &[0xdf, 0xff, 0xff, 0xff, 0xff]),
        ("map16", &[0xde, 0xff, 0xff]),
        ("str32", &[0xdb, 0xff, 0xff, 0xff, 0xff]),
        ("str16", &[0xda, 0xff, 0xff]),
        ("str8", &[0xd9, 0xff]),
        ("bin32", &[0xc6, 0xff, 0xff, 0xff, 0xff]),
        ("bin16", &[0xc5, 0xff, 0xff]),
        ("bin8", &[0xc4, 0xff]),
        ("ext32", &[0xc9, 0xff, 0xff, 0xff, 0xff, 0x01]),
        ("ext16", &[0xc8, 0xff, 0xff, 0x01]),
        ("ext8", &[0xc7, 0xff, 0x01]),
    ];
    let tails: &[(&str, &[u8])] = &[
        ("nothing", &[]),
        ("one nil", &[0xc0]),
        ("a few bytes", b"abcdefgh"),
    ];
    for (name, header) in claims {
        for (tail_name, tail) in tails {
            let mut bytes = header.to_vec();
            bytes.extend_from_slice(tail);
            out.push((format!("{name} + {tail_name}"), bytes));
        }
        // The claim nested inside a request map's field, and inside arrays of claims.
        let mut nested = vec![0x82, 0xa2, b'o', b'p', 0xa5];
        nested.extend_from_slice(b"clear");
        nested.extend_from_slice(&[0xa3, b'k', b'e', b'y']);
        nested.extend_from_slice(header);
        out.push((format!("{name} inside a request"), nested));
        let mut stacked = Vec::new();
        for _ in 0..64 {
            stacked.extend_from_slice(&[0xdd, 0xff, 0xff, 0xff, 0xff]);
        }
        stacked.extend_from_slice(header);
        out.push((format!("{name} under 64 huge arrays"), stacked));
    }
    // Deep nesting: one-element arrays and maps far past any sane depth.
    out.push(("100k nested arrays".into(), vec![0x91; 100_000]));
    out.push(("100k nested maps".into(), [0x81, 0xa0].repeat(50_000)));
    out
}

/// Runs `f` on a thread with the 8 MiB stack of a process's main thread, where `pcx serve`
/// decodes frames (actix runs its tasks there). A test thread has 2 MiB, and an unoptimised
/// build needs more than that to reach the decoders' depth limit on deeply nested input
/// (rmpv and rmp_serde allow 1024 levels; a debug build spends about 4 KiB of stack on each
/// two; a release build reaches the limit within 256 KiB).
fn on_main_sized_stack(f: impl FnOnce() + Send + 'static) {
    let joined = std::thread::Builder::new()
        .name("fuzz-8mib".into())
        .stack_size(8 * MIB)
        .spawn(f)
        .expect("a thread starts")
        .join();
    if let Err(panic) = joined {
        std::panic::resume_unwind(panic);
    }
}

#[test]
fn hostile_headers_are_refused_quickly_without_allocating_what_they_claim() {
    on_main_sized_stack(hostile_headers_are_refused);
}

fn hostile_headers_are_refused() {
    for (name, bytes) in hostile_headers() {
        let (result, held, took) = measured(|| decode_body(&bytes).and_then(to_json));
        assert!(result.is_err(), "{name}: accepted as {result:?}");
        assert!(
            held < 4 * MIB,
            "{name}: decoding {} bytes held {held} bytes at once",
            bytes.len()
        );
        assert!(took < Duration::from_secs(2), "{name}: took {took:?}");
        // The record decoders read the same claims behind a valid hash.
        let mut framed = bytes.clone();
        let hash = Digest::of(&framed);
        framed.extend_from_slice(&hash.0);
        let ((), held, took) = measured(|| {
            assert!(decode_event(&framed).is_err(), "{name}: a record");
            assert!(decode_snapshot(&framed).is_err(), "{name}: a snapshot");
            assert!(
                decode_saved_entry(&framed).is_err(),
                "{name}: a saved entry"
            );
        });
        assert!(held < 4 * MIB, "{name}: record decoding held {held} bytes");
        assert!(
            took < Duration::from_secs(2),
            "{name}: record decoding took {took:?}"
        );
    }
    let rss = peak_rss();
    assert!(
        rss < 512 * MIB as u64,
        "peak RSS {} MiB after the hostile headers",
        rss / MIB as u64
    );
}

/// A frame body is bounded by `max_frame_bytes` (384 MiB by default, so that large artifact
/// contents fit), but what it decodes into must be bounded too: one byte of MessagePack (a nil
/// inside an array) must not become hundreds of bytes of memory, or one permitted frame takes
/// the server down.
#[test]
fn a_frame_of_tiny_values_does_not_blow_up_in_memory() {
    const N: usize = 1 << 18;
    let mut body = vec![0xdd];
    body.extend_from_slice(&(N as u32).to_be_bytes());
    body.resize(5 + N, 0xc0);
    let (result, held, took) = measured(|| decode_body(&body).and_then(to_json).map(|_| ()));
    let factor = held as f64 / body.len() as f64;
    eprintln!(
        "a {} byte frame of {N} nils: {:?}, held {} MiB at once ({factor:.0}× the frame), {took:?}",
        body.len(),
        result,
        held / MIB
    );
    assert!(
        factor <= 16.0,
        "a frame of {} bytes (an array of {N} nils) held {held} bytes while decoding: {factor:.0}× \
         its size; with max_frame_bytes at 384 MiB one frame could take {:.0} GiB",
        body.len(),
        factor * 384.0 / 1024.0
    );
}

/// The same for a request line of `pcx batch` (bounded by `max_request_bytes`, 384 MiB by
/// default): a request (`clear`, with a field it does not take, parsed whole before it is
/// refused) made of two-byte numbers must not hold a hundred times its size while being parsed.
#[test]
fn a_request_line_of_tiny_values_does_not_blow_up_in_memory() {
    const N: usize = 1 << 18;
    let line = format!("{{\"op\":\"clear\",\"x\":[{}0]}}", "0,".repeat(N - 1));
    let ((_, parsed), held, took) = measured(|| pcx::interface::protocol::parse(line.as_bytes()));
    let factor = held as f64 / line.len() as f64;
    eprintln!(
        "a {} byte request line of {N} zeros: accepted {}, held {} MiB at once ({factor:.0}× the line), {took:?}",
        line.len(),
        parsed.is_ok(),
        held / MIB
    );
    assert!(
        factor <= 16.0,
        "a request line of {} bytes (an array of {N} zeros) held {held} bytes while parsing: \
         {factor:.0}× its size; with max_request_bytes at 384 MiB one line could take {:.0} GiB",
        line.len(),
        factor * 384.0 / 1024.0
    );
}

// ---------------------------------------------------------------------------------------------
// the bounded line reader

/// What `read_bounded_line` should give: lines split at `\n`, one trailing `\r` dropped, each
/// kept if at most `limit` bytes long and reported by length otherwise.
fn model_lines(input: &[u8], limit: u64) -> Vec<(Option<Vec<u8>>, u64)> {
    if input.is_empty() {
        return Vec::new();
    }
    let mut pieces: Vec<&[u8]> = input.split(|&b| b == b'\n').collect();
    if input.ends_with(b"\n") {
        pieces.pop();
    }
    pieces
        .into_iter()
        .map(|p| {
            let p = p.strip_suffix(b"\r").unwrap_or(p);
            let len = p.len() as u64;
            if len <= limit {
                (Some(p.to_vec()), len)
            } else {
                (None, len)
            }
        })
        .collect()
}

fn line_input() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(
        prop_oneof![
            3 => Just(b'a'),
            2 => Just(b'\n'),
            2 => Just(b'\r'),
            1 => any::<u8>(),
        ],
        0..300,
    )
}

fn line_limit() -> impl Strategy<Value = u64> {
    prop_oneof![
        8 => 0u64..40,
        1 => Just(u64::MAX),
        1 => Just(u64::MAX - 1),
    ]
}

proptest! {
    #![proptest_config(config(2_000))]

    #[test]
    fn read_bounded_line_never_returns_a_line_over_the_limit(
        input in line_input(),
        limit in line_limit(),
        capacity in 1usize..40,
    ) {
        let mut reader = BufReader::with_capacity(capacity, input.as_slice());
        let mut got = Vec::new();
        while let Some(line) = read_bounded_line(&mut reader, limit).expect("reading a slice cannot fail") {
            match &line {
                Line::Text(t) => prop_assert!(
                    t.len() as u64 <= limit,
                    "a line of {} bytes came back with limit {limit}", t.len()
                ),
                Line::TooLong(len) => prop_assert!(
                    *len > limit,
                    "a line of {len} bytes was called too long with limit {limit}"
                ),
            }
            got.push(line);
            prop_assert!(got.len() <= input.len() + 1, "more lines than bytes");
        }
        let want = model_lines(&input, limit);
        prop_assert_eq!(got.len(), want.len(), "line count for {:?}", input);
        for (g, (text, len)) in got.iter().zip(&want) {
            match (g, text) {
                (Line::Text(t), Some(w)) => prop_assert_eq!(t, w),
                // The length of a too-long line may count its `\r` (the reader drops the
                // line's bytes before it sees the `\r` is last).
                (Line::TooLong(l), None) => prop_assert!(
                    *l == *len || *l == *len + 1,
                    "too long: got {l}, want {len}"
                ),
                (g, w) => prop_assert!(false, "got {g:?}, want {w:?} (limit {limit})"),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// plugin loading before dlopen

/// A 64-bit little-endian ELF header whose program header table is `ph_bytes` long at
/// `phoff`, and whose section header table is `sh_bytes` long at `shoff`.
fn elf_header(
    phoff: u64,
    phentsize: u16,
    phnum: u16,
    shoff: u64,
    shentsize: u16,
    shnum: u16,
) -> Vec<u8> {
    let mut h = vec![0u8; 64];
    h[..4].copy_from_slice(b"\x7fELF");
    h[4] = 2; // 64-bit
    h[5] = 1; // little-endian
    h[6] = 1;
    h[16] = 3; // ET_DYN
    h[18] = 62; // x86-64
    h[20] = 1;
    h[32..40].copy_from_slice(&phoff.to_le_bytes());
    h[40..48].copy_from_slice(&shoff.to_le_bytes());
    h[52..54].copy_from_slice(&64u16.to_le_bytes());
    h[54..56].copy_from_slice(&phentsize.to_le_bytes());
    h[56..58].copy_from_slice(&phnum.to_le_bytes());
    h[58..60].copy_from_slice(&shentsize.to_le_bytes());
    h[60..62].copy_from_slice(&shnum.to_le_bytes());
    h
}

proptest! {
    #![proptest_config(config(200))]

    /// Files that are not ELF are refused by the loader's first check: no panic.
    #[test]
    fn loading_arbitrary_non_elf_bytes_is_an_error(
        bytes in prop::collection::vec(any::<u8>(), 0..256)
            .prop_filter("not ELF", |b| !b.starts_with(b"\x7fELF")),
    ) {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = dir.path().join("libfuzz.so");
        std::fs::write(&path, &bytes).expect("written");
        prop_assert!(pcx::plugins::loader::load(&path).is_err());
    }

    /// 64-bit ELF headers whose tables reach past the end of the file are refused before
    /// dlopen (which would map the missing pages and crash reading them).
    #[test]
    fn an_elf_header_with_tables_past_the_end_is_refused_before_dlopen(
        phoff in prop_oneof![0u64..4096, Just(u64::MAX), Just(u64::MAX - 55)],
        phentsize in prop_oneof![Just(56u16), 0u16..200, Just(u16::MAX)],
        phnum in 1u16..=u16::MAX,
        tail in prop::collection::vec(any::<u8>(), 0..128),
    ) {
        let table_end = u128::from(phoff) + u128::from(phentsize) * u128::from(phnum);
        let mut bytes = elf_header(phoff, phentsize, phnum, 0, 0, 0);
        bytes.extend_from_slice(&tail);
        prop_assume!(table_end > bytes.len() as u128);
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = dir.path().join("libfuzz.so");
        std::fs::write(&path, &bytes).expect("written");
        let err = pcx::plugins::loader::load(&path).expect_err("a truncated library is refused");
        prop_assert!(err.to_string().contains("truncated library"), "{}", err);
    }
}
