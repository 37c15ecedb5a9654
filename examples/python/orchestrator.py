#!/usr/bin/env python3
"""A compile orchestrator in miniature, against a running ``pcx serve``.

1. ``--workers`` worker processes run at once, each with its own connection. Each compiles
   (pretends to) ``--artifacts-per-worker`` backend artifacts and records them, then records
   Dynamo cache entries that reference them: one entry per pair of artifacts, and one entry
   whose second code names a backend nobody compiled, so the stitch bypasses that code.
2. One process stitches (``create_cache_entries``) and saves (``save_to_dynamo_cache``).
3. A fresh process, as a later run of the program would, loads every entry and checks every
   byte against what the workers recorded.

Prints a short summary and exits 1 on any mismatch (2 if the server cannot be reached).

    pcx serve --socket /tmp/pcx.sock &
    python3 examples/python/orchestrator.py --socket /tmp/pcx.sock --workers 4
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing
import os
import sys
import uuid
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Dict, List, Optional, Tuple

try:
    import pcx  # noqa: F401
except ImportError:  # not installed: the package in this checkout
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "python", "src"))

from pcx import Client, PcxError  # noqa: E402

SYSTEM_INFO = {"python_version": "3.11.7", "torch_version": "2.10.0"}


# -- what each worker produces, computable by anyone who knows (run, worker, index) ---------


def artifact_key(run: str, worker: int, index: int) -> str:
    return f"{run}/w{worker}/inductor-{index}"


def artifact_content(run: str, worker: int, index: int) -> bytes:
    """Deterministic bytes of a few hundred to a few thousand bytes, not all text."""
    seed = hashlib.sha256(f"{run}:{worker}:{index}".encode()).digest()
    return seed * (8 + (worker * 7 + index * 13) % 90) + bytes(range(index % 256))


def entry_specs(run: str, worker: int, artifacts: int) -> List[Tuple[str, List[List[str]]]]:
    """The entries a worker records: (key, backend ids per code). The last entry's second
    code names a backend that is never recorded."""
    keys = [artifact_key(run, worker, i) for i in range(artifacts)]
    specs = []
    for n, start in enumerate(range(0, artifacts, 2)):
        specs.append((f"{run}/w{worker}/fn{n}", [keys[start : start + 2]]))
    missing = f"{run}/w{worker}/never-compiled"
    specs.append((f"{run}/w{worker}/with-missing", [keys[:1], [missing]]))
    return specs


def payload(entry_key: str, code_index: int) -> bytes:
    return f"bytecode of {entry_key}#{code_index}".encode() + b"\x00\xff"


def entry_json(entry_key: str, codes: List[List[str]]) -> Dict[str, Any]:
    return {
        "fn_name": entry_key.rsplit("/", 1)[-1],
        "fn_first_lineno": 10,
        "device_type": "cpu",
        "system_info": SYSTEM_INFO,
        "codes": [
            {
                "backend_ids": ids,
                "python_module": "model",
                "function_names": [f"__compiled_fn_{i}"],
                "payload_b64": payload(entry_key, i),
            }
            for i, ids in enumerate(codes)
        ],
    }


# -- the processes ----------------------------------------------------------------------------


def worker(socket_path: str, run: str, index: int, artifacts: int) -> Dict[str, int]:
    """Records this worker's artifacts (pipelined) and entries (one at a time)."""
    with Client.connect(socket_path) as pcx:
        records = [
            {
                "op": "record_artifact",
                "key": artifact_key(run, index, i),
                "kind": "eager",
                "content_b64": artifact_content(run, index, i),
            }
            for i in range(artifacts)
        ]
        for answer in pcx.pipeline(records):
            if not answer["ok"]:
                raise RuntimeError(f"record failed: {answer}")
        specs = entry_specs(run, index, artifacts)
        for key, codes in specs:
            pcx.record_dynamo_cache_entry(key, entry_json(key, codes))
    return {"artifacts": artifacts, "entries": len(specs)}


def stitch_and_save(socket_path: str, run: str) -> Dict[str, int]:
    """Stitches (to see the bypasses) and saves every entry to the dynamo cache."""
    with Client.connect(socket_path) as pcx:
        stitched = pcx.create_cache_entries()["entries"]
        ours = {k: e for k, e in stitched.items() if k.startswith(run + "/")}
        bypassed = sum(
            1 for e in ours.values() for code in e["dynamo"]["codes"] if code["bypassed"]
        )
        saved = pcx.save_to_dynamo_cache()["debug_info"]
        saved_keys = {d["key"] for d in saved.get("dynamo", [])}
        return {
            "stitched": len(ours),
            "bypassed": bypassed,
            "saved": sum(1 for k in saved_keys if k.startswith(run + "/")),
        }


