"""The plan of a run: everything that is a deterministic function of the config, fixed before the first round.

:func:`build_setup` loads the backbone and the data, splits the classes into tasks and every task over the clients,
places the shared arrays on the device mesh, lays out the client work (:class:`Schedule`: training lanes, packed Gram
and evaluation passes) and builds the compiled programs. Nothing here trains or merges (that is :mod:`lorm_jax.rounds`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lorm_jax import backbones, federated, ledger, memory, methods, rng, sharding
from lorm_jax import config as config_lib
from lorm_jax import data as data_lib
from lorm_jax.data import inputs
from lorm_jax.data.partition import partition as split_clients

log = logging.getLogger("lorm_jax")


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
    programs: federated.ClientPrograms  # the compiled client programs (train, grams, evaluate)
    method: methods.Method
    merges: methods.Merges             # the method's server merges, compiled

    @property
    def num_tasks(self) -> int:
        return len(self.offsets) - 1


@dataclasses.dataclass(frozen=True)
class Wave:
    """Clients of a round trained and summed together: ``clients`` [C] (ascending ids), their lanes ``members``
    (wave-local indices, :func:`lorm_jax.data.batching.pack_lanes`) of ``lane_steps`` packed steps each, and the packed
    layout ``gram`` of their Gram pass (block owners wave-local)."""
    clients: np.ndarray
    members: list
    lane_steps: list
    gram: dict


@dataclasses.dataclass(frozen=True)
class Schedule:
    """How the run lays out its client work; the partitions and the participation draws fix every client's step
    count, so all of it is known before the first round and every round runs the same compiled shapes.

    A round's clients (all, or ``config.clients_per_round`` drawn, :func:`round_clients`) run in waves of at most
    ``wave_clients`` (:func:`split_waves`; the memory plan's choice): a wave's clients train in ``lanes`` vmapped lanes
    (:func:`lorm_jax.data.batching.pack_lanes`), their local steps packed up to ``num_slots`` clients to a lane step
    (:func:`lorm_jax.data.batching.pack_steps`), then their Gram pass sums what the merge needs (``gram_units``:
    per-client Grams contracted, or per-block sums). ``waves[t]``: task t's waves when every client takes part in
    every round (None with partial participation: drawn per round, :func:`round_waves`). Loop buffers hold
    ``num_steps`` steps and ``num_rows`` client rows per lane (the most clients of a lane + a scratch row), Gram passes
    ``gram_batches`` batches of ``gram_blocks_per_batch`` blocks of ``gram_block`` examples: the largest over every
    wave of the run. Evaluation after task t: ``eval_packed[t]`` (the test sets of tasks 0..t).
    """
    lanes: int
    steps: list              # per task: [K] real local steps of each client per round
    waves: list | None
    num_steps: int
    num_slots: int
    num_rows: int
    wave_clients: int
    gram_units: str
    gram_block: int
    gram_batches: int
    gram_blocks_per_batch: int
    eval_packed: list

    def describe(self, batch_size: int) -> str:
        lines = [f"schedule: {self.lanes} training lane(s); loop buffers {self.num_steps} steps x {batch_size} "
                 f"examples of up to {self.num_slots} client(s), {self.num_rows - 1} client row(s) per lane; waves "
                 f"of at most {self.wave_clients} clients, Gram sums per "
                 f"{'client' if self.gram_units == 'clients' else 'block of examples'}"]
        for t, waves in enumerate(self.waves or []):
            lanes = [w.members for w in waves] if len(waves) > 1 else waves[0].members
            lines.append(f"  task {t}: {len(waves)} wave(s), clients per lane {_short(lanes)}, "
                         f"{int(sum(self.steps[t]))} local steps packed into {_short([w.lane_steps for w in waves])} "
                         f"lane steps; Gram pass {_short([w.gram['num_batches'] for w in waves])} packed batch(es) "
                         f"of {self.gram_blocks_per_batch} x {self.gram_block} examples per device")
        if self.waves is None:
            lines.append("  every round draws its clients (config.clients_per_round): waves laid out per round")
        p = self.eval_packed[-1]
        lines.append(f"  compiled shapes: training [{self.lanes}, {self.num_steps}, {batch_size}], Gram pass "
                     f"[{self.gram_batches}, {self.gram_blocks_per_batch}, {self.gram_block}] per device, evaluation "
                     f"{list(p['idx'].shape)}")
        return "\n".join(lines)


def _short(x, limit: int = 160) -> str:
    text = str(x)
    return text if len(text) <= limit else text[:limit] + " …"


def split_task(c, labels: np.ndarray, task: int) -> list:
    """Client partition of task ``task`` (labels [N]); impossible settings fail naming the config keys to change."""
    if len(labels) == 0:
        raise config_lib.invalid("data.classes_per_task", c.data.classes_per_task,
                                 f"task {task} has no training samples (check data.n_train_per_class, "
                                 f"data.max_classes)")
    try:
        return split_clients(labels, c.num_clients, c.data.partition,
                             rng.partition_rng(config_lib.data_seed(c), task),
                             beta=c.data.beta, classes_per_client=c.data.classes_per_client,
                             min_samples=c.data.min_samples)
    except ValueError as e:
        key = {"quantity": "data.classes_per_client"}.get(c.data.partition, "data.min_samples")
        value = c.data.classes_per_client if key == "data.classes_per_client" else c.data.min_samples
        raise config_lib.invalid(key, value, f"task {task} ({len(labels)} samples, {len(np.unique(labels))} classes) "
                                 f"cannot be split over config.num_clients = {c.num_clients} clients with "
                                 f"config.data.partition = {c.data.partition!r}, config.data.beta = {c.data.beta}: "
                                 f"{e}") from e


def build_setup(config: ml_collections.ConfigDict, *, gram_units: str = "") -> Setup:
    """The run's setup: the backbone's weights and the dataset loaded, on the device mesh of ``config.mesh_clients``
    (``gram_units``: "" for the memory plan's choice, or "clients" / "blocks", :func:`lorm_jax.memory.plan_memory`)."""
    config_lib.validate(config)
    config_lib.validate_paths(config)
    c = methods.effective_config(config)  # e.g. centralized: one client holding all data
    backbone = backbones.get(c.backbone.name, **c.backbone.options.to_dict())
    config_lib.validate_rank(c, backbone.lora_shapes)  # before the data are read
    ds = data_lib.load(c.data.name, **c.data.options.to_dict())
    return assemble(c, backbone, ds, sharding.make_mesh(c.mesh_clients), gram_units=gram_units)


def assemble(c: ml_collections.ConfigDict, backbone: backbones.Backbone, ds: data_lib.ArrayDataset, mesh, *,
             budget_bytes: int | None = None, gram_units: str = "") -> Setup:
    """The setup of the (effective) config ``c`` from a backbone and a dataset, on ``mesh``: tasks, client partitions,
    schedule and compiled programs. ``backbone`` / ``ds`` may be shapes only (``ShapeDtypeStruct`` params, zero-stride
    images) and ``mesh`` a TPU topology's, to compile a run ahead of time (:mod:`lorm_jax.aot`); ``budget_bytes``: the
    memory per device the plan may use (default: half of what the device has free)."""
    config_lib.validate_rank(c, backbone.lora_shapes)
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
    train, test = inputs.encode(ds, backbone, c.data.max_len)
    task_train = [data_lib.task_indices(ds.y_train, t, offsets) for t in range(len(tasks))]
    task_test = [data_lib.task_indices(ds.y_test, t, offsets) for t in range(len(tasks))]
    partitions = []
    for t, idx in enumerate(task_train):
        parts = split_task(c, ds.y_train[idx], t)
        partitions.append([idx[p] for p in parts])
    # frozen backbone and data replicated, client work sharded
    backbone = dataclasses.replace(backbone, params=sharding.replicate(backbone.params, mesh))
    train, test = sharding.replicate((train, test), mesh)
    schedule = plan_schedule(c, backbone, mesh, partitions, task_test, int(offsets[-1]), train, test,
                             budget_bytes=budget_bytes, gram_units=gram_units)
    programs = federated.build_client_programs(
        backbone, inputs.make_prepare(c, backbone, ds), lr_head=c.lr, weight_decay=c.weight_decay,
        backbone_gram="diag" if c.alpha_backbone == 0 else "full", alpha_backbone=c.alpha_backbone,
        head_gram="diag" if c.alpha_head == 0 else "full", alpha_head=c.alpha_head, augment_grams=c.gram_augment,
        gram_stream_batch=c.gram_batch_size or c.batch_size, gram_block=schedule.gram_block, mesh=mesh)
    method = methods.get(c.method, c)
    return Setup(config=c, backbone=backbone, dataset=ds, offsets=offsets, train=train, test=test,
                 task_train=task_train, task_test=task_test, partitions=partitions, schedule=schedule,
                 programs=programs, method=method, merges=methods.compile_merges(method))


def with_method(setup: Setup, method: methods.Method) -> Setup:
    """The setup with another method and its compiled merges (replacing ``method`` alone would keep the old merges)."""
    return dataclasses.replace(setup, method=method, merges=methods.compile_merges(method))


def with_partitions(setup: Setup, partitions: list) -> Setup:
    """The setup with other client partitions (e.g. a client emptied), its schedule replanned for them: the lanes and
    packed passes are laid out from the partitions, so replacing ``partitions`` alone would leave them stale."""
    schedule = plan_schedule(setup.config, setup.backbone, setup.programs.mesh, partitions, setup.task_test,
                              int(setup.offsets[-1]), setup.train, setup.test)
    return dataclasses.replace(setup, partitions=partitions, schedule=schedule)


def tokens_per_example(backbone, max_len: int) -> int:
    """Rows one example contributes to every layer's Gram: the ViT's tokens (patches + CLS) or the text length."""
    if backbone.kind == "text":
        return max_len
    x = jax.ShapeDtypeStruct((1, backbone.image_size, backbone.image_size, 3), jnp.float32)
    return int(jax.eval_shape(lambda p, x: backbone.module.apply({"params": p}, x, all_tokens=True),
                              backbone.params, x).shape[1])


def round_clients(c, task: int, rnd: int) -> np.ndarray:
    """The clients taking part in round ``rnd`` of task ``task`` (``rnd = config.rounds``: the end of the task, whose
    clients send the Grams of the merged task LoRA), ascending (:func:`lorm_jax.rng.participants`)."""
    return rng.participants(c.seed, task, rnd, c.num_clients, c.clients_per_round)


def split_waves(clients: np.ndarray, wave_clients: int) -> list[np.ndarray]:
    """``clients`` cut into ⌈n / wave_clients⌉ consecutive waves of equal size (±1)."""
    return np.array_split(np.asarray(clients), max(1, -(-len(clients) // max(wave_clients, 1))))


def _wave_groups(c, partitions: list, wave_clients: int) -> dict:
    """``{(task, rnd): waves}`` of every unit whose clients differ: per task once when every client takes part
    (rnd = -1), else per round and the end of each task."""
    out = {}
    for t in range(len(partitions)):
        rounds = [-1] if c.clients_per_round in (0, c.num_clients) else range(c.rounds + 1)
        for r in rounds:
            out[t, r] = split_waves(round_clients(c, t, max(r, 0)), wave_clients)
    return out


def gram_blocks(c, parts: list, clients: np.ndarray, block: int, devices: int) -> int:
    """Packed Gram blocks per device of a wave: its clients' examples, ``gram_passes`` times, in client-pure blocks
    of ``block`` examples, dealt to ``devices``."""
    return -(-sum(-(-len(parts[k]) * c.gram_passes // block) for k in clients) // devices)


def make_wave(c, schedule: Schedule, task_parts: list, steps: np.ndarray, clients: np.ndarray, devices: int) -> Wave:
    """The lanes and the packed Gram layout of the wave ``clients`` of a task (``task_parts``: its clients'
    examples, ``steps``: their local steps), in the schedule's compiled shapes."""
    members = data_lib.pack_lanes(steps[clients], schedule.lanes)
    sizes = [data_lib.step_sizes(len(task_parts[k]), c.batch_size, c.epochs) for k in clients]
    lane_steps = [data_lib.lane_steps(sizes, [lane], c.batch_size, schedule.num_slots) for lane in members]
    gram = data_lib.packed_schedule([task_parts[k] for k in clients], c.gram_batch_size or c.batch_size,
                                    c.gram_passes, block=schedule.gram_block,
                                    blocks_per_batch=schedule.gram_blocks_per_batch, shards=devices,
                                    num_batches=schedule.gram_batches)
    return Wave(clients=np.asarray(clients), members=members, lane_steps=lane_steps, gram=gram)


def round_waves(setup: Setup, task: int, rnd: int) -> list[Wave]:
    """The waves of round ``rnd`` of task ``task`` (``rnd = config.rounds``: the end of the task)."""
    if setup.schedule.waves is not None:
        return setup.schedule.waves[task]
    c = setup.config
    devices = sharding.mesh_size(setup.programs.mesh)
    return [make_wave(c, setup.schedule, setup.partitions[task], setup.schedule.steps[task], w, devices)
            for w in split_waves(round_clients(c, task, rnd), setup.schedule.wave_clients)]


def plan_schedule(c, backbone, mesh, partitions, task_test, num_classes: int, train, test, *,
                  budget_bytes: int | None = None, gram_units: str = "") -> Schedule:
    """Waves (the memory plan's, or ``config.clients_per_wave``), lanes (``config.client_lanes`` or the memory
    plan's and :func:`memory.choose_lanes`' choice), the packing of every wave's clients into them, and the packed
    Gram / evaluation shapes, the largest over every unit of the run; logged before the run."""
    devices, platform = sharding.mesh_size(mesh), mesh.devices.flat[0].platform
    gram_bs = c.gram_batch_size or c.batch_size
    backbone_gram = "diag" if c.alpha_backbone == 0 else "full"
    # Full Grams: blocks of >= 64 rows keep the per-block Gram dots efficient (one example per block would form a
    # d×d matrix per example); diagonal Grams: one example per block, no padding at all.
    block = 1 if backbone_gram == "diag" else max(1, -(-64 // tokens_per_example(backbone, c.data.max_len)))
    per_round = c.clients_per_round or c.num_clients
    plan = memory.plan_memory(backbone, num_clients=per_round, num_classes=num_classes, rank=c.rank,
                              batch_size=c.batch_size, gram_batch_size=gram_bs, backbone_gram=backbone_gram,
                              head_gram="diag" if c.alpha_head == 0 else "full",
                              shared_bytes=ledger.nbytes((backbone.params, train, test)), mesh=mesh,
                              budget_bytes=budget_bytes, max_len=c.data.max_len, gram_block=block,
                              residuals=bool(c.merge_diagnostics), wave_clients=c.clients_per_wave,
                              gram_units=gram_units)
    log.info("%s", plan.table())
    steps = [data_lib.steps_per_client([len(p) for p in parts], c.batch_size, c.epochs) for parts in partitions]
    groups = _wave_groups(c, partitions, plan.wave_clients)
    lanes = memory.choose_lanes([steps[t][w] for (t, _), waves in groups.items() for w in waves], devices=devices,
                                platform=platform, max_lanes=plan.max_lanes,
                                requested=c.client_lanes)
    members = {key: [data_lib.pack_lanes(steps[key[0]][w], lanes) for w in waves] for key, waves in groups.items()}
    num_rows = 1 + max(len(lane) for m in members.values() for wave in m for lane in wave)
    num_slots = min(c.batch_size, num_rows - 1)  # clients per lane step: at most one per example
    num_steps = 1
    for (t, r), waves in groups.items():
        sizes = [data_lib.step_sizes(len(p), c.batch_size, c.epochs) for p in partitions[t]]
        for w, wave_lanes in zip(waves, members[t, r]):
            num_steps = max([num_steps] + [data_lib.lane_steps([sizes[k] for k in w], [lane], c.batch_size,
                                                               num_slots) for lane in wave_lanes])
    # Packed Gram passes: one shape for every wave of the run (one compiled program), batches of at most gram_bs
    # examples (fewer with full Grams of wide layers: memory.gram_blocks_per_batch), as few as the largest wave needs
    # and equally full.
    most = max(gram_blocks(c, partitions[t], w, block, devices) for (t, _), waves in groups.items() for w in waves)
    most_per_batch = memory.gram_blocks_per_batch(backbone, gram_bs, block, backbone_gram)
    gram_batches = max(1, -(-most // most_per_batch))
    align = batch_alignment(platform)
    schedule = Schedule(lanes=lanes, steps=steps, waves=None, num_steps=num_steps, num_slots=num_slots,
                        num_rows=num_rows, wave_clients=plan.wave_clients, gram_units=plan.gram_units,
                        gram_block=block, gram_batches=gram_batches,
                        gram_blocks_per_batch=aligned_blocks(max(1, -(-most // gram_batches)), block, most_per_batch,
                                                             align),
                        eval_packed=packed_layouts([task_test[:t + 1] for t in range(len(task_test))],
                                                   c.eval_batch_size, 1, 1, c.eval_batch_size, devices, align))
    if c.clients_per_round in (0, c.num_clients):
        schedule = dataclasses.replace(schedule, waves=[
            [make_wave(c, schedule, partitions[t], steps[t], w, devices) for w in groups[t, -1]]
            for t in range(len(partitions))])
    log.info("%s", schedule.describe(c.batch_size))
    return schedule


def batch_alignment(platform: str) -> int:
    """Examples per packed batch are best a multiple of this on ``platform``: 16 on TPU, whose bfloat16 tiles are
    (16, 128) — the paper run's evaluation with batches of 125 examples (24 625 token rows) compiles for a v5e in
    25–30 s, with 128 in 15–18 s (docs/TPU.md: the odd row count turns free reshapes into relayout copies) — 1
    elsewhere."""
    return 16 if platform == "tpu" else 1


def aligned_blocks(per_batch: int, block: int, most: int, align: int) -> int:
    """``per_batch`` blocks of ``block`` examples, rounded up to a multiple of ``align`` examples
    (:func:`batch_alignment`) when that stays within ``most`` blocks and adds at most an eighth; else ``per_batch``."""
    step = align // math.gcd(align, block)
    up = -(-per_batch // step) * step
    return up if up <= most and 8 * (up - per_batch) <= per_batch else per_batch


def packed_layouts(groups, stream_batch: int, passes: int, block: int, max_examples: int, devices: int,
                   align: int = 1) -> list:
    """One layout per group (list of index arrays), all with the largest group's shape (one compiled program):
    batches of at most ``max_examples`` examples, as few as the largest group needs and equally full (rounded up to a
    multiple of ``align`` examples where :func:`aligned_blocks` allows)."""
    blocks = max(-(-sum(-(-len(ix) * passes // block) for ix in g) // devices) for g in groups)
    most = max(1, max_examples // block)
    num_batches = max(1, -(-blocks // most))
    per_batch = aligned_blocks(max(1, -(-blocks // num_batches)), block, most, align)
    return [data_lib.packed_schedule(g, stream_batch, passes, block=block, blocks_per_batch=per_batch,
                                     shards=devices, num_batches=num_batches) for g in groups]


def partition_digest(setup: Setup) -> str:
    h = hashlib.sha256()
    for parts in setup.partitions:
        for p in parts:
            h.update(np.asarray(p, np.int64).tobytes() + b"|")
    return h.hexdigest()[:16]
