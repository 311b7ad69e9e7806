"""The client-side programs of a federated round, vmapped and sharded: local training in lanes, packed passes.

**Local training in lanes.** The K clients of a round are bin-packed by their work into P lanes
(:func:`lorm_jax.data.batching.pack_lanes`); ``jax.vmap`` runs the P lanes side by side. A lane keeps a *row* per
client (its LoRA/head and AdamW state, starting from the server's and fresh) and each of its steps packs whole local
steps of up to M of its clients into one batch (:func:`lorm_jax.data.batching.pack_steps`): every example takes its
client's parameters (per-example LoRA factors and head), so the frozen backbone runs once for the batch, and AdamW
updates each client on its own. Every client sees exactly its own batches, keys and step count, in order, so its
result does not depend on P, on its lane or on the packing (up to the rounding of batched vs unbatched matmuls). A
round costs about ``max(S_max, Σ examples / (P·B))`` vmapped steps of B examples, instead of K × the largest client's
steps of a padded vmap, and the partial last batches of the clients' epochs fill each other's gaps.

**Packed passes.** Gram statistics and evaluation keep no per-client state, so they run over shared batches of
client-pure blocks of examples (:func:`lorm_jax.data.batching.packed_schedule`): LoRA factors are gathered per block
and every Gram is summed per client (segment sums over blocks), so a pass costs about ΣN_k examples, not K × a padded
client.

**Loops and shapes.** Every loop is a ``lax.fori_loop`` with the round's own trip count over buffers sized for the
whole run, so a run compiles one training, one Gram and one evaluation program, and no padding step is ever executed.

**Devices.** The programs are ``shard_map``-ed over the mesh axis ``clients`` (:mod:`lorm_jax.sharding`): the lanes
(P a multiple of the mesh size) and the packed batches are split over the devices, the backbone, the data and the
server state are replicated; Gram sums and evaluation counts are ``psum``-ed, the per-lane outputs gathered to client
order.

Shapes used throughout::

    lanes       {"idx", "mask", "owner", "step", "position": [P, T, B], "rows", "client", "active": [P, T, M]}
                (batching.lane_schedule)
    packed      {"idx", "mask", "step", "position": [D, NB, G, b], "block_client": [D, NB, G]}
                (batching.packed_schedule)
    keys        [K]               one PRNG key per client (fold_in chain of seed, task, round, client, stream)
    lora        {path: {"A": [r, d_in], "B": [d_out, r]}}     the server's, per layer
    client_lora {kind: {"A": [K, depth, r, d_in], "B": [K, depth, d_out, r]}}   the clients', in the block layout
    head        {"w": [C, F], "b": [C]}                       (paper layout: logits = f Wᵀ + b)
    grams       {kind: [depth, K, d_in(, d_in)]} (kept_grams; {path: [K, ...]} for ``grams``), head [K, F(, F)]

**The block layout.** Per-layer quantities of the clients and of the sums are kept as the scanned backbone makes them:
the layers of one kind (``"mlp/fc1"``) stacked over the blocks (:func:`lorm_jax.backbones.common.by_kind`). Every
per-layer computation is then one op per layer kind, vmapped over the blocks, instead of one per layer: compiling
a ViT's merge-side programs means 4 kinds, not 48 layers (docs/BENCHMARKS.md). The server's state stays per layer
(host numpy, checkpoints); it is stacked where a program takes it and the merged LoRA unstacked on the host.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lorm_jax import lora as lora_lib
from lorm_jax import merging, sharding, trees
from lorm_jax.backbones import common
from lorm_jax.backbones.common import BlockSums, GramSpec, layer_gram
from lorm_jax.objective import head_logits, make_optimizer, masked_cross_entropy


def example_keys(key: jax.Array, step, batch: int, position=None) -> jax.Array:
    """Per-example augmentation keys of step ``step`` of a client's stream with key ``key``:
    ``split(fold_in(key, step), batch)`` ([batch] keys), or only the one at ``position``. A packed pass that mixes
    clients gives each example the key it would get in its own client's batches."""
    keys = jax.random.split(jax.random.fold_in(key, step), batch)
    return keys if position is None else keys[position]


