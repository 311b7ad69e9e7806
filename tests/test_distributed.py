"""Multi-host: launch description from flags / environment, and two localhost processes (jax.distributed, gloo CPU
collectives) that together run the tiny experiment and match the single-process result."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from lorm_jax import distributed
from tests.test_sharding import REPO, WORKER, worker


def test_launch_from_flags_and_environment():
    assert not distributed.launch_from(environ={}).distributed
    env = {"LORM_JAX_COORDINATOR": "h:1", "LORM_JAX_NUM_PROCESSES": "4", "LORM_JAX_PROCESS_ID": "3"}
    assert distributed.launch_from(environ=env) == distributed.Launch("h:1", 4, 3)
    assert distributed.launch_from("x:2", 2, 0, environ=env) == distributed.Launch("x:2", 2, 0)  # flags win
    assert distributed.launch_from(environ={"LORM_JAX_DISTRIBUTED": "auto"}).auto
    with pytest.raises(ValueError, match="together"):
        distributed.launch_from("h:1", environ={})
    with pytest.raises(ValueError, match="process_id"):
        distributed.launch_from("h:1", 2, 2, environ={})
    with pytest.raises(ValueError, match="coordinator"):
        distributed.launch_from(None, 2, 0, environ={})


def test_lost_peer_is_recognised_and_named():
    import jax
    gloo = jax.errors.JaxRuntimeError("UNKNOWN: Gloo AllGather failed: [pair.cc:547] Connection closed by peer "
                                      "[127.0.0.1]:53441")
    assert distributed.is_peer_failure(gloo)
    try:  # wrapped by another exception (e.g. a checkpoint writer's): still recognised through the chain
        raise RuntimeError("save failed") from gloo
    except RuntimeError as wrapped:
        assert distributed.is_peer_failure(wrapped)
    assert distributed.is_peer_failure(ValueError("UNKNOWN: Gloo AllGather failed"))  # process_allgather's type
    assert not distributed.is_peer_failure(jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: out of memory"))
    assert not distributed.is_peer_failure(ValueError("config.rank = 0 is invalid: need >= 1"))
    two = distributed.lost_peer_message(gloo, 0, 2, "runs/x")
    assert two.startswith("lorm-jax: process 0 of 2 lost contact with process 1: UNKNOWN: Gloo AllGather failed")
    assert "Restart all 2 processes" in two and "runs/x" in two
    assert "one of processes [0, 2, 3]" in distributed.lost_peer_message(gloo, 1, 4)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    """5 clients over 2 processes × 1 CPU device (padded to 6, 3 per process); process 0 alone writes the results.

    The reference is one process with 2 devices: the same 3 clients per device, so each device runs the same program
    on the same data and only the distributed runtime (gloo collectives, coordination) differs. Against 1 device of 6
    clients the vmapped matmuls would round differently and AdamW would amplify that (a tolerance of one CPU)."""
    single = worker("run", tmp_path / "single", 0, 5, devices=2)
    port, workdir = _free_port(), tmp_path / "multi"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    procs = [subprocess.Popen([sys.executable, WORKER, "proc", str(i), "2", str(port), str(workdir), "5"], cwd=REPO,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=600)
            assert p.returncode == 0, f"process failed:\n{stdout[-2000:]}\n{stderr[-5000:]}"
            outs.append(next(line for line in stdout.splitlines() if line.startswith("RESULT ")))
    finally:
        for p in procs:  # a failed peer must not leave the other waiting for the coordinator
            if p.poll() is None:
                p.kill()
    first, second = (json.loads(o[len("RESULT "):]) for o in outs)
    assert first["process_index"] == 0 and second["process_index"] == 1
    assert first["devices"] == 2 and first["local_devices"] == 1
    # same programs, same inputs, 2-term all-reduces (a + b = b + a exactly): bit-identical, on any CPU
    assert first["accuracy_matrix"] == single["accuracy_matrix"]
    np.testing.assert_array_equal(first["client_loss"], single["client_loss"])
    assert len(first["client_loss"][0]) == 5
    assert os.path.exists(workdir / "results.json") and not os.path.exists(workdir / "results.json.tmp")
