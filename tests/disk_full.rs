//! Fault test: the disk fills up under a running context.
//!
//! Runs only as root, on a small tmpfs that the test mounts itself (8 MiB), and is skipped with
//! a message otherwise. It records artifacts of a few hundred KiB (some small enough to live in
//! sled's log segments, some large enough to become sled blob files) until a write fails, and
//! checks that:
//!
//! 1. the failure is a clear "no space" error (`kind() == "no_space"`), never a panic;
//! 2. every write answered ok before it is still there, read back through the same context;
//! 3. once space returns (the tmpfs grows to 64 MiB), the SAME context accepts writes again,
//!    without a restart;
//! 4. after a close and a reopen, every answered write is still there and writes work.
//!
//! The mount is always lazily unmounted by a guard, whatever happens. A watchdog thread ends
//! the process (after printing the step it was at, every thread's stack if gdb is installed,
//! and unmounting) should the scenario hang: a blocked sled call inside the actor would block
//! the test's runtime too, so an async timeout could not fire.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Mutex, Once};
use std::time::{Duration, Instant};

use pcx::{Artifact, Config, Context, ContextError};

/// The tmpfs size while filling, and after space returns.
const SMALL: &str = "size=8m";
const LARGE: &str = "size=64m";

/// Record sizes, cycled: inline in sled's log segments (under 128 KiB) and sled blob files.
const SIZES: [usize; 3] = [96 * 1024, 200 * 1024, 300 * 1024];

/// A bound on the writes tried before the disk must have filled (8 MiB / 96 KiB is ~85).
const MAX_WRITES: usize = 400;

/// A tmpfs mounted on a temporary directory; unmounted (lazily) when dropped.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(options: &str) -> Result<Tmpfs, String> {
        let dir = tempfile::tempdir().map_err(|e| format!("no temporary directory: {e}"))?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", options, "tmpfs"])
            .arg(dir.path())
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Tmpfs { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn remount(&self, options: &str) -> Result<(), String> {
        let out = Command::new("mount")
            .args(["-o", &format!("remount,{options}")])
            .arg(self.path())
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "remount failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.path()).status();
    }
}

/// Panics on any thread of this process (sled's own threads included) since the hook went in.
static PANICS: AtomicUsize = AtomicUsize::new(0);

/// Installs (once) a panic hook that counts panics and keeps the default report.
fn count_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, Ordering::SeqCst);
            previous(info);
        }));
    });
}

/// How long the whole scenario may take before the watchdog calls it hung (it takes about a
/// second).
const PATIENCE: Duration = Duration::from_secs(120);

/// The step the scenario is at, for the watchdog's report.
static STEP: Mutex<String> = Mutex::new(String::new());

fn step(name: impl Into<String>) {
    *STEP.lock().unwrap_or_else(|p| p.into_inner()) = name.into();
}

/// Ends the process if not told within [`PATIENCE`] that the scenario finished: prints the
/// step, every thread's stack (with gdb), unmounts `mount` and exits with a failure.
struct Watchdog {
    done: mpsc::Sender<()>,
}

impl Watchdog {
    fn start(mount: PathBuf) -> Watchdog {
        let (done, finished) = mpsc::channel::<()>();
        std::thread::spawn(move || {
            if finished.recv_timeout(PATIENCE) != Err(mpsc::RecvTimeoutError::Timeout) {
                return;
            }
            let at = STEP.lock().unwrap_or_else(|p| p.into_inner()).clone();
            eprintln!(
                "disk_full: HUNG for {PATIENCE:?}, at step: {at}; df: {}",
                usage(&mount)
            );
            let _ = Command::new("gdb")
                .args(["-p", &std::process::id().to_string(), "-batch", "-nx"])
                .args(["-ex", "thread apply all bt 30"])
                .status();
            let _ = Command::new("umount").arg("-l").arg(&mount).status();
            std::process::exit(3);
        });
        Watchdog { done }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        let _ = self.done.send(());
    }
}

