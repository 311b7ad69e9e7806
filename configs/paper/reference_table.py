"""The paper setup in one place: the reference's README commands (LORM_SPEC §10.5) and per-dataset protocol (§10.2-4).

The six config files next to this one are thin wrappers: ``get_config(beta)`` = :func:`paper_config` of their
dataset. Run one with ``lorm-jax run --config=configs/paper/cifar100.py:0.5 ...`` (the text after ``:`` is β).

Common to all runs (reference README): ViT-B/16 AugReg in21k, batch 16, 5 local epochs, 10 clients, weight decay 0,
α_backbone 0 (diagonal Grams), LoRA on the fused qkv / proj / fc1 / fc2 of every block, alternating B/A rounds, AdamW,
seed 42, natural class order, Dirichlet(β) label partition with ≥ 6 samples per client and task.
"""
from __future__ import annotations

import ml_collections

from lorm_jax.config import base_config

VIT_PATH_PLACEHOLDER = "/path/to/ViT-B_16-augreg-in21k.npz"  # gs://vit_models/augreg/B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz
DATA_DIR_PLACEHOLDER = "/path/to/tensorflow_datasets"

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
HALF, ZERO, ONE = (0.5, 0.5, 0.5), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)

# β -> (lr, lr_a, lr_b, rank, rounds, alpha_head, gram_passes); lr_a / lr_b = -1 means "= lr" (head lr).
# Columns of the README table: lr, lr_A, lr_B, r, rounds/task, α_head, regmean_rounds.
HPARAMS = {
    "cifar100": {
        0.5: (3e-3, -1, -1, 1, 5, 0.5, 1),
        0.1: (3e-4, -1, -1, 16, 5, 0.5, 1),
        0.05: (5e-4, -1, -1, 16, 5, 0.5, 1),
    },
    "imagenet_r": {
        0.5: (3e-3, -1, -1, 2, 5, 0.5, 2),
        0.1: (1e-3, -1, -1, 32, 5, 0.5, 2),
        0.05: (1e-3, -1, -1, 16, 5, 0.5, 2),
    },
    "eurosat": {
        1.0: (3e-3, -1, -1, 1, 5, 0.5, 2),
        0.5: (1e-3, -1, -1, 1, 5, 0.5, 2),
        0.2: (3e-3, -1, -1, 1, 5, 0.5, 2),
    },
    "cub200": {
        1.0: (1e-2, 3e-3, -1, 1, 5, 0.3, 2),
        0.5: (3e-2, 1e-3, -1, 1, 5, 0.3, 2),
        0.2: (3e-2, 3e-3, -1, 1, 5, 0.3, 2),
    },
    "cars196": {
        1.0: (1e-2, 1e-2, 1e-3, 8, 10, 0.5, 2),
        0.5: (1e-2, 1e-2, 1e-3, 8, 10, 0.5, 2),
        0.2: (1e-2, 1e-2, 1e-3, 4, 10, 0.5, 2),
    },
    "imagenet_a": {
        1.0: (1e-2, 1e-2, 1e-3, 4, 10, 0.5, 2),
        0.5: (1e-2, 1e-2, 1e-3, 4, 10, 0.5, 2),
        0.2: (1e-2, 1e-2, 1e-3, 4, 10, 0.5, 2),
    },
}

# Per-dataset data protocol (LORM_SPEC §10.2 tasks, §10.4 transforms and normalisation).
DATA = {
    "cifar100": dict(name="tfds/cifar100", classes_per_task=10, augment="rrc", crop_scale=(0.08, 1.0),
                     test_resize_ratio=256 / 224, mean=HALF, std=HALF),
    "imagenet_r": dict(name="tfds/imagenet_r", classes_per_task=20, augment="rrc", crop_scale=(0.08, 1.0),
                       test_resize_ratio=256 / 224, mean=HALF, std=HALF),
    "imagenet_a": dict(name="tfds/imagenet_a", classes_per_task=20, augment="rrc", crop_scale=(0.05, 1.0),
                       test_resize_ratio=256 / 224, mean=IMAGENET_MEAN, std=IMAGENET_STD),
    "cub200": dict(name="tfds/caltech_birds2011", classes_per_task=20, augment="crop",
                   test_resize_ratio=256 / 224, mean=IMAGENET_MEAN, std=IMAGENET_STD),
    "cars196": dict(name="tfds/cars196", classes_per_task=(20,) * 9 + (16,), augment="flip",
                    test_resize_ratio=0.0, mean=ZERO, std=ONE),
    "eurosat": dict(name="tfds/eurosat/rgb", classes_per_task=2, augment="none",
                    test_resize_ratio=0.0, mean=ZERO, std=ONE),
}
# Loader options beyond data_dir / image_size that must exist in the config to be overridable from the command line.
EXTRA_OPTIONS = {
    "imagenet_r": {"split_seed": 0}, "imagenet_a": {"split_seed": 0}, "eurosat": {"split_seed": 0},
    "cars196": {"manual_dir": ""},
}
DESCRIPTION = {
    "cifar100": "CIFAR-100", "imagenet_r": "ImageNet-R", "imagenet_a": "ImageNet-A", "cub200": "CUB-200",
    "cars196": "Cars-196", "eurosat": "EuroSAT (RGB)",
}


