"""Federated methods as small strategies plugged into the same engine (:mod:`lorm_jax.continual`).

A method decides which LoRA factor(s) train in a round (``train_factor``: "A", "B", "AB" or "" for none), how the
server merges what the clients send (``merge_round``), how finished tasks are merged into the evaluation model
(``merge_tasks``), and what crosses the network (``uploads`` / ``downloads`` / ``task_grams``, sized by
:mod:`lorm_jax.ledger`). The interface is :class:`lorm_jax.methods.base.Method` (with a runnable example).

=============  ====================  ==========================================  ==================================
name           trains per round      round merge                                  cross-task merge
=============  ====================  ==========================================  ==================================
lorm           B, A, B, …            LoRM closed form of the trained factor       RegMean of task deltas
lorm_a/_b      A only / B only       same                                         same
fedavg_lora    A and B               sample-weighted FedAvg of A and of B         mean of task deltas
ffa_lora       B (A frozen, random)  sample-weighted FedAvg of B                  mean of task deltas
regmean_lora   A and B               RegMean of B_k A_k, best rank-r carry-over   RegMean of task deltas
centralized    A and B               none: one client holds all the task's data   RegMean of task deltas
linear_probe   head only             —                                            — (pretrained backbone)
=============  ====================  ==========================================  ==================================

Every method merges the head with RegMean (``config.head_merge = "regmean"``, LORM_SPEC §7) or FedAvg ("fedavg"); the
backbone Grams are diagonal or full according to ``config.alpha_backbone`` (0 = diagonal).
"""
from __future__ import annotations

from typing import Callable

import ml_collections

from lorm_jax.methods.base import Merges, Method, Statistics, compile_merges  # noqa: F401  (the interface, re-exported)
from lorm_jax.methods.centralized import Centralized
from lorm_jax.methods.fedavg_lora import FedAvgLoRA
from lorm_jax.methods.linear_probe import LinearProbe
from lorm_jax.methods.lorm import LoRM
from lorm_jax.methods.regmean_lora import RegMeanLoRA


def _head(c) -> str:
    return c.get("head_merge", "regmean")


_METHODS = {
    "lorm": lambda c: LoRM("alt", c.merge_dtype, head_merge=_head(c)),            # the paper: B, A, B, … each task
    "lorm_a": lambda c: LoRM("A", c.merge_dtype, "lorm_a", _head(c)),             # A only (B stays at its init)
    "lorm_b": lambda c: LoRM("B", c.merge_dtype, "lorm_b", _head(c)),             # B only (A frozen at its init)
    "fedavg_lora": lambda c: FedAvgLoRA("AB", c.merge_dtype, "fedavg_lora", _head(c)),
    "ffa_lora": lambda c: FedAvgLoRA("B", c.merge_dtype, "ffa_lora", _head(c)),
    "regmean_lora": lambda c: RegMeanLoRA(c.merge_dtype, head_merge=_head(c)),
    "centralized": lambda c: Centralized(c.merge_dtype),
    "linear_probe": lambda c: LinearProbe(c.merge_dtype, head_merge=_head(c)),
}
NAMES = tuple(sorted(_METHODS))
_BUILT_IN = frozenset(_METHODS)


def register(name: str, factory: Callable[[ml_collections.ConfigDict], Method]) -> None:
    """Add a method: ``factory(config) -> Method`` (:class:`lorm_jax.methods.base.Method`) under ``name``, so that
    ``config.method = name`` runs it (docs/EXTENDING.md). Registering a name again replaces it (a config file that
    registers is loaded more than once); a built-in name cannot be replaced."""
    global NAMES
    if name in _BUILT_IN:
        raise ValueError(f"method {name!r} is built in; register yours under another name")
    _METHODS[name] = factory
    NAMES = tuple(sorted(_METHODS))


def get(name: str, config) -> Method:
    """The method called ``name``, configured from the experiment ``config`` (``merge_dtype``, ``head_merge``)."""
    if name not in _METHODS:
        raise ValueError(f"config.method = {name!r} is invalid: valid methods are {list(NAMES)}")
    method = _METHODS[name](config)
    if method.train_factor(0) == "AB" and min(config.lr_a, config.lr_b) >= 0 and config.lr_a != config.lr_b:
        raise ValueError(f"config.lr_a = {config.lr_a} and config.lr_b = {config.lr_b} differ, but method {name!r} "
                         f"trains A and B together with one learning rate: set them equal (or one to -1)")
    return method


def effective_config(config):
    """The config the engine actually runs: ``config`` itself, or the method's rewrite of it (``centralized`` pools
    every task's data on one client)."""
    configure = getattr(get(config.method, config), "configure", None)
    return config if configure is None else configure(config)
