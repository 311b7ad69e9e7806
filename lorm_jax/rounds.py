"""The steps of a run: one communication round, the end of a task, the state they carry, and one hook point.

A task of ``config.rounds`` rounds: in each, every client trains the round's factor from the server state (lanes of
:mod:`lorm_jax.federated`), the clients' Grams are taken in one packed pass, and the method's compiled server merge
(:attr:`Setup.merges`) produces the new server LoRA and head. At the end of a task the merged task LoRA's Grams are
taken, the method merges all finished tasks into the evaluation model, and it is evaluated on every task seen.

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
import logging
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from lorm_jax import data as data_lib
from lorm_jax import federated, ledger, merging, metrics, rng, sharding, trees
from lorm_jax import lora as lora_lib
from lorm_jax.objective import init_head
from lorm_jax.plan import Setup

log = logging.getLogger("lorm_jax")

STAGES = ("train", "grams", "evaluate", "merge_round", "merge_tasks")


def instrument(setup: Setup, wrap: Callable[[str, Callable], Callable]) -> Setup:
    """``setup`` with every compiled stage ``fn`` of :data:`STAGES` replaced by ``wrap(name, fn)``: client training,
    the Gram pass and evaluation (:attr:`Setup.programs`) and the method's merges (:attr:`Setup.merges`)."""
    programs = dataclasses.replace(setup.programs, **{name: wrap(name, getattr(setup.programs, name))
                                                      for name in ("train", "grams", "evaluate")})
    merges = dataclasses.replace(setup.merges, round=wrap("merge_round", setup.merges.round),
                                 tasks=wrap("merge_tasks", setup.merges.tasks))
    return dataclasses.replace(setup, programs=programs, merges=merges)


# Where each looping program takes its loop's trip count among its arguments (federated.*_call).
LOOP_TRIPS = {"train": 6, "grams": 5, "evaluate": 4}


def _no_loop_trips(name: str, fn: Callable) -> Callable:
    """``fn`` with its loop's trip count set to 0 (the same placement): the program, compiled, does no work."""
    if name not in LOOP_TRIPS:
        return fn

    def call(*args, **kwargs):
        args = list(args)
        args[LOOP_TRIPS[name]] = args[LOOP_TRIPS[name]] * 0
        return fn(*args, **kwargs)
    return call


def warm_up(setup: Setup, state: dict, task: int = 0) -> None:
    """Compile the programs the run calls before its first unit, two at a time.

    A dry round of each trained factor and a dry end of task run the run's own code on ``setup`` with every loop
    emptied (trip count 0): each program is compiled (and cached by ``jax.jit``) exactly as the run will call it, at
    no cost but the compilation. XLA:CPU compiles a program on one thread, so local training and a task's end
    compile side by side, then the two factors' server merges. Single-process, single-device runs only: on a mesh,
    programs with collectives are not run from two threads at once (they compile at their first real call).
    """
    if sharding.mesh_size(setup.programs.mesh) != 1 or jax.process_count() != 1:
        return
    dry = instrument(setup, _no_loop_trips)
    first_round = {setup.method.train_factor(r): r for r in reversed(range(setup.config.rounds))}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        for phase in ([lambda: client_training(dry, state["lora"], state["head"], task, 0),
                       lambda: end_task(dry, state, task)],
                      [lambda r=r: run_round(dry, state, task, r) for r in first_round.values()]):
            for job in [pool.submit(_in_caller_context(fn)) for fn in phase]:
                job.result()


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


def _check_plan(setup: Setup, task: int) -> None:
    """The packed passes of ``setup.schedule`` were laid out for ``setup.partitions`` (same clients, same sizes)."""
    c = setup.config
    if setup.schedule.gram_packed[task]["real_examples"] != sum(map(len, setup.partitions[task])) * c.gram_passes or \
            list(setup.schedule.steps[task]) != list(data_lib.steps_per_client(
                [len(p) for p in setup.partitions[task]], c.batch_size, c.epochs)):
        raise ValueError("setup.partitions no longer match setup.schedule: build the setup with "
                         "plan.with_partitions(setup, partitions) to replan the packed passes")