def valid_betas(dataset: str) -> tuple[float, ...]:
    return tuple(HPARAMS[dataset])


def parse_beta(dataset: str, arg) -> float:
    """β from the text after ``:`` in ``--config=configs/paper/<dataset>.py:<β>``; one of the dataset's three."""
    valid = valid_betas(dataset)
    listing = ", ".join(f"{b:g}" for b in valid)
    if arg is None or str(arg).strip() == "":
        raise ValueError(f"configs/paper/{dataset}.py needs β: --config=configs/paper/{dataset}.py:<β> with β one of "
                         f"{listing}")
    try:
        value = float(str(arg).strip())
    except ValueError:
        raise ValueError(f"{dataset}: β={arg!r} is not a number; the paper's values are {listing}") from None
    for b in valid:
        if abs(value - b) <= 1e-9 * max(1.0, b):
            return b
    raise ValueError(f"{dataset}: β={arg!r} is not one of the paper's values for this dataset: {listing}")


def paper_config(dataset: str, beta_arg) -> ml_collections.ConfigDict:
    """The reference run of ``dataset`` (a key of :data:`HPARAMS`) at β = ``beta_arg`` (str or float)."""
    if dataset not in HPARAMS:
        raise ValueError(f"unknown paper dataset {dataset!r}; valid: {', '.join(HPARAMS)}")
    beta = parse_beta(dataset, beta_arg)
    lr, lr_a, lr_b, rank, rounds, alpha_head, gram_passes = HPARAMS[dataset][beta]
    d = DATA[dataset]

    c = base_config()
    c.description = f"LoRM paper setup: {DESCRIPTION[dataset]}, beta={beta:g} (fed-mammoth README command)"
    c.seed = 42
    c.method = "lorm"  # alternating B, A, B, … rounds (the reference's --train_matrix=alt)
    if "method_options" in c:  # older config layout
        c.method_options.train_matrix = "alt"
    c.backbone.name = "vit_b16_augreg_in21k"
    c.backbone.options = ml_collections.ConfigDict(
        {"path": VIT_PATH_PLACEHOLDER, "image_size": 224, "qkv": "fused"})

    c.data.name = d["name"]
    c.data.options = ml_collections.ConfigDict(
        {"data_dir": DATA_DIR_PLACEHOLDER, "image_size": 224, **EXTRA_OPTIONS.get(dataset, {})})
    if not isinstance(d["classes_per_task"], int):  # base_config's field is an int; ConfigDict keeps field types
        del c.data["classes_per_task"]
    c.data.classes_per_task = d["classes_per_task"]
    c.data.class_order_seed = -1
    c.data.partition = "dirichlet"
    c.data.beta = beta
    c.data.min_samples = 6
    c.data.augment = d["augment"]
    if "crop_scale" in d:
        c.data.crop_scale = d["crop_scale"]
    c.data.test_resize_ratio = d["test_resize_ratio"]
    c.data.mean, c.data.std = d["mean"], d["std"]
    if "interpolation" in c.data:  # the reference's kornia/torchvision resampling is bicubic (if the engine offers it)
        c.data.interpolation = "bicubic"

    c.num_clients = 10
    c.rounds = rounds
    c.epochs = 5
    c.batch_size = 16
    c.lr, c.lr_a, c.lr_b = float(lr), float(lr_a), float(lr_b)
    c.weight_decay = 0.0
    c.rank = rank
    c.alpha_backbone = 0.0
    c.alpha_head = alpha_head
    c.gram_passes = gram_passes
    return c
