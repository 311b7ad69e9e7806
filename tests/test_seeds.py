"""Training seed vs data seed, the two forgetting definitions, the head init options (issue 19).

Setups are built (no training) from the small config of tests/conftest.py (1-block ViT) with a per-class subsample,
so both data draws (subsample and partition) depend on the data seed.
"""
import json
import math

import chex
import jax
import numpy as np
import pytest
from conftest import ONE_BLOCK, small_config

from lorm_jax import config as config_lib
from lorm_jax import metrics, objective, plan, rng, rounds
from lorm_jax import workdir as workdir_lib
from lorm_jax.data.partition import partition as split_clients


def config_for(**overrides):
    return small_config(**ONE_BLOCK, **overrides)


def setup_for(**overrides):
    return plan.build_setup(config_for(**{"data.n_train_per_class": 30, **overrides}))


def trees_differ(a, b) -> bool:
    """Whether two trees of the same structure differ in some leaf (a structure mismatch fails)."""
    try:
        chex.assert_trees_all_equal(a, b)
    except AssertionError:
        chex.assert_trees_all_equal_structs(a, b)
        return True
    return False


def test_training_seed_leaves_the_data_alone():
    a, b = setup_for(seed=0, **{"data.seed": 3}), setup_for(seed=1, **{"data.seed": 3})
    assert plan.partition_digest(a) == plan.partition_digest(b)
    np.testing.assert_array_equal(a.dataset.x_train, b.dataset.x_train)
    # ... while the training draws do follow config.seed, and the data follows data.seed (so the test can fail)
    assert trees_differ(rounds.initial_state(a)["lora"], rounds.initial_state(b)["lora"])
    c = setup_for(seed=0, **{"data.seed": 4})
    assert plan.partition_digest(c) != plan.partition_digest(a)
    assert not np.array_equal(c.dataset.x_train, a.dataset.x_train)  # the per-class subsample differs too


def test_data_seed_leaves_the_initial_state_alone():
    a, b = setup_for(seed=0, **{"data.seed": 3}), setup_for(seed=0, **{"data.seed": 4})
    assert plan.partition_digest(a) != plan.partition_digest(b)
    chex.assert_trees_all_equal(rounds.initial_state(a), rounds.initial_state(b))  # LoRA, head and the rest
    chex.assert_trees_all_equal(rng.client_keys(a.config.seed, 1, 2, np.arange(4), rng.TRAIN_STREAM),
                                rng.client_keys(b.config.seed, 1, 2, np.arange(4), rng.TRAIN_STREAM))


def test_default_data_seed_is_the_training_seed_as_before():
    """data.seed = -1 draws exactly what data.seed = config.seed draws, and that is the partition of the formula used
    before the key existed (generator ``default_rng([config.seed, task, 7])``)."""
    default, explicit = setup_for(seed=5), setup_for(seed=5, **{"data.seed": 5})
    assert config_lib.data_seed(default.config) == config_lib.data_seed(explicit.config) == 5
    np.testing.assert_array_equal(default.dataset.x_train, explicit.dataset.x_train)
    np.testing.assert_array_equal(default.dataset.y_train, explicit.dataset.y_train)
    for parts_d, parts_e in zip(default.partitions, explicit.partitions):
        for p, q in zip(parts_d, parts_e):
            np.testing.assert_array_equal(p, q)
    chex.assert_trees_all_equal(rounds.initial_state(default), rounds.initial_state(explicit))
    c, y = default.config, default.dataset.y_train
    for t, (idx, parts) in enumerate(zip(default.task_train, default.partitions)):
        before = split_clients(y[idx], c.num_clients, c.data.partition, np.random.default_rng([5, t, 7]),
                               beta=c.data.beta, classes_per_client=c.data.classes_per_client,
                               min_samples=c.data.min_samples)
        for p, q in zip(parts, before):
            np.testing.assert_array_equal(p, idx[q])


def test_recorded_configs_from_before_the_new_keys_are_still_accepted(tmp_path):
    config = config_for()
    recorded = json.loads(config.to_json_best_effort())
    del recorded["data"]["seed"], recorded["head_init"], recorded["client_lanes"]
    recorded["client_chunk"] = 0  # recorded by the engine before lanes
    (tmp_path / "config.json").write_text(json.dumps(recorded))
    workdir_lib.check_config(str(tmp_path), config, write=False)  # the defaults reproduce the old run
    with pytest.raises(ValueError, match=r"config\.data\.seed: -1 before, 3 now"):
        workdir_lib.check_config(str(tmp_path), config_for(**{"data.seed": 3}), write=False)
    with pytest.raises(ValueError, match=r"config\.head_init: 'trunc_2sigma' before, 'reference' now"):
        workdir_lib.check_config(str(tmp_path), config_for(head_init="reference"), write=False)
    assert config_lib.with_added_keys(recorded) == json.loads(config.to_json_best_effort())
    assert "seed" not in recorded["data"] and "client_chunk" in recorded  # not mutated


