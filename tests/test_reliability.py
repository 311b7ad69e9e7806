"""Reliability (issue #9): crashes lose at most the unit in flight, resumes are bit-identical, numerics never corrupt
a run silently, and data edge cases are handled or refused clearly."""
import dataclasses
import gzip
import json
import logging
import os
import struct
import subprocess
import sys

import chex
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import REPO, TINY, small_config, small_flags, tiny_config

from lorm_jax import checkpointing, continual, merging, metrics, plan, rounds
from lorm_jax import workdir as workdir_lib
from lorm_jax.data import datasets as D
from lorm_jax.data import partition as P
from lorm_jax.testing import faults


def _results(workdir):
    with open(os.path.join(workdir, "results.json")) as f:
        return json.load(f)


def _metric_lines(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


# ----------------------------------------------------------------------------------------------------------------------
# Crash safety: a real `lorm-jax run` killed (SIGKILL) or stopped (SIGINT / SIGTERM) at chosen points, then restarted

def _cli(workdir, fault=None):
    """The real command on tests/conftest.py's small config (6 units); with a ``fault``, the same command through
    :mod:`lorm_jax.testing.faults`, which injects it. Restarts read their programs from the suite's compilation cache
    (tests/conftest.py)."""
    env = {k: v for k, v in os.environ.items() if k != faults.FAULT_ENV}
    if fault:
        env[faults.FAULT_ENV] = fault
    module = "lorm_jax.testing.faults" if fault else "lorm_jax.cli"
    return subprocess.run([sys.executable, "-m", module, "run", "--config", TINY, *small_flags(),
                           "--workdir", str(workdir), "--noprogress"],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=600)


def _partial_steps(workdir):
    folder = os.path.join(workdir, "checkpoints")
    return [n for n in os.listdir(folder) if checkpointing.TMP_MARKER in n]


# (fault, expected exit status, checkpointed units afterwards).
# Units: task 0 = 0, 1 (rounds), 2 (end); task 1 = 3, 4, 5.
CHAIN = [
    ("train@1", -9, 1),             # SIGKILL right after the clients' local training of round 1
    ("merge@2", -9, 2),             # SIGKILL inside the end-of-task (cross-task) merge
    ("checkpoint@2", -9, 2),        # SIGKILL mid-checkpoint: files written, atomic rename not done
    ("train@3:SIGINT", 130, 4),     # Ctrl-C during training: unit 3 finishes, is saved, exit 130
    ("merge@4:SIGTERM", 143, 5),    # SIGTERM during a round merge: unit 4 finishes, is saved, exit 143
    (None, 0, 6),                   # the last restart finishes the run
]


@pytest.mark.slow
def test_killed_and_signalled_runs_resume_to_identical_results(tmp_path):
    full = tmp_path / "full"
    proc = _cli(full)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = _results(full)

    workdir = tmp_path / "interrupted"
    for fault, status, done in CHAIN:
        proc = _cli(workdir, fault)
        assert proc.returncode == status, (fault, proc.returncode, proc.stderr[-3000:])
        if fault == "checkpoint@2":
            assert _partial_steps(workdir) == [f"3{checkpointing.TMP_MARKER}"]  # really killed mid-write
        else:
            assert _partial_steps(workdir) == []  # the previous run's half-written step was removed
        assert checkpointing.latest_step(str(workdir)) == done, fault
        if status in (130, 143):
            name = fault.split(":")[1]
            assert f"{name}: stopped with {done} of 6 units done" in proc.stderr, proc.stderr[-3000:]
            assert "Run the same command again to resume" in proc.stderr
        if status != 0:
            assert not (workdir / "results.json").exists()
    assert _results(workdir) == expected  # bit-identical: json floats round-trip exactly
    assert [m["unit"] for m in _metric_lines(workdir)] == list(range(6))  # every unit logged exactly once


def test_torn_metrics_line_and_unsaved_units_are_dropped_on_resume(tmp_path):
    workdir = str(tmp_path)
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
        f.write(json.dumps({"unit": 0}) + "\n" + json.dumps({"unit": 1}) + "\n" + '{"unit": 2, "lo')
    workdir_lib.truncate_metrics(workdir, 1)
    assert _metric_lines(workdir) == [{"unit": 0}]


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints: never from a non-finite state, half-written steps ignored and removed, unreadable steps skipped

def _state(unit, value=1.0):
    return {"unit": np.array(unit, np.int64), "lora": {"A": np.full((2, 3), value, np.float32)},
            "acc": np.full((2, 2), np.nan)}  # NaN accuracy entries (tasks not reached) are legitimate


def test_checkpoint_refuses_non_finite_state(tmp_path):
    workdir = str(tmp_path)
    checkpointing.save(workdir, 1, _state(1))
    for bad in (np.nan, np.inf):
        with pytest.raises(FloatingPointError, match=r"refusing to write checkpoint 2 .*\['lora'\]\['A'\]"):
            checkpointing.save(workdir, 2, _state(2, bad))
    assert checkpointing.latest_step(workdir) == 1
    assert int(checkpointing.restore(workdir, _state(0))["unit"]) == 1


def test_half_written_step_is_ignored_and_removed(tmp_path):
    workdir = str(tmp_path)
    checkpointing.save(workdir, 1, _state(1))
    partial = tmp_path / "checkpoints" / f"2{checkpointing.TMP_MARKER}-1700000000"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "junk").write_bytes(b"\0" * 10)
    assert checkpointing.latest_step(workdir) == 1  # ignored
    assert int(checkpointing.restore(workdir, _state(0))["unit"]) == 1
    assert not partial.exists()  # and removed when the run resumes
    checkpointing.save(workdir, 2, _state(2))  # the step number is free again
    assert int(checkpointing.restore(workdir, _state(0))["unit"]) == 2

    def crash(destination):
        raise KeyboardInterrupt  # stands in for a kill between writing the files and the commit
    with pytest.raises(KeyboardInterrupt), faults.before_commit(crash):
        checkpointing.save(workdir, 3, _state(3))
    assert _partial_steps(workdir) == [f"3{checkpointing.TMP_MARKER}"]
    assert int(checkpointing.restore(workdir, _state(0))["unit"]) == 2
    assert _partial_steps(workdir) == []


