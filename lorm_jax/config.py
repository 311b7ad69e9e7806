"""The experiment config: every key with its default and meaning, and validation before any compute.

Config files in ``configs/`` start from :func:`base_config` and override what differs (big_vision style: the whole
experiment is visible in one ``get_config()``). Sentinels instead of ``None`` keep every key overridable from the
command line (``--config.data.n_train_per_class=200``).
"""
from __future__ import annotations

import difflib
import importlib.util
import math
import os
import re
import traceback
import types
from typing import Sequence

import ml_collections
import numpy as np


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 42                       # training randomness: LoRA and head init, batch order, augmentation (fold_in
                                      # chains of (seed, task, round, client, step)); also the data draws when
                                      # data.seed = -1
    c.method = "lorm"                 # see lorm_jax.methods: lorm, lorm_a/_b, fedavg_lora, ffa_lora, regmean_lora,
                                      # centralized, linear_probe

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
    c.data.seed = -1                  # per-class subsample and client partitions; -1 = config.seed (see data_seed)
    c.data.partition = "dirichlet"    # dirichlet | quantity | iid
    c.data.beta = 0.5                 # Dirichlet concentration (smaller = more label skew)
    c.data.min_samples = 6            # redraw the task's partition until every client has this many (reference: 6)
    c.data.classes_per_client = 2     # quantity mode
    c.data.augment = "rrc"            # rrc (random resized crop + flip) | crop (resize, random crop, flip) | flip
                                      # | none
    c.data.crop_scale = (0.08, 1.0)
    c.data.interpolation = "bilinear"  # bilinear | bicubic (the reference resamples bicubically)
    c.data.test_resize_ratio = 0.0    # 0 = plain resize; e.g. 256/224 = resize then centre crop (reference)
    c.data.mean = ()                  # () = the backbone's native normalisation
    c.data.std = ()
    c.data.max_len = 32               # text: tokens per example

    c.num_clients = 10
    c.clients_per_round = 0           # clients drawn to take part in each round and each task's end (0 = all, the
                                      # reference); a seeded draw of config.seed, task and round (docs/DECISIONS.md)
    c.rounds = 5                      # communication rounds per task
    c.epochs = 5                      # local epochs per round
    c.batch_size = 16
    c.lr = 3e-3                       # head (and LoRA factors where lr_a / lr_b < 0)
    c.lr_a = -1.0
    c.lr_b = -1.0
    c.weight_decay = 0.0
    c.rank = 1
    c.head_init = "trunc_2sigma"      # head W: trunc_2sigma (0.02·N(0,1) cut at ±2σ, std ≈ 0.0176) | reference
                                      # (timm's trunc_normal_(std=0.02): cut at ±2 absolute, i.e. N(0, 0.02²))

    c.alpha_backbone = 0.0            # Gram shrinkage α for LoRA layers (0 = diagonal only, the paper setting)
    c.alpha_head = 0.5                # … for the head (reference 0.5; 0.3 on CUB-200)
    c.gram_passes = 1                 # data passes for Gram statistics (reference regmean_rounds)
    c.gram_batch_size = 0             # 0 = batch_size; most examples per packed batch of the Gram pass (batches are
                                      # equally full), and the batch that numbers each client's Gram stream (hence
                                      # its augmentation keys)
    c.gram_network = "filler"         # filler (reference quirk Q2) | trained (the clean variant W0 + B_t A_t)
    c.gram_augment = True             # Grams over train-augmented inputs, as the reference (Q7)

    c.eval_every_round = False        # also evaluate (filler model, Q8) after every round
    c.eval_batch_size = 128           # most examples per packed batch of the evaluation pass
    c.client_lanes = 0                # vmapped lanes of local training, clients run back to back in each (0 = auto:
                                      # one per device on CPU, ~ΣS/S_max on accelerators, capped by the memory plan;
                                      # else a multiple of the mesh size); results do not depend on it
    c.clients_per_wave = 0            # clients trained and summed together (0 = auto: the memory plan's choice, the
                                      # whole round when it fits); results do not depend on it (up to rounding)
    c.mesh_clients = 0                # devices on the mesh's `clients` axis (0 = every device of every process)
    c.merge_dtype = "float32"         # float64 needs jax_enable_x64
    c.head_merge = "regmean"          # regmean (LORM_SPEC §7) | fedavg: head weight merge of every method (bias:
                                      # FedAvg)
    c.merge_diagnostics = True        # per-round response-matching residuals of the merge in metrics.jsonl
    c.tensorboard = True              # also write metrics.jsonl's numbers as TensorBoard event files
                                      # (WORKDIR/tensorboard/, lorm_jax.events)
    return c


