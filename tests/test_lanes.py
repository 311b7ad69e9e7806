"""Lanes and packed passes: a client's result does not depend on how clients are laid out.

The equivalence tests run the tiny backbones with ``compute_dtype="float64"`` under ``jax.enable_x64``: float64
rounding (~1e-16 relative) is far below anything a layout bug could produce, and AdamW cannot amplify it the way it
amplifies float32 rounding of near-zero gradients (``lr·g/(|g| + ε)`` with ε = 1e-8: a gradient perturbed by
~1e-16·|g|max, |g|max ≲ 1, moves a step by ≲ lr·1e-16/1e-8 = 1e-10 at lr ≤ 1e-2). So the tolerances below hold on any
CPU, thread count and instruction set, while a client trained on the wrong batch, key, step count or from the wrong
state is off by O(lr).
"""
import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import small_config

from lorm_jax import federated, objective, plan, rng, rounds, sharding
from lorm_jax import lora as lora_lib
from lorm_jax.backbones.common import GramSpec, by_kind, by_layer, layer_gram
from lorm_jax.data import batching, inputs

X64 = functools.partial(jax.enable_x64, True)
TINY_VIT_64 = {"image_size": 16, "patch": 4, "width": 32, "depth": 1, "heads": 2, "mlp": 64, "seed": 0,
               "compute_dtype": "float64"}


# ----------------------------------------------------------------------------------------------------------------------
# Layouts (numpy only)

def test_pack_lanes_is_longest_first_and_balanced():
    steps = [5, 1, 8, 3, 0, 8, 2]
    lanes = batching.pack_lanes(steps, 3)
    assert sorted(k for lane in lanes for k in lane) == list(range(7))  # every client exactly once, zero-step too
    assert lanes[0][0] == 2 and lanes[1][0] == 5  # the two largest open the first lanes (ties: lower index first)
    loads = [sum(steps[k] for k in lane) for lane in lanes]
    assert max(loads) <= max(max(steps), math.ceil(sum(steps) / 3)) + max(steps) // 3  # LPT: within 4/3 of optimum
    assert batching.pack_lanes(steps, 1) == [[2, 5, 0, 3, 6, 1, 4]]
    with pytest.raises(ValueError):
        batching.pack_lanes(steps, 0)


def test_pack_steps_keeps_each_clients_order_and_fills_steps():
    sizes = [[10, 10], [16, 4, 16, 4], [7, 7], [3, 3], [15, 15], [16, 3, 16, 3], [11, 11], [3, 3], [3, 3], [9, 9]]
    plan = batching.pack_steps(sizes, 16, 16)
    assert len(plan) == math.ceil(sum(map(sum, sizes)) / 16)  # 200 examples: 13 lane steps (not 24 padded ones)
    seen = {m: [] for m in range(len(sizes))}
    for placed in plan:
        assert len({m for m, _, _ in placed}) == len(placed)  # at most one step of a client per lane step
        offsets = sorted((o, o + sizes[m][s]) for m, s, o in placed)
        assert offsets[-1][1] <= 16 and all(a[1] <= b[0] for a, b in zip(offsets, offsets[1:]))  # no overlap
        for m, s, _ in placed:
            seen[m].append(s)
    assert all(seen[m] == list(range(len(sizes[m]))) for m in seen)  # every step once, in order
    assert len(batching.pack_steps(sizes, 16, 1)) == sum(map(len, sizes))  # one client per step: back to back
    with pytest.raises(ValueError):
        batching.pack_steps([[17]], 16, 2)


