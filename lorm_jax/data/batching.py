"""Padded minibatch schedules so that one federated round runs as a single ``vmap`` over clients.

A schedule is ``idx int32 [..., S, B]`` (dataset positions to gather) and ``mask bool [..., S, B]`` (True = real
example). Padding entries have ``idx = 0`` (a valid position, so gathers never go out of bounds) and
``mask = False``.

Engine contract: the loss of a step is the mean over its *valid* examples, ``sum(mask * l) / max(sum(mask), 1)``
(= PyTorch's mean over a partial last batch), and a step whose mask is all False must leave parameters **and
optimizer state** (e.g. AdamW moments and step count) unchanged.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

__all__ = ["client_schedule", "eval_schedule", "steps_per_client"]


def steps_per_client(sizes: Sequence[int], batch_size: int, epochs: int) -> np.ndarray:
    """``int64 [K]``: ``epochs * ceil(n_k / batch_size)`` (0 for empty clients)."""
    return np.asarray([epochs * math.ceil(int(n) / batch_size) for n in sizes], dtype=np.int64)


def client_schedule(client_indices: Sequence[np.ndarray], batch_size: int, epochs: int, rng: np.random.Generator,
                    shuffle: bool = True, num_steps: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-client epoch schedules, stacked and padded.

    Client ``k`` with ``n_k`` indices runs ``epochs`` epochs; each epoch is a fresh ``rng.permutation`` of its
    indices (original order if ``shuffle=False``) cut into ``ceil(n_k / B)`` batches, the last one partial (no
    drop_last, like a shuffled PyTorch DataLoader). Epochs are concatenated, so client ``k`` has
    ``steps_k = epochs * ceil(n_k / B)`` real steps followed by fully masked ones up to
    ``S = max(max_k steps_k, 1)`` (or ``num_steps``, which must be ``>= max_k steps_k``).
    The rng is consumed client by client, epoch by epoch.

    Returns:
      ``idx int32 [K, S, B]`` entries of ``client_indices[k]`` (0 where padded) and ``mask bool [K, S, B]``.
    """
    if batch_size < 1 or epochs < 0:
        raise ValueError(f"need batch_size >= 1 and epochs >= 0, got {batch_size}, {epochs}")
    k = len(client_indices)
    steps = steps_per_client([len(ix) for ix in client_indices], batch_size, epochs)
    s_max = max(int(steps.max()) if k else 0, 1)
    if num_steps is not None:
        if num_steps < s_max:
            raise ValueError(f"num_steps={num_steps} < required steps {s_max}")
        s_max = int(num_steps)
    idx = np.zeros((k, s_max, batch_size), np.int32)
    mask = np.zeros((k, s_max, batch_size), bool)
    for j, ix in enumerate(client_indices):
        ix = np.asarray(ix, dtype=np.int64)
        n = len(ix)
        if n == 0 or epochs == 0:
            continue
        nb = math.ceil(n / batch_size)
        flat_i = np.zeros((epochs, nb * batch_size), np.int64)
        flat_m = np.zeros((epochs, nb * batch_size), bool)
        for e in range(epochs):
            flat_i[e, :n] = ix[rng.permutation(n)] if shuffle else ix
            flat_m[e, :n] = True
        idx[j, :epochs * nb] = flat_i.reshape(epochs * nb, batch_size)
        mask[j, :epochs * nb] = flat_m.reshape(epochs * nb, batch_size)
    return idx, mask


def eval_schedule(n: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Sequential batches over ``arange(n)``: ``idx int32 [S, B]``, ``mask bool [S, B]``,
    ``S = max(ceil(n / B), 1)``; the tail is padded with ``idx 0``, ``mask False``."""
    if batch_size < 1 or n < 0:
        raise ValueError(f"need batch_size >= 1 and n >= 0, got {batch_size}, {n}")
    s = max(math.ceil(n / batch_size), 1)
    flat = np.zeros(s * batch_size, np.int32)
    flat[:n] = np.arange(n)
    m = np.zeros(s * batch_size, bool)
    m[:n] = True
    return flat.reshape(s, batch_size), m.reshape(s, batch_size)
