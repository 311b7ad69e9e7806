"""Federated methods as small strategies plugged into the same engine (:mod:`lorm_jax.continual`).

A method decides which LoRA factor trains in a round, how the server merges what the clients send, and how finished
tasks are merged into the evaluation model. See :class:`lorm_jax.methods.lorm.LoRM` for the interface.
"""
from lorm_jax.methods.linear_probe import LinearProbe
from lorm_jax.methods.lorm import LoRM

_METHODS = {
    "lorm": lambda c: LoRM("alt", c.merge_dtype),            # the paper: B, A, B, … each task
    "lorm_a": lambda c: LoRM("A", c.merge_dtype, "lorm_a"),  # A only (B stays at its init)
    "lorm_b": lambda c: LoRM("B", c.merge_dtype, "lorm_b"),  # B only (A frozen at its random init)
    "linear_probe": lambda c: LinearProbe(c.merge_dtype),
}
NAMES = tuple(sorted(_METHODS))


def get(name: str, config):
    """The method called ``name``, configured from the experiment ``config`` (e.g. ``merge_dtype``)."""
    if name not in _METHODS:
        raise ValueError(f"config.method = {name!r} is invalid: valid methods are {list(NAMES)}")
    return _METHODS[name](config)