@dataclasses.dataclass(frozen=True)
class ClientPrograms:
    """The jitted, sharded client-side programs of one experiment (built once by :func:`build_client_programs`).

    train(frozen, data, lora0, head0, lanes, keys, num_steps, factor_on, lr_factor, class_mask, *, num_rows)
        -> {"lora" (block layout), "head": [P, R, ...], "loss", "num_steps", "finite": [P, R]}
                                                                                  (see :func:`train_clients`)
    grams(gram_params, data, client_lora, packed, keys, num_batches, lora_scale, include, *, num_clients)
        -> (grams {path: [K, ...]}, head Grams [K, ...])                           (see :func:`client_grams`)
    sums(gram_params, data, client_lora, client_heads, server_lora, server_head, packed, keys, num_batches,
         lora_scale, num_samples, include, total, *, num_clients, stats, blocks)
        -> (sums, ok [K])                                                           (see :func:`client_sums`)
        with ``blocks`` the program ``block_sums`` (same arguments, no ``blocks``), else two programs:
    kept_grams(gram_params, data, client_lora, server_lora, packed, keys, num_batches, lora_scale, include,
               *, num_clients) -> (grams {kind: [depth, K, ...]}, head Grams [K, ...], ok [K])
    contract(client_lora, client_heads, server_lora, server_head, grams, head, ok, num_samples, include, total,
             *, stats) -> sums                  (for ``lower``: :func:`kept_grams_call`, :func:`contract_call`)
    evaluate(params, head, data, packed, num_batches, class_mask, *, num_segments)
        -> correct predictions per segment (task) [num_segments]                  (see :func:`count_correct`)
    """
    train: Callable
    grams: Callable
    sums: Callable
    block_sums: Callable
    kept_grams: Callable
    contract: Callable
    evaluate: Callable
    by_client: Callable      # ([P, R, ...] lane outputs, lane_of [K], row_of [K]) -> [K, ...], replicated
    take: Callable           # (client-stacked tree, idx [C]) -> its clients idx, replicated
    add: Callable            # (sums, sums) -> their sum, leaf by leaf
    mesh: Any = None
    gram_block: int = 1      # examples per client-pure block of the packed Gram pass


