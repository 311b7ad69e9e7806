"""Benchmark of the server-side LoRM merge: jitted ``merge_lora_tree`` vs a per-layer float64 ``pinv`` loop.

For every LoRA layer of a model (ViT-B/16 with fused qkv, ViT-S/14 = DINOv2-S), K clients, ranks r, full and diagonal
Grams and both factors, it times

* **ours**: ``jax.jit(lambda cl, g: merge_lora_tree(cl, g, factor))`` — compile time (``.lower().compile()``), the
  first call, and the steady state (median of ``repeats`` >= 3 calls, ``block_until_ready``);
* **baseline**: the merge written the way the PyTorch reference does it, per layer, in float64 on the host (numpy),
  with dense Grams (a diagonal Gram is expanded with ``np.diag`` first, as the reference sends dense Grams) and
  ``pinv(rcond=1e-15)`` like ``torch.pinverse``::

      A-factor:  E  = Σ_k A_k G_k;          A = E pinv(Σ_k G_k)
      B-factor:  E2 = Σ_k (B_k A) G_k;      B = E2 Aᵀ pinv(A (Σ_k G_k) Aᵀ)

  timed with the same protocol (median of up to ``repeats`` runs; a config whose runs would exceed
  ``baseline_budget_s`` seconds stops early, at least one run — the row records how many runs were made). The
  float32 → float64 cast of the stored Grams and the ``np.diag`` expansion are part of the timed baseline (both are
  O(K d²), negligible next to the O(d³) ``pinv``);

and checks ours against the float64 baseline: the max over layers of ``‖ours − base‖_F / ‖base‖_F``.

Inputs are random but activation-like (not timed): client k's Gram of a layer is ``X_kᵀ X_k`` for ``n = 2 d_in``
rows (positive definite) of ``X = Z diag(s) + F C + μ_k`` — log-normal per-feature scales ``s``, a shared
low-dimensional component (``d/8`` latent factors with a 1/j spectrum carrying ~70 % of the variance, so features are
correlated and Jacobi scaling alone does not make the Gram well conditioned), a mean shared by the clients plus a
client shift (non-IID clients). Diagonal Grams are the diagonals of the same Grams. The two extra columns diagnose our
full-Gram solve (from :func:`lorm_jax.merging.gram_health`): how many layers take the eigendecomposition fallback of
:func:`lorm_jax.merging.solve_gram`, and the smallest Cholesky pivot² of the Jacobi-scaled summed Grams.

**Merges under vmap** (``--vmap``, :func:`run_vmap_benchmark`): the primitive applied the way the API invites,
``jax.jit(jax.vmap(merging.merge_lora_A))`` over each stack of same-shape layers, against one jitted
``merge_lora_tree`` call on the same layers (full Grams, A-factor), interleaved in one process. Stacking the inputs is
not timed (a caller that vmaps holds stacks). Default layer set: the first 6 blocks of ViT-S/14 (18 layers with
d_in = 384, 6 with d_in = 1536), K = 10, r = 8.

Usage::

    lorm-jax bench-merge [--quick] [--json OUT] [--x64]
    lorm-jax bench-merge --vmap [--json OUT]

``--quick`` (CI): ViT-S/14, r = 8, A-factor, full and diagonal Grams, all 48 layers. ``--x64`` runs our merge with
``dtype=float64`` (``jax_enable_x64``). Importable: :func:`run_benchmark` returns the rows, :func:`main` is the CLI.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import sys
import threading
from typing import Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from lorm_jax import merging
from lorm_jax.bench import common

LayerShapes = Mapping[str, tuple[int, int]]  # path -> (d_out, d_in)

FACTORS = ("A", "B")
GRAM_KINDS = ("full", "diag")
RANKS = (1, 8, 16)
N_CLIENTS = 10
PINV_RCOND = 1e-15  # torch.pinverse's default in float64


MODELS: dict[str, dict[str, tuple[int, int]]] = {
    "vit_b16": common.vit_lora_shapes(12, 768, 3072),
    "vit_s14": common.vit_lora_shapes(12, 384, 1536),
}
MODEL_LABELS = {"vit_b16": "ViT-B/16", "vit_s14": "ViT-S/14"}

ROW_KEYS = ("model", "factor", "gram", "r", "K", "layers", "dtype", "compile_s", "first_call_s", "ours_ms", "ours_runs",
            "baseline_ms", "baseline_runs", "speedup", "rel_err", "fallback_layers", "min_pivot", "status")


# ----------------------------------------------------------------------------------------------------------------------
# Inputs (not timed).

def _layer_grams(d: int, n_clients: int, *, seed: int, layer: int, full: bool, rows_per_dim: int = 2,
                 shared_var: float = 0.7) -> np.ndarray:
    """Client Grams ``X_kᵀ X_k`` [K, d, d] (full) or their diagonals [K, d] of activation-like ``X_k`` [n, d]."""
    n = rows_per_dim * d
    m = max(1, d // 8)
    rng = np.random.default_rng([seed, layer])
    scale = np.exp(0.5 * rng.standard_normal(d)).astype(np.float32)           # per-feature scales
    lam = 1.0 / np.arange(1, m + 1)                                            # latent-factor spectrum
    loading = rng.standard_normal((m, d)) * scale * np.sqrt(shared_var / (1 - shared_var) / lam.sum())
    loading = loading.astype(np.float32)
    mean = 0.5 * scale * rng.standard_normal(d)
    out = []
    for k in range(n_clients):
        rng_k = np.random.default_rng([seed, layer, k + 1])
        x = rng_k.standard_normal((n, d), dtype=np.float32) * scale
        latent = rng_k.standard_normal((n, m), dtype=np.float32) * np.sqrt(lam).astype(np.float32)
        x += latent @ loading
        x += (mean + 0.25 * scale * rng_k.standard_normal(d)).astype(np.float32)  # client-shifted mean
        out.append(x.T @ x if full else np.einsum("nd,nd->d", x, x))
        del x, latent
    return np.stack(out)


def make_grams(shapes: LayerShapes, n_clients: int, kind: str, *, seed: int = 0) -> dict[str, jax.Array]:
    """``{path: [K, d_in, d_in] (full) or [K, d_in] (diag)}`` float32 on the default device."""
    if kind not in GRAM_KINDS:
        raise ValueError(f"gram kind must be one of {GRAM_KINDS}, got {kind!r}")
    grams = {}
    for i, (path, (_, d_in)) in enumerate(shapes.items()):
        g = _layer_grams(d_in, n_clients, seed=seed, layer=i, full=kind == "full")
        grams[path] = jnp.asarray(g, jnp.float32)
        del g
    return grams


def make_client_lora(shapes: LayerShapes, n_clients: int, rank: int, factor: str, *, seed: int = 0) -> dict:
    """Client-stacked LoRA ``{path: {"A": [K, r, d_in], "B": [K, d_out, r]}}``: the trained factor differs per client
    (a shared start plus a client drift), the frozen one is identical across clients."""
    out = {}
    for i, (path, (d_out, d_in)) in enumerate(shapes.items()):
        rng = np.random.default_rng([seed, 1_000_003, rank, i])
        bound = 1.0 / np.sqrt(d_in)
        a0 = rng.uniform(-bound, bound, (rank, d_in))
        b0 = 0.02 * rng.standard_normal((d_out, rank))
        if factor == "A":
            a = a0 + 0.2 * bound * rng.standard_normal((n_clients, rank, d_in))
            b = np.broadcast_to(b0, (n_clients, d_out, rank))
        else:
            a = np.broadcast_to(a0, (n_clients, rank, d_in))
            b = b0 + 0.005 * rng.standard_normal((n_clients, d_out, rank))
        out[path] = {"A": jnp.asarray(a, jnp.float32), "B": jnp.asarray(b, jnp.float32)}
    return out


# ----------------------------------------------------------------------------------------------------------------------
# The float64 per-layer reference loop.

def baseline_merge(client_lora: Mapping, grams: Mapping, factor: str) -> dict[str, np.ndarray]:
    """The reference's merge, per layer, float64 numpy, dense Grams, ``pinv(rcond=1e-15)``. Returns the merged
    trained factor per path (A [r, d_in] or B [d_out, r])."""
    out = {}
    for path, f in client_lora.items():
        g32 = grams[path]
        n_clients = g32.shape[0]
        dense = [np.diag(g32[k].astype(np.float64)) if g32.ndim == 2 else g32[k].astype(np.float64)
                 for k in range(n_clients)]
        g_sum = sum(dense)
        if factor == "A":
            a = f["A"].astype(np.float64)
            e = sum(a[k] @ dense[k] for k in range(n_clients))
            out[path] = e @ np.linalg.pinv(g_sum, rcond=PINV_RCOND)
        else:
            a = f["A"][0].astype(np.float64)
            b = f["B"].astype(np.float64)
            e2 = sum((b[k] @ a) @ dense[k] for k in range(n_clients))
            out[path] = e2 @ a.T @ np.linalg.pinv(a @ g_sum @ a.T, rcond=PINV_RCOND)
        del dense, g_sum
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Diagnostics of our full-Gram solve (not timed): does the Cholesky fast path hold, or does eigh take over?

_health = jax.jit(merging.gram_health, static_argnames="dtype")


def _solve_diagnostics(client_lora: Mapping, grams: Mapping, factor: str, dtype) -> tuple[int | None, float | None]:
    """(layers whose summed system falls back to eigh, smallest pivot²) for full Grams; (None, None) for diagonal."""
    if any(g.ndim == 2 for g in grams.values()):
        return None, None
    hp = jax.lax.Precision.HIGHEST
    health = []
    for path, f in client_lora.items():
        g = grams[path].astype(dtype)
        if factor == "A":
            system = merging.client_sum(g)
        else:
            a = f["A"][0].astype(dtype)
            system = jnp.einsum("rd,kde,se->rs", a, g, a, precision=hp)
        health.append(_health(system, dtype=jnp.dtype(dtype)))
    return sum(int(h["pinv"]) for h in health), min(float(h["min_pivot"]) for h in health)


# ----------------------------------------------------------------------------------------------------------------------
# Timing.

class CallTimeout(RuntimeError):
    """One call of our jitted merge did not return within the watchdog's limit."""


