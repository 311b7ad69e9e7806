"""Reliability under load (issue 17): the multi-device and the multi-process modes next to CPU-burning processes, a
process killed and one started late, and the launch pattern that made XLA's CPU thread pool deadlock.

Every run is the real ``lorm-jax run`` command on the suite's tiny config (``tests/_stress_config.py``, 4 clients),
compared with the same command on one device. Accuracy matrices are compared exactly: they are ratios of integer
counts, and the sharded / multi-process programs compute the same per-client math as one device (what
tests/test_sharding.py and tests/test_distributed.py check without load); load changes scheduling, not numerics.
The runs share a persistent compilation cache, so after the first run of each topology they spend their time
executing (where the aborts happened), not compiling. ``LORM_JAX_STRESS_BURNER_NICE`` (default 0: the busy loops
compete at the test's own priority) lowers the busy loops' priority on a shared machine. The full acceptance runs
(configs/tiny.py, 10 + 5 runs, three ways to lose a peer) are ``experiments/stress_reliability.py``.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from lorm_jax import distributed
from lorm_jax.testing import stress

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.slow

CONFIG = os.path.join(REPO, "tests", "_stress_config.py")
OVERRIDES = ("--config.num_clients=4",)  # on 8 devices: 8 lanes, half of them without a client
BURNERS = 2                              # busy loops, as many as the CI machine's cores
LOST_PEER_LIMIT_S = 120


def burners():
    return stress.cpu_burners(BURNERS, int(os.environ.get("LORM_JAX_STRESS_BURNER_NICE", "0")), limit_s=900)


def _ok(out, what: str):
    assert stress.failure(out) is None, f"{what}: {stress.failure(out)}\n{out[1][-6000:]}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The accuracy matrix of the same command on one device, without load."""
    workdir = tmp_path_factory.mktemp("one_device") / "run"
    _ok(stress.finish([stress.start(CONFIG, workdir, overrides=OVERRIDES)])[0], "the 1-device run")
    return stress.accuracy_matrix(workdir)


def test_pool_starvation_pattern_finishes():
    """The launch pattern behind the aborts (tests/_scale_worker.py pool_check) finishes on 8 devices once lorm_jax
    sized XLA's pool, within a 30 s rendezvous limit the user set (and lorm_jax kept)."""
    env = stress.cli_env(8, "--xla_cpu_collective_call_terminate_timeout_seconds=30")
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tests", "_scale_worker.py"), "pool"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"pool pattern failed ({proc.returncode}):\n{proc.stderr[-5000:]}"
    out = json.loads(lines[-1][len("RESULT "):])
    assert out["devices"] == 8 and out["finite"]
    assert out["pjrt_nproc"] == str(max(len(os.sched_getaffinity(0)), 16)) and out["intra_op_threads"] >= 16


def test_eight_devices_beside_cpu_burners(tmp_path, reference):
    """An 8-device run with busy loops beside it does not abort and gives the 1-device matrix (the acceptance script,
    experiments/stress_reliability.py, runs 10 in a row)."""
    with burners():
        workdir = tmp_path / "eight"
        _ok(stress.finish([stress.start(CONFIG, workdir, devices=8, overrides=OVERRIDES)])[0], "8-device run")
        np.testing.assert_array_equal(stress.accuracy_matrix(workdir), reference)


def test_killed_peer_is_named_within_limit_and_late_rerun_resumes(tmp_path, reference):
    """Two processes (gloo) beside busy loops; process 1 is SIGKILLed after the first unit's checkpoint: process 0
    exits within the limit with EXIT_LOST_PEER and a message naming process 1. Rerunning both, process 1 started 5 s
    after process 0, resumes and gives the 1-device matrix."""
    workdir = tmp_path / "killed"
    with burners():
        lost = stress.lose_peer(CONFIG, workdir, victim=1, limit_s=LOST_PEER_LIMIT_S, overrides=OVERRIDES)
        assert "error" not in lost, lost
        assert lost["within_limit"] and lost["rc"] == distributed.EXIT_LOST_PEER, lost
        assert lost["names_peer"] and "process 0 of 2 lost contact with process 1" in lost["message"], lost
        outs = stress.run_two(CONFIG, workdir, late_s=5.0, overrides=OVERRIDES, names=("rerun0", "rerun1"))
    for i, out in enumerate(outs):
        _ok(out, f"rerun process {i}")
    assert "resumed" in outs[0][1]
    np.testing.assert_array_equal(stress.accuracy_matrix(workdir), reference)
