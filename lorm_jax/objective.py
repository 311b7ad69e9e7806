"""The client's local objective: a linear head on the backbone features, masked cross-entropy, AdamW.

Shapes: head ``{"w": [C, F], "b": [C]}`` (paper layout: ``logits = f Wᵀ + b``), features ``[B, F]``, labels ``[B]``,
``class_mask`` [C] (the classes of the current task), ``weights`` [B] (0 for padded examples).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

HIGHEST = jax.lax.Precision.HIGHEST


def head_logits(head: dict, features: jax.Array) -> jax.Array:
    """``f Wᵀ + b``: features [B, F] → logits [B, C]; a head per example (``w [B, C, F]``, ``b [B, C]``) too."""
    if head["w"].ndim == 3:
        return jnp.einsum("bf,bcf->bc", features, head["w"], precision=HIGHEST) + head["b"]
    return jnp.matmul(features, head["w"].T, precision=HIGHEST) + head["b"]


HEAD_INITS = ("trunc_2sigma", "reference")


def init_head(key: jax.Array, num_classes: int, feature_dim: int, kind: str = "trunc_2sigma") -> dict:
    """A fresh linear head ``{"w": [C, F], "b": [C]}``: ``W = 0.02·z``, ``b = 0``, with ``z`` drawn by ``kind``.

    * ``trunc_2sigma`` (default, kept so earlier results reproduce): ``z`` a standard normal truncated to ±2, so
      ``|W| ≤ 0.04`` and ``std(W) = 0.8796·0.02 ≈ 0.0176``. This is *not* timm's init.
    * ``reference``: what the reference gets from timm's ``trunc_normal_(std=0.02)``, whose cut ``a = -2, b = 2`` is
      in absolute units (timm/layers/weight_init.py), i.e. at ±100σ: ``z ~ N(0, 1)``. A float32 normal draw never
      reaches that cut (|z| < 5.5), so none is applied.
    """
    shape = (num_classes, feature_dim)
    if kind == "trunc_2sigma":
        z = jax.random.truncated_normal(key, -2.0, 2.0, shape, jnp.float32)
    elif kind == "reference":
        z = jax.random.normal(key, shape, jnp.float32)
    else:
        raise ValueError(f"head init {kind!r} is invalid: one of {list(HEAD_INITS)}")
    return {"w": 0.02 * z, "b": jnp.zeros((num_classes,), jnp.float32)}


def masked_cross_entropy(logits: jax.Array, labels: jax.Array, class_mask: jax.Array, weights: jax.Array,
                         segments: tuple[jax.Array, int] | None = None):
    """Mean CE over real examples with logits outside ``class_mask`` [C] removed (the reference slices them away).

    logits [B, C], labels [B], weights [B] (0 for padding). With ``segments = (ids [B], M)`` the batch holds M clients'
    steps: one mean per segment, ``[M]`` (``Σ_{n∈m} w_n ℓ_n / max(Σ_{n∈m} w_n, 1)``; 0 for an empty one). Masked-out
    classes get exactly zero probability and gradient, so head rows of other tasks never move.
    """
    logits = jnp.where(class_mask, logits, -jnp.inf)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1)[:, 0]
    nll = jnp.where(weights > 0, nll, 0.0)
    if segments is None:
        return jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1.0)
    ids, num = segments
    total = jax.ops.segment_sum(nll * weights, ids, num_segments=num)
    return total / jnp.maximum(jax.ops.segment_sum(weights, ids, num_segments=num), 1.0)


def make_optimizer(lr_factor, lr_head, weight_decay: float) -> optax.GradientTransformation:
    """AdamW with two parameter groups, built anew every round as the reference does: LoRA factor ``lr_factor``, head
    ``lr_head``.

    ``lr_factor`` may be traced (it depends on which factor trains), so building this inside a jitted function never
    retraces when the phase flips.
    """
    def labels(params):
        return {k: jax.tree.map(lambda _: k, v) for k, v in params.items()}

    return optax.multi_transform(
        {"lora": optax.adamw(lr_factor, b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay),
         "head": optax.adamw(lr_head, b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay)},
        labels)

