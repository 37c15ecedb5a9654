//! Named contexts (one per PyTorch process) and the shared dynamo cache's namespaces, through
//! `pcx batch`: what one context records another does not see; what one saves another loads
//! (and learns who saved it); namespaces keep their entries apart; each cache operation does
//! what it says and `get_cache_entry` changes nothing; a second process replays the same; the
//! audit commands show it; names are checked.

use serde_json::{json, Value};

mod common;
use common::protocol::*;

fn with(mut request: Value, context: &str, namespace: &str) -> Value {
    if !context.is_empty() {
        request["context"] = json!(context);
    }
    if !namespace.is_empty() {
        request["namespace"] = json!(namespace);
    }
    request
}

fn events(dir: &std::path::Path) -> usize {
    let answers = batch(dir, &[json!({"op":"log"})]);
    answers[0]["events"].as_array().map_or(0, Vec::len)
}

#[test]
fn contexts_are_apart_and_an_unknown_one_reads_empty() {
    let dir = tempfile::tempdir().unwrap();
    let answers = batch(
        dir.path(),
        &[
            with(record("b1", "in A"), "A", ""),
            with(record("b1", "in B"), "B", ""),
            record("b1", "in default"),
            with(serialize("b1"), "A", ""),
            with(serialize("b1"), "B", ""),
            serialize("b1"),
            with(serialize("b1"), "never-written", ""),
            with(dump(), "never-written", ""),
            op("list_contexts"),
        ],
    );
    for a in &answers {
        assert_ok(a);
    }
    let text = |a: &Value| unb64_text(&a["artifact"]["content_b64"]);
    assert_eq!(text(&answers[3]), "in A");
    assert_eq!(text(&answers[4]), "in B");
    assert_eq!(text(&answers[5]), "in default");
    assert_eq!(answers[6]["artifact"], Value::Null);
    assert_eq!(answers[7]["debug_info"], json!({}));
    let names: Vec<&str> = answers[8]["contexts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["default", "A", "B"]);
}

#[test]
fn what_one_context_saves_another_loads_and_learns_who_saved_it() {
    let dir = tempfile::tempdir().unwrap();
    let answers = batch(
        dir.path(),
        &[
            with(record("b1", "compiled"), "A", "ns1"),
            with(record_entry("e1", entry_with_codes(&[&["b1"]])), "A", "ns1"),
            with(save(), "A", "ns1"),
            with(load("e1"), "B", "ns1"),
            with(serialize("b1"), "B", ""),
            with(load("e1"), "B", "ns2"),
            load("e1"),
            with(op("list_cache_entries"), "", "ns1"),
        ],
    );
    for i in [0, 1, 2, 3, 4, 7] {
        assert_ok(&answers[i]);
    }
    assert_eq!(
        answers[2]["saved"],
        json!(["e1"]),
        "save answers the keys it wrote"
    );
    assert_eq!(answers[3]["saved_by"], "A");
    assert_eq!(
        unb64_text(&answers[3]["entry"]["backends"]["b1"]["content_b64"]),
        "compiled"
    );
    // The load recorded the backends into B's own context, as torch's does.
    assert_eq!(
        unb64_text(&answers[4]["artifact"]["content_b64"]),
        "compiled"
    );
    // Another namespace, and the default one, do not have it.
    assert_failed(&answers[5], "package_not_found");
    assert_failed(&answers[6], "package_not_found");
    let listed = answers[7]["entries"].as_array().unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (&listed[0]["key"], &listed[0]["saved_by"]),
        (&json!("e1"), &json!("A"))
    );
}

