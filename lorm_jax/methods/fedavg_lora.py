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

from lorm_jax.methods import common


@dataclasses.dataclass(frozen=True)
class FedAvgLoRA:
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

    def merge_round(self, client_lora, grams, client_heads, head_grams, num_samples, factor, task_rows, server_head):
        """FedAvg of the trained factor(s) over clients ([K, ...] inputs, ``num_samples`` [K]); Grams unused."""
        lora = common.fedavg_lora(client_lora, num_samples, factor)
        return lora, common.merge_head(client_heads, head_grams, num_samples, task_rows, server_head,
                                       jnp.dtype(self.merge_dtype), self.head_merge)

    def uploads(self, factor: str) -> tuple[str, ...]:
        return common.uploads(factor, False, self.head_merge)

    def downloads(self, round_idx: int) -> tuple[str, ...]:
        return common.downloads(self, round_idx)

    def merge_tasks(self, past_b, past_a, task_grams, num_tasks: int):
        """``{path: mean_τ B_τ A_τ}`` over the first ``num_tasks`` tasks (task Grams unused)."""
        return common.mean_task_deltas(past_b, past_a, num_tasks)
