"""Client throughput on ragged (Dirichlet) clients: padded vmap vs lanes vs a sequential loop.

One round of local training for K clients whose sizes come from the project's Dirichlet partition (β = 0.5 and 0.1)
of a task of N samples over 10 classes, batch 16, one local epoch, each client from the same server LoRA (rank 4 on
every block linear layer) + head. Three ways to run the same per-client work (every mode runs the engine's own
lane program, :func:`lorm_jax.federated.train_clients`, so only the layout differs):

* **padded vmap** (the engine before lanes): K lanes of one client each, all running the step count of the largest
  client *of the run* (as that engine did: here the largest over ``RUN_TASKS`` = 5 draws of the task, seeds 0-4;
  vmapped, a finished client idles); also padded to the task's own largest client, a kinder baseline;
* **lanes**: clients bin-packed longest-first into P lanes run back to back (:func:`lorm_jax.data.batching.pack_lanes`),
  P chosen as the engine does (:func:`lorm_jax.memory.choose_lanes`: one per device on a CPU, ⌈ΣS/S_max⌉ on an
  accelerator); on an accelerator also P = 1 for reference;
* **sequential**: a Python loop over the clients, one single-client call each (the reference's loop).

For each: median wall time of ``repeats`` calls after a warm-up call (compile time = first call − median), real
client-steps per second (ΣS_k / wall), and the utilisation the engine reports (real client-steps / lane-steps run).

``--scale``: the whole engine at many clients instead (issue #26): two rounds (B, A) of the tiny config with K =
100 / 1,000 / 10,000 clients of ~4 examples each, diagonal and full (α = 0.5) Grams, each case in a fresh process:
round wall time, client-steps/s (real local steps of both rounds / their wall time), the first pass's extra time
(compilation, "compile (s)"), the server merge's time, the Gram passes' time and the process's peak RSS; with the
round's sums streamed per block of examples (the engine since #26) and, side by side, per-client Grams of the whole
round in one wave (as the engine before #26 held them).

Usage::

    lorm-jax bench-clients [--quick] [--json OUT] [--markdown OUT] [--backbones tiny_vit,dinov2_s14_56px]
    lorm-jax bench-clients --scale [--clients 100,1000,10000] [--json OUT] [--markdown OUT]

``--quick``: tiny ViT only, K = 10, one timed call. Importable: :func:`run_benchmark`, :func:`run_scale`,
:func:`main`.
"""
from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from lorm_jax import backbones, federated, memory, objective, plan, rounds, sharding
from lorm_jax import config as config_lib
from lorm_jax import lora as lora_lib
from lorm_jax.bench import common
from lorm_jax.data import batching, partition

TINY = {"image_size": 16, "patch": 4, "width": 32, "depth": 2, "heads": 2, "mlp": 64, "seed": 0}
BACKBONES = {"tiny_vit": ("tiny_vit", TINY), "dinov2_s14_56px": ("dinov2_s14", {"image_size": 56})}
# (K, samples per task). DINOv2 only at K = 10 on a CPU (a padded K = 100 round would take many minutes there), with
# 1000 samples, a fifth of a paper task (CIFAR-100: 5000 per task), so that the clients' step counts spread as there
# (at 200 samples most clients take 1-2 steps and padding hardly shows).
CASES = {"tiny_vit": [(10, 200), (100, 2000)], "dinov2_s14_56px": [(10, 1000)]}
NUM_CLASSES, RANK, BATCH = 10, 4, 16
RUN_TASKS = 5  # the "run" whose largest client the engine before lanes padded to: 5 draws (seeds 0..4) of the task
PADDED_RUN = "padded vmap (run's largest: engine before)"


def _first_and_median(fn, repeats: int) -> tuple[float, float]:
    """(first call incl. compilation, median of ``repeats`` further calls), seconds."""
    first = common.timed(fn).seconds
    return first, common.median(common.repeat(fn, repeats))


