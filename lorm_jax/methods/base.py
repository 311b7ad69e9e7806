"""The method interface: what a federated method decides, as a typed protocol.

The engine (:mod:`lorm_jax.rounds`) owns local training, Gram statistics, evaluation and checkpoints; a method only
says which LoRA factor(s) clients train in a round, how the server merges what they send, how finished tasks are merged
into the evaluation model, and what crosses the network. Shapes (K clients, T task slots, C classes, F features)::

    client_lora   {path: {"A": [K, r, d_in], "B": [K, d_out, r]}}   the clients' LoRA after local training
    grams         {path: [K, d_in] or [K, d_in, d_in]}              each client's Gram of the layer inputs
    client_heads  {"w": [K, C, F], "b": [K, C]}, head_grams [K, F] or [K, F, F]
    num_samples   [K] float32 weights: a client's sample count, 0 for a client left out of the merge
    task_rows     [C] bool, the current task's head rows;  server_head {"w": [C, F], "b": [C]}
    past_b, past_a  {path: [T, d_out, r]}, {path: [T, r, d_in]};  task_grams {path: [T, d_in(, d_in)]}

A runnable example: FedAvg of both factors and of the head, tasks merged by the mean of their deltas ::

    >>> import dataclasses
    >>> from lorm_jax import methods
    >>> from lorm_jax.methods import common
    >>> @dataclasses.dataclass(frozen=True)
    ... class PlainFedAvg:
    ...     name: str = "plain_fedavg"
    ...     task_grams: bool = False
    ...     def train_factor(self, round_idx):
    ...         return "AB"
    ...     def merge_round(self, client_lora, grams, client_heads, head_grams, num_samples, factor, task_rows,
    ...                     server_head):
    ...         head = common.merge_head(client_heads, head_grams, num_samples, task_rows, server_head, how="fedavg")
    ...         return common.fedavg_lora(client_lora, num_samples, factor), head
    ...     def merge_tasks(self, past_b, past_a, task_grams, num_tasks):
    ...         return common.mean_task_deltas(past_b, past_a, num_tasks)
    ...     def uploads(self, factor):
    ...         return common.uploads(factor, backbone_grams=False, head_merge="fedavg")
    ...     def downloads(self, round_idx):
    ...         return common.downloads(self, round_idx)
    >>> isinstance(PlainFedAvg(), methods.Method)
    True
    >>> import jax.numpy as jnp
    >>> lora = {"fc": {"A": jnp.ones((2, 1, 3)), "B": jnp.stack([jnp.zeros((4, 1)), jnp.ones((4, 1))])}}
    >>> heads = {"w": jnp.ones((2, 2, 3)), "b": jnp.zeros((2, 2))}
    >>> merged, head = PlainFedAvg().merge_round(lora, None, heads, None, jnp.array([1.0, 3.0]), "AB",
    ...                                          jnp.array([True, False]), {"w": jnp.zeros((2, 3)), "b": jnp.zeros(2)})
    >>> merged["fc"]["B"][:, 0].tolist()      # (1 · 0 + 3 · 1) / 4
    [0.75, 0.75, 0.75, 0.75]
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Protocol, runtime_checkable

from lorm_jax import merging


@runtime_checkable
class Method(Protocol):
    """A federated method (see the module docstring for the shapes and a runnable example).

    Attributes:
      name: the name runs and tables use (``config.method``).
      task_grams: whether :meth:`merge_tasks` needs every task's Gram sums (then the clients upload the Grams of the
        merged task LoRA at the end of a task and the communication ledger counts them).
    """
    name: str
    task_grams: bool

    def train_factor(self, round_idx: int) -> str:
        """Which LoRA factor(s) the clients train in round ``round_idx`` of a task.

        Returns:
          "A", "B", "AB", or "" (no LoRA factor trains; the head always does).
        """

    def merge_round(self, client_lora, grams, client_heads, head_grams, num_samples, factor: str, task_rows,
                    server_head):
        """The server merge after a round (traced under ``jax.jit``; ``factor`` is static).

        Args:
          client_lora, grams, client_heads, head_grams, num_samples, task_rows, server_head: as in the module docstring;
            a client with ``num_samples == 0`` must not influence the result.
          factor: :meth:`train_factor` of this round.

        Returns:
          ``(lora {path: {"A": [r, d_in], "B": [d_out, r]}}, head {"w": [C, F], "b": [C]})``, the new server state;
          head rows outside ``task_rows`` unchanged.
        """

    def merge_tasks(self, past_b, past_a, task_grams, num_tasks) -> dict:
        """The evaluation model's weight updates from the first ``num_tasks`` finished tasks (traced under
        ``jax.jit``; ``num_tasks`` is traced, so task slots from ``num_tasks`` on must be ignored).

        Returns:
          ``{path: ΔW [d_out, d_in]}`` added to the frozen weights (``{}``: the pretrained backbone itself).
        """

    def uploads(self, factor: str) -> tuple[str, ...]:
        """What one client sends after a round that trained ``factor`` (vocabulary: :mod:`lorm_jax.methods.common`)."""

    def downloads(self, round_idx: int) -> tuple[str, ...]:
        """What one client receives before round ``round_idx`` of a task."""


@dataclasses.dataclass(frozen=True)
class Merges:
    """A method's server merges, compiled: ``round`` = :meth:`Method.merge_round` (one program per trained factor)
    and ``tasks`` = :meth:`Method.merge_tasks` (one program per run: the task count is traced)."""
    round: Callable
    tasks: Callable


def compile_merges(method: Method) -> Merges:
    """:class:`Merges` of ``method``, jitted (eager merges dispatch hundreds of small ops per round) with the eigh
    pseudo-inverse kept out of the programs that run every round (:func:`lorm_jax.merging.fast_first`: compiled only
    when a numerically singular Gram needs it)."""
    return Merges(round=merging.fast_first(method.merge_round, static_argnames=("factor",)),
                  tasks=merging.fast_first(method.merge_tasks))
