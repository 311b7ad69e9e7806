"""A run's directory: its config record, the metrics file, and JSON outputs written atomically.

    WORKDIR/config.json       the config of the run (a workdir never holds runs of two configs)
    WORKDIR/metrics.jsonl     one line per unit (round or end of task), written before the unit's checkpoint
    WORKDIR/results.json      written last: its presence means the run is finished
    WORKDIR/partition.json, run_info.json, plots, tensorboard/, checkpoints/

Every path goes through ``etils.epath``: a workdir may be a local folder or ``gs://bucket/...`` (any filesystem epath
has a backend for, e.g. gcsfs). Files are replaced whole (written to ``<name>.tmp``, then renamed over the old one),
so a crash never leaves half a file, and no filesystem needs to support appending.
"""
from __future__ import annotations

import json
import math
import os

from etils import epath

from lorm_jax import config as config_lib
from lorm_jax import distributed

METRICS = "metrics.jsonl"
RESULTS = "results.json"


def path(workdir, *names: str) -> epath.Path:
    """``workdir/names...`` as an ``epath.Path``; a local path is made absolute (orbax needs absolute paths)."""
    root = epath.Path(workdir)
    if "://" not in os.fspath(workdir):
        root = epath.Path(os.path.abspath(os.fspath(workdir)))
    return root.joinpath(*names)


def config_json(config) -> dict:
    """The config as plain JSON data (what ``config.json`` and ``results.json`` record)."""
    return json.loads(config.to_json_best_effort())


def check_config(workdir, config, write: bool = True) -> None:
    """Refuse a workdir that holds a run of another config; record ``config.json`` there (if ``write``) when new."""
    file = path(workdir, "config.json")
    current = config_json(config)
    if file.exists():
        previous = config_lib.with_added_keys(json.loads(file.read_text()))  # recorded before a key existed: default
        if previous != current:
            diff = first_difference(previous, current)
            raise ValueError(f"{workdir} holds a run with a different config ({diff}); use a new --workdir or delete "
                             "it")
    elif write:
        write_json(file, current, indent=2, sort_keys=True)


def write_text(file, text: str | bytes) -> None:
    """Replace ``file`` (a path or ``epath.Path``) atomically: a temporary file renamed over it. Process 0 only."""
    if not distributed.is_primary():  # multi-host: process 0 writes the run's files
        return
    file = epath.Path(file)
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(file.name + ".tmp")
    if isinstance(text, bytes):
        tmp.write_bytes(text)
    else:
        tmp.write_text(text)
    tmp.replace(file)


def write_json(file, obj, **kwargs) -> None:
    """Write ``obj`` as JSON to ``file`` atomically (:func:`write_text`)."""
    write_text(file, json.dumps(obj, **kwargs))


def first_difference(a, b, prefix="config") -> str:
    """The first dotted key where two JSON configs differ, with both values (for error messages)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return first_difference(a.get(k), b.get(k), f"{prefix}.{k}")
    return f"{prefix}: {a!r} before, {b!r} now"


def append_metrics(workdir, lines: list[dict]) -> None:
    """Add lines to ``metrics.jsonl`` (process 0 of a multi-host run). The file is rewritten whole (one run has at
    most a few hundred lines), which every filesystem supports; a crash leaves the old or the new file."""
    if not distributed.is_primary():
        return
    file = path(workdir, METRICS)
    old = file.read_text() if file.exists() else ""
    write_text(file, old + "".join(json.dumps(line) + "\n" for line in lines))


def truncate_metrics(workdir, units_done: int) -> None:
    """Keep the metric lines of the units a checkpoint covers (a crash may have logged a unit it did not save)."""
    file = path(workdir, METRICS)
    if not distributed.is_primary() or not file.exists():
        return
    lines = [line for line in file.read_text().splitlines(keepends=True) if line.strip()]
    write_text(file, "".join(line for line in lines if _metric_unit(line) < units_done))


def _metric_unit(line: str) -> float:
    """The unit of a metrics line; a line torn by a crash mid-write counts as not done."""
    try:
        return json.loads(line)["unit"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


def read_metrics(workdir) -> list[dict]:
    """The lines of ``metrics.jsonl`` as dicts (``[]`` when there is none)."""
    file = path(workdir, METRICS)
    if not file.exists():
        return []
    return [json.loads(line) for line in file.read_text().splitlines() if line.strip()]


def read_json(file) -> dict | None:
    """The JSON file ``file`` (a path or ``epath.Path``), ``None`` if it does not exist."""
    file = epath.Path(file)
    return json.loads(file.read_text()) if file.exists() else None


def read_results(workdir) -> dict | None:
    """``results.json`` of a finished run, ``None`` while it is not finished."""
    return read_json(path(workdir, RESULTS))
