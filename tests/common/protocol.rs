//! `pcx` as its users drive it: JSON requests (the batch protocol's, also sent as frames by
//! `pcx serve` clients), checks of their answers, `pcx batch` runs and single-shot CLI runs.

use std::path::Path;
use std::process::Command;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde_json::{json, Value};

use super::{pcx, run, Run};

// ---------------------------------------------------------------------------------------------
// base64

pub fn b64(bytes: impl AsRef<[u8]>) -> String {
    B64.encode(bytes)
}

/// The bytes of a `*_b64` field.
pub fn unb64(value: &Value) -> Vec<u8> {
    let text = value
        .as_str()
        .unwrap_or_else(|| panic!("not base64 text: {value}"));
    B64.decode(text).expect("valid base64")
}

/// The text of a `*_b64` field; it must be UTF-8.
pub fn unb64_text(value: &Value) -> String {
    String::from_utf8(unb64(value)).unwrap()
}

// ---------------------------------------------------------------------------------------------
// requests

/// One JSON request a line.
pub fn lines(requests: &[Value]) -> String {
    requests.iter().map(|r| format!("{r}\n")).collect()
}

/// `record_artifact` of an `eager` artifact.
pub fn record(key: &str, content: impl AsRef<[u8]>) -> Value {
    record_kind(key, "eager", content)
}

/// `record_artifact` of an artifact of `kind`.
pub fn record_kind(key: &str, kind: &str, content: impl AsRef<[u8]>) -> Value {
    json!({"op":"record_artifact","key":key,"kind":kind,"content_b64":b64(content)})
}

pub fn append(key: &str, suffix: impl AsRef<[u8]>) -> Value {
    json!({"op":"edit_artifact","key":key,"edit":{"append_b64":b64(suffix)}})
}

pub fn set(key: &str, content: impl AsRef<[u8]>) -> Value {
    json!({"op":"edit_artifact","key":key,"edit":{"set_b64":b64(content)}})
}

pub fn take(key: &str) -> Value {
    json!({"op":"take_artifact","key":key})
}

pub fn serialize(key: &str) -> Value {
    json!({"op":"serialize_artifact_by_key","key":key})
}

pub fn record_entry(key: &str, entry: Value) -> Value {
    json!({"op":"record_dynamo_cache_entry","key":key,"entry":entry})
}

/// An entry of `f` (line 3, cpu) whose codes reference these backend ids.
pub fn entry_with_codes(codes: &[&[&str]]) -> Value {
    let codes: Vec<Value> = codes
        .iter()
        .map(|ids| json!({"backend_ids": ids}))
        .collect();
    json!({"fn_name":"f","fn_first_lineno":3,"device_type":"cpu","codes":codes})
}

/// The worked example's entry: codes [[b1,b2],[b3,b1]], fn f, line 3, cpu.
pub fn example_entry() -> Value {
    entry_with_codes(&[&["b1", "b2"], &["b3", "b1"]])
}

/// The worked example of `reference/SEMANTICS.md`, 9 requests: answer 4 (an edit of a
/// missing key) fails, 6 serializes `b2` (`bbb!`), 7 serializes a missing key, 8 stitches.
pub fn worked_example() -> Vec<Value> {
    vec![
        record("b1", "aaa"),
        record("b2", "bbb"),
        record("b1", "ccc"),
        append("b2", "!"),
        append("nope", "!"),
        record_entry("e1", example_entry()),
        serialize("b2"),
        serialize("zz"),
        stitch(),
    ]
}

/// Every kind of write and read around the worked example, 19 requests; the second entry
/// `e2` (of `g`) carries `payload`. Answer 4 (an edit of a missing key) and answer 15 (a load
/// of `zz`) fail; answer 14 loads `e1` after a clear.
pub fn full_sequence(payload: &[u8]) -> Vec<Value> {
    let mut entry2 = example_entry();
    entry2["fn_name"] = json!("g");
    entry2["codes"] = json!([{"backend_ids":["b2"],"payload_b64":b64(payload)}]);
    // The worked example's writes, then more.
    let mut requests = worked_example()[..6].to_vec();
    requests.extend([
        record_entry("e2", entry2),
        serialize("b2"),
        json!({"op":"create_cache_entries","id":"stitch-1"}),
        save(),
        take("b1"),
        take("b1"),
        dump(),
        op("clear"),
        load("e1"),
        load("zz"),
        record("b3", "ddd"),
        stitch(),
        dump(),
    ]);
    requests
}

/// A request with nothing but its op.
pub fn op(name: &str) -> Value {
    json!({ "op": name })
}

