"""PNG plots of a finished run: the accuracy matrix as a heatmap and accuracy after each task."""
from __future__ import annotations

import io

import numpy as np

from lorm_jax import workdir as workdir_lib


def save_png(fig, file) -> str:
    """Write the matplotlib figure ``fig`` as a PNG to ``file`` (a local or remote path, through etils.epath)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    workdir_lib.write_text(file, buffer.getvalue())
    return str(file)


def plot_results(results: dict, workdir) -> list[str]:
    """Write ``accuracy_matrix.png`` and ``accuracy_vs_task.png`` into ``workdir``; returns their paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc = np.array([[np.nan if v is None else v for v in row] for row in results["accuracy_matrix"]], float)
    T = acc.shape[0]
    paths = []

    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * T, 0.8 + 0.6 * T))
    im = ax.imshow(100 * acc, vmin=0, vmax=100, cmap="viridis")
    for t in range(T):
        for tau in range(t + 1):
            ax.text(tau, t, f"{100 * acc[t, tau]:.0f}", ha="center", va="center",
                    color="white" if acc[t, tau] < 0.6 else "black", fontsize=8)
    ax.set_xlabel("evaluated task")
    ax.set_ylabel("after training task")
    ax.set_xticks(range(T))
    ax.set_yticks(range(T))
    ax.set_title(f"{results['method']}: accuracy (%)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    paths.append(save_png(fig, workdir_lib.path(workdir, "accuracy_matrix.png")))
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.5))
    tasks = np.arange(1, T + 1)
    ax.plot(tasks, 100 * np.asarray(results["accuracy_after_task"]), "o-", label="all seen classes (pooled)")
    ax.plot(tasks, 100 * np.diag(acc), "s--", alpha=0.7, label="newest task")
    ax.set_xlabel("tasks learned")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_xticks(tasks)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"{results['method']} on {results.get('dataset', '')}")
    fig.tight_layout()
    paths.append(save_png(fig, workdir_lib.path(workdir, "accuracy_vs_task.png")))
    plt.close(fig)
    return paths
