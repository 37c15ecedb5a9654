//! The plugin system, loaded the way a user loads it: the tests build the example plugin
//! `plugins/aot-bundle`, a fixture plugin written with the SDK (`tests/fixtures/plugins/misbehaving`)
//! and a plugin written in C (`tests/fixtures/plugins/c/fixture.c`, with one hostile variant per
//! rule of the ABI), copy them into a fresh plugin directory per test, and run them through the
//! registry ([`Kinds::load`], [`loader::load`]) or the real binary (`pcx batch`, `pcx plugins`).
//!
//! Rust fixtures are built once per test binary with `$CARGO build --message-format=json` into
//! their own target directories under `CARGO_TARGET_TMPDIR` (the main one is locked while
//! `cargo test` runs); the cdylib is taken from cargo's `compiler-artifact` messages. C fixtures
//! are built with `cc` (or `$CC`) for [`HOST_TARGET`]. A fixture that crashes while loading is
//! only ever loaded by the `pcx` binary, which loads every library first in a child process.
//!
//! pcx refuses plugin files and directories that anyone but its user or root could write, so
//! the test directories are given plain modes (0755 directories and libraries, 0644 other
//! files) whatever the umask.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use pcx::plugins::kinds::Kinds;
use pcx::plugins::loader::{self, PluginError, HOST_TARGET};
use pcx::ContextError;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tempfile::TempDir;

mod common;
use common::protocol::*;
use common::*;

/// The SDK fixture `misbehaving` 0.3.1 (kinds `fixture_panic`, `fixture_error`,
/// `fixture_flood`, `fixture_echo`; edits `panic`, `flood`, `fail`).
fn misbehaving() -> &'static Path {
    static LIB: OnceLock<PathBuf> = OnceLock::new();
    LIB.get_or_init(|| {
        build_cdylib(
            &fixtures().join("misbehaving/Cargo.toml"),
            &scratch().join("misbehaving"),
        )
    })
}

/// The C fixtures: a file name stem and the `-D` flags selecting the variant.
const C_FIXTURES: &[(&str, &[&str])] = &[
    ("c_upper", &[]),
    (
        "c_upper_dup",
        &[
            r#"-DPLUGIN_NAME="c-upper-dup""#,
            r#"-DKIND="c_unique""#,
            r#"-DKIND2="c_upper""#,
        ],
    ),
    (
        "c_eager",
        &[
            r#"-DPLUGIN_NAME="c-eager""#,
            r#"-DKIND="c_also""#,
            r#"-DKIND2="eager""#,
        ],
    ),
    ("no_entry", &["-DNO_ENTRY"]),
    ("null_entry", &["-DNULL_ENTRY"]),
    ("bad_magic", &["-DBAD_MAGIC"]),
    ("small_struct", &["-DSMALL_STRUCT_SIZE"]),
    ("abi_major_2", &["-DABI_MAJOR_2"]),
    ("wrong_target", &["-DWRONG_TARGET"]),
    ("null_describe", &["-DNULL_DESCRIBE"]),
    ("null_edit", &["-DNULL_EDIT"]),
    ("huge_kind_count", &["-DHUGE_KIND_COUNT"]),
    ("huge_name_len", &["-DHUGE_NAME_LEN"]),
    ("non_utf8_kind", &["-DNON_UTF8_KIND"]),
    ("bad_kind_name", &["-DBAD_KIND_NAME"]),
    ("ctor_segv", &["-DCTOR_SEGV"]),
    ("ctor_abort", &["-DCTOR_ABORT"]),
    ("ctor_loop", &["-DCTOR_LOOP"]),
    (
        "c_null_sink",
        &[
            r#"-DPLUGIN_NAME="c-null-sink""#,
            r#"-DKIND="c_null_sink""#,
            "-DNULL_SINK_PTR",
        ],
    ),
    (
        "c_chatty",
        &[
            r#"-DPLUGIN_NAME="c-chatty""#,
            r#"-DKIND="c_chatty""#,
            "-DCTOR_PRINTF",
        ],
    ),
    (
        "c_kind_twice",
        &[
            r#"-DPLUGIN_NAME="c-kind-twice""#,
            r#"-DKIND="c_twice""#,
            r#"-DKIND2="c_twice""#,
        ],
    ),
    (
        "c_hang",
        &[r#"-DPLUGIN_NAME="c-hang""#, r#"-DKIND="c_hang""#, "-DHANG"],
    ),
];

/// The C fixtures, built once: stem → library.
fn c_fixtures() -> &'static BTreeMap<&'static str, PathBuf> {
    static LIBS: OnceLock<BTreeMap<&'static str, PathBuf>> = OnceLock::new();
    LIBS.get_or_init(|| {
        let out_dir = scratch().join("c");
        std::fs::create_dir_all(&out_dir).unwrap();
        let source = fixtures().join("c/fixture.c");
        let include = repo().join("plugins/pcx-plugin-abi/include");
        let cc = std::env::var_os("CC").unwrap_or_else(|| OsString::from("cc"));
        C_FIXTURES
            .iter()
            .map(|&(stem, defines)| {
                let out = out_dir.join(format!("lib{stem}.{}", std::env::consts::DLL_EXTENSION));
                let mut cmd = Command::new(&cc);
                cmd.args(["-shared", "-fPIC", "-Wall"])
                    .arg("-I")
                    .arg(&include)
                    .arg(format!("-DTARGET=\"{HOST_TARGET}\""))
                    .args(defines)
                    .arg(&source)
                    .arg("-o")
                    .arg(&out);
                let built = run(cmd, b"");
                assert!(
                    built.status.success(),
                    "cc failed for {stem}: {}",
                    built.stderr
                );
                (stem, out)
            })
            .collect()
    })
}

fn c_fixture(stem: &str) -> &'static Path {
    c_fixtures()
        .get(stem)
        .unwrap_or_else(|| panic!("no C fixture {stem}"))
}

// ---------------------------------------------------------------------------------------------
// a test's directories

/// A fresh plugin directory and data directory.
struct Setup {
    tmp: TempDir,
}

impl Setup {
    fn new() -> Setup {
        let tmp = tempfile::tempdir().expect("a temporary directory");
        std::fs::create_dir(tmp.path().join("plugins")).unwrap();
        chmod(&tmp.path().join("plugins"), 0o755);
        Setup { tmp }
    }

    fn plugins(&self) -> PathBuf {
        self.tmp.path().join("plugins")
    }

    fn plugins_arg(&self) -> String {
        self.plugins().to_str().expect("a UTF-8 path").to_string()
    }

    fn data(&self) -> PathBuf {
        self.tmp.path().join("data")
    }

    /// Copies `library` into the plugin directory as `file`; gives its canonical path.
    fn install(&self, library: &Path, file: &str) -> PathBuf {
        let to = self.plugins().join(file);
        std::fs::copy(library, &to)
            .unwrap_or_else(|e| panic!("copying {} to {}: {e}", library.display(), to.display()));
        chmod(&to, 0o755);
        to.canonicalize().unwrap()
    }

    /// Installs the C fixture `stem` as `lib{stem}.so`.
    fn c(&self, stem: &str) -> PathBuf {
        self.install(c_fixture(stem), &format!("lib{stem}.so"))
    }

    /// Writes `bytes` into the plugin directory as `file`.
    fn write(&self, file: &str, bytes: &[u8]) -> PathBuf {
        let to = self.plugins().join(file);
        std::fs::write(&to, bytes).unwrap();
        chmod(&to, 0o644);
        to.canonicalize().unwrap()
    }

    /// `pcx --data-dir DATA ARGS…`, with an environment free of the caller's `PCX_*`.
    fn pcx(&self, args: &[&str]) -> Command {
        pcx(&self.data(), args)
    }

    /// `pcx --plugin-dir PLUGINS ARGS…`.
    fn pcx_plugins(&self, args: &[&str]) -> Command {
        let dir = self.plugins_arg();
        let mut all = vec!["--plugin-dir", dir.as_str()];
        all.extend_from_slice(args);
        self.pcx(&all)
    }
}

/// Sets a file's or directory's mode.
fn chmod(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {mode:o} {}: {e}", path.display()));
}

// ---------------------------------------------------------------------------------------------
// requests and answers

fn plugin_edit(key: &str, op: &str, args: &[u8]) -> Value {
    json!({"op":"edit_artifact","key":key,"edit":{"plugin":{"op":op,"args_b64":b64(args)}}})
}

/// `record_dynamo_cache_entry` of an entry of `forward` (line 7, cpu) with one code, of
/// module `model`, referencing `backends`.
fn record_forward(key: &str, backends: &[&str]) -> Value {
    record_entry(
        key,
        json!({"fn_name":"forward","fn_first_lineno":7,"device_type":"cpu",
               "codes":[{"backend_ids":backends,"python_module":"model"}]}),
    )
}

fn assert_contains(text: &str, parts: &[&str]) {
    for part in parts {
        assert!(text.contains(part), "`{part}` is not in: {text}");
    }
}

// ---------------------------------------------------------------------------------------------
// the registry

/// Checks that `kinds` serves the working C plugin's `c_upper` and the built-in `eager`.
fn assert_c_upper_serves(kinds: &Kinds) {
    let d = kinds
        .after_deserialization("b1", "c_upper", b"abc")
        .expect("c_upper is served");
    assert_eq!(d.served_by, "c-upper");
    assert_eq!(d.content, b"ABC");
    assert_eq!(d.description.value(), json!({"len": 3}));
    let d = kinds
        .after_deserialization("b2", "eager", b"xyz")
        .expect("eager is served");
    assert_eq!(
        (d.served_by.as_str(), d.content.as_slice()),
        ("builtin", &b"xyz"[..])
    );
}

