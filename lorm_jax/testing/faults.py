"""A real ``lorm-jax run`` that kills or signals itself at a chosen point, for the crash-safety tests.

    LORM_JAX_FAULT="<stage>@<unit>[:<SIGNAL>]" python -m lorm_jax.testing.faults run --config ... --workdir ...

sends SIGNAL (default SIGKILL) to the process in that stage of that unit: ``train`` (the clients' local training has
finished), ``merge`` (entering a round's server merge or the end-of-task merge) or ``checkpoint`` (every file of the
unit's checkpoint written, before the atomic rename that commits it: a crash mid-checkpoint; checkpoints are written in
the background, so this fires in orbax's thread, while the next unit computes). Everything else is the
command line of :mod:`lorm_jax.cli`, with the run's stages wrapped through :class:`lorm_jax.continual.Hooks`.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import sys
import time
from typing import Callable, NamedTuple

import jax
from etils import epath

from lorm_jax import checkpointing, cli, continual

FAULT_ENV = "LORM_JAX_FAULT"


class Fault(NamedTuple):
    stage: str     # train | merge | checkpoint
    unit: int
    signum: int


def parse(spec: str) -> Fault:
    m = re.fullmatch(r"(train|merge|checkpoint)@(\d+)(?::(SIGKILL|SIGTERM|SIGINT))?", spec)
    if m is None:
        raise ValueError(f"{FAULT_ENV} = {spec!r} is invalid: <train|merge|checkpoint>@<unit>[:SIGKILL|SIGTERM|SIGINT]")
    return Fault(m[1], int(m[2]), int(getattr(signal, m[3] or "SIGKILL")))


class Injector:
    """Fires ``fault`` once, in its stage of its unit; tracks the unit in flight from the resume point on.

    A ``train`` or ``merge`` fault of unit u fires once unit u − 1's checkpoint (state step u), written in the
    background, has committed: the point it kills at is then the same on an idle and on a loaded machine (a kill
    before that commit would lose unit u − 1 as well; ``checkpoint`` faults test the write itself).
    """

    def __init__(self, fault: Fault, first_unit: int, workdir: str = "", commit_timeout_s: float = 300.0):
        self.fault, self.unit, self.workdir, self.commit_timeout_s = fault, first_unit, workdir, commit_timeout_s

    def _previous_unit_committed(self, unit: int) -> None:
        step = epath.Path(self.workdir) / checkpointing.STATE_DIR / str(unit)
        deadline = time.monotonic() + self.commit_timeout_s
        while unit > 0 and self.workdir and not step.exists() and time.monotonic() < deadline:
            time.sleep(0.02)

    def fire(self, stage: str, unit: int | None = None) -> None:
        """Fire if ``stage`` of ``unit`` (default: the unit in flight) is the fault's."""
        unit = self.unit if unit is None else unit
        if self.fault.stage == stage and self.fault.unit == unit and self.unit != -1:
            self.unit = -1  # a signal that does not kill fires once
            if stage != "checkpoint":
                self._previous_unit_committed(unit)
            os.kill(os.getpid(), self.fault.signum)

    def commit(self, destination: str) -> None:
        """The ``before_commit`` callback: step ``s`` of the state checkpoints holds unit ``s - 1``."""
        path = epath.Path(destination)
        if path.parent.name == checkpointing.STATE_DIR and path.name.isdigit():
            self.fire("checkpoint", int(path.name) - 1)

    def wrap(self, name: str, fn: Callable) -> Callable:
        """The ``instrument`` hook: fire after training, before a merge."""
        def train(*args, **kwargs):
            out = jax.block_until_ready(fn(*args, **kwargs))
            self.fire("train")
            return out

        def merge(*args, **kwargs):
            self.fire("merge")
            return fn(*args, **kwargs)
        return {"train": train, "merge_round": merge, "merge_tasks": merge}.get(name, fn)

    def after_unit(self, unit: int, line: dict) -> None:
        if self.unit != -1:
            self.unit = unit + 1

    def hooks(self) -> continual.Hooks:
        return continual.Hooks(instrument=self.wrap, after_unit=self.after_unit)


@contextlib.contextmanager
def before_commit(callback: Callable[[str], None]):
    """Call ``callback(destination)`` right before orbax renames a finished temporary checkpoint directory to its final
    name ``destination`` (patches orbax's private ``async_path.rename``; only here, in the test machinery)."""
    from orbax.checkpoint._src.path import async_path
    original = async_path.rename

    async def rename(src, dst, *args, **kwargs):
        callback(str(dst))
        return await original(src, dst, *args, **kwargs)

    async_path.rename = rename
    try:
        yield
    finally:
        async_path.rename = original


def main(argv: list[str] | None = None) -> int:
    """``lorm-jax`` with the fault of ``LORM_JAX_FAULT`` injected into its ``run`` verb."""
    argv = list(sys.argv if argv is None else argv)
    spec = os.environ.get(FAULT_ENV, "")
    if not spec:
        return cli.main(argv)
    flags = argparse.ArgumentParser(add_help=False)
    flags.add_argument("--workdir", default="")
    workdir = flags.parse_known_args(argv[1:])[0].workdir
    injector = Injector(parse(spec), checkpointing.latest_step(workdir) or 0, workdir)
    with before_commit(injector.commit):
        return cli.main(argv, hooks=injector.hooks())


if __name__ == "__main__":
    sys.exit(main())
