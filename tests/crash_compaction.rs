//! Compaction and import against crashes and against other commands (issue 14, items 1 and 3).
//!
//! `pcx compact` and `pcx import` write a new data directory beside the old one and swap it
//! in with two renames, holding the directory's lock (`DIR.lock`) throughout; every open takes
//! the same lock before it settles an interrupted swap. Here every command is started at every
//! step of a compaction, `compact` and `import` are SIGKILLed at every step and at random
//! moments, and hand-made crash states are opened; after each, `verify` must be clean and
//! every acknowledged change still there.
//!
//! The steps are reached with the binary's test hook: `PCX_TEST_PAUSE=STEP` makes a
//! compaction or import create `PCX_TEST_PAUSE_FILE` at STEP and wait until it is removed.
//! A command started meanwhile logs (at info, target `pcx::store::swap`) that it waits for the lock:
//! the test resumes the compaction once it has said so (or after a second, when it does not).
//!
//! Logs are small (hundreds of events) so each round is cheap; every wait is bounded.
//! `PCX_CRASH_SEED` replays the random rounds of a failed run (its seed is in the message).

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

mod common;
use common::protocol::{b64, lines, record};
use common::*;

/// How long one pcx process of these tests may take.
const LIMIT: Duration = Duration::from_secs(30);

/// The steps of a compaction, in order (see `pcx::store::swap::pause_point`).
const COMPACT_STEPS: [&str; 6] = [
    "compact:locked",
    "compact:writing",
    "swap:marked",
    "swap:moved-aside",
    "swap:moved-in",
    "swap:done",
];

/// The steps of an import, in order.
const IMPORT_STEPS: [&str; 5] = [
    "import:writing",
    "swap:marked",
    "swap:moved-aside",
    "swap:moved-in",
    "swap:done",
];

/// What a command waiting for the lock logs.
const WAITING: &str = "locked by another pcx process; waiting";

/// Where a swap and the lock put things beside `dir`.
fn beside(dir: &Path, suffix: &str) -> PathBuf {
    let mut name = dir.file_name().unwrap().to_os_string();
    name.push(suffix);
    dir.with_file_name(name)
}

