"""The device mesh: client work sharded over devices (and over hosts), everything shared replicated.

One code path for 1 device and for N (on one host or many): the client programs of :mod:`lorm_jax.federated` are
``shard_map``-ed over the mesh axis ``clients``, so device i runs its own training lanes and its own share of the
packed Gram / evaluation batches with no communication; the frozen backbone, the task data and the server state are
replicated. Gram sums are ``psum``-ed over ``clients``; a jitted server merge given client-sharded inputs turns every
client sum ``Σ_k`` (``Σ A_k G_k``, ``Σ G_k``, …) into a local sum plus an all-reduce (GSPMD).

Shapes::

    sharded leaf      [N·m, ...] NamedSharding(mesh, P("clients"))   leading axis a multiple of the mesh size N
    shared leaf       [...]      NamedSharding(mesh, P())            replicated on every device

Abstract placement: leaves that are ``jax.ShapeDtypeStruct`` s (or host arrays bound for a mesh of devices that are
not here, as when compiling for a TPU topology on a CPU, :mod:`lorm_jax.aot`) become ``ShapeDtypeStruct`` s carrying
the sharding, so the same code lays out real arrays and the arguments of an ahead-of-time compilation.

Multi-host: the mesh spans ``jax.devices()`` (all processes, see :mod:`lorm_jax.distributed`). Host arrays become
global arrays through :func:`jax.make_array_from_callback`, so each process transfers only the shards of the
devices it owns; :func:`gather` brings a global array back to every host (an all-gather across processes when the
array spans devices this process cannot address).
"""
from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

CLIENTS = "clients"


def make_mesh(clients: int = 0, devices=None) -> Mesh:
    """A 1-D mesh ``("clients",)`` over the first ``clients`` of ``devices`` (default ``jax.devices()``, i.e. every
    device of every process); ``clients <= 0`` means all of them."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices) if clients is None or clients <= 0 else int(clients)
    if n > len(devices):
        raise ValueError(f"config.mesh_clients = {n} is invalid: only {len(devices)} devices are visible "
                         f"({devices[0].platform}); on CPU, more host devices need "
                         f"XLA_FLAGS=--xla_force_host_platform_device_count=N set before jax is imported")
    if jax.process_count() > 1 and n != len(devices):
        raise ValueError(f"config.mesh_clients = {n} is invalid in a multi-process run: the mesh must span all "
                         f"{len(devices)} devices of the {jax.process_count()} processes (use 0)")
    return Mesh(np.asarray(devices[:n]), (CLIENTS,), axis_types=(jax.sharding.AxisType.Auto,))


def mesh_size(mesh: Mesh) -> int:
    """Number of devices on the ``clients`` axis."""
    return int(mesh.shape[CLIENTS])


def client_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(CLIENTS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def _on(x, sharding: NamedSharding) -> bool:
    return isinstance(x, jax.Array) and x.sharding.is_equivalent_to(sharding, x.ndim)


def _put(x, sharding: NamedSharding):
    if isinstance(x, jax.ShapeDtypeStruct) or not _here(sharding):
        # shapes only (compiling for devices that are not here, lorm_jax.aot): the placement, no data
        return jax.ShapeDtypeStruct(np.shape(x), np.result_type(x), sharding=sharding)
    if _on(x, sharding):
        # The same placement, but jit keys its cache on the sharding object too: a single-device array would compile
        # the program a second time next to its NamedSharding twin. Re-labelling it copies nothing.
        return x if x.sharding == sharding else jax.device_put(x, sharding)
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return jax.jit(lambda y: y, out_shardings=sharding)(x)  # a global array on another layout: reshard on device
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def _here(sharding: NamedSharding) -> bool:
    """Whether the mesh's devices are devices of this run (not a topology compiled for, :mod:`lorm_jax.aot`)."""
    return sharding.mesh.devices.flat[0] in jax.devices()


def put_clients(tree, mesh: Mesh):
    """Place a pytree whose leading axis (lanes, packed-batch shards) is a multiple of the mesh size sharded over
    ``clients``."""
    n = mesh_size(mesh)
    bad = [x.shape for x in jax.tree.leaves(tree) if x.shape[0] % n]
    if bad:
        raise ValueError(f"leading axis of shapes {bad} is not a multiple of the {n} devices of the mesh; "
                         f"lay it out for the mesh first (lanes and packed batches are)")
    return jax.tree.map(lambda x: _put(x, client_sharding(mesh)), tree)


def replicate(tree, mesh: Mesh):
    """Place a pytree replicated on every device of ``mesh`` (leaves already there are returned as they are)."""
    return jax.tree.map(lambda x: _put(x, replicated(mesh)), tree)


def gather(tree):
    """Every leaf as a host numpy array, on every process (an all-gather where a leaf spans other hosts' devices)."""
    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)
    return jax.tree.map(one, tree)
