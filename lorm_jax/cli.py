"""Command line: ``lorm-jax run | report | bench-merge | bench-clients``.

    lorm-jax run --config configs/tiny.py [--config.rounds=2 ...] --workdir runs/tiny
    lorm-jax report runs/tiny [runs/other ...]
    lorm-jax bench-merge [--quick] [--json out.json]
    lorm-jax bench-clients [--quick] [--json out.json]
"""
from __future__ import annotations

import json
import logging
import os
import sys


def _summary_table(results: dict, workdir: str) -> str:
    rows = ["| after task | accuracy (all seen classes) |", "|---|---|"]
    rows += [f"| {t} | {100 * a:.2f} |" for t, a in enumerate(results["accuracy_after_task"])]
    seconds = _wall_seconds(workdir)
    rows += ["", f"final average accuracy: {100 * results['final_average_accuracy']:.2f}% "
             f"(task mean {100 * results['final_average_accuracy_task_mean']:.2f}%), "
             f"forgetting {100 * results['forgetting']:.2f} pts, "
             f"average incremental accuracy {100 * results['average_incremental_accuracy']:.2f}%"
             + (f", wall time {seconds:.0f} s" if seconds else "")]
    return "\n".join(rows)


def _wall_seconds(workdir: str) -> float | None:
    path = os.path.join(workdir, "run_info.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f).get("wall_seconds_last_session")


def run_main(argv):
    from absl import app, flags
    from ml_collections import config_flags

    flags.DEFINE_string("workdir", None, "directory for results, metrics, plots and checkpoints", required=True)
    flags.DEFINE_bool("progress", True, "show progress bars")
    flags.DEFINE_string("coordinator", None, "multi-host: process 0's host:port (or env LORM_JAX_COORDINATOR)")
    flags.DEFINE_integer("num_processes", None, "multi-host: number of processes (or env LORM_JAX_NUM_PROCESSES)")
    flags.DEFINE_integer("process_id", None, "multi-host: this process's id (or env LORM_JAX_PROCESS_ID)")
    config_flags.DEFINE_config_file("config", None, "experiment config file (get_config())", lock_config=True)

    def main(_):
        from lorm_jax import distributed
        launch = distributed.launch_from(flags.FLAGS.coordinator, flags.FLAGS.num_processes, flags.FLAGS.process_id)
        distributed.initialize(launch)  # before any device is touched
        from lorm_jax import continual
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
        for noisy in ("absl", "jax._src", "orbax"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        workdir = flags.FLAGS.workdir
        with distributed.exit_on_lost_peer(launch, workdir):
            results = continual.run(flags.FLAGS.config, workdir, progress=flags.FLAGS.progress)
        print(_summary_table(results, workdir))
        print(f"\nresults: {os.path.join(workdir, 'results.json')}\nper-round metrics: "
              f"{os.path.join(workdir, 'metrics.jsonl')}\nplots: {os.path.join(workdir, 'accuracy_matrix.png')}, "
              f"{os.path.join(workdir, 'accuracy_vs_task.png')}")

    app.run(main, argv=argv)


def report_main(argv):
    if not argv:
        raise SystemExit("usage: lorm-jax report WORKDIR [WORKDIR ...]")
    for workdir in argv:
        with open(os.path.join(workdir, "results.json")) as f:
            results = json.load(f)
        print(f"## {workdir} ({results['method']}, {results.get('backbone')}, {results.get('dataset')})\n")
        print(_summary_table(results, workdir) + "\n")


def main(argv=None):
    argv = list(sys.argv if argv is None else argv)
    commands = {"run": run_main, "report": report_main, "bench-merge": _bench_merge, "bench-clients": _bench_clients}
    if len(argv) < 2 or argv[1] not in commands:
        raise SystemExit(f"usage: lorm-jax {{{'|'.join(commands)}}} ...  (see README.md)")
    command = argv.pop(1)
    if command == "run":
        return run_main(argv)
    return commands[command](argv[1:])


def _bench_merge(argv):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"))
    import bench_merge
    return bench_merge.main(argv)


def _bench_clients(argv):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"))
    import bench_clients
    return bench_clients.main(argv)


if __name__ == "__main__":
    main()
