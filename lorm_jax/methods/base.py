"""The method interface: what a federated method decides, as a typed protocol, and the statistics a pass sums for it.

The engine (:mod:`lorm_jax.rounds`) owns local training, Gram statistics, evaluation and checkpoints; a method says
which LoRA factor(s) clients train in a round, which **sums over clients** its server merge needs, how it merges from
those sums, how finished tasks are merged into the evaluation model, and what crosses the network. The merges read
only sums over clients (the normal equations of a closed-form merge, weighted sums for FedAvg), so the engine
accumulates them while the clients finish (:class:`Statistics`, :mod:`lorm_jax.federated`) and never holds every
client's Grams at once. Shapes (K clients or U units, T task slots, C classes, F features)::

    factors       {"A": [U, r, d_in], "B": [U, d_out, r]}          one layer's factors per unit: a client, or a block
    grams         [U, d_in] or [U, d_in, d_in]                      of a client's examples (sums linear in the Grams)
    client_lora   {path: {"A": [K, r, d_in], "B": [K, d_out, r]}}   the clients' LoRA after local training
    client_heads  {"w": [K, C, F], "b": [K, C]}, head_grams [K, F] or [K, F, F]
    weights       [K] float32: n_k / N, a client's share of the round's samples (0: left out of the merge)
    sums          {"layers": {path: {"gram": Σ G, "merge": layer_sums, ...}}, "clients": {"head_gram": Σ G_head,
                  "merge": client_sums}, "samples": {"planned": N, "included": Σ n_k of the clients merged}}
    task_rows     [C] bool, the current task's head rows;  server_lora, server_head: the state the round started from
    past_b, past_a  {path: [T, d_out, r]}, {path: [T, r, d_in]};  task_grams {path: [T, d_in(, d_in)]}

A runnable example: FedAvg of both factors and of the head, tasks merged by the mean of their deltas ::

    >>> import dataclasses
    >>> from lorm_jax import methods
    >>> from lorm_jax.methods import base, common
    >>> @dataclasses.dataclass(frozen=True)
    ... class PlainFedAvg(base.PerClientMerge):
    ...     name: str = "plain_fedavg"
    ...     task_grams: bool = False
    ...     def train_factor(self, round_idx):
    ...         return "AB"
    ...     def layer_sums(self, factors, grams, factor):
    ...         return ()                                   # no Grams needed
    ...     def client_sums(self, client_lora, client_heads, head_grams, weights, factor):
    ...         return {"lora": common.fedavg_sums(client_lora, weights, factor),
    ...                 "head": common.head_sums(client_heads, head_grams, weights, "fedavg")}
    ...     def merge_sums(self, sums, factor, task_rows, server_lora, server_head):
    ...         head = common.head_from_sums(sums, task_rows, server_head, how="fedavg")
    ...         return common.fedavg_from_sums(sums, factor, server_lora), head
    ...     def merge_tasks(self, past_b, past_a, task_grams, num_tasks):
    ...         return common.mean_task_deltas(past_b, past_a, num_tasks)
    ...     def uploads(self, factor):
    ...         return common.uploads(factor, backbone_grams=False, head_merge="fedavg")
    ...     def downloads(self, round_idx, last=None):
    ...         return common.downloads(self, round_idx, last)
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
from typing import Any, Callable, Protocol, runtime_checkable

import jax
import jax.numpy as jnp

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

    def layer_sums(self, factors: dict, grams, factor: str) -> Any:
        """One LoRA layer's sums over units (clients, or blocks of their examples) that the round merge needs, each
        **linear in the Grams** (so summing over blocks, waves and devices gives the sums over clients); a pytree
        (``()`` when the merge needs no Grams). Traced; ``factor`` static."""

    def client_sums(self, client_lora, client_heads, head_grams, weights, factor: str) -> Any:
        """The round merge's other sums over clients (head Gram sums, FedAvg sums ``Σ_k w_k x_k``): a pytree, summed
        over the clients of every wave (``weights`` [K]: n_k / N of the round). Traced; ``factor`` static."""

    def merge_sums(self, sums: dict, factor: str, task_rows, server_lora, server_head):
        """The server merge of a round from its ``sums`` (module docstring; traced under ``jax.jit``). The engine
        calls it ``jax.vmap``-ped over the transformer blocks (:class:`Merges`): a layer's result may depend on that
        layer's arrays only, and the head's on no layer's.

        Returns:
          ``(lora {path: {"A": [r, d_in], "B": [d_out, r]}}, head {"w": [C, F], "b": [C]})``, the new server state;
          factors that did not train and head rows outside ``task_rows`` are the server's.
        """

    def merge_tasks(self, past_b, past_a, task_grams, num_tasks) -> dict:
        """The evaluation model's weight updates from the first ``num_tasks`` finished tasks (traced under
        ``jax.jit``, ``jax.vmap``-ped over the blocks as :meth:`merge_sums`; ``num_tasks`` is traced, so task slots
        from ``num_tasks`` on must be ignored).

        Returns:
          ``{path: ΔW [d_out, d_in]}`` added to the frozen weights (``{}``: the pretrained backbone itself).
        """

    def uploads(self, factor: str) -> tuple[str, ...]:
        """What one client sends after a round that trained ``factor`` (vocabulary: :mod:`lorm_jax.methods.common`)."""

    def downloads(self, round_idx: int, last: int | None = None) -> tuple[str, ...]:
        """What one client receives before round ``round_idx`` of a task, when the last round of the task it took
        part in was ``last`` (default: the round before; -1: none)."""


@dataclasses.dataclass(frozen=True)
class Statistics:
    """What a pass over clients sums, per LoRA layer and over the clients (a static argument of the compiled pass:
    equal instances share one program). ``method`` None: the Gram sums only (the end of a task).

    layer(factors, grams) -> {"gram": Σ_u G_u, "merge": method.layer_sums, "residual": merging.residual_sums}
    clients(client_lora, client_heads, head_grams, weights) -> {"head_gram": Σ_k G_k^head, "merge": client_sums}
    """
    method: Method | None = None
    factor: str = ""
    residuals: bool = False   # the merge diagnostics' sums (metrics.merge_diagnostics)
    dtype: str = "float32"

    def layer(self, factors: dict, grams) -> dict:
        out = {"gram": merging.client_sum(grams)}
        if self.method is not None:
            out["merge"] = self.method.layer_sums(factors, grams, self.factor)
        if self.residuals:
            out["residual"] = merging.residual_sums(factors["B"], factors["A"], grams, dtype=jnp.dtype(self.dtype))
        return out

    def layers(self, client_lora, grams) -> dict:
        """:meth:`layer` of every LoRA layer (``grams`` {path: [K, ...]}): layers of one shape in one vmapped body for
        diagonal Grams, layer by layer for full ones (:func:`merging.map_layers`)."""
        grams = {p: grams[p] for p in client_lora}
        return merging.map_layers(self.layer, client_lora, grams, sequential=any(g.ndim == 3 for g in grams.values()))

    def clients(self, client_lora, client_heads, head_grams, weights) -> dict:
        out = {"head_gram": merging.client_sum(head_grams)}
        if self.method is not None:
            out["merge"] = self.method.client_sums(client_lora, client_heads, head_grams, weights, self.factor)
        return out

    def from_clients(self, client_lora, grams, client_heads, head_grams, num_samples) -> dict:
        """The sums of clients given whole (``[K, ...]`` arrays, every excluded client finite with weight 0; layers as
        :meth:`layers`); ``grams`` / ``head_grams`` may be None (a method that needs none)."""
        num_samples = jnp.asarray(num_samples, jnp.float32)
        out = {"samples": {"planned": num_samples.sum(), "included": num_samples.sum()}}
        if grams is not None:
            out["layers"] = self.layers(client_lora, grams)
        weights = merging.fedavg_weights(num_samples)
        if head_grams is None:
            out["clients"] = {"merge": self.method.client_sums(client_lora, client_heads, None, weights, self.factor)}
        else:
            out["clients"] = self.clients(client_lora, client_heads, head_grams, weights)
        return out


def sample_scale(sums: dict) -> jax.Array:
    """``N / N_included``: FedAvg sums are ``Σ_k (n_k / N) x_k`` over a round's planned samples N; clients left out
    after their wave was summed (non-finite) make the included total smaller. Exactly 1 when nobody was."""
    planned, included = sums["samples"]["planned"], sums["samples"]["included"]
    return jnp.where(included > 0, planned / jnp.where(included > 0, included, 1), 0).astype(jnp.float32)


class PerClientMerge:
    """``merge_round`` from per-client arrays (the whole round at once) for a method that declares its sums."""

    def merge_round(self, client_lora, grams, client_heads, head_grams, num_samples, factor: str, task_rows,
                    server_head):
        """The server merge after a round from every client's arrays (module docstring; traced under ``jax.jit``):
        :meth:`Method.merge_sums` of the clients' sums. A client with ``num_samples == 0`` (and zero Grams, as the
        engine leaves an excluded client) does not influence the result, even when its arrays are not finite."""
        from lorm_jax.methods import common
        num_samples = jnp.asarray(num_samples, jnp.float32)
        client_lora = common.keep_included(client_lora, num_samples)
        client_heads = common.keep_included(client_heads, num_samples)
        sums = Statistics(self, factor).from_clients(client_lora, grams, client_heads, head_grams, num_samples)
        server_lora = {p: {k: x[0] for k, x in f.items()} for p, f in client_lora.items()}  # the frozen factor
        return self.merge_sums(sums, factor, task_rows, server_lora, server_head)


@dataclasses.dataclass(frozen=True)
class Merges:
    """A method's server merges, compiled over the block layout (the LoRA layers of one kind stacked over the blocks,
    ``{layer kind: [depth, ...]}``, :func:`lorm_jax.backbones.common.by_kind`; a merge is the same for every layer,
    so it runs vmapped over the blocks: one op per layer kind, not one per layer, to compile):

    round(sums, factor, task_rows, server_lora, server_head) -> (lora, head)
        :meth:`Method.merge_sums` with ``sums["layers"]`` in the block layout, ``server_lora`` per layer (stacked in
        the program) and the merged ``lora`` in the block layout; one program per trained factor.
    tasks(past_b, past_a, task_grams, num_tasks) -> deltas
        :meth:`Method.merge_tasks` of per-layer arrays, the ``deltas`` ΔW in the block layout; one program per run
        (the task count is traced).
    """
    round: Callable
    tasks: Callable


def compile_merges(method: Method) -> Merges:
    """:class:`Merges` of ``method``, jitted (eager merges dispatch hundreds of small ops per round) with the eigh
    pseudo-inverse kept out of the programs that run every round (:func:`lorm_jax.merging.fast_first`: compiled only
    when a numerically singular Gram needs it)."""
    from lorm_jax.backbones.common import by_kind

    def merge_sums(sums, factor, task_rows, server_lora, server_head):
        server_lora = by_kind(server_lora)
        # a sum is a layer's (mapped over the blocks) where its path names a layer kind (sums["layers"], FedAvg sums
        # of the clients' LoRA); the head's and the sample counts are no layer's
        of_layer = lambda path, _: 0 if any(getattr(k, "key", None) in server_lora for k in path) else None  # noqa
        axes = jax.tree_util.tree_map_with_path(of_layer, sums)
        merge = lambda s, lora: method.merge_sums(s, factor, task_rows, lora, server_head)  # noqa: E731
        return jax.vmap(merge, in_axes=(axes, 0), out_axes=(0, None))(sums, server_lora)

    def merge_tasks(past_b, past_a, task_grams, num_tasks):
        merge = lambda b, a, g: method.merge_tasks(b, a, g, num_tasks)  # noqa: E731
        return jax.vmap(merge)(by_kind(past_b), by_kind(past_a), by_kind(task_grams))

    return Merges(round=merging.fast_first(merge_sums, static_argnames=("factor",)),
                  tasks=merging.fast_first(merge_tasks))