def lane_layout(setup: Setup, task: int, rnd: int, members: list | None = None) -> dict:
    """The local-training schedule of (task, round): every client's own shuffled batches (drawn from its own generator,
    so they do not depend on how clients are grouped) laid out along the lanes ``members`` (default: the run's
    packing) — :func:`lorm_jax.data.batching.lane_schedule`."""
    _check_plan(setup, task)
    c, schedule = setup.config, setup.schedule
    batches = [data_lib.client_schedule([part], c.batch_size, c.epochs,
                                        rng.client_rng(c.seed, task, rnd, k, rng.TRAIN_STREAM))
               for k, part in enumerate(setup.partitions[task])]  # per client: (idx, mask), each [1, S, batch]
    steps = schedule.steps[task]
    members = schedule.members[task] if members is None else members
    num_rows = max(schedule.num_rows, max(len(m) for m in members) + 1)
    sizes = [data_lib.step_sizes(len(part), c.batch_size, c.epochs) for part in setup.partitions[task]]
    num_steps = max(schedule.num_steps, data_lib.lane_steps(sizes, members, c.batch_size, schedule.num_slots))
    return data_lib.lane_schedule([idx[0, :n] for (idx, _), n in zip(batches, steps)],
                                  [mask[0, :n] for (_, mask), n in zip(batches, steps)], members, num_steps,
                                  schedule.num_slots, num_rows)


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
    correct = federated.count_correct(setup.programs, params, head, setup.test, setup.schedule.eval_packed[task], seen,
                                      num_segments=setup.num_tasks)
    sizes = np.asarray([len(setup.task_test[t]) for t in range(task + 1)])
    return correct[:task + 1] / np.maximum(sizes, 1)


def client_training(setup: Setup, lora, head, task: int, rnd: int, members: list | None = None) -> tuple[dict, dict]:
    """Local training of every client of (task, round) from the server's ``lora`` / ``head``, in the run's lanes (or
    the lanes ``members``): the ``[K]`` outputs of :func:`federated.train_clients` and the schedule's utilisation."""
    c, method = setup.config, setup.method
    factor = method.train_factor(rnd)  # "A", "B", "AB" or "" (head only)
    lr_factor = {"A": c.lr_a, "B": c.lr_b, "AB": max(c.lr_a, c.lr_b)}.get(factor, -1.0)  # AB: methods.get checks
    lr_factor = c.lr if lr_factor < 0 else lr_factor
    lanes = lane_layout(setup, task, rnd, members)
    keys = rng.client_keys(c.seed, task, rnd, np.arange(c.num_clients), rng.TRAIN_STREAM)
    out = federated.train_clients(setup.programs, setup.backbone.params, setup.train, lora, head, lanes, keys,
                                  factor, lr_factor, task_rows(setup, task))
    used = lanes["mask"].any(-1)  # lane steps that ran some real example
    slots = len(lanes["idx"]) * lanes["num_steps"] * c.batch_size  # example slots the lanes' loops ran
    utilization = {"train_utilization": round(lanes["real_examples"] / slots, 5),
                   "batch_fill": round(lanes["real_examples"] / max(int(used.sum()) * c.batch_size, 1), 5)}
    return out, utilization


def run_round(setup: Setup, state: dict, task: int, rnd: int) -> tuple[dict, dict]:
    """One communication round: local training (clients in vmapped lanes), Gram statistics, server merge."""
    c, method = setup.config, setup.method
    factor = method.train_factor(rnd)
    out, utilization = client_training(setup, state["lora"], state["head"], task, rnd)
    rows = jnp.asarray(task_rows(setup, task))
    num_samples = np.asarray([len(p) for p in setup.partitions[task]], np.float32)
    finite, losses = sharding.gather((out["finite"], out["loss"]))
    finite = finite & np.isfinite(losses)
    gram_params, scale = gram_network(setup, state, task)
    grams, head_grams = _client_grams(setup, gram_params, out["lora"], task, rnd, scale, finite)
    grams, head_grams, finite = _drop_nonfinite_grams(grams, head_grams, finite)
    utilization["gram_utilization"] = metrics.gram_utilization(setup.schedule, task)
    weights = np.where(finite, num_samples, 0.0)
    lora, head = setup.merges.round(out["lora"], grams, out["head"], head_grams, jnp.asarray(weights), factor, rows,
                                    state["head"])
    if not np.any(weights > 0):  # nobody to merge: keep the server's model rather than a merge of nothing
        lora, head = state["lora"], state["head"]
    traffic = ledger.round_entry(method, rnd, factor, out["lora"], grams, out["head"], head_grams, weights, rows,
                                 state["lora"], state["head"])  # state before the merge: what the clients downloaded
    if c.merge_diagnostics and factor:
        traffic.update(metrics.merge_diagnostics(out["lora"], lora, grams, weights, c.merge_dtype))
    state = dict(state, lora=sharding.gather(lora), head=sharding.gather(head))
    line = {"task": task, "round": rnd, "factor": factor,
            "loss": float(np.sum(np.where(weights > 0, losses, 0.0) * weights) / max(np.sum(weights), 1.0)),
            "client_loss": [round(float(x), 5) for x in losses],
            "client_samples": num_samples.astype(int).tolist(),
            "excluded_clients": np.flatnonzero(~finite).tolist(), **utilization, **traffic,
            **metrics.gram_conditioning({**grams, "head": head_grams}, c.merge_dtype)}
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


