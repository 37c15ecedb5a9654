"""Run at interpreter start by the ``pcx_torch.pth`` file the package installs: with
``PCX_TORCH=1`` in the environment, torch's precompile context and dynamo cache use pcx
(:func:`pcx.torch.install`). Without it, this does nothing and imports nothing heavy."""

from __future__ import annotations

import os


def run() -> None:
    if os.environ.get("PCX_TORCH") != "1":
        return
    try:
        import pcx.torch

        pcx.torch.install()
    except Exception as e:  # never break the interpreter's start
        import sys

        print(f"pcx: PCX_TORCH=1 but pcx.torch.install() failed: {e}", file=sys.stderr)


run()
