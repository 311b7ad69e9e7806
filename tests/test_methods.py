"""The method strategies: every method runs in the engine, FedAvg-LoRA with one client is local training, FFA-LoRA
never moves A, the rank-r RegMean carry-over is optimal, the merge diagnostics match their definition."""
import doctest

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ONE_BLOCK, shared_setup, small_config, with_method

from lorm_jax import config as config_lib
from lorm_jax import merging, methods, rounds
from lorm_jax.backbones.common import by_layer
from lorm_jax.methods import base, common
from lorm_jax.methods.regmean_lora import regmean_rank_r
from tests._numerics import assert_within, gamma


@pytest.fixture(scope="module")
def setup():
    return shared_setup()


@pytest.fixture(scope="module")
def central_setup():
    return shared_setup("centralized")


# the fast lane runs LoRM; the baselines share its code paths and run in the full suite
@pytest.mark.parametrize("name", [n if n == "lorm" else pytest.param(n, marks=pytest.mark.slow)
                                  for n in methods.NAMES if n != "centralized"])
def test_every_method_runs_rounds_and_a_task(setup, name):
    s = with_method(setup, name)
    state = rounds.initial_state(s)
    for rnd in range(s.config.rounds):
        before = state["lora"]
        state, m = rounds.run_round(s, state, 0, rnd)
        factor = s.method.train_factor(rnd)
        assert m["factor"] == factor and np.isfinite(m["loss"])
        chex.assert_tree_all_finite((state["lora"], state["head"]))
        for p, f in state["lora"].items():
            for x in "AB":
                if x not in factor:  # a factor that does not train is passed through untouched
                    np.testing.assert_array_equal(f[x], before[p][x])
        if factor:
            assert not all(np.array_equal(state["lora"][p][factor[-1]], before[p][factor[-1]]) for p in before)
            # RegMean is the optimum: ρ ≥ ρ*. Both are float32 ratios of Gram-weighted squared norms; where the merge
            # is RegMean itself (LoRM's A round) they differ by rounding only, a few γ_64 ≈ 4e-6 relative of ρ ≤ 1
            assert m["merge_residual"]["mean"] >= m["regmean_residual"]["mean"] - 1e-5
        assert m["upload_bytes"] > 0 and m["download_bytes"] > 0
    state, m = rounds.end_task(s, state, 0)
    assert 0.0 <= m["accuracy"] <= 1.0
    chex.assert_tree_all_finite((state["past_a"], state["past_b"], state["task_grams"]))


@pytest.mark.slow
def test_centralized_pools_each_task_on_one_client(central_setup):
    s = central_setup
    assert s.config.num_clients == 1 and s.method.name == "centralized"
    for parts, idx in zip(s.partitions, s.task_train):
        assert len(parts) == 1 and sorted(parts[0].tolist()) == sorted(idx.tolist())
    state, m = rounds.run_round(s, rounds.initial_state(s), 0, 0)
    assert m["factor"] == "AB" and m["upload_bytes"] == 0 and m["download_bytes"] == 0
    config = small_config(**ONE_BLOCK, method="centralized")
    assert methods.effective_config(config).num_clients == 1 and config.num_clients == 4  # the input is not mutated


@pytest.mark.slow
def test_fedavg_lora_with_one_client_equals_local_training(central_setup):
    """One client: FedAvg of A and B (and a FedAvg head) returns exactly what local training produced, and so does the
    centralized method."""
    s = with_method(central_setup, "fedavg_lora", head_merge="fedavg")
    state0 = rounds.initial_state(s)
    merged, _ = rounds.run_round(s, state0, 0, 0)
    local, _ = rounds.client_training(s, state0["lora"], state0["head"], 0, 0)
    local_lora = by_layer(local["lora"], axis=1)  # the clients' LoRA: block layout [K, depth, ...]
    for p, f in merged["lora"].items():
        for x in "AB":
            np.testing.assert_allclose(f[x], np.asarray(local_lora[p][x][0]), rtol=1e-6, atol=0)
    np.testing.assert_allclose(merged["head"]["w"], np.asarray(local["head"]["w"][0]), rtol=1e-6, atol=0)
    central, _ = rounds.run_round(with_method(central_setup, "centralized"), state0, 0, 0)
    for p in merged["lora"]:
        for x in "AB":
            np.testing.assert_array_equal(central["lora"][p][x], merged["lora"][p][x])