def data_seed(c: ml_collections.ConfigDict) -> int:
    """The seed of the data draws (per-class subsample, client partitions): ``config.data.seed``, or ``config.seed``
    when it is -1 (the default, so configs written before the key existed draw the same data)."""
    return int(c.seed if c.data.seed < 0 else c.data.seed)


# Keys added after runs were recorded, each with the default that reproduces those runs. A workdir's config.json
# written before a key existed is read as holding this default (see with_added_keys), so such runs stay resumable and
# reusable. A new key belongs here only if its default changes nothing. REMOVED_KEYS were throughput knobs that never
# changed a result (client_chunk: clients per vmapped call, replaced by client_lanes); they are dropped on reading.
ADDED_KEYS = {"data.seed": -1, "head_init": "trunc_2sigma", "client_lanes": 0, "tensorboard": True,
              "clients_per_round": 0, "clients_per_wave": 0}
REMOVED_KEYS = ("client_chunk",)


def with_added_keys(recorded: dict) -> dict:
    """``recorded`` (a config as JSON, e.g. a workdir's config.json) with the :data:`ADDED_KEYS` it lacks set to their
    defaults and without the :data:`REMOVED_KEYS`; a copy, nested dicts included."""
    import copy
    out = copy.deepcopy(recorded)
    for key in REMOVED_KEYS:
        out.pop(key, None)
    for dotted, default in ADDED_KEYS.items():
        *parents, leaf = dotted.split(".")
        target = out
        for p in parents:
            target = target.get(p) if isinstance(target, dict) else None
        if isinstance(target, dict) and leaf not in target:
            target[leaf] = default
    return out


class InputError(ValueError):
    """Bad input from the user: a config value or key, a config file, a command-line flag, a path. The message names
    what to fix; the command line prints it as one line ``lorm-jax: error: ...`` and exits with status 2."""


def invalid(key: str, value, allowed: str) -> InputError:
    """The one error style of config checks: ``config.<key> = <value> is invalid: <what is allowed>``."""
    return InputError(f"config.{key} = {value!r} is invalid: {allowed}")


def unknown_key(key: str, value, valid) -> InputError:
    """``config.<key>`` does not exist; ``valid`` are the keys at its level (the closest one is suggested)."""
    valid = sorted(valid)
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], valid, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return invalid(key, value, f"unknown key; {hint}valid keys here: {valid}")


def wrong_type(key: str, value, default) -> InputError:
    """``config.<key>`` holds ``value`` where the type of ``default`` is needed."""
    shown = "" if isinstance(default, ml_collections.ConfigDict) else f" (default {default!r})"
    return invalid(key, value, f"must be {_type_name(default)}{shown}")


def _fail(key: str, value, allowed: str):
    raise invalid(key, value, allowed)


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _is_number(x) -> bool:
    return (_is_int(x) or isinstance(x, (float, np.floating))) and not isinstance(x, (bool, np.bool_))


def _type_name(default) -> str | None:
    """What a key with this default must hold (None: anything, e.g. a None default another module added)."""
    if isinstance(default, bool):
        return "a bool (True/False)"
    if _is_int(default):
        return "an integer"
    if isinstance(default, float):
        return "a number"
    if isinstance(default, str):
        return "a string"
    if isinstance(default, (tuple, list)):
        return "a tuple"
    if isinstance(default, ml_collections.ConfigDict):
        return "a dict"
    return None


def _has_type(value, default) -> bool:
    if isinstance(default, bool):
        return isinstance(value, (bool, np.bool_))
    if _is_int(default):
        return _is_int(value)
    if isinstance(default, float):
        return _is_number(value)
    if isinstance(default, str):
        return isinstance(value, str)
    if isinstance(default, (tuple, list)):
        return isinstance(value, (tuple, list))
    if isinstance(default, ml_collections.ConfigDict):
        return isinstance(value, (ml_collections.ConfigDict, dict))
    return True


