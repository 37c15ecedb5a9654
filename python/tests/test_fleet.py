"""A fleet's journal in PostgreSQL: ``Client.follow()`` finds the ``pcx serve`` that holds the
journal now, as ``pcx holder`` reads it from the database, and a retry after a takeover with the
same request id is answered ``already_applied``.

Needs a database (``PCX_TEST_PG_URL``, which ``.ci/run`` sets after starting its cluster) and
a ``pcx`` built with ``--features postgres``."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from pathlib import Path
from typing import Dict, Iterator, Tuple

import pytest

import pcx
from conftest import pcx_binary

URL = os.environ.get("PCX_TEST_PG_URL")
pytestmark = pytest.mark.skipif(
    URL is None, reason="PCX_TEST_PG_URL is not set (.ci/run starts a cluster and sets it)"
)


def journal_env(name: str) -> Dict[str, str]:
    return dict(
        os.environ,
        PCX_JOURNAL="postgres",
        PCX_JOURNAL_URL=URL or "",
        PCX_JOURNAL_NAME=name,
        PCX_JOURNAL_LEASE_MS="1500",
        PCX_JOURNAL_WAIT_MS="30000",
    )


def serve(tmp: Path, name: str) -> Tuple[subprocess.Popen, Path]:
    socket = tmp / "s.sock"
    proc = subprocess.Popen(
        [pcx_binary(), "--data-dir", str(tmp / "data"), "serve", "--socket", str(socket)],
        env=journal_env(name),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return proc, socket


def wait_listening(socket: Path) -> None:
    deadline = time.monotonic() + 30
    while not socket.exists():
        assert time.monotonic() < deadline, f"no server on {socket}"
        time.sleep(0.02)


@pytest.fixture
def journal(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    name = f"py-follow-{uuid.uuid4().hex}"
    for key, value in journal_env(name).items():
        if key.startswith("PCX_JOURNAL"):
            monkeypatch.setenv(key, value)
    yield name


def test_follow_reaches_the_holder_and_then_the_one_that_took_over(
    journal: str, tmp_path: Path
) -> None:
    a, socket_a = serve(tmp_path / "a", journal)
    try:
        wait_listening(socket_a)
        with pcx.Client.follow() as client:
            client.request("record_artifact", key="k", content_b64=b"v1", request_id="step-1")
        b, socket_b = serve(tmp_path / "b", journal)  # a standby: waits for the lease
        try:
            a.send_signal(signal.SIGKILL)
            a.wait(timeout=30)
            wait_listening(socket_b)
            with pcx.Client.follow() as client:
                # The worker never heard its answer: it retries, and nothing is applied twice.
                again = client.request(
                    "record_artifact", key="k", content_b64=b"v1", request_id="step-1"
                )
                assert again["already_applied"] is True
                assert client.serialize_artifact_by_key("k")["content_b64"] == b"v1"
        finally:
            b.send_signal(signal.SIGTERM)
            b.wait(timeout=30)
    finally:
        if a.poll() is None:
            a.kill()
            a.wait()


def test_follow_does_not_reach_another_journals_server_found_at_the_holders_old_address(
    journal: str, tmp_path: Path
) -> None:
    a, socket_a = serve(tmp_path / "a", journal)
    try:
        wait_listening(socket_a)
        with pcx.Client.follow() as client:
            client.request("record_artifact", key="k", content_b64=b"v1")
        a.send_signal(signal.SIGKILL)
        a.wait(timeout=30)
        # Another journal's server now listens where the dead holder did.
        other = f"py-other-{uuid.uuid4().hex}"
        b, socket_b = serve(tmp_path / "a", other)
        try:
            assert socket_b == socket_a
            deadline = time.monotonic() + 30
            while True:
                try:
                    pcx.Client.connect(str(socket_b), timeout=5).close()
                    break
                except OSError:  # the dead holder's socket file is there until replaced
                    assert time.monotonic() < deadline, "the other server did not listen"
                    time.sleep(0.05)
            with pytest.raises(pcx.TransportError) as refused:
                with pcx.Client.follow() as client:
                    client.request("record_artifact", key="k2", content_b64=b"meant for a")
            assert journal in str(refused.value) and other in str(refused.value)
            with pcx.Client.connect(str(socket_b)) as client:
                assert client.serialize_artifact_by_key("k2") is None
        finally:
            b.send_signal(signal.SIGTERM)
            b.wait(timeout=30)
    finally:
        if a.poll() is None:
            a.kill()
            a.wait()
