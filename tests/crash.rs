//! The crash suite: `pcx batch`, and `pcx serve` with `pcx client` pipelining over its socket,
//! SIGKILLed at random points of a random mix of writes (records, edits, takes, clears,
//! dynamo entries, stitches, saves), a few hundred times. After each kill:
//!
//! - every answer given before the kill was right (the kind, the seq, the content);
//! - `pcx verify` finds the log sound (records, hash chain, blobs, snapshots);
//! - the log holds exactly a prefix of the requests sent, at least every answered one, with no
//!   request's events torn apart;
//! - the next process serves that prefix's state, contents included, and its first write
//!   continues the sequence.
//!
//! The mix is drawn from a seed (`PCX_CRASH_SEED`, or the clock), printed first, so a failure
//! can be repeated; `PCX_CRASH_ROUNDS` sets the rounds of each of the two tests. Each round is
//! small, and each data directory takes a few rounds before a fresh one, so that a round
//! costs about two process starts however long the suite runs.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use indexmap::IndexMap;
use pcx::core::model::Digest;
use serde_json::{json, Value};

mod common;
use common::library::content_files;
use common::protocol::*;
use common::*;

/// Rounds per test unless `PCX_CRASH_ROUNDS` says otherwise.
const ROUNDS: usize = 120;
/// Rounds on one data directory before a fresh one: `verify` walks the whole log.
const ROUNDS_PER_DIRECTORY: usize = 20;
/// Keys the mix draws from: few, so edits, takes and stitches find what they name.
const ARTIFACT_KEYS: usize = 6;
const ENTRY_KEYS: usize = 3;
/// Events between snapshots (at least as many as the state holds items): kills land around
/// snapshot writes too.
const SNAPSHOT_EVERY: &str = "8";

#[test]
fn every_answered_change_survives_sigkills_of_pcx_batch() {
    crash_suite(Target::Batch, 0xba7c);
}

#[test]
fn every_answered_change_survives_sigkills_of_pcx_serve() {
    crash_suite(Target::Serve, 0x5e7e);
}

// ---------------------------------------------------------------------------------------------
// the model: what the context must hold after a prefix of the requests

/// A dynamo entry as the suite records it: each code's backend ids and payload.
#[derive(Clone, Debug, PartialEq)]
struct Entry {
    codes: Vec<(Vec<String>, Vec<u8>)>,
}

impl Entry {
    fn request(&self) -> Value {
        let codes: Vec<Value> = self
            .codes
            .iter()
            .map(|(ids, payload)| json!({"backend_ids": ids, "payload_b64": b64(payload)}))
            .collect();
        json!({"fn_name": "f", "device_type": "cpu", "codes": codes})
    }
}

/// The context as pcx's semantics say it is: two maps in Python dict order, and the keys of
/// the saved entries (which `clear` leaves alone).
#[derive(Clone, Debug, Default)]
struct Model {
    artifacts: IndexMap<String, Vec<u8>>,
    entries: IndexMap<String, Entry>,
    saved: Vec<String>,
}

/// One change the mix makes.
#[derive(Clone, Debug)]
enum Change {
    Record(String, Vec<u8>),
    Set(String, Vec<u8>),
    Append(String, Vec<u8>),
    Take(String),
    Clear,
    RecordEntry(String, Entry),
    Stitch,
    Save,
}

/// What the answer to a request must be.
#[derive(Clone, Debug)]
enum Expect {
    /// `ok`, and a seq if the request wrote events.
    Ok,
    /// A failure of this kind (and no events).
    Failed(&'static str),
    /// `ok` with this artifact (a take, a serialize).
    Artifact(Option<Vec<u8>>),
    /// The `state` audit answer of this model.
    State(Model),
    /// The stitch of this model.
    Stitched(Model),
}

impl Model {
    /// Applies `change`; gives how many events it writes and what its answer is.
    fn apply(&mut self, change: &Change) -> (u64, Expect) {
        match change {
            Change::Record(key, content) => {
                self.artifacts.insert(key.clone(), content.clone());
                (1, Expect::Ok)
            }
            Change::Set(key, _) | Change::Append(key, _) if !self.artifacts.contains_key(key) => {
                (0, Expect::Failed("key_not_found"))
            }
            Change::Set(key, content) => {
                self.artifacts.insert(key.clone(), content.clone());
                (1, Expect::Ok)
            }
            Change::Append(key, suffix) => {
                if let Some(c) = self.artifacts.get_mut(key) {
                    c.extend_from_slice(suffix);
                }
                (1, Expect::Ok)
            }
            Change::Take(key) => match self.artifacts.shift_remove(key) {
                Some(c) => (1, Expect::Artifact(Some(c))),
                None => (0, Expect::Artifact(None)),
            },
            Change::Clear => {
                self.artifacts.clear();
                self.entries.clear();
                (1, Expect::Ok)
            }
            Change::RecordEntry(key, entry) => {
                self.entries.insert(key.clone(), entry.clone());
                (1, Expect::Ok)
            }
            Change::Stitch => (1, Expect::Stitched(self.clone())),
            Change::Save => {
                for key in self.entries.keys() {
                    if !self.saved.contains(key) {
                        self.saved.push(key.clone());
                    }
                }
                (2, Expect::Ok)
            }
        }
    }

