"""A run's directory: its config record, the metrics file, and JSON outputs written atomically.

    WORKDIR/config.json       the config of the run (a workdir never holds runs of two configs)
    WORKDIR/metrics.jsonl     one line per unit (round or end of task), appended before the unit's checkpoint
    WORKDIR/results.json      written last: its presence means the run is finished
    WORKDIR/partition.json, run_info.json, plots, checkpoints/
"""
from __future__ import annotations

import json
import math
import os

from lorm_jax import config as config_lib
from lorm_jax import distributed

METRICS = "metrics.jsonl"
RESULTS = "results.json"


def config_json(config) -> dict:
    """The config as plain JSON data (what ``config.json`` and ``results.json`` record)."""
    return json.loads(config.to_json_best_effort())


def check_config(workdir: str, config, write: bool = True) -> None:
    """Refuse a workdir that holds a run of another config; record ``config.json`` there (if ``write``) when new."""
    path = os.path.join(workdir, "config.json")
    current = config_json(config)
    if os.path.exists(path):
        with open(path) as f:
            previous = config_lib.with_added_keys(json.load(f))  # recorded before a key existed: its default
        if previous != current:
            diff = first_difference(previous, current)
            raise ValueError(f"{workdir} holds a run with a different config ({diff}); use a new --workdir or delete "
                             "it")
    elif write:
        os.makedirs(workdir, exist_ok=True)
        write_json(path, current, indent=2, sort_keys=True)


def write_json(path: str, obj, **kwargs) -> None:
    """Write ``path`` atomically (a temporary file renamed over it): a crash never leaves half a file."""
    if not distributed.is_primary():  # multi-host: process 0 writes the run's files
        return
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, **kwargs)
    os.replace(tmp, path)


def first_difference(a, b, prefix="config") -> str:
    """The first dotted key where two JSON configs differ, with both values (for error messages)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return first_difference(a.get(k), b.get(k), f"{prefix}.{k}")
    return f"{prefix}: {a!r} before, {b!r} now"


def append_metrics(workdir: str, lines: list[dict]) -> None:
    """Append lines to ``metrics.jsonl`` (process 0 of a multi-host run)."""
    if not distributed.is_primary():
        return
    with open(os.path.join(workdir, METRICS), "a") as f:
        for line in lines:
            f.write(json.dumps(line) + "\n")


def truncate_metrics(workdir: str, units_done: int) -> None:
    """Keep the metric lines of the units a checkpoint covers (a crash may have logged a unit it did not save)."""
    path = os.path.join(workdir, METRICS)
    if not os.path.exists(path) or not distributed.is_primary():
        return
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    kept = [line for line in lines if _metric_unit(line) < units_done]
    with open(f"{path}.tmp", "w") as f:
        f.writelines(kept)
    os.replace(f"{path}.tmp", path)


def _metric_unit(line: str) -> float:
    """The unit of a metrics line; a line torn by a crash mid-write counts as not done."""
    try:
        return json.loads(line)["unit"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


def read_metrics(workdir: str) -> list[dict]:
    """The lines of ``metrics.jsonl`` as dicts (``[]`` when there is none)."""
    path = os.path.join(workdir, METRICS)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def read_results(workdir: str) -> dict | None:
    """``results.json`` of a finished run, ``None`` while it is not finished."""
    path = os.path.join(workdir, RESULTS)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)
