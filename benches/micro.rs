//! Criterion micro-benchmarks of the hot paths: an event record's encode and decode, the fold
//! (`State::apply` of 1000 events), the stitch of one entry, a plugin call round trip, and the
//! socket server's decoding of a request and encoding of an answer.
//!
//! ```text
//! cargo bench --bench micro                       # full run
//! cargo bench --bench micro -- --quick            # a quick look
//! cargo bench --bench micro -- plugin             # one group
//! ```
//!
//! The plugin benchmark builds the example plugin `plugins/aot-bundle` (release) with
//! `cargo build --message-format=json` into its own target directory under
//! `CARGO_TARGET_TMPDIR` (the main one is locked while `cargo bench` runs) and loads the cdylib
//! that cargo reports; if it cannot be built, that benchmark is skipped with a message.

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use indexmap::IndexMap;
use pcx::core::event::Event;
use pcx::core::model::{stitch_entry, ArtifactRef, Digest, DynamoCacheEntry, DynamoCodeEntry};
use pcx::core::state::State;
use pcx::store::record::{decode_event, encode_event, Envelope, SCHEMA_VERSION};

fn backend_id(i: usize) -> String {
    format!("__compiled_fn_{i}_5b0c9d3e7f1a2b4c6d8e0f1a3b5c7d9e")
}

fn recorded(i: usize) -> Event {
    let content = format!("content {i}");
    Event::ArtifactRecorded {
        key: backend_id(i),
        kind: "eager".into(),
        digest: Digest::of(content.as_bytes()),
        size: 4 << 20,
    }
}

fn envelope(seq: u64, event: Event) -> Envelope {
    Envelope {
        schema: SCHEMA_VERSION,
        seq,
        time_ms: 1_700_000_000_000 + seq,
        origin: "bench-host:4242".into(),
        prev: Digest::of(&seq.to_be_bytes()),
        event,
    }
}

fn code(ids: &[String]) -> DynamoCodeEntry {
    DynamoCodeEntry {
        python_module: "model".into(),
        function_names: vec!["forward".into()],
        backend_ids: ids.to_vec(),
        code_source: Some("def forward(self, x): ...".into()),
        install_to_global: true,
        has_compile_id: true,
        payload: vec![0x5a; 256],
        ..Default::default()
    }
}

/// An entry of `codes` codes with `ids` backend ids each (ids numbered from `first`).
fn entry(first: usize, codes: usize, ids: usize) -> DynamoCacheEntry {
    DynamoCacheEntry {
        codes: (0..codes)
            .map(|c| {
                let ids: Vec<String> = (0..ids).map(|i| backend_id(first + c * ids + i)).collect();
                code(&ids)
            })
            .collect(),
        device_type: "cuda".into(),
        fn_name: Some("forward".into()),
        fn_first_lineno: Some(42),
        ..Default::default()
    }
}

/// 1000 events as a compile produces them: mostly recorded artifacts, with entries, edits,
/// a take and re-records of existing keys.
fn thousand_events() -> Vec<Event> {
    let mut events = Vec::with_capacity(1000);
    let mut i = 0;
    while events.len() < 1000 {
        match events.len() % 10 {
            0..=6 => {
                events.push(recorded(i));
                i += 1;
            }
            7 => events.push(Event::DynamoEntryRecorded {
                key: format!("entry_{i}"),
                entry: entry(i.saturating_sub(3), 1, 3),
            }),
            8 => events.push(Event::ArtifactEdited {
                key: backend_id(i / 2),
                label: "plugin:clear_backend_id".into(),
                digest: Digest::of(&i.to_le_bytes()),
                size: 1024,
            }),
            _ => events.push(if i % 2 == 0 {
                Event::ArtifactTaken {
                    key: backend_id(i / 3),
                }
            } else {
                recorded(i / 4)
            }),
        }
    }
    events
}

fn record_codec(c: &mut Criterion) {
    let mut group = c.benchmark_group("record");
    let env = envelope(123_456, recorded(7));
    let (bytes, _) = encode_event(&env).expect("an envelope encodes");
    group.throughput(Throughput::Elements(1));
    group.bench_function("encode_event ArtifactRecorded", |b| {
        b.iter(|| encode_event(black_box(&env)).expect("encodes"))
    });
    group.bench_function("decode_event ArtifactRecorded", |b| {
        b.iter(|| decode_event(black_box(&bytes)).expect("decodes"))
    });
    group.finish();
}

fn fold(c: &mut Criterion) {
    let events = thousand_events();
    let mut group = c.benchmark_group("fold");
    group.throughput(Throughput::Elements(events.len() as u64));
    // The fold takes its events (as the writer and replay do): each batch gets a fresh copy,
    // made outside the timing.
    group.bench_function("State::apply x1000", |b| {
        b.iter_batched(
            || events.clone(),
            |events| {
                let mut state = State::default();
                for e in events {
                    state.apply(black_box(e));
                }
                state
            },
            criterion::BatchSize::LargeInput,
        )
    });
    group.finish();
}