def _with_timeout(fn: Callable[[], object], timeout_s: float | None) -> Callable[[], object]:
    """``fn`` run in a daemon thread and waited for at most ``timeout_s``: a call that never returns (a hung XLA
    computation) raises :class:`CallTimeout` here instead of blocking the benchmark forever. The stuck thread is
    abandoned (it keeps its arguments alive)."""
    if timeout_s is None:
        return fn

    def wrapped():
        box = {}

        def target():
            try:
                box["out"] = fn()
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                box["exc"] = exc

        worker = threading.Thread(target=target, daemon=True, name="bench_merge-call")
        worker.start()
        worker.join(timeout_s)
        if worker.is_alive():
            raise CallTimeout(f"call did not return within {timeout_s:.0f} s")
        if "exc" in box:
            raise box["exc"]
        return box["out"]

    return wrapped


def _rel_err(ours: Mapping, base: Mapping, factor: str) -> float:
    worst = 0.0
    for path, ref in base.items():
        got = np.asarray(ours[path][factor], np.float64)
        if not np.all(np.isfinite(got)):
            return float("inf")
        denom = np.linalg.norm(ref)
        err = np.linalg.norm(got - ref) / (denom if denom > 0 else 1.0)
        worst = max(worst, float(err))
    return worst


def _skipped_row(model, factor, kind, r, n_clients, n_layers, dtype, hung_config: str) -> dict:
    row = {k: None for k in ROW_KEYS}
    row.update(model=model, factor=factor, gram=kind, r=r, K=n_clients, layers=n_layers, dtype=jnp.dtype(dtype).name,
               ours_runs=0, baseline_runs=0, status=f"skipped: the XLA runtime hung earlier ({hung_config})")
    return row


