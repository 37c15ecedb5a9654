"""The client over both transports: every answer as pcx gives it, bytes as bytes, failures as
the error class of their kind, and what was written durable for the next process."""

from __future__ import annotations

from pathlib import Path

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


def test_a_retry_with_the_same_request_id_is_applied_once(client: pcx.Client) -> None:
    first = client.request("record_artifact", key="k", content_b64=b"v1", request_id="job-1:k")
    assert first["ok"] and "already_applied" not in first
    retry = client.request("record_artifact", key="k", content_b64=b"v2", request_id="job-1:k")
    assert retry == {"ok": True, "already_applied": True, "request_id": "job-1:k"}
    assert client.serialize_artifact_by_key("k")["content_b64"] == b"v1"
