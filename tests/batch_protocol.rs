//! The real `pcx` binary: `pcx batch` (JSON lines in, JSON lines out) and the single-shot
//! CLI commands, each run as a separate process on a temporary data directory.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::Stdio;
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use serde_json::{json, Value};

mod common;
use common::protocol::*;
use common::*;

// ---------------------------------------------------------------------------------------------
// helpers

/// An answer's artifact content as text, or `None` for `"artifact": null`.
fn artifact_text(answer: &Value, key: &str) -> Option<String> {
    assert_ok(answer);
    let artifact = &answer["artifact"];
    if artifact.is_null() {
        return None;
    }
    assert_eq!(artifact["key"], json!(key), "{answer}");
    Some(unb64_text(&artifact["content_b64"]))
}

/// A stitched entry's backends as (key, content text).
fn stitched_backends(entry: &Value) -> Vec<(String, String)> {
    entry["backends"]
        .as_object()
        .unwrap_or_else(|| panic!("no backends map: {entry}"))
        .iter()
        .map(|(k, a)| (k.clone(), unb64_text(&a["content_b64"])))
        .collect()
}

fn bypass_flags(entry: &Value) -> Vec<bool> {
    entry["dynamo"]["codes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["bypassed"].as_bool().unwrap())
        .collect()
}

fn sorted(value: &Value) -> Vec<String> {
    let mut list: Vec<String> = value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    list.sort();
    list
}

// ---------------------------------------------------------------------------------------------
// the worked example

#[test]
fn the_worked_example_of_semantics_md_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let answers = batch(dir.path(), &worked_example());
    for i in [0, 1, 2, 3, 5] {
        assert_ok(&answers[i]);
    }
    let message = assert_failed(&answers[4], "key_not_found");
    assert!(
        message.contains("Key nope not found in artifacts"),
        "{message}"
    );
    assert_eq!(artifact_text(&answers[6], "b2").as_deref(), Some("bbb!"));
    assert_eq!(answers[7], json!({"ok": true, "artifact": null}));

    let stitched = &answers[8];
    assert_ok(stitched);
    let info = &stitched["debug_info"];
    assert_eq!(info["backends"], json!(["b1", "b2"]));
    let dynamo = info["dynamo"].as_array().unwrap();
    assert_eq!(dynamo.len(), 1);
    assert_eq!(sorted(&dynamo[0]["backend_ids"]), vec!["b1", "b2", "b3"]);
    let mut without_ids = dynamo[0].clone();
    without_ids.as_object_mut().unwrap().remove("backend_ids");
    assert_eq!(
        without_ids,
        json!({"device_type":"cpu","fn_first_lineno":3,"fn_name":"f","key":"e1","num_codes":"2"})
    );
    let entries = stitched["entries"].as_object().unwrap();
    assert_eq!(entries.keys().collect::<Vec<_>>(), vec!["e1"]);
    assert_eq!(
        stitched_backends(&entries["e1"]),
        pairs(&[("b1", "ccc"), ("b2", "bbb!")])
    );
    assert_eq!(bypass_flags(&entries["e1"]), vec![false, true]);
    assert_eq!(
        entries["e1"]["dynamo"]["codes"][1]["bypass_reason"],
        "backend artifact b3 missing at save time"
    );
}

// ---------------------------------------------------------------------------------------------
// bad input: refused, the next line served, nothing half-applied

/// Runs [record k "v", `bad`, dump_debug_info, serialize k] and checks that `bad` is refused
/// with `kind`, the lines after it are served, and the context holds exactly k = "v".
fn refused_and_next_served(bad: &str, kind: &str, env: &[(&str, &str)]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let input = format!(
        "{}{bad}\n{}",
        lines(&[record("k", "v")]),
        lines(&[dump(), serialize("k")])
    );
    let answers = batch_raw(dir.path(), &input, env).answers();
    assert_eq!(answers.len(), 4, "one answer per line: {answers:?}");
    assert_ok(&answers[0]);
    let message = assert_failed(&answers[1], kind);
    assert_eq!(
        answers[2],
        json!({"ok": true, "debug_info": {"backends": ["k"]}}),
        "nothing half-applied"
    );
    assert_eq!(
        artifact_text(&answers[3], "k").as_deref(),
        Some("v"),
        "k is unchanged"
    );
    // And nothing of it reached the log: a new process sees the same.
    let again = batch(dir.path(), &[dump(), serialize("k")]);
    assert_eq!(again[0], answers[2]);
    assert_eq!(artifact_text(&again[1], "k").as_deref(), Some("v"));
    message
}

