//! `pcx serve` under resource abuse and with bad settings: descriptor exhaustion, connection
//! floods, unauthenticated TCP connections, clients that do not read large answers, secrets on
//! the command line and configuration values out of range. A real server process each time,
//! stopped by a guard however the test ends; every wait is bounded.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use pcx::interface::wire::{
    body_len, decode_answer, encode_frame, to_json, to_msgpack, HEADER_LEN,
};
use serde_json::{json, Value};

mod common;
use common::protocol::*;
use common::*;

/// A TCP token long enough to be accepted (16 bytes or more).
const TOKEN: &str = "0123456789abcdef-token";
/// The longest a socket read or write may block before the test gives up on it.
const IO_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a server that must refuse to start may take to exit.
const REFUSE_TIMEOUT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------------
// a server and its connections

fn path_str(p: &Path) -> &str {
    p.to_str().expect("temporary paths are UTF-8")
}

/// A loopback port nobody listens on (bound, read and released).
fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().unwrap().port()
}

/// `pcx --data-dir TMP/data serve --socket TMP/s.sock ARGS…` with `env`.
fn serve_cmd(tmp: &Path, env: &[(&str, &str)], args: &[&str]) -> Command {
    let socket = tmp.join("s.sock");
    let mut cmd = pcx(&tmp.join("data"), &["serve", "--socket", path_str(&socket)]);
    cmd.args(args).envs(env.iter().copied());
    cmd
}

/// A running `pcx serve`, killed when dropped; its stderr goes to `TMP/serve.log`.
struct Server {
    process: Guard,
    socket: PathBuf,
    log: PathBuf,
}

impl Server {
    /// Starts `cmd` (from [`serve_cmd`] on `tmp`) and waits until it answers on its socket.
    fn spawn(mut cmd: Command, tmp: &Path) -> Server {
        let log = tmp.join("serve.log");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).expect("create the server's log"))
            .spawn()
            .expect("pcx serve starts");
        let mut server = Server {
            process: Guard(child),
            socket: tmp.join("s.sock"),
            log,
        };
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(status) = server.process.0.try_wait().expect("try_wait") {
                panic!("pcx serve exited at start: {status}\n{}", server.stderr());
            }
            if server.try_stats().is_some() {
                return server;
            }
            assert!(
                Instant::now() < deadline,
                "pcx serve did not answer within {TIMEOUT:?}\n{}",
                server.stderr()
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    fn start(tmp: &Path, env: &[(&str, &str)], args: &[&str]) -> Server {
        Server::spawn(serve_cmd(tmp, env, args), tmp)
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn connect(&self) -> Conn {
        Conn::unix(&self.socket).expect("connect to the server's socket")
    }

    /// `stats` on a new connection, if the server answers one.
    fn try_stats(&self) -> Option<Value> {
        let mut conn = Conn::unix(&self.socket).ok()?;
        conn.set_timeouts(Duration::from_secs(2));
        let answer = conn.try_ask(&json!({"op": "stats"})).ok()?;
        (answer["ok"] == true).then(|| answer["stats"].clone())
    }

    fn pid(&self) -> u32 {
        self.process.0.id()
    }
}

/// A connection speaking frames: 4-byte big-endian length + one MessagePack value.
enum Conn {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Conn {
    fn unix(path: &Path) -> io::Result<Conn> {
        let c = Conn::Unix(UnixStream::connect(path)?);
        c.set_timeouts(IO_TIMEOUT);
        Ok(c)
    }

    fn tcp(port: u16) -> io::Result<Conn> {
        let address = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let c = Conn::Tcp(TcpStream::connect_timeout(
            &address,
            Duration::from_secs(2),
        )?);
        c.set_timeouts(IO_TIMEOUT);
        Ok(c)
    }

    fn set_timeouts(&self, limit: Duration) {
        match self {
            Conn::Unix(s) => {
                s.set_read_timeout(Some(limit)).unwrap();
                s.set_write_timeout(Some(limit)).unwrap();
            }
            Conn::Tcp(s) => {
                s.set_read_timeout(Some(limit)).unwrap();
                s.set_write_timeout(Some(limit)).unwrap();
            }
        }
    }

    fn stream(&mut self) -> &mut dyn ReadWrite {
        match self {
            Conn::Unix(s) => s,
            Conn::Tcp(s) => s,
        }
    }

    fn send(&mut self, request: &Value) -> io::Result<()> {
        self.stream()
            .write_all(&encode_frame(&to_msgpack(request)).unwrap())
    }

    fn recv(&mut self) -> io::Result<Value> {
        let mut header = [0u8; HEADER_LEN];
        self.stream().read_exact(&mut header)?;
        let mut body = vec![0u8; body_len(header) as usize];
        self.stream().read_exact(&mut body)?;
        decode_answer(&body)
            .and_then(to_json)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))
    }

    /// Reads one answer frame without decoding it: its body's length.
    fn recv_frame_len(&mut self) -> io::Result<usize> {
        let mut header = [0u8; HEADER_LEN];
        self.stream().read_exact(&mut header)?;
        let mut body = vec![0u8; body_len(header) as usize];
        self.stream().read_exact(&mut body)?;
        Ok(body.len())
    }

    fn try_ask(&mut self, request: &Value) -> io::Result<Value> {
        self.send(request)?;
        self.recv()
    }

    fn ask(&mut self, request: &Value) -> Value {
        self.try_ask(request)
            .unwrap_or_else(|e| panic!("no answer to {request}: {e}"))
    }

    /// Whether the server closed the connection (end of stream or reset) within `limit`.
    fn closed_within(&mut self, limit: Duration) -> bool {
        self.set_timeouts(limit);
        let mut byte = [0u8; 1];
        match self.stream().read(&mut byte) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => !matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ),
        }
    }
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