# Keys whose type is not their default's (checked by value below).
_FREE_TYPE = {"data.classes_per_task"}
# Free-form sub-dicts (passed as keyword options to a loader): their keys are not checked here.
_FREE_FORM = {"backbone.options", "data.options"}


def _check_keys_and_types(c, base, prefix: str = "") -> None:
    extra = {"description"} if not prefix else set()
    for key in c.keys():
        path = prefix + key
        if key not in base and key not in extra:
            raise unknown_key(path, c[key], set(base.keys()) | extra)
        if key in extra:
            continue
        value, default = c[key], base[key]
        if path in _FREE_TYPE:
            continue
        if not _has_type(value, default):
            raise wrong_type(path, value, default)
        if isinstance(default, ml_collections.ConfigDict) and path not in _FREE_FORM:
            _check_keys_and_types(value, default, path + ".")


def _finite(x) -> bool:
    return _is_number(x) and math.isfinite(float(x))


def validate(c: ml_collections.ConfigDict) -> None:
    """Refuse impossible settings before any compute, naming the key, the value and what is allowed.

    Checks unknown keys (at every level except the free-form ``*.options``), types against :func:`base_config`'s
    defaults, value ranges and enumerations. Checks that need this machine's files (:func:`validate_paths`), the dataset
    (:func:`validate_tasks`) or the backbone (:func:`validate_rank`) run in ``plan.build_setup``.
    """
    _check_keys_and_types(c, base_config())
    positive_ints = ["num_clients", "rounds", "epochs", "batch_size", "rank", "gram_passes", "eval_batch_size",
                     "data.classes_per_client", "data.max_len"]
    for key in positive_ints:
        if _get(c, key) < 1:
            _fail(key, _get(c, key), "must be an integer >= 1")
    for key in ("data.max_classes", "data.n_train_per_class", "data.n_test_per_class", "data.min_samples",
                "gram_batch_size", "client_lanes", "clients_per_round", "clients_per_wave", "mesh_clients", "seed"):
        if _get(c, key) < 0:
            _fail(key, _get(c, key), "must be an integer >= 0" + (" (0 = all / off)" if key != "seed" else ""))
    if c.clients_per_round > c.num_clients:
        _fail("clients_per_round", c.clients_per_round, f"0 (all) .. config.num_clients = {c.num_clients}")
    if c.data.class_order_seed < -1:
        _fail("data.class_order_seed", c.data.class_order_seed, "-1 (natural order) or a seed >= 0")
    if c.data.seed < -1:
        _fail("data.seed", c.data.seed, "-1 (use config.seed) or a seed >= 0")
    _check_classes_per_task(c.data.classes_per_task)
    from lorm_jax import backbones, methods
    if c.method not in methods.NAMES:
        _fail("method", c.method, f"one of {list(methods.NAMES)}")
    if c.backbone.name not in backbones.NAMES:
        _fail("backbone.name", c.backbone.name, f"one of {list(backbones.NAMES)}")
    from lorm_jax import data as data_lib
    if c.data.name not in data_lib.available():
        _fail("data.name", c.data.name, f"one of {data_lib.available()}")
    if not (_finite(c.data.beta) and c.data.beta > 0):
        _fail("data.beta", c.data.beta, "the Dirichlet concentration must be a finite number > 0")
    if c.data.partition not in ("dirichlet", "quantity", "iid"):
        _fail("data.partition", c.data.partition, "one of dirichlet, quantity, iid")
    if c.data.augment not in ("rrc", "crop", "flip", "none"):
        _fail("data.augment", c.data.augment, "one of rrc, crop, flip, none")
    if c.data.interpolation not in ("bilinear", "bicubic"):
        _fail("data.interpolation", c.data.interpolation, "bilinear or bicubic")
    scale = tuple(c.data.crop_scale)
    if len(scale) != 2 or not all(_finite(s) for s in scale) or not 0 < scale[0] <= scale[1] <= 1:
        _fail("data.crop_scale", c.data.crop_scale, "a pair (lo, hi) with 0 < lo <= hi <= 1")
    ratio = c.data.test_resize_ratio
    if not _finite(ratio) or not (ratio == 0 or ratio >= 1):
        _fail("data.test_resize_ratio", ratio, "0 (plain resize) or a ratio >= 1 (resize, then centre crop)")
    if not all(_finite(s) and s > 0 for s in c.data.std):
        _fail("data.std", c.data.std, "finite numbers > 0")
    if not all(_finite(m) for m in c.data.mean):
        _fail("data.mean", c.data.mean, "finite numbers")
    if len(c.data.mean) != len(c.data.std):
        _fail("data.mean", c.data.mean, "give data.mean and data.std together (or neither), of equal length")
    if c.head_init not in ("trunc_2sigma", "reference"):
        _fail("head_init", c.head_init, "trunc_2sigma (default) or reference (timm's N(0, 0.02²) cut at ±2)")
    if c.gram_network not in ("filler", "trained"):
        _fail("gram_network", c.gram_network, "one of filler (reference), trained")
    for key in ("alpha_backbone", "alpha_head"):
        if not (_finite(c[key]) and 0.0 <= c[key] <= 1.0):
            _fail(key, c[key], "a shrinkage weight in [0, 1]")
    if not (_finite(c.lr) and c.lr > 0):
        _fail("lr", c.lr, "a finite learning rate > 0")
    for key in ("lr_a", "lr_b"):
        if not (_finite(c[key]) and c[key] != 0):
            _fail(key, c[key], "a finite learning rate > 0, or < 0 to use config.lr")
    if not (_finite(c.weight_decay) and c.weight_decay >= 0):
        _fail("weight_decay", c.weight_decay, "a finite number >= 0")
    if c.merge_dtype not in ("float32", "float64"):
        _fail("merge_dtype", c.merge_dtype, "float32 or float64")
    if c.merge_dtype == "float64":
        import jax
        if not jax.config.jax_enable_x64:
            _fail("merge_dtype", c.merge_dtype, "float64 needs 64-bit JAX: set JAX_ENABLE_X64=1 (or "
                                                "jax.config.update('jax_enable_x64', True)) before the run")


