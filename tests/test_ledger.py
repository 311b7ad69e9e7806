"""The communication ledger: its byte counts are the sizes of the arrays a client really sends and receives, and the
server merges read nothing beyond what the ledger counts."""
import chex
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import shared_setup, with_method

from lorm_jax import config as config_lib
from lorm_jax import ledger, methods, rounds

F32 = 4


def _expected(setup, items, task_classes):
    """Bytes per client of each item, from the model's layer shapes (not from the arrays the ledger saw)."""
    shapes, r, f = setup.backbone.lora_shapes, setup.config.rank, setup.backbone.feature_dim
    size = {"A": sum(r * d_in for _, d_in in shapes.values()), "B": sum(d_out * r for d_out, _ in shapes.values()),
            "grams": sum(d_in for _, d_in in shapes.values()),          # alpha_backbone = 0: diagonal Grams
            "head": task_classes * (f + 1), "head_gram": f * f,         # alpha_head = 0.5: full head Gram
            "num_samples": 1}
    return {k: F32 * size[k] for k in items}


@pytest.mark.slow
def test_engine_ledger_counts_the_exchanged_arrays():
    setup = shared_setup()
    assert setup.config.alpha_backbone == 0 and setup.config.alpha_head > 0
    c_t = 2  # classes of task 0
    up_all = ("grams", "head", "head_gram", "num_samples")

    s = with_method(setup, "lorm")
    state, m0 = rounds.run_round(s, rounds.initial_state(s), 0, 0)  # B round; fresh task: A and B come down
    assert m0["upload_breakdown"] == _expected(s, ("B",) + up_all, c_t)
    assert m0["download_breakdown"] == _expected(s, ("A", "B", "head"), c_t)
    state, m1 = rounds.run_round(s, state, 0, 1)  # A round: only B (merged in round 0) changed at the server
    assert m1["upload_breakdown"] == _expected(s, ("A",) + up_all, c_t)
    assert m1["download_breakdown"] == _expected(s, ("B", "head"), c_t)
    assert m1["upload_bytes"] == sum(m1["upload_breakdown"].values())
    _, end = rounds.end_task(s, state, 0)  # the last merged factor down, the task Grams up
    assert end["upload_breakdown"] == _expected(s, ("grams",), c_t)
    assert end["download_breakdown"] == _expected(s, ("A",), c_t)

    s = with_method(setup, "fedavg_lora")
    _, m = rounds.run_round(s, rounds.initial_state(s), 0, 0)
    assert m["upload_breakdown"] == _expected(s, ("A", "B", "head", "head_gram", "num_samples"), c_t)
    _, end = rounds.end_task(s, rounds.initial_state(s), 0)
    assert end["upload_bytes"] == 0 and end["download_bytes"] == 0  # the task mean needs no statistics

    s = with_method(setup, "linear_probe", head_merge="fedavg")
    _, m = rounds.run_round(s, rounds.initial_state(s), 0, 1)
    assert m["upload_breakdown"] == _expected(s, ("head", "num_samples"), c_t)
    assert m["download_breakdown"] == _expected(s, ("head",), c_t)


def test_full_grams_and_per_participant_bytes():
    d_in, d_out, r, classes, f = 6, 5, 2, 4, 3
    server_lora = {"l": {"A": np.zeros((r, d_in), np.float32), "B": np.zeros((d_out, r), np.float32)}}
    server_head = {"w": np.zeros((classes, f), np.float32), "b": np.zeros(classes, np.float32)}
    rows = np.array([True, False, True, False])
    method = methods.get("lorm", config_lib.base_config())
    # round 2 (B): three participants, whose last rounds of the task were 1, -1 (none) and 0
    entry = ledger.round_entry(method, 2, "B", server_lora, server_head, {"l": jnp.zeros((d_in, d_in))},
                               jnp.zeros(f), rows, np.array([1, -1, 0]))
    assert entry["upload_breakdown"] == {"B": F32 * d_out * r, "grams": F32 * d_in * d_in, "head": F32 * 2 * (f + 1),
                                         "head_gram": F32 * f, "num_samples": F32}
    assert entry["participants"] == 3 and entry["upload_bytes_total"] == 3 * entry["upload_bytes"]
    # downloads: A (merged in round 1) + head; A, B + head (first round it takes part in); A, B + head (B merged in 0)
    want = [F32 * r * d_in, F32 * (r * d_in + d_out * r), F32 * (r * d_in + d_out * r)]
    assert entry["download_bytes_total"] == sum(want) + 3 * F32 * 2 * (f + 1)
    assert ledger.nbytes({"x": np.zeros((2, 3), np.float64), "y": [np.zeros(4, np.int8)]}) == 52