def client_sizes(num_clients: int, samples: int, beta: float, seed: int = 0) -> list[np.ndarray]:
    """Each client's sample indices: the project's Dirichlet(β) label-skew partition of ``samples`` examples of 10
    classes (min 1 per client)."""
    labels = np.repeat(np.arange(NUM_CLASSES), samples // NUM_CLASSES)
    return partition.dirichlet_partition(labels, num_clients, beta, np.random.default_rng(seed), min_samples=1)


def bench_backbone(label: str, name: str, options: dict, betas: list[float], cases: list[tuple[int, int]], *,
                   repeats: int) -> list[dict]:
    bb = backbones.get(name, **options)
    mesh = sharding.make_mesh(1)
    device = mesh.devices.flat[0]
    size = bb.image_size
    rng = np.random.default_rng(0)
    max_samples = max(n for _, n in cases)
    data = {"x": rng.normal(size=(max_samples, size, size, 3)).astype(np.float32),
            "y": np.repeat(np.arange(NUM_CLASSES), max_samples // NUM_CLASSES).astype(np.int32)}

    def prepare(d, idx, keys, train):  # inputs already at the backbone's size: the benchmark is the client step
        return d["x"][idx], d["y"][idx]

    programs = federated.build_client_programs(bb, prepare, lr_head=1e-2, weight_decay=0.0, backbone_gram="diag",
                                               alpha_backbone=0.0, head_gram="diag", alpha_head=0.0, mesh=mesh)
    lora = lora_lib.init(jax.random.PRNGKey(1), bb.lora_shapes, RANK)
    head = objective.init_head(jax.random.PRNGKey(2), NUM_CLASSES, bb.feature_dim)
    data, lora, head = sharding.replicate((data, lora, head), mesh)
    class_mask = np.ones(NUM_CLASSES, bool)
    rows = []
    for num_clients, samples in cases:
        for beta in betas:
            parts = client_sizes(num_clients, samples, beta)
            own = [batching.client_schedule([p], BATCH, 1, np.random.default_rng(k)) for k, p in enumerate(parts)]
            steps = batching.steps_per_client([len(p) for p in parts], BATCH, 1)
            own_idx = [o[0][0, :n] for o, n in zip(own, steps)]
            own_mask = [o[1][0, :n] for o, n in zip(own, steps)]
            keys = jax.vmap(jax.random.PRNGKey)(jnp.arange(num_clients))
            s_max, s_sum = int(steps.max()), int(steps.sum())
            # the engine before lanes padded every round to the largest client of the whole run: RUN_TASKS draws
            s_run = max(int(batching.steps_per_client([len(p) for p in client_sizes(num_clients, samples, beta, t)],
                                                      BATCH, 1).max()) for t in range(RUN_TASKS))

            def lanes_of(members, num_steps, idx=own_idx, mask=own_mask):
                rows = 1 + max(len(m) for m in members)
                return batching.lane_schedule(idx, mask, members, num_steps=num_steps, num_slots=min(BATCH, rows - 1),
                                              num_rows=rows)

            def call(lay, keys=keys):
                return federated.train_clients(programs, bb.params, data, lora, head, lay, keys, "B", 1e-3,
                                               class_mask)

            auto = memory.choose_lanes([steps], devices=1, platform=device.platform, max_lanes=num_clients)
            # (lane_schedule's loop length is the longest lane; the engine before ran every client s_run steps)
            layouts = {PADDED_RUN: dict(lanes_of([[k] for k in range(num_clients)], s_run), num_steps=s_run),
                       "padded vmap (task's largest)": lanes_of([[k] for k in range(num_clients)], s_max),
                       f"lanes (P = {auto}, auto)": lanes_of(batching.pack_lanes(steps, auto), s_sum)}
            if device.platform != "cpu" and auto != 1:
                layouts["lanes (P = 1)"] = lanes_of(batching.pack_lanes(steps, 1), s_sum)
            for mode, lay in layouts.items():
                first, wall = _first_and_median(lambda lay=lay: call(lay), repeats)
                rows.append(_row(label, num_clients, beta, steps, mode, lay["real_examples"],
                                 len(lay["idx"]) * lay["num_steps"], first, wall))
                print(_format(rows[-1]), flush=True)
            singles = [lanes_of([[0]], s_max, [own_idx[k]], [own_mask[k]]) for k in range(num_clients)]
            first, wall = _first_and_median(lambda: [call(singles[k], keys[k:k + 1]) for k in range(num_clients)],
                                            repeats)
            real = sum(s["real_examples"] for s in singles)
            rows.append(_row(label, num_clients, beta, steps, "sequential loop", real, s_sum, first, wall))
            print(_format(rows[-1]), flush=True)
            base = next(r for r in rows[-len(layouts) - 1:] if r["mode"] == PADDED_RUN)
            for r in rows[-len(layouts) - 1:]:
                r["speedup_vs_padded"] = base["wall_s"] / r["wall_s"]
    return rows


def _row(label, k, beta, steps, mode, real_examples, run, first, wall) -> dict:
    """``run`` lane steps of ``BATCH`` example slots each; ``train_utilization``: the real examples among them."""
    return {"backbone": label, "clients": k, "beta": beta, "sum_steps": int(steps.sum()), "max_steps": int(steps.max()),
            "mode": mode, "lane_steps_run": int(run), "train_utilization": real_examples / (run * BATCH),
            "wall_s": wall,
            "compile_s": max(first - wall, 0.0), "client_steps_per_s": int(steps.sum()) / wall,
            "peak_rss_mb": common.peak_rss_mb()}


def _format(r: dict) -> str:
    speed = f"{r['speedup_vs_padded']:.2f}x" if "speedup_vs_padded" in r else ""
    return (f"| {r['backbone']} | {r['clients']} | {r['beta']} | {r['sum_steps']} / {r['max_steps']} | {r['mode']} | "
            f"{r['lane_steps_run']} | {r['train_utilization']:.2f} | {r['wall_s']:.3f} | {r['compile_s']:.1f} | "
            f"{r['client_steps_per_s']:.1f} | {speed} |")


HEADER = ("| backbone | K | β | ΣS / S_max | mode | lane-steps run | train utilisation | wall (s) | compile (s) | "
          "client-steps/s | vs padded |\n|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|")


def run_benchmark(*, quick: bool = False, backbone_names: list[str] | None = None,
                  betas: list[float] | None = None) -> dict:
    rows, skipped = [], {}
    print(HEADER, flush=True)
    for label in backbone_names or (["tiny_vit"] if quick else list(BACKBONES)):
        name, options = BACKBONES[label]
        cases = CASES[label][:1] if quick else CASES[label]
        try:
            rows += bench_backbone(label, name, options, betas or [0.5, 0.1], cases, repeats=1 if quick else 2)
        except backbones.MissingAssetError as e:
            skipped[label] = str(e)
            print(f"skipped {label}: {e}", flush=True)
    table = HEADER + "\n" + "\n".join(_format(r) for r in rows)
    return {"date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
            "load_average_at_end": os.getloadavg(), "machine": common.machine_info(), "quick": quick, "rows": rows,
            "skipped": skipped, "markdown": table}


# ----------------------------------------------------------------------------------------------------------------------
# Many clients: the whole engine (--scale)

SCALE_CLIENTS = (100, 1000, 10_000)
SCALE_EXAMPLES = 4  # examples per client, on average
ENGINES = {"blocks": "streamed sums (per block)", "clients": "per-client Grams, one wave (before #26)"}


def scale_config(num_clients: int, gram: str):
    """``configs/tiny.py`` as one task of 2 classes over ``num_clients`` clients of ~:data:`SCALE_EXAMPLES` examples
    (Dirichlet β = 0.5, empty clients allowed), 2 rounds (B, A) of 1 local epoch; ``gram``: "diag" or "full"
    (α = 0.5)."""
    c = config_lib.load("tiny")
    return config_lib.override(c, **{
        "num_clients": num_clients, "data.options.num_classes": 2, "data.options.n_test": 50,
        "data.options.n_train": num_clients * SCALE_EXAMPLES // 2, "data.classes_per_task": 2, "data.min_samples": 0,
        "rounds": 2, "epochs": 1, "eval_every_round": False, "alpha_backbone": 0.5 if gram == "full" else 0.0})


def scale_case(num_clients: int, gram: str, units: str) -> dict:
    """Both rounds of :func:`scale_config` twice in this process (the first pass compiles), every compiled stage
    timed to completion (:func:`lorm_jax.rounds.instrument`); ``units``: the engine (:data:`ENGINES`)."""
    c = scale_config(num_clients, gram)
    if units == "clients":
        c = config_lib.override(c, clients_per_wave=num_clients)
    t0 = time.perf_counter()
    setup = plan.build_setup(c, gram_units=units)
    build_s = time.perf_counter() - t0
    stages = collections.defaultdict(float)

    def wrap(name, fn):
        def call(*args, **kwargs):
            t = time.perf_counter()
            out = jax.block_until_ready(fn(*args, **kwargs))
            stages[name] += time.perf_counter() - t
            return out
        return call

    timed, state0, passes = rounds.instrument(setup, wrap), rounds.initial_state(setup), []
    for _ in range(2):
        stages.clear()
        t = time.perf_counter()
        state = state0
        for rnd in range(c.rounds):
            state, _ = rounds.run_round(timed, state, 0, rnd)
        passes.append((time.perf_counter() - t, dict(stages)))
    (cold, _), (warm, warm_stages) = passes
    steps = c.rounds * int(setup.schedule.steps[0].sum())
    return {"clients": num_clients, "grams": gram, "engine": ENGINES[units], "gram_units": setup.schedule.gram_units,
            "waves": len(plan.round_waves(setup, 0, 0)), "client_steps": steps, "round_s": warm / c.rounds,
            "client_steps_per_s": steps / warm, "compile_s": max(cold - warm, 0.0), "build_s": build_s,
            "merge_ms": 1e3 * warm_stages.get("merge_round", 0.0) / c.rounds,
            "sums_s": warm_stages.get("sums", 0.0) / c.rounds, "train_s": warm_stages.get("train", 0.0) / c.rounds,
            "peak_rss_mb": common.peak_rss_mb()}


SCALE_HEADER = ("| K | Grams | engine | waves | client-steps | round (s) | client-steps/s | compile (s) | "
                "merge (ms) | Gram passes (s) | peak RSS (MB) |\n"
                "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")


def _scale_format(r: dict) -> str:
    if "error" in r:
        return f"| {r['clients']} | {r['grams']} | {r['engine']} | {r['error']} |||||||"
    return (f"| {r['clients']} | {r['grams']} | {r['engine']} | {r['waves']} | {r['client_steps']} | "
            f"{r['round_s']:.2f} | {r['client_steps_per_s']:.0f} | {r['compile_s']:.1f} | {r['merge_ms']:.1f} | "
            f"{r['sums_s']:.2f} | {r['peak_rss_mb']:.0f} |")


def run_scale(clients=SCALE_CLIENTS, grams=("diag", "full"), engines=tuple(ENGINES), timeout: int = 1800) -> dict:
    """Every (K, Grams, engine) case of :func:`scale_case` in a fresh process (its own peak RSS)."""
    rows = []
    print(SCALE_HEADER, flush=True)
    for k in clients:
        for gram in grams:
            for units in engines:
                cmd = [sys.executable, "-m", "lorm_jax.bench.clients", "--scale-case", str(k), gram, units]
                try:
                    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
                    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
                    row = json.loads(lines[-1][len("RESULT "):]) if proc.returncode == 0 and lines else {
                        "clients": k, "grams": gram, "engine": ENGINES[units],
                        "error": f"exit {proc.returncode}: {(proc.stderr.strip().splitlines() or [''])[-1][:200]}"}
                except subprocess.TimeoutExpired:
                    row = {"clients": k, "grams": gram, "engine": ENGINES[units], "error": f"over {timeout} s"}
                rows.append(row)
                print(_scale_format(row), flush=True)
    return {"date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
            "load_average_at_end": os.getloadavg(), "machine": common.machine_info(), "rows": rows,
            "markdown": SCALE_HEADER + "\n" + "\n".join(_scale_format(r) for r in rows)}


def main(argv=None):
    p = argparse.ArgumentParser(prog="lorm-jax bench-clients", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny ViT only, K = 10, one timed call")
    p.add_argument("--json", default=None, help="write the rows and machine info here")
    p.add_argument("--markdown", default=None, help="write the table here")
    p.add_argument("--backbones", default=None, help=f"comma-separated subset of {list(BACKBONES)}")
    p.add_argument("--betas", default=None, help="comma-separated Dirichlet concentrations (default 0.5,0.1)")
    p.add_argument("--scale", action="store_true", help="the whole engine at K = 100 / 1,000 / 10,000 clients")
    p.add_argument("--clients", default=None, help="--scale: comma-separated K (default 100,1000,10000)")
    p.add_argument("--grams", default="diag,full", help="--scale: diag and/or full")
    p.add_argument("--engines", default=",".join(ENGINES), help=f"--scale: a subset of {list(ENGINES)}")
    p.add_argument("--scale-case", nargs=3, default=None, metavar=("K", "GRAMS", "ENGINE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.scale_case:
        k, gram, units = args.scale_case
        print("RESULT " + json.dumps(scale_case(int(k), gram, units)), flush=True)
        return None
    load_before = os.getloadavg()
    if args.scale:
        out = run_scale([int(k) for k in args.clients.split(",")] if args.clients else SCALE_CLIENTS,
                        args.grams.split(","), args.engines.split(","))
    else:
        out = run_benchmark(quick=args.quick, backbone_names=args.backbones.split(",") if args.backbones else None,
                            betas=[float(b) for b in args.betas.split(",")] if args.betas else None)
    out["load_average_at_start"] = load_before
    print(f"load average at start {load_before}, at end {out['load_average_at_end']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(out["markdown"] + "\n")
    return out


if __name__ == "__main__":
    main()
