"""The steps of a run: one communication round, the end of a task, the state they carry, and one hook point.

A task of ``config.rounds`` rounds: in each, the round's clients (all, or ``config.clients_per_round`` drawn) train the
round's factor from the server state, wave by wave (lanes of :mod:`lorm_jax.federated`); each wave's Gram pass adds
the sums over its clients that the method's merge needs to the round's (the clients' outputs are dropped with the
wave), and the method's compiled server merge (:attr:`Setup.merges`) produces the new server LoRA and head from the
sums. At the end of a task the merged task LoRA's Gram sums are taken (from that unit's clients), the method merges all
finished tasks into the evaluation model, and it is evaluated on every task seen.

State (host numpy, every leaf an array, checkpointed after every unit)::

    unit        int64 []                     index of the next unit (task t: t·(rounds+1) + round, then end of task)
    lora, head  server LoRA {path: {"A", "B"}}, head {"w": [C, F], "b": [C]}
    past_a/b    {path: [T, r, d_in]}, {path: [T, d_out, r]}     finished tasks' factors
    task_grams  {path: [T, d_in(, d_in)]}                        finished tasks' Gram sums over clients
    acc         float64 [T, T]                                   accuracy matrix (NaN where not reached)

:func:`instrument` wraps the compiled stages (:data:`STAGES`) with a caller's function, e.g. to time them or to
inject faults in tests.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import logging
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from lorm_jax import data as data_lib
from lorm_jax import federated, ledger, metrics, plan, rng, sharding, trees
from lorm_jax import lora as lora_lib
from lorm_jax.backbones.common import add_block_deltas, by_kind, by_layer
from lorm_jax.methods.base import Statistics
from lorm_jax.objective import init_head
from lorm_jax.plan import Setup

log = logging.getLogger("lorm_jax")

STAGES = ("train", "sums", "evaluate", "merge_round", "merge_tasks")


def instrument(setup: Setup, wrap: Callable[[str, Callable], Callable]) -> Setup:
    """``setup`` with every compiled stage ``fn`` of :data:`STAGES` replaced by ``wrap(name, fn)``: client training,
    the Gram passes that sum what a merge needs and evaluation (:attr:`Setup.programs`) and the method's merges
    (:attr:`Setup.merges`)."""
    programs = dataclasses.replace(setup.programs, **{name: wrap(name, getattr(setup.programs, name))
                                                      for name in ("train", "sums", "evaluate")})
    merges = dataclasses.replace(setup.merges, round=wrap("merge_round", setup.merges.round),
                                 tasks=wrap("merge_tasks", setup.merges.tasks))
    return dataclasses.replace(setup, programs=programs, merges=merges)


# Where each looping program takes its loop's trip count among its arguments (federated.*_call).
LOOP_TRIPS = {"train": 6, "sums": 8, "evaluate": 4}


def _no_loop_trips(name: str, fn: Callable) -> Callable:
    """``fn`` with its loop's trip count set to 0 (the same placement): the program, compiled, does no work."""
    if name not in LOOP_TRIPS:
        return fn

    def call(*args, **kwargs):
        args = list(args)
        args[LOOP_TRIPS[name]] = args[LOOP_TRIPS[name]] * 0
        return fn(*args, **kwargs)
    return call


def _shapes_of_training(name: str, fn: Callable) -> Callable:
    """:func:`_no_loop_trips`, but local training is traced, not compiled, and gives outputs of its shapes (zeros;
    flags true: every client finished): a dry round that compiles its merges while another thread compiles the
    training program."""
    if name != "train":
        return _no_loop_trips(name, fn)

    def call(*args, **kwargs):
        shapes = jax.eval_shape(functools.partial(fn, **kwargs), *args)
        return jax.tree.map(lambda s: (np.ones if s.dtype == bool else np.zeros)(s.shape, s.dtype), shapes)
    return call


