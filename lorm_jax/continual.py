"""The federated class-incremental experiment, driven unit by unit: restore → step → log → checkpoint → results.

Work is cut into *units*: task t has ``rounds`` round units (:func:`lorm_jax.rounds.run_round`: local training of all
clients, Gram statistics, server merge) and one end-of-task unit (:func:`lorm_jax.rounds.end_task`: cross-task merge and
evaluation on every task seen). The state after every unit is checkpointed, so a crash loses at most the unit in
flight, and every random draw is a pure function of (seed, task, round, client, step) (:mod:`lorm_jax.rng`), so a
resumed run is bit-identical to an uninterrupted one.

    results = continual.run(config, "runs/mine")     # or resume it, or return its finished results
    results["accuracy_matrix"], results["final_average_accuracy"]

Evaluation after task t: micro accuracy (Σ correct / Σ samples, as the reference reports it) of the cross-task merged
model on the test sets of tasks 0..t, with logits restricted to the classes seen so far.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import signal
import threading
import time
from typing import Callable

import jax
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from lorm_jax import checkpointing, distributed, ledger, metrics, plotting, rounds
from lorm_jax import config as config_lib
from lorm_jax import data as data_lib
from lorm_jax import events as events_lib
from lorm_jax import workdir as workdir_lib

# Moved in the restructure; importable from here as before.
from lorm_jax.metrics import continual_metrics as summarize  # noqa: F401
from lorm_jax.plan import Schedule, Setup, build_setup, partition_digest, with_partitions  # noqa: F401
from lorm_jax.rng import GRAM_STREAM, TRAIN_STREAM, client_keys  # noqa: F401
from lorm_jax.rounds import client_training, end_task, evaluate, initial_state, lane_layout, run_round  # noqa: F401

log = logging.getLogger("lorm_jax")


@dataclasses.dataclass(frozen=True)
class Hooks:
    """Extension points of :func:`run` (profiling, custom logging, fault injection in tests).

    Attributes:
      instrument: ``wrap(stage, fn) -> fn`` applied to every compiled stage (:func:`lorm_jax.rounds.instrument`).
      after_unit: ``after_unit(unit, line)`` once unit ``unit`` is logged (``line``: its metrics) and its checkpoint
        is being written (committed by the time :func:`run` returns or raises); an exception raised there stops the
        run with every finished unit saved.
    """
    instrument: Callable[[str, Callable], Callable] | None = None
    after_unit: Callable[[int, dict], None] | None = None


class Interrupted(SystemExit):
    """:func:`run` stopped on SIGINT / SIGTERM after checkpointing the unit in flight.

    ``code`` is the conventional exit status ``128 + signal number``: 130 for SIGINT, 143 for SIGTERM.
    """


def run(config: ml_collections.ConfigDict, workdir: str, *, progress: bool = True, hooks: Hooks = Hooks()) -> dict:
    """Run (or resume, or return the finished result of) the experiment in ``workdir``; returns ``results.json``.

    Fault tolerance: the metrics line of a unit is appended before its checkpoint is written and lines the checkpoint
    does not cover are dropped on resume, so after any crash (SIGKILL included) the rerun recomputes at most the unit
    in flight and ends bit-identical to an uninterrupted run. A first SIGINT / SIGTERM lets the unit in flight finish
    and be checkpointed, then raises :class:`Interrupted` (exit status 130 / 143); a second one stops at once.
    """
    config_lib.validate(config)
    workdir_lib.check_config(workdir, config, write=False)
    finished = workdir_lib.read_results(workdir)
    if finished is not None:
        return finished
    start = time.time()
    setup = build_setup(config)  # the rest of the validation: before anything is written to the workdir
    workdir_lib.check_config(workdir, config)
    c = setup.config
    units_per_task = c.rounds + 1
    total = setup.num_tasks * units_per_task
    with contextlib.ExitStack() as stack:
        # Several processes save synchronously: orbax's background commit waits on a cross-process barrier, where a lost
        # peer would end the process from jax's runtime instead of exit_on_lost_peer's one line (docs/RELIABILITY.md).
        checkpoints = stack.enter_context(checkpointing.RunCheckpoints(workdir, units_per_task,
                                                                       asynchronous=jax.process_count() == 1))
        state = initial_state(setup)
        restored = checkpoints.restore(state)
        if restored is not None:
            state = restored
            log.info("resumed %s at unit %d/%d", workdir, int(state["unit"]), total)
        workdir_lib.truncate_metrics(workdir, int(state["unit"]))
        workdir_lib.write_json(workdir_lib.path(workdir, "partition.json"), _partition_info(setup))
        compiled = (rounds.warm_up(setup, state, int(state["unit"]) // units_per_task) if int(state["unit"]) < total
                    else lambda: None)
        events = (stack.enter_context(events_lib.EventWriter(workdir))
                  if c.tensorboard and distributed.is_primary() else None)
        state = _run_units(setup, state, workdir, checkpoints, events, progress, hooks)
        compiled()
    return _finish(setup, state, workdir, time.time() - start)


def _run_units(setup: Setup, state: dict, workdir, checkpoints, events, progress: bool, hooks: Hooks) -> dict:
    """Run the units from ``state["unit"]`` to the end: step, log (metrics.jsonl, TensorBoard), checkpoint."""
    c = setup.config
    units_per_task = c.rounds + 1
    total = setup.num_tasks * units_per_task
    if hooks.instrument is not None:
        setup = rounds.instrument(setup, hooks.instrument)
    bar = tqdm(total=total, initial=int(state["unit"]), disable=not progress or not distributed.is_primary(),
               desc="lorm-jax", unit="unit")
    with _deferred_signals() as received:
        while int(state["unit"]) < total:
            unit = int(state["unit"])
            task, rnd = divmod(unit, units_per_task)
            t0 = time.time()
            if rnd < c.rounds:
                state, line = run_round(setup, state, task, rnd)
            else:
                state, line = end_task(setup, state, task)
            state["unit"] = np.array(unit + 1, np.int64)
            line = {"unit": unit, **line, "seconds": round(time.time() - t0, 3)}
            workdir_lib.append_metrics(workdir, [line])  # first: a line without its checkpoint is dropped on resume
            checkpoints.save(unit + 1, state)
            if events is not None:
                events.write([line])
            bar.set_postfix({k: (f"{v:.3f}" if isinstance(v, float) else v) for k, v in line.items()
                             if k in ("task", "round", "loss", "accuracy")})
            bar.update(1)
            where = "end" if rnd == c.rounds else f"round {rnd}"
            log.info("task %d %s: %s", task, where if rnd == c.rounds else f"{where} ({line.get('factor')})",
                     ", ".join(f"{k}={v:.4f}" for k, v in line.items() if k in ("loss", "accuracy")))
            if received and unit + 1 < total:
                bar.close()
                name = signal.Signals(received[0]).name
                log.warning("%s: stopped with %d of %d units done (the last: task %d %s), all checkpointed in %s. "
                            "Run the same command again to resume.", name, unit + 1, total, task, where, workdir)
                raise Interrupted(128 + received[0])
            if hooks.after_unit is not None:
                hooks.after_unit(unit, line)
    bar.close()
    return state


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


def _partition_info(setup: Setup) -> dict:
    """``partition.json``: the partitions' digest, the seeds, and every client's label counts per task."""
    return {"partition_digest": partition_digest(setup), **_seeds(setup.config),
            "client_label_counts": [data_lib.client_label_counts(np.asarray(setup.dataset.y_train), parts,
                                                                  int(setup.offsets[-1])).tolist()
                                    for parts in setup.partitions]}


def _seeds(c) -> dict:
    """``seed`` (training randomness) and ``data_seed`` (subsample and partitions) as a run used them."""
    return {"seed": int(c.seed), "data_seed": config_lib.data_seed(c)}


def _data_split(name: str):
    """Seed and checksums of our own train/test split of a TFDS dataset (None for datasets with a fixed split)."""
    if not name.startswith("tfds/"):
        return None
    from lorm_jax.data import tfds_data
    return tfds_data.split_info(name)


def _finish(setup: Setup, state: dict, workdir: str, seconds: float) -> dict:
    """Write ``results.json`` (accuracy metrics, communication, utilisation, config), plots and ``run_info.json``."""
    acc = np.asarray(state["acc"])
    sizes = np.asarray([len(t) for t in setup.task_test])
    lines = workdir_lib.read_metrics(workdir)
    results = {"method": setup.method.name, **_seeds(setup.config), **metrics.continual_metrics(acc, sizes),
               "accuracy_matrix": [[None if np.isnan(v) else float(v) for v in row] for row in acc],
               "num_tasks": setup.num_tasks, "classes_per_task": np.diff(setup.offsets).tolist(),
               "test_sizes": sizes.tolist(), "dataset": setup.dataset.name, "backbone": setup.backbone.name,
               "backbone_source": setup.backbone.source, "data_split": _data_split(setup.dataset.name),
               "communication": ledger.totals(lines),
               "utilization": metrics.utilization_summary(setup.schedule, lines),
               "config": workdir_lib.config_json(setup.config)}
    if distributed.is_primary():
        plotting.plot_results(results, workdir)
    workdir_lib.write_json(workdir_lib.path(workdir, "run_info.json"),  # kept apart: results.json is bit-reproducible
                           {"wall_seconds_last_session": round(seconds, 2), "devices": [str(d) for d in jax.devices()]})
    # last: its presence means "finished"
    workdir_lib.write_json(workdir_lib.path(workdir, workdir_lib.RESULTS), results, indent=2)
    return results
