"""Orbax save/restore of the whole experiment state after every round.

The state is a pytree of arrays (``unit`` = index of the next unit of work, where a task has ``rounds`` round units
and one end-of-task unit; server LoRA and head; every finished task's factors and Gram sums; the accuracy matrix; the
partition digest). Random keys, partitions and batch orders are pure functions of (seed, task, round, client, step),
so they are recomputed, not stored, and a resumed run is bit-identical to an uninterrupted one. Orbax writes each step
into a temporary directory and renames it when complete, so a crash mid-write leaves the previous step intact.
"""
from __future__ import annotations

import os

import jax
import numpy as np
import orbax.checkpoint as ocp


def _manager(workdir: str, keep: int = 2) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
    return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")), options=options)


def save(workdir: str, step: int, state) -> None:
    """Write ``state`` as checkpoint ``step`` (refuses a state with a non-finite float leaf)."""
    bad = [jax.tree_util.keystr(k) for k, x in jax.tree_util.tree_leaves_with_path(state)
           if np.issubdtype(np.asarray(x).dtype, np.floating) and not _finite_or_nan_matrix(k, x)]
    if bad:
        raise FloatingPointError(f"refusing to checkpoint a non-finite state (leaves {bad[:5]})")
    state = jax.tree.map(np.asarray, state)
    with _manager(workdir) as mngr:
        mngr.save(step, args=ocp.args.StandardSave(state))
        mngr.wait_until_finished()


def _finite_or_nan_matrix(path, x) -> bool:
    """Accuracy entries of tasks not reached yet are NaN by design; everything else must be finite."""
    x = np.asarray(x)
    if "acc" in jax.tree_util.keystr(path):
        return not np.any(np.isinf(x))
    return bool(np.all(np.isfinite(x)))


def latest_step(workdir: str) -> int | None:
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        return None
    with _manager(workdir) as mngr:
        return mngr.latest_step()


def restore(workdir: str, like):
    """Restore the latest checkpoint with the structure, shapes and dtypes of ``like``; ``None`` if there is none."""
    step = latest_step(workdir)
    if step is None:
        return None
    abstract = jax.tree.map(lambda x: np.zeros(np.shape(x), np.asarray(x).dtype), like)
    with _manager(workdir) as mngr:
        restored = mngr.restore(step, args=ocp.args.StandardRestore(abstract))
    return jax.tree.map(np.asarray, restored)
