"""W7: a torch user's warm start through pcx beside stock torch's DynamoCache on files.

The same 2-layer MLP is compiled with torch.compile (TORCH_CACHING_PRECOMPILE=1) and saved
with torch.compiler.save_cache_artifacts(), once through pcx.torch (a `pcx serve` on a fresh
data directory) and once with torch alone; then a fresh process warm-starts from each, in
turn, `--runs` times. Reported: the medians of the warm first call (torch.compile through the
first answer), their ratio pcx/stock (target ≤ 1.0), and pcx's own time in the warm start
(time waiting for pcx's answers; target ≤ 1 % of the warm start).

    python python/bench/w7.py [--runs 3] [--json]     # needs torch and pcx (PCX_BIN or PATH)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

PROGRAM = Path(__file__).resolve().parents[1] / "tests" / "torch_programs" / "compile_mlp.py"


def run(mode: str, sock: str, inductor: Path, *flags: str) -> Dict[str, Any]:
    # One namespace for every pcx run: the fresh-inductor runs stand for other machines,
    # which share a cache by naming it (the default is one namespace per cache directory).
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(inductor), PCX_TORCH_NAMESPACE="w7")
    done = subprocess.run(
        [sys.executable, str(PROGRAM), mode, sock, *flags],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    if done.returncode != 0:
        raise SystemExit(f"w7: {mode} {' '.join(flags)} failed:\n{done.stderr[-3000:]}")
    result: Dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    if "--save" not in flags and (result["frames_compiled"] != 0 or result["hits"] != 1):
        raise SystemExit(f"w7: the {mode} warm start compiled or missed: {result}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from pcx.server import find_binary

    with tempfile.TemporaryDirectory(prefix="pcx-w7-") as tmp_name:
        tmp = Path(tmp_name)
        data = tmp / "data"
        serve = subprocess.Popen(
            [find_binary(), "--data-dir", str(data), "serve"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            sock = data / "pcx.sock"
            deadline = time.monotonic() + 30
            while not sock.exists() and time.monotonic() < deadline:
                time.sleep(0.02)
            # The cold compiles that fill each store (pcx's, and stock's files).
            cold_pcx = run("pcx", str(sock), tmp / "inductor-pcx-cold", "--save")
            cold_stock = run("stock", "-", tmp / "inductor-stock", "--save")
            pcx_runs: List[Dict[str, Any]] = []
            stock_runs: List[Dict[str, Any]] = []
            fresh_runs: List[Dict[str, Any]] = []
            for i in range(args.runs):
                # The same machine: each warm start beside the inductor directory its cold
                # compile filled (stock's DynamoCache lives in it; pcx's does not).
                pcx_runs.append(run("pcx", str(sock), tmp / "inductor-pcx-cold"))
                stock_runs.append(run("stock", "-", tmp / "inductor-stock"))
                # Another machine: nothing local, only pcx (stock has nothing to load here).
                fresh_runs.append(run("pcx", str(sock), tmp / f"inductor-pcx-fresh-{i}"))
        finally:
            serve.send_signal(signal.SIGTERM)
            serve.wait(timeout=60)
    pcx_s = statistics.median(r["first_call_s"] for r in pcx_runs)
    stock_s = statistics.median(r["first_call_s"] for r in stock_runs)
    own_s = statistics.median(r["pcx_s"] for r in pcx_runs)
    fresh_s = statistics.median(r["first_call_s"] for r in fresh_runs)
    figures = {
        "workload": "w7",
        "runs": args.runs,
        "cold_pcx_s": cold_pcx["first_call_s"],
        "cold_stock_s": cold_stock["first_call_s"],
        "warm_pcx_s": pcx_s,
        "warm_stock_s": stock_s,
        "ratio_pcx_over_stock": pcx_s / stock_s,
        "pcx_own_s": own_s,
        "pcx_own_share": own_s / pcx_s,
        "warm_pcx_fresh_inductor_dir_s": fresh_s,
        "warm_pcx_all_s": [r["first_call_s"] for r in pcx_runs],
        "warm_stock_all_s": [r["first_call_s"] for r in stock_runs],
    }
    if args.json:
        print(json.dumps(figures))
        return
    print(f"W7 warm start (medians of {args.runs}; first call incl. torch.compile):")
    print(f"  stock torch (DynamoCache on files)  {stock_s:8.3f} s")
    print(f"  torch through pcx                   {pcx_s:8.3f} s   ratio {pcx_s / stock_s:.2f} (target <= 1.0)")
    print(f"  pcx's own time in it                {own_s * 1000:8.2f} ms  = {100 * own_s / pcx_s:.2f} % (target <= 1 %)")
    print(f"  through pcx, fresh inductor dir     {fresh_s:8.3f} s   (another machine: only pcx carries the artifacts)")
    print(f"  cold compiles: pcx {cold_pcx['first_call_s']:.2f} s, stock {cold_stock['first_call_s']:.2f} s")


if __name__ == "__main__":
    main()
