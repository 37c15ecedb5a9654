//! A process that embeds pcx and changes its working directory after opening a context on a
//! relative data directory (`data_dir = "pcx-data"`, the default). Alone in its test binary:
//! the working directory is the whole process's.

use std::path::Path;

mod common;
use common::library::*;

/// Before, the data directory was kept as given: files pcx opens later (content files for
/// reading, the next content file, sled's own files for large values) were looked for under the
/// new working directory, so reads failed and writes could land in another directory that
/// happened to have the same relative path. Now the path is made absolute when the context
/// opens.
#[test]
fn a_context_on_a_relative_data_directory_keeps_its_files_after_the_process_changes_directory() {
    if suite_on_postgres() {
        println!("skipped on postgres: no data directory holds the log");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (first, second) = (tmp.path().join("first"), tmp.path().join("second"));
    // The same relative path under the second directory, where nothing may be written.
    std::fs::create_dir_all(second.join("data/content")).unwrap();
    std::fs::create_dir_all(&first).unwrap();
    std::env::set_current_dir(&first).unwrap();
    let contents: Vec<(String, Vec<u8>)> = (0..6)
        .map(|i| {
            (
                format!("k{i}"),
                format!("content {i}").repeat(10_000).into_bytes(),
            )
        })
        .collect();
    block_on(async {
        let ctx = open(&config(Path::new("data"), 2));
        for (key, content) in &contents[..3] {
            ctx.record_artifact(artifact(key, content)).await.unwrap();
        }
        std::env::set_current_dir(&second).unwrap();
        for (key, content) in &contents[3..] {
            ctx.record_artifact(artifact(key, content)).await.unwrap();
        }
        for (key, content) in &contents {
            let read = ctx.serialize_artifact_by_key(key.as_str()).await;
            let read = read.unwrap_or_else(|e| panic!("reading {key}: {e}"));
            let artifact = read.value.unwrap_or_else(|| panic!("{key} is missing"));
            assert_eq!(&artifact.content, content, "{key}");
        }
        ctx.close().await.unwrap();
    });
    let decoy: Vec<_> = walk(&second.join("data"));
    assert_eq!(
        decoy,
        [second.join("data/content")],
        "written in the wrong directory"
    );
    let journal = open_journal(&first.join("data"));
    let verified = pcx::audit::query::verify(&journal, &mut |_| {})
        .unwrap()
        .expect("the log verifies");
    assert_eq!(verified["events"], serde_json::json!(6), "{verified}");
}

/// Every path under `dir`, itself excluded, sorted.
fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(walk(&path));
        }
        out.push(path);
    }
    out.sort();
    out
}