def _resolve_models(models) -> dict[str, dict[str, tuple[int, int]]]:
    if isinstance(models, Mapping):
        return {str(name): dict(shapes) for name, shapes in models.items()}
    out = {}
    for name in models:
        if name not in MODELS:
            raise ValueError(f"unknown model {name!r}; known: {sorted(MODELS)} "
                             "(or pass {name: {path: (d_out, d_in)}})")
        out[name] = MODELS[name]
    return out


def run_benchmark(models: Iterable[str] | Mapping[str, LayerShapes] = ("vit_s14", "vit_b16"),
                  factors: Iterable[str] = FACTORS, grams: Iterable[str] = GRAM_KINDS,
                  ranks: Iterable[int] = RANKS, n_clients: int = N_CLIENTS, *, repeats: int = 3,
                  baseline_budget_s: float | None = 240.0, call_timeout_s: float | None = 900.0, x64: bool = False,
                  seed: int = 0, log: Callable[[str], None] | None = print) -> list[dict]:
    """Time ours vs the float64 baseline for every (model, gram kind, factor, rank); one dict per config.

    models: names from :data:`MODELS` or ``{name: {path: (d_out, d_in)}}`` for custom layer sets (tests). One model's
    Grams are alive at a time, and they are freed before the next model / gram kind. A call of ours that does not
    return within ``call_timeout_s`` gives a row with ``status="hang: ..."`` and no timings for ours (the baseline is
    still measured) and the benchmark goes on with the next config.
    """
    repeats = max(3, int(repeats))
    log = log or (lambda s: None)
    factors, gram_kinds, ranks = tuple(factors), tuple(grams), tuple(int(r) for r in ranks)
    for f in factors:
        if f not in FACTORS:
            raise ValueError(f"factor must be in {FACTORS}, got {f!r}")
    models = _resolve_models(models)
    x64_before = bool(jax.config.jax_enable_x64)
    if x64:
        jax.config.update("jax_enable_x64", True)
    dtype = jnp.float64 if x64 else jnp.float32
    rows = []
    hung = None  # after one hung call the XLA runtime of this process is stuck too: later configs are skipped
    try:
        for model, shapes in models.items():
            for kind in gram_kinds:
                t_gen, _, gram_tree = common.timed(lambda: make_grams(shapes, n_clients, kind, seed=seed))
                gram_np = {p: np.asarray(g) for p, g in gram_tree.items()}  # zero-copy host views on CPU
                log(f"[{model} {kind}] generated {len(shapes)} layers x {n_clients} client Grams in {t_gen:.1f} s")
                for factor in factors:
                    merge = jax.jit(lambda cl, g, _f=factor: merging.merge_lora_tree(cl, g, _f, dtype=dtype))
                    for r in ranks:
                        if hung is not None:
                            rows.append(_skipped_row(model, factor, kind, r, n_clients, len(shapes), dtype, hung))
                            log(format_row(rows[-1]))
                            continue
                        lora = make_client_lora(shapes, n_clients, r, factor, seed=seed)
                        lora_np = {p: {k: np.asarray(v) for k, v in f.items()} for p, f in lora.items()}
                        compile_s, _, compiled = common.timed(lambda: merge.lower(lora, gram_tree).compile())
                        call = _with_timeout(lambda: jax.block_until_ready(compiled(lora, gram_tree)), call_timeout_s)
                        status, first_s, ours_t, ours = "ok", None, [], None
                        try:
                            first_s = common.timed(call).seconds
                            ours_t = common.repeat(call, repeats)
                            ours = ours_t[-1].out
                        except CallTimeout as exc:
                            status = f"hang: run {len(ours_t) + (first_s is not None) + 1} of ours: {exc}"
                            hung = f"{model} {factor} {kind} r={r}"
                        base_t = common.repeat(lambda: baseline_merge(lora_np, gram_np, factor), repeats,
                                               budget_s=baseline_budget_s)
                        base = base_t[-1].out
                        fallbacks, pivot = _solve_diagnostics(lora, gram_tree, factor, dtype)
                        ok = status == "ok"
                        row = dict(model=model, factor=factor, gram=kind, r=r, K=n_clients, layers=len(shapes),
                                   dtype=jnp.dtype(dtype).name, compile_s=compile_s, first_call_s=first_s,
                                   ours_ms=1e3 * common.median(ours_t) if ok else None, ours_runs=len(ours_t),
                                   baseline_ms=1e3 * common.median(base_t), baseline_runs=len(base_t),
                                   rel_err=_rel_err(ours, base, factor) if ok else None, fallback_layers=fallbacks,
                                   min_pivot=pivot, status=status)
                        row["speedup"] = row["baseline_ms"] / row["ours_ms"] if ok else None
                        rows.append(row)
                        log(format_row(row))
                        lora = lora_np = compiled = ours = base = None  # freed before the next config
                        gc.collect()
                    merge = None
                gram_tree = gram_np = None
                gc.collect()
    finally:
        if x64 and not x64_before:
            jax.config.update("jax_enable_x64", False)
    return rows