def _get(c, dotted: str):
    for part in dotted.split("."):
        c = c[part]
    return c


def _check_classes_per_task(per_task) -> None:
    allowed = "an integer >= 1 (equal tasks) or a non-empty tuple of integers >= 1 (task sizes)"
    if _is_int(per_task):
        if per_task < 1:
            _fail("data.classes_per_task", per_task, allowed)
    elif not (isinstance(per_task, (tuple, list)) and per_task and all(_is_int(s) and s >= 1 for s in per_task)):
        _fail("data.classes_per_task", per_task, allowed)


def validate_paths(c: ml_collections.ConfigDict) -> None:
    """Files and folders the config names must exist on this machine (a config may be valid but not runnable here)."""
    from etils import epath
    options = c.data.options
    for key in ("data_dir", "manual_dir"):
        if options.get(key, None) is not None and not epath.Path(str(options[key])).is_dir():
            _fail(f"data.options.{key}", options[key], "an existing folder holding the dataset files (local or "
                                                         "gs://…)")
    path = c.backbone.options.get("path", None)
    if c.backbone.name == "vit_b16_augreg_in21k" and not path:
        _fail("backbone.options.path", path, "vit_b16_augreg_in21k needs the big_vision .npz checkpoint path")
    if path and not epath.Path(str(path)).exists():
        _fail("backbone.options.path", path, "an existing checkpoint file (local or gs://…)")


def validate_tasks(c: ml_collections.ConfigDict, num_classes: int) -> None:
    """Checks that need the dataset's class count ``num_classes`` (before ``data.max_classes`` is applied)."""
    if c.data.max_classes > num_classes:
        _fail("data.max_classes", c.data.max_classes, f"at most the {num_classes} classes of {c.data.name!r} "
                                                      "(0 = all)")
    n = c.data.max_classes or num_classes
    per_task = c.data.classes_per_task
    if _is_int(per_task):
        if per_task > n:
            _fail("data.classes_per_task", per_task, f"at most the number of classes ({n}): at least one task")
        if n % per_task:
            _fail("data.classes_per_task", per_task, f"must divide the number of classes ({n}); or give a tuple of "
                                                     f"task sizes that sums to {n}")
    elif sum(per_task) != n:
        _fail("data.classes_per_task", tuple(per_task),
              f"task sizes must sum to the number of classes ({n}); {len(per_task)} tasks sum to {sum(per_task)}")