def test_ffa_lora_never_changes_A(setup):
    s = with_method(setup, "ffa_lora")
    state = rounds.initial_state(s)
    init_a = {p: f["A"].copy() for p, f in state["lora"].items()}
    for rnd in range(s.config.rounds):
        state, m = rounds.run_round(s, state, 0, rnd)
        assert m["factor"] == "B" and "A" not in m["upload_breakdown"]
        for p, f in state["lora"].items():
            np.testing.assert_array_equal(f["A"], init_a[p])
    assert any(np.abs(f["B"]).max() > 0 for f in state["lora"].values())
    state, _ = rounds.end_task(s, state, 0)
    for p in init_a:
        np.testing.assert_array_equal(state["past_a"][p][0], init_a[p])


def test_method_protocol_docstring_example_runs():
    """The runnable example of :mod:`lorm_jax.methods.base` (a method written against the ``Method`` protocol, merged
    by hand) passes as a doctest; every shipped method satisfies the protocol."""
    result = doctest.testmod(base, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 5 and result.failed == 0, result
    for name in methods.NAMES:
        assert isinstance(methods.get(name, config_lib.base_config()), methods.Method), name


# ----------------------------------------------------------------------------------------------------------------------
# Pure merge functions

def _problem(seed, k=3, d_out=7, d_in=9, r=2, full=False):
    rng = np.random.default_rng(seed)
    b = rng.normal(size=(k, d_out, r)).astype(np.float32)
    a = rng.normal(size=(k, r, d_in)).astype(np.float32)
    x = [rng.normal(size=(20, d_in)) * rng.uniform(0.2, 2.0, d_in) for _ in range(k)]
    grams = np.stack([xi.T @ xi if full else np.sum(xi * xi, 0) for xi in x]).astype(np.float32)
    return b, a, grams


def _objective(w, b, a, grams):
    """Σ_k tr((W − B_k A_k) G_k (W − B_k A_k)ᵀ) in float64."""
    total = 0.0
    for bk, ak, g in zip(b.astype(np.float64), a.astype(np.float64), grams.astype(np.float64)):
        d = w - bk @ ak
        total += np.trace(d @ (np.diag(g) if g.ndim == 1 else g) @ d.T)
    return total


@pytest.mark.parametrize("full", [False, True])
def test_regmean_rank_r_is_regmean_at_full_rank_and_optimal_below(full):
    b, a, grams = _problem(0, full=full)
    ideal = np.asarray(merging.regmean_lowrank(b, a, grams))
    nb, na = (np.asarray(x) for x in regmean_rank_r(b, a, grams, 6))  # rank(ΔW*) <= K r = 6
    np.testing.assert_allclose(nb @ na, ideal, rtol=1e-4, atol=1e-4)
    nb, na = (np.asarray(x, np.float64) for x in regmean_rank_r(b, a, grams, 2))
    np.testing.assert_allclose(na @ na.T, np.eye(2), atol=1e-5)  # A has orthonormal rows
    best = _objective(nb @ na, b, a, grams)
    u, sv, vt = np.linalg.svd(ideal.astype(np.float64))
    plain_svd = (u[:, :2] * sv[:2]) @ vt[:2]
    fedavg = b.mean(0).astype(np.float64) @ a.mean(0)
    assert _objective(ideal, b, a, grams) <= best + 1e-3
    # the Gram-weighted truncation beats the plain one (by ~1 % here), and FedAvg of the factors by far
    assert best < 0.995 * _objective(plain_svd, b, a, grams) and best < _objective(fedavg, b, a, grams)
    rng = np.random.default_rng(1)
    for _ in range(5):  # a local perturbation of the factors never does better
        pb, pa = nb + 1e-2 * rng.normal(size=nb.shape), na + 1e-2 * rng.normal(size=na.shape)
        assert best <= _objective(pb @ pa, b, a, grams) + 1e-4 * best


@pytest.mark.parametrize("full", [False, True])
def test_merge_residuals_match_their_definition(full):
    b, a, grams = _problem(2, full=full)
    mb, ma = b.mean(0), a[0]
    rho, rho_star = np.asarray(merging.merge_residuals(b, a, mb, ma, grams))
    den = _objective(np.zeros((b.shape[1], a.shape[2])), b, a, grams)
    ideal = np.asarray(merging.regmean_lowrank(b, a, grams), np.float64)
    assert rho == pytest.approx(_objective(mb.astype(np.float64) @ ma, b, a, grams) / den, rel=1e-4)
    assert rho_star == pytest.approx(_objective(ideal, b, a, grams) / den, rel=1e-3, abs=1e-6)
    assert 0 < rho_star < rho


def test_lorm_A_merge_is_the_regmean_optimum_and_identical_clients_have_no_residual():
    b, a, grams = _problem(3)
    shared = np.broadcast_to(b[:1], b.shape)
    merged_a = merging.merge_lora_A(a, grams)
    rho, rho_star = np.asarray(merging.merge_residuals(shared, a, b[0], merged_a, grams))
    assert rho == pytest.approx(rho_star, rel=1e-4, abs=1e-6) and rho > 0
    same_b, same_a = np.broadcast_to(b[:1], b.shape), np.broadcast_to(a[:1], a.shape)
    np.testing.assert_allclose(merging.merge_residuals(same_b, same_a, b[0], a[0], grams), 0, atol=1e-5)
    np.testing.assert_array_equal(merging.merge_residuals(0 * b, a, 0 * b[0], a[0], grams), 0)  # 0/0 → 0


def _round_inputs(seed, k=3, c=5, f=4):
    b, a, grams = _problem(seed, k=k)
    rng = np.random.default_rng(seed)
    lora = {"l0": {"A": jnp.asarray(a), "B": jnp.asarray(b)}}
    heads = {"w": jnp.asarray(rng.normal(size=(k, c, f)), jnp.float32), "b": jnp.asarray(rng.normal(size=(k, c)),
                                                                                         jnp.float32)}
    head_grams = jnp.asarray(np.stack([np.eye(f) * (i + 1) + 0.1 for i in range(k)]), jnp.float32)
    server = {"w": jnp.zeros((c, f)), "b": jnp.zeros((c,))}
    rows = jnp.asarray([False, True, True, False, False])
    return lora, {"l0": jnp.asarray(grams)}, heads, head_grams, server, rows


@pytest.mark.parametrize("name,factor", [("lorm", "B"), ("lorm", "A"), ("fedavg_lora", "AB"), ("ffa_lora", "B"),
                                         ("regmean_lora", "AB"), ("linear_probe", "")])
def test_a_nan_client_with_zero_weight_drops_out(name, factor):
    """An excluded client (non-finite parameters, weight 0, Grams zeroed by the engine) changes nothing."""
    lora, grams, heads, head_grams, server, rows = _round_inputs(4)
    method = methods.get(name, config_lib.base_config())
    n = jnp.asarray([3.0, 5.0, 0.0])
    two = lambda t: {k: v[:2] for k, v in t.items()}
    expected = method.merge_round({"l0": two(lora["l0"])}, {"l0": grams["l0"][:2]}, two(heads), head_grams[:2],
                                  n[:2], factor, rows, server)
    poison = lambda x: x.at[2].set(jnp.nan)
    got = method.merge_round({"l0": {k: poison(v) for k, v in lora["l0"].items()}},
                             {"l0": grams["l0"].at[2].set(0.0)}, {k: poison(v) for k, v in heads.items()},
                             head_grams.at[2].set(0.0), n, factor, rows, server)
    chex.assert_trees_all_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("full", [False, True])
def test_task_merge_ignores_unfinished_slots_and_compiles_once(full):
    """The cross-task merge reads only the first ``num_tasks`` slots (NaN in the others changes nothing: it equals the
    merge of the sliced arrays exactly, being the same sums plus exact zeros), and a jitted merge with a traced task
    count compiles once for every count."""
    rng = np.random.default_rng(3)
    T, d_out, r, d_in = 4, 6, 2, 5
    past_b = {"l0": jnp.asarray(rng.normal(size=(T, d_out, r)), jnp.float32)}
    past_a = {"l0": jnp.asarray(rng.normal(size=(T, r, d_in)), jnp.float32)}
    x = rng.normal(size=(T, 30, d_in))
    grams = np.einsum("tni,tnj->tij", x, x) if full else np.einsum("tni,tni->ti", x, x)
    task_grams = {"l0": jnp.asarray(grams, jnp.float32)}
    chex.clear_trace_counter()  # the counter of the traced function below is shared by this test's parametrisations
    merge = jax.jit(chex.assert_max_traces(lambda *args: common.regmean_task_deltas(*args), n=1))  # a 2nd trace fails
    for n in (1, 2, 3):
        garbage = lambda t: {"l0": t["l0"].at[n:].set(jnp.nan)}
        got = merge(garbage(past_b), garbage(past_a), garbage(task_grams), n)["l0"]
        if n == 1:  # the reference keeps B_0 A_0
            want = past_b["l0"][0] @ past_a["l0"][0]
        else:
            want = merging.regmean_lowrank(past_b["l0"][:n], past_a["l0"][:n], task_grams["l0"][:n])
        np.testing.assert_allclose(got, want, rtol=0, atol=float(gamma(4 * n * d_in)) * float(jnp.max(jnp.abs(want))))
        assert np.all(np.isfinite(got))


def test_head_merges_and_task_means():
    lora, grams, heads, head_grams, server, rows = _round_inputs(5)
    n = jnp.asarray([1.0, 2.0, 3.0])
    head = common.merge_head(heads, head_grams, n, rows, server, how="fedavg")
    # sample-weighted means of 3 float32 terms against float64: within γ_{3+2} of the absolute terms (weights
    # n / Σ n included); an elementwise rtol would be unsafe where the terms cancel
    hw = np.asarray(heads["w"], np.float64)
    mean_w = np.einsum("k,kcf->cf", np.asarray(n) / 6, hw)
    assert_within(head["w"][1:3], mean_w[1:3], gamma(5) * np.einsum("k,kcf->cf", np.asarray(n) / 6, np.abs(hw))[1:3])
    np.testing.assert_array_equal(head["w"][0], 0)  # rows of other tasks: the server's
    avg = common.fedavg_lora(lora, n, "B")  # sample-weighted mean of the trained factor, the other passed through
    lb = np.asarray(lora["l0"]["B"], np.float64)
    assert_within(avg["l0"]["B"], np.einsum("k,kor->or", np.asarray(n) / 6, lb),
                  gamma(5) * np.einsum("k,kor->or", np.asarray(n) / 6, np.abs(lb)))
    np.testing.assert_array_equal(avg["l0"]["A"], lora["l0"]["A"][0])
    with pytest.raises(ValueError, match="head_merge"):
        methods.get("lorm", config_lib.override(config_lib.base_config(), head_merge="median"))
    with pytest.raises(ValueError, match="one learning rate"):  # A and B train together: one LoRA learning rate
        methods.get("fedavg_lora", config_lib.override(config_lib.base_config(), lr_a=1e-3, lr_b=2e-3))
    methods.get("lorm", config_lib.override(config_lib.base_config(), lr_a=1e-3, lr_b=2e-3))  # alternating: fine
    past_b, past_a = {"l0": lora["l0"]["B"]}, {"l0": lora["l0"]["A"]}
    b64, a64 = (np.asarray(x["l0"][:2], np.float64) for x in (past_b, past_a))
    r = b64.shape[-1]  # (B_0 A_0 + B_1 A_1) / 2: sums of 2 r products, within γ_{2r+1} of the absolute terms
    assert_within(common.mean_task_deltas(past_b, past_a, 2)["l0"], np.einsum("tor,trd->od", b64, a64) / 2,
                  gamma(2 * r + 1) * np.einsum("tor,trd->od", np.abs(b64), np.abs(a64)) / 2)