pub fn stitch() -> Value {
    op("create_cache_entries")
}

pub fn save() -> Value {
    op("save_to_dynamo_cache")
}

pub fn load(key: &str) -> Value {
    json!({"op":"load_cache_entry","key":key})
}

pub fn dump() -> Value {
    op("dump_debug_info")
}

// ---------------------------------------------------------------------------------------------
// answers

pub fn assert_ok(answer: &Value) {
    assert_eq!(answer["ok"], json!(true), "expected success: {answer}");
}

/// Checks a failure answer's kind; gives its message.
pub fn assert_failed(answer: &Value, kind: &str) -> String {
    assert_eq!(answer["ok"], json!(false), "expected a failure: {answer}");
    assert_eq!(answer["error"]["kind"], json!(kind), "{answer}");
    answer["error"]["message"]
        .as_str()
        .expect("a message")
        .to_string()
}

/// An answer's artifact content, or `None` for `"artifact": null`.
pub fn content_of(answer: &Value) -> Option<Vec<u8>> {
    assert_ok(answer);
    let artifact = &answer["artifact"];
    if artifact.is_null() {
        return None;
    }
    Some(unb64(&artifact["content_b64"]))
}

// ---------------------------------------------------------------------------------------------
// pcx batch

/// Runs `cmd` (a `pcx … batch`) over `requests`: it must exit 0 and answer each request.
/// Gives the answers and the run. (Its stderr is not searched for panics: a plugin's panic,
/// caught, is logged there.)
pub fn batch_with(cmd: Command, requests: &[Value]) -> (Vec<Value>, Run) {
    let out = run(cmd, lines(requests).as_bytes());
    out.assert_success();
    let answers = one_answer_each(&out, requests);
    (answers, out)
}

/// `pcx --data-dir DIR batch` over raw `input`, with more environment variables: it must exit
/// 0 and not panic. Gives the run.
pub fn batch_raw(dir: &Path, input: &str, env: &[(&str, &str)]) -> Run {
    let mut cmd = pcx(dir, &["batch"]);
    cmd.envs(env.iter().copied());
    let out = run(cmd, input.as_bytes());
    out.assert_no_panic();
    out.assert_success();
    out
}

/// `pcx --data-dir DIR batch` over `requests`: it must exit 0, not panic, and answer each
/// request. Gives the answers.
pub fn batch(dir: &Path, requests: &[Value]) -> Vec<Value> {
    let out = batch_raw(dir, &lines(requests), &[]);
    one_answer_each(&out, requests)
}

fn one_answer_each(out: &Run, requests: &[Value]) -> Vec<Value> {
    let answers = out.answers();
    assert_eq!(
        answers.len(),
        requests.len(),
        "one answer per request: {answers:#?}\nstderr: {}",
        out.stderr
    );
    answers
}

// ---------------------------------------------------------------------------------------------
// single-shot commands

/// `pcx --data-dir DIR ARGS…` (no stdin); it must not panic. Gives its run.
pub fn cli(dir: &Path, args: &[&str]) -> Run {
    let out = run(pcx(dir, args), b"");
    out.assert_no_panic();
    out
}

/// A command that must succeed with one JSON line; gives it.
pub fn cli_value(dir: &Path, args: &[&str]) -> Value {
    cli(dir, args).assert_success().answer()
}

/// A command that must succeed with one `"ok": true` answer; gives it.
pub fn cli_ok(dir: &Path, args: &[&str]) -> Value {
    let answer = cli_value(dir, args);
    assert_ok(&answer);
    answer
}

/// A command that must succeed; gives its JSON lines (possibly none).
pub fn cli_lines(dir: &Path, args: &[&str]) -> Vec<Value> {
    cli(dir, args).assert_success().answers()
}

/// A command that must fail with exit 1 and `{"ok":false,"error":{"kind":KIND,…}}`; gives
/// the message, which must not be empty.
pub fn cli_error(dir: &Path, args: &[&str], kind: &str) -> String {
    let run = cli(dir, args);
    assert_eq!(
        run.status.code(),
        Some(1),
        "pcx {args:?} should exit 1; stdout: {}\nstderr: {}",
        run.stdout,
        run.stderr
    );
    let answer = run.answer();
    assert_eq!(answer["ok"], json!(false), "pcx {args:?}: {answer}");
    assert_eq!(
        answer["error"]["kind"],
        json!(kind),
        "pcx {args:?}: {answer}"
    );
    let message = answer["error"]["message"].as_str().unwrap_or_default();
    assert!(!message.is_empty(), "pcx {args:?}: no message: {answer}");
    message.to_string()
}