def test_lane_schedule_lays_out_every_clients_steps_in_order():
    rng = np.random.default_rng(0)
    steps = [3, 0, 2, 4]
    own = [(rng.integers(0, 99, (s, 4)).astype(np.int32), rng.random((s, 4)) < 0.7) for s in steps]
    for _, m in own:  # real examples first, at least one per step (what client_schedule lays out)
        m.sort(axis=1)
        m[:] = m[:, ::-1]
        m[:, 0] = True
    lanes = batching.pack_lanes(steps, 2)
    lay = batching.lane_schedule([o[0] for o in own], [o[1] for o in own], lanes, num_steps=7, num_slots=2, num_rows=4)
    assert lay["idx"].shape == (2, 7, 4) and lay["rows"].shape == (2, 7, 2) and lay["real_steps"] == 9
    assert lay["real_examples"] == sum(int(m.sum()) for _, m in own) == int(lay["mask"].sum())
    assert lay["num_steps"] < 9  # packed: fewer lane steps than the clients' 9 local steps
    for k, (idx, mask) in enumerate(own):
        p, row = lay["lane_of"][k], lay["row_of"][k]
        slot_of = np.where(lay["active"][p] & (lay["client"][p] == k) & (lay["rows"][p] == row))
        times, slots = slot_of
        assert len(times) == steps[k] and np.all(np.diff(times) > 0)  # its steps in order, one per lane step
        for s, (t, m) in enumerate(zip(times, slots)):
            mine = lay["mask"][p, t] & (lay["owner"][p, t] == m)
            n = int(mask[s].sum())
            np.testing.assert_array_equal(lay["idx"][p, t, mine], idx[s, :n])
            assert np.all(lay["step"][p, t, mine] == s) and list(lay["position"][p, t, mine]) == list(range(n))
    assert np.all(lay["rows"][~lay["active"]] == 3)  # unused slots: the scratch row
    with pytest.raises(ValueError, match="num_steps"):
        batching.lane_schedule([o[0] for o in own], [o[1] for o in own], [[0, 1, 2, 3]], num_steps=3, num_slots=1,
                               num_rows=5)
    with pytest.raises(ValueError, match="rows"):
        batching.lane_schedule([o[0] for o in own], [o[1] for o in own], [[0, 1, 2, 3]], num_steps=9, num_slots=2,
                               num_rows=4)


@pytest.mark.parametrize("block,shards", [(1, 1), (3, 1), (2, 2)])
def test_packed_schedule_keeps_every_example_and_its_stream_position(block, shards):
    rng = np.random.default_rng(1)
    clients = [rng.permutation(200)[:n] for n in (7, 0, 16, 1, 33)]
    passes, stream = 2, 8
    lay = batching.packed_schedule(clients, stream, passes, block=block, blocks_per_batch=4, shards=shards)
    assert lay["idx"].shape[:3] == (shards, lay["num_batches"], 4) and lay["idx"].shape[3] == block
    owner = np.broadcast_to(lay["block_client"][..., None], lay["idx"].shape)
    assert lay["real_examples"] == passes * sum(len(c) for c in clients) == lay["mask"].sum()
    for k, ix in enumerate(clients):
        want_idx, want_mask = batching.client_schedule([ix], stream, passes, np.random.default_rng(0), shuffle=False)
        want = {(int(want_idx[0, s, j]), s, j) for s, j in zip(*np.nonzero(want_mask[0]))}
        sel = lay["mask"] & (owner == k)
        got = set(zip(lay["idx"][sel].tolist(), lay["step"][sel].tolist(), lay["position"][sel].tolist()))
        assert got == want and sel.sum() == len(want)  # each (example, step, position) exactly once
    blocks = lay["mask"].any(-1)
    assert len(np.unique(lay["block_client"][blocks])) == 4  # the empty client owns no block


# ----------------------------------------------------------------------------------------------------------------------
# Local training: lanes == a plain per-client loop

@pytest.fixture(scope="module")
def setup64():
    with X64():
        return plan.build_setup(small_config(num_clients=5, **{"backbone.options": TINY_VIT_64,
                                                               "data.min_samples": 1, "data.beta": 0.3}))


def _as64(tree):
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), tree)


def reference_training(setup, lora, head, own_idx, own_mask, keys, factor, lr, class_mask):
    """Each client alone, one jitted AdamW step at a time (an independent re-statement of local training)."""
    bb, c = setup.backbone, setup.config
    prepare = inputs.make_prepare(c, bb, setup.dataset)
    tx = objective.make_optimizer(lr, c.lr, c.weight_decay)
    trains = lora_lib.factor_mask(lora, float("A" in factor), float("B" in factor))

    @jax.jit
    def step(params, opt_state, idx, mask, key):
        inputs, labels = prepare(setup.train, idx, jax.random.split(key, idx.shape[0]), True)

        def loss_fn(p):
            features, _ = bb.apply(bb.params, p["lora"], inputs)
            return objective.masked_cross_entropy(objective.head_logits(p["head"], features), labels, class_mask,
                                                  mask.astype(jnp.float64))
        loss, grads = jax.value_and_grad(loss_fn)(params)
        grads = {"lora": jax.tree.map(jnp.multiply, grads["lora"], trains), "head": grads["head"]}
        updates, opt_state = tx.update(grads, opt_state, params)
        updates = {"lora": jax.tree.map(jnp.multiply, updates["lora"], trains), "head": updates["head"]}
        return optax.apply_updates(params, updates), opt_state, loss

    out = []
    for k in range(len(own_idx)):
        params = {"lora": lora, "head": head}
        opt_state, losses = tx.init(params), []
        for s in range(len(own_idx[k])):
            params, opt_state, loss = step(params, opt_state, own_idx[k][s], own_mask[k][s],
                                           jax.random.fold_in(keys[k], s))
            losses.append(float(loss))
        out.append({**params, "loss": float(np.mean(losses)) if losses else 0.0, "num_steps": len(losses)})
    return out


