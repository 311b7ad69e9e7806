"""Throughput of the backbones on this machine: forward, forward + diagonal Grams, and one LoRA training step.

    python experiments/bench_backbones.py [--out FILE.json] [--steps 5] [--batch 16] [--rank 8] [--only tiny_vit,...]

Settings (batch 16, LoRA rank 8 on every block linear layer; DINOv2 uses the fused qkv LoRA, MiniLM separate q/k/v):

* ``forward``     ``bb.apply(params, lora, x)``                       (features only)
* ``fwd+gram``    ``bb.apply(params, lora, x, gram="diag")``          (what Gram collection costs)
* ``train``       ``value_and_grad`` of the softmax cross-entropy of a linear head on the features w.r.t. the LoRA
                  A and B and the head, followed by an ``optax.adamw`` update; one jitted function.

Compile time (``jit(...).lower(...).compile()``) is reported separately; throughput is examples/s over ``--steps`` timed
calls after one warm-up call. Prints a markdown table and writes JSON.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lorm_jax import backbones
from lorm_jax import lora as L
from lorm_jax.bench import common

NUM_CLASSES = 10
CONFIGS = {  # label -> (backbone name, options, input description)
    "dinov2_s14@56": ("dinov2_s14", {"image_size": 56}, "56 px (4x4 patches)"),
    "dinov2_s14@112": ("dinov2_s14", {"image_size": 112}, "112 px (8x8 patches)"),
    "minilm_l6@32": ("minilm_l6", {}, "32 tokens"),
    "tiny_vit": ("tiny_vit", {}, "16 px (4x4 patches)"),
    "tiny_bert": ("tiny_bert", {}, "32 tokens"),
}
DEFAULT = ("dinov2_s14@56", "dinov2_s14@112", "minilm_l6@32")


def make_inputs(bb, batch, rng):
    if bb.kind == "image":
        return jnp.asarray(rng.standard_normal((batch, bb.image_size, bb.image_size, 3)), jnp.float32)
    words = "the a federated client merges low rank adapters of a frozen transformer with closed form solutions".split()
    texts = [" ".join(rng.choice(words, 40)) for _ in range(batch)]  # longer than 32 tokens: no padding
    return {k: jnp.asarray(v) for k, v in bb.tokenize(texts, 32).items()}


def step_times(compiled, args, steps, feedback=None):
    """(wall, process CPU) seconds per call of an AOT-compiled function (medians), after one warm-up call.

    The CPU time (all threads of this process) is much less sensitive than the wall time to other processes competing
    for the cores; on an otherwise idle machine wall ≈ CPU / (cores kept busy)."""
    out = jax.block_until_ready(compiled(*args))
    runs = []
    for _ in range(steps):
        if feedback is not None:
            args = feedback(args, out)
        runs.append(common.timed(lambda: compiled(*args)))
        out = runs[-1].out
    return common.median(runs), common.median(runs, cpu=True)


def bench_one(label, steps, batch, rank):
    name, options, desc = CONFIGS[label]
    loaded = common.timed(lambda: backbones.get(name, **options))
    bb, load_s = loaded.out, loaded.seconds
    rng = np.random.default_rng(0)
    x = make_inputs(bb, batch, rng)
    y = jnp.asarray(rng.integers(0, NUM_CLASSES, batch), jnp.int32)
    lora = L.init(jax.random.PRNGKey(0), bb.lora_shapes, rank)
    head = {"w": jnp.zeros((bb.feature_dim, NUM_CLASSES)), "b": jnp.zeros((NUM_CLASSES,))}
    opt = optax.adamw(1e-3, weight_decay=0.0)

    def forward(params, lora, x):
        return bb.apply(params, lora, x)[0]

    def forward_gram(params, lora, x):
        return bb.apply(params, lora, x, gram="diag")

    def loss_fn(trainable, params, x, y):
        feats, _ = bb.apply(params, trainable["lora"], x)
        logits = feats @ trainable["head"]["w"] + trainable["head"]["b"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def train_step(trainable, opt_state, params, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(trainable, params, x, y)
        updates, opt_state = opt.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    trainable = {"lora": lora, "head": head}
    cases = {
        "forward": (forward, (bb.params, lora, x), None),
        "fwd+gram": (forward_gram, (bb.params, lora, x), None),
        "train": (train_step, (trainable, opt.init(trainable), bb.params, x, y),
                  lambda args, out: (out[0], out[1], *args[2:])),
    }
    rows = []
    for mode, (fn, args, feedback) in cases.items():
        compiled = common.timed(lambda: jax.jit(fn).lower(*args).compile())
        compile_s = compiled.seconds
        step_s, cpu_s = step_times(compiled.out, args, steps, feedback)
        rows.append({"config": label, "backbone": name, "input": desc, "mode": mode, "batch": batch, "rank": rank,
                     "lora_layers": len(bb.lora_shapes), "load_s": round(load_s, 2), "compile_s": round(compile_s, 2),
                     "step_s": round(step_s, 4), "cpu_s": round(cpu_s, 4),
                     "examples_per_s": round(batch / step_s, 1)})
        print(f"  {label:16s} {mode:9s} compile {compile_s:6.1f} s   {step_s * 1e3:8.1f} ms/step   "
              f"{batch / step_s:7.1f} ex/s   (CPU {cpu_s * 1e3:8.1f} ms/step)", flush=True)
    return rows


def markdown(rows):
    lines = ["| backbone | input | LoRA layers (r) | mode | compile (s) | ms / step (wall) | examples / s | "
             "CPU ms / step |", "|---|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['backbone']} | {r['input']} | {r['lora_layers']} ({r['rank']}) | {r['mode']} | "
                     f"{r['compile_s']:.1f} | {r['step_s'] * 1e3:.1f} | {r['examples_per_s']:.1f} | "
                     f"{r['cpu_s'] * 1e3:.0f} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--steps", type=int, default=5, help="timed calls per measurement (median reported)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--only", default=",".join(DEFAULT), help=f"comma-separated subset of {sorted(CONFIGS)}")
    args = ap.parse_args(argv)
    labels = [s for s in args.only.split(",") if s]
    unknown = [s for s in labels if s not in CONFIGS]
    if unknown:
        ap.error(f"unknown configs {unknown}; choose from {sorted(CONFIGS)}")

    dev = jax.devices()[0]
    meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"), **common.machine_info(),
            "device": f"{dev.platform}:{dev.device_kind}"}
    meta["loadavg_start"] = meta.pop("load_average")
    print(f"# bench_backbones  {meta['date']}  {meta['device']}  cpus={meta['cpu_count']}  jax {meta['jax']}",
          flush=True)
    rows = []
    for label in labels:
        try:
            rows += bench_one(label, args.steps, args.batch, args.rank)
        except backbones.MissingAssetError as e:
            print(f"  {label}: skipped ({e})", flush=True)
    meta["loadavg_end"] = os.getloadavg()
    print()
    print(markdown(rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "results": rows}, f, indent=2)
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
