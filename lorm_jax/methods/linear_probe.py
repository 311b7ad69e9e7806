"""Linear probe: the backbone stays frozen (no LoRA moves); only the head trains and is merged (RegMean or FedAvg).

The lower reference every LoRA method must beat under the same federated protocol.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from lorm_jax.methods import base, common


@dataclasses.dataclass(frozen=True)
class LinearProbe(base.PerClientMerge):
    merge_dtype: str = "float32"
    name: str = "linear_probe"
    head_merge: str = "regmean"
    task_grams = False

    def __post_init__(self):
        common.check_head_merge(self.head_merge)

    def train_factor(self, round_idx: int) -> str:
        return ""  # no LoRA factor trains

    def layer_sums(self, factors, grams, factor):
        return ()

    def client_sums(self, client_lora, client_heads, head_grams, weights, factor):
        return {"head": common.head_sums(client_heads, head_grams, weights, self.head_merge,
                                         jnp.dtype(self.merge_dtype))}

    def merge_sums(self, sums, factor, task_rows, server_lora, server_head):
        lora = {p: {k: x.astype(jnp.float32) for k, x in f.items()} for p, f in server_lora.items()}
        return lora, common.head_from_sums(sums, task_rows, server_head, jnp.dtype(self.merge_dtype),
                                           self.head_merge)

    def uploads(self, factor: str) -> tuple[str, ...]:
        return common.uploads("", False, self.head_merge)

    def downloads(self, round_idx: int, last: int | None = None) -> tuple[str, ...]:
        return ("head",)  # the LoRA is never used: B = 0

    def merge_tasks(self, past_b, past_a, task_grams, num_tasks: int):
        return {}  # the evaluation model is the pretrained backbone itself
