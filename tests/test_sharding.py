"""Client work over a device mesh: lane choice, the memory planner, 8 host devices vs 1, and 100 clients on this
CPU."""
import json
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ONE_BLOCK, REPO, shared_setup, small_config

from lorm_jax import config as config_lib
from lorm_jax import continual, memory, sharding

WORKER = os.path.join(REPO, "tests", "_scale_worker.py")


def worker(*args, devices: int = 1, timeout: int = 600) -> dict:
    """Run tests/_scale_worker.py in a fresh interpreter with ``devices`` host CPU devices; its RESULT line."""
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, WORKER, *map(str, args)], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"worker {args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return json.loads(lines[-1][len("RESULT "):])


def test_choose_lanes():
    """One lane per device on a CPU; on an accelerator the fewest lanes whose longest is the largest client
    (⌈ΣS/S_max⌉, worst task), a multiple of the mesh size, capped by memory."""
    steps = [np.array([6, 3, 1, 1, 2, 0]), np.array([2, 2, 2, 2, 2, 2])]  # ⌈13/6⌉ = 3, ⌈12/2⌉ = 6
    assert memory.choose_lanes(steps, devices=1, platform="cpu", max_lanes=100) == 1
    assert memory.choose_lanes(steps, devices=8, platform="cpu", max_lanes=100) == 8
    assert memory.choose_lanes(steps, devices=1, platform="gpu", max_lanes=100) == 6
    assert memory.choose_lanes(steps, devices=4, platform="gpu", max_lanes=100) == 8   # 2 per device
    assert memory.choose_lanes(steps, devices=1, platform="gpu", max_lanes=4) == 4     # memory cap
    assert memory.choose_lanes(steps, devices=2, platform="gpu", max_lanes=1) == 2     # never below one per device
    assert memory.choose_lanes(steps, devices=1, platform="gpu", max_lanes=1, requested=5) == 5  # as asked


def test_replicate_gives_one_sharding_for_one_placement():
    """A single-device array already where a 1-device mesh wants it comes back with the mesh's NamedSharding (same
    buffer): jit keys its cache on the sharding, so a mixed call would compile a program a second time."""
    mesh = sharding.make_mesh(1)
    x = jnp.arange(3.0)
    y = sharding.replicate({"x": x}, mesh)["x"]
    assert y.sharding == sharding.replicated(mesh) and y.unsafe_buffer_pointer() == x.unsafe_buffer_pointer()
    chex.clear_trace_counter()
    f = jax.jit(chex.assert_max_traces(lambda v: v * 2, n=1))  # another input sharding would trace it again
    f(y), f(sharding.replicate(jnp.arange(3.0) + 1, mesh))


def test_mesh_errors_name_the_key():
    assert sharding.mesh_size(sharding.make_mesh(0)) == jax.device_count()
    with pytest.raises(ValueError, match="mesh_clients"):
        sharding.make_mesh(jax.device_count() + 1)
    with pytest.raises(ValueError, match="config.client_lanes = 3 is invalid: a multiple of the 2 devices"):
        memory.choose_lanes([np.ones(4)], devices=2, platform="cpu", max_lanes=8, requested=3)
    assert memory.choose_lanes([np.ones(4)], devices=2, platform="cpu", max_lanes=8, requested=4) == 4


