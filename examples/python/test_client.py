#!/usr/bin/env python3
"""Exercises every method of the pcx package's client (python/) against a running ``pcx serve``
on an empty data directory; exits 0 when all checks pass (tests/server.rs runs it). Works with
the package installed (``pip install ./python``) or straight from the checkout.

    python3 examples/python/test_client.py --socket PATH [--tcp HOST:PORT --token T]
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable, List, Optional

try:
    import pcx  # noqa: F401
except ImportError:  # not installed: the package in this checkout
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "python", "src"))

from pcx import Client, PcxError  # noqa: E402


def raises(kind: str, call: Callable[[], Any]) -> PcxError:
    try:
        call()
    except PcxError as e:
        assert e.kind == kind, f"expected {kind}, got {e.kind}: {e.message}"
        assert e.answer["ok"] is False
        return e
    raise AssertionError(f"expected a {kind} error")


def check_methods(pcx: Client) -> None:
    seq = pcx.record_artifact("b1", b"aaa")["seq"]
    assert isinstance(seq, int) and seq >= 1
    assert pcx.record_artifact("b2", b"bb\x00\xff")["seq"] == seq + 1
    b2 = pcx.serialize_artifact_by_key("b2")
    digest = b2.pop("digest")  # what a compare-and-set edit names as the content it read
    assert len(digest) == 64 and int(digest, 16) >= 0, digest
    assert b2 == {"key": "b2", "kind": "eager", "content_b64": b"bb\x00\xff"}, b2
    assert pcx.serialize_artifact_by_key("zz") is None

    pcx.edit_artifact("b2", append=b"!")
    pcx.edit_artifact("b1", set=b"ccc")
    assert pcx.serialize_artifact_by_key("b1")["content_b64"] == b"ccc"
    assert pcx.serialize_artifact_by_key("b2")["content_b64"] == b"bb\x00\xff!"
    e = raises("key_not_found", lambda: pcx.edit_artifact("nope", append=b"!"))
    assert "Key nope not found in artifacts" in e.message
    # The built-in eager kind offers no plugin edits.
    try:
        pcx.edit_artifact("b1", plugin=("strip", b"\x01"))
        raise AssertionError("a plugin edit of an eager artifact succeeded")
    except PcxError as e:
        assert e.kind in ("no_plugin", "no_such_edit"), e

    entry = {
        "fn_name": "f",
        "fn_first_lineno": 3,
        "device_type": "cpu",
        "codes": [
            {"backend_ids": ["b1", "b2"], "payload_b64": b"\x01\x02"},
            {"backend_ids": ["b3", "b1"]},
        ],
    }
    pcx.record_dynamo_cache_entry("e1", entry)
    raises("invalid_entry", lambda: pcx.record_dynamo_cache_entry("e0", {"device_type": "cpu", "codes": []}))
    info = pcx.dump_debug_info()
    assert info["backends"] == ["b1", "b2"], info
    assert info["dynamo"][0]["key"] == "e1" and info["dynamo"][0]["num_codes"] == "2", info

    stitched = pcx.create_cache_entries()
    e1 = stitched["entries"]["e1"]
    assert {k: a["content_b64"] for k, a in e1["backends"].items()} == {"b1": b"ccc", "b2": b"bb\x00\xff!"}
    assert [c["bypassed"] for c in e1["dynamo"]["codes"]] == [False, True]
    assert e1["dynamo"]["codes"][0]["payload_b64"] == b"\x01\x02"
    assert pcx.save_to_dynamo_cache()["debug_info"] == info

    assert pcx.take_artifact("b1")["content_b64"] == b"ccc"
    assert pcx.take_artifact("b1") is None
    pcx.clear()
    assert pcx.dump_debug_info() == {}

    loaded = pcx.load_cache_entry("e1")
    assert loaded["deserialized"]["b1"]["content_b64"] == b"ccc"
    assert loaded["deserialized"]["b1"]["plugin"] == "builtin"
    assert pcx.serialize_artifact_by_key("b2")["content_b64"] == b"bb\x00\xff!"
    raises("package_not_found", lambda: pcx.load_cache_entry("zz"))
    raises("system_mismatch", lambda: pcx.load_cache_entry("e1", {"python_version": "3.11", "torch_version": "9"}))

    stats = pcx.stats()
    for field in ("events_appended", "flushes", "events_per_flush", "stitches", "dynamo_cache_hits",
                  "dynamo_cache_misses", "queue_depth", "connections_open"):
        assert field in stats, (field, stats)
    assert stats["dynamo_cache_hits"] >= 1 and stats["dynamo_cache_misses"] >= 1, stats

    events = pcx.log()
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1)), events
    assert events[0]["event"] == "ArtifactRecorded" and events[0]["keys"] == ["b1"], events[0]
    assert len(pcx.log(from_=2, to=3)) == 2
    assert [e["event"] for e in pcx.log(event="ArtifactEdited")] == ["ArtifactEdited", "ArtifactEdited"]
    assert len(pcx.log(limit=1)) == 1
    history = pcx.history("b2")
    assert [h["event"] for h in history][:2] == ["ArtifactRecorded", "ArtifactEdited"], history
    then = pcx.state(at=2, key="b2")
    assert then["artifact"]["content_b64"] == b"bb\x00\xff", then
    now = pcx.state()
    assert now["seq"] == events[-1]["seq"], now
    diff = pcx.diff(0, 2)
    assert [a["key"] for a in diff["artifacts"]["added"]] == ["b1", "b2"], diff
    report = pcx.verify()
    assert report.get("ok", True) is not False, report

    # Requests the server does not know, or with fields of the wrong type, are refused and the
    # connection goes on.
    raises("unknown_op", lambda: pcx.request("fly"))
    raises("invalid_request", lambda: pcx.request("record_artifact", key=5, content_b64=b""))
    raises("missing_field", lambda: pcx.request("record_artifact", key="k"))
    # Base64 text is accepted where bytes are expected.
    pcx.request("record_artifact", key="t", content_b64="eHl6")
    assert pcx.serialize_artifact_by_key("t")["content_b64"] == b"xyz"

    answers = pcx.pipeline(
        [{"op": "record_artifact", "key": f"p{i}", "content_b64": bytes([i])} for i in range(100)]
        + [{"op": "edit_artifact", "key": "nope", "edit": {"set_b64": b""}, "id": "last"}],
        window=16,
    )
    assert all(a["ok"] for a in answers[:100]), answers
    assert [a["seq"] for a in answers[:100]] == sorted(a["seq"] for a in answers[:100])
    assert answers[100]["id"] == "last" and answers[100]["error"]["kind"] == "key_not_found"


def check_tcp(address: str, token: str) -> None:
    host, port = address.rsplit(":", 1)
    with Client.tcp(host, int(port), token) as pcx:
        pcx.record_artifact("over-tcp", b"t")
        assert pcx.serialize_artifact_by_key("over-tcp")["content_b64"] == b"t"
    raises("unauthorized", lambda: Client.tcp(host, int(port), token + "-wrong"))


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--socket", required=True)
    parser.add_argument("--tcp", help="also check TCP at HOST:PORT")
    parser.add_argument("--token", default="")
    args = parser.parse_args(argv)
    with Client.connect(args.socket) as pcx:
        check_methods(pcx)
    if args.tcp:
        check_tcp(args.tcp, args.token)
    print("pcx client: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
