"""Functions the benchmark runs inside Ray actors.

Ray pickles them by reference, so they live in a module every worker imports by its one
name (``zcbench.harness.inactor``), never in a pytest file that pytest may import as
``harness.bench_load``.
"""

from __future__ import annotations

import time
from typing import Any


def timed_forward(model: Any, method: str, inputs: tuple) -> float:
    """Seconds of one forward pass (``model.method(*inputs)``, no autograd, one thread), run where the model lives."""
    import torch

    torch.set_num_threads(1)
    start = time.perf_counter()
    with torch.no_grad():
        getattr(model, method)(*inputs)
    return time.perf_counter() - start
