"""Side-by-side accelerator benchmark: the paper's federated round in lorm_jax against the reference's PyTorch loop.

One command, sized for an 8-minute GPU run (``--budget`` seconds, default 420, after which remaining items are
skipped and listed)::

    lorm-jax bench-accelerator --out bench_accelerator/
    lorm-jax bench-accelerator --tiny --out /tmp/ba               # CPU smoke size (the test)

**Round** (section ``rounds``): the paper's CIFAR-100 setup (``configs/paper/cifar100.py:0.5``, ``--paper-config``;
its values are in ``configs/paper/reference_table.py``, shipped in the wheel too) at paper
scale with random weights: ViT-B/16 at 224 px in the AugReg layout (``tiny_vit`` with the ViT-B/16 architecture, so no
download), K = 10 clients from a Dirichlet(0.5) split of one 5 000-sample, 10-class task (synthetic 32 px images,
random-resized-cropped to 224 on the device, as CIFAR images are), batch 16, one local epoch, diagonal backbone Grams,
full head Gram (α = 0.5). Round 0 of the task is timed (it trains B; every task starts with it). lorm_jax runs through
the public engine API (``plan.build_setup`` / ``rounds.initial_state`` / ``rounds.run_round``, its compiled stages
timed through :func:`lorm_jax.rounds.instrument` in :func:`timed_round`) at rank 1 and 16, compute dtype float32 and
bfloat16 (``backbone.options.compute_dtype``). The round runs twice on the same state: the first call includes
compilation (XLA's backend-compile events are summed and counted), the second is the steady state and must compile
nothing. The reference's loop (:mod:`lorm_jax.bench.reference_torch`: clients one after another, a fresh AdamW each,
fp16 autocast, dense Gram hooks, float64 ``pinverse`` merges) runs the same clients on the same images after a warm-up
on the smallest client.

Per line: wall time of local training, Gram pass, merge and the whole round; images/s of training (real images, not
padding); model FLOP/s and MFU of the training and Gram passes against the device's dense peak for the compute dtype
(:data:`PEAKS`; float32 matmuls run as TF32 on NVIDIA GPUs by default in both frameworks: JAX's DEFAULT precision, and
the reference's ``set_float32_matmul_precision("medium")``); and the time ratio lorm_jax / reference.

**FLOP model** (:func:`vit_flops`, 2 FLOPs per multiply-add, per image): patch embedding, per block the frozen qkv /
proj / fc1 / fc2 matmuls, attention ``QKᵀ`` and ``PV``, LoRA ``(x Aᵀ) Bᵀ`` on the four layers, the head. Training adds
the backward pass of a frozen backbone: activation gradients through every block (its matmuls once more, attention
twice), LoRA factor gradients (one more LoRA pass), no weight gradients of frozen matrices. The Gram pass is a forward
plus the diagonal Gram sums. The same count is used for both frameworks.

**Merges** (section ``merges``): the full-model server merge at ViT-B/16 shapes (48 layers), K = 10, the largest rank,
diagonal and full Grams, A- and B-factor: jitted ``merge_lora_tree`` (compile time, median of 3 calls) against the
reference's per-layer float64 ``pinverse`` on dense Grams held on the host
(:func:`lorm_jax.bench.reference_torch.reference_merge`; ``--ref-layers-per-shape`` layers of each shape are merged
and the total extrapolated, since a float64 ``pinverse`` of 3072² takes seconds). Grams are activation-like random
``XᵀX`` made on the device.

Output: the tables on stdout, ``bench_accelerator.json`` and ``bench_accelerator.md`` in ``--out``. The PyTorch half
is skipped (and said so) where torch is not importable. Importable: :func:`run` returns the results, :func:`main` is
the CLI (``lorm-jax bench-accelerator``).

Expected time of the default run on an H100/H200 (estimates before any GPU run; the budget guard protects the 8
minutes): ~15 s start-up, per lorm_jax round line ~60-90 s (mostly compiling the vmapped training and Gram programs
of ViT-B/16; the steady round itself takes seconds), per reference line ~35 s (two rounds' worth of 5 000 images at
batch 16: ~313 steps of ~30 ms, a Gram pass with 48 dense Grams per batch, 10 × 538 MB of Grams through the host), the
merge section ~60-100 s: about 7 minutes for bf16 and fp32 at r = 1 and 16. Compiled programs: one training and one
Gram program per (rank, dtype), one merge per factor and Gram kind.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import importlib.util
import json
import math
import os
import sys
import time
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from lorm_jax import config as config_lib
from lorm_jax import merging, plan, rounds
from lorm_jax.bench import common

# ViT-B/16 and a CPU-sized stand-in; "backbone" are tiny_vit options (random init in big_vision's AugReg layout).
SIZES = {
    "paper": {"backbone": {"image_size": 224, "patch": 16, "width": 768, "depth": 12, "heads": 12, "mlp": 3072},
              "task_samples": 5000, "classes": 10, "data_px": 32, "clients": 10, "batch": 16, "epochs": 1,
              "ranks": (1, 16), "dtypes": ("bfloat16", "float32")},
    "tiny": {"backbone": {"image_size": 32, "patch": 8, "width": 32, "depth": 2, "heads": 2, "mlp": 64},
             "task_samples": 64, "classes": 4, "data_px": 16, "clients": 4, "batch": 8, "epochs": 1,
             "ranks": (2,), "dtypes": ("bfloat16", "float32")},
}
PAPER_CONFIG = "configs/paper/cifar100.py:0.5"  # the paper's CIFAR-100 setup, β of its rank-1 command
DEFAULT_BUDGET_S = 420.0  # leaves ~1 minute of an 8-minute device run for start-up and writing the results

# Dense (no 2:4 sparsity) peak TFLOP/s by device kind, from the vendors' datasheets: NVIDIA H100 / H200 / A100 / L4 /
# L40S, Google Cloud TPU system architecture pages. "float32" is the TF32 tensor-core peak on NVIDIA GPUs (what both
# frameworks use for float32 matmuls by default there) and the bf16 peak on TPUs (float32 matmuls run in bf16 passes
# at DEFAULT precision). First match of the substring in ``device_kind`` wins, so the specific names come first.
PEAKS = (
    ("H200 NVL", {"bfloat16": 835.5, "float16": 835.5, "float32": 417.5}),
    ("H200", {"bfloat16": 989.4, "float16": 989.4, "float32": 494.7}),
    ("H100 NVL", {"bfloat16": 835.5, "float16": 835.5, "float32": 417.5}),
    ("H100 PCIe", {"bfloat16": 756.5, "float16": 756.5, "float32": 378.0}),
    ("H100", {"bfloat16": 989.4, "float16": 989.4, "float32": 494.7}),
    ("A100", {"bfloat16": 312.0, "float16": 312.0, "float32": 156.0}),
    ("L40S", {"bfloat16": 366.0, "float16": 366.0, "float32": 183.0}),
    ("L4", {"bfloat16": 121.0, "float16": 121.0, "float32": 60.0}),
    ("TPU v6 lite", {"bfloat16": 918.0, "float32": 918.0}),
    ("TPU v5 lite", {"bfloat16": 197.0, "float32": 197.0}),
    ("TPU v5", {"bfloat16": 459.0, "float32": 459.0}),
    ("TPU v4", {"bfloat16": 275.0, "float32": 275.0}),
)


def device_peak(kind: str, dtype: str) -> float | None:
    """Dense peak FLOP/s of ``kind`` (``jax.Device.device_kind`` / ``torch.cuda.get_device_name``) for ``dtype``."""
    for name, peaks in PEAKS:
        if name.lower() in kind.lower():
            return 1e12 * peaks[dtype] if dtype in peaks else None
    return None


def vit_flops(*, image_size: int, patch: int, width: int, depth: int, mlp: int, rank: int, num_classes: int,
              **_) -> dict[str, float]:
    """Model FLOPs per image (module docstring): ``forward``, ``train`` (forward + frozen-backbone backward) and
    ``gram`` (forward + diagonal Gram sums) of a ViT with LoRA on qkv, proj, fc1, fc2 of every block."""
    n, d, m = (image_size // patch) ** 2 + 1, width, mlp
    embed = 2 * (n - 1) * patch * patch * 3 * d
    linear = 2 * n * (3 * d * d + d * d + d * m + m * d)
    attention = 2 * 2 * n * n * d
    lora = 2 * n * rank * ((d + 3 * d) + (d + d) + (d + m) + (m + d))
    head = 2 * d * num_classes
    forward = embed + depth * (linear + attention + lora) + head
    backward = depth * (linear + 2 * attention + 2 * lora) + 2 * head
    grams = depth * 2 * n * (3 * d + m)  # x ⊙ x summed over tokens, inputs of qkv, proj, fc1 (d) and fc2 (m)
    return {"forward": float(forward), "train": float(forward + backward), "gram": float(forward + grams)}


# ----------------------------------------------------------------------------------------------------------------------
# Compile accounting: XLA backend-compile events (count and seconds) while a block of code runs.

_COMPILES: list[float] = []


def _on_event(event: str, duration: float, **_) -> None:
    if event == "/jax/core/compile/backend_compile_duration":
        _COMPILES.append(duration)


jax.monitoring.register_event_duration_secs_listener(_on_event)


def _compiles_since(mark: int) -> tuple[int, float]:
    return len(_COMPILES) - mark, float(sum(_COMPILES[mark:]))


# ----------------------------------------------------------------------------------------------------------------------
# lorm_jax through the public engine API.

def paper_config(spec: str = PAPER_CONFIG):
    """The config file ``spec`` (``FILE[:ARG]``: a path or a shipped config, :func:`lorm_jax.config.load`)."""
    return config_lib.load(spec)


def round_config(size: Mapping, rank: int, dtype: str, seed: int = 0, paper: str = PAPER_CONFIG):
    """The paper's CIFAR-100 config (``paper``, :func:`paper_config`) with a random ViT (AugReg layout), synthetic
    images, one task and one epoch."""
    c = paper_config(paper)
    c.description = f"bench_accelerator: paper round, rank {rank}, {dtype}"
    c.seed = seed
    c.backbone.name = "tiny_vit"
    c.backbone.options = {**size["backbone"], "seed": seed, "qkv": "fused", "compute_dtype": dtype}
    c.data.name = "synthetic_images"
    c.data.options = {"num_classes": size["classes"], "n_train": size["task_samples"] // size["classes"],
                      "n_test": 1, "image_size": size["data_px"], "seed": seed}
    c.data.classes_per_task = size["classes"]
    c.data.min_samples = 1 if size["task_samples"] < 1000 else c.data.min_samples
    c.num_clients = size["clients"]
    c.batch_size = size["batch"]
    c.epochs = size["epochs"]
    c.rounds = 1
    c.rank = rank
    c.merge_diagnostics = False  # per-round residual diagnostics: not part of the paper's round
    return c


PHASES = {"train": "train", "sums": "grams", "merge_round": "merge"}  # compiled stage (rounds.STAGES) -> phase


def timed_round(setup, state: dict, task: int = 0, rnd: int = 0) -> tuple[dict, dict, dict]:
    """``rounds.run_round`` with the wall time of its phases (device-synchronised): ``train`` (all calls of the
    clients' training program), ``grams`` (the Gram program), ``merge`` (the method's server merge) and ``round``."""
    phases = dict.fromkeys(PHASES.values(), 0.0)

    def wrap(stage: str, fn: Callable) -> Callable:
        if stage not in PHASES:
            return fn

        def timed(*args, **kwargs):
            t = common.timed(lambda: fn(*args, **kwargs))
            phases[PHASES[stage]] += t.seconds
            return t.out
        return timed
    instrumented = rounds.instrument(setup, wrap)
    t = common.timed(lambda: rounds.run_round(instrumented, state, task, rnd))
    state, metrics = t.out
    phases["round"] = t.seconds
    return state, metrics, phases


def _throughput(row: dict, flops: Mapping, peak: float | None, train_s: float, gram_s: float) -> None:
    row["images_per_s"] = row["images"] / train_s
    row["train_tflops"] = 1e-12 * row["images"] * flops["train"] / train_s
    row["gram_tflops"] = 1e-12 * row["gram_images"] * flops["gram"] / gram_s
    row["train_mfu"] = None if peak is None else 1e12 * row["train_tflops"] / peak
    row["gram_mfu"] = None if peak is None else 1e12 * row["gram_tflops"] / peak


def jax_round(size: Mapping, rank: int, dtype: str, log: Callable[[str], None],
              paper: str = PAPER_CONFIG) -> tuple[dict, object]:
    """One lorm_jax line (module docstring). Returns the row and the setup (its data and clients feed the reference)."""
    config = round_config(size, rank, dtype, paper=paper)

    def build():
        setup = plan.build_setup(config)
        return setup, rounds.initial_state(setup)
    built = common.timed(build)
    (setup, state), build_s = built.out, built.seconds
    mark = len(_COMPILES)
    _, _, first = timed_round(setup, state)
    first_compiles, first_compile_s = _compiles_since(mark)
    mark = len(_COMPILES)
    _, metrics, steady = timed_round(setup, state)
    steady_compiles, _ = _compiles_since(mark)
    parts = setup.partitions[0]
    real = int(sum(len(p) for p in parts))
    kind = jax.devices()[0].device_kind
    row = {"framework": "lorm_jax", "rank": rank, "dtype": dtype, "device": kind, "clients": len(parts),
           "client_sizes": [len(p) for p in parts], "build_s": build_s, "first_round_s": first["round"],
           "compile_s": first_compile_s, "compiles_first_round": first_compiles,
           "compiles_steady_round": steady_compiles, "train_s": steady["train"], "gram_s": steady["grams"],
           "merge_s": steady["merge"], "round_s": steady["round"],
           "other_s": steady["round"] - steady["train"] - steady["grams"] - steady["merge"],
           "images": real * config.epochs, "gram_images": real * config.gram_passes,
           "train_utilization": metrics["train_utilization"], "gram_utilization": metrics["gram_utilization"],
           "loss": metrics["loss"], "status": "ok"}
    flops = vit_flops(**size["backbone"], rank=rank, num_classes=size["classes"])
    _throughput(row, flops, device_peak(kind, dtype), steady["train"], steady["grams"])
    log(format_round_row(row))
    return row, setup


def torch_round(setup, size: Mapping, rank: int, log: Callable[[str], None]) -> dict:
    """The reference's loop on the same clients and images as ``setup`` (after a warm-up on the smallest client)."""
    from lorm_jax.bench import reference_torch as ref  # noqa: PLC0415 - optional dependency (torch)
    ds = setup.dataset
    parts = [np.asarray(p) for p in setup.partitions[0]]
    kw = dict(arch=size["backbone"], num_classes=size["classes"], rank=rank, factor="B", batch=size["batch"],
              epochs=size["epochs"], gram_passes=setup.config.gram_passes, lr=setup.config.lr)
    smallest = min(parts, key=len)
    warm = ref.reference_round(ds.x_train, ds.y_train, [smallest], **kw)
    out = ref.reference_round(ds.x_train, ds.y_train, parts, state=warm["state"], **kw)
    kind = out["device_name"]
    row = {"framework": "reference (PyTorch)", "rank": rank, "dtype": "float16", "device": kind,
           "clients": len(parts), "client_sizes": [len(p) for p in parts], "build_s": warm["build_s"],
           "first_round_s": None, "compile_s": None, "compiles_first_round": None, "compiles_steady_round": None,
           "train_s": out["train_s"], "gram_s": out["gram_s"], "merge_s": out["merge_s"], "round_s": out["round_s"],
           "other_s": 0.0, "images": out["images"], "gram_images": out["gram_images"],
           "train_utilization": 1.0, "gram_utilization": 1.0,
           "loss": None, "status": "ok", "torch": out["torch"]}
    flops = vit_flops(**size["backbone"], rank=rank, num_classes=size["classes"])
    _throughput(row, flops, device_peak(kind, "float16"), out["train_s"], out["gram_s"])
    log(format_round_row(row))
    return row


