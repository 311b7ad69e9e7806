"""Orbax save/restore of the whole experiment state after every round.

The state is a pytree of arrays (``unit`` = index of the next unit of work, where a task has ``rounds`` round units
and one end-of-task unit; server LoRA and head; every finished task's factors and Gram sums; the accuracy matrix; the
partition digest). Random keys, partitions and batch orders are pure functions of (seed, task, round, client, step),
so they are recomputed, not stored, and a resumed run is bit-identical to an uninterrupted one.

Crash safety: orbax writes each step into ``<step>.orbax-checkpoint-tmp`` and renames it when complete (atomic on a
POSIX filesystem), so a crash mid-write leaves the previous step intact; leftover temporary directories are deleted
when the manager opens. A finalized step that cannot be read back (e.g. a damaged disk) is deleted and the previous one
restored (two are kept). A state with a non-finite float leaf is never written.
"""
from __future__ import annotations

import logging
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger("lorm_jax")
TMP_MARKER = ".orbax-checkpoint-tmp"  # orbax names a step being written "<step>.orbax-checkpoint-tmp[-<timestamp>]"


def _manager(workdir: str, keep: int = 2, clean: bool = True) -> ocp.CheckpointManager:
    if clean:
        remove_partial_steps(workdir)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
    return ocp.CheckpointManager(_directory(workdir), options=options)


def remove_partial_steps(workdir: str) -> list[str]:
    """Delete the temporary directories of steps whose write never finished (a crash mid-checkpoint); their names.

    Done here, synchronously, rather than with orbax's background ``cleanup_tmp_directories`` (which races with a second
    manager opened on the same folder).
    """
    directory = _directory(workdir)
    if not os.path.isdir(directory):
        return []
    partial = sorted(name for name in os.listdir(directory) if TMP_MARKER in name)
    for name in partial:
        log.warning("removing the unfinished checkpoint %s in %s (a crash interrupted its write)", name, directory)
        shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
    return partial


def save(workdir: str, step: int, state) -> None:
    """Write ``state`` as checkpoint ``step`` (refuses a state with a non-finite float leaf)."""
    bad = [jax.tree_util.keystr(k) for k, x in jax.tree_util.tree_leaves_with_path(state)
           if np.issubdtype(np.asarray(x).dtype, np.floating) and not _finite_or_nan_matrix(k, x)]
    if bad:
        raise FloatingPointError(f"refusing to write checkpoint {step} in {workdir}: the state has non-finite values "
                                 f"(leaves {bad[:5]}); the previous checkpoint is kept")
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
    if not os.path.isdir(_directory(workdir)):
        return None
    with _manager(workdir, clean=False) as mngr:  # a query changes nothing; orbax lists finished steps only
        return mngr.latest_step()


def restore(workdir: str, like):
    """Restore the latest readable checkpoint with the structure, shapes and dtypes of ``like``; ``None`` if none.

    When the newest step cannot be read but an older one can, the unreadable steps are deleted (so their numbers can be
    written again) and the older one is returned. When no step can be read nothing is deleted and the error says why.
    """
    if latest_step(workdir) is None:
        return None
    abstract = jax.tree.map(lambda x: np.zeros(np.shape(x), np.asarray(x).dtype), like)
    errors = []
    with _manager(workdir) as mngr:
        for step in sorted(mngr.all_steps(), reverse=True):
            try:
                restored = mngr.restore(step, args=ocp.args.StandardRestore(abstract))
            except Exception as e:  # noqa: BLE001 - any read failure means this step is unusable
                errors.append((step, f"{type(e).__name__}: {e}"))
                continue
            for bad, why in errors:
                log.warning("checkpoint %d in %s cannot be read (%s); deleted it, resuming from checkpoint %d",
                            bad, workdir, why[:300], step)
                shutil.rmtree(os.path.join(_directory(workdir), str(bad)), ignore_errors=True)
            return jax.tree.map(np.asarray, restored)
    why = "; ".join(f"step {s}: {w[:300]}" for s, w in errors)
    raise RuntimeError(f"no checkpoint in {_directory(workdir)} can be read ({why}). If the code or the config changed "
                       f"since it was written, use a new --workdir; otherwise delete that folder to start over")


def _directory(workdir: str) -> str:
    return os.path.abspath(os.path.join(workdir, "checkpoints"))
