"""Partial participation (issue #26): the seeded draw of a round's clients, only they enter a merge, and a run with
it does not depend on devices or on being killed and resumed."""
import dataclasses
import json
import os
import subprocess
import sys

import chex
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ONE_BLOCK, REPO, TINY, small_config, small_flags

from lorm_jax import config as config_lib
from lorm_jax import plan, rng, rounds
from lorm_jax.testing import faults


def test_draw_is_what_the_seed_says():
    """m of K clients without replacement from ``default_rng([seed, task, round, PARTICIPATION])``, ascending; all of
    them for 0 or K; a function of (seed, task, round) only, never of lanes, waves or the mesh."""
    for seed, task, rnd, k, m in [(0, 0, 0, 10, 3), (7, 2, 1, 1000, 50), (3, 1, 5, 10_000, 100)]:
        want = np.sort(np.random.default_rng([seed, task, rnd, rng.PARTICIPATION]).choice(k, m, replace=False))
        got = rng.participants(seed, task, rnd, k, m)
        np.testing.assert_array_equal(got, want)
        assert len(np.unique(got)) == m and got.min() >= 0 and got.max() < k
    np.testing.assert_array_equal(rng.participants(0, 0, 0, 10, 0), np.arange(10))
    np.testing.assert_array_equal(rng.participants(0, 0, 0, 10, 10), np.arange(10))
    draws = {tuple(rng.participants(0, t, r, 100, 10)) for t in range(3) for r in range(4)}
    assert len(draws) == 12  # every (task, round) draws anew
    base = small_config(num_clients=10, clients_per_round=3)
    for layout in ({"client_lanes": 3}, {"clients_per_wave": 1}, {"mesh_clients": 1}):
        c = config_lib.override(base, **layout)
        for t, r in ((0, 0), (1, 2)):
            np.testing.assert_array_equal(plan.round_clients(c, t, r), rng.participants(0, t, r, 10, 3))
    with pytest.raises(config_lib.InputError, match="clients_per_round"):
        config_lib.validate(small_config(num_clients=4, clients_per_round=5))


@pytest.fixture(scope="module")
def partial():
    """4 clients, 2 drawn per round, float images (replaceable by noise), 1-block ViT."""
    s = plan.build_setup(small_config(**ONE_BLOCK, num_clients=4, clients_per_round=2,
                                      **{"data.min_samples": 2}))
    x = np.array(s.train["x"], np.float32) / 255.0
    return dataclasses.replace(s, train=dict(s.train, x=jnp.asarray(x)))


def _poison(setup, task, clients):
    """Other images (uniform noise) for ``clients`` of ``task``. Finite: the padding slots of packed batches read
    example 0 with weight 0, which adds exact zeros for any finite value (a NaN there would not)."""
    x = np.array(setup.train["x"])
    gen = np.random.default_rng(5)
    for k in clients:
        x[setup.partitions[task][k]] = gen.uniform(0, 1, x[setup.partitions[task][k]].shape)
    return dataclasses.replace(setup, train=dict(setup.train, x=jnp.asarray(x)))


def test_non_participants_data_never_enter_a_merge(partial):
    """Other images for every client not drawn leave the rounds and the task's end bit-identical: nothing of theirs is
    trained on, taken a Gram of or merged. The metrics name the drawn clients; the ledger counts them."""
    s, c = partial, partial.config
    state = rounds.initial_state(s)
    clean, poisoned = state, state
    for rnd in range(c.rounds):
        drawn = plan.round_clients(c, 0, rnd)
        assert len(drawn) == 2
        others = sorted(set(range(4)) - set(drawn.tolist()))
        clean, line = rounds.run_round(s, clean, 0, rnd)
        poisoned, poisoned_line = rounds.run_round(_poison(s, 0, others), poisoned, 0, rnd)
        assert line["clients"] == drawn.tolist() and poisoned_line["excluded_clients"] == []
        assert len(line["client_loss"]) == 2 and line["participants"] == 2
        assert line["upload_bytes_total"] == 2 * line["upload_bytes"]
        chex.assert_trees_all_equal((poisoned["lora"], poisoned["head"]), (clean["lora"], clean["head"]))
        chex.assert_tree_all_finite((poisoned["lora"], poisoned["head"]))
    assert not np.allclose(clean["head"]["w"], state["head"]["w"])  # the rounds did train
    drawn = plan.round_clients(c, 0, c.rounds)  # the end of the task draws its own clients
    others = sorted(set(range(4)) - set(drawn.tolist()))
    end_clean, _ = rounds.end_task(s, clean, 0)
    end_poisoned, _ = rounds.end_task(_poison(s, 0, others), poisoned, 0)
    chex.assert_trees_all_equal(end_poisoned["task_grams"], end_clean["task_grams"])
    chex.assert_tree_all_finite(end_clean["task_grams"])