/// Side directories left beside `dir`. (Not the lock file: a killed holder leaves it, and it
/// is simply taken again.)
fn leftovers(dir: &Path) -> Vec<PathBuf> {
    [".compacting", ".pre-compaction", ".importing"]
        .iter()
        .map(|s| beside(dir, s))
        .filter(|p| p.exists())
        .collect()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// the log the rounds start from

/// A closed data directory holding `events` acknowledged events, and what `verify` says of it.
struct Base {
    dir: PathBuf,
    last_seq: u64,
    digest: Value,
    /// Its export (inline content).
    export: PathBuf,
}

/// Records (some of 3 KiB), edits and takes over 25 keys: content that compaction keeps and
/// content it drops.
fn base(root: &Path, events: u64) -> Base {
    let dir = root.join("base");
    let mut requests = Vec::new();
    for i in 0..events {
        let key = format!("k{}", i % 25);
        requests.push(match i % 10 {
            3 => json!({"op":"edit_artifact","key":key,"edit":{"append_b64":b64(format!("+{i}"))}}),
            7 if i > 25 => json!({"op":"take_artifact","key":key}),
            5 => record(
                &key,
                format!("content {i} ").repeat(if i % 20 == 5 { 300 } else { 2 }),
            ),
            _ => record(&key, format!("content {i}")),
        });
    }
    let answers = common::protocol::batch(&dir, &requests);
    let acked = answers.iter().filter(|a| a["seq"].is_u64()).count() as u64;
    let facts = verify(&dir);
    assert_eq!(facts["last_seq"], json!(acked), "{facts}");
    let export = root.join("base.jsonl");
    cli_ok(&dir, &["export", "--output", export.to_str().unwrap()]);
    Base {
        dir,
        last_seq: acked,
        digest: facts["state_digest"].clone(),
        export,
    }
}

fn cli_run(dir: &Path, args: &[&str]) -> Run {
    let out = run_with(pcx(dir, args), b"", LIMIT);
    out.assert_no_panic();
    out
}

fn cli_ok(dir: &Path, args: &[&str]) {
    let out = cli_run(dir, args);
    out.assert_success();
}

/// `pcx verify`, which must pass; gives its summary.
fn verify(dir: &Path) -> Value {
    let out = cli_run(dir, &["verify"]);
    assert!(
        out.status.success(),
        "verify of {} failed: {}{}",
        dir.display(),
        out.stdout,
        out.stderr
    );
    let v = out.answer();
    assert_eq!(v["ok"], json!(true), "{v}");
    v
}

// ---------------------------------------------------------------------------------------------
// processes

/// A running pcx process whose stderr is watched line by line.
struct Proc {
    what: String,
    child: Guard,
    stdout: thread::JoinHandle<String>,
    stderr: Arc<Mutex<String>>,
    stderr_lines: Receiver<String>,
    stderr_done: thread::JoinHandle<()>,
}

fn spawn(mut cmd: Command, input: &str) -> Proc {
    let what = describe(&cmd);
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{what} does not start: {e}"));
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_string();
    thread::spawn(move || {
        let _ = stdin.write_all(input.as_bytes());
    });
    let stdout = drain(child.stdout.take().unwrap());
    let err = child.stderr.take().unwrap();
    let stderr = Arc::new(Mutex::new(String::new()));
    let (tx, stderr_lines) = mpsc::channel();
    let all = stderr.clone();
    let stderr_done = thread::spawn(move || {
        for line in BufReader::new(err).lines() {
            let Ok(line) = line else { break };
            all.lock().unwrap().push_str(&format!("{line}\n"));
            let _ = tx.send(line);
        }
    });
    Proc {
        what,
        child: Guard(child),
        stdout,
        stderr,
        stderr_lines,
        stderr_done,
    }
}

impl Proc {
    /// Waits (at most `limit`) for a stderr line containing `needle`; false if the process
    /// ended or the time ran out first.
    fn says(&self, needle: &str, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stderr_lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return true,
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => return false,
            }
        }
    }

    fn kill(&mut self) {
        let _ = self.child.0.kill();
    }

    /// Waits for the end (at most [`LIMIT`]: a hang fails the test).
    fn finish(mut self) -> Run {
        let status = self.child.wait_for(LIMIT).unwrap_or_else(|| {
            panic!(
                "{} hung: still running after {LIMIT:?}; stderr so far: {}",
                self.what,
                self.stderr.lock().unwrap()
            )
        });
        let stdout = self.stdout.join().unwrap();
        self.stderr_done.join().unwrap();
        let stderr = self.stderr.lock().unwrap().clone();
        Run {
            what: self.what,
            status,
            stdout,
            stderr,
        }
    }
}

/// `pcx compact` or `pcx import` stopped at `step`: started, and waited for until it is there.
fn start_paused(mut cmd: Command, step: &str, pause: &Path) -> Proc {
    cmd.env("PCX_TEST_PAUSE", step)
        .env("PCX_TEST_PAUSE_FILE", pause);
    let proc = spawn(cmd, "");
    let deadline = Instant::now() + LIMIT;
    while !pause.exists() {
        if Instant::now() >= deadline {
            panic!("{} did not reach step {step} within {LIMIT:?}", proc.what);
        }
        thread::sleep(Duration::from_millis(2));
        if stopped(&proc) {
            let run = proc.finish();
            panic!(
                "{} ended before step {step}: {}\nstdout: {}\nstderr: {}",
                run.what, run.status, run.stdout, run.stderr
            );
        }
    }
    proc
}

/// Whether the process has exited (a zombie not reaped yet, or gone).
fn stopped(proc: &Proc) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", proc.child.0.id()));
    match stat {
        Ok(s) => s
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
        Err(_) => true,
    }
}

