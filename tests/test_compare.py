"""lorm_jax.compare on the tiny config: 2 methods × 1 β × 1 seed, table, plot, resumable reuse (also of runs
recorded before data.seed / head_init / forgetting_reference existed), CLI; seed sweeps and their table (no
training)."""
import json
import os

import numpy as np
import pytest
from conftest import ONE_BLOCK, REPO, small_flags
from conftest import small_config as _small

from lorm_jax import compare, continual, metrics
from lorm_jax import config as config_lib


def small_config():
    """The suite's small config with a 1-block ViT and a single round per task."""
    return _small(**ONE_BLOCK, rounds=1)


@pytest.mark.slow
def test_compare_two_methods_then_reuse_through_the_cli(tmp_path, monkeypatch):
    out = str(tmp_path / "study")
    table = compare.compare(small_config(), ["lorm", "fedavg_lora"], [0.5], [0], out, title="tiny")
    rows = [line for line in table.splitlines() if line.startswith("| lorm") or line.startswith("| fedavg_lora")]
    assert len(rows) == 2 and all("| 0.5 | 0 | = training | 1 |" in r for r in rows)
    assert "over seeds 0, each setting training and data draws together" in table
    for name in ("comparison.md", "comparison.json", "accuracy_vs_task.png"):
        assert os.path.exists(os.path.join(out, name))
    with open(os.path.join(out, "comparison.json")) as f:
        study = json.load(f)
    assert [r["method"] for r in study["rows"]] == ["lorm", "fedavg_lora"]
    for run in study["runs"]:
        with open(os.path.join(run["workdir"], "metrics.jsonl")) as f:
            lines = [json.loads(line) for line in f]
        with open(os.path.join(run["workdir"], "results.json")) as f:
            results = json.load(f)
        assert results["method"] == run["method"] and len(results["accuracy_matrix"]) == 2
        assert (results["seed"], results["data_seed"], run["data_seed"]) == (0, 0, 0)
        with open(os.path.join(run["workdir"], "partition.json")) as f:
            assert {k: v for k, v in json.load(f).items() if "seed" in k} == {"seed": 0, "data_seed": 0}
        assert run["forgetting_reference"] == results["forgetting_reference"]
        up = sum(m.get("upload_bytes", 0) for m in lines)
        assert results["communication"]["upload_bytes_per_client"] == up > 0
        # float64 sums of the same few numbers, in another order at most: ~1e-16 relative, approx allows 1e-6
        assert run["upload_mb_per_client"] == pytest.approx(up / 1e6)
        assert run["seconds"] == pytest.approx(sum(m["seconds"] for m in lines))

    # lorm's run as recorded before data.seed, head_init and forgetting_reference existed: still reused, the
    # reference forgetting recomputed from its accuracy matrix
    lorm_dir = study["runs"][0]["workdir"]
    for name, drop in (("config.json", lambda d: (d["data"].pop("seed"), d.pop("head_init"))),
                       ("results.json", lambda d: (d.pop("forgetting_reference"), d["config"]["data"].pop("seed")))):
        with open(os.path.join(lorm_dir, name)) as f:
            d = json.load(f)
        drop(d)
        with open(os.path.join(lorm_dir, name), "w") as f:
            json.dump(d, f)

    def no_compute(*args, **kwargs):
        raise AssertionError("a finished run was recomputed")
    monkeypatch.setattr(continual, "build_setup", no_compute)
    argv = ["lorm-jax compare", "--config", os.path.join(REPO, "configs/tiny.py"), "--methods", "lorm,fedavg_lora",
            "--betas", "0.5", "--seeds", "0", "--out", out] + small_flags(**ONE_BLOCK, rounds=1)
    assert compare.main(argv).replace("### tiny\n\n", "") == table.replace("### tiny\n\n", "")
    # --reuse_only tabulates the finished runs and leaves the missing one (ffa_lora) out, training nothing
    reuse = compare.main(argv[:4] + ["lorm,ffa_lora,fedavg_lora"] + argv[5:] + ["--reuse_only"])
    assert "| ffa_lora" not in reuse and "| lorm" in reuse and "| fedavg_lora" in reuse
    with pytest.raises(ValueError, match="unknown methods"):
        compare.run_all(small_config(), ["nope"], [0.5], [0], out)