fn stats(conn: &mut Conn) -> Value {
    let answer = conn.ask(&json!({"op": "stats"}));
    assert_ok(&answer);
    answer["stats"].clone()
}

/// Polls `stats` until `connections_open` is `n` (connections close asynchronously).
fn wait_connections_open(conn: &mut Conn, n: u64) {
    let deadline = Instant::now() + IO_TIMEOUT;
    loop {
        let open = stats(conn)["connections_open"].as_u64().unwrap();
        if open == n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "connections_open is still {open}, not {n}, after {IO_TIMEOUT:?}"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// A process's CPU time so far (user + system), from /proc/PID/stat.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/PID/stat");
    // The command name (field 2) is in parentheses and may hold spaces: count after it.
    let rest = &stat[stat.rfind(')').expect("a stat line") + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    // Fields 14 and 15 (utime, stime) are the 12th and 13th after the name.
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf only reads a system constant.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_millis(ticks * 1000 / per_second)
}

/// A process's resident memory in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc status")
}

/// Runs `cmd`, which must exit on its own: its status and stderr.
fn exits(mut cmd: Command, what: &str) -> (ExitStatus, String) {
    let mut child = Guard(
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("pcx starts"),
    );
    let stderr = drain(child.0.stderr.take().unwrap());
    let Some(status) = child.wait_for(REFUSE_TIMEOUT) else {
        let _ = child.0.kill();
        let _ = child.0.wait();
        panic!(
            "{what}: pcx was expected to refuse to start, but was still running after \
             {REFUSE_TIMEOUT:?}\nstderr: {}",
            stderr.join().unwrap()
        )
    };
    (status, stderr.join().unwrap())
}

// ---------------------------------------------------------------------------------------------
// descriptors and connections

/// Product bug: at the descriptor limit, accepting fails with EMFILE while the listener stays
/// ready, so the accept loop retried at once, forever: 100 % CPU, tens of MB/s of "accept
/// failed" warnings, new clients timing out (src/server.rs, `run`).
#[test]
fn descriptor_exhaustion_does_not_spin_the_server() {
    let tmp = tempfile::tempdir().unwrap();
    let port = free_port();
    // max_connections far above what 64 descriptors allow, so descriptors run out first.
    let mut cmd = serve_cmd(
        tmp.path(),
        &[
            ("PCX_TCP_TOKEN", TOKEN),
            ("PCX_MAX_CONNECTIONS", "100000"),
            ("PCX_TCP_AUTH_TIMEOUT_MS", "60000"),
        ],
        &["--tcp", &format!("127.0.0.1:{port}")],
    );
    with_descriptor_limit(&mut cmd, 64);
    let server = Server::spawn(cmd, tmp.path());

    // More unauthenticated TCP connections than the server has descriptors for; the kernel
    // queues those it cannot accept.
    let flood: Vec<Conn> = (0..120).filter_map(|_| Conn::tcp(port).ok()).collect();
    assert!(
        flood.len() > 64,
        "only {} connections were made",
        flood.len()
    );
    thread::sleep(Duration::from_millis(500));

    let window = Duration::from_secs(2);
    let (cpu_before, started) = (cpu_time(server.pid()), Instant::now());
    thread::sleep(window);
    let (cpu, wall) = (cpu_time(server.pid()) - cpu_before, started.elapsed());
    assert!(
        cpu < wall / 4,
        "the server used {cpu:?} of CPU in {wall:?} while out of descriptors: it busy-loops"
    );
    let log = server.stderr();
    assert!(
        log.contains("accept failed"),
        "the server never ran out of descriptors (the test did not exhaust them):\n{log}"
    );
    assert!(
        log.len() < 16 << 10,
        "the server wrote {} bytes of log in {:?} while out of descriptors (not rate-limited); \
         it starts:\n{}",
        log.len(),
        window,
        &log[..log.len().min(2000)]
    );

    // Once the flood is gone, clients are served again: over the socket and over TCP.
    drop(flood);
    let deadline = Instant::now() + IO_TIMEOUT;
    while server.try_stats().is_none() {
        assert!(
            Instant::now() < deadline,
            "no client was served within {IO_TIMEOUT:?} of the flood closing\n{}",
            server.stderr()
        );
        thread::sleep(Duration::from_millis(50));
    }
    let mut c = Conn::tcp(port).expect("connect over TCP after the flood");
    assert_eq!(
        c.ask(&json!({"op": "auth", "token": TOKEN})),
        json!({"ok": true})
    );
    assert_ok(&c.ask(&record("after-the-flood", b"x")));
}

/// Regression: the server allocated a frame's whole body as soon as it read the frame's
/// 4-byte length, before any of the body came. Two dozen connections that each sent a length of
/// `max_frame_bytes` (384 MiB) and a few bytes made it reserve 9 GiB it never received; under
/// an address-space limit (`ulimit -v`, or strict overcommit) the allocation failed and the
/// whole server aborted ("memory allocation of 402653184 bytes failed", SIGABRT), dropping
/// every client. Now a body's buffer grows with the bytes that actually arrive.
#[test]
fn frames_that_claim_much_and_send_little_do_not_abort_a_memory_limited_server() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cmd = serve_cmd(tmp.path(), &[], &[]);
    with_address_space_limit(&mut cmd, 3 << 30);
    let server = Server::spawn(cmd, tmp.path());
    let mut c = server.connect();
    assert_ok(&c.ask(&record("before", b"x")));

    let claimed = 402_653_184u32; // the default max_frame_bytes: accepted, not too_large
    let mut stalled: Vec<Conn> = Vec::new();
    for _ in 0..24 {
        let mut conn = server.connect();
        let mut frame = claimed.to_be_bytes().to_vec();
        frame.extend_from_slice(&[0x85, 0xa2, b'o', b'p']); // the start of a map
        conn.stream().write_all(&frame).expect("send half a frame");
        stalled.push(conn);
    }
    thread::sleep(Duration::from_millis(500));

    let mut process = server.process;
    let status = process.0.try_wait().expect("try_wait");
    let log = std::fs::read_to_string(&server.log).unwrap_or_default();
    assert!(
        status.is_none(),
        "the server died ({status:?}) of half frames that claimed {claimed} bytes each:\n{log}"
    );
    let answer = c.ask(&record("after", b"y"));
    assert_ok(&answer);
    // A large frame that does arrive whole is still served.
    let big = vec![b'z'; 8 << 20];
    assert_ok(&c.ask(&record("big", &big)));
    let back = c.ask(&serialize("big"));
    assert_eq!(content_of(&back).as_deref(), Some(&big[..]));
    drop(stalled);
    drop(process);
}

