"""Orbax checkpoints of a run: the experiment state after every unit, and each finished task's Gram sums once.

The state is a pytree of arrays (``unit`` = index of the next unit of work, where a task has ``rounds`` round units
and one end-of-task unit; server LoRA and head; every finished task's factors and Gram sums; the accuracy matrix).
Random keys, partitions and batch orders are pure functions of (seed, task, round, client, step), so they are
recomputed, not stored, and a resumed run is bit-identical to an uninterrupted one.

    WORKDIR/checkpoints/<step>   the state without ``task_grams`` after ``step`` units (the last two kept)
    WORKDIR/task_grams/<t>       ``task_grams[:, t]`` of every layer, written once, when task t ends

The Gram sums of finished tasks (``[T, d, d]`` per layer with full Grams: most of the state) never change once
written, so a round writes only what it changed. :class:`RunCheckpoints` keeps one orbax manager per folder for the
whole run and saves the per-unit state asynchronously (the next unit computes while it is written).

Crash safety: orbax writes each step into ``<step>.orbax-checkpoint-tmp`` and renames it when complete (atomic on a
POSIX filesystem), so a crash mid-write leaves the previous step intact; leftover temporary directories are deleted
when a run opens its checkpoints. A task's Gram item is committed before the state step that ends the task, so every
restored state has the Gram items of its finished tasks. A finalized step that cannot be read back (e.g. a damaged
disk) is deleted and the previous one restored (two are kept). A state with a non-finite float leaf is never written.
Paths go through ``etils.epath`` (local folders or ``gs://``).
"""
from __future__ import annotations

import logging

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from lorm_jax import workdir as workdir_lib

log = logging.getLogger("lorm_jax")
TMP_MARKER = ".orbax-checkpoint-tmp"  # orbax names a step being written "<step>.orbax-checkpoint-tmp[-<timestamp>]"
STATE_DIR, TASK_DIR = "checkpoints", "task_grams"
PER_TASK = "task_grams"  # the state key saved once per finished task


