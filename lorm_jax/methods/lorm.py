"""LoRM: alternate the trained LoRA factor and merge it in closed form (LORM_SPEC §3–§8).

Per round (``factor`` = B, A, B, … from every task's start; with B = 0 at init, A's gradient would be 0)::

    A-round:  A = (Σ_k A_k G̃_k)(Σ_k G̃_k)^+                       B unchanged
    B-round:  B = (Σ_k B_k A G̃_k) Aᵀ (A (Σ_k G̃_k) Aᵀ)^+          A unchanged
    head:     W = (Σ_k W_k G̃_k^head)(Σ_k G̃_k^head)^+,  b = Σ_k n_k b_k / Σ_k n_k   (config.head_merge = regmean)

End of task t (cross-task RegMean of task deltas, k over tasks τ ≤ t, G_τ = Σ_clients G̃)::

    ΔW_eval = (Σ_τ B_τ A_τ G_τ)(Σ_τ G_τ)^+          (t = 0: B_0 A_0)
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from lorm_jax import merging
from lorm_jax.methods import base, common
from lorm_jax.methods.common import merge_head  # noqa: F401  (re-exported)


@dataclasses.dataclass(frozen=True)
class LoRM(base.PerClientMerge):
    """The LoRM strategy. ``factor``: "alt" (the paper: B, A, B, …), "A" or "B" (train only that factor)."""
    factor: str = "alt"
    merge_dtype: str = "float32"
    name: str = "lorm"
    head_merge: str = "regmean"
    task_grams = True  # merge_tasks needs every client's Grams of the merged task LoRA

    def __post_init__(self):
        if self.factor not in ("alt", "A", "B"):
            raise ValueError(f"LoRM.factor must be 'alt', 'A' or 'B', got {self.factor!r}")
        common.check_head_merge(self.head_merge)

    def train_factor(self, round_idx: int) -> str:
        """Which factor clients train in round ``round_idx`` of a task: B, A, B, … for "alt"."""
        if self.factor == "alt":
            return "B" if round_idx % 2 == 0 else "A"
        return self.factor

    def layer_sums(self, factors, grams, factor):
        """The normal equations of the trained factor's merge (:func:`lorm_jax.merging.lora_system`): A-round
        ``(Σ_k A_k G̃_k, Σ_k G̃_k)``, B-round ``(Σ_k B_k A G̃_k Aᵀ, Σ_k A G̃_k Aᵀ)``."""
        return merging.lora_system(factors, grams, factor, dtype=jnp.dtype(self.merge_dtype)) if factor else ()

    def client_sums(self, client_lora, client_heads, head_grams, weights, factor):
        return {"head": common.head_sums(client_heads, head_grams, weights, self.head_merge,
                                         jnp.dtype(self.merge_dtype))}

    def merge_sums(self, sums, factor, task_rows, server_lora, server_head):
        """Server merge after a round: the trained factor's systems solved, the head merged (module docstring).

        Head rows outside ``task_rows`` [C] (bool) are identical on every client, so the exact merge returns them
        unchanged; they are copied from ``server_head`` to avoid float32 round-off drift across rounds.
        """
        dtype = jnp.dtype(self.merge_dtype)
        lora = common.lora_from_sums(sums, factor, server_lora, dtype)
        return lora, common.head_from_sums(sums, task_rows, server_head, dtype, self.head_merge)

    def uploads(self, factor: str) -> tuple[str, ...]:
        return common.uploads(factor, True, self.head_merge)

    def downloads(self, round_idx: int, last: int | None = None) -> tuple[str, ...]:
        return common.downloads(self, round_idx, last)

    def merge_tasks(self, past_b, past_a, task_grams, num_tasks: int):
        """Dense evaluation deltas ``{path: [d_out, d_in]}`` from the first ``num_tasks`` finished tasks.

        past_b {path: [T, d_out, r]}, past_a {path: [T, r, d_in]}, task_grams {path: [T, d_in(, d_in)]}.
        """
        return common.regmean_task_deltas(past_b, past_a, task_grams, num_tasks, jnp.dtype(self.merge_dtype))