    /// A stitch of one entry: each code's bypass flag, and the backends found, in order of
    /// first reference (a code stops at its first missing backend).
    fn stitch(&self, entry: &Entry) -> (Vec<bool>, Vec<(String, Vec<u8>)>) {
        let mut bypassed = Vec::new();
        let mut backends: IndexMap<String, Vec<u8>> = IndexMap::new();
        for (ids, _) in &entry.codes {
            let mut missing = false;
            for id in ids {
                match self.artifacts.get(id) {
                    Some(c) => {
                        backends.entry(id.clone()).or_insert_with(|| c.clone());
                    }
                    None => {
                        missing = true;
                        break;
                    }
                }
            }
            bypassed.push(missing);
        }
        (bypassed, backends.into_iter().collect())
    }
}

fn request_of(change: &Change) -> Value {
    match change {
        Change::Record(key, content) => record(key, content),
        Change::Set(key, content) => set(key, content),
        Change::Append(key, suffix) => append(key, suffix),
        Change::Take(key) => take(key),
        Change::Clear => op("clear"),
        Change::RecordEntry(key, entry) => record_entry(key, entry.request()),
        Change::Stitch => stitch(),
        Change::Save => save(),
    }
}

// ---------------------------------------------------------------------------------------------
// the mix

fn artifact_key(rng: &mut Rng) -> String {
    format!("a{}", rng.below(ARTIFACT_KEYS as u64))
}

/// Artifact content of a length up to `max`; now and then 80 KiB, so that the groups
/// holding it go to a content file and kills land around those writes too.
fn content(rng: &mut Rng, max: u64) -> Vec<u8> {
    let len = if rng.below(30) == 0 {
        80 * 1024
    } else {
        rng.below(max + 1)
    };
    bytes(rng, len)
}

/// `len` bytes, drawn from `rng`.
fn bytes(rng: &mut Rng, len: u64) -> Vec<u8> {
    let seed = rng.next();
    (0..len)
        .map(|i| (seed.wrapping_add(i).wrapping_mul(0x9e37_79b9) >> 24) as u8)
        .collect()
}

fn change(rng: &mut Rng) -> Change {
    match rng.below(100) {
        0..30 => Change::Record(artifact_key(rng), content(rng, 2000)),
        30..40 => Change::Set(artifact_key(rng), content(rng, 2000)),
        40..50 => {
            let len = rng.below(201);
            Change::Append(artifact_key(rng), bytes(rng, len))
        }
        50..60 => Change::Take(artifact_key(rng)),
        60..80 => {
            let codes = (0..1 + rng.below(3))
                .map(|_| {
                    // Now and then a backend no artifact key can name: a bypass.
                    let ids = (0..rng.below(4))
                        .map(|_| match rng.below(8) {
                            0 => "never-recorded".to_string(),
                            _ => artifact_key(rng),
                        })
                        .collect();
                    let len = rng.below(301);
                    (ids, bytes(rng, len))
                })
                .collect();
            Change::RecordEntry(
                format!("e{}", rng.below(ENTRY_KEYS as u64)),
                Entry { codes },
            )
        }
        80..88 => Change::Stitch,
        88..95 => Change::Save,
        _ => Change::Clear,
    }
}

/// A round's requests, with what each must answer and how many events it writes.
struct Plan {
    requests: Vec<Value>,
    expect: Vec<Expect>,
    events: Vec<u64>,
    /// The changes, to rebuild the model after any prefix.
    changes: Vec<Option<Change>>,
    start: Model,
    /// How many requests check the state before the changes begin.
    checks: usize,
}

impl Plan {
    /// Reads that check the state `model` (with its content), one stitch (a write: the first
    /// of the round, so it shows the sequence continues), then `n` random changes.
    fn new(model: &Model, rng: &mut Rng, n: usize) -> Plan {
        let mut plan = Plan {
            requests: Vec::new(),
            expect: Vec::new(),
            events: Vec::new(),
            changes: Vec::new(),
            start: model.clone(),
            checks: 0,
        };
        plan.read(op("state"), Expect::State(model.clone()));
        for i in 0..ARTIFACT_KEYS {
            let key = format!("a{i}");
            let content = model.artifacts.get(&key).cloned();
            plan.read(serialize(&key), Expect::Artifact(content));
        }
        // The stitch checks the entries and their backends' content.
        plan.checks = plan.requests.len() + 1;
        let mut after = model.clone();
        for change in std::iter::once(Change::Stitch).chain((0..n).map(|_| change(rng))) {
            let (events, expect) = after.apply(&change);
            plan.requests.push(request_of(&change));
            plan.expect.push(expect);
            plan.events.push(events);
            plan.changes.push(Some(change));
        }
        plan
    }