/// SIGKILLs a paused or running process and reaps it.
fn kill(mut proc: Proc) {
    proc.kill();
    let _ = proc.finish();
}

// ---------------------------------------------------------------------------------------------
// the other commands

/// A command run against a data directory while it is compacted: what it is, its stdin, and
/// what its answer must be when it ran (rather than being refused as "in use").
struct Other {
    name: &'static str,
    args: Vec<String>,
    input: String,
    /// Keys it records (each one acknowledged event).
    writes: Vec<String>,
}

fn others(round: &Path, base: &Base, before: u64) -> Vec<Other> {
    let s = |v: &[&str]| v.iter().map(|a| a.to_string()).collect::<Vec<_>>();
    let writes: Vec<String> = (0..3).map(|i| format!("raced-{i}")).collect();
    let batch_input = lines(
        &writes
            .iter()
            .map(|k| record(k, format!("written while compacting {k}")))
            .collect::<Vec<_>>(),
    );
    let export = round.join("raced.jsonl");
    let socket = round.join("pcx.sock");
    vec![
        Other {
            name: "log",
            args: s(&["log", "--limit", "1"]),
            input: String::new(),
            writes: vec![],
        },
        Other {
            name: "verify",
            args: s(&["verify"]),
            input: String::new(),
            writes: vec![],
        },
        Other {
            name: "state",
            args: s(&["state"]),
            input: String::new(),
            writes: vec![],
        },
        Other {
            name: "history",
            args: s(&["history", "k3"]),
            input: String::new(),
            writes: vec![],
        },
        Other {
            name: "export",
            args: vec![
                "export".into(),
                "--output".into(),
                export.display().to_string(),
            ],
            input: String::new(),
            writes: vec![],
        },
        Other {
            name: "batch",
            args: s(&["batch"]),
            input: batch_input,
            writes,
        },
        Other {
            name: "debug-info",
            args: s(&["debug-info"]),
            input: String::new(),
            writes: vec![],
        },
        Other {
            name: "compact",
            args: vec![
                "compact".into(),
                "--before".into(),
                (before + 20).to_string(),
            ],
            input: String::new(),
            writes: vec![],
        },
        Other {
            name: "import",
            args: vec![
                "import".into(),
                "--input".into(),
                base.export.display().to_string(),
            ],
            input: String::new(),
            writes: vec![],
        },
        Other {
            name: "serve",
            args: vec![
                "serve".into(),
                "--socket".into(),
                socket.display().to_string(),
            ],
            input: String::new(),
            writes: vec![],
        },
    ]
}

/// Starts `other` on `dir`, logging its wait for the lock.
fn start_other(dir: &Path, other: &Other) -> Proc {
    let args: Vec<&str> = other.args.iter().map(String::as_str).collect();
    let mut cmd = pcx(dir, &args);
    cmd.env("PCX_LOG_FILTER", "warn,pcx::store::swap=info");
    spawn(cmd, &other.input)
}