# ----------------------------------------------------------------------------------------------------------------------
# Forgetting

NAN = np.nan
# Task 0 rises after task 1 (0.8 -> 0.9), so "best earlier" and "right after learning" differ.
ACC = np.array([[0.8, NAN, NAN],
                [0.9, 0.7, NAN],
                [0.5, 0.4, 0.6]])


def test_both_forgetting_definitions_on_a_hand_made_matrix():
    m = metrics.continual_metrics(ACC, np.array([10, 10, 10]))
    # Each value is a few float64 operations on numbers <= 1 (error ~1e-16); 1e-12 leaves room and still tells the
    # definitions apart (they differ by 0.15 here).
    tol = dict(rel=0, abs=1e-12)
    assert m["forgetting"] == pytest.approx(((0.9 - 0.5) + (0.7 - 0.4)) / 2, **tol)          # 0.35
    assert m["forgetting_reference"] == pytest.approx(((0.8 - 0.5) + (0.7 - 0.4) + 0.0) / 3, **tol)  # 0.2
    assert m["bwt"] == pytest.approx(((0.5 - 0.8) + (0.4 - 0.7)) / 2, **tol)                 # -0.3
    assert m["bwt"] == pytest.approx(-3 / 2 * m["forgetting_reference"], **tol)
    # without a rise the reference's definition is the max-based one scaled by (T-1)/T
    flat = ACC.copy()
    flat[1, 0] = 0.8
    f = metrics.continual_metrics(flat, np.array([10, 10, 10]))
    assert f["forgetting_reference"] == pytest.approx(2 / 3 * f["forgetting"], **tol)


def test_forgetting_of_a_single_task_is_zero():
    m = metrics.continual_metrics(np.array([[0.7]]), np.array([5]))
    assert (m["forgetting"], m["forgetting_reference"], m["bwt"]) == (0.0, 0.0, 0.0)
    bwt = metrics.continual_metrics(np.array([[0.7, NAN], [0.7, 0.2]]), np.array([5, 5]))["bwt"]
    assert str(bwt) == "0.0"  # not -0.0


# ----------------------------------------------------------------------------------------------------------------------
# Head init

N_CLASSES, N_FEATURES = 100, 768   # N = 76 800 weights
P_BEYOND_2 = math.erfc(2 / math.sqrt(2))  # P(|Z| > 2) = 4.55 % for Z ~ N(0, 1)
# std of N(0, 1) truncated to [-2, 2]: sqrt(1 - 2·2·φ(2) / P(|Z| ≤ 2)) = 0.8796
TRUNC_2SIGMA_STD = math.sqrt(1 - 4 * math.exp(-2) / math.sqrt(2 * math.pi) / (1 - P_BEYOND_2))


def test_reference_head_init_is_an_untruncated_normal_at_std_002():
    w = np.asarray(objective.init_head(jax.random.PRNGKey(0), N_CLASSES, N_FEATURES, "reference")["w"], np.float64)
    n = w.size
    # Sample std of N iid normals: standard error sigma / sqrt(2N) (0.26 % here); 5 standard errors. The ±2σ draw
    # (std 0.0176, 12 % lower) is far outside.
    assert abs(w.std() / 0.02 - 1) < 5 / np.sqrt(2 * n)
    # Beyond ±0.04 (= 2σ) a normal puts p = 4.55 % of its mass: a count ~ Binomial(N, p); 5 of its standard deviations.
    p = P_BEYOND_2
    beyond = int(np.sum(np.abs(w) > 0.04))
    assert abs(beyond - n * p) < 5 * np.sqrt(n * p * (1 - p))


def test_default_head_init_is_unchanged():
    key = jax.random.PRNGKey(0)
    head = objective.init_head(key, N_CLASSES, N_FEATURES)
    np.testing.assert_array_equal(head["w"], 0.02 * jax.random.truncated_normal(key, -2.0, 2.0,
                                                                                  (N_CLASSES, N_FEATURES)))
    np.testing.assert_array_equal(head["b"], np.zeros(N_CLASSES, np.float32))
    w = np.asarray(head["w"], np.float64)
    assert np.max(np.abs(w)) <= 0.04
    # Truncation makes the sample variance less spread than a normal's, so the normal's standard error bounds it.
    assert abs(w.std() / (0.02 * TRUNC_2SIGMA_STD) - 1) < 5 / np.sqrt(2 * w.size)
    with pytest.raises(ValueError, match="head init 'timm' is invalid"):
        objective.init_head(key, 2, 3, "timm")


def test_head_init_reaches_the_initial_state():
    a, b = setup_for(), setup_for(head_init="reference")
    sa, sb = rounds.initial_state(a), rounds.initial_state(b)
    chex.assert_trees_all_equal(sa["lora"], sb["lora"])
    assert not np.array_equal(sa["head"]["w"], sb["head"]["w"])
    assert np.max(np.abs(sa["head"]["w"])) <= 0.04