def build_client_programs(backbone, prepare: Callable, *, lr_head: float, weight_decay: float,
                           backbone_gram: str, alpha_backbone: float, head_gram: str, alpha_head: float,
                           augment_grams: bool = True, gram_stream_batch: int = 16, gram_block: int = 1,
                           mesh=None) -> ClientPrograms:
    """Compile-once client programs for a backbone.

    ``prepare(data, idx [N], keys [N] or None, train: bool) -> (model inputs, labels)`` gathers examples from the
    task's device arrays and applies on-device augmentation with the per-example keys (train) or the test transform.
    ``backbone_gram`` / ``head_gram`` are "diag" or "full"; full Grams are shrunk ``α G + (1 − α) diag(G)`` per client,
    as the reference does (linear, so shrinking the per-client sums is shrinking each client's Gram).
    ``gram_stream_batch``: the batch size that numbers a client's Gram stream (it fixes each example's key, see
    :func:`example_keys`); ``gram_block``: examples per client-pure block of the packed Gram batches.
    """

    # Trained parameters are float32 (float64 with a float64 compute dtype, for equivalence tests).
    param_dtype = jnp.promote_types(getattr(backbone.module, "dtype", jnp.float32), jnp.float32)

    def lane_train(frozen, data, lora0, head0, lane, keys, num_steps, factor_on, lr_factor, class_mask, num_rows):
        """One lane: ``num_steps`` steps of ``lane`` ([T, ...] arrays, T ≥ num_steps, :func:`batching.lane_schedule`),
        each advancing up to M of its clients by one of their own local steps.

        Every client of the lane has a row: its LoRA/head and AdamW state, all starting from the server's and fresh.
        A step gathers the rows of its M slots, each example takes its slot's parameters (per-example LoRA factors and
        head, so the frozen backbone runs once for the whole batch), the loss is the sum of the slots' mean losses (so
        each slot's gradient is its own client's), and AdamW updates each slot on its own (vmapped over slots) before
        the rows are written back. ``factor_on`` [2] = (A trains, B trains) as 0/1 floats (the head always trains).
        Returns per row: trained params, mean loss over its real steps, step count, finiteness.
        """
        # The LoRA is carried block-stacked (backbone.stack_lora): the optimizer, masks and row writes act on 2 arrays
        # per layer kind, not 2 per layer.
        server = jax.tree.map(lambda x: x.astype(param_dtype), {"lora": backbone.stack_lora(lora0), "head": head0})
        on = lora_lib.factor_mask(server["lora"], factor_on[0], factor_on[1])
        tx = make_optimizer(lr_factor, lr_head, weight_decay)
        num_slots = lane["rows"].shape[-1]

        def slot_loss(slots, inputs, labels, owner, weights):
            """Σ_m (mean loss of slot m's examples) and the per-slot means [M]; slots: {"lora", "head"} [M, ...]."""
            if num_slots == 1:  # one client per step (e.g. one per lane): its parameters, shared by the batch
                example = jax.tree.map(lambda x: x[0], slots)
                lora = example["lora"]
            else:  # each example with its slot's parameters, [B, ...]; LoRA [depth, B, ...]: one block per example
                example = jax.tree.map(lambda x: x[owner], slots)
                lora = jax.tree.map(lambda x: jnp.moveaxis(x, 0, 1), example["lora"])
            features, _ = backbone.apply(frozen, lora, inputs)
            per_slot = masked_cross_entropy(head_logits(example["head"], features), labels, class_mask, weights,
                                            (owner, num_slots))
            return jnp.sum(per_slot), per_slot

        def step(t, carry):
            params, opt_state, loss_sum, count = carry
            at = {n: jax.lax.dynamic_index_in_dim(lane[n], t, keepdims=False) for n in LANE_ARRAYS}
            slots, slot_opt = jax.tree.map(lambda x: x[at["rows"]], (params, opt_state))
            ex_keys = jax.vmap(lambda c, s, j: example_keys(keys[c], s, at["idx"].shape[0], j))(
                at["client"][at["owner"]], at["step"], at["position"])
            inputs, labels = prepare(data, at["idx"], ex_keys, True)
            (_, per_slot), grads = jax.value_and_grad(slot_loss, has_aux=True)(
                slots, inputs, labels, at["owner"], at["mask"].astype(param_dtype))
            grads = {"lora": jax.tree.map(jnp.multiply, grads["lora"], on), "head": grads["head"]}
            updates, new_opt = jax.vmap(tx.update)(grads, slot_opt, slots)
            updates = {"lora": jax.tree.map(jnp.multiply, updates["lora"], on), "head": updates["head"]}
            active = at["active"]
            keep = lambda new, old: jax.tree.map(  # noqa: E731  (per slot: the update if the slot ran a step)
                lambda n, o: jnp.where(active.reshape((-1,) + (1,) * (n.ndim - 1)), n, o), new, old)
            slots, slot_opt = keep(optax.apply_updates(slots, updates), slots), keep(new_opt, slot_opt)
            write = lambda rows, new: rows.at[at["rows"]].set(new)  # noqa: E731  (unused slots: the scratch row)
            params, opt_state = jax.tree.map(write, params, slots), jax.tree.map(write, opt_state, slot_opt)
            return (params, opt_state, loss_sum.at[at["rows"]].add(jnp.where(active, per_slot, 0.0)),
                    count.at[at["rows"]].add(active.astype(jnp.int32)))

        init = (trees.stack_clients(server, num_rows), trees.stack_clients(tx.init(server), num_rows),
                jnp.zeros(num_rows, param_dtype), jnp.zeros(num_rows, jnp.int32))
        out, _, loss_sum, count = jax.lax.fori_loop(0, num_steps, step, init)
        finite = jnp.stack([jnp.all(jnp.isfinite(x.reshape(num_rows, -1)), axis=1) for x in jax.tree.leaves(out)])
        return {"lora": common.lora_by_kind(out["lora"]), "head": out["head"],
                "loss": loss_sum / jnp.maximum(count, 1), "num_steps": count, "finite": jnp.all(finite, axis=0)}

    def device_pass(gram_params, data, client_lora, packed, keys, num_batches, lora_scale, include, num_clients,
                    reduce, by_kind=False):
        """This device's share of a packed Gram pass over ``num_clients`` clients (``include`` [C]: the others' rows
        weigh 0). ``reduce`` None: per-client Gram sums ``{path: [C, ...]}`` (``by_kind``: in the block layout,
        ``{layer kind: [depth, C, ...]}``); else (:class:`Reduction`) the LoRA layers' per-block sums, summed, in
        the block layout, and ``bad`` [C]: clients with a non-finite block Gram. Head Grams per client ``[C, ...]``
        either way."""
        packed = jax.tree.map(lambda x: x[0], packed)  # this device's [NB, ...]
        block = packed["idx"].shape[-1]

        def step(i, acc):
            idx, mask, s, pos, owner = (jax.lax.dynamic_index_in_dim(packed[n], i, keepdims=False)
                                        for n in ("idx", "mask", "step", "position", "block_client"))
            segments = (owner, num_clients)
            ex_keys = jax.vmap(lambda c, s, j: example_keys(keys[c], s, gram_stream_batch, j))(
                jnp.repeat(owner, block), s.reshape(-1), pos.reshape(-1))
            inputs, _ = prepare(data, idx.reshape(-1), ex_keys, augment_grams)
            weights = (mask & include[owner][:, None]).reshape(-1).astype(jnp.float32)
            if reduce is None:
                lora = None if client_lora is None else per_block(client_lora, owner, lora_scale)
                features, grams = backbone.apply(gram_params, lora, inputs, gram=backbone_gram, weights=weights,
                                                 segments=segments, grams_by_kind=by_kind)
                bad = acc[2]
            else:  # unscaled per-block factors: the layers scale their forward pass and reduce with these
                lora = per_block(client_lora, owner, 1.0)
                features, out = backbone.apply(gram_params, lora, inputs, gram=backbone_gram, weights=weights,
                                               segments=BlockSums(reduce, lora_scale), grams_by_kind=True)
                grams = {k: o[0] for k, o in out.items()}
                finite = jnp.all(jnp.stack([o[1] for o in out.values()]), axis=(0, 1))  # [kinds, depth, G] -> [G]
                bad = acc[2] + jax.ops.segment_sum((~finite).astype(jnp.int32), owner, num_segments=num_clients)
            head = layer_gram(features, GramSpec(head_gram, weights, segments))
            return (jax.tree.map(jnp.add, acc[0], grams), acc[1] + head, bad)

        if reduce is None:
            zero = _zero_grams(backbone, backbone_gram, num_clients, param_dtype)
            zero = common.by_kind(zero) if by_kind else zero
        else:  # the shapes of the layers' reductions: traced on one block, nothing computed
            one = {k: {n: jax.ShapeDtypeStruct((1,) + x.shape[2:], x.dtype) for n, x in f.items()}
                   for k, f in client_lora.items()}  # one block's factors per layer kind
            shapes = jax.eval_shape(lambda one: {k: reduce(f, _zero_gram(f["A"].shape[-1], backbone_gram, 1,
                                                                         param_dtype)) for k, f in one.items()}, one)
            depth = {k: f["A"].shape[1] for k, f in client_lora.items()}
            zero = {k: jax.tree.map(lambda x, n=depth[k]: jnp.zeros((n,) + x.shape, x.dtype), v)
                    for k, v in shapes.items()}
        init = (zero, _zero_gram(backbone.feature_dim, head_gram, num_clients, param_dtype),
                jnp.zeros(num_clients, jnp.int32))
        return jax.lax.fori_loop(0, num_batches, step, init)

    def per_block(client_lora, owner, scale):
        """The clients' LoRA (block layout, ``[C, depth, ...]``) of each block of examples, B scaled, as the scanned
        blocks' collection: ``[depth, G, ...]``."""
        return common.lora_collection({k: {"A": jnp.moveaxis(f["A"][owner], 1, 0),
                                           "B": jnp.moveaxis(f["B"][owner] * scale, 1, 0)}
                                       for k, f in client_lora.items()})

    def packed_grams(gram_params, data, client_lora, packed, keys, num_batches, lora_scale, include, num_clients,
                     by_kind=False):
        """Per-client Gram sums over the packed batches (summed over devices), shrunk."""
        grams, head, _ = device_pass(gram_params, data, client_lora, packed, keys, num_batches, lora_scale, include,
                                     num_clients, None, by_kind)
        grams, head = jax.lax.psum((grams, head), sharding.CLIENTS)
        return shrink(grams, head)

    def shrink(grams, head):
        if backbone_gram == "full":
            grams = {p: merging.shrink_gram(g, alpha_backbone) for p, g in grams.items()}
        if head_gram == "full":
            head = merging.shrink_gram(head, alpha_head)
        return grams, head

    def keep(tree, server, include):
        """A client left out (``include`` False): the server's arrays in its place (finite; its rows weigh 0)."""
        return jax.tree.map(lambda x, s: jnp.where(include.reshape((-1,) + (1,) * (x.ndim - 1)), x, s), tree, server)

    def packed_sums(gram_params, data, client_lora, client_heads, server_lora, server_head, packed, keys,
                    num_batches, lora_scale, num_samples, include, total, num_clients, stats):
        """The sums ``stats`` declares over the clients of a packed pass, the LoRA layers reducing per block (no
        per-client Gram of a LoRA layer is formed; see :func:`client_sums`)."""
        client_lora, client_heads = keep(client_lora, server_lora, include), keep(client_heads, server_head, include)
        reduce = Reduction(stats, backbone_gram, alpha_backbone)
        grams, head, bad = device_pass(gram_params, data, client_lora, packed, keys, num_batches, lora_scale,
                                       include, num_clients, reduce)
        grams, head, bad = jax.lax.psum((grams, head, bad), sharding.CLIENTS)
        _, head = shrink({}, head)
        ok = include & (bad == 0)
        head = trees.zero_clients(head, ok)
        return client_statistics(client_lora, client_heads, grams, head, ok, num_samples, total, stats), ok

    def kept_client_grams(gram_params, data, client_lora, server_lora, packed, keys, num_batches, lora_scale,
                          include, num_clients):
        """Per-client Grams of a packed pass, shrunk, summed over the devices, with ``ok`` [C] (included, Grams
        finite); the other clients' Grams are zeros. The LoRA layers' Grams in the block layout ``{layer kind:
        [depth, C, ...]}``. The same program for every trained factor and the task end."""
        grams, head = packed_grams(gram_params, data, keep(client_lora, server_lora, include), packed, keys,
                                   num_batches, lora_scale, include, num_clients, by_kind=True)
        def finite(g, axis):  # per client: every entry finite; its axis is ``axis``
            return jnp.all(jnp.isfinite(g), axis=tuple(a for a in range(g.ndim) if a != axis))
        ok = include & jnp.all(jnp.stack([finite(g, 1) for g in grams.values()] + [finite(head, 0)]), axis=0)
        grams = {k: jnp.where(ok.reshape((1, -1) + (1,) * (g.ndim - 2)), g, 0.0) for k, g in grams.items()}
        return grams, trees.zero_clients(head, ok), ok

    def contract_grams(client_lora, client_heads, server_lora, server_head, grams, head, ok, num_samples, include,
                       total, stats):
        """The sums ``stats`` declares from per-client Grams in the block layout (:func:`kept_client_grams`):
        :meth:`methods.Statistics.layers` of every layer kind, vmapped over the blocks."""
        client_lora, client_heads = keep(client_lora, server_lora, include), keep(client_heads, server_head, include)
        layers = jax.vmap(stats.layers, in_axes=(1, 0))(client_lora, grams)
        return client_statistics(client_lora, client_heads, layers, head, ok, num_samples, total, stats)

    def client_statistics(client_lora, client_heads, layers, head, ok, num_samples, total, stats):
        """The sums dict of :func:`client_sums` from the layers' sums and the head Grams (zero where not ``ok``); the
        clients' LoRA in the block layout (``[C, depth, ...]``), so that the sums a method takes of it over clients
        are in the block layout too."""
        samples = jnp.where(ok, num_samples, 0.0)
        weights = jnp.where(total > 0, samples / jnp.where(total > 0, total, 1), 0)
        return {"layers": layers, "clients": stats.clients(client_lora, client_heads, head, weights),
                "samples": {"planned": total, "included": samples.sum()}}

    def packed_evaluate(params, head, data, packed, num_batches, class_mask, num_segments):
        """Correct predictions per segment (task) over this device's share of the packed test batches."""
        packed = jax.tree.map(lambda x: x[0], packed)

        def step(i, correct):
            idx, mask, owner = (jax.lax.dynamic_index_in_dim(packed[n], i, keepdims=False)
                                for n in ("idx", "mask", "block_client"))
            inputs, labels = prepare(data, idx.reshape(-1), None, False)
            features, _ = backbone.apply(params, None, inputs)
            pred = jnp.argmax(jnp.where(class_mask, head_logits(head, features), -jnp.inf), axis=-1)
            hit = ((pred == labels) & mask.reshape(-1)).astype(jnp.int32)
            return correct + jax.ops.segment_sum(hit, jnp.repeat(owner, idx.shape[-1]), num_segments=num_segments)

        correct = jax.lax.fori_loop(0, num_batches, step, jnp.zeros(num_segments, jnp.int32))
        return jax.lax.psum(correct, sharding.CLIENTS)

    mesh = sharding.make_mesh(1) if mesh is None else mesh
    c, r = jax.sharding.PartitionSpec(sharding.CLIENTS), jax.sharding.PartitionSpec()

    def on_mesh(name, build, split, out_specs, static):
        """``jit(shard_map(build(**static)))`` named ``name`` (in compile logs and profiles): arguments flagged in
        ``split`` are divided over the devices along their leading axis, the others replicated; the ``static``
        keyword arguments are compile-time constants."""
        def call(*args, **kwargs):
            # check_vma off: replicated initial loop carries (the server LoRA, fresh optimizer state) become
            # per-lane values, which the varying-manual-axes check would reject.
            return jax.shard_map(build(**kwargs), mesh=mesh, in_specs=tuple(c if s else r for s in split),
                                 out_specs=out_specs, check_vma=False)(*args)
        call.__name__ = call.__qualname__ = name
        return jax.jit(call, static_argnames=static)

    lanes_in = (None, None, None, None, 0, None, None, None, None, None)

    def device_lanes(*args, num_rows):
        """This device's lanes, vmapped; a single lane (the CPU layout) runs without vmap: the loop's batching rule
        re-traces the whole training step until the carry's batching settles (~5 s for a ViT-S, every run)."""
        one = functools.partial(lane_train, num_rows=num_rows)
        if args[4]["idx"].shape[0] == 1:
            out = one(*args[:4], jax.tree.map(lambda x: x[0], args[4]), *args[5:])
            return jax.tree.map(lambda x: x[None], out)
        return jax.vmap(one, in_axes=lanes_in)(*args)

    train = on_mesh("train", lambda num_rows: functools.partial(device_lanes, num_rows=num_rows),
                    [a == 0 for a in lanes_in], c, ("num_rows",))
    grams = on_mesh("grams", lambda num_clients: functools.partial(packed_grams, num_clients=num_clients),
                    (False, False, False, True, False, False, False, False), r, ("num_clients",))
    block_sums = on_mesh("block_sums", lambda num_clients, stats: functools.partial(
        packed_sums, num_clients=num_clients, stats=stats), (False,) * 6 + (True,) + (False,) * 6, r,
        ("num_clients", "stats"))
    kept_grams = on_mesh("kept_grams", lambda num_clients: functools.partial(
        kept_client_grams, num_clients=num_clients), (False,) * 4 + (True,) + (False,) * 4, r, ("num_clients",))
    contract = jax.jit(contract_grams, static_argnames=("stats",), out_shardings=sharding.replicated(mesh))
    evaluate = on_mesh("evaluate", lambda num_segments: functools.partial(packed_evaluate, num_segments=num_segments),
                       (False, False, False, True, False, False), r, ("num_segments",))

    def sums(gram_params, data, client_lora, client_heads, server_lora, server_head, packed, keys, num_batches,
             lora_scale, num_samples, include, total, *, num_clients, stats, blocks):
        """A wave's sums: the blocks program, or the per-client Grams (one program whatever ``stats`` is: every
        round and the task end share it) and their contraction (a small program per ``stats``)."""
        if blocks:
            return block_sums(gram_params, data, client_lora, client_heads, server_lora, server_head, packed, keys,
                              num_batches, lora_scale, num_samples, include, total, num_clients=num_clients,
                              stats=stats)
        grams, head, ok = kept_grams(gram_params, data, client_lora, server_lora, packed, keys, num_batches,
                                     lora_scale, include, num_clients=num_clients)
        return contract(client_lora, client_heads, server_lora, server_head, grams, head, ok, num_samples, include,
                        total, stats=stats), ok

    by_client = jax.jit(lambda out, lane_of, row_of: jax.tree.map(lambda x: x[lane_of, row_of], out),
                        out_shardings=sharding.replicated(mesh))
    take = jax.jit(lambda tree, idx: jax.tree.map(lambda x: x[idx], tree), out_shardings=sharding.replicated(mesh))
    add = jax.jit(lambda a, b: jax.tree.map(jnp.add, a, b), out_shardings=sharding.replicated(mesh))
    return ClientPrograms(train=train, grams=grams, sums=sums, block_sums=block_sums, kept_grams=kept_grams,
                          contract=contract, evaluate=evaluate, by_client=by_client, take=take, add=add, mesh=mesh,
                          gram_block=gram_block)