/// Lets `other` finish (a server is told to stop once it listens) and checks what it said.
/// Gives the keys it wrote; a clean "in use" refusal (it waited longer than the lock's
/// patience) wrote none.
fn finish_other(
    proc: Proc,
    other: &Other,
    round: &Path,
    base: &Base,
    context: &str,
) -> Vec<String> {
    if other.name == "serve" {
        let socket = round.join("pcx.sock");
        let deadline = Instant::now() + LIMIT;
        while !socket.exists() && !stopped(&proc) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
        if socket.exists() {
            proc.child.signal("TERM");
        }
    }
    let run = proc.finish();
    run.assert_no_panic();
    if other.name == "import" {
        // Into a directory that holds a log: refused, whether it waited or not.
        assert!(
            run.stdout.contains("already holds a log") || run.stdout.contains("in use"),
            "{context}: {} answered {}\nstderr: {}",
            run.what,
            run.stdout,
            run.stderr
        );
        return vec![];
    }
    if !run.status.success() {
        let refused = run.stdout.contains("in use") || run.stderr.contains("in use");
        assert!(
            refused,
            "{context}: {} failed other than by waiting too long for the lock: {}\nstdout: {}\nstderr: {}",
            run.what, run.status, run.stdout, run.stderr
        );
        return vec![];
    }
    let answers = run.answers();
    let what = format!("{context}: {}", run.what);
    match other.name {
        "log" => {
            assert_eq!(answers.len(), 1, "{what}: {answers:?}");
            assert!(answers[0]["seq"].is_u64(), "{what}: {answers:?}");
        }
        "verify" => {
            assert_eq!(answers[0]["ok"], json!(true), "{what}: {answers:?}");
            assert_eq!(answers[0]["last_seq"], json!(base.last_seq), "{what}");
            assert_eq!(answers[0]["state_digest"], base.digest, "{what}");
        }
        "state" => {
            assert_eq!(
                answers[0]["seq"],
                json!(base.last_seq),
                "{what}: {answers:?}"
            );
            assert_eq!(answers[0]["state_digest"], base.digest, "{what}");
        }
        "history" => assert!(!answers.is_empty(), "{what}: no history of k3"),
        "export" => {
            let text = std::fs::read_to_string(round.join("raced.jsonl")).unwrap();
            let end: Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
            assert_eq!(end["last_seq"], json!(base.last_seq), "{what}: {end}");
            assert_eq!(end["state_digest"], base.digest, "{what}: {end}");
        }
        "batch" => {
            assert_eq!(answers.len(), other.writes.len(), "{what}: {answers:?}");
            for a in &answers {
                assert_eq!(a["ok"], json!(true), "{what}: {a}");
            }
            return other.writes.clone();
        }
        "debug-info" => assert_eq!(answers[0]["ok"], json!(true), "{what}: {answers:?}"),
        "compact" => assert_eq!(answers[0]["ok"], json!(true), "{what}: {answers:?}"),
        "serve" => {}
        other => unreachable!("{other}"),
    }
    vec![]
}

/// What `pcx verify` and `pcx state` say of `dir`, asked through the library (the same code,
/// without a process each): (verify's summary, the state).
fn verify_and_state(dir: &Path, context: &str) -> (Value, Value) {
    use pcx::audit::query::Query;
    let journal =
        pcx::store::sled_journal::SledJournal::open_existing(dir, common::library::CACHE_BYTES)
            .unwrap_or_else(|e| panic!("{context}: opening {}: {e}", dir.display()));
    let ask = |q: Query| {
        q.run(&journal, &mut |_| {})
            .unwrap_or_else(|e| panic!("{context}: {e}"))
    };
    let v = ask(Query::Verify)["verify"].clone();
    let state = ask(Query::State {
        at: None,
        at_time: None,
        key: None,
        within: Default::default(),
    })["state"]
        .clone();
    assert_eq!(v["ok"], json!(true), "{context}: verify: {v}");
    (v, state)
}

/// After a round: the log holds every event of the base log and every acknowledged write,
/// `verify` passes, and nothing is left beside the directory. Gives `verify`'s summary.
fn assert_log_whole(dir: &Path, base: &Base, written: &[String], context: &str) -> Value {
    let (v, state) = verify_and_state(dir, context);
    assert_eq!(
        v["last_seq"],
        json!(base.last_seq + written.len() as u64),
        "{context}: events were lost: {v}"
    );
    if written.is_empty() {
        assert_eq!(
            v["state_digest"], base.digest,
            "{context}: the state changed: {v}"
        );
    } else {
        let keys: BTreeSet<&str> = state["artifacts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["key"].as_str().unwrap())
            .collect();
        for k in written {
            assert!(
                keys.contains(k.as_str()),
                "{context}: acknowledged {k} is gone"
            );
        }
    }
    assert!(
        leftovers(dir).is_empty(),
        "{context}: left beside the directory: {:?}",
        leftovers(dir)
    );
    v
}

// ---------------------------------------------------------------------------------------------
// random numbers for the random rounds

struct Rng(u64);

impl Rng {
    fn seeded() -> (Rng, u64) {
        let seed = std::env::var("PCX_CRASH_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
            });
        (Rng(seed | 1), seed)
    }

    fn below(&mut self, n: u64) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n.max(1)
    }
}