/// The frame of a `record_artifact` of `content` under `key`, as sent.
fn frame_of(request: &Value) -> Vec<u8> {
    encode_frame(&to_msgpack(request)).unwrap()
}

const MIB: usize = 1 << 20;

/// Product bug: each connection bounded its own frame (`max_frame_bytes`, 384 MiB), nothing
/// bounded them together: clients sending large artifacts at once held `max_connections` ×
/// that between them, and were refused `too_large` (or the server killed for want of memory)
/// once the process ran out. Now large frames share `max_frame_bytes_total`: a frame that
/// does not fit waits for its share before its body is read, and every one is served.
#[test]
fn large_frames_from_many_clients_share_max_frame_bytes_total_and_are_all_served() {
    let tmp = tempfile::tempdir().unwrap();
    let budget = 4 * MIB;
    let env = [
        ("PCX_MAX_FRAME_BYTES", "4194304"),
        ("PCX_MAX_FRAME_BYTES_TOTAL", "4194304"),
    ];
    let server = Server::start(tmp.path(), &env, &[]);
    // One client holds most of the budget: half of a 3 MiB frame sent, the rest held back.
    let held_content = vec![b'h'; 3 * MIB + 1000];
    let held = frame_of(&record("held", &held_content));
    assert!(
        held.len() > 3 * MIB && held.len() < budget,
        "held frame: {} bytes",
        held.len()
    );
    let mut holder = server.connect();
    holder.stream().write_all(&held[..held.len() / 2]).unwrap();
    // Then five clients send frames of 2 MiB at once: none fits beside the held one.
    let contents: Vec<Vec<u8>> = (0..5u8).map(|i| vec![b'a' + i; 2 * MIB]).collect();
    let senders: Vec<_> = contents
        .iter()
        .enumerate()
        .map(|(i, content)| {
            let frame = frame_of(&record(&format!("k{i}"), content));
            let mut conn = server.connect();
            thread::spawn(move || {
                conn.stream().write_all(&frame).expect("send a whole frame");
                conn.recv().expect("an answer")
            })
        })
        .collect();
    let mut watcher = server.connect();
    let deadline = Instant::now() + IO_TIMEOUT;
    while stats(&mut watcher)["frames_waited"].as_u64().unwrap_or(0) == 0 {
        assert!(
            Instant::now() < deadline,
            "no frame waited for its share: {}",
            stats(&mut watcher)
        );
        thread::sleep(Duration::from_millis(20));
    }
    holder.stream().write_all(&held[held.len() / 2..]).unwrap();
    assert_ok(&holder.recv().expect("the held frame's answer"));
    for sender in senders {
        assert_ok(&sender.join().expect("a sender"));
    }
    for (i, content) in contents.iter().enumerate() {
        let back = watcher.ask(&serialize(&format!("k{i}")));
        assert_eq!(content_of(&back).as_deref(), Some(&content[..]), "k{i}");
    }
    let s = stats(&mut watcher);
    let peak = s["frame_bytes_held_peak"].as_u64().unwrap();
    assert!(
        peak >= held.len() as u64 - 4 && peak <= budget as u64,
        "frames held at once: {peak} bytes, budget {budget}: {s}"
    );
    assert_eq!(s["refused_frames"], json!(0), "{s}");

    // A budget that could never hold the largest frame is refused at start.
    let cmd = {
        let mut c = serve_cmd(tmp.path(), &[], &[]);
        c.env("PCX_MAX_FRAME_BYTES", "4194304")
            .env("PCX_MAX_FRAME_BYTES_TOTAL", "1048576");
        c
    };
    let (status, stderr) = exits(cmd, "max_frame_bytes_total under max_frame_bytes");
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("max_frame_bytes_total") && stderr.contains("could never be read"),
        "{stderr}"
    );
}

