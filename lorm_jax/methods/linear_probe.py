"""Linear probe: the backbone stays frozen (no LoRA moves); only the head trains and is merged (RegMean or FedAvg).

The lower reference every LoRA method must beat under the same federated protocol.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from lorm_jax.methods import common
from lorm_jax.methods.common import merge_head


@dataclasses.dataclass(frozen=True)
class LinearProbe:
    merge_dtype: str = "float32"
    name: str = "linear_probe"
    head_merge: str = "regmean"
    task_grams = False

    def __post_init__(self):
        common.check_head_merge(self.head_merge)

    def train_factor(self, round_idx: int) -> str:
        return ""  # no LoRA factor trains

    def merge_round(self, client_lora, grams, client_heads, head_grams, num_samples, factor, task_rows, server_head):
        lora = {p: {"A": f["A"][0], "B": f["B"][0]} for p, f in client_lora.items()}
        return lora, merge_head(client_heads, head_grams, num_samples, task_rows, server_head,
                                jnp.dtype(self.merge_dtype), self.head_merge)

    def uploads(self, factor: str) -> tuple[str, ...]:
        return common.uploads("", False, self.head_merge)

    def downloads(self, round_idx: int) -> tuple[str, ...]:
        return ("head",)  # the LoRA is never used: B = 0

    def merge_tasks(self, past_b, past_a, task_grams, num_tasks: int):
        return {}  # the evaluation model is the pretrained backbone itself
