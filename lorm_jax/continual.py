"""The federated class-incremental experiment: task loop, rounds, evaluation, metrics, resumable state.

Work is cut into *units*: task t has ``rounds`` round units (local training of all clients in one vmapped call, Gram
statistics, server merge) and one end-of-task unit (Grams of the merged task LoRA, cross-task merge, evaluation). The
state after every unit is checkpointed, so a crash loses at most the unit in flight, and every random draw is a pure
function of (seed, task, round, client, step), so a resumed run is bit-identical to an uninterrupted one.

Evaluation after task t: micro accuracy (Σ correct / Σ samples, as the reference reports it) of the cross-task merged
model on the test sets of tasks 0..t, with logits restricted to the classes seen so far.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from lorm_jax import backbones, checkpointing, federated, merging, methods, plotting
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
    * forgetting: ``mean_{τ<T-1} (max_{τ≤t<T-1} acc[t, τ] − acc[T-1, τ])``;
    * bwt (backward transfer): ``mean_{τ<T-1} (acc[T-1, τ] − acc[τ, τ])``.
    """
    T = acc.shape[0]
    n = np.asarray(test_sizes, np.float64)
    pooled = [float(np.sum(acc[t, :t + 1] * n[:t + 1]) / np.sum(n[:t + 1])) for t in range(T)]
    last = acc[T - 1]
    forgetting = [float(np.max(acc[tau:T - 1, tau]) - last[tau]) for tau in range(T - 1)]
    bwt = [float(last[tau] - acc[tau, tau]) for tau in range(T - 1)]
    return {
        "final_average_accuracy": pooled[-1],
        "final_average_accuracy_task_mean": float(np.mean(last)),
        "average_incremental_accuracy": float(np.mean(pooled)),
        "accuracy_after_task": pooled,
        "forgetting": float(np.mean(forgetting)) if forgetting else 0.0,
        "bwt": float(np.mean(bwt)) if bwt else 0.0,
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
    train_steps: int                # padded local steps per round (same for every task: one compilation)
    gram_steps: int
    fns: federated.ClientFunctions
    method: object

    @property
    def num_tasks(self) -> int:
        return len(self.offsets) - 1


def _seed_key(seed: int) -> jax.Array:
    return jax.random.PRNGKey(seed)


def client_keys(seed: int, task: int, rnd: int, clients: np.ndarray, stream: int) -> jax.Array:
    """``fold_in(seed → task → round → client → stream)`` for every client: [K] keys."""
    base = jax.random.fold_in(jax.random.fold_in(_seed_key(seed), task), rnd)
    return jnp.stack([jax.random.fold_in(jax.random.fold_in(base, int(k)), stream) for k in clients])


def _client_rng(seed: int, task: int, rnd: int, client: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, task, rnd, client, stream])


def _schedule(setup: Setup, task: int, rnd: int, stream: int, batch_size: int, epochs: int, steps: int, shuffle: bool):
    """Padded per-client schedules ``idx, mask [K, steps, batch]`` (indices into the task's data), each client's order
    drawn from its own generator so it does not depend on how clients are grouped."""
    per_client = [data_lib.client_schedule([part], batch_size, epochs, _client_rng(setup.config.seed, task, rnd, k,
                                                                                     stream),
                                           shuffle=shuffle, num_steps=steps)
                  for k, part in enumerate(setup.partitions[task])]
    return (np.concatenate([p[0] for p in per_client]), np.concatenate([p[1] for p in per_client]))


def _make_prepare(config, backbone, kind: str) -> Callable:
    """``prepare(data, idx, key, train) -> (model inputs, labels)``: gather a batch on device and transform it."""
    if kind == "text":
        def prepare(data, idx, key, train):
            return {"input_ids": data["input_ids"][idx], "attention_mask": data["attention_mask"][idx]}, data["y"][idx]
        return prepare
    mean = tuple(config.data.mean) or backbone.mean
    std = tuple(config.data.std) or backbone.std
    size, mode, method = backbone.image_size, config.data.augment, config.data.interpolation
    ratio = config.data.test_resize_ratio or None

    def train_view(key, images):
        if mode == "crop":  # Resize(round(size·ratio)) + RandomCrop(size) + flip (reference CUB-200)
            big = augment.resize(augment.to_float(images), int(round(size * (ratio or 1.0))), method=method)
            keys = jax.random.split(key, 2 * images.shape[0]).reshape(2, images.shape[0], -1)
            crops = jax.vmap(lambda k, im: augment.random_crop(k, im, size))(keys[0], big)
            return jax.vmap(augment.random_flip)(keys[1], crops)
        return augment.train_transform(key, images, size, crop_scale=tuple(config.data.crop_scale) if mode == "rrc"
                                       else None, flip=mode in ("rrc", "flip"), method=method)

    def prepare(data, idx, key, train):
        images = data["x"][idx]
        if train and mode != "none":
            x = train_view(key, images)
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