def _drop_nonfinite_grams(grams: dict, head_grams, include: np.ndarray):
    """Also leave out clients whose Grams overflowed (inf/NaN); returns zeroed Grams and the updated ``include`` [K]."""
    leaves = jax.tree.leaves((grams, head_grams))
    ok = np.asarray(jnp.stack([jnp.all(jnp.isfinite(g.reshape(g.shape[0], -1)), axis=1) for g in leaves]).all(0))
    if ok.all():
        return grams, head_grams, include
    return (*trees.zero_clients((grams, head_grams), include & ok), include & ok)


def _client_grams(setup: Setup, gram_params, client_lora, task: int, rnd: int, scale: float, include: np.ndarray):
    """Per-client Grams of every LoRA layer and of the head (one packed pass over the task's clients); clients not in
    ``include`` contribute zeros."""
    _check_plan(setup, task)
    keys = rng.client_keys(setup.config.seed, task, rnd, np.arange(setup.config.num_clients), rng.GRAM_STREAM)
    grams = federated.client_grams(setup.programs, gram_params, setup.train, client_lora,
                                   setup.schedule.gram_packed[task], keys, scale)
    return trees.zero_clients(grams, include)


def end_task(setup: Setup, state: dict, task: int) -> tuple[dict, dict]:
    """Grams of the merged task LoRA, cross-task RegMean, and evaluation on all tasks seen so far."""
    c = setup.config
    gram_params, scale = gram_network(setup, state, task)
    server = trees.stack_clients(state["lora"], c.num_clients)
    grams, _ = _client_grams(setup, gram_params, server, task, c.rounds, scale, np.ones(c.num_clients, bool))
    state = dict(state)
    state["past_a"] = {p: x.copy() for p, x in state["past_a"].items()}
    state["past_b"] = {p: x.copy() for p, x in state["past_b"].items()}
    state["task_grams"] = {p: x.copy() for p, x in state["task_grams"].items()}
    for p, f in state["lora"].items():
        state["past_a"][p][task] = f["A"]
        state["past_b"][p][task] = f["B"]
        state["task_grams"][p][task] = np.asarray(merging.client_sum(grams[p]))
    deltas = setup.merges.tasks(state["past_b"], state["past_a"], state["task_grams"], task + 1)
    params = setup.backbone.add_delta(setup.backbone.params, deltas)
    accs = evaluate(setup, params, state["head"], task)
    acc = state["acc"].copy()
    acc[task, :task + 1] = accs
    state["acc"] = acc
    sizes = np.asarray([len(setup.task_test[t]) for t in range(task + 1)])
    line = {"task": task, "round": "end", "accuracy": float(np.sum(accs * sizes) / np.sum(sizes)),
            "task_accuracy": [round(float(a), 5) for a in accs],
            "gram_utilization": metrics.gram_utilization(setup.schedule, task),
            **ledger.task_entry(setup.method, setup.method.train_factor(c.rounds - 1), grams, state["lora"],
                                c.num_clients),
            **metrics.gram_conditioning(state["task_grams"], c.merge_dtype)}  # unfinished tasks' rows are 0
    if task + 1 < setup.num_tasks:  # the next task starts from B = 0 and a fresh A
        state["lora"] = sharding.gather(lora_lib.init(rng.lora_key(c.seed, task + 1), setup.backbone.lora_shapes,
                                                      c.rank))
    return state, line