def test_beta_free_methods_share_one_run_per_seed():
    c = small_config()
    assert compare.run_name("centralized", 0.1, 2) == "centralized_s2"
    assert compare.run_name("lorm", 0.1, 2) == "lorm_b0.1_s2"
    assert compare.run_name("centralized", 0.1, 2, 0) == "centralized_s2_d0"
    assert compare.run_name("lorm", 0.1, 2, 3) == "lorm_b0.1_s2_d3"
    assert compare.variant(c, "centralized", 0.1, 2).data.beta == c.data.beta  # same config, so the run is reused
    v = compare.variant(c, "lorm", 0.1, 2)
    assert (v.method, v.data.beta, v.seed, v.data.seed, c.method) == ("lorm", 0.1, 2, -1, "lorm")
    assert compare.variant(c, "lorm", 0.1, 2, 3).data.seed == 3


def fake_run(calls):
    """Stands in for continual.run: records the config, writes a metrics line, returns results whose accuracy encodes
    the seeds (0.5 + 0.01·seed + 0.1·data seed), so the table's statistics can be checked by hand."""
    def run(config, workdir, progress=False):
        calls.append((config.method, config.seed, config.data.seed, os.path.basename(workdir)))
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
            f.write(json.dumps({"unit": 0, "seconds": 2.0}) + "\n")
        acc = 0.5 + 0.01 * config.seed + 0.1 * config_lib.data_seed(config)
        matrix = np.array([[acc + 0.1, np.nan], [acc, acc]])
        return {"accuracy_matrix": [[None if np.isnan(v) else v for v in row] for row in matrix],
                "test_sizes": [5, 5], **metrics.continual_metrics(matrix, np.array([5, 5]))}
    return run


def test_seed_sweeps_name_their_runs_and_say_what_varied(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(continual, "run", fake_run(calls))
    c = small_config()
    # training seeds over one fixed partition
    table = compare.compare(c, ["lorm"], [0.5], [0, 1], str(tmp_path / "a"), data_seeds=[4])
    assert [x[1:] for x in calls] == [(0, 4, "lorm_b0.5_s0_d4"), (1, 4, "lorm_b0.5_s1_d4")]
    assert "training seeds 0,1 varied; data seeds (partitions) 4 fixed" in table
    assert "| lorm | 0.5 | 0,1 | 4 | 2 | 90.50 ± 0.71 |" in table  # 0.5 + 0.01·{0,1} + 0.4; std 0.01/√2
    # partitions under one training seed
    calls.clear()
    table = compare.compare(c, ["lorm"], [0.5], [7], str(tmp_path / "b"), data_seeds=[0, 1, 2])
    assert [x[1:3] for x in calls] == [(7, 0), (7, 1), (7, 2)]
    assert "training seeds 7 fixed; data seeds (partitions) 0,1,2 varied" in table
    # the grid: the accuracy's spread split into training seeds within a partition and partitions
    calls.clear()
    compare.compare(c, ["lorm", "centralized"], [0.5], [0, 1], str(tmp_path / "c"), data_seeds=[0, 1, 2])
    assert sorted(x[3] for x in calls if x[0] == "centralized") == sorted(
        f"centralized_s{s}_d{d}" for s in (0, 1) for d in (0, 1, 2))
    with open(tmp_path / "c" / "comparison.json") as f:
        row = json.load(f)["rows"][0]
    assert (row["seeds"], row["data_seeds"]) == ([0, 1] * 3, [0, 0, 1, 1, 2, 2])
    # Exact values up to float64 rounding of a few operations on numbers ~1 (1e-12 is far above it, far below 0.01)
    assert row["final_average_accuracy_std_training"] == pytest.approx(0.01 / np.sqrt(2), abs=1e-12)
    assert row["final_average_accuracy_std_data"] == pytest.approx(0.1, abs=1e-12)
    assert row["forgetting_reference"] == pytest.approx(0.05, abs=1e-12)  # (0.1 + 0) / 2 tasks
    with open(tmp_path / "c" / "comparison.md") as f:
        assert "std over training seeds / over partitions (pts)" in f.read()
    with pytest.raises(ValueError, match="--data_seeds"):
        compare.run_all(c, ["lorm"], [0.5], [0], str(tmp_path), data_seeds=[-2])
