"""experiments/compare.py on the tiny config: 2 methods × 1 β × 1 seed, table, plot, resumable reuse, CLI."""
import json
import os
import sys

import pytest

from lorm_jax import config as config_lib
from lorm_jax import continual

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "experiments"))
sys.path.insert(0, REPO)

import compare  # noqa: E402

SMALL = {"backbone.options.depth": 1, "data.options.num_classes": 4, "data.options.n_train": 40,
         "data.options.n_test": 12, "rounds": 1, "epochs": 1, "eval_every_round": False}


def small_config():
    from configs import tiny
    return config_lib.override(tiny.get_config(), **SMALL)


@pytest.mark.slow
def test_compare_two_methods_then_reuse_through_the_cli(tmp_path, monkeypatch):
    out = str(tmp_path / "study")
    table = compare.compare(small_config(), ["lorm", "fedavg_lora"], [0.5], [0], out, title="tiny")
    rows = [line for line in table.splitlines() if line.startswith("| lorm") or line.startswith("| fedavg_lora")]
    assert len(rows) == 2 and all("| 0.5 | 1 |" in r for r in rows)
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
        up = sum(m.get("upload_bytes", 0) for m in lines)
        assert results["communication"]["upload_bytes_per_client"] == up > 0
        # float64 sums of the same few numbers, in another order at most: ~1e-16 relative, approx allows 1e-6
        assert run["upload_mb_per_client"] == pytest.approx(up / 1e6)
        assert run["seconds"] == pytest.approx(sum(m["seconds"] for m in lines))

    def no_compute(*args, **kwargs):
        raise AssertionError("a finished run was recomputed")
    monkeypatch.setattr(continual, "build_setup", no_compute)
    argv = ["compare.py", "--config", os.path.join(REPO, "configs/tiny.py"), "--methods", "lorm,fedavg_lora",
            "--betas", "0.5", "--seeds", "0", "--out", out] + [f"--config.{k}={v}" for k, v in SMALL.items()]
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
    assert compare.variant(c, "centralized", 0.1, 2).data.beta == c.data.beta  # same config, so the run is reused
    v = compare.variant(c, "lorm", 0.1, 2)
    assert (v.method, v.data.beta, v.seed, c.method) == ("lorm", 0.1, 2, "lorm")
