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

Failures (``docs/RELIABILITY.md``): the processes may start up to ``INIT_TIMEOUT_S`` apart. A process that dies or
hangs is noticed by the others at their next cross-process collective (gloo: connection reset) or, at the latest,
when it has missed heartbeats for ``HEARTBEAT_TIMEOUT_S``; :func:`exit_on_lost_peer` turns the first into one clear
message and exit status ``EXIT_LOST_PEER`` (the second ends the process from jax's runtime, with its own message
naming the task). Either way the survivors stop within about a minute instead of waiting, and rerunning the same
command on every process resumes from the last checkpoint.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import sys

ENV_PREFIX = "LORM_JAX_"
INIT_TIMEOUT_S = 300       # how long a process waits for the others to start
HEARTBEAT_TIMEOUT_S = 60   # a process silent this long is dead (jax's default: 100 s)
SHUTDOWN_TIMEOUT_S = 300   # how long a finished process waits for the others at exit (process 0 writes the results)
EXIT_LOST_PEER = 75        # EX_TEMPFAIL: another process of the run is gone; rerun every process to resume


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
    timeouts = dict(initialization_timeout=INIT_TIMEOUT_S, heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S,
                    shutdown_timeout_seconds=SHUTDOWN_TIMEOUT_S)
    if launch.auto:
        jax.distributed.initialize(**timeouts)
    else:
        jax.distributed.initialize(coordinator_address=launch.coordinator, num_processes=launch.num_processes,
                                   process_id=launch.process_id, **timeouts)


_PEER_LOST = ("gloo", "connection reset", "connection closed", "connection refused", "broken pipe", "heartbeat",
              "coordination service", "barrier", "unavailable:", "deadline_exceeded:")


def is_peer_failure(exc: BaseException) -> bool:
    """True for what jax raises when another process of the run is gone: a cross-process (gloo) collective whose
    connection broke, or the coordination service (barriers, heartbeats) reporting a dead or unreachable task.
    The error type varies (``JaxRuntimeError``; ``ValueError`` from ``process_allgather``), so the message and the
    exception chain are what is checked."""
    while exc is not None:
        if any(k in str(exc).lower() for k in _PEER_LOST):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def lost_peer_message(exc: BaseException, process: int, num_processes: int, workdir: str | None = None) -> str:
    """What surviving process ``process`` of ``num_processes`` prints: whom it lost, jax's reason, how to resume."""
    others = [i for i in range(num_processes) if i != process]
    peer = f"process {others[0]}" if len(others) == 1 else f"one of processes {others}"
    reason = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
    where = f" in {workdir}" if workdir else ""
    return (f"lorm-jax: process {process} of {num_processes} lost contact with {peer}: {reason}\n"
            f"A multi-process run cannot continue without all its processes. Restart all {num_processes} processes "
            f"with the same command: the run resumes from the last checkpoint{where}.")


@contextlib.contextmanager
def exit_on_lost_peer(launch: Launch, workdir: str | None = None):
    """Around a multi-process run: if another process is lost, print :func:`lost_peer_message` and leave at once with
    ``EXIT_LOST_PEER``, skipping jax's exit barrier (which would otherwise wait for the dead process until its
    heartbeat times out, then abort). Checkpoints are atomic, so nothing needs finishing. Other errors pass through."""
    try:
        yield
    except Exception as exc:
        if not (launch.distributed and is_peer_failure(exc)):
            raise
        import jax
        sys.stdout.flush()
        print(lost_peer_message(exc, jax.process_index(), jax.process_count(), workdir), file=sys.stderr, flush=True)
        os._exit(EXIT_LOST_PEER)


def is_primary() -> bool:
    """True on the process that writes results and metrics (process 0; always True in a single-process run)."""
    import jax
    return jax.process_index() == 0