# ----------------------------------------------------------------------------------------------------------------------
# Whole runs: 1 vs 8 devices, killed and resumed

def _worker(*args, devices: int) -> dict:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tests", "_scale_worker.py"), *map(str, args)],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=900)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"worker {args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.slow
def test_partial_participation_eight_devices_match_one(tmp_path):
    """8 clients, 3 drawn per round, on a mesh of 1 and of 8 host devices (float64 runs, tests/_scale_worker.py):
    the same clients train and the same accuracies come out."""
    one = _worker("run", tmp_path / "one", 1, 8, 0, 3, devices=8)
    eight = _worker("run", tmp_path / "eight", 8, 8, 0, 3, devices=8)
    assert one["devices"] == eight["devices"] == 8
    assert one["clients"] == eight["clients"] and all(len(x) == 3 for x in one["clients"])
    np.testing.assert_allclose(np.asarray(eight["accuracy_matrix"], float), np.asarray(one["accuracy_matrix"], float),
                               atol=1e-9)
    np.testing.assert_allclose(eight["client_loss"], one["client_loss"], atol=1e-9)


def _cli(workdir, fault=None):
    env = {k: v for k, v in os.environ.items() if k != faults.FAULT_ENV}
    if fault:
        env[faults.FAULT_ENV] = fault
    module = "lorm_jax.testing.faults" if fault else "lorm_jax.cli"
    return subprocess.run([sys.executable, "-m", module, "run", "--config", TINY,
                           *small_flags(num_clients=4, clients_per_round=2, **{"data.min_samples": 2}),
                           "--workdir", str(workdir), "--noprogress"],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=600)


@pytest.mark.slow
def test_partial_participation_killed_and_resumed_is_identical(tmp_path):
    """SIGKILL after a round's training and inside the end-of-task merge, then the same command again: the results
    and every round's drawn clients equal an uninterrupted run's."""
    proc = _cli(tmp_path / "full")
    assert proc.returncode == 0, proc.stderr[-3000:]
    workdir = tmp_path / "killed"
    for fault, status in (("train@1", -9), ("merge@2", -9), (None, 0)):
        proc = _cli(workdir, fault)
        assert proc.returncode == status, (fault, proc.returncode, proc.stderr[-3000:])

    def read(w):
        with open(w / "results.json") as f:
            results = json.load(f)
        with open(w / "metrics.jsonl") as f:
            lines = [json.loads(line) for line in f if line.strip()]
        return results["accuracy_matrix"], [(m["unit"], m.get("clients"), m.get("client_loss")) for m in lines]

    assert read(workdir) == read(tmp_path / "full")


def test_memory_plan_refuses_what_cannot_fit_before_compiling(tmp_path):
    """A run whose one batch cannot fit the device is refused by the real command with one line and exit 2, before
    anything compiles (the activations are traced, not run)."""
    proc = subprocess.run([sys.executable, "-m", "lorm_jax.cli", "run", "--config", TINY, "--config.batch_size=2000000",
                           "--workdir", str(tmp_path / "run"), "--noprogress"],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("lorm-jax: error: the run does not fit the memory plan:") and "the budget is" in last
    assert "compiled" not in proc.stderr and not (tmp_path / "run" / "checkpoints").exists()
