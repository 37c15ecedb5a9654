//! What a PyTorch 2.10 client needs of the protocol: an entry keeps the bytes pcx does not read
//! (`extra_b64`) exactly, through save, load and a restart, and the system check at load follows
//! torch 2.10's `check_compatibility` (which fields count for which device, and its words).

use serde_json::{json, Value};

mod common;
use common::protocol::*;

/// Opaque bytes as torch's pickled leftovers would be: every byte value, NULs included.
fn opaque() -> Vec<u8> {
    (0..=255u8).rev().chain(0..=255u8).collect()
}

fn entry_with_extra(extra: &[u8]) -> Value {
    let mut e = entry_with_codes(&[&["b1"]]);
    e["extra_b64"] = json!(b64(extra));
    e
}

#[test]
fn an_entrys_extra_bytes_come_back_exactly_after_save_load_and_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let answers = batch(
        dir.path(),
        &[
            record("b1", "aaa"),
            record_entry("e1", entry_with_extra(&opaque())),
            save(),
            load("e1"),
        ],
    );
    for a in &answers {
        assert_ok(a);
    }
    let loaded = &answers[3]["entry"]["dynamo"];
    assert_eq!(unb64(&loaded["extra_b64"]), opaque(), "{loaded}");

    // A new process, replaying the log: the same bytes.
    let again = batch(dir.path(), &[load("e1")]);
    assert_ok(&again[0]);
    assert_eq!(unb64(&again[0]["entry"]["dynamo"]["extra_b64"]), opaque());

    // An entry without extra answers without the field, as before it existed.
    let plain = batch(
        dir.path(),
        &[
            record_entry("e2", entry_with_codes(&[&["b1"]])),
            save(),
            load("e2"),
        ],
    );
    assert_ok(&plain[2]);
    assert!(
        plain[2]["entry"]["dynamo"].get("extra_b64").is_none(),
        "{}",
        plain[2]
    );
}

#[test]
fn extra_bytes_count_against_max_content_bytes_and_bad_base64_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let run = batch_raw(
        dir.path(),
        &lines(&[
            record_entry("e1", entry_with_extra(&[7; 64])),
            json!({"op":"record_dynamo_cache_entry","key":"e2","entry":{"device_type":"cpu","codes":[{"backend_ids":[]}],"extra_b64":"!!"}}),
            dump(),
        ]),
        &[("PCX_MAX_CONTENT_BYTES", "32")],
    );
    let answers: Vec<Value> = run
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let message = assert_failed(&answers[0], "too_large");
    assert!(message.contains("extra is 64 bytes"), "{message}");
    let message = assert_failed(&answers[1], "bad_base64");
    assert!(message.contains("entry.extra_b64"), "{message}");
    let dynamo = &answers[2]["debug_info"]["dynamo"];
    assert!(
        dynamo.as_array().is_none_or(Vec::is_empty),
        "nothing recorded: {dynamo}"
    );
}

/// Saves an entry for `device` made on `saved`, then loads it as a process with `current`.
fn load_as(device: &str, saved: Value, current: Value) -> Value {
    let dir = tempfile::tempdir().unwrap();
    let mut entry = entry_with_codes(&[&["b1"]]);
    entry["device_type"] = json!(device);
    entry["system_info"] = saved;
    let answers = batch(
        dir.path(),
        &[
            record("b1", "aaa"),
            record_entry("e1", entry),
            save(),
            json!({"op":"load_cache_entry","key":"e1","system_info":current}),
        ],
    );
    answers[3].clone()
}

fn sys(toolkit: Option<&str>, triton: Option<&str>, gpu: Option<&str>) -> Value {
    json!({"python_version":"3.11.9","torch_version":"2.10.0",
           "toolkit_version":toolkit,"triton_version":triton,"gpu_name":gpu})
}

