"""TensorBoard event files (issue #25): what TensorBoard's own reader finds equals metrics.jsonl, after a resume too."""
import numpy as np
import pytest
from conftest import ONE_BLOCK, small_config

from lorm_jax import continual, events, testing
from lorm_jax import workdir as workdir_lib

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator",
                                        reason="needs the test extras (tensorboard)")


def _read_back(workdir) -> dict:
    """``{tag: [(step, value), ...]}`` as TensorBoard reads the run's event files."""
    acc = event_accumulator.EventAccumulator(str(workdir_lib.path(workdir, events.FOLDER)),
                                             size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_event_files_equal_metrics_jsonl_after_a_resume(tmp_path):
    workdir = str(tmp_path)
    config = small_config(**ONE_BLOCK)
    with pytest.raises(testing.StopRun):
        continual.run(config, workdir, progress=False, hooks=testing.stop_after(2))
    continual.run(config, workdir, progress=False)  # resumes: the event files are rebuilt, no unit twice
    expected: dict = {}
    for line in workdir_lib.read_metrics(workdir):
        for tag, value in events.scalars(line).items():
            expected.setdefault(tag, []).append((line["unit"], float(np.float32(value))))  # stored as float32
    got = _read_back(workdir)
    assert got == expected
    for tag in ("round/loss", "round/merge_residual/mean", "round/upload_bytes", "round/train_utilization",
                "task/accuracy", "task/task_accuracy/1"):
        assert tag in got, sorted(got)
    assert [step for step, _ in got["task/accuracy"]] == [2, 5]  # the end of each task
    assert len(list(workdir_lib.path(workdir, events.FOLDER).iterdir())) == 1


def test_scalars_flatten_a_metrics_line():
    line = {"unit": 3, "task": 1, "round": "end", "accuracy": 0.5, "task_accuracy": [0.25, 0.75], "factor": "B",
            "upload_breakdown": {"grams": 12}, "excluded_clients": [2], "ok": True}
    assert events.scalars(line) == {"task/accuracy": 0.5, "task/task_accuracy/0": 0.25, "task/task_accuracy/1": 0.75,
                                    "task/upload_breakdown/grams": 12.0}
    assert set(events.scalars({"unit": 0, "round": 0, "loss": 1.0})) == {"round/loss"}