def validate_rank(c: ml_collections.ConfigDict, lora_shapes: dict) -> None:
    """``rank <= min(d_out, d_in)`` of every LoRA layer (``lora_shapes`` = ``{path: (d_out, d_in)}``)."""
    path, (d_out, d_in) = min(lora_shapes.items(), key=lambda kv: min(kv[1]))
    if c.rank > min(d_out, d_in):
        _fail("rank", c.rank, f"1 .. {min(d_out, d_in)}: the smallest LoRA layer of {c.backbone.name!r} "
                              f"({path}) is {d_out}x{d_in}")


def sibling_module(this_file: str, name: str) -> types.ModuleType:
    """The Python file ``name`` next to ``this_file``, run as a fresh module: how a config file uses another config
    file or a helper module beside it (config files are loaded by path, as ``--config FILE`` does, not imported as a
    package, so ``import`` does not find their neighbours)."""
    path = os.path.join(os.path.dirname(os.path.abspath(this_file)), name)
    spec = importlib.util.spec_from_file_location(f"lorm_jax_config_{os.path.splitext(name)[0]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_sibling(this_file: str, name: str, *args) -> ml_collections.ConfigDict:
    """``get_config(*args)`` of the config file ``name`` next to ``this_file`` (config files build on each other)."""
    return sibling_module(this_file, name).get_config(*args)


def override(c: ml_collections.ConfigDict, **dotted) -> ml_collections.ConfigDict:
    """Set ``{"data.beta": 0.1, ...}`` on ``c`` in place (dotted keys, as ``--config.data.beta=0.1``); returns c."""
    for key, value in dotted.items():
        target = c
        *parents, leaf = key.split(".")
        for p in parents:
            target = target[p]
        target[leaf] = value
    return c


def split_overrides(args: Sequence[str]) -> tuple[list[str], list[str]]:
    """``args`` -> (the ``--config.KEY=VALUE`` overrides, with the VALUE of a ``--config.KEY VALUE`` pair; the rest)."""
    overrides, rest, value_next = [], [], False
    for token in args:
        if re.match(r"--?(no)?config\.", token):
            overrides.append(token)
            value_next = "=" not in token
        elif value_next and not token.startswith("--"):
            overrides.append(token)
            value_next = False
        else:
            rest.append(token)
            value_next = False
    return overrides, rest


def shipped_dir() -> str | None:
    """The folder of the configs shipped with lorm_jax: ``lorm_jax/configs`` in an installed wheel, ``configs/`` of the
    source checkout otherwise (an editable install or ``PYTHONPATH``); None if neither exists."""
    here = os.path.dirname(os.path.abspath(__file__))
    for folder in (os.path.join(here, "configs"), os.path.join(os.path.dirname(here), "configs")):
        if os.path.isfile(os.path.join(folder, "tiny.py")):
            return folder
    return None


def shipped_names() -> list[str]:
    """Names of the shipped configs (``tiny``, ``default``, ``paper/cifar100``, …) for ``--config NAME``."""
    root = shipped_dir()
    if root is None:
        return []
    names = []
    for folder, _, files in os.walk(root):
        rel = os.path.relpath(folder, root)
        names += [os.path.normpath(os.path.join(rel, f[:-3])) for f in files
                  if f.endswith(".py") and not f.startswith("_") and f != "reference_table.py"]
    return sorted(names)


def resolve(spec: str) -> tuple[str, str | None]:
    """``FILE[:ARG]`` -> ``(path, arg)``. FILE is a config file's path, or the name of a shipped config (``tiny``,
    ``paper/cifar100``; also ``configs/tiny.py`` where no such file is in the current directory): how an installed
    package runs the configs of the repository. A FILE that is neither raises :class:`InputError`."""
    path, arg = (spec.split(":", 1) + [None])[:2]
    if os.path.isfile(path):
        return path, arg
    root = shipped_dir()
    name = path[len("configs/"):] if path.startswith("configs/") else path
    name = name[:-3] if name.endswith(".py") else name
    if root is not None and os.path.isfile(os.path.join(root, name + ".py")) and not os.path.isabs(path):
        return os.path.join(root, name + ".py"), arg
    raise InputError(f"--config {spec}: config file {path!r} not found (give a path, or one of the shipped configs: "
                     f"{', '.join(shipped_names())})")


def load_file(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """``get_config()`` (``get_config(arg)`` with an ``arg``) of the config file ``path``. A file that does not load
    (a syntax error, an exception while it runs or in ``get_config``, no ``get_config``, something else returned)
    raises :class:`InputError` ``"<file>:<line>: <what>"`` chained to the original exception (its traceback)."""
    spec = importlib.util.spec_from_file_location(f"lorm_jax_config_{os.path.splitext(os.path.basename(path))[0]}",
                                                  path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        if not callable(getattr(module, "get_config", None)):
            raise InputError(f"{path}:1: defines no get_config() (a config file's get_config() returns the "
                             "experiment's ml_collections.ConfigDict, see configs/tiny.py)")
        config = module.get_config() if arg is None else module.get_config(arg)
    except InputError:
        raise
    except SyntaxError as e:
        if os.path.abspath(e.filename or "") != os.path.abspath(path):
            raise InputError(f"{path}:{_line_in(e, path)}: {e.filename}:{e.lineno}: SyntaxError: {e.msg}") from e
        raise InputError(f"{path}:{e.lineno}: SyntaxError: {e.msg}") from e
    except Exception as e:  # noqa: BLE001 - anything the file raises is a bad config file
        raise InputError(f"{path}:{_line_in(e, path)}: {type(e).__name__}: {e}") from e
    if not isinstance(config, ml_collections.ConfigDict):
        raise InputError(f"{path}:1: get_config() returned {type(config).__name__}, not an ml_collections.ConfigDict "
                         "(start from lorm_jax.config.base_config())")
    return config


def _line_in(error: BaseException, path: str) -> int:
    """The line of ``path`` the innermost frame of ``error``'s traceback in that file was running (1 if none)."""
    line, target = 1, os.path.abspath(path)
    for frame, lineno in traceback.walk_tb(error.__traceback__):
        if os.path.abspath(frame.f_code.co_filename) == target:
            line = lineno
    return line


def load(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """``get_config()`` of the config file ``spec`` (``path`` or a shipped name, :func:`resolve`; ``path:arg`` calls
    ``get_config(arg)``) with the command-line ``overrides`` (``["--config.rank=4", "--config.data.beta", "0.1", ...]``)
    applied by ml_collections' config_flags, which parses each value as the type the key has in the file's config.

    A missing file, a file that does not load (:func:`load_file`), an unknown key or a value that does not parse raises
    :class:`InputError`; whether the values are allowed is :func:`validate`'s job.
    """
    from absl import flags
    from ml_collections import config_flags
    config = load_file(*resolve(spec))
    argv = ["lorm-jax", *overrides]
    fv = flags.FlagValues()
    try:
        config_flags.DEFINE_config_dict("config", config, "experiment config", flag_values=fv, lock_config=True,
                                        sys_argv=argv)
        rest = fv(argv)
    except flags.IllegalFlagValueError as e:  # "flag --config.KEY=VALUE: why it does not parse"
        match = re.match(r"flag --config\.([^=]+)=(.*?): (.*)", str(e), re.S)
        if match is None:
            raise InputError(str(e)) from e
        key, value, why = match.groups()
        default = _get(load(spec), key)
        if _type_name(default) is None:
            raise invalid(key, value, why) from e
        raise wrong_type(key, value, default) from e
    except (AttributeError, KeyError) as e:  # config_flags' (escaped) message for a key the config does not have
        raise _unknown_override(load(spec), list(overrides)) or InputError(str(e)) from e
    except flags.Error as e:
        raise InputError(str(e)) from e
    if rest[1:]:
        raise InputError(f"unexpected arguments after the config overrides: {rest[1:]}")
    return fv.config


def _unknown_override(config: ml_collections.ConfigDict, overrides: list[str]) -> InputError | None:
    """The error for the first ``--config.a.b[=v]`` of ``overrides`` whose key ``config`` does not have."""
    for i, token in enumerate(overrides):
        match = re.match(r"--?(?:no)?config\.([^=]+)(?:=(.*))?$", token, re.S)
        if match is None:
            continue
        key, value = match.groups()
        if value is None and i + 1 < len(overrides) and not overrides[i + 1].startswith("--"):
            value = overrides[i + 1]
        node, parts = config, key.split(".")
        for depth, part in enumerate(parts):
            if not isinstance(node, ml_collections.ConfigDict):
                return invalid(key, value, f"config.{'.'.join(parts[:depth])} is not a dict")
            if part not in node:
                return unknown_key(key, value, node.keys())
            node = node[part]
    return None
