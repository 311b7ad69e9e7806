"""Client axis over a device mesh: chunk layout, no-op padding clients, the memory planner, 8 host devices vs 1, and
100 clients on this CPU."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lorm_jax import continual, federated, sharding
from tests._tiny import tiny_config, tiny_setup

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO, "tests", "_scale_worker.py")


def worker(*args, devices: int = 1, timeout: int = 600) -> dict:
    """Run tests/_scale_worker.py in a fresh interpreter with ``devices`` host CPU devices; its RESULT line."""
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, WORKER, *map(str, args)], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"worker {args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return json.loads(lines[-1][len("RESULT "):])


def test_chunk_layout_is_balanced_and_a_multiple_of_the_mesh():
    assert federated.chunk_layout(100, 0, 1) == (100, 100)       # 0 = all at once
    assert federated.chunk_layout(100, 32, 1) == (25, 100)       # 4 balanced calls, no padding
    assert federated.chunk_layout(10, 0, 8) == (16, 16)          # one call, 6 no-op clients
    assert federated.chunk_layout(5, 2, 1) == (2, 6)             # equal calls: one compiled shape
    for num, chunk, devices in [(7, 3, 2), (100, 7, 4), (3, 0, 8), (33, 16, 8)]:
        per_call, total = federated.chunk_layout(num, chunk, devices)
        assert per_call % devices == 0 and total % per_call == 0 and total >= num
        assert total - num < per_call  # never a whole call of padding


def test_mesh_errors_name_the_key():
    assert sharding.mesh_size(sharding.make_mesh(0)) == jax.device_count()
    with pytest.raises(ValueError, match="mesh_clients"):
        sharding.make_mesh(jax.device_count() + 1)
    assert sharding.padded_size(5, 4) == 8 and sharding.padded_size(0, 4) == 4
    padded = sharding.pad_clients({"m": np.ones((3, 2), bool)}, 4)["m"]
    assert padded.shape == (4, 2) and not padded[3].any()  # a padded client's masks are all False


def test_padded_groups_equal_one_call():
    """K = 5 clients in 3 calls of 2 (one zero-padded no-op client) == all 5 in one call: padding changes nothing."""
    setup = tiny_setup()
    idx, mask = continual._schedule(setup, 0, 0, 0, 16, 1, setup.train_steps, True)
    idx, mask = np.concatenate([idx, idx[:1]]), np.concatenate([mask, mask[:1]])  # a 5th client
    keys = continual.client_keys(0, 0, 0, np.arange(5), 0)
    state = continual.initial_state(setup)
    rows = jnp.asarray(continual._task_rows(setup, 0))

    def train(chunk):
        return federated.numpy_tree(federated.run_chunked(
            setup.fns.train, (idx, mask, keys), (setup.backbone.params, setup.train, state["lora"], state["head"]),
            (jnp.asarray([0.0, 1.0]), jnp.float32(1e-2), rows), chunk, setup.fns.mesh))

    one, grouped = train(0), train(2)
    assert grouped["loss"].shape == (5,)
    np.testing.assert_allclose(grouped["loss"], one["loss"], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grouped["lora"], one["lora"])
    assert np.all(grouped["finite"])
    # The padded no-op client itself: all-False masks leave the server model unchanged.
    noop = federated.numpy_tree(setup.fns.train(setup.backbone.params, setup.train, state["lora"], state["head"],
                                                np.zeros_like(idx[:1]), np.zeros_like(mask[:1]), keys[:1],
                                                jnp.asarray([0.0, 1.0]), jnp.float32(1e-2), rows))
    assert int(noop["num_steps"][0]) == 0
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a[0], b), noop["lora"], state["lora"])


def test_memory_plan_fits_the_budget():
    bb = tiny_setup().backbone
    kwargs = dict(num_clients=10, num_classes=4, rank=4, batch_size=16, gram_batch_size=16, backbone_gram="diag",
                  head_gram="full", shared_bytes=1000)
    big = federated.plan_memory(bb, budget_bytes=10**12, **kwargs)
    assert big.chunk == 10  # everything fits: one call
    assert big.gram_full_bytes > big.gram_diag_bytes > 0
    assert big.per_client_bytes >= big.activation_bytes + big.lora_bytes > 0
    assert big.activation_bytes == federated.activation_bytes(bb, 4, 16)
    assert federated.activation_bytes(bb, 4, 32) > big.activation_bytes  # grows with the batch
    small = federated.plan_memory(bb, budget_bytes=1000 + 3 * big.per_client_bytes + 1, **kwargs)
    assert small.chunk == 3  # 3 clients per call fit; 4 calls of 3 (2 no-op clients)
    assert "activations per batch" in small.table() and "4 call(s)" in small.table()
    tiny = federated.plan_memory(bb, budget_bytes=1, **kwargs)
    assert tiny.chunk == 1  # never less than one client per device


def test_eight_devices_match_one_device(tmp_path):
    """Acceptance: the run sharded over 8 host devices gives the single-device results (and per-client losses), and
    the server merge on client-sharded inputs equals the host merge, reduced with an all-reduce."""
    merge = worker("merge", devices=8)
    assert merge.pop("mesh") == 8
    for name, m in merge.items():
        assert m["input_sharded"] and m["all_reduce"], name
        assert m["max_rel_err"] < 1e-5, (name, m)
    one = worker("run", tmp_path / "one", 1, 8, devices=8)
    eight = worker("run", tmp_path / "eight", 8, 8, devices=8)
    assert one["devices"] == eight["devices"] == 8
    np.testing.assert_allclose(np.asarray(eight["accuracy_matrix"], float), np.asarray(one["accuracy_matrix"], float),
                               atol=1e-9)
    np.testing.assert_allclose(eight["client_loss"], one["client_loss"], atol=1e-4)
    assert len(one["client_loss"][0]) == 8


def test_hundred_clients_two_rounds(tmp_path):
    """Acceptance: 100 clients × 2 rounds (2 tasks) of the tiny config in one process (auto chunk by the planner)."""
    c = tiny_config(num_clients=100, **{"data.min_samples": 1, "data.beta": 5.0})
    c.data.options = {"num_classes": 4, "n_train": 300, "n_test": 12, "image_size": 16, "seed": 0}
    results = continual.run(c, str(tmp_path / "k100"), progress=False)
    with open(tmp_path / "k100" / "metrics.jsonl") as f:
        rounds = [json.loads(line) for line in f if "client_loss" in line]
    assert len(rounds) == 4 and all(len(r["client_loss"]) == 100 for r in rounds)
    assert all(np.isfinite(r["loss"]) for r in rounds)
    assert results["accuracy_matrix"][0][0] > 0.5  # chance 0.5 on 2 classes: it learned


def test_bench_clients_smoke():
    sys.path.insert(0, os.path.join(REPO, "experiments"))
    import bench_clients
    out = bench_clients.run_benchmark(quick=True, clients=[2], backbone_names=["tiny_vit"])
    (row,) = out["rows"]
    assert row["clients"] == 2 and row["vmapped_client_steps_per_s"] > 0 and row["sequential_client_steps_per_s"] > 0
    assert row["compile_vmapped_s"] > 0 and row["peak_rss_mb"] > 0 and row["plan_bytes_per_client"] > 0