fn stitch(c: &mut Criterion) {
    let e = entry(0, 3, 3);
    let artifacts: IndexMap<String, ArtifactRef> = (0..9)
        .map(|i| {
            (
                backend_id(i),
                ArtifactRef {
                    kind: "eager".into(),
                    digest: Digest::of(&[i as u8]),
                    size: 4 << 20,
                },
            )
        })
        .collect();
    let mut group = c.benchmark_group("stitch");
    group.throughput(Throughput::Elements(1));
    group.bench_function("stitch_entry 3 codes x 3 ids", |b| {
        b.iter(|| stitch_entry(black_box(&e), |id| artifacts.get(id).cloned()))
    });
    group.finish();
}

/// Builds `plugins/aot-bundle` (release) into its own target directory and gives the cdylib
/// cargo reports.
fn build_aot_bundle() -> Result<PathBuf, String> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let target_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("bench-aot-bundle");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .args([
            "build",
            "-p",
            "aot-bundle",
            "--release",
            "--message-format=json",
        ])
        .arg("--manifest-path")
        .arg(repo.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir)
        .output()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "cargo build -p aot-bundle failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let mut found = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let is_cdylib = msg["target"]["kind"]
            .as_array()
            .is_some_and(|k| k.iter().any(|k| k == "cdylib"));
        if msg["reason"] != "compiler-artifact" || !is_cdylib {
            continue;
        }
        for f in msg["filenames"].as_array().into_iter().flatten() {
            if let Some(f) = f
                .as_str()
                .filter(|f| f.ends_with(std::env::consts::DLL_SUFFIX))
            {
                found.push(PathBuf::from(f));
            }
        }
    }
    match found.as_slice() {
        [one] => Ok(one.clone()),
        other => Err(format!("expected one cdylib from cargo, got {other:?}")),
    }
}

/// A `example.aot_bundle` document of about 1 KiB (see plugins/aot-bundle/src/lib.rs).
fn bundle_document() -> Vec<u8> {
    use rmpv::Value;
    let s = |t: &str| Value::from(t);
    let kernel = |name: &str, len: usize| {
        Value::Map(vec![
            (s("name"), s(name)),
            (s("code"), Value::Binary(vec![0x90; len])),
        ])
    };
    let doc = Value::Map(vec![
        (s("format_version"), Value::from(1u64)),
        (
            s("guards_expr"),
            s("L['x'].size()[0] == 4 and L['x'].stride()[0] == 1"),
        ),
        (s("precompile_backend_id"), s(&backend_id(1))),
        (
            s("kernels"),
            Value::Array(vec![
                kernel("triton_poi_fused_add_0", 420),
                kernel("triton_red_fused_sum_1", 420),
            ]),
        ),
        (
            s("meta"),
            Value::Map(vec![
                (s("device"), s("cuda:0")),
                (s("num_warps"), Value::from(4)),
            ]),
        ),
    ]);
    let mut bytes = Vec::new();
    rmpv::encode::write_value(&mut bytes, &doc).expect("writing to a Vec");
    bytes
}

fn plugin_call(c: &mut Criterion) {
    let path = match build_aot_bundle() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("skipped plugin/deserialize: cannot build plugins/aot-bundle: {e}");
            return;
        }
    };
    let plugin = pcx::plugins::loader::load(&path)
        .unwrap_or_else(|e| panic!("the aot-bundle plugin at {} loads: {e}", path.display()));
    let doc = bundle_document();
    let limit = 1 << 20;
    let described = plugin
        .deserialize("example.aot_bundle", &doc, limit)
        .expect("the plugin accepts the document");
    assert_eq!(described.description.value()["kernel_count"], 2);
    let mut group = c.benchmark_group("plugin");
    group.throughput(Throughput::Bytes(doc.len() as u64));
    group.bench_function(
        format!("aot-bundle deserialize {} B document", doc.len()),
        |b| {
            b.iter(|| {
                plugin
                    .deserialize("example.aot_bundle", black_box(&doc), limit)
                    .expect("deserializes")
            })
        },
    );
    group.finish();
}

/// What the socket server does with a W3 request before the actor sees it (its frame body
/// checked and decoded, turned into the protocol's JSON, parsed into a request) and with an
/// answer after (JSON to MessagePack, framed).
fn wire(c: &mut Criterion) {
    use pcx::interface::protocol::parse_value;
    use pcx::interface::wire::{decode_body, encode_frame, to_json, to_msgpack};
    let content: Vec<u8> = (0..256u32).map(|i| (i * 37 % 251) as u8).collect();
    let request = serde_json::json!({
        "op": "record_artifact",
        "key": "c17_r523",
        "kind": "eager",
        "content_b64": base64_of(&content),
    });
    let frame = encode_frame(&to_msgpack(&request)).expect("a small frame");
    let body = &frame[4..];
    let answer = serde_json::json!({"ok": true});
    let mut group = c.benchmark_group("wire");
    group.throughput(Throughput::Elements(1));
    group.bench_function("record_artifact request, 256 B: body to request", |b| {
        b.iter(|| {
            let value = to_json(decode_body(black_box(body)).expect("decodes")).expect("json");
            parse_value(value).1.expect("a request")
        })
    });
    group.bench_function("answer ok: JSON to frame", |b| {
        b.iter(|| encode_frame(&to_msgpack(black_box(&answer))))
    });
    group.finish();
}

fn base64_of(b: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(b)
}

criterion_group! {
    name = micro;
    // Shorter than criterion's defaults (3 s warm-up, 5 s measurement); flags override.
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = record_codec, fold, stitch, plugin_call, wire
}
criterion_main!(micro);