def test_unreadable_latest_step_falls_back_to_the_previous_one(tmp_path, caplog):
    workdir = str(tmp_path)
    checkpointing.save(workdir, 1, _state(1))
    checkpointing.save(workdir, 2, _state(2))
    for root, _, files in os.walk(tmp_path / "checkpoints" / "2"):
        for name in files:
            if not name.startswith("_CHECKPOINT_METADATA"):
                (tmp_path / root / name).write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING, logger="lorm_jax"):
        restored = checkpointing.restore(workdir, _state(0))
    assert int(restored["unit"]) == 1
    assert "checkpoint 2" in caplog.text and "cannot be read" in caplog.text
    assert checkpointing.latest_step(workdir) == 1
    checkpointing.save(workdir, 2, _state(2))  # and step 2 can be written again
    assert int(checkpointing.restore(workdir, _state(0))["unit"]) == 2


def test_unreadable_checkpoints_are_kept_and_named(tmp_path):
    workdir = str(tmp_path)
    checkpointing.save(workdir, 1, _state(1))
    other = {"unit": np.array(0, np.int64), "something_else": np.zeros(4, np.float32)}
    with pytest.raises(RuntimeError, match="no checkpoint in .* can be read"):
        checkpointing.restore(workdir, other)
    assert checkpointing.latest_step(workdir) == 1  # nothing deleted


# ----------------------------------------------------------------------------------------------------------------------
# Numerical guards

@pytest.fixture(scope="module")
def small_setup():
    """Two tasks of 1 and 3 classes (a single-class task is an edge case of its own), 4 clients."""
    d = small_config().to_dict()
    d["data"]["classes_per_task"] = (1, 3)  # int by default: a ConfigDict built anew takes the tuple
    return _float_images(plan.build_setup(ml_collections.ConfigDict(d)))  # one compilation for all tests here


def _float_images(setup, nan_clients=(), task=1):
    """The setup with float images (same values as the uint8 ones) and NaN images for ``nan_clients`` of ``task``."""
    x = np.array(setup.train["x"], np.float32)
    x = x / 255.0 if setup.train["x"].dtype == jnp.uint8 else x
    for k in nan_clients:
        x[setup.partitions[task][k]] = np.nan
    return dataclasses.replace(setup, train=dict(setup.train, x=jnp.asarray(x)))