/// A client that takes its share of `max_frame_bytes_total` and stops sending would keep the
/// others waiting for ever: after `frame_stall_timeout_ms` without a byte its frame is
/// refused `frame_stalled`, its connection closed, and the frame waiting behind it is served.
#[test]
fn a_large_frame_that_stalls_is_refused_and_the_frame_waiting_behind_it_is_served() {
    let tmp = tempfile::tempdir().unwrap();
    let env = [
        ("PCX_MAX_FRAME_BYTES", "4194304"),
        ("PCX_MAX_FRAME_BYTES_TOTAL", "4194304"),
        ("PCX_FRAME_STALL_TIMEOUT_MS", "300"),
    ];
    let server = Server::start(tmp.path(), &env, &[]);
    let mut staller = server.connect();
    // A frame claiming 4 MiB, of which 100 KiB come: past its first 64 KiB, so it holds its
    // share. (One that sends only its header holds nothing: see the test above.)
    let mut claim = (4 * MIB as u32).to_be_bytes().to_vec();
    claim.extend_from_slice(&[0x83, 0xa2, b'o', b'p']);
    claim.resize(4 + 100 * 1024, 0);
    staller.stream().write_all(&claim).unwrap();
    let content = vec![b'w'; MIB];
    let frame = frame_of(&record("waiting", &content));
    let mut waiting = server.connect();
    let sender = thread::spawn(move || {
        waiting
            .stream()
            .write_all(&frame)
            .expect("send a whole frame");
        waiting.recv().expect("an answer")
    });
    let refused = staller.recv().expect("the stalled frame is answered");
    let message = assert_failed(&refused, "frame_stalled");
    assert!(
        message.contains("frame_stall_timeout_ms") && message.contains("102400 bytes came"),
        "{message}"
    );
    assert!(staller.closed_within(IO_TIMEOUT));
    assert_ok(&sender.join().expect("the waiting sender"));
    let back = server.connect().ask(&serialize("waiting"));
    assert_eq!(content_of(&back).as_deref(), Some(&content[..]));
}

