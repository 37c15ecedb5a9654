"""Fixtures: the `pcx` binary under test, fresh data directories, and a client per transport."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Iterator, Optional

import pytest

import pcx

REPO = Path(__file__).resolve().parents[2]


def pcx_binary() -> str:
    """$PCX_BIN, else the debug build of this checkout (build it with `cargo build`)."""
    explicit = os.environ.get("PCX_BIN")
    if explicit:
        return explicit
    built = REPO / "target" / "debug" / "pcx"
    if not built.exists():
        pytest.fail(f"no pcx binary: run `cargo build --bin pcx` (looked for {built})")
    return str(built)


@pytest.fixture(autouse=True)
def _binary_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PCX_BIN", pcx_binary())


def torch_pickle_plugin() -> Path:
    """The torch-pickle plugin library: $PCX_TORCH_PICKLE_LIB, else this checkout's debug
    build (built here with `cargo build -p torch-pickle` when missing)."""
    explicit = os.environ.get("PCX_TORCH_PICKLE_LIB")
    built = Path(explicit) if explicit else REPO / "target" / "debug" / "libtorch_pickle.so"
    if not built.exists() and not explicit:
        # `cargo test` builds the crate's tests, not its library: build it here.
        subprocess.run(["cargo", "build", "--quiet", "-p", "torch-pickle"], cwd=REPO, check=False)
    if not built.exists():
        pytest.fail(f"no torch-pickle plugin: run `cargo build -p torch-pickle` ({built})")
    return built


def _accepts(path: Path) -> bool:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        sock.close()


class Served:
    """A `pcx serve` on a fresh data directory, stopped by pid at the end."""

    def __init__(self, data_dir: Path, plugin_dir: Optional[Path] = None) -> None:
        self.data_dir = data_dir
        self.socket = data_dir / "pcx.sock"
        extra = ["--plugin-dir", str(plugin_dir)] if plugin_dir is not None else []
        self.proc = subprocess.Popen(
            [pcx_binary(), "--data-dir", str(data_dir), *extra, "serve"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 30
        # Until it accepts: the socket file exists from bind(), a moment before listen().
        while not _accepts(self.socket):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"pcx serve did not start: {self.proc.stderr.read()!r}")
            time.sleep(0.02)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=30)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    s = Served(tmp_path / "data")
    yield s
    s.stop()


@pytest.fixture
def served_with_torch_kinds(tmp_path: Path) -> Iterator[Served]:
    """A server with the torch-pickle plugin in its plugin directory."""
    plugins = tmp_path / "plugins"
    plugins.mkdir(mode=0o755)
    lib = plugins / "libtorch_pickle.so"
    shutil.copyfile(torch_pickle_plugin(), lib)
    lib.chmod(0o755)
    s = Served(tmp_path / "data", plugin_dir=plugins)
    yield s
    s.stop()


@pytest.fixture(params=["socket", "batch"])
def client(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[pcx.Client]:
    """The same tests over both transports."""
    if request.param == "socket":
        s = Served(tmp_path / "data")
        c = pcx.Client.connect(str(s.socket))
        yield c
        c.close()
        s.stop()
    else:
        c = pcx.Client.batch(str(tmp_path / "data"))
        yield c
        c.close()