# ----------------------------------------------------------------------------------------------------------------------
# The full-model merge.

@functools.partial(jax.jit, static_argnames=("clients", "d", "full"))
def _device_grams(key, clients: int, d: int, full: bool):
    """Activation-like client Grams ``X_kᵀ X_k`` of n = 2d rows: per-feature log-normal scales, a shared d/8-factor
    component, a client-shifted mean. [K, d, d] (full) or their diagonals [K, d]."""
    n, m = 2 * d, max(1, d // 8)
    k1, k2, k3, k4, k5 = jax.random.split(key, 5)
    scale = jnp.exp(0.5 * jax.random.normal(k1, (d,)))
    loading = jax.random.normal(k2, (m, d)) * scale / jnp.sqrt(m)
    x = (jax.random.normal(k3, (clients, n, d)) * scale
         + jnp.einsum("knm,md->knd", jax.random.normal(k4, (clients, n, m)), loading)
         + 0.5 * scale * jax.random.normal(k5, (clients, 1, d)))
    if full:
        return jnp.einsum("kni,knj->kij", x, x, precision=jax.lax.Precision.HIGHEST)
    return jnp.sum(x * x, axis=1)


def _merge_inputs(shapes: Mapping, clients: int, rank: int, factor: str, kind: str, seed: int = 0):
    grams, lora = {}, {}
    rng = np.random.default_rng(seed)
    for i, (path, (d_out, d_in)) in enumerate(shapes.items()):
        grams[path] = _device_grams(jax.random.PRNGKey(1000 * seed + i), clients, d_in, kind == "full")
        bound = 1 / np.sqrt(d_in)
        a0, b0 = rng.uniform(-bound, bound, (rank, d_in)), 0.02 * rng.standard_normal((d_out, rank))
        if factor == "A":
            a = a0 + 0.2 * bound * rng.standard_normal((clients, rank, d_in))
            b = np.broadcast_to(b0, (clients,) + b0.shape)
        else:
            a, b = np.broadcast_to(a0, (clients,) + a0.shape), b0 + 0.005 * rng.standard_normal((clients, d_out, rank))
        lora[path] = {"A": jnp.asarray(a, jnp.float32), "B": jnp.asarray(b, jnp.float32)}
    return jax.block_until_ready((lora, grams))


def merge_lines(shapes: Mapping, clients: int, rank: int, *, torch_ok: bool, ref_layers_per_shape: int | None,
                log: Callable[[str], None], budget_left: Callable[[], float]) -> list[dict]:
    rows = []
    for kind in ("diag", "full"):
        for factor in ("A", "B"):
            if budget_left() <= 0:
                rows.append({"framework": "both", "factor": factor, "gram": kind, "status": "skipped: budget"})
                continue
            lora, grams = _merge_inputs(shapes, clients, rank, factor, kind)
            fn = jax.jit(lambda cl, g, _f=factor: merging.merge_lora_tree(cl, g, _f))
            compiled = common.timed(lambda: fn.lower(lora, grams).compile())
            first = common.timed(lambda: compiled.out(lora, grams))
            ours = first.out
            steady = common.repeat(lambda: compiled.out(lora, grams), 3)
            row = {"framework": "lorm_jax", "factor": factor, "gram": kind, "layers": len(shapes), "K": clients,
                   "r": rank, "compile_s": compiled.seconds, "first_call_s": first.seconds,
                   "s": common.median(steady),
                   "status": "ok", "device": jax.devices()[0].device_kind}
            rows.append(row)
            log(format_merge_row(row))
            if not torch_ok:
                continue
            from lorm_jax.bench import reference_torch as ref  # noqa: PLC0415 - optional dependency (torch)
            host_lora = {p: {k: np.asarray(v) for k, v in f.items()} for p, f in lora.items()}
            dense = {}
            for p, g in grams.items():  # the reference sends dense Grams (diagonal ones as diagonal matrices)
                g = np.asarray(g)
                dense[p] = g if g.ndim == 3 else np.einsum("kd,de->kde", g, np.eye(g.shape[1], dtype=np.float32))
            res = ref.reference_merge(factor, host_lora, dense, layers_per_shape=ref_layers_per_shape)
            err = 0.0
            for p, got in res["out"].items():
                mine = np.asarray(ours[p][factor], np.float64)
                err = max(err, float(np.linalg.norm(mine - got) / max(np.linalg.norm(got), 1e-30)))
            ref_row = {"framework": "reference (PyTorch)", "factor": factor, "gram": kind, "layers": len(shapes),
                       "K": clients, "r": rank, "compile_s": None, "first_call_s": None, "s": res["s"],
                       "measured_s": res["measured_s"], "merged_layers": res["merged_layers"],
                       "rel_err_vs_ours": err, "status": "ok"}
            rows.append(ref_row)
            log(format_merge_row(ref_row))
            del host_lora, dense
    return rows


# ----------------------------------------------------------------------------------------------------------------------
# Reporting.

ROUND_HEADER = ("framework", "r", "dtype", "train s", "Gram s", "merge s", "round s", "images/s", "train TFLOP/s",
                "train MFU", "Gram TFLOP/s", "Gram MFU", "compile s (compiles)", "steady compiles")


def format_round_row(r: Mapping) -> str:
    if r.get("status", "ok") != "ok":
        return f"| {r['framework']} | {r.get('rank', '')} | {r.get('dtype', '')} | {r['status']} |"
    pct = lambda x: common.fmt(None if x is None else 100 * x, ".1f") + ("%" if x is not None else "")
    comp = "—" if r["compile_s"] is None else f"{r['compile_s']:.1f} ({r['compiles_first_round']})"
    return ("| " + " | ".join([r["framework"], str(r["rank"]), r["dtype"], f"{r['train_s']:.2f}", f"{r['gram_s']:.2f}",
                               f"{r['merge_s']:.3f}", f"{r['round_s']:.2f}", f"{r['images_per_s']:.0f}",
                               f"{r['train_tflops']:.1f}", pct(r["train_mfu"]), f"{r['gram_tflops']:.1f}",
                               pct(r["gram_mfu"]), comp, common.fmt(r["compiles_steady_round"], "d")]) + " |")


MERGE_HEADER = ("framework", "factor", "Grams", "layers", "K", "r", "compile s", "merge s", "rel. err vs lorm_jax")


def format_merge_row(r: Mapping) -> str:
    if r.get("status", "ok") != "ok":
        return f"| {r['framework']} | {r['factor']} | {r['gram']} | {r['status']} |"
    s = f"{r['s']:.3f}" + ("" if r.get("merged_layers") in (None, r["layers"]) else
                           f" (from {r['merged_layers']} layers)")
    return ("| " + " | ".join([r["framework"], r["factor"], r["gram"], str(r["layers"]), str(r["K"]), str(r["r"]),
                               common.fmt(r["compile_s"], ".2f"), s, common.fmt(r.get("rel_err_vs_ours"), ".1e")])
            + " |")


def ratio_lines(rounds: list[dict], merges: list[dict]) -> list[str]:
    """``lorm_jax / reference`` time ratios (and the speed-up, its inverse) for every line measured on both sides."""
    out = []
    refs = {r["rank"]: r for r in rounds if r["framework"].startswith("reference") and r["status"] == "ok"}
    for r in rounds:
        ref = refs.get(r.get("rank"))
        if r["framework"] != "lorm_jax" or r["status"] != "ok" or ref is None:
            continue
        for phase in ("train", "gram", "merge", "round"):
            ratio = r[f"{phase}_s"] / ref[f"{phase}_s"] if ref[f"{phase}_s"] > 0 else float("nan")
            out.append(f"r={r['rank']} {r['dtype']:>8} {phase:>5}: lorm_jax / reference = {ratio:.3f} "
                       f"(speed-up {1 / ratio:.1f}x)")
    mine = {(m["factor"], m["gram"]): m for m in merges if m["framework"] == "lorm_jax" and m["status"] == "ok"}
    for m in merges:
        ours = mine.get((m["factor"], m["gram"]))
        if m["framework"].startswith("reference") and m["status"] == "ok" and ours is not None:
            ratio = ours["s"] / m["s"]
            out.append(f"merge {m['factor']} {m['gram']:>4}: lorm_jax / reference = {ratio:.4f} "
                       f"(speed-up {1 / ratio:.0f}x)")
    return out


def to_markdown(result: Mapping) -> str:
    lines = [f"# bench_accelerator {result['date']} ({result['size']})", "",
             f"`{result['command']}`", "", f"device: {result['device']}; jax {result['jax']}; torch "
             f"{result.get('torch') or 'not available'}; commit {result.get('commit') or '?'}; total "
             f"{result['total_s']:.0f} s", "", "## Round", "",
             "| " + " | ".join(ROUND_HEADER) + " |", "|" + "---|" * len(ROUND_HEADER)]
    lines += [format_round_row(r) for r in result["rounds"]]
    lines += ["", "## Full-model merge", "", "| " + " | ".join(MERGE_HEADER) + " |", "|" + "---|" * len(MERGE_HEADER)]
    lines += [format_merge_row(r) for r in result["merges"]]
    lines += ["", "## Ratios", ""] + [f"- {x}" for x in result["ratios"]]
    if result["skipped"]:
        lines += ["", "Skipped: " + "; ".join(result["skipped"])]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------------------
# The run.

def _torch_available() -> bool:
    return importlib.util.find_spec("torch") is not None


def run(size_name: str = "paper", *, ranks=None, dtypes=None, sections=("rounds", "merges"), torch: bool = True,
        budget_s: float | None = None, ref_layers_per_shape: int | None = 1, log: Callable[[str], None] = print,
        paper: str = PAPER_CONFIG) -> dict:
    """Run the benchmark (module docstring); returns everything that is written to JSON. ``paper``: the config the
    round starts from (:func:`paper_config`)."""
    size = SIZES[size_name]
    budget_s = (DEFAULT_BUDGET_S if size_name == "paper" else math.inf) if budget_s is None else budget_s
    ranks = tuple(ranks or size["ranks"])
    dtypes = tuple(dtypes or size["dtypes"])
    torch_ok = torch and _torch_available()
    started = time.perf_counter()
    left = lambda: budget_s - (time.perf_counter() - started)
    rounds, merges, skipped, setups, spent = [], [], [], {}, {}

    def fits(kind: str) -> bool:  # the next item of this kind is expected to take as long as the last one did
        return left() > spent.get(kind, 0.0)

    # order: what the comparison needs first (bf16 vs the reference at each rank), then the rest
    order = []
    for rank in ranks:
        order += [("jax", rank, dtypes[0]), ("torch", rank, None)]
    order += [("jax", rank, dt) for dt in dtypes[1:] for rank in ranks]
    if "rounds" in sections:
        for what, rank, dtype in order:
            label = f"{what} r={rank}" + (f" {dtype}" if dtype else "")
            if what == "torch" and not torch_ok:
                if not torch:
                    continue
                skipped.append(f"{label}: torch not importable")
                continue
            if not fits(what) or left() <= 0:
                skipped.append(f"{label}: budget")
                continue
            t0 = time.perf_counter()
            if what == "jax":
                row, setup = jax_round(size, rank, dtype, log, paper)
                rounds.append(row)
                setups.setdefault(rank, setup)
            else:
                rounds.append(torch_round(setups[rank], size, rank, log))
            spent[what] = time.perf_counter() - t0
    if "merges" in sections:
        arch = size["backbone"]
        shapes = (next(iter(setups.values())).backbone.lora_shapes if setups
                  else common.vit_lora_shapes(arch["depth"], arch["width"], arch["mlp"]))
        merges = merge_lines(shapes, size["clients"], max(ranks), torch_ok=torch_ok,
                             ref_layers_per_shape=ref_layers_per_shape, log=log, budget_left=left)
        skipped += [f"merge {m['factor']} {m['gram']}: budget" for m in merges if m["status"] != "ok"]
    tv = None
    if torch_ok:
        import torch as _torch  # noqa: PLC0415
        tv = _torch.__version__
    return {"size": size_name, "ranks": ranks, "dtypes": dtypes, "device": jax.devices()[0].device_kind,
            "jax": jax.__version__, "torch": tv, "budget_s": budget_s, "total_s": time.perf_counter() - started,
            "rounds": rounds, "merges": merges, "ratios": ratio_lines(rounds, merges), "skipped": skipped,
            "size_spec": {k: (list(v) if isinstance(v, tuple) else v) for k, v in size.items()}}


def dry_run(size_name: str, ranks=None, dtypes=None, log: Callable[[str], None] = print,
            paper: str = PAPER_CONFIG) -> dict:
    """Build the first round's setup (no training) and report the plan: configs, client sizes, the lanes and packed
    passes, model FLOPs per image. Checks that the paper-size configuration is valid without a GPU."""
    size = SIZES[size_name]
    ranks, dtypes = tuple(ranks or size["ranks"]), tuple(dtypes or size["dtypes"])
    built = common.timed(lambda: plan.build_setup(round_config(size, ranks[0], dtypes[0], paper=paper)))
    setup = built.out
    sizes = [len(p) for p in setup.partitions[0]]
    report = {"size": size_name, "lines": [(r, d) for r in ranks for d in dtypes], "client_sizes": sizes,
            "lanes": setup.schedule.lanes, "lane_steps": setup.schedule.num_steps,
            "gram_batches": plan.round_waves(setup, 0, 0)[0].gram["num_batches"],
            "lora_layers": len(setup.backbone.lora_shapes), "build_s": built.seconds,
            "flops_per_image": {r: vit_flops(**size["backbone"], rank=r, num_classes=size["classes"]) for r in ranks}}
    log(json.dumps(report, indent=1, default=str))
    return report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lorm-jax bench-accelerator", description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="CPU smoke size (tiny ViT, 4 clients, 64 images)")
    p.add_argument("--out", default="bench_accelerator", help="directory for bench_accelerator.json / .md")
    p.add_argument("--ranks", nargs="+", type=int, help="default: 1 16 (tiny: 2)")
    p.add_argument("--dtypes", nargs="+", choices=("bfloat16", "float32"), help="default: bfloat16 float32")
    p.add_argument("--sections", nargs="+", choices=("rounds", "merges"), default=["rounds", "merges"])
    p.add_argument("--no-torch", action="store_true", help="skip the reference's PyTorch half")
    p.add_argument("--budget", type=float, default=None,
                   help=f"seconds after which items are skipped (an item is started only if the last one of its kind "
                        f"would still fit); default {DEFAULT_BUDGET_S:.0f} for the paper size, none for --tiny")
    p.add_argument("--dry-run", action="store_true", help="build the first setup and print the plan; run nothing")
    p.add_argument("--ref-layers-per-shape", type=int, default=1,
                   help="reference merge: layers merged per distinct shape, total extrapolated (<= 0: all)")
    p.add_argument("--paper-config", default=PAPER_CONFIG, metavar="FILE[:ARG]",
                   help="the config the round starts from (default: %(default)s, in the current directory or the "
                        "source checkout of lorm_jax)")
    return p


def main(argv: list[str] | None = None) -> int:
    """CLI entry point (``lorm-jax bench-accelerator``)."""
    args = build_parser().parse_args(argv)
    if args.dry_run:
        dry_run("tiny" if args.tiny else "paper", args.ranks, args.dtypes, paper=args.paper_config)
        return 0
    # JAX must leave GPU memory for the PyTorch half (read when the backend starts, i.e. at the first computation)
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.6")
    started = datetime.datetime.now(datetime.timezone.utc)
    command = " ".join(["lorm-jax bench-accelerator", *(sys.argv[1:] if argv is None else argv)])
    machine = common.machine_info()
    print(f"# bench-accelerator {started.isoformat(timespec='seconds')} | {command} | {machine['node']} "
          f"{machine['cpu_count']} cores | {machine['device_kind']}", flush=True)
    result = run("tiny" if args.tiny else "paper", ranks=args.ranks, dtypes=args.dtypes, sections=args.sections,
                 torch=not args.no_torch, budget_s=args.budget,
                 ref_layers_per_shape=None if args.ref_layers_per_shape <= 0 else args.ref_layers_per_shape,
                 log=lambda s: print(s, flush=True), paper=args.paper_config)
    result.update(date=started.isoformat(timespec="seconds"), command=command, commit=machine["commit"],
                  machine=machine)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_accelerator.json"), "w") as fh:
        json.dump(result, fh, indent=2, default=float)
    markdown = to_markdown(result)
    with open(os.path.join(args.out, "bench_accelerator.md"), "w") as fh:
        fh.write(markdown)
    print()
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
