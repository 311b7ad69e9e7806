"""lorm_jax.bench.accelerator at tiny size: the lorm_jax half end to end through the engine, the FLOP model, the
peak table, the ratio lines, and the PyTorch model of the reference's loop (skipped where torch is not installed)."""
import json
import math

import numpy as np
import pytest

from lorm_jax.bench import accelerator


@pytest.fixture(scope="module")
def bench():
    return accelerator


def test_vit_flops_reproduce_the_published_vit_b16_count(bench):
    """ViT-B/16 at 224 px: 17.6 GMACs per image forward (the ViT paper's / timm's figure), i.e. 35.1 GFLOPs; LoRA
    adds 2 n r (d_in + d_out) per layer; training a frozen backbone costs less than 3× the forward."""
    arch = dict(image_size=224, patch=16, width=768, depth=12, heads=12, mlp=3072)
    base = bench.vit_flops(**arch, rank=0, num_classes=1000)
    assert abs(base["forward"] / 2 / 17.58e9 - 1) < 0.005
    n = 197
    lora = bench.vit_flops(**arch, rank=16, num_classes=1000)["forward"] - base["forward"]
    assert lora == pytest.approx(12 * 2 * n * 16 * (4 * 768 + 2 * 768 + 2 * (768 + 3072)))
    assert 2 * base["forward"] < base["train"] < 3 * base["forward"]
    assert base["forward"] < base["gram"] < 1.01 * base["forward"]


def test_device_peaks(bench):
    assert bench.device_peak("NVIDIA H200", "bfloat16") == pytest.approx(989.4e12)
    assert bench.device_peak("NVIDIA H200 NVL", "bfloat16") == pytest.approx(835.5e12)
    assert bench.device_peak("NVIDIA H100 80GB HBM3", "float32") == pytest.approx(494.7e12)  # TF32
    assert bench.device_peak("NVIDIA H100 PCIe", "float16") == pytest.approx(756.5e12)
    assert bench.device_peak("TPU v5 lite", "bfloat16") == pytest.approx(197e12)
    assert bench.device_peak("cpu", "float32") is None


def test_ratio_lines(bench):
    ours = {"framework": "lorm_jax", "rank": 1, "dtype": "bfloat16", "status": "ok", "train_s": 1.0, "gram_s": 0.5,
            "merge_s": 0.01, "round_s": 2.0}
    ref = {"framework": "reference (PyTorch)", "rank": 1, "dtype": "float16", "status": "ok", "train_s": 4.0,
           "gram_s": 2.0, "merge_s": 1.0, "round_s": 8.0}
    merges = [{"framework": "lorm_jax", "factor": "A", "gram": "full", "status": "ok", "s": 0.5},
              {"framework": "reference (PyTorch)", "factor": "A", "gram": "full", "status": "ok", "s": 50.0}]
    lines = bench.ratio_lines([ours, ref], merges)
    assert len(lines) == 5
    assert "round: lorm_jax / reference = 0.250 (speed-up 4.0x)" in lines[3]
    assert lines[4] == "merge A full: lorm_jax / reference = 0.0100 (speed-up 100x)"


