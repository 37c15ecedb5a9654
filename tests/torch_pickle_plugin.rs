//! The torch-pickle plugin (`plugins/torch-pickle`) served by pcx: PyTorch's bundled
//! AOTAutograd artifact, as `pcx.torch` records it (a real one, made by `torch.compile`),
//! loads with a description naming its class; a pickle of another class recorded under that
//! kind is refused at record, naming what it is; the generic `torch.pickle` kind takes it.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use serde_json::{json, Value};

mod common;
use common::protocol::*;
use common::{build_cdylib, pcx, repo, scratch};

fn torch_pickle() -> &'static Path {
    static LIB: OnceLock<PathBuf> = OnceLock::new();
    LIB.get_or_init(|| {
        build_cdylib(
            &repo().join("plugins/torch-pickle/Cargo.toml"),
            &scratch().join("torch-pickle"),
        )
    })
}

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(
        repo()
            .join("plugins/torch-pickle/tests/fixtures")
            .join(name),
    )
    .unwrap()
}

#[test]
fn torchs_bundled_artifact_loads_through_the_plugin_and_a_wrong_class_is_refused_at_record() {
    let tmp = tempfile::tempdir().unwrap();
    let plugins = tmp.path().join("plugins");
    std::fs::create_dir(&plugins).unwrap();
    std::fs::set_permissions(&plugins, std::fs::Permissions::from_mode(0o755)).unwrap();
    let lib = plugins.join("libtorch_pickle.so");
    std::fs::copy(torch_pickle(), &lib).unwrap();
    std::fs::set_permissions(&lib, std::fs::Permissions::from_mode(0o755)).unwrap();
    let data = tmp.path().join("data");
    let cmd = pcx(&data, &["--plugin-dir", plugins.to_str().unwrap(), "batch"]);
    let bundled = fixture("bundled.pickle");
    let date = fixture("date_p4.pickle");
    let (answers, _) = batch_with(
        cmd,
        &[
            record_kind("b1", "torch.bundled_aot_autograd", &bundled),
            record_kind("d1", "torch.bundled_aot_autograd", &date),
            record_kind("d2", "torch.pickle", &date),
            record_entry("e1", entry_with_codes(&[&["b1"]])),
            record_entry("e3", entry_with_codes(&[&["d2"]])),
            save(),
            load("e1"),
            load("e3"),
            json!({"op":"log","event":"ArtifactRecorded"}),
        ],
    );
    for i in [0, 2, 3, 4, 5] {
        assert_ok(&answers[i]);
    }
    // Not what its kind says: refused at record, naming what it is; nothing written.
    let message = assert_failed(&answers[1], "plugin_failed");
    assert!(message.contains("datetime.date"), "{message}");
    let described = |a: &Value, id: &str| a["deserialized"][id]["description"].clone();
    assert_ok(&answers[6]);
    let d = described(&answers[6], "b1");
    assert_eq!(
        d["class"],
        "torch._functorch._aot_autograd.aot_autograd_result.BundledAOTAutogradCacheArtifact"
    );
    assert_eq!(d["size"], bundled.len());
    // The ready-to-use bytes are the pickle itself, for torch to unpickle in Python.
    assert_eq!(
        unb64(&answers[6]["deserialized"]["b1"]["content_b64"]),
        bundled
    );
    assert_ok(&answers[7]);
    assert_eq!(described(&answers[7], "d2")["class"], "datetime.date");
    let recorded: Vec<&str> = answers[8]["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["keys"][0].as_str().unwrap())
        .collect();
    assert_eq!(recorded, ["b1", "d2"]);
}
