"""Test machinery that ships with the library (no test code lives in the library proper).

* :mod:`lorm_jax.testing.faults`: a real ``lorm-jax run`` that kills or signals itself at a chosen stage of a chosen
  unit (``LORM_JAX_FAULT``), for the crash-safety tests.
* :mod:`lorm_jax.testing.stress`: runs under load (CPU burners, lost peers) for the reliability tests and
  ``experiments/stress_reliability.py``.
* :func:`stop_after`: :class:`lorm_jax.continual.Hooks` that stop a run after its first N units, as a crash would
  (every finished unit checkpointed), for tests of resumption.
"""
from __future__ import annotations

from lorm_jax import continual


class StopRun(Exception):
    """Raised by :func:`stop_after`'s hook once its units are done."""


def stop_after(units: int) -> continual.Hooks:
    """Hooks that raise :class:`StopRun` once ``units`` units of the run (counted from unit 0) are checkpointed."""
    def after_unit(unit: int, line: dict) -> None:
        if unit + 1 >= units:
            raise StopRun(f"stopped after unit {unit}")
    return continual.Hooks(after_unit=after_unit)
