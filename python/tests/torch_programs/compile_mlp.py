"""One process of the warm-start tests: compiles a small model with torch.compile through
pcx.torch and prints, as one JSON line, what a user checks: frames compiled, dynamo cache
hits/misses, and the outputs.

    compile_mlp.py MODE SOCKET [--save] [--train] [--sleep]

MODE ``pcx`` installs pcx.torch on the server at SOCKET; ``stock`` leaves torch alone (its own
DynamoCache on files). ``--save`` calls torch.compiler.save_cache_artifacts() after the first
call; ``--train`` also runs a training step (forward and backward) and reports the gradient;
``--fake-torch-version`` makes this process claim another torch version (a system mismatch);
``--sleep`` waits after printing (to be killed); ``--server-dies`` SIGKILLs the pcx server
(pid ``$PCX_TEST_SERVER_PID``) right after installing, ``--server-dies-mid-compile`` right after
torch's first artifact was recorded in it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from typing import Any

os.environ.setdefault("TORCH_CACHING_PRECOMPILE", "1")

import torch  # noqa: E402
import torch._dynamo  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402


class MLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1 = torch.nn.Linear(16, 32)
        self.l2 = torch.nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.relu(self.l1(x)))


def pcx_seconds() -> float:
    """Time spent waiting for pcx's answers in this process (0 without pcx)."""
    try:
        import pcx.torch
    except ImportError:
        return 0.0
    client = pcx.torch.installed()
    return 0.0 if client is None else client.busy_s


def kill_server(sock: str) -> None:
    """SIGKILLs the pcx server and waits until its socket refuses connections."""
    os.kill(int(os.environ["PCX_TEST_SERVER_PID"]), signal.SIGKILL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        probe = socket.socket(socket.AF_UNIX)
        try:
            probe.connect(sock)
        except OSError:
            return
        finally:
            probe.close()
        time.sleep(0.02)
    raise RuntimeError("the pcx server did not die")


def main() -> None:
    mode, sock = sys.argv[1], sys.argv[2]
    flags = set(sys.argv[3:])
    if "--fake-torch-version" in flags:
        torch.__version__ = "0.0.0+pcx-test"  # type: ignore[assignment]
    if mode == "pcx":
        import pcx
        import pcx.torch

        client = pcx.torch.install(pcx.Client.connect(sock))
        if "--server-dies" in flags:
            kill_server(sock)
        if "--server-dies-mid-compile" in flags:
            record = client.record_artifact

            def record_then_die(*args: Any, **kwargs: Any) -> Any:
                answer = record(*args, **kwargs)
                client.record_artifact = record  # type: ignore[method-assign]
                kill_server(sock)
                return answer

            client.record_artifact = record_then_die  # type: ignore[method-assign]
    torch.manual_seed(0)
    model = MLP()
    x = torch.randn(8, 16)
    started = time.perf_counter()
    if "--train" in flags:
        compiled = torch.compile(model)
        out = compiled(x)
        out.sum().backward()
        result = {"grad": model.l1.weight.grad.sum().item()}
    else:
        compiled = torch.compile(model)
        with torch.no_grad():
            out = compiled(x)
        result = {}
    first_call_s = time.perf_counter() - started
    if "--save" in flags:
        torch.compiler.save_cache_artifacts()
    result.update(
        {
            "out": out.detach().flatten().tolist(),
            "frames_compiled": counters["stats"]["unique_graphs"],
            "calls_captured": counters["stats"]["calls_captured"],
            "hits": counters["dynamo_cache"]["dynamo_cache_hit"],
            "misses": counters["dynamo_cache"]["dynamo_cache_miss"],
            "errors": counters["dynamo_cache"]["dynamo_cache_error"],
            "first_call_s": first_call_s,
            "pcx_s": pcx_seconds(),
        }
    )
    print(json.dumps(result), flush=True)
    if "--sleep" in flags:
        time.sleep(3600)


if __name__ == "__main__":
    main()