def _zero_gram(d: int, mode: str, num_clients: int, dtype=jnp.float32):
    return jnp.zeros((num_clients, d) if mode == "diag" else (num_clients, d, d), dtype)


def _zero_grams(backbone, backbone_gram: str, num_clients: int, dtype=jnp.float32):
    return {p: _zero_gram(d_in, backbone_gram, num_clients, dtype) for p, (_, d_in) in backbone.lora_shapes.items()}


@dataclasses.dataclass(frozen=True)
class Reduction:
    """What a LoRA layer does with its per-block Grams in a streaming pass (:class:`BlockSums`): shrink them (full
    Grams: linear, so shrinking blocks is shrinking the clients' sums) and take ``stats.layer`` of them with the
    blocks' own factors. Static and hashable."""
    stats: Any
    mode: str
    alpha: float

    def __call__(self, factors: dict, grams):
        if self.mode == "full":
            grams = merging.shrink_gram(grams, self.alpha)
        return self.stats.layer(factors, grams)


# ----------------------------------------------------------------------------------------------------------------------
# Host side: lay out, place, call, and bring the outputs back in client order

def train_call(programs: ClientPrograms, frozen, data, lora0, head0, lanes: dict, keys, factor: str, lr_factor,
               class_mask) -> tuple[tuple, dict]:
    """``(args, static kwargs)`` of ``programs.train`` for local training from the server's ``lora0`` / ``head0`` of
    the clients laid out in ``lanes`` (:func:`lorm_jax.data.batching.lane_schedule`), the LoRA ``factor`` ("A", "B",
    "AB" or "" for head only) and the head moving; placed on the mesh (shapes only for a mesh that is not here)."""
    mesh = programs.mesh
    steps = sharding.put_clients({n: lanes[n] for n in LANE_ARRAYS}, mesh)
    shared = sharding.replicate((frozen, data, lora0, head0, keys), mesh)
    factor_on = np.asarray([float("A" in factor), float("B" in factor)], np.float32)  # traced: one program
    scalars = sharding.replicate((np.int32(lanes["num_steps"]), factor_on, np.float32(lr_factor),
                                  np.asarray(class_mask)), mesh)
    return (*shared[:4], steps, shared[4], *scalars), {"num_rows": int(lanes["num_rows"])}