/// Product bug: there was no cap on connections: every one was accepted (until descriptors
/// ran out), none was told the server was full (src/server.rs, `run`).
#[test]
fn a_connection_over_max_connections_gets_a_clear_error_and_is_closed() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(tmp.path(), &[("PCX_MAX_CONNECTIONS", "3")], &[]);
    let mut held = vec![server.connect()];
    // (The connection that found the server ready closes asynchronously.)
    wait_connections_open(&mut held[0], 1);
    held.extend((0..2).map(|_| server.connect()));
    wait_connections_open(&mut held[0], 3);

    let mut over = server.connect();
    over.set_timeouts(Duration::from_secs(10));
    let answer = over
        .recv()
        .expect("a connection over the limit is answered at once, not left waiting");
    let message = assert_failed(&answer, "too_many_connections");
    assert!(message.contains("max_connections"), "{message}");
    assert!(over.closed_within(Duration::from_secs(10)));
    assert_eq!(stats(&mut held[0])["refused_connections"], json!(1));

    // A connection that ends makes room for the next one.
    held.pop();
    wait_connections_open(&mut held[0], 2);
    let mut next = server.connect();
    assert_ok(&next.ask(&record("room-again", b"y")));
}

/// Product bug: a TCP connection that never authenticated held its descriptor for 10 s (a
/// fixed AUTH_TIMEOUT), so a flood of idle connections kept the server out of descriptors
/// (src/server.rs, `serve_connection`).
#[test]
fn an_unauthenticated_tcp_connection_is_closed_after_tcp_auth_timeout_ms() {
    let tmp = tempfile::tempdir().unwrap();
    let port = free_port();
    let server = Server::start(
        tmp.path(),
        &[("PCX_TCP_TOKEN", TOKEN), ("PCX_TCP_AUTH_TIMEOUT_MS", "300")],
        &["--tcp", &format!("127.0.0.1:{port}")],
    );
    let mut idle = Conn::tcp(port).unwrap();
    // The deadline is 300 ms; five seconds is far more than it needs, far less than 10 s.
    idle.set_timeouts(Duration::from_secs(5));
    let answer = idle
        .recv()
        .expect("the idle connection is told why it is closed within 5 s");
    let message = assert_failed(&answer, "unauthorized");
    assert!(message.contains("tcp_auth_timeout_ms"), "{message}");
    assert!(idle.closed_within(Duration::from_secs(5)));
    // An authenticating client is not affected.
    let mut c = Conn::tcp(port).unwrap();
    assert_eq!(
        c.ask(&json!({"op": "auth", "token": TOKEN})),
        json!({"ok": true})
    );
    thread::sleep(Duration::from_millis(600));
    assert_ok(&c.ask(&json!({"op": "stats"})));
    drop(server);
}

