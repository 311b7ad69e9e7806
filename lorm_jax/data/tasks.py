"""Class-incremental task splits (LORM_SPEC §10.2).

Convention: a class ``order`` is a permutation of ``0..C-1``; task ``t`` owns the classes
``order[offsets[t]:offsets[t+1]]`` with ``offsets = [0, C_0, C_0 + C_1, ...]``. After :func:`relabel` every label is
its position in ``order``, so task ``t`` owns the contiguous logit range ``[offsets[t], offsets[t+1])`` and the classes
seen after task ``t`` are exactly ``[0, offsets[t+1])`` (the logit mask of §7 / §10.7 is ``arange(C) < offsets[t+1]``).

The reference uses the natural order (``class_order(C, None)``), identical for every seed.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["class_order", "task_classes", "relabel", "task_offsets", "task_indices", "seen_class_mask",
           "task_of_class"]


def class_order(num_classes: int, seed: int | None) -> np.ndarray:
    """``int64 [C]``: ``arange(C)`` when ``seed is None`` (the reference), else ``default_rng(seed).permutation(C)``."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if seed is None:
        return np.arange(num_classes)
    return np.random.default_rng(seed).permutation(num_classes)


def _check_order(num_classes: int, order: np.ndarray) -> np.ndarray:
    order = np.asarray(order)
    if order.shape != (num_classes,) or not np.array_equal(np.sort(order), np.arange(num_classes)):
        raise ValueError(f"order must be a permutation of 0..{num_classes - 1}, got {order.tolist()}")
    return order


def task_classes(num_classes: int, classes_per_task: int | Sequence[int], order: np.ndarray) -> list[np.ndarray]:
    """Split ``order`` into consecutive tasks.

    ``classes_per_task`` int ``c``: ``T = num_classes / c`` equal tasks (``c`` must divide ``num_classes``).
    Sequence ``(C_0, ..., C_{T-1})``: explicit positive sizes summing to ``num_classes`` (e.g. Cars-196:
    ``[20] * 9 + [16]``). Returns ``T`` arrays of original class ids: ``tasks[t] = order[off_t : off_t + C_t]``.
    """
    order = _check_order(num_classes, order)
    if isinstance(classes_per_task, (int, np.integer)):
        c = int(classes_per_task)
        if c < 1 or num_classes % c != 0:
            raise ValueError(f"classes_per_task={c} must be >= 1 and divide num_classes={num_classes}; "
                             f"pass an explicit list of task sizes for unequal tasks")
        sizes = [c] * (num_classes // c)
    else:
        sizes = [int(s) for s in classes_per_task]
        if not sizes or min(sizes) < 1 or sum(sizes) != num_classes:
            raise ValueError(f"task sizes {sizes} must be positive and sum to num_classes={num_classes} "
                             f"(they sum to {sum(sizes)})")
    offs = np.concatenate([[0], np.cumsum(sizes)])
    return [order[offs[t]:offs[t + 1]].copy() for t in range(len(sizes))]


def relabel(y: np.ndarray, order: np.ndarray) -> np.ndarray:
    """``int32``: ``y'[i] = position of y[i] in order`` (i.e. ``inv[y]`` with ``inv[order] = arange(C)``)."""
    order = _check_order(len(order), order)
    inv = np.empty(len(order), np.int64)
    inv[order] = np.arange(len(order))
    return inv[np.asarray(y)].astype(np.int32)


def task_offsets(tasks: Sequence[np.ndarray] | Sequence[int]) -> np.ndarray:
    """``int64 [T+1]`` cumulative class counts ``[0, C_0, C_0 + C_1, ..., C]``. Accepts the task class arrays
    (from :func:`task_classes`) or a list of task sizes."""
    sizes = [int(t) if np.ndim(t) == 0 else len(t) for t in tasks]
    return np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).astype(np.int64)


def task_indices(y_relabelled: np.ndarray, t: int, offsets: np.ndarray) -> np.ndarray:
    """``int64``: sorted positions ``i`` with ``offsets[t] <= y_relabelled[i] < offsets[t+1]``."""
    if not 0 <= t < len(offsets) - 1:
        raise ValueError(f"task index {t} out of range for {len(offsets) - 1} tasks")
    y = np.asarray(y_relabelled)
    return np.flatnonzero((y >= offsets[t]) & (y < offsets[t + 1]))


def seen_class_mask(t: int, offsets: np.ndarray) -> np.ndarray:
    """``bool [C]``: True for the (relabelled) classes of tasks ``0..t``, i.e. ``arange(C) < offsets[t+1]``."""
    return np.arange(int(offsets[-1])) < offsets[t + 1]


def task_of_class(offsets: np.ndarray) -> np.ndarray:
    """``int64 [C]``: task id of every relabelled class."""
    return np.searchsorted(np.asarray(offsets), np.arange(int(offsets[-1])), side="right") - 1
