"""Centralized LoRA: one client holds all the data of each task (the upper bound of the federated protocol).

Same backbone, LoRA layers, rank, epochs, rounds, optimizer and head as the federated methods; only the federation is
removed. The engine runs it with ``num_clients = 1`` and the task's whole training set on that client
(:meth:`Centralized.configure`), both factors train every round (plain LoRA, no factor constraint), the "merge" of one
client is that client's parameters, and tasks are merged with the same cross-task RegMean as LoRM (LORM_SPEC §8),
so ``lorm`` vs ``centralized`` isolates what federation costs. Nothing is communicated.
"""
from __future__ import annotations

import copy
import dataclasses

import jax.numpy as jnp

from lorm_jax.methods import common


@dataclasses.dataclass(frozen=True)
class Centralized:
    merge_dtype: str = "float32"
    name: str = "centralized"
    task_grams = False  # the Grams never leave the (single) machine

    @staticmethod
    def configure(config):
        """A copy of ``config`` with every task's data pooled on one client (iid partition of 1)."""
        config = copy.deepcopy(config)
        config.num_clients = 1
        config.data.partition = "iid"
        config.client_lanes = 0
        return config

    def train_factor(self, round_idx: int) -> str:
        return "AB"

    def merge_round(self, client_lora, grams, client_heads, head_grams, num_samples, factor, task_rows, server_head):
        """The single client's LoRA and head (rows of other tasks kept from the server: they never train)."""
        if next(iter(client_lora.values()))["A"].shape[0] != 1:
            raise ValueError("method 'centralized' needs exactly one client (build the setup with methods."
                             "effective_config)")
        lora = {p: {k: x[0] for k, x in f.items()} for p, f in client_lora.items()}
        head = {"w": jnp.where(task_rows[:, None], client_heads["w"][0], server_head["w"]),
                "b": jnp.where(task_rows, client_heads["b"][0], server_head["b"])}
        return lora, head

    def uploads(self, factor: str) -> tuple[str, ...]:
        return ()

    def downloads(self, round_idx: int) -> tuple[str, ...]:
        return ()

    def merge_tasks(self, past_b, past_a, task_grams, num_tasks: int):
        return common.regmean_task_deltas(past_b, past_a, task_grams, num_tasks, jnp.dtype(self.merge_dtype))
