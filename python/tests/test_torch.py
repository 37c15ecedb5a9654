"""A real torch.compile records into pcx through pcx.torch, and a fresh process warm-starts
from pcx: zero frames compiled, a dynamo cache hit, identical outputs. Each process gets its
own inductor cache directory, so nothing but pcx carries the compiled artifacts across.

Skipped, saying so, where torch is not installed (`.ci/run` installs it in a cached venv)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Optional

import pytest

import pcx

torch = pytest.importorskip("torch", reason="torch is not installed (.ci/run installs it)")

PROGRAM = Path(__file__).parent / "torch_programs" / "compile_mlp.py"


def run(
    served: Any,
    tmp: Path,
    name: str,
    *flags: str,
    mode: str = "pcx",
    namespace: str = "shared",
    torch_kinds: bool = False,
    extra_env: Optional[Dict[str, str]] = None,
) -> Dict[str, Any]:
    """Runs one process of the program (its own inductor directory; the dynamo cache
    namespace given, so that processes of one test share it); gives its JSON line, with its
    stderr under ``"stderr"``."""
    env = dict(
        os.environ,
        TORCHINDUCTOR_CACHE_DIR=str(tmp / f"inductor-{name}"),
        PCX_TORCH_NAMESPACE=namespace,
        PCX_TORCH_KINDS="1" if torch_kinds else "0",
        **(extra_env or {}),
    )
    done = subprocess.run(
        [sys.executable, str(PROGRAM), mode, str(served.socket), *flags],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result: Dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    result["stderr"] = done.stderr
    return result


def test_inference_warm_starts_from_pcx(served: Any, tmp_path: Path) -> None:
    a = run(served, tmp_path, "a", "--save")
    assert a["frames_compiled"] >= 1 and a["misses"] == 1
    b = run(served, tmp_path, "b")
    assert b["frames_compiled"] == 0, b
    assert (b["hits"], b["misses"], b["errors"]) == (1, 0, 0), b
    assert b["out"] == a["out"]
    # The history shows what torch recorded, as events.
    with pcx.Client.connect(str(served.socket)) as client:
        events = client.log()
    kinds = [e["event"] for e in events]
    assert "ArtifactRecorded" in kinds and "DynamoEntryRecorded" in kinds, kinds
    assert "SavedToDynamoCache" in kinds and "EntryLoaded" in kinds, kinds
    compiled = [e for e in events if e["event"] == "ArtifactRecorded"]
    assert all(k.startswith("__compiled_fn") for e in compiled for k in e["keys"]), compiled


def test_a_training_step_warm_starts_from_pcx(served: Any, tmp_path: Path) -> None:
    a = run(served, tmp_path, "a", "--train", "--save")
    b = run(served, tmp_path, "b", "--train")
    assert b["frames_compiled"] == 0, b
    assert b["hits"] == 1, b
    assert (b["out"], b["grad"]) == (a["out"], a["grad"])


def test_a_process_killed_after_its_save_still_serves_the_next(
    served: Any, tmp_path: Path
) -> None:
    env = dict(
        os.environ,
        TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor-a"),
        PCX_TORCH_NAMESPACE="shared",
    )
    a = subprocess.Popen(
        [sys.executable, str(PROGRAM), "pcx", str(served.socket), "--save", "--sleep"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    assert a.stdout is not None
    first = json.loads(a.stdout.readline())
    a.send_signal(signal.SIGKILL)
    a.wait(timeout=60)
    b = run(served, tmp_path, "b")
    assert b["frames_compiled"] == 0 and b["hits"] == 1, b
    assert b["out"] == first["out"]


@pytest.mark.parametrize("when", ["--server-dies", "--server-dies-mid-compile"])
def test_torch_keeps_working_when_the_pcx_server_dies(
    served: Any, tmp_path: Path, when: str
) -> None:
    """Regression: with the pcx server gone (killed before the compile, or between two of its
    artifacts), ``torch.compile`` raised pcx's ``TransportError`` into the user's training
    step, and ``save_cache_artifacts`` did too. Now pcx.torch warns once and hands torch its
    own precompile context and cache back, with everything recorded so far: the step
    completes with stock torch's numbers, and the save works."""
    stock = run(served, tmp_path, "stock", "--train", mode="stock")
    a = run(
        served,
        tmp_path,
        "a",
        "--train",
        "--save",
        when,
        extra_env={"PCX_TEST_SERVER_PID": str(served.proc.pid)},
    )
    assert (a["out"], a["grad"]) == (stock["out"], stock["grad"]), a
    assert a["frames_compiled"] >= 1, a
    assert "torch falls back to its own" in a["stderr"], a["stderr"][-3000:]
    assert a["stderr"].count("torch falls back to its own") == 1, a["stderr"][-3000:]