#[test]
fn the_system_check_at_load_follows_torch_2_10() {
    let made = sys(Some("12.8"), Some("(3, 4)"), Some("NVIDIA H100"));
    // cpu: only Python and torch count.
    assert_ok(&load_as("cpu", made.clone(), sys(None, None, None)));
    // xpu counts the toolkit, as cuda does.
    let a = load_as(
        "xpu",
        made.clone(),
        sys(Some("2025.1"), Some("(3, 4)"), Some("NVIDIA H100")),
    );
    let message = assert_failed(&a, "system_mismatch");
    assert!(
        message.contains("Compile package was created with a different toolkit version: 12.8"),
        "{message}"
    );
    // A loader without Triton ((0, 0)) or without a GPU name skips those.
    assert_ok(&load_as(
        "cuda",
        made.clone(),
        sys(Some("12.8"), Some("(0, 0)"), None),
    ));
    assert_ok(&load_as(
        "cuda",
        made.clone(),
        sys(Some("12.8"), None, Some("NVIDIA H100")),
    ));
    let a = load_as(
        "cuda",
        made.clone(),
        sys(Some("12.8"), Some("(3, 5)"), None),
    );
    let message = assert_failed(&a, "system_mismatch");
    assert!(
        message.contains("different Triton version: (3, 4)"),
        "{message}"
    );
    let a = load_as(
        "cuda",
        made,
        sys(Some("12.8"), Some("(3, 4)"), Some("NVIDIA A100")),
    );
    let message = assert_failed(&a, "system_mismatch");
    assert!(
        message.contains("different GPU: cached=NVIDIA H100, current=NVIDIA A100"),
        "{message}"
    );
}

#[test]
fn an_edit_naming_the_content_it_read_applies_only_to_that_content() {
    let dir = tempfile::tempdir().unwrap();
    let answers = batch(dir.path(), &[record("b1", "v1"), serialize("b1")]);
    let read = answers[1]["artifact"]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let cas = |digest: &str, text: &str| json!({"op":"edit_artifact","key":"b1","edit":{"set_b64":b64(text)},"expected_digest":digest});
    let answers = batch(
        dir.path(),
        &[
            cas(&read, "v2"), // what was read: applies
            cas(&read, "v3"), // stale now: refused
            serialize("b1"),
            json!({"op":"log"}),
        ],
    );
    assert_ok(&answers[0]);
    let message = assert_failed(&answers[1], "conflict");
    assert!(message.contains(&read), "{message}");
    assert_eq!(unb64_text(&answers[2]["artifact"]["content_b64"]), "v2");
    let events = answers[3]["events"].as_array().unwrap();
    assert_eq!(
        events.len(),
        2,
        "the refused edit wrote nothing: {events:?}"
    );
    // The digest answered is the content's: the next edit names it and applies.
    let now = answers[2]["artifact"]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(now, read);
    assert_ok(&batch(dir.path(), &[cas(&now, "v3")])[0]);
}

#[test]
fn a_code_recorded_bypassed_stays_bypassed_through_the_stitch() {
    let dir = tempfile::tempdir().unwrap();
    let entry = json!({"device_type":"cpu","codes":[
        {"backend_ids":["b1"],"bypassed":true,"bypass_reason":"torch bypassed it at record"},
        {"backend_ids":["b1"]}
    ]});
    let answers = batch(
        dir.path(),
        &[
            record("b1", "aaa"),
            record_entry("e1", entry),
            op("create_cache_entries"),
        ],
    );
    let codes = &answers[2]["entries"]["e1"]["dynamo"]["codes"];
    assert_eq!(codes[0]["bypassed"], true, "{codes}");
    assert_eq!(codes[0]["bypass_reason"], "torch bypassed it at record");
    assert_eq!(codes[1]["bypassed"], false, "{codes}");
}

/// A code with a payload of `size` bytes naming backend `b{i}`.
fn code(i: usize, size: usize) -> Value {
    json!({"backend_ids":[format!("b{i}")],"python_module":"m","function_names":[format!("f{i}")],
           "payload_b64": b64(vec![i as u8; size])})
}

fn growing_entry(n: usize) -> Value {
    let codes: Vec<Value> = (0..n).map(|i| code(i, 4096)).collect();
    json!({"fn_name":"f","device_type":"cpu","codes":codes})
}

/// Bytes of the log as `pcx export` writes it.
fn exported(dir: &std::path::Path) -> usize {
    let run = cli(dir, &["export"]);
    run.assert_success();
    run.stdout.len()
}

