"""What the benchmarks share: timing, a number format that tolerates missing values, the LoRA layer shapes of a ViT,
and where the numbers were measured (machine, devices, commit, peak memory)."""
from __future__ import annotations

import os
import platform
import resource
import statistics
import subprocess
import time
from typing import Any, Callable, Iterable, NamedTuple

import jax
import numpy as np

# ----------------------------------------------------------------------------------------------------------------------
# Timing.

class Timing(NamedTuple):
    """One timed call."""
    seconds: float      # wall clock
    cpu_seconds: float  # CPU time of this process (all its threads)
    out: Any            # what the call returned


def timed(fn: Callable[[], Any], *, sync: Callable[[Any], object] = jax.block_until_ready) -> Timing:
    """``fn()`` timed until ``sync(out)`` returns; the default waits until every jax array of the result is computed
    (jax dispatches asynchronously). Other results (numpy, a compiled program) are timed as returned."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    sync(out)
    return Timing(time.perf_counter() - t0, time.process_time() - c0, out)


def repeat(fn: Callable[[], Any], repeats: int, *, budget_s: float | None = None,
           sync: Callable[[Any], object] = jax.block_until_ready) -> list[Timing]:
    """Up to ``repeats`` :func:`timed` calls of ``fn`` (at least one). With ``budget_s``, a call is not started when
    the calls so far plus one more of their mean duration would exceed it."""
    runs: list[Timing] = []
    while len(runs) < max(1, repeats):
        spent = sum(t.seconds for t in runs)
        if budget_s is not None and runs and spent + spent / len(runs) > budget_s:
            break
        runs.append(timed(fn, sync=sync))
    return runs


def median(runs: Iterable[Timing], *, cpu: bool = False) -> float:
    """Median wall-clock (or ``cpu``) seconds of ``runs``."""
    return statistics.median(t.cpu_seconds if cpu else t.seconds for t in runs)


# ----------------------------------------------------------------------------------------------------------------------
# Formatting.

def fmt(x, spec: str, missing: str = "—") -> str:
    """``format(x, spec)``, or ``missing`` where ``x`` is None (not measured, skipped, not applicable)."""
    return missing if x is None else format(x, spec)


# ----------------------------------------------------------------------------------------------------------------------
# Model shapes.

def vit_lora_shapes(depth: int, width: int, mlp: int) -> dict[str, tuple[int, int]]:
    """LoRA layers of a ViT with fused qkv, as the backbones name them: ``{path: (d_out, d_in)}`` for
    ``block_XX/attn/qkv`` [3d, d], ``block_XX/attn/out`` [d, d], ``block_XX/mlp/fc1`` [m, d] and ``block_XX/mlp/fc2``
    [d, m], block by block (d = ``width``, m = ``mlp``)."""
    shapes = {}
    for i in range(depth):
        shapes.update({f"block_{i:02d}/attn/qkv": (3 * width, width), f"block_{i:02d}/attn/out": (width, width),
                       f"block_{i:02d}/mlp/fc1": (mlp, width), f"block_{i:02d}/mlp/fc2": (width, mlp)})
    return shapes


# ----------------------------------------------------------------------------------------------------------------------
# Where it ran.

def checkout() -> str | None:
    """The source checkout whose ``lorm_jax`` this is (a clone installed with ``pip install -e .`` or on
    ``PYTHONPATH``), or None for an installed package."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return root if os.path.isfile(os.path.join(root, "setup.py")) and os.path.isdir(os.path.join(root, "configs")) \
        else None


def commit() -> str | None:
    """The short commit of :func:`checkout` (None for an installed package or without git)."""
    root = checkout()
    if root is None:
        return None
    try:
        return subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info() -> dict:
    """The machine, the software and the commit a benchmark ran with (for its JSON)."""
    devices = jax.devices()
    return {"platform": platform.platform(), "node": platform.node(),
            "processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "load_average": os.getloadavg(), "python": platform.python_version(), "jax": jax.__version__,
            "numpy": np.__version__, "devices": [str(d) for d in devices], "device_kind": devices[0].device_kind,
            "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"), "commit": commit()}


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