@pytest.mark.slow
def test_tiny_run_through_the_engine(bench, tmp_path):
    """The lorm_jax half at tiny size on CPU: a round through rounds.run_round with its phases timed, a second
    round that compiles nothing, the model FLOP/s, the four full-model merges, JSON and markdown written."""
    out = tmp_path / "ba"
    assert bench.main(["--tiny", "--no-torch", "--dtypes", "float32", "--out", str(out)]) == 0
    result = json.loads((out / "bench_accelerator.json").read_text())
    (row,) = result["rounds"]
    assert row["framework"] == "lorm_jax" and row["status"] == "ok" and row["rank"] == 2
    assert row["compiles_first_round"] > 0 and row["compiles_steady_round"] == 0
    assert row["images"] == sum(row["client_sizes"]) == bench.SIZES["tiny"]["task_samples"]
    assert 0 < row["train_utilization"] <= 1 and 0 < row["gram_utilization"] <= 1
    for key in ("train_s", "gram_s", "merge_s", "round_s", "images_per_s", "train_tflops"):
        assert row[key] > 0, key
    assert row["round_s"] >= row["train_s"] + row["gram_s"] + row["merge_s"]
    assert row["train_mfu"] is None  # no peak known for a CPU
    merges = result["merges"]
    assert {(m["factor"], m["gram"]) for m in merges} == {(f, g) for f in "AB" for g in ("diag", "full")}
    assert all(m["status"] == "ok" and m["s"] > 0 and m["layers"] == 8 for m in merges)
    md = (out / "bench_accelerator.md").read_text()
    assert "## Round" in md and "## Full-model merge" in md and "| lorm_jax | 2 | float32 |" in md


# ----------------------------------------------------------------------------------------------------------------------
# The PyTorch half (numpy + torch only).

TINY_ARCH = dict(image_size=16, patch=8, width=16, depth=1, heads=2, mlp=32)


def test_reference_round_and_merges_in_torch():
    torch = pytest.importorskip("torch")
    from lorm_jax.bench import reference_torch as ref
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(30, 8, 8, 3), dtype=np.uint8)
    labels = rng.integers(0, 3, size=30)
    parts = [np.arange(0, 7), np.arange(7, 30)]
    out = ref.reference_round(images, labels, parts, arch=TINY_ARCH, num_classes=3, rank=2, factor="B", batch=4,
                              device="cpu")
    assert out["steps"] == math.ceil(7 / 4) + math.ceil(23 / 4) and out["images"] == 30
    assert min(out["train_s"], out["gram_s"], out["merge_s"]) > 0
    assert len(out["lora"]) == 4 * TINY_ARCH["depth"]
    for layer in out["lora"].values():
        assert torch.all(torch.isfinite(layer["B"])) and layer["B"].shape[1] == 2
    again = ref.reference_round(images, labels, parts, arch=TINY_ARCH, num_classes=3, rank=2, factor="A", batch=4,
                                device="cpu", state=out["state"])
    assert again["build_s"] == 0.0 and again["steps"] == out["steps"]

    # the server merge is the reference's formula in float64: compare with numpy's pinv
    K, r, d_in, d_out = 3, 2, 6, 5
    x = rng.normal(size=(K, 20, d_in))
    grams = np.einsum("kni,knj->kij", x, x).astype(np.float32)
    a = rng.normal(size=(K, r, d_in)).astype(np.float32)
    b = rng.normal(size=(K, d_out, r)).astype(np.float32)
    layers = {"l0": {"A": a, "B": b}, "l1": {"A": a, "B": b}}
    g64 = grams.astype(np.float64)
    want_a = np.einsum("krd,kde->re", a.astype(np.float64), g64) @ np.linalg.pinv(g64.sum(0), rcond=1e-15)
    shared = a[0].astype(np.float64)
    e2 = np.einsum("kor,rd,kde->oe", b.astype(np.float64), shared, g64)
    want_b = e2 @ shared.T @ np.linalg.pinv(shared @ g64.sum(0) @ shared.T, rcond=1e-15)
    for factor, want in (("A", want_a), ("B", want_b)):
        res = ref.reference_merge(factor, layers, {"l0": grams, "l1": grams}, device="cpu")
        assert res["merged_layers"] == 2 and res["s"] == pytest.approx(res["measured_s"])
        # float64 throughout, then rounded to float32: the float32 rounding of the result is the floor
        np.testing.assert_allclose(res["out"]["l0"], want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
    sampled = ref.reference_merge("A", layers, {"l0": grams, "l1": grams}, device="cpu", layers_per_shape=1)
    assert sampled["merged_layers"] == 1 and sampled["s"] == pytest.approx(2 * sampled["measured_s"])
