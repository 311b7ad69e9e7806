"""Ahead-of-time compilation of a run for accelerators that are not here: TPU slices (and one H100) from a CPU machine.

``lorm-jax aot --config configs/paper/cifar100.py:0.5 --topology v5e:4x4`` builds the run's plan from the config with
shapes only (the paper dataset's split sizes, the backbone's parameter shapes, the project's own partition and lanes
code; no data or weights are read), then compiles every program a run executes for the named topology with XLA's TPU
compiler (``jax.experimental.topologies``: the devices of a slice, described, not attached) and reports per program:

* compile seconds on this machine;
* bytes per device (XLA's ``memory_analysis``: arguments, outputs, temporaries) against the chip's HBM;
* FLOPs and bytes accessed: XLA's ``cost_analysis``, which counts every loop body once, and the same counted on the
  program's jaxpr with every loop as often as it runs (:func:`jaxpr_cost`: scan lengths, and the trip counts of the
  lanes' step loop and of the packed passes' batch loop, which the plan knows; FLOPs exact for the matmuls, bytes a
  fused-program model);
* the roofline time ``max(FLOPs / peak, bytes / HBM bandwidth)`` with the chip's published peak and bandwidth;

then the predicted time of a round and of the run, the training program's predicted MFU, and whether it all fits. It
checks every program's HLO for float64 (TPUs have none) and host callbacks. These are compiler figures, not
measurements on a TPU. ``--topology h100`` compiles for one NVIDIA H100 from its XLA target config
(``lorm_jax/specs``; the [gpu] extra's CUDA compiler, no GPU needed), ``--topology cpu`` for this machine.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import os
import re
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from lorm_jax import backbones, federated, methods, metrics, plan, rounds, sharding
from lorm_jax import config as config_lib
from lorm_jax import data as data_lib
from lorm_jax.backbones import common

log = logging.getLogger("lorm_jax")
GiB = 2 ** 30


# ----------------------------------------------------------------------------------------------------------------------
# Chips and topologies

@dataclasses.dataclass(frozen=True)
class Chip:
    """Published per-chip figures: dense bf16 peak FLOP/s, HBM capacity and bandwidth."""
    name: str
    peak_flops: float
    hbm_bytes: int
    hbm_bandwidth: float
    source: str


CHIPS = {
    "v4": Chip("TPU v4", 275e12, 32 * GiB, 1228e9, "cloud.google.com/tpu/docs/v4"),
    "v5e": Chip("TPU v5e", 197e12, 16 * GiB, 819e9, "cloud.google.com/tpu/docs/v5e"),
    "v5p": Chip("TPU v5p", 459e12, 95 * GiB, 2765e9, "cloud.google.com/tpu/docs/v5p"),
    "v6e": Chip("TPU v6e (Trillium)", 918e12, 32 * GiB, 1640e9, "cloud.google.com/tpu/docs/v6e"),
    "h100": Chip("NVIDIA H100 SXM", 989e12, 80 * 10 ** 9, 3350e9, "nvidia.com H100 datasheet (dense bf16)"),
}
# TPU generations whose chips have two TensorCores: one device per chip ("megacore"), as on a real slice.
MEGACORE = ("v4", "v5p")


class TopologyError(config_lib.InputError):
    """An unknown or unusable ``--topology``."""


# GPUs described by XLA's target configs (lorm_jax/specs/*.txtpb): one device, compiled for without a GPU.
GPU_SPECS = {"h100": "h100_sxm.txtpb"}


def gpu_devices(kind: str) -> list:
    """The one device of ``kind`` ("h100"), from its XLA target config: the CUDA plugin's compiler, no GPU attached.

    Needs ``pip install "jax-cuda12-plugin[with-cuda]"`` (same version as jaxlib); :func:`_compile` turns XLA's Triton
    GEMM off for GPU programs (without a GPU its tile choice fails).
    """
    # Without a GPU the CUDA plugin drops out when jax first starts its backends (its CUDA version check fails), and
    # with it the GPU topology, unless that check is skipped (or JAX_PLATFORMS excludes cuda) before that start.
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "specs", GPU_SPECS[kind])
    try:
        from jax.experimental import topologies
        with open(path) as f:
            desc = topologies.get_topology_desc(kind, "cuda", target_config=f.read(), topology="1x1x1")
    except Exception as e:  # noqa: BLE001 - the CUDA plugin missing ("topology not implemented for cuda"), or a spec
        # field this XLA does not know
        hint = (" (the GPU compiler ships with `pip install \"jax[cuda12]==<jaxlib version>\"`; without a GPU, start "
                "Python with JAX_PLATFORMS=cpu)" if isinstance(e, NotImplementedError) else "")
        raise TopologyError(f"--topology {kind!r}: {type(e).__name__}: {' '.join(str(e).split())[:300]}{hint}") from e
    return list(desc.devices)


def topology_devices(topology: str) -> tuple[list, Chip | None]:
    """The devices of ``topology`` ("v5e:4x4", "v4:2x2x2", …, "h100", "cpu") and its chip (None for "cpu")."""
    if topology == "cpu":
        return jax.devices("cpu")[:1], None
    if topology in GPU_SPECS:
        return gpu_devices(topology), CHIPS[topology]
    kind, _, shape = topology.partition(":")
    if kind not in CHIPS or kind == "h100" or not re.fullmatch(r"\d+(x\d+){1,2}", shape):
        raise TopologyError(f"--topology {topology!r} is invalid: one of {', '.join(k for k in CHIPS if k != 'h100')} "
                            f"with a slice shape, e.g. v5e:4x4, v5e:8x8, v4:2x2x2, v5p:2x2x1, v6e:4x4; or h100; or cpu")
    # Several processes may compile for TPUs at once (tests on 2 workers): no TPU is touched, so libtpu's one-process
    # lock is not needed.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        from jax.experimental import topologies
        desc = topologies.get_topology_desc(topology_name=topology, platform="tpu",
                                            chip_config_name="megacore" if kind in MEGACORE else "default",
                                            num_slices=1, **({} if shape.count("x") == 2 else
                                                             {"wrap": (False, False, False)}))
    except Exception as e:  # noqa: BLE001 - libtpu missing, or a shape the runtime does not know
        hint = " (the TPU compiler ships with `pip install -e \".[tpu]\"`)" if "libtpu" in str(e).lower() or \
            "tpu" not in {b.platform for b in jax.devices()} else ""
        raise TopologyError(f"--topology {topology!r}: {type(e).__name__}: {' '.join(str(e).split())[:300]}{hint}") \
            from e
    return list(desc.devices), CHIPS[kind]


# ----------------------------------------------------------------------------------------------------------------------
# FLOPs and bytes of a jaxpr, loops included

_ELEMENTWISE = {"add", "sub", "mul", "div", "max", "min", "neg", "exp", "log", "tanh", "logistic", "sqrt", "rsqrt",
                "pow", "integer_pow", "erf", "abs", "sign", "select_n", "square", "exp2", "log1p", "expm1"}
# Ops whose operands and result cross HBM even when XLA fuses everything elementwise around them.
_MEMORY_OPS = {"dot_general", "conv_general_dilated", "cholesky", "triangular_solve", "eigh", "lu", "qr",
               "custom_linear_solve", "sort", "cumsum", "argmax", "argmin", "reduce_sum", "reduce_max", "reduce_min"}
_MOVE_OPS = {"gather", "dynamic_slice", "dynamic_update_slice", "scatter", "scatter-add", "scatter_add"}


def _nbytes(aval) -> float:
    return float(np.prod(aval.shape)) * np.dtype(aval.dtype).itemsize if hasattr(aval, "shape") else 0.0


def jaxpr_cost(jaxpr, while_trips: int, *, loops: bool = True) -> tuple[float, float]:
    """``(FLOPs, bytes)`` of ``jaxpr`` on one device. FLOPs: 2·M·N·K per dot, one per element of arithmetic ops.
    Bytes, a fused-program model: the operands and results of dots, factorisations and reductions, twice the moved
    bytes of gathers and dynamic slices; elementwise ops are taken as fused into their neighbours (free). A ``scan``
    body counts its length times, a ``while`` body ``while_trips`` times (``loops=False``: every body once, as XLA's
    cost analysis counts them)."""
    flops = nbytes = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            flops += 2.0 * np.prod(eqn.outvars[0].aval.shape) * np.prod([lhs[d] for d in contract])
        elif name in _ELEMENTWISE:
            flops += float(np.prod(eqn.outvars[0].aval.shape))
        if name in _MEMORY_OPS:
            nbytes += sum(_nbytes(v.aval) for v in (*eqn.invars, *eqn.outvars))
        elif name in _MOVE_OPS:
            nbytes += 2 * sum(_nbytes(v.aval) for v in eqn.outvars)
        subs = [v for v in eqn.params.values() if isinstance(v, (jax.extend.core.ClosedJaxpr, jax.extend.core.Jaxpr))]
        subs += [b for v in eqn.params.values() if isinstance(v, tuple) for b in v
                 if isinstance(b, (jax.extend.core.ClosedJaxpr, jax.extend.core.Jaxpr))]
        inner = [jaxpr_cost(getattr(x, "jaxpr", x), while_trips, loops=loops) for x in subs]
        if not inner:
            continue
        times = {"scan": eqn.params.get("length", 1), "while": while_trips}.get(name, 1) if loops else 1
        if name == "cond":
            f, b = max(f for f, _ in inner), max(b for _, b in inner)
        else:
            f, b = sum(f for f, _ in inner), sum(b for _, b in inner)
        flops, nbytes = flops + times * f, nbytes + times * b
    return flops, nbytes


# ----------------------------------------------------------------------------------------------------------------------
# The programs of a run, compiled

@dataclasses.dataclass
class Program:
    """One compiled program of a run and what XLA says about it (per device)."""
    name: str
    per_round: float          # runs per round
    per_task: float           # runs per end of task
    compile_s: float          # wall seconds
    compile_cpu_s: float      # CPU seconds of this process (XLA compiles on up to 2 threads; less sensitive to load)
    memory: dict              # argument / output / temp / alias bytes per device
    flops_xla: float          # XLA's cost analysis (loop bodies counted once)
    bytes_xla: float
    flops_once: float         # the jaxpr model with loop bodies once (to compare with XLA's count)
    bytes_once: float
    flops: list               # per task: the jaxpr model's FLOPs with every loop's trip count
    bytes: list               # per task: the jaxpr model's bytes accessed
    float64: bool
    callbacks: list
    reused: bool              # the other tasks' and rounds' calls lower to this same program

    def bytes_per_device(self) -> int:
        m = self.memory
        return int(m["argument"] + m["output"] + m["temp"] - m["alias"])

    def seconds(self, task: int, chip: Chip) -> float:
        """Roofline time of one call in task ``task``: ``max(FLOPs / peak, bytes / HBM bandwidth)``."""
        return max(self.flops[task] / chip.peak_flops, self.bytes[task] / chip.hbm_bandwidth)

    def compute_bound(self, task: int, chip: Chip) -> bool:
        return self.flops[task] / chip.peak_flops >= self.bytes[task] / chip.hbm_bandwidth


def _abstract(tree, mesh):
    """Every leaf as a ``ShapeDtypeStruct`` on ``mesh`` (replicated unless it already carries a sharding)."""
    rep = sharding.replicated(mesh)

    def one(x):
        if isinstance(x, str) or (isinstance(x, jax.ShapeDtypeStruct) and x.sharding is not None):
            return x  # a static argument, or placed already
        return jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x), sharding=rep)
    return jax.tree.map(one, tree)


_CALLBACK = re.compile(r'custom_call_target="([^"]*callback[^"]*)"|is_host_transfer=true')


def _compile(name: str, fn: Callable, calls: list, trips: list, *, per_round: float, per_task: float,
             mesh, compile: bool = True) -> tuple[Program, object]:
    """Lower and compile ``fn(*args, **kwargs)`` for the first of ``calls`` (``(args, kwargs)`` pairs; ``fn`` a
    jitted function) and measure it; the other calls are only lowered, to check that they are the same program.
    ``compile=False``: lowered only (the jaxpr cost model, no XLA figures). Returns the program and its output
    shapes."""
    calls = [(_abstract(args, mesh), kwargs) for args, kwargs in calls]
    args, kwargs = calls[0]
    t0, c0 = time.perf_counter(), time.process_time()
    lowered = fn.lower(*args, **kwargs)
    # Without a GPU, XLA's Triton GEMM cannot choose tiles for some dots ("Couldn't find output tile sizes"): cuBLAS.
    options = {"xla_gpu_enable_triton_gemm": False} if mesh.devices.flat[0].platform == "gpu" else None
    compiled = lowered.compile(options) if compile else None
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    text = lowered.as_text()
    reused = all(fn.lower(*a, **k).as_text() == text for a, k in calls[1:])
    mem = compiled.memory_analysis() if compile else None
    memory = {k: int(getattr(mem, f"{k}_size_in_bytes", 0) or 0) for k in ("argument", "output", "temp", "alias")}
    cost = (compiled.cost_analysis() or {}) if compile else {}
    cost = (cost[0] if cost else {}) if isinstance(cost, list) else cost
    static = tuple(i for i, a in enumerate(args) if isinstance(a, str))
    jaxpr = jax.make_jaxpr(functools.partial(fn, **kwargs), static_argnums=static)(*args).jaxpr
    costs, once = [jaxpr_cost(jaxpr, t) for t in trips], jaxpr_cost(jaxpr, 1, loops=False)
    program = Program(name=name, per_round=per_round, per_task=per_task, compile_s=seconds, compile_cpu_s=cpu,
                      memory=memory,
                      flops_xla=float(cost.get("flops", 0.0)), bytes_xla=float(cost.get("bytes accessed", 0.0)),
                      flops_once=float(once[0]), bytes_once=float(once[1]), flops=[float(f) for f, _ in costs],
                      bytes=[float(b) for _, b in costs], float64=bool(re.search(r"\bf64\b", text)),
                      callbacks=sorted({m.group(0) for m in _CALLBACK.finditer(compiled.as_text() if compiled
                                                                                 else text)}),
                      reused=reused)
    log.info("compiled %-16s %6.1f s", name, seconds)
    return program, lowered.out_info


def compile_run(config, devices, *, budget_bytes: int | None = None, dtype: str | None = None,
                compile: bool = True, only: tuple[str, ...] | None = None) -> tuple[list, object]:
    """Compile every program of the run ``config`` for ``devices``; returns the programs and the (shapes-only) setup.

    The setup is :func:`lorm_jax.plan.assemble` on an abstract backbone (:func:`lorm_jax.backbones.abstract`) and an
    abstract dataset (:func:`abstract_dataset`), on a 1-D ``clients`` mesh over ``devices``; every program is lowered
    with the arguments the run itself would pass (the engine's own ``*_call`` functions), as shapes. ``only``: the
    names of the programs to compile; the others are lowered only (for their output shapes and the cost model).
    """
    config_lib.validate(config)
    c = methods.effective_config(config)
    if dtype:  # backbone.options is free-form: the key may be new
        c = c.copy_and_resolve_references()
        with c.unlocked():
            c.backbone.options.compute_dtype = dtype
    backbone = backbones.abstract(c.backbone.name, **c.backbone.options.to_dict())
    ds = abstract_dataset(c.data.name, **c.data.options.to_dict())
    mesh = jax.sharding.Mesh(np.asarray(devices), (sharding.CLIENTS,))
    setup = plan.assemble(c, backbone, ds, mesh, budget_bytes=budget_bytes)
    state = rounds.initial_state(setup)
    T, R = setup.num_tasks, c.rounds
    programs = []

    def add(name, fn, calls, trips, per_round=1.0, per_task=0.0):
        program, out = _compile(name, fn, calls, trips, per_round=per_round, per_task=per_task, mesh=mesh,
                                compile=compile and (only is None or name in only))
        programs.append(program)
        return out

    # A round: local training in lanes, the clients' outputs in client order, the Gram pass and the sums the merge
    # needs (per-client Grams: one Gram program for every round and the task end, then a small contraction per
    # trained factor; blocks: one pass per factor), the server merge from the sums, Gram health, merge residuals;
    # each wave of a round runs the training and Gram programs once. The end of a task: the Gram sums of the merged
    # task LoRA, the cross-task merge, Gram health of the task sums, evaluation.
    waves = [plan.round_waves(setup, t, 0) for t in range(T)]
    per_wave = float(len(waves[0]))
    lanes = [[rounds.lane_layout(setup, t, r) for r in range(min(R, 2))] for t in range(T)]
    factor = {t_r: setup.method.train_factor(t_r[1]) for t_r in np.ndindex(T, min(R, 2))}
    keys = [jax.ShapeDtypeStruct((len(w[0].clients), 2), jnp.uint32) for w in waves]
    train_calls = [federated.train_call(setup.programs, setup.backbone.params, setup.train, state["lora"],
                                        state["head"], lanes[t][r], keys[t], factor[t, r], 0.0,
                                        rounds.task_rows(setup, t))
                   for t, r in np.ndindex(T, min(R, 2))]
    out = add("train", setup.programs.train, train_calls, [int(x[0]["num_steps"]) for x in lanes], per_round=per_wave)
    clients = add("by_client", setup.programs.by_client, [((out, lanes[0][0]["lane_of"], lanes[0][0]["row_of"]), {})],
                  [1] * T, per_round=per_wave)
    factors = [setup.method.train_factor(r) for r in range(R)]
    blocks = setup.schedule.gram_units == "blocks"
    size = len(waves[0][0].clients)

    trips = [int(w[0].gram["num_batches"]) for w in waves]
    everyone, samples = np.ones(size, bool), np.ones(size, np.float32)  # every client included, one sample each
    stacked = jax.tree.map(lambda x: jax.ShapeDtypeStruct((size,) + x.shape, x.dtype),
                           (common.by_kind(state["lora"]), state["head"]))  # the clients' LoRA: block layout
    if not blocks:  # one Gram program for the rounds and the task end, a small contraction per Statistics
        per_client = add("grams", setup.programs.kept_grams,
                         [federated.kept_grams_call(setup.programs, setup.backbone.params, setup.train, clients["lora"],
                                                    state["lora"], w[0].gram, keys[t], 1.0, everyone)
                          for t, w in enumerate(waves)], trips, per_round=per_wave, per_task=per_wave)

    def wave_sums(name, stats, lora, head, per_round, per_task=0.0):
        """The program that forms a wave's sums for ``stats``: the blocks pass, or the contraction of its Grams."""
        if blocks:
            calls = [federated.sums_call(setup.programs, setup.backbone.params, setup.train, lora, head, state["lora"],
                                         state["head"], w[0].gram, keys[t], 1.0, samples, everyone, float(size), stats)
                     for t, w in enumerate(waves)]
            return add(name, setup.programs.block_sums, calls, trips, per_round=per_round, per_task=per_task)[0]
        return add(name, setup.programs.contract,
                   [federated.contract_call(setup.programs, lora, head, state["lora"], state["head"], *per_client,
                                            samples, everyone, float(size), stats)], [1] * T, per_round=per_round,
                   per_task=per_task)

    for f in sorted(set(factors)):
        stats = methods.Statistics(setup.method, f, residuals=bool(c.merge_diagnostics and f), dtype=c.merge_dtype)
        sums = wave_sums(f"sums {f or 'head'}", stats, clients["lora"], clients["head"],
                         per_round=per_wave * factors.count(f) / R)
        rows = [rounds.task_rows(setup, t) for t in range(T)]
        (merged, _), _ = add(f"merge_round {f or 'head'}", setup.merges.round.fast,
                             [((sums, f, r, state["lora"], state["head"]), {}) for r in rows], [1] * T,
                             per_round=factors.count(f) / R)
        grams = {k: x["gram"] for k, x in sums["layers"].items()}  # the block layout, as rounds.run_round
        if stats.residuals:
            add(f"residuals {f}", metrics.residuals_tree.fast,
                [(({k: x["residual"] for k, x in sums["layers"].items()}, grams, merged),
                  {"dtype": jnp.dtype(c.merge_dtype)})], [1] * T, per_round=factors.count(f) / R)
    head_gram = jax.ShapeDtypeStruct((1,) + sums["clients"]["head_gram"].shape, sums["clients"]["head_gram"].dtype)
    add("gram_health", metrics.gram_health_tree, [(({**grams, "head": head_gram}, c.merge_dtype), {"blocks": True})],
        [1] * T)
    wave_sums("sums end", methods.Statistics(), *stacked, per_round=0.0, per_task=per_wave)
    add("merge_tasks", setup.merges.tasks.fast,
        [((state["past_b"], state["past_a"], state["task_grams"], np.int32(t + 1)), {}) for t in range(T)],
        [1] * T, per_round=0.0, per_task=1.0)
    if c.gram_network == "filler" and T > 1:  # the frozen weights of task t's Gram passes, t >= 1 (rounds.gram_network)
        add("filler", rounds.filler_params,
            [((setup.backbone.params, state["past_b"], state["past_a"], (np.arange(T) < t).astype(np.float32),
               np.float32(1 / (t + 1))), {}) for t in range(T)], [1] * T,
            per_round=(T - 1) / T, per_task=(T - 1) / T)
    add("gram_health task", metrics.gram_health_tree, [((state["task_grams"], c.merge_dtype),
                                                        {"stacked": True, "by_kind": True})],
        [1] * T, per_round=0.0, per_task=1.0)
    evals = setup.schedule.eval_packed
    eval_calls = [federated.evaluate_call(setup.programs, setup.backbone.params, state["head"], setup.test, p,
                                          data_lib.seen_class_mask(t, setup.offsets), T) for t, p in enumerate(evals)]
    add("evaluate", setup.programs.evaluate, eval_calls, [int(p["num_batches"]) for p in evals], per_round=0.0,
        per_task=1.0)
    return programs, setup


def abstract_dataset(name: str, **options) -> data_lib.ArrayDataset:
    """The paper datasets (``tfds/…``) as shapes (:func:`lorm_jax.data.tfds_data.abstract_tfds`); others are small
    and installed here, so they are loaded."""
    if name.startswith(data_lib.tfds_data.PREFIX):
        return data_lib.tfds_data.abstract_tfds(name[len(data_lib.tfds_data.PREFIX):], **options)
    return data_lib.load(name, **options)


# ----------------------------------------------------------------------------------------------------------------------
# The report

def summarize(programs: list, setup, chip: Chip | None, devices: int) -> dict:
    """Predicted times (roofline) of a round and of the run, the training program's MFU, and whether it all fits.

    MFU of the training program in task t: the FLOPs of its real examples over peak × its roofline time, i.e.
    ``u_t · min(1, (FLOPs / peak) / (bytes / bandwidth))`` with ``u_t`` the real examples among the example slots its
    lanes run (idle lanes and the packing's gaps are not useful work).
    """
    c, T = setup.config, setup.num_tasks
    compiled = any(p.memory["argument"] for p in programs)
    out = {"devices": devices, "compiled": compiled, "compile_s": sum(p.compile_s for p in programs),
           "compile_cpu_s": sum(p.compile_cpu_s for p in programs), "load_average": os.getloadavg()[0],
           "bytes_per_device_max": max(p.bytes_per_device() for p in programs),
           "float64": [p.name for p in programs if p.float64], "callbacks": [p.name for p in programs if p.callbacks],
           "reused": all(p.reused for p in programs)}
    if chip is None:
        return out
    rounds_s = [sum(p.per_round * p.seconds(t, chip) for p in programs) for t in range(T)]
    ends_s = [sum(p.per_task * p.seconds(t, chip) for p in programs) for t in range(T)]
    train = next(p for p in programs if p.name == "train")
    firsts = [plan.round_waves(setup, t, 0)[0] for t in range(T)]  # every wave of a round runs the same program
    util = [sum(len(setup.partitions[t][k]) for k in w.clients) * c.epochs
            / (setup.schedule.lanes * max(w.lane_steps) * c.batch_size) for t, w in enumerate(firsts)]
    mfu = [u * train.flops[t] / chip.peak_flops / train.seconds(t, chip) for t, u in enumerate(util)]
    fits = bool(out["bytes_per_device_max"] <= chip.hbm_bytes) if compiled else None
    out.update(chip=chip.name, hbm_gib=chip.hbm_bytes / GiB, fits=fits,
               round_s=float(np.mean(rounds_s)), task_end_s=float(np.mean(ends_s)),
               run_s=float(sum(c.rounds * r + e for r, e in zip(rounds_s, ends_s))),
               train_mfu=float(np.mean(mfu)),
               train_compute_bound=bool(train.compute_bound(0, chip)),
               lanes=setup.schedule.lanes, lane_utilization=float(np.mean(util)))
    return out


def table(programs: list, chip: Chip | None) -> str:
    """One row per program: how often it runs, compile s, GiB per device (args / outputs / temporaries), XLA's FLOPs
    and bytes (loop bodies once), the FLOPs and bytes with the loops' trip counts (task 0), roofline ms (task 0)."""
    head = ["program", "runs/round", "runs/task", "compile s", "compile CPU s", "args GiB", "out GiB", "temp GiB",
            "XLA GFLOP", "XLA GB", "GFLOP", "GB", "roofline ms", "bound", "f64", "callbacks", "reused"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in programs:
        bound = ms = "—"
        if chip is not None:
            ms = f"{1e3 * p.seconds(0, chip):.2f}"
            bound = "FLOPs" if p.compute_bound(0, chip) else "memory"
        cells = [p.name, f"{p.per_round:.2g}", f"{p.per_task:.2g}", f"{p.compile_s:.1f}", f"{p.compile_cpu_s:.1f}",
                 f"{p.memory['argument'] / GiB:.3f}", f"{p.memory['output'] / GiB:.3f}",
                 f"{p.memory['temp'] / GiB:.3f}", f"{p.flops_xla / 1e9:.1f}", f"{p.bytes_xla / 1e9:.2f}",
                 f"{p.flops[0] / 1e9:.1f}", f"{p.bytes[0] / 1e9:.2f}", ms,
                 bound, "yes" if p.float64 else "no", ", ".join(p.callbacks) or "none", "yes" if p.reused else "NO"]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def report(programs: list, summary: dict) -> str:
    done = "compiled" if summary["compiled"] else "lowered"
    lines = [f"{done} {len(programs)} programs in {summary['compile_s']:.1f} s ({summary['compile_cpu_s']:.1f} CPU s, "
             f"load average {summary['load_average']:.1f}); largest per device "
             f"{summary['bytes_per_device_max'] / GiB:.2f} GiB"]
    if "chip" in summary:
        fits = {True: "fits", False: "DOES NOT FIT",
                None: "not compiled (--no-compile): memory unknown"}[summary["fits"]]
        lines += [f"{summary['chip']}: {summary['devices']} chips of {summary['hbm_gib']:.0f} GiB HBM -> {fits}",
                  f"predicted (roofline): round {summary['round_s']:.3f} s, end of task {summary['task_end_s']:.3f} s, "
                  f"whole run {summary['run_s']:.1f} s ({summary['run_s'] / 3600 * summary['devices']:.3f} chip-hours)",
                  f"training program: {summary['lanes']} lanes, lane utilisation {summary['lane_utilization']:.2f}, "
                  f"{'compute' if summary['train_compute_bound'] else 'memory'}-bound, predicted MFU "
                  f"{100 * summary['train_mfu']:.1f} %"]
    problems = [f"float64 in {', '.join(summary['float64'])}"] if summary["float64"] else []
    problems += [f"host callbacks in {', '.join(summary['callbacks'])}"] if summary["callbacks"] else []
    problems += ["a later round or task compiles another program"] if not summary["reused"] else []
    lines.append("checks: " + ("; ".join(problems) if problems else "no float64, no host callbacks, every round and "
                                                                    "task reuses these executables"))
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    """``lorm-jax aot``: compile a run for a topology and print the table (module docstring)."""
    p = argparse.ArgumentParser(prog="lorm-jax aot", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="example:\n  lorm-jax aot --config configs/paper/cifar100.py:0.5 "
                                       "--topology v5e:4x4")
    p.add_argument("--config", required=True, metavar="FILE[:ARG]", help="experiment config file")
    p.add_argument("--topology", required=True, help="v4 / v5e / v5p / v6e slice, e.g. v5e:4x4, v5e:8x8, v4:2x2x2; "
                   "h100 (one GPU; needs the [gpu] extra); or cpu (this machine)")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), help="backbone compute dtype (default: the config's)")
    p.add_argument("--budget", type=float, default=0.9, help="fraction of the chip's HBM the memory plan may use")
    p.add_argument("--json", metavar="OUT", help="write the table and the summary as JSON")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="lower only: the loop-aware cost model "
                   "and predicted times in seconds, without XLA's compile time, memory and cost figures")
    p.add_argument("--only", metavar="NAMES", help="comma-separated program names to compile (e.g. 'evaluate,grams'); "
                   "the others are lowered only")
    args, rest = p.parse_known_args(argv)
    overrides, stray = config_lib.split_overrides(rest)
    if stray:
        p.error(f"unrecognized arguments: {' '.join(stray)}")
    config = config_lib.load(args.config, overrides)
    devices, chip = topology_devices(args.topology)
    budget = None if chip is None else int(args.budget * chip.hbm_bytes)
    try:
        programs, setup = compile_run(config, devices, budget_bytes=budget, dtype=args.dtype, compile=args.compile,
                                      only=tuple(args.only.split(",")) if args.only else None)
    except Exception as e:  # noqa: BLE001 - XLA refuses a program larger than the chip's memory at compile time
        if "RESOURCE_EXHAUSTED" in str(e) or "exceeds" in str(e).lower() and "memory" in str(e).lower():
            raise config_lib.InputError(f"aot: {args.config} does not fit {args.topology}: "
                                        f"{' '.join(str(e).split())[:300]}") from e
        raise
    summary = summarize(programs, setup, chip, len(devices))
    print(table(programs, chip))
    print()
    print(report(programs, summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": args.config, "topology": args.topology, "dtype": args.dtype, "summary": summary,
                       "programs": [dataclasses.asdict(x) for x in programs]}, f, indent=1)
    if chip is not None and summary["fits"] is False:
        raise config_lib.InputError(f"aot: {args.config} does not fit {args.topology}: a program needs "
                                    f"{summary['bytes_per_device_max'] / GiB:.2f} GiB per chip of "
                                    f"{chip.hbm_bytes / GiB:.0f}")
    return 0
