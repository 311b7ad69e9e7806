"""The comparison study: methods × Dirichlet β × seeds on one config → a markdown table and a plot.

Every (method, β, seed) is an ordinary engine run in its own workdir ``OUT/<method>_b<β>_s<seed>``, so the study is
resumable: a finished run returns its ``results.json`` at once and an interrupted one resumes from its checkpoint.
``centralized`` does not depend on β (one client holds all the data): its single run ``OUT/centralized_s<seed>``
fills every β row.
The table gives, per method and β, mean ± sample std over seeds of the final average accuracy (pooled) and of the
forgetting, the upload and download MB per client over the whole run (:mod:`lorm_jax.ledger`) and the time: the sum
of the per-unit seconds in ``metrics.jsonl`` (compilation included, setup and data loading not; it adds up across
resumed sessions). The plot shows the accuracy after each task per method (mean over seeds, ±std band), one panel
per β.

    python experiments/compare.py --config configs/tiny.py --methods lorm,fedavg_lora --betas 0.5 --seeds 0
    python experiments/compare.py --config configs/fmnist_dinov2.py --betas 0.5,0.1 --seeds 0,1,2 \\
        --out runs/compare/fmnist_dinov2 [--config.rounds=5 ...]

Runs can be split over parallel workers (one ``--methods m --betas b --seeds s`` each, same ``--out``) or machines
(copy the run directories) and tabulated afterwards with ``--reuse_only``, which trains nothing.

Outputs in OUT: ``comparison.md`` (the table), ``comparison.json`` (rows and per-run records), ``accuracy_vs_task.png``.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lorm_jax import config as config_lib  # noqa: E402
from lorm_jax import continual  # noqa: E402
from lorm_jax import methods as methods_lib  # noqa: E402

DEFAULT_METHODS = ("lorm", "fedavg_lora", "ffa_lora", "regmean_lora", "centralized", "linear_probe")
# Methods whose run does not depend on β (one client holds all the data): one run per seed serves every β row.
BETA_FREE = ("centralized",)


def run_name(method: str, beta: float, seed: int) -> str:
    return f"{method}_s{seed}" if method in BETA_FREE else f"{method}_b{beta:g}_s{seed}"


def variant(config, method: str, beta: float, seed: int):
    """A copy of ``config`` with the method, the Dirichlet β and the seed set."""
    c = copy.deepcopy(config)
    c.method, c.seed = method, int(seed)
    if method not in BETA_FREE:  # β-free runs keep the config's β, so every β row finds the same finished run
        c.data.beta = float(beta)
    return c


def _unit_seconds(workdir: str) -> float:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return float(sum(json.loads(line).get("seconds", 0.0) for line in f if line.strip()))


def run_all(config, methods, betas, seeds, out: str, progress: bool = False, reuse_only: bool = False) -> list[dict]:
    """Run (or reuse) every combination; one record per run. ``reuse_only`` trains nothing: it collects the finished
    runs (those with a ``results.json``, e.g. written by parallel workers or on another machine) and logs the rest."""
    unknown = [m for m in methods if m not in methods_lib.NAMES]
    if unknown:
        raise config_lib.InputError(f"unknown methods {unknown}; valid: {list(methods_lib.NAMES)}")
    records = []
    for beta in betas:
        for method in methods:
            for seed in seeds:
                workdir = os.path.join(out, run_name(method, beta, seed))
                if reuse_only and not os.path.exists(os.path.join(workdir, "results.json")):
                    logging.warning("compare: %s is not finished; left out (--reuse_only)", workdir)
                    continue
                logging.info("compare: %s", workdir)
                results = continual.run(variant(config, method, beta, seed), workdir, progress=progress)
                comm = results.get("communication", {})
                records.append({"method": method, "beta": float(beta), "seed": int(seed), "workdir": workdir,
                                "final_average_accuracy": results["final_average_accuracy"],
                                "final_average_accuracy_task_mean": results["final_average_accuracy_task_mean"],
                                "forgetting": results["forgetting"],
                                "accuracy_after_task": results["accuracy_after_task"],
                                "upload_mb_per_client": comm.get("upload_mb_per_client", float("nan")),
                                "download_mb_per_client": comm.get("download_mb_per_client", float("nan")),
                                "seconds": _unit_seconds(workdir)})
    return records


def _stats(values) -> tuple[float, float]:
    x = np.asarray(values, np.float64)
    return float(np.mean(x)), (float(np.std(x, ddof=1)) if len(x) > 1 else 0.0)


def aggregate(records: list[dict]) -> list[dict]:
    """One row per (method, β) in first-seen order: means and sample stds over seeds."""
    keys = list(dict.fromkeys((r["method"], r["beta"]) for r in records))
    rows = []
    for method, beta in keys:
        group = [r for r in records if r["method"] == method and r["beta"] == beta]
        row = {"method": method, "beta": beta, "seeds": [r["seed"] for r in group]}
        for name in ("final_average_accuracy", "final_average_accuracy_task_mean", "forgetting",
                     "upload_mb_per_client", "download_mb_per_client", "seconds"):
            row[name], row[name + "_std"] = _stats([r[name] for r in group])
        curves = np.asarray([r["accuracy_after_task"] for r in group], np.float64)
        row["accuracy_after_task"] = curves.mean(0).tolist()
        row["accuracy_after_task_std"] = (curves.std(0, ddof=1) if len(group) > 1 else 0 * curves[0]).tolist()
        rows.append(row)
    return rows


def _pm(mean: float, std: float, n: int, scale: float = 100.0, digits: int = 2) -> str:
    text = f"{scale * mean:.{digits}f}"
    return text + (f" ± {scale * std:.{digits}f}" if n > 1 else "")


def markdown_table(rows: list[dict], title: str = "") -> str:
    """The comparison as a markdown table (accuracies and forgetting in %, mean ± std over seeds)."""
    lines = ([f"### {title}", ""] if title else []) + [
        "| method | β | seeds | final avg. acc. (%) | task-mean acc. (%) | forgetting (pts) | upload MB / client "
        "| download MB / client | time (s) |",
        "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        n = len(r["seeds"])
        cell = lambda name, *fmt: _pm(r[name], r[name + "_std"], n, *fmt)
        lines.append(f"| {r['method']} | {r['beta']:g} | {n} | {cell('final_average_accuracy')}"
                     f" | {cell('final_average_accuracy_task_mean')} | {cell('forgetting')}"
                     f" | {cell('upload_mb_per_client', 1.0, 3)} | {cell('download_mb_per_client', 1.0, 3)}"
                     f" | {cell('seconds', 1.0, 0)} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: str, title: str = "") -> str:
    """Accuracy after each task per method (mean over seeds, ±std band), one panel per β."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    betas = list(dict.fromkeys(r["beta"] for r in rows))
    fig, axes = plt.subplots(1, len(betas), figsize=(5 * len(betas), 3.8), squeeze=False, sharey=True)
    for ax, beta in zip(axes[0], betas):
        for r in (r for r in rows if r["beta"] == beta):
            mean = 100 * np.asarray(r["accuracy_after_task"])
            std = 100 * np.asarray(r["accuracy_after_task_std"])
            tasks = np.arange(1, len(mean) + 1)
            ax.plot(tasks, mean, "o-", label=r["method"])
            ax.fill_between(tasks, mean - std, mean + std, alpha=0.15)
            ax.set_xticks(tasks)
        ax.set_title(f"{title} β = {beta:g}".strip())
        ax.set_xlabel("tasks learned")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy on all seen classes (%)")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def compare(config, methods, betas, seeds, out: str, title: str = "", progress: bool = False,
            reuse_only: bool = False) -> str:
    """Run the study and write ``comparison.md``, ``comparison.json`` and ``accuracy_vs_task.png`` into ``out``;
    returns the markdown table."""
    os.makedirs(out, exist_ok=True)
    records = run_all(config, methods, betas, seeds, out, progress=progress, reuse_only=reuse_only)
    if not records:
        raise config_lib.InputError(f"no finished runs in {out} (--reuse_only trains nothing)")
    rows = aggregate(records)
    table = markdown_table(rows, title)
    with open(os.path.join(out, "comparison.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(out, "comparison.json"), "w") as f:
        json.dump({"rows": rows, "runs": records}, f, indent=2)
    plot(rows, os.path.join(out, "accuracy_vs_task.png"), title)
    return table


def main(argv=None) -> str:
    """CLI (``argv[0]`` is the program name): the flags below plus ``--config.KEY=VALUE`` overrides, as in
    ``lorm-jax run``. Bad input raises :class:`lorm_jax.config.InputError` (``lorm-jax compare`` prints it as one
    line); returns the markdown table."""
    argv = list(sys.argv if argv is None else argv)
    p = argparse.ArgumentParser(prog=argv[0], allow_abbrev=False, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="--config.KEY=VALUE (or --config.KEY VALUE) sets any key of the config, as in "
                                       "`lorm-jax run`.\n\nexample:\n  lorm-jax compare --config configs/tiny.py "
                                       "--methods lorm,fedavg_lora --betas 0.5,0.1 --seeds 0,1 --out runs/compare/tiny")
    p.add_argument("--config", required=True, metavar="FILE[:ARG]", help="experiment config file (get_config())")
    p.add_argument("--methods", type=_names, default=list(DEFAULT_METHODS), metavar="M,M",
                   help=f"comma-separated methods, any of {list(methods_lib.NAMES)} (default: %(default)s)")
    p.add_argument("--betas", type=_floats, default=[0.5], metavar="B,B", help="Dirichlet concentrations β")
    p.add_argument("--seeds", type=_ints, default=[0], metavar="S,S", help="seeds (config.seed)")
    p.add_argument("--out", metavar="DIR", help="study directory (default runs/compare/<config file name>)")
    p.add_argument("--progress", action="store_true", help="progress bars of the runs")
    p.add_argument("--reuse_only", action="store_true", help="train nothing: tabulate the finished runs in --out (e.g. "
                   "from parallel workers) and warn about the missing ones")
    args, rest = p.parse_known_args(argv[1:])
    overrides, stray = config_lib.split_overrides(rest)
    if stray:
        p.error(f"unrecognized arguments: {' '.join(stray)}")
    config = config_lib.load(args.config, overrides)
    config_lib.validate(config)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    for noisy in ("absl", "jax._src", "orbax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    name = os.path.splitext(os.path.basename(args.config.split(":", 1)[0]))[0]
    out = args.out or os.path.join("runs", "compare", name)
    table = compare(config, args.methods, args.betas, args.seeds, out, title=name, progress=args.progress,
                    reuse_only=args.reuse_only)
    print(table)
    print(f"\ntable: {os.path.join(out, 'comparison.md')}\nplot: {os.path.join(out, 'accuracy_vs_task.png')}")
    return table


def _names(text: str) -> list[str]:
    names = [m for m in text.split(",") if m]
    unknown = [m for m in names if m not in methods_lib.NAMES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown methods {unknown}; valid: {list(methods_lib.NAMES)}")
    return names


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None


if __name__ == "__main__":
    from lorm_jax import cli
    sys.exit(cli.main(["lorm-jax", "compare", *sys.argv[1:]]))
