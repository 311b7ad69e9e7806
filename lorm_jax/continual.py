"""The federated class-incremental experiment: task loop, rounds, evaluation, metrics, resumable state.

Work is cut into *units*: task t has ``rounds`` round units (local training of all clients in one vmapped call, Gram
statistics, server merge) and one end-of-task unit (Grams of the merged task LoRA, cross-task merge, evaluation). The
state after every unit is checkpointed, so a crash loses at most the unit in flight, and every random draw is a pure
function of (seed, task, round, client, step), so a resumed run is bit-identical to an uninterrupted one.

Evaluation after task t: micro accuracy (Σ correct / Σ samples, as the reference reports it) of the cross-task merged
model on the test sets of tasks 0..t, with logits restricted to the classes seen so far.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import re
import signal
import threading
import time
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from lorm_jax import backbones, checkpointing, distributed, federated, ledger, merging, methods, plotting, sharding
from lorm_jax import config as config_lib
from lorm_jax import lora as lora_lib
from lorm_jax import data as data_lib
from lorm_jax.data import augment
from lorm_jax.data.partition import partition as split_clients

log = logging.getLogger("lorm_jax")

# Stream tags folded into the per-client key, so training and Gram passes never share random numbers.
TRAIN_STREAM, GRAM_STREAM = 0, 1


# ----------------------------------------------------------------------------------------------------------------------
# Metrics

def summarize(acc: np.ndarray, test_sizes: np.ndarray) -> dict:
    """Continual-learning metrics from the accuracy matrix ``acc[t, τ]`` (accuracy on task τ after task t, τ ≤ t).

    * final_average_accuracy: pooled over samples after the last task, ``Σ_τ n_τ acc[T-1, τ] / Σ n_τ`` (reference);
    * final_average_accuracy_task_mean: ``mean_τ acc[T-1, τ]``;
    * average_incremental_accuracy: mean over t of the pooled accuracy after task t;
    * forgetting (the drop from the best earlier accuracy):
      ``mean_{τ<T-1} (max_{τ≤t<T-1} acc[t, τ] − acc[T-1, τ])``;
    * forgetting_reference (the reference's ``compute_forgetting``, fed-mammoth ``utils/training.py`` at 09a9508: the
      drop from the accuracy right after learning the task, averaged over *all* T tasks as the reference reports it,
      so the last task's zero term counts): ``(1/T) Σ_{τ<T} (acc[τ, τ] − acc[T-1, τ])``. The reference works in
      percent rounded to 2 decimals; here fractions, unrounded. Equal to ``(T-1)/T · forgetting`` when no task's
      accuracy ever rises above its value right after learning it;
    * bwt (backward transfer, kept for compatibility): ``mean_{τ<T-1} (acc[T-1, τ] − acc[τ, τ])
      = −T/(T-1) · forgetting_reference`` (computed from the same per-task drops).
    """
    T = acc.shape[0]
    n = np.asarray(test_sizes, np.float64)
    pooled = [float(np.sum(acc[t, :t + 1] * n[:t + 1]) / np.sum(n[:t + 1])) for t in range(T)]
    last = acc[T - 1]
    forgetting = [float(np.max(acc[tau:T - 1, tau]) - last[tau]) for tau in range(T - 1)]
    drop = [float(acc[tau, tau] - last[tau]) for tau in range(T)]  # drop[T-1] = 0
    return {
        "final_average_accuracy": pooled[-1],
        "final_average_accuracy_task_mean": float(np.mean(last)),
        "average_incremental_accuracy": float(np.mean(pooled)),
        "accuracy_after_task": pooled,
        "forgetting": float(np.mean(forgetting)) if forgetting else 0.0,
        "forgetting_reference": float(np.mean(drop)),
        "bwt": 0.0 - float(np.mean(drop[:-1])) if T > 1 else 0.0,  # 0.0 - x: never -0.0
    }


# ----------------------------------------------------------------------------------------------------------------------
# Experiment setup (everything here is a deterministic function of the config)

@dataclasses.dataclass(frozen=True)
class Setup:
    config: ml_collections.ConfigDict
    backbone: backbones.Backbone
    dataset: data_lib.ArrayDataset
    offsets: np.ndarray             # [T+1] class offsets of the tasks (labels are relabelled to be contiguous)
    train: dict                     # device arrays of all training data: {"x" or "input_ids"/"attention_mask", "y"}
    test: dict
    task_train: list                # per task: indices into train
    task_test: list                 # per task: indices into test
    partitions: list                # per task: K arrays of indices into train (each client's share of the task)
    schedule: "Schedule"            # lanes and packed passes, fixed by the partitions
    fns: federated.ClientFunctions
    method: object

    @property
    def num_tasks(self) -> int:
        return len(self.offsets) - 1


@dataclasses.dataclass(frozen=True)
class Schedule:
    """How the run lays out its client work; the partitions fix every client's step count, so all of it is known
    before the first round and every round runs the same compiled shapes.

    Training: the K clients of task t run in ``lanes`` vmapped lanes, lane p running ``members[t][p]`` back to back
    (:func:`lorm_jax.data.batching.pack_lanes`); loop buffers hold ``num_steps`` steps (the longest lane of the run)
    and ``num_slots`` client slots per lane. Gram pass of task t: ``gram_packed[t]`` (client-pure blocks of
    ``gram_block`` examples); evaluation after task t: ``eval_packed[t]`` (the test sets of tasks 0..t).
    """
    lanes: int
    steps: list              # per task: [K] real local steps of each client per round
    members: list
    num_steps: int
    num_slots: int
    gram_block: int
    gram_packed: list
    eval_packed: list

    def describe(self, batch_size: int) -> str:
        lines = [f"schedule: {self.lanes} training lane(s); loop buffers {self.num_steps} steps x {batch_size} "
                 f"examples, {self.num_slots - 1} client slot(s) per lane"]
        for t, (steps, members, packed) in enumerate(zip(self.steps, self.members, self.gram_packed)):
            loads = [int(sum(steps[k] for k in lane)) for lane in members]
            lines.append(f"  task {t}: clients per lane {members}, steps per lane {loads} (sum {int(sum(steps))}); "
                         f"Gram pass {packed['num_batches']} packed batch(es) of "
                         f"{packed['idx'].shape[2]} x {self.gram_block} examples per device")
        p = self.eval_packed[-1]
        lines.append(f"  compiled shapes: training [{self.lanes}, {self.num_steps}, {batch_size}], Gram pass "
                     f"{list(self.gram_packed[0]['idx'].shape)}, evaluation {list(p['idx'].shape)}")
        return "\n".join(lines)


def _seed_key(seed: int) -> jax.Array:
    return jax.random.PRNGKey(seed)


def client_keys(seed: int, task: int, rnd: int, clients: np.ndarray, stream: int) -> jax.Array:
    """``fold_in(seed → task → round → client → stream)`` for every client: [K] keys."""
    base = jax.random.fold_in(jax.random.fold_in(_seed_key(seed), task), rnd)
    return jnp.stack([jax.random.fold_in(jax.random.fold_in(base, int(k)), stream) for k in clients])


def _client_rng(seed: int, task: int, rnd: int, client: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, task, rnd, client, stream])


def lane_layout(setup: Setup, task: int, rnd: int, members: list | None = None) -> dict:
    """The local-training schedule of (task, round): every client's own shuffled batches (drawn from its own generator,
    so they do not depend on how clients are grouped) laid out along the lanes ``members`` (default: the run's
    packing) — :func:`lorm_jax.data.batching.lane_schedule`."""
    c, sch = setup.config, setup.schedule
    own = [data_lib.client_schedule([part], c.batch_size, c.epochs, _client_rng(c.seed, task, rnd, k, TRAIN_STREAM))
           for k, part in enumerate(setup.partitions[task])]
    steps = sch.steps[task]
    members = sch.members[task] if members is None else members
    num_slots = max(sch.num_slots, max(len(m) for m in members) + 1)
    num_steps = max(sch.num_steps, max(int(sum(steps[k] for k in m)) for m in members))
    return data_lib.lane_schedule([i[0, :n] for i, n in zip((o[0] for o in own), steps)],
                                  [m[0, :n] for m, n in zip((o[1] for o in own), steps)], members, num_steps, num_slots)


def _make_prepare(config, backbone, kind: str) -> Callable:
    """``prepare(data, idx [N], keys [N], train) -> (model inputs, labels)``: gather examples on device and transform
    them, example n with its own key ``keys[n]`` (the test transform needs none)."""
    if kind == "text":
        def prepare(data, idx, keys, train):
            return {"input_ids": data["input_ids"][idx], "attention_mask": data["attention_mask"][idx]}, data["y"][idx]
        return prepare
    mean = tuple(config.data.mean) or backbone.mean
    std = tuple(config.data.std) or backbone.std
    size, mode, method = backbone.image_size, config.data.augment, config.data.interpolation
    ratio = config.data.test_resize_ratio or None

    def train_view(keys, images):
        if mode == "crop":  # Resize(round(size·ratio)) + RandomCrop(size) + flip (reference CUB-200)
            big = augment.resize(augment.to_float(images), int(round(size * (ratio or 1.0))), method=method)
            pair = jax.vmap(jax.random.split)(keys)  # [N, 2]: crop and flip key of each example
            crops = jax.vmap(lambda k, im: augment.random_crop(k, im, size))(pair[:, 0], big)
            return jax.vmap(augment.random_flip)(pair[:, 1], crops)
        return augment.train_views(keys, images, size, crop_scale=tuple(config.data.crop_scale) if mode == "rrc"
                                   else None, flip=mode in ("rrc", "flip"), method=method)

    def prepare(data, idx, keys, train):
        images = data["x"][idx]
        if train and mode != "none":
            x = train_view(keys, images)
        else:
            x = augment.test_transform(images, size, resize_ratio=ratio, method=method)
        return augment.normalize(x, mean, std), data["y"][idx]
    return prepare


def _encode(dataset, backbone, max_len: int):
    """Host arrays of the model inputs: images as uint8, text tokenized once with the backbone's tokenizer."""
    def one(x, y):
        if dataset.kind == "text":
            tok = backbone.tokenize(list(x), max_len)
            return {"input_ids": np.asarray(tok["input_ids"], np.int32),
                    "attention_mask": np.asarray(tok["attention_mask"], np.int32), "y": y}
        return {"x": x, "y": y}
    return one(dataset.x_train, dataset.y_train), one(dataset.x_test, dataset.y_test)