class RunCheckpoints:
    """The checkpoints of one run in ``workdir``: ``restore`` once, ``save`` after every unit, then ``close`` (or use
    it as a context manager, which waits for the last save).

    Args:
      workdir: the run's folder (local or remote, :func:`lorm_jax.workdir.path`).
      units_per_task: ``rounds + 1``; step ``s`` with ``s % units_per_task == 0`` ends task ``s // units_per_task - 1``.
      asynchronous: save in the background (a run); False waits for every save (one-off use, tests).
    """

    def __init__(self, workdir, units_per_task: int = 1, asynchronous: bool = True):
        self.workdir, self.units_per_task = workdir, units_per_task
        for folder in (STATE_DIR, TASK_DIR):
            remove_partial_steps(workdir, folder)
        self.state = _manager(workdir_lib.path(workdir, STATE_DIR), 2, asynchronous)
        self.tasks = _manager(workdir_lib.path(workdir, TASK_DIR), None, False)

    def __enter__(self) -> RunCheckpoints:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Wait for the save in flight, then release the managers."""
        self.state.wait_until_finished()
        self.state.close()
        self.tasks.close()

    def save(self, step: int, state: dict) -> None:
        """Write ``state`` (host arrays) as step ``step``; at the end of a task first that task's Gram sums (committed
        before this returns). Refuses a state with a non-finite float leaf (the previous step is kept)."""
        state = jax.tree.map(np.asarray, state)
        main = {k: v for k, v in state.items() if k != PER_TASK}
        task = step // self.units_per_task - 1 if PER_TASK in state and step % self.units_per_task == 0 else None
        grams = None if task is None else {p: g[task] for p, g in state[PER_TASK].items()}
        _check_finite((main, grams), f"refusing to write checkpoint {step} in {self.workdir}")
        if grams is not None:
            if task in self.tasks.all_steps():  # written by a run that crashed before this step committed
                self.tasks.delete(task)
            self.tasks.save(task, args=ocp.args.StandardSave(grams))
            self.tasks.wait_until_finished()
        self.state.wait_until_finished()  # at most one save in flight
        self.state.save(step, args=ocp.args.StandardSave(main))

    def restore(self, like: dict) -> dict | None:
        """The latest readable state with the structure, shapes and dtypes of ``like`` (its finished tasks' Gram sums
        included); ``None`` if there is none.

        When the newest step cannot be read but an older one can, the unreadable steps are deleted (so their numbers
        can be written again) and the older one is returned. When no step can be read nothing is deleted and the error
        says why.
        """
        steps = sorted(self.state.all_steps(), reverse=True)
        if not steps:
            return None
        abstract = jax.tree.map(lambda x: np.zeros(np.shape(x), np.asarray(x).dtype),
                                {k: v for k, v in like.items() if k != PER_TASK})
        errors = []
        for step in steps:
            try:
                restored = dict(self.state.restore(step, args=ocp.args.StandardRestore(abstract)))
                if PER_TASK in like:
                    restored[PER_TASK] = self._restore_tasks(like[PER_TASK], step // self.units_per_task)
            except Exception as e:  # noqa: BLE001 - any read failure means this step is unusable
                errors.append((step, f"{type(e).__name__}: {e}"))
                continue
            for bad, why in errors:
                log.warning("checkpoint %d in %s cannot be read (%s); deleted it, resuming from checkpoint %d",
                            bad, self.workdir, why[:300], step)
                self.state.delete(bad)
            return jax.tree.map(np.asarray, restored)
        why = "; ".join(f"step {s}: {w[:300]}" for s, w in errors)
        raise RuntimeError(f"no checkpoint in {workdir_lib.path(self.workdir, STATE_DIR)} can be read ({why}). If the "
                           "code or the config changed since it was written, use a new --workdir; otherwise delete "
                           "that folder to start over")

    def _restore_tasks(self, like: dict, tasks_done: int) -> dict:
        """``like`` (``{path: [T, ...]}``) with rows ``0 .. tasks_done - 1`` read from the per-task items."""
        out = {p: np.zeros(np.shape(g), np.asarray(g).dtype) for p, g in like.items()}
        abstract = {p: np.zeros(g.shape[1:], g.dtype) for p, g in out.items()}
        for task in range(tasks_done):
            rows = self.tasks.restore(task, args=ocp.args.StandardRestore(abstract))
            for p in out:
                out[p][task] = rows[p]
        return out


def _manager(directory: epath.Path, keep: int | None, asynchronous: bool) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=asynchronous)
    return ocp.CheckpointManager(directory, options=options)


def _check_finite(tree, what: str) -> None:
    bad = [jax.tree_util.keystr(k) for k, x in jax.tree_util.tree_leaves_with_path(tree)
           if np.issubdtype(np.asarray(x).dtype, np.floating) and not _finite_or_nan_matrix(k, x)]
    if bad:
        raise FloatingPointError(f"{what}: the state has non-finite values (leaves {bad[:5]}); the previous "
                                 "checkpoint is kept")


def _finite_or_nan_matrix(path, x) -> bool:
    """Accuracy entries of tasks not reached yet are NaN by design; everything else must be finite."""
    x = np.asarray(x)
    if "acc" in jax.tree_util.keystr(path):
        return not np.any(np.isinf(x))
    return bool(np.all(np.isfinite(x)))


def remove_partial_steps(workdir, folder: str = STATE_DIR) -> list[str]:
    """Delete the temporary directories of steps whose write never finished (a crash mid-checkpoint); their names.

    Done here, synchronously, rather than with orbax's background ``cleanup_tmp_directories`` (which races with a second
    manager opened on the same folder).
    """
    directory = workdir_lib.path(workdir, folder)
    if not directory.is_dir():
        return []
    partial = sorted(p.name for p in directory.iterdir() if TMP_MARKER in p.name)
    for name in partial:
        log.warning("removing the unfinished checkpoint %s in %s (a crash interrupted its write)", name, directory)
        (directory / name).rmtree(missing_ok=True)
    return partial


def latest_step(workdir) -> int | None:
    """The newest finished state step in ``workdir`` (None if none); changes nothing."""
    directory = workdir_lib.path(workdir, STATE_DIR)
    if not directory.is_dir():
        return None
    with ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False)) as mngr:
        return mngr.latest_step()


def save(workdir, step: int, state: dict, units_per_task: int = 1) -> None:
    """One synchronous save outside a run (a run keeps one :class:`RunCheckpoints`)."""
    with RunCheckpoints(workdir, units_per_task, asynchronous=False) as checkpoints:
        checkpoints.save(step, state)


def restore(workdir, like: dict, units_per_task: int = 1) -> dict | None:
    """:meth:`RunCheckpoints.restore` outside a run."""
    if latest_step(workdir) is None:
        return None
    with RunCheckpoints(workdir, units_per_task, asynchronous=False) as checkpoints:
        return checkpoints.restore(like)