def warm_up(setup: Setup, state: dict, task: int = 0) -> Callable[[], None]:
    """Compile the programs of task ``task``'s units, those of its first round before returning, the others in the
    background while that round runs; returns ``finish()``, which waits for the background ones (re-raising a failure).

    A dry round of each trained factor, a dry end of task and the next task's Gram network run the run's own code on
    ``setup`` with every loop emptied (trip count 0): each program is compiled (and cached by ``jax.jit``) exactly as
    the run will call it, at no cost but the compilation. Two threads: local training on one, on the other a dry first
    round whose training is only traced (its Gram pass, sums and merge); then, in the background, the task end, the
    other factors' rounds and the next task's filler network. A program the run calls while a thread compiles it waits
    for that compilation (``jax.jit`` compiles a program once, also when two threads call it). Single-process,
    single-device runs only: on a mesh, programs with collectives are not run from two threads at once (they compile
    at their first real call).
    """
    if sharding.mesh_size(setup.programs.mesh) != 1 or jax.process_count() != 1:
        return lambda: None
    dry, untrained = instrument(setup, _no_loop_trips), instrument(setup, _shapes_of_training)
    first_round = {setup.method.train_factor(r): r for r in reversed(range(setup.config.rounds))}
    first, *later = sorted(first_round.values())
    wave = plan.round_waves(setup, task, 0)[0]
    pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="lorm-jax-warm-up")
    submit = lambda fn: pool.submit(_in_caller_context(fn))  # noqa: E731
    now = [submit(lambda: client_training(dry, state["lora"], state["head"], task, 0, wave)),
           submit(lambda: run_round(untrained, state, task, first, max_waves=1))]
    background = [submit(lambda: end_task(dry, state, task, max_waves=1))]
    background += [submit(lambda r=r: run_round(dry, state, task, r, max_waves=1)) for r in later]
    if task + 1 < setup.num_tasks:
        background.append(submit(lambda: gram_network(setup, state, task + 1)))
    pool.shutdown(wait=False)
    for job in now:
        job.result()

    def finish() -> None:
        for job in background:
            job.result()
    return finish


def _in_caller_context(fn: Callable) -> Callable:
    """``fn`` run in another thread under the caller's thread-local jax settings (``jax.enable_x64``, the default
    matmul precision), so that it traces the program the caller's thread will call."""
    x64, precision = jax.config.jax_enable_x64, jax.config.jax_default_matmul_precision

    def call():
        with jax.enable_x64(x64), jax.default_matmul_precision(precision):
            return fn()
    return call


def task_rows(setup: Setup, task: int) -> np.ndarray:
    """The head rows (classes) of task ``task``: bool [C]. Only they train and are merged in its rounds."""
    rows = np.arange(int(setup.offsets[-1]))
    return (rows >= setup.offsets[task]) & (rows < setup.offsets[task + 1])


def _check_plan(setup: Setup, task: int, wave: plan.Wave | None = None) -> None:
    """The schedule (step counts, and the packed Gram pass of ``wave``) was laid out for ``setup.partitions`` (same
    clients, same sizes)."""
    c = setup.config
    if list(setup.schedule.steps[task]) != list(data_lib.steps_per_client(
            [len(p) for p in setup.partitions[task]], c.batch_size, c.epochs)) or (
            wave is not None and wave.gram and wave.gram["real_examples"] != sum(
                len(setup.partitions[task][k]) for k in wave.clients) * c.gram_passes):
        raise ValueError("setup.partitions no longer match setup.schedule: build the setup with "
                         "plan.with_partitions(setup, partitions) to replan the waves and packed passes")


