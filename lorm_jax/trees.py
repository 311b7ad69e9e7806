"""Pytree utilities for the client axis: client-stacked pytrees have a leading axis K on every leaf."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def stack_clients(tree, num_clients: int):
    """Broadcast an unstacked pytree to a leading client axis of size K (host numpy leaves: numpy views, no op)."""
    return jax.tree.map(lambda x: (np.broadcast_to if isinstance(x, np.ndarray) else jnp.broadcast_to)(
        x, (num_clients,) + x.shape), tree)


def zero_clients(tree, include: np.ndarray):
    """Zero the entries of the clients not in ``include`` [K] on every leaf of a client-stacked pytree."""
    keep = jnp.asarray(include)
    return jax.tree.map(lambda g: jnp.where(keep.reshape((-1,) + (1,) * (g.ndim - 1)), g, 0.0), tree)


def select(on, new, old):
    """``new`` where the scalar ``on`` holds, else ``old``, leaf by leaf (a traced branch without a cond)."""
    return jax.tree.map(lambda n, o: jnp.where(on, n, o), new, old)
