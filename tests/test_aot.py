"""Deviceless ahead-of-time compilation (lorm_jax.aot): the tiny config's programs compile for a TPU v5e slice (XLA's
TPU compiler from the [tpu] extra, no TPU attached), fit, hold no float64 or host callback, and every round reuses
them; the cost model counts loops as often as they run; the TPU runtime being installed changes no CPU result."""
import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, TINY

from lorm_jax import aot, plan
from lorm_jax import config as config_lib

needs_tpu_compiler = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                        reason="the TPU compiler (libtpu) is not installed: pip install -e '.[tpu]'")


@needs_tpu_compiler
def test_tiny_programs_compile_for_a_v5e_slice_and_are_reused():
    devices, chip = aot.topology_devices("v5e:2x2")
    assert len(devices) == 4 and chip.name == "TPU v5e" and {d.platform for d in devices} == {"tpu"}
    assert jax.devices()[0].platform == "cpu"  # compiling for the slice attaches nothing
    programs, setup = aot.compile_run(config_lib.load(TINY), devices, budget_bytes=int(0.9 * chip.hbm_bytes))
    names = {p.name for p in programs}
    assert {"train", "sums A", "sums B", "sums end", "merge_round A", "merge_round B", "merge_tasks",
            "evaluate"} <= names
    summary = aot.summarize(programs, setup, chip, len(devices))
    assert summary["fits"] and 0 < summary["bytes_per_device_max"] <= chip.hbm_bytes
    assert summary["float64"] == [] and summary["callbacks"] == []
    assert all(p.reused for p in programs)  # the other tasks' and rounds' calls lower to the same programs
    assert 0 < summary["round_s"] and summary["run_s"] > setup.num_tasks * summary["round_s"]
    train = next(p for p in programs if p.name == "train")
    assert train.flops[0] > 2 * train.flops_once  # a loop of several steps, counted as often as it runs



def test_packed_batches_are_whole_tpu_tiles_where_that_costs_little():
    """On TPU a packed batch holds a multiple of 16 examples when rounding up adds at most an eighth and stays within
    the memory plan's most (the paper's evaluation: 625 test examples per chip in 5 batches of 125 -> 128, which XLA's
    TPU compiler builds in about half the time); elsewhere, and where it would cost more, the batches stay as they
    were."""
    assert plan.aligned_blocks(125, 1, 128, 16) == 128
    assert plan.aligned_blocks(125, 1, 127, 16) == 125   # beyond the memory plan's most
    assert plan.aligned_blocks(17, 1, 64, 16) == 17      # +15 examples: more than an eighth
    assert plan.aligned_blocks(31, 4, 64, 16) == 32      # blocks of 4 examples: a multiple of 4 blocks
    assert plan.aligned_blocks(125, 1, 128, 1) == 125    # CPU
    test = [np.arange(1000 * t, 1000 * (t + 1)) for t in range(10)]
    for align, per_batch in ((16, 128), (1, 125)):
        layout = plan.packed_layouts([test], 128, 1, 1, 128, 16, align)[0]
        assert layout["idx"].shape[1:] == (5, per_batch, 1)
        assert layout["real_examples"] == 10_000 and int(layout["mask"].sum()) == 10_000

def test_jaxpr_cost_counts_loops_as_often_as_they_run():
    w = jnp.ones((8, 8))

    def body(x):
        return jax.lax.scan(lambda c, _: (c @ w, None), x, None, length=5)[0]

    def program(x, n):
        return jax.lax.fori_loop(0, n, lambda i, c: body(c), x)  # n traced: a while loop

    jaxpr = jax.make_jaxpr(program)(jnp.ones((4, 8)), 3).jaxpr
    matmul = 2 * 4 * 8 * 8
    counter = 2  # the loops' own index arithmetic, one add per iteration of each
    assert 7 * 5 * matmul <= aot.jaxpr_cost(jaxpr, 7)[0] <= 7 * 5 * (matmul + counter)
    assert matmul <= aot.jaxpr_cost(jaxpr, 7, loops=False)[0] <= matmul + counter  # what XLA's cost analysis counts
    assert aot.jaxpr_cost(jaxpr, 7)[1] == 7 * 5 * 4 * (4 * 8 + 8 * 8 + 4 * 8)  # the dot's operands and result


def test_unknown_topology_is_one_line_and_exit_2():
    proc = subprocess.run([sys.executable, "-m", "lorm_jax.cli", "aot", "--config", TINY, "--topology", "v9z:3x3"],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("lorm-jax: error: --topology 'v9z:3x3' is invalid")


@pytest.mark.slow
@needs_tpu_compiler
def test_cli_reports_a_table_and_json(tmp_path):
    out = tmp_path / "aot.json"
    proc = subprocess.run([sys.executable, "-m", "lorm_jax.cli", "aot", "--config", TINY, "--topology", "v5e:2x2",
                           "--json", str(out)], capture_output=True, text=True, cwd=REPO, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| train |" in proc.stdout and "fits" in proc.stdout and "no float64, no host callbacks" in proc.stdout
    report = json.loads(out.read_text())
    assert report["summary"]["fits"] and {p["name"] for p in report["programs"]} >= {"train", "evaluate"}


CPU_PROGRAM = """
import json, jax, jax.numpy as jnp, numpy as np
from lorm_jax import merging
x = jax.random.normal(jax.random.PRNGKey(0), (3, 40, 16)); g = jnp.einsum("kni,knj->kij", x, x)
a = jax.random.normal(jax.random.PRNGKey(1), (3, 2, 16))
print(json.dumps({"backend": jax.default_backend(), "merge": np.asarray(jax.jit(merging.merge_lora_A)(a, g)).tolist()}))
"""


@pytest.mark.slow
@needs_tpu_compiler
def test_installed_tpu_runtime_changes_no_cpu_result():
    """With libtpu installed and JAX_PLATFORMS unset, jax looks for a TPU, finds none and runs on the CPU: the same
    program gives bit-identical results to a CPU-only process."""
    runs = {}
    for platforms in ("", "cpu"):
        env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
        if platforms:
            env["JAX_PLATFORMS"] = platforms
        proc = subprocess.run([sys.executable, "-c", CPU_PROGRAM], capture_output=True, text=True, env=env,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs[platforms] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert runs[""]["backend"] == runs["cpu"]["backend"] == "cpu"
    np.testing.assert_array_equal(runs[""]["merge"], runs["cpu"]["merge"])
