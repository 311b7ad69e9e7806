"""Random streams: every draw of a run is a pure function of (seed, task, round, client, stream, step).

JAX keys come from ``fold_in`` chains of the training seed (``config.seed``), NumPy generators from seed sequences, so
a result never depends on how clients are laid out in lanes, on the devices or on the processes. The salts name the
streams that are not per client::

    lora_key(seed, t)           fold_in(key(seed), LORA_INIT), then fold_in(·, t) for t > 0   task t's fresh LoRA
    head_key(seed)              fold_in(key(seed), HEAD_INIT)
    client_keys(seed, t, r, k, stream)   fold_in chain seed → task → round → client → stream (TRAIN or GRAM)
    client_rng(seed, t, r, k, stream)    np.random.default_rng([seed, t, r, k, stream])   batch order
    partition_rng(data_seed, t)          np.random.default_rng([data_seed, t, PARTITION])  client split of task t
    participants(seed, t, r, K, m)       np.random.default_rng([seed, t, r, PARTICIPATION]): m of the K clients
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

LORA_INIT = 10_000   # salt of the LoRA initialisations
HEAD_INIT = 20_000   # salt of the head initialisation
PARTITION = 7        # salt of the client partitions
PARTICIPATION = 30_000  # salt of the draws of a round's participants
TRAIN_STREAM, GRAM_STREAM = 0, 1  # per-client streams: training and Gram passes never share random numbers


def seed_key(seed: int) -> jax.Array:
    return jax.random.PRNGKey(seed)


def lora_key(seed: int, task: int) -> jax.Array:
    """The key of task ``task``'s fresh LoRA factors (task 0 uses the salt key itself)."""
    key = jax.random.fold_in(seed_key(seed), LORA_INIT)
    return key if task == 0 else jax.random.fold_in(key, task)


def head_key(seed: int) -> jax.Array:
    return jax.random.fold_in(seed_key(seed), HEAD_INIT)


def client_keys(seed: int, task: int, rnd: int, clients: np.ndarray, stream: int) -> jax.Array:
    """``fold_in(seed → task → round → client → stream)`` for each of ``clients``: [len(clients)] keys (one vmapped
    program, the same keys as one ``fold_in`` per client: a round of 10,000 clients does not dispatch 20,000 ops)."""
    base = jax.random.fold_in(jax.random.fold_in(seed_key(seed), task), rnd)
    clients = jnp.asarray(np.asarray(clients, np.uint32).reshape(-1))
    return _client_keys(base, clients, stream)


@jax.jit
def _client_keys(base: jax.Array, clients: jax.Array, stream) -> jax.Array:
    return jax.vmap(lambda k: jax.random.fold_in(jax.random.fold_in(base, k), stream))(clients)


def client_rng(seed: int, task: int, rnd: int, client: int, stream: int) -> np.random.Generator:
    """Client ``client``'s host generator of (task, round, stream): its batch order."""
    return np.random.default_rng([seed, task, rnd, client, stream])


def participants(seed: int, task: int, rnd: int, num_clients: int, per_round: int) -> np.ndarray:
    """The clients taking part in round ``rnd`` of task ``task`` (``rnd = rounds``: the end of the task), ascending:
    ``per_round`` of ``num_clients`` drawn without replacement from ``default_rng([seed, task, rnd, PARTICIPATION])``,
    or all of them when ``per_round`` is 0 or ``num_clients``. A function of the seed and the round only: never of
    lanes, waves, devices or processes."""
    if per_round in (0, num_clients):
        return np.arange(num_clients)
    if not 0 < per_round < num_clients:
        raise ValueError(f"per_round must be 0 .. {num_clients}, got {per_round}")
    draw = np.random.default_rng([seed, task, rnd, PARTICIPATION]).choice(num_clients, per_round, replace=False)
    return np.sort(draw)


def partition_rng(data_seed: int, task: int) -> np.random.Generator:
    """The generator of task ``task``'s client partition."""
    return np.random.default_rng([data_seed, task, PARTITION])