def _split_task(c, labels: np.ndarray, task: int) -> list:
    """Client partition of task ``task`` (labels [N]); impossible settings fail naming the config keys to change."""
    if len(labels) == 0:
        raise config_lib.invalid("data.classes_per_task", c.data.classes_per_task,
                                 f"task {task} has no training samples (check data.n_train_per_class, "
                                 f"data.max_classes)")
    try:
        return split_clients(labels, c.num_clients, c.data.partition,
                             np.random.default_rng([config_lib.data_seed(c), task, 7]),
                             beta=c.data.beta, classes_per_client=c.data.classes_per_client,
                             min_samples=c.data.min_samples)
    except ValueError as e:
        key = {"quantity": "data.classes_per_client"}.get(c.data.partition, "data.min_samples")
        value = c.data.classes_per_client if key == "data.classes_per_client" else c.data.min_samples
        raise config_lib.invalid(key, value, f"task {task} ({len(labels)} samples, {len(np.unique(labels))} classes) "
                                 f"cannot be split over config.num_clients = {c.num_clients} clients with "
                                 f"config.data.partition = {c.data.partition!r}, config.data.beta = {c.data.beta}: "
                                 f"{e}") from e


def build_setup(config: ml_collections.ConfigDict) -> Setup:
    config_lib.validate(config)
    config_lib.validate_paths(config)
    c = methods.effective_config(config)  # e.g. centralized: one client holding all data
    backbone = backbones.get(c.backbone.name, **c.backbone.options.to_dict())
    config_lib.validate_rank(c, backbone.lora_shapes)
    ds = data_lib.load(c.data.name, **c.data.options.to_dict())
    config_lib.validate_tasks(c, ds.num_classes)
    if 0 < c.data.max_classes < ds.num_classes:
        largest = np.argsort(-ds.counts("train"), kind="stable")[:c.data.max_classes]
        ds = data_lib.select_classes(ds, np.sort(largest))
    if c.data.n_train_per_class or c.data.n_test_per_class:
        ds = data_lib.subsample_per_class(ds, c.data.n_train_per_class or None, c.data.n_test_per_class or None,
                                          config_lib.data_seed(c))
    if (ds.kind == "text") != (backbone.kind == "text"):
        raise ValueError(f"config.data.name={c.data.name!r} is {ds.kind} data but config.backbone.name="
                         f"{c.backbone.name!r} is a {backbone.kind} backbone")
    order = data_lib.class_order(ds.num_classes, None if c.data.class_order_seed < 0 else c.data.class_order_seed)
    per_task = c.data.classes_per_task
    tasks = data_lib.task_classes(ds.num_classes, per_task if isinstance(per_task, int) else tuple(per_task), order)
    offsets = data_lib.task_offsets(tasks)
    ds = dataclasses.replace(ds, y_train=data_lib.relabel(ds.y_train, order), y_test=data_lib.relabel(ds.y_test, order))
    train, test = _encode(ds, backbone, c.data.max_len)
    task_train = [data_lib.task_indices(ds.y_train, t, offsets) for t in range(len(tasks))]
    task_test = [data_lib.task_indices(ds.y_test, t, offsets) for t in range(len(tasks))]
    partitions = []
    for t, idx in enumerate(task_train):
        parts = _split_task(c, ds.y_train[idx], t)
        partitions.append([idx[p] for p in parts])
    mesh = sharding.make_mesh(c.mesh_clients)  # frozen backbone and data replicated, client work sharded
    backbone = dataclasses.replace(backbone, params=sharding.replicate(backbone.params, mesh))
    train, test = sharding.replicate((train, test), mesh)
    schedule = _plan_schedule(c, backbone, mesh, partitions, task_test, int(offsets[-1]), train, test)
    fns = federated.build_client_functions(
        backbone, _make_prepare(c, backbone, ds.kind), lr_head=c.lr, weight_decay=c.weight_decay,
        backbone_gram="diag" if c.alpha_backbone == 0 else "full", alpha_backbone=c.alpha_backbone,
        head_gram="diag" if c.alpha_head == 0 else "full", alpha_head=c.alpha_head, augment_grams=c.gram_augment,
        gram_stream_batch=c.gram_batch_size or c.batch_size, gram_block=schedule.gram_block, mesh=mesh)
    return Setup(config=c, backbone=backbone, dataset=ds, offsets=offsets, train=train, test=test,
                 task_train=task_train, task_test=task_test, partitions=partitions, schedule=schedule,
                 fns=fns, method=methods.Compiled(methods.get(c.method, c)))


