"""TensorBoard event files of a run (``WORKDIR/tensorboard/``), a view of ``metrics.jsonl`` written without TensorFlow.

Every number of a metrics line becomes a scalar at step ``unit``, tagged ``round/<key>`` for a round and ``task/<key>``
for the end of a task; nested values are flattened (``round/merge_residual/mean``, ``task/task_accuracy/2``,
``round/client_loss/7``). So TensorBoard shows the per-round losses, the accuracy after each task, utilisation, bytes
and merge residuals. Scalars are stored as float32 (TensorBoard's ``simple_value``). ``metrics.jsonl`` stays the source
of truth: when a run (re)starts, the event files are rewritten from it, so they never hold a unit twice.

Records are TFRecord-framed ``Event`` protos (tensorboardX's protos and CRC), written through ``etils.epath``.
"""
from __future__ import annotations

import socket
import struct
import time

from etils import epath

from lorm_jax import workdir as workdir_lib

FOLDER = "tensorboard"
_IDS = ("unit", "task", "round", "excluded_clients")  # identifiers, not measurements


def scalars(line: dict) -> dict[str, float]:
    """The TensorBoard scalars of one metrics line: ``{tag: value}``."""
    prefix = "task" if line.get("round") == "end" else "round"
    out: dict[str, float] = {}

    def walk(tag: str, value) -> None:
        if isinstance(value, bool) or value is None or isinstance(value, str):
            return
        if isinstance(value, (int, float)):
            out[tag] = float(value)
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(f"{tag}/{k}", v)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(f"{tag}/{i}", v)

    for key, value in line.items():
        if key not in _IDS:
            walk(f"{prefix}/{key}", value)
    return out


class EventWriter:
    """Writes one event file into ``WORKDIR/tensorboard``: ``write(lines)`` after every unit, ``close()`` at the end.
    Opening it deletes earlier event files and writes every line already in ``metrics.jsonl``."""

    def __init__(self, workdir):
        from tensorboardX.proto import event_pb2, summary_pb2
        from tensorboardX.record_writer import masked_crc32c
        self._event_pb2, self._summary_pb2, self._crc = event_pb2, summary_pb2, masked_crc32c
        folder = workdir_lib.path(workdir, FOLDER)
        if folder.exists():
            folder.rmtree()
        folder.mkdir(parents=True, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.lorm_jax"
        self._file = epath.Path(folder / name).open("wb")
        self._record(self._event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))
        self.write(workdir_lib.read_metrics(workdir))

    def _record(self, event) -> None:
        data = event.SerializeToString()
        header = struct.pack("<Q", len(data))
        self._file.write(header + struct.pack("<I", self._crc(header)) + data + struct.pack("<I", self._crc(data)))

    def write(self, lines: list[dict]) -> None:
        """Append the scalars of ``lines`` (:func:`scalars`) and flush."""
        for line in lines:
            values = [self._summary_pb2.Summary.Value(tag=tag, simple_value=v) for tag, v in scalars(line).items()]
            self._record(self._event_pb2.Event(wall_time=time.time(), step=int(line["unit"]),
                                               summary=self._summary_pb2.Summary(value=values)))
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> EventWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
