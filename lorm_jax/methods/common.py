"""Pieces the strategies share: the head merge, FedAvg and LoRM sums and merges, leaving excluded clients out,
cross-task merges, payload declarations.

Payload vocabulary (what the communication ledger, :mod:`lorm_jax.ledger`, sizes from the actual arrays):

    upload   "A", "B"        the client's trained factor(s)            {path: [r, d_in]} / {path: [d_out, r]}
             "grams"         backbone Grams of every LoRA layer        {path: [d_in] or [d_in, d_in]}
             "head"          the head rows of the current task         w [C_t, F], b [C_t]
             "head_gram"     the head Gram (RegMean head only)         [F] or [F, F]
             "num_samples"   n_k (weights the bias / FedAvg)           one float32
    download "A", "B"        the server factor(s) that changed since the client last had them
             "head"          the head rows of the current task
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from lorm_jax import merging
from lorm_jax.methods import base

HEAD_MERGES = ("regmean", "fedavg")


def check_head_merge(how: str) -> str:
    if how not in HEAD_MERGES:
        raise ValueError(f"config.head_merge = {how!r} is invalid: one of {list(HEAD_MERGES)}")
    return how


def keep_included(tree, weights: jax.Array):
    """Replace every client with weight 0 (excluded for non-finite parameters, or without data) by a copy of the first
    included one, on every leaf of a client-stacked pytree.

    An excluded client already has zero weight and zero Grams, but ``0 · NaN = NaN`` would still poison a weighted
    sum; the copy is finite and weighted by 0, and a factor frozen this round stays the server's.
    """
    include = jnp.asarray(weights) > 0
    first = jnp.argmax(include)  # 0 when nobody is included (the merge is then meaningless anyway)

    def fix(x):
        keep = include.reshape((-1,) + (1,) * (x.ndim - 1))
        return jnp.where(keep, x, x[first])
    return jax.tree.map(fix, tree)


def head_sums(client_heads, head_grams, weights, how: str = "regmean", dtype=jnp.float32) -> dict:
    """The head merge's sums over clients: ``w``: the RegMean system ``(Σ_k W_k G̃_k^head, Σ_k G̃_k^head)``
    (``how = "regmean"``) or ``Σ_k w_k W_k`` ("fedavg"); ``b``: ``Σ_k w_k b_k``. client_heads w [K, C, F], b [K, C],
    weights [K] = n_k / N."""
    if check_head_merge(how) == "regmean":
        w = merging.regmean_system(client_heads["w"], head_grams, dtype=dtype)
    else:
        w = merging.weighted_sum(client_heads["w"], weights)
    return {"w": w, "b": merging.weighted_sum(client_heads["b"], weights)}


def head_from_sums(sums: dict, task_rows, server_head, dtype=jnp.float32, how: str = "regmean") -> dict:
    """The merged head from ``sums["clients"]["merge"]["head"]`` (:func:`head_sums`); rows outside ``task_rows``
    [C] are copied from ``server_head``::

        how = "regmean":  W = (Σ_k W_k G̃_k^head)(Σ_k G̃_k^head)^+   (LORM_SPEC §7)
        how = "fedavg":   W = Σ_k n_k W_k / Σ_k n_k
        b = Σ_k n_k b_k / Σ_k n_k
    """
    s, scale = sums["clients"]["merge"]["head"], base.sample_scale(sums)
    w = merging.solve_gram(*s["w"], dtype=dtype) if check_head_merge(how) == "regmean" else s["w"] * scale
    b = s["b"] * scale
    return {"w": jnp.where(task_rows[:, None], w, server_head["w"]), "b": jnp.where(task_rows, b, server_head["b"])}


def merge_head(client_heads, head_grams, num_samples, task_rows, server_head, dtype=jnp.float32, how="regmean"):
    """Server merge of the head from every client's head (:func:`head_from_sums` of their :func:`head_sums`); rows
    outside ``task_rows`` [C] are copied from ``server_head``. client_heads: w [K, C, F], b [K, C]."""
    client_heads = keep_included(client_heads, num_samples)
    num_samples = jnp.asarray(num_samples, jnp.float32)
    sums = {"clients": {"merge": {"head": head_sums(client_heads, head_grams, merging.fedavg_weights(num_samples),
                                                    how, dtype)}},
            "samples": {"planned": num_samples.sum(), "included": num_samples.sum()}}
    return head_from_sums(sums, task_rows, server_head, dtype, how)


def fedavg_sums(client_lora, weights, factor: str) -> dict:
    """``{path: {name: Σ_k w_k x_k}}`` for the trained factor(s) ``name in factor``; weights [K] = n_k / N."""
    return {p: {name: merging.weighted_sum(x, weights) for name, x in f.items() if name in factor}
            for p, f in client_lora.items()}


def fedavg_from_sums(sums: dict, factor: str, server_lora) -> dict:
    """The FedAvg of the trained ``factor`` ("A", "B" or "AB") from ``sums["clients"]["merge"]["lora"]``
    (:func:`fedavg_sums`); the other factor is the server's (identical on every client)."""
    s, scale = sums["clients"]["merge"]["lora"], base.sample_scale(sums)
    return {p: {name: s[p][name] * scale if name in factor else x.astype(jnp.float32) for name, x in f.items()}
            for p, f in server_lora.items()}