@pytest.mark.slow
def test_client_with_nan_data_is_left_out_of_the_merge(small_setup, caplog, tmp_path):
    state = rounds.initial_state(small_setup)
    poisoned = _float_images(small_setup, nan_clients=[1])
    with caplog.at_level(logging.WARNING, logger="lorm_jax"):
        new, line = rounds.run_round(poisoned, state, 1, 0)
    assert line["excluded_clients"] == [1]
    assert "clients [1]" in caplog.text and "left out of the merge" in caplog.text
    chex.assert_tree_all_finite((new["lora"], new["head"]))
    assert np.isfinite(line["loss"])
    # Same as a round in which client 1 simply had no data (the other clients' work does not depend on it).
    parts = [list(p) for p in small_setup.partitions]
    parts[1][1] = parts[1][1][:0]
    with pytest.raises(ValueError, match="with_partitions"):  # the packed passes were laid out for the old partitions
        rounds.run_round(dataclasses.replace(small_setup, partitions=parts), state, 1, 0)
    without = plan.with_partitions(_float_images(small_setup), parts)
    reference, _ = rounds.run_round(without, state, 1, 0)
    assert not np.allclose(reference["head"]["w"], state["head"]["w"])  # the round did train
    chex.assert_trees_all_close((new["lora"], new["head"]), (reference["lora"], reference["head"]), rtol=1e-5,
                                atol=1e-6)
    checkpointing.save(str(tmp_path), 1, new)  # the merged state is finite, so it can be checkpointed


@pytest.mark.slow  # its own compiled setup; the fast lane has the NaN-client merges of test_methods
def test_round_with_no_finite_client_keeps_the_server_model(small_setup, caplog):
    state = rounds.initial_state(small_setup)
    poisoned = _float_images(small_setup, nan_clients=range(small_setup.config.num_clients))
    with caplog.at_level(logging.WARNING, logger="lorm_jax"):
        new, line = rounds.run_round(poisoned, state, 1, 0)
    assert line["excluded_clients"] == list(range(small_setup.config.num_clients))
    assert "server model is kept unchanged" in caplog.text
    chex.assert_trees_all_equal((new["lora"], new["head"]), (state["lora"], state["head"]))


@pytest.mark.slow
def test_gram_health_reports_singular_and_ill_conditioned_grams():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 6)).astype(np.float32)
    well = merging.gram_health(jnp.asarray(x.T @ x))
    assert float(well["pinv"]) == 0 and 0.05 < float(well["min_pivot"]) <= 1
    low_rank = x[:, :3].astype(np.float64) @ rng.normal(size=(3, 6))  # rank 3 of 6
    # formed in float64 and rounded once, so the scaled Gram is singular up to u = 6e-8 per entry on any CPU: its
    # Cholesky breaks down (pivot² 0 here) or leaves a pivot² of rounding size O(d u) ≈ 1e-6 < 1e-5. A float32
    # product of 40 terms would leave up to γ_40 ≈ 2.4e-6 per entry, in a CPU-dependent pattern.
    singular = jnp.asarray((low_rank.T @ low_rank).astype(np.float32))
    sick = merging.gram_health(singular)
    assert float(sick["pinv"]) == 1 and float(sick["min_pivot"]) < merging.SINGULAR_PIVOT[jnp.dtype(jnp.float32)]
    out = merging.solve_gram(jnp.asarray(rng.normal(size=(2, 6)), jnp.float32), singular)
    assert np.all(np.isfinite(out))
    dead = merging.gram_health(jnp.asarray([2.0, 0.0, 1e-30, 0.0]))
    assert float(dead["dead"]) == 2 and float(dead["pinv"]) == 0 and float(dead["min_pivot"]) == 1
    assert float(merging.gram_health(jnp.zeros((3, 3)))["dead"]) == 3
    terms = {"layer": jnp.stack([singular, jnp.zeros((6, 6))]), "head": jnp.ones((2, 4))}  # two clients' Grams
    conditioning = metrics.gram_conditioning(terms, stacked=True)
    assert conditioning["gram_pinv_layers"] == 1 and conditioning["gram_dead_features"] == 0
    assert 0 <= conditioning["gram_min_pivot"] < 1e-5  # the singular layer's pivot², see above
    assert conditioning == metrics.gram_conditioning({p: g.sum(0) for p, g in terms.items()})  # the sums, as rounds


# ----------------------------------------------------------------------------------------------------------------------
# Data edge cases