def train_clients(programs: ClientPrograms, frozen, data, lora0, head0, lanes: dict, keys, factor: str, lr_factor,
                  class_mask) -> dict:
    """Local training of every client (:func:`train_call`): ``{"lora", "head": [K, ...], "loss", "num_steps",
    "finite": [K]}`` in client order, replicated on every device (and process); ``lora`` in the block layout
    ``{kind: {"A": [K, depth, r, d_in], "B": [K, depth, d_out, r]}}`` (per layer:
    ``backbones.common.by_layer(lora, axis=1)``)."""
    args, kwargs = train_call(programs, frozen, data, lora0, head0, lanes, keys, factor, lr_factor, class_mask)
    out = programs.train(*args, **kwargs)
    return programs.by_client(out, *sharding.replicate((lanes["lane_of"], lanes["row_of"]), programs.mesh))


def grams_call(programs: ClientPrograms, gram_params, data, client_lora, packed: dict, keys, lora_scale,
               include=None) -> tuple[tuple, dict]:
    """``(args, static kwargs)`` of ``programs.grams``: a packed pass (:func:`lorm_jax.data.batching.packed_schedule`)
    through ``gram_params`` with each client's LoRA (``client_lora`` in the block layout, ``[K, depth, ...]``, B
    scaled by ``lora_scale``; or None); clients not in ``include`` [K] (default: all) get zero Grams."""
    mesh = programs.mesh
    include = np.ones(keys.shape[0], bool) if include is None else np.asarray(include, bool)
    arrays = sharding.put_clients({n: packed[n] for n in PACKED_ARRAYS}, mesh)
    shared = sharding.replicate((gram_params, data, client_lora, keys, np.int32(packed["num_batches"]),
                                 np.float32(lora_scale), include), mesh)
    return (*shared[:3], arrays, *shared[3:]), {"num_clients": int(keys.shape[0])}


