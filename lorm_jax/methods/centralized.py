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

from lorm_jax import merging
from lorm_jax.methods import base, common


@dataclasses.dataclass(frozen=True)
class Centralized(base.PerClientMerge):
    merge_dtype: str = "float32"
    name: str = "centralized"
    task_grams = False  # the Grams never leave the (single) machine

    @staticmethod
    def configure(config):
        """A copy of ``config`` with every task's data pooled on one client (iid partition of 1)."""
        config = copy.deepcopy(config)
        config.num_clients = 1
        config.clients_per_round = 0
        config.clients_per_wave = 0
        config.data.partition = "iid"
        config.client_lanes = 0
        return config

    def train_factor(self, round_idx: int) -> str:
        return "AB"

    def layer_sums(self, factors, grams, factor):
        return ()

    def client_sums(self, client_lora, client_heads, head_grams, weights, factor):
        """The single client's parameters (its weight is n / n = 1, so the sums are its values)."""
        if client_heads["w"].shape[0] != 1:
            raise ValueError("method 'centralized' needs exactly one client (build the setup with methods."
                             "effective_config)")
        return {"lora": common.fedavg_sums(client_lora, weights, "AB"),
                "head": {k: merging.weighted_sum(x, weights) for k, x in client_heads.items()}}

    def merge_sums(self, sums, factor, task_rows, server_lora, server_head):
        """The single client's LoRA and head (rows of other tasks kept from the server: they never train)."""
        head = sums["clients"]["merge"]["head"]
        return common.fedavg_from_sums(sums, "AB", server_lora), {
            "w": jnp.where(task_rows[:, None], head["w"], server_head["w"]),
            "b": jnp.where(task_rows, head["b"], server_head["b"])}

    def uploads(self, factor: str) -> tuple[str, ...]:
        return ()

    def downloads(self, round_idx: int, last: int | None = None) -> tuple[str, ...]:
        return ()

    def merge_tasks(self, past_b, past_a, task_grams, num_tasks: int):
        return common.regmean_task_deltas(past_b, past_a, task_grams, num_tasks, jnp.dtype(self.merge_dtype))