/// Loads a plugin directory holding the working C plugin and the C fixture `stem`: the fixture
/// must be refused with exactly one problem naming its file, and the working plugin still
/// serves. Gives the fixture's path and the problem.
fn refused_beside_good(stem: &str) -> (PathBuf, PluginError) {
    let s = Setup::new();
    s.c("c_upper");
    let bad = s.c(stem);
    let kinds = Kinds::load(&s.plugins(), usize::MAX);
    let problems = kinds.problems();
    assert_eq!(problems.len(), 1, "one problem: {problems:#?}");
    let text = problems[0].to_string();
    assert_contains(&text, &[&bad.display().to_string()]);
    let names: Vec<&str> = kinds.plugins().iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["c-upper"]);
    assert_c_upper_serves(&kinds);
    (bad, problems[0].clone())
}

// ---------------------------------------------------------------------------------------------
// 1. a plugin written in C, end to end

#[test]
fn a_plugin_written_in_c_serves_its_kind_end_to_end() {
    let s = Setup::new();
    s.c("c_upper");
    let (answers, _) = batch_with(
        s.pcx_plugins(&["batch"]),
        &[
            record_kind("c1", "c_upper", b"hello"),
            plugin_edit("c1", "append", b", world"),
            record_kind("e1", "eager", b"eager bytes"),
            record_forward("fwd", &["c1", "e1"]),
            save(),
            load("fwd"),
            serialize("c1"),
            plugin_edit("c1", "nope", b""),
        ],
    );
    for a in &answers[..7] {
        assert_ok(a);
    }
    let loaded = &answers[5];
    let c1 = &loaded["deserialized"]["c1"];
    assert_eq!(c1["kind"], "c_upper", "{loaded}");
    assert_eq!(c1["plugin"], "c-upper", "{loaded}");
    assert_eq!(c1["description"], json!({"len": 12}), "{loaded}");
    assert_eq!(unb64(&c1["content_b64"]), b"HELLO, WORLD");
    // The entry carries the stored bytes; only the deserialized form is the plugin's.
    assert_eq!(
        unb64(&loaded["entry"]["backends"]["c1"]["content_b64"]),
        b"hello, world"
    );
    let e1 = &loaded["deserialized"]["e1"];
    assert_eq!(
        (&e1["kind"], &e1["plugin"]),
        (&json!("eager"), &json!("builtin"))
    );
    assert_eq!(unb64(&e1["content_b64"]), b"eager bytes");
    assert_eq!(
        unb64(&answers[6]["artifact"]["content_b64"]),
        b"hello, world"
    );
    let message = assert_failed(&answers[7], "no_such_edit");
    assert_contains(&message, &["c-upper", "nope", "append"]);
}

/// Regression: a library overwritten in place while pcx had it loaded (`cp new.so
/// plugins/lib.so`, or a build writing into the plugin directory) changed the code pcx was
/// running: the next call executed whatever bytes were there now, and the process died
/// (SIGILL or SIGSEGV), dropping every client. Now pcx runs a private copy of the bytes it
/// loaded, so the file on disk can change under it: the running process serves on with the
/// plugin it started with, and the next start loads the new file.
#[test]
fn a_plugin_library_overwritten_in_place_while_loaded_does_not_crash_pcx() {
    use std::io::{BufRead, BufReader, Write};
    use std::process::Stdio;

    let s = Setup::new();
    let installed = s.c("c_upper");
    let mut child = s
        .pcx_plugins(&["batch"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("pcx batch starts");
    let mut stdin = child.stdin.take().expect("stdin");
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
    let mut ask = |request: Value| -> Value {
        writeln!(stdin, "{request}").expect("write a request");
        stdin.flush().expect("flush");
        let mut line = String::new();
        stdout.read_line(&mut line).expect("read an answer");
        serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("no answer to {request} (pcx died?): {e}: {line:?}"))
    };
    assert_ok(&ask(record_kind("c1", "c_upper", b"hello")));
    assert_ok(&ask(record_forward("fwd", &["c1"])));
    assert_ok(&ask(save()));
    let before = ask(load("fwd"));
    assert_ok(&before);

    // Overwritten in place (same inode), as `cp` onto an existing file does: every byte of
    // the library's code changes under the running process.
    let size = std::fs::metadata(&installed).expect("the library").len() as usize;
    let garbage: Vec<u8> = (0..size).map(|i| (i * 7 + 0x0f) as u8).collect();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&installed)
        .and_then(|mut f| f.write_all(&garbage))
        .expect("overwrite the library in place");

    let after = ask(load("fwd"));
    assert_ok(&after);
    assert_eq!(
        unb64(&after["deserialized"]["c1"]["content_b64"]),
        b"HELLO",
        "{after}"
    );
    assert_ok(&ask(plugin_edit("c1", "append", b"!")));
    drop(stdin);
    let status = child.wait().expect("wait for pcx batch");
    assert!(status.success(), "pcx batch ended {status}");
}

// ---------------------------------------------------------------------------------------------
// 2. hostile plugins: each refused with its path and reason, the others still load

#[test]
fn a_text_file_with_a_library_extension_is_refused() {
    let s = Setup::new();
    s.c("c_upper");
    let bad = s.write("libnotes.so", b"these are my notes, not a library\n");
    let kinds = Kinds::load(&s.plugins(), usize::MAX);
    assert_c_upper_serves(&kinds);
    let problems = kinds.problems();
    assert_eq!(problems.len(), 1, "{problems:#?}");
    assert!(
        matches!(&problems[0], PluginError::Open { path, .. } if *path == bad),
        "{:?}",
        problems[0]
    );
    assert_contains(
        &problems[0].to_string(),
        &[&bad.display().to_string(), "cannot be loaded"],
    );
}

/// `pcx plugins list` and `pcx batch` over a directory holding the working C plugin and a
/// copy of it cut to `keep` bytes.
fn truncated_library_is_refused(keep: usize) {
    let s = Setup::new();
    s.c("c_upper");
    let whole = std::fs::read(c_fixture("c_upper")).unwrap();
    assert!(keep < whole.len());
    let bad = s.write("libtruncated.so", &whole[..keep]);
    let bad_text = bad.display().to_string();

    let list = run(s.pcx_plugins(&["plugins", "list"]), b"");
    assert_eq!(
        list.status.code(),
        Some(1),
        "pcx plugins list must report the problem and exit 1, not crash: {}\nstderr: {}",
        list.status,
        list.stderr
    );
    let answer = list.answer();
    assert_eq!(answer["plugins"][0]["name"], "c-upper", "{answer}");
    let problems = answer["problems"].as_array().unwrap();
    assert_eq!(problems.len(), 1, "{answer}");
    assert_contains(
        problems[0].as_str().unwrap(),
        &[&bad_text, "cannot be loaded"],
    );

    let (c1, stderr) = served_through_batch(&s, "c_upper", b"still served");
    assert_eq!(unb64(&c1["content_b64"]), b"STILL SERVED");
    assert_contains(&stderr, &[&bad_text]);
}

#[test]
fn a_library_cut_inside_its_headers_is_refused() {
    truncated_library_is_refused(500);
}

/// A library cut in the middle keeps its ELF and program headers but its segments run past
/// the end of the file: `dlopen` maps them and the loader then touches the missing pages.
#[test]
fn a_library_cut_in_the_middle_is_refused_without_crashing_pcx() {
    let half = std::fs::metadata(c_fixture("c_upper")).unwrap().len() as usize / 2;
    truncated_library_is_refused(half);
}

#[test]
fn a_library_without_the_entry_symbol_is_refused() {
    let (_, e) = refused_beside_good("no_entry");
    assert!(matches!(e, PluginError::NoEntry { .. }), "{e:?}");
    assert_contains(
        &e.to_string(),
        &["pcx_plugin_entry_v1", "another ABI major"],
    );
}

#[test]
fn an_entry_returning_null_is_refused() {
    let (_, e) = refused_beside_good("null_entry");
    assert!(matches!(e, PluginError::NullDescriptor { .. }), "{e:?}");
    assert_contains(&e.to_string(), &["null descriptor"]);
}

#[test]
fn a_wrong_magic_is_refused() {
    let (_, e) = refused_beside_good("bad_magic");
    assert_contains(&e.to_string(), &["wrong magic"]);
}

#[test]
fn a_descriptor_smaller_than_abi_1_0_is_refused() {
    let (_, e) = refused_beside_good("small_struct");
    assert_contains(&e.to_string(), &["struct_size 16 is smaller"]);
}

#[test]
fn another_abi_major_is_refused() {
    let (bad, e) = refused_beside_good("abi_major_2");
    assert_eq!(
        e,
        PluginError::Abi {
            path: bad,
            major: 2,
            minor: 0,
            host_major: 1,
            host_min_minor: loader::MIN_ABI_MINOR
        }
    );
    assert_contains(&e.to_string(), &["speaks ABI 2.0", "this pcx speaks 1.x"]);
}

#[test]
fn a_minor_below_the_hosts_minimum_is_refused() {
    let s = Setup::new();
    let path = s.c("c_upper");
    let e = loader::load_with_min_minor(&path, 1).unwrap_err();
    assert_eq!(
        e,
        PluginError::Abi {
            path: path.clone(),
            major: 1,
            minor: 0,
            host_major: 1,
            host_min_minor: 1
        }
    );
    assert_contains(
        &e.to_string(),
        &[&path.display().to_string(), "speaks ABI 1.0", "x >= 1"],
    );
    // The same library is fine for a host that accepts minor 0.
    let p = loader::load(&path).expect("minor 0 is accepted by default");
    assert_eq!((p.abi_major, p.abi_minor), (1, 0));
}