def fedavg_lora(client_lora, num_samples, factor: str) -> dict:
    """Sample-weighted FedAvg of the trained ``factor`` ("A", "B" or "AB"); the others pass through from a client
    (they are the server's, identical on every client). client_lora {path: {"A": [K, r, d_in], "B": [K, d_out, r]}}."""
    client_lora = keep_included(client_lora, num_samples)
    num_samples = jnp.asarray(num_samples, jnp.float32)
    sums = {"clients": {"merge": {"lora": fedavg_sums(client_lora, merging.fedavg_weights(num_samples), factor)}},
            "samples": {"planned": num_samples.sum(), "included": num_samples.sum()}}
    return fedavg_from_sums(sums, factor, {p: {k: x[0] for k, x in f.items()} for p, f in client_lora.items()})


def lora_from_sums(sums: dict, factor: str, server_lora, dtype=jnp.float32) -> dict:
    """LoRM's merge of the trained ``factor`` ("A" or "B"): every layer's normal equations
    ``sums["layers"][path]["merge"]`` (:func:`lorm_jax.merging.lora_system`) solved, one stacked solve per Gram shape
    (:func:`lorm_jax.merging.solve_systems`); the other factor is the server's."""
    kept = "B" if factor == "A" else "A"
    solved = merging.solve_systems({p: s["merge"] for p, s in sums["layers"].items()}, dtype=dtype)
    return {p: {factor: solved[p], kept: server_lora[p][kept].astype(jnp.float32)} for p in sums["layers"]}


def _finished_only(x: jax.Array, num_tasks) -> jax.Array:
    """``x`` [T, ...] with the task slots from ``num_tasks`` on (a Python int or traced) set to 0."""
    keep = jnp.arange(x.shape[0]) < num_tasks
    return jnp.where(keep.reshape((-1,) + (1,) * (x.ndim - 1)), x, 0)


def mean_task_deltas(past_b, past_a, num_tasks) -> dict:
    """``ΔW_eval = (1/T) Σ_{τ<T} B_τ A_τ`` per layer (the reference's ``cl_merge="individual_mean"``).

    past_b {path: [T_max, d_out, r]}, past_a {path: [T_max, r, d_in]} → {path: [d_out, d_in]}. ``num_tasks`` may be
    traced: later task slots are masked to 0, so a run compiles this once.
    """
    return {p: jnp.einsum("tor,trd->od", _finished_only(past_b[p], num_tasks), _finished_only(past_a[p], num_tasks),
                          precision=jax.lax.Precision.HIGHEST) / num_tasks for p in past_b}


def regmean_task_deltas(past_b, past_a, task_grams, num_tasks, dtype=jnp.float32) -> dict:
    """Cross-task RegMean ``ΔW_eval = (Σ_τ B_τ A_τ G_τ)(Σ_τ G_τ)^+`` (LORM_SPEC §8; t = 0: ``B_0 A_0``).

    task_grams {path: [T_max, d_in(, d_in)]}, each ``G_τ`` summed over the clients of task τ. ``num_tasks`` may be
    traced (one compilation per run): task slots τ ≥ ``num_tasks`` are masked to 0, adding exact zeros to both sums.
    """
    def first():  # the reference keeps W0 + B_0 A_0 (equal to the merge when G_0 has full rank)
        return {p: jnp.matmul(past_b[p][0], past_a[p][0], precision=jax.lax.Precision.HIGHEST) for p in past_b}

    def merged():
        finished = lambda tree: {p: _finished_only(x, num_tasks) for p, x in tree.items()}
        return merging.regmean_lowrank_tree(finished(past_b), finished(past_a), finished(task_grams), dtype=dtype)

    return jax.lax.cond(jnp.asarray(num_tasks) == 1, first, merged)


def uploads(factor: str, backbone_grams: bool, head_merge: str) -> tuple[str, ...]:
    """What a client sends after a round: its trained factor(s), Grams if the server needs them, head, n_k."""
    return (tuple(factor) + (("grams",) if backbone_grams else ()) + ("head",)
            + (("head_gram",) if head_merge == "regmean" else ()) + ("num_samples",))


def downloads(method, round_idx: int, last: int | None = None) -> tuple[str, ...]:
    """What a client receives before round ``round_idx`` of a task: the task's head rows and the LoRA factor(s) the
    server merged since the start of ``last``, the last round of the task the client took part in (default: the round
    before; -1 or a task's first round: none, so the whole fresh LoRA). Every client keeps what it received."""
    last = round_idx - 1 if last is None else last
    changed = "AB" if round_idx == 0 or last < 0 else "".join(
        sorted(set("".join(method.train_factor(r) for r in range(last, round_idx)))))
    return tuple(changed) + ("head",)
