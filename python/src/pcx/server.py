"""The embedded default: a per-user data directory and one ``pcx serve`` on it, started by the
first process that needs it and reused by every later one.

Where things are:

- the binary: ``$PCX_BIN``, else ``pcx`` on ``PATH``;
- the data directory: ``$PCX_DATA_DIR``, else ``$XDG_DATA_HOME/pcx``, else
  ``~/.local/share/pcx``;
- the socket: ``DATA_DIR/pcx.sock`` (pcx's default ``socket_path``);
- the server's own log: ``DATA_DIR.serve.log`` beside the directory.

Two processes starting at once: each takes an exclusive lock on ``DATA_DIR.start-lock`` before
looking for a server, so exactly one starts it and the other finds it. The server is started in
its own session, so it outlives the process that started it (the point: the next torch process
warm-starts from it); stop it with SIGTERM (its pid is in :func:`server_pid`'s answer).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import struct
import subprocess
import time
from pathlib import Path
from typing import IO, Optional

from .errors import ServerStartError
from .transport import connect_unix

__all__ = ["default_data_dir", "find_binary", "ensure_server", "server_pid", "check_peer"]

#: How long a started server may take to listen.
START_TIMEOUT_S = 30.0


def default_data_dir() -> Path:
    """The per-user data directory of the embedded default."""
    explicit = os.environ.get("PCX_DATA_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "share"
    )
    return Path(base) / "pcx"


def find_binary() -> str:
    """The ``pcx`` binary: ``$PCX_BIN``, else ``pcx`` on ``PATH``."""
    explicit = os.environ.get("PCX_BIN")
    if explicit:
        if not os.access(explicit, os.X_OK):
            raise ServerStartError(f"PCX_BIN={explicit} is not an executable file")
        return explicit
    found = shutil.which("pcx")
    if found is None:
        raise ServerStartError(
            "no `pcx` binary: put it on PATH (`cargo install --path .` in pcx's repository) "
            "or set PCX_BIN to its path"
        )
    return found


def _trusted(uid: int) -> bool:
    """Whether a server or directory of user ``uid`` may hold this user's artifacts (which
    are pickles torch unpickles): this user's own, or root's."""
    return uid in (os.getuid(), 0)


def peer_uid(sock: socket.socket, socket_path: Path) -> int:
    """The user of the process at the other end of ``sock`` (connected to ``socket_path``)."""
    if hasattr(socket, "SO_PEERCRED"):
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        uid: int = struct.unpack("3i", creds)[1]
        return uid
    return os.stat(socket_path).st_uid


def check_peer(sock: socket.socket, socket_path: Path) -> None:
    """Refuses (:class:`ServerStartError`) a server run by another user at ``socket_path``:
    pcx will not send it this user's artifacts nor unpickle what it answers."""
    uid = peer_uid(sock, socket_path)
    if not _trusted(uid):
        raise ServerStartError(
            f"the server answering on {socket_path} runs as user {uid}, not as this user "
            f"({os.getuid()}): pcx will not send it your artifacts nor load what it answers; "
            f"point PCX_DATA_DIR at a directory of your own"
        )


def _answers(socket_path: Path) -> bool:
    """Whether a server answers on ``socket_path``; one run by another user is refused
    (:class:`ServerStartError`), never used."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(2.0)
    try:
        connect_unix(sock, socket_path)
        check_peer(sock, socket_path)
    except OSError:
        return False
    finally:
        sock.close()
    return True


def _check_owner(data_dir: Path) -> None:
    """Refuses a data directory (or its parent, where the lock and log go) that another user
    owns: they could replace the server's files, or serve their own at its socket."""
    for path in (data_dir, data_dir.parent):
        try:
            uid = os.stat(path).st_uid
        except OSError:
            continue
        if not _trusted(uid):
            raise ServerStartError(
                f"{path} belongs to user {uid}, not to this user ({os.getuid()}): pcx will "
                f"not keep your artifacts there; point PCX_DATA_DIR at a directory of your own"
            )


def _open_beside(path: Path, flags: int) -> int:
    """Opens (creating, mode 0600) one of the files kept beside the data directory: the start
    lock, the server's log and its pid. Never through a symbolic link, and never one of
    another user's: in a directory every user can write (``PCX_DATA_DIR=/tmp/pcx``) another
    user could put a link there to any file of this user, which was then overwritten (the pid,
    the log; the lock truncated it), or a file of their own to read the server's log."""
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise ServerStartError(
            f"cannot open {path} ({e}): pcx keeps it beside the data directory and opens no "
            f"symbolic link there, where another user may have put one; remove it, or point "
            f"PCX_DATA_DIR at a directory in one of your own"
        ) from e
    uid = os.fstat(fd).st_uid
    if not _trusted(uid):
        os.close(fd)
        raise ServerStartError(
            f"{path} belongs to user {uid}, not to this user ({os.getuid()}): pcx will not "
            f"use it; remove it, or point PCX_DATA_DIR at a directory in one of your own"
        )
    return fd