/// How long `cmd` takes from spawn to exit (on a fresh copy), and a tenth more: the random
/// kills and starts spread over it, and a few land after it ended.
fn duration_of(cmd: Command) -> Duration {
    let started = Instant::now();
    run_with(cmd, b"", LIMIT).assert_success();
    started.elapsed() * 11 / 10
}

// ---------------------------------------------------------------------------------------------
// 1. commands started during a compaction

#[test]
fn a_command_started_while_compact_finishes_does_not_destroy_the_log() {
    let tmp = tempfile::tempdir().unwrap();
    let base = base(tmp.path(), 120);
    let before = 60u64;
    let mut problems = Vec::new();
    let mut n = 0;
    let names: Vec<&str> = others(tmp.path(), &base, before)
        .iter()
        .map(|o| o.name)
        .collect();
    for step in COMPACT_STEPS {
        for name in &names {
            n += 1;
            let round = tmp.path().join(format!("r{n}"));
            let dir = round.join("data");
            copy_dir(&base.dir, &dir);
            let others = others(&round, &base, before);
            let other = others.iter().find(|o| o.name == *name).unwrap();
            let context = format!("`{}` started at compaction step {step}", other.name);
            let pause = round.join("pause");
            let compact = start_paused(
                pcx(&dir, &["compact", "--before", &before.to_string()]),
                step,
                &pause,
            );
            let proc = start_other(&dir, other);
            // Resume once it waits for the lock (or, when it does not wait, after a second).
            let waited = proc.says(WAITING, Duration::from_secs(1));
            std::fs::remove_file(&pause).unwrap();
            let compacted = compact.finish();
            let written = finish_other(proc, other, &round, &base, &context);
            if !waited {
                problems.push(format!(
                    "{context}: it did not wait for the compaction's lock"
                ));
            }
            compacted.assert_no_panic();
            let answer = compacted.answers().pop().unwrap_or(Value::Null);
            if answer["ok"] != json!(true) {
                problems.push(format!("{context}: compact answered {answer}"));
            }
            let v = assert_log_whole(&dir, &base, &written, &context);
            assert!(
                v["anchored_at"].as_u64() >= Some(before - 1),
                "{context}: the compaction did not happen: {v}"
            );
            std::fs::remove_dir_all(&round).unwrap();
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn commands_racing_a_compaction_at_random_moments_never_lose_the_log() {
    let tmp = tempfile::tempdir().unwrap();
    let base = base(tmp.path(), 120);
    let before = 60u64;
    let probe = tmp.path().join("probe");
    copy_dir(&base.dir, &probe);
    let took = duration_of(pcx(&probe, &["compact", "--before", &before.to_string()]));
    let (mut rng, seed) = Rng::seeded();
    let kinds = others(tmp.path(), &base, before).len() as u64;
    for n in 0..40u64 {
        let round = tmp.path().join(format!("r{n}"));
        let dir = round.join("data");
        copy_dir(&base.dir, &dir);
        let others = others(&round, &base, before);
        let other = &others[(n % kinds) as usize];
        let delay = Duration::from_micros(rng.below(took.as_micros() as u64 + 1));
        let context = format!(
            "seed {seed}, round {n}: `{}` started {delay:?} after compact",
            other.name
        );
        let compact = spawn(pcx(&dir, &["compact", "--before", &before.to_string()]), "");
        thread::sleep(delay);
        let proc = start_other(&dir, other);
        let compacted = compact.finish();
        let written = finish_other(proc, other, &round, &base, &context);
        compacted.assert_no_panic();
        let answer = compacted.answers().pop().unwrap_or(Value::Null);
        // Either it ran, or the other command had the lock first and it was refused cleanly
        // ("in use"), or the other command compacted first ("nothing to compact").
        let fine = answer["ok"] == json!(true)
            || answer.to_string().contains("in use")
            || (other.name == "compact" && answer.to_string().contains("nothing to compact"));
        assert!(fine, "{context}: compact answered {answer}");
        assert_log_whole(&dir, &base, &written, &context);
        std::fs::remove_dir_all(&round).unwrap();
    }
}

// ---------------------------------------------------------------------------------------------
// 2. a killed compaction

#[test]
fn a_compaction_killed_at_any_step_leaves_the_old_log_or_the_new() {
    let tmp = tempfile::tempdir().unwrap();
    let base = base(tmp.path(), 120);
    let before = 60u64;
    let reads: [&[&str]; 2] = [&["log", "--limit", "1"], &["debug-info"]];
    // Deterministic: at each step, then the first open after it.
    for (i, step) in COMPACT_STEPS.iter().enumerate() {
        for (j, first) in reads.iter().enumerate() {
            let round = tmp.path().join(format!("s{i}-{j}"));
            let dir = round.join("data");
            copy_dir(&base.dir, &dir);
            let pause = round.join("pause");
            kill(start_paused(
                pcx(&dir, &["compact", "--before", &before.to_string()]),
                step,
                &pause,
            ));
            let context = format!("compact killed at {step}, then `{}`", first.join(" "));
            let out = cli_run(&dir, first);
            assert!(
                out.status.success(),
                "{context}: {}\n{}",
                out.stdout,
                out.stderr
            );
            let v = assert_log_whole(&dir, &base, &[], &context);
            // Before the old copy is moved aside the old log stays; from then on the new one
            // was complete, and the swap is finished.
            let swapped = i >= 3;
            let expected = if swapped {
                json!(before - 1)
            } else {
                Value::Null
            };
            assert_eq!(v["anchored_at"], expected, "{context}: {v}");
            std::fs::remove_dir_all(&round).unwrap();
        }
    }
    // Random moments, each followed by a command that writes.
    let probe = tmp.path().join("probe");
    copy_dir(&base.dir, &probe);
    let took = duration_of(pcx(&probe, &["compact", "--before", &before.to_string()]));
    let (mut rng, seed) = Rng::seeded();
    for n in 0..60u64 {
        let round = tmp.path().join(format!("k{n}"));
        let dir = round.join("data");
        copy_dir(&base.dir, &dir);
        let delay = Duration::from_micros(rng.below(took.as_micros() as u64 + 1));
        let context = format!("seed {seed}, round {n}: compact killed after {delay:?}");
        let mut compact = spawn(pcx(&dir, &["compact", "--before", &before.to_string()]), "");
        thread::sleep(delay);
        compact.kill();
        let _ = compact.finish();
        if n % 2 == 1 {
            // The first open after the kill is the library's.
            let v = assert_log_whole(&dir, &base, &[], &context);
            assert!(
                v["anchored_at"].is_null() || v["anchored_at"] == json!(before - 1),
                "{context}: {v}"
            );
            std::fs::remove_dir_all(&round).unwrap();
            continue;
        }
        // The first open after the kill is a writer's; one process checks everything.
        let answers = common::protocol::batch(
            &dir,
            &[
                json!({"op": "state", "at": base.last_seq}),
                record("after-kill", "x"),
                json!({"op": "verify"}),
            ],
        );
        let (state, ack, v) = (&answers[0]["state"], &answers[1], &answers[2]["verify"]);
        assert_eq!(
            (&state["seq"], &state["state_digest"]),
            (&json!(base.last_seq), &base.digest),
            "{context}: the state before the kill is not there: {}",
            answers[0]
        );
        assert_eq!(ack["seq"], json!(base.last_seq + 1), "{context}: {ack}");
        assert_eq!(v["ok"], json!(true), "{context}: {}", answers[2]);
        assert_eq!(v["last_seq"], json!(base.last_seq + 1), "{context}: {v}");
        assert!(
            v["anchored_at"].is_null() || v["anchored_at"] == json!(before - 1),
            "{context}: {v}"
        );
        assert!(
            leftovers(&dir).is_empty(),
            "{context}: {:?}",
            leftovers(&dir)
        );
        std::fs::remove_dir_all(&round).unwrap();
    }
}

// ---------------------------------------------------------------------------------------------
// 3. crash states made by hand

#[test]
fn an_open_never_creates_a_data_directory_while_a_pre_compaction_copy_exists() {
    let tmp = tempfile::tempdir().unwrap();
    let base = base(tmp.path(), 60);
    // A compaction killed between its renames, whose new copy was lost: only the old copy.
    let cases: [(&str, &[&str]); 3] = [
        ("batch", &["batch"]),
        ("log", &["log"]),
        ("verify", &["verify"]),
    ];
    for (name, args) in cases {
        let round = tmp.path().join(name);
        let dir = round.join("data");
        copy_dir(&base.dir, &beside(&dir, ".pre-compaction"));
        let input = lines(&[record("after", "x")]);
        let out = run_with(pcx(&dir, args), input.as_bytes(), LIMIT);
        out.assert_no_panic();
        assert!(
            out.status.success(),
            "`{name}` with only DIR.pre-compaction: {}\n{}",
            out.stdout,
            out.stderr
        );
        let written = if name == "batch" {
            let answer = out.answer();
            assert_eq!(
                answer["seq"],
                json!(base.last_seq + 1),
                "`batch` started a new log instead of continuing the old one: {answer}"
            );
            vec!["after".to_string()]
        } else {
            vec![]
        };
        assert_log_whole(&dir, &base, &written, name);
    }
}

#[test]
fn an_open_never_deletes_the_old_copy_unless_the_new_one_is_known_complete() {
    let tmp = tempfile::tempdir().unwrap();
    let base = base(tmp.path(), 60);
    let dir = tmp.path().join("data");
    let old = beside(&dir, ".pre-compaction");
    copy_dir(&base.dir, &old);
    // A directory nobody marked complete beside the old copy (one an earlier pcx created
    // over a swap it saw half done): neither may be deleted, and the open says why.
    std::fs::create_dir(&dir).unwrap();
    let out = cli_run(&dir, &["log"]);
    assert_eq!(out.status.code(), Some(1), "{}\n{}", out.stdout, out.stderr);
    let message = out.stdout.clone();
    assert!(
        message.contains("pre-compaction") && message.contains("not marked complete"),
        "{message}"
    );
    assert!(old.join("db").exists(), "the old copy was deleted");
    assert!(dir.exists());
    // Once the operator moves the empty one away, the old copy is put back whole.
    std::fs::remove_dir(&dir).unwrap();
    assert_log_whole(
        &dir,
        &base,
        &[],
        "after the operator moved the empty copy away",
    );
}

#[test]
fn a_compaction_killed_between_its_renames_is_finished_by_the_next_open() {
    let tmp = tempfile::tempdir().unwrap();
    let base = base(tmp.path(), 60);
    let dir = tmp.path().join("data");
    copy_dir(&base.dir, &dir);
    let pause = tmp.path().join("pause");
    // Killed between the renames: no DIR, the old copy, and the complete new one.
    kill(start_paused(
        pcx(&dir, &["compact", "--before", "30"]),
        "swap:moved-aside",
        &pause,
    ));
    assert!(!dir.exists() && beside(&dir, ".pre-compaction").exists());
    let v = assert_log_whole(&dir, &base, &[], "the first open after the kill");
    assert_eq!(v["anchored_at"], json!(29), "{v}");
}

// ---------------------------------------------------------------------------------------------
// 4. a killed import

/// After a killed import, the directory holds no log, or the whole imported log; never part.
/// Gives whether it held the whole log.
fn assert_nothing_or_everything(dir: &Path, base: &Base, context: &str) -> bool {
    if !dir.exists() && leftovers(dir).is_empty() {
        return false;
    }
    let (v, _) = verify_and_state(dir, context);
    assert!(
        leftovers(dir).is_empty(),
        "{context}: left beside the directory: {:?}",
        leftovers(dir)
    );
    if v["events"] == json!(0) {
        return false;
    }
    assert_eq!(
        (&v["last_seq"], &v["state_digest"]),
        (&json!(base.last_seq), &base.digest),
        "{context}: a killed import left part of the log, and verify calls it sound: {v}"
    );
    true
}

fn import_cmd(dir: &Path, base: &Base) -> Command {
    pcx(dir, &["import", "--input", base.export.to_str().unwrap()])
}

#[test]
fn a_killed_import_never_leaves_a_truncated_log_that_verifies() {
    let tmp = tempfile::tempdir().unwrap();
    // More than one import chunk (1024 events), so a kill can land between two.
    let base = base(tmp.path(), 1_100);
    for (i, step) in IMPORT_STEPS.iter().enumerate() {
        let round = tmp.path().join(format!("s{i}"));
        let dir = round.join("data");
        let pause = round.join("pause");
        std::fs::create_dir_all(&round).unwrap();
        kill(start_paused(import_cmd(&dir, &base), step, &pause));
        let context = format!("import killed at {step}");
        let whole = assert_nothing_or_everything(&dir, &base, &context);
        assert_eq!(whole, i >= 2, "{context}");
        if !whole {
            // It can be imported again (it used to be refused as "not empty").
            let again = run_with(import_cmd(&dir, &base), b"", LIMIT);
            again.assert_success();
            assert!(assert_nothing_or_everything(&dir, &base, &context));
        }
        std::fs::remove_dir_all(&round).unwrap();
    }
    // The second of two imports: the first pays for a cold cache.
    duration_of(import_cmd(&tmp.path().join("probe1"), &base));
    let took = duration_of(import_cmd(&tmp.path().join("probe2"), &base));
    let (mut rng, seed) = Rng::seeded();
    let mut kept = 0;
    for n in 0..30u64 {
        let round = tmp.path().join(format!("k{n}"));
        let dir = round.join("data");
        std::fs::create_dir_all(&round).unwrap();
        let delay = Duration::from_micros(rng.below(took.as_micros() as u64 + 1));
        let context = format!("seed {seed}, round {n}: import killed after {delay:?}");
        let mut import = spawn(import_cmd(&dir, &base), "");
        thread::sleep(delay);
        import.kill();
        let _ = import.finish();
        if assert_nothing_or_everything(&dir, &base, &context) {
            kept += 1;
        } else if n % 5 == 0 {
            run_with(import_cmd(&dir, &base), b"", LIMIT).assert_success();
            assert!(assert_nothing_or_everything(&dir, &base, &context));
        }
        std::fs::remove_dir_all(&round).unwrap();
    }
    eprintln!("{kept} of 30 killed imports had finished");
}

// ---------------------------------------------------------------------------------------------
// 5. waiting for the lock

#[test]
fn a_command_that_waits_too_long_for_a_compaction_is_refused_in_use_and_harms_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let base = base(tmp.path(), 60);
    let dir = tmp.path().join("data");
    copy_dir(&base.dir, &dir);
    let pause = tmp.path().join("pause");
    let compact = start_paused(
        pcx(&dir, &["compact", "--before", "30"]),
        "swap:moved-aside",
        &pause,
    );
    // The lock's patience (2 s) runs out while the compaction is held between its renames.
    let out = cli_run(&dir, &["log"]);
    assert_eq!(out.status.code(), Some(1), "{}\n{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("in use"), "{}", out.stdout);
    std::fs::remove_file(&pause).unwrap();
    let done = compact.finish();
    done.assert_success();
    let v = assert_log_whole(&dir, &base, &[], "after the refused command");
    assert_eq!(v["anchored_at"], json!(29), "{v}");
}
