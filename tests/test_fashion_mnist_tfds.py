"""Fashion-MNIST through the TFDS + grain path (issue #25): prepared as a genuine TFDS dataset (ArrayRecord shards,
dataset_info.json) by TFDS's builder machinery from IDX files, read by lorm_jax.data.tfds_data, equal to the IDX
loader's arrays byte for byte; a run through either path gives the same accuracy matrix. At CI size: IDX files of a
few random images written here (the Debian copy is not needed)."""
import gzip
import json
import struct

import numpy as np
import pytest
from conftest import ONE_BLOCK, small_config

from lorm_jax import continual, data

pytest.importorskip("tensorflow_datasets", reason="needs the tfds extra")
from lorm_jax.data import fashion_mnist_tfds  # noqa: E402


def _write_idx(folder, stem, arr):
    raw = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(">" + "i" * arr.ndim, *arr.shape) + arr.tobytes()
    with gzip.open(folder / f"{stem}.gz", "wb") as f:
        f.write(raw)


@pytest.fixture(scope="module")
def copies(tmp_path_factory):
    """``(idx_dir, tfds_data_dir)``: 60 / 20 random images of 4 classes in IDX files, and their TFDS copy."""
    idx = tmp_path_factory.mktemp("idx")
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 60), ("t10k", 20)):
        _write_idx(idx, f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        _write_idx(idx, f"{prefix}-labels-idx1-ubyte", rng.permutation(np.arange(n, dtype=np.uint8) % 4))
    tfds_dir = tmp_path_factory.mktemp("tfds")
    fashion_mnist_tfds.prepare(str(tfds_dir), str(idx))
    return str(idx), str(tfds_dir)


def test_prepared_copy_is_a_tfds_dataset_equal_to_the_idx_files(copies):
    idx, tfds_dir = copies
    folder = f"{tfds_dir}/lorm_fashion_mnist/1.0.0"
    with open(f"{folder}/dataset_info.json") as f:
        info = json.load(f)
    assert info["fileFormat"] == "array_record"
    assert {s["name"]: int(s["shardLengths"][0]) for s in info["splits"]} == {"train": 60, "test": 20}
    via_idx = data.load("fashion_mnist", data_dir=idx)
    via_tfds = data.load("tfds/fashion_mnist", data_dir=tfds_dir)
    for key in ("x_train", "y_train", "x_test", "y_test"):
        a, b = getattr(via_idx, key), getattr(via_tfds, key)
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), key
    assert via_tfds.class_names == via_idx.class_names
    with pytest.raises(ValueError, match="image_size must be 0"):
        data.load("tfds/fashion_mnist", data_dir=tfds_dir, image_size=224)


@pytest.mark.slow
def test_a_run_through_tfds_equals_the_idx_run(copies, tmp_path):
    idx, tfds_dir = copies
    common = {**ONE_BLOCK, "data.options": {}, "data.classes_per_task": 2, "data.max_classes": 4,
              "data.min_samples": 2, "data.augment": "none"}
    results = [continual.run(small_config(**common, **{"data.name": name, "data.options.data_dir": folder}),
                             str(tmp_path / name.replace("/", "_")), progress=False)
               for name, folder in (("fashion_mnist", idx), ("tfds/fashion_mnist", tfds_dir))]
    assert results[0]["accuracy_matrix"] == results[1]["accuracy_matrix"]