def load_and_check(socket_path: str, run: str, workers: int, artifacts: int) -> List[str]:
    """A fresh process: loads every entry and compares it with what the workers recorded.
    Gives one line per mismatch."""
    problems: List[str] = []
    with Client.connect(socket_path) as pcx:
        for w in range(workers):
            for key, codes in entry_specs(run, w, artifacts):
                try:
                    loaded = pcx.load_cache_entry(key, system_info=SYSTEM_INFO)
                except PcxError as e:
                    problems.append(f"{key}: load failed: {e}")
                    continue
                problems.extend(check_entry(run, w, key, codes, loaded))
        # A load with another PyTorch must be refused, not served stale.
        some_key = entry_specs(run, 0, artifacts)[0][0]
        try:
            pcx.load_cache_entry(some_key, {**SYSTEM_INFO, "torch_version": "0.0"})
            problems.append(f"{some_key}: a load with another torch_version was not refused")
        except PcxError as e:
            if e.kind != "system_mismatch":
                problems.append(f"{some_key}: expected system_mismatch, got {e}")
    return problems


def check_entry(
    run: str, w: int, key: str, codes: List[List[str]], loaded: Dict[str, Any]
) -> List[str]:
    problems = []
    expected = _expected_backends(run, w, codes)
    backends = loaded["entry"]["backends"]
    if set(backends) != set(expected):
        problems.append(f"{key}: backends {sorted(backends)} != {sorted(expected)}")
    for bid, content in expected.items():
        got = backends.get(bid, {}).get("content_b64")
        if got != content:
            problems.append(f"{key}: backend {bid} content differs")
        ready = loaded["deserialized"].get(bid, {}).get("content_b64")
        if ready != content:
            problems.append(f"{key}: deserialized {bid} differs")
    dynamo_codes = loaded["entry"]["dynamo"]["codes"]
    for i, code in enumerate(dynamo_codes):
        if code["payload_b64"] != payload(key, i):
            problems.append(f"{key}: code {i} payload differs")
        should_bypass = any(b not in expected for b in codes[i])
        if code["bypassed"] != should_bypass:
            problems.append(f"{key}: code {i} bypassed={code['bypassed']}, expected {should_bypass}")
    return problems


def _expected_backends(run: str, w: int, codes: List[List[str]]) -> Dict[str, bytes]:
    """The backends a load must bring back: every recorded artifact the codes name."""
    out: Dict[str, bytes] = {}
    prefix = f"{run}/w{w}/inductor-"
    for ids in codes:
        for bid in ids:
            if bid.startswith(prefix):
                i = int(bid[len(prefix) :])
                out[bid] = artifact_content(run, w, i)
    return out


# -- main -------------------------------------------------------------------------------------


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--socket", required=True, help="the socket `pcx serve` listens on")
    parser.add_argument("--workers", type=int, default=4, help="worker processes (default 4)")
    parser.add_argument(
        "--artifacts-per-worker", type=int, default=8, help="artifacts each worker records (default 8)"
    )
    args = parser.parse_args(argv)
    if args.workers < 1 or args.artifacts_per_worker < 1:
        parser.error("--workers and --artifacts-per-worker must be at least 1")

    try:
        with Client.connect(args.socket) as pcx:
            before = pcx.stats()
    except OSError as e:
        print(f"cannot reach pcx at {args.socket}: {e} (is `pcx serve` running?)", file=sys.stderr)
        return 2

    run = uuid.uuid4().hex[:12]  # keys of this run, so the example can run again on the same server
    spawn = multiprocessing.get_context("spawn")  # fresh interpreters, as separate programs would be
    with ProcessPoolExecutor(max_workers=args.workers, mp_context=spawn) as pool:
        futures = [
            pool.submit(worker, args.socket, run, w, args.artifacts_per_worker)
            for w in range(args.workers)
        ]
        recorded = [f.result() for f in futures]
    with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
        saved = pool.submit(stitch_and_save, args.socket, run).result()
    with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
        problems = pool.submit(
            load_and_check, args.socket, run, args.workers, args.artifacts_per_worker
        ).result()

    with Client.connect(args.socket) as pcx:
        after = pcx.stats()
    entries = sum(r["entries"] for r in recorded)
    events = after["events_appended"] - before["events_appended"]
    flushes = after["flushes"] - before["flushes"]
    print(f"run {run}: {args.workers} workers recorded {sum(r['artifacts'] for r in recorded)} "
          f"artifacts and {entries} entries")
    print(f"stitched {saved['stitched']} entries ({saved['bypassed']} codes bypassed), "
          f"saved {saved['saved']}")
    print(f"loaded and checked {entries} entries: {len(problems)} mismatches")
    print(f"server: {events} events in {flushes} flushes")
    expected_problems = []
    if saved["stitched"] != entries or saved["saved"] != entries:
        expected_problems.append(f"expected {entries} entries stitched and saved, got {saved}")
    if saved["bypassed"] != args.workers:
        expected_problems.append(f"expected {args.workers} bypassed codes, got {saved['bypassed']}")
    for p in problems + expected_problems:
        print(f"MISMATCH {p}", file=sys.stderr)
    return 1 if problems or expected_problems else 0


if __name__ == "__main__":
    sys.exit(main())