    fn read(&mut self, request: Value, expect: Expect) {
        self.requests.push(request);
        self.expect.push(expect);
        self.events.push(0);
        self.changes.push(None);
    }

    /// The model after the first `n` requests.
    fn model_after(&self, n: usize) -> Model {
        let mut model = self.start.clone();
        for change in self.changes[..n].iter().flatten() {
            model.apply(change);
        }
        model
    }

    /// The log's last seq after the first `n` requests, from `base`.
    fn seq_after(&self, base: u64, n: usize) -> u64 {
        base + self.events[..n].iter().sum::<u64>()
    }
}

// ---------------------------------------------------------------------------------------------
// checking answers

/// Checks answer `i` of a round whose log started at `base`.
fn check_answer(plan: &Plan, base: u64, i: usize, answer: &Value, what: &str) {
    let request = &plan.requests[i];
    let what = format!("{what}, answer {i} (to {})", brief(request));
    if let Expect::Failed(kind) = plan.expect[i] {
        assert_eq!(answer["ok"], json!(false), "{what}: {answer}");
        assert_eq!(answer["error"]["kind"], json!(kind), "{what}: {answer}");
        return;
    }
    assert_eq!(answer["ok"], json!(true), "{what}: {answer}");
    if plan.events[i] == 0 {
        assert!(answer.get("seq").is_none(), "{what}: no seq: {answer}");
    } else {
        assert_eq!(
            answer["seq"],
            json!(plan.seq_after(base, i + 1)),
            "{what}: the seq continues the log"
        );
    }
    match &plan.expect[i] {
        Expect::Ok | Expect::Failed(_) => {}
        Expect::Artifact(content) => {
            let got = content_of(answer);
            assert!(
                got == *content,
                "{what}: content {:?} bytes, expected {:?}",
                got.map(|c| c.len()),
                content.as_ref().map(Vec::len)
            );
        }
        Expect::State(model) => check_state(model, plan.seq_after(base, i), answer, &what),
        Expect::Stitched(model) => check_stitch(model, answer, &what),
    }
}

/// A request without its base64 fields, for messages.
fn brief(request: &Value) -> String {
    let mut r = request.clone();
    if let Some(map) = r.as_object_mut() {
        map.remove("content_b64");
        map.remove("entry");
        map.remove("edit");
    }
    r.to_string()
}

/// The `state` answer: the head seq, every artifact (key, order, digest, size), the entries
/// and their backend ids, and the saved keys.
fn check_state(model: &Model, seq: u64, answer: &Value, what: &str) {
    let state = &answer["state"];
    assert_eq!(state["seq"], json!(seq), "{what}: the state's seq");
    let artifacts: Vec<Value> = model
        .artifacts
        .iter()
        .map(|(k, c)| json!([k, Digest::of(c).to_hex(), c.len()]))
        .collect();
    let got: Vec<Value> = state["artifacts"]
        .as_array()
        .unwrap_or_else(|| panic!("{what}: no artifacts: {answer}"))
        .iter()
        .map(|a| json!([a["key"], a["digest"], a["size"]]))
        .collect();
    assert_eq!(got, artifacts, "{what}: the artifacts (key, digest, size)");
    let entries: Vec<Value> = model
        .entries
        .iter()
        .map(|(k, e)| {
            let mut ids: Vec<&String> = Vec::new();
            for id in e.codes.iter().flat_map(|(ids, _)| ids) {
                if !ids.contains(&id) {
                    ids.push(id);
                }
            }
            json!([k, ids])
        })
        .collect();
    let got: Vec<Value> = state["debug_info"]["dynamo"]
        .as_array()
        .map(|d| {
            d.iter()
                .map(|e| json!([e["key"], e["backend_ids"]]))
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(got, entries, "{what}: the entries (key, backend ids)");
    assert_eq!(
        state["dynamo_cache"],
        json!(model.saved),
        "{what}: the saved keys"
    );
}

/// A stitch's answer: every entry, its payloads and bypasses, and its backends' content.
fn check_stitch(model: &Model, answer: &Value, what: &str) {
    let entries = answer["entries"]
        .as_object()
        .unwrap_or_else(|| panic!("{what}: no entries: {answer}"));
    assert_eq!(
        entries.keys().collect::<Vec<_>>(),
        model.entries.keys().collect::<Vec<_>>(),
        "{what}: the stitched entries"
    );
    for (key, entry) in &model.entries {
        let got = &entries[key];
        let codes = got["dynamo"]["codes"].as_array().expect("codes");
        let payloads: Vec<Vec<u8>> = codes.iter().map(|c| unb64(&c["payload_b64"])).collect();
        let expected: Vec<Vec<u8>> = entry.codes.iter().map(|(_, p)| p.clone()).collect();
        assert!(payloads == expected, "{what}: the payloads of {key}");
        let (bypassed, backends) = model.stitch(entry);
        let flags: Vec<bool> = codes.iter().map(|c| c["bypassed"] == true).collect();
        assert_eq!(flags, bypassed, "{what}: the bypasses of {key}");
        let got_backends: Vec<(String, Vec<u8>)> = got["backends"]
            .as_object()
            .expect("backends")
            .iter()
            .map(|(id, a)| (id.clone(), unb64(&a["content_b64"])))
            .collect();
        assert!(
            got_backends == backends,
            "{what}: the backends of {key}: {:?}, expected {:?}",
            got_backends
                .iter()
                .map(|(k, c)| (k, c.len()))
                .collect::<Vec<_>>(),
            backends
                .iter()
                .map(|(k, c)| (k, c.len()))
                .collect::<Vec<_>>()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// processes

#[derive(Clone, Copy, Debug, PartialEq)]
enum Target {
    /// `pcx batch`, JSON lines on its stdin and stdout.
    Batch,
    /// `pcx serve`, and `pcx client` sending it the same lines as pipelined frames.
    Serve,
}

/// When the victim is killed.
#[derive(Clone, Copy, Debug)]
enum Kill {
    /// Once this many answers have come back.
    AfterAnswers(usize),
    /// This long after it started: in the middle of opening and recovering, or of the first
    /// requests.
    AfterStart(Duration),
    /// Not: the requests are answered, then the input ends (and the server gets SIGTERM).
    Never,
}

/// `pcx --data-dir DIR ARGS…` with the suite's settings.
fn pcx_in(dir: &Path, args: &[&str]) -> Command {
    let mut cmd = pcx(dir, args);
    cmd.env("PCX_SNAPSHOT_EVERY", SNAPSHOT_EVERY)
        .env("PCX_CACHE_CAPACITY_BYTES", "4194304")
        .stderr(Stdio::null());
    cmd
}

/// Starts `pcx serve` on `dir`, on the socket `DIR/pcx.sock`.
fn start_server(dir: &Path) -> Guard {
    Guard(
        pcx_in(dir, &["serve"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("pcx serve starts"),
    )
}

/// Waits until the server on `dir` accepts connections (a socket left by a killed server
/// refuses them until the new one replaces it).
fn wait_listening(server: &mut Guard, dir: &Path) {
    let socket = dir.join("pcx.sock");
    let deadline = Instant::now() + TIMEOUT;
    while UnixStream::connect(&socket).is_err() {
        if let Some(status) = server.0.try_wait().expect("try_wait") {
            panic!("pcx serve exited before listening: {status}");
        }
        assert!(
            Instant::now() < deadline,
            "pcx serve did not listen within {TIMEOUT:?}"
        );
        thread::sleep(Duration::from_millis(2));
    }
}

/// Sends `requests` to `target` on `dir` and kills it as `kill` says. Gives every answer that
/// came back (in order: they are answers to the first requests).
fn run_and_kill(target: Target, dir: &Path, requests: &[Value], kill: Kill) -> Vec<Value> {
    let mut server = (target == Target::Serve).then(|| start_server(dir));
    if let (Some(server), Kill::AfterStart(after)) = (&mut server, kill) {
        // A server killed while it opens: no client.
        thread::sleep(after);
        kill_victim(server, target);
        return Vec::new();
    }
    let mut speaker = match &mut server {
        None => pcx_in(dir, &["batch"]),
        Some(server) => {
            wait_listening(server, dir);
            pcx_in(dir, &["client"])
        }
    };
    let mut speaker = Guard(
        speaker
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("pcx starts"),
    );
    let started = Instant::now();
    let stdin = speaker.0.stdin.take().unwrap();
    let stdout = speaker.0.stdout.take().unwrap();
    let input = lines(requests);
    // The writer holds stdin open until told: at its end, `batch` would finish on its own.
    let (close_tx, close_rx) = mpsc::channel::<()>();
    let writer = thread::spawn(move || {
        let mut stdin = stdin;
        let _ = stdin
            .write_all(input.as_bytes())
            .and_then(|()| stdin.flush());
        let _ = close_rx.recv();
    });
    let (answer_tx, answers_rx) = mpsc::channel::<Vec<u8>>();
    thread::spawn(move || {
        let mut stdout = BufReader::new(stdout);
        loop {
            let mut line = Vec::new();
            // A line without its newline is an answer cut by the kill: not given.
            match stdout.read_until(b'\n', &mut line) {
                Ok(_) if line.last() == Some(&b'\n') => {}
                _ => break,
            }
            if answer_tx.send(line).is_err() {
                break;
            }
        }
    });
    let parse = |line: Vec<u8>| -> Value {
        serde_json::from_slice(&line).unwrap_or_else(|e| {
            panic!(
                "answer is not JSON ({e}): {}",
                String::from_utf8_lossy(&line)
            )
        })
    };
    let mut answers = Vec::new();
    let killed = loop {
        let due = match kill {
            Kill::AfterAnswers(n) => answers.len() >= n.min(requests.len()),
            Kill::AfterStart(after) => started.elapsed() >= after,
            Kill::Never => answers.len() == requests.len(),
        };
        if due {
            break !matches!(kill, Kill::Never);
        }
        let wait = match kill {
            Kill::AfterStart(after) => after.saturating_sub(started.elapsed()),
            _ => TIMEOUT,
        };
        match answers_rx.recv_timeout(wait) {
            Ok(line) => answers.push(parse(line)),
            Err(RecvTimeoutError::Timeout) if matches!(kill, Kill::AfterStart(_)) => {}
            Err(e) => panic!("{target:?}: only {} answers, then {e:?}", answers.len()),
        }
    };
    if killed {
        kill_victim(server.as_mut().unwrap_or(&mut speaker), target);
    }
    let _ = close_tx.send(());
    // Answers written before the kill may still be in the pipe: they were given too.
    loop {
        match answers_rx.recv_timeout(TIMEOUT) {
            Ok(line) => answers.push(parse(line)),
            Err(RecvTimeoutError::Disconnected) => break,
            Err(RecvTimeoutError::Timeout) => panic!("{target:?}: the answers did not end"),
        }
    }
    let status = wait(&mut speaker.0, TIMEOUT, "pcx batch or client");
    if !killed {
        assert!(status.success(), "{target:?} ended with {status}");
        if let Some(server) = &mut server {
            server.signal("TERM");
            let status = wait(&mut server.0, TIMEOUT, "pcx serve after SIGTERM");
            assert!(status.success(), "pcx serve ended with {status}");
        }
    }
    writer.join().unwrap();
    answers
}

/// SIGKILLs `victim`, which must still have been running.
fn kill_victim(victim: &mut Guard, target: Target) {
    victim.0.kill().expect("SIGKILL");
    let status = wait(&mut victim.0, TIMEOUT, "a SIGKILLed pcx");
    assert_eq!(
        status.signal(),
        Some(9),
        "{target:?}: pcx ended on its own before the SIGKILL: {status}"
    );
}

// ---------------------------------------------------------------------------------------------
// the suite

/// The suite's seed: `PCX_CRASH_SEED`, or one from the clock; printed, to repeat a failure.
fn seed(salt: u64) -> u64 {
    let seed = match std::env::var("PCX_CRASH_SEED") {
        Ok(s) => s.parse().expect("PCX_CRASH_SEED is a number"),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    };
    eprintln!("crash suite seed {seed}: repeat with PCX_CRASH_SEED={seed} cargo test --test crash");
    seed ^ salt
}

fn rounds() -> usize {
    std::env::var("PCX_CRASH_ROUNDS").map_or(ROUNDS, |r| r.parse().expect("a number of rounds"))
}

/// `pcx verify` on the closed data directory: it must find the log sound. Gives its last seq.
fn verify(dir: &Path, what: &str) -> u64 {
    if !dir.exists() {
        // Killed before it created the directory: nothing to verify, nothing written.
        return 0;
    }
    let out = cli(dir, &["verify"]);
    assert!(
        out.status.success(),
        "{what}: pcx verify failed: {}\n{}",
        out.stdout,
        out.stderr
    );
    let answer = out.answer();
    assert_eq!(answer["ok"], json!(true), "{what}: {answer}");
    answer["last_seq"].as_u64().expect("verify gives last_seq")
}

fn crash_suite(target: Target, salt: u64) {
    let mut rng = Rng(seed(salt));
    let tmp = tempfile::tempdir().unwrap();
    let rounds = rounds();
    let (mut kills, mut answered, mut torn_tails) = (0, 0, 0);
    let mut big_writes = false;
    for chain in 0..rounds.div_ceil(ROUNDS_PER_DIRECTORY) {
        let dir = tmp.path().join(format!("d{chain}"));
        let mut model = Model::default();
        let mut head = 0;
        let chain_rounds = ROUNDS_PER_DIRECTORY.min(rounds - chain * ROUNDS_PER_DIRECTORY);
        for round in 0..=chain_rounds {
            let last = round == chain_rounds;
            let what = format!("{target:?}, directory {chain}, round {round}");
            let changes = if last { 0 } else { 5 + rng.below(40) as usize };
            let plan = Plan::new(&model, &mut rng, changes);
            // Most kills come after the checks, so that each round's are answered.
            let checks = plan.checks;
            let kill = if last {
                Kill::Never
            } else if rng.below(8) == 0 {
                Kill::AfterStart(Duration::from_millis(rng.below(40)))
            } else {
                Kill::AfterAnswers(
                    checks + rng.below((plan.requests.len() - checks) as u64 + 1) as usize,
                )
            };
            let answers = run_and_kill(target, &dir, &plan.requests, kill);
            for (i, answer) in answers.iter().enumerate() {
                check_answer(&plan, head, i, answer, &what);
            }
            answered += answers.len();
            kills += usize::from(!last);

            // The log holds a prefix of the requests, every answered one at least, and no
            // request in part.
            let logged = verify(&dir, &what);
            let acknowledged = plan.seq_after(head, answers.len());
            assert!(
                logged >= acknowledged,
                "{what}: answered changes are lost: the log ends at {logged}, answers went to {acknowledged}"
            );
            let survived = (answers.len()..=plan.requests.len())
                .find(|&n| plan.seq_after(head, n) == logged)
                .unwrap_or_else(|| {
                    panic!("{what}: the log ends at {logged}, which is not after a whole request")
                });
            torn_tails += usize::from(logged > acknowledged);
            big_writes |= plan.changes[..survived]
                .iter()
                .flatten()
                .any(|c| matches!(c, Change::Record(_, b) | Change::Set(_, b) if b.len() > 2000));
            model = plan.model_after(survived);
            head = logged;
        }
    }
    eprintln!(
        "{target:?}: {kills} kills, {answered} answers checked, {torn_tails} times unanswered \
         changes were kept; large contents kept: {big_writes}"
    );
    assert_eq!(kills, rounds);
    let in_files = (0..rounds.div_ceil(ROUNDS_PER_DIRECTORY))
        .flat_map(|c| content_files(&tmp.path().join(format!("d{c}"))))
        .count();
    assert!(
        in_files > 0 || !big_writes,
        "large contents were kept, so they went through content files"
    );
}