def lane_layout(setup: Setup, task: int, rnd: int, wave: plan.Wave | None = None, members: list | None = None) -> dict:
    """The local-training schedule of (task, round) for the clients of ``wave`` (default: the round's first): every
    client's own shuffled batches (drawn from its own generator, so they do not depend on how clients are grouped)
    laid out along the wave's lanes (or the lanes ``members``, wave-local) —
    :func:`lorm_jax.data.batching.lane_schedule`."""
    c, schedule = setup.config, setup.schedule
    wave = plan.round_waves(setup, task, rnd)[0] if wave is None else wave
    _check_plan(setup, task, wave)
    parts = [setup.partitions[task][k] for k in wave.clients]
    batches = [data_lib.client_schedule([part], c.batch_size, c.epochs,
                                        rng.client_rng(c.seed, task, rnd, int(k), rng.TRAIN_STREAM))
               for k, part in zip(wave.clients, parts)]  # per client: (idx, mask), each [1, S, batch]
    steps = schedule.steps[task][wave.clients]
    members = wave.members if members is None else members
    num_rows = max(schedule.num_rows, max(len(m) for m in members) + 1)
    sizes = [data_lib.step_sizes(len(part), c.batch_size, c.epochs) for part in parts]
    num_steps = max(schedule.num_steps, data_lib.lane_steps(sizes, members, c.batch_size, schedule.num_slots))
    return data_lib.lane_schedule([idx[0, :n] for (idx, _), n in zip(batches, steps)],
                                  [mask[0, :n] for (_, mask), n in zip(batches, steps)], members, num_steps,
                                  schedule.num_slots, num_rows)


def whole_round(setup: Setup, task: int, rnd: int, members: list | None = None) -> plan.Wave:
    """Every client of (task, round) as one wave (the run's own waves when it has one), in lanes ``members``."""
    waves = plan.round_waves(setup, task, rnd)
    if len(waves) == 1 and members is None:
        return waves[0]
    clients = np.concatenate([w.clients for w in waves])
    members = data_lib.pack_lanes(setup.schedule.steps[task][clients], setup.schedule.lanes) if members is None \
        else members
    return plan.Wave(clients=clients, members=members, lane_steps=[], gram={})


def initial_state(setup: Setup) -> dict:
    """The experiment state before any work: every leaf an array (orbax-friendly)."""
    c, bb = setup.config, setup.backbone
    T = setup.num_tasks
    lora = lora_lib.init(rng.lora_key(c.seed, 0), bb.lora_shapes, c.rank)
    head = init_head(rng.head_key(c.seed), int(setup.offsets[-1]), bb.feature_dim, c.head_init)
    gram_shape = (lambda d: (T, d)) if c.alpha_backbone == 0 else (lambda d: (T, d, d))
    return sharding.gather({
        "unit": np.array(0, np.int64),
        "lora": lora,
        "head": head,
        "past_a": {p: np.zeros((T, c.rank, d_in), np.float32) for p, (_, d_in) in bb.lora_shapes.items()},
        "past_b": {p: np.zeros((T, d_out, c.rank), np.float32) for p, (d_out, _) in bb.lora_shapes.items()},
        "task_grams": {p: np.zeros(gram_shape(d_in), np.float32) for p, (_, d_in) in bb.lora_shapes.items()},
        "acc": np.full((T, T), np.nan, np.float64),
    })


@jax.jit
def filler_params(params, past_b: dict, past_a: dict, mask: jax.Array, scale: jax.Array):
    """``W0 + scale · Σ_τ mask_τ B_τ A_τ`` per layer (``mask`` [T]: the finished tasks): the frozen weights of the
    filler network, as one program. past_b/past_a ``{path: [T, d_out, r]}`` / ``{path: [T, r, d_in]}``.

    The layers of one kind are stacked over blocks, as their kernels are, and their products taken in a loop (one
    product to compile per kind: 4 for a ViT, not 48; TPU v5e, ViT-B/16: 6.2–6.9 s, not 10.9). The scaled product
    leaves the loop before it is added, so XLA:CPU cannot fuse ``W0 + Δ·scale`` into a multiply-add that rounds
    differently from the product and the sum taken one after the other."""
    product = lambda b, a: scale * jnp.einsum("t,tor,trd->od", mask, b, a,  # noqa: E731
                                              precision=jax.lax.Precision.HIGHEST)
    deltas = jax.tree.map(lambda b, a: jax.lax.map(lambda ba: product(*ba), (b, a)),  # [depth, T, ...] -> [depth, o, d]
                          by_kind(past_b), by_kind(past_a))
    return add_block_deltas(params, deltas)


