"""Shared by test_methods / test_ledger: a tiny config and its setup, built (and compiled) once per session."""
import functools
import os
import sys

from lorm_jax import config as config_lib
from lorm_jax import continual

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**overrides):
    """configs/tiny.py with a 1-block ViT, 2 tasks × 2 classes, 2 rounds of 1 epoch (fast to compile)."""
    sys.path.insert(0, REPO)
    from configs import tiny
    c = tiny.get_config()
    c.backbone.options = {"image_size": 16, "patch": 4, "width": 32, "depth": 1, "heads": 2, "mlp": 64, "seed": 0}
    c.data.options = {"num_classes": 4, "n_train": 40, "n_test": 12, "image_size": 16, "seed": 0}
    c.rounds, c.epochs = 2, 1
    c.eval_every_round = False
    return config_lib.override(c, **overrides)


@functools.lru_cache(maxsize=4)
def tiny_setup(method: str = "lorm"):
    """``continual.build_setup(tiny_config(method=method))``, cached: the setup is immutable and tests swap methods
    with ``dataclasses.replace``, so its compiled client programs are shared across test modules."""
    return continual.build_setup(tiny_config(method=method))
