"""The README's first example (python/examples/warm_start.py), run as written twice on the
embedded default: the first process compiles and saves, the second warm-starts from pcx
(zero frames compiled, one dynamo cache hit, the same output)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Dict

import pytest

from pcx import server

pytest.importorskip("torch", reason="torch is not installed (.ci/run installs it)")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "warm_start.py"
README = Path(__file__).resolve().parents[2] / "README.md"


def run_example(env: Dict[str, str]) -> Dict[str, str]:
    done = subprocess.run(
        [sys.executable, str(EXAMPLE)], capture_output=True, text=True, env=env, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line.split(":", 1) for line in done.stdout.splitlines() if ":" in line]
    return {k.strip(): v.strip() for k, v in lines}


def test_the_readme_example_warm_starts_from_pcx(tmp_path: Path) -> None:
    data = tmp_path / "share" / "pcx"
    # Each run gets its own, empty inductor directory (where stock torch keeps its dynamo
    # cache), and both name one pcx namespace: only pcx can carry the compile across.
    env = dict(os.environ, PCX_DATA_DIR=str(data), PCX_TORCH_NAMESPACE="readme")
    try:
        first = run_example(dict(env, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor-1")))
        second = run_example(dict(env, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor-2")))
    finally:
        pid = server.server_pid(data)
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
    assert first["frames compiled"] == "1" and first["dynamo cache hits"] == "0", first
    assert second["frames compiled"] == "0" and second["dynamo cache hits"] == "1", second
    assert second["output"] == first["output"]


def test_the_readme_quotes_the_example_as_shipped() -> None:
    """The README shows the example's code lines; they must be the file's, so that what a
    reader copies is what this test runs."""
    readme = README.read_text()
    code = [
        line
        for line in EXAMPLE.read_text().split('"""', 2)[2].splitlines()
        if line.strip()
    ]
    missing = [line for line in code if line not in readme]
    assert not missing, f"README.md lacks these lines of {EXAMPLE.name}: {missing}"
