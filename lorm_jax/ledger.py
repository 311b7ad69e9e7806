"""The communication ledger: bytes one client uploads and downloads in a unit, summed over the very arrays that cross
the network (their shapes and dtypes, not a formula). What crosses is declared by the method
(:mod:`lorm_jax.methods.common` lists the vocabulary): after a round a client sends its trained factor(s), the
backbone Grams if the server merge needs them, the current task's head rows, the head Gram for a RegMean head, and
its sample count; before a round it receives the factor(s) the server changed and the task's head rows. At the end of
a task, methods whose cross-task merge needs statistics (``task_grams``) send the Grams of the merged task LoRA,
after receiving the last merged factor. The bytes are those of one client's arrays (the server's shapes, the Gram
shapes of the round's sums), counted for the clients that take part (``config.clients_per_round``).

Assumptions: a client keeps what it received (so it holds the unchanged factor, the past task factors the filler Gram
network needs, and needs no re-send); a client that did not take part in the round before receives every factor
merged since the start of the last round it took part in (in this task; the whole fresh LoRA at its first one); a
fresh task's LoRA is sent (not re-derived from a shared seed). With partial participation a client that missed a
task's end would also need that task's final factors for the filler Gram network; they are not counted
(docs/DECISIONS.md). 1 MB = 10⁶ bytes.
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


def client_payload(items, server_lora, server_head, grams, head_gram, task_rows) -> dict:
    """The arrays (shapes) one client uploads for ``items``: its trained factor(s) (the server's shapes), its
    backbone ``grams`` {path: [d] or [d, d]} and ``head_gram`` ([F] or [F, F]), the task's head rows, ``n_k``."""
    rows = np.asarray(task_rows, bool)
    arrays = {
        "A": lambda: {p: _shape(f["A"]) for p, f in server_lora.items()},
        "B": lambda: {p: _shape(f["B"]) for p, f in server_lora.items()},
        "grams": lambda: jax.tree.map(_shape, grams),
        "head": lambda: {"w": _task_rows(server_head["w"], rows, 0), "b": _task_rows(server_head["b"], rows, 0)},
        "head_gram": lambda: _shape(head_gram),
        "num_samples": lambda: jax.ShapeDtypeStruct((), jnp.float32),
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


def _shape(x) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype)


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


def _entry(up: dict, downs: list[dict]) -> dict:
    """Per participating client: ``up`` (the same for each) and the mean of ``downs`` (one per participant; whole
    bytes when they agree), with the totals over the participants."""
    m = max(len(downs), 1)
    down = {k: sum(d.get(k, 0) for d in downs) for k in dict.fromkeys(k for d in downs for k in d)}
    mean = {k: v // m if v % m == 0 else round(v / m, 1) for k, v in down.items()}
    return {"participants": len(downs), "upload_bytes": int(sum(up.values())),
            "download_bytes": sum(mean.values()), "upload_breakdown": up, "download_breakdown": mean,
            "upload_bytes_total": int(sum(up.values())) * len(downs), "download_bytes_total": int(sum(down.values()))}


def _downloads(method, round_idx: int, last_rounds, server_lora, server_head, task_rows,
               keep=DOWNLOAD_ITEMS) -> list[dict]:
    """Bytes by item (of ``keep``) each participant downloads before round ``round_idx``; ``last_rounds`` [m]: the
    last round of the task it took part in (-1: none)."""
    out, cache = [], {}
    for last in np.asarray(last_rounds).tolist():
        if last not in cache:
            items = tuple(x for x in method.downloads(round_idx, int(last)) if x in keep)
            cache[last] = {k: nbytes(v) for k, v in server_payload(items, server_lora, server_head,
                                                                   task_rows).items()}
        out.append(cache[last])
    return out


def round_entry(method, round_idx: int, factor: str, server_lora, server_head, grams, head_gram, task_rows,
                last_rounds) -> dict:
    """Bytes of one round per participating client and in total. ``server_lora`` / ``server_head``: the state the
    clients started the round from (what they downloaded); ``grams`` / ``head_gram``: one client's Gram shapes (e.g.
    the round's sums); ``last_rounds`` [m]: per participant the last round of the task it took part in before (-1:
    none; ``round_idx − 1`` when every client takes part)."""
    up = client_payload(method.uploads(factor), server_lora, server_head, grams, head_gram, task_rows)
    return _entry({k: nbytes(v) for k, v in up.items()},
                  _downloads(method, round_idx, last_rounds, server_lora, server_head, task_rows))


def task_entry(method, rounds: int, grams, server_lora, last_rounds) -> dict:
    """Bytes of the end of a task per participating client and in total, for methods whose cross-task merge uses the
    Grams of the merged task LoRA (``method.task_grams``; nothing otherwise): the factors merged since a client's
    last round down (the last merged factor, when it took part in the last round), its Grams up."""
    if not getattr(method, "task_grams", False):
        return _entry({}, [{} for _ in np.asarray(last_rounds)])
    downs = _downloads(method, rounds, last_rounds, server_lora, None, None, keep=("A", "B"))
    return _entry({"grams": nbytes(jax.tree.map(_shape, grams))}, downs)


def totals(metric_lines) -> dict:
    """Totals over all units of a run (``metrics.jsonl`` lines): per client (the sum over units of a participating
    client's bytes: one client's traffic when every client takes part in every unit), by upload item, and over every
    participant of every unit (``*_total``)."""
    up = sum(int(m.get("upload_bytes", 0)) for m in metric_lines)
    down = sum(m.get("download_bytes", 0) for m in metric_lines)
    up_all = sum(int(m.get("upload_bytes_total", 0)) for m in metric_lines)
    down_all = sum(int(m.get("download_bytes_total", 0)) for m in metric_lines)
    by_item = {}
    for m in metric_lines:
        for k, v in m.get("upload_breakdown", {}).items():
            by_item[k] = by_item.get(k, 0) + int(v)
    return {"upload_mb_per_client": up / MB, "download_mb_per_client": down / MB,
            "upload_bytes_per_client": up, "download_bytes_per_client": down,
            "upload_bytes_per_client_by_item": by_item, "upload_mb_total": up_all / MB,
            "download_mb_total": down_all / MB}