_add_block_deltas = jax.jit(add_block_deltas)  # one program, not a few eager ops per layer kind


def gram_network(setup: Setup, state: dict, task: int):
    """Frozen params and LoRA scale of the network the Grams are collected on.

    filler (reference, quirk Q2): ``W0 + (Σ_{τ<t} B_τ A_τ + B A)/(t+1)``; trained: ``W0 + B A``.
    """
    bb = setup.backbone
    if setup.config.gram_network == "trained" or task == 0:
        return bb.params, 1.0
    scale = 1.0 / (task + 1)
    mask = (np.arange(setup.num_tasks) < task).astype(np.float32)  # the tasks before this one
    return filler_params(bb.params, state["past_b"], state["past_a"], mask, np.float32(scale)), scale


def evaluate(setup: Setup, params, head, task: int) -> np.ndarray:
    """Accuracy on the test set of every task τ ≤ t (logits restricted to the classes seen so far): [t+1]. One packed
    pass over all seen tasks' test examples, counting correct predictions per task."""
    seen = data_lib.seen_class_mask(task, setup.offsets)
    correct = federated.count_correct(setup.programs, params, head, setup.test, setup.schedule.eval_packed[task], seen,
                                      num_segments=setup.num_tasks)
    sizes = np.asarray([len(setup.task_test[t]) for t in range(task + 1)])
    return correct[:task + 1] / np.maximum(sizes, 1)


def client_training(setup: Setup, lora, head, task: int, rnd: int, wave: plan.Wave | None = None,
                    members: list | None = None) -> tuple[dict, dict]:
    """Local training of the clients of ``wave`` (default: every client of (task, round), in the lanes ``members`` if
    given) from the server's ``lora`` / ``head``: the ``[C]`` outputs of :func:`federated.train_clients` in the
    wave's client order, and the schedule's utilisation."""
    c, method = setup.config, setup.method
    wave = whole_round(setup, task, rnd, members) if wave is None else wave
    factor = method.train_factor(rnd)  # "A", "B", "AB" or "" (head only)
    lr_factor = {"A": c.lr_a, "B": c.lr_b, "AB": max(c.lr_a, c.lr_b)}.get(factor, -1.0)  # AB: methods.get checks
    lr_factor = c.lr if lr_factor < 0 else lr_factor
    lanes = lane_layout(setup, task, rnd, wave)
    keys = rng.client_keys(c.seed, task, rnd, wave.clients, rng.TRAIN_STREAM)
    out = federated.train_clients(setup.programs, setup.backbone.params, setup.train, lora, head, lanes, keys,
                                  factor, lr_factor, task_rows(setup, task))
    used = lanes["mask"].any(-1)  # lane steps that ran some real example
    slots = len(lanes["idx"]) * lanes["num_steps"] * c.batch_size  # example slots the lanes' loops ran
    return out, {"real": lanes["real_examples"], "slots": slots, "used": int(used.sum()) * c.batch_size}


def _utilization(parts: list[dict], waves: list) -> dict:
    real = sum(p["real"] for p in parts)
    return {"train_utilization": round(real / sum(p["slots"] for p in parts), 5),
            "batch_fill": round(real / max(sum(p["used"] for p in parts), 1), 5),
            "gram_utilization": metrics.gram_utilization(waves)}


def last_rounds(setup: Setup, task: int, rnd: int, clients: np.ndarray) -> np.ndarray:
    """Per client of ``clients`` the last round of the task before ``rnd`` it took part in (-1: none)."""
    last = np.full(len(clients), -1)
    for r in range(rnd):
        last[np.isin(clients, plan.round_clients(setup.config, task, r))] = r
    return last


