"""The ``lorm-jax`` command: run, report and compare experiments; the benchmarks.

    lorm-jax --help              the verbs, their flags and an example each
    lorm-jax VERB --help         every flag of one verb

Bad input (a config value or key, a missing file, a bad flag or workdir, a run directory without results) prints one
line ``lorm-jax: error: ...`` to stderr and exits with status 2; ``--verbose`` (anywhere on the command line) or
``LORM_JAX_VERBOSE=1`` prints its traceback first. An error inside a running experiment keeps its traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import traceback
from typing import Callable, NamedTuple

from lorm_jax import config as config_lib


class Verb(NamedTuple):
    summary: str
    usage: str      # the flags, after ``lorm-jax VERB``
    example: str
    main: Callable[[list[str]], object]


# ---------------------------------------------------------------------------------------------------------------------
# run, report
# ---------------------------------------------------------------------------------------------------------------------

def _run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lorm-jax run", usage="lorm-jax run " + VERBS["run"].usage, allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=VERBS["run"].summary + ".\n\n"
        "--config.KEY=VALUE (or --config.KEY VALUE) sets any key of the config, e.g. --config.data.beta=0.1\n"
        "--config.rank=4 --config.backbone.options.compute_dtype=bfloat16; every key, its default and meaning:\n"
        "lorm_jax/config.py, base_config(). The config is checked before any compute.",
        epilog="example:\n  " + VERBS["run"].example + "\n\nwrites into DIR: results.json, metrics.jsonl (one line per "
        "round), config.json, accuracy_matrix.png,\naccuracy_vs_task.png and orbax checkpoints.")
    p.add_argument("--config", required=True, metavar="FILE[:ARG]",
                   help="experiment config file (a get_config()); ':ARG' is passed to get_config, "
                        "e.g. configs/paper/cifar100.py:0.5")
    p.add_argument("--workdir", required=True, metavar="DIR", help="directory for results, metrics, plots and "
                   "checkpoints; the same command again resumes there, a finished run is not recomputed")
    p.add_argument("--noprogress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--coordinator", metavar="HOST:PORT",
                   help="multi-host: process 0's address (or env LORM_JAX_COORDINATOR)")
    p.add_argument("--num_processes", type=int, metavar="N",
                   help="multi-host: number of processes (or env LORM_JAX_NUM_PROCESSES)")
    p.add_argument("--process_id", type=int, metavar="I", help="multi-host: this process's id, 0 .. N-1 "
                   "(or env LORM_JAX_PROCESS_ID)")
    return p


def run_main(argv: list[str], hooks=None) -> int:
    """``lorm-jax run``; ``hooks``: :class:`lorm_jax.continual.Hooks` of the run (e.g. fault injection in tests)."""
    parser = _run_parser()
    args, rest = parser.parse_known_args(argv)
    overrides, stray = config_lib.split_overrides(rest)
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    config = config_lib.load(args.config, overrides)
    config_lib.validate(config)
    from lorm_jax import distributed
    try:
        launch = distributed.launch_from(args.coordinator, args.num_processes, args.process_id)
    except ValueError as e:  # launch_from only reads the flags and the environment
        raise config_lib.InputError(f"run: {e}") from e
    distributed.initialize(launch)  # before any device is touched
    _check_workdir(args.workdir, config)
    from lorm_jax import continual
    configure_logging()
    workdir = args.workdir
    with distributed.exit_on_lost_peer(launch, workdir):  # a lost peer: one clear line and exit 75, not a hang
        results = continual.run(config, workdir, progress=args.progress,
                                **({} if hooks is None else {"hooks": hooks}))
    print(_summary_table(results, workdir))
    where = lambda name: os.path.join(workdir, name)  # noqa: E731 - as the user named the workdir
    print(f"\nresults: {where('results.json')}\nper-round metrics: {where('metrics.jsonl')}\nplots: "
          f"{where('accuracy_matrix.png')}, {where('accuracy_vs_task.png')}"
          + (f"\nTensorBoard: tensorboard --logdir {where('tensorboard')}" if config.tensorboard else ""))
    return 0


def configure_logging() -> None:
    """INFO lines of lorm_jax (plan, schedule, rounds, resume) on stderr; absl / jax / orbax only from WARNING.
    ``force``: a root handler installed during some import would otherwise make this a no-op."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", force=True)
    for noisy in ("absl", "jax._src", "orbax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _check_workdir(workdir: str, config) -> None:
    """``workdir`` (local or e.g. ``gs://``, through etils.epath) is a writable directory (made if missing) that holds
    no run of another config."""
    from lorm_jax import workdir as workdir_lib
    path = workdir_lib.path(workdir)
    try:
        if path.exists() and not path.is_dir():
            raise config_lib.InputError(f"--workdir {workdir}: exists and is not a directory")
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise config_lib.InputError(f"--workdir {workdir}: cannot create it ({e.strerror or e})") from e
    if "://" not in workdir and not os.access(path, os.W_OK | os.X_OK):
        raise config_lib.InputError(f"--workdir {workdir}: not writable")
    try:
        workdir_lib.check_config(workdir, config, write=False)
    except ValueError as e:  # it raises only for a workdir that holds a run of a different config
        raise config_lib.InputError(str(e)) from e


def report_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="lorm-jax report", usage="lorm-jax report " + VERBS["report"].usage,
                                description=VERBS["report"].summary + ".",
                                epilog="example:\n  " + VERBS["report"].example,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workdirs", nargs="+", metavar="WORKDIR", help="run directory (the --workdir of `lorm-jax run`)")
    workdirs = p.parse_args(argv).workdirs
    from lorm_jax import workdir as workdir_lib
    loaded = []
    for workdir in workdirs:  # every input first: an error prints nothing half-done
        path = os.path.join(workdir, "results.json")
        try:
            results = workdir_lib.read_results(workdir)
        except json.JSONDecodeError as e:
            raise config_lib.InputError(f"report: {path} is not valid JSON ({e})") from e
        if results is None:
            raise config_lib.InputError(f"report: {path} not found ({workdir} is not a finished run; the same "
                                        "`lorm-jax run` command finishes or resumes it)")
        loaded.append((workdir, results))
    for workdir, results in loaded:
        print(f"## {workdir} ({results['method']}, {results.get('backbone')}, {results.get('dataset')})\n")
        print(_summary_table(results, workdir) + "\n")
    return 0


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
    from lorm_jax import workdir as workdir_lib
    info = workdir_lib.read_json(workdir_lib.path(workdir, "run_info.json"))
    return None if info is None else info.get("wall_seconds_last_session")


# ---------------------------------------------------------------------------------------------------------------------
# compare and the benchmarks (lorm_jax.compare, lorm_jax.bench), each with its own parser; imported when its verb runs.
# ---------------------------------------------------------------------------------------------------------------------

def _module_verb(verb: str, main: Callable[[list[str]], object], argv: list[str]):
    """``main(argv)`` of a verb's module; its ``--help`` comes after our summary and example."""
    if "-h" in argv or "--help" in argv:
        print(f"lorm-jax {verb}: {VERBS[verb].summary}\nexample: {VERBS[verb].example}\n")
    return main(argv)


def compare_main(argv: list[str]):
    from lorm_jax import compare
    configure_logging()
    return _module_verb("compare", compare.main, ["lorm-jax compare", *argv])


def bench_merge_main(argv: list[str]):
    from lorm_jax.bench import merge
    return _module_verb("bench-merge", merge.main, argv)


def bench_clients_main(argv: list[str]):
    from lorm_jax.bench import clients
    return _module_verb("bench-clients", clients.main, argv)


def bench_accelerator_main(argv: list[str]):
    from lorm_jax.bench import accelerator
    return _module_verb("bench-accelerator", accelerator.main, argv)


def aot_main(argv: list[str]):
    import jax
    if not os.environ.get("JAX_PLATFORMS"):  # the compilers need no local accelerator: never initialise one here
        jax.config.update("jax_platforms", "cpu")
    from lorm_jax import aot
    configure_logging()
    return _module_verb("aot", aot.main, argv)


VERBS: dict[str, Verb] = {
    "run": Verb("train and evaluate one experiment (the same command again resumes it)",
                "--config FILE[:ARG] --workdir DIR [--config.KEY=VALUE ...] [--noprogress] "
                "[--coordinator HOST:PORT --num_processes N --process_id I]",
                "lorm-jax run --config configs/tiny.py --workdir runs/tiny --config.data.beta=0.1", run_main),
    "report": Verb("summary tables of finished runs (their results.json)", "WORKDIR [WORKDIR ...]",
                   "lorm-jax report runs/tiny runs/default", report_main),
    "compare": Verb("methods x Dirichlet beta x seeds on one config: a markdown table and a plot "
                    "(lorm_jax.compare; resumable)",
                    "--config FILE[:ARG] [--methods M,M] [--betas B,B] [--seeds S,S] [--data_seeds S,S] [--out DIR] "
                    "[--reuse_only] "
                    "[--progress] [--config.KEY=VALUE ...]",
                    "lorm-jax compare --config configs/tiny.py --methods lorm,fedavg_lora --betas 0.5,0.1 --seeds 0,1 "
                    "--out runs/compare/tiny",
                    compare_main),
    "bench-merge": Verb("time the jitted LoRM merge against a float64 pinv loop (lorm_jax.bench.merge)",
                        "[--quick] [--json OUT] [--x64] [--models M ...] [--factors F ...] [--grams G ...] "
                        "[--ranks R ...] [--clients K] [--repeats N] [--baseline-budget S] [--call-timeout S] "
                        "[--seed N]",
                        "lorm-jax bench-merge --quick --json merge.json", bench_merge_main),
    "bench-clients": Verb("local-training throughput on Dirichlet-sized clients: padded vmap vs lanes vs a loop over "
                          "clients; --scale: the engine at K = 100 / 1,000 / 10,000 (lorm_jax.bench.clients)",
                          "[--quick] [--json OUT] [--markdown OUT] [--backbones NAME,NAME] [--betas B,B] "
                          "[--scale [--clients K,K] [--grams diag,full] [--engines blocks,clients]]",
                          "lorm-jax bench-clients --quick --json clients.json", bench_clients_main),
    "bench-accelerator": Verb("the paper-scale round and merges on an accelerator, next to the reference's PyTorch "
                              "loop (lorm_jax.bench.accelerator)",
                              "[flags: lorm-jax bench-accelerator --help]", "lorm-jax bench-accelerator",
                              bench_accelerator_main),
    "aot": Verb("compile every program of a run for a TPU slice (or this CPU) without one: compile time, memory per "
                "chip, FLOPs, roofline time and MFU per program (lorm_jax.aot)",
                "--config FILE[:ARG] --topology v5e:4x4|v4:2x2x2|v5p:2x2x1|v6e:4x4|h100|cpu [--dtype bfloat16] "
                "[--json OUT] [--no-compile] [--config.KEY=VALUE ...]",
                "lorm-jax aot --config configs/paper/cifar100.py:0.5 --topology v5e:4x4", aot_main),
}


def overview() -> str:
    """``lorm-jax --help``."""
    lines = ["usage: lorm-jax VERB [flags] [--verbose]", "",
             "LoRM (closed-form merging of LoRA modules) for federated class-incremental learning, in JAX.",
             "`lorm-jax VERB --help` explains every flag of a verb.", "", "verbs:"]
    for name, verb in VERBS.items():
        lines += [f"  {name:<18} {verb.summary}", f"  {'':<18} lorm-jax {name} {verb.usage}",
                  f"  {'':<18} e.g. {verb.example}", ""]
    lines += ["flags of every verb:",
              f"  {'--verbose':<18} on an input error, print its traceback too (or set LORM_JAX_VERBOSE=1)",
              f"  {'-h, --help':<18} help", "",
              "Bad input (a config value or key, a missing file, a bad flag) prints one line `lorm-jax: error: ...`",
              "and exits with status 2."]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------------
# Entry point and input errors.
# ---------------------------------------------------------------------------------------------------------------------

def _input_error_types() -> tuple[type, ...]:
    """Errors that mean bad input: the config's :class:`~lorm_jax.config.InputError` and, from modules already
    imported (an error cannot come from one that is not), a missing weight package or dataset, a corrupt dataset."""
    found = [config_lib.InputError]
    for module, name in (("lorm_jax.backbones.common", "MissingAssetError"),
                         ("lorm_jax.data.datasets", "DatasetNotFoundError"),
                         ("lorm_jax.data.datasets", "DatasetFormatError")):
        if module in sys.modules:
            found.append(getattr(sys.modules[module], name))
    return tuple(found)


@contextlib.contextmanager
def _argparse_errors_raise(verb: str):
    """argparse's ``error()`` prints the usage and exits; inside a verb (ours or an experiment's parser) it raises
    :class:`~lorm_jax.config.InputError` instead, so that every bad flag ends in the same one line."""
    def error(parser, message):
        raise config_lib.InputError(f"{verb}: {message} (see lorm-jax {verb} --help)")
    saved = argparse.ArgumentParser.error
    argparse.ArgumentParser.error = error
    try:
        yield
    finally:
        argparse.ArgumentParser.error = saved


def main(argv: list[str] | None = None, *, hooks=None) -> int:
    """``lorm-jax VERB ...`` (``argv[0]`` is the program name); returns the exit status. ``hooks``
    (:class:`lorm_jax.continual.Hooks`) go to the ``run`` verb's experiment."""
    argv = list(sys.argv if argv is None else argv)[1:]
    verbose = "--verbose" in argv or os.environ.get("LORM_JAX_VERBOSE", "") not in ("", "0")
    argv = [a for a in argv if a != "--verbose"]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(overview(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    verb, rest = argv[0], argv[1:]
    try:
        if verb not in VERBS:
            raise config_lib.InputError(f"unknown verb {verb!r}; one of {', '.join(VERBS)} (see lorm-jax --help)")
        with _argparse_errors_raise(verb):
            status = VERBS[verb].main(rest) if hooks is None else run_main(rest, hooks)
    except Exception as e:
        if not isinstance(e, _input_error_types()):
            raise
        if verbose:
            traceback.print_exc()
        print(f"lorm-jax: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    return status if isinstance(status, int) else 0


if __name__ == "__main__":
    sys.exit(main())
