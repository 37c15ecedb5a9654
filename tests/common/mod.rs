//! Helpers shared by the integration tests. Each test binary compiles its own copy and uses
//! only some of it.
//!
//! - here: running processes with a timeout ([`run`], [`Run`], [`Guard`]), the `pcx` command
//!   with a clean environment ([`pcx`]), building fixture crates ([`build_cdylib`]);
//! - [`protocol`]: `pcx` as its users drive it: JSON requests and answers, `pcx batch` and the
//!   single-shot CLI commands;
//! - [`library`]: the library ([`pcx::Context`]) and the sled database under a data directory,
//!   and which backend the suite runs on (`PCX_TEST_SUITE_JOURNAL`);
//! - [`pg_damage`]: damage to a journal in PostgreSQL, made with SQL.
#![allow(dead_code)]

pub mod library;
pub mod pg_damage;
pub mod protocol;

use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
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
    /// The command, for messages: its program's file name and its arguments.
    pub what: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// Every stdout line, parsed as JSON.
    pub fn answers(&self) -> Vec<Value> {
        self.stdout
            .lines()
            .map(|l| {
                serde_json::from_str(l).unwrap_or_else(|e| {
                    panic!("{}: an output line is not JSON ({e}): {l}", self.what)
                })
            })
            .collect()
    }

    /// The one JSON answer of a single-shot command.
    pub fn answer(&self) -> Value {
        let mut answers = self.answers();
        assert_eq!(
            answers.len(),
            1,
            "{}: one answer line expected; stdout: {}\nstderr: {}",
            self.what,
            self.stdout,
            self.stderr
        );
        answers.remove(0)
    }

    /// Checks the process exited 0.
    pub fn assert_success(&self) -> &Run {
        assert!(
            self.status.success(),
            "{} failed: {}\nstdout: {}\nstderr: {}",
            self.what,
            self.status,
            self.stdout,
            self.stderr
        );
        self
    }

    /// Checks the process neither panicked nor was killed by a signal.
    pub fn assert_no_panic(&self) -> &Run {
        assert!(
            !self.stderr.contains("panicked"),
            "{} panicked: {}",
            self.what,
            self.stderr
        );
        assert!(
            self.status.code().is_some(),
            "{} was killed by a signal: {}",
            self.what,
            self.status
        );
        self
    }
}

/// A command as messages name it: its program's file name and its arguments.
pub fn describe(cmd: &Command) -> String {
    let program = Path::new(cmd.get_program())
        .file_name()
        .unwrap_or(cmd.get_program())
        .to_string_lossy()
        .into_owned();
    std::iter::once(program)
        .chain(cmd.get_args().map(|a| a.to_string_lossy().into_owned()))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Reads a pipe to its end on its own thread; the text must be UTF-8.
pub fn drain(mut pipe: impl Read + Send + 'static) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut text = String::new();
        pipe.read_to_string(&mut text)
            .expect("the output is readable and UTF-8");
        text
    })
}

/// Waits up to `limit` for `child` to exit; `None` if it is still running then.
pub fn wait_for(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// Waits for `child`, killing it (and failing the test) after `timeout`.
pub fn wait(child: &mut Child, timeout: Duration, what: &str) -> ExitStatus {
    wait_for(child, timeout).unwrap_or_else(|| {
        let _ = child.kill();
        let _ = child.wait();
        panic!("{what} did not finish within {timeout:?}");
    })
}

/// Runs `cmd` with `input` on stdin, waiting at most `timeout`.
pub fn run_with(mut cmd: Command, input: &[u8], timeout: Duration) -> Run {
    let what = describe(&cmd);
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
        what,
        status,
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    }
}

/// Runs `cmd` with `input` on stdin, waiting at most [`TIMEOUT`].
pub fn run(cmd: Command, input: &[u8]) -> Run {
    run_with(cmd, input, TIMEOUT)
}

/// A child process that is killed (SIGKILL) and reaped when dropped, so that a failing test
/// leaves none behind.
pub struct Guard(pub Child);

impl Drop for Guard {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

impl Guard {
    /// Waits up to `limit` for the process to exit.
    pub fn wait_for(&mut self, limit: Duration) -> Option<ExitStatus> {
        wait_for(&mut self.0, limit)
    }

    /// Sends a signal by name (`TERM`, `INT`) with kill(1).
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args(["-s", name, &self.0.id().to_string()])
            .status()
            .expect("kill(1) runs");
        assert!(status.success(), "kill -s {name} failed: {status}");
    }
}

// ---------------------------------------------------------------------------------------------
// the pcx binary

/// `pcx ARGS…` with an environment free of the caller's `PCX_*` and `RUST_LOG`.
pub fn pcx_cmd(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pcx"));
    for (name, _) in std::env::vars_os() {
        let text = name.to_string_lossy();
        if text.starts_with("PCX_") || text == "RUST_LOG" {
            cmd.env_remove(&name);
        }
    }
    cmd.args(args);
    cmd
}

/// `pcx --data-dir DIR ARGS…`, as [`pcx_cmd`], on the suite's backend: with
/// `PCX_TEST_SUITE_JOURNAL=postgres`, the PostgreSQL journal that stands for DIR
/// ([`library::suite_env`]).
pub fn pcx(dir: &Path, args: &[&str]) -> Command {
    let mut cmd = pcx_cmd(&[]);
    cmd.envs(library::suite_env(dir));
    cmd.arg("--data-dir").arg(dir).args(args);
    cmd
}

/// Limits `cmd`'s process to `n` open file descriptors (soft and hard).
pub fn with_descriptor_limit(cmd: &mut Command, n: u64) {
    with_limit(cmd, libc::RLIMIT_NOFILE, n);
}

/// Limits `cmd`'s process to `bytes` of address space (soft and hard), as `ulimit -v` does, or a
/// host with `vm.overcommit_memory = 2` behaves once its commit limit is near.
pub fn with_address_space_limit(cmd: &mut Command, bytes: u64) {
    with_limit(cmd, libc::RLIMIT_AS, bytes);
}

/// Sets one resource limit (soft and hard) of `cmd`'s process before it runs.
pub fn with_limit(cmd: &mut Command, resource: libc::__rlimit_resource_t, value: u64) {
    // SAFETY: the closure only calls setrlimit, which is async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            let limit = libc::rlimit {
                rlim_cur: value as libc::rlim_t,
                rlim_max: value as libc::rlim_t,
            };
            if libc::setrlimit(resource, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

// ---------------------------------------------------------------------------------------------
// values

/// A small seeded generator (splitmix64), so "random" moments are the same every run.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Owned (key, value) pairs, to compare with.
pub fn pairs(items: &[(&str, &str)]) -> Vec<(String, String)> {
    items
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
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

/// The example plugin `plugins/aot-bundle` (kind `example.aot_bundle`).
pub fn aot_bundle() -> &'static Path {
    static LIB: OnceLock<PathBuf> = OnceLock::new();
    LIB.get_or_init(|| {
        build_cdylib(
            &repo().join("plugins/aot-bundle/Cargo.toml"),
            &scratch().join("aot-bundle"),
        )
    })
}