#[test]
fn a_plugin_for_another_target_is_refused() {
    let (bad, e) = refused_beside_good("wrong_target");
    assert_eq!(
        e,
        PluginError::Target {
            path: bad,
            target: "sparc64-unknown-none".into(),
            host: HOST_TARGET.into()
        }
    );
}

#[test]
fn a_null_function_pointer_is_refused() {
    let (_, e) = refused_beside_good("null_describe");
    assert_contains(&e.to_string(), &["must not be null"]);
    let (_, e) = refused_beside_good("null_edit");
    assert_contains(&e.to_string(), &["null edit function"]);
}

#[test]
fn absurd_lengths_are_refused_before_reading() {
    let (_, e) = refused_beside_good("huge_kind_count");
    assert_contains(
        &e.to_string(),
        &["declares 1099511627776 kinds", "at most 64"],
    );
    let (_, e) = refused_beside_good("huge_name_len");
    assert_contains(&e.to_string(), &["name is 1099511627776 bytes long"]);
}

#[test]
fn a_non_utf8_kind_name_is_refused() {
    let (_, e) = refused_beside_good("non_utf8_kind");
    assert_contains(&e.to_string(), &["kinds[0] is not UTF-8"]);
}

#[test]
fn an_invalid_kind_name_is_refused() {
    let (_, e) = refused_beside_good("bad_kind_name");
    assert_contains(&e.to_string(), &["`Bad Kind` is not a valid name"]);
}

/// Before, a sink took a write of `len` bytes from a null pointer as a write of nothing and
/// answered OK: a plugin that ignored that answer gave shorter bytes than it meant (here none)
/// and pcx served them, or committed them as an edit's result, as right.
#[test]
fn a_plugin_writing_from_a_null_pointer_with_a_length_is_refused_not_served_short() {
    let s = Setup::new();
    s.c("c_null_sink");
    let kinds = Kinds::load(&s.plugins(), usize::MAX);
    assert!(kinds.problems().is_empty(), "{:#?}", kinds.problems());
    let e = kinds
        .after_deserialization("b1", "c_null_sink", b"abc")
        .expect_err("bytes it did not give are not served");
    assert_contains(
        &e.to_string(),
        &[
            "c-null-sink",
            "c_null_sink",
            "wrote 3 bytes from a null pointer",
        ],
    );
    let e = kinds
        .edit("k", "c_null_sink", "append", b"xy", b"abc")
        .expect_err("an edit's result it did not give is not taken");
    assert_contains(
        &e.to_string(),
        &["c-null-sink", "wrote 2 bytes from a null pointer", "edit"],
    );
}

/// Before, a plugin listing one kind twice loaded, and `plugins list` showed the kind twice.
#[test]
fn a_plugin_listing_one_kind_twice_is_refused() {
    let (_, e) = refused_beside_good("c_kind_twice");
    assert_contains(&e.to_string(), &["kinds[1] `c_twice` is listed twice"]);
}

#[test]
fn two_plugins_claiming_one_kind_the_first_keeps_it_and_the_second_registers_nothing() {
    let s = Setup::new();
    // Loaded in path order: a_first before b_second.
    let first = s.install(c_fixture("c_upper"), "liba_first.so");
    let second = s.install(c_fixture("c_upper_dup"), "libb_second.so");
    let kinds = Kinds::load(&s.plugins(), usize::MAX);
    assert_eq!(
        kinds.problems(),
        [PluginError::KindTwice {
            kind: "c_upper".into(),
            first: first.clone(),
            second: second.clone()
        }]
    );
    assert_contains(
        &kinds.problems()[0].to_string(),
        &[
            "c_upper",
            &first.display().to_string(),
            &second.display().to_string(),
        ],
    );
    assert_c_upper_serves(&kinds);
    // All or nothing: the refused plugin's other kind is not registered either.
    let e = kinds
        .after_deserialization("b", "c_unique", b"x")
        .unwrap_err();
    let e = ContextError::from(e);
    assert!(matches!(e, ContextError::NoPlugin { .. }), "{e:?}");

    // Through the binary: the first plugin serves the kind.
    let (c1, stderr) = served_through_batch(&s, "c_upper", b"mine");
    assert_eq!(c1["plugin"], "c-upper");
    assert_contains(&stderr, &["liba_first.so", "libb_second.so"]);
}

#[test]
fn a_plugin_claiming_eager_is_refused_whole() {
    let (bad, e) = refused_beside_good("c_eager");
    assert_eq!(e, PluginError::ClaimsEager { path: bad });
    assert_contains(&e.to_string(), &["`eager`"]);
    // Its other kind is not registered either.
    let s = Setup::new();
    s.c("c_eager");
    let kinds = Kinds::load(&s.plugins(), usize::MAX);
    assert!(kinds.plugins().is_empty());
    let e = kinds
        .after_deserialization("b", "c_also", b"x")
        .unwrap_err();
    let e = ContextError::from(e);
    assert!(matches!(e, ContextError::NoPlugin { .. }), "{e:?}");
    let d = kinds.after_deserialization("b", "eager", b"x").unwrap();
    assert_eq!(d.served_by, "builtin");
}

#[test]
fn a_directory_a_symlink_out_of_the_directory_and_other_extensions_are_not_loaded() {
    let s = Setup::new();
    s.c("c_upper");
    std::fs::create_dir(s.plugins().join("libdir.so")).unwrap();
    let outside = tempfile::tempdir().unwrap();
    let target = outside.path().join("libelsewhere.so");
    std::fs::copy(c_fixture("c_upper_dup"), &target).unwrap();
    std::os::unix::fs::symlink(&target, s.plugins().join("liblink.so")).unwrap();
    s.write("README.txt", b"not a candidate");
    s.install(c_fixture("c_eager"), "libc_eager.so.disabled");
    let kinds = Kinds::load(&s.plugins(), usize::MAX);
    assert_c_upper_serves(&kinds);
    let problems: Vec<String> = kinds.problems().iter().map(|e| e.to_string()).collect();
    assert_eq!(problems.len(), 2, "{problems:#?}");
    assert!(
        problems
            .iter()
            .any(|p| p.contains("libdir.so") && p.contains("not a regular file")),
        "{problems:#?}"
    );
    assert!(
        problems
            .iter()
            .any(|p| p.contains("libelsewhere.so") && p.contains("outside the plugin directory")),
        "{problems:#?}"
    );
}

/// Records an artifact of `kind` (served by `misbehaving`), a well-behaved one and an eager
/// one, saves, and loads; then `extra` requests. Checks everything but the first load
/// succeeds and gives the first load's answer and the extra answers.
fn misbehaving_load(kind: &str, env: &[(&str, &str)], extra: &[Value]) -> (Value, Vec<Value>) {
    let s = Setup::new();
    s.install(misbehaving(), "libmisbehaving.so");
    // Recorded while the plugin behaves (pcx checks content at record), loaded while not.
    let mut cmd = s.pcx_plugins(&["batch"]);
    cmd.envs(env.iter().copied()).env("FIXTURE_BEHAVE", "1");
    let (answers, _) = batch_with(
        cmd,
        &[
            record_kind("bad", kind, b"twelve bytes"),
            record_kind("fine", "fixture_echo", b"echo me"),
            record_kind("e", "eager", b"plain"),
            record_forward("bad_entry", &["bad"]),
            record_forward("fine_entry", &["fine", "e"]),
            save(),
        ],
    );
    for a in &answers {
        assert_ok(a);
    }
    let mut cmd = s.pcx_plugins(&["batch"]);
    cmd.envs(env.iter().copied());
    let mut requests = vec![load("bad_entry"), load("fine_entry"), dump()];
    requests.extend_from_slice(extra);
    let (mut answers, _) = batch_with(cmd, &requests);
    assert_ok(&answers[1]);
    assert_ok(&answers[2]);
    // The next request is served, by the same plugin.
    let fine = &answers[1]["deserialized"];
    assert_eq!(fine["fine"]["plugin"], "misbehaving", "{fine}");
    assert_eq!(unb64(&fine["fine"]["content_b64"]), b"echo me");
    assert_eq!(fine["fine"]["description"], json!({"size": 7}));
    assert_eq!(unb64(&fine["e"]["content_b64"]), b"plain");
    let extra_answers = answers.split_off(3);
    (answers.swap_remove(0), extra_answers)
}

#[test]
fn content_a_plugin_refuses_is_refused_at_record_and_nothing_is_written() {
    let s = Setup::new();
    s.install(misbehaving(), "libmisbehaving.so");
    let (answers, _) = batch_with(
        s.pcx_plugins(&["batch"]),
        &[
            record_kind("bad", "fixture_error", b"twelve bytes"),
            record_kind("boom", "fixture_panic", b"twelve bytes"),
            record_kind("nobody", "no_such_kind", b"x"),
            dump(),
        ],
    );
    let message = assert_failed(&answers[0], "plugin_failed");
    assert_contains(&message, &["fixture error: refusing 12 input bytes"]);
    let message = assert_failed(&answers[1], "plugin_failed");
    assert_contains(&message, &["fixture panic on 12 input bytes"]);
    assert_failed(&answers[2], "no_plugin");
    let dumped = answers[3].to_string();
    for key in ["\"bad\"", "\"boom\"", "\"nobody\""] {
        assert!(!dumped.contains(key), "{key} was written: {dumped}");
    }
}