def build_setup(config: ml_collections.ConfigDict) -> Setup:
    config_lib.validate(config)
    c = config
    backbone = backbones.get(c.backbone.name, **c.backbone.options.to_dict())
    ds = data_lib.load(c.data.name, **c.data.options.to_dict())
    if 0 < c.data.max_classes < ds.num_classes:
        largest = np.argsort(-ds.counts("train"), kind="stable")[:c.data.max_classes]
        ds = data_lib.select_classes(ds, np.sort(largest))
    if c.data.n_train_per_class or c.data.n_test_per_class:
        ds = data_lib.subsample_per_class(ds, c.data.n_train_per_class or None, c.data.n_test_per_class or None, c.seed)
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
        rng = np.random.default_rng([c.seed, t, 7])
        parts = split_clients(ds.y_train[idx], c.num_clients, c.data.partition, rng, beta=c.data.beta,
                                   classes_per_client=c.data.classes_per_client, min_samples=c.data.min_samples)
        partitions.append([idx[p] for p in parts])
    largest = max(len(p) for parts in partitions for p in parts)
    gram_bs = c.gram_batch_size or c.batch_size
    fns = federated.build_client_functions(
        backbone, _make_prepare(c, backbone, ds.kind), lr_head=c.lr, weight_decay=c.weight_decay,
        backbone_gram="diag" if c.alpha_backbone == 0 else "full", alpha_backbone=c.alpha_backbone,
        head_gram="diag" if c.alpha_head == 0 else "full", alpha_head=c.alpha_head, augment_grams=c.gram_augment)
    return Setup(config=c, backbone=backbone, dataset=ds, offsets=offsets,
                 train=jax.device_put(train), test=jax.device_put(test),
                 task_train=task_train, task_test=task_test, partitions=partitions,
                 train_steps=max(1, c.epochs * math.ceil(largest / c.batch_size)),
                 gram_steps=max(1, c.gram_passes * math.ceil(largest / gram_bs)),
                 fns=fns, method=methods.get(c.method, c))


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
    head = federated.init_head(jax.random.fold_in(_seed_key(c.seed), 20_000), int(setup.offsets[-1]), bb.feature_dim)
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




def evaluate(setup: Setup, params, lora, head, task: int) -> np.ndarray:
    """Accuracy on the test set of every task τ ≤ t (logits restricted to the classes seen so far): [t+1]."""
    seen = jnp.asarray(data_lib.seen_class_mask(task, setup.offsets))
    accs = []
    for tau in range(task + 1):
        positions = setup.task_test[tau]
        idx, mask = data_lib.eval_schedule(len(positions), setup.config.eval_batch_size)
        correct = 0
        for step_idx, step_mask in zip(idx, mask):
            pred, labels = setup.fns.evaluate(params, lora, head, setup.test, jnp.asarray(positions[step_idx]), seen)
            correct += int(np.sum((np.asarray(pred) == np.asarray(labels)) & step_mask))
        accs.append(correct / max(len(positions), 1))
    return np.asarray(accs)


def _task_rows(setup: Setup, task: int) -> np.ndarray:
    rows = np.arange(int(setup.offsets[-1]))
    return (rows >= setup.offsets[task]) & (rows < setup.offsets[task + 1])


