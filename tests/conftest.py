"""Suite-wide settings: one persistent XLA compilation cache for the whole session.

Many tests run the same small configs again (a CLI run restarted after a kill, the same tiny run on 1 and 8 devices,
in this process and in subprocesses, which inherit the environment): with the cache a program compiled once is read
back instead of compiled again (a `configs/tiny.py` run: 48 s without, 17 s with it, on the 2-core machine). The cache
key covers the program, the XLA flags and the devices, so a hit is the same compiled code. A fresh directory per
session; a cache the user set (JAX_COMPILATION_CACHE_DIR) is kept.
"""
import os
import shutil
import sys
import tempfile

_CREATED = []


def pytest_configure(config):
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