#[test]
fn bad_json_is_refused() {
    refused_and_next_served(
        r#"{"op":"record_artifact","key":"k","content_b64":"eA=="#,
        "bad_json",
        &[],
    );
    refused_and_next_served("not json at all", "bad_json", &[]);
}

#[test]
fn an_unknown_op_is_refused() {
    let message = refused_and_next_served(r#"{"op":"fly","key":"k"}"#, "unknown_op", &[]);
    assert!(
        message.contains("fly"),
        "the message names the op: {message}"
    );
}

#[test]
fn a_missing_field_is_refused() {
    let message = refused_and_next_served(
        r#"{"op":"record_artifact","key":"k2"}"#,
        "missing_field",
        &[],
    );
    assert!(
        message.contains("content_b64"),
        "the message names the field: {message}"
    );
    refused_and_next_served(r#"{"op":"edit_artifact","key":"k"}"#, "missing_field", &[]);
    refused_and_next_served(r#"{"key":"k"}"#, "missing_field", &[]);
}

/// Regression: fields a request does not have were ignored, so a misspelt optional field
/// changed what a request did without a word: an edit whose `expected_digest` was misspelt
/// was applied unconditionally (over someone else's change), a `context` misspelt wrote into
/// the default context, a `request_id` misspelt made the retry a second application. Now a
/// field the op does not take is refused `invalid_request`, naming it and the op's fields,
/// and nothing is applied.
#[test]
fn a_request_with_a_field_its_op_does_not_take_is_refused_not_applied_without_it() {
    for (bad, field) in [
        (
            r#"{"op":"edit_artifact","key":"k","edit":{"set_b64":"eA=="},"expected_digset":"00"}"#,
            "expected_digset",
        ),
        (
            r#"{"op":"record_artifact","key":"k","content_b64":"eA==","contxt":"mine"}"#,
            "contxt",
        ),
        (
            r#"{"op":"record_artifact","key":"k","content_b64":"eA==","reqest_id":"r1"}"#,
            "reqest_id",
        ),
        (r#"{"op":"clear","only":"k2"}"#, "only"),
    ] {
        let message = refused_and_next_served(bad, "invalid_request", &[]);
        assert!(
            message.contains(field),
            "the message names {field}: {message}"
        );
    }
    // The fields every request may carry are still taken.
    let dir = tempfile::tempdir().unwrap();
    let answers = batch_raw(
        dir.path(),
        concat!(
            r#"{"op":"record_artifact","key":"k","kind":"eager","content_b64":"eA==","id":1,"request_id":"r","context":"c","namespace":"n"}"#,
            "\n",
            r#"{"op":"log","from":1,"to":1,"since":null,"until":null,"key":"k","event":"ArtifactRecorded","limit":1}"#,
            "\n"
        ),
        &[],
    )
    .answers();
    assert_ok(&answers[0]);
    assert_ok(&answers[1]);
}

/// Regression: fields inside a request's values were still ignored when misspelt. A code
/// recorded with `"bypass": true` for `bypassed` was stored as a valid code, so a stitch
/// made a cache entry PyTorch had marked unusable; an `"extra"` for `extra_b64`, a
/// `"payload"` for `payload_b64` or a `system_info` field with a typo were dropped, so the
/// entry stored was not the one sent, answered ok. Now every nested object of a request
/// (entries, their codes, sources and system info, stitched entries' backends, plugin
/// edits, a load's system info) refuses a field it does not have, `invalid_request` naming
/// it and the fields its object has, and nothing is applied.
#[test]
fn a_misspelt_field_inside_an_entry_or_edit_is_refused_not_dropped() {
    let code = r#"{"backend_ids":["b"],"payload_b64":"eA=="}"#;
    let entry =
        |code: &str, rest: &str| format!(r#"{{"device_type":"cpu","codes":[{code}]{rest}}}"#);
    let record_entry = |entry: String| {
        format!(r#"{{"op":"record_dynamo_cache_entry","key":"e","entry":{entry}}}"#)
    };
    for (bad, expected, field) in [
        (
            record_entry(entry(
                r#"{"backend_ids":["b"],"payload_b64":"eA==","bypass":true}"#,
                "",
            )),
            "`bypassed`",
            "bypass",
        ),
        (
            record_entry(entry(r#"{"backend_ids":["b"],"payload":"eA=="}"#, "")),
            "`payload_b64`",
            "payload",
        ),
        (
            record_entry(entry(code, r#","extra":"eA==""#)),
            "`extra_b64`",
            "extra",
        ),
        (
            record_entry(entry(code, r#","system_info":{"torch_versoin":"2.10"}"#)),
            "`torch_version`",
            "torch_versoin",
        ),
        (
            record_entry(entry(
                code,
                r#","source_info":{"inlined_sources":[{"module":"m","firstlineno":1,"lastlineno":2,"checksum":"c","chksum":"d"}]}"#,
            )),
            "`checksum`",
            "chksum",
        ),
        (
            format!(
                r#"{{"op":"put_cache_entry","key":"e","entry":{{"dynamo":{},"backends":{{"b":{{"content_b64":"eA==","knd":"eager"}}}}}}}}"#,
                entry(code, "")
            ),
            "`kind`",
            "knd",
        ),
        (
            r#"{"op":"edit_artifact","key":"k","edit":{"plugin":{"op":"o","args":"eA=="}}}"#
                .to_string(),
            "`args_b64`",
            "args",
        ),
        (
            r#"{"op":"load_cache_entry","key":"e","system_info":{"python_verison":"3.11"}}"#
                .to_string(),
            "`python_version`",
            "python_verison",
        ),
    ] {
        let message = refused_and_next_served(&bad, "invalid_request", &[]);
        assert!(
            message.contains(&format!("unknown field `{field}`")) && message.contains(expected),
            "the message names {field} and the fields its object has: {message}"
        );
    }
    // Spelt right, the same requests are taken.
    let dir = tempfile::tempdir().unwrap();
    let answers = batch_raw(
        dir.path(),
        &format!(
            "{}\n{}\n",
            record_entry(entry(
                r#"{"backend_ids":["b"],"payload_b64":"eA==","bypassed":true}"#,
                r#","extra_b64":"eA==","system_info":{"torch_version":"2.10"}"#
            )),
            r#"{"op":"load_cache_entry","key":"e","system_info":{"python_version":"3.11"}}"#
        ),
        &[],
    )
    .answers();
    assert_ok(&answers[0]);
    // The load reached the context (nothing saved under `e`: a miss, PyTorch's error).
    assert_failed(&answers[1], "package_not_found");
}

#[test]
fn bad_base64_in_content_is_refused() {
    let message = refused_and_next_served(
        r#"{"op":"record_artifact","key":"k","kind":"eager","content_b64":"not*base64"}"#,
        "bad_base64",
        &[],
    );
    assert!(
        message.contains("content_b64"),
        "the message names the field: {message}"
    );
}

#[test]
fn bad_base64_in_an_edit_is_refused() {
    let message = refused_and_next_served(
        r#"{"op":"edit_artifact","key":"k","edit":{"append_b64":"%%%"}}"#,
        "bad_base64",
        &[],
    );
    assert!(message.contains("append_b64"), "{message}");
    let message = refused_and_next_served(
        r#"{"op":"edit_artifact","key":"k","edit":{"set_b64":"a=b="}}"#,
        "bad_base64",
        &[],
    );
    assert!(message.contains("set_b64"), "{message}");
}

#[test]
fn oversize_content_is_refused() {
    let limit = [("PCX_MAX_CONTENT_BYTES", "8")];
    let record_big = record("k2", "123456789").to_string();
    refused_and_next_served(&record_big, "too_large", &limit);
    // Replacing k with too much content leaves the old content.
    refused_and_next_served(&record("k", "123456789").to_string(), "too_large", &limit);
    // An edit that would make k too large leaves it as it was.
    refused_and_next_served(&append("k", "12345678").to_string(), "too_large", &limit);
    // Exactly the limit is accepted.
    let dir = tempfile::tempdir().unwrap();
    let answers = batch_raw(
        dir.path(),
        &lines(&[record("k", "12345678"), serialize("k")]),
        &limit,
    )
    .answers();
    assert_ok(&answers[0]);
    assert_eq!(artifact_text(&answers[1], "k").as_deref(), Some("12345678"));
}

/// The bytes of every file under `dir`.
fn dir_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|entry| {
            let entry = entry.unwrap();
            let meta = entry.metadata().unwrap();
            if meta.is_dir() {
                dir_bytes(&entry.path())
            } else {
                meta.len()
            }
        })
        .sum()
}

/// Product bug: an entry's code payloads were bounded by nothing but the request line, and an
/// entry is stored whole in its event and again in snapshots, so one 100 MiB payload grew a
/// data directory by 506 MB. Each payload and source, and all of an entry's together, are now
/// bounded by `max_content_bytes` like an artifact's content.
#[test]
fn a_dynamo_entry_payload_over_max_content_bytes_is_refused() {
    const LIMIT: usize = 4096;
    const BIG: usize = 4 << 20;
    let limit = [("PCX_MAX_CONTENT_BYTES", "4096")];
    let entry = |payloads: &[&[u8]], source: Option<&str>| {
        let codes: Vec<Value> = payloads
            .iter()
            .map(|p| json!({"backend_ids": ["k"], "payload_b64": b64(p), "code_source": source}))
            .collect();
        json!({"fn_name": "f", "device_type": "cpu", "codes": codes})
    };
    let dir = tempfile::tempdir().unwrap();
    let answers = batch_raw(dir.path(), &lines(&[record("k", "v")]), &limit).answers();
    assert_ok(&answers[0]);
    // sled sets aside room for its log on the second open: measure from after that.
    batch_raw(dir.path(), &lines(&[dump()]), &limit);
    let before = dir_bytes(dir.path());

    let big = vec![7u8; BIG];
    let at_limit = vec![1u8; LIMIT];
    let half = vec![2u8; LIMIT / 2 + 1];
    let answers = batch_raw(
        dir.path(),
        &lines(&[
            record_entry("big", entry(&[b"ok", &big], None)),
            record_entry("two-halves", entry(&[&half, &half], None)),
            record_entry("long-source", entry(&[b""], Some(&"x".repeat(LIMIT + 1)))),
            dump(),
        ]),
        &limit,
    )
    .answers();
    let message = assert_failed(&answers[0], "too_large");
    for needle in [
        "big",
        "codes[1].payload",
        &BIG.to_string(),
        "4096",
        "max_content_bytes",
    ] {
        assert!(
            message.contains(needle),
            "the message names {needle}: {message}"
        );
    }
    let message = assert_failed(&answers[1], "too_large");
    assert!(message.contains(&(LIMIT + 2).to_string()), "{message}");
    let message = assert_failed(&answers[2], "too_large");
    assert!(message.contains("codes[0].code_source"), "{message}");
    assert_eq!(
        answers[3],
        json!({"ok": true, "debug_info": {"backends": ["k"]}}),
        "nothing of the refused entries is in the context"
    );
    let grown = dir_bytes(dir.path()).saturating_sub(before);
    assert!(
        grown < (BIG / 4) as u64,
        "the data directory grew by {grown} bytes for refused entries"
    );
    let logged = cli_lines(dir.path(), &["log", "--event", "DynamoEntryRecorded"]);
    assert_eq!(logged, Vec::<Value>::new(), "no event for a refused entry");

    // At the limit is accepted, and the next process reads it back.
    let answers = batch_raw(
        dir.path(),
        &lines(&[record_entry("fits", entry(&[&at_limit], None))]),
        &limit,
    )
    .answers();
    assert_ok(&answers[0]);
    let stitched = batch_raw(dir.path(), &lines(&[stitch()]), &limit).answers();
    let codes = &stitched[0]["entries"]["fits"]["dynamo"]["codes"];
    assert_eq!(unb64(&codes[0]["payload_b64"]), at_limit);
}

#[test]
fn an_oversize_line_is_refused() {
    let limit = [("PCX_MAX_REQUEST_BYTES", "200")];
    let long = record("k2", "x".repeat(400)).to_string();
    assert!(long.len() > 200);
    let message = refused_and_next_served(&long, "too_large", &limit);
    assert!(
        message.contains("200"),
        "the message gives the limit: {message}"
    );
}

// ---------------------------------------------------------------------------------------------
// the protocol's other promises

#[test]
fn the_id_is_echoed_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut with_ids = vec![
        record("b1", "aaa"),
        serialize("b1"),
        append("nope", "!"),
        json!({"op":"fly"}),
    ];
    let ids = [json!("a-1"), json!(2), json!({"n": [1, 2]}), json!(null)];
    for (request, id) in with_ids.iter_mut().zip(&ids) {
        request["id"] = id.clone();
    }
    with_ids.push(serialize("b1"));
    let answers = batch(dir.path(), &with_ids);
    for (answer, id) in answers.iter().zip(&ids) {
        let first = answer.as_object().unwrap().keys().next().unwrap();
        assert_eq!(first, "id", "the id comes first: {answer}");
        assert_eq!(&answer["id"], id, "{answer}");
    }
    assert_ok(&answers[0]);
    assert_eq!(artifact_text(&answers[1], "b1").as_deref(), Some("aaa"));
    assert_failed(&answers[2], "key_not_found");
    assert_failed(&answers[3], "unknown_op");
    assert!(
        answers[4].get("id").is_none(),
        "no id asked, none given: {}",
        answers[4]
    );
}

#[test]
fn write_answers_carry_seqs_that_grow_by_one_per_event_across_processes() {
    let dir = tempfile::tempdir().unwrap();
    let first = batch(
        dir.path(),
        &[
            record("b1", "a"),
            serialize("b1"),
            append("nope", "!"),
            record("b2", "b"),
        ],
    );
    let s1 = first[0]["seq"].as_u64().expect("a write carries a seq");
    assert!(
        first[1].get("seq").is_none(),
        "a read carries none: {}",
        first[1]
    );
    assert!(
        first[2].get("seq").is_none(),
        "a failure carries none: {}",
        first[2]
    );
    assert_eq!(first[3]["seq"].as_u64(), Some(s1 + 1));
    let second = batch(dir.path(), &[append("b1", "!"), json!({"op":"clear"})]);
    assert_eq!(second[0]["seq"].as_u64(), Some(s1 + 2));
    assert_eq!(second[1]["seq"].as_u64(), Some(s1 + 3));
}

#[test]
fn answers_stream_before_the_input_ends() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = pcx(dir.path(), &["batch"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("pcx starts");
    let mut stdin = child.stdin.take().unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel::<String>();
    let reader = thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if tx.send(line.expect("stdout is readable")).is_err() {
                break;
            }
        }
    });

    let mut ask = |request: Value| -> Value {
        writeln!(stdin, "{request}").unwrap();
        stdin.flush().unwrap();
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(line) => serde_json::from_str(&line).unwrap(),
            Err(e) => {
                let _ = child.kill();
                panic!("no answer while stdin is still open: {e}");
            }
        }
    };
    let first = ask(record("b1", "aaa"));
    assert_ok(&first);
    assert!(first["seq"].is_u64(), "{first}");
    // The change was answered: a read on the same stream sees it.
    assert_eq!(
        artifact_text(&ask(serialize("b1")), "b1").as_deref(),
        Some("aaa")
    );

    drop(stdin);
    let status = wait(&mut child, TIMEOUT, "pcx batch");
    assert!(
        status.success(),
        "pcx batch exits 0 at the end of its input: {status}"
    );
    reader.join().unwrap();
    assert!(rx.try_recv().is_err(), "no answer beyond the two requests");
}

#[test]
fn a_missing_data_directory_is_created() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("not").join("there").join("yet");
    let answers = batch(&dir, &[record("b1", "aaa"), serialize("b1")]);
    assert_ok(&answers[0]);
    assert!(dir.is_dir(), "{} was created", dir.display());
    let again = batch(&dir, &[serialize("b1")]);
    assert_eq!(artifact_text(&again[0], "b1").as_deref(), Some("aaa"));
}

#[test]
fn a_request_file_split_over_three_processes_gives_the_same_answers() {
    let requests = full_sequence(b"bytecode");
    let one = tempfile::tempdir().unwrap();
    let whole = run(pcx(one.path(), &["batch"]), lines(&requests).as_bytes());
    whole.assert_success();
    assert_eq!(whole.stdout.lines().count(), requests.len());

    let split = tempfile::tempdir().unwrap();
    let mut pieces = String::new();
    for part in [&requests[..6], &requests[6..13], &requests[13..]] {
        let out = run(pcx(split.path(), &["batch"]), lines(part).as_bytes());
        out.assert_success();
        pieces.push_str(&out.stdout);
    }
    assert_eq!(pieces, whole.stdout);
    // The answers are about something: the load after the restarts found e1.
    let answers = whole.answers();
    assert_eq!(
        stitched_backends(&answers[14]["entry"]),
        pairs(&[("b1", "ccc"), ("b2", "bbb!")])
    );
}

#[test]
fn json_logs_carry_the_structured_stitch_events() {
    let dir = tempfile::tempdir().unwrap();
    let input = lines(&[
        record("b1", "ccc"),
        record("b2", "bbb!"),
        record_entry("e1", example_entry()),
        json!({"op":"create_cache_entries"}),
    ]);
    let out = run(
        pcx(dir.path(), &["--log-format", "json", "batch"]),
        input.as_bytes(),
    );
    out.assert_success();
    let logs: Vec<Value> = out
        .stderr
        .lines()
        .map(|l| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("a stderr line is not JSON ({e}): {l}"))
        })
        .collect();
    let payloads = |name: &str| -> Vec<Value> {
        logs.iter()
            .filter(|l| l["fields"]["artifact"] == name)
            .map(|l| {
                assert_eq!(l["fields"]["encoding"], "json", "{l}");
                serde_json::from_str(
                    l["fields"]["payload"]
                        .as_str()
                        .expect("payload is JSON text"),
                )
                .unwrap()
            })
            .collect()
    };

    let entries = payloads("dynamo_cache_entries");
    assert_eq!(entries.len(), 1, "stderr: {}", out.stderr);
    assert_eq!(entries[0]["num_entries"], json!(1));
    let artifacts = &entries[0]["artifacts"];
    assert_eq!(artifacts["backends"], json!(["b1", "b2"]));
    assert_eq!(artifacts["dynamo"][0]["key"], "e1");
    assert_eq!(artifacts["dynamo"][0]["num_codes"], "2");

    let bypasses = payloads("dynamo_cache_bypass");
    assert_eq!(bypasses.len(), 1, "stderr: {}", out.stderr);
    assert_eq!(bypasses[0]["missing_backend"], "b3");
    let entry = &bypasses[0]["entry"];
    assert_eq!(sorted(&entry["backend_ids"]), vec!["b1", "b2", "b3"]);
    let mut rest = entry.clone();
    rest.as_object_mut().unwrap().remove("backend_ids");
    assert_eq!(
        rest,
        json!({"num_codes":"2","fn_name":"f","fn_first_lineno":3,"device_type":"cpu"})
    );
    assert!(payloads("dynamo_cache_exception").is_empty());
}

// ---------------------------------------------------------------------------------------------
// single-shot CLI commands

/// An edit that says neither how (`--set-b64` or `--append-b64`) is a bad command line: exit
/// 2 with the usage, as docs/protocol.md says of bad flags (it exited 1).
#[test]
fn an_edit_without_set_or_append_exits_2_with_the_usage() {
    let tmp = tempfile::tempdir().unwrap();
    let how = cli(tmp.path(), &["edit", "b2"]);
    assert_eq!(how.status.code(), Some(2), "{}", how.stderr);
    assert!(
        how.stderr.contains("--set-b64") && how.stderr.contains("--append-b64"),
        "{}",
        how.stderr
    );
}

#[test]
fn an_entry_or_system_info_that_is_not_valid_json_gets_the_answer_batch_gives() {
    let tmp = tempfile::tempdir().unwrap();
    for (args, kind) in [
        (vec!["record-entry", "k", "--json", "{bad"], "bad_json"),
        (
            vec!["record-entry", "k", "--json", r#"{"codes":[]}"#],
            "missing_field",
        ),
        (
            vec!["record-entry", "k", "--json", r#"{"x":1}"#],
            "invalid_request",
        ),
        (vec!["load", "k", "--system-info", "{x"], "bad_json"),
        (vec!["load", "k", "--system-info", "5"], "invalid_request"),
    ] {
        cli_error(tmp.path(), &args, kind);
    }
    // Nothing was recorded by any of them.
    let info = cli_ok(tmp.path(), &["debug-info"]);
    assert_eq!(info["debug_info"], json!({}), "{info}");
}

/// The CLI's single-request commands act in the context and namespace given with the global
/// `--context` and `--namespace` (torch's changes all live in named contexts, which the CLI
/// could not reach), `pcx contexts` lists the contexts, and a command that reads or serves
/// every context refuses the flags rather than ignore them.
#[test]
fn single_shot_commands_act_in_the_context_given_and_whole_log_commands_refuse_one() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    cli_ok(
        dir,
        &["record-artifact", "k", "--text", "in c", "--context", "c"],
    );
    cli_ok(
        dir,
        &[
            "--context",
            "c",
            "record-entry",
            "e",
            "--json",
            r#"{"device_type":"cpu","codes":[{"backend_ids":["k"]}]}"#,
        ],
    );
    cli_ok(dir, &["save", "--context", "c", "--namespace", "n"]);
    cli_ok(dir, &["record-artifact", "k", "--text", "default's"]);
    assert_eq!(
        artifact_text(&cli_ok(dir, &["get", "k", "--context", "c"]), "k").as_deref(),
        Some("in c")
    );
    assert_eq!(
        artifact_text(&cli_ok(dir, &["get", "k"]), "k").as_deref(),
        Some("default's")
    );
    let loaded = cli_ok(dir, &["load", "e", "--context", "d", "--namespace", "n"]);
    assert_eq!(loaded["saved_by"], "c", "{loaded}");
    let contexts = cli_ok(dir, &["contexts"]);
    let names: Vec<&str> = contexts["contexts"]
        .as_array()
        .expect("a list")
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert!(names.contains(&"c") && names.contains(&"d"), "{contexts}");
    assert_eq!(
        artifact_text(&cli_ok(dir, &["take", "k", "--context", "c"]), "k").as_deref(),
        Some("in c")
    );
    assert_eq!(
        cli_ok(dir, &["get", "k", "--context", "c"])["artifact"],
        Value::Null
    );
    for refused in [
        &["--context", "c", "batch"][..],
        &["log", "--context", "c"],
        &["verify", "--namespace", "n"],
        &["contexts", "--context", "c"],
        &["get", "k", "--context", "a b"],
    ] {
        let run = cli(dir, refused);
        assert_eq!(run.status.code(), Some(2), "{refused:?}: {}", run.stderr);
        assert!(
            run.stderr.contains("--context") || run.stderr.contains("--namespace"),
            "{}",
            run.stderr
        );
    }
}

#[test]
fn single_shot_commands_work_across_processes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    cli_ok(dir, &["record-artifact", "b1", "--text", "aaa"]);
    cli_ok(dir, &["record-artifact", "b2", "--text", "bbb"]);
    cli_ok(dir, &["edit", "b2", "--append-b64", &b64("!")]);
    assert_eq!(
        artifact_text(&cli_ok(dir, &["get", "b2"]), "b2").as_deref(),
        Some("bbb!")
    );

    // A missing edit target: non-zero exit, ok:false, PyTorch's message.
    let missing = cli(dir, &["edit", "nope", "--set-b64", &b64("x")]);
    assert!(
        !missing.status.success(),
        "edit of a missing key exits non-zero"
    );
    let message = assert_failed(&missing.answer(), "key_not_found");
    assert!(
        message.contains("Key nope not found in artifacts"),
        "{message}"
    );
    // `get` of it is not an error, just none.
    assert_eq!(artifact_text(&cli_ok(dir, &["get", "nope"]), "nope"), None);

    let entry = example_entry().to_string();
    cli_ok(dir, &["record-entry", "e1", "--json", &entry]);
    let info = cli_ok(dir, &["debug-info"]);
    assert_eq!(info["debug_info"]["backends"], json!(["b1", "b2"]));
    assert_eq!(info["debug_info"]["dynamo"][0]["key"], "e1");

    let stitched = cli_ok(dir, &["stitch"]);
    assert_eq!(
        stitched_backends(&stitched["entries"]["e1"]),
        pairs(&[("b1", "aaa"), ("b2", "bbb!")])
    );
    assert_eq!(bypass_flags(&stitched["entries"]["e1"]), vec![false, true]);
    let saved = cli_ok(dir, &["save"]);
    assert_eq!(saved["debug_info"], info["debug_info"]);

    assert_eq!(
        artifact_text(&cli_ok(dir, &["take", "b1"]), "b1").as_deref(),
        Some("aaa")
    );
    assert_eq!(artifact_text(&cli_ok(dir, &["take", "b1"]), "b1"), None);
    cli_ok(dir, &["clear"]);
    assert_eq!(
        cli_ok(dir, &["debug-info"]),
        json!({"ok": true, "debug_info": {}})
    );

    let loaded = cli_ok(dir, &["load", "e1"]);
    assert_eq!(
        stitched_backends(&loaded["entry"]),
        pairs(&[("b1", "aaa"), ("b2", "bbb!")])
    );
    assert_eq!(
        cli_ok(dir, &["debug-info"])["debug_info"],
        json!({"backends": ["b1", "b2"]})
    );
    assert_eq!(
        artifact_text(&cli_ok(dir, &["get", "b1"]), "b1").as_deref(),
        Some("aaa")
    );

    let miss = cli(dir, &["load", "zz"]);
    assert!(!miss.status.success(), "a load miss exits non-zero");
    assert_eq!(
        assert_failed(&miss.answer(), "package_not_found"),
        "No package found with key zz"
    );
    let mismatch = cli(
        dir,
        &[
            "load",
            "e1",
            "--system-info",
            r#"{"python_version":"3.11","torch_version":"2.9"}"#,
        ],
    );
    assert!(!mismatch.status.success());
    // The entry was saved with empty versions, so the caller's Python version differs first.
    let message = assert_failed(&mismatch.answer(), "system_mismatch");
    assert!(
        message.starts_with("Compile package was created with a different"),
        "{message}"
    );
}

/// Product bug: `pcx demo` clears the context it runs on, and ran on any data directory: run
/// (as the README's first command) on a directory holding someone's work, it cleared their
/// artifacts and saved its entry among theirs. It now runs on a directory of its own, as often
/// as wanted, and refuses one holding anything it did not make, changing nothing.
#[test]
fn the_demo_runs_again_on_its_own_directory_and_refuses_one_holding_someone_elses_work() {
    let tmp = tempfile::tempdir().unwrap();
    let demo = tmp.path().join("demo");
    for round in ["first", "second"] {
        let run = cli(&demo, &["demo"]);
        run.assert_success();
        assert!(
            run.stdout.contains("== done"),
            "{round} run: {}",
            run.stdout
        );
    }
    let work = tmp.path().join("work");
    let answers = batch(&work, &[record("mine", "my kernel")]);
    assert_eq!(answers[0]["ok"], json!(true), "{}", answers[0]);
    let run = cli(&work, &["demo"]);
    assert_eq!(run.status.code(), Some(1), "{}", run.stdout);
    assert!(
        run.stdout.contains("demo_refused") && run.stdout.contains("mine"),
        "{}",
        run.stdout
    );
    let state = batch(&work, &[json!({"op": "state"})]);
    let keys: Vec<&str> = state[0]["state"]["artifacts"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|a| a["key"].as_str())
        .collect();
    assert_eq!(keys, vec!["mine"], "the work is as it was: {}", state[0]);
    assert_eq!(
        state[0]["state"]["seq"],
        json!(1),
        "nothing was logged: {}",
        state[0]
    );
}

/// Content (or an entry's JSON, or an import) from a source that never ends, `--file /dev/zero`
/// or a pipe from a stream, is refused once it passes its limit, and nothing is recorded.
/// Before, pcx read it until the machine's memory was gone (24 GB here, then the kernel's OOM
/// killer; an import aborted on a failed allocation). Each run has 1 GiB of address space, so
/// the old behaviour fails here instead of taking the machine.
#[test]
fn a_content_that_never_ends_is_refused_at_its_limit_and_nothing_is_recorded() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let fresh = tmp.path().join("fresh");
    cli_ok(&dir, &["record-artifact", "kept", "--text", "kept"]);
    let content = ("too_large", "max_content_bytes");
    let line = ("too_large", "max_request_bytes");
    // Where, the command, whether its input is stdin, and the answer's kind and limit.
    type Case<'a> = (&'a Path, &'a [&'a str], bool, (&'a str, &'a str));
    let cases: [Case; 4] = [
        (
            &dir,
            &["record-artifact", "k", "--file", "/dev/zero"],
            false,
            content,
        ),
        (&dir, &["record-artifact", "k"], true, content),
        (&dir, &["record-entry", "k"], true, line),
        (
            &fresh,
            &["import"],
            true,
            ("import_failed", "max_request_bytes"),
        ),
    ];
    for (dir, args, from_stdin, (kind, limit)) in cases {
        let mut cmd = pcx(dir, args);
        cmd.env("PCX_MAX_CONTENT_BYTES", "65536")
            .env("PCX_MAX_REQUEST_BYTES", "65536")
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        if from_stdin {
            cmd.stdin(std::fs::File::open("/dev/zero").unwrap());
        }
        with_address_space_limit(&mut cmd, 1 << 30);
        let mut child = Guard(cmd.spawn().unwrap());
        let status = child.wait_for(TIMEOUT);
        let mut out = String::new();
        std::io::Read::read_to_string(&mut child.0.stdout.take().unwrap(), &mut out).unwrap();
        assert!(status.is_some(), "{args:?} still reading after {TIMEOUT:?}");
        let answer: Value = serde_json::from_str(out.trim())
            .unwrap_or_else(|e| panic!("{args:?}: no answer ({e}), {status:?}: {out:?}"));
        assert_eq!(answer["error"]["kind"], json!(kind), "{args:?}: {answer}");
        let message = answer["error"]["message"].as_str().unwrap_or_default();
        assert!(
            message.contains(limit) && message.contains("65536"),
            "{message}"
        );
    }
    let log = cli_lines(&dir, &["log"]);
    assert_eq!(log.len(), 1, "{log:?}");
    let imported = cli(&fresh, &["log"]);
    assert!(
        imported.stdout.trim().is_empty() || !imported.status.success(),
        "the import left a log: {}",
        imported.stdout
    );
}
