"""RegMean-LoRA: RegMean on the product ``ΔW_k = B_k A_k`` each round, an upper reference without LoRM's factor
constraint (both factors train every round, as in plain LoRA).

Round merge, per layer (G = Σ_k G̃_k)::

    ΔW* = (Σ_k B_k A_k G̃_k) G^+                                 the ideal RegMean of the clients' deltas  [d_out, d_in]
    B A = argmin_{rank ≤ r} Σ_k ‖X_k (B A − B_k A_k)ᵀ‖²       = [ΔW* G^{1/2}]_r G^{+1/2}

**Carry-over (decision).** The dense ΔW* has rank up to K·r, but the next round trains rank-r factors, so the server
keeps the best rank-r approximation of ΔW* *in the RegMean objective itself*: since
``Σ_k ‖(W − W_k) G_k^{1/2}‖² = ‖(W − ΔW*) G^{1/2}‖² + const``, Eckart–Young on ``M = ΔW* G^{1/2} = E G^{+1/2}``
gives the minimiser over all rank-r products (the joint LoRM objective that LoRM's alternation solves one factor at a
time). It is stored as ``A`` with orthonormal rows and ``B = ΔW_r Aᵀ``, so A is never zero and both factors keep
training. The per-round diagnostics report how much this truncation gives up against the dense ΔW*.

End of task: cross-task RegMean of the task deltas with the task Grams, as LoRM (LORM_SPEC §8).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lorm_jax import merging
from lorm_jax.methods import base, common

HIGHEST = jax.lax.Precision.HIGHEST


def _inv_sqrt(gram: jax.Array):
    """``G^{+1/2}`` of a summed Gram: a vector for diagonal [d] (applied column-wise), a matrix for full [d, d]."""
    if gram.ndim == 1:
        live = gram > 0
        return jnp.where(live, jax.lax.rsqrt(jnp.where(live, gram, 1)), 0)
    w, v = jnp.linalg.eigh(gram)
    cut = merging.PINV_RCOND[gram.dtype] * jnp.max(jnp.abs(w))
    inv = jnp.where(w > cut, jax.lax.rsqrt(jnp.where(w > cut, w, 1)), 0)
    return jnp.matmul(v * inv, v.T, precision=HIGHEST)


def regmean_rank_r(b: jax.Array, a: jax.Array, grams: jax.Array, rank: int, *, dtype=None):
    """The rank-``rank`` minimiser of ``Σ_k ‖X_k (B A − B_k A_k)ᵀ‖²`` as factors ``(B [d_out, r], A [r, d_in])``.

    b [K, d_out, r_k], a [K, r_k, d_in], grams [K, d_in(, d_in)]. ``A`` has orthonormal rows (QR of the right factor),
    ``B A`` equals ``[E G^{+1/2}]_r G^{+1/2}`` with ``E = Σ_k B_k A_k G_k``, ``G = Σ_k G_k``.
    """
    return rank_r_from_system(*merging.regmean_lowrank_system(b, a, grams, dtype=dtype), rank, dtype=dtype)


def rank_r_from_system(e: jax.Array, gram: jax.Array, rank: int, *, dtype=None):
    """:func:`regmean_rank_r` from the sums ``E = Σ_k B_k A_k G_k`` [d_out, d_in] and ``G = Σ_k G_k``."""
    dtype = jnp.dtype(dtype or jnp.float32)
    e, gram = e.astype(dtype), gram.astype(dtype)
    root = _inv_sqrt(gram)
    mul = (lambda x: x * root) if root.ndim == 1 else (lambda x: jnp.matmul(x, root, precision=HIGHEST))
    u, s, vt = jnp.linalg.svd(mul(e), full_matrices=False)
    left, right = u[:, :rank] * s[:rank], mul(vt[:rank])  # ΔW_r = left @ right
    q, r = jnp.linalg.qr(right.T)                         # rightᵀ = Q R  →  ΔW_r = (left Rᵀ) Qᵀ
    return jnp.matmul(left, r.T, precision=HIGHEST).astype(jnp.float32), q.T.astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class RegMeanLoRA(base.PerClientMerge):
    merge_dtype: str = "float32"
    name: str = "regmean_lora"
    head_merge: str = "regmean"
    task_grams = True

    def __post_init__(self):
        common.check_head_merge(self.head_merge)

    def train_factor(self, round_idx: int) -> str:
        return "AB"

    def layer_sums(self, factors, grams, factor):
        """``(Σ_k B_k A_k G̃_k, Σ_k G̃_k)`` (:func:`lorm_jax.merging.regmean_lowrank_system`)."""
        return merging.regmean_lowrank_system(factors["B"], factors["A"], grams, dtype=jnp.dtype(self.merge_dtype))

    def client_sums(self, client_lora, client_heads, head_grams, weights, factor):
        return {"head": common.head_sums(client_heads, head_grams, weights, self.head_merge,
                                         jnp.dtype(self.merge_dtype))}

    def merge_sums(self, sums, factor, task_rows, server_lora, server_head):
        """Rank-r RegMean of every layer's product (module docstring); head as configured."""
        dtype = jnp.dtype(self.merge_dtype)
        rank = next(iter(server_lora.values()))["A"].shape[0]

        def layer(system):
            new_b, new_a = rank_r_from_system(*system, rank, dtype=dtype)
            return {"A": new_a, "B": new_b}
        systems = {p: s["merge"] for p, s in sums["layers"].items()}
        lora = merging.map_layers(layer, systems, sequential=any(g.ndim == 2 for _, g in systems.values()))
        return lora, common.head_from_sums(sums, task_rows, server_head, dtype, self.head_merge)

    def uploads(self, factor: str) -> tuple[str, ...]:
        return common.uploads(factor, True, self.head_merge)

    def downloads(self, round_idx: int, last: int | None = None) -> tuple[str, ...]:
        return common.downloads(self, round_idx, last)

    def merge_tasks(self, past_b, past_a, task_grams, num_tasks: int):
        return common.regmean_task_deltas(past_b, past_a, task_grams, num_tasks, jnp.dtype(self.merge_dtype))