def test_memory_plan_fits_the_budget():
    """Waves, Gram units and lanes from the byte estimates: the whole round with per-client Grams when it fits,
    per-block sums in smaller waves when not, and a one-line refusal (with what would fit) when not even one client
    does."""
    bb = shared_setup().backbone
    kwargs = dict(num_clients=10, num_classes=4, rank=4, batch_size=16, gram_batch_size=16, backbone_gram="diag",
                  head_gram="full", shared_bytes=1000)
    big = memory.plan_memory(bb, budget_bytes=10**12, **kwargs)
    assert big.gram_full_bytes > big.gram_diag_bytes > 0
    assert (big.wave_clients, big.gram_units, big.block_bytes) == (10, "clients", 0)  # as before streaming
    assert big.client_bytes >= 3 * big.gram_bytes + 6 * big.lora_bytes  # a client's Grams and parameter rows
    assert big.activation_bytes == memory.activation_bytes(bb, 4, 16)
    assert memory.activation_bytes(bb, 4, 32) > big.activation_bytes  # grows with the batch
    blocks = memory.plan_memory(bb, budget_bytes=10**12, gram_units="blocks", **kwargs)
    assert blocks.client_bytes < big.client_bytes and blocks.block_bytes > 0
    fixed = blocks.floor_bytes - blocks.client_bytes  # everything but the wave's clients
    roomy = memory.plan_memory(bb, budget_bytes=fixed + 10 * big.client_bytes + 2 * big.lane_bytes, **kwargs)
    assert (roomy.wave_clients, roomy.gram_units, roomy.max_lanes) == (10, "clients", 2)
    tight = memory.plan_memory(bb, budget_bytes=fixed + 3 * blocks.client_bytes, **kwargs)
    assert (tight.wave_clients, tight.gram_units, tight.max_lanes) == (3, "blocks", 1)  # never below one lane
    assert "4 wave(s) of at most 3 of the round's 10 clients" in tight.table()
    assert memory.plan_memory(bb, budget_bytes=blocks.floor_bytes, **kwargs).wave_clients == 1
    with pytest.raises(config_lib.InputError) as e:
        memory.plan_memory(bb, budget_bytes=blocks.floor_bytes - 1, **kwargs)
    assert "\n" not in str(e.value) and "does not fit the memory plan" in str(e.value)
    full = memory.plan_memory(bb, budget_bytes=10**12, **dict(kwargs, backbone_gram="full"))
    assert full.floor_bytes > blocks.floor_bytes  # d×d sums and block Grams
    with pytest.raises(config_lib.InputError, match=r"with diagonal Grams \(config.alpha_backbone = 0\) it fits"):
        memory.plan_memory(bb, budget_bytes=full.floor_bytes - 1, **dict(kwargs, backbone_gram="full"))


@pytest.mark.slow
def test_eight_devices_match_one_device(tmp_path):
    """Acceptance: the run sharded over 8 host devices (8 lanes) gives the single-device results (1 lane; per-client
    losses too; float64 runs, see tests/_scale_worker.py), and the server merge on client-sharded inputs equals the
    host merge, reduced with an all-reduce."""
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


@pytest.mark.slow
def test_hundred_clients_two_rounds(tmp_path):
    """Acceptance: 100 clients × 2 rounds (2 tasks) of the tiny config in one process (automatic lanes)."""
    c = small_config(**ONE_BLOCK, num_clients=100, **{"data.min_samples": 1, "data.beta": 5.0})
    c.data.options = {"num_classes": 4, "n_train": 300, "n_test": 12, "image_size": 16, "seed": 0}
    results = continual.run(c, str(tmp_path / "k100"), progress=False)
    with open(tmp_path / "k100" / "metrics.jsonl") as f:
        rounds = [json.loads(line) for line in f if "client_loss" in line]
    assert len(rounds) == 4 and all(len(r["client_loss"]) == 100 for r in rounds)
    assert all(np.isfinite(r["loss"]) for r in rounds)
    assert results["accuracy_matrix"][0][0] > 0.5  # chance 0.5 on 2 classes: it learned


@pytest.mark.slow
def test_bench_clients_smoke():
    from lorm_jax.bench import clients as bench_clients
    out = bench_clients.run_benchmark(quick=True, betas=[0.1])
    modes = {r["mode"]: r for r in out["rows"]}
    task_padded = "padded vmap (task's largest)"
    assert set(modes) == {bench_clients.PADDED_RUN, task_padded, "lanes (P = 1, auto)", "sequential loop"}
    before, padded, lanes = modes[bench_clients.PADDED_RUN], modes[task_padded], modes["lanes (P = 1, auto)"]
    assert padded["clients"] == 10 and lanes["train_utilization"] > padded["train_utilization"]
    # one lane packs several clients' steps into a lane step: fewer lane steps than local steps
    assert padded["lane_steps_run"] == 10 * padded["max_steps"] and lanes["lane_steps_run"] < lanes["sum_steps"]
    assert before["lane_steps_run"] >= padded["lane_steps_run"] and before["speedup_vs_padded"] == 1.0
    assert all(r["wall_s"] > 0 and r["client_steps_per_s"] > 0 for r in out["rows"])
    assert f"| {task_padded} |" in out["markdown"]


@pytest.mark.slow
def test_bench_clients_scale_smoke():
    """bench-clients --scale: both engines of one small case, each in its own process, with the same work."""
    from lorm_jax.bench import clients as bench_clients
    out = bench_clients.run_scale(clients=[20], grams=["full"], engines=["blocks", "clients"])
    streamed, per_client = out["rows"]
    assert "error" not in streamed and "error" not in per_client, out["rows"]
    assert (streamed["gram_units"], per_client["gram_units"]) == ("blocks", "clients")
    assert streamed["client_steps"] == per_client["client_steps"] > 0 and per_client["waves"] == 1
    assert all(r["client_steps_per_s"] > 0 and r["peak_rss_mb"] > 0 and r["merge_ms"] > 0 for r in out["rows"])
