"""The comparison study: methods × Dirichlet β × training seeds × data seeds on one config → a markdown table and a
plot.

Two seeds, two flags, one config key each:

* ``--seeds`` sets ``config.seed``, the training randomness (LoRA and head init, batch order, augmentation);
* ``--data_seeds`` sets ``config.data.seed``, the data draws (per-class subsample, client partitions). Without it the
  config's own ``data.seed`` is kept; its default -1 means "the training seed", so ``--seeds 0,1`` alone varies both
  together (the behaviour before the two were separate; earlier studies are reused as they are).

So ``--seeds 0,1 --data_seeds 0`` varies the training seed over one fixed partition, ``--seeds 0 --data_seeds 0,1,2``
varies the partition under one training seed, and ``--seeds 0,1 --data_seeds 0,1,2`` runs the grid.

Every run is an ordinary engine run in its own workdir ``OUT/<method>_b<β>_s<seed>[_d<data seed>]`` (``_d`` only when
the data seed is set, >= 0), so the study is resumable: a finished run returns its ``results.json`` at once and an
interrupted one resumes from its checkpoint. ``centralized`` does not depend on β (one client holds all the data): its
run ``OUT/centralized_s<seed>[_d<data seed>]`` fills every β row.

The table gives, per method and β, mean ± sample std over all its runs (every training × data seed) of the final
average accuracy (pooled), of both forgetting definitions (``forgetting``: drop from the best earlier accuracy;
``forgetting_reference``: the reference's drop from the accuracy right after learning, see
:func:`lorm_jax.metrics.continual_metrics`), the upload and download MB per client over the whole run
(:mod:`lorm_jax.ledger`) and the time: the sum of the per-unit seconds in ``metrics.jsonl`` (compilation included,
setup and data loading not; it adds up across resumed sessions). A line above the table and the seed columns say
which seeds varied. Where a row has several training seeds *and* several data seeds, two more columns split the
accuracy's spread: the pooled std over training seeds within a partition and the std over partitions of the
per-partition means. The plot shows the accuracy after each task per method (mean over runs, ±std band), one panel
per β.

    lorm-jax compare --config configs/tiny.py --methods lorm,fedavg_lora --betas 0.5 --seeds 0
    lorm-jax compare --config configs/fmnist_dinov2.py --betas 0.5,0.1 --seeds 0,1 --data_seeds 0,1,2 \\
        --out runs/compare/fmnist_dinov2 [--config.rounds=5 ...]

Runs can be split over parallel workers (one ``--methods m --betas b --seeds s`` each, same ``--out``) or machines
(copy the run directories) and tabulated afterwards with ``--reuse_only``, which trains nothing.

Outputs in OUT: ``comparison.md`` (the table), ``comparison.json`` (rows and per-run records), ``accuracy_vs_task.png``.
"""
from __future__ import annotations

import argparse
import copy
import logging
import os
import sys

import numpy as np

from lorm_jax import config as config_lib
from lorm_jax import continual, metrics, plotting
from lorm_jax import methods as methods_lib
from lorm_jax import workdir as workdir_lib

DEFAULT_METHODS = ("lorm", "fedavg_lora", "ffa_lora", "regmean_lora", "centralized", "linear_probe")
# Methods whose run does not depend on β (one client holds all the data): one run per seed serves every β row.
BETA_FREE = ("centralized",)


def run_name(method: str, beta: float, seed: int, data_seed: int = -1) -> str:
    """``<method>_b<β>_s<seed>``, ``_d<data seed>`` appended when the data seed is set (>= 0); no ``_b`` for β-free
    methods."""
    name = f"{method}_s{seed}" if method in BETA_FREE else f"{method}_b{beta:g}_s{seed}"
    return name + (f"_d{data_seed}" if data_seed >= 0 else "")


def variant(config, method: str, beta: float, seed: int, data_seed: int = -1):
    """A copy of ``config`` with the method, the Dirichlet β, the training seed and the data seed set."""
    c = copy.deepcopy(config)
    c.method, c.seed, c.data.seed = method, int(seed), int(data_seed)
    if method not in BETA_FREE:  # β-free runs keep the config's β, so every β row finds the same finished run
        c.data.beta = float(beta)
    return c


def _forgetting_reference(results: dict) -> float:
    """``results["forgetting_reference"]``, or recomputed from the accuracy matrix (runs from before the key)."""
    if "forgetting_reference" in results:
        return results["forgetting_reference"]
    acc = np.asarray([[np.nan if v is None else v for v in row] for row in results["accuracy_matrix"]], np.float64)
    return metrics.continual_metrics(acc, np.asarray(results["test_sizes"]))["forgetting_reference"]


def _unit_seconds(workdir: str) -> float:
    return float(sum(line.get("seconds", 0.0) for line in workdir_lib.read_metrics(workdir)))


