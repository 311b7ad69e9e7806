"""Settings of the XLA CPU runtime that must be in the environment before jax creates its CPU backend.

Simulated devices (``XLA_FLAGS=--xla_force_host_platform_device_count=N`` or ``JAX_NUM_CPU_DEVICES=N``) share one
thread pool of ``max(cores, N)`` threads in XLA's CPU client. A computation on N devices runs as N tasks in that pool
(one per device, gang-scheduled), and the task that *launches* a computation on a device also runs in that pool and
blocks there while the device already has 32 computations in flight. When the host runs that far ahead (a burst of
small eager ops on sharded arrays, queued behind a slow step), launcher tasks can hold some of the N threads while
the next collective needs all N at once: the devices that got a thread wait in the rendezvous for the others, which
never get one (issue 17; ``docs/RELIABILITY.md``). XLA then aborts after its 40 s rendezvous timeout. A pool of
``2 N`` threads always has room for one collective's N participants next to the at most N launcher tasks of the
single dispatching thread, so :func:`configure` sets ``PJRT_NPROC`` (the pool size XLA reads) to
``max(cores, 2 N)``, and gives XLA's in-process rendezvous more slack under load.

:func:`configure` runs when ``lorm_jax`` is imported; it only adds what the user has not set, and does nothing for
one device. It must run before the backend starts (anything that touches a device), which is the case for the
``lorm-jax`` CLI and for any script that imports ``lorm_jax`` before using jax.
"""
from __future__ import annotations

import os
import re
import sys

# XLA's in-process (simulated-device) collective rendezvous: warn after / abort after this many seconds (XLA's own
# defaults are 20 / 40 s). With the pool sized as above no participant waits for a thread; these only bound how long
# a participant descheduled by a heavily loaded machine may lag before XLA gives up.
RENDEZVOUS_WARN_S = 60
RENDEZVOUS_TERMINATE_S = 300
_TIMEOUT_FLAGS = {"xla_cpu_collective_call_warn_stuck_timeout_seconds": RENDEZVOUS_WARN_S,
                  "xla_cpu_collective_call_terminate_timeout_seconds": RENDEZVOUS_TERMINATE_S}
_TIMEOUT_FLAGS_SINCE = (0, 10, 2)  # the jaxlib release these flag names were verified in (unknown flags abort XLA)
_DEVICE_COUNT = re.compile(r"--xla_force_host_platform_device_count=(\d+)")


def host_device_count(environ=None) -> int:
    """Number of CPU devices the backend will create: ``JAX_NUM_CPU_DEVICES`` if set (>= 0), else the last
    ``--xla_force_host_platform_device_count`` in ``XLA_FLAGS``, else 1."""
    env = os.environ if environ is None else environ
    num = env.get("JAX_NUM_CPU_DEVICES", "").strip()
    if num.lstrip("-").isdigit() and int(num) >= 0:
        return max(1, int(num))
    counts = _DEVICE_COUNT.findall(env.get("XLA_FLAGS", ""))
    return max(1, int(counts[-1])) if counts else 1


def settings(environ=None, cores: int | None = None, jaxlib_version: tuple | None = None) -> dict:
    """The environment variables :func:`configure` would set (name -> new value); empty for one device."""
    env = os.environ if environ is None else environ
    devices = host_device_count(env)
    if devices <= 1:
        return {}
    out = {}
    if "PJRT_NPROC" not in env and "NPROC" not in env:  # XLA reads PJRT_NPROC, then NPROC; either is the user's
        cores = len(os.sched_getaffinity(0)) if cores is None else cores
        out["PJRT_NPROC"] = str(max(cores, 2 * devices))
    if jaxlib_version is None:
        from jaxlib import version
        jaxlib_version = tuple(version.__version_info__)
    flags = env.get("XLA_FLAGS", "")
    extra = [f"--{name}={value}" for name, value in _TIMEOUT_FLAGS.items() if f"--{name}=" not in flags]
    if extra and tuple(jaxlib_version) >= _TIMEOUT_FLAGS_SINCE:
        out["XLA_FLAGS"] = " ".join(([flags] if flags.strip() else []) + extra)
    return out


def backend_started() -> bool:
    """True if jax has already created a backend (then environment settings no longer take effect)."""
    bridge = sys.modules.get("jax._src.xla_bridge")
    return bool(bridge is not None and getattr(bridge, "backends_are_initialized", lambda: False)())


def configure(environ=None) -> dict:
    """Apply :func:`settings` to ``environ`` (default ``os.environ``) unless jax's backend has already started;
    returns what was set."""
    env = os.environ if environ is None else environ
    if backend_started():
        return {}
    new = settings(env)
    env.update(new)
    return new