@pytest.mark.parametrize("num_lanes", [pytest.param(n, marks=pytest.mark.slow) if n != 2 else n for n in (1, 2, 3, 5)])
def test_lanes_equal_a_per_client_loop(setup64, num_lanes):
    """Acceptance (#15): for several P, every client's trained factor, head, loss and step count equal a plain loop
    over that client's own batches; client 1 holds no data (0 steps: it returns the server's parameters)."""
    with X64():
        s, c = setup64, setup64.config
        state = rounds.initial_state(s)
        lora = _as64({p: {"A": f["A"], "B": 0.1 + 0 * f["B"]} for p, f in state["lora"].items()})  # A gets gradients
        head = _as64(state["head"])
        parts = [p.copy() for p in s.partitions[0]]
        parts[1] = parts[1][:0]
        own = [batching.client_schedule([p], c.batch_size, 2, np.random.default_rng(k)) for k, p in enumerate(parts)]
        steps = batching.steps_per_client([len(p) for p in parts], c.batch_size, 2)
        own_idx = [o[0][0, :n] for o, n in zip(own, steps)]
        own_mask = [o[1][0, :n] for o, n in zip(own, steps)]
        keys = rng.client_keys(3, 0, 0, np.arange(len(parts)), rng.TRAIN_STREAM)
        rows = rounds.task_rows(s, 0)
        factor = "AB"  # both factors and the head move: every output is checked
        lanes = batching.lane_schedule(own_idx, own_mask, batching.pack_lanes(steps, num_lanes),
                                       num_steps=int(steps.sum()) + 2, num_slots=c.batch_size, num_rows=len(parts) + 2)
        got = sharding.gather(federated.train_clients(s.programs, s.backbone.params, s.train, lora, head, lanes,
                                                      keys, factor, 3e-3, rows))
        got["lora"] = by_layer(got["lora"], axis=1)  # the engine's clients' LoRA: block layout [K, depth, ...]
        want = reference_training(s, lora, head, own_idx, own_mask, keys, factor, 3e-3, rows)
    assert steps[1] == 0 and steps.max() > 1
    for k, w in enumerate(want):
        assert int(got["num_steps"][k]) == w["num_steps"] and bool(got["finite"][k])
        # ≤ 10 steps of ≲ 1e-10 each (module docstring): parameters within 1e-9, losses likewise
        np.testing.assert_allclose(got["loss"][k], w["loss"], rtol=1e-9, atol=1e-9)
        client_k = jax.tree.map(lambda x: x[k], {"lora": got["lora"], "head": got["head"]})
        chex.assert_trees_all_close(client_k, {"lora": w["lora"], "head": w["head"]}, rtol=0, atol=1e-9)
    np.testing.assert_array_equal(got["head"]["w"][1], head["w"])  # the empty client is the server's model