fn config(dir: &Path) -> Config {
    let mut config = Config::load(None, std::iter::empty()).expect("the built-in config loads");
    config.data_dir = dir.to_path_buf();
    config
}

fn open(dir: &Path) -> Context {
    Context::open(&config(dir)).unwrap_or_else(|e| panic!("the context does not open: {e}"))
}

/// Content that does not compress and differs per key.
fn content(i: usize) -> Vec<u8> {
    let len = SIZES[i % SIZES.len()];
    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ (i as u64).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn key(i: usize) -> String {
    format!("__compiled_fn_{i}")
}

async fn record(ctx: &Context, i: usize) -> Result<(), ContextError> {
    ctx.record_artifact(Artifact {
        key: key(i),
        kind: "eager".into(),
        content: content(i),
    })
    .await
    .map(|_| ())
}

/// The keys among `acked` whose content does not read back as written, with why.
async fn lost(ctx: &Context, acked: &[usize]) -> Vec<String> {
    let mut lost = Vec::new();
    for &i in acked {
        match ctx.serialize_artifact_by_key(key(i)).await {
            Ok(ack) => match ack.value {
                Some(a) if a.content == content(i) => {}
                Some(a) => lost.push(format!(
                    "{}: content differs ({} bytes)",
                    key(i),
                    a.content.len()
                )),
                None => lost.push(format!("{}: missing", key(i))),
            },
            Err(e) => lost.push(format!("{}: {} ({})", key(i), e, e.kind())),
        }
    }
    lost
}

fn usage(dir: &Path) -> String {
    Command::new("df")
        .args(["-k", "--output=used,avail"])
        .arg(dir)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).replace('\n', " "))
        .unwrap_or_default()
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

