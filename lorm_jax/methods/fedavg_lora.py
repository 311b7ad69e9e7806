"""FedAvg-LoRA and FFA-LoRA: LoRA on the same layers as LoRM, merged by sample-weighted averaging.

Per round (n_k = client k's samples of the task)::

    fedavg_lora:  A = Σ_k n_k A_k / Σ_k n_k,  B = Σ_k n_k B_k / Σ_k n_k      (both factors train every round)
    ffa_lora:     B = Σ_k n_k B_k / Σ_k n_k,  A frozen at its random init      (FFA-LoRA, Sun et al. 2024)
    head:         RegMean or FedAvg (config.head_merge), bias FedAvg

Averaging the factors separately is not averaging the products: ``mean(B_k) mean(A_k) ≠ mean(B_k A_k)``. With A
frozen and shared (FFA) the two agree, which is FFA-LoRA's point. No backbone Grams are uploaded.

End of task t: plain mean of the task deltas, as the reference's LoRA baseline (``cl_merge="individual_mean"``)::

    ΔW_eval = (1/(t+1)) Σ_{τ≤t} B_τ A_τ
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from lorm_jax.methods import base, common


@dataclasses.dataclass(frozen=True)
class FedAvgLoRA(base.PerClientMerge):
    """``factor``: "AB" (FedAvg-LoRA) or "B" (FFA-LoRA)."""
    factor: str = "AB"
    merge_dtype: str = "float32"
    name: str = "fedavg_lora"
    head_merge: str = "regmean"
    task_grams = False  # the cross-task mean needs no statistics

    def __post_init__(self):
        if self.factor not in ("AB", "B"):
            raise ValueError(f"FedAvgLoRA.factor must be 'AB' or 'B', got {self.factor!r}")
        common.check_head_merge(self.head_merge)

    def train_factor(self, round_idx: int) -> str:
        return self.factor

    def layer_sums(self, factors, grams, factor):
        return ()  # no Grams: plain averages

    def client_sums(self, client_lora, client_heads, head_grams, weights, factor):
        """``Σ_k (n_k / N) x_k`` of the trained factor(s) and the head's sums (weights [K] = n_k / N)."""
        return {"lora": common.fedavg_sums(client_lora, weights, factor),
                "head": common.head_sums(client_heads, head_grams, weights, self.head_merge,
                                         jnp.dtype(self.merge_dtype))}

    def merge_sums(self, sums, factor, task_rows, server_lora, server_head):
        """FedAvg of the trained factor(s) over clients; the head as configured."""
        return common.fedavg_from_sums(sums, factor, server_lora), common.head_from_sums(
            sums, task_rows, server_head, jnp.dtype(self.merge_dtype), self.head_merge)

    def uploads(self, factor: str) -> tuple[str, ...]:
        return common.uploads(factor, False, self.head_merge)

    def downloads(self, round_idx: int, last: int | None = None) -> tuple[str, ...]:
        return common.downloads(self, round_idx, last)

    def merge_tasks(self, past_b, past_a, task_grams, num_tasks: int):
        """``{path: mean_τ B_τ A_τ}`` over the first ``num_tasks`` tasks (task Grams unused)."""
        return common.mean_task_deltas(past_b, past_a, num_tasks)