def ensure_server(data_dir: Optional[Path] = None, binary: Optional[str] = None) -> str:
    """The socket path of the server on ``data_dir`` (the embedded default's when ``None``),
    starting ``pcx serve`` there if nothing answers yet."""
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    socket_path = data_dir / "pcx.sock"
    _check_owner(data_dir)
    if _answers(socket_path):
        return str(socket_path)
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    lock_path = data_dir.parent / (data_dir.name + ".start-lock")
    # One deadline for the whole start, the wait for the lock included: a process stopped
    # while it held the lock (Ctrl-Z, a breakpoint) made every other one wait for ever, and
    # processes queued behind a start that kept failing waited one full start each.
    deadline = time.monotonic() + START_TIMEOUT_S
    with os.fdopen(_open_beside(lock_path, os.O_WRONLY), "w") as lock:
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if _answers(socket_path):
                    return str(socket_path)
                if time.monotonic() >= deadline:
                    raise ServerStartError(
                        f"another process has held {lock_path} for {START_TIMEOUT_S:.0f} s, "
                        f"starting the server on {data_dir}, and none answers on "
                        f"{socket_path}: is that process stopped (Ctrl-Z, a debugger)?"
                    ) from None
                time.sleep(0.05)
        if _answers(socket_path):
            return str(socket_path)
        _start(data_dir, socket_path, binary or find_binary(), deadline)
    return str(socket_path)


#: What a server's log says when another process holds its data directory.
_IN_USE = "is in use"


def _start(data_dir: Path, socket_path: Path, binary: str, deadline: float) -> None:
    """Starts ``pcx serve`` and waits until it listens. A server stopped with SIGTERM holds
    its data directory until it has written its accepted answers and closed (up to its 5 s
    grace), longer than a new server waits for it (2 s), so a start that finds the directory
    in use is made again until ``deadline``: a client made while the old server finishes
    reaches the new one instead of failing."""
    log_path = data_dir.parent / (data_dir.name + ".serve.log")
    pid_path = data_dir.parent / (data_dir.name + ".serve.pid")
    # Both opened (and checked) before anything starts.
    with os.fdopen(_open_beside(log_path, os.O_WRONLY | os.O_APPEND), "ab") as log, os.fdopen(
        _open_beside(pid_path, os.O_RDWR), "r+", encoding="utf-8", errors="replace"
    ) as pid_file:
        previous = pid_file.read()

        def name_in_pid_file(text: str) -> None:
            pid_file.seek(0)
            pid_file.truncate()
            pid_file.write(text)
            pid_file.flush()

        while True:
            proc = _spawn(data_dir, socket_path, binary, log)
            # Named at once (an interrupted start still leaves the server it started
            # findable), and the earlier name put back if this child never listens: it named
            # a dead child, so `kill $(cat DATA_DIR.serve.pid)` missed the server.
            name_in_pid_file(f"{proc.pid}\n")
            while time.monotonic() < deadline:
                if _answers(socket_path):
                    if proc.poll() is not None:
                        name_in_pid_file(previous)
                    return
                code = proc.poll()
                if code is not None:
                    break
                time.sleep(0.02)
            else:
                raise ServerStartError(
                    f"`{binary} --data-dir {data_dir} serve` did not listen on {socket_path} "
                    f"within {START_TIMEOUT_S:.0f} s; its log: {log_path}"
                )
            name_in_pid_file(previous)
            tail = _tail(log_path)
            if _IN_USE not in tail or time.monotonic() >= deadline:
                raise ServerStartError(
                    f"`{binary} --data-dir {data_dir} serve` exited with {code} before "
                    f"listening; its log: {log_path}: {tail}"
                )
            time.sleep(0.1)


def _spawn(
    data_dir: Path, socket_path: Path, binary: str, log: IO[bytes]
) -> "subprocess.Popen[bytes]":
    return subprocess.Popen(
        # The socket named too: the server inherits this environment, where a
        # PCX_SOCKET_PATH would otherwise put it somewhere the client does not look.
        [binary, "--data-dir", str(data_dir), "serve", "--socket", str(socket_path)],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
        start_new_session=True,
    )


def server_pid(data_dir: Optional[Path] = None) -> Optional[int]:
    """The pid of the server this module started on ``data_dir``, if it recorded one."""
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    try:
        return int((data_dir.parent / (data_dir.name + ".serve.pid")).read_text().strip())
    except (OSError, ValueError):
        return None


def _tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(unreadable)"
    return " | ".join(text[-lines:])
