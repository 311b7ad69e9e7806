"""The tables of docs/TPU.md: every program of the paper's CIFAR-100 β = 0.5 run compiled for several TPU slices, and
the paper's 18 runs predicted on one slice (compiler and cost-model figures, no TPU involved).

    JAX_PLATFORMS=cpu python experiments/tpu_tables.py --out /tmp/tpu          # both tables (~30 min on 2 cores)
    JAX_PLATFORMS=cpu python experiments/tpu_tables.py --out /tmp/tpu --only runs
    JAX_PLATFORMS=cpu python experiments/tpu_tables.py --out /tmp/tpu --only topologies --topologies v6e:4x4,v5e:8x8

Writes ``<out>/<name>.json`` per compiled configuration (what ``lorm-jax aot --json`` writes) and prints markdown.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import time

from lorm_jax import aot
from lorm_jax import config as config_lib

TOPOLOGIES = ("v4:2x2x1", "v5e:2x2", "v5p:2x2x1", "v6e:2x2", "v5e:4x4", "v6e:4x4", "v5e:8x8")
PAPER = {"cifar100": (0.5, 0.1, 0.05), "imagenet_r": (0.5, 0.1, 0.05), "imagenet_a": (1.0, 0.5, 0.2),
         "cub200": (1.0, 0.5, 0.2), "cars196": (1.0, 0.5, 0.2), "eurosat": (1.0, 0.5, 0.2)}


def measure(config_spec: str, topology: str, dtype: str, compile: bool) -> dict:
    """``lorm-jax aot`` as a function: the programs and the summary of one configuration on one topology."""
    devices, chip = aot.topology_devices(topology)
    t0 = time.time()
    programs, setup = aot.compile_run(config_lib.load(config_spec), devices, budget_bytes=int(0.9 * chip.hbm_bytes),
                                      dtype=dtype, compile=compile)
    summary = aot.summarize(programs, setup, chip, len(devices))
    return {"config": config_spec, "topology": topology, "dtype": dtype, "wall_s": time.time() - t0,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
            "summary": summary, "programs": [vars(p) for p in programs]}


def topology_rows(out: str, dtype: str, topologies=TOPOLOGIES) -> list[str]:
    rows = ["| slice | chips (hosts) | compile s (CPU s) | merges compile s | GiB per chip (of HBM) | round s | "
            "run s | chip-hours | train MFU | lane utilisation | bound |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for topology in topologies:
        r = measure("configs/paper/cifar100.py:0.5", topology, dtype, compile=True)
        with open(os.path.join(out, topology.replace(":", "_") + ".json"), "w") as f:
            json.dump(r, f, indent=1)
        s, ps = r["summary"], r["programs"]
        hosts = len({d.process_index for d in aot.topology_devices(topology)[0]})
        merges = max(p["compile_s"] for p in ps if p["name"].startswith("merge"))
        rows.append(f"| {topology} | {s['devices']} ({hosts}) | {s['compile_s']:.0f} ({s['compile_cpu_s']:.0f}) | "
                    f"≤ {merges:.1f} | {s['bytes_per_device_max'] / aot.GiB:.1f} ({s['hbm_gib']:.0f}) | "
                    f"{s['round_s']:.2f} | {s['run_s']:.0f} | {s['run_s'] * s['devices'] / 3600:.2f} | "
                    f"{100 * s['train_mfu']:.0f} % | {s['lane_utilization']:.2f} | "
                    f"{'FLOPs' if s['train_compute_bound'] else 'memory'} | ")
        print(rows[-1], flush=True)
    return rows


def run_rows(out: str, dtype: str, topology: str) -> list[str]:
    rows = [f"| dataset | β | rank | rounds | tasks | round s | run s | chip-hours on {topology} | train MFU |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    total = 0.0
    for dataset, betas in PAPER.items():
        for beta in betas:
            spec = f"configs/paper/{dataset}.py:{beta}"
            r = measure(spec, topology, dtype, compile=False)
            s, c = r["summary"], config_lib.load(spec)
            hours = s["run_s"] * s["devices"] / 3600
            total += hours
            tasks = len(r["programs"][0]["flops"])
            rows.append(f"| {dataset} | {beta:g} | {c.rank} | {c.rounds} | {tasks} | {s['round_s']:.2f} | "
                        f"{s['run_s']:.0f} | {hours:.2f} | {100 * s['train_mfu']:.0f} % |")
            print(rows[-1], flush=True)
    rows.append(f"| all 18 runs | | | | | | | {total:.1f} | |")
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--only", choices=("topologies", "runs"))
    p.add_argument("--runs-topology", default="v5e:4x4")
    p.add_argument("--topologies", default=",".join(TOPOLOGIES), help="comma-separated slices of the first table")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.only in (None, "runs"):
        print("\n".join(run_rows(args.out, args.dtype, args.runs_topology)))
    if args.only in (None, "topologies"):
        print("\n".join(topology_rows(args.out, args.dtype, args.topologies.split(","))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
