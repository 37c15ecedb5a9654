"""The two ways to carry requests to pcx, behind one interface.

- :class:`SocketTransport`: a connection to ``pcx serve`` (Unix socket, or loopback TCP with a
  token). Each message, both ways, is a frame: a 4-byte big-endian length, then one MessagePack
  value. Fields named ``*_b64`` travel as MessagePack binary.
- :class:`BatchTransport`: a ``pcx batch`` child process owning a data directory, JSON lines on
  its stdin and stdout. Fields named ``*_b64`` travel as base64 text; this side converts them, so
  callers see ``bytes`` there with either transport.

Both answer in request order, so a caller may send many requests before reading (pipelining).
"""

from __future__ import annotations

import base64
import json
import os
import socket
import struct
import subprocess
from typing import IO, Any, Dict, List, Mapping, Optional, Sequence

import msgpack

from .errors import InvalidRequest, TransportError

__all__ = ["Transport", "SocketTransport", "BatchTransport", "Request", "Answer", "connect_unix"]

#: A request map: ``{"op": NAME, ...fields}``.
Request = Mapping[str, Any]
#: An answer map as pcx sent it (``*_b64`` fields hold ``bytes``).
Answer = Dict[str, Any]

_HEADER = struct.Struct(">I")
#: The most an answer's buffer first holds: it grows as bytes arrive, never to a length a
#: header only claims (a garbage header of 4 GiB allocates nothing up front).
_FIRST_READ = 1 << 20


#: The most bytes of path a socket address holds (``sun_path`` less its NUL).
_MAX_SOCKET_PATH = 107


