"""The client over both transports: every answer as pcx gives it, bytes as bytes, failures as
the error class of their kind, and what was written durable for the next process."""

from __future__ import annotations

import itertools
import os
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable

import msgpack
import pytest

import pcx


def entry(*codes: list) -> dict:
    return {"fn_name": "f", "fn_first_lineno": 3, "device_type": "cpu",
            "codes": [{"backend_ids": ids} for ids in codes]}


def test_the_worked_example_round_trips_bytes(client: pcx.Client) -> None:
    blob = bytes(range(256))
    client.record_artifact("b1", blob)
    client.record_artifact("b2", b"bbb")
    client.edit_artifact("b2", append=b"!")
    client.record_dynamo_cache_entry("e1", entry(["b1", "b2"], ["b3", "b1"]))
    assert client.serialize_artifact_by_key("b2")["content_b64"] == b"bbb!"
    assert client.serialize_artifact_by_key("nope") is None
    info = client.dump_debug_info()
    assert info["backends"] == ["b1", "b2"]
    saved = client.save_to_dynamo_cache()
    assert saved["debug_info"]["dynamo"][0]["key"] == "e1"
    loaded = client.load_cache_entry("e1")
    backends = loaded["entry"]["backends"]
    assert backends["b1"]["content_b64"] == blob
    codes = loaded["entry"]["dynamo"]["codes"]
    assert [c["bypassed"] for c in codes] == [False, True]


def test_failures_raise_the_class_of_their_kind(client: pcx.Client) -> None:
    with pytest.raises(pcx.KeyNotFound) as e:
        client.edit_artifact("missing", set=b"x")
    assert e.value.kind == "key_not_found" and "missing" in e.value.message
    with pytest.raises(pcx.PackageNotFound):
        client.load_cache_entry("nothing-saved")
    with pytest.raises(pcx.InvalidEntry):
        client.record_dynamo_cache_entry("e", {"device_type": "cpu", "codes": []})
    with pytest.raises(pcx.UnknownOp):
        client.request("no_such_op")
    # Nothing of a failed request was applied, and the client goes on.
    assert client.dump_debug_info().get("dynamo", []) == []
    client.record_artifact("k", b"v")
    assert client.take_artifact("k")["content_b64"] == b"v"


def test_what_one_process_wrote_the_next_reads(tmp_path: Path) -> None:
    data = str(tmp_path / "data")
    with pcx.Client.batch(data) as first:
        first.record_artifact("b1", b"compiled")
        first.record_dynamo_cache_entry("e1", entry(["b1"]))
        first.save_to_dynamo_cache()
    with pcx.Client.batch(data) as second:
        got = second.load_cache_entry("e1")["entry"]["backends"]["b1"]["content_b64"]
        assert got == b"compiled"
        events = second.log()
        assert [e["event"] for e in events][:2] == ["ArtifactRecorded", "DynamoEntryRecorded"]


