"""Bad configs fail before any compute with one ValueError naming the key, the value and what is allowed (the
command line's handling of it: test_cli.py)."""
import math
import sys

import jax
import ml_collections
import pytest
from conftest import REPO, tiny_config

from lorm_jax import config as config_lib
from lorm_jax import plan


def unchecked(**dotted) -> ml_collections.ConfigDict:
    """configs/tiny.py with ``dotted`` values set on its plain dict (as a config file could build it), bypassing
    ConfigDict's own assignment type checks, so that validate() is what has to catch them."""
    d = tiny_config().to_dict()
    for key, value in dotted.items():
        *parents, leaf = key.split(".")
        target = d
        for p in parents:
            target = target[p]
        target[leaf] = value
    return ml_collections.ConfigDict(d)


# (dotted key, bad value, a word the "allowed" part must contain)
STATIC_CASES = [
    ("num_client", 3, "unknown key"),                    # typo at the top level
    ("data.betta", 0.1, "unknown key"),                  # typo in a sub-dict
    ("rank", 2.5, "integer"),                            # wrong types
    ("lr", "fast", "number"),
    ("eval_every_round", 1, "bool"),
    ("data.beta", "0.5", "number"),
    ("seed", True, "integer"),
    ("data.crop_scale", 0.5, "tuple"),
    ("data.beta", 0.0, "> 0"),                           # impossible values
    ("data.beta", -1.0, "> 0"),
    ("data.beta", math.nan, "> 0"),
    ("data.beta", math.inf, "> 0"),
    ("rank", 0, ">= 1"),
    ("rank", -2, ">= 1"),
    ("num_clients", 0, ">= 1"),
    ("rounds", 0, ">= 1"),
    ("epochs", 0, ">= 1"),
    ("batch_size", 0, ">= 1"),
    ("gram_passes", 0, ">= 1"),
    ("data.classes_per_task", 0, ">= 1"),
    ("data.classes_per_task", (2, 0, 4), ">= 1"),
    ("data.classes_per_task", (), "non-empty"),
    ("data.classes_per_task", "two", "integer"),
    ("data.min_samples", -1, ">= 0"),
    ("data.max_classes", -1, ">= 0"),
    ("data.classes_per_client", 0, ">= 1"),
    ("data.class_order_seed", -2, "-1"),
    ("data.seed", -2, "-1 (use config.seed)"),
    ("data.seed", 1.0, "integer"),
    ("head_init", "timm", "reference"),
    ("data.partition", "pathological", "dirichlet"),
    ("data.augment", "mixup", "rrc"),
    ("data.crop_scale", (0.5, 0.2), "lo <= hi"),
    ("data.test_resize_ratio", 0.5, ">= 1"),
    ("data.std", (0.0, 1.0, 1.0), "> 0"),
    ("data.mean", (0.5,), "together"),
    ("data.name", "imagenet_22k", "synthetic_images"),
    ("backbone.name", "resnet50", "tiny_vit"),
    ("method", "fedprox", "lorm"),
    ("lr", 0.0, "> 0"),
    ("lr", -1e-3, "> 0"),
    ("lr_a", 0.0, "< 0 to use config.lr"),
    ("weight_decay", -0.1, ">= 0"),
    ("alpha_backbone", 1.5, "[0, 1]"),
    ("alpha_head", math.nan, "[0, 1]"),
    ("gram_network", "mean", "filler"),
    ("gram_batch_size", -1, ">= 0"),
    ("client_lanes", -1, ">= 0"),
    ("seed", -1, ">= 0"),
    ("merge_dtype", "float16", "float32"),
]


@pytest.mark.parametrize("key,value,allowed", STATIC_CASES, ids=[f"{k}={v!r}" for k, v, _ in STATIC_CASES])
def test_bad_value_is_refused_naming_the_key(key, value, allowed):
    with pytest.raises(ValueError) as e:
        config_lib.validate(unchecked(**{key: value}))
    msg = str(e.value)
    assert f"config.{key} = " in msg, msg
    assert allowed in msg, msg


@pytest.mark.skipif(jax.config.jax_enable_x64, reason="64-bit JAX is on in this process")
def test_float64_merges_need_x64():
    with pytest.raises(ValueError, match=r"config\.merge_dtype = 'float64'.*JAX_ENABLE_X64"):
        config_lib.validate(unchecked(merge_dtype="float64"))


# Checks that need the dataset, the backbone or this machine's files: build_setup runs them before any compute.
SETUP_CASES = [
    ("data.classes_per_task", 4, "must divide the number of classes (6)", {}),
    ("data.classes_per_task", 8, "at most the number of classes (6)", {}),           # more tasks than classes …
    ("data.classes_per_task", (1, 1, 1, 1, 1, 1, 1), "sum to the number of classes (6)", {}),  # … as task sizes
    ("data.classes_per_task", (2, 2), "sum to the number of classes (6)", {}),
    ("data.max_classes", 7, "at most the 6 classes", {}),
    ("rank", 33, "1 .. 32", {}),                                                        # tiny ViT width is 32
    ("data.min_samples", 6, "config.num_clients = 10", {"num_clients": 10, "data.beta": 0.01}),
    ("data.classes_per_client", 3, "config.num_clients = 4", {"data.partition": "quantity"}),
    ("data.options.data_dir", "/nonexistent/fashion", "existing folder", {"data.name": "fashion_mnist"}),
    ("backbone.options.path", "/nonexistent/vit.npz", "existing checkpoint file",
     {"backbone.name": "vit_b16_augreg_in21k"}),
]


@pytest.mark.parametrize("key,value,allowed,also", SETUP_CASES, ids=[f"{k}={v!r}" for k, v, _, _ in SETUP_CASES])
def test_data_and_backbone_dependent_values_are_refused_in_build_setup(key, value, allowed, also):
    c = unchecked(**{key: value}, **also)
    if key.endswith("options.path"):
        c.backbone.options = {"path": value}
    config_lib.validate(c)  # statically fine: what is wrong depends on the data, the backbone or the machine
    with pytest.raises(ValueError) as e:
        plan.build_setup(c)
    msg = str(e.value)
    assert f"config.{key} = " in msg, msg
    assert allowed in msg, msg


def test_missing_vit_checkpoint_path_is_named():
    c = unchecked(**{"backbone.name": "vit_b16_augreg_in21k"})
    c.backbone.options = {}
    with pytest.raises(ValueError, match=r"config\.backbone\.options\.path = None"):
        config_lib.validate_paths(c)


def test_shipped_configs_are_valid():
    sys.path.insert(0, REPO)
    from configs import default, tiny, wordnet_minilm
    for module in (tiny, default, wordnet_minilm):
        config_lib.validate(module.get_config())