#[test]
fn a_plugin_panicking_in_after_deserialization_is_an_error_and_pcx_goes_on() {
    let (answer, extra) = misbehaving_load(
        "fixture_panic",
        &[],
        &[plugin_edit("fine", "panic", b""), serialize("fine")],
    );
    let message = assert_failed(&answer, "plugin_failed");
    assert_contains(
        &message,
        &[
            "misbehaving 0.3.1 panicked on kind `fixture_panic`",
            "fixture panic on 12 input bytes",
        ],
    );
    // A panicking edit too, and it changes nothing.
    let message = assert_failed(&extra[0], "plugin_failed");
    assert_contains(
        &message,
        &[
            "panicked on kind `fixture_echo`",
            "fixture edit panic on 7 content bytes",
        ],
    );
    assert_eq!(unb64(&extra[1]["artifact"]["content_b64"]), b"echo me");
}

#[test]
fn a_plugin_returning_an_error_is_a_clear_error_and_pcx_goes_on() {
    let (answer, extra) =
        misbehaving_load("fixture_error", &[], &[plugin_edit("fine", "fail", b"")]);
    let message = assert_failed(&answer, "plugin_failed");
    assert_contains(
        &message,
        &[
            "misbehaving 0.3.1",
            "failed on kind `fixture_error`",
            "fixture error: refusing 12 input bytes",
        ],
    );
    // The second failure's text is its own, whole: the shorter message after a longer one
    // (in the same reused error buffer) carries nothing of the first.
    let message = assert_failed(&extra[0], "plugin_failed");
    assert_contains(&message, &["fixture edit error: `fail` refused (status 1)"]);
}

#[test]
fn a_plugin_writing_more_than_the_output_limit_is_refused() {
    let (answer, extra) = misbehaving_load(
        "fixture_flood",
        &[("PCX_MAX_PLUGIN_OUTPUT_BYTES", "4096")],
        &[plugin_edit("fine", "flood", b""), serialize("fine")],
    );
    let message = assert_failed(&answer, "plugin_failed");
    assert_contains(
        &message,
        &[
            "misbehaving 0.3.1",
            "more than 4096 bytes",
            "`fixture_flood`",
        ],
    );
    let message = assert_failed(&extra[0], "plugin_failed");
    assert_contains(&message, &["more than 4096 bytes"]);
    assert_eq!(unb64(&extra[1]["artifact"]["content_b64"]), b"echo me");
}

/// Before, a plugin edit's result was committed without the check content gets at record: an
/// edit giving content the plugin's own `after_deserialization` refuses was acknowledged, and
/// every later load of the artifact (and of the entries using it) failed.
#[test]
fn a_plugin_edit_whose_result_its_plugin_refuses_is_refused_and_changes_nothing() {
    let (_, extra) = misbehaving_load(
        "fixture_echo",
        &[],
        &[
            plugin_edit("fine", "unloadable", b""),
            serialize("fine"),
            load("fine_entry"),
        ],
    );
    let message = assert_failed(&extra[0], "plugin_failed");
    assert_contains(
        &message,
        &["misbehaving 0.3.1", "`fixture_echo`", "unloadable content"],
    );
    assert_eq!(unb64(&extra[1]["artifact"]["content_b64"]), b"echo me");
    assert_ok(&extra[2]);
    let fine = &extra[2]["deserialized"]["fine"];
    assert_eq!(unb64(&fine["content_b64"]), b"echo me", "{fine}");
}

#[test]
fn a_missing_plugin_directory_is_reported_and_eager_still_works() {
    let s = Setup::new();
    let missing = s.tmp.path().join("no-such-plugins");
    let missing_text = missing.to_str().unwrap().to_string();

    let kinds = Kinds::load(&missing, usize::MAX);
    assert_eq!(
        kinds.problems(),
        [PluginError::DirMissing {
            dir: missing.clone()
        }]
    );

    // Configured through the environment, as an operator would.
    let mut list = s.pcx(&["plugins", "list"]);
    list.env("PCX_PLUGIN_DIR", &missing);
    let list = run(list, b"");
    assert_eq!(list.status.code(), Some(1), "stderr: {}", list.stderr);
    let answer = list.answer();
    assert_eq!(answer["plugin_dir"], json!(missing_text));
    assert_eq!(answer["plugins"], json!([]));
    assert_contains(
        answer["problems"][0].as_str().unwrap(),
        &[&missing_text, "does not exist"],
    );

    let mut cmd = s.pcx(&["batch"]);
    cmd.env("PCX_PLUGIN_DIR", &missing);
    let (answers, Run { stderr, .. }) = batch_with(
        cmd,
        &[
            record_kind("e1", "eager", b"eager"),
            // Refused at record: no plugin serves the kind.
            record_kind("c1", "c_upper", b"needs a plugin"),
            record_forward("eager_only", &["e1"]),
            save(),
            load("eager_only"),
            dump(),
        ],
    );
    for (i, a) in answers.iter().enumerate() {
        if i != 1 {
            assert_ok(a);
        }
    }
    assert_eq!(
        unb64(&answers[4]["deserialized"]["e1"]["content_b64"]),
        b"eager"
    );
    assert!(!answers[5].to_string().contains("\"c1\""), "{}", answers[5]);
    let message = assert_failed(&answers[1], "no_plugin");
    assert_contains(&message, &["`c_upper`", &missing_text]);
    assert_contains(&stderr, &[&missing_text, "does not exist"]);
}

