"""lorm_jax.bench.merge (``lorm-jax bench-merge``) on a tiny layer set: the rows it returns, their accuracy, the table
and the CLI."""
import json

import jax
import numpy as np
import pytest

from lorm_jax.bench import merge


@pytest.fixture(scope="module")
def bench():
    return merge


TINY = {"tiny": {"block_0/attn/qkv": (24, 8), "block_0/attn/proj": (8, 8),
                 "block_0/mlp/fc1": (16, 8), "block_0/mlp/fc2": (8, 16)}}


@pytest.mark.slow
def test_rows_keys_and_accuracy(bench):
    rows = bench.run_benchmark(TINY, ranks=(1, 4), n_clients=3, log=None)
    assert len(rows) == 2 * 2 * 2  # gram kinds x factors x ranks
    assert {(r["gram"], r["factor"], r["r"]) for r in rows} == {(g, f, k) for g in ("full", "diag")
                                                               for f in ("A", "B") for k in (1, 4)}
    for row in rows:
        assert set(row) == set(bench.ROW_KEYS) and row["status"] == "ok"
        assert (row["model"], row["K"], row["layers"], row["dtype"]) == ("tiny", 3, 4, "float32")
        assert row["rel_err"] < 1e-4, row
        assert row["ours_ms"] > 0 and row["baseline_ms"] > 0 and row["compile_s"] > 0
        assert row["ours_runs"] >= 3 and 1 <= row["baseline_runs"] <= 3
        assert np.isclose(row["speedup"], row["baseline_ms"] / row["ours_ms"])
        if row["gram"] == "full":
            assert row["fallback_layers"] == 0 and row["min_pivot"] > 0
        else:
            assert row["fallback_layers"] is None and row["min_pivot"] is None
    table = bench.format_table(rows)
    assert table.count("\n") == len(rows) + 1 and "speed-up" in table
    json.dumps(rows)  # JSON-serialisable


@pytest.mark.slow
def test_x64_runs_and_restores_the_flag(bench):
    before = bool(jax.config.jax_enable_x64)
    rows = bench.run_benchmark(TINY, factors=("A",), grams=("full",), ranks=(2,), n_clients=2, x64=True, log=None)
    assert bool(jax.config.jax_enable_x64) == before
    # merging returns float32 even when it computes in float64, so the floor is float32 rounding of the result
    assert rows[0]["dtype"] == "float64" and rows[0]["rel_err"] < 1e-6


def test_baseline_matches_the_closed_form(bench):
    """The float64 reference loop solves the normal equations: A-merge with identical clients returns that A."""
    shapes = {"l": (5, 6)}
    grams = {p: np.asarray(g) for p, g in bench.make_grams(shapes, 3, "full").items()}
    lora = bench.make_client_lora(shapes, 3, 2, "A")
    a = np.asarray(lora["l"]["A"][:1]).repeat(3, 0)
    out = bench.baseline_merge({"l": {"A": a, "B": np.asarray(lora["l"]["B"])}}, grams, "A")
    np.testing.assert_allclose(out["l"], a[0], rtol=1e-8, atol=1e-10)


def test_watchdog_turns_a_stuck_call_into_an_error(bench):
    import time
    assert bench._with_timeout(lambda: 7, 5.0)() == 7
    with pytest.raises(bench.CallTimeout):
        bench._with_timeout(lambda: time.sleep(3), 0.2)()
    with pytest.raises(ZeroDivisionError):
        bench._with_timeout(lambda: 1 / 0, 5.0)()


def test_cli_json(bench, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(bench.MODELS, "vit_s14", TINY["tiny"])  # keep the CI run tiny
    out = tmp_path / "bench.json"
    assert bench.main(["--quick", "--json", str(out), "--clients", "2"]) == 0
    data = json.loads(out.read_text())
    rows = [(r["factor"], r["gram"], r["r"], r["K"]) for r in data["rows"]]
    assert rows == [("A", "full", 8, 2), ("A", "diag", 8, 2)]
    assert data["machine"]["cpu_count"] and data["date"]
    assert "| model |" in capsys.readouterr().out


@pytest.mark.slow
def test_vmap_section(bench, tmp_path, monkeypatch):
    """The 'merges under vmap' section: the three programs run and agree, and the CLI writes the result."""
    shapes = {"b0/qkv": (24, 8), "b0/fc1": (16, 8), "b0/fc2": (8, 16), "b1/fc2": (8, 16)}
    res = bench.run_vmap_benchmark(shapes, n_clients=3, rank=2, repeats=1, log=None)
    assert [(g["d_in"], g["layers"]) for g in res["groups"]] == [(8, 2), (16, 2)]
    assert min(res["vmap_ms"], res["tree_ms"], res["stacked_tree_ms"]) > 0
    assert np.isclose(res["ratio"], res["vmap_ms"] / res["tree_ms"])
    # same branch and algorithm per layer; only batched vs unbatched rounding differs: ~K·eps·cond(Ĝ) with Grams of
    # 2·d activation-like rows (cond(Ĝ) of order 1e2 here), i.e. ~1e-5
    assert res["max_rel_diff"] < 1e-4
    monkeypatch.setattr(bench, "VMAP_SHAPES", shapes)
    out = tmp_path / "vmap.json"
    assert bench.main(["--vmap", "--clients", "2", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["vmap"]["layers"] == 4