def test_summarize_totals():
    lines = [{"upload_bytes": 1_500_000, "download_bytes": 10, "upload_breakdown": {"B": 1_000_000, "grams": 500_000}},
             {"upload_bytes": 500_000, "download_bytes": 0, "upload_breakdown": {"B": 500_000}},
             {"accuracy": 0.5}]
    s = ledger.totals(lines)
    assert s["upload_mb_per_client"] == pytest.approx(2.0) and s["download_bytes_per_client"] == 10  # float64: exact
    assert s["upload_bytes_per_client_by_item"] == {"B": 1_500_000, "grams": 500_000}


def _inputs(seed, k=3, d_out=5, d_in=6, r=2, classes=5, f=4):
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
    a = jnp.broadcast_to(normal(r, d_in), (k, r, d_in)) + 0.0  # the frozen factor is the same on every client
    b = normal(k, d_out, r)
    lora = {"l": {"A": a, "B": b}}
    grams = {"l": jnp.asarray(rng.uniform(0.5, 2.0, (k, d_in)), jnp.float32)}
    heads = {"w": normal(k, classes, f), "b": normal(k, classes)}
    head_grams = jnp.asarray(np.stack([np.eye(f) * (i + 1) + 0.1 for i in range(k)]), jnp.float32)
    server = {"w": normal(classes, f), "b": normal(classes)}
    rows = jnp.asarray([False, True, True, False, False])
    return lora, grams, heads, head_grams, jnp.asarray([2.0, 3.0, 4.0]), rows, server


@pytest.mark.parametrize("name,rnd", [("lorm", 0), ("lorm", 1), ("fedavg_lora", 0), ("ffa_lora", 0),
                                      ("regmean_lora", 0), ("linear_probe", 0)])
def test_merges_read_only_what_the_ledger_counts(name, rnd):
    """Garbage in every array a client does not upload (the frozen factor of clients 1.., Grams the method does not
    send (NaN), head rows of other tasks) leaves the server merge unchanged."""
    method = methods.get(name, config_lib.base_config())
    factor = method.train_factor(rnd)
    lora, grams, heads, head_grams, n, rows, server = _inputs(rnd)
    if factor == "A":
        lora = {"l": {"A": lora["l"]["A"] + jnp.arange(3.0)[:, None, None], "B": lora["l"]["B"][:1].repeat(3, 0)}}
    sent = method.uploads(factor)
    expected = method.merge_round(lora, grams, heads, head_grams, n, factor, rows, server)
    junk = lambda x: x.at[1:].add(1e3)  # finite garbage: a NaN would (rightly) switch the head solve to its fallback
    lora2 = {"l": {x: (v if x in sent else junk(v)) for x, v in lora["l"].items()}}
    grams2 = grams if "grams" in sent else {"l": jnp.full_like(grams["l"], jnp.nan)}
    head_grams2 = head_grams if "head_gram" in sent else jnp.full_like(head_grams, jnp.nan)
    other = ~np.asarray(rows)
    heads2 = {"w": heads["w"].at[:, other].add(1e3), "b": heads["b"].at[:, other].add(1e3)}
    got = method.merge_round(lora2, grams2, heads2, head_grams2, n, factor, rows, server)
    chex.assert_trees_all_close(got, expected, rtol=1e-6, atol=1e-6)
