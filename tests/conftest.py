"""Suite-wide settings and the configs the tests build their experiments from.

Compilation cache: many tests run the same small configs again (a CLI run restarted after a kill, the same tiny run on
1 and 8 devices, in this process and in subprocesses, which inherit the environment): with one persistent XLA
compilation cache for the session a program compiled once is read back instead of compiled again (a `configs/tiny.py`
run: 48 s without, 17 s with it, on the 2-core machine). The cache key covers the program, the XLA flags and the
devices, so a hit is the same compiled code. A fresh directory per session; a cache the user set
(JAX_COMPILATION_CACHE_DIR) is kept.

Configs (the only place tests build them; ``from conftest import small_config``, also in the subprocess scripts
``tests/_scale_worker.py`` and ``tests/_stress_config.py``, which put this directory on ``sys.path``):

* :func:`tiny_config`: ``configs/tiny.py`` as the command line loads it (3 tasks × 2 classes, 4 clients, 3 rounds of
  2 epochs, evaluation after every round), plus overrides;
* :func:`small_config`: the same made smaller, :data:`SMALL` (2 tasks × 2 classes of 40 / 12 examples, 2 rounds of
  1 epoch, no per-round evaluation: 6 units), plus overrides; ``small_config(**ONE_BLOCK)`` has a 1-block ViT (the
  fastest to compile);
* :func:`shared_setup`: ``plan.build_setup(small_config(**ONE_BLOCK, method=method))``, built (and compiled) once per
  process and shared by the test modules (the setup is immutable; :func:`with_method` swaps its method).
"""
import copy
import functools
import os
import shutil
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tiny.py")
SMALL = {"data.options.num_classes": 4, "data.options.n_train": 40, "data.options.n_test": 12, "rounds": 2,
         "epochs": 1, "eval_every_round": False}
ONE_BLOCK = {"backbone.options.depth": 1}

_CREATED = []


def pytest_configure(config):
    # CPU only, also where the TPU runtime of the [tpu] extra is installed (it would try to find a TPU at start-up);
    # the TPU compile tests (test_aot.py) need no TPU backend. Subprocesses inherit it.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if "jax" in sys.modules:
        sys.modules["jax"].config.update("jax_platforms", os.environ["JAX_PLATFORMS"])
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return
    path = tempfile.mkdtemp(prefix="lorm_jax_tests_xla_cache_")
    _CREATED.append(path)
    settings = {"JAX_COMPILATION_CACHE_DIR": path, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    os.environ.update(settings)
    if "jax" in sys.modules:  # imported by a plugin before this hook: its config already read the environment
        jax = sys.modules["jax"]
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_unconfigure(config):
    for path in _CREATED:
        shutil.rmtree(path, ignore_errors=True)


def tiny_config(**overrides):
    """``configs/tiny.py`` loaded as ``lorm-jax run --config configs/tiny.py`` loads it, with ``overrides`` (dotted
    keys, ``{"data.beta": 0.1}``) set on it; unlocked, so a test may add keys (``backbone.options.compute_dtype``)."""
    from lorm_jax import config as config_lib
    c = config_lib.load(TINY)
    c.unlock()
    return config_lib.override(c, **overrides)


def small_config(**overrides):
    """:func:`tiny_config` with :data:`SMALL` (2 tasks × 2 classes, 2 rounds of 1 epoch, no per-round evaluation), then
    ``overrides``."""
    return tiny_config(**{**SMALL, **overrides})


def small_flags(**overrides) -> list:
    """:func:`small_config` as command-line overrides of ``configs/tiny.py`` (``--config.KEY=VALUE``)."""
    return [f"--config.{k}={v}" for k, v in {**SMALL, **overrides}.items()]


@functools.lru_cache(maxsize=4)
def shared_setup(method: str = "lorm"):
    """``plan.build_setup(small_config(**ONE_BLOCK, method=method))``, cached: the setup is immutable and tests swap
    methods with :func:`with_method`, so its compiled client programs are shared across test modules."""
    from lorm_jax import plan
    return plan.build_setup(small_config(**ONE_BLOCK, method=method))


def with_method(setup, name: str, **overrides):
    """The same setup (compiled client programs included) with the method ``name`` (configured from the setup's config
    with ``overrides``) and its compiled merges. The setup itself when that is its method already."""
    from lorm_jax import config as config_lib
    from lorm_jax import methods, plan
    c = config_lib.override(copy.deepcopy(setup.config), method=name, **overrides)
    method = methods.get(name, c)
    return setup if method == setup.method else plan.with_method(setup, method)