def wave_sums(setup: Setup, gram_params, scale: float, client_lora, client_heads, state: dict, wave: plan.Wave,
              task: int, rnd: int, include: np.ndarray, total: float, stats) -> tuple[dict, np.ndarray]:
    """The sums ``stats`` declares over the clients of ``wave`` (:func:`federated.client_sums`): ``(sums, ok [C])``,
    ``ok``: included and with finite Grams. In the blocks layout a client whose Grams are not finite has entered the
    sums already, so the wave is summed again without it."""
    c = setup.config
    _check_plan(setup, task, wave)
    keys = rng.client_keys(c.seed, task, rnd, wave.clients, rng.GRAM_STREAM)
    samples = np.asarray([len(setup.partitions[task][k]) for k in wave.clients], np.float32)
    blocks = setup.schedule.gram_units == "blocks"
    while True:
        sums, ok = federated.client_sums(setup.programs, gram_params, setup.train, client_lora, client_heads,
                                         state["lora"], state["head"], wave.gram, keys, scale, samples, include,
                                         total, stats, blocks)
        ok = np.asarray(sharding.gather(ok))
        if not blocks or np.array_equal(ok, include):
            return sums, ok
        include = ok


def run_round(setup: Setup, state: dict, task: int, rnd: int, max_waves: int | None = None) -> tuple[dict, dict]:
    """One communication round: the round's clients, wave by wave, train (vmapped lanes) and add their sums (one
    packed Gram pass per wave); the server merges from the sums. ``max_waves``: only the first ones (compiling)."""
    c, method = setup.config, setup.method
    factor = method.train_factor(rnd)
    rows = jnp.asarray(task_rows(setup, task))
    gram_params, scale = gram_network(setup, state, task)
    waves = plan.round_waves(setup, task, rnd)[:max_waves]
    clients = np.concatenate([w.clients for w in waves])
    num_samples = np.asarray([len(setup.partitions[task][k]) for k in clients], np.float32)
    stats = Statistics(method, factor, residuals=bool(c.merge_diagnostics and factor), dtype=c.merge_dtype)
    sums, losses, finite, parts = None, [], [], []
    for wave in waves:
        out, used = client_training(setup, state["lora"], state["head"], task, rnd, wave)
        ok, loss = sharding.gather((out["finite"], out["loss"]))
        s, ok = wave_sums(setup, gram_params, scale, out["lora"], out["head"], state, wave, task, rnd,
                          ok & np.isfinite(loss), float(num_samples.sum()), stats)
        sums = s if sums is None else setup.programs.add(sums, s)
        losses.append(loss)
        finite.append(ok)
        parts.append(used)
    losses, finite = np.concatenate(losses), np.concatenate(finite)
    weights = np.where(finite, num_samples, 0.0)
    lora, head = setup.merges.round(sums, factor, rows, state["lora"], state["head"])  # lora: block layout
    if not np.any(weights > 0):  # nobody to merge: keep the server's model rather than a merge of nothing
        lora, head = by_kind(state["lora"]), state["head"]
    grams = {k: x["gram"] for k, x in sums["layers"].items()}  # block layout, {layer kind: [depth, ...]}
    traffic = ledger.round_entry(method, rnd, factor, state["lora"], state["head"], grams,
                                 sums["clients"]["head_gram"], rows, last_rounds(setup, task, rnd, clients))
    if stats.residuals:
        traffic.update(metrics.merge_diagnostics(sums, lora, c.merge_dtype))
    state = dict(state, lora=by_layer(sharding.gather(lora)), head=sharding.gather(head))
    line = {"task": task, "round": rnd, "factor": factor,
            "loss": float(np.sum(np.where(weights > 0, losses, 0.0) * weights) / max(np.sum(weights), 1.0)),
            "client_loss": [round(float(x), 5) for x in losses],
            "client_samples": num_samples.astype(int).tolist(),
            "excluded_clients": clients[~finite].tolist(), **_utilization(parts, waves), **traffic,
            **metrics.gram_conditioning({**grams, "head": sums["clients"]["head_gram"][None]}, c.merge_dtype,
                                        blocks=True)}
    if c.clients_per_round:
        line["clients"] = clients.tolist()
    if not finite.all():
        log.warning("task %d round %d: clients %s produced a non-finite loss, parameters or Grams and were left out "
                    "of the merge%s", task, rnd, line["excluded_clients"],
                    "" if finite.any() else "; no client was left, so the server model is kept unchanged")
    if c.eval_every_round:
        params = setup.backbone.add_delta(gram_params, lora_lib.delta(
            {p: {"A": f["A"], "B": f["B"] * scale} for p, f in state["lora"].items()}))
        accs = evaluate(setup, params, state["head"], task)
        sizes = np.asarray([len(setup.task_test[t]) for t in range(task + 1)])
        line["accuracy"] = float(np.sum(accs * sizes) / np.sum(sizes))
        line["task_accuracy"] = [round(float(a), 5) for a in accs]
    return state, line