@pytest.mark.slow
def test_loop_buffers_change_nothing(setup64):
    """Longer loop buffers and more client rows (the run-wide shapes) leave every output bit-identical: padding
    steps are never executed."""
    with X64():
        s, c = setup64, setup64.config
        state = rounds.initial_state(s)
        own = [batching.client_schedule([p], c.batch_size, c.epochs, np.random.default_rng(k))
               for k, p in enumerate(s.partitions[0])]
        steps = batching.steps_per_client([len(p) for p in s.partitions[0]], c.batch_size, c.epochs)
        own_idx, own_mask = [o[0][0, :n] for o, n in zip(own, steps)], [o[1][0, :n] for o, n in zip(own, steps)]
        outs = []
        for extra in (0, 5):
            members = plan.round_waves(s, 0, 0)[0].members
            lay = batching.lane_schedule(own_idx, own_mask, members, s.schedule.num_steps + extra,
                                         s.schedule.num_slots, s.schedule.num_rows + extra)
            outs.append(sharding.gather(federated.train_clients(
                s.programs, s.backbone.params, s.train, state["lora"], state["head"], lay,
                rng.client_keys(0, 0, 0, np.arange(c.num_clients), rng.TRAIN_STREAM), "B", 1e-2,
                rounds.task_rows(s, 0))))
    chex.assert_trees_all_equal(outs[0], outs[1])


# ----------------------------------------------------------------------------------------------------------------------
# Packed Gram pass == per-client Grams

def reference_grams(setup, params, client_lora, keys, scale, clients=None):
    """Each client's Grams from its own examples alone: the unsegmented backbone Grams of every stream batch.
    ``clients``: the task-0 clients whose factors and keys ``client_lora`` / ``keys`` hold, in order (default all)."""
    c, bb = setup.config, setup.backbone
    prepare = inputs.make_prepare(c, bb, setup.dataset)
    stream = c.gram_batch_size or c.batch_size
    b_mode = "diag" if c.alpha_backbone == 0 else "full"
    h_mode = "diag" if c.alpha_head == 0 else "full"

    @jax.jit
    def one(lora, idx, mask, key):
        inputs, _ = prepare(setup.train, idx, jax.random.split(key, idx.shape[0]), c.gram_augment)
        features, grams = bb.apply(params, lora, inputs, gram=b_mode, weights=mask.astype(jnp.float64))
        return grams, layer_gram(features, GramSpec(h_mode, mask.astype(jnp.float64)))

    out = []
    for k, client in enumerate(range(len(setup.partitions[0])) if clients is None else clients):
        part = setup.partitions[0][client]
        idx, mask = batching.client_schedule([part], stream, c.gram_passes, np.random.default_rng(0), shuffle=False)
        lora = {p: {"A": f["A"][k], "B": f["B"][k] * scale} for p, f in client_lora.items()}
        total = None
        for s in range(idx.shape[1]):
            g = one(lora, idx[0, s], mask[0, s], jax.random.fold_in(keys[k], s))
            total = g if total is None else jax.tree.map(jnp.add, total, g)
        out.append(total)
    return out


# the fast lane runs the shrunk-full-Gram cases; the diagonal ones (alpha = 0) are in the full suite
@pytest.mark.parametrize("kind,alpha", [pytest.param("image", 0.0, marks=pytest.mark.slow), ("image", 0.5),
                                        pytest.param("text", 0.0, marks=pytest.mark.slow), ("text", 0.5)])
def test_packed_grams_equal_per_client_grams(kind, alpha):
    """Acceptance (#15): the packed pass (clients mixed in batches, LoRA gathered per block, segment sums) gives each
    client the Grams of its own examples alone: diagonal and full (shrunk) Grams, images with train augmentation
    (each example keeps its own key) and text with padding tokens (attention-masked rows)."""
    if kind == "image":
        opts = {"backbone.options": TINY_VIT_64}
    else:
        opts = {"backbone.name": "tiny_bert", "data.name": "synthetic_text", "data.max_len": 12,
                "backbone.options": {"width": 32, "depth": 1, "heads": 2, "mlp": 64, "max_len": 12,
                                     "compute_dtype": "float64"},
                "data.options": {"num_classes": 4, "n_train": 40, "n_test": 12, "seed": 0}}
    with X64():
        s = plan.build_setup(small_config(num_clients=4, alpha_backbone=alpha, alpha_head=alpha, gram_passes=2,
                                          gram_batch_size=8, **{"data.min_samples": 1, "data.beta": 0.3}, **opts))
        gen = np.random.default_rng(0)
        K = s.config.num_clients
        client_lora = {p: {"A": jnp.asarray(gen.normal(size=(K, 4, d_in)) / np.sqrt(d_in)),
                           "B": jnp.asarray(gen.normal(size=(K, d_out, 4)) * 0.1)}
                       for p, (d_out, d_in) in s.backbone.lora_shapes.items()}
        keys = rng.client_keys(0, 0, 0, np.arange(K), rng.GRAM_STREAM)
        grams, head = sharding.gather(federated.client_grams(s.programs, s.backbone.params, s.train,
                                                             by_kind(client_lora, axis=1),
                                                             plan.round_waves(s, 0, 0)[0].gram, keys, 0.5))
        want = reference_grams(s, s.backbone.params, client_lora, keys, 0.5)
    if kind == "text":
        assert (np.asarray(s.train["attention_mask"]) == 0).any()  # padding tokens are there to be left out
    assert s.schedule.gram_block == (1 if alpha == 0 else (4 if kind == "image" else 6))
    # float64 sums in another order: ~1e-15 relative (shrinking keeps float64, merging.shrink_gram)
    rtol = 1e-10
    for k in range(K):
        w_grams, w_head = want[k]
        if alpha:
            w_grams = {p: merge_shrink(g, alpha) for p, g in w_grams.items()}
            w_head = merge_shrink(w_head, alpha)
        for p in grams:
            np.testing.assert_allclose(grams[p][k], w_grams[p], rtol=rtol, atol=rtol * np.abs(w_grams[p]).max())
        np.testing.assert_allclose(head[k], w_head, rtol=rtol, atol=rtol * np.abs(w_head).max())