def client_grams(programs: ClientPrograms, gram_params, data, client_lora, packed: dict, keys, lora_scale,
                 include=None) -> tuple:
    """Per-client Gram sums ``({path: [K, ...]}, head [K, ...])`` of a packed pass (:func:`grams_call`), replicated:
    K clients' Grams at once (what the engine before streaming merged from; tests and benchmarks compare with it)."""
    args, kwargs = grams_call(programs, gram_params, data, client_lora, packed, keys, lora_scale, include)
    return programs.grams(*args, **kwargs)


def sums_call(programs: ClientPrograms, gram_params, data, client_lora, client_heads, server_lora, server_head,
              packed: dict, keys, lora_scale, num_samples, include, total: float, stats) -> tuple[tuple, dict]:
    """``(args, static kwargs)`` of ``programs.block_sums``, placed on the mesh; ``programs.sums`` takes them and
    ``blocks`` (:func:`client_sums`)."""
    mesh = programs.mesh
    arrays = sharding.put_clients({n: packed[n] for n in PACKED_ARRAYS}, mesh)
    shared = sharding.replicate((gram_params, data, client_lora, client_heads, common.by_kind(server_lora),
                                 server_head), mesh)
    rest = sharding.replicate((keys, np.int32(packed["num_batches"]), np.float32(lora_scale),
                               np.asarray(num_samples, np.float32), np.asarray(include, bool), np.float32(total)),
                              mesh)
    return (*shared, arrays, *rest), {"num_clients": int(keys.shape[0]), "stats": stats}