#[test]
fn cache_operations_do_what_they_say_and_get_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let entry = json!({
        "dynamo": entry_with_codes(&[&["b9"]]),
        "backends": {"b9": {"kind": "eager", "content_b64": b64("nine")}}
    });
    let put = with(
        json!({"op":"put_cache_entry","key":"e9","entry":entry}),
        "writer",
        "ns",
    );
    let get = with(json!({"op":"get_cache_entry","key":"e9"}), "", "ns");
    let answers = batch(dir.path(), &[put, get.clone(), json!({"op":"stats"})]);
    assert_ok(&answers[0]);
    let got = &answers[1]["entry"];
    assert_eq!(got["saved_by"], "writer");
    assert_eq!(unb64_text(&got["backends"]["b9"]["content_b64"]), "nine");
    // Getting is free of effects: no event, no counter.
    let before = events(dir.path());
    let again = batch(
        dir.path(),
        &[get.clone(), get.clone(), json!({"op":"stats"})],
    );
    assert_eq!(again[0], answers[1]);
    assert_eq!(events(dir.path()), before);
    let stats = &again[2]["stats"];
    assert_eq!(
        (&stats["dynamo_cache_hits"], &stats["dynamo_cache_misses"]),
        (&json!(0), &json!(0))
    );
    // A load counts; delete says whether there was one; clear says how many went.
    let answers = batch(
        dir.path(),
        &[
            with(load("e9"), "", "ns"),
            with(json!({"op":"delete_cache_entry","key":"e9"}), "", "ns"),
            with(json!({"op":"delete_cache_entry","key":"e9"}), "", "ns"),
            get.clone(),
            with(
                json!({"op":"put_cache_entry","key":"x","entry":{"dynamo":entry_with_codes(&[&[]]),"backends":{}}}),
                "",
                "ns",
            ),
            with(
                json!({"op":"put_cache_entry","key":"y","entry":{"dynamo":entry_with_codes(&[&[]]),"backends":{}}}),
                "",
                "ns",
            ),
            with(op("clear_dynamo_cache"), "", "ns"),
            with(op("list_cache_entries"), "", "ns"),
        ],
    );
    assert_ok(&answers[0]);
    assert_eq!(answers[1]["deleted"], true);
    assert_eq!(answers[2]["deleted"], false);
    assert_eq!(answers[3]["entry"], Value::Null);
    assert_eq!(answers[6]["cleared"], 2);
    assert_eq!(answers[7]["entries"], json!([]));
    // Every change is an event the log shows, with its namespace.
    let log = batch(dir.path(), &[json!({"op":"log"})]);
    let names: Vec<&str> = log[0]["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "CacheEntryPut",
            "EntryLoaded",
            "CacheEntryDeleted",
            "CacheEntryPut",
            "CacheEntryPut",
            "DynamoCacheCleared"
        ]
    );
    assert_eq!(log[0]["events"][1]["context"], "default");
    assert_eq!(log[0]["events"][1]["namespace"], "ns");
}

#[test]
fn drop_context_empties_it_and_a_new_process_replays_everything() {
    let dir = tempfile::tempdir().unwrap();
    let setup = [
        with(record("a", "1"), "P", ""),
        with(record("b", "2"), "Q", "nsQ"),
        with(record_entry("e", entry_with_codes(&[&["b"]])), "Q", "nsQ"),
        with(save(), "Q", "nsQ"),
        with(op("drop_context"), "P", ""),
    ];
    for a in batch(dir.path(), &setup) {
        assert_ok(&a);
    }
    let questions = [
        op("list_contexts"),
        with(dump(), "Q", ""),
        with(dump(), "P", ""),
        with(op("list_cache_entries"), "", "nsQ"),
        json!({"op":"state","at":3}),
    ];
    let first = batch(dir.path(), &questions);
    let second = batch(dir.path(), &questions);
    assert_eq!(
        first, second,
        "a second process replays to the same answers"
    );
    let names: Vec<&str> = first[0]["contexts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["default", "Q"], "P was dropped");
    assert_eq!(first[1]["debug_info"]["backends"], json!(["b"]));
    assert_eq!(first[2]["debug_info"], json!({}));
    assert_eq!(first[3]["entries"][0]["saved_by"], "Q");
    // `pcx verify` passes over scoped events.
    cli(dir.path(), &["verify"]).assert_success();
}

#[test]
fn bad_names_are_refused_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let answers = batch(
        dir.path(),
        &[
            with(record("k", "v"), "a/b", ""),
            with(record("k", "v"), "", "has space"),
            json!({"op":"dump_debug_info","context":7}),
            dump(),
        ],
    );
    let m = assert_failed(&answers[0], "invalid_request");
    assert!(m.contains("`context`"), "{m}");
    let m = assert_failed(&answers[1], "invalid_request");
    assert!(m.contains("`namespace`"), "{m}");
    assert_failed(&answers[2], "invalid_request");
    assert_eq!(answers[3]["debug_info"], json!({}), "nothing was recorded");
}
