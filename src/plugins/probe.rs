//! Loading a plugin library first in a child process.
//!
//! Loading a library runs its constructors, with no way back: one that aborts or faults kills
//! the process, one that loops hangs it, before pcx could say a word. So the `pcx` binary
//! loads each candidate first in a child process (`pcx plugins probe PATH`, the command
//! `pcx plugins check` runs) and waits for it at most `plugin_call_timeout_ms`; only a
//! library the child loaded and answered for is loaded in-process. A child killed by a
//! signal, or still running at the deadline (it is then killed), refuses its library with a
//! message that names it and says what happened. The children of one directory run side by
//! side, so the cost at start is about one child's, not one per library.
//!
//! The library (an embedding program, the tests) loads in-process unless an executable to
//! probe with is registered ([`register_executable`]): only the `pcx` binary knows it can run
//! itself with `plugins probe`.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, OnceLock};
use std::time::{Duration, Instant};

use crate::plugins::loader::PluginError;

/// The executable that probes, or why there is none.
static EXECUTABLE: OnceLock<Result<PathBuf, String>> = OnceLock::new();

/// Makes [`crate::plugins::kinds::Kinds::load_with`] probe every library with `exe` (the running pcx
/// binary) before loading it. Without an executable (`current_exe` failed), every library is
/// refused: loading unchecked is what this is here to avoid.
pub fn register_executable(exe: std::io::Result<PathBuf>) {
    let _ = EXECUTABLE.set(exe.map_err(|e| format!("cannot locate the pcx executable: {e}")));
}

/// The registered executable, if any.
pub fn executable() -> Option<Result<&'static Path, &'static str>> {
    EXECUTABLE
        .get()
        .map(|r| r.as_ref().map(PathBuf::as_path).map_err(String::as_str))
}

/// How a child that loaded one library ended.
#[derive(Debug)]
pub enum Outcome {
    /// It exited and printed an answer (its last stdout line, JSON).
    Answered {
        status: ExitStatus,
        answer: serde_json::Value,
    },
    /// A signal killed it.
    Crashed { signal: i32 },
    /// It was still running at the deadline, and was killed.
    TimedOut,
    /// It exited without an answer (a constructor called `exit`, say).
    NoAnswer { status: ExitStatus, stderr: String },
    /// It could not be started.
    NotStarted { message: String },
}

/// The conventional name of a signal that ends a crashing process.
pub fn signal_name(signal: i32) -> &'static str {
    match signal {
        libc::SIGABRT => "SIGABRT",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGBUS => "SIGBUS",
        libc::SIGILL => "SIGILL",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGTERM => "SIGTERM",
        libc::SIGTRAP => "SIGTRAP",
        libc::SIGSYS => "SIGSYS",
        _ => "a signal",
    }
}

/// A child under way: the process and its output, read on threads of their own so a child
/// that writes much never blocks on a full pipe.
struct Running {
    child: Child,
    stdout: mpsc::Receiver<Vec<u8>>,
    stderr: mpsc::Receiver<Vec<u8>>,
}

fn drain(pipe: Option<impl Read + Send + 'static>) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    if let Some(mut pipe) = pipe {
        // If the thread cannot start, the output is simply not read.
        let _ = std::thread::Builder::new()
            .name("pcx-probe-output".into())
            .spawn(move || {
                let mut bytes = Vec::new();
                let _ = pipe.read_to_end(&mut bytes);
                let _ = tx.send(bytes);
            });
    }
    rx
}