def kept_grams_call(programs: ClientPrograms, gram_params, data, client_lora, server_lora, packed: dict, keys,
                    lora_scale, include) -> tuple[tuple, dict]:
    """``(args, static kwargs)`` of ``programs.kept_grams`` (:func:`client_sums` without ``blocks``)."""
    mesh = programs.mesh
    arrays = sharding.put_clients({n: packed[n] for n in PACKED_ARRAYS}, mesh)
    shared = sharding.replicate((gram_params, data, client_lora, common.by_kind(server_lora)), mesh)
    rest = sharding.replicate((keys, np.int32(packed["num_batches"]), np.float32(lora_scale),
                               np.asarray(include, bool)), mesh)
    return (*shared, arrays, *rest), {"num_clients": int(keys.shape[0])}


def contract_call(programs: ClientPrograms, client_lora, client_heads, server_lora, server_head, grams, head, ok,
                  num_samples, include, total: float, stats) -> tuple[tuple, dict]:
    """``(args, static kwargs)`` of ``programs.contract``: the sums of :func:`kept_grams_call`'s per-client Grams."""
    args = sharding.replicate((client_lora, client_heads, common.by_kind(server_lora), server_head, grams, head, ok,
                               np.asarray(num_samples, np.float32), np.asarray(include, bool), np.float32(total)),
                              programs.mesh)
    return args, {"stats": stats}