def connect_unix(sock: socket.socket, path: "os.PathLike[str] | str") -> None:
    """Connects ``sock`` to the Unix socket at ``path``, whatever its length: a path longer
    than a socket address holds (a data directory deep in a CI workspace) is reached through
    a descriptor on its directory (``/proc/self/fd/N/NAME``), as ``pcx serve`` binds it."""
    path = os.fspath(path)
    if len(os.fsencode(path)) <= _MAX_SOCKET_PATH:
        sock.connect(path)
        return
    directory, name = os.path.split(path)
    fd = os.open(directory or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        sock.connect(f"/proc/self/fd/{fd}/{name}")
    finally:
        os.close(fd)


class Transport:
    """Sends request maps and receives answer maps, in order. Not thread-safe by itself
    (:class:`pcx.Client` serialises its use)."""

    #: What the transport talks to, for messages.
    description = "pcx"

    def send(self, request: Request) -> None:
        """Writes one request without waiting for its answer."""
        raise NotImplementedError

    def flush(self) -> None:
        """Pushes requests written so far to pcx (a no-op where writes are unbuffered)."""

    def receive(self) -> Answer:
        """Reads the next answer (answers come in request order)."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class SocketTransport(Transport):
    """MessagePack frames over a connected stream socket."""

    def __init__(self, sock: socket.socket, description: str) -> None:
        self._sock = sock
        self.description = description
        self._packer = msgpack.Packer(use_bin_type=True)

    @classmethod
    def unix(cls, path: str, timeout: Optional[float] = None) -> "SocketTransport":
        """Connects to a server's Unix socket (by default ``DATA_DIR/pcx.sock``)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            connect_unix(sock, path)
        except OSError:
            sock.close()
            raise
        return cls(sock, f"pcx serve at {path}")

    @classmethod
    def tcp(cls, host: str, port: int, timeout: Optional[float] = None) -> "SocketTransport":
        """Connects over loopback TCP; the caller sends ``auth`` first."""
        sock = socket.create_connection((host, port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(sock, f"pcx serve at {host}:{port}")

    @property
    def socket(self) -> socket.socket:
        """The connected socket (for checking who is at the other end)."""
        return self._sock

    def send(self, request: Request) -> None:
        body = self._packer.pack(dict(request))
        try:
            self._sock.sendall(_HEADER.pack(len(body)) + body)
        except OSError as e:
            raise TransportError(f"sending to {self.description}: {e}") from e

    def receive(self) -> Answer:
        (length,) = _HEADER.unpack(self._read_exactly(_HEADER.size))
        body = self._read_exactly(length)
        try:
            answer = msgpack.unpackb(body, raw=False, strict_map_key=False)
        except Exception as e:  # msgpack's ExtraData, FormatError, StackError, ValueError…
            raise TransportError(
                f"{self.description} answered a frame of {length} bytes that is not one "
                f"MessagePack value ({type(e).__name__}: {e})"
            ) from e
        if not isinstance(answer, dict):
            raise TransportError(f"{self.description} answered a frame that is not a map")
        return answer

    def _read_exactly(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            try:
                chunk = self._sock.recv(min(n - len(buf), max(len(buf), _FIRST_READ)))
            except OSError as e:
                raise TransportError(f"reading from {self.description}: {e}") from e
            if not chunk:
                raise TransportError(
                    f"{self.description} closed the connection after {len(buf)} of {n} bytes"
                )
            buf += chunk
        return bytes(buf)

    def close(self) -> None:
        self._sock.close()


class BatchTransport(Transport):
    """JSON lines through a ``pcx batch`` child process that owns ``data_dir``.

    The child holds the data directory exclusively while it runs (a running server on the same
    directory makes it exit with an error), and every answer is durable when it is read."""

    def __init__(
        self,
        binary: str,
        data_dir: Optional[str] = None,
        extra_args: Sequence[str] = (),
        env: Optional[Mapping[str, str]] = None,
    ) -> None:
        args = [binary]
        if data_dir is not None:
            args += ["--data-dir", data_dir]
        args += [*extra_args, "batch"]
        self.description = f"pcx batch on {data_dir or 'the configured data directory'}"
        child_env = dict(os.environ if env is None else env)
        try:
            self._proc = subprocess.Popen(
                args,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=child_env,
            )
        except OSError as e:
            raise TransportError(f"cannot start {binary}: {e}") from e
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._stdin: IO[bytes] = self._proc.stdin
        self._stdout: IO[bytes] = self._proc.stdout
        self._stderr_tail: List[bytes] = []
        self._start_stderr_drain()

    def _start_stderr_drain(self) -> None:
        # pcx logs to stderr; an undrained pipe would block the child once it fills.
        import threading

        stderr = self._proc.stderr
        assert stderr is not None
        tail = self._stderr_tail

        def drain() -> None:
            for line in stderr:
                tail.append(line)
                if len(tail) > 50:
                    del tail[:-50]

        threading.Thread(target=drain, name="pcx-batch-stderr", daemon=True).start()

    def send(self, request: Request) -> None:
        # Raises InvalidRequest, as the socket's server would answer, before writing anything.
        line = json.dumps(_to_json(request), separators=(",", ":")).encode() + b"\n"
        try:
            self._stdin.write(line)
        except OSError as e:
            raise TransportError(f"writing to {self.description}: {e}{self._why()}") from e

    def flush(self) -> None:
        try:
            self._stdin.flush()
        except OSError as e:
            raise TransportError(f"writing to {self.description}: {e}{self._why()}") from e

    def receive(self) -> Answer:
        self.flush()
        line = self._stdout.readline()
        if not line:
            self._proc.wait()
            raise TransportError(
                f"{self.description} exited ({self._proc.returncode}) before answering{self._why()}"
            )
        try:
            answer = json.loads(line)
        except ValueError as e:
            raise TransportError(
                f"{self.description} answered a line that is not JSON ({e}){self._why()}"
            ) from e
        if not isinstance(answer, dict):
            raise TransportError(f"{self.description} answered a line that is not an object")
        return _from_json(answer)

    def _why(self) -> str:
        tail = b"".join(self._stderr_tail[-5:]).decode(errors="replace").strip()
        return f"; its stderr ends: {tail}" if tail else ""

    def close(self) -> None:
        """Ends the input; the child answers what it read, commits and exits."""
        try:
            self._stdin.close()
        except OSError:
            pass
        try:
            self._proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._stdout.close()

    @property
    def pid(self) -> int:
        return self._proc.pid


def _to_json(value: Any, key: str = "") -> Any:
    """Bytes become base64 text in ``*_b64`` fields, where pcx wants bytes; anywhere else they
    are refused, as the socket's server refuses them: as base64 text, a key sent as bytes
    (``b"k"``) would be stored under the key ``aw==``."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        if not key.endswith("_b64"):
            raise InvalidRequest(
                "invalid_request",
                f"field `{key or '(the whole request)'}` holds bytes, but only fields named "
                f"`*_b64` carry bytes; send it as text",
            )
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, Mapping):
        return {str(k): _to_json(v, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_json(v, key) for v in value]
    return value


def _from_json(value: Any, key: str = "") -> Any:
    """``*_b64`` text becomes bytes, as the socket transport gives them."""
    if isinstance(value, dict):
        return {k: _from_json(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_json(v, key) for v in value]
    if isinstance(value, str) and key.endswith("_b64"):
        try:
            return base64.b64decode(value, validate=True)
        except ValueError:
            return value
    return value
