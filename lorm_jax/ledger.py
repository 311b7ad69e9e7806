"""The communication ledger: bytes one client uploads and downloads in a unit, summed over the very arrays that cross
the network (their shapes and dtypes, not a formula). What crosses is declared by the method
(:mod:`lorm_jax.methods.common` lists the vocabulary): after a round a client sends its trained factor(s), the
backbone Grams if the server merge needs them, the current task's head rows, the head Gram for a RegMean head, and
its sample count; before a round it receives the factor(s) the server changed and the task's head rows. At the end of
a task, methods whose cross-task merge needs statistics (``task_grams``) send the Grams of the merged task LoRA,
after receiving the last merged factor. Every client exchanges arrays of the same shapes, so per-client bytes are
``bytes of the client-stacked array / K``.

Assumptions: every client takes part in every round and keeps what it received (so it holds the unchanged factor, the
past task factors the filler Gram network needs, and needs no re-send); a fresh task's LoRA is sent (not re-derived
from a shared seed). 1 MB = 10⁶ bytes.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

MB = 1e6
UPLOAD_ITEMS = ("A", "B", "grams", "head", "head_gram", "num_samples")
DOWNLOAD_ITEMS = ("A", "B", "head")


def nbytes(tree) -> int:
    """Total bytes of the array leaves of a pytree (arrays or ``jax.ShapeDtypeStruct``)."""
    return int(sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def client_payload(items, client_lora, grams, client_heads, head_grams, num_samples, task_rows) -> dict:
    """The client-stacked arrays (leading K) that the clients upload for ``items`` (the head rows as their shape)."""
    rows = np.asarray(task_rows, bool)
    arrays = {
        "A": lambda: {p: f["A"] for p, f in client_lora.items()},
        "B": lambda: {p: f["B"] for p, f in client_lora.items()},
        "grams": lambda: grams,
        "head": lambda: {"w": _task_rows(client_heads["w"], rows, 1), "b": _task_rows(client_heads["b"], rows, 1)},
        "head_gram": lambda: head_grams,
        "num_samples": lambda: jnp.asarray(num_samples, jnp.float32),
    }
    _check_items(items, UPLOAD_ITEMS)
    return {item: arrays[item]() for item in items}


def server_payload(items, server_lora, server_head, task_rows) -> dict:
    """The server arrays (unstacked) that each client downloads for ``items``."""
    rows = np.asarray(task_rows, bool)
    arrays = {
        "A": lambda: {p: f["A"] for p, f in server_lora.items()},
        "B": lambda: {p: f["B"] for p, f in server_lora.items()},
        "head": lambda: {"w": _task_rows(server_head["w"], rows, 0), "b": _task_rows(server_head["b"], rows, 0)},
    }
    _check_items(items, DOWNLOAD_ITEMS)
    return {item: arrays[item]() for item in items}


def _task_rows(x, rows: np.ndarray, axis: int) -> jax.ShapeDtypeStruct:
    """Shape and dtype of ``x`` restricted to the task's rows along ``axis`` (no device gather: arrays may be sharded
    over hosts)."""
    shape = list(x.shape)
    shape[axis] = int(rows.sum())
    return jax.ShapeDtypeStruct(tuple(shape), x.dtype)


def _check_items(items, allowed):
    unknown = set(items) - set(allowed)
    if unknown:
        raise ValueError(f"unknown payload items {sorted(unknown)}; allowed: {list(allowed)}")


def _entry(up: dict, down: dict) -> dict:
    return {"upload_bytes": int(sum(up.values())), "download_bytes": int(sum(down.values())),
            "upload_breakdown": up, "download_breakdown": down}


def round_entry(method, round_idx: int, factor: str, client_lora, grams, client_heads, head_grams, num_samples,
                task_rows, server_lora, server_head) -> dict:
    """Per-client bytes of one round. ``server_lora`` / ``server_head``: the state the clients started the round from
    (what they downloaded); the client-stacked arguments: what the server's merge received."""
    num_clients = int(np.asarray(num_samples).shape[0])
    up = client_payload(method.uploads(factor), client_lora, grams, client_heads, head_grams, num_samples, task_rows)
    down = server_payload(method.downloads(round_idx), server_lora, server_head, task_rows)
    return _entry({k: nbytes(v) // num_clients for k, v in up.items()}, {k: nbytes(v) for k, v in down.items()})


def task_entry(method, last_factor: str, grams, server_lora, num_clients: int) -> dict:
    """Per-client bytes of the end of a task: the last merged factor down and the task Grams up, for methods whose
    cross-task merge uses them (``method.task_grams``); nothing otherwise."""
    if not getattr(method, "task_grams", False):
        return _entry({}, {})
    down = server_payload(tuple(last_factor), server_lora, None, None)
    return _entry({"grams": nbytes(grams) // num_clients}, {k: nbytes(v) for k, v in down.items()})


def totals(metric_lines) -> dict:
    """Totals per client over all units of a run (``metrics.jsonl`` lines): bytes, MB and the upload by item."""
    up = sum(int(m.get("upload_bytes", 0)) for m in metric_lines)
    down = sum(int(m.get("download_bytes", 0)) for m in metric_lines)
    by_item = {}
    for m in metric_lines:
        for k, v in m.get("upload_breakdown", {}).items():
            by_item[k] = by_item.get(k, 0) + int(v)
    return {"upload_mb_per_client": up / MB, "download_mb_per_client": down / MB,
            "upload_bytes_per_client": up, "download_bytes_per_client": down,
            "upload_bytes_per_client_by_item": by_item}
