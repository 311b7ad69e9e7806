"""What a run measures: continual-learning metrics of the accuracy matrix, how much of the computed work was real
(utilisation), how the summed Grams look to the solver (conditioning), and how well a merge reproduces the clients'
responses (merge residuals)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from lorm_jax import merging
from lorm_jax.backbones import common


def continual_metrics(acc: np.ndarray, test_sizes: np.ndarray) -> dict:
    """Continual-learning metrics from the accuracy matrix ``acc[t, τ]`` (accuracy on task τ after task t, τ ≤ t).

    * final_average_accuracy: pooled over samples after the last task, ``Σ_τ n_τ acc[T-1, τ] / Σ n_τ`` (reference);
    * final_average_accuracy_task_mean: ``mean_τ acc[T-1, τ]``;
    * average_incremental_accuracy: mean over t of the pooled accuracy after task t;
    * forgetting (the drop from the best earlier accuracy):
      ``mean_{τ<T-1} (max_{τ≤t<T-1} acc[t, τ] − acc[T-1, τ])``;
    * forgetting_reference (the reference's ``compute_forgetting``, fed-mammoth ``utils/training.py`` at 09a9508: the
      drop from the accuracy right after learning the task, averaged over *all* T tasks as the reference reports it,
      so the last task's zero term counts): ``(1/T) Σ_{τ<T} (acc[τ, τ] − acc[T-1, τ])``. The reference works in
      percent rounded to 2 decimals; here fractions, unrounded. Equal to ``(T-1)/T · forgetting`` when no task's
      accuracy ever rises above its value right after learning it;
    * bwt (backward transfer, kept for compatibility): ``mean_{τ<T-1} (acc[T-1, τ] − acc[τ, τ])
      = −T/(T-1) · forgetting_reference`` (computed from the same per-task drops).
    """
    T = acc.shape[0]
    n = np.asarray(test_sizes, np.float64)
    pooled = [float(np.sum(acc[t, :t + 1] * n[:t + 1]) / np.sum(n[:t + 1])) for t in range(T)]
    last = acc[T - 1]
    forgetting = [float(np.max(acc[tau:T - 1, tau]) - last[tau]) for tau in range(T - 1)]
    drop = [float(acc[tau, tau] - last[tau]) for tau in range(T)]  # drop[T-1] = 0
    return {
        "final_average_accuracy": pooled[-1],
        "final_average_accuracy_task_mean": float(np.mean(last)),
        "average_incremental_accuracy": float(np.mean(pooled)),
        "accuracy_after_task": pooled,
        "forgetting": float(np.mean(forgetting)) if forgetting else 0.0,
        "forgetting_reference": float(np.mean(drop)),
        "bwt": 0.0 - float(np.mean(drop[:-1])) if T > 1 else 0.0,  # 0.0 - x: never -0.0
    }


def gram_utilization(waves) -> float:
    """Real examples / processed example slots of the packed Gram passes of ``waves`` (all devices)."""
    real = sum(w.gram["real_examples"] for w in waves)
    slots = sum(w.gram["idx"].shape[0] * w.gram["num_batches"] * w.gram["idx"].shape[2] * w.gram["idx"].shape[3]
                for w in waves)
    return round(real / max(slots, 1), 5)


@functools.partial(jax.jit, static_argnames=("dtype", "stacked", "blocks", "by_kind"))
def gram_health_tree(grams: dict, dtype: str, stacked: bool = False, blocks: bool = False,
                     by_kind: bool = False) -> dict:
    """:func:`lorm_jax.merging.gram_health` of every summed Gram ``Σ_k G_k`` (``{name: [d] or [d, d]}``; with
    ``stacked`` the terms ``{name: [K, d] or [K, d, d]}``, summed here). With ``blocks`` every leaf has a leading
    block axis (e.g. the block layout ``{layer kind: [depth, ...]}``), vmapped over; ``by_kind``: per-layer Grams
    ``{path: ...}``, stacked here into the block layout (:func:`lorm_jax.backbones.common.by_kind`) and vmapped."""
    one = lambda g: merging.gram_health(merging.client_sum(g) if stacked else g, dtype=jnp.dtype(dtype))  # noqa
    grams = common.by_kind(grams) if by_kind else grams
    return {p: (jax.vmap(one) if blocks or by_kind else one)(g) for p, g in grams.items()}


def gram_conditioning(grams: dict, dtype: str = "float32", stacked: bool = False, blocks: bool = False,
                      by_kind: bool = False) -> dict:
    """Metrics of the summed Grams ``Σ_k G_k`` a merge solves with (``{name: [d] or [d, d]}``, or their terms with
    ``stacked``; ``blocks`` / ``by_kind`` as :func:`gram_health_tree`; see :func:`merging.gram_health`): the smallest
    scaled Cholesky pivot over layers (~1/cond; 0 = singular), how many layers take the eigh pseudo-inverse fallback,
    and how many features have no input energy."""
    health = jax.device_get(gram_health_tree(grams, dtype, stacked, blocks, by_kind))
    values = lambda key: np.concatenate([np.ravel(h[key]) for h in health.values()]).astype(np.float64)  # noqa
    return {"gram_min_pivot": float(f"{np.min(values('min_pivot')):.6g}"),
            "gram_pinv_layers": int(np.sum(values("pinv"))),
            "gram_dead_features": int(np.sum(values("dead")))}


def utilization_summary(schedule, lines: list[dict]) -> dict:
    """How much of what the run computed was real work: the schedule (lanes, loop buffer, packed-pass block) and the
    mean / min over the units of ``train_utilization`` (real examples / example slots the lanes ran), ``batch_fill``
    (real examples / example slots of the lane steps that ran any) and ``gram_utilization`` (real examples / slots of
    the Gram pass), from the run's metric ``lines``."""
    out = {"lanes": schedule.lanes, "loop_steps": schedule.num_steps, "clients_per_step": schedule.num_slots,
           "rows_per_lane": schedule.num_rows - 1, "gram_block": schedule.gram_block}
    for key in ("train_utilization", "batch_fill", "gram_utilization"):
        values = [line[key] for line in lines if key in line]
        if values:
            out[key] = {"mean": round(float(np.mean(values)), 5), "min": round(float(np.min(values)), 5)}
    return out


def residuals_by_kind(sums: dict, grams: dict, merged_lora: dict, *, dtype=None) -> dict:
    """:func:`lorm_jax.merging.residuals_from_sums_tree` over the block layout (every argument ``{layer kind:
    [depth, ...]}``), vmapped over the blocks: ``{layer kind: [depth, 2]}``."""
    return jax.vmap(functools.partial(merging.residuals_from_sums_tree, dtype=dtype))(sums, grams, merged_lora)


# residuals_by_kind, compiled once per run (the eigh fallback only if a singular Gram needs it)
residuals_tree = merging.fast_first(residuals_by_kind, static_argnames="dtype")


def merge_diagnostics(sums: dict, merged_lora, dtype=jnp.float32) -> dict:
    """How well a round's merge reproduces the clients' responses: per LoRA layer the relative response-matching
    residual of the merged ``ΔW = B A`` against the clients' own ``ΔW_k = B_k A_k`` on their Grams, and the same at the
    ideal RegMean ``ΔW*`` of the clients' deltas (:func:`lorm_jax.merging.residuals_from_sums`, from the round's sums
    ``Σ_k ΔW_k G_k`` and ``Σ_k tr(ΔW_k G_k ΔW_kᵀ)``, :func:`lorm_jax.merging.residual_sums`), as mean and max over
    layers: ``{"merge_residual": {"mean", "max"}, "regmean_residual": {"mean", "max"}}``. Excluded clients are not
    in the sums."""
    layers = sums["layers"]
    per_kind = residuals_tree({k: s["residual"] for k, s in layers.items()}, {k: s["gram"] for k, s in layers.items()},
                              merged_lora, dtype=jnp.dtype(dtype))
    values = np.concatenate([np.asarray(v, np.float64) for v in per_kind.values()])  # [L, 2]
    summary = lambda x: {"mean": float(f"{np.mean(x):.6g}"), "max": float(f"{np.max(x):.6g}")}
    return {"merge_residual": summary(values[:, 0]), "regmean_residual": summary(values[:, 1])}