# ----------------------------------------------------------------------------------------------------------------------
# Merges under vmap: jit(vmap(merge_lora_A)) per stack of same-shape layers vs one merge_lora_tree call.

VMAP_SHAPES = common.vit_lora_shapes(6, 384, 1536)  # 24 layers: 18 with d_in = 384, 6 with d_in = 1536


def _stacked_tree_a(client_lora: Mapping, grams: Mapping) -> dict:
    """``merge_lora_tree(..., "A")`` with same-shape full-Gram layers stacked and vmapped (``map_layers`` default)
    instead of merged one by one: the alternative measured against it."""
    def fn(f, g):
        return {"A": merging.merge_lora_A(f["A"], g), "B": f["B"][0]}
    return merging.map_layers(fn, client_lora, grams, sequential=False)


def run_vmap_benchmark(shapes: LayerShapes = VMAP_SHAPES, n_clients: int = N_CLIENTS, rank: int = 8, *,
                       repeats: int = 3, seed: int = 0, log: Callable[[str], None] | None = print) -> dict:
    """Time ``jax.jit(jax.vmap(merging.merge_lora_A))`` on every stack of layers with the same ``d_in`` against one
    jitted ``merge_lora_tree(..., "A")`` call on the same layers (full Grams), and that tree merge with same-shape
    layers stacked and vmapped; ``repeats`` interleaved rounds, median per program. Returns the totals, per-stack
    rows, the ratio vmapped / tree and the largest difference of the merged factors relative to the layer's largest
    entry (vmapped and stacked vs tree)."""
    log = log or (lambda s: None)
    grams = make_grams(shapes, n_clients, "full", seed=seed)
    lora = make_client_lora(shapes, n_clients, rank, "A", seed=seed)
    by_d = {}
    for path, (_, d_in) in shapes.items():
        by_d.setdefault(d_in, []).append(path)
    stacks = {d: (jnp.stack([lora[p]["A"] for p in paths]), jnp.stack([grams[p] for p in paths]))
              for d, paths in by_d.items()}
    jax.block_until_ready((grams, lora, stacks))
    timed, median = common.timed, common.median
    tree_c = timed(lambda: jax.jit(lambda cl, g: merging.merge_lora_tree(cl, g, "A")).lower(lora, grams).compile())
    stacked_c = timed(lambda: jax.jit(_stacked_tree_a).lower(lora, grams).compile())
    vmapped = jax.jit(jax.vmap(merging.merge_lora_A))
    vm_c = {d: timed(lambda st=st: vmapped.lower(*st).compile()) for d, st in stacks.items()}
    programs = {"tree": (tree_c.out, (lora, grams)), "stacked": (stacked_c.out, (lora, grams)),
                **{d: (vm_c[d].out, stacks[d]) for d in stacks}}
    first = {name: timed(lambda c=c, args=args: c(*args)) for name, (c, args) in programs.items()}
    runs = {name: [] for name in programs}
    for _ in range(max(1, int(repeats))):  # interleaved: a slow phase of the machine hits every program alike
        for name, (c, args) in programs.items():
            runs[name].append(timed(lambda c=c, args=args: c(*args)))
    tree_out, stacked_out = first["tree"].out, first["stacked"].out
    worst = 0.0
    for d, paths in by_d.items():
        out = np.asarray(first[d].out, np.float64)
        for i, p in enumerate(paths):
            ref = np.asarray(tree_out[p]["A"], np.float64)
            scale = max(np.max(np.abs(ref)), 1e-30)
            worst = max(worst, float(np.max(np.abs(out[i] - ref)) / scale),
                        float(np.max(np.abs(np.asarray(stacked_out[p]["A"], np.float64) - ref)) / scale))
    groups = [{"d_in": d, "layers": len(paths), "compile_s": vm_c[d].seconds, "first_call_s": first[d].seconds,
               "ms": 1e3 * median(runs[d])} for d, paths in by_d.items()]
    vmap_ms, tree_ms = sum(g["ms"] for g in groups), 1e3 * median(runs["tree"])
    result = {"layers": len(shapes), "K": n_clients, "r": rank, "repeats": len(runs["tree"]), "groups": groups,
              "vmap_ms": vmap_ms, "tree_ms": tree_ms, "tree_compile_s": tree_c.seconds,
              "tree_first_call_s": first["tree"].seconds, "stacked_tree_ms": 1e3 * median(runs["stacked"]),
              "stacked_tree_compile_s": stacked_c.seconds, "stacked_tree_first_call_s": first["stacked"].seconds,
              "ratio": vmap_ms / tree_ms, "within_2x": vmap_ms <= 2 * tree_ms, "max_rel_diff": worst}
    log(format_vmap(result))
    return result