def run_round(setup: Setup, state: dict, task: int, rnd: int) -> tuple[dict, dict]:
    """One communication round: local training (vmap over clients), Gram statistics, server merge."""
    c, method = setup.config, setup.method
    clients = np.arange(c.num_clients)
    factor = method.train_factor(rnd)  # "A", "B", "AB" or "" (head only)
    lr_factor = {"A": c.lr_a, "B": c.lr_b}.get(factor, -1.0)
    lr_factor = c.lr if lr_factor < 0 else lr_factor
    phase = jnp.asarray([float("A" in factor), float("B" in factor)])
    idx, mask = _schedule(setup, task, rnd, TRAIN_STREAM, c.batch_size, c.epochs, setup.train_steps, shuffle=True)
    keys = client_keys(c.seed, task, rnd, clients, TRAIN_STREAM)
    task_classes = jnp.asarray(_task_rows(setup, task))
    out = federated.run_chunked(
        setup.fns.train, (jnp.asarray(idx), jnp.asarray(mask), keys),
        (setup.backbone.params, setup.train, state["lora"], state["head"]),
        (phase, jnp.float32(lr_factor), task_classes), c.client_chunk)
    num_samples = np.asarray([len(p) for p in setup.partitions[task]], np.float32)
    finite = np.asarray(out["finite"])
    weights = np.where(finite, num_samples, 0.0)
    gram_params, scale = gram_network(setup, state, task)
    grams, head_grams = _client_grams(setup, gram_params, out["lora"], task, rnd, scale, finite)
    lora, head = method.merge_round(out["lora"], grams, out["head"], head_grams, jnp.asarray(weights), factor,
                                    task_classes, state["head"])
    state = dict(state, lora=federated.numpy_tree(lora), head=federated.numpy_tree(head))
    losses = np.asarray(out["loss"])
    metrics = {"task": task, "round": rnd, "factor": factor,
               "loss": float(np.sum(losses * weights) / max(np.sum(weights), 1.0)),
               "client_loss": [round(float(x), 5) for x in losses],
               "client_samples": num_samples.astype(int).tolist(),
               "excluded_clients": np.flatnonzero(~finite).tolist()}
    if not finite.all():
        log.warning("task %d round %d: clients %s produced non-finite parameters and were left out of the merge",
                    task, rnd, metrics["excluded_clients"])
    if c.eval_every_round:
        params = setup.backbone.add_delta(gram_params, lora_lib.delta(
            {p: {"A": f["A"], "B": f["B"] * scale} for p, f in state["lora"].items()}))
        accs = evaluate(setup, params, None, state["head"], task)
        sizes = np.asarray([len(setup.task_test[t]) for t in range(task + 1)])
        metrics["accuracy"] = float(np.sum(accs * sizes) / np.sum(sizes))
        metrics["task_accuracy"] = [round(float(a), 5) for a in accs]
    return state, metrics


def _client_grams(setup: Setup, gram_params, client_lora, task: int, rnd: int, scale: float, include: np.ndarray):
    """Per-client Grams of every LoRA layer and of the head; clients not in ``include`` contribute zeros."""
    c = setup.config
    gram_bs = c.gram_batch_size or c.batch_size
    idx, mask = _schedule(setup, task, rnd, GRAM_STREAM, gram_bs, c.gram_passes, setup.gram_steps, shuffle=False)
    keys = client_keys(c.seed, task, rnd, np.arange(c.num_clients), GRAM_STREAM)
    grams, head_grams, _ = federated.run_chunked(
        setup.fns.grams, (client_lora, jnp.asarray(idx), jnp.asarray(mask), keys),
        (gram_params, setup.train), (jnp.float32(scale),), c.client_chunk)
    keep = jnp.asarray(include)
    zero_out = lambda g: jnp.where(keep.reshape((-1,) + (1,) * (g.ndim - 1)), g, 0.0)
    return jax.tree.map(zero_out, grams), zero_out(head_grams)


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
    accs = evaluate(setup, params, None, state["head"], task)
    acc = state["acc"].copy()
    acc[task, :task + 1] = accs
    state["acc"] = acc
    sizes = np.asarray([len(setup.task_test[t]) for t in range(task + 1)])
    metrics = {"task": task, "round": "end", "accuracy": float(np.sum(accs * sizes) / np.sum(sizes)),
               "task_accuracy": [round(float(a), 5) for a in accs]}
    if task + 1 < setup.num_tasks:  # the next task starts from B = 0 and a fresh A
        state["lora"] = federated.numpy_tree(lora_lib.init(
            jax.random.fold_in(jax.random.fold_in(_seed_key(c.seed), 10_000), task + 1),
            setup.backbone.lora_shapes, c.rank))
    return state, metrics


# ----------------------------------------------------------------------------------------------------------------------
# The run: units, checkpoints, outputs

def _config_json(config) -> dict:
    return json.loads(config.to_json_best_effort())


def _check_workdir_config(workdir: str, config) -> None:
    path = os.path.join(workdir, "config.json")
    current = _config_json(config)
    if os.path.exists(path):
        with open(path) as f:
            previous = json.load(f)
        if previous != current:
            diff = _first_difference(previous, current)
            raise ValueError(f"{workdir} holds a run with a different config ({diff}); use a new --workdir or delete it")
    else:
        os.makedirs(workdir, exist_ok=True)
        with open(path, "w") as f:
            json.dump(current, f, indent=2, sort_keys=True)


