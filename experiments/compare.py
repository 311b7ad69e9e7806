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

import copy
import json
import logging
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

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
        raise ValueError(f"unknown methods {unknown}; valid: {list(methods_lib.NAMES)}")
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
        raise SystemExit(f"no finished runs in {out}")
    rows = aggregate(records)
    table = markdown_table(rows, title)
    with open(os.path.join(out, "comparison.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(out, "comparison.json"), "w") as f:
        json.dump({"rows": rows, "runs": records}, f, indent=2)
    plot(rows, os.path.join(out, "accuracy_vs_task.png"), title)
    return table


def main(argv=None) -> str:
    """CLI (absl flags on a private FlagValues, so ``--config.key=value`` overrides work as in ``lorm-jax run``)."""
    from absl import flags
    from ml_collections import config_flags

    argv = list(sys.argv if argv is None else argv)
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "experiment config file (get_config())", flag_values=fv,
                                    sys_argv=argv)  # registers the --config.key overrides found in argv
    flags.DEFINE_list("methods", list(DEFAULT_METHODS), f"methods, any of {list(methods_lib.NAMES)}", flag_values=fv)
    flags.DEFINE_list("betas", ["0.5"], "Dirichlet concentrations β", flag_values=fv)
    flags.DEFINE_list("seeds", ["0"], "seeds (config.seed)", flag_values=fv)
    flags.DEFINE_string("out", None, "study directory (default runs/compare/<config file name>)", flag_values=fv)
    flags.DEFINE_bool("progress", False, "progress bars of the runs", flag_values=fv)
    flags.DEFINE_bool("reuse_only", False, "train nothing: tabulate the finished runs in --out (e.g. from parallel "
                      "workers) and warn about the missing ones", flag_values=fv)
    fv(argv)
    if fv.config is None:
        raise SystemExit("--config is required")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    for noisy in ("absl", "jax._src", "orbax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    name = os.path.splitext(os.path.basename(config_flags.get_config_filename(fv["config"])))[0]
    out = fv.out or os.path.join("runs", "compare", name)
    table = compare(fv.config, fv.methods, [float(b) for b in fv.betas], [int(s) for s in fv.seeds], out,
                    title=name, progress=fv.progress, reuse_only=fv.reuse_only)
    print(table)
    print(f"\ntable: {os.path.join(out, 'comparison.md')}\nplot: {os.path.join(out, 'accuracy_vs_task.png')}")
    return table


if __name__ == "__main__":
    main()