def format_vmap(result: Mapping) -> str:
    lines = ["| program | layers | compile s | first call s | ms (median) |", "|---|---:|---:|---:|---:|"]
    for g in result["groups"]:
        lines.append(f"| jit(vmap(merge_lora_A)), d_in = {g['d_in']} | {g['layers']} | {g['compile_s']:.2f} | "
                     f"{g['first_call_s']:.2f} | {g['ms']:.1f} |")
    lines.append(f"| **sum of the vmapped stacks** | {result['layers']} | | | **{result['vmap_ms']:.1f}** |")
    lines.append(f"| jit(merge_lora_tree) | {result['layers']} | {result['tree_compile_s']:.2f} | "
                 f"{result['tree_first_call_s']:.2f} | **{result['tree_ms']:.1f}** |")
    lines.append(f"| jit(merge_lora_tree), same-shape layers stacked + vmapped | {result['layers']} | "
                 f"{result['stacked_tree_compile_s']:.2f} | {result['stacked_tree_first_call_s']:.2f} | "
                 f"{result['stacked_tree_ms']:.1f} |")
    lines.append(f"\nvmapped / tree = {result['ratio']:.2f} (target <= 2: "
                 f"{'met' if result['within_2x'] else 'NOT met'}); "
                 f"max |other - tree| / max |tree| = {result['max_rel_diff']:.1e}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------------
# Reporting.

_HEADER = ("model", "factor", "gram", "r", "K", "layers", "compile s", "ours ms", "baseline ms", "speed-up",
           "rel. err", "eigh fallback", "min pivot²", "base runs")


def _cells(row: Mapping) -> list[str]:
    fb = "n/a" if row["fallback_layers"] is None else f"{row['fallback_layers']}/{row['layers']}"
    ok = row.get("status", "ok") == "ok"
    fmt = common.fmt
    return [MODEL_LABELS.get(row["model"], row["model"]), row["factor"], row["gram"], str(row["r"]), str(row["K"]),
            str(row["layers"]), fmt(row["compile_s"], ".2f", "-"),
            fmt(row["ours_ms"], ".1f", "HANG" if row["status"].startswith("hang") else "skipped"),
            fmt(row["baseline_ms"], ".1f", "-"), fmt(row["speedup"], ".1f", "n/a") + ("x" if ok else ""),
            fmt(row["rel_err"], ".1e", "n/a"), fb, fmt(row["min_pivot"], ".1e", "n/a"), str(row["baseline_runs"])]


def format_row(row: Mapping) -> str:
    return "| " + " | ".join(_cells(row)) + " |"


def format_table(rows: Iterable[Mapping]) -> str:
    lines = ["| " + " | ".join(_HEADER) + " |", "|" + "|".join("---" for _ in _HEADER) + "|"]
    lines += [format_row(r) for r in rows]
    return "\n".join(lines)


def headline(rows: Iterable[Mapping]) -> dict | None:
    """The acceptance config: A-factor, ViT-S/14 shapes, full Grams, r = 8, K = 10 (target: >= 10x)."""
    for r in rows:
        if (r["model"], r["factor"], r["gram"], r["r"], r["K"]) == ("vit_s14", "A", "full", 8, 10):
            return {"ours_ms": r["ours_ms"], "baseline_ms": r["baseline_ms"], "speedup": r["speedup"],
                    "rel_err": r["rel_err"], "target": 10.0, "met": r["speedup"] is not None and r["speedup"] >= 10.0,
                    "status": r["status"]}
    return None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lorm-jax bench-merge", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="CI subset: ViT-S/14, r=8, A-factor, full + diagonal Grams")
    p.add_argument("--json", metavar="OUT", help="also write the rows and metadata as JSON")
    p.add_argument("--x64", action="store_true", help="our merge in float64 (enables jax_enable_x64)")
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), help="default: vit_s14 vit_b16")
    p.add_argument("--factors", nargs="+", choices=FACTORS)
    p.add_argument("--grams", nargs="+", choices=GRAM_KINDS)
    p.add_argument("--ranks", nargs="+", type=int)
    p.add_argument("--clients", type=int, default=N_CLIENTS)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per config (>= 3)")
    p.add_argument("--baseline-budget", type=float, default=240.0,
                   help="seconds of baseline runs per config before stopping early (at least one run; <= 0: none)")
    p.add_argument("--call-timeout", type=float, default=900.0,
                   help="seconds one call of our merge may take before it is declared hung (<= 0: wait forever)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vmap", action="store_true",
                   help="only the 'merges under vmap' section: jit(vmap(merge_lora_A)) per layer stack vs "
                        "merge_lora_tree")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        defaults = dict(models=["vit_s14"], factors=["A"], grams=list(GRAM_KINDS), ranks=[8])
    else:
        defaults = dict(models=["vit_s14", "vit_b16"], factors=list(FACTORS), grams=list(GRAM_KINDS), ranks=list(RANKS))
    cfg = {k: getattr(args, k) or v for k, v in defaults.items()}
    started = datetime.datetime.now().astimezone()
    command = " ".join(["lorm-jax bench-merge", *(sys.argv[1:] if argv is None else argv)])
    info = common.machine_info()
    print(f"# bench-merge {started.isoformat(timespec='seconds')} | {command}")
    print(f"# {info['processor']}, {info['cpu_count']} cores, jax {info['jax']}, numpy {info['numpy']}, "
          f"OPENBLAS_CORETYPE={info['OPENBLAS_CORETYPE']}")
    if args.vmap:
        result = run_vmap_benchmark(VMAP_SHAPES, args.clients, repeats=args.repeats, seed=args.seed)
        elapsed = (datetime.datetime.now().astimezone() - started).total_seconds()
        print(f"# total {elapsed:.0f} s")
        if args.json:
            with open(args.json, "w") as fh:
                json.dump({"date": started.isoformat(timespec="seconds"), "command": command, "machine": info,
                           "total_s": elapsed, "vmap": result}, fh, indent=2)
        return 0
    budget = args.baseline_budget if args.baseline_budget > 0 else None
    rows = run_benchmark(cfg["models"], cfg["factors"], cfg["grams"], cfg["ranks"], args.clients, repeats=args.repeats,
                         baseline_budget_s=budget, call_timeout_s=args.call_timeout if args.call_timeout > 0 else None,
                         x64=args.x64, seed=args.seed)
    print()
    print(format_table(rows))
    head = headline(rows)
    hung = [r for r in rows if r["status"] != "ok"]
    for r in hung:
        print(f"# HANG {r['model']} factor {r['factor']} {r['gram']} r={r['r']}: {r['status']}")
    if head is not None and head["speedup"] is not None:
        print(f"\nHeadline (ViT-S/14 shapes, A-factor, full Grams, r=8, K=10, 48 layers): ours {head['ours_ms']:.1f} ms"
              f" vs float64 pinv loop {head['baseline_ms']:.1f} ms -> {head['speedup']:.1f}x "
              f"(target >= 10x: {'met' if head['met'] else 'NOT met'}), rel. err {head['rel_err']:.1e}")
    elapsed = (datetime.datetime.now().astimezone() - started).total_seconds()
    print(f"# total {elapsed:.0f} s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"date": started.isoformat(timespec="seconds"), "command": command, "machine": info,
                       "total_s": elapsed, "config": {**cfg, "clients": args.clients, "repeats": args.repeats,
                                                      "baseline_budget_s": budget, "x64": args.x64, "seed": args.seed},
                       "headline": head, "rows": rows}, fh, indent=2)
    if hung:  # a stuck XLA call can block interpreter shutdown: leave now that everything is written
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(3)
    return 0


if __name__ == "__main__":
    sys.exit(main())
