"""Bytes a run's checkpoints write per round and per task end, for a config's state shapes (issue #25).

    python experiments/checkpoint_bytes.py configs/fmnist_dinov2.py [--old PATH_TO_OLD_checkpointing.py]

Builds the run's state (``rounds.initial_state``) from the backbone's shapes (no weights, no data), fills every float
leaf with random numbers (real Gram sums and factors do not compress), saves it as unit after unit would and sums the
files each save added. ``--old``: the same with another version of ``lorm_jax/checkpointing.py`` (e.g. ``git show
9a96ce3:lorm_jax/checkpointing.py > /tmp/old.py``), whose ``save(workdir, step, state)`` wrote the whole state.
"""
import argparse
import importlib.util
import os
import tempfile
import time
import types

import numpy as np

from lorm_jax import backbones, checkpointing, rounds
from lorm_jax import config as config_lib


def state_of(config) -> dict:
    """The initial state of ``config``'s run, every float leaf random."""
    bb = backbones.abstract(config.backbone.name, **config.backbone.options.to_dict())
    num_tasks = 10 // config.data.classes_per_task  # Fashion-MNIST: 10 classes
    setup = types.SimpleNamespace(config=config, backbone=bb, num_tasks=num_tasks,
                                  offsets=np.arange(0, 11, config.data.classes_per_task))
    rng = np.random.default_rng(0)
    state = rounds.initial_state(setup)
    return {k: ({p: rng.standard_normal(np.shape(x)).astype(np.asarray(x).dtype) for p, x in v.items()}
                if isinstance(v, dict) and k in ("past_a", "past_b", "task_grams") else v) for k, v in state.items()}


def folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("config")
    p.add_argument("--old", help="another checkpointing.py to compare with")
    args = p.parse_args()
    config = config_lib.load(args.config)
    state = state_of(config)
    upt = config.rounds + 1
    leaves = [np.asarray(x) for v in state.values() for x in (v.values() if isinstance(v, dict) else [v])]
    print(f"{args.config}: alpha_backbone {config.alpha_backbone}, {len(state['task_grams'])} LoRA layers, task_grams "
          f"{sum(x.nbytes for x in state['task_grams'].values()) / 1e6:.1f} MB, whole state "
          f"{sum(x.nbytes for x in leaves) / 1e6:.1f} MB (in memory)")
    steps = list(range(1, upt + 1))  # task 0: its rounds, then its end
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        with checkpointing.RunCheckpoints(tmp, upt) as ckpt:
            for step in steps:
                t0 = time.time()
                ckpt.save(step, state)
                returned = time.time() - t0
                ckpt.state.wait_until_finished()
                written = folder_bytes(os.path.join(tmp, checkpointing.STATE_DIR, str(step)))
                if step % upt == 0:
                    written += folder_bytes(os.path.join(tmp, checkpointing.TASK_DIR, str(step // upt - 1)))
                rows.append(("new", step, written, returned, time.time() - t0))
    if args.old:
        spec = importlib.util.spec_from_file_location("old_checkpointing", args.old)
        old = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(old)
        with tempfile.TemporaryDirectory() as tmp:
            for step in steps:
                t0 = time.time()
                old.save(tmp, step, state)
                rows.append(("old", step, folder_bytes(os.path.join(tmp, "checkpoints", str(step))), time.time() - t0,
                             time.time() - t0))
    print("| version | unit saved | kind | MB written | s until save returns | s until written |")
    print("|---|---|---|---:|---:|---:|")
    for version, step, written, returned, done in rows:
        kind = "end of task" if step % upt == 0 else "round"
        print(f"| {version} | {step - 1} | {kind} | {written / 1e6:.2f} | {returned:.2f} | {done:.2f} |")


if __name__ == "__main__":
    main()