#[test]
fn an_entry_re_recorded_as_it_grows_stores_only_its_new_codes() {
    const N: usize = 30;
    // As torch does: the whole entry again after every frame compiled, one code more each time.
    let growing = tempfile::tempdir().unwrap();
    let requests: Vec<Value> = (1..=N)
        .map(|n| record_entry("fwd", growing_entry(n)))
        .collect();
    for a in batch(growing.path(), &requests) {
        assert_ok(&a);
    }
    // The same final entry, recorded once.
    let once = tempfile::tempdir().unwrap();
    assert_ok(&batch(once.path(), &[record_entry("fwd", growing_entry(N))])[0]);

    // The same context either way, live and replayed.
    let ask = [op("create_cache_entries"), dump()];
    let (a, b) = (batch(growing.path(), &ask), batch(once.path(), &ask));
    assert!(
        a[0]["entries"] == b[0]["entries"],
        "the stitched entries differ"
    );
    assert_eq!(a[1], b[1]);
    // The re-records are stored as extensions, and the log grows with the entry, not with
    // the square of its codes (stored whole each time: about N/2 = 15 times the final entry).
    let log = cli_lines(growing.path(), &["log"]);
    assert_eq!(log[0]["event"], "DynamoEntryRecorded");
    assert!(log[1..N]
        .iter()
        .all(|e| e["event"] == "DynamoEntryExtended" && e["new_codes"] == 1));
    let (grown, whole) = (exported(growing.path()), exported(once.path()));
    assert!(
        grown < 3 * whole,
        "re-recording a growing entry stored {grown} bytes; the final entry alone is {whole}"
    );
    // A changed code (torch recompiled it) is stored from there on, and the result is exact.
    let mut changed = growing_entry(N);
    changed["codes"][5] = code(5, 100);
    let answers = batch(
        growing.path(),
        &[
            record_entry("fwd", changed.clone()),
            op("create_cache_entries"),
        ],
    );
    let fresh = tempfile::tempdir().unwrap();
    let expected = batch(
        fresh.path(),
        &[record_entry("fwd", changed), op("create_cache_entries")],
    );
    assert!(
        answers[1]["entries"] == expected[1]["entries"],
        "the re-recorded entry differs from the same entry recorded fresh"
    );
    let log = cli_lines(growing.path(), &["log", "--event", "DynamoEntryExtended"]);
    let last = log.last().unwrap();
    assert_eq!(
        (&last["kept_codes"], &last["new_codes"]),
        (&json!(5), &json!(N - 5))
    );
}

#[test]
fn in_report_mode_a_system_mismatch_is_answered_and_the_load_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let made = sys(None, None, None);
    let mut other = made.clone();
    other["torch_version"] = json!("2.9.0");
    let mut entry = entry_with_codes(&[&["b1"]]);
    entry["system_info"] = made;
    let lines_in = lines(&[
        record("b1", "aaa"),
        record_entry("e1", entry),
        save(),
        json!({"op":"load_cache_entry","key":"e1","system_info":other}),
    ]);
    let run = batch_raw(dir.path(), &lines_in, &[("PCX_SYSTEM_CHECK", "report")]);
    let answers: Vec<Value> = run
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_ok(&answers[3]);
    assert_eq!(
        answers[3]["system_mismatch"],
        "Compile package was created with a different PyTorch version: 2.10.0"
    );
    // The default refuses, as before; an unknown mode is a configuration error (exit 2).
    let refused = load_as("cpu", sys(None, None, None), other.clone());
    assert_failed(&refused, "system_mismatch");
    let mut cmd = common::pcx(dir.path(), &["batch"]);
    cmd.env("PCX_SYSTEM_CHECK", "maybe");
    let bad = common::run(cmd, b"");
    assert_eq!(bad.status.code(), Some(2), "{}", bad.stderr);
    assert!(bad.stderr.contains("system_check"), "{}", bad.stderr);
}

#[test]
fn stitch_and_save_answer_their_structured_trace_events_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let answers = batch(
        dir.path(),
        &[
            record("b1", "aaa"),
            record_entry("e1", entry_with_codes(&[&["b1"], &["b3"]])),
            json!({"op":"create_cache_entries","trace":true}),
            json!({"op":"save_to_dynamo_cache","trace":true}),
            op("create_cache_entries"),
        ],
    );
    for a in &answers[2..] {
        assert_ok(a);
    }
    // PyTorch's events, in its order: the entries first, then the bypass of the code whose
    // backend b3 is missing (a client re-emits them through torch's trace_structured).
    for a in &answers[2..4] {
        let names: Vec<&str> = a["trace"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            ["dynamo_cache_entries", "dynamo_cache_bypass"],
            "{a}"
        );
        assert_eq!(a["trace"][0]["payload"]["num_entries"], 1);
        assert_eq!(a["trace"][1]["payload"]["missing_backend"], "b3");
    }
    assert!(answers[4].get("trace").is_none(), "only when asked");
}
