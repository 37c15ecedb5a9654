"""The embedded default: one `pcx serve` per data directory, started by the first process that
needs it and found again by the next, even across processes starting at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import pcx
from pcx import server


@pytest.fixture
def default_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    d = tmp_path / "share" / "pcx"
    monkeypatch.setenv("PCX_DATA_DIR", str(d))
    yield d
    pid = server.server_pid(d)
    if pid is not None:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


def _wait_gone(pid: int) -> None:
    """Until `pid` has exited (a zombie of this process, which started it, counts as gone)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return
        except (ProcessLookupError, FileNotFoundError):
            return
        time.sleep(0.05)


def test_the_default_server_is_started_once_and_reused(default_dir: Path) -> None:
    with pcx.Client.default() as a:
        a.record_artifact("k", b"v")
    pid = server.server_pid(default_dir)
    assert pid is not None
    # A second client, and processes starting at the same moment, find the same server.
    code = (
        "import pcx; c = pcx.Client.default(); "
        "print(c.serialize_artifact_by_key('k')['content_b64'].decode()); c.close()"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    outs = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert outs == ["v"] * 4
    assert server.server_pid(default_dir) == pid, "no second server was started"
    # It outlives the processes that used it, and stops by pid.
    os.kill(pid, signal.SIGTERM)
    _wait_gone(pid)
    # The next use starts a new one on the same data: nothing was lost.
    with pcx.Client.default() as b:
        assert b.serialize_artifact_by_key("k")["content_b64"] == b"v"
    assert server.server_pid(default_dir) != pid


def test_a_missing_binary_is_a_clear_error(
    default_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PCX_BIN", str(default_dir / "no-such-pcx"))
    with pytest.raises(pcx.ServerStartError, match="PCX_BIN=.*no-such-pcx"):
        pcx.Client.default()


def test_the_default_server_listens_where_the_client_looks_whatever_pcx_socket_path_says(
    default_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: the server `Client.default()` starts inherits the environment, and
    `PCX_SOCKET_PATH` (set for `pcx client`, say) made it listen there instead of at
    `DATA_DIR/pcx.sock`, where the client waited for it: every start failed after 30 s with the
    server left running, holding the data directory (so every later start failed "in use"),
    and `pcx.torch` ran without pcx. Now the server is told the socket the client looks at."""
    monkeypatch.setenv("PCX_SOCKET_PATH", str(tmp_path / "elsewhere.sock"))
    monkeypatch.setattr(server, "START_TIMEOUT_S", 10.0)
    with pcx.Client.default() as c:
        c.record_artifact("k", b"v")
    with pcx.Client.default() as c:
        assert c.serialize_artifact_by_key("k")["content_b64"] == b"v"
    assert not (tmp_path / "elsewhere.sock").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a server as another user")
@pytest.mark.parametrize("directory_by", ["the other user", "this user, writable by all"])
def test_a_server_of_another_user_at_the_data_directory_is_refused_not_used(
    monkeypatch: pytest.MonkeyPatch, directory_by: str
) -> None:
    """Regression: `Client.default()` (and so `pcx.torch`) used whatever answered at
    `DATA_DIR/pcx.sock`. With `PCX_DATA_DIR` in a shared place (`/tmp/pcx`, a shared
    `XDG_DATA_HOME`), another user who made that directory first and listened there received
    every artifact torch recorded and answered its loads, with pickles torch then unpickles.
    Now a socket served by another user (or a data directory owned by one) is refused with
    `pcx.ServerStartError`, naming it."""
    import shutil
    import socket
    import tempfile

    nobody = 65534
    shared = Path(tempfile.mkdtemp(prefix="pcx-shared-"))  # in /tmp, which anyone can reach
    os.chmod(shared, 0o777)
    data = shared / "pcx"
    if directory_by != "the other user":
        data.mkdir()
        os.chmod(data, 0o777)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the other user: makes the directory first and listens in it
        try:
            os.setgid(nobody)
            os.setuid(nobody)
            data.mkdir(exist_ok=True)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.bind(str(data / "pcx.sock"))
            s.listen(16)
            os.write(write, b"ready")
            time.sleep(60)
        finally:
            os._exit(0)
    os.close(write)
    try:
        assert os.read(read, 5) == b"ready"
        monkeypatch.setenv("PCX_DATA_DIR", str(data))
        with pytest.raises(pcx.ServerStartError, match=str(nobody)):
            pcx.Client.default()
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(read)
        shutil.rmtree(shared, ignore_errors=True)


def test_a_default_client_that_connects_as_its_server_shuts_down_reaches_the_next_server(
    default_dir: Path,
) -> None:
    """Regression: a server told to stop (SIGTERM) closes its listener, and a connection that
    was still waiting in its backlog is reset. `Client.default()` connected in that moment
    (the socket answered the connect) and handed out a client whose first request raised
    `pcx.TransportError` ("Connection reset by peer"): a torchrun rank started while the
    server was restarted ran without pcx. Now `Client.default()` has its connection answer one
    request before it hands it out, and otherwise starts (or finds) the next server."""
    import socket
    import threading

    default_dir.mkdir(parents=True)
    # A server that has just been told to stop: it accepts nothing more, and closes its
    # listener (resetting the connections in its backlog), leaving its socket file behind.
    stopping = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stopping.bind(str(default_dir / "pcx.sock"))
    stopping.listen(16)
    closed = threading.Event()

    def close_listener() -> None:
        time.sleep(1.0)
        stopping.close()
        closed.set()

    closer = threading.Thread(target=close_listener)
    closer.start()
    try:
        with pcx.Client.default() as c:
            c.record_artifact("k", b"v")
            assert c.serialize_artifact_by_key("k")["content_b64"] == b"v"
        assert closed.is_set()
    finally:
        closer.join(timeout=10)


def test_a_default_client_made_while_the_old_server_still_finishes_waits_for_it(
    default_dir: Path,
) -> None:
    """Regression: a server stopped with SIGTERM holds its data directory until it has
    written its accepted answers (up to its 5 s grace, when a client does not read them) and
    closed. `Client.default()` in that time started a new server, which waits 2 s for the
    directory and exits "in use": `pcx.ServerStartError` (so `pcx.torch.install()` raised),
    and `DATA_DIR.serve.pid` named that dead child instead of any server. Now a start the old
    holder keeps out of the directory is made again until `START_TIMEOUT_S`, and the pid file
    is put back as it was when a started child exits without listening."""
    import socket
    import struct

    import msgpack

    with pcx.Client.default() as c:
        c.record_artifact("big", b"x" * (4 << 20))
    old = server.server_pid(default_dir)
    assert old is not None
    # A client that asks for large answers and does not read them holds the old server's
    # shutdown for its whole grace period.
    slow = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    slow.connect(str(default_dir / "pcx.sock"))
    body = msgpack.packb({"op": "serialize_artifact_by_key", "key": "big"})
    for _ in range(20):
        slow.sendall(struct.pack(">I", len(body)) + body)
    time.sleep(0.5)
    os.kill(old, signal.SIGTERM)
    time.sleep(0.2)
    try:
        with pcx.Client.default() as c:
            assert c.serialize_artifact_by_key("big")["content_b64"] == b"x" * (4 << 20)
    finally:
        slow.close()
    new = server.server_pid(default_dir)
    assert new is not None and new != old
    os.kill(new, 0)  # the pid file names the server that runs now


def test_a_data_directory_whose_socket_path_is_longer_than_sun_path_is_served_and_reached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: a socket's address holds 107 bytes of path, and `DATA_DIR/pcx.sock` of a
    data directory deep in a CI workspace or project tree is longer: the server
    `Client.default()` started exited "path must be shorter than SUN_LEN", so
    `pcx.ServerStartError` (and `pcx.torch.install()` raised). Now the server binds and the
    client connects through a descriptor on the socket's directory when the path is too
    long."""
    data = tmp_path / ("d" * 60) / ("e" * 60) / "pcx"
    assert len(str(data / "pcx.sock")) > 108
    monkeypatch.setenv("PCX_DATA_DIR", str(data))
    try:
        with pcx.Client.default() as c:
            c.record_artifact("k", b"v")
        with pcx.Client.connect(str(data / "pcx.sock")) as c:
            assert c.serialize_artifact_by_key("k")["content_b64"] == b"v"
    finally:
        pid = server.server_pid(data)
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
            _wait_gone(pid)


def test_a_default_client_behind_a_stopped_starter_gives_up_in_time_not_never(
    default_dir: Path,
) -> None:
    """Regression: `Client.default()` waited for `DATA_DIR.start-lock` without a bound. A
    process stopped while it held it (Ctrl-Z, a debugger's breakpoint in a notebook) made
    every other process's `Client.default()` (every torchrun rank's `pcx.torch.install()`)
    hang for as long as it stayed stopped, saying nothing. Now the wait for the lock counts
    against the start's own deadline (`START_TIMEOUT_S`), after which it fails naming the
    lock, and a server that comes up meanwhile is used at once."""
    default_dir.parent.mkdir(parents=True)
    lock_path = default_dir.parent / (default_dir.name + ".start-lock")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, signal, sys; f = open(sys.argv[1], 'w'); "
            "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); "
            "os.kill(os.getpid(), signal.SIGSTOP)",
            str(lock_path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        code = (
            "import pcx, pcx.server as s; s.START_TIMEOUT_S = 2.0\n"
            "try:\n    pcx.Client.default()\nexcept pcx.ServerStartError as e:\n    print(e)\n"
        )
        waited = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=30
        )
        assert "start-lock" in waited.stdout, waited.stdout + waited.stderr
    finally:
        holder.kill()
        holder.wait(timeout=10)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
@pytest.mark.parametrize("name", ["pcx.serve.pid", "pcx.serve.log", "pcx.start-lock"])
def test_a_link_another_user_put_beside_the_data_directory_is_refused_not_written_through(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, name: str
) -> None:
    """Regression: the embedded default keeps its start lock, its server's log and pid beside
    the data directory, and opened them following symbolic links. With `PCX_DATA_DIR` in a
    directory every user can write (`/tmp/pcx`), another user's link
    `/tmp/pcx.serve.pid -> ~/.bashrc` had `Client.default()` overwrite that file with the
    server's pid (the log and the lock likewise wrote or created where the link pointed). Now
    those files are opened without following a link, and one of another user is refused with
    `pcx.ServerStartError` naming it, nothing written."""
    import shutil
    import tempfile

    nobody = 65534
    shared = Path(tempfile.mkdtemp(prefix="pcx-shared-"))  # like /tmp: sticky, writable by all
    os.chmod(shared, 0o1777)
    victim = tmp_path / "precious"
    victim.write_text("precious\n")
    pid = os.fork()
    if pid == 0:  # the other user plants the link
        try:
            os.setgid(nobody)
            os.setuid(nobody)
            os.symlink(victim, shared / name)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    monkeypatch.setenv("PCX_DATA_DIR", str(shared / "pcx"))
    try:
        with pytest.raises(pcx.ServerStartError, match=name):
            pcx.Client.default()
        assert victim.read_text() == "precious\n"
    finally:
        started = server.server_pid(shared / "pcx")
        if started is not None and started != os.getpid():
            try:
                os.kill(started, signal.SIGTERM)
                _wait_gone(started)
            except ProcessLookupError:
                pass
        shutil.rmtree(shared, ignore_errors=True)