/// Every hostile fixture that loads without crashing, side by side with the good plugins:
/// `pcx plugins list` names each, and `pcx batch` serves the good ones and `eager`.
#[test]
fn a_directory_full_of_hostile_plugins_does_not_stop_pcx() {
    let s = Setup::new();
    s.c("c_upper");
    s.install(misbehaving(), "libmisbehaving.so");
    let hostile_stems = [
        "c_upper_dup",
        "c_eager",
        "no_entry",
        "null_entry",
        "bad_magic",
        "small_struct",
        "abi_major_2",
        "wrong_target",
        "null_describe",
        "null_edit",
        "huge_kind_count",
        "huge_name_len",
        "non_utf8_kind",
        "bad_kind_name",
    ];
    let mut hostile: Vec<PathBuf> = hostile_stems.iter().map(|stem| s.c(stem)).collect();
    hostile.push(s.write("libnotes.so", b"plain text\n"));
    let whole = std::fs::read(c_fixture("c_upper")).unwrap();
    hostile.push(s.write("libcut.so", &whole[..500]));

    let list = run(s.pcx_plugins(&["plugins", "list"]), b"");
    assert_eq!(list.status.code(), Some(1), "stderr: {}", list.stderr);
    let answer = list.answer();
    let names: Vec<&str> = answer["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["c-upper", "misbehaving"], "{answer}");
    let problems: Vec<&str> = answer["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    assert_eq!(problems.len(), hostile.len(), "{problems:#?}");
    for path in &hostile {
        let path = path.display().to_string();
        assert!(
            problems.iter().any(|p| p.contains(&path)),
            "no problem names {path}: {problems:#?}"
        );
    }

    let (answers, Run { stderr, .. }) = batch_with(
        s.pcx_plugins(&["batch"]),
        &[
            record_kind("c1", "c_upper", b"upper"),
            record_kind("m1", "fixture_echo", b"echo"),
            record_kind("e1", "eager", b"eager"),
            record_forward("fwd", &["c1", "m1", "e1"]),
            save(),
            load("fwd"),
        ],
    );
    answers.iter().for_each(assert_ok);
    let d = &answers[5]["deserialized"];
    assert_eq!(unb64(&d["c1"]["content_b64"]), b"UPPER");
    assert_eq!(unb64(&d["m1"]["content_b64"]), b"echo");
    assert_eq!(unb64(&d["e1"]["content_b64"]), b"eager");
    for path in &hostile {
        let name = path.file_name().unwrap().to_str().unwrap();
        assert!(
            stderr.contains(name),
            "the log does not name {name}: {stderr}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 3. pcx plugins list / check

#[test]
fn plugins_list_shows_name_version_abi_kinds_and_path() {
    let s = Setup::new();
    let c = s.c("c_upper");
    let m = s.install(misbehaving(), "libmisbehaving.so");
    let a = s.install(aot_bundle(), "libaot_bundle.so");
    let list = run(s.pcx_plugins(&["plugins", "list"]), b"");
    let answer = list.assert_success().answer();
    assert_eq!(answer["plugin_dir"], json!(s.plugins_arg()));
    assert_eq!(answer["problems"], json!([]));
    assert_eq!(
        answer["plugins"],
        json!([
            {"name": "aot-bundle", "version": "0.1.0", "abi": "1.0",
             "kinds": ["example.aot_bundle"], "edits": ["clear_backend_id"],
             "target": HOST_TARGET, "path": a},
            {"name": "c-upper", "version": "1.2.3", "abi": "1.0",
             "kinds": ["c_upper"], "edits": ["append"], "target": HOST_TARGET, "path": c},
            {"name": "misbehaving", "version": "0.3.1", "abi": "1.0",
             "kinds": ["fixture_panic", "fixture_error", "fixture_flood", "fixture_echo"],
             "edits": ["panic", "flood", "fail", "unloadable"], "target": HOST_TARGET, "path": m},
        ])
    );

    // Plugins off: nothing listed, nothing wrong.
    let off = run(s.pcx(&["--no-plugins", "plugins", "list"]), b"");
    assert_eq!(
        off.assert_success().answer(),
        json!({"plugin_dir": null, "plugins": [], "problems": []})
    );
}

/// Before, the check child's answer was its last line on stdout, so a library that printed on
/// stdout while loading (here a C constructor's buffered `printf`, flushed at exit, after the
/// answer) was refused "with no answer" by `plugins check`, `plugins list`, `serve` and
/// `batch`, though nothing was wrong with it.
#[test]
fn a_plugin_printing_on_stdout_while_loading_is_not_refused_by_its_check() {
    let s = Setup::new();
    let chatty = s.c("c_chatty");
    let out = run(s.pcx(&["plugins", "check", chatty.to_str().unwrap()]), b"");
    let answer = out.assert_success().answer();
    assert_eq!(answer["ok"], true, "{answer}");
    assert_eq!(answer["plugin"]["kinds"], json!(["c_chatty"]));
}

/// Before, a library loaded in `pcx batch` (or `plugins list`) that printed on stdout put its
/// text among the answers, a line that is not JSON in the protocol's channel.
#[test]
fn a_plugin_printing_on_stdout_does_not_corrupt_batch_answers() {
    let s = Setup::new();
    s.c("c_chatty");
    let (c1, stderr) = served_through_batch(&s, "c_chatty", b"abc");
    assert_eq!(unb64(&c1["content_b64"]), b"ABC");
    assert_contains(&stderr, &["c-chatty: loaded"]);
    let list = run(s.pcx_plugins(&["plugins", "list"]), b"");
    let answer = list.assert_success().answer();
    assert_eq!(answer["plugins"][0]["name"], "c-chatty", "{answer}");
    let one = run(s.pcx_plugins(&["load", "fwd"]), b"");
    let answer = one.assert_success().answer();
    assert_eq!(unb64(&answer["deserialized"]["c1"]["content_b64"]), b"ABC");
}

#[test]
fn plugins_check_accepts_a_good_plugin_and_says_what_is_wrong_with_a_bad_one() {
    let s = Setup::new();
    let good = s.c("c_upper");
    let check = |path: &Path| run(s.pcx(&["plugins", "check", path.to_str().unwrap()]), b"");

    let out = check(&good);
    let answer = out.assert_success().answer();
    assert_eq!(answer["ok"], true, "{answer}");
    assert_eq!(answer["plugin"]["name"], "c-upper");
    assert_eq!(answer["plugin"]["kinds"], json!(["c_upper"]));

    let sdk = s.install(misbehaving(), "libmisbehaving.so");
    let out = check(&sdk);
    assert_eq!(out.assert_success().answer()["plugin"]["version"], "0.3.1");

    let bad_cases = [
        (s.c("bad_magic"), "wrong magic"),
        (s.c("c_eager"), "claims the built-in kind `eager`"),
        (s.c("no_entry"), "no entry symbol"),
        (s.write("libnotes.so", b"notes\n"), "cannot be loaded"),
    ];
    for (path, reason) in &bad_cases {
        let out = check(path);
        assert_eq!(
            out.status.code(),
            Some(1),
            "{}: {}\n{}",
            path.display(),
            out.stdout,
            out.stderr
        );
        let answer = out.answer();
        assert_eq!(answer["ok"], false, "{answer}");
        assert_contains(
            answer["error"].as_str().unwrap(),
            &[&path.display().to_string(), reason],
        );
    }
}

#[test]
fn plugins_check_survives_a_plugin_that_crashes_while_loading() {
    let s = Setup::new();
    for (stem, signal) in [("ctor_segv", 11), ("ctor_abort", 6)] {
        let path = s.c(stem);
        let out = run(s.pcx(&["plugins", "check", path.to_str().unwrap()]), b"");
        // pcx itself ends normally, with a failure code, not by the signal.
        assert_eq!(
            out.status.code(),
            Some(1),
            "{stem}: {}\nstdout: {}\nstderr: {}",
            out.status,
            out.stdout,
            out.stderr
        );
        let answer = out.answer();
        assert_eq!(answer["ok"], false, "{answer}");
        assert_eq!(answer["path"], json!(path), "{answer}");
        assert_contains(
            answer["error"].as_str().unwrap(),
            &["crashed", &format!("signal {signal}")],
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 4. the example plugin aot-bundle end to end

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Kernel {
    name: String,
    #[serde(with = "serde_bytes")]
    code: Vec<u8>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Bundle {
    format_version: u64,
    guards_expr: Option<String>,
    precompile_backend_id: Option<String>,
    kernels: Vec<Kernel>,
    meta: BTreeMap<String, String>,
}

fn bundle() -> Bundle {
    Bundle {
        format_version: 1,
        guards_expr: Some("L['x'].size()[0] == 8".into()),
        precompile_backend_id: Some("__compiled_fn_3".into()),
        kernels: vec![
            Kernel {
                name: "triton_poi_fused_add_0".into(),
                code: vec![7; 100],
            },
            Kernel {
                name: "triton_red_fused_sum_1".into(),
                code: b"def kernel(): pass".to_vec(),
            },
        ],
        meta: BTreeMap::from([
            ("device".to_string(), "cpu".to_string()),
            ("torch".to_string(), "2.6".to_string()),
        ]),
    }
}

fn decode_bundle(bytes: &[u8]) -> Bundle {
    rmp_serde::from_slice(bytes).expect("a example.aot_bundle document")
}

#[test]
fn aot_bundle_record_edit_stitch_save_restart_load_and_without_plugins() {
    let s = Setup::new();
    s.install(aot_bundle(), "libaot_bundle.so");
    let original = bundle();
    let doc = rmp_serde::to_vec_named(&original).unwrap();
    let edited = Bundle {
        precompile_backend_id: None,
        ..original.clone()
    };
    let ready = Bundle {
        guards_expr: None,
        ..edited.clone()
    };

    // Record, edit with the plugin, stitch, save.
    let (answers, _) = batch_with(
        s.pcx_plugins(&["batch"]),
        &[
            record_kind("aot1", "example.aot_bundle", &doc),
            plugin_edit("aot1", "clear_backend_id", b""),
            record_kind("e1", "eager", b"eager kernel"),
            record_forward("fwd", &["aot1", "e1"]),
            stitch(),
            save(),
            // A map of five entries that ends after its header: refused at record.
            record_kind("junk", "example.aot_bundle", b"\x85"),
            plugin_edit("junk", "clear_backend_id", b""),
            plugin_edit("aot1", "recompile", b""),
        ],
    );
    for a in &answers[..6] {
        assert_ok(a);
    }
    let stitched = &answers[4]["entries"]["fwd"]["backends"]["aot1"];
    assert_eq!(stitched["kind"], "example.aot_bundle", "{}", answers[4]);
    assert_eq!(decode_bundle(&unb64(&stitched["content_b64"])), edited);
    let message = assert_failed(&answers[6], "plugin_failed");
    assert_contains(&message, &["aot-bundle", "not valid MessagePack"]);
    assert_failed(&answers[7], "key_not_found");
    let message = assert_failed(&answers[8], "no_such_edit");
    assert_contains(&message, &["recompile", "clear_backend_id"]);

    // Restart: a new process loads the saved entry through the plugin.
    let (answers, _) = batch_with(s.pcx_plugins(&["batch"]), &[load("fwd")]);
    let loaded = &answers[0];
    assert_ok(loaded);
    let d = &loaded["deserialized"]["aot1"];
    assert_eq!(d["kind"], "example.aot_bundle", "{loaded}");
    assert_eq!(d["plugin"], "aot-bundle", "{loaded}");
    assert_eq!(d["description"]["kernel_count"], 2, "{loaded}");
    assert_eq!(
        d["description"]["kernel_names"],
        json!(["triton_poi_fused_add_0", "triton_red_fused_sum_1"])
    );
    assert_eq!(d["description"]["total_code_bytes"], 118, "{loaded}");
    assert_eq!(d["description"]["precompile_backend_id"], Value::Null);
    assert_eq!(decode_bundle(&unb64(&d["content_b64"])), ready);
    // The entry itself carries the stored (edited) document.
    assert_eq!(
        decode_bundle(&unb64(&loaded["entry"]["backends"]["aot1"]["content_b64"])),
        edited
    );
    let e1 = &loaded["deserialized"]["e1"];
    assert_eq!(e1["plugin"], "builtin");
    assert_eq!(unb64(&e1["content_b64"]), b"eager kernel");

    // Plugins off: the same load is a clear error naming the kind; everything else works,
    // and replay gave the edited bytes without the plugin.
    let (answers, _) = batch_with(
        s.pcx(&["--no-plugins", "batch"]),
        &[
            load("fwd"),
            serialize("aot1"),
            record_kind("e2", "eager", b"more eager"),
            record_forward("eager_only", &["e2"]),
            save(),
            load("eager_only"),
            dump(),
        ],
    );
    let message = assert_failed(&answers[0], "no_plugin");
    assert_contains(&message, &["`example.aot_bundle`", "aot1"]);
    for a in &answers[1..] {
        assert_ok(a);
    }
    let artifact = &answers[1]["artifact"];
    assert_eq!(artifact["kind"], "example.aot_bundle");
    assert_eq!(decode_bundle(&unb64(&artifact["content_b64"])), edited);
    assert_eq!(
        unb64(&answers[5]["deserialized"]["e2"]["content_b64"]),
        b"more eager"
    );
    assert!(
        answers[6]["debug_info"].is_object(),
        "debug info: {}",
        answers[6]
    );
}

/// The example plugin loaded through the registry, in this process.
fn aot_kinds() -> (Setup, Kinds) {
    let s = Setup::new();
    s.install(aot_bundle(), "libaot_bundle.so");
    let kinds = Kinds::load(&s.plugins(), usize::MAX);
    assert_eq!(kinds.problems(), []);
    (s, kinds)
}

/// The error `after_deserialization` of `example.aot_bundle` gives for `content`.
fn aot_refusal(kinds: &Kinds, content: Vec<u8>) -> String {
    match kinds.after_deserialization("b", "example.aot_bundle", &content) {
        Ok(d) => panic!("accepted, described as {}", d.description),
        Err(e) => {
            let e = ContextError::from(e);
            assert_eq!(e.kind(), "plugin_failed", "{e:?}");
            e.to_string()
        }
    }
}

#[test]
fn aot_bundle_refuses_bad_documents_clearly() {
    let (_s, kinds) = aot_kinds();
    let v2 = Bundle {
        format_version: 2,
        ..bundle()
    };
    let message = aot_refusal(&kinds, rmp_serde::to_vec_named(&v2).unwrap());
    assert_contains(
        &message,
        &["aot-bundle 0.1.0", "format_version 2 is not supported"],
    );
    let missing =
        rmp_serde::to_vec_named(&json!({"format_version": 1, "guards_expr": null})).unwrap();
    assert_contains(
        &aot_refusal(&kinds, missing),
        &["missing field `precompile_backend_id`"],
    );
    assert_contains(
        &aot_refusal(&kinds, b"\x85".to_vec()),
        &["not valid MessagePack"],
    );
    assert_contains(
        &aot_refusal(&kinds, rmp_serde::to_vec(&[1, 2]).unwrap()),
        &["must be a MessagePack map"],
    );
}

/// 0xc1 is never valid MessagePack (the format reserves it), wherever it stands: a document
/// holding it is malformed, not a document with a nil there.
#[test]
fn aot_bundle_refuses_the_reserved_byte_0xc1_as_malformed_messagepack() {
    let (_s, kinds) = aot_kinds();
    // The one nil of this document (no kernel code byte is 0xc0) becomes the reserved byte.
    let doc = rmp_serde::to_vec_named(&Bundle {
        precompile_backend_id: None,
        ..bundle()
    })
    .unwrap();
    assert_eq!(doc.iter().filter(|&&b| b == 0xc0).count(), 1);
    let corrupt: Vec<u8> = doc
        .iter()
        .map(|&b| if b == 0xc0 { 0xc1 } else { b })
        .collect();
    assert_contains(&aot_refusal(&kinds, corrupt), &["not valid MessagePack"]);
    assert_contains(
        &aot_refusal(&kinds, b"\xc1".to_vec()),
        &["not valid MessagePack"],
    );
}

/// A document followed by more bytes is not one document: the content is malformed.
#[test]
fn aot_bundle_refuses_trailing_bytes_after_the_document() {
    let (_s, kinds) = aot_kinds();
    let mut trailing = rmp_serde::to_vec_named(&bundle()).unwrap();
    trailing.extend_from_slice(b"trailing junk");
    aot_refusal(&kinds, trailing);
}

// ---------------------------------------------------------------------------------------------
// 5. the SDK refuses panic = "abort" at compile time

#[test]
fn the_sdk_refuses_to_build_a_plugin_with_panic_abort() {
    let manifest = fixtures().join("abort/Cargo.toml");
    let out = cargo_build(&manifest, &scratch().join("abort"), &[]);
    assert!(
        !out.status.success(),
        "a plugin with panic = \"abort\" must not build; stderr: {}",
        out.stderr
    );
    assert_contains(
        &out.stderr,
        &["pcx plugins must be built with panic = \"unwind\""],
    );
    // The same crate with unwinding builds: the refusal is about the panic strategy.
    let out = cargo_build(
        &manifest,
        &scratch().join("abort-unwind"),
        &["--config", "profile.dev.panic=\"unwind\""],
    );
    assert!(
        out.status.success(),
        "the same plugin with panic = \"unwind\" builds; stderr: {}",
        out.stderr
    );
}

/// A fresh setup with the example plugin installed, and a config for its directories.
fn aot_config() -> (Setup, pcx::config::Config) {
    let s = Setup::new();
    s.install(aot_bundle(), "libaot_bundle.so");
    let mut config =
        pcx::config::Config::load(None, std::iter::empty()).expect("the built-in config loads");
    config.data_dir = s.data();
    config.plugin_dir = s.plugins();
    (s, config)
}

/// A document whose plugin calls take milliseconds (8 MiB of kernel code).
fn large_bundle() -> Vec<u8> {
    let mut large = bundle();
    large.kernels[0].code = vec![7; 8 << 20];
    rmp_serde::to_vec_named(&large).unwrap()
}

/// An entry of one code referencing `ids`.
fn entry_of(ids: &[&str]) -> pcx::core::model::DynamoCacheEntry {
    pcx::core::model::DynamoCacheEntry {
        codes: vec![pcx::core::model::DynamoCodeEntry {
            backend_ids: ids.iter().map(|s| s.to_string()).collect(),
            python_module: "model".into(),
            ..Default::default()
        }],
        device_type: "cpu".into(),
        ..Default::default()
    }
}

/// Loads of plugin kinds run their plugin calls on the plugin thread while the actor goes
/// on; the requests sent behind them must still see the context as if each had waited.
/// Everything here is sent before the actor reads any of it: a take of an artifact that only
/// the load before it puts back, a clear, loads again, and a load that fails in the plugin
/// between two that succeed.
#[actix::test]
async fn loads_through_the_plugin_thread_keep_their_place_among_other_requests() {
    use pcx::context::Context;
    use pcx::core::model::Artifact;

    let (_s, config) = aot_config();
    let doc = rmp_serde::to_vec_named(&bundle()).unwrap();
    // The requests behind its load reach the actor long before its plugin calls are done.
    let large = large_bundle();
    let aot = |key: &str, content: &[u8]| Artifact {
        key: key.into(),
        kind: "example.aot_bundle".into(),
        content: content.to_vec(),
    };
    let ctx = Context::open(&config).expect("the context opens");
    for a in [
        aot("a1", &doc),
        aot("a2", &large),
        aot("b1", &doc),
        // A document now, not one once edited below: its load fails in the plugin.
        aot("bad", &doc),
        Artifact {
            key: "e1".into(),
            kind: "eager".into(),
            content: b"eager kernel".to_vec(),
        },
        Artifact {
            key: "e2".into(),
            kind: "eager".into(),
            content: b"another eager kernel".to_vec(),
        },
    ] {
        ctx.record_artifact(a).await.expect("recorded");
    }
    for (key, ids) in [
        ("A", &["a1", "e1", "a2"][..]),
        ("B", &["b1"][..]),
        ("BAD", &["bad"][..]),
        ("E", &["e2"][..]),
    ] {
        ctx.record_dynamo_cache_entry(key, entry_of(ids))
            .await
            .expect("recorded");
    }
    // An edit by a Rust function is not checked by the plugin (a record is).
    ctx.edit_artifact("bad", "break it", |_| b"\x85".to_vec())
        .await
        .expect("edited");
    ctx.save_to_dynamo_cache().await.expect("saved");
    ctx.clear().await.expect("cleared");

    // join! polls each in turn, so all are in the mailbox before the actor runs.
    let (load_a, load_e, take_a1, load_b, load_bad, dump, clear, load_a_again, take_b1, counters) = futures::join!(
        ctx.load_cache_entry("A", None),
        // Eager only, behind a load that waits for the plugin thread.
        ctx.load_cache_entry("E", None),
        ctx.take_artifact("a1"),
        ctx.load_cache_entry("B", None),
        ctx.load_cache_entry("BAD", None),
        ctx.dump_debug_info(),
        ctx.clear(),
        ctx.load_cache_entry("A", None),
        ctx.take_artifact("b1"),
        ctx.load_counters(),
    );
    let load_a = load_a.expect("A loads").value;
    assert_eq!(load_a.deserialized["a1"].served_by, "aot-bundle");
    assert_eq!(load_a.deserialized["e1"].served_by, "builtin");
    assert_eq!(load_a.deserialized["a2"].served_by, "aot-bundle");
    assert_eq!(
        decode_bundle(&load_a.deserialized["a1"].content),
        Bundle {
            guards_expr: None,
            ..bundle()
        }
    );
    assert!(load_e.is_ok(), "{load_e:?}");
    let taken = take_a1.expect("take answers").value;
    assert!(
        taken.is_some_and(|a| a.key == "a1" && a.content == doc),
        "the take sees a1, put back by the load sent before it"
    );
    assert!(load_b.is_ok(), "{load_b:?}");
    let message = load_bad.expect_err("BAD's plugin call fails").to_string();
    assert_contains(&message, &["aot-bundle", "not valid MessagePack"]);
    // a1 was taken; the others are back, in the order their loads were sent; BAD's failure
    // put nothing back.
    assert_eq!(
        dump.expect("dump answers").value.backends,
        ["e1", "a2", "e2", "b1"]
    );
    clear.expect("clear answers");
    assert!(load_a_again.is_ok(), "{load_a_again:?}");
    assert_eq!(
        take_b1.expect("take answers").value,
        None,
        "b1 was cleared after B's load and A's second load does not hold it"
    );
    let counters = counters.expect("counters answer").value;
    assert_eq!((counters.hit, counters.miss, counters.error), (4, 0, 1));

    // The log says the same: a restart replays to the same state.
    let before = ctx.state_digest().await.expect("digest").value;
    ctx.close().await.expect("closed");
    let ctx = Context::open(&config).expect("the context opens again");
    assert_eq!(ctx.state_digest().await.expect("digest").value, before);
    for key in ["a1", "a2", "e1"] {
        assert!(
            ctx.serialize_artifact_by_key(key)
                .await
                .expect("answers")
                .value
                .is_some(),
            "{key} is back after A's second load"
        );
    }
    assert_eq!(
        ctx.serialize_artifact_by_key("b1")
            .await
            .expect("answers")
            .value,
        None
    );
    ctx.close().await.expect("closed");
}

/// A commit that fails rebuilds the state from the log. A load queued for the plugin thread
/// was decided on the state the rebuild drops (here it found an entry whose save failed), so
/// it must fail too, not be staged on the rebuilt state once commits work again.
#[actix::test]
async fn a_failed_commit_aborts_the_loads_queued_behind_it() {
    use pcx::context::{settings, Context};
    use pcx::core::model::Artifact;
    use pcx::store::journal::FaultyJournal;
    use std::sync::Arc;

    let (_s, config) = aot_config();
    std::fs::create_dir_all(&config.data_dir).unwrap();
    let journal = Arc::new(FaultyJournal::new(common::library::open_journal(
        &config.data_dir,
    )));
    let ctx = Context::with_journal(journal.clone(), settings(&config)).expect("opens");
    // The load is still with the plugin thread when the save's failure is back.
    ctx.record_artifact(Artifact {
        key: "a1".into(),
        kind: "example.aot_bundle".into(),
        content: large_bundle(),
    })
    .await
    .expect("recorded");
    ctx.record_dynamo_cache_entry("B", entry_of(&["a1"]))
        .await
        .expect("recorded");
    let before = ctx.state_digest().await.expect("digest").value;

    journal.fail_commits(true);
    let (saved, loaded) = futures::join!(
        async {
            let saved = ctx.save_to_dynamo_cache().await;
            // Commits work again while the load is with the plugin thread.
            journal.fail_commits(false);
            saved
        },
        // Finds B in the save staged just before it.
        ctx.load_cache_entry("B", None),
    );
    assert_eq!(saved.expect_err("the save fails").kind(), "save_failed");
    let Err(err) = loaded else {
        panic!("the load behind the failed save succeeded");
    };
    assert_eq!(err.kind(), "aborted", "{err}");
    assert_eq!(ctx.state_digest().await.expect("digest").value, before);
    let Err(miss) = ctx.load_cache_entry("B", None).await else {
        panic!("B was never saved, yet it loads");
    };
    assert_eq!(miss.kind(), "package_not_found", "{miss}");
    // And the log agrees.
    ctx.close().await.expect("closed");
    drop(journal);
    let ctx = Context::open(&config).expect("opens again");
    assert_eq!(ctx.state_digest().await.expect("digest").value, before);
    ctx.close().await.expect("closed");
}

// ---------------------------------------------------------------------------------------------
// 6. plugins that never return, constructors that crash or loop, files anyone could write

/// `pcx batch` with the plugin directory and a plugin call deadline of `deadline_ms`.
/// Through `pcx batch`: `c1` recorded under `kind`, forwarded by an entry, saved and loaded,
/// every answer ok; gives what the load deserialized for `c1`, and the run's stderr.
fn served_through_batch(s: &Setup, kind: &str, content: &[u8]) -> (Value, String) {
    let (answers, Run { stderr, .. }) = batch_with(
        s.pcx_plugins(&["batch"]),
        &[
            record_kind("c1", kind, content),
            record_forward("fwd", &["c1"]),
            save(),
            load("fwd"),
        ],
    );
    answers.iter().for_each(assert_ok);
    (answers[3]["deserialized"]["c1"].clone(), stderr)
}

fn batch_with_deadline(s: &Setup, deadline_ms: &str) -> Command {
    let mut cmd = s.pcx_plugins(&["batch"]);
    cmd.env("PCX_PLUGIN_CALL_TIMEOUT_MS", deadline_ms);
    cmd
}

/// Before: the plugin thread waited for the call forever, so the load's answer never came,
/// nor any answer after it (`pcx batch` hung; a server hung every client).
#[test]
fn a_plugin_call_that_never_returns_fails_with_plugin_failed_and_quarantines_the_plugin() {
    let s = Setup::new();
    s.c("c_upper");
    s.c("c_hang");
    // Recorded while the plugin behaves (pcx checks content at record).
    let mut behaving = batch_with_deadline(&s, "1000");
    behaving.env("FIXTURE_BEHAVE", "1");
    let (answers, _) = batch_with(
        behaving,
        &[
            record_kind("stuck", "c_hang", b"hang forever"),
            record_kind("fine", "c_hang", b"fine"),
            record_kind("u", "c_upper", b"upper"),
            record_forward("stuck_entry", &["stuck"]),
            record_forward("fine_entry", &["fine"]),
            record_forward("upper_entry", &["u"]),
            save(),
        ],
    );
    for a in &answers {
        assert_ok(a);
    }
    let (mut answers, Run { stderr, .. }) = batch_with(
        batch_with_deadline(&s, "1000"),
        &[
            // Its call never returns.
            load("stuck_entry"),
            // The plugin would serve this one, but it is quarantined now.
            load("fine_entry"),
            // Another plugin is not.
            load("upper_entry"),
            plugin_edit("fine", "append", b"!"),
            serialize("fine"),
            json!({"op": "stats"}),
        ],
    );
    // Indexed as when everything was one batch.
    answers.splice(0..0, std::iter::repeat_n(Value::Null, 7));
    let message = assert_failed(&answers[7], "plugin_failed");
    assert_contains(
        &message,
        &["c-hang 1.2.3", "`c_hang`", "1000 ms", "quarantined"],
    );
    for a in [&answers[8], &answers[10]] {
        let message = assert_failed(a, "plugin_failed");
        assert_contains(&message, &["c-hang", "quarantined until pcx restarts"]);
    }
    assert_ok(&answers[9]);
    assert_eq!(
        unb64(&answers[9]["deserialized"]["u"]["content_b64"]),
        b"UPPER"
    );
    assert_eq!(content_of(&answers[11]).unwrap(), b"fine");
    // The abandoned call failed; the quarantined ones were not made.
    let stats = &answers[12]["stats"];
    assert_eq!(
        (&stats["plugin_calls"], &stats["plugin_failures"]),
        (&json!(2), &json!(1)),
        "{stats}"
    );
    assert_contains(&stderr, &["c-hang", "quarantined"]);

    // The log holds only what was answered; the quarantine ends with the process.
    run(s.pcx(&["verify"]), b"").assert_success();
    let (answers, _) = batch_with(
        batch_with_deadline(&s, "1000"),
        &[load("fine_entry"), load("stuck_entry")],
    );
    assert_eq!(
        unb64(&answers[0]["deserialized"]["fine"]["content_b64"]),
        b"FINE"
    );
    assert_failed(&answers[1], "plugin_failed");
}

/// Before: the actor called the edit on its own thread and waited for it forever.
#[test]
fn a_plugin_edit_that_never_returns_fails_with_plugin_failed_and_changes_nothing() {
    let s = Setup::new();
    s.c("c_hang");
    // Recorded while the plugin behaves (pcx checks content at record).
    let mut behaving = batch_with_deadline(&s, "1000");
    behaving.env("FIXTURE_BEHAVE", "1");
    let (recorded, _) = batch_with(behaving, &[record_kind("stuck", "c_hang", b"hang on edit")]);
    let (mut answers, _) = batch_with(
        batch_with_deadline(&s, "1000"),
        &[
            plugin_edit("stuck", "append", b" and more"),
            serialize("stuck"),
            record_kind("after", "eager", b"served after"),
            plugin_edit("stuck", "append", b"!"),
        ],
    );
    answers.insert(0, recorded[0].clone());
    assert_ok(&answers[0]);
    let message = assert_failed(&answers[1], "plugin_failed");
    assert_contains(&message, &["c-hang", "`c_hang`", "1000 ms", "quarantined"]);
    assert_eq!(content_of(&answers[2]).unwrap(), b"hang on edit");
    assert_ok(&answers[3]);
    let message = assert_failed(&answers[4], "plugin_failed");
    assert_contains(&message, &["quarantined"]);
    // No edit was logged, and the log is whole.
    let history = run(s.pcx(&["history", "stuck"]), b"");
    assert_eq!(
        history.assert_success().answers().len(),
        1,
        "{}",
        history.stdout
    );
    run(s.pcx(&["verify"]), b"").assert_success();
}

/// How long `pcx serve` may take to exit after SIGTERM: its grace period (5 s) and a margin.
const STOP_BOUND: std::time::Duration = std::time::Duration::from_secs(15);

/// Before: SIGTERM never stopped the server. A plugin call that does not return held the
/// actor, which runs on the server's own thread, so the signal was never even looked at
/// (and a close would have waited for the call forever).
#[test]
fn sigterm_stops_the_server_while_a_plugin_call_hangs() {
    use std::io::{BufRead, Write};
    use std::process::Stdio;
    use std::time::{Duration, Instant};

    let s = Setup::new();
    s.c("c_hang");
    // Recorded while the plugin behaves (pcx checks content at record).
    let mut behaving = s.pcx_plugins(&["batch"]);
    behaving.env("FIXTURE_BEHAVE", "1");
    let (recorded, _) = batch_with(
        behaving,
        &[
            record_kind("stuck", "c_hang", b"hang forever"),
            record_forward("stuck_entry", &["stuck"]),
            save(),
        ],
    );
    for a in &recorded {
        assert_ok(a);
    }
    let socket = s.tmp.path().join("s.sock");
    let log = s.tmp.path().join("serve.log");
    let socket_arg = socket.to_str().unwrap();
    let mut serve = s.pcx_plugins(&["serve", "--socket", socket_arg]);
    // A deadline far beyond the test: only the shutdown can end the call.
    serve
        .env("PCX_PLUGIN_CALL_TIMEOUT_MS", "600000")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    let mut server = Guard(serve.spawn().expect("pcx serve starts"));
    let server_log = || std::fs::read_to_string(&log).unwrap_or_default();
    let started = Instant::now();
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        assert!(
            server.0.try_wait().unwrap().is_none(),
            "pcx serve exited: {}",
            server_log()
        );
        assert!(
            started.elapsed() < TIMEOUT,
            "pcx serve did not listen: {}",
            server_log()
        );
        std::thread::sleep(Duration::from_millis(10));
    }

    let mut client = pcx_cmd(&["client", "--socket", socket_arg]);
    client
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut client = Guard(client.spawn().expect("pcx client starts"));
    let mut input = client.0.stdin.take().unwrap();
    let (tx, answers) = std::sync::mpsc::channel();
    let stdout = client.0.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(serde_json::from_str::<Value>(&line).expect("a JSON answer"));
        }
    });
    let mut send = |requests: &[Value]| {
        input.write_all(lines(requests).as_bytes()).unwrap();
        input.flush().unwrap();
    };
    send(&[
        // Its call never returns...
        load("stuck_entry"),
        // ...and this waits for it on the actor's thread, which is the server's.
        plugin_edit("stuck", "append", b"!"),
    ]);
    while !server_log().contains("c-hang: never returning") {
        assert!(
            started.elapsed() < TIMEOUT,
            "the plugin call did not start: {}",
            server_log()
        );
        std::thread::sleep(Duration::from_millis(10));
    }

    server.signal("TERM");
    let Some(status) = server.wait_for(STOP_BOUND) else {
        panic!(
            "pcx serve did not exit within {STOP_BOUND:?} of SIGTERM while a plugin call hung\nlog: {}",
            server_log()
        );
    };
    assert_eq!(status.code(), Some(0), "log: {}", server_log());
    drop(input);
    assert!(
        client.wait_for(TIMEOUT).is_some(),
        "the client did not end with the server"
    );
    // What was left waiting for the plugin failed; nothing succeeded that did not happen.
    for answer in answers.try_iter() {
        assert_eq!(answer["ok"], false, "{answer}");
    }

    // Everything answered is in the log, whole.
    let (after, _) = batch_with(
        s.pcx(&["--no-plugins", "batch"]),
        &[serialize("stuck"), dump()],
    );
    assert_eq!(content_of(&after[0]).unwrap(), b"hang forever");
    run(s.pcx(&["verify"]), b"").assert_success();
}

/// `pcx plugins list` over the setup's plugin directory, with `env`: it must end by itself
/// with exit status 1 (a problem), listing only c-upper. Gives the problems.
fn list_refusing(s: &Setup, env: &[(&str, &str)]) -> Vec<String> {
    let mut cmd = s.pcx_plugins(&["plugins", "list"]);
    cmd.envs(env.iter().copied());
    let list = run(cmd, b"");
    assert_eq!(
        list.status.code(),
        Some(1),
        "pcx plugins list must report the problem and exit 1: {}\nstdout: {}\nstderr: {}",
        list.status,
        list.stdout,
        list.stderr
    );
    let answer = list.answer();
    assert_eq!(answer["plugins"][0]["name"], "c-upper", "{answer}");
    assert_eq!(answer["plugins"].as_array().unwrap().len(), 1, "{answer}");
    answer["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_string())
        .collect()
}

/// Before: `plugins list` and every command that opened the context loaded the library in
/// their own process and died with it (SIGABRT, SIGSEGV), without a word.
#[test]
fn a_library_whose_constructor_aborts_is_refused_with_a_message() {
    let s = Setup::new();
    s.c("c_upper");
    let abort = s.c("ctor_abort");
    let segv = s.c("ctor_segv");
    let problems = list_refusing(&s, &[]);
    assert_eq!(problems.len(), 2, "{problems:#?}");
    for (path, signal) in [
        (&abort, "signal 6 (SIGABRT)"),
        (&segv, "signal 11 (SIGSEGV)"),
    ] {
        let path = path.display().to_string();
        assert!(
            problems
                .iter()
                .any(|p| p.contains(&path) && p.contains(signal) && p.contains("not loaded")),
            "no problem names {path} and {signal}: {problems:#?}"
        );
    }
    // Everything else is served, as with any other broken plugin.
    let (c1, stderr) = served_through_batch(&s, "c_upper", b"served");
    assert_eq!(unb64(&c1["content_b64"]), b"SERVED");
    assert_contains(&stderr, &[&abort.display().to_string(), "SIGABRT"]);
}

/// Before: loading the library never returned, so neither did pcx.
#[test]
fn a_library_whose_constructor_never_returns_is_refused_after_the_deadline() {
    let s = Setup::new();
    s.c("c_upper");
    let looping = s.c("ctor_loop");
    let problems = list_refusing(&s, &[("PCX_PLUGIN_CALL_TIMEOUT_MS", "3000")]);
    assert_eq!(problems.len(), 1, "{problems:#?}");
    assert_contains(
        &problems[0],
        &[
            &looping.display().to_string(),
            "did not finish within 3000 ms",
            "not loaded",
        ],
    );
}

/// Loads the setup's plugin directory in this process: only c-upper may serve (when
/// `c_upper_loads`), and the problems are given.
fn problems_loading(s: &Setup, c_upper_loads: bool) -> Vec<PluginError> {
    let kinds = Kinds::load(&s.plugins(), usize::MAX);
    let names: Vec<&str> = kinds.plugins().iter().map(|p| p.name.as_str()).collect();
    let expected: &[&str] = if c_upper_loads { &["c-upper"] } else { &[] };
    assert_eq!(names, expected, "{:#?}", kinds.problems());
    kinds.problems().to_vec()
}

/// Before: a plugin directory anyone could write to was loaded from without a word.
#[test]
fn a_world_writable_plugin_directory_is_refused() {
    let s = Setup::new();
    s.c("c_upper");
    let dir = s.plugins().canonicalize().unwrap();
    for (mode, by) in [
        (0o777, "its group and everyone"),
        (0o1777, "its group and everyone"),
        (0o757, "everyone"),
        (0o775, "its group"),
    ] {
        chmod(&s.plugins(), mode);
        let problems = problems_loading(&s, false);
        assert_eq!(
            problems,
            [PluginError::Writable {
                what: "plugin directory",
                path: dir.clone(),
                mode,
                by
            }]
        );
        assert_contains(
            &problems[0].to_string(),
            &[&dir.display().to_string(), &format!("mode {mode:04o}")],
        );
    }
    let list = run(s.pcx_plugins(&["plugins", "list"]), b"");
    assert_eq!(list.status.code(), Some(1), "{}", list.stderr);
    let answer = list.answer();
    assert_eq!(answer["plugins"], json!([]), "{answer}");
    assert_contains(
        answer["problems"][0].as_str().unwrap(),
        &[&dir.display().to_string(), "mode 0775", "writable"],
    );
}

/// Before: such a library was loaded like any other.
#[test]
fn a_world_writable_plugin_library_is_refused() {
    let s = Setup::new();
    s.c("c_upper");
    let bad = s.install(c_fixture("c_upper_dup"), "libwritable.so");
    for (mode, by) in [(0o757, "everyone"), (0o775, "its group")] {
        chmod(&bad, mode);
        assert_eq!(
            problems_loading(&s, true),
            [PluginError::Writable {
                what: "plugin",
                path: bad.clone(),
                mode,
                by
            }]
        );
    }
    // Reached through a directory below the plugin directory that anyone can write to.
    chmod(&bad, 0o755);
    let sub = s.plugins().join("sub");
    std::fs::create_dir(&sub).unwrap();
    chmod(&sub, 0o777);
    std::fs::rename(&bad, sub.join("libwritable.so")).unwrap();
    std::os::unix::fs::symlink(sub.join("libwritable.so"), s.plugins().join("liblink.so")).unwrap();
    let problems = problems_loading(&s, true);
    assert_eq!(problems.len(), 1, "{problems:#?}");
    assert_contains(
        &problems[0].to_string(),
        &[
            &sub.canonicalize().unwrap().display().to_string(),
            "mode 0777",
        ],
    );
    let problems = list_refusing(&s, &[]);
    assert_contains(
        &problems[0],
        &["mode 0777", "writable by its group and everyone"],
    );
}

/// Before: such a library was loaded like any other. Changing a file's owner needs root (as
/// CI runs): elsewhere the test says so and checks nothing.
#[test]
fn a_plugin_library_owned_by_another_user_is_refused() {
    const NOBODY: u32 = 65534;
    let s = Setup::new();
    s.c("c_upper");
    let bad = s.install(c_fixture("c_upper_dup"), "libforeign.so");
    if let Err(e) = std::os::unix::fs::chown(&bad, Some(NOBODY), None) {
        assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied, "{e}");
        eprintln!("skipped: changing a file's owner needs root ({e})");
        return;
    }
    let problems = problems_loading(&s, true);
    assert!(
        matches!(
            &problems[..],
            [PluginError::ForeignOwner { what: "plugin", path, mode: 0o755, owner: NOBODY, .. }] if *path == bad
        ),
        "{problems:#?}"
    );
    assert_contains(
        &problems[0].to_string(),
        &[&bad.display().to_string(), "uid 65534", "mode 0755"],
    );
    let problems = list_refusing(&s, &[]);
    assert_contains(&problems[0], &["libforeign.so", "owned by uid 65534"]);

    // A plugin directory owned by another user refuses everything in it.
    std::fs::remove_file(&bad).unwrap();
    std::os::unix::fs::chown(s.plugins(), Some(NOBODY), None).unwrap();
    let problems = problems_loading(&s, false);
    assert_eq!(problems.len(), 1, "{problems:#?}");
    assert_contains(
        &problems[0].to_string(),
        &["plugin directory", "owned by uid 65534", "mode 0755"],
    );
}