// ---------------------------------------------------------------------------------------------
// answers nobody reads

/// Product bug: the answers a connection holds for a client that does not read them were
/// bounded only by count (256): pipelined reads of 1 MiB held hundreds of MiB per connection
/// (src/server.rs, `serve_connection`).
#[test]
fn unread_answers_are_bounded_by_bytes() {
    const BIG: usize = 1 << 20;
    const REQUESTS: usize = 100;
    let tmp = tempfile::tempdir().unwrap();
    // A budget smaller than one answer: each still goes through, one at a time.
    let server = Server::start(
        tmp.path(),
        &[("PCX_MAX_UNREAD_ANSWER_BYTES_PER_CONNECTION", "524288")],
        &[],
    );
    let content: Vec<u8> = (0..BIG).map(|i| (i % 251) as u8).collect();
    let mut good = server.connect();
    assert_ok(&good.ask(&record("big", &content)));
    assert_eq!(
        content_of(&good.ask(&serialize("big"))),
        Some(content.clone())
    );
    let rss_before = rss_kib(server.pid());

    // Two clients pipeline reads of 1 MiB and read no answer (the requests are small: the
    // socket takes them all without blocking).
    let mut floods: Vec<Conn> = (0..2).map(|_| server.connect()).collect();
    for flood in &mut floods {
        for _ in 0..REQUESTS {
            flood.send(&serialize("big")).expect("send a request");
        }
    }
    let mut peak = rss_before;
    for _ in 0..20 {
        thread::sleep(Duration::from_millis(100));
        peak = peak.max(rss_kib(server.pid()));
    }
    // Bounded only by count (256), each would hold all its answers of 1 MiB (as base64 text
    // and as a frame); bounded by bytes, each holds about one.
    assert!(
        peak < rss_before + (64 << 10),
        "the server grew from {rss_before} KiB to {peak} KiB holding answers nobody reads"
    );

    // Meanwhile others are served, a single answer over the budget included.
    assert_eq!(
        content_of(&good.ask(&serialize("big"))),
        Some(content.clone())
    );
    // And the flood's answers were held back, not lost: all come, in order, once it reads.
    // (Only the last is decoded: the others are checked by their size, which is quicker.)
    let mut flood = floods.remove(0);
    drop(floods);
    for i in 0..REQUESTS - 1 {
        let len = flood
            .recv_frame_len()
            .unwrap_or_else(|e| panic!("answer {i} of the flood: {e}"));
        assert!(len > BIG, "answer {i} is {len} bytes: not the content");
    }
    assert_eq!(
        content_of(&flood.recv().expect("the last answer")),
        Some(content)
    );
}

// ---------------------------------------------------------------------------------------------
// secrets