def client_sums(programs: ClientPrograms, gram_params, data, client_lora, client_heads, server_lora, server_head,
                packed: dict, keys, lora_scale, num_samples, include, total: float, stats, blocks: bool) -> tuple:
    """The sums over the C clients of a packed Gram pass (a wave) that ``stats``
    (:class:`lorm_jax.methods.base.Statistics`) declares: ``(sums, ok [C])``, replicated.

    The clients' Gram statistics are taken through ``gram_params`` with their own LoRA (``client_lora`` in the
    block layout, ``[C, depth, ...]``, B scaled by ``lora_scale``; ``server_lora`` per layer), shrunk as configured,
    summed over the devices and contracted with the clients' factors: ``sums = {"layers": {kind: stats.layer
    [depth, ...]}, "clients": stats.clients, "samples": {"planned": total, "included": Σ n_k of the ok clients}}``
    (the layers' sums in the block layout: ``backbones.common.by_layer`` gives them per layer), FedAvg weights
    ``n_k / total``. Clients not in ``include`` [C] (or
    whose Grams are not finite: ``ok`` False) contribute exact zeros (their arrays are replaced by the server's).
    Without ``blocks`` one program forms the per-client Grams ``[C, ...]`` (the same program whatever ``stats``
    is: every round and the task end share it) and a small one contracts them (every layer kind vmapped over its
    blocks, as the merges are); with ``blocks`` every LoRA layer contracts its per-block Grams with the blocks'
    factors inside the backbone, in one program per ``stats``, so no per-client Gram of a LoRA layer exists: the
    sums then equal the per-client ones up to rounding, and a client whose Grams are not finite has already entered
    them (``ok`` says which; pass again without it). Head Grams are per client either way."""
    args, kwargs = sums_call(programs, gram_params, data, client_lora, client_heads, server_lora, server_head, packed,
                             keys, lora_scale, num_samples, include, total, stats)
    return programs.sums(*args, **kwargs, blocks=bool(blocks))


def evaluate_call(programs: ClientPrograms, params, head, data, packed: dict, class_mask,
                  num_segments: int) -> tuple[tuple, dict]:
    """``(args, static kwargs)`` of ``programs.evaluate`` for a packed pass over test examples."""
    mesh = programs.mesh
    arrays = sharding.put_clients({n: packed[n] for n in PACKED_ARRAYS}, mesh)
    shared = sharding.replicate((params, head, data, np.int32(packed["num_batches"]), np.asarray(class_mask)), mesh)
    return (*shared[:3], arrays, *shared[3:]), {"num_segments": num_segments}


def count_correct(programs: ClientPrograms, params, head, data, packed: dict, class_mask,
                  num_segments: int) -> np.ndarray:
    """Correct top-1 predictions (logits outside ``class_mask`` removed) per segment of a packed pass over test
    examples (:func:`evaluate_call`), e.g. per task: ``[num_segments]`` on the host."""
    args, kwargs = evaluate_call(programs, params, head, data, packed, class_mask, num_segments)
    return np.asarray(sharding.gather(programs.evaluate(*args, **kwargs)))


PACKED_ARRAYS = ("idx", "mask", "step", "position", "block_client")
LANE_ARRAYS = ("idx", "mask", "owner", "step", "position", "rows", "client", "active")