def end_task(setup: Setup, state: dict, task: int, max_waves: int | None = None) -> tuple[dict, dict]:
    """Gram sums of the merged task LoRA (over the unit's clients, wave by wave), cross-task RegMean, and evaluation
    on all tasks seen so far."""
    c = setup.config
    gram_params, scale = gram_network(setup, state, task)
    waves = plan.round_waves(setup, task, c.rounds)[:max_waves]
    clients = np.concatenate([w.clients for w in waves])
    total = float(sum(len(setup.partitions[task][k]) for k in clients))
    sums = None
    for wave in waves:
        n = len(wave.clients)
        s, _ = wave_sums(setup, gram_params, scale, trees.stack_clients(by_kind(state["lora"]), n),
                         trees.stack_clients(state["head"], n), state, wave, task, c.rounds, np.ones(n, bool), total,
                         Statistics())
        sums = s if sums is None else setup.programs.add(sums, s)
    grams = {k: x["gram"] for k, x in sums["layers"].items()}  # block layout, {layer kind: [depth, ...]}
    task_grams = by_layer(sharding.gather(grams))
    state = dict(state)
    state["past_a"] = {p: x.copy() for p, x in state["past_a"].items()}
    state["past_b"] = {p: x.copy() for p, x in state["past_b"].items()}
    state["task_grams"] = {p: x.copy() for p, x in state["task_grams"].items()}
    for p, f in state["lora"].items():
        state["past_a"][p][task] = f["A"]
        state["past_b"][p][task] = f["B"]
        state["task_grams"][p][task] = task_grams[p]
    deltas = setup.merges.tasks(state["past_b"], state["past_a"], state["task_grams"], task + 1)  # block layout
    params = _add_block_deltas(setup.backbone.params, deltas)
    accs = evaluate(setup, params, state["head"], task)
    acc = state["acc"].copy()
    acc[task, :task + 1] = accs
    state["acc"] = acc
    sizes = np.asarray([len(setup.task_test[t]) for t in range(task + 1)])
    line = {"task": task, "round": "end", "accuracy": float(np.sum(accs * sizes) / np.sum(sizes)),
            "task_accuracy": [round(float(a), 5) for a in accs],
            "gram_utilization": metrics.gram_utilization(waves),
            **ledger.task_entry(setup.method, c.rounds, grams, state["lora"],
                                last_rounds(setup, task, c.rounds, clients)),
            # unfinished tasks' slots: 0
            **metrics.gram_conditioning(state["task_grams"], c.merge_dtype, stacked=True, by_kind=True)}
    if c.clients_per_round:
        line["clients"] = clients.tolist()
    if task + 1 < setup.num_tasks:  # the next task starts from B = 0 and a fresh A
        state["lora"] = sharding.gather(lora_lib.init(rng.lora_key(c.seed, task + 1), setup.backbone.lora_shapes,
                                                      c.rank))
    return state, line
