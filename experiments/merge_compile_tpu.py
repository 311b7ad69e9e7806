"""Compile seconds of the server programs of the paper's CIFAR-100 β = 0.5 run for one TPU v5e chip, shapes only.

ViT-B/16's 48 LoRA layers (rank 1, diagonal Grams), K = 10 clients, the 768-wide head with its full Gram, 10 tasks:
LoRM's round merges (B and A), the end-of-task merge and the merge residuals, each lowered and compiled for one chip of
a v5e slice on this CPU (``pip install -e ".[tpu]"``). Runs against whichever ``lorm_jax`` is imported, so an older
commit can be measured beside this one (docs/TPU.md)::

    JAX_PLATFORMS=cpu python experiments/merge_compile_tpu.py
    cd /tmp/old && JAX_PLATFORMS=cpu PYTHONPATH=/tmp/old python <this checkout>/experiments/merge_compile_tpu.py
"""
import json
import os
import time

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import topologies  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

from lorm_jax import config as config_lib  # noqa: E402
from lorm_jax import merging, methods  # noqa: E402

K, R, T, C, F = 10, 1, 10, 100, 768
SHAPES = {f"block_{i:02d}/{n}": s for i in range(12) for n, s in (
    ("attn/qkv", (2304, 768)), ("attn/out", (768, 768)), ("mlp/fc1", (3072, 768)), ("mlp/fc2", (768, 3072)))}


def main() -> None:
    chip = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu", chip_config_name="default",
                                        num_slices=1, wrap=(False, False, False)).devices[:1]
    rep = NamedSharding(Mesh(np.asarray(chip), ("x",)), PartitionSpec())

    def spec(*shape, dtype=jnp.float32):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=rep)

    lora = {p: {"A": spec(K, R, di), "B": spec(K, do, R)} for p, (do, di) in SHAPES.items()}
    grams = {p: spec(K, di) for p, (do, di) in SHAPES.items()}
    round_args = (lora, grams, {"w": spec(K, C, F), "b": spec(K, C)}, spec(K, F, F), spec(K))
    head_args = (spec(C, dtype=jnp.bool_), {"w": spec(C, F), "b": spec(C)})
    task_args = ({p: spec(T, do, R) for p, (do, di) in SHAPES.items()},
                 {p: spec(T, R, di) for p, (do, di) in SHAPES.items()},
                 {p: spec(T, di) for p, (do, di) in SHAPES.items()}, spec(dtype=jnp.int32))
    merged = {p: {"A": spec(R, di), "B": spec(do, R)} for p, (do, di) in SHAPES.items()}
    config = config_lib.base_config()
    config.method = "lorm"
    method = methods.get("lorm", config)
    if hasattr(methods, "compile_merges"):  # fast-first merges (this engine; the round merge from per-client arrays)
        merges = methods.compile_merges(method)
        round_fn = merging.fast_first(method.merge_round, static_argnames=("factor",)).fast
        tasks_fn = merges.tasks.fast
        residuals = merging.fast_first(merging.merge_residuals_tree, static_argnames="dtype").fast
        engine = "fast-first"
    else:  # commit 5fe5c11 and before: plain jit, eigh fallback inline
        round_fn = jax.jit(method.merge_round, static_argnames=("factor",))
        tasks_fn = jax.jit(method.merge_tasks)
        residuals = jax.jit(merging.merge_residuals_tree, static_argnames="dtype")
        engine = "eigh inline"
    seconds = {}

    def compile_(name, fn, *args, **kwargs):
        wall, cpu = time.time(), time.process_time()
        fn.lower(*args, **kwargs).compile()
        seconds[name] = {"wall": round(time.time() - wall, 1), "cpu": round(time.process_time() - cpu, 1)}
        print(name, seconds[name], flush=True)

    for factor in ("B", "A"):
        compile_(f"merge_round {factor}", round_fn, *round_args, factor, *head_args)
    compile_("merge_tasks", tasks_fn, *task_args)
    compile_("residuals", residuals, lora, merged, grams, dtype=jnp.dtype("float32"))
    print(json.dumps({"engine": engine, "load_average": os.getloadavg()[0], "compile_s": seconds}))


if __name__ == "__main__":
    main()