def run_all(config, methods, betas, seeds, out: str, progress: bool = False, reuse_only: bool = False,
            data_seeds=None) -> list[dict]:
    """Run (or reuse) every (β, method, training seed, data seed); one record per run. ``data_seeds`` None keeps the
    config's ``data.seed`` (-1: each run's data seed is its training seed). ``reuse_only`` trains nothing: it collects
    the finished runs (those with a ``results.json``, e.g. written by parallel workers or on another machine) and logs
    the rest."""
    unknown = [m for m in methods if m not in methods_lib.NAMES]
    if unknown:
        raise config_lib.InputError(f"unknown methods {unknown}; valid: {list(methods_lib.NAMES)}")
    data_seeds = [config.data.seed] if data_seeds is None else list(data_seeds)
    bad = [d for d in data_seeds if int(d) < -1]
    if bad:
        raise config_lib.InputError(f"--data_seeds {bad} are invalid: -1 (each run's training seed) or seeds >= 0")
    records = []
    for beta in betas:
        for method in methods:
            for data_seed in data_seeds:
                for seed in seeds:
                    c = variant(config, method, beta, seed, data_seed)
                    workdir = str(workdir_lib.path(out, run_name(method, beta, seed, int(data_seed))))
                    if reuse_only and workdir_lib.read_results(workdir) is None:
                        logging.warning("compare: %s is not finished; left out (--reuse_only)", workdir)
                        continue
                    logging.info("compare: %s", workdir)
                    records.append(_record(continual.run(c, workdir, progress=progress), c, beta, workdir))
    return records


def _record(results: dict, c, beta: float, workdir: str) -> dict:
    """What the table needs from one finished run (``c``: its config; ``beta``: the row it fills)."""
    comm = results.get("communication", {})
    return {"method": c.method, "beta": float(beta), "seed": int(c.seed), "data_seed": config_lib.data_seed(c),
            "seeds_coupled": c.data.seed < 0, "workdir": workdir,
            "final_average_accuracy": results["final_average_accuracy"],
            "final_average_accuracy_task_mean": results["final_average_accuracy_task_mean"],
            "forgetting": results["forgetting"], "forgetting_reference": _forgetting_reference(results),
            "accuracy_after_task": results["accuracy_after_task"],
            "upload_mb_per_client": comm.get("upload_mb_per_client", float("nan")),
            "download_mb_per_client": comm.get("download_mb_per_client", float("nan")),
            "seconds": _unit_seconds(workdir)}


def _stats(values) -> tuple[float, float]:
    x = np.asarray(values, np.float64)
    return float(np.mean(x)), (float(np.std(x, ddof=1)) if len(x) > 1 else 0.0)


METRICS = ("final_average_accuracy", "final_average_accuracy_task_mean", "forgetting", "forgetting_reference",
           "upload_mb_per_client", "download_mb_per_client", "seconds")


def _spread_split(group: list[dict], name: str) -> tuple[float, float]:
    """``(training, data)`` parts of the spread of ``name`` over a training × data seed grid: the pooled sample std
    over training seeds within each data seed, ``sqrt(mean_d var_d)``, and the sample std over data seeds of the
    per-data-seed means. NaN where a part cannot be estimated (fewer than 2 training seeds per data seed, or fewer
    than 2 data seeds)."""
    by_data = {}
    for r in group:
        by_data.setdefault(r["data_seed"], []).append(r[name])
    within = [np.var(v, ddof=1) for v in by_data.values() if len(v) > 1]
    means = [np.mean(v) for v in by_data.values()]
    return (float(np.sqrt(np.mean(within))) if within else float("nan"),
            float(np.std(means, ddof=1)) if len(means) > 1 else float("nan"))


def aggregate(records: list[dict]) -> list[dict]:
    """One row per (method, β) in first-seen order: means and sample stds over all its runs (training × data seeds),
    and for a grid the split of the accuracy's spread (:func:`_spread_split`)."""
    keys = list(dict.fromkeys((r["method"], r["beta"]) for r in records))
    rows = []
    for method, beta in keys:
        group = [r for r in records if r["method"] == method and r["beta"] == beta]
        row = {"method": method, "beta": beta, "seeds": [r["seed"] for r in group],
               "data_seeds": [r["data_seed"] for r in group],
               "seeds_coupled": all(r["seeds_coupled"] for r in group)}
        for name in METRICS:
            row[name], row[name + "_std"] = _stats([r[name] for r in group])
        row["final_average_accuracy_std_training"], row["final_average_accuracy_std_data"] = _spread_split(
            group, "final_average_accuracy")
        curves = np.asarray([r["accuracy_after_task"] for r in group], np.float64)
        row["accuracy_after_task"] = curves.mean(0).tolist()
        row["accuracy_after_task_std"] = (curves.std(0, ddof=1) if len(group) > 1 else 0 * curves[0]).tolist()
        rows.append(row)
    return rows