def merge_shrink(g, alpha):
    """``α G + (1 − α) diag(G)`` of a full Gram, in numpy float64."""
    g = np.asarray(g)
    return alpha * g + (1 - alpha) * np.diag(np.diag(g))


# ----------------------------------------------------------------------------------------------------------------------
# Streaming sums == per-client Grams summed

def _sum_bound(terms):
    """``Σ_k |term_k|``: what a sum's rounding error is relative to (cancellation makes the sum itself smaller)."""
    return jax.tree.map(lambda *x: sum(np.abs(np.asarray(t)) for t in x), *terms)


@pytest.mark.parametrize("alpha", [pytest.param(0.0, marks=pytest.mark.slow), 0.5])
def test_streaming_sums_equal_per_client_grams_summed(alpha):
    """Acceptance (#26): what a wave's Gram pass streams into the round's sums, per-client Grams contracted in the
    program ("clients") or per block of examples inside each layer ("blocks"), equals the sums over the included
    clients of each client's own Grams (:func:`reference_grams`, float64): Σ_k G_k of every layer and of the head,
    LoRM's A and B systems (Σ_k A_k G_k; Σ_k B_k A G_k Aᵀ, Σ_k A G_k Aᵀ), the merge diagnostics' Σ_k ΔW_k G_k and
    Σ_k tr(ΔW_k G_k ΔW_kᵀ), the head's RegMean system and the n_k-weighted bias sum. Client 2 is left out (include
    False): it is in none of them, though its factors are garbage (NaN)."""
    from lorm_jax import methods
    from lorm_jax.methods import base, common
    with X64():
        s = plan.build_setup(small_config(num_clients=4, alpha_backbone=alpha, alpha_head=0.5, gram_passes=2,
                                          gram_batch_size=8, merge_dtype="float64", **{"data.min_samples": 1,
                                          "data.beta": 0.3, "backbone.options": TINY_VIT_64}))
        gen = np.random.default_rng(1)
        K, r, f = 4, 4, s.backbone.feature_dim
        C = int(s.offsets[-1])
        wave = plan.round_waves(s, 0, 0)[0]
        assert list(wave.clients) == list(range(K))
        keys = rng.client_keys(0, 0, 0, np.arange(K), rng.GRAM_STREAM)
        include = np.array([True, True, False, True])
        samples = np.asarray([len(p) for p in s.partitions[0]], np.float32)
        total = np.float32(samples.sum())
        server_lora = {p: {"A": jnp.asarray(gen.normal(size=(r, d_in)) / np.sqrt(d_in)),
                           "B": jnp.asarray(gen.normal(size=(d_out, r)) * 0.1)}
                       for p, (d_out, d_in) in s.backbone.lora_shapes.items()}
        server_head = {"w": jnp.asarray(gen.normal(size=(C, f))), "b": jnp.asarray(gen.normal(size=C))}
        heads = {"w": jnp.asarray(gen.normal(size=(K, C, f))), "b": jnp.asarray(gen.normal(size=(K, C)))}
        heads = jax.tree.map(lambda x: x.at[2].set(jnp.nan), heads)
        method = methods.get("lorm", s.config)
        for factor in ("A", "B"):
            lora = {p: {"A": jnp.asarray(gen.normal(size=(K, r, d_in)) / np.sqrt(d_in)) if factor == "A"
                        else jnp.broadcast_to(server_lora[p]["A"], (K, r, d_in)),
                        "B": jnp.asarray(gen.normal(size=(K, d_out, r)) * 0.1) if factor == "B"
                        else jnp.broadcast_to(server_lora[p]["B"], (K, d_out, r))}
                    for p, (d_out, d_in) in s.backbone.lora_shapes.items()}
            lora = jax.tree.map(lambda x: x.at[2].set(jnp.nan), lora)
            # the reference: each included client's Grams on its own, then the sums over clients
            kept = [k for k in range(K) if include[k]]
            own = reference_grams(s, s.backbone.params, {p: {n: x[np.asarray(kept)] for n, x in v.items()}
                                                         for p, v in lora.items()}, keys[np.asarray(kept)], 0.5,
                                  clients=kept)
            shrink = (lambda g: merge_shrink(g, alpha)) if alpha else np.asarray
            grams = {p: jnp.asarray(np.stack([shrink(g[p]) for g, _ in own])) for p in lora}
            head_grams = jnp.asarray(np.stack([merge_shrink(h, 0.5) for _, h in own]))
            sub = {p: {n: x[np.asarray(kept)] for n, x in v.items()} for p, v in lora.items()}
            weights = jnp.asarray(samples[kept] / total)
            stats = base.Statistics(method, factor, residuals=True, dtype="float64")
            want = {"layers": {p: stats.layer(sub[p], grams[p]) for p in lora},
                    "clients": {"head_gram": head_grams.sum(0),
                                "merge": {"head": common.head_sums({n: x[np.asarray(kept)] for n, x in heads.items()},
                                                                   head_grams, weights, "regmean", jnp.float64)}}}
            bound = {"layers": {p: _sum_bound([stats.layer(jax.tree.map(lambda x: x[i:i + 1], sub[p]),
                                                           grams[p][i:i + 1]) for i in range(len(kept))])
                                for p in lora},
                     "clients": _sum_bound([{"head_gram": head_grams[i], "merge": {"head": common.head_sums(
                         {n: x[np.asarray(kept[i:i + 1])] for n, x in heads.items()}, head_grams[i:i + 1],
                         weights[i:i + 1], "regmean", jnp.float64)}} for i in range(len(kept))])}
            for blocks in (False, True):
                got, ok = sharding.gather(federated.client_sums(
                    s.programs, s.backbone.params, s.train, by_kind(lora, axis=1), heads, server_lora, server_head,
                    wave.gram, keys, 0.5, samples, include, float(total), stats, blocks))
                np.testing.assert_array_equal(ok, include)
                assert float(got["samples"]["included"]) == float(samples[kept].sum())
                # sums of the same terms in another order (blocks: each client's terms split over its blocks):
                # |error| ≤ n ε Σ|terms| with n ≤ 10³ terms and ε of the sum's dtype (float64; the FedAvg-style sums,
                # here the bias, are float32 by design: merging.weighted_sum)
                got = dict(got, layers=by_layer(got["layers"]))  # the engine's sums are in the block layout
                mine = {"layers": got["layers"], "clients": got["clients"]}
                assert jax.tree.structure(mine) == jax.tree.structure(want) == jax.tree.structure(bound)
                for (path, g), w, b in zip(jax.tree_util.tree_flatten_with_path(mine)[0], jax.tree.leaves(want),
                                           jax.tree.leaves(bound)):
                    eps = np.finfo(np.asarray(g).dtype).eps
                    assert np.asarray(g).dtype == np.asarray(w).dtype
                    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=0, atol=1e3 * eps * np.max(b),
                                               err_msg=f"{factor} blocks={blocks} {jax.tree_util.keystr(path)}")
            # and the Gram sums are the reference's Grams summed, independently of the library's sums
            for p in lora:
                np.testing.assert_allclose(np.asarray(got["layers"][p]["gram"]), np.asarray(grams[p]).sum(0),
                                           rtol=1e-12, atol=1e-12 * np.abs(np.asarray(grams[p])).sum(0).max())
