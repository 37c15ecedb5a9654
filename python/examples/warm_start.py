"""The README's first example: torch.compile records into pcx, and a second run warm-starts from it.

Run it twice. The first run compiles and saves; the second, a fresh process, loads from pcx and
prints `frames compiled: 0`, `dynamo cache hits: 1`, and the same output.
"""

import pcx.torch; pcx.torch.install()  # the one line (or PCX_TORCH=1, or pytest -p pcx.torch)
import torch

torch._dynamo.config.caching_precompile = True  # torch's switch (or TORCH_CACHING_PRECOMPILE=1)

torch.manual_seed(0)
model = torch.compile(torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)))
with torch.no_grad():  # inference: AOTAutograd records a training graph only once its backward runs
    print("output:", model(torch.ones(8, 16)).sum().item())  # each artifact and entry: a durable event in pcx
torch.compiler.save_cache_artifacts()  # stitched and saved in pcx

from torch._dynamo.utils import counters

print("frames compiled:", counters["stats"]["unique_graphs"])
print("dynamo cache hits:", counters["dynamo_cache"]["dynamo_cache_hit"])
