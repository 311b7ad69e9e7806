"""LoRM: alternate the trained LoRA factor and merge it in closed form (LORM_SPEC §3–§8).

Per round (``factor`` = B, A, B, … from every task's start; with B = 0 at init, A's gradient would be 0)::

    A-round:  A = (Σ_k A_k G̃_k)(Σ_k G̃_k)^+                       B unchanged
    B-round:  B = (Σ_k B_k A G̃_k) Aᵀ (A (Σ_k G̃_k) Aᵀ)^+          A unchanged
    head:     W = (Σ_k W_k G̃_k^head)(Σ_k G̃_k^head)^+,  b = Σ_k n_k b_k / Σ_k n_k

End of task t (cross-task RegMean of task deltas, k over tasks τ ≤ t, G_τ = Σ_clients G̃)::

    ΔW_eval = (Σ_τ B_τ A_τ G_τ)(Σ_τ G_τ)^+          (t = 0: B_0 A_0)
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lorm_jax import merging


def merge_head(client_heads, head_grams, num_samples, task_rows, server_head, dtype=jnp.float32):
    """RegMean of the head weight over clients, sample-weighted mean of its bias; rows outside ``task_rows`` kept."""
    w = merging.regmean(client_heads["w"], head_grams, dtype=dtype)
    b = merging.fedavg(client_heads["b"], num_samples)
    return {"w": jnp.where(task_rows[:, None], w, server_head["w"]), "b": jnp.where(task_rows, b, server_head["b"])}


@dataclasses.dataclass(frozen=True)
class LoRM:
    """The LoRM strategy. ``train_matrix``: "alt" (paper), "A" or "B" (train only that factor)."""
    train_matrix: str = "alt"
    merge_dtype: str = "float32"
    name: str = "lorm"

    def __post_init__(self):
        if self.train_matrix not in ("alt", "A", "B"):
            raise ValueError(f"method.train_matrix must be 'alt', 'A' or 'B', got {self.train_matrix!r}")

    def train_factor(self, round_idx: int) -> str:
        """Which factor clients train in round ``round_idx`` of a task: B, A, B, … for "alt"."""
        if self.train_matrix == "alt":
            return "B" if round_idx % 2 == 0 else "A"
        return self.train_matrix

    def merge_round(self, client_lora, grams, client_heads, head_grams, num_samples, factor, task_rows, server_head):
        """Server merge after a round. Client-stacked inputs have a leading K axis; ``num_samples`` [K] weights the bias
        (a client with 0 samples has zero Grams and weight, so it drops out of every merge).

        Head rows outside ``task_rows`` [C] (bool) are identical on every client, so the exact merge returns them
        unchanged; they are copied from ``server_head`` to avoid float32 round-off drift across rounds.
        """
        dtype = jnp.dtype(self.merge_dtype)
        lora = merging.merge_lora_tree(client_lora, grams, factor, dtype=dtype)
        return lora, merge_head(client_heads, head_grams, num_samples, task_rows, server_head, dtype)

    def merge_tasks(self, past_b, past_a, task_grams, num_tasks: int):
        """Dense evaluation deltas ``{path: [d_out, d_in]}`` from the first ``num_tasks`` finished tasks.

        past_b {path: [T, d_out, r]}, past_a {path: [T, r, d_in]}, task_grams {path: [T, d_in(, d_in)]}.
        """
        dtype = jnp.dtype(self.merge_dtype)
        if num_tasks == 1:  # the reference keeps W0 + B_0 A_0 (equal to the merge when G_0 has full rank)
            return {p: jnp.matmul(past_b[p][0], past_a[p][0], precision=jax.lax.Precision.HIGHEST) for p in past_b}
        layers = {p: {"b": past_b[p][:num_tasks], "a": past_a[p][:num_tasks]} for p in past_b}
        grams = {p: task_grams[p][:num_tasks] for p in past_b}
        return merging.map_layers(lambda f, g: merging.regmean_lowrank(f["b"], f["a"], g, dtype=dtype), layers, grams,
                                  sequential=any(g.ndim == 3 for g in grams.values()))
