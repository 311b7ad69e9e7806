"""The experiment config: every key with its default and meaning, and validation before any compute.

Config files in ``configs/`` start from :func:`base_config` and override what differs (big_vision style: the whole
experiment is visible in one ``get_config()``). Sentinels instead of ``None`` keep every key overridable from the
command line (``--config.data.n_train_per_class=200``).
"""
from __future__ import annotations

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 42                       # every random draw is a fold_in chain of (seed, task, round, client, step)
    c.method = "lorm"                 # lorm | lorm_a | lorm_b | linear_probe (see lorm_jax.methods)

    c.backbone = ml_collections.ConfigDict()
    c.backbone.name = "tiny_vit"      # see lorm_jax.backbones.NAMES
    c.backbone.options = ml_collections.ConfigDict()  # passed to backbones.get (image_size, qkv, compute_dtype, path…)

    c.data = ml_collections.ConfigDict()
    c.data.name = "synthetic_images"  # see lorm_jax.data.datasets
    c.data.options = ml_collections.ConfigDict()
    c.data.max_classes = 0            # 0 = all; else keep the N classes with the most training samples
    c.data.n_train_per_class = 0      # 0 = all; else a deterministic per-class subsample
    c.data.n_test_per_class = 0
    c.data.classes_per_task = 2       # int (equal tasks) or a tuple of task sizes
    c.data.class_order_seed = -1      # -1 = natural label order (reference); else a seeded permutation
    c.data.partition = "dirichlet"    # dirichlet | quantity | iid
    c.data.beta = 0.5                 # Dirichlet concentration (smaller = more label skew)
    c.data.min_samples = 6            # redraw the task's partition until every client has this many (reference: 6)
    c.data.classes_per_client = 2     # quantity mode
    c.data.augment = "rrc"            # rrc (random resized crop + flip) | crop (resize, random crop, flip) | flip | none
    c.data.crop_scale = (0.08, 1.0)
    c.data.interpolation = "bilinear"  # bilinear | bicubic (the reference resamples bicubically)
    c.data.test_resize_ratio = 0.0    # 0 = plain resize; e.g. 256/224 = resize then centre crop (reference)
    c.data.mean = ()                  # () = the backbone's native normalisation
    c.data.std = ()
    c.data.max_len = 32               # text: tokens per example

    c.num_clients = 10
    c.rounds = 5                      # communication rounds per task
    c.epochs = 5                      # local epochs per round
    c.batch_size = 16
    c.lr = 3e-3                       # head (and LoRA factors where lr_a / lr_b < 0)
    c.lr_a = -1.0
    c.lr_b = -1.0
    c.weight_decay = 0.0
    c.rank = 1

    c.alpha_backbone = 0.0            # Gram shrinkage α for LoRA layers (0 = diagonal only, the paper setting)
    c.alpha_head = 0.5                # … for the head (reference 0.5; 0.3 on CUB-200)
    c.gram_passes = 1                 # data passes for Gram statistics (reference regmean_rounds)
    c.gram_batch_size = 0             # 0 = batch_size; Grams do not depend on it
    c.gram_network = "filler"         # filler (reference quirk Q2) | trained (the clean variant W0 + B_t A_t)
    c.gram_augment = True             # Grams over train-augmented inputs, as the reference (Q7)

    c.eval_every_round = False        # also evaluate (filler model, Q8) after every round
    c.eval_batch_size = 128
    c.client_chunk = 0                # clients per vmapped call (0 = all at once); results do not depend on it
    c.merge_dtype = "float32"         # float64 needs jax_enable_x64
    return c


def _fail(key: str, value, allowed: str):
    raise ValueError(f"config.{key} = {value!r} is invalid: {allowed}")


def validate(c: ml_collections.ConfigDict) -> None:
    """Refuse impossible settings before any compute, naming the key, the value and what is allowed."""
    known = set(base_config().keys()) | {"description"}
    for key in c.keys():
        if key not in known:
            _fail(key, c[key], f"unknown key; valid keys: {sorted(known)}")
    positive_ints = ["num_clients", "rounds", "epochs", "batch_size", "rank", "gram_passes", "eval_batch_size"]
    for key in positive_ints:
        if not isinstance(c[key], int) or c[key] < 1:
            _fail(key, c[key], "must be an integer >= 1")
    from lorm_jax import methods
    if c.method not in methods.NAMES:
        _fail("method", c.method, f"one of {list(methods.NAMES)}")
    if c.data.beta <= 0:
        _fail("data.beta", c.data.beta, "the Dirichlet concentration must be > 0")
    if c.data.partition not in ("dirichlet", "quantity", "iid"):
        _fail("data.partition", c.data.partition, "one of dirichlet, quantity, iid")
    if c.data.augment not in ("rrc", "crop", "flip", "none"):
        _fail("data.augment", c.data.augment, "one of rrc, crop, flip, none")
    if c.data.interpolation not in ("bilinear", "bicubic"):
        _fail("data.interpolation", c.data.interpolation, "bilinear or bicubic")
    if c.gram_network not in ("filler", "trained"):
        _fail("gram_network", c.gram_network, "one of filler (reference), trained")
    for key in ("alpha_backbone", "alpha_head"):
        if not 0.0 <= c[key] <= 1.0:
            _fail(key, c[key], "a shrinkage weight in [0, 1]")
    if c.lr <= 0:
        _fail("lr", c.lr, "must be > 0")
    if c.weight_decay < 0:
        _fail("weight_decay", c.weight_decay, "must be >= 0")
    if c.merge_dtype not in ("float32", "float64"):
        _fail("merge_dtype", c.merge_dtype, "float32 or float64")
    if len(c.data.mean) != len(c.data.std):
        _fail("data.mean", c.data.mean, "give data.mean and data.std together (or neither)")


def load_sibling(this_file: str, name: str, *args) -> ml_collections.ConfigDict:
    """``get_config(*args)`` of the config file ``name`` next to ``this_file`` (config files build on each other)."""
    import importlib.util
    import os
    path = os.path.join(os.path.dirname(os.path.abspath(this_file)), name)
    spec = importlib.util.spec_from_file_location(f"lorm_jax_config_{os.path.splitext(name)[0]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(*args)


def override(c: ml_collections.ConfigDict, **dotted) -> ml_collections.ConfigDict:
    """Set ``{"data.beta": 0.1, ...}`` on ``c`` in place (dotted keys, like ``--config.data.beta=0.1``); returns ``c``."""
    for key, value in dotted.items():
        target = c
        *parents, leaf = key.split(".")
        for p in parents:
            target = target[p]
        target[leaf] = value
    return c
