"""``lorm-jax run`` as background processes under load, for the reliability tests and the stress runs: busy-loop
processes beside them, multi-device and two-process launches, a peer killed or stopped mid-run, and what the
survivor's output says (``tests/test_stress.py``; the acceptance runs: ``experiments/stress_reliability.py``)."""
from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np

import lorm_jax
from lorm_jax import workdir as workdir_lib

BURNER_LIMIT_S = 3600  # a busy loop ends by itself even if its parent is killed before it can stop it
# the directory holding this lorm_jax package: first on the children's PYTHONPATH, so they run the same code
SOURCE = os.path.dirname(os.path.dirname(os.path.abspath(lorm_jax.__file__)))


@contextlib.contextmanager
def cpu_burners(n: int, nice: int = 0, limit_s: float = BURNER_LIMIT_S):
    """``n`` busy-loop processes (niceness raised by ``nice``) for the duration of the block, killed in ``finally``."""
    code = ("import os, sys, time\nos.nice(int(sys.argv[1]))\nend = time.time() + float(sys.argv[2])\n"
            "while time.time() < end:\n    pass\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(nice), str(limit_s)]) for _ in range(n)]
    try:
        yield
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


def cli_env(devices: int = 1, xla_flags: str = "", extra: dict | None = None) -> dict:
    """Environment of a CPU run on ``devices`` simulated devices; the pool size is left to lorm_jax.runtime."""
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {xla_flags}".strip(),
               PYTHONPATH=SOURCE + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for name in ("PJRT_NPROC", "NPROC", "JAX_NUM_CPU_DEVICES"):
        env.pop(name, None)
    env.update(extra or {})
    return env


def start(config: str, workdir, *, devices: int = 1, launch: tuple = (), name: str = "run", overrides=(),
          env: dict | None = None, cwd: str | None = None) -> subprocess.Popen:
    """``lorm-jax run`` in the background (``launch = (port, process_id, num_processes)`` for a multi-process run) in
    ``cwd`` (default: this process's); stdout and stderr go to ``<workdir>.<name>.log`` (a file: nobody has to drain a
    pipe while it runs)."""
    args = [sys.executable, "-m", "lorm_jax.cli", "run", "--config", config, "--workdir", str(workdir),
            "--noprogress", *overrides]
    if launch:
        port, pid, num = launch
        args += [f"--coordinator=localhost:{port}", f"--num_processes={num}", f"--process_id={pid}"]
    with open(f"{workdir}.{name}.log", "w") as log:
        proc = subprocess.Popen(args, cwd=cwd, env=env or cli_env(devices), stdout=log, stderr=subprocess.STDOUT)
    proc.log = log.name
    return proc


def finish(procs, timeout: float = 3600) -> list:
    """Wait for every process, all within ``timeout`` s (what is still running then is SIGKILLed: exit -9); their
    (returncode, output)."""
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    outs = []
    for p in procs:
        with open(p.log) as f:
            outs.append((p.returncode, f.read()))
    return outs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def accuracy_matrix(workdir) -> np.ndarray:
    """The accuracy matrix of the finished run in ``workdir`` (NaN above the diagonal: tasks not yet seen)."""
    return np.asarray(workdir_lib.read_results(str(workdir))["accuracy_matrix"], float)


def units_logged(workdir) -> int:
    """Complete lines of ``metrics.jsonl``: unit u+1's line is written after unit u's checkpoint."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        return sum(1 for line in f if line.endswith("\n"))


def failure(out) -> str | None:
    """Why a finished run counts as failed (None if it succeeded)."""
    rc, log = out
    if rc != 0:
        return f"exit {rc}: {last_error(log)}"
    if "Termination timeout" in log:
        return "XLA rendezvous termination message in the log"
    return None


def last_error(log: str) -> str:
    """The most telling line of a failed run's output."""
    lines = [line for line in log.splitlines() if line.strip()]
    for pattern in ("lorm-jax: process", "Termination timeout", "Terminating process", "Error", "error"):
        hits = [line for line in lines if pattern in line]
        if hits:
            return hits[0].strip()[:400]
    return lines[-1][:400] if lines else "(no output)"


def run_two(config, workdir, *, late_s: float = 0.0, overrides=(), timeout: float = 3600, names=("p0", "p1")):
    """Both processes of a 2-process run (process 1 started ``late_s`` after process 0); their outputs."""
    port = free_port()
    first = start(config, workdir, launch=(port, 0, 2), name=names[0], overrides=overrides)
    time.sleep(late_s)
    return finish([first, start(config, workdir, launch=(port, 1, 2), name=names[1], overrides=overrides)], timeout)


def names_lost_peer(log: str, victim: int) -> bool:
    """Whether a survivor's output names process ``victim`` as lost: lorm-jax's own message, or jax's runtime
    message (the coordinator, process 0, is 'the leader task'; others are named by their heartbeat timeout)."""
    if re.search(rf"lost contact with process {victim}\b", log):
        return True
    if victim == 0:
        return "leader task" in log
    return bool(re.search(rf"Task {victim} heartbeat timeout|stopped sending heartbeats\):\s*{victim}\b", log))


def lose_peer(config, workdir, *, victim: int, how: str = "kill", after_units: int = 2, limit_s: float = 120,
              overrides=()) -> dict:
    """Start a 2-process run, SIGKILL (``how='kill'``) or SIGSTOP (``'stop'``) process ``victim`` once
    ``after_units`` units are logged, and time the survivor's exit (killed if it outlives ``limit_s``)."""
    port = free_port()
    procs = [start(config, workdir, launch=(port, i, 2), name=f"lose{i}", overrides=overrides) for i in range(2)]
    try:
        while units_logged(workdir) < after_units:
            if any(p.poll() is not None for p in procs):
                return {"error": "a process ended before the peer was lost: "
                                 + "; ".join(str(failure(o)) for o in finish(procs, 10))}
            time.sleep(0.2)
        procs[victim].send_signal(signal.SIGKILL if how == "kill" else signal.SIGSTOP)
        lost = time.monotonic()
        survivor = procs[1 - victim]
        try:
            rc = survivor.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            rc = None  # still running at the limit (killed below)
        seconds = time.monotonic() - lost
        with open(survivor.log) as f:
            log = f.read()
        return {"rc": rc, "seconds": round(seconds, 1), "within_limit": rc is not None,
                "names_peer": names_lost_peer(log, victim), "message": last_error(log)}
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()  # SIGKILL also ends a stopped process
                p.wait()