def _first_difference(a, b, prefix="config") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return _first_difference(a.get(k), b.get(k), f"{prefix}.{k}")
    return f"{prefix}: {a!r} before, {b!r} now"


def _append_metrics(workdir: str, lines: list[dict]) -> None:
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
        for line in lines:
            f.write(json.dumps(line) + "\n")


def _truncate_metrics(workdir: str, units_done: int) -> None:
    """Keep the metric lines of the units a checkpoint covers (a crash may have logged a unit it did not save)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    kept = [line for line in lines if json.loads(line)["unit"] < units_done]
    with open(path, "w") as f:
        f.writelines(kept)


def run(config: ml_collections.ConfigDict, workdir: str, *, stop_after_units: int | None = None,
        progress: bool = True) -> dict | None:
    """Run (or resume, or return the finished result of) the experiment in ``workdir``.

    ``stop_after_units`` stops after that many units in total (for tests of resumption); the result is then ``None``.
    """
    results_path = os.path.join(workdir, "results.json")
    _check_workdir_config(workdir, config)
    if os.path.exists(results_path):
        with open(results_path) as f:
            return json.load(f)
    start = time.time()
    setup = build_setup(config)
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
    bar = tqdm(total=total, initial=int(state["unit"]), disable=not progress, desc="lorm-jax", unit="unit")
    while int(state["unit"]) < total:
        unit = int(state["unit"])
        task, rnd = divmod(unit, units_per_task)
        t0 = time.time()
        if rnd < c.rounds:
            state, metrics = run_round(setup, state, task, rnd)
        else:
            state, metrics = end_task(setup, state, task)
        state["unit"] = np.array(unit + 1, np.int64)
        metrics = {"unit": unit, **metrics, "seconds": round(time.time() - t0, 3)}
        checkpointing.save(workdir, unit + 1, state)
        _append_metrics(workdir, [metrics])
        bar.set_postfix({k: (f"{v:.3f}" if isinstance(v, float) else v) for k, v in metrics.items()
                         if k in ("task", "round", "loss", "accuracy")})
        bar.update(1)
        log.info("task %d %s: %s", task, "end" if rnd == c.rounds else f"round {rnd} ({metrics.get('factor')})",
                 ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k in ("loss", "accuracy")))
        if stop_after_units is not None and unit + 1 >= stop_after_units and unit + 1 < total:
            bar.close()
            return None
    bar.close()
    return _finish(setup, state, workdir, time.time() - start)


def _write_partition_info(workdir: str, setup: Setup, digest: str) -> None:
    info = {"partition_digest": digest,
            "client_label_counts": [data_lib.client_label_counts(np.asarray(setup.dataset.y_train), parts,
                                                                  int(setup.offsets[-1])).tolist()
                                    for parts in setup.partitions]}
    with open(os.path.join(workdir, "partition.json"), "w") as f:
        json.dump(info, f)


def _data_split(name: str):
    """Seed and checksums of our own train/test split of a TFDS dataset (None for datasets with a fixed split)."""
    if not name.startswith("tfds/"):
        return None
    from lorm_jax.data import tfds_data
    return tfds_data.split_info(name)


def _finish(setup: Setup, state: dict, workdir: str, seconds: float) -> dict:
    acc = np.asarray(state["acc"])
    sizes = np.asarray([len(t) for t in setup.task_test])
    results = {"method": setup.method.name, **summarize(acc, sizes),
               "accuracy_matrix": [[None if np.isnan(v) else float(v) for v in row] for row in acc],
               "num_tasks": setup.num_tasks, "classes_per_task": np.diff(setup.offsets).tolist(),
               "test_sizes": sizes.tolist(), "dataset": setup.dataset.name, "backbone": setup.backbone.name,
               "backbone_source": setup.backbone.source, "data_split": _data_split(setup.dataset.name),
               "config": _config_json(setup.config)}
    with open(os.path.join(workdir, "results.json.tmp"), "w") as f:
        json.dump(results, f, indent=2)
    os.replace(os.path.join(workdir, "results.json.tmp"), os.path.join(workdir, "results.json"))
    with open(os.path.join(workdir, "run_info.json"), "w") as f:  # kept apart: results.json is bit-reproducible
        json.dump({"wall_seconds_last_session": round(seconds, 2), "devices": [str(d) for d in jax.devices()]}, f)
    plotting.plot_results(results, workdir)
    return results