def test_torch_keeps_working_when_pcx_refuses_what_torch_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: a compiled artifact or entry over the server's ``max_content_bytes`` (a
    large model's, say) made ``torch.compile`` raise ``pcx.TooLarge`` into the user's step;
    torch itself has no such limit. Now pcx.torch warns and falls back to torch's own context
    and cache, and the step completes with stock torch's numbers."""
    from conftest import Served

    monkeypatch.setenv("PCX_MAX_CONTENT_BYTES", "2000")
    small = Served(tmp_path / "small-limit")
    try:
        stock = run(small, tmp_path, "stock", "--train", mode="stock")
        a = run(small, tmp_path, "a", "--train", "--save")
    finally:
        small.stop()
    assert (a["out"], a["grad"]) == (stock["out"], stock["grad"]), a
    assert "torch falls back to its own" in a["stderr"], a["stderr"][-3000:]
    assert "max_content_bytes" in a["stderr"], a["stderr"][-3000:]


def test_namespaces_keep_two_caches_apart_on_one_data_directory(
    served: Any, tmp_path: Path
) -> None:
    """Two jobs on one pcx (one data directory), each with its namespace, as two torch cache
    directories: neither warm-starts from the other's entries."""
    run(served, tmp_path, "one-a", "--save", namespace="job-one")
    other = run(served, tmp_path, "two-a", namespace="job-two")
    assert other["misses"] == 1 and other["frames_compiled"] >= 1, other
    same = run(served, tmp_path, "one-b", namespace="job-one")
    assert same["hits"] == 1 and same["frames_compiled"] == 0, same
    with pcx.Client.connect(str(served.socket), namespace="job-two") as client:
        assert client.list_cache_entries() == []
    with pcx.Client.connect(str(served.socket), namespace="job-one") as client:
        (listed,) = client.list_cache_entries()
        assert listed["saved_by"].startswith("torch@"), listed


def test_each_process_records_into_a_context_of_its_own(served: Any, tmp_path: Path) -> None:
    run(served, tmp_path, "a", "--save")
    run(served, tmp_path, "b")
    with pcx.Client.connect(str(served.socket)) as client:
        contexts = client.list_contexts()
        events = client.log()
    torch_contexts = {e["context"] for e in events if e.get("context", "").startswith("torch@")}
    assert len(torch_contexts) == 2, events
    # Each dropped its own when it exited, as torch's own context ends with its process.
    dropped = {e["context"] for e in events if e["event"] == "ContextDropped"}
    assert dropped == torch_contexts, events
    # The default context is untouched: torch's processes each had their own.
    assert contexts == [{"name": "default", "artifacts": 0, "entries": 0}], contexts


def test_torch_kinds_are_checked_by_the_plugin_and_still_warm_start(
    served_with_torch_kinds: Any, tmp_path: Path
) -> None:
    served = served_with_torch_kinds
    a = run(served, tmp_path, "a", "--save", torch_kinds=True)
    b = run(served, tmp_path, "b", torch_kinds=True)
    assert b["frames_compiled"] == 0 and b["hits"] == 1, b
    assert b["out"] == a["out"]
    with pcx.Client.connect(str(served.socket)) as client:
        kinds = {e.get("kind") for e in client.log(event="ArtifactRecorded")}
    assert kinds == {"torch.bundled_aot_autograd"}, kinds


def test_a_system_mismatch_behaves_as_in_torch(served: Any, tmp_path: Path) -> None:
    """torch counts the hit, refuses the entry in its own version check and compiles."""
    run(served, tmp_path, "a", "--save")
    b = run(served, tmp_path, "b", "--fake-torch-version")
    stock_a = run(served, tmp_path, "sa", "--save", mode="stock")
    stock_b = run(served, tmp_path, "sa", "--fake-torch-version", mode="stock")
    assert stock_b["hits"] == 1 and stock_b["frames_compiled"] >= 1, stock_b
    assert (b["hits"], b["frames_compiled"]) == (stock_b["hits"], stock_b["frames_compiled"])
    assert b["out"] == stock_a["out"]


def test_pcx_torch_1_installs_at_interpreter_start(served: Any) -> None:
    """The `.pth` hook: PCX_TORCH=1 and no code change (here reusing the server on
    PCX_DATA_DIR, as the embedded default does)."""
    code = "import pcx.torch; print(pcx.torch.installed() is not None)"
    env = dict(os.environ, PCX_TORCH="1", PCX_DATA_DIR=str(served.data_dir))
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.stdout.strip() == "True", done.stderr[-2000:]
    env.pop("PCX_TORCH")
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.stdout.strip() == "False", done.stderr[-2000:]