def test_verify_of_a_damaged_log_raises_corrupt_log_not_a_report_to_overlook(
    tmp_path: Path,
) -> None:
    """Regression: ``Client.verify()`` handed back ``{"ok": False, …}`` for a damaged log, so
    a caller that did not look inside the report passed the log as sound."""
    data = tmp_path / "data"
    big = bytes(range(256)) * 1024
    with pcx.Client.batch(str(data)) as c:
        c.record_artifact("big", big)
        c.record_artifact("small", b"small")
        assert c.verify()["ok"] is True
    packs = sorted((data / "content").glob("*.pack"))
    assert packs, "a 256 KiB content goes to a content file"
    damaged = bytearray(packs[0].read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    packs[0].write_bytes(bytes(damaged))
    with pcx.Client.batch(str(data)) as c:
        with pytest.raises(pcx.CorruptLog, match="event 1") as raised:
            c.verify()
        assert raised.value.answer["verify"]["ok"] is False


def test_a_live_log_is_compacted_in_place_and_keeps_the_state(client: pcx.Client) -> None:
    for i in range(20):
        client.record_artifact(f"k{i}", f"content {i}".encode())
    for i in range(5):
        client.take_artifact(f"k{i}")
    before = client.request("state")["state"]["state_digest"]
    report = client.compact(26)
    assert report["anchored_at"] == 25 and report["events_removed"] == 25
    assert report["blobs_removed"] == 5
    client.record_artifact("after", b"written after the compaction")
    verified = client.verify()
    assert verified["anchored_at"] == 25 and verified["last_seq"] == 26
    client.take_artifact("after")
    assert client.request("state")["state"]["state_digest"] == before
    assert client.serialize_artifact_by_key("k7")["content_b64"] == b"content 7"
    with pytest.raises(pcx.PcxError, match="nothing to compact"):
        client.compact(10)


def test_a_retry_with_the_same_request_id_is_applied_once(client: pcx.Client) -> None:
    first = client.request("record_artifact", key="k", content_b64=b"v1", request_id="job-1:k")
    assert first["ok"] and "already_applied" not in first
    retry = client.request("record_artifact", key="k", content_b64=b"v1", request_id="job-1:k")
    assert retry == {"ok": True, "already_applied": True, "request_id": "job-1:k"}
    # Another request under the same id is refused, not answered "already applied".
    with pytest.raises(pcx.RequestIdReused, match="job-1:k"):
        client.request("record_artifact", key="k", content_b64=b"v2", request_id="job-1:k")
    assert client.serialize_artifact_by_key("k")["content_b64"] == b"v1"


def test_a_live_log_is_exported_to_a_file_that_imports_as_the_same_log(
    client: pcx.Client, tmp_path: Path
) -> None:
    for i in range(5):
        client.record_artifact(f"k{i}", f"content {i}".encode())
    backup = tmp_path / "backup.jsonl"
    exported = client.export(str(backup))
    assert (exported["events"], exported["last_seq"]) == (5, 5)
    with pytest.raises(pcx.InvalidRequest, match="absolute"):
        client.export("relative.jsonl")
    imported = subprocess.run(
        [os.environ["PCX_BIN"], "--data-dir", str(tmp_path / "restored"), "import"]
        + ["--input", str(backup)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert '"last_seq":5' in imported.stdout
    with pcx.Client.batch(str(tmp_path / "restored")) as restored:
        assert restored.serialize_artifact_by_key("k4")["content_b64"] == b"content 4"


def test_bytes_outside_a_b64_field_are_refused_by_either_transport_not_stored_as_base64(
    client: pcx.Client,
) -> None:
    """Regression: the batch transport turned bytes anywhere in a request into base64 text,
    so ``record_artifact(b"k", ...)`` was answered ok and stored the artifact under the key
    ``aw==`` (and a lookup of ``"k"`` found nothing), where the socket transport's server
    refuses it (``invalid_request``). Now both refuse it and nothing is stored; the client
    goes on."""
    with pytest.raises(pcx.InvalidRequest, match="key"):
        client.record_artifact(b"k", b"v")  # type: ignore[arg-type]
    with pytest.raises(pcx.InvalidRequest, match="backend_ids"):
        client.record_dynamo_cache_entry("e", entry([b"b1"]))
    assert client.dump_debug_info() == {}
    client.record_artifact("k", b"v")
    assert client.serialize_artifact_by_key("k")["content_b64"] == b"v"


def test_text_given_as_content_is_refused_not_decoded_as_base64(client: pcx.Client) -> None:
    """Regression: ``record_artifact("k", "abcd")`` (text where bytes belong) sent the text as
    the ``content_b64`` field, which pcx reads as base64, so it was answered ok and stored the
    three bytes ``b"i\\xb7\\x1d"``; an ``append="QUJD"`` appended ``b"ABC"``. Now content that
    is not bytes is refused with a ``TypeError`` before anything is sent."""
    with pytest.raises(TypeError, match="bytes"):
        client.record_artifact("k", "abcd")  # type: ignore[arg-type]
    client.record_artifact("t", b"x")
    with pytest.raises(TypeError, match="bytes"):
        client.edit_artifact("t", append="QUJD")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="bytes"):
        client.edit_artifact("t", set="QUJD")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="bytes"):
        client.edit_artifact("t", plugin=("op", "QUJD"))  # type: ignore[arg-type]
    assert client.serialize_artifact_by_key("k") is None
    assert client.serialize_artifact_by_key("t")["content_b64"] == b"x"
    client.edit_artifact("t", append=bytearray(b"!"))
    assert client.serialize_artifact_by_key("t")["content_b64"] == b"x!"


def test_a_pipeline_goes_to_the_clients_context_and_namespace_as_its_requests_do(
    client: pcx.Client,
) -> None:
    """Regression: a client made with ``context=``/``namespace=`` sent them with every
    request, but ``pipeline`` sent its maps as given, so a pipelined write went into the
    default context (and a pipelined save into the default namespace), answered ok, while
    the same client's reads looked in its own. Now a pipeline's requests carry them too
    (a map that names its own keeps it)."""
    client.context, client.namespace = "job-1", "ns-1"
    answers = client.pipeline(
        [
            {"op": "record_artifact", "key": "k", "content_b64": b"v"},
            {"op": "record_dynamo_cache_entry", "key": "e", "entry": entry(["k"])},
            {"op": "save_to_dynamo_cache"},
            {"op": "record_artifact", "key": "elsewhere", "content_b64": b"w", "context": "c2"},
        ]
    )
    assert all(a["ok"] for a in answers), answers
    assert client.serialize_artifact_by_key("k")["content_b64"] == b"v"
    assert client.get_cache_entry("e") is not None
    client.context, client.namespace = None, None
    assert client.serialize_artifact_by_key("k") is None
    assert client.get_cache_entry("e") is None
    client.context = "c2"
    assert client.serialize_artifact_by_key("elsewhere")["content_b64"] == b"w"


def test_a_client_inherited_by_a_forked_child_is_refused_there_and_the_parents_answers_stay_its_own(
    client: pcx.Client,
) -> None:
    """Regression: a forked child (``multiprocessing``'s default on Linux, a DataLoader
    worker, a process ``PCX_TORCH=1`` had already connected) used its parent's connection:
    the two processes' frames interleaved on one socket (or one ``pcx batch``'s pipes), each
    read answers meant for the other (``serialize_artifact_by_key("a")`` answered with ``b``'s
    artifact), and the child's writes went into the parent's context. Now a client refuses,
    with a :class:`pcx.TransportError`, to be used in any process but the one that made it,
    sending nothing, and the parent's connection goes on in step."""
    import os

    client.record_artifact("a", b"parent's")
    client.record_artifact("b", b"other")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report what happened through the pipe, then leave at once
        try:
            try:
                for _ in range(200):
                    client.serialize_artifact_by_key("b")
                client.record_artifact("from-child", b"x")
                outcome = b"used"
            except pcx.TransportError as e:
                outcome = b"refused" if b"fork" in str(e).encode() else b"other error"
            except BaseException:
                outcome = b"other error"
            os.write(write, outcome)
        finally:
            os._exit(0)
    os.close(write)
    wrong = sum(client.serialize_artifact_by_key("a")["key"] != "a" for _ in range(200))
    os.waitpid(pid, 0)
    with os.fdopen(read, "rb") as r:
        outcome = r.read()
    assert outcome == b"refused", outcome
    assert wrong == 0
    assert client.serialize_artifact_by_key("from-child") is None
    assert client.serialize_artifact_by_key("a")["content_b64"] == b"parent's"


# -- a server that misbehaves ------------------------------------------------------------------

def _fake_server(tmp_path: Path, answer: Callable[[socket.socket, int], None]) -> str:
    """A Unix socket whose one connection reads request frames and calls
    ``answer(connection, n)`` for the n-th (from 0). Gives its path."""
    path = str(tmp_path / "fake.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)

    def serve() -> None:
        conn, _ = listener.accept()
        with conn, listener:
            try:
                for n in itertools.count():
                    header = conn.recv(4, socket.MSG_WAITALL)
                    if len(header) < 4:
                        return
                    conn.recv(struct.unpack(">I", header)[0], socket.MSG_WAITALL)
                    answer(conn, n)
            except OSError:  # the client gave the connection up
                return

    threading.Thread(target=serve, daemon=True).start()
    return path


def _frame(value: object) -> bytes:
    body = msgpack.packb(value, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


@pytest.mark.parametrize(
    "garbage",
    [
        struct.pack(">I", 3) + b"\xc1\xc1\xc1",  # the reserved byte: not MessagePack
        struct.pack(">I", 2) + b"\x01\x02",  # two values in one frame
        struct.pack(">I", 1) + b"\x07",  # one value, not a map
        struct.pack(">I", 0xFFFFFFFF) + b"\x80",  # claims 4 GiB, then closes
        struct.pack(">I", 50) + b"\x81\xa2ok",  # closes mid-answer
    ],
)
def test_a_server_answering_garbage_raises_transport_error_and_the_connection_is_not_reused(
    tmp_path: Path, garbage: bytes
) -> None:
    """Regression: an answer that was not one MessagePack map raised msgpack's own exceptions
    (``ExtraData``, ``FormatError``…), not ``pcx.TransportError``; a 4 GiB length allocated
    4 GiB before reading a byte; and the connection was used again afterwards, out of step
    with its answers."""

    def answer(conn: socket.socket, n: int) -> None:
        conn.sendall(garbage)
        conn.close()

    client = pcx.Client.connect(_fake_server(tmp_path, answer), timeout=10)
    with pytest.raises(pcx.TransportError):
        client.record_artifact("k", b"v")
    with pytest.raises(pcx.TransportError, match="broken"):
        client.record_artifact("k2", b"v")
    client.close()


def test_an_answer_that_comes_after_the_timeout_is_not_taken_for_the_next_requests(
    tmp_path: Path,
) -> None:
    """Regression: after a request timed out, its late answer stayed in the socket and the
    client's next request read it as its own (a `serialize_artifact_by_key` answered with
    another request's `seq`). Now a client whose connection failed mid-answer refuses further
    requests on it, saying so, and the caller reconnects."""

    def answer(conn: socket.socket, n: int) -> None:
        if n == 0:
            time.sleep(1.0)  # past the client's timeout
        conn.sendall(_frame({"ok": True, "seq": n + 1}))

    client = pcx.Client.connect(_fake_server(tmp_path, answer), timeout=0.3)
    with pytest.raises(pcx.TransportError):
        client.record_artifact("first", b"v")
    time.sleep(1.0)  # the late answer is in the socket now
    with pytest.raises(pcx.TransportError, match="broken"):
        client.serialize_artifact_by_key("second")
    client.close()


def test_a_tcp_client_never_sends_the_token_to_a_stranger_at_the_address() -> None:
    """Regression: ``Client.tcp`` sent the token as its first frame, so whatever listened at
    the address (another local user's process on the port a holder served on before it died)
    got the token, and its ``{"ok": true}`` was taken for the server's: every write after it
    was answered and went nowhere."""
    token = "s3cret-s3cret-s3cret"
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    heard: list[bytes] = []

    def stranger() -> None:
        conn, _ = listener.accept()
        with conn, listener:
            try:
                while True:
                    header = conn.recv(4, socket.MSG_WAITALL)
                    if len(header) < 4:
                        return
                    heard.append(conn.recv(struct.unpack(">I", header)[0], socket.MSG_WAITALL))
                    conn.sendall(_frame({"ok": True}))
            except OSError:
                return

    thread = threading.Thread(target=stranger, daemon=True)
    thread.start()
    port = listener.getsockname()[1]
    with pytest.raises(pcx.Unauthorized, match="proof"):
        pcx.Client.tcp("127.0.0.1", port, token, timeout=10)
    thread.join(timeout=10)
    assert len(heard) == 1, "only the challenge reached the stranger"
    assert token.encode() not in b"".join(heard)
