//! Client request ids: a request may carry `"request_id"`, and a retry of it (after a lost
//! answer, a restart, or a takeover of the journal) is answered `already_applied` instead of
//! being applied twice, on the wire as the library sees it, across restarts and snapshots.

mod common;

use common::protocol::{batch, cli_lines, record, take};
use serde_json::{json, Value};

fn with_id(mut request: Value, id: &str) -> Value {
    request["request_id"] = json!(id);
    request
}

fn events(dir: &std::path::Path) -> Vec<Value> {
    cli_lines(dir, &["log"])
}

#[test]
fn a_retried_request_is_answered_already_applied_and_applied_once() {
    let dir = tempfile::tempdir().expect("a directory");
    let answers = batch(
        dir.path(),
        &[
            with_id(record("a", "first"), "req-1"),
            // The retry comes in the same group as the first, before it is durable.
            with_id(record("a", "first"), "req-1"),
            with_id(take("a"), "req-2"),
            with_id(take("a"), "req-2"),
        ],
    );
    assert_eq!(answers[0]["ok"], true, "{}", answers[0]);
    assert!(answers[0]["seq"].is_u64(), "{}", answers[0]);
    assert_eq!(
        answers[1],
        json!({"ok": true, "already_applied": true, "request_id": "req-1"})
    );
    assert_eq!(answers[2]["ok"], true);
    assert!(
        !answers[2]["artifact"].is_null(),
        "the take took it: {}",
        answers[2]
    );
    assert_eq!(
        answers[3]["already_applied"], true,
        "a second take is not applied: {}",
        answers[3]
    );
    let log = events(dir.path());
    assert_eq!(log.len(), 2, "one event per request id: {log:#?}");
    assert_eq!(log[0]["request_id"], "req-1");
    assert_eq!(log[1]["request_id"], "req-2");
}

#[test]
fn a_retry_after_a_restart_is_still_already_applied() {
    let dir = tempfile::tempdir().expect("a directory");
    let first = batch(dir.path(), &[with_id(record("k", "v1"), "job-7:rec-k")]);
    assert_eq!(first[0]["ok"], true);
    // A new process replays the log (and, on the second retry, a snapshot).
    let again = batch(dir.path(), &[with_id(record("k", "v1"), "job-7:rec-k")]);
    assert_eq!(again[0]["already_applied"], true, "{}", again[0]);
    let snapshotted = common::protocol::batch_raw(
        dir.path(),
        &format!("{}\n", with_id(record("other", "x"), "job-7:rec-other")),
        &[("PCX_SNAPSHOT_EVERY", "1")],
    );
    assert!(
        snapshotted.stdout.contains("\"ok\":true"),
        "{}",
        snapshotted.stdout
    );
    let third = batch(dir.path(), &[with_id(record("k", "v1"), "job-7:rec-k")]);
    assert_eq!(third[0]["already_applied"], true, "{}", third[0]);
    let state = common::protocol::cli_value(dir.path(), &["state", "--key", "k"]);
    assert_eq!(
        state["artifact"]["content_b64"],
        common::protocol::b64("v1"),
        "the first write stands: {state}"
    );
    assert_eq!(events(dir.path()).len(), 2);
}