def with_partitions(setup: Setup, partitions: list) -> Setup:
    """The setup with other client partitions (e.g. a client emptied), its schedule replanned for them: the lanes and
    packed passes are laid out from the partitions, so replacing ``partitions`` alone would leave them stale."""
    schedule = _plan_schedule(setup.config, setup.backbone, setup.fns.mesh, partitions, setup.task_test,
                              int(setup.offsets[-1]), setup.train, setup.test)
    return dataclasses.replace(setup, partitions=partitions, schedule=schedule)


def _tokens_per_example(backbone, max_len: int) -> int:
    """Rows one example contributes to every layer's Gram: the ViT's tokens (patches + CLS) or the text length."""
    if backbone.kind == "text":
        return max_len
    x = jax.ShapeDtypeStruct((1, backbone.image_size, backbone.image_size, 3), jnp.float32)
    return int(jax.eval_shape(lambda p, x: backbone.module.apply({"params": p}, x, all_tokens=True),
                              backbone.params, x).shape[1])


def _plan_schedule(c, backbone, mesh, partitions, task_test, num_classes: int, train, test) -> Schedule:
    """Lanes (``config.client_lanes`` or the memory plan's and :func:`federated.choose_lanes`' choice), the packing of
    every task's clients into them, and the packed Gram / evaluation layouts; logged before the run."""
    devices = sharding.mesh_size(mesh)
    gram_bs = c.gram_batch_size or c.batch_size
    backbone_gram = "diag" if c.alpha_backbone == 0 else "full"
    plan = federated.plan_memory(backbone, num_clients=c.num_clients, num_classes=num_classes, rank=c.rank,
                                 batch_size=c.batch_size, gram_batch_size=gram_bs, backbone_gram=backbone_gram,
                                 head_gram="diag" if c.alpha_head == 0 else "full",
                                 shared_bytes=ledger.nbytes((backbone.params, train, test)), mesh=mesh,
                                 max_len=c.data.max_len)
    log.info("%s", plan.table())
    steps = [data_lib.steps_per_client([len(p) for p in parts], c.batch_size, c.epochs) for parts in partitions]
    lanes = federated.choose_lanes(steps, devices=devices, platform=mesh.devices.flat[0].platform,
                                   max_lanes=plan.max_lanes, requested=c.client_lanes)
    members = [data_lib.pack_lanes(s, lanes) for s in steps]
    num_steps = max(max(int(sum(s[k] for k in lane)) for lane in m) for s, m in zip(steps, members))
    num_slots = 1 + max(len(lane) for m in members for lane in m)
    # Full Grams: blocks of >= 64 rows keep the per-block Gram dots efficient (one example per block would form a
    # d×d matrix per example); diagonal Grams: one example per block, no padding at all.
    block = 1 if backbone_gram == "diag" else max(1, -(-64 // _tokens_per_example(backbone, c.data.max_len)))

    def packed(groups, stream_batch, passes, block, max_examples):
        """One layout per group (list of index arrays), all with the largest group's shape (one compiled program):
        batches of at most ``max_examples`` examples, as few as the largest group needs and equally full."""
        blocks = max(-(-sum(-(-len(ix) * passes // block) for ix in g) // devices) for g in groups)
        num_batches = max(1, -(-blocks // max(1, max_examples // block)))
        per_batch = max(1, -(-blocks // num_batches))
        return [data_lib.packed_schedule(g, stream_batch, passes, block=block, blocks_per_batch=per_batch,
                                         shards=devices, num_batches=num_batches) for g in groups]

    gram_packed = packed(partitions, gram_bs, c.gram_passes, block, gram_bs)
    eval_packed = packed([task_test[:t + 1] for t in range(len(task_test))], c.eval_batch_size, 1, 1,
                         c.eval_batch_size)
    schedule = Schedule(lanes=lanes, steps=steps, members=members, num_steps=max(num_steps, 1), num_slots=num_slots,
                        gram_block=block, gram_packed=gram_packed, eval_packed=eval_packed)
    log.info("%s", schedule.describe(c.batch_size))
    return schedule


def partition_digest(setup: Setup) -> str:
    h = hashlib.sha256()
    for parts in setup.partitions:
        for p in parts:
            h.update(np.asarray(p, np.int64).tobytes() + b"|")
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------------------
# State

def initial_state(setup: Setup) -> dict:
    """The experiment state before any work: every leaf an array (orbax-friendly)."""
    c, bb = setup.config, setup.backbone
    T = setup.num_tasks
    lora = lora_lib.init(jax.random.fold_in(_seed_key(c.seed), 10_000), bb.lora_shapes, c.rank)
    head = federated.init_head(jax.random.fold_in(_seed_key(c.seed), 20_000), int(setup.offsets[-1]), bb.feature_dim,
                               c.head_init)
    gram_shape = (lambda d: (T, d)) if c.alpha_backbone == 0 else (lambda d: (T, d, d))
    return federated.numpy_tree({
        "unit": np.array(0, np.int64),
        "lora": lora,
        "head": head,
        "past_a": {p: np.zeros((T, c.rank, d_in), np.float32) for p, (_, d_in) in bb.lora_shapes.items()},
        "past_b": {p: np.zeros((T, d_out, c.rank), np.float32) for p, (d_out, _) in bb.lora_shapes.items()},
        "task_grams": {p: np.zeros(gram_shape(d_in), np.float32) for p, (_, d_in) in bb.lora_shapes.items()},
        "acc": np.full((T, T), np.nan, np.float64),
    })


def _prefix_delta(state: dict, num_tasks: int) -> dict:
    """``Σ_{τ < num_tasks} B_τ A_τ`` per layer (the reference's old_delta times the number of tasks)."""
    mask = (np.arange(state["past_b"][next(iter(state["past_b"]))].shape[0]) < num_tasks).astype(np.float32)
    return {p: jnp.einsum("t,tor,trd->od", mask, state["past_b"][p], state["past_a"][p],
                          precision=jax.lax.Precision.HIGHEST) for p in state["past_b"]}


def gram_network(setup: Setup, state: dict, task: int):
    """Frozen params and LoRA scale of the network the Grams are collected on.

    filler (reference, quirk Q2): ``W0 + (Σ_{τ<t} B_τ A_τ + B A)/(t+1)``; trained: ``W0 + B A``.
    """
    bb = setup.backbone
    if setup.config.gram_network == "trained" or task == 0:
        return bb.params, 1.0
    scale = 1.0 / (task + 1)
    old = _prefix_delta(state, task)
    return bb.add_delta(bb.params, {p: d * scale for p, d in old.items()}), scale




def evaluate(setup: Setup, params, head, task: int) -> np.ndarray:
    """Accuracy on the test set of every task τ ≤ t (logits restricted to the classes seen so far): [t+1]. One packed
    pass over all seen tasks' test examples, counting correct predictions per task."""
    seen = data_lib.seen_class_mask(task, setup.offsets)
    correct = federated.count_correct(setup.fns, params, head, setup.test, setup.schedule.eval_packed[task], seen,
                                      num_segments=setup.num_tasks)
    sizes = np.asarray([len(setup.task_test[t]) for t in range(task + 1)])
    return correct[:task + 1] / np.maximum(sizes, 1)


def _task_rows(setup: Setup, task: int) -> np.ndarray:
    rows = np.arange(int(setup.offsets[-1]))
    return (rows >= setup.offsets[task]) & (rows < setup.offsets[task + 1])


def client_training(setup: Setup, lora, head, task: int, rnd: int, members: list | None = None) -> tuple[dict, dict]:
    """Local training of every client of (task, round) from the server's ``lora`` / ``head``, in the run's lanes (or
    the lanes ``members``): the ``[K]`` outputs of :func:`federated.train_clients` and the schedule's utilisation."""
    c, method = setup.config, setup.method
    factor = method.train_factor(rnd)  # "A", "B", "AB" or "" (head only)
    lr_factor = {"A": c.lr_a, "B": c.lr_b, "AB": max(c.lr_a, c.lr_b)}.get(factor, -1.0)  # AB: methods.get checks
    lr_factor = c.lr if lr_factor < 0 else lr_factor
    lanes = lane_layout(setup, task, rnd, members)
    keys = client_keys(c.seed, task, rnd, np.arange(c.num_clients), TRAIN_STREAM)
    out = federated.train_clients(setup.fns, setup.backbone.params, setup.train, lora, head, lanes, keys,
                                  [float("A" in factor), float("B" in factor)], lr_factor, _task_rows(setup, task))
    used = lanes["mask"].any(-1)
    utilization = {"train_utilization": round(lanes["real_steps"] / (len(lanes["idx"]) * lanes["num_steps"]), 5),
                   "batch_fill": round(float(lanes["mask"].sum()) / max(int(used.sum()) * c.batch_size, 1), 5)}
    return out, utilization


def run_round(setup: Setup, state: dict, task: int, rnd: int) -> tuple[dict, dict]:
    """One communication round: local training (clients in vmapped lanes), Gram statistics, server merge."""
    c, method = setup.config, setup.method
    factor = method.train_factor(rnd)
    out, utilization = client_training(setup, state["lora"], state["head"], task, rnd)
    task_classes = jnp.asarray(_task_rows(setup, task))
    num_samples = np.asarray([len(p) for p in setup.partitions[task]], np.float32)
    finite, losses = federated.numpy_tree((out["finite"], out["loss"]))
    finite = finite & np.isfinite(losses)
    gram_params, scale = gram_network(setup, state, task)
    grams, head_grams = _client_grams(setup, gram_params, out["lora"], task, rnd, scale, finite)
    grams, head_grams, finite = _drop_nonfinite_grams(grams, head_grams, finite)
    utilization["gram_utilization"] = gram_utilization(setup, task)
    weights = np.where(finite, num_samples, 0.0)
    lora, head = method.merge_round(out["lora"], grams, out["head"], head_grams, jnp.asarray(weights), factor,
                                    task_classes, state["head"])
    if not np.any(weights > 0):  # nobody to merge: keep the server's model rather than a merge of nothing
        lora, head = state["lora"], state["head"]
    book = ledger.round_entry(method, rnd, factor, out["lora"], grams, out["head"], head_grams, weights, task_classes,
                              state["lora"], state["head"])  # state before the merge: what the clients downloaded
    if c.merge_diagnostics and factor:
        book.update(ledger.diagnostics(out["lora"], lora, grams, weights, c.merge_dtype))
    state = dict(state, lora=federated.numpy_tree(lora), head=federated.numpy_tree(head))
    metrics = {"task": task, "round": rnd, "factor": factor,
               "loss": float(np.sum(np.where(weights > 0, losses, 0.0) * weights) / max(np.sum(weights), 1.0)),
               "client_loss": [round(float(x), 5) for x in losses],
               "client_samples": num_samples.astype(int).tolist(),
               "excluded_clients": np.flatnonzero(~finite).tolist(), **utilization, **book,
               **gram_conditioning({**grams, "head": head_grams}, c.merge_dtype)}
    if not finite.all():
        log.warning("task %d round %d: clients %s produced a non-finite loss, parameters or Grams and were left out "
                    "of the merge%s", task, rnd, metrics["excluded_clients"],
                    "" if finite.any() else "; no client was left, so the server model is kept unchanged")
    if c.eval_every_round:
        params = setup.backbone.add_delta(gram_params, lora_lib.delta(
            {p: {"A": f["A"], "B": f["B"] * scale} for p, f in state["lora"].items()}))
        accs = evaluate(setup, params, state["head"], task)
        sizes = np.asarray([len(setup.task_test[t]) for t in range(task + 1)])
        metrics["accuracy"] = float(np.sum(accs * sizes) / np.sum(sizes))
        metrics["task_accuracy"] = [round(float(a), 5) for a in accs]
    return state, metrics


def _drop_nonfinite_grams(grams: dict, head_grams, include: np.ndarray):
    """Also leave out clients whose Grams overflowed (inf/NaN); returns zeroed Grams and the updated ``include`` [K]."""
    leaves = jax.tree.leaves((grams, head_grams))
    ok = np.asarray(jnp.stack([jnp.all(jnp.isfinite(g.reshape(g.shape[0], -1)), axis=1) for g in leaves]).all(0))
    if ok.all():
        return grams, head_grams, include
    return (*_zero_clients((grams, head_grams), include & ok), include & ok)


def _client_grams(setup: Setup, gram_params, client_lora, task: int, rnd: int, scale: float, include: np.ndarray):
    """Per-client Grams of every LoRA layer and of the head (one packed pass over the task's clients); clients not in
    ``include`` contribute zeros."""
    keys = client_keys(setup.config.seed, task, rnd, np.arange(setup.config.num_clients), GRAM_STREAM)
    if setup.schedule.gram_packed[task]["real_examples"] != sum(map(len, setup.partitions[task])) * \
            setup.config.gram_passes:
        raise ValueError("setup.partitions no longer match setup.schedule: build the setup with "
                         "continual.with_partitions(setup, partitions) to replan the packed passes")
    grams = federated.client_grams(setup.fns, gram_params, setup.train, client_lora, setup.schedule.gram_packed[task],
                                   keys, scale)
    return _zero_clients(grams, include)


def gram_utilization(setup: Setup, task: int) -> float:
    """Real examples / processed example slots of task ``task``'s packed Gram pass (all devices)."""
    p = setup.schedule.gram_packed[task]
    slots = p["idx"].shape[0] * p["num_batches"] * p["idx"].shape[2] * p["idx"].shape[3]
    return round(p["real_examples"] / slots, 5)


def _zero_clients(tree, include: np.ndarray):
    """Zero the entries of the clients not in ``include`` [K] on every leaf of a client-stacked pytree."""
    keep = jnp.asarray(include)
    return jax.tree.map(lambda g: jnp.where(keep.reshape((-1,) + (1,) * (g.ndim - 1)), g, 0.0), tree)


@functools.partial(jax.jit, static_argnames="dtype")
def _gram_health_tree(stacked_grams: dict, dtype: str) -> dict:
    return {p: merging.gram_health(merging.client_sum(g), dtype=jnp.dtype(dtype)) for p, g in stacked_grams.items()}


def gram_conditioning(stacked_grams: dict, dtype: str = "float32") -> dict:
    """Metrics of the summed Grams ``Σ_k G_k`` a merge solves with (``{name: [K, d] or [K, d, d]}``; see
    :func:`merging.gram_health`): the smallest scaled Cholesky pivot over layers (~1/cond; 0 = singular), how many
    layers take the eigh pseudo-inverse fallback, and how many features have no input energy."""
    health = jax.device_get(_gram_health_tree(stacked_grams, dtype))
    pivots = [float(h["min_pivot"]) for h in health.values()]
    return {"gram_min_pivot": float(f"{min(pivots):.6g}"),
            "gram_pinv_layers": int(sum(float(h["pinv"]) for h in health.values())),
            "gram_dead_features": int(sum(float(h["dead"]) for h in health.values()))}


def end_task(setup: Setup, state: dict, task: int) -> tuple[dict, dict]:
    """Grams of the merged task LoRA, cross-task RegMean, and evaluation on all tasks seen so far."""
    c = setup.config
    gram_params, scale = gram_network(setup, state, task)
    server = federated.stack_clients(state["lora"], c.num_clients)
    grams, _ = _client_grams(setup, gram_params, server, task, c.rounds, scale, np.ones(c.num_clients, bool))
    state = dict(state)
    state["past_a"] = {p: x.copy() for p, x in state["past_a"].items()}
    state["past_b"] = {p: x.copy() for p, x in state["past_b"].items()}
    state["task_grams"] = {p: x.copy() for p, x in state["task_grams"].items()}
    for p, f in state["lora"].items():
        state["past_a"][p][task] = f["A"]
        state["past_b"][p][task] = f["B"]
        state["task_grams"][p][task] = np.asarray(merging.client_sum(grams[p]))
    deltas = setup.method.merge_tasks(state["past_b"], state["past_a"], state["task_grams"], task + 1)
    params = setup.backbone.add_delta(setup.backbone.params, deltas)
    accs = evaluate(setup, params, state["head"], task)
    acc = state["acc"].copy()
    acc[task, :task + 1] = accs
    state["acc"] = acc
    sizes = np.asarray([len(setup.task_test[t]) for t in range(task + 1)])
    metrics = {"task": task, "round": "end", "accuracy": float(np.sum(accs * sizes) / np.sum(sizes)),
               "task_accuracy": [round(float(a), 5) for a in accs], "gram_utilization": gram_utilization(setup, task),
               **ledger.task_entry(setup.method, setup.method.train_factor(c.rounds - 1), grams, state["lora"],
                                   c.num_clients),
               **gram_conditioning(state["task_grams"], c.merge_dtype)}  # unfinished tasks' rows are 0
    if task + 1 < setup.num_tasks:  # the next task starts from B = 0 and a fresh A
        state["lora"] = federated.numpy_tree(lora_lib.init(
            jax.random.fold_in(jax.random.fold_in(_seed_key(c.seed), 10_000), task + 1),
            setup.backbone.lora_shapes, c.rank))
    return state, metrics


# ----------------------------------------------------------------------------------------------------------------------
# The run: units, checkpoints, outputs

def _config_json(config) -> dict:
    return json.loads(config.to_json_best_effort())


def _check_workdir_config(workdir: str, config, write: bool = True) -> None:
    """Refuse a workdir that holds a run of another config; record ``config.json`` there (if ``write``) when new."""
    path = os.path.join(workdir, "config.json")
    current = _config_json(config)
    if os.path.exists(path):
        with open(path) as f:
            previous = config_lib.with_added_keys(json.load(f))  # recorded before a key existed: its default
        if previous != current:
            diff = _first_difference(previous, current)
            raise ValueError(f"{workdir} holds a run with a different config ({diff}); use a new --workdir or delete it")
    elif write:
        os.makedirs(workdir, exist_ok=True)
        _write_json(path, current, indent=2, sort_keys=True)


def _write_json(path: str, obj, **kwargs) -> None:
    """Write ``path`` atomically (a temporary file renamed over it): a crash never leaves half a file."""
    if not distributed.is_primary():  # multi-host: process 0 writes the run's files
        return
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, **kwargs)
    os.replace(tmp, path)


def _first_difference(a, b, prefix="config") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return _first_difference(a.get(k), b.get(k), f"{prefix}.{k}")
    return f"{prefix}: {a!r} before, {b!r} now"


def _append_metrics(workdir: str, lines: list[dict]) -> None:
    if not distributed.is_primary():
        return
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
        for line in lines:
            f.write(json.dumps(line) + "\n")


def _truncate_metrics(workdir: str, units_done: int) -> None:
    """Keep the metric lines of the units a checkpoint covers (a crash may have logged a unit it did not save)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path) or not distributed.is_primary():
        return
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    kept = [line for line in lines if _metric_unit(line) < units_done]
    with open(f"{path}.tmp", "w") as f:
        f.writelines(kept)
    os.replace(f"{path}.tmp", path)


def _metric_unit(line: str) -> float:
    """The unit of a metrics line; a line torn by a crash mid-write counts as not done."""
    try:
        return json.loads(line)["unit"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


class Interrupted(SystemExit):
    """:func:`run` stopped on SIGINT / SIGTERM after checkpointing the unit in flight.

    ``code`` is the conventional exit status ``128 + signal number``: 130 for SIGINT, 143 for SIGTERM.
    """


def run(config: ml_collections.ConfigDict, workdir: str, *, stop_after_units: int | None = None,
        progress: bool = True) -> dict | None:
    """Run (or resume, or return the finished result of) the experiment in ``workdir``.

    ``stop_after_units`` stops after that many units in total (for tests of resumption); the result is then ``None``.

    Fault tolerance: the metrics line of a unit is appended before its checkpoint is written and lines the checkpoint
    does not cover are dropped on resume, so after any crash (SIGKILL included) the rerun recomputes at most the unit
    in flight and ends bit-identical to an uninterrupted run. A first SIGINT / SIGTERM lets the unit in flight finish
    and be checkpointed, then raises :class:`Interrupted` (exit status 130 / 143); a second one stops at once.
    """
    results_path = os.path.join(workdir, "results.json")
    config_lib.validate(config)
    _check_workdir_config(workdir, config, write=False)
    if os.path.exists(results_path):
        with open(results_path) as f:
            return json.load(f)
    start = time.time()
    setup = build_setup(config)  # the rest of the validation: before anything is written to the workdir
    _check_workdir_config(workdir, config)
    c = setup.config
    units_per_task = c.rounds + 1
    total = setup.num_tasks * units_per_task
    state = initial_state(setup)
    digest = partition_digest(setup)
    restored = checkpointing.restore(workdir, dict(state))
    if restored is not None:
        state = restored
        log.info("resumed %s at unit %d/%d", workdir, int(state["unit"]), total)
    _truncate_metrics(workdir, int(state["unit"]))
    _write_partition_info(workdir, setup, digest)
    current = [int(state["unit"])]  # the unit in flight, read by the fault-injection test hook
    fault = _fault_plan()
    if fault is not None:
        setup = _with_faults(setup, fault, current)
    bar = tqdm(total=total, initial=int(state["unit"]), disable=not progress or not distributed.is_primary(),
               desc="lorm-jax", unit="unit")
    with _deferred_signals() as received:
        while int(state["unit"]) < total:
            unit = current[0] = int(state["unit"])
            task, rnd = divmod(unit, units_per_task)
            t0 = time.time()
            if rnd < c.rounds:
                state, metrics = run_round(setup, state, task, rnd)
            else:
                state, metrics = end_task(setup, state, task)
            state["unit"] = np.array(unit + 1, np.int64)
            metrics = {"unit": unit, **metrics, "seconds": round(time.time() - t0, 3)}
            _append_metrics(workdir, [metrics])  # first: a line without its checkpoint is dropped on resume
            checkpointing.save(workdir, unit + 1, state,
                               before_commit=None if fault is None else lambda: _fire(fault, "checkpoint", current))
            bar.set_postfix({k: (f"{v:.3f}" if isinstance(v, float) else v) for k, v in metrics.items()
                             if k in ("task", "round", "loss", "accuracy")})
            bar.update(1)
            log.info("task %d %s: %s", task, "end" if rnd == c.rounds else f"round {rnd} ({metrics.get('factor')})",
                     ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k in ("loss", "accuracy")))
            if received and unit + 1 < total:
                bar.close()
                name = signal.Signals(received[0]).name
                log.warning("%s: stopped with %d of %d units done (the last: task %d %s), all checkpointed in %s. "
                            "Run the same command again to resume.", name, unit + 1, total, task,
                            "end" if rnd == c.rounds else f"round {rnd}", workdir)
                raise Interrupted(128 + received[0])
            if stop_after_units is not None and unit + 1 >= stop_after_units and unit + 1 < total:
                bar.close()
                return None
    bar.close()
    return _finish(setup, state, workdir, time.time() - start)


@contextlib.contextmanager
def _deferred_signals():
    """Within the block a first SIGINT / SIGTERM is only recorded (in the yielded list) so the unit in flight can finish
    and be checkpointed; a second one raises :class:`Interrupted` at once. Outside the main thread: no change."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def handler(signum, frame):
        name = signal.Signals(signum).name
        if received:
            log.warning("second %s: stopping now; the unit in flight is lost, the last checkpoint is intact", name)
            raise Interrupted(128 + signum)
        received.append(signum)
        log.warning("%s received: finishing the unit in flight and checkpointing it, then exiting (send it again to "
                    "stop at once, losing that unit)", name)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


# Test hook: LORM_JAX_FAULT="<stage>@<unit>[:<SIGNAL>]" sends SIGNAL (default SIGKILL) to this process in that stage of
# that unit: train (local training done), merge (inside the server merge of a round or the end-of-task merge) or
# checkpoint (the step's files written, before the rename that commits it). Used by tests/test_reliability.py.
FAULT_ENV = "LORM_JAX_FAULT"


def _fault_plan() -> tuple[str, int, int] | None:
    spec = os.environ.get(FAULT_ENV, "")
    if not spec:
        return None
    m = re.fullmatch(r"(train|merge|checkpoint)@(\d+)(?::(SIGKILL|SIGTERM|SIGINT))?", spec)
    if m is None:
        raise ValueError(f"{FAULT_ENV} = {spec!r} is invalid: <train|merge|checkpoint>@<unit>[:SIGKILL|SIGTERM|SIGINT]")
    return m[1], int(m[2]), int(getattr(signal, m[3] or "SIGKILL"))


def _fire(fault: tuple[str, int, int], stage: str, current: list) -> None:
    if fault[0] == stage and fault[1] == current[0]:
        os.kill(os.getpid(), fault[2])
        current[0] = -1  # a signal that does not kill fires once


def _with_faults(setup: Setup, fault: tuple[str, int, int], current: list) -> Setup:
    """``setup`` with client training and the method's merges wrapped to call :func:`_fire` at their stage."""
    train = setup.fns.train

    def faulty_train(*args, **kwargs):
        out = jax.block_until_ready(train(*args, **kwargs))
        _fire(fault, "train", current)
        return out

    return dataclasses.replace(setup, fns=dataclasses.replace(setup.fns, train=faulty_train),
                               method=_FaultyMethod(setup.method, lambda: _fire(fault, "merge", current)))


class _FaultyMethod:
    """A method whose merges first call ``fire`` (test hook); everything else is the wrapped method's."""

    def __init__(self, method, fire: Callable[[], None]):
        self._method, self._fire = method, fire

    def __getattr__(self, name):
        return getattr(self._method, name)

    def merge_round(self, *args, **kwargs):
        self._fire()
        return self._method.merge_round(*args, **kwargs)

    def merge_tasks(self, *args, **kwargs):
        self._fire()
        return self._method.merge_tasks(*args, **kwargs)


def _write_partition_info(workdir: str, setup: Setup, digest: str) -> None:
    info = {"partition_digest": digest, **_seeds(setup.config),
            "client_label_counts": [data_lib.client_label_counts(np.asarray(setup.dataset.y_train), parts,
                                                                  int(setup.offsets[-1])).tolist()
                                    for parts in setup.partitions]}
    _write_json(os.path.join(workdir, "partition.json"), info)


def _seeds(c) -> dict:
    """``seed`` (training randomness) and ``data_seed`` (subsample and partitions) as a run used them."""
    return {"seed": int(c.seed), "data_seed": config_lib.data_seed(c)}


def _data_split(name: str):
    """Seed and checksums of our own train/test split of a TFDS dataset (None for datasets with a fixed split)."""
    if not name.startswith("tfds/"):
        return None
    from lorm_jax.data import tfds_data
    return tfds_data.split_info(name)


def utilization_summary(setup: Setup, metrics_path: str) -> dict:
    """How much of what the run computed was real work: the schedule (lanes, loop buffer, packed-pass block) and the
    mean / min over the units of ``train_utilization`` (real client-steps / lane-steps run), ``batch_fill`` (real
    examples / example slots of the real steps) and ``gram_utilization`` (real examples / slots of the Gram pass)."""
    with open(metrics_path) as f:
        lines = [json.loads(line) for line in f if line.strip()]
    out = {"lanes": setup.schedule.lanes, "loop_steps": setup.schedule.num_steps,
           "slots_per_lane": setup.schedule.num_slots - 1, "gram_block": setup.schedule.gram_block}
    for key in ("train_utilization", "batch_fill", "gram_utilization"):
        values = [line[key] for line in lines if key in line]
        if values:
            out[key] = {"mean": round(float(np.mean(values)), 5), "min": round(float(np.min(values)), 5)}
    return out


def _finish(setup: Setup, state: dict, workdir: str, seconds: float) -> dict:
    acc = np.asarray(state["acc"])
    sizes = np.asarray([len(t) for t in setup.task_test])
    results = {"method": setup.method.name, **_seeds(setup.config), **summarize(acc, sizes),
               "accuracy_matrix": [[None if np.isnan(v) else float(v) for v in row] for row in acc],
               "num_tasks": setup.num_tasks, "classes_per_task": np.diff(setup.offsets).tolist(),
               "test_sizes": sizes.tolist(), "dataset": setup.dataset.name, "backbone": setup.backbone.name,
               "backbone_source": setup.backbone.source, "data_split": _data_split(setup.dataset.name),
               "communication": ledger.summarize_file(os.path.join(workdir, "metrics.jsonl")),
               "utilization": utilization_summary(setup, os.path.join(workdir, "metrics.jsonl")),
               "config": _config_json(setup.config)}
    if distributed.is_primary():
        plotting.plot_results(results, workdir)
    _write_json(os.path.join(workdir, "run_info.json"),  # kept apart: results.json is bit-reproducible
                {"wall_seconds_last_session": round(seconds, 2), "devices": [str(d) for d in jax.devices()]})
    _write_json(os.path.join(workdir, "results.json"), results, indent=2)  # last: its presence means "finished"
    return results