/// Runs `exe --no-plugins --log-format json plugins probe PATH` for each of `paths`, all at
/// once, and waits for them until `timeout` has passed; those still running then are killed.
pub fn probe_all(exe: &Path, paths: &[PathBuf], timeout: Duration) -> Vec<Outcome> {
    let deadline = Instant::now() + timeout;
    let mut running: Vec<Result<Running, Outcome>> = paths
        .iter()
        .map(|path| {
            let mut child = Command::new(exe)
                .args(["--no-plugins", "--log-format", "json", "plugins", "probe"])
                .arg(path)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .map_err(|e| Outcome::NotStarted {
                    message: format!("cannot run {}: {e}", exe.display()),
                })?;
            Ok(Running {
                stdout: drain(child.stdout.take()),
                stderr: drain(child.stderr.take()),
                child,
            })
        })
        .collect();
    let mut statuses: Vec<Option<ExitStatus>> = vec![None; paths.len()];
    // Polled: a child takes a few milliseconds, so the first polls come quickly.
    let mut pause = Duration::from_micros(500);
    loop {
        let mut waiting = false;
        for (r, status) in running.iter_mut().zip(statuses.iter_mut()) {
            if let (Ok(r), None) = (r, &status) {
                match r.child.try_wait() {
                    Ok(Some(s)) => *status = Some(s),
                    Ok(None) => waiting = true,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot wait for a plugin check process");
                        waiting = true;
                    }
                }
            }
        }
        let now = Instant::now();
        if !waiting || now >= deadline {
            break;
        }
        std::thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(Duration::from_millis(20));
    }
    running
        .into_iter()
        .zip(statuses)
        .map(|(r, status)| {
            let mut r = match r {
                Err(outcome) => return outcome,
                Ok(r) => r,
            };
            let Some(status) = status else {
                let _ = r.child.kill();
                let _ = r.child.wait();
                return Outcome::TimedOut;
            };
            if let Some(signal) = std::os::unix::process::ExitStatusExt::signal(&status) {
                return Outcome::Crashed { signal };
            }
            // The pipes close when the child ends, unless something it started holds them.
            let grace = deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(100));
            let stdout = r.stdout.recv_timeout(grace).unwrap_or_default();
            let stdout = String::from_utf8_lossy(&stdout);
            match stdout.lines().last().map(serde_json::from_str) {
                Some(Ok(answer)) => Outcome::Answered { status, answer },
                _ => {
                    let stderr = r
                        .stderr
                        .recv_timeout(Duration::from_millis(100))
                        .unwrap_or_default();
                    // The end says what went wrong; a chatty child is cut from the front.
                    let tail = &stderr[stderr.len().saturating_sub(2000)..];
                    Outcome::NoAnswer {
                        status,
                        stderr: String::from_utf8_lossy(tail).trim().to_string(),
                    }
                }
            }
        })
        .collect()
}

/// Checks each of `paths` in a child, if an executable is registered: `Ok` for a library the
/// child loaded without crashing or hanging (whatever it then said of it: loading it here
/// gives the same answer, typed), else the reason it is refused.
pub fn vet(paths: &[PathBuf], timeout: Duration) -> Vec<Result<(), PluginError>> {
    let exe = match executable() {
        None => return paths.iter().map(|_| Ok(())).collect(),
        Some(Err(message)) => {
            return paths
                .iter()
                .map(|p| {
                    Err(PluginError::CheckFailed {
                        path: p.clone(),
                        message: message.to_string(),
                    })
                })
                .collect()
        }
        Some(Ok(exe)) => exe,
    };
    let started = Instant::now();
    let outcomes = probe_all(exe, paths, timeout);
    tracing::debug!(libraries = paths.len(), elapsed = ?started.elapsed(), "plugins checked in child processes");
    paths
        .iter()
        .zip(outcomes)
        .map(|(path, outcome)| refusal(path, outcome, timeout).map_or(Ok(()), Err))
        .collect()
}

/// Why `path` is refused after `outcome`, if it is.
pub fn refusal(path: &Path, outcome: Outcome, timeout: Duration) -> Option<PluginError> {
    let path = path.to_path_buf();
    match outcome {
        Outcome::Answered { .. } => None,
        Outcome::Crashed { signal } => Some(PluginError::CheckCrashed {
            path,
            signal,
            name: signal_name(signal),
        }),
        Outcome::TimedOut => Some(PluginError::CheckTimedOut {
            path,
            deadline_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
        }),
        Outcome::NoAnswer { status, stderr } => Some(PluginError::CheckFailed {
            path,
            message: format!("the check process exited with {status} and no answer: {stderr}"),
        }),
        Outcome::NotStarted { message } => Some(PluginError::CheckFailed { path, message }),
    }
}
