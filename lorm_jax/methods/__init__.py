"""Federated methods as small strategies plugged into the same engine (:mod:`lorm_jax.continual`).

A method decides which LoRA factor trains in a round, how the server merges what the clients send, and how finished
tasks are merged into the evaluation model. See :class:`lorm_jax.methods.lorm.LoRM` for the interface.
"""
from lorm_jax.methods.lorm import LoRM

_METHODS = {"lorm": LoRM}


def get(name: str, **options):
    """The method called ``name`` (e.g. ``"lorm"``), built with ``options`` from the config."""
    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; valid: {sorted(_METHODS)}")
    return _METHODS[name](**options)


NAMES = tuple(sorted(_METHODS))