#[actix::test]
async fn a_full_disk_fails_writes_clearly_keeps_answered_ones_and_recovers_without_restart() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root to mount a tmpfs (not running as root)");
        return;
    }
    let fs = match Tmpfs::mount(SMALL) {
        Ok(fs) => fs,
        Err(e) => {
            eprintln!("skipped: needs root to mount a tmpfs ({e})");
            return;
        }
    };
    count_panics();
    let panics_before = PANICS.load(Ordering::SeqCst);
    let _watchdog = Watchdog::start(fs.path().to_path_buf());
    let data = fs.path().join("data");
    // A reserve to give back later, beside the data directory.
    let filler = fs.path().join("filler");
    std::fs::write(&filler, vec![0u8; 512 * 1024]).expect("the filler file is written");

    let mut problems: Vec<String> = Vec::new();
    let ctx = open(&data);

    // 1. Fill the disk.
    step("1: filling the disk");
    let started = Instant::now();
    let mut acked = Vec::new();
    let mut failure = None;
    for i in 0..MAX_WRITES {
        match record(&ctx, i).await {
            Ok(()) => acked.push(i),
            Err(e) => {
                failure = Some((i, e));
                break;
            }
        }
    }
    let Some((failed_at, error)) = failure else {
        panic!(
            "{MAX_WRITES} writes of up to 300 KiB all succeeded on an 8 MiB tmpfs ({})",
            usage(fs.path())
        );
    };
    eprintln!(
        "disk full after {} answered writes ({:?}); write {failed_at} failed: kind {} — {error}; df: {}",
        acked.len(),
        started.elapsed(),
        error.kind(),
        usage(fs.path())
    );
    assert!(!acked.is_empty(), "no write succeeded on an 8 MiB tmpfs");
    assert_eq!(
        error.kind(),
        "no_space",
        "a full disk must fail a write with kind no_space, got {error:?}"
    );
    let message = error.to_string().to_lowercase();
    assert!(
        message.contains("no space"),
        "the message must say there is no space: {error}"
    );

    // Further writes while full fail the same clear way (and do not hang or panic).
    for i in failed_at + 1..failed_at + 3 {
        match record(&ctx, i).await {
            Err(e) if e.kind() == "no_space" => {}
            Err(e) => problems.push(format!(
                "a write while the disk is still full failed with kind {} instead of no_space: {e}",
                e.kind()
            )),
            // Possible if the failure freed a little room; count it as answered.
            Ok(()) => acked.push(i),
        }
    }

    // 2. Nothing answered is lost, read through the same context.
    step("2: reading back while full");
    let missing = lost(&ctx, &acked).await;
    if !missing.is_empty() {
        problems.push(format!(
            "while full, {} of {} answered writes do not read back: {:?}",
            missing.len(),
            acked.len(),
            &missing[..missing.len().min(5)]
        ));
    }

    // 3. Space returns: the same context must accept writes again.
    step("3: writing after space returned");
    std::fs::remove_file(&filler).expect("the filler file is removed");
    fs.remount(LARGE).expect("the tmpfs grows");
    eprintln!("space returned; df: {}", usage(fs.path()));
    let next = failed_at + 10;
    let mut recovered = None;
    let mut last_error = None;
    // A little patience (five tries over about a second); no restart.
    for attempt in 0..5 {
        match record(&ctx, next + attempt).await {
            Ok(()) => {
                recovered = Some(next + attempt);
                break;
            }
            Err(e) => {
                last_error = Some(e);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    match recovered {
        Some(i) => {
            acked.push(i);
            // And keeps accepting them.
            for j in i + 1..i + 4 {
                match record(&ctx, j).await {
                    Ok(()) => acked.push(j),
                    Err(e) => problems.push(format!(
                        "after recovering, write {j} failed again: {e} (kind {})",
                        e.kind()
                    )),
                }
            }
        }
        None => {
            let e = last_error.expect("an error for each failed try");
            problems.push(format!(
                "after space returned ({}), the same context still refuses writes: kind {} — {e}",
                usage(fs.path()),
                e.kind()
            ));
        }
    }
    let missing = lost(&ctx, &acked).await;
    if !missing.is_empty() {
        problems.push(format!(
            "after space returned, {} of {} answered writes do not read back: {:?}",
            missing.len(),
            acked.len(),
            &missing[..missing.len().min(5)]
        ));
    }

    // 4. Close and reopen: every answered write survived, and writes work.
    step("4: closing");
    if let Err(e) = ctx.close().await {
        problems.push(format!("close failed: {e} (kind {})", e.kind()));
    }
    step("4: reopening");
    let ctx = match Context::open(&config(&data)) {
        Ok(ctx) => ctx,
        Err(e) => {
            let listing: Vec<_> = files(&data)
                .iter()
                .map(|p| {
                    let len = p.metadata().map(|m| m.len()).unwrap_or(0);
                    format!("{} ({len})", p.display())
                })
                .collect();
            panic!(
                "the data directory does not reopen after the disk was full: {e}\nproblems so far: {problems:#?}\nfiles: {listing:#?}"
            );
        }
    };
    step("4: reading back after reopening");
    let missing = lost(&ctx, &acked).await;
    if !missing.is_empty() {
        problems.push(format!(
            "after reopening, {} of {} answered writes are lost: {:?}",
            missing.len(),
            acked.len(),
            &missing[..missing.len().min(5)]
        ));
    }
    step("4: writing after reopening");
    if let Err(e) = record(&ctx, next + 100).await {
        problems.push(format!(
            "after reopening, a write fails: {e} (kind {})",
            e.kind()
        ));
    }
    step("4: closing again");
    let _ = ctx.close().await;

    let panicked = PANICS.load(Ordering::SeqCst) - panics_before;
    if panicked > 0 {
        problems.push(format!(
            "{panicked} panic(s) on some thread while the disk was full"
        ));
    }
    assert!(
        problems.is_empty(),
        "the full disk was not handled: {problems:#?}"
    );
}
