"""Minibatch schedules for the vmapped client programs: per-client schedules, lanes, packed passes.

A schedule is ``idx int32 [..., S, B]`` (dataset positions to gather) and ``mask bool [..., S, B]`` (True = real
example). Padding entries have ``idx = 0`` (a valid position, so gathers never go out of bounds) and
``mask = False``.

Local training runs clients in a few vmapped *lanes* (:func:`pack_lanes`), each lane step packing whole local steps
of several of its clients into one batch (:func:`pack_steps`, :func:`lane_schedule`), so a round costs about the
clients' real examples, not K × the largest client's steps, nor the padding of their partial batches. Passes without
per-client state (Gram statistics, evaluation) pack every client's examples into shared batches
(:func:`packed_schedule`).

Engine contract: the loss of a step is the mean over its *valid* examples, ``sum(mask * l) / max(sum(mask), 1)``
(= PyTorch's mean over a partial last batch), and a step whose mask is all False must leave parameters **and
optimizer state** (e.g. AdamW moments and step count) unchanged.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

__all__ = ["client_schedule", "eval_schedule", "lane_schedule", "lane_steps", "pack_lanes", "pack_steps",
           "packed_schedule", "step_sizes", "steps_per_client"]


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


# ----------------------------------------------------------------------------------------------------------------------
# Lanes: ragged clients run back to back in P vmapped lanes (local training), and packed passes (Grams, evaluation).

def pack_lanes(steps: Sequence[int], num_lanes: int) -> list[list[int]]:
    """Bin-pack clients with ``steps[k]`` local steps into ``num_lanes`` lanes, longest first (LPT).

    Clients are taken by decreasing step count (ties: lower index first) and each goes to the lane with the least
    work so far (ties: the lower lane). Returns, per lane, the clients in the order the lane runs them. The longest
    lane is at most ``max(max_k S_k, ΣS/P) · 4/3`` (Graham's LPT bound) and usually within one client of
    ``max(max_k S_k, ⌈ΣS/P⌉)``. Clients with 0 steps are placed too (they cost nothing) so every client has a slot.
    """
    if num_lanes < 1:
        raise ValueError(f"need at least one lane, got {num_lanes}")
    lanes: list[list[int]] = [[] for _ in range(num_lanes)]
    load = np.zeros(num_lanes, np.int64)
    for k in sorted(range(len(steps)), key=lambda k: (-int(steps[k]), k)):
        p = int(np.argmin(load))
        lanes[p].append(k)
        load[p] += int(steps[k])
    return lanes


def pack_steps(sizes: Sequence[Sequence[int]], batch: int, num_slots: int) -> list[list[tuple[int, int, int]]]:
    """Pack clients' local steps into the steps of one lane: ``sizes[m]`` are the real examples of each step of the
    lane's m-th client, in order. A lane step holds at most ``batch`` examples from at most ``num_slots`` clients, at
    most one step of each, and a client's steps keep their order. Greedy: each lane step takes the clients with the
    most examples still to run first, each if its next step still fits.

    Returns per lane step the ``(client m, its step s, offset in the lane step)`` placements. The lane runs about
    ``max(max_m S_m, ⌈Σ examples / batch⌉)`` steps instead of ``Σ_m S_m`` padded ones.
    """
    if batch < 1 or num_slots < 1:
        raise ValueError(f"need batch >= 1 and num_slots >= 1, got {batch}, {num_slots}")
    if any(n < 1 or n > batch for steps in sizes for n in steps):
        raise ValueError(f"every step needs 1 .. {batch} examples, got {[list(x) for x in sizes]}")
    done = [0] * len(sizes)
    left = [int(sum(steps)) for steps in sizes]
    plan = []
    while any(left):
        cap, placed = batch, []
        for m in sorted((m for m in range(len(sizes)) if left[m]), key=lambda m: (-left[m], m)):
            n = int(sizes[m][done[m]])
            if len(placed) == num_slots or n > cap:
                continue
            placed.append((m, done[m], batch - cap))
            cap -= n
        for m, s, _ in placed:
            done[m], left[m] = s + 1, left[m] - int(sizes[m][s])
        plan.append(placed)
    return plan


def lane_steps(sizes: Sequence[Sequence[int]], lanes: list[list[int]], batch: int, num_slots: int) -> int:
    """The steps of the longest of ``lanes`` once packed (:func:`pack_steps`); ``sizes[k]``: client k's step sizes."""
    return max([len(pack_steps([sizes[k] for k in lane], batch, num_slots)) for lane in lanes] + [1])


def step_sizes(num_examples: int, batch: int, epochs: int) -> list[int]:
    """The real examples of each local step of a client with ``num_examples`` (epochs of ⌈n/B⌉ batches, the last one
    partial), as :func:`client_schedule` lays them out."""
    full, rest = divmod(int(num_examples), batch)
    return ([batch] * full + ([rest] if rest else [])) * epochs


def lane_schedule(client_idx: Sequence[np.ndarray], client_mask: Sequence[np.ndarray], lanes: list[list[int]],
                  num_steps: int, num_slots: int, num_rows: int) -> dict:
    """Lay out the clients' own steps along their lanes, several clients per lane step (:func:`pack_steps`).

    ``client_idx[k], client_mask[k]``: ``[S_k, B]`` (only real steps, real examples first; from :func:`client_schedule`
    of client k alone). A lane gives each of its clients a *row* (its parameters and optimizer state, the client's
    position in the lane; the last row ``num_rows − 1`` is scratch) and runs up to ``num_slots`` (M) clients per step,
    each in a *slot*. ``num_steps`` (T, ≥ the longest lane), M and ``num_rows`` (R) fix the shapes, so every round of a
    run has the same ones. Returns numpy arrays, leading axes ``[P, T]``:

    * ``idx, mask [P, T, B]``: the examples; ``owner [P, T, B]``: the slot each belongs to; ``step, position
      [P, T, B]``: its step in its client's own schedule and its position in that step's batch (its PRNG key is
      ``split(fold_in(key[client], step), B)[position]``, as without packing);
    * ``rows, client [P, T, M]``: the row each slot reads and updates (scratch when unused) and its client;
      ``active [P, T, M]``: the slot carries a step;
    * ``lane_of, row_of [K]``: where client k's outputs are; ``num_steps`` (the loop length this round: the longest
      lane), ``num_slots``, ``num_rows``, ``real_steps`` (Σ S_k) and ``real_examples``.
    """
    P, K = len(lanes), len(client_idx)
    batch = client_idx[0].shape[-1] if K else 1
    shape = (P, num_steps)
    per_example, per_slot = shape + (batch,), shape + (num_slots,)
    arr = {"idx": np.zeros(per_example, np.int32), "mask": np.zeros(per_example, bool),
           "owner": np.zeros(per_example, np.int32), "step": np.zeros(per_example, np.int32),
           "position": np.zeros(per_example, np.int32), "rows": np.full(per_slot, num_rows - 1, np.int32),
           "client": np.zeros(per_slot, np.int32), "active": np.zeros(per_slot, bool)}
    lane_of, row_of = np.zeros(K, np.int32), np.zeros(K, np.int32)
    longest = 0
    for p, members in enumerate(lanes):
        if len(members) > num_rows - 1:
            raise ValueError(f"lane {p} holds {len(members)} clients but only {num_rows - 1} rows are laid out")
        plan = pack_steps([client_mask[k].sum(axis=1) for k in members], batch, num_slots)
        if len(plan) > num_steps:
            raise ValueError(f"lane {p} needs {len(plan)} steps but only num_steps = {num_steps} are laid out")
        for t, placed in enumerate(plan):
            for slot, (m, s, offset) in enumerate(placed):
                k = members[m]
                n = int(client_mask[k][s].sum())
                cut = slice(offset, offset + n)
                arr["idx"][p, t, cut], arr["mask"][p, t, cut] = client_idx[k][s, :n], True
                arr["owner"][p, t, cut], arr["step"][p, t, cut], arr["position"][p, t, cut] = slot, s, np.arange(n)
                arr["rows"][p, t, slot], arr["client"][p, t, slot], arr["active"][p, t, slot] = m, k, True
        for m, k in enumerate(members):
            lane_of[k], row_of[k] = p, m
        longest = max(longest, len(plan))
    return {**arr, "lane_of": lane_of, "row_of": row_of, "num_steps": max(longest, 1), "num_slots": num_slots,
            "num_rows": num_rows, "real_steps": int(sum(len(x) for x in client_idx)),
            "real_examples": int(sum(int(np.sum(m)) for m in client_mask))}


def packed_schedule(client_indices: Sequence[np.ndarray], stream_batch: int, passes: int, *, block: int,
                    blocks_per_batch: int, shards: int = 1, num_batches: int | None = None) -> dict:
    """Pack every client's examples into shared batches for a pass with no per-client state (Grams, evaluation).

    Client k's stream is its examples in order, ``passes`` times, numbered as :func:`client_schedule` with
    ``shuffle=False`` and batch ``stream_batch`` numbers them: example i of pass e is at step
    ``e·⌈n_k/stream_batch⌉ + i // stream_batch``, position ``i % stream_batch`` (which keeps each example's PRNG key,
    ``split(fold_in(key_k, step), stream_batch)[position]``, independent of the packing). The stream is cut into
    client-pure *blocks* of ``block`` examples (the last one padded), the blocks of all clients are concatenated,
    dealt in equal contiguous shares to ``shards`` devices and grouped ``blocks_per_batch`` to a batch.

    Returns numpy arrays with leading axes ``[shards, NB, blocks_per_batch]`` (NB = ``num_batches`` if given, else
    the most any shard needs): ``idx, mask, step, position [.., block]`` and ``block_client`` (the client of each
    block); plus ``num_batches`` (loop length: the most any shard needs) and ``real_examples``.
    """
    blocks_idx, blocks_mask, blocks_step, blocks_pos, owner = [], [], [], [], []
    for k, ix in enumerate(client_indices):
        ix = np.asarray(ix, np.int64)
        n = len(ix)
        if n == 0 or passes == 0:
            continue
        per_pass = math.ceil(n / stream_batch)
        i = np.tile(np.arange(n), passes)
        e = np.repeat(np.arange(passes), n)
        steps, pos = e * per_pass + i // stream_batch, i % stream_batch
        nb = math.ceil(len(i) / block)
        pad = nb * block - len(i)
        fill = lambda a: np.concatenate([a, np.zeros(pad, a.dtype)]).reshape(nb, block)  # noqa: E731
        blocks_idx.append(fill(ix[i]))
        blocks_mask.append(fill(np.ones(len(i), bool)))
        blocks_step.append(fill(steps))
        blocks_pos.append(fill(pos))
        owner.append(np.full(nb, k))
    total = sum(len(o) for o in owner)
    per_shard = math.ceil(total / shards) if total else 0
    need = max(math.ceil(per_shard / blocks_per_batch), 1)
    nb = need if num_batches is None else num_batches
    if need > nb:
        raise ValueError(f"the pass needs {need} batches per shard but only num_batches = {nb} are laid out")
    cat = lambda xs, dt: (np.concatenate(xs) if xs else np.zeros((0, block), dt)).astype(dt)  # noqa: E731
    arrays = {"idx": cat(blocks_idx, np.int32), "mask": cat(blocks_mask, bool), "step": cat(blocks_step, np.int32),
              "position": cat(blocks_pos, np.int32),
              "block_client": np.concatenate(owner).astype(np.int32) if owner else np.zeros(0, np.int32)}
    out = {}
    for name, a in arrays.items():
        # shard s takes blocks [s·per_shard, (s+1)·per_shard); padding blocks (mask False, client 0) fill the rest
        padded = np.zeros((shards, nb * blocks_per_batch) + a.shape[1:], a.dtype)
        for s in range(shards):
            part = a[s * per_shard:(s + 1) * per_shard]
            padded[s, :len(part)] = part
        out[name] = padded.reshape((shards, nb, blocks_per_batch) + a.shape[1:])
    out["num_batches"] = need
    out["real_examples"] = int(sum(len(ix) for ix in client_indices) * passes)
    return out