def _pm(mean: float, std: float, n: int, scale: float = 100.0, digits: int = 2) -> str:
    text = f"{scale * mean:.{digits}f}"
    return text + (f" ± {scale * std:.{digits}f}" if n > 1 else "")


def _values(xs) -> str:
    return ",".join(str(x) for x in sorted(set(xs)))


def varied(rows: list[dict]) -> str:
    """One line saying over which seeds the table's mean ± std runs."""
    if all(r["seeds_coupled"] for r in rows):
        return (f"Mean ± sample std over seeds {_values(s for r in rows for s in r['seeds'])}, each setting training "
                f"and data draws together (config.data.seed = -1).")
    parts = []
    for label, key in (("training seeds", "seeds"), ("data seeds (partitions)", "data_seeds")):
        values = _values(s for r in rows for s in r[key])
        parts.append(f"{label} {values} " + ("varied" if "," in values else "fixed"))
    return "Mean ± sample std over all runs of a row: " + "; ".join(parts) + "."


def markdown_table(rows: list[dict], title: str = "") -> str:
    """The comparison as a markdown table (accuracies and forgetting in %, mean ± std over the runs of a row), under a
    line saying which seeds varied; forgetting is ``forgetting`` (drop from the best earlier accuracy), ref. is
    ``forgetting_reference`` (the reference's drop from the accuracy right after learning, averaged over all tasks)."""
    split = any(not r["seeds_coupled"] and len(set(r["seeds"])) > 1 and len(set(r["data_seeds"])) > 1 for r in rows)
    head = ("| method | β | training seeds | data seeds | runs | final avg. acc. (%) | "
            + ("std over training seeds / over partitions (pts) | " if split else "")
            + "task-mean acc. (%) | forgetting (pts) | forgetting, ref. (pts) | upload MB / client "
            "| download MB / client | time (s) |")
    lines = ([f"### {title}", ""] if title else []) + [varied(rows), "", head,
                                                       "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        n = len(r["seeds"])
        cell = lambda name, *fmt: _pm(r[name], r[name + "_std"], n, *fmt)
        data = "= training" if r["seeds_coupled"] else _values(r["data_seeds"])
        parts = (f" {100 * r['final_average_accuracy_std_training']:.2f} / "
                 f"{100 * r['final_average_accuracy_std_data']:.2f} |" if split else "")
        lines.append(f"| {r['method']} | {r['beta']:g} | {_values(r['seeds'])} | {data} | {n}"
                     f" | {cell('final_average_accuracy')} |{parts} {cell('final_average_accuracy_task_mean')}"
                     f" | {cell('forgetting')} | {cell('forgetting_reference')}"
                     f" | {cell('upload_mb_per_client', 1.0, 3)} | {cell('download_mb_per_client', 1.0, 3)}"
                     f" | {cell('seconds', 1.0, 0)} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: str, title: str = "") -> str:
    """Accuracy after each task per method (mean over the runs of a row, ±std band), one panel per β."""
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
    plotting.save_png(fig, path)
    plt.close(fig)
    return path


def compare(config, methods, betas, seeds, out: str, title: str = "", progress: bool = False,
            reuse_only: bool = False, data_seeds=None) -> str:
    """Run the study and write ``comparison.md``, ``comparison.json`` and ``accuracy_vs_task.png`` into ``out``;
    returns the markdown table. ``seeds``: training seeds; ``data_seeds``: see :func:`run_all`."""
    records = run_all(config, methods, betas, seeds, out, progress=progress, reuse_only=reuse_only,
                      data_seeds=data_seeds)
    if not records:
        raise config_lib.InputError(f"no finished runs in {out} (--reuse_only trains nothing)")
    rows = aggregate(records)
    table = markdown_table(rows, title)
    workdir_lib.write_text(workdir_lib.path(out, "comparison.md"), table + "\n")
    workdir_lib.write_json(workdir_lib.path(out, "comparison.json"), {"rows": rows, "runs": records}, indent=2)
    plot(rows, workdir_lib.path(out, "accuracy_vs_task.png"), title)
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
    p.add_argument("--seeds", type=_ints, default=[0], metavar="S,S", help="training seeds (config.seed)")
    p.add_argument("--data_seeds", type=_ints, metavar="S,S", help="data seeds (config.data.seed: subsample and "
                   "partitions); default: the config's data.seed, whose default -1 follows the training seed")
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
    name = os.path.splitext(os.path.basename(args.config.split(":", 1)[0]))[0]
    out = args.out or os.path.join("runs", "compare", name)
    table = compare(config, args.methods, args.betas, args.seeds, out, title=name, progress=args.progress,
                    reuse_only=args.reuse_only, data_seeds=args.data_seeds)
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

