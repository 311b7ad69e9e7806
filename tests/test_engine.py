"""The federated engine: phases, LoRM fixed point, resume, lanes in a whole run, CLI, compilation."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ONE_BLOCK, REPO, TINY, small_config

from lorm_jax import continual, federated, metrics, plan, rng, rounds, testing
from lorm_jax import data as data_lib
from lorm_jax import workdir as workdir_lib
from lorm_jax.backbones.common import by_layer


@pytest.fixture(scope="module")
def setup():
    return plan.build_setup(small_config())


def test_only_the_phase_factor_and_task_rows_train(setup):
    state = rounds.initial_state(setup)
    for rnd, frozen in ((0, "A"), (1, "B")):  # LoRM: B in round 0, A in round 1
        out, _ = rounds.client_training(setup, state["lora"], state["head"], 0, rnd)
        for p, f in by_layer(out["lora"], axis=1).items():  # the clients' LoRA: block layout [K, depth, ...]
            np.testing.assert_array_equal(np.asarray(f[frozen]), np.broadcast_to(state["lora"][p][frozen],
                                                                               f[frozen].shape))
    rows = rounds.task_rows(setup, 0)
    w = np.asarray(out["head"]["w"])
    np.testing.assert_array_equal(w[:, ~rows], np.broadcast_to(state["head"]["w"][~rows], w[:, ~rows].shape))
    assert not np.allclose(w[:, rows], state["head"]["w"][rows])


def test_filler_network_adds_the_scaled_sum_of_the_finished_tasks_deltas(setup):
    """rounds.gram_network (filler, task t): W0 + (Σ_{τ<t} B_τ A_τ) / (t + 1) on every LoRA layer, the other weights
    untouched. Per entry the sum of r·t products and two roundings: within 4ε of |W0| + Σ|B||A|/(t + 1)."""
    state = dict(rounds.initial_state(setup))
    gen = np.random.default_rng(0)
    for name in ("past_b", "past_a"):
        state[name] = {p: gen.standard_normal(x.shape).astype(np.float32) for p, x in state[name].items()}
    task = 1
    params, scale = rounds.gram_network(setup, state, task)
    assert scale == 1 / (task + 1)
    base, got = (dict(jax.tree_util.tree_flatten_with_path(x)[0]) for x in (setup.backbone.params, params))
    delta = {p: np.einsum("tor,trd->od", state["past_b"][p][:task], state["past_a"][p][:task])
             for p in state["past_b"]}
    magnitude = {p: np.einsum("tor,trd->od", np.abs(state["past_b"][p][:task]), np.abs(state["past_a"][p][:task]))
                 for p in state["past_b"]}
    want = setup.backbone.add_delta(jax.tree.map(jnp.asarray, setup.backbone.params),
                                    {p: jnp.asarray(d * scale) for p, d in delta.items()})
    bound = setup.backbone.add_delta(jax.tree.map(jnp.abs, setup.backbone.params),
                                     {p: jnp.asarray(m * scale) for p, m in magnitude.items()})
    eps = np.finfo(np.float32).eps
    for (path, w), b in zip(jax.tree_util.tree_flatten_with_path(want)[0], jax.tree.leaves(bound)):
        np.testing.assert_array_less(np.abs(np.asarray(got[path]) - np.asarray(w)), 4 * eps * np.asarray(b) + 1e-30,
                                     err_msg=jax.tree_util.keystr(path))
    changed = [jax.tree_util.keystr(k) for k, v in got.items() if not np.array_equal(np.asarray(v), base[k])]
    assert changed and all(k.endswith("['kernel']") for k in changed), changed


@pytest.mark.slow
def test_lorm_round_with_identical_clients_returns_their_factor(setup):
    """Every client holds the same data and trained the same factor → the merge returns that factor and head."""
    c = setup.config
    K = c.num_clients
    part = setup.partitions[0][0]
    own_idx, own_mask = data_lib.client_schedule([part], c.batch_size, c.epochs, np.random.default_rng(0))
    same_keys = jnp.stack([rng.client_keys(0, 0, 0, np.arange(1), rng.TRAIN_STREAM)[0]] * K)
    lanes = data_lib.lane_schedule([own_idx[0]] * K, [own_mask[0]] * K, data_lib.pack_lanes([len(own_idx[0])] * K, 2),
                                   num_steps=K * len(own_idx[0]), num_slots=K, num_rows=K + 1)
    packed = data_lib.packed_schedule([part] * K, c.batch_size, 1, block=1, blocks_per_batch=c.batch_size)
    state = rounds.initial_state(setup)
    rows = jnp.asarray(rounds.task_rows(setup, 0))
    for factor in ("B", "A"):
        lora0 = state["lora"]
        if factor == "A":  # A only learns once B != 0
            lora0 = {p: {"A": f["A"], "B": 0.1 * np.ones_like(f["B"])} for p, f in lora0.items()}
        out = federated.train_clients(setup.programs, setup.backbone.params, setup.train, lora0, state["head"], lanes,
                                      same_keys, factor, 1e-2, rows)
        grams, head_grams = federated.client_grams(setup.programs, setup.backbone.params, setup.train, out["lora"],
                                                   packed, same_keys, 1.0)
        client_lora = by_layer(out["lora"], axis=1)  # the engine's block layout [K, depth, ...], per layer
        lora, head = setup.method.merge_round(client_lora, grams, out["head"], head_grams, jnp.ones(K), factor,
                                              rows, state["head"])
        for p in lora:
            np.testing.assert_allclose(lora[p][factor], client_lora[p][factor][0], rtol=2e-4, atol=1e-6)
        np.testing.assert_allclose(head["w"], out["head"]["w"][0], rtol=2e-4, atol=1e-6)
        np.testing.assert_allclose(head["b"], out["head"]["b"][0], rtol=1e-6, atol=1e-7)


def _results(workdir):
    with open(os.path.join(workdir, "results.json")) as f:
        return json.load(f)


@pytest.mark.slow
def test_resumed_run_is_identical(tmp_path):
    config = small_config()
    full = continual.run(config, str(tmp_path / "full"), progress=False)
    assert full["final_average_accuracy"] > 0.5  # chance is 0.25 on 4 classes
    assert np.isfinite(full["forgetting"])

    interrupted = str(tmp_path / "resumed")
    with pytest.raises(testing.StopRun):
        continual.run(config, interrupted, progress=False, hooks=testing.stop_after(2))
    assert not os.path.exists(os.path.join(interrupted, "results.json"))
    with pytest.raises(testing.StopRun):  # resumes at unit 2, stops after unit 3
        continual.run(config, interrupted, progress=False, hooks=testing.stop_after(4))
    assert not os.path.exists(os.path.join(interrupted, "results.json"))
    resumed = continual.run(config, interrupted, progress=False)
    assert resumed == full
    with open(os.path.join(interrupted, "metrics.jsonl")) as f:
        units = [json.loads(line)["unit"] for line in f]
    assert units == list(range(2 * (config.rounds + 1)))
    assert continual.run(config, interrupted, progress=False) == full  # a finished run returns at once


@pytest.mark.slow
def test_lanes_change_nothing_in_a_run(tmp_path):
    """Acceptance (#15): 1 and 3 lanes give the same run (accuracy matrix, per-client losses), and every round
    reports how much of its work was real. In float64 (see tests/test_lanes.py for why: float32 rounding of batched
    vs unbatched matmuls, amplified by AdamW, would make any tolerance machine-specific)."""
    runs = {}
    with jax.enable_x64(True):
        for lanes in (1, 3):  # 4 clients in 3 lanes: one lane runs two clients back to back
            config = small_config(client_lanes=lanes, merge_dtype="float64", **{"backbone.options": {
                **small_config().backbone.options.to_dict(), "compute_dtype": "float64"}})
            runs[lanes] = continual.run(config, str(tmp_path / f"lanes{lanes}"), progress=False)
            with open(tmp_path / f"lanes{lanes}" / "metrics.jsonl") as f:
                runs[lanes]["lines"] = [json.loads(line) for line in f]
    one = runs[1]
    for lanes, r in runs.items():
        assert r["accuracy_matrix"] == one["accuracy_matrix"], lanes
        for a, b in zip(r["lines"], one["lines"]):
            if "client_loss" in a:
                # float64 runs agree to ~1e-12; metrics.jsonl rounds losses to 5 decimals (one rounding step apart)
                np.testing.assert_allclose(a["client_loss"], b["client_loss"], rtol=0, atol=1.1e-5)
        assert r["utilization"]["lanes"] == lanes
    rounds = [line for line in one["lines"] if "client_loss" in line]
    for line in rounds:
        for key in ("train_utilization", "batch_fill", "gram_utilization"):
            assert 0 < line[key] <= 1, (key, line[key])
    util = lambda r, key: r["utilization"][key]["min"]  # noqa: E731
    assert util(one, "train_utilization") == util(one, "batch_fill")  # one lane: no lane step without examples
    assert util(runs[3], "train_utilization") < util(runs[3], "batch_fill")  # 4 clients of unequal size in 3 lanes


def test_workdir_with_other_config_is_refused(tmp_path):
    workdir = str(tmp_path / "w")
    workdir_lib.check_config(workdir, small_config())
    with pytest.raises(ValueError, match="config.rank"):
        workdir_lib.check_config(workdir, small_config(rank=2))


def test_summarize_metrics():
    acc = np.array([[0.9, np.nan, np.nan], [0.7, 0.8, np.nan], [0.6, 0.5, 0.9]])
    m = metrics.continual_metrics(acc, np.array([10, 10, 20]))
    assert m["final_average_accuracy"] == pytest.approx((6 + 5 + 18) / 40)
    assert m["final_average_accuracy_task_mean"] == pytest.approx(2.0 / 3)
    assert m["forgetting"] == pytest.approx(((0.9 - 0.6) + (0.8 - 0.5)) / 2)
    assert m["bwt"] == pytest.approx(((0.6 - 0.9) + (0.5 - 0.8)) / 2)
    assert m["average_incremental_accuracy"] == pytest.approx(np.mean([0.9, 0.75, 29 / 40]))


@pytest.mark.slow
def test_cli_tiny_run(tmp_path):
    """The CI smoke run: `lorm-jax run --config configs/tiny.py` end to end, well above chance (1/6)."""
    workdir = str(tmp_path / "tiny")
    proc = subprocess.run([sys.executable, "-m", "lorm_jax.cli", "run", "--config", TINY, "--workdir", workdir,
                           "--noprogress"], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = _results(workdir)
    assert results["final_average_accuracy"] > 0.4
    for name in ("metrics.jsonl", "accuracy_matrix.png", "accuracy_vs_task.png", "config.json"):
        assert os.path.exists(os.path.join(workdir, name))
    assert len(results["accuracy_matrix"]) == 3
    assert "final average accuracy" in proc.stdout


def _compiled_programs(fn):
    """The names of the programs XLA compiles while ``fn()`` runs (jax's compile log)."""
    import logging
    compiled = []
    handler = logging.Handler()
    handler.emit = lambda record: compiled.append(record.getMessage())
    logger = logging.getLogger("jax")
    logger.addHandler(handler)
    try:
        with jax.log_compiles(True):
            fn()
    finally:
        logger.removeHandler(handler)
    return [m.split("Finished XLA compilation of ")[1].split(" in ")[0] for m in compiled
            if "Finished XLA compilation of " in m]


@pytest.mark.slow
def test_a_repeated_round_compiles_nothing():
    """Every program of a round (training, Grams, the server merge, diagnostics) is compiled once: a later round
    that trains the same factor on the same shapes compiles nothing (eager merges re-compiled each ``lax.cond``)."""
    # full backbone Grams: the merge switches between Cholesky and the eigh pseudo-inverse with a lax.cond
    setup = plan.build_setup(small_config(rounds=3, alpha_backbone=0.5, eval_every_round=True))
    state = rounds.initial_state(setup)
    state, _ = rounds.run_round(setup, state, 0, 0)  # B
    state, _ = rounds.run_round(setup, state, 0, 1)  # A
    compiled = _compiled_programs(lambda: rounds.run_round(setup, state, 0, 2))  # B again
    assert not compiled, compiled


def test_rounds_and_the_task_end_share_one_gram_program():
    """Per-client Grams (a round in one wave): the B round, the A round and the task end run one compiled Gram pass
    (the backbone compiled once, whatever the factor); only the small contraction is compiled per factor."""
    setup = plan.build_setup(small_config(**ONE_BLOCK))  # its own programs: nothing compiled yet
    assert setup.schedule.gram_units == "clients"
    state = rounds.initial_state(setup)

    def task():
        after_b, _ = rounds.run_round(setup, state, 0, 0)
        after_a, _ = rounds.run_round(setup, after_b, 0, 1)
        rounds.end_task(setup, after_a, 0)

    names = _compiled_programs(task)
    assert names.count("jit(kept_grams)") == 1, names
    assert names.count("jit(contract_grams)") == 3, names  # B, A, the task end's Gram sums
    assert "jit(block_sums)" not in names


def test_warm_up_compiles_every_program_a_round_and_a_task_end_call():
    """rounds.warm_up runs a dry round of each factor and a dry task end (loops of 0 trips), two at a time, the first
    round's before it returns and the rest by the time its ``finish()`` returns: the real round and task end then
    trace (and compile) none of their programs again."""
    setup = plan.build_setup(small_config(**ONE_BLOCK))  # its own programs: nothing compiled or traced yet
    state = rounds.initial_state(setup)
    finish = rounds.warm_up(setup, state)
    assert setup.programs.train._cache_size() == 1  # compiled before warm_up returns, with the first round's merges
    finish()
    traced = []
    listener = lambda name, secs, **_: traced.append(name) if name.endswith("jaxpr_trace_duration") else None  # noqa
    jax.monitoring.register_event_duration_secs_listener(listener)
    calls = []

    def count(name, fn):
        def call(*args, **kwargs):
            before = len(traced)
            out = fn(*args, **kwargs)
            calls.append((name, len(traced) - before))
            return out
        return call

    try:
        watched = rounds.instrument(setup, count)
        state, line = rounds.run_round(watched, state, 0, 0)
        assert line["loss"] > 0  # real work: the dry run changed nothing
        state, _ = rounds.run_round(watched, state, 0, 1)
        state, _ = rounds.end_task(watched, state, 0)
        before = len(traced)
        rounds.gram_network(setup, state, 1)  # the next task's filler network, compiled by finish() too
        calls.append(("gram_network", len(traced) - before))
    finally:
        jax.monitoring.clear_event_listeners()
    assert {name for name, _ in calls} == {*rounds.STAGES, "gram_network"}
    assert [c for c in calls if c[1]] == [], calls
