"""Seconds per round of a real config, engine against engine: this checkout vs another commit's checkout.

Each checkout runs the first ``--units`` units of the same config (``continual.run`` with
``hooks=lorm_jax.testing.stop_after(N)``, or ``stop_after_units=N`` in a checkout from before ``continual.Hooks``; a
fresh interpreter with that checkout first on ``PYTHONPATH``, a fresh workdir), one after the other on the same machine;
the per-unit ``seconds`` of their ``metrics.jsonl`` are compared. The first units include compilation (LoRM compiles
its B merge in round 0 and its A merge in round 1), so the ratio is the median over the rounds after the first
``--skip`` units.

    git worktree add /tmp/engine_before 131acaa      # the engine before lanes
    python experiments/bench_rounds.py --other /tmp/engine_before --config configs/fmnist_dinov2.py --units 8 \\
        --set data.beta=0.1 --set data.min_samples=1

Importable: :func:`run_units`, :func:`main`.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs under the other checkout's lorm_jax too, so it uses only what both have: config.load_sibling (a config file
# loaded by path), config.override, continual.run.
_CHILD = r"""
import os, sys
checkout, config_path, workdir, units, overrides = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5:]
import lorm_jax
assert lorm_jax.__file__.startswith(checkout), (lorm_jax.__file__, checkout)
from lorm_jax import config as config_lib, continual
c = config_lib.load_sibling(config_path, os.path.basename(config_path))
for item in overrides:
    key, value = item.split("=", 1)
    leaf = c
    for part in key.split("."):
        leaf = leaf[part]
    config_lib.override(c, **{key: type(leaf)(value) if not isinstance(leaf, bool) else value == "True"})
if hasattr(continual, "Hooks"):
    from lorm_jax import testing
    try:
        continual.run(c, workdir, progress=False, hooks=testing.stop_after(units))
    except testing.StopRun:
        pass
else:  # a checkout from before continual.Hooks and lorm_jax.testing
    continual.run(c, workdir, stop_after_units=units, progress=False)
"""


def run_units(checkout: str, config: str, units: int, overrides: list[str], workdir: str) -> list[dict]:
    """Run the first ``units`` units of ``config`` with the lorm_jax of ``checkout``; its metrics lines."""
    env = dict(os.environ, PYTHONPATH=checkout)
    proc = subprocess.run([sys.executable, "-c", _CHILD, os.path.abspath(checkout), os.path.abspath(config), workdir,
                           str(units), *overrides], env=env, cwd=checkout, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{checkout} failed:\n{proc.stderr[-4000:]}")
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--other", required=True, help="another checkout of lorm_jax (e.g. a git worktree of an old commit)")
    p.add_argument("--config", required=True)
    p.add_argument("--units", type=int, default=8, help="units to run in each")
    p.add_argument("--skip", type=int, default=2, help="leading units left out of the median (compilation)")
    p.add_argument("--set", action="append", default=[], help="config override key=value (repeatable)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    out = {"load_average_at_start": os.getloadavg(), "config": args.config, "overrides": args.set, "runs": {}}
    for name, checkout in (("other", args.other), ("this", REPO)):
        with tempfile.TemporaryDirectory() as tmp:
            lines = run_units(checkout, args.config, args.units, args.set, os.path.join(tmp, "w"))
        out["runs"][name] = {"checkout": checkout, "seconds": [line["seconds"] for line in lines],
                             "round": [line["round"] for line in lines]}
    out["load_average_at_end"] = os.getloadavg()
    steady = {n: [s for s, r in zip(run["seconds"][args.skip:], run["round"][args.skip:]) if r != "end"]
              for n, run in out["runs"].items()}
    out["median_round_s"] = {n: statistics.median(v) for n, v in steady.items() if v}
    if len(out["median_round_s"]) == 2:
        out["speedup"] = out["median_round_s"]["other"] / out["median_round_s"]["this"]
    print(f"| engine | checkout | seconds per unit (the first {args.skip} compile) | median round after them |")
    print("|---|---|---|---:|")
    for n, run in out["runs"].items():
        print(f"| {n} | {run['checkout']} | {', '.join(f'{s:.1f}' for s in run['seconds'])} | "
              f"{out['median_round_s'].get(n, float('nan')):.1f} |")
    if "speedup" in out:
        print(f"\nthis / other: {out['speedup']:.2f}x faster per round "
              f"(load average {out['load_average_at_start'][0]:.1f} -> {out['load_average_at_end'][0]:.1f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