@pytest.mark.slow
def test_strong_skew_ten_clients_completes_above_chance(tmp_path):
    """β = 0.01, 10 clients on configs/tiny.py: most clients hold no sample of a task (weight 0 in every merge)."""
    c = tiny_config(num_clients=10, **{"data.beta": 0.01, "data.min_samples": 0})
    results = continual.run(c, str(tmp_path), progress=False)
    with open(tmp_path / "partition.json") as f:
        counts = np.asarray(json.load(f)["client_label_counts"])  # [T, K, C]
    sizes = counts.sum(-1)
    assert (sizes == 0).sum(-1).min() >= 5  # every task leaves at least half of the clients empty
    acc = np.asarray(results["accuracy_matrix"], float)
    assert np.all(np.isfinite(acc[np.tril_indices(3)]))
    assert results["final_average_accuracy"] > 1 / 6 + 0.1  # chance is 1/6 on 6 classes
    for m in _metric_lines(tmp_path):
        assert np.isfinite(m.get("loss", 0.0)) and np.isfinite(m["gram_min_pivot"])
        if m["round"] != "end":
            assert m["excluded_clients"] == []
            assert sorted(k for k, n in enumerate(m["client_samples"]) if n == 0) == \
                np.flatnonzero(sizes[m["task"]] == 0).tolist()


@pytest.mark.slow  # compiles small_setup's programs (~15 s); the fast lane keeps the checkpoint and data cases
def test_single_class_task(small_setup):
    """Task 0 has one class: its loss is 0 (one logit), nothing breaks, and it is trivially classified."""
    state = rounds.initial_state(small_setup)
    for rnd in range(small_setup.config.rounds):
        state, line = rounds.run_round(small_setup, state, 0, rnd)
        assert line["loss"] == 0.0 and line["excluded_clients"] == []
    state, line = rounds.end_task(small_setup, state, 0)
    assert line["task_accuracy"] == [1.0]
    chex.assert_tree_all_finite((state["lora"], state["head"], state["task_grams"]))


@pytest.mark.parametrize("mode", ["dirichlet", "iid", "quantity"])
def test_more_clients_than_samples(mode):
    labels = np.array([0, 0, 1, 1, 1])
    parts = P.partition(labels, 8, mode, np.random.default_rng(0), beta=0.01, min_samples=0, classes_per_client=1)
    assert len(parts) == 8 and sum(len(p) for p in parts) == 5
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(5))
    assert sum(len(p) == 0 for p in parts) >= 3


def _idx_bytes(arr: np.ndarray) -> bytes:
    return bytes([0, 0, 0x08, arr.ndim]) + struct.pack(">" + "i" * arr.ndim, *arr.shape) + arr.tobytes()


def _fashion_dir(tmp_path, n=6):
    for prefix in ("train", "t10k"):
        (tmp_path / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(
            np.zeros((n, 28, 28), np.uint8))))
        (tmp_path / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(
            np.arange(n, dtype=np.uint8) % 10)))
    return tmp_path


@pytest.mark.parametrize("damage,words", [
    ("truncate", "truncated"),
    ("swap", "not a Fashion-MNIST image file"),          # a labels file where the images belong: magic 0x801
    ("badmagic", "bad magic number"),
    ("shape", "not a Fashion-MNIST image file"),         # 32x32 images
    ("count", "5 images but 6 labels"),
])
def test_damaged_fashion_mnist_file_is_named_with_the_fix(tmp_path, damage, words):
    d = _fashion_dir(tmp_path)
    target = d / "train-images-idx3-ubyte.gz"
    raw = gzip.decompress(target.read_bytes())
    if damage == "truncate":
        raw = raw[:-100]
    elif damage == "swap":
        raw = gzip.decompress((d / "train-labels-idx1-ubyte.gz").read_bytes())
    elif damage == "badmagic":
        raw = b"\x08\x03" + raw[2:]
    elif damage == "shape":
        raw = _idx_bytes(np.zeros((6, 32, 32), np.uint8))
    elif damage == "count":
        raw = _idx_bytes(np.zeros((5, 28, 28), np.uint8))
    target.write_bytes(gzip.compress(raw))
    with pytest.raises(D.DatasetFormatError) as e:
        D.load("fashion_mnist", data_dir=str(d))
    msg = str(e.value)
    assert "train-images-idx3-ubyte.gz" in msg and words in msg, msg
    assert "apt-get install --reinstall dataset-fashion-mnist" in msg and "config.data.options.data_dir" in msg
