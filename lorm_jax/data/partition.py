"""Federated partitioning of one task's training data across K clients (LORM_SPEC §10.3).

All functions take the labels of the task's samples (any integer ids; only equality matters) and return a list of
``K`` sorted ``int64`` arrays of *positions into* ``labels``. Every sample goes to exactly one client. All randomness
comes from the given ``numpy.random.Generator``, so results are reproducible given its seed and state.

Modes:

* ``"dirichlet"`` (the paper's distribution-based label skew): for each class ``c`` (ascending id),
  ``p_c ~ Dir(beta 1_K)``, each sample of ``c`` independently goes to ``k ~ Cat(p_c)``; the whole task is redrawn
  until every client has ``>= min_samples`` samples. Smaller ``beta`` => more skew.
* ``"quantity"`` (label-quantity skew, "#C=k"): each client holds exactly ``classes_per_client`` classes.
* ``"iid"``: a uniform random split into ``K`` near-equal shards.
"""
from __future__ import annotations

import numpy as np

__all__ = ["dirichlet_partition", "quantity_partition", "iid_partition", "partition", "client_label_counts"]


def _as_labels(labels) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    return labels


def dirichlet_partition(labels: np.ndarray, num_clients: int, beta: float, rng: np.random.Generator,
                        min_samples: int = 6, max_tries: int = 1000) -> list[np.ndarray]:
    """Dirichlet label-skew partition (reference ``_split_fcil``, ``partition_mode="distribution"``, train side).

    One try: for each class ``c`` of ``labels`` in ascending id, draw ``p ~ Dirichlet(beta * 1_K)`` (redrawn while
    it contains NaN), set ``p[p < 1e-20] = 0`` and renormalise ``p /= sum(p)``; then each sample of class ``c``
    (in dataset order) is assigned independently to client ``k ~ Categorical(p)`` (so the per-client counts are
    ``Multinomial(n_c, p)``, not a proportional split). Tries are repeated until ``min_k |D_k| >= min_samples``.

    Args:
      labels: ``[N]`` integer labels of the task's samples.
      num_clients: ``K >= 1``.
      beta: Dirichlet concentration ``> 0`` (paper: 0.05 .. 1).
      rng: numpy Generator (consumed: per try, per class, one Dirichlet draw (+ redraws) and ``n_c`` uniforms).
      min_samples: minimum samples per client (reference: 6 for train, 1 for test); 0 allows empty clients.
      max_tries: number of whole-task redraws before giving up.

    Returns:
      ``K`` sorted ``int64`` arrays of positions into ``labels``; their disjoint union is ``arange(N)``.

    Raises:
      ValueError if ``N < K * min_samples`` (impossible) or no try succeeded within ``max_tries``.
    """
    labels = _as_labels(labels)
    n, k = len(labels), int(num_clients)
    if k < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if min_samples < 0 or max_tries < 1:
        raise ValueError(f"need min_samples >= 0 and max_tries >= 1, got {min_samples}, {max_tries}")

    def fail(why: str) -> ValueError:
        return ValueError(
            f"dirichlet_partition: {why} (beta={beta}, num_clients={k}, min_samples={min_samples}, "
            f"task size={n} samples in {len(np.unique(labels))} classes). Lower min_samples (0 allows empty "
            f"clients), increase beta, or use fewer clients.")

    if n < k * min_samples:
        raise fail(f"impossible: {n} samples cannot give {k} clients {min_samples} samples each")
    classes = np.unique(labels)
    class_pos = [np.flatnonzero(labels == c) for c in classes]
    alpha = np.full(k, float(beta))
    for _ in range(max_tries):
        owner = np.empty(n, np.int64)
        for pos in class_pos:
            p = rng.dirichlet(alpha)
            while np.isnan(p).any():
                p = rng.dirichlet(alpha)
            p[p < 1e-20] = 0.0
            p /= p.sum()
            owner[pos] = rng.choice(k, size=len(pos), p=p)
        sizes = np.bincount(owner, minlength=k)
        if sizes.min() >= min_samples:
            return [np.flatnonzero(owner == j) for j in range(k)]
    raise fail(f"no draw gave every client >= min_samples samples in max_tries={max_tries} tries")


