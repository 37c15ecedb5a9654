//! Helpers shared by the integration tests that run processes and build fixture crates.
//! Each test binary compiles its own copy and uses only some of it.
#![allow(dead_code)]

use std::ffi::OsString;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// How long one pcx process may take.
pub const TIMEOUT: Duration = Duration::from_secs(60);
/// How long building one fixture may take (a cold build on a small machine).
pub const BUILD_TIMEOUT: Duration = Duration::from_secs(1200);

// ---------------------------------------------------------------------------------------------
// processes

/// What a finished process gave.
pub struct Run {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn answers(&self) -> Vec<Value> {
        self.stdout
            .lines()
            .map(|l| {
                serde_json::from_str(l).unwrap_or_else(|e| panic!("answer is not JSON ({e}): {l}"))
            })
            .collect()
    }

    /// The one JSON answer of a single-shot command.
    pub fn answer(&self) -> Value {
        let mut answers = self.answers();
        assert_eq!(answers.len(), 1, "one answer line; stdout: {}", self.stdout);
        answers.remove(0)
    }
}

pub fn drain(mut pipe: impl Read + Send + 'static) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

/// Waits for `child`, killing it (and failing the test) after `timeout`.
pub fn wait(child: &mut Child, timeout: Duration, what: &str) -> ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not finish within {timeout:?}");
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Runs `cmd` with `input` on stdin, waiting at most `timeout`.
pub fn run_with(mut cmd: Command, input: &[u8], timeout: Duration) -> Run {
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{what} does not start: {e}"));
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    let writer = thread::spawn(move || {
        // The process may stop reading early; a broken pipe is then not this test's failure.
        let _ = stdin.write_all(&input);
    });
    let stdout = drain(child.stdout.take().unwrap());
    let stderr = drain(child.stderr.take().unwrap());
    let status = wait(&mut child, timeout, &what);
    writer.join().unwrap();
    Run {
        status,
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    }
}

pub fn run(cmd: Command, input: &[u8]) -> Run {
    run_with(cmd, input, TIMEOUT)
}

// ---------------------------------------------------------------------------------------------
// building fixtures

pub fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

pub fn fixtures() -> PathBuf {
    repo().join("tests/fixtures/plugins")
}

/// Where fixtures are built: never the main target directory.
pub fn scratch() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("plugin-fixtures")
}

pub fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo")))
}

/// `cargo build` of the crate at `manifest` into `target_dir`, with `extra` arguments.
pub fn cargo_build(manifest: &Path, target_dir: &Path, extra: &[&str]) -> Run {
    let mut cmd = cargo();
    cmd.arg("build")
        .arg("--manifest-path")
        .arg(manifest)
        .arg("--target-dir")
        .arg(target_dir)
        .args(extra);
    run_with(cmd, b"", BUILD_TIMEOUT)
}

/// Builds the cdylib of the crate at `manifest` and gives its path, as cargo reports it.
pub fn build_cdylib(manifest: &Path, target_dir: &Path) -> PathBuf {
    let out = cargo_build(manifest, target_dir, &["--message-format=json"]);
    assert!(
        out.status.success(),
        "building {} failed ({}):\n{}\n{}",
        manifest.display(),
        out.status,
        out.stderr,
        out.stdout
    );
    let mut libraries = Vec::new();
    for line in out.stdout.lines() {
        let Ok(message) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        let is_cdylib = message["target"]["kind"]
            .as_array()
            .is_some_and(|k| k.contains(&json!("cdylib")));
        if message["reason"] != "compiler-artifact" || !is_cdylib {
            continue;
        }
        for file in message["filenames"].as_array().into_iter().flatten() {
            let file = file.as_str().expect("file names are strings");
            if file.ends_with(std::env::consts::DLL_SUFFIX) {
                libraries.push(PathBuf::from(file));
            }
        }
    }
    assert_eq!(
        libraries.len(),
        1,
        "one cdylib from {}: {libraries:?}",
        manifest.display()
    );
    libraries.remove(0)
}

/// The example plugin `plugins/aot-bundle` (kind `bundled_aot_autograd`).
pub fn aot_bundle() -> &'static Path {
    static LIB: OnceLock<PathBuf> = OnceLock::new();
    LIB.get_or_init(|| {
        build_cdylib(
            &repo().join("plugins/aot-bundle/Cargo.toml"),
            &scratch().join("aot-bundle"),
        )
    })
}
