"""Multi-host runs: ``jax.distributed.initialize`` from flags or environment, before anything touches a device.

Which process is which is a property of the launch, not of the experiment, so it is not in the config (every process
runs the same config and shares one workdir; ``config.json`` must be identical). Three ways, first match wins::

    lorm-jax run ... --coordinator=host0:1234 --num_processes=2 --process_id=0      # command-line flags
    LORM_JAX_COORDINATOR=host0:1234 LORM_JAX_NUM_PROCESSES=2 LORM_JAX_PROCESS_ID=0 lorm-jax run ...
    LORM_JAX_DISTRIBUTED=auto lorm-jax run ...     # jax's own cluster detection (SLURM, Open MPI, TPU pods, …)

After initialisation ``jax.devices()`` lists the devices of every process and the client mesh
(:mod:`lorm_jax.sharding`) spans them all. On CPU the cross-process collectives are gloo's (jax's default CPU
collectives implementation, set explicitly here). Every process loads the task data and the frozen backbone
(replicated); each places only its own devices' shards of the per-client inputs, so it computes only its own
clients. Process 0 alone writes ``results.json``, ``metrics.jsonl`` and the plots; orbax checkpoints are written by
all processes together (orbax synchronises them), into the shared workdir.
"""
from __future__ import annotations

import dataclasses
import os

ENV_PREFIX = "LORM_JAX_"


@dataclasses.dataclass(frozen=True)
class Launch:
    """Where this process sits in a multi-process run (``num_processes == 1``: a single-process run)."""
    coordinator: str | None = None
    num_processes: int = 1
    process_id: int = 0
    auto: bool = False                # let jax detect the cluster

    @property
    def distributed(self) -> bool:
        return self.auto or self.num_processes > 1


def launch_from(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
                environ=None) -> Launch:
    """The launch described by explicit values, else by ``LORM_JAX_COORDINATOR / _NUM_PROCESSES / _PROCESS_ID``
    (or ``LORM_JAX_DISTRIBUTED=auto``); raises ValueError for an incomplete or inconsistent description."""
    env = os.environ if environ is None else environ
    if env.get(ENV_PREFIX + "DISTRIBUTED", "").lower() == "auto" and coordinator is None:
        return Launch(auto=True)
    coordinator = coordinator or env.get(ENV_PREFIX + "COORDINATOR") or None
    num = num_processes if num_processes is not None else env.get(ENV_PREFIX + "NUM_PROCESSES")
    pid = process_id if process_id is not None else env.get(ENV_PREFIX + "PROCESS_ID")
    if coordinator is None and num is None and pid is None:
        return Launch()
    try:
        num, pid = int(num), int(pid)
    except (TypeError, ValueError):
        raise ValueError(f"a multi-process launch needs the coordinator address, the number of processes and this "
                         f"process's id together (got coordinator={coordinator!r}, num_processes={num!r}, "
                         f"process_id={pid!r}; flags --coordinator/--num_processes/--process_id or environment "
                         f"{ENV_PREFIX}COORDINATOR/_NUM_PROCESSES/_PROCESS_ID)") from None
    if num < 1 or not 0 <= pid < num:
        raise ValueError(f"process_id={pid} is invalid for num_processes={num}: need 0 <= process_id < num_processes")
    if num > 1 and not coordinator:
        raise ValueError("a multi-process launch needs the coordinator address host:port (process 0's)")
    return Launch(coordinator=coordinator, num_processes=num, process_id=pid)


def initialize(launch: Launch) -> None:
    """Start jax's distributed runtime for ``launch`` (a no-op for a single process). Call before any device use."""
    if not launch.distributed:
        return
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if launch.auto:
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(coordinator_address=launch.coordinator, num_processes=launch.num_processes,
                                   process_id=launch.process_id)


def is_primary() -> bool:
    """True on the process that writes results and metrics (process 0; always True in a single-process run)."""
    import jax
    return jax.process_index() == 0