def quantity_partition(labels: np.ndarray, num_clients: int, classes_per_client: int,
                       rng: np.random.Generator) -> list[np.ndarray]:
    """Label-quantity skew ("#C=k"): each client holds exactly ``classes_per_client`` distinct classes.

    Class assignment: a seeded permutation of the ``C`` classes is dealt round-robin to clients
    ``0, 1, ..., K-1, 0, ...`` (so every class has >= 1 holder and each client gets ``<= ceil(C/K)`` classes); then each
    client is topped up with classes drawn uniformly without replacement from those it does not hold yet. Sample
    assignment: for each class (ascending), its samples are shuffled and split by ``np.array_split`` into
    near-equal parts among its holders (ascending client id).

    Requires ``1 <= classes_per_client <= C`` and ``K * classes_per_client >= C``. A client may still end up
    with no sample of a held class if that class has fewer samples than holders.
    """
    labels = _as_labels(labels)
    classes = np.unique(labels)
    c_count, k, m = len(classes), int(num_clients), int(classes_per_client)
    if k < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if not 1 <= m <= c_count:
        raise ValueError(f"classes_per_client={m} must be between 1 and the number of classes in the task "
                         f"({c_count})")
    if k * m < c_count:
        raise ValueError(f"num_clients * classes_per_client = {k} * {m} < {c_count} classes: some class "
                         f"would have no client")
    held = np.zeros((k, c_count), bool)
    for i, ci in enumerate(rng.permutation(c_count)):
        held[i % k, ci] = True
    for j in range(k):
        free = np.flatnonzero(~held[j])
        extra = m - held[j].sum()
        if extra > 0:
            held[j, rng.choice(free, size=extra, replace=False)] = True
    parts: list[list[np.ndarray]] = [[] for _ in range(k)]
    for ci, c in enumerate(classes):
        pos = np.flatnonzero(labels == c)
        holders = np.flatnonzero(held[:, ci])
        for j, chunk in zip(holders, np.array_split(pos[rng.permutation(len(pos))], len(holders))):
            parts[j].append(chunk)
    return [np.sort(np.concatenate(p)).astype(np.int64) if p else np.zeros(0, np.int64) for p in parts]


def iid_partition(labels: np.ndarray, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Uniform split: a random permutation of ``arange(N)`` cut by ``np.array_split`` into ``K`` shards."""
    labels = _as_labels(labels)
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    return [np.sort(s).astype(np.int64) for s in np.array_split(rng.permutation(len(labels)), int(num_clients))]


def partition(labels: np.ndarray, num_clients: int, mode: str, rng: np.random.Generator, *, beta: float = 0.5,
              classes_per_client: int = 2, min_samples: int = 6, max_tries: int = 1000) -> list[np.ndarray]:
    """Dispatch on ``mode``: ``"dirichlet"`` (uses beta, min_samples, max_tries), ``"quantity"`` (uses
    classes_per_client) or ``"iid"``. See the individual functions."""
    if mode == "dirichlet":
        return dirichlet_partition(labels, num_clients, beta, rng, min_samples=min_samples, max_tries=max_tries)
    if mode == "quantity":
        return quantity_partition(labels, num_clients, classes_per_client, rng)
    if mode == "iid":
        return iid_partition(labels, num_clients, rng)
    raise ValueError(f"unknown partition mode {mode!r}; valid: 'dirichlet', 'quantity', 'iid'")


def client_label_counts(labels: np.ndarray, parts: list[np.ndarray], num_classes: int | None = None) -> np.ndarray:
    """``int64 [K, C]``: ``counts[k, c]`` = samples of label ``c`` held by client ``k`` (labels must be
    ``0..C-1``; ``C`` defaults to ``max(labels) + 1``)."""
    labels = np.asarray(labels)
    c = int(num_classes if num_classes is not None else (labels.max() + 1 if len(labels) else 0))
    return np.stack([np.bincount(labels[p], minlength=c) for p in parts]) if parts else np.zeros((0, c), np.int64)