/// Regression: a request id reused for another request (other content, another key, another
/// op or context) was answered `already_applied`, so the client took a change that was never
/// made for done. Now it is refused `request_id_reused`, naming the id, and nothing is applied;
/// the same request retried is still `already_applied`, across a restart and a snapshot too.
#[test]
fn a_request_id_reused_for_another_request_is_refused_not_answered_already_applied() {
    let dir = tempfile::tempdir().expect("a directory");
    let answers = batch(
        dir.path(),
        &[
            with_id(record("a", "first"), "r1"),
            // The same id with other content, in the same group.
            with_id(record("a", "second"), "r1"),
            // ... for another key, and for another op.
            with_id(record("b", "first"), "r1"),
            with_id(take("a"), "r1"),
            // The request itself, retried: already applied.
            with_id(record("a", "first"), "r1"),
        ],
    );
    assert_eq!(answers[0]["ok"], true, "{}", answers[0]);
    for answer in &answers[1..4] {
        assert_eq!(answer["ok"], false, "{answer}");
        assert_eq!(answer["error"]["kind"], "request_id_reused", "{answer}");
        let message = answer["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains("r1"), "names the id: {message}");
    }
    assert_eq!(answers[4]["already_applied"], true, "{}", answers[4]);
    // In another context, the same request is another request.
    let mut elsewhere = with_id(record("a", "first"), "r1");
    elsewhere["context"] = json!("job-2");
    // After a restart, and after a snapshot.
    let again = batch(
        dir.path(),
        &[
            with_id(record("a", "third"), "r1"),
            elsewhere,
            with_id(record("a", "first"), "r1"),
        ],
    );
    assert_eq!(
        again[0]["error"]["kind"], "request_id_reused",
        "{}",
        again[0]
    );
    assert_eq!(
        again[1]["error"]["kind"], "request_id_reused",
        "{}",
        again[1]
    );
    assert_eq!(again[2]["already_applied"], true, "{}", again[2]);
    let snapshotted = common::protocol::batch_raw(
        dir.path(),
        &format!("{}\n", with_id(record("other", "x"), "r2")),
        &[("PCX_SNAPSHOT_EVERY", "1")],
    );
    assert!(
        snapshotted.stdout.contains("\"ok\":true"),
        "{}",
        snapshotted.stdout
    );
    let third = batch(
        dir.path(),
        &[
            with_id(record("a", "fourth"), "r1"),
            with_id(record("a", "first"), "r1"),
        ],
    );
    assert_eq!(
        third[0]["error"]["kind"], "request_id_reused",
        "{}",
        third[0]
    );
    assert_eq!(third[1]["already_applied"], true, "{}", third[1]);
    let state = common::protocol::cli_value(dir.path(), &["state", "--key", "a"]);
    assert_eq!(
        state["artifact"]["content_b64"],
        common::protocol::b64("first"),
        "only the first write was applied: {state}"
    );
    assert_eq!(events(dir.path()).len(), 2, "nothing else was applied");
}

#[test]
fn requests_without_an_id_or_with_another_id_are_applied_as_always() {
    let dir = tempfile::tempdir().expect("a directory");
    let answers = batch(
        dir.path(),
        &[
            record("a", "x"),
            record("a", "x"),
            with_id(record("a", "x"), "r1"),
            with_id(record("a", "x"), "r2"),
        ],
    );
    assert!(
        answers
            .iter()
            .all(|a| a["ok"] == true && a.get("already_applied").is_none()),
        "{answers:#?}"
    );
    assert_eq!(events(dir.path()).len(), 4);
}

#[test]
fn a_malformed_request_id_is_refused_naming_the_field() {
    let dir = tempfile::tempdir().expect("a directory");
    for bad in [json!(7), json!(""), json!("x".repeat(257))] {
        let mut request = record("a", "x");
        request["request_id"] = bad.clone();
        let answer = &batch(dir.path(), &[request])[0];
        assert_eq!(answer["ok"], false, "{bad}: {answer}");
        let message = answer["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains("request_id"), "{bad}: {message}");
    }
    assert!(events(dir.path()).is_empty(), "nothing was applied");
}

/// Regression: the audit queries read the change inside a request's id (history and diff
/// missed a change made under a request id).
#[test]
fn a_change_made_under_a_request_id_is_seen_by_history_and_diff() {
    use common::protocol::{example_entry, record_entry, save};
    let dir = tempfile::tempdir().expect("a directory");
    let answers = batch(
        dir.path(),
        &[
            with_id(record("b1", "aaa"), "r-b1"),
            with_id(record("b2", "bbb"), "r-b2"),
            with_id(record("b3", "ccc"), "r-b3"),
            with_id(record_entry("e1", example_entry()), "r-e1"),
            with_id(save(), "r-save"),
            with_id(take("b3"), "r-take"),
        ],
    );
    assert!(answers.iter().all(|a| a["ok"] == true), "{answers:#?}");
    let history = cli_lines(dir.path(), &["history", "b1"]);
    assert!(
        history.iter().any(|l| l["content"]["size"] == 3),
        "history shows the record made under a request id: {history:#?}"
    );
    let diff = common::protocol::cli_value(dir.path(), &["diff", "--from", "3", "--to", "6"]);
    assert!(
        diff.to_string().contains("taken"),
        "diff shows the take made under a request id: {diff}"
    );
    // The data directory's cache view holds the saved entry: opening finds nothing to
    // rewrite, and a load in a new process hits.
    let loaded = batch(dir.path(), &[common::protocol::load("e1")]);
    assert_eq!(loaded[0]["ok"], true, "{}", loaded[0]);
    let view = pcx::store::sled_journal::SledJournal::open(dir.path(), 4 << 20).expect("opens");
    let keys: Vec<String> = pcx::store::journal::Journal::cache_view(&view)
        .expect("the view")
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(keys, vec!["e1".to_string()]);
}

/// Regression: a take whose answer was lost (a broken connection, a holder that lost its
/// lease) and was retried under its request id was answered only `already_applied`: the
/// artifact was gone from the context and reached no one. Now the retry carries the artifact
/// the first take took, read back from the log (in the request's own context, across a
/// restart, and with the key recorded again since); once a compaction has dropped that take,
/// plain `already_applied`.
#[test]
fn a_retried_take_hands_over_the_artifact_the_first_take_took() {
    let dir = tempfile::tempdir().expect("a directory");
    let mut in_c = with_id(take("a"), "take-c");
    in_c["context"] = json!("c");
    let mut record_in_c = record("a", "in c");
    record_in_c["context"] = json!("c");
    let answers = batch(
        dir.path(),
        &[
            record("a", "first"),
            record_in_c,
            with_id(take("a"), "take-1"),
            // The retry in the same group as the first, before it is durable.
            with_id(take("a"), "take-1"),
            in_c.clone(),
            // The key recorded again after the take: the retry still gets what was taken.
            record("a", "second"),
            with_id(take("a"), "take-1"),
        ],
    );
    let first = &answers[2];
    assert_eq!(
        first["artifact"]["content_b64"],
        common::protocol::b64("first"),
        "{first}"
    );
    for retry in [&answers[3], &answers[6]] {
        assert_eq!(retry["already_applied"], true, "{retry}");
        assert_eq!(retry["artifact"], first["artifact"], "{retry}");
    }
    assert_eq!(
        answers[4]["artifact"]["content_b64"],
        common::protocol::b64("in c"),
        "{}",
        answers[4]
    );
    // A new process replays the log; each retry gets its own take's artifact.
    let again = batch(dir.path(), &[with_id(take("a"), "take-1"), in_c]);
    assert_eq!(again[0]["already_applied"], true, "{}", again[0]);
    assert_eq!(again[0]["artifact"], first["artifact"], "{}", again[0]);
    assert_eq!(again[1]["already_applied"], true, "{}", again[1]);
    assert_eq!(again[1]["artifact"], answers[4]["artifact"], "{}", again[1]);
    // Taken once: "second" is still there.
    let state = common::protocol::cli_value(dir.path(), &["state", "--key", "a"]);
    assert_eq!(
        state["artifact"]["content_b64"],
        common::protocol::b64("second"),
        "{state}"
    );
    // Compacted away: the id is still remembered, the take no longer in the log.
    common::protocol::cli_value(dir.path(), &["compact", "--before", "5"]);
    let compacted = batch(dir.path(), &[with_id(take("a"), "take-1")]);
    assert_eq!(
        compacted[0],
        json!({"ok": true, "already_applied": true, "request_id": "take-1"})
    );
}
