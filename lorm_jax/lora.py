"""LoRA factors as a plain pytree.

A model's LoRA state is a flat dict keyed by layer path (``"block_3/mlp/fc1"``), each entry holding the two factors in
the paper's layout::

    {path: {"A": [r, d_in], "B": [d_out, r]}}        ΔW = B @ A   (no α/r scaling, as the reference)

A linear layer ``y = W x`` with ``W ∈ R^{d_out×d_in}`` becomes ``y = (W + B A) x``. Client-stacked LoRA (what ``vmap``
sees) has a leading client axis on every leaf: ``A: [K, r, d_in]``, ``B: [K, d_out, r]``.

Which factor trains in a round ("A", "B", "AB", or "" for none) enters a jitted step as traced 0/1 scalars, so
switching the factor never retraces it: :func:`factor_mask` turns them into a 0/1 pytree that multiplies
gradients and updates.
"""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

LoRA = dict[str, dict[str, jax.Array]]
LayerShapes = Mapping[str, tuple[int, int]]  # path -> (d_out, d_in)
FACTORS = ("A", "B")


def init(key: jax.Array, shapes: LayerShapes, rank: int, dtype=jnp.float32) -> LoRA:
    """Fresh LoRA: ``B = 0`` and ``A ~ U(-1/√d_in, +1/√d_in)`` (PyTorch's kaiming_uniform(a=√5) for nn.Linear).

    Each layer draws from ``fold_in(key, i)`` with ``i`` its index in sorted path order, so the draw of a layer does not
    depend on which other layers exist before it in dict order.
    """
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    out = {}
    for i, path in enumerate(sorted(shapes)):
        d_out, d_in = shapes[path]
        if rank > min(d_out, d_in):
            raise ValueError(f"LoRA rank {rank} exceeds the width of layer {path!r} (d_out={d_out}, d_in={d_in})")
        bound = 1.0 / np.sqrt(d_in)
        a = jax.random.uniform(jax.random.fold_in(key, i), (rank, d_in), dtype, -bound, bound)
        out[path] = {"A": a, "B": jnp.zeros((d_out, rank), dtype)}
    return out


def delta(lora: LoRA) -> dict[str, jax.Array]:
    """Dense weight updates ``{path: B @ A}`` of shape ``[..., d_out, d_in]`` (leading axes broadcast)."""
    return {p: jnp.matmul(f["B"], f["A"], precision=jax.lax.Precision.HIGHEST) for p, f in lora.items()}


def shapes(lora: LoRA) -> dict[str, tuple[int, int]]:
    """``{path: (d_out, d_in)}`` of an unstacked LoRA pytree."""
    return {p: (f["B"].shape[-2], f["A"].shape[-1]) for p, f in lora.items()}


def rank(lora: LoRA) -> int:
    """The (common) rank r of the factors."""
    ranks = {f["A"].shape[-2] for f in lora.values()}
    if len(ranks) != 1:
        raise ValueError(f"LoRA layers have different ranks: {sorted(ranks)}")
    return ranks.pop()


def factor_mask(lora: LoRA, train_a, train_b=None) -> LoRA:
    """0/1 pytree (same structure and shapes as ``lora``) that is 1 on the factor(s) that train.

    ``train_a`` / ``train_b`` may be Python bools or traced scalars (``train_b`` defaults to ``1 - train_a``):
    ``mask["A"] = train_a``, ``mask["B"] = train_b``. Multiplying gradients and optimizer updates by it freezes the
    other factor without retracing when the trained factor changes.
    """
    on_a = jnp.asarray(train_a, jnp.float32)
    on_b = 1.0 - on_a if train_b is None else jnp.asarray(train_b, jnp.float32)

    def mask(key_path, x):  # the factor is the last key: {path: {"A", "B"}} or a block-stacked nesting of them
        on = on_a if key_path[-1].key == "A" else on_b
        return jnp.broadcast_to(on, x.shape).astype(x.dtype)
    return jax.tree_util.tree_map_with_path(mask, lora)


def select_factor(lora: LoRA, factor: str) -> dict[str, jax.Array]:
    """``{path: lora[path][factor]}``: the part of the LoRA that a round training ``factor`` exchanges."""
    if factor not in FACTORS:
        raise ValueError(f"factor must be one of {FACTORS}, got {factor!r}")
    return {p: f[factor] for p, f in lora.items()}


def num_params(lora: LoRA, factor: str | None = None) -> int:
    """Number of scalars in one factor (``"A"``/``"B"``) or in both (``None``) of an unstacked LoRA."""
    factors = FACTORS if factor is None else (factor,)
    return int(sum(np.prod(f[name].shape) for f in lora.values() for name in factors))


def num_bytes(lora: LoRA, factor: str | None = None) -> int:
    """Bytes of one factor or of both, at the leaves' dtype (what a client would send for it)."""
    factors = FACTORS if factor is None else (factor,)
    return int(sum(f[name].size * f[name].dtype.itemsize for f in lora.values() for name in factors))