/// Product bug: `pcx client --token T` was the only way to give the client a token other than
/// the config, and it puts the secret in every user's `ps` (the `pcx` binary's `client`).
#[test]
fn a_token_on_the_command_line_is_warned_about() {
    let tmp = tempfile::tempdir().unwrap();
    let port = free_port();
    let address = format!("127.0.0.1:{port}");
    let _server = Server::start(
        tmp.path(),
        &[("PCX_TCP_TOKEN", TOKEN)],
        &["--tcp", &address],
    );
    let input = format!("{}\n", json!({"op": "stats"}));
    let out = run(
        pcx_cmd(&["client", "--tcp", &address, "--token", TOKEN]),
        input.as_bytes(),
    );
    out.assert_success();
    assert_ok(&out.answer());
    assert!(
        out.stderr.contains("command line") && out.stderr.contains("--token-file"),
        "no warning about the token on the command line: {}",
        out.stderr
    );
}

/// Product bug: as above; the token now comes from a file (or PCX_TCP_TOKEN), unwarned.
#[test]
fn the_client_takes_its_token_from_a_file_off_the_command_line() {
    let tmp = tempfile::tempdir().unwrap();
    let port = free_port();
    let address = format!("127.0.0.1:{port}");
    let _server = Server::start(
        tmp.path(),
        &[("PCX_TCP_TOKEN", TOKEN)],
        &["--tcp", &address],
    );
    let input = format!("{}\n", json!({"op": "stats"}));
    let file = tmp.path().join("token");
    std::fs::write(&file, format!("{TOKEN}\n")).unwrap();
    let out = run(
        pcx_cmd(&["client", "--tcp", &address, "--token-file", path_str(&file)]),
        input.as_bytes(),
    );
    out.assert_success();
    assert_ok(&out.answer());
    assert!(!out.stderr.contains("command line"), "{}", out.stderr);

    let mut cmd = pcx_cmd(&["client", "--tcp", &address]);
    cmd.env("PCX_TCP_TOKEN", TOKEN);
    let out = run(cmd, input.as_bytes());
    out.assert_success();
    assert!(!out.stderr.contains("command line"), "{}", out.stderr);

    std::fs::write(&file, "0123456789abcdef-wrong\n").unwrap();
    let out = run(
        pcx_cmd(&["client", "--tcp", &address, "--token-file", path_str(&file)]),
        input.as_bytes(),
    );
    assert!(!out.status.success(), "a wrong token file fails the client");
    assert!(out.stderr.contains("unauthorized"), "{}", out.stderr);
}

/// Found following the README's operator tour in a new shell: without PCX_TCP_TOKEN,
/// `pcx client --tcp` sent an empty token and said "the server refused the token", as if
/// the token were wrong. It now says that none is given, and how to give one.
#[test]
fn the_client_without_a_token_says_how_to_give_one() {
    let tmp = tempfile::tempdir().unwrap();
    let address = format!("127.0.0.1:{}", free_port());
    let _server = Server::start(
        tmp.path(),
        &[("PCX_TCP_TOKEN", TOKEN)],
        &["--tcp", &address],
    );
    let mut cmd = pcx_cmd(&["client", "--tcp", &address]);
    cmd.env_remove("PCX_TCP_TOKEN");
    let out = run(cmd, format!("{}\n", json!({"op": "stats"})).as_bytes());
    assert!(!out.status.success(), "{}", out.stdout);
    assert!(
        out.stderr.contains("--token-file") && out.stderr.contains("PCX_TCP_TOKEN"),
        "says how to give the token: {}",
        out.stderr
    );
    assert!(!out.stderr.contains("refused"), "{}", out.stderr);
}

/// Product bug: any non-empty token was accepted, "x" included (src/config.rs).
#[test]
fn tokens_shorter_than_16_bytes_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let address = format!("127.0.0.1:{}", free_port());
    let cmd = serve_cmd(
        tmp.path(),
        &[("PCX_TCP_TOKEN", "fifteen-bytes-x")],
        &["--tcp", &address],
    );
    let (status, stderr) = exits(cmd, "a 15-byte token");
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("tcp_token") && stderr.contains("16"),
        "the message names the key and the minimum: {stderr}"
    );
    assert!(!tmp.path().join("s.sock").exists(), "no socket was left");
    drop(Server::start(
        tmp.path(),
        &[("PCX_TCP_TOKEN", "sixteen-bytes-xx")],
        &["--tcp", &address],
    ));
}

// ---------------------------------------------------------------------------------------------
// configuration

/// Product bug (found following docs/operations.md): `pcx --config missing.toml …` said
/// "cannot read config file missing.toml: No such file or directory (os error 2): No such
/// file or directory (os error 2)", the cause twice, where every other failure says it once.
#[test]
fn a_config_file_that_cannot_be_read_is_named_with_its_cause_said_once() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("missing.toml");
    let cmd = pcx(
        &tmp.path().join("data"),
        &["--config", path_str(&missing), "verify"],
    );
    let (status, stderr) = exits(cmd, "a missing config file");
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(path_str(&missing)),
        "names the file: {stderr}"
    );
    assert_eq!(
        stderr.matches("No such file or directory").count(),
        1,
        "the cause once: {stderr}"
    );
}

/// Product bug: three values panicked (exit 101) or started a server that dropped every
/// connection, instead of being refused with a message (src/config.rs, `validate`).
#[test]
fn out_of_range_configuration_values_exit_2_with_a_message() {
    let tmp = tempfile::tempdir().unwrap();
    let huge = "9223372036854775807";
    let dir = tmp.path().join("data");
    let mut cases: Vec<(&str, &str, Command)> = vec![
        ("max_in_flight", huge, pcx(&dir, &["batch"])),
        ("cache_capacity_bytes", "0", pcx(&dir, &["batch"])),
        (
            "max_in_flight_per_connection",
            huge,
            serve_cmd(tmp.path(), &[], &[]),
        ),
    ];
    let file = tmp.path().join("pcx.toml");
    std::fs::write(&file, "cache_capacity_bytes = 0\n").unwrap();
    let mut from_file = pcx(&dir, &["--config", path_str(&file), "batch"]);
    from_file.env_remove("PCX_CACHE_CAPACITY_BYTES");
    for (key, value, cmd) in &mut cases {
        cmd.env(format!("PCX_{}", key.to_uppercase()), *value);
    }
    cases.push(("cache_capacity_bytes", "0", from_file));
    for (key, value, cmd) in cases {
        let what = format!("{key} = {value} ({})", describe(&cmd));
        let (status, stderr) = exits(cmd, &what);
        assert!(!stderr.contains("panicked"), "{what} panicked: {stderr}");
        assert_eq!(status.code(), Some(2), "{what}: {stderr}");
        for part in [key, value, "must be from"] {
            assert!(
                stderr.contains(part),
                "{what}: the message lacks {part:?}: {stderr}"
            );
        }
    }
}

/// A server that dies mid-stream: `pcx client` fails, saying how many requests were answered
/// and that the rest may or may not have been applied (it said only "failed to fill whole
/// buffer").
#[test]
fn a_server_gone_mid_stream_fails_the_client_saying_how_far_the_answers_came() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("fake.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    // A fake server: answers two requests, then closes the connection.
    let fake = thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        conn.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        for _ in 0..2 {
            let mut header = [0u8; HEADER_LEN];
            conn.read_exact(&mut header).unwrap();
            let mut body = vec![0u8; body_len(header) as usize];
            conn.read_exact(&mut body).unwrap();
            conn.write_all(&encode_frame(&to_msgpack(&json!({"ok": true}))).unwrap())
                .unwrap();
        }
    });
    let input: String = (0..5)
        .map(|i| format!("{}\n", json!({"op": "stats", "id": i})))
        .collect();
    let out = run(
        pcx_cmd(&["client", "--socket", path_str(&path)]),
        input.as_bytes(),
    );
    fake.join().unwrap();
    assert!(!out.status.success(), "{}", out.stdout);
    assert_eq!(out.stdout.lines().count(), 2, "{}", out.stdout);
    assert!(
        out.stderr.contains("after 2 answers") && out.stderr.contains("may or may not"),
        "{}",
        out.stderr
    );
}
